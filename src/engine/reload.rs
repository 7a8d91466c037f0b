//! Config reload: re-reading the file while serving (SIGHUP,
//! Admin/ReloadConfig), without losing any state.
//!
//! The new file is validated whole first; an invalid one changes nothing
//! and the answer lists every error, located. A valid one is split (see
//! `config::reload`): settings only a restart can change keep their running
//! value and are named; the rest is applied by the backend (targets,
//! breakers, budgets, key slots, groups: see the backends' `reload.rs`),
//! then here (routes, queue bounds, per-call limits), and a
//! `config_reloaded` event carries the new digest.

use super::{Backend, Engine, Queues, route_runtimes};
use crate::config::Config;
use crate::config::reload::{diff_targets, keep_restart_only};
use crate::domain::event::EventKind;
use crate::engine::error::{EngineError, Result};
use std::sync::Arc;

/// What a reload changed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReloadReport {
    pub digest: String,
    pub previous_digest: String,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub routes_changed: Vec<String>,
    pub needs_restart: Vec<String>,
}

impl Engine {
    /// Changes a reload refuses (FAILED_PRECONDITION, nothing applied):
    /// removing a route whose queue still holds items (they would be handed
    /// out as calls to a target named like the route), and reordering or
    /// removing key slots other than at the end (outstanding permits name
    /// their slot by position).
    async fn refuse_unsafe(&self, old: &Config, new: &Config) -> Result<()> {
        for name in old.routes.keys().filter(|n| !new.routes.contains_key(*n)) {
            let held: u64 = self
                .queue_stats(name)
                .await
                .unwrap_or_default()
                .iter()
                .map(|q| q.depth + q.in_flight)
                .sum();
            if held > 0 {
                return Err(EngineError::FailedPrecondition(format!(
                    "route {name:?} is removed but its deferred queue holds {held} item(s): drain them (Claim / Ack) first, \
                     or keep the route; nothing was changed"
                )));
            }
        }
        for (name, s) in &new.targets {
            let Some(o) = old.targets.get(name) else {
                continue;
            };
            let n = o.keys.len().min(s.keys.len());
            if o.keys[..n] != s.keys[..n] {
                return Err(EngineError::FailedPrecondition(format!(
                    "target {name:?}: key slots {:?} -> {:?} reorders or removes a slot that is not last; permits in flight \
                     name their slot by position, so add new keys at the end and remove only from the end; nothing was changed",
                    o.keys, s.keys
                )));
            }
        }
        Ok(())
    }

    /// Re-reads the config from where it was loaded at startup and applies
    /// it. `source` says who asked ("sighup", "admin: <reason>").
    pub async fn reload_from_source(&self, source: &str) -> Result<ReloadReport> {
        let Some(src) = &self.source else {
            return Err(EngineError::FailedPrecondition(
                "this server has no config file to reload".into(),
            ));
        };
        if src.path.is_none() {
            return Err(EngineError::FailedPrecondition(
                "this server was started without --config (on the built-in defaults): there is no file to re-read".into(),
            ));
        }
        let new = src.load().map_err(|e| {
            EngineError::FailedPrecondition(format!(
                "the config file is invalid, so nothing was changed (the server keeps running on the previous config):\n{e}"
            ))
        })?;
        self.reload(new, source).await
    }

    /// Applies a validated config. One reload at a time.
    pub async fn reload(&self, mut new: Config, source: &str) -> Result<ReloadReport> {
        let _one = self.reloading.lock().await;
        let old = self.config();
        let needs_restart = keep_restart_only(&old, &mut new);
        self.refuse_unsafe(&old, &new).await?;
        self.metrics
            .set_max_target_labels(new.telemetry.max_target_labels);
        self.metrics.set_callers(new.callers.keys());
        self.metrics
            .set_tenants(new.tenants.values().map(|t| t.as_ref()));
        let new = Arc::new(new);
        let diff = diff_targets(&old, &new);
        let (added, removed, changed) = match &self.backend {
            Backend::Local(b) => {
                let r = b.reload(&new);
                // The removals' events are published once their deletions
                // are on disk: config_reloaded comes after them.
                if let Some(p) = b.persister() {
                    let _ = p.wait_for(p.publish_after(Vec::new())).wait().await;
                }
                (r.added, r.removed, r.changed)
            }
            Backend::Redis(b) => {
                b.reload(&new).await?;
                let now = self.clock.now();
                for name in &diff.removed {
                    self.publish(
                        now,
                        &Arc::from(name.as_str()),
                        EventKind::TargetRemoved {
                            reason: "no longer in the config".into(),
                        },
                    );
                }
                (diff.added, diff.removed, diff.changed)
            }
        };
        let mut routes_changed: Vec<String> = new
            .routes
            .iter()
            .filter(|(n, r)| old.routes.get(*n) != Some(*r))
            .map(|(n, _)| n.clone())
            .chain(
                old.routes
                    .keys()
                    .filter(|n| !new.routes.contains_key(*n))
                    .cloned(),
            )
            .collect();
        routes_changed.sort();
        self.config.store(new.clone());
        let runtimes = route_runtimes(&new, &self.routes.load(), &self.metrics);
        self.routes.store(Arc::new(runtimes));
        match &self.queue {
            Queues::Local(q) => q.set_limits(new.queue.clone()),
            Queues::Redis(q) => q.set_limits(new.queue.clone()),
        }
        let report = ReloadReport {
            digest: new.digest(),
            previous_digest: old.digest(),
            added,
            removed,
            changed,
            routes_changed,
            needs_restart,
        };
        tracing::info!(
            source,
            digest = %report.digest,
            previous_digest = %report.previous_digest,
            added = ?report.added,
            removed = ?report.removed,
            changed = ?report.changed,
            routes_changed = ?report.routes_changed,
            needs_restart = ?report.needs_restart,
            "config reloaded"
        );
        if !report.needs_restart.is_empty() {
            tracing::warn!(
                settings = ?report.needs_restart,
                "these settings changed in the config file but take effect only after a restart; they keep their running values"
            );
        }
        self.publish(
            self.clock.now(),
            &Arc::from(""),
            EventKind::ConfigReloaded {
                digest: report.digest.clone(),
                previous_digest: report.previous_digest.clone(),
                added: report.added.clone(),
                removed: report.removed.clone(),
                changed: report.changed.clone(),
                needs_restart: report.needs_restart.clone(),
                source: source.to_string(),
            },
        );
        Ok(report)
    }
}
