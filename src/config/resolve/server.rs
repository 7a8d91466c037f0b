//! `[server]`.

use super::Cx;
use crate::config::raw::*;
use crate::config::{Permitless, ServerConfig};
use std::ops::Range;
use std::path::PathBuf;

impl Cx {
    pub(super) fn server(&mut self, s: ServerToml, span: Range<usize>) -> ServerConfig {
        let mut out = ServerConfig::default();
        if let Some(l) = s.listen {
            match l.get_ref().parse() {
                Ok(a) => out.listen = a,
                Err(_) => self.err(
                    l.span(),
                    format!(
                        "listen: {:?} is not an address like \"127.0.0.1:50051\"",
                        l.get_ref()
                    ),
                ),
            }
        }
        if let Some(h) = s.http {
            let v = h.get_ref();
            if v == "off" || v.is_empty() {
                out.http = None;
            } else {
                match v.parse() {
                    Ok(a) => out.http = Some(a),
                    Err(_) => self.err(
                        h.span(),
                        format!(
                            "http: {v:?} is not an address like \"127.0.0.1:9464\" (or \"off\")"
                        ),
                    ),
                }
            }
        }
        if let Some(d) = s.data_dir {
            out.data_dir = PathBuf::from(d);
        }
        if let Some(e) = s.ephemeral {
            out.ephemeral = e;
        }
        if let Some(Positive(n)) = s.max_targets {
            out.max_targets = n as usize;
        }
        if let Some(t) = s.admin_token {
            if t.get_ref().len() < 16 {
                self.err(t.span(), "admin_token must be at least 16 characters");
            }
            out.admin_token = Some(t.into_inner());
        }
        if let Some(t) = s.tls {
            let span = t.span();
            let t = t.into_inner();
            if t.require_client_cert == Some(true) && t.client_ca.is_none() {
                self.err(span.clone(), "[server.tls] require_client_cert needs client_ca (the CA bundle client certificates must chain to)");
            }
            for (what, path) in [
                ("cert", Some(&t.cert)),
                ("key", Some(&t.key)),
                ("client_ca", t.client_ca.as_ref()),
            ] {
                if path.is_some_and(|p| p.trim().is_empty()) {
                    self.err(
                        span.clone(),
                        format!("[server.tls] {what} is empty; give a PEM file path"),
                    );
                }
            }
            out.tls = Some(crate::config::TlsConfig {
                cert: PathBuf::from(t.cert),
                key: PathBuf::from(t.key),
                client_ca: t.client_ca.map(PathBuf::from),
                require_client_cert: t.require_client_cert.unwrap_or(false),
            });
        }
        if let Some(Positive(n)) = s.max_message_bytes {
            out.max_message_bytes = n as usize;
        }
        if let Some(Dur(d)) = s.shutdown_grace {
            out.shutdown_grace = d;
        }
        if let Some(Dur(d)) = s.max_pause {
            out.max_pause = d;
        }
        if let Some(Positive(n)) = s.max_headers {
            out.max_headers = n as usize;
        }
        if let Some(Positive(n)) = s.max_open_requests {
            out.max_open_requests = n as usize;
        }
        if let Some(Dur(d)) = s.request_ttl {
            if d.is_zero() {
                self.err(
                    span.clone(),
                    "[server] request_ttl must be above 0 (e.g. \"10m\")".to_string(),
                );
            }
            out.request_ttl = d;
        }
        if let Some(Positive(n)) = s.max_header_bytes {
            out.max_header_bytes = n as usize;
        }
        if let Some(Positive(n)) = s.max_connections {
            out.max_connections = n as usize;
        }
        if let Some(Dur(d)) = s.handshake_timeout {
            out.handshake_timeout = d;
        }
        if let Some(Dur(d)) = s.idle_timeout {
            out.idle_timeout = d;
        }
        if let Some(Dur(d)) = s.http2_keepalive_interval {
            out.http2_keepalive_interval = (!d.is_zero()).then_some(d);
        }
        if let Some(Dur(d)) = s.http2_keepalive_timeout {
            out.http2_keepalive_timeout = d;
        }
        if let Some(k) = s.permit_key {
            if k.get_ref().len() < 32 {
                self.err(
                    k.span(),
                    "permit_key must be at least 32 characters (e.g. `openssl rand -hex 32`)",
                );
            }
            out.permit_key = Some(k.into_inner());
        }
        if let Some(p) = s.outcomes_without_permit {
            out.outcomes_without_permit = match p.get_ref().as_str() {
                "count" => Permitless::Count,
                "trusted" => Permitless::Trusted,
                "reject" => Permitless::Reject,
                other => {
                    self.err(
                        p.span(),
                        format!("outcomes_without_permit: {other:?} is not one of \"count\", \"trusted\", \"reject\""),
                    );
                    Permitless::Count
                }
            };
        }
        for (name, d) in [
            ("handshake_timeout", out.handshake_timeout),
            ("idle_timeout", out.idle_timeout),
            ("http2_keepalive_timeout", out.http2_keepalive_timeout),
        ] {
            if d.is_zero() {
                self.err(span.clone(), format!("[server] {name} must be above 0"));
            }
        }
        out
    }
}
