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
        m.contains("backstop_spend_total{target=\"m\"} 0.0045"),
        "{m}"
    );
}

#[test]
fn a_spend_limit_on_an_unpriced_target_is_a_config_error() {
    let e = backstop::config::Config::parse("[targets.free]\nspend_per_day = 1.0\n", "t.toml")
        .expect_err("unpriced");
    assert!(e.to_string().contains("cost_per_mtok"), "{e}");
}
