//! End-to-end: routing strategies and priorities against the real binary
//! (embedded, and two replicas sharing state through a real redis-server).

mod common;

use backstop::proto;
use common::{Redis, Server};
use proto::resilience_client::ResilienceClient;
use std::collections::HashMap;
use tonic::transport::Channel;

const CONFIG: &str = r#"
[targets.a]
requests_per_minute = 10
max_concurrency = 8
cost_per_mtok_input = 15.0
cost_per_mtok_output = 75.0
[targets.b]
requests_per_minute = 10
max_concurrency = 8
cost_per_mtok_input = 0.25
cost_per_mtok_output = 1.25
[targets.c]
[routes.weighted]
targets = ["w1", "w2"]
strategy = "weighted"
weights = [3, 1]
[routes.busy]
targets = ["a", "b"]
strategy = "least_busy"
[routes.fast]
targets = ["a", "b"]
strategy = "lowest_latency"
explore = 0.0
[routes.cheap]
targets = ["c", "a", "b"]
strategy = "lowest_cost"
expected_output_tokens = 500
[routes.room]
targets = ["a", "b"]
strategy = "most_headroom"
[targets.p]
requests_per_minute = 10
reserve = { interactive = 0.3 }
"#;

fn route(name: &str) -> proto::RouteRequest {
    proto::RouteRequest {
        route: name.into(),
        estimated_tokens: 1000,
        ..Default::default()
    }
}

async fn permit(c: &mut ResilienceClient<Channel>, target: &str) -> String {
    let a = c
        .can_proceed(proto::CanProceedRequest {
            target: target.into(),
            ..Default::default()
        })
        .await
        .expect("can_proceed")
        .into_inner();
    assert!(a.allowed, "{target}: {a:?}");
    a.permit
}

async fn succeed(c: &mut ResilienceClient<Channel>, target: &str, permit: String, ms: u64) {
    c.record_outcome(proto::RecordOutcomeRequest {
        target: target.into(),
        permit,
        outcome: proto::OutcomeClass::Success as i32,
        latency: Some(prost_types::Duration {
            seconds: (ms / 1000) as i64,
            nanos: ((ms % 1000) * 1_000_000) as i32,
        }),
        ..Default::default()
    })
    .await
    .expect("record");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_spreads_by_weight() {
    let s = Server::start(CONFIG, &[]);
    let mut c = s.resilience().await;
    let mut n: HashMap<String, u32> = HashMap::new();
    for _ in 0..800 {
        let r = c
            .route(route("weighted"))
            .await
            .expect("route")
            .into_inner();
        assert_eq!(r.strategy(), proto::RouteStrategy::Weighted);
        assert!(r.reason.starts_with("weighted: "), "{}", r.reason);
        assert!(r.reason.contains("drawn by weight"), "{}", r.reason);
        *n.entry(r.target).or_default() += 1;
    }
    let share = f64::from(n["w1"]) / 800.0;
    // 3:1 → 75 %; 800 draws put 5 standard deviations within ±8 points.
    assert!((share - 0.75).abs() < 0.08, "{n:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_busy_lowest_latency_lowest_cost_and_most_headroom_choose_as_named() {
    let s = Server::start(CONFIG, &[]);
    let mut c = s.resilience().await;

    // least_busy: two calls in flight on a → b.
    let held = [permit(&mut c, "a").await, permit(&mut c, "a").await];
    let r = c.route(route("busy")).await.expect("route").into_inner();
    assert_eq!(r.target, "b", "{r:?}");
    assert_eq!(r.strategy(), proto::RouteStrategy::LeastBusy);
    assert!(
        r.reason
            .contains("b has the fewest permits outstanding (0)"),
        "{}",
        r.reason
    );
    assert_eq!(r.fallback_depth, 0, "the strategy's first choice served");
    // Settle everything (a's two, and the route's own permit on b).
    for p in held {
        succeed(&mut c, "a", p, 900).await;
    }
    succeed(&mut c, "b", r.permit, 100).await;

    // lowest_latency: a answered in 900 ms, b in 100 ms → b; GetTarget shows it.
    let r = c.route(route("fast")).await.expect("route").into_inner();
    assert_eq!(r.target, "b", "{r:?}");
    assert!(
        r.reason.contains("b is the fastest recently (100 ms"),
        "{}",
        r.reason
    );
    succeed(&mut c, "b", r.permit, 100).await;
    let t = s
        .admin()
        .await
        .get_target(proto::GetTargetRequest { target: "a".into() })
        .await
        .expect("get")
        .into_inner();
    let lat = t.latency.expect("latency shown");
    assert_eq!((lat.seconds, lat.nanos / 1_000_000), (0, 900), "{lat:?}");

    // lowest_cost: b is the cheapest priced target; unpriced c is not "free".
    let r = c.route(route("cheap")).await.expect("route").into_inner();
    assert_eq!(r.target, "b", "{r:?}");
    assert_eq!(r.fallback_depth, 0);
    assert!(
        r.reason
            .contains("b is the cheapest for this request ($0.000875)"),
        "{}",
        r.reason
    );
    succeed(&mut c, "b", r.permit, 100).await;

    // most_headroom: b has used 3 of its 10 a minute, a 2 → a (80 % and a
    // little more refilled since).
    let r = c.route(route("room")).await.expect("route").into_inner();
    assert_eq!(r.target, "a", "{r:?}");
    assert!(
        r.reason.contains("a has the most budget left (8"),
        "{}",
        r.reason
    );

    // An ad-hoc list can name a strategy; an unknown one is refused.
    let r = c
        .route(proto::RouteRequest {
            candidates: vec!["a".into(), "b".into()],
            strategy: proto::RouteStrategy::LowestLatency as i32,
            ..Default::default()
        })
        .await
        .expect("route")
        .into_inner();
    // (Ad-hoc lists explore 5 % of the time: then the slower one, and it says so.)
    assert_eq!(r.strategy(), proto::RouteStrategy::LowestLatency);
    assert!(
        r.target == "b" || r.reason.contains("exploring: re-measuring a"),
        "{r:?}"
    );
    let e = c
        .route(proto::RouteRequest {
            candidates: vec!["a".into()],
            strategy: 42,
            ..Default::default()
        })
        .await
        .expect_err("unknown strategy");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("RouteStrategy"), "{}", e.message());
}

/// Every strategy still skips an open breaker and falls back through the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_skips_an_open_breaker() {
    let s = Server::start(CONFIG, &[]);
    let mut c = s.resilience().await;
    let mut admin = s.admin().await;
    admin
        .set_breaker_state(proto::SetBreakerStateRequest {
            target: "b".into(),
            mode: proto::BreakerMode::ForceOpen as i32,
            reason: "incident".into(),
        })
        .await
        .expect("force");
    for strategy in 1..=6 {
        let r = c
            .route(proto::RouteRequest {
                candidates: vec!["b".into(), "a".into()],
                strategy,
                ..Default::default()
            })
            .await
            .expect("route")
            .into_inner();
        assert_eq!(r.target, "a", "strategy {strategy}: {r:?}");
        assert_eq!(r.skipped.len(), 1, "{r:?}");
        assert_eq!(r.skipped[0].reason(), proto::Reason::ForcedOpen);
        assert!(
            r.reason.contains("a after skipping b (forced_open)"),
            "{}",
            r.reason
        );
        succeed(&mut c, "a", r.permit, 10).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_keeps_interactive_calls_flowing_when_batch_is_refused() {
    let s = Server::start(CONFIG, &[]);
    let mut c = s.resilience().await;
    let ask = |priority: proto::Priority| proto::CanProceedRequest {
        target: "p".into(),
        priority: priority as i32,
        ..Default::default()
    };
    for i in 0..7 {
        let a = c
            .can_proceed(ask(proto::Priority::Batch))
            .await
            .expect("ok")
            .into_inner();
        assert!(a.allowed, "batch call {i}: {a:?}");
    }
    let a = c
        .can_proceed(ask(proto::Priority::Batch))
        .await
        .expect("ok")
        .into_inner();
    assert!(!a.allowed);
    assert_eq!(a.reason(), proto::Reason::PriorityReserved);
    let wait = a.retry_after.expect("a wait");
    let secs = wait.seconds as f64 + f64::from(wait.nanos) / 1e9;
    // One request's worth of window (6 s), less the moments since the calls.
    assert!(secs > 5.0 && secs <= 6.0, "{wait:?}");
    // Unset priority is DEFAULT: below interactive, so refused too.
    let a = c
        .can_proceed(ask(proto::Priority::Unspecified))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(a.reason(), proto::Reason::PriorityReserved);
    for i in 0..3 {
        let a = c
            .can_proceed(ask(proto::Priority::Interactive))
            .await
            .expect("ok")
            .into_inner();
        assert!(a.allowed, "interactive call {i}: {a:?}");
    }
    let a = c
        .can_proceed(ask(proto::Priority::Interactive))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(
        a.reason(),
        proto::Reason::RateLimited,
        "now the budget itself is empty"
    );
    // Route carries the priority too.
    let r = c
        .route(proto::RouteRequest {
            candidates: vec!["p".into()],
            priority: proto::Priority::Batch as i32,
            ..Default::default()
        })
        .await
        .expect("route")
        .into_inner();
    assert!(r.target.is_empty());
    assert_eq!(r.skipped[0].reason(), proto::Reason::RateLimited);
    let e = c
        .can_proceed(proto::CanProceedRequest {
            target: "p".into(),
            priority: 99,
            ..Default::default()
        })
        .await
        .expect_err("unknown priority");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("Priority"), "{}", e.message());
}

/// In cluster mode the latency a strategy reads is shared state: reported
/// on one replica, it steers Route on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_what_strategies_read() {
    let redis = Redis::start();
    let one = Server::start_replica(CONFIG, &redis.url(), &[]).await;
    let two = Server::start_replica(CONFIG, &redis.url(), &[]).await;
    let (mut c1, mut c2) = (one.resilience().await, two.resilience().await);
    let pa = permit(&mut c1, "a").await;
    let pb = permit(&mut c1, "b").await;
    succeed(&mut c1, "a", pa, 50).await;
    succeed(&mut c1, "b", pb, 700).await;
    let r = c2.route(route("fast")).await.expect("route").into_inner();
    assert_eq!(r.target, "a", "{r:?}");
    assert!(
        r.reason.contains("a is the fastest recently (50 ms"),
        "{}",
        r.reason
    );
    // And the budget reserve holds across replicas: 7 batch calls in all.
    let ask = proto::CanProceedRequest {
        target: "p".into(),
        priority: proto::Priority::Batch as i32,
        ..Default::default()
    };
    let mut allowed = 0;
    for i in 0..10 {
        let c = if i % 2 == 0 { &mut c1 } else { &mut c2 };
        if c.can_proceed(ask.clone())
            .await
            .expect("ok")
            .into_inner()
            .allowed
        {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 7);
}

/// Claim takes a priority too: a background drain claiming as batch is held
/// back by the reserve, an interactive worker is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_admits_deliveries_at_the_workers_priority() {
    let s = Server::start(CONFIG, &[]);
    let mut c = s.resilience().await;
    for _ in 0..7 {
        let a = c
            .can_proceed(proto::CanProceedRequest {
                target: "p".into(),
                priority: proto::Priority::Batch as i32,
                ..Default::default()
            })
            .await
            .expect("ok")
            .into_inner();
        assert!(a.allowed);
    }
    let mut q = proto::deferred_client::DeferredClient::new(s.channel().await);
    q.defer(proto::DeferRequest {
        queue: "p".into(),
        payload: b"later".to_vec(),
        ..Default::default()
    })
    .await
    .expect("defer");
    let claim = |priority: proto::Priority| proto::ClaimRequest {
        queue: "p".into(),
        max_items: 1,
        worker: "drain".into(),
        priority: priority as i32,
        ..Default::default()
    };
    let r = q
        .claim(claim(proto::Priority::Batch))
        .await
        .expect("claim")
        .into_inner();
    assert!(r.items.is_empty(), "{r:?}");
    assert_eq!(r.blocked_reason(), proto::Reason::PriorityReserved);
    let r = q
        .claim(claim(proto::Priority::Interactive))
        .await
        .expect("claim")
        .into_inner();
    assert_eq!(r.items.len(), 1, "{r:?}");
    assert_eq!(r.items[0].payload, b"later".to_vec());
}
