//! Which permits of one target have been settled, remembered exactly for
//! their lifetime, in about one bit per admission.
//!
//! Settling must be idempotent: a client that retries a RecordOutcome after a
//! network error, or an attacker replaying one, must not count an outcome
//! twice (five replays of one 503 would open a breaker; replayed refunds would
//! drain nothing from a budget). Permit ids are a per-target counter, so the
//! settled set is a bitmap over the ids issued within the last permit
//! lifetime: bit `id - base` is set when that permit is settled. Memory grows
//! only with admissions *that are later reported* within a lifetime (a target
//! whose clients never report allocates nothing), e.g. 30,000 reports/s with
//! 120 s permits is 450 KB. The oldest words are dropped once every permit
//! they cover has expired, which `marks` tracks: ids are issued in time
//! order, so every id below a mark was issued no later than the mark's time.
//!
//! The first answer is kept for the most recent settles (a small ring), so a
//! client retrying a lost response gets the same advice back.

use crate::domain::Time;
use std::collections::VecDeque;

/// Recent first answers kept for duplicates.
const RECENT: usize = 64;

/// The settled-permit memory of one target.
#[derive(Debug)]
pub struct SettledLog<R: Copy> {
    /// Id of bit 0 of `words[0]` (a multiple of 64).
    base: u64,
    words: VecDeque<u64>,
    /// (id, issued) samples, at most one per second of issue time.
    marks: VecDeque<(u64, Time)>,
    recent: VecDeque<(u64, R)>,
}

/// What checking a permit against the memory found.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen<R> {
    /// First report: now marked settled.
    First,
    /// Already settled; the first answer, if still remembered.
    Again(Option<R>),
    /// Older than anything remembered: its permit has expired.
    Forgotten,
}

impl<R: Copy> Default for SettledLog<R> {
    fn default() -> Self {
        SettledLog {
            base: 0,
            words: VecDeque::new(),
            marks: VecDeque::new(),
            recent: VecDeque::new(),
        }
    }
}

impl<R: Copy> SettledLog<R> {
    /// Marks permit `id` (issued at `issued`) settled, unless it already was.
    /// `now - lifetime` is the oldest issue time a live permit can have.
    pub fn settle(
        &mut self,
        id: u64,
        issued: Time,
        now: Time,
        lifetime: std::time::Duration,
    ) -> Seen<R> {
        self.forget_before(now - lifetime);
        if id < self.base {
            return Seen::Forgotten;
        }
        if self.words.is_empty() {
            self.base = id & !63;
        }
        let bit = id - self.base;
        let word = usize::try_from(bit / 64).unwrap_or(usize::MAX);
        if word >= self.words.len() {
            // Bounded by the ids issued in one lifetime (older words are gone).
            self.words.resize(word + 1, 0);
        }
        let mask = 1u64 << (bit % 64);
        if self.words[word] & mask != 0 {
            let first = self.recent.iter().find(|(i, _)| *i == id).map(|(_, r)| *r);
            return Seen::Again(first);
        }
        self.words[word] |= mask;
        if self
            .marks
            .back()
            .is_none_or(|(_, t)| issued.as_nanos() >= t.as_nanos() + 1_000_000_000)
        {
            self.marks.push_back((id, issued));
        }
        Seen::First
    }

    /// Remembers the answer given to the first report of `id`.
    pub fn answered(&mut self, id: u64, result: R) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((id, result));
    }

    /// Drops every id issued before `oldest` (all expired).
    fn forget_before(&mut self, oldest: Time) {
        while let Some(&(id, t)) = self.marks.front() {
            // Every id below a mark was issued at or before the mark's time.
            if t >= oldest {
                break;
            }
            self.marks.pop_front();
            let cut = id & !63;
            while self.base < cut && !self.words.is_empty() {
                self.words.pop_front();
                self.base += 64;
            }
        }
        if self.words.is_empty() && self.marks.is_empty() {
            self.base = 0;
        }
    }

    /// Heap bytes held (for the memory bound's tests).
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.words.capacity() * 8 + self.marks.capacity() * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const LIFE: Duration = Duration::from_secs(120);

    #[test]
    fn the_first_report_counts_and_replays_do_not() {
        let t0 = Time::from_secs(1_000_000);
        let mut log = SettledLog::<u8>::default();
        assert_eq!(log.settle(5, t0, t0, LIFE), Seen::First);
        log.answered(5, 9);
        assert_eq!(log.settle(5, t0, t0, LIFE), Seen::Again(Some(9)));
        assert_eq!(log.settle(6, t0, t0, LIFE), Seen::First);
        assert_eq!(log.settle(6, t0, t0, LIFE), Seen::Again(None));
        // Out of order is fine.
        assert_eq!(log.settle(1000, t0, t0, LIFE), Seen::First);
        assert_eq!(log.settle(2, t0, t0, LIFE), Seen::First);
        assert_eq!(log.settle(1000, t0, t0, LIFE), Seen::Again(None));
    }

    #[test]
    fn memory_is_bounded_by_one_lifetime_of_ids() {
        let t0 = Time::from_secs(1_000_000);
        let mut log = SettledLog::<u8>::default();
        // 1,000 reports per second for 10 lifetimes.
        let mut id = 1;
        for s in 0..1200u64 {
            let now = t0 + Duration::from_secs(s);
            for _ in 0..1000 {
                assert_eq!(log.settle(id, now, now, LIFE), Seen::First);
                id += 1;
            }
        }
        // About 121 s of ids: 121,000 bits = ~15 KB, not 1.2 M entries.
        assert!(log.bytes() < 64 * 1024, "{}", log.bytes());
        // A permit issued a lifetime ago is forgotten (its permit has expired),
        // a recent one is still recognised.
        let now = t0 + Duration::from_secs(1200);
        assert_eq!(log.settle(1, t0, now, LIFE), Seen::Forgotten);
        assert_eq!(log.settle(id - 1, now, now, LIFE), Seen::Again(None));
    }
}
