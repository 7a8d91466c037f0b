//! End-to-end: config reload (SIGHUP and Admin/ReloadConfig) on the real
//! binary, without losing state, and what survives a kill -9 after it.

mod common;

use backstop::proto;
use common::Server;
use std::time::{Duration, Instant};
use tonic::Request;

const TOKEN: &str = "0123456789abcdef-reload";

fn config(extra: &str) -> String {
    format!(
        r#"
[server]
admin_token = "{TOKEN}"

[defaults.breaker]
failure_threshold = 2
open_duration = "10m"
jitter = 0.0

[targets.a]
requests_per_minute = 100

{extra}
"#
    )
}

fn authed<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    r
}

async fn get(s: &Server, t: &str) -> Result<proto::TargetStatus, tonic::Status> {
    s.admin()
        .await
        .get_target(authed(proto::GetTargetRequest { target: t.into() }))
        .await
        .map(|r| r.into_inner())
}

async fn reload(s: &Server, reason: &str) -> Result<proto::ReloadConfigResponse, tonic::Status> {
    s.admin()
        .await
        .reload_config(authed(proto::ReloadConfigRequest {
            reason: reason.into(),
        }))
        .await
        .map(|r| r.into_inner())
}

async fn fail(s: &Server, t: &str, n: usize) {
    let mut c = s.resilience().await;
    for _ in 0..n {
        let permit = common::permit(&mut c, t, None).await;
        c.record_outcome(proto::RecordOutcomeRequest {
            target: t.into(),
            permit,
            http_status: 503,
            ..Default::default()
        })
        .await
        .expect("record");
    }
}

fn requests_available(t: &proto::TargetStatus) -> f64 {
    t.key_slots[0]
        .budgets
        .iter()
        .find(|b| b.kind == "requests")
        .map(|b| b.available)
        .expect("requests budget")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_admin_reload_apply_a_new_config_without_losing_state() {
    let server = Server::start(&config("[targets.gone]\n"), &[]);
    fail(&server, "a", 2).await;
    let open = get(&server, "a").await.expect("a");
    assert_eq!(open.state(), proto::BreakerState::Open);
    assert!(get(&server, "gone").await.is_ok());
    let mut events = server.sse(
        "/events?kinds=config_reloaded,target_removed",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );

    // SIGHUP: a budget and the breaker change, one target goes, one appears.
    std::fs::write(
        &server.config_path,
        config("[targets.fresh]\ncontext_window = 1000\n").replace(
            "requests_per_minute = 100",
            "requests_per_minute = 50\nbreaker = { failure_threshold = 9 }",
        ),
    )
    .expect("write config");
    let pid = server.child.id().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill -HUP");
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&server, "fresh").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = get(&server, "a").await.expect("a");
    assert_eq!(
        a.state(),
        proto::BreakerState::Open,
        "an open breaker stays open"
    );
    assert_eq!(a.open_until, open.open_until);
    assert_eq!(
        a.settings
            .and_then(|s| s.breaker)
            .map(|b| b.failure_threshold),
        Some(9)
    );
    assert_eq!(
        get(&server, "gone").await.expect_err("dropped").code(),
        tonic::Code::NotFound
    );
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = common::next_sse(&mut events).expect("an event");
        if e.event.is_empty() || e.event == "snapshot" {
            continue;
        }
        seen.push((e.event.clone(), e.data.clone()));
    }
    assert!(
        seen.iter()
            .any(|(k, d)| k == "target_removed" && d.contains("\"gone\"")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(k, d)| k == "config_reloaded" && d.contains("\"sighup\"")),
        "{seen:?}"
    );

    // An invalid file changes nothing and says where it is wrong.
    std::fs::write(
        &server.config_path,
        config("[targets.fresh]\ncontext_window = \"lots\"\n"),
    )
    .expect("write config");
    let err = reload(&server, "typo").await.expect_err("invalid");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("backstop.toml:"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("context_window"),
        "{}",
        err.message()
    );
    assert!(
        get(&server, "fresh").await.is_ok(),
        "still on the previous config"
    );

    // A valid one, through Admin: the response says what changed, and what
    // needs a restart keeps its running value.
    std::fs::write(
        &server.config_path,
        config("[targets.fresh]\n[routes.chat]\ntargets = [\"fresh\", \"a\"]\n")
            .replace("[server]\n", "[server]\nmax_connections = 77\n"),
    )
    .expect("write config");
    let r = reload(&server, "chat route").await.expect("reload");
    assert_eq!(r.changed, vec!["a", "fresh"]);
    assert_eq!(r.routes_changed, vec!["chat"]);
    // (--listen on the command line wins over the file at every reload, so
    // the file's listen would not count as a change here.)
    assert_eq!(r.needs_restart, vec!["server.max_connections"]);
    assert_ne!(r.digest, r.previous_digest);
    let cluster = server
        .admin()
        .await
        .get_cluster(authed(proto::GetClusterRequest {}))
        .await
        .expect("get_cluster")
        .into_inner();
    assert_eq!(cluster.config_digest, r.digest, "the digest in force");
    let mut c = server.resilience().await;
    let routed = c
        .route(proto::RouteRequest {
            route: "chat".into(),
            ..Default::default()
        })
        .await
        .expect("the new route serves")
        .into_inner();
    assert_eq!(routed.target, "fresh");
    // Without the operator token: refused.
    let unauth = server
        .admin()
        .await
        .reload_config(proto::ReloadConfigRequest::default())
        .await
        .expect_err("needs the token");
    assert_eq!(unauth.code(), tonic::Code::Unauthenticated);

    // kill -9 after the reload: a restart on the same file finds the same state.
    let text = std::fs::read_to_string(&server.config_path).expect("config");
    let dir = server.into_dir();
    let server = Server::start_in(dir, &text, &[]);
    let a = get(&server, "a").await.expect("a");
    assert_eq!(a.state(), proto::BreakerState::Open);
    assert_eq!(a.open_until, open.open_until);
    assert!(get(&server, "gone").await.is_err());
    assert!(get(&server, "fresh").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_budget_carries_its_used_fraction_across_a_reload() {
    let server = Server::start(&config(""), &[]);
    let mut c = server.resilience().await;
    for _ in 0..60 {
        let a = c
            .can_proceed(proto::CanProceedRequest {
                target: "a".into(),
                ..Default::default()
            })
            .await
            .expect("ok")
            .into_inner();
        assert!(a.allowed);
    }
    std::fs::write(
        &server.config_path,
        config("").replace("requests_per_minute = 100", "requests_per_minute = 10"),
    )
    .expect("write");
    reload(&server, "").await.expect("reload");
    let left = requests_available(&get(&server, "a").await.expect("a"));
    // 60 of 100 used (plus what refilled in the meantime) = about 6 of 10.
    assert!((3.9..4.6).contains(&left), "about 4 of 10 left, got {left}");
    let mut admitted = 0;
    for _ in 0..20 {
        if c.can_proceed(proto::CanProceedRequest {
            target: "a".into(),
            ..Default::default()
        })
        .await
        .expect("ok")
        .into_inner()
        .allowed
        {
            admitted += 1;
        }
    }
    assert!(admitted <= 5, "never past the new limit: {admitted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_config_file_says_there_is_nothing_to_reload() {
    let server = Server::start_without_config(&[]);
    let err = server
        .admin()
        .await
        .reload_config(proto::ReloadConfigRequest::default())
        .await
        .expect_err("nothing to reload");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("--config"), "{}", err.message());
}
