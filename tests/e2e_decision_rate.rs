//! End-to-end: a principal's `decision_rate` protects the shared control
//! plane from a runaway agent — its flood is refused with RESOURCE_EXHAUSTED
//! (unary calls, batches, Decide items) while another principal's decisions
//! stay fast.

mod common;

use backstop::proto;
use common::Server;
use common::sha256_hex as sha;
use std::time::{Duration, Instant};
use tonic::{Code, Request};

const FLOOD: &str = "flood-token-000000";
const CALM: &str = "calm-token-0000000";

fn config() -> String {
    format!(
        r#"
[[auth.principals]]
name = "flood"
roles = ["agent"]
token_sha256 = "{}"
decision_rate = 50
decision_burst = 20

[[auth.principals]]
name = "calm"
roles = ["agent"]
token_sha256 = "{}"

[targets.m]
"#,
        sha(FLOOD),
        sha(CALM)
    )
}

fn with<T>(token: &str, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    r
}

fn can() -> proto::CanProceedRequest {
    proto::CanProceedRequest {
        target: "m".into(),
        ..Default::default()
    }
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_refused_and_does_not_slow_another_principal() {
    a_flood_is_refused_past_the_principals_rate_in_every_shape().await;
    another_principals_p99_stays_within_twice_its_unloaded_value().await;
}

async fn a_flood_is_refused_past_the_principals_rate_in_every_shape() {
    let s = Server::start(&config(), &[]);
    let mut c = s.resilience().await;

    // Unary: the burst (20), then about 50 a second.
    let started = Instant::now();
    let (mut ok, mut refused) = (0u32, 0u32);
    for _ in 0..200 {
        match c.can_proceed(with(FLOOD, can())).await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert!(
                    e.message().contains("\"flood\"") && e.message().contains("decision_rate"),
                    "{}",
                    e.message()
                );
                refused += 1;
            }
        }
    }
    let allowed = 20.0 + 50.0 * started.elapsed().as_secs_f64();
    assert!(ok >= 20, "the burst is admitted: {ok}");
    assert!(
        f64::from(ok) <= allowed + 2.0,
        "{ok} admitted, at most {allowed:.0} allowed"
    );
    assert!(refused > 0);

    // A batch is charged per item, all or nothing.
    let batch = proto::CanProceedBatchRequest {
        items: (0..100).map(|_| can()).collect(),
    };
    let e = c
        .can_proceed_batch(with(FLOOD, batch))
        .await
        .expect_err("100 items are over the burst");
    assert_eq!(e.code(), Code::InvalidArgument, "it could never fit");
    assert!(e.message().contains("split"), "{}", e.message());
    // Within the burst but over what is left now: refused, nothing taken.
    let batch = proto::CanProceedBatchRequest {
        items: (0..20).map(|_| can()).collect(),
    };
    let e = c
        .can_proceed_batch(with(FLOOD, batch))
        .await
        .expect_err("the burst is spent");
    assert_eq!(e.code(), Code::ResourceExhausted);

    // Decide: each item is a decision; refused items are item errors and
    // the stream goes on.
    let items: Vec<proto::DecideRequest> = (0..60)
        .map(|i| proto::DecideRequest {
            id: i,
            request: Some(proto::decide_request::Request::CanProceed(can())),
            ..Default::default()
        })
        .collect();
    let mut answers = c
        .decide(with(FLOOD, tokio_stream::iter(items)))
        .await
        .expect("stream")
        .into_inner();
    let (mut item_ok, mut item_refused) = (0, 0);
    while let Some(a) = answers.message().await.expect("answer") {
        match a.response {
            Some(proto::decide_response::Response::CanProceed(_)) => item_ok += 1,
            Some(proto::decide_response::Response::Error(e)) => {
                assert_eq!(e.code, Code::ResourceExhausted as i32, "{e:?}");
                item_refused += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(item_ok + item_refused, 60);
    assert!(item_refused >= 30, "{item_ok} ok, {item_refused} refused");

    // The other principal is not limited at all.
    for _ in 0..100 {
        c.can_proceed(with(CALM, can()))
            .await
            .expect("calm is unlimited");
    }
    let m = s.http_get("/metrics", &[]).1;
    assert!(
        m.contains("backstop_principal_throttled_total{principal=\"flood\"}"),
        "{m}"
    );
    assert!(!m.contains("backstop_principal_throttled_total{principal=\"calm\"}"));
}

/// Runs after the flood test in the same test function: two tests of this
/// file running at once would each be the other's load.
async fn another_principals_p99_stays_within_twice_its_unloaded_value() {
    let s = Server::start(&config(), &[]);
    let mut calm = s.resilience().await;
    let measure = |mut c: proto::resilience_client::ResilienceClient<_>| async move {
        let mut took = Vec::with_capacity(1000);
        for _ in 0..1000 {
            let t = Instant::now();
            c.can_proceed(with(CALM, can())).await.expect("calm");
            took.push(t.elapsed());
        }
        p99(took)
    };
    // Warm up, then the unloaded p99.
    for _ in 0..100 {
        calm.can_proceed(with(CALM, can())).await.expect("warm");
    }
    let unloaded = measure(calm.clone()).await;

    // A runaway agent: two connections each sending 250 calls a second,
    // ten times its decision_rate of 50/s. (An unpaced loop would measure
    // this 2-core machine's CPU, not the limiter: every call, refused or
    // not, costs the transport and the debug-built server the same.)
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut floods = Vec::new();
    for _ in 0..2 {
        let mut f = s.resilience().await;
        let (stop, refused, sent) = (stop.clone(), refused.clone(), sent.clone());
        floods.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if f.can_proceed(with(FLOOD, can())).await.is_err() {
                    refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let loaded = measure(calm.clone()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in floods {
        f.await.expect("flood task");
    }
    let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "unloaded p99 {unloaded:?}, loaded p99 {loaded:?}, {refused} of {sent} flood calls refused"
    );
    assert!(
        refused * 10 >= sent * 8 && refused > 100,
        "the flood was refused: {refused} of {sent}"
    );
    // Twice the unloaded p99, with 1 ms of slack for timer granularity on a
    // busy 2-core machine.
    assert!(
        loaded <= unloaded * 2 + Duration::from_millis(1),
        "calm p99 {loaded:?} under the flood vs {unloaded:?} unloaded"
    );
}
