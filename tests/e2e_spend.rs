//! End-to-end: spend limits in money against the real binary (reserve at
//! admission, settle with real usage, refuse with SPEND_LIMIT, show it).

mod common;

use backstop::proto;
use common::{Server, next_sse};

/// $3 / $15 per million tokens; one cent an hour on the target, two cents a
/// day on the group it shares with `n`.
const CONFIG: &str = r#"
[budgets.team]
spend_per_day = 0.02
[targets.m]
cost_per_mtok_input = 3.0
cost_per_mtok_output = 15.0
spend = 0.01
window = "1h"
budgets = ["team"]
[targets.n]
cost_per_mtok_input = 3.0
cost_per_mtok_output = 15.0
budgets = ["team"]
"#;

fn ask(target: &str, input: u64, output: u64) -> proto::CanProceedRequest {
    proto::CanProceedRequest {
        target: target.into(),
        estimated_tokens: input,
        max_output_tokens: output,
        ..Default::default()
    }
}

fn secs(d: &Option<prost_types::Duration>) -> f64 {
    d.as_ref()
        .map_or(-1.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_is_reserved_refused_settled_and_shown() {
    let s = Server::start(CONFIG, &[]);
    let mut events = s.sse("/events?kinds=spend_limit_reached", &[]);
    assert_eq!(next_sse(&mut events).expect("snapshot").event, "snapshot");
    let mut c = s.resilience().await;

    // 1000 in at $3 + 200 out at $15 = 0.6 cents reserved.
    let a = c
        .can_proceed(ask("m", 1000, 200))
        .await
        .expect("ok")
        .into_inner();
    assert!(a.allowed, "{a:?}");
    // Another 0.6 cents would make 1.2 of the 1 an hour: refused until a
    // fifth of the hour has passed (12 minutes).
    let r = c
        .can_proceed(ask("m", 1000, 200))
        .await
        .expect("ok")
        .into_inner();
    assert!(!r.allowed);
    assert_eq!(r.reason(), proto::Reason::SpendLimit);
    let wait = secs(&r.retry_after);
    assert!(wait > 715.0 && wait <= 720.0, "{wait}");
    // The event fires once per episode, naming the scope.
    let e = next_sse(&mut events).expect("event");
    let v: serde_json::Value = serde_json::from_str(&e.data).expect("json");
    assert_eq!(
        (v["target"].as_str(), v["scope"].as_str()),
        (Some("m"), Some("target"))
    );
    assert_eq!(v["limit"].as_f64(), Some(0.01));
    let _ = c.can_proceed(ask("m", 1000, 200)).await.expect("ok");

    // The call really used 1000 in and 100 out: 0.45 cents; 0.15 refunded.
    let out = c
        .record_outcome(proto::RecordOutcomeRequest {
            target: "m".into(),
            permit: a.permit,
            outcome: proto::OutcomeClass::Success as i32,
            input_tokens: 1000,
            output_tokens: 100,
            ..Default::default()
        })
        .await
        .expect("record")
        .into_inner();
    assert!((out.cost - 0.0045).abs() < 1e-12, "{}", out.cost);
    // 0.45 + 0.6 > 1 still; 0.45 + 0.5 fits.
    let r = c
        .can_proceed(ask("m", 1000, 200))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.reason(), proto::Reason::SpendLimit);
    let fits = c
        .can_proceed(ask("m", 1000, 133))
        .await
        .expect("ok")
        .into_inner();
    assert!(fits.allowed, "{fits:?}");

    // GetTarget shows the total and every limit the target draws on.
    let t = s
        .admin()
        .await
        .get_target(proto::GetTargetRequest { target: "m".into() })
        .await
        .expect("get")
        .into_inner();
    let spend = t.spend.expect("spend");
    assert!((spend.total - 0.0045).abs() < 1e-12, "{spend:?}");
    let scopes: Vec<(&str, f64)> = spend
        .limits
        .iter()
        .map(|l| (l.scope.as_str(), l.limit))
        .collect();
    assert_eq!(scopes, vec![("target", 0.01), ("team", 0.02)]);
    let left = spend.limits[0].available;
    assert!(left > 0.0 && left < 0.0006, "{left}");

    // The group's limit is shared: n draws on the same two cents a day
    // (0.45 + 0.5 spent or reserved through m; 1.2 more does not fit).
    let r = c
        .can_proceed(ask("n", 4000, 0))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.reason(), proto::Reason::SpendLimit, "{r:?}");
    let e = next_sse(&mut events).expect("group event");
    let v: serde_json::Value = serde_json::from_str(&e.data).expect("json");
    assert_eq!(
        (v["target"].as_str(), v["scope"].as_str()),
        (Some("n"), Some("team"))
    );
    assert!(
        c.can_proceed(ask("n", 3000, 0))
            .await
            .expect("ok")
            .into_inner()
            .allowed
    );

    // A call that could never fit is not asked to wait.
    let r = c
        .can_proceed(ask("m", 1_000_000, 0))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.reason(), proto::Reason::RequestTooLarge);
    assert!(r.retry_after.is_none());

    // The dashboard's snapshot carries it too.
    let snap = s.http_get("/api/snapshot", &[]).1;
    let v: serde_json::Value = serde_json::from_str(&snap).expect("json");
    let m_json = v["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["target"] == "m"))
        .cloned()
        .expect("m in the snapshot");
    assert_eq!(m_json["spend"]["total"].as_f64(), Some(0.0045), "{m_json}");
    assert_eq!(m_json["spend"]["limits"][1]["scope"], "team");

    // The metric counts settled money.
    let m = s.http_get("/metrics", &[]).1;
    assert!(
        m.contains("backstop_spend_total{target=\"m\",caller=\"\"} 0.0045"),
        "{m}"
    );
}

/// Limits wider than a target: half a cent an hour through route `cheap`,
/// a cent an hour for caller `bot`, two cents an hour for tenant `acme`
/// (every `acme/` target). All at $3 / $15 per million tokens.
const SCOPES: &str = r#"
[tenants.acme]
spend_per_hour = 0.02
[callers."bot"]
spend_per_hour = 0.01
[routes.cheap]
targets = ["acme/a", "acme/b"]
spend = 0.005
window = "1h"
[targets."acme/a"]
cost_per_mtok_input = 3.0
cost_per_mtok_output = 15.0
[targets."acme/b"]
cost_per_mtok_input = 3.0
cost_per_mtok_output = 15.0
[targets."acme/c"]
cost_per_mtok_input = 3.0
cost_per_mtok_output = 15.0
[targets.free]
"#;

fn route(caller: &str, input: u64) -> proto::RouteRequest {
    proto::RouteRequest {
        route: "cheap".into(),
        caller: caller.into(),
        estimated_tokens: input,
        ..Default::default()
    }
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(f64::NAN)
}

/// A route's, a caller's and a tenant's spend limits hold across every
/// target they span: reserved at admission (all or nothing), refused with
/// SPEND_LIMIT naming the scope, settled with the real tokens through the
/// permit, shown in metrics, and kept across a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_caller_and_tenant_limits_span_targets() {
    let s = Server::start(SCOPES, &[]);
    let mut events = s.sse("/events?kinds=spend_limit_reached", &[]);
    assert_eq!(next_sse(&mut events).expect("snapshot").event, "snapshot");
    let mut c = s.resilience().await;

    // Route: 1000 in = 0.3 cents of the route's 0.5; a second does not fit
    // on either member (each would take the route past its limit).
    let first = c.route(route("", 1000)).await.expect("route").into_inner();
    assert_eq!(first.target, "acme/a", "{first:?}");
    let no = c.route(route("", 1000)).await.expect("route").into_inner();
    assert!(no.target.is_empty(), "{no:?}");
    let reasons: Vec<(&str, proto::Reason)> = no
        .skipped
        .iter()
        .map(|k| (k.target.as_str(), k.reason()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("acme/a", proto::Reason::SpendLimit),
            ("acme/b", proto::Reason::SpendLimit)
        ]
    );
    // 0.1 cents missing of 0.5 an hour: a fifth of the hour.
    let wait = secs(&no.retry_after);
    assert!(wait > 715.0 && wait <= 720.0, "{wait}");
    let e = next_sse(&mut events).expect("route event");
    let v: serde_json::Value = serde_json::from_str(&e.data).expect("json");
    assert_eq!(v["scope"].as_str(), Some("route:cheap"), "{v}");
    assert_eq!(v["limit"].as_f64(), Some(0.005));
    // The same target asked directly is not the route's business.
    let direct = c
        .can_proceed(ask("acme/a", 1000, 0))
        .await
        .expect("ok")
        .into_inner();
    assert!(direct.allowed, "{direct:?}");

    // The routed call really used 100 tokens in: 0.03 cents; 0.27 comes
    // back to the route (and the tenant), so the route has room again.
    let out = c
        .record_outcome(proto::RecordOutcomeRequest {
            target: "acme/a".into(),
            permit: first.permit,
            outcome: proto::OutcomeClass::Success as i32,
            input_tokens: 100,
            ..Default::default()
        })
        .await
        .expect("record")
        .into_inner();
    assert!((out.cost - 0.0003).abs() < 1e-12, "{}", out.cost);
    let again = c.route(route("", 1000)).await.expect("route").into_inner();
    assert_eq!(again.target, "acme/a", "{again:?}");

    // Caller: a cent an hour across targets; three 0.3-cent calls fit,
    // a fourth refuses naming the caller, on any target.
    let mut bot_permits = Vec::new();
    for t in ["acme/c", "acme/a", "acme/c"] {
        let a = c
            .can_proceed(proto::CanProceedRequest {
                caller: "bot".into(),
                ..ask(t, 1000, 0)
            })
            .await
            .expect("ok")
            .into_inner();
        assert!(a.allowed, "{t}: {a:?}");
        bot_permits.push((t, a.permit));
    }
    let r = c
        .can_proceed(proto::CanProceedRequest {
            caller: "bot".into(),
            ..ask("acme/c", 1000, 0)
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.reason(), proto::Reason::SpendLimit, "{r:?}");
    let e = next_sse(&mut events).expect("caller event");
    let v: serde_json::Value = serde_json::from_str(&e.data).expect("json");
    assert_eq!(
        (v["scope"].as_str(), v["target"].as_str()),
        (Some("caller:bot"), Some("acme/c"))
    );
    // Another caller is not held back by bot's limit (the tenant has room:
    // 0.03 + 0.3 (route) + 0.3 (direct) + 0.9 (bot) = 1.53 of 2 cents).
    let other = c
        .can_proceed(proto::CanProceedRequest {
            caller: "someone".into(),
            ..ask("acme/c", 1000, 0)
        })
        .await
        .expect("ok")
        .into_inner();
    assert!(other.allowed, "{other:?}");
    // Tenant: 1.83 of 2 cents now; 0.3 more refuses naming the tenant,
    // whoever asks and whichever acme target; other tenants' (and
    // tenant-less) targets are not affected.
    let r = c
        .can_proceed(ask("acme/b", 1000, 0))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.reason(), proto::Reason::SpendLimit, "{r:?}");
    let e = next_sse(&mut events).expect("tenant event");
    let v: serde_json::Value = serde_json::from_str(&e.data).expect("json");
    assert_eq!(v["scope"].as_str(), Some("tenant:acme"), "{v}");
    assert!(
        c.can_proceed(ask("free", 1000, 0))
            .await
            .expect("ok")
            .into_inner()
            .allowed
    );

    // bot's first call settles at its real cost with bot's label.
    let (t, p) = bot_permits.remove(0);
    c.record_outcome(proto::RecordOutcomeRequest {
        target: t.into(),
        permit: p,
        outcome: proto::OutcomeClass::Success as i32,
        input_tokens: 1000,
        output_tokens: 100,
        caller: "bot".into(),
        ..Default::default()
    })
    .await
    .expect("record");
    let m = s.http_get("/metrics", &[]).1;
    assert!(
        (metric(&m, "backstop_spend_total{target=\"acme/c\",caller=\"bot\"}") - 0.0045).abs()
            < 1e-9,
        "{m}"
    );
    assert!(
        (metric(&m, "backstop_spend_scope_spent{scope=\"caller:bot\"}") - 0.0045).abs() < 1e-9,
        "{m}"
    );
    assert!(
        (metric(&m, "backstop_spend_scope_spent{scope=\"route:cheap\"}") - 0.0003).abs() < 1e-9,
        "{m}"
    );
    // bot: 0.45 settled + 0.6 reserved = 1.05 of 1 cent: in debt.
    assert!(
        metric(&m, "backstop_spend_scope_remaining{scope=\"caller:bot\"}") < 0.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "backstop_spend_scope_refusals_total{scope=\"tenant:acme\"}"
        ) >= 1.0,
        "{m}"
    );

    // GetTarget lists the tenant's limit among those the target draws on.
    let t = s
        .admin()
        .await
        .get_target(proto::GetTargetRequest {
            target: "acme/c".into(),
        })
        .await
        .expect("get")
        .into_inner();
    let limits: Vec<(String, f64)> = t
        .spend
        .expect("spend")
        .limits
        .iter()
        .map(|l| (l.scope.clone(), l.limit))
        .collect();
    assert_eq!(limits, vec![("tenant:acme".to_string(), 0.02)]);

    // A call that could never fit the caller's cent is not asked to wait.
    let r = c
        .can_proceed(proto::CanProceedRequest {
            caller: "bot".into(),
            ..ask("acme/c", 10_000, 0)
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.reason(), proto::Reason::RequestTooLarge, "{r:?}");
    assert!(r.retry_after.is_none());
    // A report without a permit is not trusted here: a huge usage under
    // bot's name charges nothing to bot's limit.
    let before = metric(
        &s.http_get("/metrics", &[]).1,
        "backstop_spend_scope_spent{scope=\"caller:bot\"}",
    );
    c.record_outcome(proto::RecordOutcomeRequest {
        target: "acme/c".into(),
        outcome: proto::OutcomeClass::Success as i32,
        input_tokens: 1_000_000_000,
        caller: "bot".into(),
        ..Default::default()
    })
    .await
    .expect("record");
    let after = metric(
        &s.http_get("/metrics", &[]).1,
        "backstop_spend_scope_spent{scope=\"caller:bot\"}",
    );
    assert_eq!(before, after);

    // The dashboard's spend panel reads the same levels.
    let v: serde_json::Value =
        serde_json::from_str(&s.http_get("/api/spend", &[]).1).expect("json");
    let scopes: Vec<(&str, f64)> = v["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .map(|x| {
            (
                x["scope"].as_str().unwrap_or(""),
                x["limit"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    assert_eq!(
        scopes,
        vec![
            ("caller:bot", 0.01),
            ("route:cheap", 0.005),
            ("tenant:acme", 0.02)
        ]
    );
    assert!(
        v["scopes"][0]["available"].as_f64().unwrap_or(1.0) < 0.0,
        "{v}"
    );
    assert!(
        (v["scopes"][0]["spent"].as_f64().unwrap_or(0.0) - 0.0045).abs() < 1e-9,
        "{v}"
    );

    // A restart on the same data (graceful: levels are written behind, at
    // most a second old after a crash, like budget levels): the money stays spent.
    drop(c);
    drop(events);
    let mut s = s;
    assert!(s.terminate().success());
    let s = Server::start_in(s.into_dir(), SCOPES, &[]);
    let mut c = s.resilience().await;
    let r = c
        .can_proceed(proto::CanProceedRequest {
            caller: "bot".into(),
            ..ask("acme/c", 1000, 0)
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(
        r.reason(),
        proto::Reason::SpendLimit,
        "after a restart: {r:?}"
    );
}

/// Scope limits are checked like a target's: amounts, windows, names.
#[test]
fn scope_limits_are_validated() {
    for (toml, needle) in [
        ("[callers.bot]\n", "sets no limit"),
        ("[callers.bot]\nspend = 1.0\n", "needs a window"),
        ("[callers.bot]\nspend_per_day = -1.0\n", "above 0"),
        (
            "[tenants.a]\nspend_per_day = 1.0\nspend_per_hour = 1.0\n",
            "set one of",
        ),
        (
            "[targets.t]\n[routes.r]\ntargets = [\"t\"]\nwindow = \"1h\"\n",
            "window is set but spend is not",
        ),
    ] {
        let e = backstop::config::Config::parse(toml, "t.toml").expect_err(toml);
        assert!(e.to_string().contains(needle), "{toml}: {e}");
    }
    let ok = backstop::config::Config::parse(SCOPES, "t.toml").expect("valid");
    let mut keys: Vec<&str> = ok.spend_scopes.values().map(|s| s.key.as_ref()).collect();
    keys.sort();
    assert_eq!(keys, vec!["caller:bot", "route:cheap", "tenant:acme"]);
}

#[test]
fn a_spend_limit_on_an_unpriced_target_is_a_config_error() {
    let e = backstop::config::Config::parse("[targets.free]\nspend_per_day = 1.0\n", "t.toml")
        .expect_err("unpriced");
    assert!(e.to_string().contains("cost_per_mtok"), "{e}");
}

/// Cluster mode: two replicas on one real Redis share a caller's limit.
/// Twenty concurrent reservations spread over both admit exactly what the
/// limit holds (compare-and-set on the shared cell, not a per-replica
/// share), and a permit from one replica settles on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_scope_limits_through_redis() {
    let redis = common::Redis::start();
    let a = Server::start_replica(SCOPES, &redis.url(), &[]).await;
    let b = Server::start_replica(SCOPES, &redis.url(), &[]).await;
    let (ca, cb) = (a.resilience().await, b.resilience().await);
    let mut calls = Vec::new();
    for i in 0..20 {
        let mut c = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        calls.push(tokio::spawn(async move {
            let r = c
                .can_proceed(proto::CanProceedRequest {
                    caller: "bot".into(),
                    ..ask("acme/c", 1000, 0)
                })
                .await
                .expect("ok")
                .into_inner();
            (i % 2, r)
        }));
    }
    let mut allowed = Vec::new();
    for h in calls {
        let (replica, r) = h.await.expect("task");
        if r.allowed {
            allowed.push((replica, r.permit));
        } else {
            assert_eq!(r.reason(), proto::Reason::SpendLimit, "{r:?}");
            assert!(!r.degraded);
        }
    }
    // 0.3 cents each of a cent an hour: three, fleet-wide.
    assert_eq!(allowed.len(), 3, "{allowed:?}");
    // One admitted on a settles on b at a tenth of its reservation: room
    // for one more, on either replica.
    let (from, permit) = allowed.remove(0);
    let mut other = if from == 0 { cb.clone() } else { ca.clone() };
    other
        .record_outcome(proto::RecordOutcomeRequest {
            target: "acme/c".into(),
            permit,
            outcome: proto::OutcomeClass::Success as i32,
            input_tokens: 100,
            caller: "bot".into(),
            ..Default::default()
        })
        .await
        .expect("record");
    let mut c = if from == 0 { ca.clone() } else { cb.clone() };
    let more = c
        .can_proceed(proto::CanProceedRequest {
            caller: "bot".into(),
            ..ask("acme/c", 1000, 0)
        })
        .await
        .expect("ok")
        .into_inner();
    assert!(more.allowed, "the refund made room: {more:?}");
    let full = c
        .can_proceed(proto::CanProceedRequest {
            caller: "bot".into(),
            ..ask("acme/c", 1000, 0)
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(full.reason(), proto::Reason::SpendLimit);
}

/// Cluster mode: what a replica spends alone on a caller's limit while
/// Redis is frozen (degraded, at its half of the limit) is charged to the
/// shared cell when it merges back, so the fleet cannot spend the outage's
/// money twice: after the merge only what is left of the hour's cent is
/// admitted, on either replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_decided_alone_is_merged_back_into_the_shared_limit() {
    let redis = common::Redis::start();
    // A patient Redis timeout: spontaneous slowness on a loaded machine
    // must not make the answers after the merge degraded.
    let config = format!("{SCOPES}\n[cluster]\nredis_timeout = \"250ms\"\n");
    let a = Server::start_replica(&config, &redis.url(), &[]).await;
    let b = Server::start_replica(&config, &redis.url(), &[]).await;
    let (mut ca, mut cb) = (a.resilience().await, b.resilience().await);
    let bot = |target: &str| proto::CanProceedRequest {
        caller: "bot".into(),
        ..ask(target, 1000, 0)
    };

    // Each replica knows the other is live (its heartbeat), so alone it
    // takes half of each limit.
    for s in [&a, &b] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut admin = s.admin().await;
        while admin
            .get_cluster(proto::GetClusterRequest {})
            .await
            .expect("get_cluster")
            .into_inner()
            .replicas
            .len()
            < 2
        {
            assert!(
                std::time::Instant::now() < deadline,
                "replicas never saw each other"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // ... and has counted it (the count is refreshed with each heartbeat, every second).
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    redis.signal("STOP");
    // Alone, replica a has half of the cent: one call of 0.3 cents.
    let alone = ca
        .can_proceed(bot("acme/c"))
        .await
        .expect("ok")
        .into_inner();
    assert!(alone.allowed && alone.degraded, "{alone:?}");
    let second = ca
        .can_proceed(bot("acme/c"))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(second.reason(), proto::Reason::SpendLimit, "{second:?}");
    ca.record_outcome(proto::RecordOutcomeRequest {
        target: "acme/c".into(),
        permit: alone.permit,
        outcome: proto::OutcomeClass::Success as i32,
        input_tokens: 1000,
        caller: "bot".into(),
        ..Default::default()
    })
    .await
    .expect("record while degraded");
    redis.signal("CONT");
    for s in [&a, &b] {
        s.wait_cluster_ready().await;
    }

    // 1 cent − 0.3 spent alone = room for two more calls of 0.3, not three.
    let mut admitted = 0;
    for i in 0..4 {
        let c = if i % 2 == 0 { &mut cb } else { &mut ca };
        let r = c.can_proceed(bot("acme/c")).await.expect("ok").into_inner();
        assert!(!r.degraded, "call {i}: {r:?}");
        if r.allowed {
            admitted += 1;
        } else {
            assert_eq!(r.reason(), proto::Reason::SpendLimit, "call {i}: {r:?}");
        }
    }
    assert_eq!(
        admitted, 2,
        "the 0.3 cents spent alone count against the shared cent"
    );
}
