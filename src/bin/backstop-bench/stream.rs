//! The stream workloads: every decision of a connection over one `Decide`
//! stream, the way a client process multiplexes its agents' decisions.
//!
//! Each connection gets one stream and an equal share of the in-flight
//! requests; one task per stream keeps that many outstanding (closed loop:
//! an answer in, the next request out), matching answers to requests by id
//! and timing each from its send.

use crate::load::{Ctx, RunResult, Workload, agent_outcome, new_histogram};
use backstop::proto;
use backstop::proto::decide_request::Request as Q;
use backstop::proto::decide_response::Response as A;
use backstop::proto::resilience_client::ResilienceClient;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// What an outstanding request is.
enum Stage {
    /// A CanProceed, or the Route of an agent loop.
    First,
    /// An agent loop's RecordOutcome.
    Outcome,
}

struct Driver {
    ctx: Arc<Ctx>,
    tx: tokio::sync::mpsc::Sender<proto::DecideRequest>,
    sent: HashMap<u64, (Instant, Stage)>,
    next_id: u64,
    rng: u64,
}

impl Driver {
    fn pick(&mut self) -> usize {
        self.ctx.zipf.sample(&mut self.rng)
    }

    async fn send(&mut self, request: Q, stage: Stage) -> bool {
        self.next_id += 1;
        let id = self.next_id;
        self.sent.insert(id, (Instant::now(), stage));
        self.tx
            .send(proto::DecideRequest {
                id,
                request: Some(request),
                deadline: None,
                traceparent: String::new(),
            })
            .await
            .is_ok()
    }

    /// Starts a new loop: a CanProceed, or an agent loop's Route.
    async fn start(&mut self) -> bool {
        let i = self.pick();
        match self.ctx.shape.workload {
            Workload::StreamAgentLoop => {
                let n = self.ctx.names.len();
                let candidates = (0..3)
                    .map(|k| self.ctx.names[(i + k) % n].clone())
                    .collect();
                self.send(
                    Q::Route(proto::RouteRequest {
                        candidates,
                        ..Default::default()
                    }),
                    Stage::First,
                )
                .await
            }
            _ => {
                let target = self.ctx.names[i].clone();
                self.send(
                    Q::CanProceed(proto::CanProceedRequest {
                        target,
                        ..Default::default()
                    }),
                    Stage::First,
                )
                .await
            }
        }
    }
}

pub async fn phase(channels: &[Channel], ctx: &Arc<Ctx>, duration: Duration) -> RunResult {
    let started = Instant::now();
    let deadline = started + duration;
    let n = channels.len().max(1);
    let mut tasks = Vec::new();
    for (c, ch) in channels.iter().enumerate() {
        // An equal share of the in-flight requests (the first ones take the remainder).
        let k = ctx.shape.in_flight / n + usize::from(c < ctx.shape.in_flight % n);
        if k == 0 {
            continue;
        }
        let (ch, ctx) = (ch.clone(), ctx.clone());
        tasks.push(tokio::spawn(async move {
            drive(ch, ctx, k, deadline, c as u64).await
        }));
    }
    let mut out = RunResult::empty();
    for t in tasks {
        if let Ok(r) = t.await {
            out.merge(&r);
        }
    }
    out.elapsed = started.elapsed();
    out
}

async fn drive(ch: Channel, ctx: Arc<Ctx>, k: usize, deadline: Instant, seed: u64) -> RunResult {
    let mut out = RunResult::empty();
    let mut hist = new_histogram();
    let (tx, rx) = tokio::sync::mpsc::channel(k + 16);
    let mut client = ResilienceClient::new(ch);
    let mut d = Driver {
        ctx: ctx.clone(),
        tx,
        sent: HashMap::with_capacity(k * 2),
        next_id: 0,
        rng: 0x9e37_79b9_7f4a_7c15u64 ^ ((seed + 1) * 0x1000_0001),
    };
    for _ in 0..k {
        d.start().await;
    }
    let mut inbound = match client
        .decide(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(s) => {
            out.errors += 1;
            *out.error_kinds
                .entry(format!("{:?}", s.code()))
                .or_default() += 1;
            return out;
        }
    };
    loop {
        let resp = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(s) => {
                out.errors += 1;
                *out.error_kinds
                    .entry(format!("{:?}", s.code()))
                    .or_default() += 1;
                break;
            }
        };
        let Some((t0, stage)) = d.sent.remove(&resp.id) else {
            continue;
        };
        let _ = hist.record(
            u64::try_from(t0.elapsed().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        out.requests += 1;
        out.decisions += 1;
        let now = Instant::now();
        match (resp.response, stage) {
            (Some(A::Error(e)), _) => {
                out.errors += 1;
                *out.error_kinds
                    .entry(format!("code {}", e.code))
                    .or_default() += 1;
            }
            (Some(A::Route(r)), Stage::First) if !r.target.is_empty() => {
                // The loop goes on: report the call's outcome with the permit.
                let (status, error_type, headers) = agent_outcome(&mut d.rng);
                d.send(
                    Q::RecordOutcome(proto::RecordOutcomeRequest {
                        target: r.target,
                        permit: r.permit,
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
                    }),
                    Stage::Outcome,
                )
                .await;
                continue;
            }
            _ => {}
        }
        if now < deadline {
            d.start().await;
        } else if d.sent.is_empty() {
            break;
        }
    }
    drop(d);
    out.latency = hist;
    out
}
