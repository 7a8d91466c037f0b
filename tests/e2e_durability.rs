//! End-to-end: state and queued work survive `kill -9` of the real binary.

mod common;

use backstop::proto;
use backstop::proto::deferred_client::DeferredClient;
use common::{Server, TempDir, binary};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CONFIG: &str = r#"
[defaults.breaker]
failure_threshold = 1
open_duration = "10m"

[targets."openai/gpt-4o"]
keys = ["org-a", "org-b"]
"#;

async fn get(server: &Server, target: &str) -> proto::TargetStatus {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_unlearns_an_outage() {
    let server = Server::start(CONFIG, &[]);
    let mut c = server.resilience().await;
    // An overloaded provider opens its breaker.
    c.record_outcome(proto::RecordOutcomeRequest {
        target: "anthropic/claude-sonnet".into(),
        http_status: 529,
        ..Default::default()
    })
    .await
    .expect("ok");
    // A 401 disables one key slot.
    let p = common::permit(&mut c, "openai/gpt-4o", Some("org-a")).await;
    c.record_outcome(proto::RecordOutcomeRequest {
        target: "openai/gpt-4o".into(),
        permit: p,
        http_status: 401,
        key_slot: "org-a".into(),
        ..Default::default()
    })
    .await
    .expect("ok");
    // A provider said "remaining 0 until reset".
    let mut headers = HashMap::new();
    headers.insert(
        "x-ratelimit-remaining-requests".to_string(),
        "0".to_string(),
    );
    headers.insert("x-ratelimit-reset-requests".to_string(), "15m".to_string());
    let p = common::permit(&mut c, "openai/o3", None).await;
    c.record_outcome(proto::RecordOutcomeRequest {
        target: "openai/o3".into(),
        permit: p,
        http_status: 200,
        headers,
        ..Default::default()
    })
    .await
    .expect("ok");
    let before = get(&server, "anthropic/claude-sonnet").await;
    assert_eq!(before.state(), proto::BreakerState::Open);
    let paused_before = get(&server, "openai/o3").await.key_slots[0].paused_until;

    // Crash, restart on the same data dir.
    let dir = server.into_dir();
    let server = Server::start_in(dir, CONFIG, &[]);
    let mut c = server.resilience().await;
    let after = get(&server, "anthropic/claude-sonnet").await;
    assert_eq!(after.state(), proto::BreakerState::Open);
    assert_eq!(after.open_until, before.open_until, "the same open-until");
    let refused = c
        .can_proceed(proto::CanProceedRequest {
            target: "anthropic/claude-sonnet".into(),
            ..Default::default()
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(refused.reason(), proto::Reason::CircuitOpen);
    for _ in 0..5 {
        let a = c
            .can_proceed(proto::CanProceedRequest {
                target: "openai/gpt-4o".into(),
                ..Default::default()
            })
            .await
            .expect("ok")
            .into_inner();
        assert_eq!(a.key_slot, "org-b", "org-a stays disabled");
    }
    let paused = c
        .can_proceed(proto::CanProceedRequest {
            target: "openai/o3".into(),
            ..Default::default()
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(paused.reason(), proto::Reason::RateLimited);
    assert_eq!(
        get(&server, "openai/o3").await.key_slots[0].paused_until,
        paused_before
    );

    // --reset-state forgets it all, for the operator who means it.
    let dir = server.into_dir();
    let server = Server::start_in(dir, CONFIG, &["--reset-state"]);
    let mut c = server.resilience().await;
    let a = c
        .can_proceed(proto::CanProceedRequest {
            target: "anthropic/claude-sonnet".into(),
            ..Default::default()
        })
        .await
        .expect("ok")
        .into_inner();
    assert!(a.allowed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_defers_survive_kill_9_exactly_once() {
    let mut server = Server::start("", &[]);
    let acked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for client in 0..20 {
        let mut d = DeferredClient::new(server.channel().await);
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let r = d
                    .defer(proto::DeferRequest {
                        queue: "chat".into(),
                        payload: format!("request {client}-{i}").into_bytes(),
                        idempotency_key: format!("{client}-{i}"),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(r) => {
                        acked.lock().expect("lock").insert(r.into_inner().id);
                    }
                    Err(_) => return, // the server died mid-stream
                }
            }
        }));
    }
    // Kill the server while the clients are still deferring.
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if acked.lock().expect("lock").len() >= 300 {
            break;
        }
    }
    server.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 300);
    let dir = server.into_dir();
    let server = Server::start_in(dir, "", &[]);
    let mut d = DeferredClient::new(server.channel().await);
    let mut seen: HashMap<String, u32> = HashMap::new();
    loop {
        let r = d
            .claim(proto::ClaimRequest {
                queue: "chat".into(),
                max_items: 100,
                ..Default::default()
            })
            .await
            .expect("claim")
            .into_inner();
        if r.items.is_empty() {
            break;
        }
        for it in r.items {
            *seen.entry(it.id.clone()).or_default() += 1;
            d.ack(proto::AckRequest {
                id: it.id,
                lease_token: it.lease_token,
            })
            .await
            .expect("ack");
        }
    }
    for id in &acked {
        assert_eq!(
            seen.get(id),
            Some(&1),
            "acknowledged item {id} present exactly once"
        );
    }
    assert!(seen.values().all(|&n| n == 1));
    let stats = d
        .queue_stats(proto::QueueStatsRequest {
            queue: "chat".into(),
        })
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.queues[0].depth, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_follows_the_breaker_and_stale_leases_are_rejected() {
    let server = Server::start(
        "[defaults.breaker]\nfailure_threshold = 1\nopen_duration = \"300ms\"\nsuccess_threshold = 1\n",
        &[],
    );
    let mut c = server.resilience().await;
    let mut d = DeferredClient::new(server.channel().await);
    c.record_outcome(proto::RecordOutcomeRequest {
        target: "m".into(),
        http_status: 503,
        ..Default::default()
    })
    .await
    .expect("ok");
    let id = d
        .defer(proto::DeferRequest {
            queue: "m".into(),
            payload: b"hello".to_vec(),
            ..Default::default()
        })
        .await
        .expect("defer")
        .into_inner();
    assert!(id.message.contains("saved"));
    let r = d
        .claim(proto::ClaimRequest {
            queue: "m".into(),
            max_items: 1,
            ..Default::default()
        })
        .await
        .expect("claim")
        .into_inner();
    assert!(r.items.is_empty());
    assert_eq!(r.blocked_reason(), proto::Reason::CircuitOpen);
    // Long-poll: handed out as soon as the breaker lets a probe through.
    let r = d
        .claim(proto::ClaimRequest {
            queue: "m".into(),
            max_items: 1,
            wait: Some(prost_types::Duration {
                seconds: 5,
                nanos: 0,
            }),
            lease: Some(prost_types::Duration {
                seconds: 0,
                nanos: 200_000_000,
            }),
            ..Default::default()
        })
        .await
        .expect("claim")
        .into_inner();
    let item = &r.items[0];
    assert_eq!(
        (item.id.as_str(), item.payload.as_slice(), item.attempt),
        (id.id.as_str(), &b"hello"[..], 1)
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    let err = d
        .ack(proto::AckRequest {
            id: item.id.clone(),
            lease_token: item.lease_token.clone(),
        })
        .await
        .expect_err("lease expired");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[test]
fn a_corrupt_store_is_a_clear_startup_error() {
    let dir = TempDir::new("corrupt");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(data.join("backstop.redb"), vec![0x5a; 16384]).expect("write");
    let out = std::process::Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("backstop.redb"), "{err}");
    assert!(err.contains("--reset-state"), "{err}");
}
