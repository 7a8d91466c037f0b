//! End-to-end: quorum tripping (`min_distinct_callers`) on the real binary
//! over gRPC. One caller failing on and on must not open a breaker the whole
//! fleet shares; failures from enough distinct callers do. Callers are named
//! by `caller`, or, when a report names none, by the principal it was
//! authenticated as. Also in cluster mode, where the set of recent failing
//! callers travels through Redis with the rest of the target's state.

mod common;

use backstop::proto;
use common::{Redis, Server, sha256_hex as sha};
use tonic::Request;
use tonic::transport::Channel;

type Client = proto::resilience_client::ResilienceClient<Channel>;

const CONFIG: &str = r#"
[targets.m]
breaker = { failure_threshold = 5, min_distinct_callers = 3, open_duration = "10m" }
"#;

/// Admits a call to `target` (asserting it is allowed) and reports a 503 for
/// it as `caller`; returns the report's answer.
async fn fail_as(c: &mut Client, target: &str, caller: &str) -> proto::RecordOutcomeResponse {
    let a = c
        .can_proceed(proto::CanProceedRequest {
            target: target.into(),
            caller: caller.into(),
            ..Default::default()
        })
        .await
        .expect("can_proceed")
        .into_inner();
    assert!(a.allowed, "{caller}: {a:?}");
    c.record_outcome(proto::RecordOutcomeRequest {
        target: target.into(),
        permit: a.permit,
        http_status: 503,
        caller: caller.into(),
        ..Default::default()
    })
    .await
    .expect("record_outcome")
    .into_inner()
}

async fn status(server: &Server, target: &str) -> proto::TargetStatus {
    server
        .admin()
        .await
        .get_target(proto::GetTargetRequest {
            target: target.into(),
        })
        .await
        .expect("get_target")
        .into_inner()
}

async fn allowed(c: &mut Client, target: &str) -> proto::CanProceedResponse {
    c.can_proceed(proto::CanProceedRequest {
        target: target.into(),
        ..Default::default()
    })
    .await
    .expect("can_proceed")
    .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_cannot_open_the_fleets_breaker_three_can() {
    let server = Server::start(CONFIG, &["--ephemeral"]);
    let mut c = server.resilience().await;
    for i in 0..50 {
        let r = fail_as(&mut c, "m", "a").await;
        assert_eq!(r.classified_as(), proto::OutcomeClass::Transient);
        assert_eq!(r.state(), proto::BreakerState::Closed, "failure {i}");
        // The failing caller is still told to back off and retry.
        let advice = r.retry.expect("advice");
        assert!(advice.retry, "{advice:?}");
        assert_eq!(advice.reason(), proto::RetryReason::Retryable);
    }
    assert!(allowed(&mut c, "m").await.allowed);
    let s = status(&server, "m").await;
    assert_eq!(s.state(), proto::BreakerState::Closed);
    assert_eq!(s.consecutive_failures, 50);
    assert!(
        s.last_cause
            .contains("50 consecutive transient failures, but from 1 caller of the 3 needed"),
        "{}",
        s.last_cause
    );

    fail_as(&mut c, "m", "b").await;
    assert_eq!(
        status(&server, "m").await.state(),
        proto::BreakerState::Closed
    );
    let r = fail_as(&mut c, "m", "c").await;
    assert_eq!(r.state(), proto::BreakerState::Open);
    let a = allowed(&mut c, "m").await;
    assert!(!a.allowed);
    assert_eq!(a.reason(), proto::Reason::CircuitOpen);
    let s = status(&server, "m").await;
    assert_eq!(s.state(), proto::BreakerState::Open);
    assert!(
        s.last_cause.starts_with("52 consecutive"),
        "{}",
        s.last_cause
    );
}

fn with<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

/// Reports that name no caller are the principal's: one agent's failures
/// through RecordOutcome, RecordOutcomeBatch and Decide are one caller
/// (were any of them anonymous, it would be a second one and open it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_without_a_caller_are_their_principals() {
    let config = format!(
        r#"
[[auth.principals]]
name = "agent-1"
roles = ["agent"]
token_sha256 = "{}"

[[auth.principals]]
name = "agent-2"
roles = ["agent"]
token_sha256 = "{}"

[[auth.principals]]
name = "oncall"
roles = ["viewer"]
token_sha256 = "{}"

[targets.m]
breaker = {{ failure_threshold = 3, min_distinct_callers = 2 }}
"#,
        sha("agent-one-token-0000"),
        sha("agent-two-token-0000"),
        sha("oncall-token-000000"),
    );
    let server = Server::start(&config, &["--ephemeral"]);
    let mut c = server.resilience().await;
    let report = || proto::RecordOutcomeRequest {
        target: "m".into(),
        http_status: 503,
        ..Default::default()
    };
    let one = "agent-one-token-0000";
    for _ in 0..5 {
        c.record_outcome(with(one, report()))
            .await
            .expect("record_outcome");
    }
    c.record_outcome_batch(with(
        one,
        proto::RecordOutcomeBatchRequest {
            items: vec![report(), report()],
        },
    ))
    .await
    .expect("batch");
    let item = proto::DecideRequest {
        id: 1,
        request: Some(proto::decide_request::Request::RecordOutcome(report())),
        ..Default::default()
    };
    let mut answers = c
        .decide(with(one, tokio_stream::iter(vec![item])))
        .await
        .expect("decide")
        .into_inner();
    let answer = answers.message().await.expect("stream").expect("an answer");
    assert!(
        matches!(
            answer.response,
            Some(proto::decide_response::Response::RecordOutcome(_))
        ),
        "{answer:?}"
    );

    let mut admin = server.admin().await;
    let get = || {
        with(
            "oncall-token-000000",
            proto::GetTargetRequest { target: "m".into() },
        )
    };
    let s = admin.get_target(get()).await.expect("get").into_inner();
    assert_eq!(s.state(), proto::BreakerState::Closed, "{}", s.last_cause);
    assert_eq!(s.consecutive_failures, 8);
    assert!(
        s.last_cause.contains("from 1 caller of the 2 needed"),
        "{}",
        s.last_cause
    );

    let r = c
        .record_outcome(with("agent-two-token-0000", report()))
        .await
        .expect("record_outcome")
        .into_inner();
    assert_eq!(r.state(), proto::BreakerState::Open);
    let s = admin.get_target(get()).await.expect("get").into_inner();
    assert_eq!(s.state(), proto::BreakerState::Open);
}

/// Two replicas on one Redis: the callers one replica saw fail are in the
/// shared state the other decides on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_cluster_mode_callers_seen_by_any_replica_count() {
    let redis = Redis::start();
    let url = redis.url();
    let a = Server::start_replica(CONFIG, &url, &[]).await;
    let b = Server::start_replica(CONFIG, &url, &[]).await;
    let (mut ca, mut cb) = (a.resilience().await, b.resilience().await);
    for i in 0..20 {
        let c = if i % 2 == 0 { &mut ca } else { &mut cb };
        let r = fail_as(c, "m", "a").await;
        assert_eq!(r.state(), proto::BreakerState::Closed, "failure {i}");
        assert!(!r.degraded);
    }
    for s in [&a, &b] {
        let st = status(s, "m").await;
        assert_eq!(st.state(), proto::BreakerState::Closed);
        assert_eq!(st.consecutive_failures, 20);
    }
    fail_as(&mut ca, "m", "b").await;
    let r = fail_as(&mut cb, "m", "c").await;
    assert_eq!(r.state(), proto::BreakerState::Open);
    for c in [&mut ca, &mut cb] {
        let adm = allowed(c, "m").await;
        assert!(!adm.allowed);
        assert_eq!(adm.reason(), proto::Reason::CircuitOpen);
    }
}
