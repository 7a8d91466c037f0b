//! A target's recent traffic as a fixed ring of 10-second buckets covering
//! the last 15 minutes: admitted / refused / failed calls and a small
//! latency sketch per bucket (for p50 / p99), so the dashboard can draw
//! rates and trends without the server keeping anything unbounded.
//!
//! Pure: time is passed in. A bucket is reused when time reaches it again
//! (its epoch no longer matches), so nothing needs a timer to age out.

use super::Time;
use std::time::Duration;

/// Width of one bucket.
pub const BUCKET: Duration = Duration::from_secs(10);
/// Buckets in the ring: 90 x 10 s = 15 minutes.
pub const BUCKETS: usize = 90;
/// Latency bins per bucket: bin 0 is below 1 ms, bin `i >= 1` is
/// `[2^((i-1)/2), 2^(i/2))` ms (half-octave steps, so a quantile read from
/// the sketch is within ~41% of the true value), the last bin is open
/// ended (at or above 2^17 ms, about 131 s).
pub const LATENCY_BINS: usize = 36;

const BUCKET_NANOS: u64 = BUCKET.as_nanos() as u64;

/// The bin a latency falls in.
pub fn bin(latency: Duration) -> usize {
    let ms = latency.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        return 0;
    }
    // floor(2 log2 ms) is 0 for [1, 1.41) ms, 1 for [1.41, 2) ms, ...
    let i = (2.0 * ms.log2()).floor() as usize + 1;
    i.min(LATENCY_BINS - 1)
}

/// The lower and upper bounds of a bin, in milliseconds (the last bin's
/// upper bound is infinite).
pub fn bin_bounds(i: usize) -> (f64, f64) {
    match i {
        0 => (0.0, 1.0),
        i if i >= LATENCY_BINS - 1 => (2f64.powf((i as f64 - 1.0) / 2.0), f64::INFINITY),
        i => (2f64.powf((i as f64 - 1.0) / 2.0), 2f64.powf(i as f64 / 2.0)),
    }
}

/// The value a bin stands for when a quantile lands in it: the geometric
/// middle of its bounds (half a millisecond for bin 0, the lower bound for
/// the open-ended last bin).
fn representative(i: usize) -> f64 {
    let (lo, hi) = bin_bounds(i);
    match i {
        0 => 0.5,
        _ if hi.is_infinite() => lo,
        _ => (lo * hi).sqrt(),
    }
}

/// One 10-second bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Bucket {
    /// Which 10-second period since the epoch this bucket holds, plus one
    /// (0: never used).
    epoch: u64,
    admitted: u32,
    refused: u32,
    failed: u32,
    latency: [u32; LATENCY_BINS],
}

const EMPTY: Bucket = Bucket {
    epoch: 0,
    admitted: 0,
    refused: 0,
    failed: 0,
    latency: [0; LATENCY_BINS],
};

/// The last 15 minutes of one target's traffic (about 15 KB, allocated
/// once per target).
#[derive(Clone, Debug, PartialEq)]
pub struct Ring {
    buckets: [Bucket; BUCKETS],
}

impl Default for Ring {
    fn default() -> Self {
        Ring {
            buckets: [EMPTY; BUCKETS],
        }
    }
}

/// One bucket as read out.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Point {
    pub admitted: u32,
    pub refused: u32,
    pub failed: u32,
    /// None when no latency was reported in the bucket.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// The whole window, oldest bucket first; `start` is when the first one began.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub start: Time,
    pub points: Vec<Point>,
}

/// Window totals (what "most refused" sorts by).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub admitted: u64,
    pub refused: u64,
    pub failed: u64,
}

fn epoch_of(now: Time) -> u64 {
    now.as_nanos() / BUCKET_NANOS + 1
}

/// The latency value below which a fraction `q` of the bin counts lie
/// (rank `ceil(q n)`), as the bin's representative value.
pub fn quantile(bins: &[u32; LATENCY_BINS], q: f64) -> Option<f64> {
    let n: u64 = bins.iter().map(|&c| u64::from(c)).sum();
    if n == 0 {
        return None;
    }
    let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
    let mut seen = 0u64;
    for (i, &c) in bins.iter().enumerate() {
        seen += u64::from(c);
        if seen >= rank {
            return Some(representative(i));
        }
    }
    Some(representative(LATENCY_BINS - 1))
}

impl Ring {
    /// The bucket for `now`, emptied first if it still holds an older period.
    fn current(&mut self, now: Time) -> &mut Bucket {
        let e = epoch_of(now);
        let b = &mut self.buckets[(e % BUCKETS as u64) as usize];
        if b.epoch != e {
            *b = Bucket { epoch: e, ..EMPTY };
        }
        b
    }

    /// An admission decision: admitted or refused.
    pub fn admission(&mut self, now: Time, allowed: bool) {
        let b = self.current(now);
        if allowed {
            b.admitted = b.admitted.saturating_add(1);
        } else {
            b.refused = b.refused.saturating_add(1);
        }
    }

    /// A reported outcome: whether it failed, and its latency if reported.
    pub fn outcome(&mut self, now: Time, failed: bool, latency: Option<Duration>) {
        let b = self.current(now);
        if failed {
            b.failed = b.failed.saturating_add(1);
        }
        if let Some(l) = latency {
            let c = &mut b.latency[bin(l)];
            *c = c.saturating_add(1);
        }
    }

    /// Buckets still inside the window ending at `now`, with their age in
    /// buckets (0 = the current one).
    fn live(&self, now: Time) -> impl Iterator<Item = (u64, &Bucket)> {
        let e = epoch_of(now);
        self.buckets
            .iter()
            .filter(move |b| b.epoch != 0 && b.epoch <= e && e - b.epoch < BUCKETS as u64)
            .map(move |b| (e - b.epoch, b))
    }

    /// The window ending at `now`, oldest bucket first (empty periods as zeros).
    pub fn series(&self, now: Time) -> Series {
        let e = epoch_of(now);
        let mut points = vec![Point::default(); BUCKETS];
        for (age, b) in self.live(now) {
            points[BUCKETS - 1 - age as usize] = Point {
                admitted: b.admitted,
                refused: b.refused,
                failed: b.failed,
                p50_ms: quantile(&b.latency, 0.50),
                p99_ms: quantile(&b.latency, 0.99),
            };
        }
        // The first bucket began BUCKETS - 1 periods before the current one.
        let first = e.saturating_sub(BUCKETS as u64);
        Series {
            start: Time::from_nanos(first.saturating_mul(BUCKET_NANOS)),
            points,
        }
    }

    /// Totals over the window ending at `now`.
    pub fn totals(&self, now: Time) -> Totals {
        self.live(now).fold(Totals::default(), |mut t, (_, b)| {
            t.admitted += u64::from(b.admitted);
            t.refused += u64::from(b.refused);
            t.failed += u64::from(b.failed);
            t
        })
    }

    /// Whether anything happened in the window ending at `now` (a ring with
    /// nothing may be dropped to make room for another target).
    pub fn is_idle(&self, now: Time) -> bool {
        self.live(now).next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Time {
        Time::from_nanos(secs * 1_000_000_000)
    }

    #[test]
    fn calls_in_one_period_share_a_bucket_and_the_next_period_starts_a_new_one() {
        let mut r = Ring::default();
        r.admission(at(1000), true);
        r.admission(at(1009), false);
        r.admission(at(1010), true);
        let s = r.series(at(1010));
        let last = s.points[BUCKETS - 1];
        let before = s.points[BUCKETS - 2];
        assert_eq!((before.admitted, before.refused), (1, 1));
        assert_eq!((last.admitted, last.refused), (1, 0));
        // Buckets are aligned to 10 s: the window starts 89 buckets before 1010 s.
        assert_eq!(s.start, at(1010 - 890));
        assert_eq!(s.points.len(), BUCKETS);
    }

    #[test]
    fn the_window_is_fifteen_minutes_and_a_reused_slot_starts_empty() {
        let mut r = Ring::default();
        r.outcome(at(1000), true, None);
        assert_eq!(r.totals(at(1000)).failed, 1);
        // 890 s later the bucket is the oldest one still shown...
        assert_eq!(r.totals(at(1890)).failed, 1);
        assert_eq!(r.series(at(1890)).points[0].failed, 1);
        // ...and 900 s later it has left the window.
        assert_eq!(r.totals(at(1900)).failed, 0);
        assert!(r.is_idle(at(1900)));
        // The same slot, a lap later, does not carry the old count.
        r.outcome(at(1900), false, Some(Duration::from_millis(5)));
        let s = r.series(at(1900));
        assert_eq!(s.points[BUCKETS - 1].failed, 0);
        assert!(s.points[BUCKETS - 1].p50_ms.is_some());
        assert_eq!(s.points.iter().map(|p| p.failed).sum::<u32>(), 0);
    }

    #[test]
    fn a_clock_behind_the_ring_does_not_read_future_buckets() {
        let mut r = Ring::default();
        r.admission(at(2000), true);
        assert_eq!(r.totals(at(1990)).admitted, 0);
        assert_eq!(r.totals(at(2000)).admitted, 1);
    }

    #[test]
    fn percentiles_are_within_a_bins_width_of_the_truth() {
        let mut r = Ring::default();
        // 98 fast calls at 120 ms and 2 slow ones at 4 s.
        for _ in 0..98 {
            r.outcome(at(50), false, Some(Duration::from_millis(120)));
        }
        for _ in 0..2 {
            r.outcome(at(50), false, Some(Duration::from_millis(4000)));
        }
        let p = r.series(at(50)).points[BUCKETS - 1];
        let (p50, p99) = (p.p50_ms.expect("p50"), p.p99_ms.expect("p99"));
        let (lo, hi) = bin_bounds(bin(Duration::from_millis(120)));
        assert!(lo <= 120.0 && 120.0 < hi, "120 ms is in [{lo}, {hi})");
        assert!(lo <= p50 && p50 < hi, "p50 {p50} in [{lo}, {hi})");
        let (lo, hi) = bin_bounds(bin(Duration::from_millis(4000)));
        assert!(lo <= p99 && p99 < hi, "p99 {p99} in [{lo}, {hi})");
        // Half-octave bins: the answer is within a factor of sqrt(2).
        assert!((p50 / 120.0).max(120.0 / p50) < 2f64.sqrt());
        assert!((p99 / 4000.0).max(4000.0 / p99) < 2f64.sqrt());
    }

    #[test]
    fn bins_cover_every_latency() {
        assert_eq!(bin(Duration::ZERO), 0);
        assert_eq!(bin(Duration::from_micros(999)), 0);
        assert_eq!(bin(Duration::from_millis(1)), 1);
        assert_eq!(bin(Duration::from_secs(3600)), LATENCY_BINS - 1);
        for i in 1..LATENCY_BINS - 1 {
            let (lo, hi) = bin_bounds(i);
            assert_eq!(bin(Duration::from_secs_f64(lo * 1.0001 / 1000.0)), i);
            assert_eq!(bin(Duration::from_secs_f64(hi * 0.9999 / 1000.0)), i);
        }
        assert_eq!(quantile(&[0; LATENCY_BINS], 0.5), None);
    }
}
