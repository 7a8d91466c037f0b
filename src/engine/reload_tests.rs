//! Config reload: what changes, what carries over, and what decisions see
//! while it happens (manual clock, so budget arithmetic is exact).

use super::*;
use crate::domain::breaker::BreakerState;
use crate::engine::clock::ManualClock;
use std::sync::atomic::AtomicBool;

const T0: Time = Time::from_secs(1_800_000_000);

fn parse(toml: &str) -> Config {
    Config::parse(toml, "test.toml").expect("valid config")
}

fn engine(toml: &str) -> (Arc<Engine>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(T0));
    (
        Arc::new(Engine::new(Arc::new(parse(toml)), clock.clone())),
        clock,
    )
}

async fn admit(e: &Engine, t: &str) -> Admission {
    e.can_proceed(t, AdmitArgs::default()).await.expect("valid")
}

async fn admitted(e: &Engine, t: &str, n: usize) -> usize {
    let mut k = 0;
    for _ in 0..n {
        if admit(e, t).await.allowed {
            k += 1;
        }
    }
    k
}

async fn fail(e: &Engine, t: &str, n: usize) {
    for _ in 0..n {
        let a = admit(e, t).await;
        e.record_outcome(
            t,
            OutcomeReport {
                permit: &a.token,
                http_status: 503,
                ..OutcomeReport::default()
            },
        )
        .await
        .expect("valid report");
    }
}

fn requests_available(v: &TargetView) -> f64 {
    v.slots[0]
        .budgets
        .iter()
        .find(|b| b.kind == "requests")
        .map(|b| b.available)
        .expect("a requests budget")
}

const BASE: &str = r#"
[defaults.breaker]
failure_threshold = 3
open_duration = "60s"
jitter = 0.0
[targets.a]
requests_per_minute = 100
[targets.gone]
[targets.forced]
[routes.chat]
targets = ["a", "b"]
"#;

#[tokio::test]
async fn open_breakers_and_forced_states_survive_a_reload_that_changes_their_settings() {
    let (e, _) = engine(BASE);
    fail(&e, "a", 3).await;
    e.set_breaker_mode("forced", Mode::ForcedOpen, "maintenance")
        .await
        .expect("force");
    let before = e.get_target("a").await.expect("a");
    assert_eq!(before.state, BreakerState::Open);
    let r = e
        .reload(
            parse(
                r#"
[defaults.breaker]
failure_threshold = 10
open_duration = "60s"
jitter = 0.0
[targets.a]
requests_per_minute = 100
breaker = { failure_threshold = 7 }
[targets.gone]
[targets.forced]
max_tokens = 5
[routes.chat]
targets = ["a", "b"]
"#,
            ),
            "test",
        )
        .await
        .expect("reload");
    // "gone" declares nothing of its own: the new defaults change it too.
    assert_eq!(r.changed, vec!["a", "forced", "gone"]);
    let a = e.get_target("a").await.expect("a");
    assert_eq!(a.state, BreakerState::Open, "an open breaker stays open");
    assert_eq!(a.open_until, before.open_until, "for the same period");
    assert_eq!(
        a.settings.breaker.failure_threshold, 7,
        "new settings apply"
    );
    assert!(!admit(&e, "a").await.allowed);
    let f = e.get_target("forced").await.expect("forced");
    assert_eq!(f.state, BreakerState::ForcedOpen);
    assert_eq!(f.forced_reason.as_deref(), Some("maintenance"));
    assert_eq!(f.settings.max_tokens, 5);
}

#[tokio::test]
async fn budget_levels_carry_over_as_the_same_fraction_used() {
    let (e, _) = engine(BASE);
    assert_eq!(admitted(&e, "a", 60).await, 60);
    let cfg = BASE.replace("requests_per_minute = 100", "requests_per_minute = 40");
    e.reload(parse(&cfg), "test").await.expect("reload");
    let v = e.get_target("a").await.expect("a");
    assert!(
        (requests_available(&v) - 16.0).abs() < 1e-6,
        "60 of 100 used = 24 of 40 used: {}",
        requests_available(&v)
    );
    assert_eq!(admitted(&e, "a", 100).await, 16, "never past the new limit");
    // Raised again: the same fraction (all of it) stays used.
    e.reload(parse(BASE), "test").await.expect("reload");
    assert_eq!(admitted(&e, "a", 10).await, 0);
}

#[tokio::test]
async fn removed_targets_go_with_an_event_and_new_ones_appear() {
    let (e, _) = engine(BASE);
    let mut sub = e.events().subscribe_since(e.events().last_seq());
    let r = e
        .reload(
            parse(&format!(
                "{}\n[targets.fresh]\ncontext_window = 1000\n",
                BASE.replace("[targets.gone]\n", "")
            )),
            "test",
        )
        .await
        .expect("reload");
    assert_eq!(
        (r.added.clone(), r.removed.clone()),
        (vec!["fresh".to_string()], vec!["gone".to_string()])
    );
    assert!(matches!(
        e.get_target("gone").await,
        Err(EngineError::NotFound(_))
    ));
    let fresh = e.get_target("fresh").await.expect("appears");
    assert!(fresh.configured);
    assert_eq!(fresh.settings.context_window, 1000);
    let mut kinds = Vec::new();
    while let Ok(ev) = sub.rx.try_recv() {
        kinds.push((ev.target.to_string(), ev.kind.name()));
    }
    assert!(
        kinds.contains(&("gone".into(), "target_removed")),
        "{kinds:?}"
    );
    let reloaded = kinds.iter().filter(|k| k.1 == "config_reloaded").count();
    assert_eq!(reloaded, 1, "{kinds:?}");
    assert_ne!(r.digest, r.previous_digest);
}

#[tokio::test]
async fn routes_and_queue_bounds_apply_and_restart_only_settings_are_named() {
    let (e, _) = engine(BASE);
    let q = RouteQuery {
        route: "fast",
        ..Default::default()
    };
    assert!(matches!(
        e.route(q.clone()).await,
        Err(EngineError::NotFound(_))
    ));
    let r = e
        .reload(
            parse(&format!(
                "{BASE}\n[routes.fast]\ntargets = [\"c\"]\n[server]\nlisten = \"127.0.0.1:1\"\nmax_pause = \"5s\"\n[queue]\nmax_depth = 7\n"
            )),
            "test",
        )
        .await
        .expect("reload");
    assert_eq!(r.routes_changed, vec!["fast"]);
    assert_eq!(r.needs_restart, vec!["server.listen"]);
    let d = e.route(q).await.expect("the new route serves");
    assert_eq!(d.chosen.map(|c| c.0.to_string()).as_deref(), Some("c"));
    let c = e.config();
    assert_eq!(c.server.listen, Config::default().server.listen, "kept");
    assert_eq!(c.server.max_pause, Duration::from_secs(5), "applied");
    assert_eq!(c.queue.max_depth, 7);
}

#[tokio::test]
async fn key_slots_keep_their_state_when_slots_are_added() {
    let cfg = "[targets.k]\nkeys = [\"one\", \"two\"]\n";
    let (e, clock) = engine(cfg);
    // A provider pause on slot "one", reported with its permit.
    let p = loop {
        let a = admit(&e, "k").await;
        if a.key_slot.as_deref() == Some("one") {
            break a;
        }
    };
    e.record_outcome(
        "k",
        OutcomeReport {
            permit: &p.token,
            http_status: 429,
            retry_after: Some(Duration::from_secs(30)),
            ..OutcomeReport::default()
        },
    )
    .await
    .expect("report");
    let before = e.get_target("k").await.expect("k");
    assert!(before.slots[0].paused_until.is_some());
    e.reload(
        parse("[targets.k]\nkeys = [\"one\", \"two\", \"three\"]\n"),
        "test",
    )
    .await
    .expect("reload");
    let after = e.get_target("k").await.expect("k");
    assert_eq!(after.slots.len(), 3);
    assert_eq!(after.slots[0].paused_until, before.slots[0].paused_until);
    assert_eq!(after.slots[2].paused_until, None);
    clock.advance(Duration::from_secs(1));
    for _ in 0..10 {
        let a = admit(&e, "k").await;
        assert_ne!(a.key_slot.as_deref(), Some("one"), "still paused");
    }
}

#[tokio::test]
async fn a_shared_group_carries_its_level_into_a_new_limit() {
    let cfg = |n: u32| {
        format!(
            "[budgets.org]\nrequests_per_minute = {n}\n[targets.x]\nbudgets = [\"org\"]\n[targets.y]\nbudgets = [\"org\"]\n"
        )
    };
    let (e, _) = engine(&cfg(100));
    assert_eq!(
        admitted(&e, "x", 30).await + admitted(&e, "y", 20).await,
        50
    );
    e.reload(parse(&cfg(20)), "test").await.expect("reload");
    assert_eq!(
        admitted(&e, "x", 50).await + admitted(&e, "y", 50).await,
        10,
        "half used stays half used: 10 of 20 left"
    );
}

/// A reload under load: decisions on several threads while the budget
/// changes. With time frozen nothing refills, so whatever the interleaving,
/// everything admitted fits in the larger limit, and what is admitted after
/// the reload returns fits in the new one.
#[test]
fn a_reload_under_load_never_admits_past_the_old_or_the_new_limit() {
    for (old, new) in [(100u32, 40u32), (40, 100)] {
        let (e, _) = engine(&format!("[targets.hot]\nrequests_per_minute = {old}\n"));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        let done = Arc::new(AtomicBool::new(false));
        let after = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        let reloaded = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (e, done, after, total, reloaded) = (
                e.clone(),
                done.clone(),
                after.clone(),
                total.clone(),
                reloaded.clone(),
            );
            tasks.push(rt.spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    let was_reloaded = reloaded.load(Ordering::Acquire);
                    if admit(&e, "hot").await.allowed {
                        total.fetch_add(1, Ordering::Relaxed);
                        if was_reloaded {
                            after.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::task::yield_now().await;
                }
            }));
        }
        rt.block_on(async {
            // Some of the old budget is used while the reload runs.
            while total.load(Ordering::Relaxed) < u64::from(old.min(new) / 4) {
                tokio::task::yield_now().await;
            }
            e.reload(
                parse(&format!("[targets.hot]\nrequests_per_minute = {new}\n")),
                "test",
            )
            .await
            .expect("reload");
            reloaded.store(true, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(50)).await;
            done.store(true, Ordering::Relaxed);
            for t in tasks {
                t.await.expect("task");
            }
        });
        let (total, after) = (total.load(Ordering::Relaxed), after.load(Ordering::Relaxed));
        assert!(
            total <= u64::from(old.max(new)),
            "{old} -> {new}: {total} admitted in all"
        );
        assert!(after <= u64::from(new), "{old} -> {new}: {after} after");
        // Frozen time: the budget ends exhausted, every unit accounted for.
        let v = rt.block_on(e.get_target("hot")).expect("hot");
        assert!(requests_available(&v) < 1.0, "{old} -> {new}: exhausted");
    }
}

#[tokio::test]
async fn first_use_targets_follow_new_defaults_and_keep_their_state() {
    let cfg = |n: u32| format!("[defaults.breaker]\nfailure_threshold = {n}\njitter = 0.0\n");
    let (e, _) = engine(&cfg(3));
    fail(&e, "adhoc", 2).await;
    e.reload(parse(&cfg(5)), "test").await.expect("reload");
    let v = e.get_target("adhoc").await.expect("adhoc");
    assert!(!v.configured);
    assert_eq!(v.settings.breaker.failure_threshold, 5);
    assert_eq!(v.consecutive_failures, 2, "the streak carries over");
    fail(&e, "adhoc", 2).await;
    assert_eq!(
        e.get_target("adhoc").await.expect("adhoc").state,
        BreakerState::Closed
    );
    fail(&e, "adhoc", 1).await;
    assert_eq!(
        e.get_target("adhoc").await.expect("adhoc").state,
        BreakerState::Open
    );
}

/// Declaring a route member (created up front, never counted as a
/// first-use target) must not push the first-use count below zero.
#[tokio::test]
async fn declaring_a_route_member_keeps_first_use_targets_creatable() {
    let base = "[server]\nmax_targets = 2\n[routes.r]\ntargets = [\"m\"]\n";
    let (e, _) = engine(base);
    e.reload(
        parse(&format!("{base}[targets.m]\nrequests_per_minute = 10\n")),
        "test",
    )
    .await
    .expect("reload");
    assert!(e.can_proceed("adhoc1", AdmitArgs::default()).await.is_ok());
    assert!(e.can_proceed("adhoc2", AdmitArgs::default()).await.is_ok());
    let third = e.can_proceed("adhoc3", AdmitArgs::default()).await;
    assert!(
        matches!(third, Err(EngineError::ResourceExhausted(_))),
        "max_targets still holds: {third:?}"
    );
}

/// A budget whose window changes keeps the fraction used, not the time.
#[tokio::test]
async fn a_longer_window_keeps_a_used_budget_used() {
    let (e, _) = engine("[targets.w]\nrequests = 100\nwindow = \"60s\"\n");
    assert_eq!(admitted(&e, "w", 100).await, 100);
    e.reload(
        parse("[targets.w]\nrequests = 100\nwindow = \"3600s\"\n"),
        "test",
    )
    .await
    .expect("reload");
    assert_eq!(admitted(&e, "w", 200).await, 0, "100 per hour, all used");
}

/// Items waiting on a route's queue would be handed out as calls to a
/// target named like the route: removing the route is refused meanwhile.
#[tokio::test]
async fn a_route_with_queued_items_cannot_be_removed() {
    let base = "[targets.a]\n[routes.chat]\ntargets = [\"a\"]\n";
    let (e, _) = engine(base);
    e.defer(crate::engine::queue::DeferArgs {
        queue: "chat".into(),
        payload: vec![1; 4],
        ..Default::default()
    })
    .await
    .expect("defer");
    let err = e.reload(parse("[targets.a]\n"), "test").await.unwrap_err();
    assert!(
        matches!(&err, EngineError::FailedPrecondition(m) if m.contains("holds 1 item")),
        "{err:?}"
    );
    assert!(e.config().routes.contains_key("chat"), "nothing changed");
}

/// Permits name their key slot by position: a reload that reorders slots
/// is refused; adding one at the end is fine.
#[tokio::test]
async fn key_slots_may_be_appended_but_not_reordered() {
    let (e, _) = engine("[targets.k]\nkeys = [\"a\", \"b\"]\n");
    let err = e
        .reload(parse("[targets.k]\nkeys = [\"b\", \"a\"]\n"), "test")
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::FailedPrecondition(_)), "{err:?}");
    e.reload(parse("[targets.k]\nkeys = [\"a\", \"b\", \"c\"]\n"), "test")
        .await
        .expect("appending is fine");
}

fn many(threshold: u32, rpm: u32, n: usize) -> String {
    let mut s = format!(
        "[defaults.breaker]\nfailure_threshold = {threshold}\n[budgets.g]\nrequests_per_minute = {rpm}\n"
    );
    for i in 0..8 {
        s += &format!("[targets.m{i}]\nbudgets = [\"g\"]\n");
    }
    for i in 0..n {
        s += &format!("[targets.t{i}]\n");
    }
    s
}

/// Found by review: the reload once held a new group's lock while writing
/// the map, a decision on a replaced member waited for that group holding
/// its target, and a map reader (list, the write-behind flush) waited for
/// that target holding a shard: a deadlock. Decisions and listings run
/// against reloads that change the group's budget; every reload returns.
#[test]
fn reloads_never_deadlock_with_decisions_and_map_readers() {
    let (e, _) = engine(&many(3, 1_000_000, 3000));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = vec![];
    for k in 0..2 {
        let (e, stop) = (e.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("rt");
            let Backend::Local(b) = &e.backend else {
                return;
            };
            let mut i = k;
            while !stop.load(Ordering::Relaxed) {
                let _ = rt.block_on(b.admit(&format!("m{}", i % 8), &AdmitArgs::default()));
                i += 1;
            }
        }));
    }
    {
        let (e, stop) = (e.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let Backend::Local(b) = &e.backend else {
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                let _ = b.list("m", 100, "");
            }
        }));
    }
    let configs = [
        Arc::new(parse(&many(4, 500_000, 3000))),
        Arc::new(parse(&many(3, 1_000_000, 3000))),
    ];
    for round in 0..6 {
        let (tx, rx) = std::sync::mpsc::channel();
        let (e2, c) = (e.clone(), configs[round % 2].clone());
        std::thread::spawn(move || {
            if let Backend::Local(b) = &e2.backend {
                b.reload(&c);
            }
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(60)).is_ok(),
            "round {round}: the reload did not return within 60 s"
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().expect("thread");
    }
}

/// `min_distinct_callers` is a breaker setting like any other: a reload
/// applies it at once, and the streak and callers seen so far carry over.
#[tokio::test]
async fn a_reload_changes_min_distinct_callers_live() {
    let cfg = |n: u32| {
        format!("[targets.t]\nbreaker = {{ failure_threshold = 3, min_distinct_callers = {n} }}\n")
    };
    let (e, _) = engine(&cfg(3));
    // One caller (every report names none: the anonymous caller) fails on.
    fail(&e, "t", 10).await;
    let v = e.get_target("t").await.expect("t");
    assert_eq!(v.state, BreakerState::Closed, "one caller of the 3 needed");
    assert_eq!(v.consecutive_failures, 10);
    let r = e.reload(parse(&cfg(1)), "test").await.expect("reload");
    assert_eq!(r.changed, vec!["t"]);
    assert!(r.needs_restart.is_empty(), "{:?}", r.needs_restart);
    let v = e.get_target("t").await.expect("t");
    assert_eq!(v.settings.breaker.min_distinct_callers, 1);
    fail(&e, "t", 1).await;
    assert_eq!(
        e.get_target("t").await.expect("t").state,
        BreakerState::Open,
        "the next failure trips it"
    );
}

/// An adaptive concurrency limit follows a reload live: what was learned
/// is fitted into new bounds, a switch to a fixed limit enforces that
/// limit at once, and a switch back starts learning again.
#[tokio::test]
async fn a_reload_moves_adaptive_bounds_and_switches_to_and_from_fixed() {
    let adaptive = |min: u32, max: u32, initial: u32| {
        format!(
            "[targets.t]\nmax_concurrency = \"adaptive\"\n\
             adaptive = {{ min = {min}, max = {max}, initial = {initial} }}\n"
        )
    };
    let (e, clock) = engine(&adaptive(2, 64, 8));
    let limit = |v: &TargetView| v.adaptive.as_ref().map(|a| a.limit);
    // Rounds of a fleet that fills the limit and succeeds: +1 per round.
    for _ in 0..4 {
        let mut tokens = Vec::new();
        loop {
            let a = admit(&e, "t").await;
            if !a.allowed {
                assert_eq!(a.reason, crate::domain::Reason::ConcurrencyLimit);
                break;
            }
            tokens.push(a.token);
        }
        clock.advance(Duration::from_millis(100));
        for token in &tokens {
            e.record_outcome(
                "t",
                OutcomeReport {
                    permit: token,
                    http_status: 200,
                    latency: Some(Duration::from_millis(100)),
                    ..OutcomeReport::default()
                },
            )
            .await
            .expect("valid report");
        }
    }
    let v = e.get_target("t").await.expect("t");
    assert_eq!(limit(&v), Some(12));
    assert_eq!(admitted(&e, "t", 20).await, 12, "admission enforces it");
    // Tighter bounds: the learned limit is fitted in, and enforced.
    let r = e
        .reload(parse(&adaptive(2, 10, 8)), "test")
        .await
        .expect("reload");
    assert_eq!(r.changed, vec!["t"]);
    let v = e.get_target("t").await.expect("t");
    assert_eq!(limit(&v), Some(10));
    let a = v.adaptive.as_ref().expect("adaptive");
    assert_eq!((a.min, a.max), (2, 10));
    assert_eq!(a.last_change, "cut 12 → 10: the configured bounds changed");
    // The 12 calls in flight carried over; nothing more fits under 10.
    assert_eq!(admitted(&e, "t", 5).await, 0);
    // A fixed limit: no adaptive status, the fixed limit is what admits.
    e.reload(parse("[targets.t]\nmax_concurrency = 14\n"), "test")
        .await
        .expect("reload");
    let v = e.get_target("t").await.expect("t");
    assert_eq!(v.adaptive, None);
    assert_eq!(admitted(&e, "t", 5).await, 2, "12 in flight, 14 allowed");
    // Adaptive again: learning starts over from the initial limit.
    e.reload(parse(&adaptive(4, 64, 20)), "test")
        .await
        .expect("reload");
    let v = e.get_target("t").await.expect("t");
    assert_eq!(limit(&v), Some(20));
    assert!(
        v.adaptive
            .expect("adaptive")
            .last_change
            .contains("initial")
    );
    assert_eq!(admitted(&e, "t", 10).await, 6, "14 in flight, 20 allowed");
}
