//! The dashboard in a real (headless) browser: a breaker forced open by the
//! test shows as open on the page, live.
//!
//! Needs Node.js, `tests/browser/node_modules` (npm install) and Debian's
//! `chromium`; `scripts/test.sh` installs them and runs this with `--ignored`.

mod common;

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
