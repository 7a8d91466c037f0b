//! Engine behaviour across targets, slots, groups and routes, with a manual clock.

use super::*;
use crate::domain::breaker::BreakerState;
use crate::engine::clock::ManualClock;

const T0: Time = Time::from_secs(1_800_000_000);

fn engine(toml: &str) -> (Arc<Engine>, Arc<ManualClock>) {
    let config = Config::parse(toml, "test.toml").expect("valid config");
    let clock = Arc::new(ManualClock::new(T0));
    (
        Arc::new(Engine::new(Arc::new(config), clock.clone())),
        clock,
    )
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

async fn admit(e: &Engine, t: &str) -> Admission {
    e.can_proceed(t, AdmitArgs::default())
        .await
        .expect("valid request")
}

/// A signed permit of `target` (on key slot `slot`, when given): outcomes
/// that impose anything on the fleet (pauses, disabled keys) need one.
pub(super) async fn permit_for(e: &Engine, target: &str, slot: Option<&str>) -> String {
    for _ in 0..64 {
        let a = admit(e, target).await;
        if a.allowed && (slot.is_none() || a.key_slot.as_deref() == slot) {
            return a.token;
        }
    }
    panic!("no admission of {target} on slot {slot:?}");
}

async fn report(e: &Engine, t: &str, permit: &Admission, status: i32) -> OutcomeResult {
    let permit = permit.token.clone();
    e.record_outcome(
        t,
        OutcomeReport {
            permit: &permit,
            http_status: status,
            ..OutcomeReport::default()
        },
    )
    .await
    .expect("valid report")
}

async fn fail_n(e: &Engine, t: &str, n: usize, status: i32) {
    for _ in 0..n {
        let a = admit(e, t).await;
        report(e, t, &a, status).await;
    }
}

const FAST: &str = r#"
[defaults.breaker]
failure_threshold = 3
success_threshold = 2
open_duration = "10s"
half_open_max_probes = 2
jitter = 0.0
"#;

#[tokio::test]
async fn a_fleet_shares_one_breaker_and_probes_are_limited_fleet_wide() {
    let (e, clock) = engine(FAST);
    fail_n(&e, "p/m", 3, 503).await;
    let a = admit(&e, "p/m").await;
    assert_eq!(
        (a.allowed, a.reason, a.state),
        (false, Reason::CircuitOpen, BreakerState::Open)
    );
    assert_eq!(a.retry_after, Some(secs(10)));
    clock.advance(secs(10));
    // 50 agents race for probes from 50 threads: exactly two get one.
    let mut handles = Vec::new();
    for _ in 0..50 {
        let e = e.clone();
        handles.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("rt");
            rt.block_on(async {
                e.can_proceed("p/m", AdmitArgs::default())
                    .await
                    .expect("ok")
            })
        }));
    }
    let results: Vec<Admission> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let probes: Vec<&Admission> = results.iter().filter(|a| a.allowed).collect();
    assert_eq!(probes.len(), 2);
    assert!(
        results
            .iter()
            .filter(|a| !a.allowed)
            .all(|a| a.reason == Reason::ProbeLimit)
    );
    for p in &probes {
        let r = report(&e, "p/m", p, 200).await;
        assert!(!r.stale);
    }
    assert_eq!(
        e.get_target("p/m").await.expect("exists").state,
        BreakerState::Closed
    );
    assert!(admit(&e, "p/m").await.allowed);
}

#[tokio::test]
async fn taxonomy_drives_the_breaker() {
    let (e, _) = engine(FAST);
    // Bad input never trips.
    fail_n(&e, "a", 20, 400).await;
    assert_eq!(
        e.get_target("a").await.expect("a").state,
        BreakerState::Closed
    );
    // An invalid key opens at once, for the persistent duration.
    fail_n(&e, "b", 1, 401).await;
    let v = e.get_target("b").await.expect("b");
    assert_eq!(v.state, BreakerState::Open);
    assert_eq!(v.open_until, Some(T0 + secs(600)));
    assert_eq!(v.counters.by_class[OutcomeClass::Persistent.index()], 1);
    // A quota 429 is persistent too; a plain 429 without a hint counts as a failure.
    let r = e
        .record_outcome(
            "c",
            OutcomeReport {
                http_status: 429,
                error_type: "insufficient_quota",
                ..Default::default()
            },
        )
        .await
        .expect("ok");
    assert_eq!(r.classified_as, OutcomeClass::Persistent);
    assert!(!r.advice.retry);
    fail_n(&e, "d", 3, 429).await;
    assert_eq!(
        e.get_target("d").await.expect("d").state,
        BreakerState::Open
    );
    // Admin reset clears a persistent open.
    e.reset_target("b").await.expect("reset");
    assert!(admit(&e, "b").await.allowed);
}

#[tokio::test]
async fn a_429_with_retry_after_pauses_the_target_for_everyone() {
    let (e, clock) = engine(FAST);
    let a = admit(&e, "x").await;
    let permit = a.token.clone();
    let r = e
        .record_outcome(
            "x",
            OutcomeReport {
                permit: &permit,
                http_status: 429,
                headers: vec![("Retry-After", "7")],
                ..Default::default()
            },
        )
        .await
        .expect("ok");
    assert_eq!(r.classified_as, OutcomeClass::RateLimited);
    assert!(r.advice.retry);
    assert!(r.advice.delay >= secs(7));
    assert_eq!(
        r.state,
        BreakerState::Closed,
        "a hinted 429 is not an outage"
    );
    let b = admit(&e, "x").await;
    assert_eq!(
        (b.allowed, b.reason, b.retry_after),
        (false, Reason::RateLimited, Some(secs(7)))
    );
    clock.advance(secs(7));
    assert!(admit(&e, "x").await.allowed);
}

#[tokio::test]
async fn openai_remaining_zero_pauses_until_reset() {
    let (e, clock) = engine("");
    let permit = permit_for(&e, "openai/gpt-4o", None).await;
    e.record_outcome(
        "openai/gpt-4o",
        OutcomeReport {
            permit: &permit,
            http_status: 200,
            headers: vec![
                ("x-ratelimit-limit-requests", "500"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "1m30s"),
            ],
            ..Default::default()
        },
    )
    .await
    .expect("ok");
    let a = admit(&e, "openai/gpt-4o").await;
    assert_eq!(
        (a.reason, a.retry_after),
        (Reason::RateLimited, Some(secs(90)))
    );
    let v = e.get_target("openai/gpt-4o").await.expect("view");
    assert_eq!(v.slots[0].learned[0].1.limit, 500);
    assert_eq!(v.slots[0].paused_until, Some(T0 + secs(90)));
    clock.advance(secs(90));
    assert!(admit(&e, "openai/gpt-4o").await.allowed);
}

#[tokio::test]
async fn a_401_on_one_key_slot_moves_traffic_to_the_other() {
    let (e, _) = engine("[targets.t]\nkeys = [\"org-a\", \"org-b\"]\n");
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let a = admit(&e, "t").await;
        seen.insert(a.key_slot.clone().expect("slot"));
    }
    assert_eq!(seen.len(), 2, "unmetered keys share the load");
    let permit = permit_for(&e, "t", Some("org-a")).await;
    let r = e
        .record_outcome(
            "t",
            OutcomeReport {
                permit: &permit,
                http_status: 401,
                key_slot: "org-a",
                ..Default::default()
            },
        )
        .await
        .expect("ok");
    assert_eq!(
        r.state,
        BreakerState::Closed,
        "the model is fine, the key is not"
    );
    for _ in 0..6 {
        let a = admit(&e, "t").await;
        assert!(a.allowed);
        assert_eq!(a.key_slot.as_deref(), Some("org-b"));
    }
    let permit = permit_for(&e, "t", Some("org-b")).await;
    e.record_outcome(
        "t",
        OutcomeReport {
            permit: &permit,
            http_status: 403,
            key_slot: "org-b",
            ..Default::default()
        },
    )
    .await
    .expect("ok");
    let a = admit(&e, "t").await;
    assert_eq!((a.allowed, a.reason), (false, Reason::KeySlotsUnavailable));
    assert_eq!(a.retry_after, Some(secs(600)));
    let v = e.get_target("t").await.expect("view");
    assert!(v.slots.iter().all(|s| s.disabled_until.is_some()));
    let err = e
        .record_outcome(
            "t",
            OutcomeReport {
                http_status: 200,
                key_slot: "org-z",
                ..Default::default()
            },
        )
        .await
        .expect_err("unknown slot");
    assert!(matches!(err, EngineError::InvalidArgument(m) if m.contains("org-z")));
}

#[tokio::test]
async fn budgets_refuse_with_exact_retry_after_and_groups_are_all_or_nothing() {
    let (e, clock) = engine(
        r#"
[budgets.org]
requests = 3
window = "1s"

[targets.a]
requests = 2
window = "1s"
budgets = ["org"]

[targets.b]
budgets = ["org"]
"#,
    );
    assert!(admit(&e, "a").await.allowed);
    assert!(admit(&e, "a").await.allowed);
    let r = admit(&e, "a").await;
    assert_eq!(
        (r.reason, r.retry_after),
        (Reason::RateLimited, Some(Duration::from_millis(500)))
    );
    // The group had room for one more: b takes it; a's refusal charged nothing.
    assert!(admit(&e, "b").await.allowed);
    let r = admit(&e, "b").await;
    assert_eq!(
        (r.reason, r.retry_after),
        (Reason::RateLimited, Some(Duration::from_nanos(333_333_332)))
    );
    clock.advance(Duration::from_millis(500));
    assert!(admit(&e, "a").await.allowed);
    let names: Vec<String> = e
        .get_target("a")
        .await
        .expect("a")
        .group_names
        .iter()
        .map(|g| g.to_string())
        .collect();
    assert_eq!(names, vec!["org".to_string()]);
}

#[tokio::test]
async fn concurrency_is_released_by_outcome_and_lease_expiry() {
    let (e, clock) = engine("[targets.c]\nmax_concurrency = 1\npermit_lease = \"30s\"\n");
    let a = admit(&e, "c").await;
    assert!(a.allowed);
    let b = admit(&e, "c").await;
    assert_eq!(b.reason, Reason::ConcurrencyLimit);
    report(&e, "c", &a, 200).await;
    let c = admit(&e, "c").await;
    assert!(c.allowed, "released by the outcome");
    clock.advance(secs(30));
    assert!(admit(&e, "c").await.allowed, "released by lease expiry");
}

#[tokio::test]
async fn tokens_reserve_and_settle_through_the_permit() {
    let (e, _) = engine("[targets.t]\ntokens_per_minute = 1000\n");
    let a = e
        .can_proceed(
            "t",
            AdmitArgs {
                estimated_tokens: 900,
                ..Default::default()
            },
        )
        .await
        .expect("ok");
    assert!(a.allowed);
    let refused = e
        .can_proceed(
            "t",
            AdmitArgs {
                estimated_tokens: 200,
                ..Default::default()
            },
        )
        .await
        .expect("ok");
    assert_eq!(refused.reason, Reason::RateLimited);
    let permit = a.token.clone();
    e.record_outcome(
        "t",
        OutcomeReport {
            permit: &permit,
            http_status: 200,
            input_tokens: 250,
            output_tokens: 50,
            ..Default::default()
        },
    )
    .await
    .expect("ok");
    let v = e.get_target("t").await.expect("view");
    assert_eq!(v.slots[0].budgets[0].available, 700.0);
    let big = e
        .can_proceed(
            "t",
            AdmitArgs {
                estimated_tokens: 5000,
                ..Default::default()
            },
        )
        .await
        .expect("ok");
    assert_eq!(
        (big.reason, big.retry_after),
        (Reason::RequestTooLarge, None)
    );
}

#[tokio::test]
async fn shadow_mode_admits_but_reports() {
    let (e, _) = engine("[targets.s]\nrequests_per_minute = 1\nmode = \"shadow\"\n");
    assert!(admit(&e, "s").await.allowed);
    let a = admit(&e, "s").await;
    assert!(a.allowed);
    assert_eq!(a.shadow_reason, Some(Reason::RateLimited));
    assert_eq!(e.get_target("s").await.expect("v").counters.refused, 1);
}

#[tokio::test]
async fn retries_draw_on_the_fleet_retry_budget() {
    let (e, _) = engine(
        "[defaults.retry]\nretry_ratio = 0.0\nmin_retries_per_second = 0.2\nretry_window = \"10s\"\n",
    );
    // Floor: 0.2/s over 10 s = 2 retries.
    let retry = AdmitArgs {
        attempt: 1,
        ..Default::default()
    };
    assert!(e.can_proceed("r", retry).await.expect("ok").allowed);
    assert!(e.can_proceed("r", retry).await.expect("ok").allowed);
    let a = e.can_proceed("r", retry).await.expect("ok");
    assert_eq!(a.reason, Reason::RetryBudgetExhausted);
    let out = e
        .record_outcome(
            "r",
            OutcomeReport {
                http_status: 503,
                ..Default::default()
            },
        )
        .await
        .expect("ok");
    assert!(!out.advice.retry);
    assert_eq!(
        out.advice.reason,
        crate::domain::retry::RetryReason::BudgetExhausted
    );
    assert!(
        e.can_proceed("r", AdmitArgs::default())
            .await
            .expect("ok")
            .allowed,
        "first tries are never throttled"
    );
}

#[tokio::test]
async fn route_falls_back_and_reports_every_skip() {
    let (e, clock) = engine(&format!(
        "{FAST}\n[targets.small]\ncontext_window = 1000\n[targets.big]\ncontext_window = 200000\nmax_tokens = 4096\ncost_per_mtok_input = 3.0\n[routes.chat]\ntargets = [\"primary\", \"small\", \"big\"]\n"
    ));
    let q = |ctx| RouteQuery {
        route: "chat",
        required_context_tokens: ctx,
        ..Default::default()
    };
    let d = e.route(q(5000)).await.expect("ok");
    assert_eq!(d.chosen.as_ref().map(|c| c.0.as_ref()), Some("primary"));
    assert_eq!(d.fallback_depth, 0);
    fail_n(&e, "primary", 3, 529).await;
    let d = e.route(q(5000)).await.expect("ok");
    let (target, adm, settings) = d.chosen.expect("a fallback");
    assert_eq!(target.as_ref(), "big");
    assert!(adm.permit.is_some());
    assert_eq!(settings.max_tokens, 4096);
    assert_eq!(d.fallback_depth, 2);
    let reasons: Vec<(&str, Reason)> = d
        .skipped
        .iter()
        .map(|s| (s.target.as_ref(), s.reason))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("primary", Reason::CircuitOpen),
            ("small", Reason::ContextTooSmall)
        ]
    );
    // Exclude the last one too: nothing left; retry_after is the primary's reopen.
    let excl = vec!["big".to_string()];
    let d = e
        .route(RouteQuery {
            route: "chat",
            required_context_tokens: 5000,
            exclude: &excl,
            ..Default::default()
        })
        .await
        .expect("ok");
    assert!(d.chosen.is_none());
    assert_eq!(d.retry_after, Some(secs(10)));
    // Events: a fallback, then exhaustion.
    let backlog = e.events().subscribe_since(0).backlog;
    let kinds: Vec<&'static str> = backlog
        .expect("retained")
        .iter()
        .map(|ev| ev.kind.name())
        .collect();
    assert!(kinds.contains(&"fallback_activated"), "{kinds:?}");
    assert!(kinds.contains(&"route_exhausted"), "{kinds:?}");
    clock.advance(secs(10));
    assert_eq!(
        e.route(q(0))
            .await
            .expect("ok")
            .chosen
            .expect("probe")
            .0
            .as_ref(),
        "primary"
    );
}

#[tokio::test]
async fn bad_requests_get_clear_errors() {
    let (e, _) = engine("[routes.r]\ntargets = [\"a\"]\n");
    let long = "x".repeat(257);
    for t in ["", long.as_str(), "a\nb"] {
        assert!(matches!(
            e.can_proceed(t, AdmitArgs::default()).await,
            Err(EngineError::InvalidArgument(_))
        ));
    }
    assert!(matches!(
        e.route(RouteQuery { route: "nope", ..Default::default() }).await,
        Err(EngineError::NotFound(m)) if m.contains("\"r\"")
    ));
    assert!(matches!(
        e.route(RouteQuery::default()).await,
        Err(EngineError::InvalidArgument(_))
    ));
    let bad = e
        .record_outcome(
            "a",
            OutcomeReport {
                permit: "garbage",
                http_status: 200,
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(bad, Err(EngineError::InvalidArgument(m)) if m.contains("permit")));
    let unclassifiable = e.record_outcome("a", OutcomeReport::default()).await;
    assert!(matches!(
        unclassifiable,
        Err(EngineError::InvalidArgument(_))
    ));
    // A permit from another target is caught.
    let p = admit(&e, "a").await.token;
    let wrong = e
        .record_outcome(
            "b",
            OutcomeReport {
                permit: &p,
                http_status: 200,
                ..Default::default()
            },
        )
        .await;
    assert!(
        matches!(wrong, Err(EngineError::InvalidArgument(m)) if m.contains("different target"))
    );
    let many: Vec<(&str, &str)> = (0..65).map(|_| ("x-a", "1")).collect();
    let too_many = e
        .record_outcome(
            "a",
            OutcomeReport {
                http_status: 200,
                headers: many,
                ..Default::default()
            },
        )
        .await;
    assert!(matches!(too_many, Err(EngineError::InvalidArgument(_))));
    assert!(matches!(
        e.get_target("never-used").await,
        Err(EngineError::NotFound(_))
    ));
}

#[tokio::test]
async fn the_target_cap_is_enforced() {
    let (e, _) = engine("[server]\nmax_targets = 2\n[targets.declared]\n");
    assert!(admit(&e, "declared").await.allowed);
    assert!(admit(&e, "one").await.allowed);
    assert!(admit(&e, "two").await.allowed);
    let err = e
        .can_proceed("three", AdmitArgs::default())
        .await
        .expect_err("cap");
    assert!(matches!(err, EngineError::ResourceExhausted(m) if m.contains("max_targets")));
    assert!(
        admit(&e, "one").await.allowed,
        "existing targets keep working"
    );
}

#[tokio::test]
async fn transitions_are_published_in_order_with_the_caller() {
    let (e, clock) = engine(FAST);
    for _ in 0..3 {
        e.record_outcome(
            "t",
            OutcomeReport {
                http_status: 503,
                caller: "agent-7",
                ..Default::default()
            },
        )
        .await
        .expect("ok");
    }
    clock.advance(secs(10));
    admit(&e, "t").await;
    let backlog = e.events().subscribe_since(0).backlog;
    let evs = backlog.expect("retained");
    let transitions: Vec<(BreakerState, BreakerState)> = evs
        .iter()
        .filter_map(|ev| match &ev.kind {
            EventKind::BreakerTransition { from, to, .. } => Some((*from, *to)),
            _ => None,
        })
        .collect();
    assert_eq!(
        transitions,
        vec![
            (BreakerState::Closed, BreakerState::Open),
            (BreakerState::Open, BreakerState::HalfOpen)
        ]
    );
    match &evs[0].kind {
        EventKind::BreakerTransition {
            caller,
            failures,
            class,
            ..
        } => {
            assert_eq!(caller.as_deref(), Some("agent-7"));
            assert_eq!(*failures, 3);
            assert_eq!(*class, Some(OutcomeClass::Transient));
        }
        other => panic!("{other:?}"),
    }
    assert!(evs.windows(2).all(|w| w[0].seq < w[1].seq));
}

#[tokio::test]
async fn forced_states_and_listing() {
    let (e, _) = engine("");
    e.set_breaker_mode("f", Mode::ForcedOpen, "maintenance")
        .await
        .expect("ok");
    let a = admit(&e, "f").await;
    assert_eq!(
        (a.allowed, a.reason, a.state),
        (false, Reason::ForcedOpen, BreakerState::ForcedOpen)
    );
    assert_eq!(
        e.get_target("f").await.expect("v").forced_reason.as_deref(),
        Some("maintenance")
    );
    e.set_breaker_mode("f", Mode::Automatic, "")
        .await
        .expect("ok");
    assert!(admit(&e, "f").await.allowed);
    for n in ["a/1", "a/2", "b/1"] {
        admit(&e, n).await;
    }
    let page = e.list_targets("a/", 1, "").await.expect("ok");
    assert_eq!(page.total, 2);
    assert_eq!(page.targets[0].name.as_ref(), "a/1");
    let page2 = e
        .list_targets("a/", 1, &page.next_page_token)
        .await
        .expect("ok");
    assert_eq!(page2.targets[0].name.as_ref(), "a/2");
    assert!(page2.next_page_token.is_empty());
}

#[tokio::test]
async fn admissions_and_outcomes_feed_the_history_and_routes_preview_without_admitting() {
    let (e, clock) = engine(
        "[targets.a]\nrequests_per_minute = 2\n[targets.b]\n\
         [routes.r]\ntargets = [\"a\", \"b\"]\n",
    );
    let a1 = admit(&e, "a").await;
    let _a2 = admit(&e, "a").await;
    assert!(!admit(&e, "a").await.allowed, "a's budget of 2 is spent");
    clock.advance(secs(10));
    e.record_outcome(
        "a",
        OutcomeReport {
            permit: &a1.token,
            http_status: 500,
            latency: Some(Duration::from_millis(250)),
            ..OutcomeReport::default()
        },
    )
    .await
    .expect("report");
    let now = e.now();
    let t = e.history().totals("a", now).expect("a has history");
    assert_eq!((t.admitted, t.refused, t.failed), (2, 1, 1));
    let s = e.history().series("a", now).expect("series");
    let last = s.points[crate::domain::history::BUCKETS - 1];
    assert_eq!(
        (last.admitted, last.failed),
        (0, 1),
        "the outcome is 10 s later"
    );
    assert!(last.p50_ms.is_some_and(|p| (180.0..360.0).contains(&p)));
    // The preview sees a out of budget and would choose b, without
    // admitting anything (b's history stays empty).
    let p = e.preview_routes().await;
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].chosen.as_deref(), Some("b"));
    assert_eq!(p[0].unavailable.len(), 1);
    assert!(e.history().totals("b", now).is_none());
}
