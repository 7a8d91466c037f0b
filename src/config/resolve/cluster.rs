//! `[cluster]`.

use super::Cx;
use crate::config::raw::*;
use crate::config::{ClusterConfig, OnRedisUnavailable, RedisTarget, RedisTls};
use std::ops::Range;
use std::path::PathBuf;

impl Cx {
    /// `[cluster]`: exactly one of redis_url / redis_cluster_nodes.
    pub(super) fn cluster(&mut self, c: ClusterToml, span: Range<usize>) -> Option<ClusterConfig> {
        let redis = match (c.redis_url, c.redis_cluster_nodes) {
            (Some(u), None) => {
                let url = u.get_ref();
                if !(url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("unix://"))
                {
                    self.err(
                        u.span(),
                        format!("[cluster] redis_url {url:?} is not a URL like \"redis://127.0.0.1:6379/0\""),
                    );
                }
                RedisTarget::Url(u.into_inner())
            }
            (None, Some(n)) => {
                if n.get_ref().is_empty() {
                    self.err(n.span(), "[cluster] redis_cluster_nodes lists no node");
                }
                for node in n.get_ref() {
                    // host:port, or rediss://host:port for TLS.
                    let bare = node.strip_prefix("rediss://").unwrap_or(node);
                    if bare.contains('/')
                        || bare
                            .rsplit_once(':')
                            .is_none_or(|(_, p)| p.parse::<u16>().is_err())
                    {
                        self.err(
                            n.span(),
                            format!("[cluster] redis_cluster_nodes: {node:?} is not host:port (or rediss://host:port for TLS)"),
                        );
                    }
                }
                let tls = n
                    .get_ref()
                    .iter()
                    .filter(|x| x.starts_with("rediss://"))
                    .count();
                if tls != 0 && tls != n.get_ref().len() {
                    self.err(
                        n.span(),
                        "[cluster] redis_cluster_nodes: give every node as rediss://host:port (TLS) or none",
                    );
                }
                RedisTarget::Cluster(n.into_inner())
            }
            (Some(u), Some(_)) => {
                self.err(
                    u.span(),
                    "[cluster] set redis_url (one Redis) or redis_cluster_nodes (a Redis Cluster), not both",
                );
                return None;
            }
            // Given on the command line (`serve --redis URL`); `serve`
            // refuses to start if it is not.
            (None, None) => {
                let _ = span;
                RedisTarget::Url(String::new())
            }
        };
        let mut out = ClusterConfig {
            redis,
            ..ClusterConfig::for_url("")
        };
        if let Some(p) = c.key_prefix {
            if p.get_ref().is_empty() || p.get_ref().contains(['{', '}']) || p.get_ref().len() > 64
            {
                self.err(
                    p.span(),
                    "[cluster] key_prefix must be 1..=64 bytes without { or } (they mark Redis hash tags)",
                );
            }
            out.key_prefix = p.into_inner();
        }
        if let Some(Dur(d)) = c.redis_timeout {
            if d.is_zero() {
                self.err(span.clone(), "[cluster] redis_timeout must be above 0");
            }
            out.redis_timeout = d;
        }
        if let Some(o) = c.on_redis_unavailable {
            out.on_redis_unavailable = match o.get_ref().as_str() {
                "local" => OnRedisUnavailable::Local,
                "open" => OnRedisUnavailable::Open,
                "closed" => OnRedisUnavailable::Closed,
                other => {
                    self.err(
                        o.span(),
                        format!("[cluster] on_redis_unavailable: {other:?} is not one of \"local\", \"open\", \"closed\""),
                    );
                    OnRedisUnavailable::Local
                }
            };
        }
        if let Some(r) = c.replica_id {
            if r.get_ref().is_empty()
                || r.get_ref().len() > 128
                || r.get_ref().chars().any(char::is_control)
            {
                self.err(
                    r.span(),
                    "[cluster] replica_id must be 1..=128 printable bytes",
                );
            }
            out.replica_id = Some(r.into_inner());
        }
        if let Some(n) = c.min_replicas_acked {
            out.min_replicas_acked = n;
        }
        let mut path = |what: &str, p: Option<toml::Spanned<String>>| {
            let p = p?;
            if p.get_ref().trim().is_empty() {
                self.err(
                    p.span(),
                    format!("[cluster] {what} is empty; give a PEM file path"),
                );
            }
            Some(PathBuf::from(p.into_inner()))
        };
        out.tls = RedisTls {
            ca: path("redis_ca", c.redis_ca),
            client_cert: path("redis_client_cert", c.redis_client_cert),
            client_key: path("redis_client_key", c.redis_client_key),
        };
        if out.tls.client_cert.is_some() != out.tls.client_key.is_some() {
            self.err(
                span,
                "[cluster] redis_client_cert and redis_client_key go together (a client certificate and its key)",
            );
        }
        Some(out)
    }
}
