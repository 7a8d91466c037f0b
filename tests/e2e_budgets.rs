//! End-to-end: fleet-wide budgets and provider signals against the real binary.

mod common;

use backstop::proto;
use common::Server;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn can(target: &str) -> proto::CanProceedRequest {
    proto::CanProceedRequest {
        target: target.into(),
        ..Default::default()
    }
}

fn secs_f64(d: &prost_types::Duration) -> f64 {
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_never_exceed_requests_per_minute() {
    let server = Server::start(
        "[targets.\"openai/gpt-4o\"]\nrequests_per_minute = 600\n",
        &[],
    );
    let admitted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let run_for = Duration::from_millis(2500);
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut c = server.resilience().await;
        let admitted = admitted.clone();
        tasks.push(tokio::spawn(async move {
            let mut last_admit = start;
            while start.elapsed() < run_for {
                let a = c
                    .can_proceed(can("openai/gpt-4o"))
                    .await
                    .expect("ok")
                    .into_inner();
                if a.allowed {
                    admitted.fetch_add(1, Ordering::Relaxed);
                    last_admit = Instant::now();
                } else {
                    assert_eq!(a.reason(), proto::Reason::RateLimited);
                    let wait = a.retry_after.as_ref().map_or(0.0, secs_f64);
                    assert!(wait > 0.0 && wait <= 0.1 + 1e-9, "retry_after {wait}");
                    tokio::time::sleep(Duration::from_secs_f64(wait.min(0.05))).await;
                }
            }
            last_admit
        }));
    }
    let mut last = start;
    for t in tasks {
        last = last.max(t.await.expect("task"));
    }
    let elapsed = last.duration_since(start).as_secs_f64();
    let n = admitted.load(Ordering::Relaxed) as f64;
    // The bucket holds 600 and refills at 10/s: over `elapsed` at most 600 + 10·elapsed.
    let allowed = 600.0 + 10.0 * elapsed;
    assert!(n <= allowed + 1.0, "admitted {n} > budget {allowed:.1}");
    assert!(
        n >= allowed - 10.0,
        "admitted {n}, far below the budget {allowed:.1}: the budget must also admit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_remaining_zero_pauses_every_client() {
    let server = Server::start("", &[]);
    let mut reporter = server.resilience().await;
    let a = reporter
        .can_proceed(can("openai/gpt-4o"))
        .await
        .expect("ok")
        .into_inner();
    assert!(a.allowed);
    let mut headers = std::collections::HashMap::new();
    headers.insert("x-ratelimit-limit-requests".to_string(), "500".to_string());
    headers.insert(
        "X-RateLimit-Remaining-Requests".to_string(),
        "0".to_string(),
    );
    headers.insert("x-ratelimit-reset-requests".to_string(), "20s".to_string());
    let r = reporter
        .record_outcome(proto::RecordOutcomeRequest {
            target: "openai/gpt-4o".into(),
            permit: a.permit,
            http_status: 429,
            error_type: "rate_limit_exceeded".into(),
            headers,
            ..Default::default()
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.classified_as(), proto::OutcomeClass::RateLimited);
    let advice = r.retry.expect("advice");
    assert!(advice.retry);
    assert!(secs_f64(&advice.delay.expect("delay")) >= 19.9);
    assert_eq!(
        r.state(),
        proto::BreakerState::Closed,
        "a rate limit is not an outage"
    );
    // Ten other agents, on their own connections, are told to wait ~20 s.
    for _ in 0..10 {
        let mut other = server.resilience().await;
        let d = other
            .can_proceed(can("openai/gpt-4o"))
            .await
            .expect("ok")
            .into_inner();
        assert!(!d.allowed);
        assert_eq!(d.reason(), proto::Reason::RateLimited);
        let wait = secs_f64(&d.retry_after.expect("retry_after"));
        assert!((19.0..=20.0).contains(&wait), "retry_after {wait}");
    }
    let mut admin = server.admin().await;
    let status = admin
        .get_target(proto::GetTargetRequest {
            target: "openai/gpt-4o".into(),
        })
        .await
        .expect("ok")
        .into_inner();
    let slot = &status.key_slots[0];
    assert!(slot.paused_until.is_some());
    let learned = &slot.learned[0];
    assert_eq!(
        (learned.kind.as_str(), learned.limit, learned.remaining),
        ("requests", 500, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_on_one_key_slot_moves_traffic_to_the_other() {
    let server = Server::start(
        "[targets.\"anthropic/claude-sonnet\"]\nkeys = [\"org-a\", \"org-b\"]\nrequests_per_minute = 1000\n",
        &[],
    );
    let mut c = server.resilience().await;
    let first = c
        .can_proceed(can("anthropic/claude-sonnet"))
        .await
        .expect("ok")
        .into_inner();
    assert!(first.allowed);
    let bad_slot = first.key_slot.clone();
    assert!(bad_slot == "org-a" || bad_slot == "org-b");
    c.record_outcome(proto::RecordOutcomeRequest {
        target: "anthropic/claude-sonnet".into(),
        permit: first.permit,
        http_status: 401,
        error_type: "authentication_error".into(),
        ..Default::default()
    })
    .await
    .expect("ok");
    let good_slot = if bad_slot == "org-a" {
        "org-b"
    } else {
        "org-a"
    };
    for _ in 0..20 {
        let a = c
            .can_proceed(can("anthropic/claude-sonnet"))
            .await
            .expect("ok")
            .into_inner();
        assert!(a.allowed);
        assert_eq!(a.key_slot, good_slot);
        assert_eq!(a.state(), proto::BreakerState::Closed);
    }
    let mut admin = server.admin().await;
    let s = admin
        .get_target(proto::GetTargetRequest {
            target: "anthropic/claude-sonnet".into(),
        })
        .await
        .expect("ok")
        .into_inner();
    let disabled: Vec<&str> = s
        .key_slots
        .iter()
        .filter(|k| k.disabled)
        .map(|k| k.name.as_str())
        .collect();
    assert_eq!(disabled, vec![bad_slot.as_str()]);
    // An unknown slot name is a clear INVALID_ARGUMENT.
    let err = c
        .record_outcome(proto::RecordOutcomeRequest {
            target: "anthropic/claude-sonnet".into(),
            http_status: 200,
            key_slot: "org-z".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown slot");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("org-z"));
}

/// Sends raw bytes as a request body, to check what the server does with a
/// message that is not valid protobuf / UTF-8 (no generated client can).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_and_oversized_headers_are_invalid_argument() {
    let server = Server::start("", &[]);
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    // RecordOutcomeRequest { target: "t" (field 1), http_status: 200 (field 4),
    // headers (field 11): { key: 0xFF 0xFE (not UTF-8), value: "1" } }
    let mut body = vec![0x0A, 0x01, b't', 0x20, 0xC8, 0x01];
    let entry = [0x0A, 0x02, 0xFF, 0xFE, 0x12, 0x01, b'1'];
    body.push(0x5A);
    body.push(entry.len() as u8);
    body.extend_from_slice(&entry);
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/backstop.v1.Resilience/RecordOutcome",
    );
    let err = grpc
        .unary(tonic::Request::new(body), path, common::raw::RawCodec)
        .await
        .expect_err("invalid UTF-8 must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("UTF-8"), "{}", err.message());
    // Oversized header maps are refused with the limit in the message.
    let mut c = server.resilience().await;
    let headers = (0..65)
        .map(|i| (format!("x-h-{i}"), "v".to_string()))
        .collect();
    let err = c
        .record_outcome(proto::RecordOutcomeRequest {
            target: "t".into(),
            http_status: 200,
            headers,
            ..Default::default()
        })
        .await
        .expect_err("too many headers");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("64"), "{}", err.message());
    let headers = [("x-big".to_string(), "v".repeat(20_000))]
        .into_iter()
        .collect();
    let err = c
        .record_outcome(proto::RecordOutcomeRequest {
            target: "t".into(),
            http_status: 200,
            headers,
            ..Default::default()
        })
        .await
        .expect_err("too many header bytes");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // The server is still serving.
    assert!(
        c.can_proceed(can("t"))
            .await
            .expect("ok")
            .into_inner()
            .allowed
    );
}
