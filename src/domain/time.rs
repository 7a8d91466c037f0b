//! Time as the domain sees it: a plain value passed into every decision.
//!
//! The domain never reads a clock. Callers pass `now`, which makes every
//! transition exact and testable without sleeping. A [`Time`] is nanoseconds
//! since the Unix epoch so that deadlines (an open-until, a provider's reset
//! time) mean the same thing after a restart and can be persisted as-is.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in time: nanoseconds since the Unix epoch.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(u64);

impl Time {
    /// The Unix epoch; also used as "never set".
    pub const ZERO: Time = Time(0);
    /// The far future; a deadline that never passes.
    pub const MAX: Time = Time(u64::MAX);

    pub const fn from_nanos(nanos: u64) -> Self {
        Time(nanos)
    }

    pub const fn from_secs(secs: u64) -> Self {
        Time(secs.saturating_mul(1_000_000_000))
    }

    pub const fn from_millis(millis: u64) -> Self {
        Time(millis.saturating_mul(1_000_000))
    }

    /// Whole milliseconds since the Unix epoch.
    pub const fn as_millis(self) -> u64 {
        self.0 / 1_000_000
    }

    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }

    /// Time remaining from `self` until `deadline`, or zero if it has passed.
    pub fn until(self, deadline: Time) -> Duration {
        deadline.since(self)
    }

    /// Whole seconds and sub-second nanos since the epoch (for wire timestamps).
    pub fn to_unix_parts(self) -> (i64, i32) {
        let secs = (self.0 / 1_000_000_000) as i64;
        let nanos = (self.0 % 1_000_000_000) as i32;
        (secs, nanos)
    }
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Add<Duration> for Time {
    type Output = Time;
    /// Saturates at [`Time::MAX`] instead of overflowing.
    fn add(self, rhs: Duration) -> Time {
        Time(self.0.saturating_add(duration_nanos(rhs)))
    }
}

impl Sub<Duration> for Time {
    type Output = Time;
    /// Saturates at [`Time::ZERO`].
    fn sub(self, rhs: Duration) -> Time {
        Time(self.0.saturating_sub(duration_nanos(rhs)))
    }
}

impl fmt::Debug for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (s, n) = self.to_unix_parts();
        write!(f, "Time({s}.{n:09})")
    }
}

/// Multiplies a duration by a non-negative factor, saturating instead of panicking.
pub fn scale(d: Duration, factor: f64) -> Duration {
    if !factor.is_finite() || factor <= 0.0 {
        return Duration::ZERO;
    }
    let nanos = d.as_nanos() as f64 * factor;
    if nanos >= u64::MAX as f64 {
        Duration::from_nanos(u64::MAX)
    } else {
        Duration::from_nanos(nanos as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(Time::MAX + Duration::from_secs(1), Time::MAX);
        assert_eq!(Time::ZERO - Duration::from_secs(1), Time::ZERO);
        assert_eq!(
            Time::from_secs(10).since(Time::from_secs(4)),
            Duration::from_secs(6)
        );
        assert_eq!(
            Time::from_secs(4).since(Time::from_secs(10)),
            Duration::ZERO
        );
        assert_eq!(
            Time::from_secs(4).until(Time::from_secs(10)),
            Duration::from_secs(6)
        );
    }

    #[test]
    fn scale_handles_edges() {
        assert_eq!(scale(Duration::from_secs(2), 1.5), Duration::from_secs(3));
        assert_eq!(scale(Duration::from_secs(2), -1.0), Duration::ZERO);
        assert_eq!(scale(Duration::from_secs(2), f64::NAN), Duration::ZERO);
        assert_eq!(
            scale(Duration::from_secs(u64::MAX / 2), 1e30),
            Duration::from_nanos(u64::MAX)
        );
    }
}
