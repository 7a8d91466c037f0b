//! End-to-end: principals and roles on the real binary, over gRPC and HTTP,
//! and the audit of operator actions.

mod common;

use backstop::proto;
use common::Server;
use std::io::{Read, Write};
use tonic::{Code, Request};

use common::sha256_hex as sha;

fn config(extra: &str) -> String {
    format!(
        r#"
[[auth.principals]]
name = "fleet"
roles = ["agent"]
token_sha256 = "{}"

[[auth.principals]]
name = "oncall"
roles = ["operator"]
token_sha256 = "{}"

[[auth.principals]]
name = "grafana"
roles = ["viewer"]
token_sha256 = "{}"
{extra}
"#,
        sha("fleet-token-000000"),
        sha("oncall-token-00000"),
        sha("viewer-token-00000"),
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

fn can(target: &str) -> proto::CanProceedRequest {
    proto::CanProceedRequest {
        target: target.into(),
        ..Default::default()
    }
}

fn force(target: &str) -> proto::SetBreakerStateRequest {
    proto::SetBreakerStateRequest {
        target: target.into(),
        mode: proto::BreakerMode::ForceOpen as i32,
        reason: "provider incident".into(),
    }
}

/// A raw HTTP/1.0 request; returns the whole response (head and body).
fn http(server: &Server, request: &str) -> String {
    let addr = server.http.as_deref().expect("http");
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.write_all(request.replace("{addr}", addr).as_bytes())
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_needs_a_principal_with_the_right_role() {
    let server = Server::start(&config(""), &[]);
    let mut r = server.resilience().await;
    let mut admin = server.admin().await;

    let e = r.can_proceed(can("p/m")).await.expect_err("no credential");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("Bearer"), "{}", e.message());
    let e = r
        .can_proceed(with("guess-000000000000", can("p/m")))
        .await
        .expect_err("unknown token");
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        r.can_proceed(with("fleet-token-000000", can("p/m")))
            .await
            .expect("an agent decides")
            .into_inner()
            .allowed
    );

    // An agent may not force a breaker; the message names the role needed.
    let e = admin
        .set_breaker_state(with("fleet-token-000000", force("p/m")))
        .await
        .expect_err("agent");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("operator role"), "{}", e.message());
    assert!(e.message().contains("\"fleet\""), "{}", e.message());
    // A viewer reads but does not act, and does not decide.
    admin
        .get_target(with(
            "viewer-token-00000",
            proto::GetTargetRequest {
                target: "p/m".into(),
            },
        ))
        .await
        .expect("viewer reads");
    let e = admin
        .set_breaker_state(with("viewer-token-00000", force("p/m")))
        .await
        .expect_err("viewer");
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = r
        .can_proceed(with("viewer-token-00000", can("p/m")))
        .await
        .expect_err("viewer");
    assert_eq!(e.code(), Code::PermissionDenied);

    // The operator acts, and the action says who (audit).
    let t = admin
        .set_breaker_state(with("oncall-token-00000", force("p/m")))
        .await
        .expect("operator")
        .into_inner();
    assert_eq!(t.forced_reason, "provider incident (by oncall)");

    // Health stays open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health needs no credential");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_needs_a_viewer_and_the_browser_signs_in_with_a_cookie() {
    let server = Server::start(&config("[auth]\nmetrics = \"token\"\n"), &[]);
    let (status, _) = server.http_get("/api/snapshot", &[]);
    assert!(status.contains("401"), "{status}");
    let (status, _) = server.http_get(
        "/api/snapshot",
        &[("Authorization", "Bearer fleet-token-000000")],
    );
    assert!(status.contains("403"), "an agent is not a viewer: {status}");
    let (status, body) = server.http_get(
        "/api/snapshot",
        &[("Authorization", "Bearer viewer-token-00000")],
    );
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("\"kind\""), "{body}");
    let (status, _) = server.http_get("/metrics", &[]);
    assert!(status.contains("401"), "metrics = \"token\": {status}");
    let (status, _) = server.http_get("/healthz", &[]);
    assert!(status.contains("200"), "probes stay open: {status}");

    // The dashboard: a sign-in form, then a cookie that works for the API.
    let (status, body) = server.http_get("/", &[]);
    assert!(status.contains("401"), "{status}");
    assert!(body.contains("action=\"/login\""), "{body}");
    let form = "token=viewer-token-00000";
    let res = http(
        &server,
        &format!(
            "POST /login HTTP/1.0\r\nHost: {{addr}}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ),
    );
    assert!(
        res.starts_with("HTTP/1.0 303") || res.starts_with("HTTP/1.1 303"),
        "{res}"
    );
    let cookie = res
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .expect("a cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("name=value");
    let (status, body) = server.http_get("/", &[("Cookie", pair)]);
    assert!(status.contains("200"), "{status}");
    assert!(!body.contains("action=\"/login\""));
    let (status, _) = server.http_get("/api/snapshot", &[("Cookie", pair)]);
    assert!(status.contains("200"), "{status}");
    // A token that may not view gets no cookie.
    let bad = "token=fleet-token-000000";
    let res = http(
        &server,
        &format!(
            "POST /login HTTP/1.0\r\nHost: {{addr}}\r\nContent-Length: {}\r\n\r\n{bad}",
            bad.len()
        ),
    );
    assert!(res.contains(" 401 "), "{res}");
    assert!(!res.to_ascii_lowercase().contains("set-cookie"), "{res}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_tokens_at_once() {
    let server = Server::start(&config(""), &[]);
    let mut r = server.resilience().await;
    r.can_proceed(with("fleet-token-000000", can("p/m")))
        .await
        .expect("old token");
    std::fs::write(
        &server.config_path,
        config("").replace(&sha("fleet-token-000000"), &sha("fleet-token-rotated")),
    )
    .expect("write");
    server
        .admin()
        .await
        .reload_config(with(
            "oncall-token-00000",
            proto::ReloadConfigRequest {
                reason: "rotate".into(),
            },
        ))
        .await
        .expect("operator reloads");
    let e = r
        .can_proceed(with("fleet-token-000000", can("p/m")))
        .await
        .expect_err("the old token is gone");
    assert_eq!(e.code(), Code::Unauthenticated);
    r.can_proceed(with("fleet-token-rotated", can("p/m")))
        .await
        .expect("the new one works");
}

/// Secrets never leave the server: with debug logging, after right and
/// wrong tokens on gRPC and HTTP, a sign-in attempt, an operator action, a
/// reload and a refused call, no token (valid or not) appears in the
/// server's captured output (stdout and stderr), `/metrics`, the event log
/// (`/api/events`), the dashboard snapshot, or any error message a client
/// got back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_metrics_events_or_errors() {
    const WRONG: &str = "wrong-secret-token-123456";
    let secrets = [
        "fleet-token-000000",
        "oncall-token-00000",
        "viewer-token-00000",
        WRONG,
    ];
    let server = Server::start_capturing(
        &config("[auth]\nmetrics = \"token\"\n"),
        &[],
        &[("RUST_LOG", "debug")],
    );
    let mut said = Vec::new();
    let mut r = proto::resilience_client::ResilienceClient::new(server.channel().await);
    let mut a = proto::admin_client::AdminClient::new(server.channel().await);
    assert!(
        r.can_proceed(with("fleet-token-000000", can("p/m")))
            .await
            .expect("agent")
            .into_inner()
            .allowed
    );
    for (who, e) in [
        (
            "wrong token",
            r.can_proceed(with(WRONG, can("p/m"))).await.err(),
        ),
        (
            "no token",
            r.can_proceed(Request::new(can("p/m"))).await.err(),
        ),
        (
            "agent forcing",
            a.set_breaker_state(with("fleet-token-000000", force("p/m")))
                .await
                .err(),
        ),
        (
            "wrong operator",
            a.set_breaker_state(with(WRONG, force("p/m"))).await.err(),
        ),
    ] {
        let e = e.unwrap_or_else(|| panic!("{who} was refused"));
        said.push(format!("{who}: {} {}", e.message(), e.metadata().len()));
        for (k, v) in e.metadata().clone().into_headers() {
            said.push(format!("{k:?}: {v:?}"));
        }
    }
    a.set_breaker_state(with("oncall-token-00000", force("p/m")))
        .await
        .expect("operator");
    a.reload_config(with(
        "oncall-token-00000",
        proto::ReloadConfigRequest {
            reason: "rotate".into(),
        },
    ))
    .await
    .expect("reload");
    let wrong = format!("token={WRONG}");
    said.push(http(
        &server,
        &format!(
            "POST /login HTTP/1.0\r\nHost: {{addr}}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{wrong}",
            wrong.len()
        ),
    ));
    let (status, body) =
        server.http_get("/metrics", &[("Authorization", &format!("Bearer {WRONG}"))]);
    said.push(format!("{status} {body}"));
    let viewer = [("Authorization", "Bearer viewer-token-00000")];
    let mut pages = Vec::new();
    for path in ["/metrics", "/api/events?limit=1000", "/api/snapshot"] {
        let (status, body) = server.http_get(path, &viewer);
        assert!(status.contains("200"), "{path}: {status}");
        pages.push((path, body));
    }
    assert!(
        pages[1].1.contains("provider incident"),
        "the event log has the operator action: {}",
        pages[1].1
    );
    // Let the debug log of the last requests reach the capture.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let logs = server.output.lock().expect("output").clone();
    assert!(
        logs.contains("DEBUG") && logs.contains("provider incident"),
        "the capture has the debug log and the audit line"
    );
    for secret in secrets {
        assert!(!logs.contains(secret), "{secret} in the server's output");
        for (path, body) in &pages {
            assert!(!body.contains(secret), "{secret} in {path}");
        }
        for s in &said {
            assert!(!s.contains(secret), "{secret} in an answer: {s}");
        }
    }
}
