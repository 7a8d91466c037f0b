//! End-to-end: the real `backstop` binary on ephemeral ports, driven over gRPC.

mod common;

use backstop::proto;
use common::{Server, TempDir, binary};
use std::time::Duration;
use tonic::Code;

const CONFIG: &str = r#"
[defaults.breaker]
failure_threshold = 5
success_threshold = 2
open_duration = "1s"
half_open_max_probes = 2
probe_lease = "30s"

[targets."anthropic/claude-sonnet"]
context_window = 200000
max_tokens = 8096
cost_per_mtok_input = 3.0
cost_per_mtok_output = 15.0

[targets."openai/gpt-4o"]
context_window = 128000
max_tokens = 4096

[targets."anthropic/claude-haiku"]
context_window = 8000

[routes.chat]
targets = ["anthropic/claude-sonnet", "openai/gpt-4o", "anthropic/claude-haiku"]
"#;

fn can(target: &str) -> proto::CanProceedRequest {
    proto::CanProceedRequest {
        target: target.into(),
        ..Default::default()
    }
}

fn outcome(target: &str, permit: &str, status: i32) -> proto::RecordOutcomeRequest {
    proto::RecordOutcomeRequest {
        target: target.into(),
        permit: permit.into(),
        http_status: status,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_share_one_breaker_and_probes_are_limited_fleet_wide() {
    let server = Server::start(CONFIG, &[]);
    let target = "anthropic/claude-sonnet";
    // 50 concurrent agents each make a call that fails with a 529.
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut c = server.resilience().await;
        tasks.push(tokio::spawn(async move {
            let a = c
                .can_proceed(can(target))
                .await
                .expect("can_proceed")
                .into_inner();
            if a.allowed {
                let mut o = outcome(target, &a.permit, 529);
                o.caller = format!("agent-{i}");
                o.error_type = "overloaded_error".into();
                c.record_outcome(o).await.expect("record").into_inner();
            }
            a.allowed
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        admitted += usize::from(t.await.expect("task"));
    }
    assert!(
        admitted >= 5,
        "at least the threshold got through before it opened ({admitted})"
    );
    let mut c = server.resilience().await;
    let refused = c.can_proceed(can(target)).await.expect("ok").into_inner();
    assert!(!refused.allowed);
    assert_eq!(refused.reason(), proto::Reason::CircuitOpen);
    assert_eq!(refused.state(), proto::BreakerState::Open);
    let ra = refused.retry_after.expect("retry_after");
    assert!(ra.seconds == 0 && ra.nanos > 0 || ra.seconds == 1, "{ra:?}");

    // Wait out the open period, then 50 agents race: exactly 2 probes fleet-wide.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut c = server.resilience().await;
        tasks.push(tokio::spawn(async move {
            c.can_proceed(can(target))
                .await
                .expect("can_proceed")
                .into_inner()
        }));
    }
    let mut probes = Vec::new();
    for t in tasks {
        let a = t.await.expect("task");
        if a.allowed {
            probes.push(a);
        } else {
            assert_eq!(a.reason(), proto::Reason::ProbeLimit);
        }
    }
    assert_eq!(probes.len(), 2, "exactly half_open_max_probes probes");
    assert!(
        probes
            .iter()
            .all(|p| p.state() == proto::BreakerState::HalfOpen)
    );
    // Two probe successes close it for everyone.
    let r1 = c
        .record_outcome(outcome(target, &probes[0].permit, 200))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r1.state(), proto::BreakerState::HalfOpen);
    let r2 = c
        .record_outcome(outcome(target, &probes[1].permit, 200))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r2.state(), proto::BreakerState::Closed);
    assert!(
        c.can_proceed(can(target))
            .await
            .expect("ok")
            .into_inner()
            .allowed
    );

    let mut admin = server.admin().await;
    let status = admin
        .get_target(proto::GetTargetRequest {
            target: target.into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(status.state(), proto::BreakerState::Closed);
    let counters = status.counters.expect("counters");
    assert_eq!(counters.transient as usize, admitted);
    assert!(
        status.last_cause.contains("probe successes"),
        "{}",
        status.last_cause
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_falls_back_past_an_open_primary_and_a_small_context_window() {
    let server = Server::start(CONFIG, &[]);
    let mut c = server.resilience().await;
    let mut admin = server.admin().await;
    let chat = |ctx: u64| proto::RouteRequest {
        route: "chat".into(),
        required_context_tokens: ctx,
        ..Default::default()
    };
    let r = c.route(chat(1000)).await.expect("route").into_inner();
    assert_eq!(
        (r.target.as_str(), r.fallback_depth),
        ("anthropic/claude-sonnet", 0)
    );
    assert_eq!(r.max_tokens, 8096);
    assert_eq!(r.cost_per_mtok_output, 15.0);
    assert!(!r.permit.is_empty());

    admin
        .set_breaker_state(proto::SetBreakerStateRequest {
            target: "anthropic/claude-sonnet".into(),
            mode: proto::BreakerMode::ForceOpen as i32,
            reason: "provider incident".into(),
        })
        .await
        .expect("force");
    let r = c.route(chat(1000)).await.expect("route").into_inner();
    assert_eq!((r.target.as_str(), r.fallback_depth), ("openai/gpt-4o", 1));
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].reason(), proto::Reason::ForcedOpen);

    // gpt-4o fails five times and opens: with a 150k-token context only the
    // primary (forced open) would fit, haiku is too small.
    for _ in 0..5 {
        c.record_outcome(outcome("openai/gpt-4o", "", 503))
            .await
            .expect("ok");
    }
    let r = c.route(chat(100_000)).await.expect("route").into_inner();
    assert!(r.target.is_empty());
    let reasons: Vec<(String, proto::Reason)> = r
        .skipped
        .iter()
        .map(|s| (s.target.clone(), s.reason()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            ("anthropic/claude-sonnet".into(), proto::Reason::ForcedOpen),
            ("openai/gpt-4o".into(), proto::Reason::CircuitOpen),
            (
                "anthropic/claude-haiku".into(),
                proto::Reason::ContextTooSmall
            ),
        ]
    );
    assert!(
        r.retry_after.is_some(),
        "the soonest candidate: gpt-4o's reopen"
    );
    // A small request falls through to haiku.
    let r = c.route(chat(1000)).await.expect("route").into_inner();
    assert_eq!(
        (r.target.as_str(), r.fallback_depth),
        ("anthropic/claude-haiku", 2)
    );
    // Ad-hoc candidates with exclude.
    let r = c
        .route(proto::RouteRequest {
            candidates: vec!["x/a".into(), "x/b".into()],
            exclude: vec!["x/a".into()],
            ..Default::default()
        })
        .await
        .expect("route")
        .into_inner();
    assert_eq!(r.target, "x/b");
    assert_eq!(r.skipped[0].reason(), proto::Reason::Excluded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_statuses_and_the_server_keeps_serving() {
    let server = Server::start(
        "[server]\nadmin_token = \"0123456789abcdef\"\n[routes.chat]\ntargets = [\"a\"]\n",
        &[],
    );
    let mut c = server.resilience().await;
    let cases: Vec<(Code, tonic::Status)> = vec![
        (
            Code::InvalidArgument,
            c.can_proceed(can("")).await.expect_err("empty target"),
        ),
        (
            Code::InvalidArgument,
            c.can_proceed(can(&"x".repeat(300)))
                .await
                .expect_err("long target"),
        ),
        (
            Code::NotFound,
            c.route(proto::RouteRequest {
                route: "nope".into(),
                ..Default::default()
            })
            .await
            .expect_err("unknown route"),
        ),
        (
            Code::InvalidArgument,
            c.record_outcome(proto::RecordOutcomeRequest {
                target: "a".into(),
                outcome: 99,
                ..Default::default()
            })
            .await
            .expect_err("bad enum"),
        ),
        (
            Code::InvalidArgument,
            c.record_outcome(outcome("a", "not-a-permit", 200))
                .await
                .expect_err("bad permit"),
        ),
        (
            Code::InvalidArgument,
            c.record_outcome(proto::RecordOutcomeRequest {
                target: "a".into(),
                http_status: 200,
                latency: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .expect_err("negative latency"),
        ),
        (
            Code::InvalidArgument,
            c.can_proceed_batch(proto::CanProceedBatchRequest {
                items: vec![can("a"); 1001],
            })
            .await
            .expect_err("oversized batch"),
        ),
    ];
    for (want, got) in cases {
        assert_eq!(got.code(), want, "{got:?}");
        assert!(
            got.message().len() > 20,
            "a message a person can act on: {:?}",
            got.message()
        );
    }
    // Admin needs the token.
    let mut admin = server.admin().await;
    let denied = admin
        .list_targets(proto::ListTargetsRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(denied.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(proto::ListTargetsRequest::default());
    req.metadata_mut().insert(
        "authorization",
        "Bearer 0123456789abcdef".parse().expect("header"),
    );
    assert!(admin.list_targets(req).await.is_ok());
    // A batch reports per-item errors in order.
    let b = c
        .can_proceed_batch(proto::CanProceedBatchRequest {
            items: vec![can("a"), can(""), can("b")],
        })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(b.items.len(), 3);
    assert!(
        matches!(&b.items[0].result, Some(proto::can_proceed_result::Result::Ok(r)) if r.allowed)
    );
    assert!(
        matches!(&b.items[1].result, Some(proto::can_proceed_result::Result::Error(e)) if e.code == Code::InvalidArgument as i32)
    );
    assert!(matches!(
        &b.items[2].result,
        Some(proto::can_proceed_result::Result::Ok(_))
    ));
    // Still serving.
    assert!(
        c.can_proceed(can("a"))
            .await
            .expect("ok")
            .into_inner()
            .allowed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    let mut server = Server::start("", &[]);
    let mut c = server.resilience().await;
    assert!(
        c.can_proceed(can("a"))
            .await
            .expect("ok")
            .into_inner()
            .allowed
    );
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn check_config_rejects_a_bad_file_with_the_line() {
    let dir = TempDir::new("cfg");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:1\"\n\n[targets.a]\nbreaker = { failure_threshold = 0 }\n",
    )
    .expect("write");
    let out = std::process::Command::new(binary())
        .args(["check-config"])
        .arg(&bad)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:5:"), "{err}");
    assert!(err.contains("positive integer"), "{err}");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, CONFIG).expect("write");
    let out = std::process::Command::new(binary())
        .args(["check-config"])
        .arg(&good)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let server = Server::start("", &[]);
    let channel = server.channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let s = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "backstop.v1.Resilience".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        s.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream.message().await.expect("message").expect("some");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "backstop.v1.Resilience",
        "backstop.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
}

#[test]
fn the_shipped_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/backstop.example.toml");
    let out = std::process::Command::new(binary())
        .args(["check-config", example])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}
