//! End-to-end: what one careless or hostile client, a damaged disk or a typo
//! could do to the fleet (issue #8's list), each against the real binary.

mod common;

use backstop::proto;
use common::{Server, TempDir};
use std::time::{Duration, Instant};
use tonic::Code;

fn secs_f64(d: &prost_types::Duration) -> f64 {
    d.seconds as f64 + f64::from(d.nanos) / 1e9
}

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

/// Item 1: one absurd token report cannot refuse a budget (or a whole shared
/// group) for years; reset refills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_token_report_blocks_a_budget_for_at_most_one_window() {
    let config = r#"
[targets.solo]
tokens_per_minute = 1000
[targets.a]
budgets = ["org"]
[targets.b]
budgets = ["org"]
[budgets.org]
tokens_per_minute = 100000
"#;
    let server = Server::start(config, &[]);
    let mut c = server.resilience().await;
    let mut huge = outcome("solo", "", 200);
    huge.input_tokens = u64::MAX;
    c.record_outcome(huge).await.expect("accepted");
    let r = c
        .can_proceed(proto::CanProceedRequest {
            estimated_tokens: 1,
            ..can("solo")
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.reason(), proto::Reason::RateLimited);
    let wait = r.retry_after.as_ref().map_or(0.0, secs_f64);
    assert!(wait > 0.0 && wait <= 61.0, "retry_after {wait}s, not years");

    // 10^12 tokens on one target of a group: the group refuses its other
    // targets for at most one window, not 347 days.
    let mut big = outcome("a", "", 200);
    big.input_tokens = 1_000_000_000_000;
    c.record_outcome(big).await.expect("accepted");
    let r = c
        .can_proceed(proto::CanProceedRequest {
            estimated_tokens: 1,
            ..can("b")
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.reason(), proto::Reason::RateLimited);
    let wait = r.retry_after.as_ref().map_or(0.0, secs_f64);
    assert!(wait <= 61.0, "group retry_after {wait}s");

    // ResetTarget refills the target's budgets and its groups', and says so.
    let mut admin = server.admin().await;
    let s = admin
        .reset_target(proto::ResetTargetRequest { target: "b".into() })
        .await
        .expect("reset")
        .into_inner();
    assert!(
        s.last_cause.contains("budgets refilled"),
        "{}",
        s.last_cause
    );
    let ok = c
        .can_proceed(proto::CanProceedRequest {
            estimated_tokens: 1,
            ..can("b")
        })
        .await
        .expect("ok")
        .into_inner();
    assert!(ok.allowed, "{ok:?}");
}

/// Item 2: permits cannot be edited, and replays count once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_replayed_permits_change_nothing() {
    let config = r#"
[targets.c]
max_concurrency = 2
tokens_per_minute = 1000
[targets.b]
breaker = { failure_threshold = 5 }
"#;
    let server = Server::start(config, &[]);
    let mut c = server.resilience().await;
    let first = c.can_proceed(can("c")).await.expect("ok").into_inner();
    let second = c.can_proceed(can("c")).await.expect("ok").into_inner();
    assert!(first.allowed && second.allowed);
    assert_eq!(
        c.can_proceed(can("c"))
            .await
            .expect("ok")
            .into_inner()
            .reason(),
        proto::Reason::ConcurrencyLimit
    );
    // Edit every field of one permit in turn: each forgery is refused.
    let fields: Vec<&str> = first.permit.split('.').collect();
    for i in 1..fields.len() {
        let mut f: Vec<String> = fields.iter().map(|s| s.to_string()).collect();
        f[i] = if f[i] == "ffffffff" {
            "fffffffe".into()
        } else {
            "ffffffff".into()
        };
        let err = c
            .record_outcome(outcome("c", &f.join("."), 200))
            .await
            .expect_err("a forged permit is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "field {i}: {err:?}");
    }
    // ...and freed no slot: the third call is still over max_concurrency.
    assert_eq!(
        c.can_proceed(can("c"))
            .await
            .expect("ok")
            .into_inner()
            .reason(),
        proto::Reason::ConcurrencyLimit
    );

    // A replayed 503 counts once: five replays do not open a threshold-5 breaker.
    let p = c
        .can_proceed(can("b"))
        .await
        .expect("ok")
        .into_inner()
        .permit;
    let mut duplicates = 0;
    for _ in 0..6 {
        let r = c
            .record_outcome(outcome("b", &p, 503))
            .await
            .expect("ok")
            .into_inner();
        duplicates += usize::from(r.duplicate);
        assert_eq!(r.state(), proto::BreakerState::Closed);
    }
    assert_eq!(duplicates, 5, "every report after the first is a duplicate");
    let s = status(&server, "b").await;
    assert_eq!(s.consecutive_failures, 1);
    assert_eq!(s.counters.expect("counters").transient, 1);
}

/// Item 3: a report without a permit cannot force a breaker open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permitless_401_counts_but_does_not_open_the_breaker() {
    let server = Server::start("", &[]);
    let mut c = server.resilience().await;
    let r = c
        .record_outcome(outcome("t", "", 401))
        .await
        .expect("accepted")
        .into_inner();
    assert_eq!(r.state(), proto::BreakerState::Closed);
    assert!(
        c.can_proceed(can("t"))
            .await
            .expect("ok")
            .into_inner()
            .allowed
    );
    // With the permit of an admitted call, a 401 opens it at once.
    let p = c
        .can_proceed(can("t"))
        .await
        .expect("ok")
        .into_inner()
        .permit;
    let r = c
        .record_outcome(outcome("t", &p, 401))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.state(), proto::BreakerState::Open);

    // A fleet can refuse permitless reports altogether.
    let strict = Server::start("[server]\noutcomes_without_permit = \"reject\"\n", &[]);
    let mut c = strict.resilience().await;
    let err = c
        .record_outcome(outcome("t", "", 503))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("permit"), "{}", err.message());
}

/// Item 4: with an admin token, operator-grade calls need it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_guards_dead_letters_requeue_and_watch() {
    let token = "0123456789abcdef0123";
    let server = Server::start(&format!("[server]\nadmin_token = \"{token}\"\n"), &[]);
    let channel = server.channel().await;
    let mut q = proto::deferred_client::DeferredClient::new(channel.clone());
    let err = q
        .list_dead_letters(proto::ListDeadLettersRequest::default())
        .await
        .expect_err("needs the token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = q
        .requeue(proto::RequeueRequest { id: "1".into() })
        .await
        .expect_err("needs the token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut ev = proto::events_client::EventsClient::new(channel.clone());
    let err = ev
        .watch(proto::WatchRequest::default())
        .await
        .expect_err("needs the token");
    assert_eq!(err.code(), Code::Unauthenticated);
    // With it, they work.
    let mut req = tonic::Request::new(proto::ListDeadLettersRequest::default());
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    q.list_dead_letters(req).await.expect("authorized");
    // The agent path stays open.
    q.defer(proto::DeferRequest {
        queue: "t".into(),
        payload: b"x".to_vec(),
        ..Default::default()
    })
    .await
    .expect("agents defer without the token");
    let (status_line, _) = server.http_get("/api/snapshot", &[]);
    assert!(status_line.contains("401"), "{status_line}");
    let (status_line, _) = server.http_get(
        "/api/snapshot",
        &[("Authorization", &format!("Bearer {token}"))],
    );
    assert!(status_line.contains("200"), "{status_line}");
}

/// Item 5: two servers on one data directory; --reset-state under a live server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let first = Server::start("", &[]);
    let pid = first.child.id();
    let data = first.dir.path().join("backstop-data");
    for extra in [&[][..], &["--reset-state"][..]] {
        let out = std::process::Command::new(common::binary())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "off",
                "--data-dir",
            ])
            .arg(&data)
            .args(extra)
            .output()
            .expect("run");
        assert!(
            !out.status.success(),
            "{extra:?}: the second server must not start"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("in use"), "{err}");
        assert!(
            err.contains(&pid.to_string()),
            "names the holder's pid: {err}"
        );
    }
    // The first server's store is still there and it still serves.
    assert!(data.join("backstop.redb").exists());
    let mut c = first.resilience().await;
    assert!(
        c.can_proceed(can("t"))
            .await
            .expect("ok")
            .into_inner()
            .allowed
    );
}

/// Item 6: damaged stores end in a clean error naming the file.
#[test]
fn a_damaged_or_empty_store_is_a_clean_error() {
    let dir = TempDir::new("damaged");
    let data = dir.path().join("d");
    std::fs::create_dir_all(&data).expect("dir");
    std::fs::write(data.join("backstop.redb"), b"").expect("empty file");
    let out = std::process::Command::new(common::binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "off",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(1),
        "a clean failure, not a panic (101)"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("backstop.redb") && err.contains("empty"),
        "{err}"
    );
}

/// Items 7 and 8: idempotency keys are per queue; Defer refuses past max_targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_per_queue_and_defer_respects_max_targets() {
    let server = Server::start("[server]\nmax_targets = 2\n", &[]);
    let mut q = proto::deferred_client::DeferredClient::new(server.channel().await);
    let defer = |queue: &str, payload: &[u8]| proto::DeferRequest {
        queue: queue.into(),
        payload: payload.to_vec(),
        idempotency_key: "same-key".into(),
        ..Default::default()
    };
    let a = q
        .defer(defer("q/t", b"one"))
        .await
        .expect("ok")
        .into_inner();
    let b = q.defer(defer("r", b"two")).await.expect("ok").into_inner();
    assert!(!b.duplicate, "another queue's key is another request");
    assert_ne!(a.id, b.id);
    let again = q.defer(defer("r", b"two")).await.expect("ok").into_inner();
    assert!(again.duplicate && again.id == b.id);
    // Both targets exist now (q/t and r); a third queue's target would pass the cap.
    let err = q
        .defer(proto::DeferRequest {
            queue: "third".into(),
            payload: b"x".to_vec(),
            ..Default::default()
        })
        .await
        .expect_err("refused at Defer, not stuck at Claim");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

/// Item 9: the outcome that opens the breaker does not advise a doomed retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outcome_that_opens_the_breaker_advises_falling_back() {
    let server = Server::start(
        "[defaults.breaker]\nfailure_threshold = 1\nopen_duration = \"60s\"\n",
        &[],
    );
    let mut c = server.resilience().await;
    let p = c
        .can_proceed(can("m"))
        .await
        .expect("ok")
        .into_inner()
        .permit;
    let r = c
        .record_outcome(outcome("m", &p, 503))
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(r.state(), proto::BreakerState::Open);
    let advice = r.retry.expect("advice");
    assert!(!advice.retry, "a retry here is certain to be refused");
    assert_eq!(advice.reason(), proto::RetryReason::CircuitOpen);
    let delay = advice.delay.as_ref().map_or(0.0, secs_f64);
    assert!(
        (59.0..=60.0).contains(&delay),
        "until it admits again: {delay}"
    );
}

fn check_config(text: &[u8]) -> (bool, String) {
    let dir = TempDir::new("cfg");
    let path = dir.path().join("b.toml");
    std::fs::write(&path, text).expect("write");
    let out = std::process::Command::new(common::binary())
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Item 11: check-config catches what serve would trip on, at the right place.
#[test]
fn check_config_rejects_unusable_names_zero_windows_and_bad_urls() {
    let (ok, err) = check_config(b"[targets.\"a\\u0000b\"]\n");
    assert!(!ok && err.contains("control character"), "{err}");
    let (ok, err) = check_config(b"[defaults.breaker]\nwindow = \"0s\"\n");
    assert!(!ok && err.contains("window must be above 0"), "{err}");
    let (ok, err) = check_config(b"[telemetry]\notlp_endpoint = \"not a url\"\n");
    assert!(!ok && err.contains("otlp_endpoint"), "{err}");
    let (ok, err) = check_config(b"[defaults.breaker]\nfailure_treshold = 5\n");
    assert!(!ok && err.contains("[defaults.breaker]"), "{err}");
    assert!(err.contains(":2:"), "located on line 2: {err}");
    let (ok, err) = check_config(b"[server]\n# caf\xe9\nlisten = \"127.0.0.1:1\"\n");
    assert!(!ok && err.contains("UTF-8"), "{err}");
    assert!(err.contains(":2:6:"), "at the bad byte, not 1:1: {err}");
}

/// Item 12: sockets that never speak HTTP/2 are closed, and a cap holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_connections_are_capped() {
    use std::io::Read as _;
    let server = Server::start(
        "[server]\nhandshake_timeout = \"300ms\"\nmax_connections = 8\n",
        &[],
    );
    let mut silent: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(&server.grpc).expect("connect"))
        .collect();
    let started = Instant::now();
    for s in &mut silent {
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut b = [0u8; 1];
        // Closed by the server (EOF or reset), never a timeout on our side.
        match s.read(&mut b) {
            Ok(0) => {}
            Ok(_) => panic!("the server sent bytes to a silent socket"),
            Err(e) => assert!(
                e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut,
                "not closed: {e}"
            ),
        }
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    // Real clients are served once the junk is gone.
    let mut c = server.resilience().await;
    assert!(
        c.can_proceed(can("t"))
            .await
            .expect("ok")
            .into_inner()
            .allowed
    );
}

/// Item 14: a long-poll Claim does not hold up shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_wakes_long_poll_claims() {
    let mut server = Server::start("[server]\nshutdown_grace = \"20s\"\n", &[]);
    let mut q = proto::deferred_client::DeferredClient::new(server.channel().await);
    let claim = tokio::spawn(async move {
        q.claim(proto::ClaimRequest {
            queue: "t".into(),
            max_items: 1,
            wait: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let exit = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .expect("join");
    assert!(exit.success(), "{exit:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drained in {:?}, not the 20 s grace",
        started.elapsed()
    );
    let r = claim.await.expect("join").expect("answered, not cut off");
    assert!(r.into_inner().items.is_empty());
}

/// Item 15: the status codes gRPC clients expect for oversized and garbage
/// messages; reflection in both versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbage_messages_get_the_expected_codes() {
    let server = Server::start(
        "[server]\nmax_message_bytes = 200000\n[queue]\nmax_payload_bytes = 1000\n",
        &[],
    );
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    // CanProceedRequest { target (field 1) = 300 KB }: over max_message_bytes.
    let mut body = vec![0x0A];
    let len = 300_000usize;
    let mut l = len;
    while l >= 0x80 {
        body.push((l as u8) | 0x80);
        l >>= 7;
    }
    body.push(l as u8);
    body.extend(std::iter::repeat_n(b'a', len));
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/backstop.v1.Resilience/CanProceed");
    let err = grpc
        .unary(tonic::Request::new(body), path, common::raw::RawCodec)
        .await
        .expect_err("too large");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Garbage to the health service.
    grpc.ready().await.expect("ready");
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
    let err = grpc
        .unary(
            tonic::Request::new(vec![0xFF, 0xFF, 0xFF, 0xFF]),
            path,
            common::raw::RawCodec,
        )
        .await
        .expect_err("garbage");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // The server kept serving.
    let mut c = server.resilience().await;
    assert!(
        c.can_proceed(can("t"))
            .await
            .expect("ok")
            .into_inner()
            .allowed
    );

    // v1alpha reflection lists the services too (older grpcurl, grpcui, Evans).
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut refl = ServerReflectionClient::new(server.channel().await);
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    let resp = stream.message().await.expect("message").expect("some");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected {resp:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "backstop.v1.Resilience")
    );
}

/// Item 16: the first breaker open is an increase Prometheus can see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transition_counters_exist_at_zero_before_the_first_open() {
    let server = Server::start("[targets.m]\n", &[]);
    let (_, body) = server.http_get("/metrics", &[]);
    let line = body
        .lines()
        .find(|l| {
            l.starts_with("backstop_breaker_transitions_total")
                && l.contains("target=\"m\"")
                && l.contains("from=\"closed\"")
                && l.contains("to=\"open\"")
        })
        .unwrap_or_else(|| panic!("no closed->open series for m:\n{body}"));
    assert!(line.ends_with(" 0"), "{line}");
}

/// Item 13: watchers that do not read share one snapshot instead of holding
/// a copy each, and snapshots arrive in parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_watchers_do_not_each_hold_a_snapshot() {
    let mut config = String::from("[events]\nmax_subscribers = 300\n");
    for i in 0..3000 {
        config.push_str(&format!("[targets.\"provider/model-{i:04}\"]\n"));
    }
    let server = Server::start(&config, &[]);
    let rss = || -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))
            .unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    // One reading watcher sees the snapshot in parts of at most 100 targets.
    let mut ev = proto::events_client::EventsClient::new(server.channel().await);
    let mut stream = ev
        .watch(proto::WatchRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let mut seen = 0;
    let mut parts = 0;
    while seen < 3000 {
        let e = stream.message().await.expect("ok").expect("event");
        let Some(proto::event::Kind::Snapshot(s)) = e.kind else {
            panic!("snapshot first")
        };
        assert!(s.targets.len() <= 100);
        assert_eq!(s.parts, 30);
        parts += 1;
        assert_eq!(s.part, parts);
        seen += s.targets.len();
    }
    drop(stream);
    let before = rss();
    // 200 watchers that never read.
    let mut idle = Vec::new();
    for _ in 0..200 {
        let mut ev = proto::events_client::EventsClient::new(server.channel().await);
        idle.push(
            ev.watch(proto::WatchRequest::default())
                .await
                .expect("watch")
                .into_inner(),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown_mib = rss().saturating_sub(before) / 1024;
    // A private snapshot of 3,000 targets is ~1.5 MB: 200 copies would be ~300 MiB.
    assert!(grown_mib < 100, "RSS grew by {grown_mib} MiB");
}
