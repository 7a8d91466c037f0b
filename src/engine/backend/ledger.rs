//! The spend ledger of the wider scopes: what each route, caller and
//! tenant with a spend limit has reserved and spent (see
//! `config::SpendScope`), kept in this process.
//!
//! A target's own spend limit lives in its admission unit and is decided
//! with it. A route's, a caller's or a tenant's spans many units, so it
//! cannot: the engine reserves against these scopes *before* admitting the
//! unit and gives the money back if the unit refuses. This is the embedded
//! backend's ledger (and the cluster backend's while Redis is unreachable,
//! at the replica's share of each limit); the cluster backend keeps the
//! same cells in Redis.
//!
//! Locking: one mutex per scope, taken in key order (so two reservations
//! on overlapping scopes cannot deadlock); the map of cells is read-locked
//! only to find them. There is no lock at all when no scope is configured:
//! the engine does not call in.

use super::local::store::{Op, SpendRecord};
use crate::config::SpendScope;
use crate::domain::Time;
use crate::domain::budget::Rate;
use crate::domain::spend::{Refusal, Spend, reserve_all};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// One scope's level, for metrics and views.
#[derive(Clone, Debug, PartialEq)]
pub struct ScopeLevel {
    pub key: Arc<str>,
    /// Settled spend since the cell was created, in micro-units.
    pub total_micros: u64,
    /// Money admissible now, in micro-units (negative in debt).
    pub available_micros: f64,
    pub limit: Rate,
}

/// One scope's cell, and what it moved since it was created: a cluster
/// replica's fallback ledger is created empty for each outage, and what it
/// reserved and settled alone is charged to the shared cell in Redis when
/// the replica merges back (`take_moved`).
#[derive(Clone, Copy, Debug, Default)]
struct Cell {
    spend: Spend,
    /// Net micro-units taken from the cell: reservations, plus each
    /// settlement's real cost minus what it had reserved.
    moved: i64,
    /// Real cost settled here, in micro-units.
    settled: u64,
}

/// What a fallback ledger spent on one scope while its replica decided alone.
#[derive(Clone, Debug, PartialEq)]
pub struct Moved {
    pub key: Arc<str>,
    pub moved: i64,
    pub settled: u64,
}

/// Spend cells by scope key.
#[derive(Default)]
pub struct Ledger {
    cells: RwLock<HashMap<Arc<str>, Arc<Mutex<Cell>>>>,
    /// Something changed since the last [`Ledger::flush`].
    dirty: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `limit` shared out among `share` deciders (at least one unit each).
fn shared(limit: &Rate, share: u64) -> Rate {
    Rate {
        amount: (limit.amount / share.max(1)).max(1),
        window: limit.window,
    }
}

impl Ledger {
    /// The cell of each scope (created empty), sorted by key with their
    /// limits: the order locks are taken in.
    fn cells(&self, scopes: &[Arc<SpendScope>]) -> Vec<(Arc<Mutex<Cell>>, Rate)> {
        let mut out = Vec::with_capacity(scopes.len());
        let mut missing = Vec::new();
        {
            let map = self.cells.read().unwrap_or_else(|e| e.into_inner());
            for s in scopes {
                match map.get(&s.key) {
                    Some(c) => out.push((s.key.clone(), c.clone(), s.limit)),
                    None => missing.push(s),
                }
            }
        }
        if !missing.is_empty() {
            let mut map = self.cells.write().unwrap_or_else(|e| e.into_inner());
            for s in missing {
                let c = map.entry(s.key.clone()).or_default().clone();
                out.push((s.key.clone(), c, s.limit));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.dedup_by(|a, b| a.0 == b.0);
        out.into_iter().map(|(_, c, l)| (c, l)).collect()
    }

    /// Reserves `cost` against every scope, all or nothing, each limit
    /// divided by `share` (1 embedded; the live replicas while a cluster
    /// replica decides alone). On a refusal, the scope that waits longest.
    pub fn reserve(
        &self,
        scopes: &[Arc<SpendScope>],
        now: Time,
        cost: u64,
        share: u64,
    ) -> Result<(), (Arc<SpendScope>, Refusal)> {
        let cells = self.cells(scopes);
        let mut guards: Vec<_> = cells.iter().map(|(c, _)| lock(c)).collect();
        let limits: Vec<Rate> = cells.iter().map(|(_, l)| shared(l, share)).collect();
        let mut pairs: Vec<(&mut Spend, &Rate)> = guards
            .iter_mut()
            .map(|g| &mut g.spend)
            .zip(limits.iter())
            .collect();
        let r = reserve_all(&mut pairs, now, cost);
        drop(pairs);
        if r.is_ok() {
            let cost = i64::try_from(cost).unwrap_or(i64::MAX);
            for g in guards.iter_mut() {
                g.moved = g.moved.saturating_add(cost);
            }
        }
        drop(guards);
        self.dirty.store(true, Ordering::Release);
        r.map_err(|refusal| {
            // Cells are in key order: find the scope by its key.
            let mut sorted: Vec<&Arc<SpendScope>> = scopes.iter().collect();
            sorted.sort_by(|a, b| a.key.cmp(&b.key));
            sorted.dedup_by(|a, b| a.key == b.key);
            (sorted[refusal.index].clone(), refusal)
        })
    }

    /// Settles a reservation: charges (or refunds) the difference to the
    /// real cost and counts it.
    pub fn settle(
        &self,
        scopes: &[Arc<SpendScope>],
        now: Time,
        reserved: u64,
        actual: u64,
        share: u64,
    ) {
        let delta = i64::try_from(i128::from(actual) - i128::from(reserved)).unwrap_or(
            if actual > reserved {
                i64::MAX
            } else {
                i64::MIN
            },
        );
        for (cell, limit) in self.cells(scopes) {
            let mut c = lock(&cell);
            c.spend
                .settle(now, Some(&shared(&limit, share)), reserved, actual);
            c.moved = c.moved.saturating_add(delta);
            c.settled = c.settled.saturating_add(actual);
        }
        self.dirty.store(true, Ordering::Release);
    }

    /// Levels of the configured scopes (those never used read as full).
    pub fn levels<'a>(
        &self,
        scopes: impl Iterator<Item = &'a Arc<SpendScope>>,
        now: Time,
    ) -> Vec<ScopeLevel> {
        let map = self.cells.read().unwrap_or_else(|e| e.into_inner());
        scopes
            .map(|s| {
                let spend = map.get(&s.key).map(|c| lock(c).spend).unwrap_or_default();
                ScopeLevel {
                    key: s.key.clone(),
                    total_micros: spend.total_micros,
                    available_micros: spend.available(now, &s.limit),
                    limit: s.limit,
                }
            })
            .collect()
    }

    /// Writes for every cell, when anything changed since the last call
    /// (written behind like budget levels: a handful of scopes, once a second).
    pub fn flush(&self) -> Vec<Op> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        let map = self.cells.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|(k, c)| {
                let s = lock(c).spend;
                Op::Spend(
                    k.clone(),
                    Some(SpendRecord {
                        tat: s.tat().as_nanos(),
                        total: s.total_micros,
                        limited: s.limited,
                    }),
                )
            })
            .collect()
    }

    /// Restores cells from the store: configured scopes get their record
    /// back (debt clamped to one window, as budgets are); the others are
    /// returned as deletes (the scope is no longer configured).
    pub fn restore(
        &self,
        loaded: Vec<(String, SpendRecord)>,
        configured: &HashMap<u32, Arc<SpendScope>>,
        now: Time,
    ) -> Vec<Op> {
        let by_key: HashMap<&str, &Arc<SpendScope>> =
            configured.values().map(|s| (s.key.as_ref(), s)).collect();
        let mut map = self.cells.write().unwrap_or_else(|e| e.into_inner());
        let mut cleanup = Vec::new();
        for (key, rec) in loaded {
            match by_key.get(key.as_str()) {
                Some(s) => {
                    let mut cell = crate::domain::budget::Gcra::from_tat(Time::from_nanos(rec.tat));
                    cell.clamp_debt(now, &s.limit);
                    map.insert(
                        s.key.clone(),
                        Arc::new(Mutex::new(Cell {
                            spend: Spend::restore(cell.tat(), rec.total, rec.limited),
                            ..Cell::default()
                        })),
                    );
                }
                None => cleanup.push(Op::Spend(Arc::from(key.as_str()), None)),
            }
        }
        cleanup
    }

    /// What every cell moved since it was created (or since the last take),
    /// zeroing it: the caller charges it elsewhere and, if that fails, gives
    /// it back with [`Ledger::give_back`].
    pub fn take_moved(&self) -> Vec<Moved> {
        let map = self.cells.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (key, c) in map.iter() {
            let mut c = lock(c);
            if c.moved != 0 || c.settled != 0 {
                out.push(Moved {
                    key: key.clone(),
                    moved: std::mem::take(&mut c.moved),
                    settled: std::mem::take(&mut c.settled),
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Returns what [`Ledger::take_moved`] took and could not be charged.
    pub fn give_back(&self, m: &Moved) {
        let map = self.cells.read().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&m.key) {
            let mut c = lock(c);
            c.moved = c.moved.saturating_add(m.moved);
            c.settled = c.settled.saturating_add(m.settled);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T0: Time = Time::from_secs(1_000_000);

    fn scope(key: &str, dollars: f64) -> Arc<SpendScope> {
        let (kind, name) = key.split_once(':').unwrap_or(("caller", key));
        Arc::new(SpendScope::new(
            kind,
            name,
            Rate {
                amount: crate::domain::spend::limit_micros(dollars),
                window: Duration::from_secs(3600),
            },
        ))
    }

    /// A caller's dollar an hour holds across two routes; a refusal names
    /// the caller and takes nothing from the route; a refund frees room.
    #[test]
    fn scopes_reserve_together_and_refund() {
        let l = Ledger::default();
        let caller = scope("caller:bot", 1.0);
        let (r1, r2) = (scope("route:a", 10.0), scope("route:b", 10.0));
        l.reserve(&[r1.clone(), caller.clone()], T0, 600_000, 1)
            .expect("fits");
        let (who, why) = l
            .reserve(&[r2.clone(), caller.clone()], T0, 600_000, 1)
            .expect_err("the caller's dollar is spent");
        assert_eq!(who.key.as_ref(), "caller:bot");
        assert!(why.first);
        let lv = l.levels([r2.clone()].iter(), T0);
        assert!(
            (lv[0].available_micros - 10_000_000.0).abs() < 1.0,
            "route b untouched"
        );
        // The first call cost 10 cents: 50 refunded, the second now fits.
        l.settle(&[r1.clone(), caller.clone()], T0, 600_000, 100_000, 1);
        l.reserve(&[r2, caller.clone()], T0, 600_000, 1)
            .expect("fits after the refund");
        let lv = l.levels([caller, r1].iter(), T0);
        assert_eq!(lv[0].total_micros, 100_000);
        assert!((lv[0].available_micros - 300_000.0).abs() < 1.0);
        assert!((lv[1].available_micros - 9_900_000.0).abs() < 1.0);
    }

    /// A replica deciding alone gets its share: a third of the dollar.
    #[test]
    fn what_a_ledger_moved_is_taken_once_and_can_be_given_back() {
        let l = Ledger::default();
        let s = [scope("caller:bot", 1.0)];
        l.reserve(&s, T0, 3000, 2).expect("fits");
        l.reserve(&s, T0, 3000, 2).expect("fits");
        // One settles at a tenth of its reservation: 2,700 given back.
        l.settle(&s, T0, 3000, 300, 2);
        let m = l.take_moved();
        assert_eq!(
            m,
            vec![Moved {
                key: Arc::from("caller:bot"),
                moved: 3300,
                settled: 300
            }]
        );
        assert!(l.take_moved().is_empty(), "taken once");
        l.give_back(&m[0]);
        assert_eq!(l.take_moved(), m, "given back whole");
        // A refusal moves nothing.
        let tiny = [scope("caller:tiny", 0.000001)];
        assert!(l.reserve(&tiny, T0, 1_000_000, 1).is_err());
        assert!(l.take_moved().is_empty());
    }

    #[test]
    fn a_share_divides_the_limit() {
        let l = Ledger::default();
        let c = scope("caller:bot", 0.9);
        l.reserve(std::slice::from_ref(&c), T0, 300_000, 3)
            .expect("a third fits");
        assert!(l.reserve(&[c], T0, 1, 3).is_err());
    }

    /// Flushed records come back after a restart; a scope no longer
    /// configured is deleted; nothing is written when nothing changed.
    #[test]
    fn cells_survive_a_restart() {
        let l = Ledger::default();
        let c = scope("caller:bot", 1.0);
        l.reserve(std::slice::from_ref(&c), T0, 700_000, 1)
            .expect("fits");
        l.settle(std::slice::from_ref(&c), T0, 700_000, 700_000, 1);
        let ops = l.flush();
        assert_eq!(ops.len(), 1);
        assert!(l.flush().is_empty(), "clean until the next change");
        let loaded: Vec<(String, SpendRecord)> = ops
            .into_iter()
            .filter_map(|op| match op {
                Op::Spend(k, Some(r)) => Some((k.to_string(), r)),
                _ => None,
            })
            .chain([("caller:gone".to_string(), SpendRecord::default())])
            .collect();
        let configured: HashMap<u32, Arc<SpendScope>> = [(c.hash, c.clone())].into();
        let again = Ledger::default();
        let cleanup = again.restore(loaded, &configured, T0);
        assert_eq!(cleanup, vec![Op::Spend(Arc::from("caller:gone"), None)]);
        let lv = again.levels([c.clone()].iter(), T0);
        assert_eq!(lv[0].total_micros, 700_000);
        assert!(
            again.reserve(&[c], T0, 400_000, 1).is_err(),
            "70 cents stay spent"
        );
    }
}
