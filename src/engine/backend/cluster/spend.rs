//! Route, caller and tenant spend limits in cluster mode: the same cells
//! as the embedded ledger (`backend::ledger`), kept in Redis and decided
//! the way units are (`scripts.rs`): the replica decides with the pure
//! functions of `domain::spend` on the cells' last known state and commits
//! with a compare-and-set on their versions; when another replica wrote
//! first, the commit answers the current state and the replica decides
//! again. So a reservation is one round trip when this replica's copy is
//! current, and every scope of it (they share one hash tag) commits in one
//! atomic step, on Redis Cluster too.
//!
//! Without Redis the replica decides on its fallback's ledger at its share
//! of each limit (`on_redis_unavailable = "local"`), admits without a check
//! (`"open"`), or refuses (`"closed"`), as for targets. What a replica spent
//! alone is merged back when Redis returns (`merge_spend`): each scope's
//! net movement in the fallback is charged to the shared cell.

use super::link::LinkError;
use super::{Committed, RedisBackend};
use crate::config::{OnRedisUnavailable, SpendScope};
use crate::domain::spend::{Spend, reserve_all};
use crate::engine::backend::SpendAnswer;
use crate::engine::backend::ledger::ScopeLevel;
use crate::engine::error::{EngineError, Result};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Compare-and-set attempts before a reservation gives up (each lost one
/// means another replica committed on the same scope meanwhile).
const MAX_TRIES: usize = 16;

pub(crate) fn encode(s: &Spend) -> Vec<u8> {
    format!(
        "{} {} {}",
        s.tat().as_nanos(),
        s.total_micros,
        u8::from(s.limited)
    )
    .into_bytes()
}

/// A cell from its record ('' or damaged: a fresh cell).
pub(crate) fn decode(b: &[u8]) -> Spend {
    let text = String::from_utf8_lossy(b);
    let mut f = text.split(' ').map(|x| x.parse::<u64>().unwrap_or(0));
    let (tat, total, limited) = (f.next(), f.next(), f.next());
    Spend::restore(
        crate::domain::Time::from_nanos(tat.unwrap_or(0)),
        total.unwrap_or(0),
        limited == Some(1),
    )
}

/// What to do to the cells.
enum Change {
    Reserve(u64),
    Settle {
        reserved: u64,
        actual: u64,
    },
    /// What the fallback spent alone during an outage (merge back).
    Absorb {
        moved: i64,
        settled: u64,
    },
}

impl RedisBackend {
    /// See `DecisionBackend::reserve_spend`.
    pub async fn reserve_spend(
        &self,
        scopes: &[Arc<SpendScope>],
        cost: u64,
    ) -> Result<SpendAnswer> {
        self.change(scopes, Change::Reserve(cost)).await
    }

    /// See `DecisionBackend::settle_spend`.
    pub async fn settle_spend(
        &self,
        scopes: &[Arc<SpendScope>],
        reserved: u64,
        actual: u64,
    ) -> Result<()> {
        self.change(scopes, Change::Settle { reserved, actual })
            .await
            .map(|_| ())
    }

    /// Levels as this replica last read or wrote them.
    pub fn spend_levels(&self, scopes: &[Arc<SpendScope>]) -> Vec<ScopeLevel> {
        let now = self.inner.clock.now();
        let cache = self
            .inner
            .spend_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        scopes
            .iter()
            .map(|s| {
                let spend = cache.get(&s.key).map(|c| c.1).unwrap_or_default();
                ScopeLevel {
                    key: s.key.clone(),
                    total_micros: spend.total_micros,
                    available_micros: spend.available(now, &s.limit),
                    limit: s.limit,
                }
            })
            .collect()
    }

    async fn change(&self, scopes: &[Arc<SpendScope>], change: Change) -> Result<SpendAnswer> {
        let inner = &self.inner;
        let mut scopes = scopes.to_vec();
        scopes.sort_by(|a, b| a.key.cmp(&b.key));
        scopes.dedup_by(|a, b| a.key == b.key);
        let keys: Vec<String> = scopes.iter().map(|s| inner.keys.spend(&s.key)).collect();
        // This replica's copy, when it has every cell.
        let mut known: Option<Vec<(u64, Spend)>> = {
            let cache = inner.spend_cache.lock().unwrap_or_else(|e| e.into_inner());
            scopes.iter().map(|s| cache.get(&s.key).copied()).collect()
        };
        let mut fresh = false;
        for _ in 0..MAX_TRIES {
            let current = match known.take() {
                Some(c) => c,
                None => {
                    fresh = true;
                    match inner.read(keys.clone()).await {
                        Ok(v) => v
                            .into_iter()
                            .map(|(ver, rec)| (ver, decode(&rec)))
                            .collect(),
                        Err(e) => return self.degraded_change(&scopes, change, e).await,
                    }
                }
            };
            let now = inner.clock.now();
            let mut cells: Vec<Spend> = current.iter().map(|c| c.1).collect();
            let mut refused = None;
            match change {
                Change::Reserve(cost) => {
                    let mut pairs: Vec<(&mut Spend, &crate::domain::budget::Rate)> = cells
                        .iter_mut()
                        .zip(scopes.iter().map(|s| &s.limit))
                        .collect();
                    if let Err(r) = reserve_all(&mut pairs, now, cost) {
                        if !fresh {
                            // Decided on a copy that may be stale (refunds
                            // since): refuse only on what Redis holds now.
                            continue;
                        }
                        if !r.first {
                            self.remember(&scopes, &current);
                            return Ok(SpendAnswer {
                                refused: Some((scopes[r.index].clone(), r)),
                                degraded: false,
                            });
                        }
                        // The edge: committed, so the event fires once fleet-wide.
                        refused = Some(r);
                    }
                }
                Change::Settle { reserved, actual } => {
                    for (cell, s) in cells.iter_mut().zip(&scopes) {
                        cell.settle(now, Some(&s.limit), reserved, actual);
                    }
                }
                Change::Absorb { moved, settled } => {
                    for (cell, s) in cells.iter_mut().zip(&scopes) {
                        cell.absorb(now, &s.limit, moved, settled);
                    }
                }
            }
            let expected: Vec<u64> = current.iter().map(|c| c.0).collect();
            let records: Vec<Vec<u8>> = cells.iter().map(encode).collect();
            match inner
                .commit(&keys, &expected, &records, &[], &[], false)
                .await
            {
                Ok(Committed::Ok(versions)) => {
                    let now_known: Vec<(u64, Spend)> = versions.into_iter().zip(cells).collect();
                    self.remember(&scopes, &now_known);
                    return Ok(SpendAnswer {
                        refused: refused.map(|r| (scopes[r.index].clone(), r)),
                        degraded: false,
                    });
                }
                Ok(Committed::Conflict(cur)) => {
                    let cur: Vec<(u64, Spend)> =
                        cur.into_iter().map(|(v, rec)| (v, decode(&rec))).collect();
                    self.remember(&scopes, &cur);
                    known = Some(cur);
                    fresh = true;
                }
                Ok(Committed::Duplicates(_)) => {
                    return Err(EngineError::Unavailable(
                        "unexpected answer from the commit script for a spend cell".into(),
                    ));
                }
                Err(e) => return self.degraded_change(&scopes, change, e).await,
            }
        }
        Err(EngineError::Unavailable(format!(
            "spend limits {:?} are contended: {MAX_TRIES} commits in a row lost to other replicas; retry",
            scopes.iter().map(|s| s.key.as_ref()).collect::<Vec<_>>()
        )))
    }

    fn remember(&self, scopes: &[Arc<SpendScope>], cells: &[(u64, Spend)]) {
        let mut cache = self
            .inner
            .spend_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (s, c) in scopes.iter().zip(cells) {
            cache.insert(s.key.clone(), *c);
        }
    }

    /// Merges back what this replica's fallback spent on route, caller and
    /// tenant limits while it decided alone (see the module doc): each
    /// scope's net movement is charged to its shared cell in Redis. A scope
    /// whose commit fails keeps its amount in the fallback for the next
    /// attempt; the error says the replica must stay degraded.
    pub(super) async fn merge_spend(
        &self,
        fallback: &crate::engine::backend::LocalBackend,
    ) -> std::result::Result<u32, LinkError> {
        let config = self.inner.config.load_full();
        let by_key: std::collections::HashMap<&str, &Arc<SpendScope>> = config
            .spend_scopes
            .values()
            .map(|s| (s.key.as_ref(), s))
            .collect();
        let mut merged = 0u32;
        let mut taken = fallback.ledger.take_moved().into_iter();
        while let Some(m) = taken.next() {
            // A scope no longer configured (reloaded away): nothing to charge.
            let Some(scope) = by_key.get(m.key.as_ref()) else {
                continue;
            };
            let change = Change::Absorb {
                moved: m.moved,
                settled: m.settled,
            };
            match self.change(std::slice::from_ref(*scope), change).await {
                Ok(a) if !a.degraded => merged += 1,
                other => {
                    fallback.ledger.give_back(&m);
                    for rest in taken {
                        fallback.ledger.give_back(&rest);
                    }
                    return Err(LinkError::Redis(match other {
                        Err(e) => e.to_string(),
                        Ok(_) => format!("Redis failed while charging {}", m.key),
                    }));
                }
            }
        }
        Ok(merged)
    }

    /// Redis failed: decide per `on_redis_unavailable`.
    async fn degraded_change(
        &self,
        scopes: &[Arc<SpendScope>],
        change: Change,
        e: LinkError,
    ) -> Result<SpendAnswer> {
        let inner = &self.inner;
        inner.metrics.redis_error(e.kind());
        if matches!(change, Change::Absorb { .. }) {
            // A merge never decides alone: it waits for the next attempt.
            return Ok(SpendAnswer {
                refused: None,
                degraded: true,
            });
        }
        match inner.cluster.on_redis_unavailable {
            OnRedisUnavailable::Closed => Err(EngineError::Unavailable(format!(
                "Redis is unreachable ({e}) and [cluster] on_redis_unavailable = \"closed\""
            ))),
            OnRedisUnavailable::Open => Ok(SpendAnswer {
                refused: None,
                degraded: true,
            }),
            OnRedisUnavailable::Local => {
                inner.ensure_degraded(&e.to_string()).await;
                let fallback = inner
                    .fallback
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let share = inner.live_replicas.load(Ordering::Relaxed).max(1) as u64;
                let now = inner.clock.now();
                let refused = match change {
                    Change::Reserve(cost) => {
                        fallback.ledger.reserve(scopes, now, cost, share).err()
                    }
                    Change::Settle { reserved, actual } => {
                        fallback.ledger.settle(scopes, now, reserved, actual, share);
                        None
                    }
                    Change::Absorb { .. } => None,
                };
                Ok(SpendAnswer {
                    refused,
                    degraded: true,
                })
            }
        }
    }
}
