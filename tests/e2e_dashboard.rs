//! The dashboard in a real (headless) browser: a breaker forced open by the
//! test shows as open on the page, live.
//!
//! Needs Node.js, `tests/browser/node_modules` (npm install) and Debian's
//! `chromium`; `scripts/test.sh` installs them and runs this with `--ignored`.

mod common;

use common::http_post;

use backstop::proto;
use common::Server;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and node; scripts/test.sh installs them and runs it"]
async fn a_breaker_forced_open_shows_as_open_on_the_page() {
    let server = Server::start(
        "[targets.\"anthropic/claude-sonnet\"]\n[targets.\"openai/gpt-4o\"]\n",
        &[],
    );
    let url = format!("http://{}/", server.http.as_deref().expect("http listener"));
    let shot = server.dir.path().join("dashboard.png");
    let browser_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser");
    let mut node = Command::new("node")
        .arg("dashboard_check.mjs")
        .arg(&url)
        .arg("anthropic/claude-sonnet")
        .arg(&shot)
        .current_dir(browser_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node (install Node.js; scripts/test.sh does)");
    let mut out = BufReader::new(node.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read");
    assert_eq!(
        line.trim(),
        "closed",
        "the page showed the target closed first"
    );
    server
        .admin()
        .await
        .set_breaker_state(proto::SetBreakerStateRequest {
            target: "anthropic/claude-sonnet".into(),
            mode: proto::BreakerMode::ForceOpen as i32,
            reason: "browser test".into(),
        })
        .await
        .expect("force open");
    line.clear();
    out.read_line(&mut line).expect("read");
    assert_eq!(line.trim(), "ok", "the page showed FORCED OPEN");
    assert!(node.wait().expect("node exits").success());
    assert!(shot.exists(), "a screenshot was taken");
    if let Ok(keep) = std::env::var("BACKSTOP_KEEP_SCREENSHOT") {
        let _ = std::fs::copy(&shot, keep);
    }
}

/// Where `BACKSTOP_KEEP_SCREENSHOT=<path>.png` keeps this test's
/// screenshot: `<path>-<tag>.png` (each test its own file).
fn keep_screenshot(shot: &std::path::Path, tag: &str) {
    if let Ok(keep) = std::env::var("BACKSTOP_KEEP_SCREENSHOT") {
        let keep = std::path::PathBuf::from(keep);
        let stem = keep
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("dashboard");
        let _ = std::fs::copy(shot, keep.with_file_name(format!("{stem}-{tag}.png")));
    }
}

/// `node dashboard_story.mjs <args>`, with its stdout as lines.
struct Story {
    node: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Story {
    fn start(args: &[&str]) -> Story {
        let mut node = Command::new("node")
            .arg("dashboard_story.mjs")
            .args(args)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node (install Node.js; scripts/test.sh does)");
        let out = BufReader::new(node.stdout.take().expect("stdout"));
        Story { node, out }
    }

    /// The next line the script prints (empty if it ended).
    fn line(&mut self) -> String {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("read");
        line.trim().to_string()
    }

    fn finish(mut self) {
        assert!(
            self.node.wait().expect("node exits").success(),
            "the browser script failed"
        );
    }
}

/// One admitted call to `target` reported as a success after `latency_ms`.
async fn call(
    c: &mut backstop::proto::resilience_client::ResilienceClient<tonic::transport::Channel>,
    target: &str,
    latency_ms: u64,
) -> bool {
    let a = c
        .can_proceed(proto::CanProceedRequest {
            target: target.into(),
            ..Default::default()
        })
        .await
        .expect("can_proceed")
        .into_inner();
    if a.allowed {
        c.record_outcome(proto::RecordOutcomeRequest {
            target: target.into(),
            permit: a.permit,
            http_status: 200,
            latency: Some(prost_types::Duration {
                seconds: 0,
                nanos: (latency_ms * 1_000_000) as i32,
            }),
            ..Default::default()
        })
        .await
        .expect("record_outcome");
    }
    a.allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and node; scripts/test.sh installs them and runs it"]
async fn events_from_before_the_page_opened_are_listed_and_sparklines_move_with_traffic() {
    let (forced, busy) = ("anthropic/claude-sonnet", "openai/gpt-4o");
    let server = Server::start(
        "[targets.\"anthropic/claude-sonnet\"]\n[targets.\"openai/gpt-4o\"]\n\
         [routes.chat]\ntargets = [\"anthropic/claude-sonnet\", \"openai/gpt-4o\"]\n\
         spend_per_day = 25.0\n",
        &[],
    );
    server
        .admin()
        .await
        .set_breaker_state(proto::SetBreakerStateRequest {
            target: forced.into(),
            mode: proto::BreakerMode::ForceOpen as i32,
            reason: "before the page opened".into(),
        })
        .await
        .expect("force open");
    let mut c = server.resilience().await;
    for _ in 0..3 {
        assert!(call(&mut c, busy, 80).await);
    }
    let url = format!("http://{}/", server.http.as_deref().expect("http listener"));
    let shot = server.dir.path().join("dashboard-history.png");
    let mut story = Story::start(&[
        "history",
        &url,
        forced,
        busy,
        "chat",
        shot.to_str().expect("utf-8 path"),
    ]);
    let events = story.line();
    assert!(
        events.starts_with("events ") && events != "events 0",
        "the page listed the events from before it opened: {events:?}"
    );
    assert_eq!(story.line(), "sparks", "the sparkline was drawn");
    for _ in 0..20 {
        assert!(call(&mut c, busy, 300).await);
    }
    assert_eq!(
        story.line(),
        "moved",
        "the sparkline moved with the traffic"
    );
    assert_eq!(
        story.line(),
        "ok",
        "routes, spend limits, header and narrow window"
    );
    story.finish();
    assert!(shot.exists(), "a screenshot was taken");
    keep_screenshot(&shot, "history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and node; scripts/test.sh installs them and runs it"]
async fn a_thousand_targets_render_in_time_and_can_be_searched_filtered_and_sorted() {
    const N: usize = 1000;
    let mut config = String::new();
    for i in 0..N {
        config.push_str(&format!("[targets.\"target-{i:04}\"]\n"));
        if i == 500 {
            config.push_str("requests_per_minute = 1\n");
        }
    }
    let server = Server::start(&config, &[]);
    server
        .admin()
        .await
        .set_breaker_state(proto::SetBreakerStateRequest {
            target: "target-0123".into(),
            mode: proto::BreakerMode::ForceOpen as i32,
            reason: "one of a thousand".into(),
        })
        .await
        .expect("force open");
    let mut c = server.resilience().await;
    let admitted = [
        call(&mut c, "target-0500", 50).await,
        call(&mut c, "target-0500", 50).await,
        call(&mut c, "target-0500", 50).await,
    ];
    assert_eq!(admitted, [true, false, false], "one a minute");
    let url = format!("http://{}/", server.http.as_deref().expect("http listener"));
    let shot = server.dir.path().join("dashboard-many.png");
    let mut story = Story::start(&["many", &url, "1000", shot.to_str().expect("utf-8 path")]);
    let render = story.line();
    let json: serde_json::Value = serde_json::from_str(
        render
            .strip_prefix("render ")
            .unwrap_or_else(|| panic!("a render report, got {render:?}")),
    )
    .expect("json");
    assert_eq!(json["count"], N, "{json}");
    let ms = json["ms"].as_f64().expect("ms");
    assert!(ms < 200.0, "the 1,000-target list rendered in {ms:.1} ms");
    eprintln!("1,000 targets: list rendered in {ms:.1} ms ({json})");
    assert_eq!(
        story.line(),
        "ok",
        "search, filter, sort, scrolling, narrow window"
    );
    story.finish();
    keep_screenshot(&shot, "many");
}

fn auth_config() -> String {
    format!(
        "[targets.\"openai/gpt-4o\"]\n\
         [[auth.principals]]\nname = \"oncall\"\nroles = [\"operator\"]\ntoken_sha256 = \"{}\"\n\
         [[auth.principals]]\nname = \"grafana\"\nroles = [\"viewer\"]\ntoken_sha256 = \"{}\"\n",
        common::sha256_hex("oncall-token-00000"),
        common::sha256_hex("viewer-token-00000"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and node; scripts/test.sh installs them and runs it"]
async fn an_operator_forces_a_breaker_open_from_the_page_after_confirming() {
    let server = Server::start(&auth_config(), &[]);
    let url = format!("http://{}/", server.http.as_deref().expect("http listener"));
    let mut story = Story::start(&["operator", &url, "openai/gpt-4o", "oncall-token-00000"]);
    assert_eq!(
        story.line(),
        "forced",
        "the operator forced the breaker open"
    );
    story.finish();
    let (_, body) = server.http_get(
        "/api/snapshot",
        &[("Authorization", "Bearer viewer-token-00000")],
    );
    assert!(body.contains("\"forced_open\""), "{body}");
    assert!(
        body.contains("drill from the browser (by oncall)"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and node; scripts/test.sh installs them and runs it"]
async fn a_viewer_sees_no_operator_buttons_and_cannot_act() {
    let server = Server::start(&auth_config(), &[]);
    let url = format!("http://{}/", server.http.as_deref().expect("http listener"));
    let mut story = Story::start(&["viewer", &url, "openai/gpt-4o", "viewer-token-00000"]);
    assert_eq!(
        story.line(),
        "refused 401 403",
        "unauthenticated: 401; viewer: 403"
    );
    story.finish();
    let (_, body) = server.http_get(
        "/api/snapshot",
        &[("Authorization", "Bearer viewer-token-00000")],
    );
    assert!(!body.contains("forced_open"), "{body}");
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn the_dashboard_api_lists_recent_events_history_routes_queues_and_guards_actions() {
    let mut config = auth_config();
    config.push_str(
        "[targets.\"anthropic/claude-sonnet\"]\n\
         [routes.chat]\ntargets = [\"openai/gpt-4o\", \"anthropic/claude-sonnet\"]\n",
    );
    let server = Server::start(&config, &[]);
    let viewer = [("Authorization", "Bearer viewer-token-00000")];
    let oncall = [("Authorization", "Bearer oncall-token-00000")];
    let act = |who: &[(&'static str, &'static str)]| {
        let mut h = who.to_vec();
        h.push(("Content-Type", "application/json"));
        h.push(("X-Backstop-Action", "1"));
        h
    };
    let force = r#"{"mode": "force_open", "reason": "api test"}"#;
    let path = "/api/targets/openai%2Fgpt-4o/breaker";

    // Actions: no credential 401, a viewer 403, no CSRF header 403, bad mode 400.
    assert_eq!(http_post(&server, path, &act(&[]), force).0, 401);
    assert_eq!(http_post(&server, path, &act(&viewer), force).0, 403);
    assert_eq!(http_post(&server, path, &oncall, force).0, 403);
    let (code, body) = http_post(&server, path, &act(&oncall), r#"{"mode": "sideways"}"#);
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        http_post(
            &server,
            "/api/targets/openai%2Fgpt-4o/explode",
            &act(&oncall),
            "{}"
        )
        .0,
        404
    );
    // The operator forces it open (the raw `/` in the name works too).
    let (code, body) = http_post(
        &server,
        "/api/targets/openai/gpt-4o/breaker",
        &act(&oncall),
        force,
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["state"], "forced_open");

    // Recent events: the force, with times, oldest first; limit respected.
    let (_, body) = server.http_get("/api/events?limit=1", &viewer);
    let ev = json(&body);
    assert_eq!(ev["events"].as_array().map(Vec::len), Some(1), "{ev}");
    assert!(ev["events"][0]["at_ms"].as_u64().is_some());
    assert!(ev["last_seq"].as_u64() >= ev["events"][0]["seq"].as_u64());
    let (_, body) = server.http_get("/api/events", &viewer);
    assert!(body.contains("api test (by oncall)"), "{body}");

    // Snapshot: the viewer may not act; the operator may.
    let (_, body) = server.http_get("/api/snapshot", &viewer);
    let snap = json(&body);
    assert_eq!(snap["viewer"]["operator"], false);
    assert!(snap["history"]["cap"].as_u64().is_some());
    let (_, body) = server.http_get("/api/snapshot", &oncall);
    assert_eq!(json(&body)["viewer"]["operator"], true);

    // Routes: the forced-open primary is passed over, without admitting.
    let (_, body) = server.http_get("/api/routes", &viewer);
    let r = json(&body);
    assert_eq!(r["routes"][0]["route"], "chat");
    assert_eq!(r["routes"][0]["chosen"], "anthropic/claude-sonnet", "{r}");
    assert_eq!(
        r["routes"][0]["unavailable"][0]["reason"], "forced_open",
        "{r}"
    );

    // History: null for a target without traffic; too many names refused.
    let (_, body) = server.http_get("/api/history?targets=anthropic/claude-sonnet", &viewer);
    let h = json(&body);
    assert_eq!(h["buckets"], 90);
    assert!(h["targets"]["anthropic/claude-sonnet"].is_null(), "{h}");
    let many: Vec<String> = (0..201).map(|i| format!("t{i}")).collect();
    let (status, _) = server.http_get(&format!("/api/history?targets={}", many.join(",")), &viewer);
    assert!(status.contains("400"), "{status}");

    // Queues: none yet.
    let (_, body) = server.http_get("/api/queues", &viewer);
    assert_eq!(json(&body)["queues"], serde_json::json!([]));

    // Unauthenticated reads are refused too.
    let (status, _) = server.http_get("/api/events", &[]);
    assert!(status.contains("401"), "{status}");

    // Reset by the operator.
    let (code, body) = http_post(
        &server,
        "/api/targets/openai%2Fgpt-4o/reset",
        &act(&oncall),
        "",
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["state"], "closed");
}

#[tokio::test]
async fn history_follows_traffic_over_grpc() {
    let server = Server::start("[targets.\"openai/gpt-4o\"]\n", &[]);
    let mut c = server.resilience().await;
    for _ in 0..5 {
        assert!(call(&mut c, "openai/gpt-4o", 120).await);
    }
    let (_, body) = server.http_get("/api/history?targets=openai/gpt-4o", &[]);
    let h = json(&body);
    let s = &h["targets"]["openai/gpt-4o"];
    let admitted: u64 = s["admitted"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v.as_u64())
        .sum();
    assert_eq!(admitted, 5, "{h}");
    assert_eq!(s["p50_ms"].as_array().map(Vec::len), Some(90));
    let p50 = s["p50_ms"]
        .as_array()
        .and_then(|a| a.iter().rev().find_map(|v| v.as_f64()))
        .expect("a p50");
    assert!(
        (85.0..170.0).contains(&p50),
        "p50 {p50} ms for 120 ms calls"
    );
    let (_, body) = server.http_get("/api/snapshot", &[]);
    let snap = json(&body);
    assert_eq!(snap["targets"][0]["recent"]["admitted"], 5, "{snap}");
    assert_eq!(
        snap["viewer"]["operator"], true,
        "no auth configured: anyone may act"
    );
}
