//! Rolling counters over a sliding time window, in fixed buckets.
//!
//! Used by the breaker's failure-rate rule and by the fleet-wide retry budget.
//! A window of length `W` is split into [`BUCKETS`] buckets; totals cover the
//! current bucket and the `BUCKETS - 1` before it, so old data ages out
//! smoothly instead of all at once at a fixed boundary.

use super::time::Time;
use std::time::Duration;

/// Buckets per window: 10 gives a 10% granularity of expiry.
pub const BUCKETS: usize = 10;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Bucket {
    /// Which bucket-width interval since the epoch this bucket holds.
    epoch: u64,
    a: u32,
    b: u32,
}

/// Two counters (`a`, `b`) per bucket, e.g. (calls, failures) or (first tries, retries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollingPair {
    width_nanos: u64,
    buckets: [Bucket; BUCKETS],
}

impl RollingPair {
    pub fn new(window: Duration) -> Self {
        let total = u64::try_from(window.as_nanos()).unwrap_or(u64::MAX);
        RollingPair {
            width_nanos: (total / BUCKETS as u64).max(1),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    /// The window this counter covers.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(self.width_nanos.saturating_mul(BUCKETS as u64))
    }

    fn epoch(&self, now: Time) -> u64 {
        // +1 so that epoch 0 never collides with an empty bucket.
        now.as_nanos() / self.width_nanos + 1
    }

    /// Adds to the bucket of `now`.
    pub fn add(&mut self, now: Time, a: u32, b: u32) {
        let epoch = self.epoch(now);
        let slot = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
        if slot.epoch != epoch {
            *slot = Bucket { epoch, a: 0, b: 0 };
        }
        slot.a = slot.a.saturating_add(a);
        slot.b = slot.b.saturating_add(b);
    }

    /// Totals of `(a, b)` over the window ending at `now`.
    pub fn totals(&self, now: Time) -> (u64, u64) {
        let epoch = self.epoch(now);
        let oldest = epoch.saturating_sub(BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| b.epoch >= oldest && b.epoch <= epoch)
            .fold((0, 0), |(a, b), k| (a + u64::from(k.a), b + u64::from(k.b)))
    }

    pub fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }

    /// Every field, for serialising: (bucket width, [(epoch, a, b)]).
    pub fn parts(&self) -> (u64, [(u64, u32, u32); BUCKETS]) {
        (self.width_nanos, self.buckets.map(|b| (b.epoch, b.a, b.b)))
    }

    /// The inverse of [`RollingPair::parts`].
    pub fn from_parts(width_nanos: u64, buckets: [(u64, u32, u32); BUCKETS]) -> Self {
        RollingPair {
            width_nanos: width_nanos.max(1),
            buckets: buckets.map(|(epoch, a, b)| Bucket { epoch, a, b }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_out_bucket_by_bucket() {
        let mut w = RollingPair::new(Duration::from_secs(10));
        let t0 = Time::from_secs(1000);
        w.add(t0, 5, 1);
        w.add(t0 + Duration::from_secs(3), 2, 2);
        assert_eq!(w.totals(t0 + Duration::from_secs(3)), (7, 3));
        // 9.9 s after t0: t0's bucket is still inside the window.
        assert_eq!(w.totals(t0 + Duration::from_millis(9_900)), (7, 3));
        // 10 s after t0: t0's bucket has aged out, the later one remains.
        assert_eq!(w.totals(t0 + Duration::from_secs(10)), (2, 2));
        assert_eq!(w.totals(t0 + Duration::from_secs(13)), (0, 0));
    }

    #[test]
    fn reused_slot_starts_fresh() {
        let mut w = RollingPair::new(Duration::from_secs(10));
        let t0 = Time::from_secs(1000);
        w.add(t0, 5, 5);
        // Same slot index, next lap.
        w.add(t0 + Duration::from_secs(10), 1, 0);
        assert_eq!(w.totals(t0 + Duration::from_secs(10)), (1, 0));
    }
}
