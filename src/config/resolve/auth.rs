//! `[auth]` and `[[auth.principals]]`.

use super::Cx;
use crate::config::raw::*;
use crate::config::{AuthConfig, Principal, Tenant, roles};
use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

impl Cx {
    /// `[tenants.<name>]`: prefixes must be distinct and none may contain
    /// another (a name must belong to one tenant at most).
    pub(super) fn tenants(
        &mut self,
        list: Vec<(String, Range<usize>, TenantToml)>,
    ) -> BTreeMap<String, Arc<Tenant>> {
        let mut out: BTreeMap<String, Arc<Tenant>> = BTreeMap::new();
        for (name, span, t) in list {
            if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
                self.err(
                    span.clone(),
                    "[tenants.<name>]: a tenant name is 1-64 printable characters",
                );
                continue;
            }
            let (prefix, pspan) = match &t.prefix {
                Some(p) => (p.get_ref().clone(), p.span()),
                None => (format!("{name}/"), span.clone()),
            };
            if prefix.is_empty() || prefix.len() > 128 || prefix.chars().any(char::is_control) {
                self.err(
                    pspan,
                    format!("[tenants.{name}] prefix must be 1-128 printable characters"),
                );
                continue;
            }
            if let Some(other) = out.values().find(|o| {
                o.prefix.starts_with(prefix.as_str()) || prefix.starts_with(o.prefix.as_ref())
            }) {
                self.err(
                    pspan,
                    format!(
                        "[tenants.{name}] prefix {prefix:?} overlaps tenant {:?}'s {:?}: a name must belong to one tenant",
                        other.name.as_ref(),
                        other.prefix.as_ref()
                    ),
                );
                continue;
            }
            let what = format!("[tenants.{name}]");
            let spend = self.spend_scope(&t, "tenant", &name, span.clone(), &what);
            out.insert(
                name.clone(),
                Arc::new(Tenant {
                    name: Arc::from(name.as_str()),
                    prefix: Arc::from(prefix.as_str()),
                    spend,
                    max_targets: t.max_targets.map(|Positive(n)| n as usize),
                    max_queue_bytes: t.max_queue_bytes.map(|Positive(n)| n),
                    max_watchers: t.max_watchers.map(|Positive(n)| n as usize),
                }),
            );
        }
        out
    }

    pub(super) fn auth(
        &mut self,
        a: AuthToml,
        tenants: &BTreeMap<String, Arc<Tenant>>,
    ) -> AuthConfig {
        let metrics_open = match a.metrics.as_ref().map(|m| m.get_ref().as_str()) {
            None | Some("open") => true,
            Some("token") => false,
            Some(other) => {
                let span = a.metrics.as_ref().map(|m| m.span()).unwrap_or_default();
                self.err(
                    span,
                    format!("[auth] metrics = {other:?}: expected \"open\" or \"token\""),
                );
                true
            }
        };
        let mut names = HashSet::new();
        let mut tokens = HashSet::new();
        let mut certs = HashSet::new();
        let mut principals = Vec::new();
        for p in a.principals {
            let span = p.span();
            let p = p.into_inner();
            let name = p.name.get_ref().clone();
            if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
                self.err(
                    p.name.span(),
                    "[[auth.principals]] name must be 1-128 printable characters",
                );
            }
            if !names.insert(name.clone()) {
                self.err(
                    p.name.span(),
                    format!("[[auth.principals]] name {name:?} appears twice"),
                );
            }
            let mut bits = 0;
            for r in p.roles.get_ref() {
                match roles::NAMES.iter().find(|(n, _)| n == r) {
                    Some((_, b)) => bits |= b,
                    None => self.err(
                        p.roles.span(),
                        format!("[[auth.principals]] {name:?}: unknown role {r:?}; roles are agent, viewer, operator"),
                    ),
                }
            }
            if bits == 0
                && !p
                    .roles
                    .get_ref()
                    .iter()
                    .any(|r| !roles::NAMES.iter().any(|(n, _)| n == r))
            {
                self.err(
                    p.roles.span(),
                    format!("[[auth.principals]] {name:?} has no role"),
                );
            }
            let token = match &p.token_sha256 {
                Some(t) => match parse_sha256(t.get_ref()) {
                    Some(h) => {
                        if !tokens.insert(h) {
                            self.err(t.span(), format!("[[auth.principals]] {name:?}: another principal has the same token"));
                        }
                        Some(h)
                    }
                    None => {
                        self.err(
                            t.span(),
                            "token_sha256 must be 64 hex digits: the SHA-256 of the token, e.g. `printf %s \"$TOKEN\" | sha256sum`",
                        );
                        None
                    }
                },
                None => None,
            };
            let cert = p
                .cert_identity
                .as_ref()
                .map(|c| c.get_ref().trim().to_string());
            if let Some(c) = &p.cert_identity {
                if c.get_ref().trim().is_empty() {
                    self.err(c.span(), "cert_identity is empty");
                } else if !certs.insert(c.get_ref().trim().to_string()) {
                    self.err(c.span(), format!("[[auth.principals]] {name:?}: another principal has the same cert_identity"));
                }
            }
            if p.token_sha256.is_none() && p.cert_identity.is_none() {
                self.err(
                    span.clone(),
                    format!("[[auth.principals]] {name:?} needs token_sha256 (its bearer token's SHA-256) or cert_identity (its client certificate's name)"),
                );
            }
            let rate = p.decision_rate.as_ref().or(a.decision_rate.as_ref());
            let decision_rate = rate.and_then(|r| {
                let per_second = *r.get_ref();
                if !(per_second.is_finite() && per_second > 0.0 && per_second <= 1e9) {
                    self.err(
                        r.span(),
                        format!("decision_rate = {per_second}: give decisions per second, above 0 and at most 1e9"),
                    );
                    return None;
                }
                let burst = p
                    .decision_burst
                    .or(a.decision_burst)
                    .map_or(per_second.ceil().max(1.0) as u64, |Positive(n)| n);
                Some(crate::config::DecisionRate { per_second, burst })
            });
            let tenant = match &p.tenant {
                None => None,
                Some(t) => match tenants.get(t.get_ref()) {
                    Some(x) => Some(x.clone()),
                    None => {
                        self.err(
                            t.span(),
                            format!(
                                "[[auth.principals]] {name:?}: tenant {:?} is not declared; declared tenants: {:?}",
                                t.get_ref(),
                                tenants.keys().collect::<Vec<_>>()
                            ),
                        );
                        None
                    }
                },
            };
            principals.push(Principal {
                tenant,
                name: Arc::from(name.as_str()),
                roles: bits,
                token_sha256: token,
                cert_identity: cert,
                decision_rate,
            });
        }
        AuthConfig {
            principals,
            metrics_open,
        }
    }
}

fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}
