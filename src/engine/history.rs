//! Per-target traffic history for the dashboard: one [`Ring`] per target,
//! fed by admissions and outcomes on this replica.
//!
//! Kept off the decision path's critical section: a lookup is a read of one
//! DashMap shard and the ring has its own mutex, held for the few
//! nanoseconds of an increment, so targets never contend with each other
//! and a call allocates nothing once its target has a ring. The number of
//! targets with a ring is capped (`[events] history_targets`): beyond the
//! cap, extra targets have no history (and the API says so) rather than
//! memory growing with every name a client sends. When the cap is reached,
//! rings idle for the whole window are dropped to make room, at most once
//! per bucket period.

use crate::domain::Time;
use crate::domain::history::{BUCKET, Ring, Series, Totals};
use dashmap::DashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct History {
    cap: usize,
    rings: DashMap<Arc<str>, Mutex<Ring>>,
    /// Rings held (kept alongside the map: `DashMap::len` locks every shard).
    held: AtomicUsize,
    /// Bucket period of the last sweep for idle rings (at most one per period).
    swept: AtomicU64,
    /// Times a target was turned away because the cap was reached.
    turned_away: AtomicU64,
}

impl History {
    pub fn new(cap: usize) -> History {
        History {
            cap,
            rings: DashMap::new(),
            held: AtomicUsize::new(0),
            swept: AtomicU64::new(0),
            turned_away: AtomicU64::new(0),
        }
    }

    /// Most targets with history.
    pub fn cap(&self) -> usize {
        self.cap
    }

    /// Targets with history now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Whether some target was refused a ring because the cap was reached.
    pub fn capped(&self) -> bool {
        self.turned_away.load(Ordering::Relaxed) > 0
    }

    fn with(&self, target: &str, now: Time, f: impl FnOnce(&mut Ring)) {
        if let Some(r) = self.rings.get(target) {
            f(&mut r.lock().unwrap_or_else(|e| e.into_inner()));
            return;
        }
        // A target beyond the cap must cost next to nothing: plain loads
        // first, so thousands of capped targets do not all write the same
        // counters' cache lines on every call.
        if self.held.load(Ordering::Relaxed) >= self.cap && !self.sweep(now) {
            self.turn_away();
            return;
        }
        if self.held.fetch_add(1, Ordering::Relaxed) >= self.cap {
            self.held.fetch_sub(1, Ordering::Relaxed);
            if !self.sweep(now) {
                self.turn_away();
                return;
            }
            // The sweep made room: claim it (another target may race us to it).
            if self.held.fetch_add(1, Ordering::Relaxed) >= self.cap {
                self.held.fetch_sub(1, Ordering::Relaxed);
                self.turn_away();
                return;
            }
        }
        let mut fresh = false;
        let entry = self.rings.entry(Arc::from(target)).or_insert_with(|| {
            fresh = true;
            Mutex::new(Ring::default())
        });
        if !fresh {
            // Another call created it first.
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
        f(&mut entry.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Remembers that a target was turned away (the JSON says `capped`);
    /// written once, read after, so capped targets share no written line.
    fn turn_away(&self) {
        if self.turned_away.load(Ordering::Relaxed) == 0 {
            self.turned_away.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Drops rings with nothing in the window; true if any was dropped. Runs
    /// at most once per bucket period, so a flood of new names while full
    /// costs one scan per 10 s, not one per call.
    fn sweep(&self, now: Time) -> bool {
        let period = now.as_nanos() / BUCKET.as_nanos() as u64 + 1;
        let last = self.swept.load(Ordering::Relaxed);
        if last >= period
            || self
                .swept
                .compare_exchange(last, period, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        let before = self.rings.len();
        self.rings
            .retain(|_, r| !r.get_mut().unwrap_or_else(|e| e.into_inner()).is_idle(now));
        let dropped = before.saturating_sub(self.rings.len());
        self.held.fetch_sub(dropped, Ordering::Relaxed);
        dropped > 0
    }

    /// A CanProceed / Route admission decision.
    pub fn admission(&self, target: &str, now: Time, allowed: bool) {
        self.with(target, now, |r| r.admission(now, allowed));
    }

    /// A reported outcome.
    pub fn outcome(&self, target: &str, now: Time, failed: bool, latency: Option<Duration>) {
        self.with(target, now, |r| r.outcome(now, failed, latency));
    }

    /// The last 15 minutes of `target`; None when it has no history (no
    /// traffic yet, or beyond the cap).
    pub fn series(&self, target: &str, now: Time) -> Option<Series> {
        let r = self.rings.get(target)?;
        let s = r.lock().unwrap_or_else(|e| e.into_inner()).series(now);
        Some(s)
    }

    /// Window totals of `target`; None when it has no history.
    pub fn totals(&self, target: &str, now: Time) -> Option<Totals> {
        let r = self.rings.get(target)?;
        let t = r.lock().unwrap_or_else(|e| e.into_inner()).totals(now);
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::history::BUCKETS;

    fn at(secs: u64) -> Time {
        Time::from_nanos(secs * 1_000_000_000)
    }

    #[test]
    fn targets_beyond_the_cap_have_no_history_until_an_idle_one_makes_room() {
        let h = History::new(2);
        h.admission("a", at(100), true);
        h.admission("b", at(100), false);
        h.admission("c", at(100), true);
        assert_eq!(h.held(), 2);
        assert!(h.series("c", at(100)).is_none());
        assert!(h.capped());
        assert_eq!(h.totals("b", at(100)).map(|t| t.refused), Some(1));
        // Known targets keep recording while full.
        h.outcome("a", at(105), true, None);
        assert_eq!(h.totals("a", at(105)).map(|t| t.failed), Some(1));
        // 15 minutes later "b" is idle; "a" is kept busy.
        h.admission("a", at(990), true);
        h.admission("c", at(1000), true);
        assert!(h.series("b", at(1000)).is_none(), "idle b was dropped");
        assert_eq!(h.totals("c", at(1000)).map(|t| t.admitted), Some(1));
        assert_eq!(h.totals("a", at(1000)).map(|t| t.admitted), Some(1));
        assert_eq!(h.held(), 2);
    }

    #[test]
    fn series_is_the_whole_window_for_a_known_target() {
        let h = History::new(10);
        assert!(h.series("a", at(0)).is_none());
        h.outcome("a", at(20), false, Some(Duration::from_millis(300)));
        let s = h.series("a", at(20)).expect("history");
        assert_eq!(s.points.len(), BUCKETS);
        assert!(s.points[BUCKETS - 1].p99_ms.is_some());
    }
}
