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
}

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
