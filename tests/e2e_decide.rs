//! End-to-end: `Resilience/Decide`, every decision over one stream. Answers
//! match the unary calls', ids are echoed, per-item problems stay per item,
//! the stream ends cleanly when the client closes it, and (in cluster mode,
//! where items wait on Redis) outstanding items are bounded and deadlines hold.

mod common;

use backstop::proto;
use backstop::proto::decide_request::Request as Q;
use backstop::proto::decide_response::Response as A;
use common::{Redis, Server};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn can(id: u64, target: &str) -> proto::DecideRequest {
    proto::DecideRequest {
        id,
        request: Some(Q::CanProceed(proto::CanProceedRequest {
            target: target.into(),
            ..Default::default()
        })),
        deadline: None,
        traceparent: String::new(),
    }
}

fn outcome(id: u64, target: &str, permit: &str, status: i32) -> proto::DecideRequest {
    proto::DecideRequest {
        id,
        request: Some(Q::RecordOutcome(proto::RecordOutcomeRequest {
            target: target.into(),
            permit: permit.into(),
            http_status: status,
            ..Default::default()
        })),
        deadline: None,
        traceparent: String::new(),
    }
}

/// Opens a stream; returns the sender and the response stream.
async fn open(
    s: &Server,
) -> (
    mpsc::Sender<proto::DecideRequest>,
    tonic::Streaming<proto::DecideResponse>,
) {
    let (tx, rx) = mpsc::channel(4096);
    let inbound = s
        .resilience()
        .await
        .decide(ReceiverStream::new(rx))
        .await
        .expect("decide")
        .into_inner();
    (tx, inbound)
}

async fn next(inbound: &mut tonic::Streaming<proto::DecideResponse>) -> proto::DecideResponse {
    tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("an answer within 10 s")
        .expect("stream ok")
        .expect("not ended")
}

const CONFIG: &str = r#"
[targets.m]
breaker = { failure_threshold = 3, open_duration = "60s" }
[targets.b]
requests_per_minute = 2
[routes.chat]
targets = ["m", "b"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_carries_every_kind_of_decision() {
    let s = Server::start(CONFIG, &[]);
    let (tx, mut inbound) = open(&s).await;
    // Three admissions, each failure reported on the same stream: the breaker opens.
    for i in 0..3u64 {
        tx.send(can(10 + i, "m")).await.expect("send");
        let a = next(&mut inbound).await;
        assert_eq!(a.id, 10 + i, "the id is echoed");
        let Some(A::CanProceed(p)) = a.response else {
            panic!("{a:?}")
        };
        assert!(p.allowed);
        tx.send(outcome(20 + i, "m", &p.permit, 503))
            .await
            .expect("send");
        let r = next(&mut inbound).await;
        assert_eq!(r.id, 20 + i);
        assert!(matches!(r.response, Some(A::RecordOutcome(_))), "{r:?}");
    }
    // What the unary call says now, the stream says too.
    let unary = s
        .resilience()
        .await
        .can_proceed(proto::CanProceedRequest {
            target: "m".into(),
            ..Default::default()
        })
        .await
        .expect("unary")
        .into_inner();
    assert_eq!(unary.reason(), proto::Reason::CircuitOpen);
    tx.send(can(30, "m")).await.expect("send");
    let Some(A::CanProceed(p)) = next(&mut inbound).await.response else {
        panic!("not a CanProceed answer")
    };
    assert_eq!(p.reason(), proto::Reason::CircuitOpen);
    // Route over the stream falls back past the open target.
    tx.send(proto::DecideRequest {
        id: 40,
        request: Some(Q::Route(proto::RouteRequest {
            route: "chat".into(),
            ..Default::default()
        })),
        deadline: None,
        traceparent: String::new(),
    })
    .await
    .expect("send");
    let r = next(&mut inbound).await;
    assert_eq!(r.id, 40);
    let Some(A::Route(route)) = r.response else {
        panic!("{r:?}")
    };
    assert_eq!((route.target.as_str(), route.fallback_depth), ("b", 1));
    // Closing our side: the stream ends cleanly after the answers.
    drop(tx);
    let end = tokio::time::timeout(Duration::from_secs(5), inbound.message())
        .await
        .expect("ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_items_fail_alone_and_the_stream_goes_on() {
    let s = Server::start(CONFIG, &[]);
    let (tx, mut inbound) = open(&s).await;
    tx.send(can(1, "")).await.expect("send");
    tx.send(proto::DecideRequest {
        id: 2,
        request: None,
        deadline: None,
        traceparent: String::new(),
    })
    .await
    .expect("send");
    tx.send(outcome(3, "m", "2.not.a.permit", 200))
        .await
        .expect("send");
    tx.send(proto::DecideRequest {
        id: 4,
        request: Some(Q::Route(proto::RouteRequest {
            route: "no-such-route".into(),
            ..Default::default()
        })),
        deadline: None,
        traceparent: String::new(),
    })
    .await
    .expect("send");
    tx.send(can(5, "m")).await.expect("send");
    let mut got: HashMap<u64, proto::DecideResponse> = HashMap::new();
    for _ in 0..5 {
        let r = next(&mut inbound).await;
        got.insert(r.id, r);
    }
    let code = |id: u64| match &got[&id].response {
        Some(A::Error(e)) => (e.code, e.message.clone()),
        other => panic!("item {id}: {other:?}"),
    };
    assert_eq!(code(1).0, tonic::Code::InvalidArgument as i32);
    let (c2, m2) = code(2);
    assert_eq!(c2, tonic::Code::InvalidArgument as i32);
    assert!(m2.contains("can_proceed"), "{m2}");
    assert_eq!(code(3).0, tonic::Code::InvalidArgument as i32);
    assert_eq!(code(4).0, tonic::Code::NotFound as i32);
    assert!(
        matches!(&got[&5].response, Some(A::CanProceed(p)) if p.allowed),
        "a good item after four bad ones: {:?}",
        got[&5]
    );
}

/// Many items from many tasks over one stream: every id answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_item_is_answered_once() {
    let s = Server::start("[targets.t]\n", &[]);
    let (tx, mut inbound) = open(&s).await;
    let n = 2000u64;
    let sender = tokio::spawn(async move {
        for id in 0..n {
            tx.send(can(id, &format!("t{}", id % 7)))
                .await
                .expect("send");
        }
    });
    let mut seen = std::collections::HashSet::new();
    while seen.len() < n as usize {
        let r = next(&mut inbound).await;
        assert!(seen.insert(r.id), "id {} answered twice", r.id);
        assert!(matches!(r.response, Some(A::CanProceed(_))));
    }
    sender.await.expect("sender");
}

/// In cluster mode items wait on Redis: with Redis frozen, a stream holds at
/// most 1024 outstanding items (the rest get RESOURCE_EXHAUSTED, alone), and
/// an item's deadline holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outstanding_items_are_bounded_and_deadlines_hold() {
    let redis = Redis::start();
    let config = "[targets.t]\n[cluster]\nredis_timeout = \"3s\"\n";
    let s = Server::start_replica(config, &redis.url(), &[]).await;
    let (tx, mut inbound) = open(&s).await;
    // Warm: the target's state is read once.
    tx.send(can(0, "t")).await.expect("send");
    next(&mut inbound).await;
    redis.signal("STOP");
    let mut with_deadline = can(1, "t");
    with_deadline.deadline = Some(prost_types::Duration {
        seconds: 0,
        nanos: 200_000_000,
    });
    let t0 = Instant::now();
    tx.send(with_deadline).await.expect("send");
    let r = next(&mut inbound).await;
    assert_eq!(r.id, 1);
    match r.response {
        Some(A::Error(e)) => assert_eq!(e.code, tonic::Code::DeadlineExceeded as i32, "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // 1,100 items while every one waits on the frozen Redis.
    for id in 100..1200u64 {
        tx.send(can(id, "t")).await.expect("send");
    }
    let mut busy = 0;
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), inbound.message()).await {
            Ok(Ok(Some(r))) => match r.response {
                Some(A::Error(e)) if e.code == tonic::Code::ResourceExhausted as i32 => busy += 1,
                other => panic!("answered while Redis is frozen: {other:?}"),
            },
            Ok(other) => panic!("{other:?}"),
            Err(_) => {}
        }
    }
    // The first refused item is at most 1024 + 1 (the deadline item's slot may
    // still be held) behind; the rest wait, and are answered once Redis is back.
    assert!(
        (75..=77).contains(&busy),
        "{busy} items refused as over the cap"
    );
    redis.signal("CONT");
    let mut answered = 0;
    while answered < 1100 - busy {
        let r = next(&mut inbound).await;
        assert!(matches!(r.response, Some(A::CanProceed(_))), "{r:?}");
        answered += 1;
    }
}

/// A draining server answers what it read, then ends the stream with
/// UNAVAILABLE (so the client knows the rest was never decided), and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_ends_the_stream_with_unavailable() {
    let mut s = Server::start(CONFIG, &[]);
    let (tx, mut inbound) = open(&s).await;
    tx.send(can(1, "m")).await.expect("send");
    assert_eq!(next(&mut inbound).await.id, 1);
    let exit = tokio::task::spawn_blocking(move || s.terminate());
    let end = tokio::time::timeout(Duration::from_secs(15), inbound.message())
        .await
        .expect("the stream ends while draining");
    match end {
        Err(st) => {
            assert_eq!(st.code(), tonic::Code::Unavailable, "{st:?}");
            assert!(st.message().contains("shutting down"), "{st:?}");
        }
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    drop(tx);
    assert!(exit.await.expect("join").success(), "drained and exited 0");
}

/// Absurd numbers in an item: a negative deadline is that item's
/// INVALID_ARGUMENT; the largest representable one is simply no limit; an id
/// reused by the client is answered twice, once per item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_deadlines_and_reused_ids_fail_or_pass_alone() {
    let s = Server::start(CONFIG, &[]);
    let (tx, mut inbound) = open(&s).await;
    let mut negative = can(1, "m");
    negative.deadline = Some(prost_types::Duration {
        seconds: -1,
        nanos: 0,
    });
    let mut huge = can(2, "m");
    huge.deadline = Some(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    });
    let mut zero = can(3, "m");
    zero.deadline = Some(prost_types::Duration {
        seconds: 0,
        nanos: 0,
    });
    for r in [negative, huge, zero, can(4, "m"), can(4, "m")] {
        tx.send(r).await.expect("send");
    }
    let mut got: Vec<proto::DecideResponse> = Vec::new();
    for _ in 0..5 {
        got.push(next(&mut inbound).await);
    }
    got.sort_by_key(|r| r.id);
    match &got[0].response {
        Some(A::Error(e)) => {
            assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{e:?}");
            assert!(e.message.contains("deadline"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }
    // An embedded decision never waits, so even a zero deadline is met.
    for r in &got[1..] {
        assert!(
            matches!(r.response, Some(A::CanProceed(ref p)) if p.allowed),
            "{r:?}"
        );
    }
    assert_eq!((got[3].id, got[4].id), (4, 4), "a reused id: both answered");
}

/// A client that writes a flood and never reads its answers fills its own
/// stream's buffers and then is no longer read (HTTP/2 flow control): other
/// clients keep their answers at normal speed, and the server's memory stays
/// bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_does_not_slow_anyone_else() {
    let s = Server::start("[targets.t]\n", &[]);
    let (tx, _never_read) = open(&s).await;
    let flood = tokio::spawn(async move {
        let mut sent = 0u64;
        // Stops when the stream stops taking items (the send blocks).
        while tokio::time::timeout(Duration::from_millis(500), tx.send(can(sent, "t")))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            sent += 1;
            if sent == 2_000_000 {
                break;
            }
        }
        (sent, tx)
    });
    let (sent, _tx) = flood.await.expect("flood");
    assert!(
        sent < 2_000_000,
        "the server kept reading a stream nobody reads: {sent} items"
    );
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", s.child.id()))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS");
    assert!(rss_kib < 200 * 1024, "server RSS {rss_kib} KiB");
    // Another client: unary and its own stream both answer promptly.
    let mut c = s.resilience().await;
    let t0 = Instant::now();
    for _ in 0..20 {
        c.can_proceed(proto::CanProceedRequest {
            target: "t".into(),
            ..Default::default()
        })
        .await
        .expect("unary");
    }
    let (tx2, mut inbound2) = open(&s).await;
    for id in 0..20 {
        tx2.send(can(id, "t")).await.expect("send");
        next(&mut inbound2).await;
    }
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}
