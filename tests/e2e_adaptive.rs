//! End-to-end: an adaptive concurrency limit learns a provider's hidden
//! limit, against the real binary.
//!
//! The provider is a fake in this process: it takes `HIDDEN` calls at once
//! and answers the one past that with an immediate 429; its latency grows
//! as it fills up. A pool of agents admits through CanProceed, "calls" it
//! and reports through RecordOutcome, as a real fleet would. Real time is
//! used only because the binary runs on it; the fake's latencies are short.

mod common;

use backstop::proto;
use common::Server;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TARGET: &str = "fake/provider";
const HIDDEN: u32 = 32;
/// A few more agents than the provider takes: enough to keep the limit
/// full, few enough that their polling does not load the (debug) server
/// into adding its own latency to every call.
const AGENTS: usize = 40;
const BASE: Duration = Duration::from_millis(200);

/// Starts below the hidden limit; 429s are left to the limit (not the breaker).
const CONFIG: &str = r#"
[targets."fake/provider"]
max_concurrency = "adaptive"
adaptive = { min = 2, max = 200, initial = 16 }
breaker = { treat = { rate_limited = "ignore" } }
"#;

/// The fake provider: a semaphore with a hidden size.
struct Provider {
    in_flight: AtomicU32,
}

impl Provider {
    /// `None`: answered 429 at once. Else the latency the call takes (the
    /// fake's own processing time: reported as is, so a busy test machine
    /// cannot pass for a provider slowing down).
    fn enter(&self) -> Option<Duration> {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if n > HIDDEN {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        let fill = f64::from(n) / f64::from(HIDDEN);
        Some(BASE.mul_f64(1.0 + 0.5 * fill * fill))
    }

    fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adaptive_limit_converges_on_a_providers_hidden_limit() {
    let server = Server::start(CONFIG, &[]);
    let provider = Arc::new(Provider {
        in_flight: AtomicU32::new(0),
    });
    let stop = Arc::new(AtomicBool::new(false));
    // Counted only once `measuring` is set (after convergence).
    let measuring = Arc::new(AtomicBool::new(false));
    let (calls, rejected) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let mut c = server.resilience().await;
        let (provider, stop, measuring) = (provider.clone(), stop.clone(), measuring.clone());
        let (calls, rejected) = (calls.clone(), rejected.clone());
        agents.push(tokio::spawn(async move {
            let caller = format!("agent-{i}");
            while !stop.load(Ordering::Relaxed) {
                let a = c
                    .can_proceed(proto::CanProceedRequest {
                        target: TARGET.into(),
                        caller: caller.clone(),
                        ..Default::default()
                    })
                    .await
                    .expect("CanProceed")
                    .into_inner();
                if !a.allowed {
                    assert_eq!(a.reason(), proto::Reason::ConcurrencyLimit);
                    // Polls spread apart (a slot frees on any outcome).
                    let wait = 15 + (i as u64 * 7) % 11;
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    continue;
                }
                let (status, latency) = match provider.enter() {
                    Some(d) => {
                        tokio::time::sleep(d).await;
                        provider.leave();
                        (200, d)
                    }
                    None => (429, Duration::from_millis(1)),
                };
                if measuring.load(Ordering::Relaxed) {
                    calls.fetch_add(1, Ordering::Relaxed);
                    if status == 429 {
                        rejected.fetch_add(1, Ordering::Relaxed);
                    }
                }
                c.record_outcome(proto::RecordOutcomeRequest {
                    target: TARGET.into(),
                    permit: a.permit,
                    http_status: status,
                    latency: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: latency.as_nanos() as i32,
                    }),
                    caller: caller.clone(),
                    ..Default::default()
                })
                .await
                .expect("RecordOutcome");
            }
        }));
    }

    // Converging: from 16 to 32 takes about 16 rounds of ~260 ms.
    let mut admin = server.admin().await;
    let limit = |s: &proto::TargetStatus| s.adaptive_concurrency.as_ref().map_or(0, |a| a.limit);
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < Duration::from_secs(15) {
        let s = admin
            .get_target(proto::GetTargetRequest {
                target: TARGET.into(),
            })
            .await
            .expect("GetTarget")
            .into_inner();
        let a = s.adaptive_concurrency.clone().expect("adaptive status");
        assert_eq!((a.min, a.max), (2, 200));
        if start.elapsed() >= Duration::from_secs(7) {
            measuring.store(true, Ordering::Relaxed);
            seen.push(limit(&s));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for a in agents {
        a.await.expect("agent");
    }
    let (lo, hi) = (
        seen.iter().copied().min().unwrap_or(0),
        seen.iter().copied().max().unwrap_or(0),
    );
    let (calls, rejected) = (
        calls.load(Ordering::Relaxed),
        rejected.load(Ordering::Relaxed),
    );
    let rate = rejected as f64 / calls.max(1) as f64;
    eprintln!(
        "limit {lo}..{hi} over {} samples; {rejected} 429s in {calls} calls ({:.2} %)",
        seen.len(),
        rate * 100.0
    );
    let h = f64::from(HIDDEN);
    assert!(
        f64::from(lo) >= 0.8 * h && f64::from(hi) <= 1.2 * h,
        "learned limit {lo}..{hi} not within 20 % of {HIDDEN}"
    );
    assert!(calls > 400, "only {calls} calls measured");
    assert!(
        rate < 0.02,
        "429 rate {:.2} % after convergence",
        rate * 100.0
    );

    // It shows: GetTarget says why it last moved, and the gauge has it.
    let s = admin
        .get_target(proto::GetTargetRequest {
            target: TARGET.into(),
        })
        .await
        .expect("GetTarget")
        .into_inner();
    let a = s.adaptive_concurrency.expect("adaptive");
    assert!(
        a.last_change.contains("429") || a.last_change.contains("raised"),
        "{}",
        a.last_change
    );
    let (_, body) = server.http_get("/metrics", &[]);
    let line = body
        .lines()
        .find(|l| l.starts_with("backstop_adaptive_concurrency_limit{target=\"fake/provider\"}"))
        .unwrap_or_else(|| panic!("no gauge in\n{body}"));
    let gauge: f64 = line
        .rsplit(' ')
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0.0);
    assert!((0.8 * h..=1.2 * h).contains(&gauge), "{line}");
}
