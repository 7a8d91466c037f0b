//! What a replica does in the background: keep the link to Redis (probing
//! it while unreachable), heartbeats and the list of live replicas, the
//! shared clock and permit key, refusals counted from the cache, and the
//! switch into and out of degraded mode.

use super::{Inner, Op, ReplicaInfo, degraded_config};
use crate::domain::Time;
use crate::domain::event::EventKind;
use crate::engine::backend::LocalBackend;
use crate::engine::permit::PermitKey;
use redis::Value;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often a replica that cannot reach Redis tries again (one PING).
const PROBE_WHILE_UNREACHABLE: Duration = Duration::from_millis(100);

/// Heartbeats expire after this: a replica silent for longer is not live.
const HEARTBEAT_TTL: Duration = Duration::from_secs(5);

impl Inner {
    /// Runs for ever (see the module doc).
    pub(super) async fn supervise(self: Arc<Self>) {
        let mut have_key = self.config.load().server.permit_key.is_some();
        let mut last_mismatch = String::new();
        // The last probe error logged: each new reason once at WARN (a
        // wrong CA or a refused client certificate must be visible without
        // debug logs), not one line per probe.
        let mut last_probe_error = String::new();
        loop {
            if self.link.is_open() || !self.link.is_connected() {
                if self.link.is_connected() {
                    self.ensure_degraded("Redis stopped answering").await;
                }
                match self.link.probe().await {
                    Ok(_) => {
                        last_probe_error.clear();
                        self.leave_degraded().await
                    }
                    Err(e) => {
                        let why = e.to_string();
                        if why != last_probe_error {
                            tracing::warn!(replica = %self.replica_id, error = %why, "Redis unreachable");
                            last_probe_error = why;
                        } else if self.degraded_since_boot() {
                            tracing::debug!(error = %e, "Redis still unreachable");
                        }
                    }
                }
            } else if self.degraded.load(Ordering::Acquire) {
                // A merge failed without the link opening: try again.
                self.leave_degraded().await;
            }
            if !self.link.is_open() {
                if !have_key {
                    have_key = self.fetch_permit_key().await;
                }
                self.heartbeat(&mut last_mismatch).await;
                self.flush_refusals().await;
            }
            // While Redis is unreachable, probe often: every replica leaves
            // degraded mode within about this much of Redis returning, and
            // until the last one has, the first one back spends the shared
            // budgets at their full rate while the others still spend their
            // local shares (the chaos soak measured the overlap as budget
            // admissions past burst + rate·t with 500 ms here).
            tokio::time::sleep(
                if self.link.is_open() || self.degraded.load(Ordering::Acquire) {
                    PROBE_WHILE_UNREACHABLE
                } else {
                    Duration::from_secs(1)
                },
            )
            .await;
        }
    }

    fn degraded_since_boot(&self) -> bool {
        self.clock.now().since(self.boot) < Duration::from_secs(2)
    }

    /// Into degraded mode, once per outage: a fresh fallback with this
    /// replica's share of every budget, seeded with the last state known
    /// from Redis, installed before any degraded decision is made on it.
    pub(super) async fn ensure_degraded(&self, why: &str) {
        if self.degraded.load(Ordering::Acquire) {
            return;
        }
        let _t = self.transition.lock().await;
        if self.degraded.load(Ordering::Acquire) {
            return;
        }
        self.enter_degraded(why).await;
        self.degraded.store(true, Ordering::Release);
    }

    async fn enter_degraded(&self, why: &str) {
        let live = self.live_replicas.load(Ordering::Relaxed).max(1);
        let fallback = LocalBackend::new(
            Arc::new(degraded_config(&self.config.load(), live)),
            self.clock.clone(),
            self.events.clone(),
            self.metrics.clone(),
        );
        // The other live replicas may each have admitted since this one
        // last read a unit: one request each is held back from every
        // seeded budget (see `BudgetState::charge_requests`).
        let peers = (live - 1) as u64;
        let units: Vec<_> = self.units.iter().map(|u| u.value().clone()).collect();
        for u in units {
            // Wait for a batch in flight on this unit (bounded by
            // redis_timeout): the unit whose Redis call just failed is the
            // one most likely to hold its cache, and skipping it (as a
            // try_lock did) left its targets unseeded: the fallback forgot
            // their open breakers, pauses and disabled keys and started
            // their budgets full (chaos soak --cluster).
            {
                let cache = u.cache.lock().await;
                for (name, c) in &cache.targets {
                    if let Ok(rec) =
                        <crate::domain::unit::codec::TargetRecord as prost::Message>::decode(
                            c.record.as_slice(),
                        )
                    {
                        fallback.seed(name, &rec);
                        fallback.charge_for_peers(name, peers);
                    }
                }
                for (g, c) in &cache.groups {
                    if let Ok(rec) =
                        <crate::domain::unit::codec::GroupRecord as prost::Message>::decode(
                            c.record.as_slice(),
                        )
                    {
                        fallback.seed_group(*g, &rec);
                        fallback.charge_group_for_peers(*g, peers);
                    }
                }
            }
        }
        *self.fallback.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fallback);
        self.metrics.set_cluster(true, live);
        tracing::warn!(replica = %self.replica_id, why, live_replicas = live, "Redis unreachable: deciding locally (degraded)");
        self.events.publish(
            self.clock.now(),
            &Arc::from(self.replica_id.as_str()),
            EventKind::RedisUnavailable {
                replica: Arc::from(self.replica_id.as_str()),
                error: why.to_string(),
            },
        );
    }

    /// Out of degraded mode: every target decided on while degraded is
    /// merged back into the shared state. Until a target is merged, its
    /// decisions stay on the fallback (`awaiting_merge`); it leaves the set
    /// just before its merge is queued, so its next Redis decision runs
    /// after the merge. The replica stays degraded until all are merged; a
    /// merge that fails on the link keeps its target (and the replica)
    /// degraded for the next probe to try again.
    async fn leave_degraded(self: &Arc<Self>) {
        let _t = self.transition.lock().await;
        if !self.degraded.load(Ordering::Acquire) {
            return;
        }
        let fallback = self
            .fallback
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut merged = 0u32;
        // Targets first decided on the fallback while earlier ones merged
        // are taken in the next pass.
        for _pass in 0..4 {
            let names: Vec<Arc<str>> = self
                .degraded_targets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect();
            if names.is_empty() {
                break;
            }
            for name in &names {
                self.degraded_targets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(name);
                let Some((rec, groups)) = fallback.export(name) else {
                    continue;
                };
                let Ok(meta) = self.meta(name) else { continue };
                meta.forget_refusal();
                match self
                    .submit(
                        meta,
                        Op::Merge {
                            target: rec,
                            groups,
                        },
                    )
                    .await
                {
                    Ok(_) => merged += 1,
                    Err(super::Fail::Link(e)) => {
                        self.degraded_targets
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(name.clone());
                        tracing::warn!(replica = %self.replica_id, target = %name, error = %e,
                            "merging back failed: still degraded, the next probe tries again");
                        return;
                    }
                    Err(super::Fail::Engine(e)) => {
                        tracing::warn!(replica = %self.replica_id, target = %name, error = %e,
                            "merging back refused: what this replica decided alone about it is dropped");
                    }
                }
            }
        }
        // Route, caller and tenant spend decided alone: charged to the
        // shared cells before the replica counts as back.
        let backend = super::RedisBackend {
            inner: self.clone(),
        };
        match backend.merge_spend(&fallback).await {
            Ok(n) => merged += n,
            Err(e) => {
                tracing::warn!(replica = %self.replica_id, error = %e,
                    "merging back spend limits failed: still degraded, the next probe tries again");
                return;
            }
        }
        self.degraded.store(false, Ordering::Release);
        self.metrics
            .set_cluster(false, self.live_replicas.load(Ordering::Relaxed));
        tracing::info!(replica = %self.replica_id, merged, "Redis reachable again: merged back");
        self.events.publish(
            self.clock.now(),
            &Arc::from(self.replica_id.as_str()),
            EventKind::RedisRestored {
                replica: Arc::from(self.replica_id.as_str()),
                merged,
            },
        );
    }

    /// The shared permit key: the first replica to ask sets it (SET NX).
    async fn fetch_permit_key(&self) -> bool {
        let key = self.keys.permit_key();
        let Some(secret) = PermitKey::generate_secret() else {
            return false;
        };
        let got: Result<Vec<u8>, _> = self
            .link
            .call(|mut c| async move {
                let _: Value = redis::cmd("SET")
                    .arg(&key)
                    .arg(secret.as_slice())
                    .arg("NX")
                    .query_async(&mut c)
                    .await?;
                redis::cmd("GET").arg(&key).query_async(&mut c).await
            })
            .await;
        match got {
            Ok(shared) if !shared.is_empty() => {
                let mut k = self
                    .keys_for_permits
                    .write()
                    .unwrap_or_else(|e| e.into_inner());
                let old = std::mem::replace(&mut k.0, Arc::new(PermitKey::new(&shared)));
                // Permits signed before the shared key was known still verify here.
                k.1.push(old);
                true
            }
            _ => false,
        }
    }

    /// Announces this replica, reads the live ones, syncs the clock.
    async fn heartbeat(&self, last_mismatch: &mut String) {
        let me = ReplicaInfo {
            id: self.replica_id.clone(),
            address: self
                .address
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            heartbeat_ms: self.clock.now().as_millis(),
            config_digest: self.digest.load().to_string(),
        };
        let json = serde_json::to_string(&me).unwrap_or_default();
        let (rkey, set) = (self.keys.replica(&self.replica_id), self.keys.replicas());
        let id = self.replica_id.clone();
        let _ = self
            .link
            .call(|mut c| async move {
                let _: Value = redis::cmd("SET")
                    .arg(&rkey)
                    .arg(&json)
                    .arg("PX")
                    .arg(HEARTBEAT_TTL.as_millis() as u64)
                    .query_async(&mut c)
                    .await?;
                redis::cmd("SADD")
                    .arg(&set)
                    .arg(&id)
                    .query_async::<Value>(&mut c)
                    .await
            })
            .await;
        // TIME alone in its round trip: the offset is off by at most half
        // of it (see `OffsetClock::sample`).
        if let Some(sync) = self.clock_sync.as_ref() {
            let local_before = self.local_now();
            let time: Result<(u64, u64), _> = self
                .link
                .call(|mut c| async move { redis::cmd("TIME").query_async(&mut c).await })
                .await;
            let local_after = self.local_now();
            if let Ok((secs, micros)) = time {
                let mid = Time::from_nanos((local_before.as_nanos() + local_after.as_nanos()) / 2);
                sync.sample(
                    Time::from_nanos(
                        secs.saturating_mul(1_000_000_000)
                            .saturating_add(micros.saturating_mul(1000)),
                    ),
                    mid,
                    local_after.since(local_before),
                );
            }
        }
        if let Ok(replicas) = self.replicas().await {
            self.live_replicas
                .store(replicas.len().max(1), Ordering::Relaxed);
            self.metrics.set_cluster(false, replicas.len().max(1));
            let mut digests: Vec<String> = replicas
                .iter()
                .map(|r| format!("{}={}", r.id, r.config_digest))
                .collect();
            digests.sort();
            let distinct = replicas
                .iter()
                .map(|r| r.config_digest.as_str())
                .collect::<std::collections::HashSet<_>>()
                .len();
            self.metrics.set_config_mismatch(distinct > 1);
            let now = digests.join(",");
            if distinct > 1 && *last_mismatch != now {
                tracing::warn!(replicas = %now, "live replicas run different configs");
                self.events.publish(
                    self.clock.now(),
                    &Arc::from(self.replica_id.as_str()),
                    EventKind::ConfigMismatch { replicas: digests },
                );
            }
            *last_mismatch = now;
        }
    }

    fn local_now(&self) -> Time {
        self.clock_sync
            .as_ref()
            .map_or_else(|| self.clock.now(), |c| c.local())
    }

    /// Every replica whose heartbeat has not expired (dead ones are dropped
    /// from the set).
    pub(super) async fn replicas(&self) -> Result<Vec<ReplicaInfo>, super::LinkError> {
        let set = self.keys.replicas();
        let ids: Vec<String> = self
            .link
            .call(|mut c| async move { redis::cmd("SMEMBERS").arg(&set).query_async(&mut c).await })
            .await?;
        let mut out = Vec::new();
        let mut dead = Vec::new();
        for id in ids {
            let key = self.keys.replica(&id);
            let v: Option<String> = self
                .link
                .call(|mut c| async move { redis::cmd("GET").arg(&key).query_async(&mut c).await })
                .await?;
            match v.and_then(|j| serde_json::from_str::<ReplicaInfo>(&j).ok()) {
                Some(r) => out.push(r),
                None => dead.push(id),
            }
        }
        if !dead.is_empty() {
            let set = self.keys.replicas();
            let _ = self
                .link
                .call(|mut c| async move {
                    redis::cmd("SREM")
                        .arg(&set)
                        .arg(&dead)
                        .query_async::<Value>(&mut c)
                        .await
                })
                .await;
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Adds refusals answered from the cache to the targets' shared counts.
    async fn flush_refusals(&self) {
        let mut batch = Vec::new();
        for m in self.metas.iter() {
            let d = m.refused_delta.swap(0, Ordering::Relaxed);
            if d > 0 {
                batch.push((self.keys.counts(&m.tag, &m.name), d));
            }
        }
        if batch.is_empty() {
            return;
        }
        let _ = self
            .link
            .call(|mut c| async move {
                let mut p = redis::pipe();
                for (k, d) in &batch {
                    p.cmd("HINCRBY").arg(k).arg("refused").arg(*d).ignore();
                }
                p.query_async::<()>(&mut c).await
            })
            .await;
    }
}
