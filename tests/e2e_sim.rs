//! backstop-sim end to end: the real `backstop-sim` and `backstop` binaries
//! on a short scenario (an outage of the primary, then recovery under a
//! hidden rate limit). It asserts the headline properties of issue #17, not
//! exact numbers: a shared breaker wastes far fewer calls on a down model,
//! half-open probing is fleet-wide, nothing is lost, and the shared budget
//! keeps 429s after recovery low.

use serde_json::Value;
use std::process::Command;

const SCENARIO: &str = r#"
name = "e2e-short"
description = "Primary 529 from 30 s to 130 s, then rate-limited at 6 calls/s."
duration = "200s"
arrivals_until = "160s"
seed = 11

[agents]
count = 60
mean_interval = "10s"
min_tokens = 500
max_tokens = 4000

[[models]]
name = "anthropic/claude-sonnet"
latency = "2s"
context_window = 200000
price_in = 3.0
price_out = 15.0

[[models]]
name = "openai/gpt-4o"
latency = "2s"
context_window = 128000

[[phases]]
model = "anthropic/claude-sonnet"
kind = "outage"
from = "30s"
to = "130s"

[[phases]]
model = "anthropic/claude-sonnet"
kind = "rate_limit"
rps = 6
burst = 12
from = "130s"
to = "200s"
"#;

fn mode<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["modes"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["mode"] == name))
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

#[test]
fn sharing_beats_deciding_alone() {
    let dir = std::env::temp_dir().join(format!("backstop-e2e-sim-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let scenario = dir.join("short.toml");
    std::fs::write(&scenario, SCENARIO).expect("write scenario");
    let out = Command::new(env!("CARGO_BIN_EXE_backstop-sim"))
        .arg(&scenario)
        .args([
            "--modes",
            "per-process,backstop",
            "--ms-per-sec",
            "20",
            "--no-plots",
            "--out",
        ])
        .arg(&dir)
        .arg("--backstop-bin")
        .arg(env!("CARGO_BIN_EXE_backstop"))
        .output()
        .expect("run backstop-sim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "backstop-sim failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
    let report: Value = serde_json::from_str(&text).expect("report.json parses");
    assert!(
        std::fs::read_to_string(dir.join("report.md"))
            .is_ok_and(|md| md.contains("| backstop |") || md.contains("backstop"))
    );
    let pp = mode(&report, "per-process");
    let bs = mode(&report, "backstop");
    eprintln!("{stdout}");

    // Wasted calls: each process must find out alone; the fleet finds out once.
    let (pp_wasted, bs_wasted) = (n(pp, "wasted_calls"), n(bs, "wasted_calls"));
    assert!(
        pp_wasted >= 50,
        "the outage should cost per-process agents calls: {pp_wasted}"
    );
    assert!(
        bs_wasted * 5 <= pp_wasted,
        "backstop wasted {bs_wasted} calls, more than 20 % of per-process's {pp_wasted}"
    );

    // One probe per half-open episode, fleet-wide (half_open_max_probes = 1);
    // the 100 s outage outlasts the 60 s open period, so there is an episode.
    let episodes = bs["probes_per_half_open_episode"]
        .as_array()
        .expect("episodes");
    assert!(
        !episodes.is_empty(),
        "no half-open episode during the outage: {bs}"
    );
    for e in episodes {
        assert!(
            e.as_u64().is_some_and(|c| c <= 1),
            "more than one probe in an episode: {episodes:?}"
        );
    }

    // Nothing lost: every request that fits a model is answered, deferred ones after recovery.
    let total = n(bs, "completed") + n(bs, "deferred_then_completed") + n(bs, "failed");
    assert_eq!(n(bs, "lost"), 0, "backstop mode lost requests");
    assert_eq!(
        n(bs, "queued_at_end"),
        0,
        "deferred requests were never drained"
    );
    assert_eq!(
        n(bs, "failed"),
        0,
        "no request in this scenario is too large"
    );
    assert_eq!(
        total,
        n(pp, "completed") + n(pp, "deferred_then_completed") + n(pp, "failed") + n(pp, "lost"),
        "both modes saw the same request stream"
    );

    // After recovery the primary is rate-limited: the shared budget (its
    // provider's limit) and fleet-wide pauses keep 429s under 5 % of the calls.
    let calls = n(bs, "provider_calls");
    let after = n(bs, "rate_limited_after_recovery");
    assert!(
        after * 20 <= calls,
        "{after} 429s after recovery out of {calls} calls"
    );

    // The server's end-to-end figures (issue #17 part 3) match what the
    // agents measured: the same failure rate from backstop_requests_total,
    // and the p99 of request durations within 5 % (plus half a simulated
    // second: the FinishRequest round trip at 20 ms per simulated second).
    let e2e = &bs["end_to_end"];
    assert!(e2e.is_object(), "no end_to_end in {bs}");
    let f = |k: &str| {
        e2e[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {e2e}"))
    };
    assert!(f("requests") > 0.0);
    assert_eq!(
        f("requests_backstop"),
        f("requests"),
        "the server counted every finished request once"
    );
    assert!(
        (f("failure_rate_agents") - f("failure_rate_backstop")).abs() < 1e-9,
        "{e2e}"
    );
    assert!(
        f("tracked") >= 0.99 * f("requests"),
        "the server measured them itself: {e2e}"
    );
    let (agents, server) = (f("p99_agents_s"), f("p99_backstop_s"));
    assert!(
        (agents - server).abs() <= 0.05 * agents + 0.5,
        "end-to-end p99: agents {agents} s, backstop {server} s"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
