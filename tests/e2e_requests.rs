//! End-to-end: user requests named by `request_id` are measured from first
//! admission to finish, retries and fallbacks included, and exported as
//! backstop_requests_total / backstop_request_duration_seconds /
//! backstop_request_attempts against the real binary.

mod common;

use backstop::proto;
use common::Server;
use std::time::Duration;

const CONFIG: &str = r#"
[server]
request_ttl = "1s"
[routes.chat]
targets = ["a", "b"]
[targets.a]
[targets.b]
"#;

/// The value of one exposition sample (exact name and label text), or 0.
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

fn secs(d: &Option<prost_types::Duration>) -> f64 {
    d.as_ref()
        .map_or(-1.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

fn route(id: &str, exclude: &[&str], attempt: u32) -> proto::RouteRequest {
    proto::RouteRequest {
        route: "chat".into(),
        request_id: id.into(),
        exclude: exclude.iter().map(|s| s.to_string()).collect(),
        attempt,
        ..Default::default()
    }
}

fn outcome(target: &str, permit: String, id: &str, status: i32) -> proto::RecordOutcomeRequest {
    proto::RecordOutcomeRequest {
        target: target.into(),
        permit,
        http_status: status,
        request_id: id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_measured_across_its_retries_and_fallbacks() {
    let s = Server::start(CONFIG, &[]);
    let mut c = s.resilience().await;

    // Born at zero: the first failure is an increase Prometheus can see.
    let m0 = s.http_get("/metrics", &[]).1;
    assert!(
        m0.contains("backstop_requests_total{route=\"chat\",result=\"failed\"} 0"),
        "{m0}"
    );

    // a fails with a 503, the request falls back to b, which answers.
    let r1 = c
        .route(route("req-1", &[], 0))
        .await
        .expect("route")
        .into_inner();
    assert_eq!(r1.target, "a");
    c.record_outcome(outcome("a", r1.permit, "req-1", 503))
        .await
        .expect("outcome");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r2 = c
        .route(route("req-1", &["a"], 1))
        .await
        .expect("route")
        .into_inner();
    assert_eq!(r2.target, "b");
    let mut last = outcome("b", r2.permit, "req-1", 200);
    last.finish = proto::RequestResult::Completed as i32;
    c.record_outcome(last).await.expect("outcome");

    // Finishing again (a retried call) counts nothing and repeats the answer.
    let again = c
        .finish_request(proto::FinishRequestRequest {
            request_id: "req-1".into(),
            result: proto::RequestResult::Failed as i32,
            ..Default::default()
        })
        .await
        .expect("finish")
        .into_inner();
    assert!(again.tracked && again.duplicate, "{again:?}");
    assert_eq!(again.attempts, 2);
    assert_eq!(again.route, "chat");
    let took = secs(&again.duration);
    assert!((0.3..5.0).contains(&took), "measured {took} s");

    // A CanProceed-only request that fails is counted under "direct".
    let a = c
        .can_proceed(proto::CanProceedRequest {
            target: "a".into(),
            request_id: "req-2".into(),
            ..Default::default()
        })
        .await
        .expect("admit")
        .into_inner();
    c.record_outcome(outcome("a", a.permit, "req-2", 500))
        .await
        .expect("outcome");
    let f = c
        .finish_request(proto::FinishRequestRequest {
            request_id: "req-2".into(),
            result: proto::RequestResult::Failed as i32,
            ..Default::default()
        })
        .await
        .expect("finish")
        .into_inner();
    assert!(f.tracked && !f.duplicate);
    assert_eq!((f.route.as_str(), f.attempts), ("direct", 1));

    // Never seen here (another replica, or expired): the client's measure
    // counts, under a configured route only.
    for (name, label) in [("chat", "chat"), ("no-such-route", "direct")] {
        let f = c
            .finish_request(proto::FinishRequestRequest {
                request_id: format!("elsewhere-{name}"),
                result: proto::RequestResult::Deferred as i32,
                route: name.into(),
                elapsed: Some(prost_types::Duration {
                    seconds: 3,
                    nanos: 0,
                }),
                attempts: 2,
            })
            .await
            .expect("finish")
            .into_inner();
        assert!(!f.tracked);
        assert_eq!(f.route, label);
        // The client's 3 s is clamped to request_ttl (1 s here): a request
        // older than that would have expired.
        assert_eq!(secs(&f.duration), 1.0);
    }

    let m = s.http_get("/metrics", &[]).1;
    let total = |route: &str, result: &str| {
        sample(
            &m,
            &format!("backstop_requests_total{{route=\"{route}\",result=\"{result}\"}}"),
        )
    };
    assert_eq!(total("chat", "completed"), 1.0, "{m}");
    assert_eq!(total("chat", "failed"), 0.0);
    assert_eq!(total("direct", "failed"), 1.0);
    assert_eq!(total("chat", "deferred"), 1.0);
    assert_eq!(total("direct", "deferred"), 1.0);
    assert!(!m.contains("no-such-route"));
    assert_eq!(
        sample(&m, "backstop_request_attempts_sum{route=\"chat\"}"),
        4.0,
        "2 measured + 2 reported by the client"
    );
    assert_eq!(
        sample(
            &m,
            "backstop_request_duration_seconds_count{route=\"chat\"}"
        ),
        2.0
    );
    let sum = sample(&m, "backstop_request_duration_seconds_sum{route=\"chat\"}");
    assert!((1.3..6.0).contains(&sum), "duration sum {sum}");

    // The dashboard's route panel shows the same end-to-end figures.
    let (_, body) = s.http_get("/api/routes", &[]);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let q = &v["routes"][0]["requests"];
    assert_eq!(v["routes"][0]["route"], "chat", "{v}");
    assert_eq!(
        (q["completed"].as_u64(), q["deferred"].as_u64()),
        (Some(1), Some(1)),
        "{q}"
    );
    assert_eq!(q["failed"].as_u64(), Some(0));
    assert!(
        (q["mean_attempts"].as_f64().unwrap_or(0.0) - 2.0).abs() < 1e-9,
        "{q}"
    );
    assert!(q["p99_s"].as_f64().is_some_and(|p| p > 0.3), "{q}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_ids_are_refused_before_anything_changes_and_open_ones_expire() {
    let s = Server::start(CONFIG, &[]);
    let mut c = s.resilience().await;
    let long = "x".repeat(129);

    let e = c
        .can_proceed(proto::CanProceedRequest {
            target: "a".into(),
            request_id: long.clone(),
            ..Default::default()
        })
        .await
        .expect_err("too long");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("request_id"), "{}", e.message());

    // A finish without an id is refused and the 503 is not applied: five of
    // them would otherwise open a's breaker.
    for _ in 0..6 {
        let mut o = outcome("a", String::new(), "", 503);
        o.finish = proto::RequestResult::Failed as i32;
        let e = c.record_outcome(o).await.expect_err("finish without id");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
    let mut o = outcome("a", String::new(), &long, 503);
    o.finish = 0;
    assert_eq!(
        c.record_outcome(o).await.expect_err("long").code(),
        tonic::Code::InvalidArgument
    );
    let mut o = outcome("a", String::new(), "r", 503);
    o.finish = 99;
    assert_eq!(
        c.record_outcome(o)
            .await
            .expect_err("unknown result")
            .code(),
        tonic::Code::InvalidArgument
    );
    let t = s
        .admin()
        .await
        .get_target(proto::GetTargetRequest { target: "a".into() })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(t.state, proto::BreakerState::Closed as i32, "{t:?}");
    assert_eq!(t.consecutive_failures, 0, "no refused report was applied");

    for (id, result) in [("", 1), ("r", 0)] {
        let e = c
            .finish_request(proto::FinishRequestRequest {
                request_id: id.into(),
                result,
                ..Default::default()
            })
            .await
            .expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    }

    // Opened and never finished: expired after request_ttl (1 s) by the
    // server's once-a-second sweep.
    c.route(route("abandoned", &[], 0)).await.expect("route");
    let mut expired = 0.0;
    for _ in 0..50 {
        let m = s.http_get("/metrics", &[]).1;
        expired = sample(
            &m,
            "backstop_requests_total{route=\"chat\",result=\"expired\"}",
        );
        if expired > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(expired, 1.0);
}
