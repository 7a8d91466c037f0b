//! End-to-end: the event stream (gRPC and SSE), metrics, health, and traces.

mod common;

use backstop::proto;
use backstop::proto::event::Kind;
use backstop::proto::events_client::EventsClient;
use common::{Server, TempDir, next_sse};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tonic::Streaming;

async fn force(server: &Server, target: &str, mode: proto::BreakerMode) {
    server
        .admin()
        .await
        .set_breaker_state(proto::SetBreakerStateRequest {
            target: target.into(),
            mode: mode as i32,
            reason: String::new(),
        })
        .await
        .expect("set_breaker_state");
}

async fn watch(server: &Server, since: u64) -> Streaming<proto::Event> {
    EventsClient::new(server.channel().await)
        .watch(proto::WatchRequest {
            since_seq: since,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
}

async fn next(s: &mut Streaming<proto::Event>) -> proto::Event {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("an event within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

fn transition(e: &proto::Event) -> Option<(proto::BreakerState, proto::BreakerState)> {
    match &e.kind {
        Some(Kind::BreakerTransition(t)) => Some((t.from(), t.to())),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_starts_with_a_snapshot_and_resumes_without_loss() {
    let server = Server::start("[events]\nring_size = 16\n[targets.a]\n[targets.b]\n", &[]);
    let mut s = watch(&server, 0).await;
    let first = next(&mut s).await;
    let Some(Kind::Snapshot(snap)) = &first.kind else {
        panic!("first is a snapshot: {first:?}")
    };
    let names: Vec<&str> = snap.targets.iter().map(|t| t.target.as_str()).collect();
    assert_eq!(names, vec!["a", "b"]);
    force(&server, "a", proto::BreakerMode::ForceOpen).await;
    let last = loop {
        let e = next(&mut s).await;
        if transition(&e) == Some((proto::BreakerState::Closed, proto::BreakerState::ForcedOpen)) {
            break e.seq;
        }
    };
    drop(s);
    // While disconnected: three more transitions.
    force(&server, "a", proto::BreakerMode::Automatic).await;
    force(&server, "b", proto::BreakerMode::ForceClosed).await;
    force(&server, "b", proto::BreakerMode::Automatic).await;
    let mut s = watch(&server, last).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        let e = next(&mut s).await;
        assert!(e.seq > last, "no replays, strictly after the resume point");
        if let Some(t) = transition(&e) {
            got.push((e.target.clone(), t));
        }
    }
    use proto::BreakerState::*;
    assert_eq!(
        got,
        vec![
            ("a".to_string(), (ForcedOpen, Closed)),
            ("b".to_string(), (Closed, ForcedClosed)),
            ("b".to_string(), (ForcedClosed, Closed)),
        ]
    );
    // Twenty more events than the ring holds: resuming from `last` is a Gap, then a Snapshot.
    for _ in 0..10 {
        force(&server, "a", proto::BreakerMode::ForceOpen).await;
        force(&server, "a", proto::BreakerMode::Automatic).await;
    }
    let mut s = watch(&server, last).await;
    let gap = next(&mut s).await;
    assert!(
        matches!(&gap.kind, Some(Kind::Gap(g)) if g.missed_from == last + 1),
        "{gap:?}"
    );
    let snap = next(&mut s).await;
    assert!(matches!(&snap.kind, Some(Kind::Snapshot(_))), "{snap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_increase_and_each_target_chains_under_concurrency() {
    let server = Server::start("", &[]);
    let mut s = watch(&server, 0).await;
    next(&mut s).await; // snapshot
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut admin = server.admin().await;
        tasks.push(tokio::spawn(async move {
            for round in 0..10 {
                let mode = if round % 2 == 0 {
                    proto::BreakerMode::ForceOpen
                } else {
                    proto::BreakerMode::Automatic
                };
                admin
                    .set_breaker_state(proto::SetBreakerStateRequest {
                        target: format!("t{}", i % 4),
                        mode: mode as i32,
                        reason: String::new(),
                    })
                    .await
                    .expect("set");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let mut last_seq = 0;
    let mut by_target: HashMap<String, Vec<(proto::BreakerState, proto::BreakerState)>> =
        HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut transitions = 0;
    while Instant::now() < deadline {
        let e = match tokio::time::timeout(Duration::from_millis(500), s.message()).await {
            Ok(Ok(Some(e))) => e,
            _ => break,
        };
        assert!(e.seq > last_seq, "seq {} after {last_seq}", e.seq);
        last_seq = e.seq;
        if let Some(t) = transition(&e) {
            transitions += 1;
            by_target.entry(e.target.clone()).or_default().push(t);
        }
    }
    assert!(transitions >= 40, "{transitions} transitions seen");
    for (target, chain) in by_target {
        for w in chain.windows(2) {
            assert_eq!(w[0].1, w[1].0, "{target}: events out of order: {chain:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_gets_a_gap_and_never_slows_decisions() {
    let server = Server::start("[events]\nsubscriber_buffer = 8\n", &[]);
    // A subscriber on a connection with a tiny receive window, read once and
    // then not at all: the server cannot push more than a few events to it.
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .expect("url")
        .initial_stream_window_size(Some(2048))
        .initial_connection_window_size(Some(2048))
        .connect()
        .await
        .expect("connect");
    let mut stalled = EventsClient::new(channel)
        .watch(proto::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    next(&mut stalled).await;
    let mut c = server.resilience().await;
    let started = Instant::now();
    // 1,500 transitions while the subscriber does not read.
    let mut admin = server.admin().await;
    for i in 0..750 {
        for mode in [proto::BreakerMode::ForceOpen, proto::BreakerMode::Automatic] {
            admin
                .set_breaker_state(proto::SetBreakerStateRequest {
                    target: format!("s{}", i % 10),
                    mode: mode as i32,
                    reason: String::new(),
                })
                .await
                .expect("set");
        }
    }
    let toggles = started.elapsed();
    // Decisions keep flowing at full speed.
    let started = Instant::now();
    for _ in 0..500 {
        assert!(
            c.can_proceed(proto::CanProceedRequest {
                target: "other".into(),
                ..Default::default()
            })
            .await
            .expect("ok")
            .into_inner()
            .allowed
        );
    }
    let decisions = started.elapsed();
    assert!(
        toggles < Duration::from_secs(30),
        "toggles took {toggles:?}"
    );
    assert!(
        decisions < Duration::from_secs(10),
        "decisions took {decisions:?}"
    );
    // The stalled subscriber is told it missed events, then resynchronised.
    let mut saw_gap = false;
    for _ in 0..5000 {
        let e = next(&mut stalled).await;
        if matches!(e.kind, Some(Kind::Gap(_))) {
            saw_gap = true;
            let snap = next(&mut stalled).await;
            assert!(
                matches!(snap.kind, Some(Kind::Snapshot(_))),
                "a snapshot follows the gap"
            );
            break;
        }
    }
    assert!(saw_gap, "the overflow was reported as a gap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_are_capped() {
    let server = Server::start("[events]\nmax_subscribers = 2\n", &[]);
    let _a = watch(&server, 0).await;
    let _b = watch(&server, 0).await;
    let err = EventsClient::new(server.channel().await)
        .watch(proto::WatchRequest::default())
        .await
        .expect_err("third subscriber");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    let (status, _) = server.http_get("/events", &[]);
    assert!(status.contains("503"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_json_and_resumes_with_last_event_id() {
    let server = Server::start("", &[]);
    let mut r = server.sse("/events", &[]);
    let snap = next_sse(&mut r).expect("snapshot");
    assert_eq!(snap.event, "snapshot");
    let v: serde_json::Value = serde_json::from_str(&snap.data).expect("json");
    assert_eq!(v["kind"], "snapshot");
    force(&server, "x", proto::BreakerMode::ForceOpen).await;
    let ev = loop {
        let e = next_sse(&mut r).expect("event");
        if e.event == "breaker_transition" {
            break e;
        }
    };
    let v: serde_json::Value = serde_json::from_str(&ev.data).expect("json");
    assert_eq!(
        (v["target"].as_str(), v["to"].as_str()),
        (Some("x"), Some("forced_open"))
    );
    let id = ev.id.clone().expect("events carry their seq as id");
    drop(r);
    force(&server, "x", proto::BreakerMode::Automatic).await;
    force(&server, "y", proto::BreakerMode::ForceOpen).await;
    let mut r = server.sse(
        "/events?kinds=breaker_transition",
        &[("Last-Event-ID", &id)],
    );
    let a = next_sse(&mut r).expect("first missed");
    let b = next_sse(&mut r).expect("second missed");
    let ids: Vec<u64> = [&a, &b]
        .iter()
        .map(|e| e.id.as_deref().unwrap_or("0").parse().unwrap_or(0))
        .collect();
    let from: u64 = id.parse().expect("numeric id");
    assert!(ids[0] > from && ids[1] > ids[0], "{ids:?} after {from}");
    let va: serde_json::Value = serde_json::from_str(&a.data).expect("json");
    let vb: serde_json::Value = serde_json::from_str(&b.data).expect("json");
    assert_eq!(
        (va["target"].as_str(), va["to"].as_str()),
        (Some("x"), Some("closed"))
    );
    assert_eq!(
        (vb["target"].as_str(), vb["to"].as_str()),
        (Some("y"), Some("forced_open"))
    );
    // A bad filter is a clear 400.
    let (status, body) = server.http_get("/events?kinds=nonsense", &[]);
    assert!(
        status.contains("400") && body.contains("nonsense"),
        "{status} {body}"
    );
}

/// Parses `name{labels} value` lines of the exposition into a map.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_family_moves_the_right_way() {
    let server = Server::start(
        r#"
[telemetry]
max_target_labels = 3
[defaults.breaker]
failure_threshold = 2
open_duration = "1m"
[targets.a]
requests_per_minute = 100
[targets.b]
[routes.chat]
targets = ["a", "b"]
"#,
        &[],
    );
    let mut c = server.resilience().await;
    let before = samples(&server.http_get("/metrics", &[]).1);
    assert_eq!(
        before.get("backstop_breaker_state{target=\"a\"}"),
        Some(&0.0)
    );
    // a: three successes, then two 503s trip it.
    for status in [200, 200, 200, 503, 503] {
        let adm = c
            .can_proceed(proto::CanProceedRequest {
                target: "a".into(),
                ..Default::default()
            })
            .await
            .expect("ok")
            .into_inner();
        c.record_outcome(proto::RecordOutcomeRequest {
            target: "a".into(),
            permit: adm.permit,
            http_status: status,
            latency: Some(prost_types::Duration {
                seconds: 0,
                nanos: 30_000_000,
            }),
            ..Default::default()
        })
        .await
        .expect("ok");
    }
    // A retry, a refusal, a fallback and an exhausted route.
    c.can_proceed(proto::CanProceedRequest {
        target: "b".into(),
        attempt: 1,
        ..Default::default()
    })
    .await
    .expect("ok");
    c.can_proceed(proto::CanProceedRequest {
        target: "a".into(),
        ..Default::default()
    })
    .await
    .expect("ok");
    let r = c
        .route(proto::RouteRequest {
            route: "chat".into(),
            ..Default::default()
        })
        .await
        .expect("route")
        .into_inner();
    assert_eq!(r.target, "b");
    force(&server, "b", proto::BreakerMode::ForceOpen).await;
    c.route(proto::RouteRequest {
        route: "chat".into(),
        ..Default::default()
    })
    .await
    .expect("route");
    // Targets beyond the label cap fold into _other.
    for t in ["c", "d", "e"] {
        c.can_proceed(proto::CanProceedRequest {
            target: t.into(),
            ..Default::default()
        })
        .await
        .expect("ok");
    }
    let m = samples(&server.http_get("/metrics", &[]).1);
    let get = |k: &str| m.get(k).copied().unwrap_or_else(|| panic!("missing {k}"));
    assert_eq!(
        get("backstop_outcomes_total{target=\"a\",class=\"success\"}"),
        3.0
    );
    assert_eq!(
        get("backstop_outcomes_total{target=\"a\",class=\"transient\"}"),
        2.0
    );
    assert_eq!(
        get("backstop_breaker_transitions_total{target=\"a\",from=\"closed\",to=\"open\"}"),
        1.0
    );
    assert_eq!(get("backstop_breaker_state{target=\"a\"}"), 1.0);
    assert_eq!(
        get("backstop_attempts_total{target=\"b\",attempt=\"retry\"}"),
        1.0
    );
    assert_eq!(
        get("backstop_decisions_total{target=\"a\",reason=\"circuit_open\"}"),
        3.0,
        "one direct, two via Route"
    );
    assert_eq!(
        get("backstop_route_decisions_total{route=\"chat\",depth=\"1\"}"),
        1.0
    );
    assert_eq!(get("backstop_route_exhausted_total{route=\"chat\"}"), 1.0);
    assert_eq!(
        get("backstop_call_latency_seconds_count{target=\"a\"}"),
        5.0
    );
    assert_eq!(
        get("backstop_call_latency_seconds_bucket{le=\"0.05\",target=\"a\"}"),
        5.0
    );
    assert!(get("backstop_rpc_duration_seconds_count{method=\"CanProceed\"}") >= 8.0);
    let remaining = get("backstop_budget_remaining{target=\"a\",key_slot=\"\",kind=\"requests\"}");
    assert!(
        (90.0..99.0).contains(&remaining),
        "5 of 100 used, refilling at 100/min: {remaining}"
    );
    assert_eq!(get("backstop_event_subscribers"), 0.0);
    assert!(get("backstop_decisions_total{target=\"_other\",reason=\"allowed\"}") >= 1.0);
    assert!(
        !m.keys().any(|k| k.contains("target=\"e\"")),
        "cardinality is bounded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_flips_to_not_serving_on_shutdown() {
    let mut server = Server::start("[server]\nshutdown_grace = \"2s\"\n", &[]);
    let (status, _) = server.http_get("/readyz", &[]);
    assert!(status.contains("200"), "{status}");
    assert!(server.http_get("/healthz", &[]).0.contains("200"));
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let mut w = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "backstop.v1.Resilience".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(
        w.message().await.expect("ok").expect("first").status(),
        ServingStatus::Serving
    );
    let pid = server.child.id().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let flipped = tokio::time::timeout(Duration::from_secs(5), w.message())
        .await
        .expect("in time");
    assert_eq!(
        flipped.expect("ok").expect("update").status(),
        ServingStatus::NotServing
    );
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

mod otlp {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use std::sync::{Arc, Mutex};

    /// A minimal OTLP trace receiver that keeps what it is sent.
    #[derive(Clone, Default)]
    pub struct Receiver(pub Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.0.lock().expect("lock").push(req.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    pub fn server(r: Receiver) -> TraceServiceServer<Receiver> {
        TraceServiceServer::new(r)
    }
}

/// Starts an OTLP receiver; returns it and its port.
async fn otlp_receiver() -> (otlp::Receiver, u16) {
    let receiver = otlp::Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let svc = otlp::server(receiver.clone());
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (receiver, port)
}

/// The `service.name` every exported batch named.
fn service_names(receiver: &otlp::Receiver) -> Vec<String> {
    receiver
        .0
        .lock()
        .expect("lock")
        .iter()
        .flat_map(|r| r.resource_spans.clone())
        .filter_map(|rs| rs.resource)
        .flat_map(|r| r.attributes)
        .filter(|kv| kv.key == "service.name")
        .map(|kv| format!("{:?}", kv.value))
        .collect()
}

/// The trace exporter is built once (the layer that joins callers' traces
/// must stay the one installed at startup): a reload that changes it says a
/// restart is needed, and spans keep going where they went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_a_new_trace_collector_as_needing_a_restart() {
    let (server, first) = traced_server("retrace").await;
    let (_second, port) = otlp_receiver().await;
    std::fs::write(
        &server.config_path,
        format!(
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{port}\"\nservice_name = \"backstop-test\"\nmax_target_labels = 5\n"
        ),
    )
    .expect("write");
    let r = server
        .admin()
        .await
        .reload_config(proto::ReloadConfigRequest::default())
        .await
        .expect("reload")
        .into_inner();
    assert_eq!(r.needs_restart, vec!["telemetry.otlp_endpoint"]);
    let mut c = server.resilience().await;
    c.can_proceed(proto::CanProceedRequest {
        target: "p/m".into(),
        ..Default::default()
    })
    .await
    .expect("ok");
    spans_named(&first, "CanProceed", 1).await;
    assert!(
        service_names(&first)
            .iter()
            .all(|n| n.contains("backstop-test"))
    );
}

/// Starts an OTLP receiver and a server exporting its spans to it.
async fn traced_server(name: &str) -> (Server, otlp::Receiver) {
    let (receiver, port) = otlp_receiver().await;
    let config = format!(
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{port}\"\nservice_name = \"backstop-test\"\n"
    );
    let server = Server::start_with(
        TempDir::new(name),
        &config,
        &["--http", "off"],
        &[
            ("RUST_LOG", "warn,backstop::grpc=info"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    );
    (server, receiver)
}

/// Every exported span named `name`, waiting up to 15 s for `n` of them.
async fn spans_named(
    receiver: &otlp::Receiver,
    name: &str,
    n: usize,
) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found: Vec<_> = receiver
            .0
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|r| r.resource_spans.clone())
            .flat_map(|rs| rs.scope_spans)
            .flat_map(|ss| ss.spans)
            .filter(|s| s.name == name)
            .collect();
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{} {name} spans exported within 15 s, expected {n}",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decide_items_join_their_own_trace_or_the_streams() {
    let (server, receiver) = traced_server("otlp-decide").await;
    let item_trace = "0af7651916cd43dd8448eb211c80319c";
    let item_parent = "b7ad6b7169203331";
    let stream_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let stream_parent = "00f067aa0ba902b7";
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{stream_trace}-{stream_parent}-01")
            .parse()
            .expect("ascii"),
    );
    let mut c = server.resilience().await;
    let mut inbound = c.decide(req).await.expect("decide").into_inner();
    let item = |id: u64, target: &str, traceparent: String| proto::DecideRequest {
        id,
        request: Some(proto::decide_request::Request::CanProceed(
            proto::CanProceedRequest {
                target: target.into(),
                ..Default::default()
            },
        )),
        traceparent,
        ..Default::default()
    };
    tx.send(item(
        1,
        "own/trace",
        format!("00-{item_trace}-{item_parent}-01"),
    ))
    .await
    .expect("send");
    tx.send(item(2, "stream/trace", String::new()))
        .await
        .expect("send");
    // A malformed traceparent is ignored: the item is still decided.
    tx.send(item(3, "bad/trace", "not-a-traceparent".into()))
        .await
        .expect("send");
    for _ in 0..3 {
        let r = inbound.message().await.expect("ok").expect("answer");
        assert!(
            matches!(r.response, Some(proto::decide_response::Response::CanProceed(ref p)) if p.allowed),
            "{r:?}"
        );
    }
    let spans = spans_named(&receiver, "Decide.CanProceed", 3).await;
    // (tracing-opentelemetry also exports the module as a `target`.)
    let by_target = |t: &str| {
        spans
            .iter()
            .find(|s| {
                s.attributes
                    .iter()
                    .any(|kv| kv.key == "target" && format!("{:?}", kv.value).contains(t))
            })
            .unwrap_or_else(|| panic!("no span for {t}: {spans:?}"))
    };
    let own = by_target("own/trace");
    assert_eq!(hex(&own.trace_id), item_trace, "the item's own trace");
    assert_eq!(hex(&own.parent_span_id), item_parent);
    let inherited = by_target("stream/trace");
    assert_eq!(hex(&inherited.trace_id), stream_trace, "the stream's trace");
    assert_eq!(hex(&inherited.parent_span_id), stream_parent);
    let bad = by_target("bad/trace");
    assert_ne!(hex(&bad.trace_id), item_trace);
    assert!(bad.parent_span_id.is_empty(), "a root span: {bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_join_the_callers_trace_and_carry_the_decision() {
    let (server, receiver) = traced_server("otlp").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(proto::CanProceedRequest {
        target: "traced/model".into(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01")
            .parse()
            .expect("ascii"),
    );
    let mut c = server.resilience().await;
    assert!(c.can_proceed(req).await.expect("ok").into_inner().allowed);
    let deadline = Instant::now() + Duration::from_secs(15);
    let span = loop {
        let found = receiver
            .0
            .lock()
            .expect("lock")
            .iter()
            .flat_map(|r| r.resource_spans.clone())
            .find_map(|rs| {
                rs.scope_spans
                    .iter()
                    .flat_map(|ss| ss.spans.clone())
                    .find(|s| s.name == "CanProceed")
                    .map(|s| (s, rs.resource.clone()))
            });
        if let Some(s) = found {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no CanProceed span exported within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (span, resource) = span;
    assert_eq!(hex(&span.trace_id), trace_id, "joined the caller's trace");
    assert_eq!(
        hex(&span.parent_span_id),
        parent_id,
        "child of the caller's span"
    );
    let attrs: HashMap<String, String> = span
        .attributes
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                format!("{:?}", kv.value.as_ref().and_then(|v| v.value.clone())),
            )
        })
        .collect();
    assert!(
        attrs
            .get("target")
            .is_some_and(|v| v.contains("traced/model")),
        "{attrs:?}"
    );
    assert!(
        attrs.get("allowed").is_some_and(|v| v.contains("true")),
        "{attrs:?}"
    );
    assert!(
        attrs
            .get("reason")
            .is_some_and(|v| v.contains("REASON_ALLOWED")),
        "{attrs:?}"
    );
    let service = resource
        .expect("resource")
        .attributes
        .iter()
        .find(|kv| kv.key == "service.name")
        .map(|kv| format!("{:?}", kv.value));
    assert!(service.is_some_and(|s| s.contains("backstop-test")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_only_queries_metrics_that_exist() {
    let server = Server::start(
        "[targets.b]\nrequests_per_minute = 10\n[routes.chat]\ntargets = [\"a\", \"b\"]\n",
        &[],
    );
    // Exercise every family once: families without samples are not exported.
    let mut c = server.resilience().await;
    force(&server, "a", proto::BreakerMode::ForceOpen).await;
    c.route(proto::RouteRequest {
        route: "chat".into(),
        attempt: 1,
        ..Default::default()
    })
    .await
    .expect("route");
    force(&server, "b", proto::BreakerMode::ForceOpen).await;
    c.route(proto::RouteRequest {
        route: "chat".into(),
        ..Default::default()
    })
    .await
    .expect("route");
    c.record_outcome(proto::RecordOutcomeRequest {
        target: "c".into(),
        http_status: 200,
        latency: Some(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        }),
        ..Default::default()
    })
    .await
    .expect("ok");
    let mut d = backstop::proto::deferred_client::DeferredClient::new(server.channel().await);
    for _ in 0..2 {
        d.defer(proto::DeferRequest {
            queue: "c".into(),
            max_attempts: 1,
            ..Default::default()
        })
        .await
        .expect("defer");
    }
    let items = d
        .claim(proto::ClaimRequest {
            queue: "c".into(),
            max_items: 2,
            ..Default::default()
        })
        .await
        .expect("claim")
        .into_inner()
        .items;
    d.ack(proto::AckRequest {
        id: items[0].id.clone(),
        lease_token: items[0].lease_token.clone(),
    })
    .await
    .expect("ack");
    d.nack(proto::NackRequest {
        id: items[1].id.clone(),
        lease_token: items[1].lease_token.clone(),
        ..Default::default()
    })
    .await
    .expect("nack");
    d.defer(proto::DeferRequest {
        queue: "c".into(),
        ..Default::default()
    })
    .await
    .expect("defer");
    let _watcher = EventsClient::new(server.channel().await)
        .watch(proto::WatchRequest::default())
        .await
        .expect("watch");
    let exposition = server.http_get("/metrics", &[]).1;
    let families: std::collections::HashSet<&str> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/backstop-dashboard.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("valid JSON");
    let mut checked = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("backstop_") {
                    continue;
                }
                let base = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                assert!(
                    families.contains(base),
                    "{word} (panel {:?}) is not exported",
                    panel["title"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 15, "{checked} metric references checked");
}
