//! Applying a new config to a cluster replica.
//!
//! The state is in Redis, keyed by target name under a hash tag derived
//! from the budget groups; every replica reloads on its own (SIGHUP or
//! Admin/ReloadConfig on each), and the heartbeat's config digest shows
//! which replicas run which file. What a replica holds besides Redis is
//! settings (per-target [`Meta`]), decoded state cached per unit (decoded
//! with the old settings, so dropped) and, while Redis is unreachable, the
//! degraded fallback (reloaded with this replica's share of the new budgets).
//!
//! Budget levels are GCRA arrival times in Redis, kept as they are, so a
//! changed limit keeps the same fraction used, exactly as embedded; no
//! replica rewrites them, so N replicas reloading cannot rescale N times.
//!
//! A change that would move state between Redis keys is refused: budget
//! groups added, removed, reordered, or targets moved between them (their
//! hash tags change). That needs every replica restarted together.

use super::{Inner, Meta, RedisBackend, degraded_config};
use crate::config::Config;
use crate::engine::error::{EngineError, Result};
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl RedisBackend {
    /// Applies `new` (validated, restart-only settings kept). Errors with
    /// FAILED_PRECONDITION, changing nothing, when the new config would move
    /// state between Redis keys.
    pub async fn reload(&self, new: &Arc<Config>) -> Result<()> {
        let inner: &Inner = &self.inner;
        let old = inner.config.load_full();
        let names = |c: &Config| c.groups.iter().map(|g| g.name.clone()).collect::<Vec<_>>();
        if names(&old) != names(new) {
            return Err(EngineError::FailedPrecondition(format!(
                "budget groups changed from {:?} to {:?}: in cluster mode a group's state lives under keys named by the groups, \
                 so this needs every replica restarted with the new config (a reload applies budgets, not group membership)",
                names(&old),
                names(new)
            )));
        }
        // Every target this replica knows of or either config declares
        // (another replica may hold state for a target this one never used).
        let keys = super::keys::Keys::new(&inner.cluster.key_prefix, new);
        let mut names: std::collections::BTreeSet<Arc<str>> =
            inner.metas.iter().map(|m| m.name.clone()).collect();
        names.extend(
            old.targets
                .keys()
                .chain(new.targets.keys())
                .map(|n| Arc::from(n.as_str())),
        );
        for name in names {
            let was = inner.keys.tag(&name, &old.target(&name).groups);
            if keys.tag(&name, &new.target(&name).groups) != was {
                return Err(EngineError::FailedPrecondition(format!(
                    "target {name:?} would move to other budget groups: in cluster mode its state lives under keys named by its groups, \
                     so this needs every replica restarted with the new config"
                )));
            }
        }
        inner.config.store(new.clone());
        inner.digest.store(Arc::new(new.digest()));
        // Settings per target: replaced where they changed (keeping the
        // refusal count not yet flushed); a cached refusal was decided
        // under the old settings, so it goes.
        let held: Vec<Arc<Meta>> = inner.metas.iter().map(|m| m.value().clone()).collect();
        for m in held {
            let s = new.target(&m.name);
            if **s == *m.settings {
                continue;
            }
            let fresh = Arc::new(Meta {
                name: m.name.clone(),
                settings: s.clone(),
                seed: m.seed,
                tag: m.tag.clone(),
                metrics: m.metrics.clone(),
                refusal: std::sync::Mutex::new(None),
                refused_delta: std::sync::atomic::AtomicU64::new(
                    m.refused_delta.swap(0, Ordering::Relaxed),
                ),
                indexed: std::sync::atomic::AtomicBool::new(m.indexed.load(Ordering::Relaxed)),
            });
            inner.metas.insert(m.name.clone(), fresh);
        }
        // Decoded copies were decoded with the old settings: read again.
        let units: Vec<_> = inner.units.iter().map(|u| u.value().clone()).collect();
        for u in units {
            let mut c = u.cache.lock().await;
            c.targets.clear();
            c.groups.clear();
        }
        if inner.degraded.load(Ordering::Acquire) {
            let live = inner.live_replicas.load(Ordering::Relaxed).max(1);
            let fallback = inner
                .fallback
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            fallback.reload(&Arc::new(degraded_config(new, live)));
        }
        Ok(())
    }
}
