//! Retry advice: whether to retry, and after how long.
//!
//! Backoff is jittered so that a fleet which failed together does not retry
//! together. The default is *full jitter*, `uniform(0, min(max, base·2^attempt))`:
//! of the usual strategies it spreads retries most and finishes soonest under
//! contention. Randomness is passed in as `unit ∈ [0, 1)` to keep this pure.
//!
//! A fleet-wide [`RetryBudget`] caps retries at a fraction of first attempts
//! (Finagle, Envoy and gRPC call it retry throttling), so an outage cannot turn
//! into a retry storm however many agents are retrying.

use super::taxonomy::OutcomeClass;
use super::time::{Time, scale};
use super::window::RollingPair;
use std::time::Duration;

/// How backoff delays are spread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jitter {
    /// `uniform(0, cap)`.
    Full,
    /// `cap/2 + uniform(0, cap/2)`: never retries immediately.
    Equal,
    /// `min(max, uniform(base, 3·previous))`, with `previous` the un-jittered
    /// delay of the attempt before (the server does not see the client's last sleep).
    Decorrelated,
}

impl Jitter {
    pub fn parse(s: &str) -> Option<Jitter> {
        Some(match s {
            "full" => Jitter::Full,
            "equal" => Jitter::Equal,
            "decorrelated" => Jitter::Decorrelated,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Jitter::Full => "full",
            Jitter::Equal => "equal",
            Jitter::Decorrelated => "decorrelated",
        }
    }
}

/// Retry settings for one target.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    /// Retries advised while `attempt < max_retries` (attempt 0 is the first try).
    pub max_retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub jitter: Jitter,
    /// Retries may be at most this fraction of first attempts in the window...
    pub budget_ratio: f64,
    pub budget_window: Duration,
    /// ...plus this many per second, so a quiet target can still retry.
    pub min_retries_per_second: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            jitter: Jitter::Full,
            budget_ratio: 0.2,
            budget_window: Duration::from_secs(10),
            min_retries_per_second: 10.0,
        }
    }
}

impl RetryConfig {
    /// The un-jittered ceiling for `attempt`: `min(max_delay, base·2^attempt)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2f64.powi(attempt.min(62) as i32);
        scale(self.base_delay, factor).min(self.max_delay)
    }

    /// A jittered backoff delay for the retry after `attempt` failed.
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        let cap = self.ceiling(attempt);
        match self.jitter {
            Jitter::Full => scale(cap, unit),
            Jitter::Equal => cap / 2 + scale(cap / 2, unit),
            Jitter::Decorrelated => {
                let prev = if attempt == 0 {
                    self.base_delay
                } else {
                    self.ceiling(attempt - 1)
                };
                let hi = scale(prev, 3.0).max(self.base_delay);
                let span = hi.saturating_sub(self.base_delay);
                (self.base_delay + scale(span, unit)).min(self.max_delay)
            }
        }
    }
}

/// Why retry advice said what it said (mirrors `backstop.v1.RetryReason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    Succeeded,
    Retryable,
    Persistent,
    BadInput,
    MaxRetries,
    BudgetExhausted,
    CorrectAndRetry,
    /// The target's breaker is open (this outcome may have just opened it):
    /// a retry there is certain to be refused, so fall back or defer.
    CircuitOpen,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advice {
    pub retry: bool,
    pub delay: Duration,
    pub reason: RetryReason,
}

/// Advice for an outcome of class `class` on try number `attempt`.
///
/// `hint` is the provider's own retry hint (or the fleet-wide pause it
/// caused); the delay is `max(hint, backoff)`. `budget_ok` says whether the
/// fleet's retry budget has room.
pub fn advise(
    cfg: &RetryConfig,
    class: OutcomeClass,
    attempt: u32,
    hint: Option<Duration>,
    budget_ok: bool,
    unit: f64,
) -> Advice {
    let no = |reason| Advice {
        retry: false,
        delay: Duration::ZERO,
        reason,
    };
    let reason = match class {
        OutcomeClass::Success => return no(RetryReason::Succeeded),
        OutcomeClass::Persistent => return no(RetryReason::Persistent),
        OutcomeClass::BadInput => return no(RetryReason::BadInput),
        OutcomeClass::Partial => RetryReason::CorrectAndRetry,
        OutcomeClass::Transient | OutcomeClass::Timeout | OutcomeClass::RateLimited => {
            RetryReason::Retryable
        }
    };
    if attempt >= cfg.max_retries {
        return no(RetryReason::MaxRetries);
    }
    if !budget_ok {
        return no(RetryReason::BudgetExhausted);
    }
    // A correction is a new prompt, not a retry into a struggling provider: no wait.
    let delay = if reason == RetryReason::CorrectAndRetry {
        Duration::ZERO
    } else {
        cfg.backoff(attempt, unit).max(hint.unwrap_or_default())
    };
    Advice {
        retry: true,
        delay,
        reason,
    }
}

/// Corrects advice for a target that now refuses every call: while its
/// breaker is open, a retry "after the backoff" would certainly be refused, so
/// the advice becomes "do not retry here" with the time until the target
/// admits again (`None` when an operator holds it open: no known end). Advice
/// that already said not to retry keeps its reason.
pub fn against_open_breaker(advice: Advice, open_for: Option<Duration>) -> Advice {
    if !advice.retry {
        return advice;
    }
    Advice {
        retry: false,
        delay: open_for.unwrap_or_default(),
        reason: RetryReason::CircuitOpen,
    }
}

/// The fleet-wide retry budget of one target: (first attempts, retries) over a rolling window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryBudget {
    counts: RollingPair,
}

impl RetryBudget {
    /// The (first attempts, retries) counters, for serialising.
    pub fn counts(&self) -> &RollingPair {
        &self.counts
    }

    /// A budget with these counters (the inverse of [`RetryBudget::counts`]).
    pub fn from_counts(counts: RollingPair) -> Self {
        RetryBudget { counts }
    }

    pub fn new(window: Duration) -> Self {
        RetryBudget {
            counts: RollingPair::new(window),
        }
    }

    /// Would one more retry stay within `ratio × first attempts + floor`?
    pub fn allows(&self, now: Time, cfg: &RetryConfig) -> bool {
        let (firsts, retries) = self.counts.totals(now);
        let floor = cfg.min_retries_per_second.max(0.0) * cfg.budget_window.as_secs_f64();
        (retries as f64) < cfg.budget_ratio.max(0.0) * firsts as f64 + floor
    }

    pub fn record_first(&mut self, now: Time) {
        self.counts.add(now, 1, 0);
    }

    /// Takes a retry from the budget if it has room.
    pub fn try_retry(&mut self, now: Time, cfg: &RetryConfig) -> bool {
        if self.allows(now, cfg) {
            self.counts.add(now, 0, 1);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OutcomeClass::*;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn each_class_gets_its_decision() {
        let c = RetryConfig::default();
        let a = |class, attempt| advise(&c, class, attempt, None, true, 0.5);
        assert_eq!(a(Success, 0).reason, RetryReason::Succeeded);
        assert!(!a(Success, 0).retry);
        for class in [Persistent, BadInput] {
            let adv = a(class, 0);
            assert!(!adv.retry, "{class}");
        }
        assert_eq!(a(Persistent, 0).reason, RetryReason::Persistent);
        assert_eq!(a(BadInput, 0).reason, RetryReason::BadInput);
        for class in [Transient, Timeout, RateLimited] {
            for attempt in 0..3 {
                let adv = a(class, attempt);
                assert!(adv.retry, "{class} attempt {attempt}");
                assert_eq!(adv.reason, RetryReason::Retryable);
            }
            assert_eq!(a(class, 3).reason, RetryReason::MaxRetries);
            assert!(!a(class, 3).retry);
        }
        let p = a(Partial, 0);
        assert!(p.retry);
        assert_eq!(
            (p.reason, p.delay),
            (RetryReason::CorrectAndRetry, Duration::ZERO)
        );
        let b = advise(&c, Transient, 0, None, false, 0.5);
        assert_eq!((b.retry, b.reason), (false, RetryReason::BudgetExhausted));
    }

    #[test]
    fn the_provider_hint_wins_when_longer() {
        let c = RetryConfig::default();
        let adv = advise(&c, RateLimited, 0, Some(secs(30)), true, 0.99);
        assert_eq!(adv.delay, secs(30));
        // Backoff after attempt 1: uniform(0, 2 s) at 0.5 = 1 s, longer than the 1 ms hint.
        let adv = advise(
            &c,
            RateLimited,
            1,
            Some(Duration::from_millis(1)),
            true,
            0.5,
        );
        assert_eq!(adv.delay, secs(1));
    }

    #[test]
    fn full_jitter_stays_within_the_cap_and_spreads() {
        let c = RetryConfig::default();
        for attempt in 0..10 {
            let cap = c.ceiling(attempt);
            assert_eq!(cap, secs(1u64 << attempt.min(6)).min(secs(60)));
            let samples: Vec<Duration> = (0..200)
                .map(|i| {
                    c.backoff(
                        attempt,
                        super::super::breaker::unit_f64(super::super::breaker::mix64(i)),
                    )
                })
                .collect();
            assert!(samples.iter().all(|d| *d <= cap), "attempt {attempt}");
            let distinct: std::collections::HashSet<_> = samples.iter().collect();
            assert!(distinct.len() > 150, "spread: {}", distinct.len());
            let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / 200.0;
            let half = cap.as_secs_f64() / 2.0;
            assert!((mean - half).abs() < half * 0.2, "mean {mean} vs {half}");
        }
        assert_eq!(c.backoff(3, 0.0), Duration::ZERO);
    }

    #[test]
    fn equal_and_decorrelated_jitter_bounds() {
        let eq = RetryConfig {
            jitter: Jitter::Equal,
            ..RetryConfig::default()
        };
        assert_eq!(eq.backoff(2, 0.0), secs(2));
        assert_eq!(eq.backoff(2, 1.0), secs(4));
        let de = RetryConfig {
            jitter: Jitter::Decorrelated,
            ..RetryConfig::default()
        };
        assert_eq!(de.backoff(0, 0.0), secs(1));
        assert_eq!(de.backoff(0, 1.0), secs(3));
        assert_eq!(de.backoff(3, 1.0), secs(12)); // prev ceiling 4 s × 3
        assert_eq!(de.backoff(20, 1.0), secs(60));
    }

    #[test]
    fn retry_budget_exhausts_and_recovers() {
        let c = RetryConfig {
            budget_ratio: 0.2,
            budget_window: secs(10),
            min_retries_per_second: 0.5, // floor of 5 per window
            ..RetryConfig::default()
        };
        let t0 = Time::from_secs(1_000_000);
        let mut b = RetryBudget::new(c.budget_window);
        for _ in 0..100 {
            b.record_first(t0);
        }
        // 20% of 100 plus the floor of 5: 25 retries, then no more.
        let granted = (0..40).filter(|_| b.try_retry(t0, &c)).count();
        assert_eq!(granted, 25);
        assert!(!b.allows(t0, &c));
        // Ten seconds on, the window has rolled past them.
        let later = t0 + secs(10);
        assert!(b.allows(later, &c));
        assert_eq!((0..40).filter(|_| b.try_retry(later, &c)).count(), 5);
    }
}
