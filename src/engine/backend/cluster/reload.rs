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
    /// Whether the cluster's target index lists `name`.
    async fn indexed(&self, name: &str) -> Result<bool> {
        let key = self.inner.keys.index();
        let name = name.to_string();
        self.inner
            .link
            .call(|mut c| async move {
                redis::cmd("SISMEMBER")
                    .arg(&key)
                    .arg(&name)
                    .query_async::<bool>(&mut c)
                    .await
            })
            .await
            .map_err(|e| {
                EngineError::FailedPrecondition(format!(
                    "cannot check Redis for state a reload would move ({e}); try again when Redis is reachable"
                ))
            })
    }

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
        // A declared target whose hash tag changes would find its state
        // under other keys: refused if it has any (declared before, used on
        // this replica, or known to the cluster's index).
        let keys = super::keys::Keys::new(&inner.cluster.key_prefix, new);
        for name in new.targets.keys() {
            let was = inner.keys.tag(name, &old.target(name).groups);
            if keys.tag(name, &new.target(name).groups) == was {
                continue;
            }
            let known = old.targets.contains_key(name)
                || inner.metas.contains_key(name.as_str())
                || self.indexed(name).await?;
            if known {
                return Err(EngineError::FailedPrecondition(format!(
                    "target {name:?} would move to other budget groups: in cluster mode its state lives under keys named by its groups, \
                     so this needs every replica restarted with the new config"
                )));
            }
        }
        // Budget levels in Redis are kept as time; a new window would change
        // the fraction used on every replica at a different moment.
        let windows = |b: &crate::domain::budget::BudgetConfig| {
            crate::domain::budget::Kind::ALL.map(|k| b.rate(k).map(|r| r.window))
        };
        let changed_window = new
            .targets
            .iter()
            .filter_map(|(n, s)| {
                old.targets
                    .get(n)
                    .map(|o| (n.as_str(), &o.budget, &s.budget))
            })
            .chain(new.groups.iter().filter_map(|g| {
                old.groups
                    .iter()
                    .find(|o| o.name == g.name)
                    .map(|o| (g.name.as_ref(), &o.budget, &g.budget))
            }))
            .find(|(_, o, n)| {
                windows(o)
                    .iter()
                    .zip(windows(n).iter())
                    .any(|(a, b)| a.is_some() && b.is_some() && a != b)
            });
        if let Some((name, _, _)) = changed_window {
            return Err(EngineError::FailedPrecondition(format!(
                "{name:?}: a budget window changed; in cluster mode a reload changes budget amounts but not windows \
                 (the shared levels are kept as time); restart every replica with the new config, or keep the window"
            )));
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
                // What was heard is a fact about the shared breaker, not
                // about these settings: it carries over.
                heard_open_until: std::sync::atomic::AtomicU64::new(
                    m.heard_open_until.load(Ordering::Relaxed),
                ),
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
