//! Quorum tripping: which callers reported the failures that would open a
//! breaker.
//!
//! A breaker is shared by the whole fleet, so one agent on a broken network
//! (or with a bug) that sees every call fail could open it for everyone,
//! although the provider answers the rest of the fleet fine. With
//! `min_distinct_callers = n`, failures trip a closed breaker (the
//! consecutive-failure threshold and the rate rule alike) only when at least
//! `n` distinct callers reported a failure within the breaker's `window`.
//!
//! The set is small and bounded: at most `2 × n` callers, the one whose last
//! failure is oldest evicted first. Keeping the most recent callers is
//! enough to decide exactly: if `n` callers failed within the window, the
//! `n` most recent failures are all within it, and they are kept.

use crate::domain::time::Time;
use std::time::Duration;

/// The largest `min_distinct_callers` the config accepts.
pub const MAX_MIN_DISTINCT_CALLERS: u32 = 64;

/// Most callers a set keeps, whatever a record read from a store says
/// (twice the largest `min_distinct_callers`).
pub const MAX_CALLERS: usize = 2 * MAX_MIN_DISTINCT_CALLERS as usize;

/// The callers that reported a failure recently: a hash of each caller's
/// name and the time of its latest failure.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FailureCallers {
    entries: Vec<(u64, Time)>,
}

impl FailureCallers {
    /// A set read back from a record: at most [`MAX_CALLERS`] entries, one
    /// per caller (a record written by an older or damaged process cannot
    /// make the set grow without bound or count a caller twice).
    pub fn from_entries(entries: impl IntoIterator<Item = (u64, Time)>) -> FailureCallers {
        let mut set = FailureCallers::default();
        for (caller, at) in entries {
            set.note(caller, at, MAX_CALLERS);
        }
        set
    }

    /// Every (caller hash, last failure) pair, in no particular order.
    pub fn entries(&self) -> &[(u64, Time)] {
        &self.entries
    }

    /// Records a failure from `caller` at `now`, keeping at most `cap`
    /// callers (the oldest last failure goes first).
    pub fn note(&mut self, caller: u64, now: Time, cap: usize) {
        let cap = cap.clamp(1, MAX_CALLERS);
        if let Some(e) = self.entries.iter_mut().find(|e| e.0 == caller) {
            // Times from other replicas may be a little behind: never go back.
            e.1 = e.1.max(now);
        } else {
            self.entries.push((caller, now));
        }
        while self.entries.len() > cap {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.1)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    self.entries.swap_remove(i);
                }
                None => break,
            }
        }
    }

    /// Callers whose latest failure is less than `window` before `now`.
    pub fn distinct(&self, now: Time, window: Duration) -> u32 {
        let n = self
            .entries
            .iter()
            .filter(|e| now.since(e.1) < window)
            .count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Time = Time::from_secs(1_000_000);
    const W: Duration = Duration::from_secs(60);

    #[test]
    fn a_caller_counts_once_and_keeps_its_latest_failure() {
        let mut s = FailureCallers::default();
        for i in 0..50 {
            s.note(1, T0 + Duration::from_secs(i), 6);
        }
        assert_eq!(s.entries(), &[(1, T0 + Duration::from_secs(49))]);
        assert_eq!(s.distinct(T0 + Duration::from_secs(100), W), 1);
        // An older report (another replica's clock) does not move it back.
        s.note(1, T0, 6);
        assert_eq!(s.entries(), &[(1, T0 + Duration::from_secs(49))]);
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let mut s = FailureCallers::default();
        s.note(1, T0, 6);
        s.note(2, T0 + Duration::from_secs(30), 6);
        assert_eq!(s.distinct(T0 + Duration::from_secs(59), W), 2);
        assert_eq!(s.distinct(T0 + Duration::from_secs(60), W), 1);
        assert_eq!(s.distinct(T0 + Duration::from_secs(90), W), 0);
    }

    #[test]
    fn the_set_is_bounded_and_evicts_the_oldest() {
        let mut s = FailureCallers::default();
        for c in 0..10u64 {
            s.note(c, T0 + Duration::from_secs(c), 4);
        }
        let mut kept: Vec<u64> = s.entries().iter().map(|e| e.0).collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![6, 7, 8, 9]);
        // A record cannot make it grow past the hard bound, nor repeat a caller.
        let big = FailureCallers::from_entries((0..1000u64).map(|c| (c % 500, T0)));
        assert_eq!(big.entries().len(), MAX_CALLERS);
    }
}
