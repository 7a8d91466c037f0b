//! `[tenants.<name>] max_targets`: how many targets each tenant has had
//! created on first use, so one tenant cannot take the whole server's
//! `max_targets` (every other tenant would then be refused new targets).
//!
//! Like the server's own `max_targets` this counts per process (per replica
//! in cluster mode), and only targets created on first use: configured
//! targets and route members are the operator's choice. Creation is rare,
//! so one mutex is enough; a lookup of an existing target never gets here.

use crate::config::Config;
use crate::engine::error::{EngineError, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct TenantTargets(Mutex<HashMap<Arc<str>, usize>>);

impl TenantTargets {
    /// May `name` be created? Its tenant (when that tenant has a cap), or
    /// RESOURCE_EXHAUSTED when the tenant already holds its cap.
    pub fn check(&self, config: &Config, name: &str) -> Result<Option<Arc<str>>> {
        let Some(t) = config.tenants.values().find(|t| t.owns(name)) else {
            return Ok(None);
        };
        let Some(max) = t.max_targets else {
            return Ok(None);
        };
        let held = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&t.name)
            .copied()
            .unwrap_or(0);
        if held >= max {
            return Err(EngineError::ResourceExhausted(format!(
                "target {name:?} is unknown and tenant {:?} already holds its maximum of {max} targets created on first use ([tenants.{}] max_targets); declare it in the config file or raise the limit",
                t.name.as_ref(),
                t.name.as_ref()
            )));
        }
        Ok(Some(t.name.clone()))
    }

    /// Counts a target created for `tenant`.
    pub fn created(&self, tenant: &Arc<str>) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(tenant.clone())
            .or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_at_its_cap_is_refused_and_others_are_not() {
        let c =
            Config::parse("[tenants.a]\nmax_targets = 2\n[tenants.b]\n", "t.toml").expect("valid");
        let q = TenantTargets::default();
        for n in ["a/1", "a/2"] {
            let t = q.check(&c, n).expect("room").expect("capped tenant");
            q.created(&t);
        }
        let e = q.check(&c, "a/3").expect_err("full");
        assert!(e.to_string().contains("max_targets"), "{e}");
        assert_eq!(q.check(&c, "b/1").expect("no cap"), None);
        assert_eq!(q.check(&c, "free").expect("no tenant"), None);
    }
}
