//! The load generator: N connections, M requests in flight, a fixed duration.
//!
//! Every in-flight slot is a task that sends, waits, records the latency in
//! its own HDR histogram and sends again (closed loop); histograms are merged
//! at the end. Targets are drawn from a Zipf-like distribution, so with many
//! targets a few are hot and most are cold, as in a real fleet.

use backstop::proto;
use backstop::proto::resilience_client::ResilienceClient;
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// CanProceed on one target per request.
    CanProceed,
    /// RecordOutcome (a success with latency) per request.
    RecordOutcome,
    /// Route over three ad-hoc candidates per request.
    Route,
    /// Route then RecordOutcome with a realistic mix of outcomes (one loop = 2 RPCs).
    AgentLoop,
    /// CanProceedBatch of --batch-size decisions per request.
    Batch,
    /// CanProceed over Decide streams (one per connection, in-flight spread over them).
    Stream,
    /// The agent loop (Route then RecordOutcome) over Decide streams.
    StreamAgentLoop,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::CanProceed => "can-proceed",
            Workload::RecordOutcome => "record-outcome",
            Workload::Route => "route",
            Workload::AgentLoop => "agent-loop",
            Workload::Batch => "batch",
            Workload::Stream => "stream",
            Workload::StreamAgentLoop => "stream-agent-loop",
        }
    }
}

/// One load shape.
#[derive(Clone, Debug)]
pub struct Shape {
    pub workload: Workload,
    pub targets: usize,
    pub zipf: f64,
    pub connections: usize,
    pub in_flight: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub batch_size: usize,
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub requests: u64,
    /// Decisions (batch items count individually; an agent loop counts 2 RPCs).
    pub decisions: u64,
    pub errors: u64,
    pub error_kinds: HashMap<String, u64>,
    pub elapsed: Duration,
    /// Request latencies in nanoseconds.
    pub latency: Histogram<u64>,
}

impl RunResult {
    pub fn empty() -> RunResult {
        RunResult {
            requests: 0,
            decisions: 0,
            errors: 0,
            error_kinds: HashMap::new(),
            elapsed: Duration::ZERO,
            latency: new_histogram(),
        }
    }

    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    pub fn dps(&self) -> f64 {
        self.decisions as f64 / self.elapsed.as_secs_f64()
    }
    /// Latency quantile in microseconds.
    pub fn q_us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn merge(&mut self, other: &RunResult) {
        self.requests += other.requests;
        self.decisions += other.decisions;
        self.errors += other.errors;
        for (k, v) in &other.error_kinds {
            *self.error_kinds.entry(k.clone()).or_default() += v;
        }
        self.elapsed += other.elapsed;
        let _ = self.latency.add(&other.latency);
    }
}

/// 1 ns to 60 s at 3 significant figures.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant, valid histogram bounds")
}

/// Zipf-like sampler over `n` items: weight of item i is 1 / (i+1)^s.
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let cumulative = (0..n.max(1))
            .map(|i| {
                acc += 1.0 / ((i + 1) as f64).powf(s);
                acc
            })
            .collect();
        Zipf { cumulative }
    }

    pub fn sample(&self, rng: &mut u64) -> usize {
        let total = *self.cumulative.last().unwrap_or(&1.0);
        let u = next_unit(rng) * total;
        self.cumulative
            .partition_point(|c| *c < u)
            .min(self.cumulative.len() - 1)
    }
}

/// xorshift64*: a fast per-task generator (quality is irrelevant here).
pub fn next_u64(s: &mut u64) -> u64 {
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

pub fn next_unit(s: &mut u64) -> f64 {
    (next_u64(s) >> 11) as f64 / (1u64 << 53) as f64
}

/// `n` connections to `addr`, or spread over a comma-separated list of
/// addresses (the replicas of a cluster), round robin.
pub async fn connect(addr: &str, n: usize) -> Result<Vec<Channel>, String> {
    let addrs: Vec<&str> = addr.split(',').filter(|a| !a.is_empty()).collect();
    let mut out = Vec::with_capacity(n);
    for i in 0..n.max(addrs.len()) {
        let addr = addrs.get(i % addrs.len().max(1)).copied().unwrap_or(addr);
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        out.push(ch);
    }
    Ok(out)
}

pub(crate) struct Ctx {
    pub(crate) shape: Shape,
    pub(crate) names: Vec<String>,
    pub(crate) zipf: Zipf,
}

/// The agent loop's outcome mix: 92% success, 3% 429 with a short hint, 3%
/// 503, 1% 529, 1% context-length 400 (status, error type, headers).
pub(crate) fn agent_outcome(rng: &mut u64) -> (i32, &'static str, HashMap<String, String>) {
    let roll = next_u64(rng) % 100;
    let mut headers = HashMap::new();
    headers.insert(
        "x-ratelimit-limit-requests".to_string(),
        "10000".to_string(),
    );
    headers.insert(
        "x-ratelimit-remaining-requests".to_string(),
        "9000".to_string(),
    );
    let (status, error_type) = match roll {
        0..=91 => (200, ""),
        92..=94 => {
            headers.insert("retry-after-ms".to_string(), "20".to_string());
            (429, "rate_limit_exceeded")
        }
        95..=97 => (503, "server_error"),
        98 => (529, "overloaded_error"),
        _ => (400, "context_length_exceeded"),
    };
    (status, error_type, headers)
}

/// One request of the workload; returns (decisions, error kind).
async fn one(c: &mut ResilienceClient<Channel>, ctx: &Ctx, rng: &mut u64) -> (u64, Option<String>) {
    let pick = |rng: &mut u64| ctx.names[ctx.zipf.sample(rng)].clone();
    let err = |s: tonic::Status| Some(format!("{:?}", s.code()));
    match ctx.shape.workload {
        // Driven by `stream::phase`, never one request at a time.
        Workload::Stream | Workload::StreamAgentLoop => (0, Some("not unary".into())),
        Workload::CanProceed => {
            let r = c
                .can_proceed(proto::CanProceedRequest {
                    target: pick(rng),
                    ..Default::default()
                })
                .await;
            (1, r.err().and_then(err))
        }
        Workload::RecordOutcome => {
            let r = c
                .record_outcome(proto::RecordOutcomeRequest {
                    target: pick(rng),
                    http_status: 200,
                    latency: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 50_000_000,
                    }),
                    ..Default::default()
                })
                .await;
            (1, r.err().and_then(err))
        }
        Workload::Route => {
            let i = ctx.zipf.sample(rng);
            let n = ctx.names.len();
            let candidates = (0..3).map(|k| ctx.names[(i + k) % n].clone()).collect();
            let r = c
                .route(proto::RouteRequest {
                    candidates,
                    ..Default::default()
                })
                .await;
            (1, r.err().and_then(err))
        }
        Workload::AgentLoop => {
            let i = ctx.zipf.sample(rng);
            let n = ctx.names.len();
            let candidates = (0..3).map(|k| ctx.names[(i + k) % n].clone()).collect();
            let routed = match c
                .route(proto::RouteRequest {
                    candidates,
                    ..Default::default()
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) => return (1, err(s)),
            };
            if routed.target.is_empty() {
                return (1, None); // every candidate paused or open: a decision too
            }
            let (status, error_type, headers) = agent_outcome(rng);
            let r = c
                .record_outcome(proto::RecordOutcomeRequest {
                    target: routed.target,
                    permit: routed.permit,
                    http_status: status,
                    error_type: error_type.into(),
                    headers,
                    latency: Some(prost_types::Duration {
                        seconds: 0,
                        nanos: 800_000_000,
                    }),
                    input_tokens: 1200,
                    output_tokens: 300,
                    ..Default::default()
                })
                .await;
            (2, r.err().and_then(err))
        }
        Workload::Batch => {
            let items: Vec<_> = (0..ctx.shape.batch_size)
                .map(|_| proto::CanProceedRequest {
                    target: pick(rng),
                    ..Default::default()
                })
                .collect();
            let n = items.len() as u64;
            let r = c
                .can_proceed_batch(proto::CanProceedBatchRequest { items })
                .await;
            (n, r.err().and_then(err))
        }
    }
}

/// Runs `shape` against the server at `addr`: warm-up, then the measured period.
pub async fn run(addr: &str, shape: &Shape) -> Result<RunResult, String> {
    let channels = connect(addr, shape.connections.max(1)).await?;
    let names: Vec<String> = (0..shape.targets.max(1))
        .map(|i| format!("bench/model-{i}"))
        .collect();
    let ctx = Arc::new(Ctx {
        zipf: Zipf::new(names.len(), shape.zipf),
        names,
        shape: shape.clone(),
    });
    if !shape.warmup.is_zero() {
        phase(&channels, &ctx, shape.warmup).await;
    }
    Ok(phase(&channels, &ctx, shape.duration).await)
}

/// Like [`run`], also returning the warm-up's decisions (to relate counts
/// taken around the whole run, such as Redis's, to decisions).
pub async fn run_counting(addr: &str, shape: &Shape) -> Result<(RunResult, u64), String> {
    let channels = connect(addr, shape.connections.max(1)).await?;
    let names: Vec<String> = (0..shape.targets.max(1))
        .map(|i| format!("bench/model-{i}"))
        .collect();
    let ctx = Arc::new(Ctx {
        zipf: Zipf::new(names.len(), shape.zipf),
        names,
        shape: shape.clone(),
    });
    let warm = if shape.warmup.is_zero() {
        0
    } else {
        phase(&channels, &ctx, shape.warmup).await.decisions
    };
    Ok((phase(&channels, &ctx, shape.duration).await, warm))
}

async fn phase(channels: &[Channel], ctx: &Arc<Ctx>, duration: Duration) -> RunResult {
    if matches!(
        ctx.shape.workload,
        Workload::Stream | Workload::StreamAgentLoop
    ) {
        return crate::stream::phase(channels, ctx, duration).await;
    }
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::with_capacity(ctx.shape.in_flight);
    for i in 0..ctx.shape.in_flight.max(1) {
        let mut client = ResilienceClient::new(channels[i % channels.len()].clone());
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((i as u64 + 1) * 0x1000_0001);
            let mut hist = new_histogram();
            let (mut requests, mut decisions, mut errors) = (0u64, 0u64, 0u64);
            let mut kinds: HashMap<String, u64> = HashMap::new();
            while Instant::now() < deadline {
                let t0 = Instant::now();
                let (d, e) = one(&mut client, &ctx, &mut rng).await;
                let _ = hist.record(
                    u64::try_from(t0.elapsed().as_nanos())
                        .unwrap_or(u64::MAX)
                        .max(1),
                );
                requests += 1;
                decisions += d;
                if let Some(kind) = e {
                    errors += 1;
                    *kinds.entry(kind).or_default() += 1;
                }
            }
            (requests, decisions, errors, kinds, hist)
        }));
    }
    let mut out = RunResult::empty();
    for t in tasks {
        if let Ok((r, d, e, k, h)) = t.await {
            out.requests += r;
            out.decisions += d;
            out.errors += e;
            for (kind, n) in k {
                *out.error_kinds.entry(kind).or_default() += n;
            }
            let _ = out.latency.add(&h);
        }
    }
    out.elapsed = started.elapsed();
    out
}
