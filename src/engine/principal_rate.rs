//! Per-principal decision rates: the control plane's own flood protection.
//!
//! Every agent of a fleet shares one Backstop, so one runaway agent (a retry
//! loop without a sleep, a bug that asks for every token) must not be able to
//! slow everyone else's decisions. A principal with a `decision_rate` gets a
//! GCRA bucket of its own: each decision (a unary call, a batch item, a
//! Decide item) takes one unit, and past the rate the call is refused with
//! RESOURCE_EXHAUSTED before it reaches a decision — cheaply, so refusing a
//! flood costs little more than one atomic.
//!
//! A bucket is one atomic (its theoretical arrival time), so charging takes
//! no lock. Buckets are found by principal name in a copy-on-write map: the
//! common path is a lock-free load and a hash lookup; the map changes only
//! when a principal is first seen or its rate changes (a config reload),
//! which starts its bucket full. Principals come from the config, so the map
//! is bounded by it.

use crate::config::{DecisionRate, Principal};
use crate::domain::time::Time;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// One principal's bucket.
#[derive(Debug)]
pub struct Limiter {
    rate: DecisionRate,
    /// Nanoseconds one decision is worth.
    interval: u64,
    /// How far ahead of now the arrival time may run (burst − 1 intervals).
    tolerance: u64,
    /// Theoretical arrival time, in nanoseconds since the epoch.
    tat: AtomicU64,
    principal: Arc<str>,
}

impl Limiter {
    pub fn new(principal: Arc<str>, rate: DecisionRate) -> Limiter {
        let interval = (1e9 / rate.per_second).clamp(1.0, u64::MAX as f64) as u64;
        Limiter {
            rate,
            interval,
            tolerance: interval.saturating_mul(rate.burst.saturating_sub(1)),
            tat: AtomicU64::new(0),
            principal,
        }
    }

    /// Takes `n` decisions at `now`, or says how long until they would fit.
    /// A refusal takes nothing.
    pub fn try_take(&self, now: Time, n: u64) -> Result<(), Duration> {
        let now = now.as_nanos();
        let cost = self.interval.saturating_mul(n.max(1));
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let new = tat.max(now).saturating_add(cost);
            // Allowed while the new arrival time is within one interval plus
            // the tolerance of now (GCRA): `burst` at once, then the rate.
            let limit = now
                .saturating_add(self.tolerance)
                .saturating_add(self.interval);
            if new > limit {
                return Err(Duration::from_nanos(new - limit));
            }
            match self
                .tat
                .compare_exchange_weak(tat, new, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    pub fn principal(&self) -> &str {
        &self.principal
    }

    pub fn rate(&self) -> DecisionRate {
        self.rate
    }
}

/// Buckets by principal name.
#[derive(Debug, Default)]
pub struct PrincipalRates {
    map: arc_swap::ArcSwap<HashMap<Arc<str>, Arc<Limiter>>>,
}

impl PrincipalRates {
    /// The bucket of `p` (None when it has no decision rate).
    pub fn limiter(&self, p: &Principal) -> Option<Arc<Limiter>> {
        let rate = p.decision_rate?;
        if let Some(l) = self.map.load().get(&p.name)
            && l.rate == rate
        {
            return Some(l.clone());
        }
        let fresh = Arc::new(Limiter::new(p.name.clone(), rate));
        let mut out = fresh.clone();
        self.map.rcu(|m| {
            let mut m = HashMap::clone(m);
            match m.get(&p.name) {
                // Another call created it meanwhile: share that one.
                Some(l) if l.rate == rate => out = l.clone(),
                _ => {
                    out = fresh.clone();
                    m.insert(p.name.clone(), fresh.clone());
                }
            }
            m
        });
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_second: f64, burst: u64) -> DecisionRate {
        DecisionRate { per_second, burst }
    }

    fn at(ms: u64) -> Time {
        Time::from_millis(1_000_000 + ms)
    }

    #[test]
    fn a_burst_then_the_rate() {
        let l = Limiter::new("bot".into(), rate(10.0, 5));
        for _ in 0..5 {
            assert!(l.try_take(at(0), 1).is_ok());
        }
        let wait = l.try_take(at(0), 1).expect_err("over the burst");
        assert_eq!(wait, Duration::from_millis(100));
        assert!(l.try_take(at(99), 1).is_err());
        assert!(l.try_take(at(100), 1).is_ok());
        assert!(l.try_take(at(100), 1).is_err());
        // A second later the bucket is full again: 5 at once, not 10.
        let mut ok = 0;
        for _ in 0..20 {
            ok += usize::from(l.try_take(at(1_200), 1).is_ok());
        }
        assert_eq!(ok, 5);
    }

    #[test]
    fn a_batch_takes_one_unit_per_item_and_a_refusal_takes_nothing() {
        let l = Limiter::new("bot".into(), rate(100.0, 100));
        assert!(l.try_take(at(0), 60).is_ok());
        assert!(l.try_take(at(0), 60).is_err(), "only 40 left");
        assert!(l.try_take(at(0), 40).is_ok(), "the refused 60 took nothing");
        assert!(l.try_take(at(0), 1).is_err());
    }

    #[test]
    fn absurd_rates_and_times_do_not_overflow() {
        let l = Limiter::new("x".into(), rate(1e9, u64::MAX));
        assert!(l.try_take(Time::MAX, u64::MAX).is_ok());
        let slow = Limiter::new("y".into(), rate(1e-9, 1));
        assert!(slow.try_take(at(0), 1).is_ok());
        assert!(slow.try_take(at(0), 1).is_err());
    }

    #[test]
    fn principals_get_their_own_bucket_and_a_new_rate_a_fresh_one() {
        let rates = PrincipalRates::default();
        let p = |name: &str, r: Option<DecisionRate>| Principal {
            name: name.into(),
            roles: 1,
            token_sha256: None,
            cert_identity: None,
            decision_rate: r,
            tenant: None,
        };
        assert!(rates.limiter(&p("free", None)).is_none());
        let a = rates.limiter(&p("a", Some(rate(1.0, 1)))).expect("a");
        let b = rates.limiter(&p("b", Some(rate(1.0, 1)))).expect("b");
        assert!(a.try_take(at(0), 1).is_ok());
        assert!(a.try_take(at(0), 1).is_err());
        assert!(b.try_take(at(0), 1).is_ok(), "b is not slowed by a");
        let again = rates.limiter(&p("a", Some(rate(1.0, 1)))).expect("a");
        assert!(Arc::ptr_eq(&a, &again), "the same bucket across calls");
        let raised = rates.limiter(&p("a", Some(rate(5.0, 5)))).expect("a");
        assert!(!Arc::ptr_eq(&a, &raised));
        assert!(raised.try_take(at(0), 5).is_ok());
    }
}
