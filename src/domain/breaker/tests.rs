//! Every breaker transition, driven by an explicit clock (no sleeps).

use super::*;
use proptest::prelude::*;

const T0: Time = Time::from_secs(1_000_000);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn cfg() -> BreakerConfig {
    BreakerConfig {
        jitter: 0.0,
        ..BreakerConfig::default()
    }
}

fn fail() -> Effect {
    Effect::Failure(Trigger::Outcome(OutcomeClass::Transient))
}

/// Drives a closed breaker open with `failure_threshold` failures at `now`.
fn trip(b: &mut Breaker, c: &BreakerConfig, now: Time) -> Vec<BreakerEvent> {
    let mut ev = Vec::new();
    for _ in 0..c.failure_threshold {
        let p = b.admit(now, c, &mut ev).expect("closed admits");
        b.record(now, c, Some(p), fail(), &mut ev);
    }
    ev
}

fn transitions(ev: &[BreakerEvent]) -> Vec<Transition> {
    ev.iter()
        .filter_map(|e| match e {
            BreakerEvent::Transition(t) => Some(*t),
            _ => None,
        })
        .collect()
}

#[test]
fn trips_on_consecutive_failures_at_threshold() {
    let c = cfg();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    for i in 0..4 {
        b.record(T0, &c, None, fail(), &mut ev);
        assert_eq!(b.state(), BreakerState::Closed, "after {} failures", i + 1);
    }
    assert_eq!(b.consecutive_failures(), 4);
    b.record(T0, &c, None, fail(), &mut ev);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.open_until(), Some(T0 + secs(60)));
    let t = transitions(&ev);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].from, BreakerState::Closed);
    assert_eq!(t[0].to, BreakerState::Open);
    assert_eq!(
        t[0].cause,
        Cause::ConsecutiveFailures {
            count: 5,
            trigger: Trigger::Outcome(OutcomeClass::Transient)
        }
    );
}

#[test]
fn a_success_resets_the_consecutive_count() {
    let c = cfg();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    for _ in 0..4 {
        b.record(T0, &c, None, fail(), &mut ev);
    }
    b.record(T0, &c, None, Effect::Success, &mut ev);
    for _ in 0..4 {
        b.record(T0, &c, None, fail(), &mut ev);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    assert!(ev.is_empty());
}

#[test]
fn trips_on_failure_rate_only_after_minimum_calls() {
    let c = BreakerConfig {
        failure_threshold: 1000,
        rate_rule: Some(RateRule {
            threshold: 0.5,
            minimum_calls: 10,
        }),
        window: secs(10),
        ..cfg()
    };
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    // Alternate failure/success: 50% failures, but only 9 calls.
    for i in 0..9 {
        let e = if i % 2 == 0 { fail() } else { Effect::Success };
        b.record(T0, &c, None, e, &mut ev);
    }
    assert_eq!(b.window_totals(T0), (9, 5));
    assert_eq!(b.state(), BreakerState::Closed, "below minimum_calls");
    // 10th call, a success: 5/10 = 50% but the rule only trips on a failure.
    b.record(T0, &c, None, Effect::Success, &mut ev);
    assert_eq!(b.state(), BreakerState::Closed);
    // 11th call, a failure: 6/11 >= 50%.
    b.record(T0, &c, None, fail(), &mut ev);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(
        transitions(&ev)[0].cause,
        Cause::FailureRate {
            failures: 6,
            calls: 11
        }
    );
}

#[test]
fn failure_rate_window_forgets_old_calls() {
    let c = BreakerConfig {
        failure_threshold: 1000,
        rate_rule: Some(RateRule {
            threshold: 0.5,
            minimum_calls: 4,
        }),
        window: secs(10),
        ..cfg()
    };
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    for _ in 0..3 {
        b.record(T0, &c, None, fail(), &mut ev);
    }
    // Ten seconds later the three failures have aged out: one more is 1/1 but below minimum.
    let later = T0 + secs(10);
    b.record(later, &c, None, fail(), &mut ev);
    assert_eq!(b.window_totals(later), (1, 1));
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn slow_successes_count_as_failures_when_enabled() {
    let c = BreakerConfig {
        failure_threshold: 2,
        slow_call_duration: Some(Duration::from_millis(500)),
        ..cfg()
    };
    let fast = c.effect(
        OutcomeClass::Success,
        Some(Duration::from_millis(499)),
        false,
    );
    let slow = c.effect(
        OutcomeClass::Success,
        Some(Duration::from_millis(501)),
        false,
    );
    assert_eq!(fast, Effect::Success);
    assert_eq!(slow, Effect::Failure(Trigger::SlowCall));
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    b.record(T0, &c, None, slow, &mut ev);
    b.record(T0, &c, None, slow, &mut ev);
    assert_eq!(b.state(), BreakerState::Open);
    // Off by default.
    assert_eq!(
        cfg().effect(OutcomeClass::Success, Some(secs(3600)), false),
        Effect::Success
    );
}

#[test]
fn open_becomes_half_open_exactly_when_the_period_ends() {
    let c = cfg();
    let mut b = Breaker::new(7);
    trip(&mut b, &c, T0);
    let mut ev = Vec::new();
    let just_before = T0 + secs(60) - Duration::from_nanos(1);
    assert_eq!(
        b.check(just_before, &c, &mut ev),
        Err((Refusal::CircuitOpen, Some(Duration::from_nanos(1))))
    );
    assert_eq!(
        b.check(T0 + secs(30), &c, &mut ev),
        Err((Refusal::CircuitOpen, Some(secs(30))))
    );
    assert!(ev.is_empty());
    assert_eq!(b.check(T0 + secs(60), &c, &mut ev), Ok(Ticket::Probe));
    assert_eq!(b.state(), BreakerState::HalfOpen);
    let t = transitions(&ev);
    assert_eq!(
        (t[0].from, t[0].to, t[0].cause),
        (
            BreakerState::Open,
            BreakerState::HalfOpen,
            Cause::OpenElapsed
        )
    );
}

#[test]
fn half_open_admits_at_most_the_probe_limit() {
    let c = BreakerConfig {
        half_open_max_probes: 2,
        ..cfg()
    };
    let mut b = Breaker::new(7);
    trip(&mut b, &c, T0);
    let now = T0 + secs(60);
    let mut ev = Vec::new();
    let p1 = b.admit(now, &c, &mut ev).expect("probe 1");
    let p2 = b.admit(now, &c, &mut ev).expect("probe 2");
    assert_ne!(p1.probe, p2.probe);
    assert!(p1.probe.is_some() && p2.probe.is_some());
    let refused = b.admit(now, &c, &mut ev);
    assert_eq!(refused, Err((Refusal::ProbeLimit, Some(secs(1)))));
    assert_eq!(b.probes().len(), 2);
}

#[test]
fn expired_probe_lease_is_reclaimed_and_its_late_outcome_ignored() {
    let c = cfg();
    let mut b = Breaker::new(7);
    trip(&mut b, &c, T0);
    let t1 = T0 + secs(60);
    let mut ev = Vec::new();
    let lost = b.admit(t1, &c, &mut ev).expect("probe");
    assert!(b.admit(t1 + secs(29), &c, &mut ev).is_err());
    ev.clear();
    // The lease (30 s) runs out: the slot is reclaimed for another agent.
    let t2 = t1 + secs(30);
    let fresh = b.admit(t2, &c, &mut ev).expect("reclaimed slot");
    assert_eq!(
        ev,
        vec![BreakerEvent::ProbeExpired {
            probe: lost.probe.expect("probe id")
        }]
    );
    // The crashed agent's late failure must not re-open the breaker.
    let stale = b.record(t2, &c, Some(lost), fail(), &mut ev);
    assert!(stale);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(b.probes().len(), 1);
    // The live probe still counts.
    assert!(!b.record(t2, &c, Some(fresh), Effect::Success, &mut ev));
    assert_eq!(b.half_open_successes(), 1);
}

#[test]
fn outcomes_from_an_older_generation_are_ignored() {
    let c = cfg();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    // Permits handed out while closed, before the break.
    let old: Vec<_> = (0..3)
        .map(|_| b.admit(T0, &c, &mut ev).expect("closed"))
        .collect();
    trip(&mut b, &c, T0);
    let t1 = T0 + secs(60);
    let probe = b.admit(t1, &c, &mut ev).expect("probe");
    let gen_before = b.generation();
    // Late results from before the break arrive during half-open: all stale.
    for p in &old {
        assert!(b.record(t1, &c, Some(*p), fail(), &mut ev));
        assert!(b.record(t1, &c, Some(*p), Effect::Success, &mut ev));
    }
    // An outcome without a permit cannot be a probe.
    assert!(b.record(t1, &c, None, Effect::Success, &mut ev));
    assert_eq!(b.generation(), gen_before);
    assert_eq!(b.half_open_successes(), 0);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(b.probes().len(), 1);
    // ...and after a close, pre-close permits are stale too.
    assert!(!b.record(t1, &c, Some(probe), Effect::Success, &mut ev));
    let p2 = b.admit(t1, &c, &mut ev).expect("second probe");
    b.record(t1, &c, Some(p2), Effect::Success, &mut ev);
    assert_eq!(b.state(), BreakerState::Closed);
    for _ in 0..10 {
        assert!(b.record(t1, &c, Some(old[0]), fail(), &mut ev));
    }
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.consecutive_failures(), 0);
}

#[test]
fn success_threshold_probe_successes_close() {
    let c = BreakerConfig {
        success_threshold: 3,
        ..cfg()
    };
    let mut b = Breaker::new(7);
    trip(&mut b, &c, T0);
    let now = T0 + secs(60);
    let mut ev = Vec::new();
    for i in 1..=3 {
        let p = b.admit(now, &c, &mut ev).expect("probe");
        b.record(now, &c, Some(p), Effect::Success, &mut ev);
        if i < 3 {
            assert_eq!(b.state(), BreakerState::HalfOpen);
            assert_eq!(b.half_open_successes(), i);
        }
    }
    assert_eq!(b.state(), BreakerState::Closed);
    let t = transitions(&ev);
    let last = t.last().expect("close transition");
    assert_eq!(
        (last.from, last.to, last.cause),
        (
            BreakerState::HalfOpen,
            BreakerState::Closed,
            Cause::ProbesSucceeded { count: 3 }
        )
    );
}

#[test]
fn a_probe_failure_reopens_with_backoff_capped_and_reset_after_close() {
    let c = BreakerConfig {
        max_open_duration: secs(200),
        ..cfg()
    };
    let mut b = Breaker::new(7);
    trip(&mut b, &c, T0);
    assert_eq!(b.open_until(), Some(T0 + secs(60)));
    let mut now = T0 + secs(60);
    let mut ev = Vec::new();
    // Each failed probe doubles the open period: 120 s, then 200 s (capped), then 200 s.
    for expected in [120, 200, 200] {
        let p = b.admit(now, &c, &mut ev).expect("probe");
        b.record(now, &c, Some(p), fail(), &mut ev);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.open_until(), Some(now + secs(expected)));
        now = now + secs(expected);
    }
    assert_eq!(b.reopen_count(), 3);
    // Two probe successes close it and reset the backoff.
    for _ in 0..2 {
        let p = b.admit(now, &c, &mut ev).expect("probe");
        b.record(now, &c, Some(p), Effect::Success, &mut ev);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.reopen_count(), 0);
    trip(&mut b, &c, now);
    assert_eq!(b.open_until(), Some(now + secs(60)));
}

#[test]
fn backoff_jitter_stretches_reopens_within_bounds() {
    let c = BreakerConfig {
        jitter: 0.1,
        ..BreakerConfig::default()
    };
    assert_eq!(c.open_period(0, 0.99), secs(60), "first open is exact");
    assert_eq!(c.open_period(1, 0.0), secs(120));
    assert_eq!(c.open_period(1, 0.5), secs(126));
    let mut seen = std::collections::HashSet::new();
    for seed in 0..50u64 {
        let d = c.open_period(1, unit_f64(mix64(seed)));
        assert!(d >= secs(120) && d < secs(132), "{d:?}");
        seen.insert(d);
    }
    assert!(seen.len() > 40, "jitter spreads: {} distinct", seen.len());
    // Never beyond the cap, even with jitter.
    assert_eq!(c.open_period(30, 0.99), c.max_open_duration);
}

#[test]
fn persistent_opens_at_once_for_its_own_duration() {
    let c = cfg();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    let e = c.effect(OutcomeClass::Persistent, None, false);
    assert_eq!(e, Effect::OpenFor(secs(600), OutcomeClass::Persistent));
    b.record(T0, &c, None, e, &mut ev);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.open_until(), Some(T0 + secs(600)));
    assert!(b.snapshot().persistent_open);
    // Reset (the operator fixed the key) clears it.
    b.reset(&mut ev);
    assert_eq!(b.state(), BreakerState::Closed);
    assert!(b.admit(T0, &c, &mut ev).is_ok());
}

#[test]
fn persistent_while_open_extends_the_open_period() {
    let c = cfg();
    let mut b = Breaker::new(7);
    trip(&mut b, &c, T0);
    let mut ev = Vec::new();
    let e = c.effect(OutcomeClass::Persistent, None, false);
    assert!(!b.record(T0 + secs(1), &c, None, e, &mut ev));
    assert_eq!(b.open_until(), Some(T0 + secs(601)));
    assert_eq!(
        ev,
        vec![BreakerEvent::OpenExtended {
            until: T0 + secs(601)
        }]
    );
    // A transient failure while open is stale: no news.
    assert!(b.record(T0 + secs(2), &c, None, fail(), &mut ev));
}

#[test]
fn rate_limited_with_a_hint_is_left_to_the_budget() {
    let c = cfg();
    assert_eq!(
        c.effect(OutcomeClass::RateLimited, None, true),
        Effect::Ignore
    );
    assert_eq!(
        c.effect(OutcomeClass::RateLimited, None, false),
        Effect::Failure(Trigger::Outcome(OutcomeClass::RateLimited))
    );
    assert_eq!(
        c.effect(OutcomeClass::BadInput, None, false),
        Effect::Ignore
    );
    assert_eq!(
        c.effect(OutcomeClass::Partial, None, false),
        Effect::Success
    );
    assert_eq!(
        c.effect(OutcomeClass::Timeout, None, false),
        Effect::Failure(Trigger::Outcome(OutcomeClass::Timeout))
    );
}

#[test]
fn treatments_can_be_overridden() {
    let mut c = cfg();
    assert!(c.treatments.set(OutcomeClass::BadInput, Treatment::Failure));
    assert!(!c.treatments.set(OutcomeClass::Success, Treatment::Failure));
    assert_eq!(
        c.effect(OutcomeClass::BadInput, None, false),
        Effect::Failure(Trigger::Outcome(OutcomeClass::BadInput))
    );
}

#[test]
fn bad_input_on_a_probe_frees_the_slot_without_counting() {
    let c = cfg();
    let mut b = Breaker::new(7);
    trip(&mut b, &c, T0);
    let now = T0 + secs(60);
    let mut ev = Vec::new();
    let p = b.admit(now, &c, &mut ev).expect("probe");
    assert!(b.admit(now, &c, &mut ev).is_err());
    b.record(now, &c, Some(p), Effect::Ignore, &mut ev);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    assert_eq!(b.half_open_successes(), 0);
    assert!(b.admit(now, &c, &mut ev).is_ok(), "slot was released");
}

#[test]
fn forced_states_override_and_return_to_a_fresh_closed_breaker() {
    let c = cfg();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    b.set_mode(Mode::ForcedOpen, &mut ev);
    assert_eq!(b.state(), BreakerState::ForcedOpen);
    assert_eq!(b.admit(T0, &c, &mut ev), Err((Refusal::ForcedOpen, None)));
    // Outcomes do not move a forced-open breaker.
    b.record(T0, &c, None, Effect::Success, &mut ev);
    assert_eq!(b.state(), BreakerState::ForcedOpen);

    b.set_mode(Mode::ForcedClosed, &mut ev);
    for _ in 0..20 {
        let p = b.admit(T0, &c, &mut ev).expect("forced closed admits");
        assert!(!b.record(T0, &c, Some(p), fail(), &mut ev));
    }
    assert_eq!(b.state(), BreakerState::ForcedClosed);
    assert_eq!(b.consecutive_failures(), 20, "still counting");

    b.set_mode(Mode::Automatic, &mut ev);
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.consecutive_failures(), 0);
    let t = transitions(&ev);
    let pairs: Vec<_> = t.iter().map(|t| (t.from, t.to)).collect();
    assert_eq!(
        pairs,
        vec![
            (BreakerState::Closed, BreakerState::ForcedOpen),
            (BreakerState::ForcedOpen, BreakerState::ForcedClosed),
            (BreakerState::ForcedClosed, BreakerState::Closed),
        ]
    );
    // Setting the same mode again is not a transition.
    b.set_mode(Mode::Automatic, &mut ev);
    assert_eq!(transitions(&ev).len(), 3);
}

#[test]
fn forcing_open_a_half_open_breaker_drops_its_probes() {
    let c = cfg();
    let mut b = Breaker::new(7);
    trip(&mut b, &c, T0);
    let now = T0 + secs(60);
    let mut ev = Vec::new();
    let p = b.admit(now, &c, &mut ev).expect("probe");
    b.set_mode(Mode::ForcedOpen, &mut ev);
    assert!(b.probes().is_empty());
    b.set_mode(Mode::Automatic, &mut ev);
    // The old probe's outcome belongs to a past generation.
    assert!(b.record(now, &c, Some(p), fail(), &mut ev));
    assert_eq!(b.state(), BreakerState::Closed);
}

#[test]
fn snapshot_restore_keeps_an_outage() {
    let c = cfg();
    let mut b = Breaker::new(7);
    trip(&mut b, &c, T0);
    let snap = b.snapshot();
    let mut r = Breaker::restore(&snap, 7);
    let mut ev = Vec::new();
    assert_eq!(r.state(), BreakerState::Open);
    assert_eq!(r.open_until(), Some(T0 + secs(60)));
    assert!(r.generation() > b.generation());
    assert_eq!(
        r.admit(T0 + secs(10), &c, &mut ev),
        Err((Refusal::CircuitOpen, Some(secs(50))))
    );
    // Expired while down: comes back half-open on the first look.
    let mut r = Breaker::restore(&snap, 7);
    assert!(r.admit(T0 + secs(61), &c, &mut ev).is_ok());
    assert_eq!(r.state(), BreakerState::HalfOpen);
    // Forced states survive.
    b.set_mode(Mode::ForcedOpen, &mut ev);
    assert_eq!(
        Breaker::restore(&b.snapshot(), 7).state(),
        BreakerState::ForcedOpen
    );
}

// ---- property tests: invariants under random interleavings ----

#[derive(Clone, Debug)]
enum Op {
    Admit,
    /// Report an outcome for the n-th outstanding permit (or none).
    Record(Option<usize>, u8),
    Advance(u64),
    Force(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Admit),
        4 => (proptest::option::of(0usize..8), 0u8..7).prop_map(|(i, c)| Op::Record(i, c)),
        2 => (0u64..90_000).prop_map(Op::Advance),
        1 => (0u8..6).prop_map(Op::Force),
    ]
}

fn class_of(n: u8) -> OutcomeClass {
    OutcomeClass::ALL[n as usize % OutcomeClass::ALL.len()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn invariants_hold_under_random_interleavings(
        ops in proptest::collection::vec(op(), 1..200),
        max_probes in 1u32..4,
        threshold in 1u32..6,
        success_threshold in 1u32..4,
    ) {
        let c = BreakerConfig {
            half_open_max_probes: max_probes,
            failure_threshold: threshold,
            success_threshold,
            ..BreakerConfig::default()
        };
        let mut b = Breaker::new(42);
        let mut now = T0;
        let mut permits: Vec<PermitRef> = Vec::new();
        let mut ev = Vec::new();
        for op in ops {
            ev.clear();
            let consecutive_before = b.consecutive_failures();
            match op {
                Op::Admit => {
                    if let Ok(p) = b.admit(now, &c, &mut ev) {
                        permits.push(p);
                    }
                }
                Op::Record(i, class) => {
                    let class = class_of(class);
                    let permit = i.and_then(|i| permits.get(i % permits.len().max(1)).copied());
                    let effect = c.effect(class, None, false);
                    b.tick(now, &c, &mut ev);
                    let before = (b.state(), b.generation(), b.open_until(), b.consecutive_failures());
                    let consecutive_before = b.consecutive_failures();
                    let state_before = b.state();
                    b.record(now, &c, permit, effect, &mut ev);
                    if class == OutcomeClass::BadInput {
                        let after = (b.state(), b.generation(), b.open_until(), b.consecutive_failures());
                        prop_assert_eq!(before, after, "BAD_INPUT changed the breaker");
                    }
                    for t in transitions(&ev) {
                        if let Cause::ConsecutiveFailures { count, .. } = t.cause {
                            prop_assert_eq!(state_before, BreakerState::Closed);
                            prop_assert!(count >= threshold);
                            prop_assert_eq!(consecutive_before + 1, count);
                        }
                    }
                }
                Op::Advance(ms) => {
                    now = now + Duration::from_millis(ms);
                    b.tick(now, &c, &mut ev);
                }
                Op::Force(m) => {
                    let mode = match m { 0 => Mode::ForcedOpen, 1 => Mode::ForcedClosed, _ => Mode::Automatic };
                    b.set_mode(mode, &mut ev);
                }
            }
            prop_assert!(b.probes().len() as u32 <= max_probes, "{} probes outstanding", b.probes().len());
            if b.state() == BreakerState::Closed {
                prop_assert!(b.consecutive_failures() < threshold);
            }
            let _ = consecutive_before;
        }
    }
}

// --- Quorum tripping (`min_distinct_callers`) ---

/// failure_threshold 5, three distinct callers needed, 60 s window.
fn quorum() -> BreakerConfig {
    BreakerConfig {
        failure_threshold: 5,
        min_distinct_callers: 3,
        ..cfg()
    }
}

fn suppressed(ev: &[BreakerEvent]) -> Vec<(Cause, u32, u32)> {
    ev.iter()
        .filter_map(|e| match e {
            BreakerEvent::TripSuppressed {
                cause,
                callers,
                needed,
            } => Some((*cause, *callers, *needed)),
            _ => None,
        })
        .collect()
}

#[test]
fn one_caller_cannot_open_a_quorum_breaker() {
    let c = quorum();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    for _ in 0..50 {
        b.record_from(T0, &c, None, fail(), 0xa, &mut ev);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    assert!(transitions(&ev).is_empty());
    assert_eq!(b.consecutive_failures(), 50, "the streak is still counted");
    assert_eq!(b.distinct_failing_callers(T0, &c), 1);
    // Every failure from the 5th on would have tripped it, and says why not.
    let s = suppressed(&ev);
    assert_eq!(s.len(), 46);
    assert_eq!(
        s[0],
        (
            Cause::ConsecutiveFailures {
                count: 5,
                trigger: Trigger::Outcome(OutcomeClass::Transient)
            },
            1,
            3
        )
    );
    // And the breaker still admits.
    assert!(b.admit(T0, &c, &mut ev).is_ok());
}

#[test]
fn failures_from_enough_callers_open_it() {
    let c = quorum();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    for caller in [1, 2, 3, 1, 2] {
        b.record_from(T0, &c, None, fail(), caller, &mut ev);
    }
    assert_eq!(b.state(), BreakerState::Open);
    assert!(suppressed(&ev).is_empty());
    let t = transitions(&ev);
    assert_eq!(t.len(), 1);
    assert_eq!(
        t[0].cause,
        Cause::ConsecutiveFailures {
            count: 5,
            trigger: Trigger::Outcome(OutcomeClass::Transient)
        }
    );
    assert_eq!(b.open_until(), Some(T0 + secs(60)));
    // The callers counted towards this open are forgotten with the streak.
    assert_eq!(b.distinct_failing_callers(T0, &c), 0);
    assert!(b.failure_callers().is_none());
}

#[test]
fn a_long_streak_from_one_caller_opens_once_others_agree() {
    let c = quorum();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    for _ in 0..50 {
        b.record_from(T0, &c, None, fail(), 1, &mut ev);
    }
    b.record_from(T0 + secs(1), &c, None, fail(), 2, &mut ev);
    assert_eq!(b.state(), BreakerState::Closed, "two of three");
    b.record_from(T0 + secs(2), &c, None, fail(), 3, &mut ev);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(
        transitions(&ev)[0].cause,
        Cause::ConsecutiveFailures {
            count: 52,
            trigger: Trigger::Outcome(OutcomeClass::Transient)
        }
    );
}

#[test]
fn callers_whose_failures_left_the_window_do_not_count() {
    let c = BreakerConfig {
        window: secs(30),
        ..quorum()
    };
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    b.record_from(T0, &c, None, fail(), 1, &mut ev);
    b.record_from(T0 + secs(10), &c, None, fail(), 2, &mut ev);
    // 30 s after caller 1's failure it no longer counts: 2 of 3 at most.
    let late = T0 + secs(30);
    for _ in 0..5 {
        b.record_from(late, &c, None, fail(), 3, &mut ev);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.distinct_failing_callers(late, &c), 2);
    assert_eq!(suppressed(&ev).last().map(|s| s.1), Some(2));
    // Caller 1 failing again (within the window of 2 and 3) completes it.
    b.record_from(late + secs(5), &c, None, fail(), 1, &mut ev);
    assert_eq!(b.state(), BreakerState::Open);
}

#[test]
fn the_rate_rule_waits_for_a_quorum_too() {
    let c = BreakerConfig {
        failure_threshold: 1000,
        rate_rule: Some(RateRule {
            threshold: 0.5,
            minimum_calls: 10,
        }),
        window: secs(10),
        min_distinct_callers: 2,
        ..cfg()
    };
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    // Caller 1 fails everything; successes (from anyone) keep the streak short.
    for i in 0..20 {
        let e = if i % 3 == 2 { Effect::Success } else { fail() };
        b.record_from(T0, &c, None, e, 1, &mut ev);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    let s = suppressed(&ev);
    assert!(
        matches!(s.last(), Some((Cause::FailureRate { .. }, 1, 2))),
        "{s:?}"
    );
    b.record_from(T0, &c, None, fail(), 2, &mut ev);
    assert_eq!(b.state(), BreakerState::Open);
    assert!(matches!(
        transitions(&ev)[0].cause,
        Cause::FailureRate { .. }
    ));
}

#[test]
fn a_persistent_failure_from_one_caller_still_opens_at_once() {
    let c = quorum();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    let effect = c.effect(OutcomeClass::Persistent, None, false);
    b.record_from(T0, &c, None, effect, 1, &mut ev);
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(
        transitions(&ev)[0].cause,
        Cause::Persistent {
            class: OutcomeClass::Persistent
        }
    );
}

#[test]
fn a_failed_probe_reopens_without_a_quorum() {
    let c = quorum();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    for caller in 1..=5 {
        b.record_from(T0, &c, None, fail(), caller, &mut ev);
    }
    assert_eq!(b.state(), BreakerState::Open);
    let later = T0 + secs(61);
    let probe = b
        .admit(later, &c, &mut ev)
        .expect("half-open admits a probe");
    assert_eq!(b.state(), BreakerState::HalfOpen);
    b.record_from(later, &c, Some(probe), fail(), 1, &mut ev);
    assert_eq!(b.state(), BreakerState::Open);
    assert!(matches!(
        transitions(&ev).last().map(|t| t.cause),
        Some(Cause::ProbeFailed { .. })
    ));
}

#[test]
fn anonymous_reports_are_one_caller() {
    let c = quorum();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    for _ in 0..20 {
        b.record(T0, &c, None, fail(), &mut ev);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    assert_eq!(b.distinct_failing_callers(T0, &c), 1);
}

#[test]
fn the_caller_set_stays_bounded() {
    let c = quorum();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    // Interleave successes so nothing opens while many callers fail.
    for caller in 0..100u64 {
        b.record_from(T0 + secs(caller / 10), &c, None, fail(), caller, &mut ev);
        b.record_from(T0, &c, None, Effect::Success, caller, &mut ev);
    }
    assert_eq!(b.state(), BreakerState::Closed);
    let kept = b.failure_callers().map_or(0, |s| s.entries().len());
    assert_eq!(kept, 6, "2 × min_distinct_callers");
}

#[test]
fn a_quorum_breaker_that_stays_healthy_allocates_nothing() {
    let c = quorum();
    let mut b = Breaker::new(7);
    let mut ev = Vec::new();
    for caller in 0..10 {
        b.record_from(T0, &c, None, Effect::Success, caller, &mut ev);
    }
    assert!(b.failure_callers().is_none());
    // Nor does a breaker without quorum, however it fails.
    let plain = cfg();
    for caller in 0..3 {
        b.record_from(T0, &plain, None, fail(), caller, &mut ev);
    }
    assert!(b.failure_callers().is_none());
}

proptest! {
    /// With the default `min_distinct_callers = 1`, naming callers changes
    /// nothing: the same outcomes drive a breaker through exactly the same
    /// states and events whoever reports them.
    #[test]
    fn without_quorum_callers_change_nothing(
        ops in proptest::collection::vec((0u8..4, 0u64..5, 0u64..20_000), 1..200),
    ) {
        let c = BreakerConfig {
            rate_rule: Some(RateRule { threshold: 0.5, minimum_calls: 4 }),
            ..cfg()
        };
        assert_eq!(c.min_distinct_callers, 1);
        let (mut a, mut b) = (Breaker::new(7), Breaker::new(7));
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        let mut now = T0;
        for (kind, caller, ms) in ops {
            now = now + Duration::from_millis(ms);
            let effect = match kind {
                0 => Effect::Success,
                1 | 2 => fail(),
                _ => c.effect(OutcomeClass::Persistent, None, false),
            };
            let pa = a.admit(now, &c, &mut ea).ok();
            let pb = b.admit(now, &c, &mut eb).ok();
            a.record(now, &c, pa, effect, &mut ea);
            b.record_from(now, &c, pb, effect, caller, &mut eb);
            prop_assert_eq!(a.parts(), b.parts());
        }
        prop_assert_eq!(ea, eb);
    }
}

#[test]
fn an_open_period_learnt_from_elsewhere_opens_or_extends_but_never_shortens() {
    let c = cfg();
    let mut ev = Vec::new();
    // Closed: opens until then, in a new generation, refusing meanwhile.
    let mut b = Breaker::new(7);
    let g = b.generation();
    assert!(b.learn_open(T0, T0 + secs(30)));
    assert_eq!(b.state(), BreakerState::Open);
    assert_eq!(b.open_until(), Some(T0 + secs(30)));
    assert_eq!(b.generation(), g + 1);
    assert!(b.admit(T0 + secs(29), &c, &mut ev).is_err());
    // A shorter or equal period changes nothing; a longer one extends.
    assert!(!b.learn_open(T0, T0 + secs(10)));
    assert!(!b.learn_open(T0, T0 + secs(30)));
    assert_eq!(b.open_until(), Some(T0 + secs(30)));
    assert!(b.learn_open(T0 + secs(1), T0 + secs(45)));
    assert_eq!(b.open_until(), Some(T0 + secs(45)));
    assert_eq!(b.generation(), g + 1, "extending is the same open period");
    // Half-open after it: probes then as usual.
    b.tick(T0 + secs(45), &c, &mut ev);
    assert_eq!(b.state(), BreakerState::HalfOpen);
    // A period already over, and a forced mode, are left alone.
    let mut b = Breaker::new(7);
    assert!(!b.learn_open(T0 + secs(5), T0 + secs(5)));
    assert_eq!(b.state(), BreakerState::Closed);
    b.set_mode(Mode::ForcedClosed, &mut ev);
    assert!(!b.learn_open(T0, T0 + secs(30)));
    assert_eq!(b.state(), BreakerState::ForcedClosed);
}
