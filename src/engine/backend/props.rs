//! Invariants every decision backend must keep, checked on random operation
//! sequences driven through the engine (and so through the backend trait):
//! admissions, outcomes of every class, operator overrides and resets, time
//! passing, permits reported in any order, duplicated and forged.
//!
//! * at most `half_open_max_probes` probes are outstanding at any time;
//! * admissions never exceed budget + burst (`N + N·t/window`, refilled by resets);
//! * a duplicate or forged permit changes nothing;
//! * an outcome whose permit is from an older breaker generation never moves
//!   the breaker (its state and generation stay).

use crate::config::Config;
use crate::domain::Time;
use crate::engine::clock::{Clock as _, ManualClock};
use crate::engine::{AdmitArgs, Engine, EngineError, OutcomeReport, TargetView};
use proptest::prelude::*;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// The embedded backend never waits when nothing is persisted: one poll.
pub(crate) fn now_or_never<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the ephemeral decision path awaited"),
    }
}

pub(crate) const CONFIG: &str = r#"
[targets.t]
requests_per_minute = 60
max_concurrency = 4
breaker = { failure_threshold = 2, half_open_max_probes = 2, open_duration = "3s", probe_lease = "5s", jitter = 0.0 }
[targets.k]
keys = ["a", "b"]
requests_per_minute = 30
breaker = { failure_threshold = 2, open_duration = "2s" }
"#;

const RPM: f64 = 60.0;

#[derive(Clone, Debug)]
pub(crate) enum Op {
    Admit {
        target: bool,
        attempt: u32,
    },
    /// Report the i-th permit handed out (or none) with an HTTP status.
    Record {
        permit: Option<usize>,
        status: u16,
    },
    /// Report a permit again.
    Duplicate(usize),
    /// Report a permit with one hex digit changed.
    Forge(usize),
    Advance(u64),
    Force(u8),
    Reset(bool),
}

pub(crate) fn op() -> impl Strategy<Value = Op> {
    let status = prop_oneof![
        Just(200u16),
        Just(529),
        Just(503),
        Just(429),
        Just(401),
        Just(400),
        Just(408)
    ];
    prop_oneof![
        6 => (any::<bool>(), 0u32..2).prop_map(|(target, attempt)| Op::Admit { target, attempt }),
        6 => (proptest::option::of(0usize..16), status).prop_map(|(permit, status)| Op::Record { permit, status }),
        2 => (0usize..16).prop_map(Op::Duplicate),
        1 => (0usize..16).prop_map(Op::Forge),
        3 => (1u64..2500).prop_map(Op::Advance),
        1 => (0u8..3).prop_map(Op::Force),
        1 => any::<bool>().prop_map(Op::Reset),
    ]
}

/// What must not change when a report changes nothing.
fn fingerprint(v: &TargetView) -> String {
    format!(
        "{:?} gen={} cf={} hos={} probes={} counters={:?} slots={:?} groups={:?} cause={:?}",
        v.state,
        v.generation,
        v.consecutive_failures,
        v.half_open_successes,
        v.probes_outstanding,
        v.counters,
        v.slots,
        v.groups,
        v.last_cause
    )
}

fn view(e: &Engine, t: &str) -> TargetView {
    now_or_never(e.get_target(t)).expect("view")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn backend_invariants_hold_on_random_sequences(ops in proptest::collection::vec(op(), 1..150)) {
        let config = Arc::new(Config::parse(CONFIG, "props").expect("config"));
        let t0 = Time::from_secs(1_800_000_000);
        let clock = Arc::new(ManualClock::new(t0));
        let e = Engine::new(config, clock.clone());
        // (target, token, generation at issue)
        let mut permits: Vec<(&str, String, u64)> = Vec::new();
        let mut admitted_t = 0u64;
        let mut resets_t = 0u64;
        for op in ops {
            match op {
                Op::Admit { target, attempt } => {
                    let name = if target { "t" } else { "k" };
                    let a = now_or_never(e.can_proceed(name, AdmitArgs { caller: "p", estimated_tokens: 0, attempt, ..Default::default() }))
                        .expect("admit");
                    if a.allowed {
                        if name == "t" {
                            admitted_t += 1;
                        }
                        let g = a.permit.map_or(0, |p| p.generation);
                        permits.push((name, a.token, g));
                    }
                }
                Op::Record { permit, status } => {
                    let (name, token, issued_gen) = match permit.and_then(|i| permits.get(i)) {
                        Some((n, t, g)) => (*n, t.clone(), Some(*g)),
                        None => ("t", String::new(), None),
                    };
                    let before = view(&e, name);
                    let r = now_or_never(e.record_outcome(name, OutcomeReport {
                        permit: &token,
                        http_status: i32::from(status),
                        ..Default::default()
                    })).expect("record");
                    let after = view(&e, name);
                    if let Some(g) = issued_gen
                        && g != before.generation
                        && !r.duplicate
                    {
                        // A stale permit: the breaker neither changes state nor generation.
                        prop_assert_eq!(before.state, after.state, "stale outcome moved the breaker");
                        prop_assert_eq!(before.generation, after.generation);
                    }
                    if r.duplicate {
                        prop_assert_eq!(fingerprint(&before), fingerprint(&after), "a duplicate changed state");
                    }
                }
                Op::Duplicate(i) => {
                    if let Some((name, token, _)) = permits.get(i).cloned() {
                        // Report once (may be the first report), then again: the second is a no-op.
                        let rep = || OutcomeReport { permit: &token, http_status: 503, ..Default::default() };
                        now_or_never(e.record_outcome(name, rep())).expect("first");
                        let before = view(&e, name);
                        let r = now_or_never(e.record_outcome(name, rep())).expect("again");
                        prop_assert!(r.duplicate);
                        prop_assert_eq!(fingerprint(&before), fingerprint(&view(&e, name)));
                    }
                }
                Op::Forge(i) => {
                    if let Some((name, token, _)) = permits.get(i).cloned() {
                        // Flip one hex digit of the id field.
                        let mut f: Vec<String> = token.split('.').map(str::to_string).collect();
                        let last = f[2].pop().unwrap_or('0');
                        f[2].push(if last == '1' { '2' } else { '1' });
                        let forged = f.join(".");
                        let before = view(&e, name);
                        let r = now_or_never(e.record_outcome(name, OutcomeReport {
                            permit: &forged,
                            http_status: 200,
                            ..Default::default()
                        }));
                        prop_assert!(matches!(r, Err(EngineError::InvalidArgument(_))), "{:?}", r);
                        prop_assert_eq!(fingerprint(&before), fingerprint(&view(&e, name)));
                    }
                }
                Op::Advance(ms) => clock.advance(Duration::from_millis(ms)),
                Op::Force(m) => {
                    let mode = [crate::domain::breaker::Mode::Automatic, crate::domain::breaker::Mode::ForcedOpen, crate::domain::breaker::Mode::ForcedClosed][usize::from(m)];
                    now_or_never(e.set_breaker_mode("t", mode, "props")).expect("force");
                }
                Op::Reset(target) => {
                    let name = if target { "t" } else { "k" };
                    now_or_never(e.reset_target(name)).expect("reset");
                    if target {
                        resets_t += 1;
                    }
                }
            }
            // Probes: never more outstanding than allowed, fleet-wide.
            prop_assert!(view(&e, "t").probes_outstanding <= 2);
            prop_assert!(view(&e, "k").probes_outstanding <= 1);
            // Budget: at most burst + rate·t (each reset refills one burst).
            let t = clock.now().since(t0).as_secs_f64();
            let bound = RPM * (1 + resets_t) as f64 + RPM * t / 60.0 + 1.0;
            prop_assert!(admitted_t as f64 <= bound, "admitted {} > {}", admitted_t, bound);
        }
    }
}
