//! Where the engine gets `now` from.
//!
//! Production uses [`SystemClock`]: wall-clock time at startup plus a
//! monotonic offset, so deadlines survive a restart (they are wall-clock) but
//! never jump backwards while running (an NTP step cannot reopen a breaker
//! early or stretch a pause). Tests use [`ManualClock`] and advance it exactly.

use crate::domain::Time;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Time;
}

/// Wall-clock anchored at construction, advanced by a monotonic clock.
#[derive(Debug)]
pub struct SystemClock {
    anchor_wall: Time,
    anchor_mono: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        SystemClock {
            anchor_wall: Time::from_nanos(u64::try_from(wall.as_nanos()).unwrap_or(u64::MAX)),
            anchor_mono: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Time {
        self.anchor_wall + self.anchor_mono.elapsed()
    }
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(start: Time) -> Self {
        ManualClock(AtomicU64::new(start.as_nanos()))
    }

    pub fn advance(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.fetch_add(nanos, Ordering::SeqCst);
    }

    pub fn set(&self, t: Time) {
        self.0.store(t.as_nanos(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Time {
        Time::from_nanos(self.0.load(Ordering::SeqCst))
    }
}

/// The system clock corrected by an offset to a shared clock: in cluster
/// mode, Redis `TIME`, measured on every heartbeat, so every replica's
/// deadlines (open-until, pauses, budget levels) are on one time line even
/// when the machines' clocks disagree.
#[derive(Debug, Default)]
pub struct OffsetClock {
    base: SystemClock,
    /// Nanoseconds to add to the local clock.
    offset: std::sync::atomic::AtomicI64,
    /// The measurement the offset came from: (its round trip, when it was
    /// taken), for [`OffsetClock::sample`].
    best: std::sync::Mutex<Option<(std::time::Duration, Time)>>,
}

/// How long the offset from a fast round trip is preferred over slower
/// new ones (clocks drift apart by far less than a millisecond in it).
const SAMPLE_KEEP: std::time::Duration = std::time::Duration::from_secs(30);

impl OffsetClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the offset from one measurement: the shared clock read `shared`
    /// while the local one read `local` (the midpoint of the round trip).
    pub fn sync(&self, shared: Time, local: Time) {
        let off = i128::from(shared.as_nanos()) - i128::from(local.as_nanos());
        let off = off.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        self.offset.store(off, Ordering::Relaxed);
    }

    /// One measurement: the shared clock read `shared` somewhere in a round
    /// trip of `rtt` whose midpoint was `local`. The offset is off by at
    /// most rtt / 2, so a sample is taken only if its round trip is no
    /// longer than the one the offset came from, or that one is older than
    /// [`SAMPLE_KEEP`]: on a loaded machine a single slow round trip would
    /// otherwise move every deadline this replica computes by tens of
    /// milliseconds against the other replicas'.
    pub fn sample(&self, shared: Time, local: Time, rtt: std::time::Duration) {
        let mut best = self.best.lock().unwrap_or_else(|e| e.into_inner());
        let take = match *best {
            None => true,
            Some((best_rtt, at)) => rtt <= best_rtt || local.since(at) > SAMPLE_KEEP,
        };
        if take {
            *best = Some((rtt, local));
            self.sync(shared, local);
        }
    }

    /// The local clock, uncorrected.
    pub fn local(&self) -> Time {
        self.base.now()
    }

    pub fn offset(&self) -> i64 {
        self.offset.load(Ordering::Relaxed)
    }
}

impl Clock for OffsetClock {
    fn now(&self) -> Time {
        let t =
            self.base.now().as_nanos() as i128 + i128::from(self.offset.load(Ordering::Relaxed));
        Time::from_nanos(t.clamp(0, i128::from(u64::MAX)) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T: Time = Time::from_secs(1_000);

    #[test]
    fn the_offset_comes_from_the_fastest_recent_round_trip() {
        let c = OffsetClock::new();
        c.sample(T + Duration::from_millis(3), T, Duration::from_millis(2));
        assert_eq!(c.offset(), 3_000_000);
        // A slower round trip (less exact) does not replace it...
        c.sample(
            T + Duration::from_secs(1) + Duration::from_millis(40),
            T + Duration::from_secs(1),
            Duration::from_millis(80),
        );
        assert_eq!(c.offset(), 3_000_000);
        // ...a faster or equal one does...
        c.sample(
            T + Duration::from_secs(2) + Duration::from_millis(1),
            T + Duration::from_secs(2),
            Duration::from_millis(1),
        );
        assert_eq!(c.offset(), 1_000_000);
        // ...and once the kept one is old, any new one does (clocks drift).
        c.sample(
            T + Duration::from_secs(40) - Duration::from_millis(5),
            T + Duration::from_secs(40),
            Duration::from_millis(50),
        );
        assert_eq!(c.offset(), -5_000_000);
    }
}
