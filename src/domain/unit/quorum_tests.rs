//! Quorum tripping (`min_distinct_callers`) through the unit's pure
//! functions: what a failing caller is told, what the target says, and that
//! the caller set travels in the record (Redis) and survives a restart.

use super::codec::{TargetRecord, decode, encode, restore};
use super::{Effects, OutcomeArgs, OutcomeResult, TargetState, Trust, UnitCx, name_hash, record};
use crate::config::Config;
use crate::domain::breaker::BreakerState;
use crate::domain::headers::Signals;
use crate::domain::retry::RetryReason;
use crate::domain::{OutcomeClass, Time};
use std::time::Duration;

const CONFIG: &str = r#"
[targets.t]
breaker = { failure_threshold = 5, min_distinct_callers = 3 }
"#;

const T0: Time = Time::from_secs(1_800_000_000);

fn report(
    cx: &UnitCx<'_>,
    st: &mut TargetState,
    now: Time,
    caller: &str,
    class: OutcomeClass,
    fx: &mut Effects,
) -> OutcomeResult {
    let args = OutcomeArgs {
        trust: Trust::None,
        trust_permitless: false,
        class,
        signals: Signals::default(),
        max_pause: Duration::from_secs(3600),
        http_status: 503,
        error_type: "",
        slot: 0,
        latency: None,
        retry_after: None,
        input_tokens: 0,
        output_tokens: 0,
        attempt: 0,
        caller,
    };
    record(cx, st, &mut [], now, &args, 0.5, fx)
}

#[test]
fn a_suppressed_trip_still_advises_backing_off_and_says_why() {
    let config = Config::parse(CONFIG, "t").expect("config");
    let settings = config.target("t").clone();
    assert_eq!(settings.breaker.min_distinct_callers, 3);
    let cx = UnitCx {
        settings: &settings,
        seed: name_hash("t"),
    };
    let mut st = TargetState::new(cx.seed, 0, 1);
    let mut fx = Effects::default();
    let mut last = None;
    for _ in 0..50 {
        last = Some(report(
            &cx,
            &mut st,
            T0,
            "a",
            OutcomeClass::Transient,
            &mut fx,
        ));
    }
    let r = last.expect("reported");
    assert_eq!(r.state, BreakerState::Closed);
    // The failing caller is told to back off exactly as before quorum.
    assert!(r.advice.retry);
    assert!(r.advice.delay > Duration::ZERO);
    assert_eq!(r.advice.reason, RetryReason::Retryable);
    assert_eq!(
        st.last_cause(),
        Some(
            "50 consecutive transient failures, but from 1 caller of the 3 needed \
             (min_distinct_callers); last: transient (http 503)"
        )
    );
    // Not a fleet event: nothing is published for a trip that did not happen.
    assert!(fx.events.is_empty(), "{:?}", fx.events);
    assert!(fx.state_dirty);

    // Two more callers, and it opens.
    let r = report(&cx, &mut st, T0, "b", OutcomeClass::Transient, &mut fx);
    assert_eq!(r.state, BreakerState::Closed);
    assert!(
        st.last_cause()
            .is_some_and(|c| c.contains("from 2 callers of the 3 needed"))
    );
    let r = report(&cx, &mut st, T0, "c", OutcomeClass::Transient, &mut fx);
    assert_eq!(r.state, BreakerState::Open);
    assert_eq!(r.advice.reason, RetryReason::CircuitOpen);
    assert_eq!(fx.events.len(), 1, "one transition");
}

#[test]
fn the_caller_set_travels_in_the_record_and_survives_a_restart() {
    use prost::Message as _;
    let config = Config::parse(CONFIG, "t").expect("config");
    let settings = config.target("t").clone();
    let cx = UnitCx {
        settings: &settings,
        seed: name_hash("t"),
    };
    let mut st = TargetState::new(cx.seed, 0, 1);
    let mut fx = Effects::default();
    for caller in ["a", "a", "a", "b", "a", "a"] {
        report(&cx, &mut st, T0, caller, OutcomeClass::Transient, &mut fx);
    }
    assert_eq!(st.breaker.state(), BreakerState::Closed);
    assert_eq!(
        st.breaker.distinct_failing_callers(T0, &settings.breaker),
        2
    );

    let bytes = encode(&cx, &st).encode_to_vec();
    let rec = TargetRecord::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(rec.failure_callers.len(), 2);

    // Another replica (Redis) and a restarted process both see both callers:
    // a third caller's failure opens the breaker for either.
    let decoded = decode(&cx, &rec, 1);
    assert_eq!(
        decoded.breaker.failure_callers(),
        st.breaker.failure_callers()
    );
    assert_eq!(encode(&cx, &decoded), encode(&cx, &st));
    let restored = restore(&cx, &rec, T0 + Duration::from_secs(1), 1);
    assert_eq!(
        restored.breaker.failure_callers(),
        st.breaker.failure_callers()
    );
    for mut copy in [decoded, restored] {
        let r = report(
            &cx,
            &mut copy,
            T0 + Duration::from_secs(2),
            "c",
            OutcomeClass::Transient,
            &mut fx,
        );
        assert_eq!(r.state, BreakerState::Open);
    }

    // A record from before quorum existed has no callers and decodes as before.
    let mut old = rec.clone();
    old.failure_callers.clear();
    assert!(decode(&cx, &old, 1).breaker.failure_callers().is_none());
}

#[test]
fn min_distinct_callers_is_validated() {
    for bad in ["0", "65", "-1"] {
        let src = format!("[defaults.breaker]\nmin_distinct_callers = {bad}\n");
        let e = Config::parse(&src, "t").expect_err(&src);
        let text = e.to_string();
        assert!(
            text.contains("min_distinct_callers must be between 1 and 64"),
            "{text}"
        );
        assert_eq!(e.located()[0].0, 2, "{text}");
    }
    let c = Config::parse(
        "[defaults.breaker]\nmin_distinct_callers = 2\n[targets.x]\n[targets.y]\nbreaker = { min_distinct_callers = 64 }\n",
        "t",
    )
    .expect("valid");
    assert_eq!(c.default_target.breaker.min_distinct_callers, 2);
    assert_eq!(c.target("x").breaker.min_distinct_callers, 2);
    assert_eq!(c.target("y").breaker.min_distinct_callers, 64);
    let plain = Config::parse("[targets.x]\n", "t").expect("valid");
    assert_eq!(plain.target("x").breaker.min_distinct_callers, 1);
}
