//! The load generator works: one second of load against a spawned server and
//! its baseline. (No timing assertions: figures belong in BENCHMARKS.md.)

mod common;

use common::TempDir;
use std::process::Command;

fn bench(workload: &str, extra: &[&str]) -> serde_json::Value {
    let dir = TempDir::new("bench");
    let out = dir.path().join("out.json");
    let status = Command::new(env!("CARGO_BIN_EXE_backstop-bench"))
        .args([
            "--workload",
            workload,
            "--in-flight",
            "4",
            "--connections",
            "2",
        ])
        .args([
            "--duration",
            "1s",
            "--warmup",
            "0s",
            "--rounds",
            "1",
            "--targets",
            "50",
        ])
        .args(extra)
        .arg("--backstop-bin")
        .arg(common::binary())
        .arg("--json")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .status()
        .expect("run backstop-bench");
    assert!(status.success(), "backstop-bench failed: {status:?}");
    serde_json::from_str(&std::fs::read_to_string(&out).expect("json written")).expect("valid json")
}

#[test]
fn the_bench_drives_backstop_and_the_baseline() {
    for workload in ["can-proceed", "agent-loop", "batch"] {
        let j = bench(workload, &["--batch-size", "20"]);
        let s = &j["summary"][0];
        for system in ["backstop", "baseline"] {
            assert!(
                s[system]["requests"].as_u64().unwrap_or(0) > 0,
                "{workload}/{system}: {s}"
            );
            assert_eq!(
                s[system]["errors"].as_u64(),
                Some(0),
                "{workload}/{system}: {s}"
            );
            assert!(s[system]["p99_us"].as_f64().unwrap_or(0.0) > 0.0);
        }
        let ratio = s["backstop_over_baseline_throughput"]
            .as_f64()
            .expect("ratio");
        assert!(ratio > 0.0, "{workload}: {ratio}");
        if workload == "batch" {
            let b = &s["backstop"];
            assert_eq!(
                b["decisions"].as_u64(),
                b["requests"].as_u64().map(|r| r * 20),
                "20 decisions per batch"
            );
        }
    }
}
