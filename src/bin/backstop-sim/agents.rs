//! The fleet: one task per user request, arriving on the seeded stream, in
//! either mode. Both modes answer the same question (get this request an
//! answer from some model) with the same knobs (threshold 5, 60 s open,
//! up to 3 retries with full jitter, the same fallback order); they differ
//! only in who decides.

use crate::provider::{Clock, Reply, call};
use crate::scenario::{Request, Rng, Scenario};
use backstop::proto::deferred_client::DeferredClient;
use backstop::proto::resilience_client::ResilienceClient;
use backstop::proto::{
    AckRequest, ClaimRequest, DeferRequest, FinishRequestRequest, NackRequest, Priority, Reason,
    RecordOutcomeRequest, RequestResult, RouteRequest,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tonic::transport::Channel;

/// How one user request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    Completed,
    DeferredThenCompleted,
    /// A definitive failure (the request fits no model's context window).
    Failed,
    /// Still waiting in a process's memory when the run ended: a restart or
    /// deploy loses it.
    Lost,
    /// Still in Backstop's durable queue when the run ended (not lost: a
    /// worker delivers it later).
    QueuedAtEnd,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Result1 {
    pub id: u64,
    pub at: f64,
    pub done: Option<f64>,
    pub fate: Fate,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub model: Option<usize>,
}

/// One user request as its agent measured it and as Backstop measured it
/// (FinishRequest's answer), to check the server's end-to-end figures.
#[derive(Clone, Copy, Debug)]
pub struct EndToEnd {
    /// Simulated seconds from the agent's first Route to its finish.
    pub agent_s: f64,
    /// The server's duration for it, in simulated seconds.
    pub server_s: f64,
    /// The server measured it itself (saw its first call).
    pub tracked: bool,
    pub failed: bool,
}

/// Shared by every request task of one run.
pub struct Fleet {
    pub scenario: Scenario,
    pub clock: Clock,
    pub provider: std::net::SocketAddr,
    pub results: Mutex<HashMap<u64, Result1>>,
    /// Provider calls made by agents (including those the drain workers make).
    pub calls: AtomicU64,
    pub stop: AtomicBool,
    /// Backstop modes: every finished request, both measures.
    pub e2e: Mutex<Vec<EndToEnd>>,
}

impl Fleet {
    pub fn finish(&self, r: &Request, fate: Fate, model: Option<usize>) {
        let done =
            matches!(fate, Fate::Completed | Fate::DeferredThenCompleted).then(|| self.clock.now());
        let (tin, tout) = if done.is_some() {
            (r.tokens, r.output_tokens)
        } else {
            (0, 0)
        };
        if let Ok(mut m) = self.results.lock() {
            m.insert(
                r.id,
                Result1 {
                    id: r.id,
                    at: r.at,
                    done,
                    fate,
                    tokens_in: tin,
                    tokens_out: tout,
                    model,
                },
            );
        }
    }

    async fn call(&self, model: usize, r: &Request) -> Reply {
        self.calls.fetch_add(1, Ordering::Relaxed);
        call(
            self.provider,
            &self.scenario.models[model].name,
            r.tokens,
            r.output_tokens,
        )
        .await
    }

    fn over(&self) -> bool {
        self.stop.load(Ordering::Relaxed) || self.clock.now() >= self.scenario.duration
    }
}

// ---------------------------------------------------------------- per-process

/// The breaker every process embeds today: 5 consecutive failures open it
/// for 60 s, then one probe (per process) decides.
#[derive(Default)]
struct LocalBreaker {
    failures: u32,
    open_until: Option<f64>,
    probing: bool,
}

impl LocalBreaker {
    fn allow(&mut self, now: f64) -> bool {
        match self.open_until {
            Some(u) if now < u => false,
            Some(_) if self.probing => false,
            Some(_) => {
                self.probing = true;
                true
            }
            None => true,
        }
    }

    fn record(&mut self, ok: bool, now: f64) {
        if ok {
            *self = LocalBreaker::default();
            return;
        }
        self.failures += 1;
        if self.probing || self.failures >= 5 {
            self.open_until = Some(now + 60.0);
            self.probing = false;
        }
    }
}

/// One agent process: its own breakers and its own jitter.
pub struct Process {
    breakers: Mutex<Vec<LocalBreaker>>,
    rng: Mutex<Rng>,
}

impl Process {
    pub fn new(models: usize, seed: u64) -> Process {
        Process {
            breakers: Mutex::new((0..models).map(|_| LocalBreaker::default()).collect()),
            rng: Mutex::new(Rng::new(seed)),
        }
    }
}

/// The provider's retry hint in simulated seconds, if it sent one.
fn hint(f: &Fleet, reply: &Reply) -> f64 {
    if let Some(ms) = reply
        .header("retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
    {
        return f.clock.sim(std::time::Duration::from_secs_f64(ms / 1000.0));
    }
    reply
        .header("retry-after")
        .and_then(|v| v.parse::<f64>().ok())
        .map(|s| f.clock.sim(std::time::Duration::from_secs_f64(s)))
        .unwrap_or(0.0)
}

/// Per-process mode: fallback list in order, local breaker, up to 3 retries
/// with full jitter (base 1 s, cap 30 s, at least the provider's hint). When
/// every model failed, the request goes to the process's in-memory retry
/// list (here: the task waits 20 s and starts over) until the run ends.
pub async fn per_process(f: Arc<Fleet>, p: Arc<Process>, r: Request) {
    let mut rounds = 0;
    loop {
        let mut fits_somewhere = false;
        for model in 0..f.scenario.models.len() {
            for attempt in 0..=3u32 {
                if f.over() {
                    f.finish(&r, Fate::Lost, None);
                    return;
                }
                let allowed = p
                    .breakers
                    .lock()
                    .map(|mut b| b[model].allow(f.clock.now()))
                    .unwrap_or(true);
                if !allowed {
                    fits_somewhere = true;
                    break;
                }
                let reply = f.call(model, &r).await;
                let ok = reply.status == 200;
                let counts = !matches!(reply.status, 400 | 404 | 413 | 422);
                if counts && let Ok(mut b) = p.breakers.lock() {
                    b[model].record(ok, f.clock.now());
                }
                if ok {
                    let fate = if rounds == 0 {
                        Fate::Completed
                    } else {
                        Fate::DeferredThenCompleted
                    };
                    f.finish(&r, fate, Some(model));
                    return;
                }
                if reply.status == 400 {
                    break;
                }
                fits_somewhere = true;
                if reply.status == 401 || attempt == 3 {
                    break;
                }
                let cap = (2f64.powi(attempt as i32)).min(30.0);
                let jitter = p.rng.lock().map(|mut g| g.unit()).unwrap_or(0.5) * cap;
                f.clock.sleep(jitter.max(hint(&f, &reply))).await;
            }
        }
        if !fits_somewhere {
            f.finish(&r, Fate::Failed, None);
            return;
        }
        rounds += 1;
        f.clock.sleep(20.0).await;
    }
}

// ---------------------------------------------------------------- backstop

fn dur(d: std::time::Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

fn from_dur(d: Option<prost_types::Duration>) -> std::time::Duration {
    d.and_then(|d| std::time::Duration::try_from(d).ok())
        .unwrap_or_default()
}

fn outcome(
    target: &str,
    permit: String,
    reply: &Reply,
    attempt: u32,
    r: &Request,
    caller: String,
    key_slot: String,
) -> RecordOutcomeRequest {
    RecordOutcomeRequest {
        target: target.to_string(),
        permit,
        http_status: i32::from(reply.status),
        error_type: reply.header("x-error-type").unwrap_or("").to_string(),
        latency: dur(reply.took),
        input_tokens: if reply.status == 200 { r.tokens } else { 0 },
        output_tokens: if reply.status == 200 {
            r.output_tokens
        } else {
            0
        },
        attempt,
        headers: reply.headers.iter().cloned().collect(),
        key_slot,
        caller,
        ..Default::default()
    }
}

/// Closes user request `id` (started at simulated `started`) and records
/// both measures of it.
async fn close(
    f: &Fleet,
    bs: &mut ResilienceClient<Channel>,
    id: &str,
    result: RequestResult,
    started: f64,
    attempts: u32,
) {
    let agent_s = f.clock.now() - started;
    let answer = bs
        .finish_request(FinishRequestRequest {
            request_id: id.to_string(),
            result: result as i32,
            route: "chat".into(),
            elapsed: dur(f.clock.real(agent_s)),
            attempts,
        })
        .await
        .map(|x| x.into_inner());
    if let (Ok(a), Ok(mut all)) = (answer, f.e2e.lock()) {
        all.push(EndToEnd {
            agent_s,
            server_s: f.clock.sim(from_dur(a.duration)),
            tracked: a.tracked,
            failed: result == RequestResult::Failed,
        });
    }
}

fn model_index(f: &Fleet, target: &str) -> Option<usize> {
    f.scenario.models.iter().position(|m| m.name == target)
}

/// Backstop mode: Route (ordered over the models, context-aware), call,
/// RecordOutcome with the provider's headers, follow the retry advice; when
/// Route has nothing to offer, Defer (durable) and let the drain workers
/// finish it after recovery.
pub async fn via_backstop(
    f: Arc<Fleet>,
    mut bs: ResilienceClient<Channel>,
    mut dq: DeferredClient<Channel>,
    r: Request,
) {
    let caller = format!("agent-{}", r.agent);
    let rid = format!("req-{}", r.id);
    let started = f.clock.now();
    let mut exclude: Vec<String> = Vec::new();
    let mut attempt = 0u32;
    loop {
        if f.over() {
            f.finish(&r, Fate::Lost, None);
            return;
        }
        let route = bs
            .route(RouteRequest {
                route: "chat".into(),
                estimated_tokens: r.tokens,
                required_context_tokens: r.tokens,
                exclude: exclude.clone(),
                caller: caller.clone(),
                attempt,
                priority: Priority::Interactive as i32,
                request_id: rid.clone(),
                ..Default::default()
            })
            .await
            .map(|x| x.into_inner());
        let route = match route {
            Ok(x) => x,
            Err(_) => {
                f.clock.sleep(1.0).await;
                continue;
            }
        };
        if route.target.is_empty() || attempt >= 8 {
            let never = !route.skipped.is_empty()
                && route.skipped.iter().all(|s| {
                    s.reason == Reason::ContextTooSmall as i32
                        || s.reason == Reason::RequestTooLarge as i32
                });
            if never {
                close(&f, &mut bs, &rid, RequestResult::Failed, started, attempt).await;
                f.finish(&r, Fate::Failed, None);
                return;
            }
            let d = dq
                .defer(DeferRequest {
                    queue: "chat".into(),
                    payload: format!("{}:{}:{}:{}", r.id, r.tokens, r.output_tokens, r.agent)
                        .into_bytes(),
                    idempotency_key: format!("req-{}", r.id),
                    max_attempts: 50,
                    estimated_tokens: r.tokens,
                    required_context_tokens: r.tokens,
                    ..Default::default()
                })
                .await;
            match d {
                Ok(_) => {
                    close(&f, &mut bs, &rid, RequestResult::Deferred, started, attempt).await;
                    // Recorded by the drain worker; until then it is queued.
                    f.finish(&r, Fate::QueuedAtEnd, None);
                }
                Err(_) => {
                    close(&f, &mut bs, &rid, RequestResult::Failed, started, attempt).await;
                    f.finish(&r, Fate::Lost, None);
                }
            }
            return;
        }
        let Some(model) = model_index(&f, &route.target) else {
            f.finish(&r, Fate::Failed, None);
            return;
        };
        let reply = f.call(model, &r).await;
        let mut report = outcome(
            &route.target,
            route.permit,
            &reply,
            attempt,
            &r,
            caller.clone(),
            route.key_slot,
        );
        report.request_id = rid.clone();
        let advice = bs
            .record_outcome(report)
            .await
            .ok()
            .and_then(|x| x.into_inner().retry);
        if reply.status == 200 {
            close(
                &f,
                &mut bs,
                &rid,
                RequestResult::Completed,
                started,
                attempt + 1,
            )
            .await;
            f.finish(&r, Fate::Completed, Some(model));
            return;
        }
        attempt += 1;
        match advice {
            Some(a) if a.retry => f.clock.sleep(f.clock.sim(from_dur(a.delay))).await,
            _ => exclude.push(route.target),
        }
    }
}

/// A drain worker: claims deferred requests only while Backstop admits a
/// call, calls the admitted target with the delivery's permit, reports, and
/// acks (or nacks with the advised delay).
pub async fn drain(
    f: Arc<Fleet>,
    bs: ResilienceClient<Channel>,
    mut dq: DeferredClient<Channel>,
    worker: String,
) {
    while !f.over() {
        let claim = dq
            .claim(ClaimRequest {
                queue: "chat".into(),
                max_items: 10,
                lease: dur(f.clock.real(60.0)),
                wait: dur(f.clock.real(2.0)),
                worker: worker.clone(),
                priority: Priority::Batch as i32,
            })
            .await
            .map(|x| x.into_inner());
        let items = match claim {
            Ok(c) if !c.items.is_empty() => c.items,
            Ok(c) => {
                let wait = f.clock.sim(from_dur(c.retry_after)).clamp(0.2, 5.0);
                f.clock.sleep(wait).await;
                continue;
            }
            Err(_) => {
                f.clock.sleep(1.0).await;
                continue;
            }
        };
        let mut tasks = Vec::new();
        for item in items {
            let (f, mut bs, mut dq) = (f.clone(), bs.clone(), dq.clone());
            let worker = worker.clone();
            tasks.push(tokio::spawn(async move {
                let text = String::from_utf8_lossy(&item.payload).to_string();
                let parts: Vec<u64> = text.split(':').filter_map(|p| p.parse().ok()).collect();
                let (Some(&id), Some(&tokens), Some(&out), Some(&agent)) =
                    (parts.first(), parts.get(1), parts.get(2), parts.get(3))
                else {
                    return;
                };
                let r = Request {
                    id,
                    agent: agent as usize,
                    at: 0.0,
                    tokens,
                    output_tokens: out,
                };
                let Some(model) = model_index(&f, &item.target) else {
                    return;
                };
                let reply = f.call(model, &r).await;
                let advice = bs
                    .record_outcome(outcome(
                        &item.target,
                        item.permit.clone(),
                        &reply,
                        item.attempt.saturating_sub(1),
                        &r,
                        worker,
                        item.key_slot.clone(),
                    ))
                    .await
                    .ok()
                    .and_then(|x| x.into_inner().retry);
                if reply.status == 200 {
                    let _ = dq
                        .ack(AckRequest {
                            id: item.id.clone(),
                            lease_token: item.lease_token.clone(),
                        })
                        .await;
                    let at = f
                        .results
                        .lock()
                        .ok()
                        .and_then(|m| m.get(&id).map(|x| x.at))
                        .unwrap_or(0.0);
                    f.finish(
                        &Request { at, ..r },
                        Fate::DeferredThenCompleted,
                        Some(model),
                    );
                } else {
                    let delay = advice.map(|a| from_dur(a.delay)).unwrap_or_default();
                    let _ = dq
                        .nack(NackRequest {
                            id: item.id.clone(),
                            lease_token: item.lease_token.clone(),
                            delay: dur(delay.max(f.clock.real(1.0))),
                            reason: format!("http {}", reply.status),
                        })
                        .await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}
