//! `backstop-bench soak`: the chaos soak (issue 18, part 2).
//!
//! One `backstop serve` on its own data dir, driven for `--duration` by
//! agents (CanProceed → RecordOutcome on budgeted targets), probe hunters on
//! a target whose breaker keeps opening, Defer producers and Claim → Ack
//! consumers, while a fault schedule `kill -9`s the server every
//! `--kill-every` and restarts it on the same data dir, and clients vanish
//! holding probe permits and claimed items. The checker
//! ([`super::soak_check`]) judges what the clients saw, continuously and at
//! the end; any violation makes the exit status non-zero.
//!
//! Why the server is restarted on an ephemeral port and clients are handed a
//! new channel, rather than reusing the port: a listening port can stay
//! unavailable briefly after the process holding it is killed, and a channel
//! that keeps reconnecting on its own backoff would blur the line between
//! "the server was down" and "the server did not answer". The kill window
//! is measured from the kill to the new process's `listening` line.
//!
//! `--cluster`: one `redis-server` (AOF, fsync always) and two replicas
//! (`serve --redis URL`, each on its own data dir); each workload task talks
//! to one replica (tasks alternate), the fault schedule kills one replica at
//! a time (alternating) and, every third interval, half an interval after
//! a kill, freezes Redis (SIGSTOP) for [`FREEZE`] so the replicas decide
//! degraded, spool Defers and merge back. See `soak_check`'s "Cluster mode"
//! for what the checker treats differently, and why.

use super::soak_check::{
    DISABLED_SLOT, Ledger, PROBE_LEASE_MS, Probe, Report, Tgt, ToldOpen, Unanswered, now_ms,
    parse_permit,
};
use super::{Proc, TempDir};
use backstop::proto;
use backstop::proto::admin_client::AdminClient;
use backstop::proto::deferred_client::DeferredClient;
use backstop::proto::resilience_client::ResilienceClient;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

#[derive(clap::Args)]
pub struct SoakArgs {
    /// How long the workload and the faults run (then a drain).
    #[arg(long, default_value = "10m", value_parser = super::parse_dur)]
    duration: Duration,
    /// kill -9 the server this often (and restart it on the same data dir).
    #[arg(long, default_value = "15s", value_parser = super::parse_dur)]
    kill_every: Duration,
    /// Keep the server's config and data here (default: a temp dir, removed).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seed for the workload's choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Every call's deadline; a call unanswered within it outside a kill window is a violation.
    #[arg(long, default_value = "2s", value_parser = super::parse_dur)]
    deadline: Duration,
    /// After the run, how long consumers may take to ack every acknowledged Defer.
    #[arg(long, default_value = "30s", value_parser = super::parse_dur)]
    drain: Duration,
    /// The backstop binary to start (default: next to this one).
    #[arg(long)]
    backstop_bin: Option<PathBuf>,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Extra `backstop serve` arguments for restarts only. For testing the
    /// checker itself: `--restart-arg=--reset-state` makes every restart
    /// forget its state, which the checker must report.
    #[arg(long, hide = true, allow_hyphen_values = true)]
    restart_arg: Vec<String>,
    /// Cluster mode: a redis-server and two replicas; kill one replica at a
    /// time, and freeze Redis now and then (skipped, exit 0, without
    /// `redis-server` on PATH).
    #[arg(long)]
    cluster: bool,
    /// Cluster: the replicas' `[cluster] redis_timeout`. Above the 50 ms
    /// default because on a small shared machine (debug builds, an AOF
    /// fsynced on every write) Redis often takes longer than 50 ms, and every
    /// such call would put a replica in degraded mode outside the injected
    /// freezes; `--redis-timeout 50ms` soaks the default.
    #[arg(long, default_value = "250ms", value_parser = super::parse_dur)]
    redis_timeout: Duration,
}

tokio::task_local! {
    /// The replica a workload task talks to (always 0 without `--cluster`):
    /// a task-local rather than a parameter so that every helper that calls
    /// the server ([`Cx::call`]) goes to its task's replica.
    static HOME: usize;
}

/// How long Redis stays frozen (SIGSTOP) in cluster mode.
const FREEZE: Duration = Duration::from_secs(2);

const QUEUE: &str = "soak/queue";
/// Claim leases: short, so abandoned items come back within the run.
const ITEM_LEASE: Duration = Duration::from_secs(3);
const CLAIM_WAIT: Duration = Duration::from_millis(500);

/// The server config. Budgets match [`Tgt::budget`]; the flaky target's
/// breaker matches [`PROBE_LEASE_MS`] and `MAX_PROBES`. Failure thresholds
/// of budgeted targets are out of reach so their breakers never close the
/// budget off (the budget is what they test).
fn config() -> String {
    format!(
        r#"[server]
max_targets = 1000

[targets."{a}"]
requests_per_minute = 600
breaker = {{ failure_threshold = 1000000 }}

[targets."{b}"]
requests = 50
window = "5s"
breaker = {{ failure_threshold = 1000000 }}

[targets."{flaky}"]
breaker = {{ failure_threshold = 3, success_threshold = 2, open_duration = "1s", half_open_max_probes = 2, probe_lease = "{lease}ms", backoff_multiplier = 1.5, max_open_duration = "3s" }}

[targets."{forced}"]

[targets."{paused}"]

[targets."{keyed}"]
keys = ["k1", "k2"]
breaker = {{ failure_threshold = 1000000, persistent_open_duration = "2h" }}

[targets."{QUEUE}"]
"#,
        a = Tgt::BudgetA.name(),
        b = Tgt::BudgetB.name(),
        flaky = Tgt::Flaky.name(),
        lease = PROBE_LEASE_MS,
        forced = Tgt::Forced.name(),
        paused = Tgt::Paused.name(),
        keyed = Tgt::Keyed.name(),
    )
}

/// The current server incarnation and a channel to it; replaced after each restart.
struct Conn {
    cur: RwLock<(u64, String, Channel)>,
}

impl Conn {
    fn current(&self) -> (u64, String, Channel) {
        self.cur.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, inc: u64, addr: &str) -> Result<(), String> {
        let ch = channel(addr)?;
        *self.cur.write().unwrap_or_else(|e| e.into_inner()) = (inc, addr.to_string(), ch);
        Ok(())
    }
}

fn channel(addr: &str) -> Result<Channel, String> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy())
}

/// Shared by every task.
struct Cx {
    /// One per replica (one without `--cluster`).
    conns: Vec<Conn>,
    /// The next incarnation number: unique over all replicas, so an
    /// incarnation names one process.
    next_inc: AtomicU64,
    led: Ledger,
    deadline: Duration,
    /// Stops the workload and the faults (not the consumers).
    stop: AtomicBool,
    /// Stops the consumers, after the drain.
    stop_all: AtomicBool,
    next_payload: AtomicU64,
    seed: u64,
}

/// An answered call: the incarnation it went to, when it was sent and when
/// the answer arrived (ms since the epoch), and the answer.
struct Answer<T> {
    inc: u64,
    sent: u64,
    recv: u64,
    r: Result<T, tonic::Status>,
}

/// Status codes that mean "no answer from the server" rather than an
/// answer: the deadline passed, the connection was refused or broke.
fn unanswered_code(c: tonic::Code) -> bool {
    matches!(
        c,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::DataLoss
    )
}

impl Cx {
    async fn call<T, F, Fut>(&self, what: &'static str, extra: Duration, f: F) -> Option<Answer<T>>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let replica = HOME.try_with(|h| *h).unwrap_or(0);
        let (inc, _, ch) = self.conns[replica].current();
        self.call_on(ch, inc, replica, what, extra, f).await
    }

    /// One call with the soak's deadline; unanswered calls go to the ledger
    /// (the checker decides whether a kill window excuses them) and yield None.
    async fn call_on<T, F, Fut>(
        &self,
        ch: Channel,
        inc: u64,
        replica: usize,
        what: &'static str,
        extra: Duration,
        f: F,
    ) -> Option<Answer<T>>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let sent = now_ms();
        let r = tokio::time::timeout(self.deadline + extra, f(ch)).await;
        let recv = now_ms();
        let mut s = self.led.lock();
        s.calls += 1;
        let why = match r {
            Err(_) => format!("no answer within {:?}", self.deadline + extra),
            Ok(Err(st)) if unanswered_code(st.code()) => {
                format!("{:?}: {}", st.code(), st.message())
            }
            Ok(Err(st)) => {
                *s.error_answers
                    .entry(format!("{what} {:?}", st.code()))
                    .or_default() += 1;
                return Some(Answer {
                    inc,
                    sent,
                    recv,
                    r: Err(st),
                });
            }
            Ok(Ok(resp)) => {
                return Some(Answer {
                    inc,
                    sent,
                    recv,
                    r: Ok(resp.into_inner()),
                });
            }
        };
        s.unanswered.push(Unanswered {
            start: sent,
            end: recv,
            what,
            why,
            replica,
        });
        None
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// splitmix64: the soak's choices, reproducible from `--seed` (timing is not).
fn rnd(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn chance(state: &mut u64, percent: u64) -> bool {
    rnd(state) % 100 < percent
}

fn ms(d: &prost_types::Duration) -> u64 {
    (d.seconds.max(0) as u64) * 1000 + (d.nanos.max(0) as u64) / 1_000_000
}

/// One server (or replica): config file, data dir, extra `serve` arguments.
#[derive(Clone)]
struct ServerSpec {
    config: PathBuf,
    data: PathBuf,
    args: Vec<String>,
}

fn start_server(bin: &Path, spec: &ServerSpec, extra: &[String]) -> Result<Proc, String> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--http",
        "off",
        "--config",
    ])
    .arg(&spec.config)
    .arg("--data-dir")
    .arg(&spec.data)
    .args(&spec.args)
    .args(extra);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "warn");
    }
    super::spawn_listening(cmd, "backstop server", None)
}

/// Puts the three "never forget" targets in their states and checks the
/// server says so: forced open (operator), paused (provider retry-after),
/// key slot k1 disabled (401).
async fn setup(cx: &Cx) -> Result<(), String> {
    let fail = |what: &str| format!("soak setup: {what}");
    let forced = cx
        .call("SetBreakerState", Duration::ZERO, |ch| async move {
            AdminClient::new(ch)
                .set_breaker_state(proto::SetBreakerStateRequest {
                    target: Tgt::Forced.name().into(),
                    mode: proto::BreakerMode::ForceOpen as i32,
                    reason: "chaos soak".into(),
                })
                .await
        })
        .await
        .and_then(|a| a.r.ok())
        .ok_or_else(|| fail("SetBreakerState failed"))?;
    if forced.state() != proto::BreakerState::ForcedOpen {
        return Err(fail("the forced target is not forced open"));
    }

    let p = can_proceed(cx, Tgt::Paused)
        .await
        .filter(|r| r.allowed)
        .ok_or_else(|| fail("no permit for the paused target"))?;
    let mut headers = std::collections::HashMap::new();
    headers.insert("retry-after".to_string(), "3000".to_string());
    record(cx, Tgt::Paused, &p.permit, "", 429, headers)
        .await
        .ok_or_else(|| fail("pausing failed"))?;
    let r = can_proceed(cx, Tgt::Paused)
        .await
        .ok_or_else(|| fail("CanProceed failed"))?;
    if r.allowed || r.reason() != proto::Reason::RateLimited {
        return Err(fail("the paused target is not paused"));
    }

    let mut disabled = false;
    for _ in 0..20 {
        let r = can_proceed(cx, Tgt::Keyed)
            .await
            .filter(|r| r.allowed)
            .ok_or_else(|| fail("no permit for the keyed target"))?;
        let status = if r.key_slot == DISABLED_SLOT {
            401
        } else {
            200
        };
        record(
            cx,
            Tgt::Keyed,
            &r.permit,
            &r.key_slot,
            status,
            Default::default(),
        )
        .await
        .ok_or_else(|| fail("RecordOutcome failed"))?;
        if status == 401 {
            disabled = true;
            break;
        }
    }
    if !disabled {
        return Err(fail("never got key slot k1"));
    }
    for _ in 0..4 {
        let r = can_proceed(cx, Tgt::Keyed)
            .await
            .ok_or_else(|| fail("CanProceed failed"))?;
        if r.key_slot == DISABLED_SLOT {
            return Err(fail("k1 is still admitted after a 401"));
        }
        record(
            cx,
            Tgt::Keyed,
            &r.permit,
            &r.key_slot,
            200,
            Default::default(),
        )
        .await;
    }
    Ok(())
}

/// CanProceed (first attempt), without ledger bookkeeping: setup only.
async fn can_proceed(cx: &Cx, t: Tgt) -> Option<proto::CanProceedResponse> {
    cx.call("CanProceed", Duration::ZERO, |ch| async move {
        ResilienceClient::new(ch)
            .can_proceed(proto::CanProceedRequest {
                target: t.name().into(),
                caller: "soak-setup".into(),
                ..Default::default()
            })
            .await
    })
    .await
    .and_then(|a| a.r.ok())
}

async fn record(
    cx: &Cx,
    t: Tgt,
    permit: &str,
    key_slot: &str,
    status: i32,
    headers: std::collections::HashMap<String, String>,
) -> Option<proto::RecordOutcomeResponse> {
    let req = proto::RecordOutcomeRequest {
        target: t.name().into(),
        permit: permit.into(),
        http_status: status,
        key_slot: key_slot.into(),
        headers,
        latency: Some(prost_types::Duration {
            seconds: 0,
            nanos: 20_000_000,
        }),
        ..Default::default()
    };
    cx.call("RecordOutcome", Duration::ZERO, |ch| async move {
        ResilienceClient::new(ch).record_outcome(req).await
    })
    .await
    .and_then(|a| a.r.ok())
}

/// A CanProceed whose answer goes to the ledger (admissions with their
/// permit; breaker-open refusals as "told open").
async fn decide(
    cx: &Cx,
    ch: Option<(Channel, u64, usize)>,
    t: Tgt,
    caller: &str,
) -> Option<Answer<proto::CanProceedResponse>> {
    let req = proto::CanProceedRequest {
        target: t.name().into(),
        caller: caller.into(),
        ..Default::default()
    };
    let f = |ch| async move { ResilienceClient::new(ch).can_proceed(req).await };
    let a = match ch {
        Some((ch, inc, rep)) => {
            cx.call_on(ch, inc, rep, "CanProceed", Duration::ZERO, f)
                .await
        }
        None => cx.call("CanProceed", Duration::ZERO, f).await,
    }?;
    if let Ok(r) = &a.r {
        {
            let mut s = cx.led.lock();
            s.decisions += 1;
            s.degraded_decisions += u64::from(r.degraded);
        }
        if r.allowed {
            cx.led
                .admission(t, &r.permit, &r.key_slot, a.inc, r.degraded);
        } else {
            cx.led.lock().refused += 1;
            if r.reason() == proto::Reason::CircuitOpen
                && let Some(after) = &r.retry_after
            {
                told_open(cx, a.inc, a.sent, a.recv, ms(after), r.degraded);
            }
        }
    }
    Some(a)
}

/// The server said the breaker is open for `delay` more: it is open at
/// least from `recv` (the answer had been decided by then) until
/// `sent + delay` (its open-until is no earlier). Near-identical windows
/// (many refusals quote the same open-until) are kept once.
fn told_open(cx: &Cx, inc: u64, sent: u64, recv: u64, delay: u64, degraded: bool) {
    if delay == 0 {
        return;
    }
    let t = ToldOpen {
        from: recv,
        until: sent + delay,
        inc,
        degraded,
    };
    let mut s = cx.led.lock();
    if let Some(last) = s.told_open.last()
        && last.inc == inc
        && last.degraded == degraded
        && last.until.abs_diff(t.until) <= 20
    {
        return;
    }
    s.told_open.push(t);
}

/// Agents: the agent loop on the budgeted targets (hammered above their
/// rate), with an occasional look at the targets that must stay refused.
async fn agent(cx: Arc<Cx>, i: u64) {
    let mut rng = cx.seed ^ (i + 1).wrapping_mul(0x1234_5678_9abc);
    let caller = format!("agent-{i}");
    while !cx.stopped() {
        let roll = rnd(&mut rng) % 100;
        let t = match roll {
            0..40 => Tgt::BudgetA,
            40..75 => Tgt::BudgetB,
            75..90 => Tgt::Keyed,
            90..95 => Tgt::Forced,
            _ => Tgt::Paused,
        };
        let Some(a) = decide(&cx, None, t, &caller).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if let Ok(r) = a.r
            && r.allowed
        {
            tokio::time::sleep(Duration::from_millis(rnd(&mut rng) % 10)).await;
            let status = if chance(&mut rng, 5) { 503 } else { 200 };
            if let Some(o) =
                record(&cx, t, &r.permit, &r.key_slot, status, Default::default()).await
            {
                let mut s = cx.led.lock();
                s.decisions += 1;
                s.degraded_decisions += u64::from(o.degraded);
            }
        }
        tokio::time::sleep(Duration::from_millis(2 + rnd(&mut rng) % 5)).await;
    }
}

/// Probe hunters on the flaky target: in closed state 35% failures (three
/// in a row open it), as probes 40% failures (re-open) — so the breaker
/// cycles closed → open → half-open all the time.
async fn hunter(cx: Arc<Cx>, i: u64) {
    let mut rng = cx.seed ^ (i + 77).wrapping_mul(0x9876_5432_1fed);
    let caller = format!("hunter-{i}");
    while !cx.stopped() {
        let Some(a) = decide(&cx, None, Tgt::Flaky, &caller).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let r = match a.r {
            Ok(r) if r.allowed => r,
            Ok(r) => {
                let wait = r.retry_after.as_ref().map_or(50, ms).min(100);
                tokio::time::sleep(Duration::from_millis(wait + rnd(&mut rng) % 30)).await;
                continue;
            }
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let fields = parse_permit(&r.permit).unwrap_or_default();
        let probe = fields.probe != 0;
        tokio::time::sleep(Duration::from_millis(rnd(&mut rng) % 200)).await;
        let fail = chance(&mut rng, if probe { 40 } else { 35 });
        let req = proto::RecordOutcomeRequest {
            target: Tgt::Flaky.name().into(),
            permit: r.permit.clone(),
            http_status: if fail { 503 } else { 200 },
            caller: caller.clone(),
            ..Default::default()
        };
        let sent_at = now_ms();
        if probe {
            // Outstanding until the outcome was sent (or its lease ran out).
            cx.led.lock().probes.push(Probe {
                inc: a.inc,
                generation: fields.generation,
                start: fields.issued_ms,
                end: sent_at.min(fields.issued_ms + PROBE_LEASE_MS),
                degraded: r.degraded,
            });
        }
        let out = cx
            .call("RecordOutcome", Duration::ZERO, |ch| async move {
                ResilienceClient::new(ch).record_outcome(req).await
            })
            .await;
        if let Some(Answer {
            inc,
            sent,
            recv,
            r: Ok(o),
        }) = out
        {
            {
                let mut s = cx.led.lock();
                s.decisions += 1;
                s.degraded_decisions += u64::from(o.degraded);
            }
            let open = o.state() == proto::BreakerState::Open;
            if let Some(adv) = &o.retry
                && open
                && !o.duplicate
                && adv.reason() == proto::RetryReason::CircuitOpen
            {
                told_open(
                    &cx,
                    inc,
                    sent,
                    recv,
                    adv.delay.as_ref().map_or(0, ms),
                    o.degraded,
                );
            }
        }
    }
}

/// Producers: Defer with an idempotency key, retried (same key) until
/// acknowledged; the payload is the soak's own item number.
async fn producer(cx: Arc<Cx>, i: u64) {
    let mut rng = cx.seed ^ (i + 999).wrapping_mul(0x5555_aaaa_3333);
    while !cx.stopped() {
        let n = cx.next_payload.fetch_add(1, Ordering::Relaxed);
        loop {
            let req = proto::DeferRequest {
                queue: QUEUE.into(),
                payload: n.to_string().into_bytes(),
                idempotency_key: format!("soak-{}-{n}", cx.seed),
                max_attempts: 100,
                ..Default::default()
            };
            cx.led.lock().defer_calls += 1;
            match cx
                .call("Defer", Duration::ZERO, |ch| async move {
                    DeferredClient::new(ch).defer(req).await
                })
                .await
            {
                Some(Answer { r: Ok(d), .. }) => {
                    cx.led.defer_ok(n, &d.id, d.duplicate);
                    break;
                }
                _ if cx.stop_all.load(Ordering::Relaxed) => break,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tokio::time::sleep(Duration::from_millis(20 + rnd(&mut rng) % 40)).await;
    }
}

/// Consumers: Claim → Ack (retried until answered). While the workload
/// runs, 5% of claimed items are abandoned (the consumer "disappears" with
/// them) so the visibility timeout must redeliver them.
async fn consumer(cx: Arc<Cx>, i: u64) {
    let mut rng = cx.seed ^ (i + 4242).wrapping_mul(0x7777_1111_2222);
    let worker = format!("consumer-{i}");
    while !cx.stop_all.load(Ordering::Relaxed) {
        let req = proto::ClaimRequest {
            queue: QUEUE.into(),
            max_items: 5,
            lease: Some(prost_types::Duration {
                seconds: ITEM_LEASE.as_secs() as i64,
                nanos: 0,
            }),
            wait: Some(prost_types::Duration {
                seconds: 0,
                nanos: CLAIM_WAIT.subsec_nanos() as i32,
            }),
            worker: worker.clone(),
            // The soak's drain is background work.
            priority: proto::Priority::Batch as i32,
        };
        let Some(Answer { r: Ok(c), .. }) = cx
            .call("Claim", CLAIM_WAIT, |ch| async move {
                DeferredClient::new(ch).claim(req).await
            })
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if c.items.is_empty() {
            if let Some(after) = &c.retry_after {
                tokio::time::sleep(Duration::from_millis(ms(after).min(200))).await;
            }
            continue;
        }
        for item in c.items {
            let Some(n) = cx.led.delivered(&item.payload, &item.id) else {
                continue;
            };
            if !cx.stopped() && chance(&mut rng, 5) {
                cx.led.lock().abandoned += 1;
                continue;
            }
            ack(&cx, n, &item.id, &item.lease_token).await;
        }
    }
}

async fn ack(cx: &Cx, n: u64, id: &str, token: &str) {
    let mut retried = false;
    loop {
        let req = proto::AckRequest {
            id: id.into(),
            lease_token: token.into(),
        };
        match cx
            .call("Ack", Duration::ZERO, |ch| async move {
                DeferredClient::new(ch).ack(req).await
            })
            .await
        {
            Some(Answer { r: Ok(_), .. }) => {
                cx.led.acked(n);
                return;
            }
            Some(Answer { r: Err(st), .. }) => {
                let mut s = cx.led.lock();
                if st.code() == tonic::Code::NotFound && retried {
                    s.items.entry(n).or_default().ack_gone = true;
                } else {
                    s.ack_refused += 1;
                }
                return;
            }
            None if cx.stop_all.load(Ordering::Relaxed) => return,
            None => {
                retried = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A client that takes probe permits and claimed items and disappears
/// (its channel dropped, nothing reported, nothing acked).
async fn vanisher(cx: Arc<Cx>) {
    let mut rng = cx.seed ^ 0xdead_beef;
    while !cx.stopped() {
        tokio::time::sleep(Duration::from_millis(5000 + rnd(&mut rng) % 4000)).await;
        if cx.stopped() {
            break;
        }
        let rep = (rnd(&mut rng) % cx.conns.len() as u64) as usize;
        let (inc, addr, _) = cx.conns[rep].current();
        let Ok(ch) = channel(&addr) else { continue };
        let until = now_ms() + 1500;
        // Its server is gone once the incarnation changes: the client's
        // session ends there (calls to a dead address are not the new
        // server's unanswered calls).
        let alive = || cx.conns[rep].current().0 == inc;
        while now_ms() < until && alive() {
            if let Some(Answer { r: Ok(r), .. }) =
                decide(&cx, Some((ch.clone(), inc, rep)), Tgt::Flaky, "vanisher").await
                && r.allowed
                && let Some(p) = parse_permit(&r.permit)
                && p.probe != 0
            {
                cx.led.lock().probes.push(Probe {
                    inc,
                    generation: p.generation,
                    start: p.issued_ms,
                    end: p.issued_ms + PROBE_LEASE_MS,
                    degraded: r.degraded,
                });
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        let req = proto::ClaimRequest {
            queue: QUEUE.into(),
            max_items: 2,
            lease: Some(prost_types::Duration {
                seconds: ITEM_LEASE.as_secs() as i64,
                nanos: 0,
            }),
            worker: "vanisher".into(),
            ..Default::default()
        };
        if !alive() {
            cx.led.lock().vanished_clients += 1;
            continue;
        }
        if let Some(Answer { r: Ok(c), .. }) = cx
            .call_on(ch, inc, rep, "Claim", Duration::ZERO, |ch| async move {
                DeferredClient::new(ch).claim(req).await
            })
            .await
        {
            for item in c.items {
                cx.led.delivered(&item.payload, &item.id);
                cx.led.lock().abandoned += 1;
            }
        }
        cx.led.lock().vanished_clients += 1;
    }
}

/// Drives the flaky breaker open with failures (or sees it already open)
/// just before a kill, so that an open period a client was told about spans
/// the restart: the new process must keep refusing until its open-until.
async fn trip(cx: &Cx) {
    let until = now_ms() + 1500;
    while now_ms() < until {
        let Some(a) = decide(cx, None, Tgt::Flaky, "fault-schedule").await else {
            return;
        };
        let r = match a.r {
            Ok(r) => r,
            Err(_) => return,
        };
        if !r.allowed {
            if r.reason() == proto::Reason::CircuitOpen {
                return; // told open (recorded by `decide`)
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let fields = parse_permit(&r.permit).unwrap_or_default();
        let req = proto::RecordOutcomeRequest {
            target: Tgt::Flaky.name().into(),
            permit: r.permit.clone(),
            http_status: 503,
            caller: "fault-schedule".into(),
            ..Default::default()
        };
        if fields.probe != 0 {
            cx.led.lock().probes.push(Probe {
                inc: a.inc,
                generation: fields.generation,
                start: fields.issued_ms,
                end: now_ms().min(fields.issued_ms + PROBE_LEASE_MS),
                degraded: r.degraded,
            });
        }
        if let Some(Answer {
            inc,
            sent,
            recv,
            r: Ok(o),
        }) = cx
            .call("RecordOutcome", Duration::ZERO, |ch| async move {
                ResilienceClient::new(ch).record_outcome(req).await
            })
            .await
        {
            cx.led.lock().decisions += 1;
            if let Some(adv) = &o.retry
                && o.state() == proto::BreakerState::Open
                && !o.duplicate
                && adv.reason() == proto::RetryReason::CircuitOpen
            {
                told_open(
                    cx,
                    inc,
                    sent,
                    recv,
                    adv.delay.as_ref().map_or(0, ms),
                    o.degraded,
                );
                return;
            }
        }
    }
}

/// kill -9 one server every `every` (replicas in turn), restart it on its
/// data dir, hand its clients the new address. Returns the last servers
/// (killed on drop by the caller).
async fn faults(
    cx: Arc<Cx>,
    mut servers: Vec<Option<Proc>>,
    bin: PathBuf,
    specs: Vec<ServerSpec>,
    every: Duration,
    extra: Vec<String>,
) -> Result<Vec<Option<Proc>>, String> {
    let start = tokio::time::Instant::now();
    let mut k: u32 = 0;
    loop {
        // Fixed rate (kill k at k·every from the start), so a run of D has
        // floor(D / every) kills however long restarts take.
        let wake = start + every * (k + 1);
        while tokio::time::Instant::now() < wake {
            if cx.stopped() {
                return Ok(servers);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let victim = k as usize % servers.len();
        k += 1;
        // Told open by the replica about to die: the open period must
        // outlive it (on its next incarnation, and on the other replica).
        HOME.scope(victim, trip(&cx)).await;
        let kill = now_ms();
        {
            let mut s = cx.led.lock();
            s.faults += 1;
            s.windows.push((kill, None, victim));
        }
        let old = servers[victim].take();
        let (b, spec, x) = (bin.clone(), specs[victim].clone(), extra.clone());
        let started = tokio::task::spawn_blocking(move || {
            // kill -9, and wait: the data dir's lock is free once it is gone.
            if let Some(mut old) = old {
                let _ = old.child.kill();
                let _ = old.child.wait();
            }
            start_server(&b, &spec, &x)
        })
        .await
        .map_err(|e| e.to_string())??;
        let inc = cx.next_inc.fetch_add(1, Ordering::Relaxed);
        cx.conns[victim].set(inc, &started.addr)?;
        cx.led.lock().replica_of.insert(inc, victim);
        servers[victim] = Some(started);
        let ready = now_ms();
        let mut s = cx.led.lock();
        s.restarts += 1;
        if let Some(w) = s
            .windows
            .iter_mut()
            .rev()
            .find(|w| w.2 == victim && w.1.is_none())
        {
            w.1 = Some(ready);
        }
    }
}

/// Cluster: every third interval, half an interval after a kill, SIGSTOP
/// Redis for [`FREEZE`], then SIGCONT. Offset from the kills so that a
/// freeze and a restart are separate faults and the checker can tell which
/// one a failed call overlaps. A freeze under way is always thawed, even
/// when the run stops meanwhile.
async fn freezer(cx: Arc<Cx>, pid: u32, every: Duration) {
    let start = tokio::time::Instant::now();
    let mut j: u32 = 0;
    loop {
        let wake = start + every * (3 * j + 1) + every / 2;
        j += 1;
        while tokio::time::Instant::now() < wake {
            if cx.stopped() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The window opens before the signal and closes after the thaw:
        // it contains the freeze whatever the signal's latency.
        let stop = now_ms();
        if !signal(pid, "STOP") {
            println!("soak: cannot SIGSTOP redis-server (pid {pid}); no more freezes");
            return;
        }
        cx.led.lock().freezes.push((stop, None));
        tokio::time::sleep(FREEZE).await;
        signal(pid, "CONT");
        let cont = now_ms();
        if let Some(f) = cx.led.lock().freezes.last_mut() {
            f.1 = Some(cont);
        }
    }
}

fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

fn redis_on_path() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// A `redis-server` on a free port, persisting to `dir` with an AOF fsynced
/// on every write (an acknowledged Defer or transition must survive a Redis
/// restart; the soak does not restart Redis, but runs it as production would).
fn start_redis(dir: &Path) -> Result<Proc, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
        .arg(dir)
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server: {e}"))?;
    let redis = Proc {
        child,
        addr: format!("127.0.0.1:{port}"),
        _dir: None,
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        use std::io::{Read, Write};
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut b = [0u8; 5];
            if s.write_all(b"PING\r\n").is_ok()
                && s.read(&mut b).is_ok_and(|n| n > 0)
                && &b == b"+PONG"
            {
                return Ok(redis);
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "redis-server did not answer on port {port} within 10 s"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub async fn run(args: SoakArgs) -> Result<(), String> {
    if args.cluster && !redis_on_path() {
        println!("soak: --cluster skipped: redis-server is not on PATH");
        return Ok(());
    }
    let seed = args
        .seed
        .unwrap_or_else(|| now_ms() ^ u64::from(std::process::id()));
    let bin = super::backstop_bin(args.backstop_bin.as_ref())?;
    // The temp dir (if any) lives until the end of the run, then is removed.
    let (dir, _tmp): (PathBuf, Option<TempDir>) = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = super::temp_dir("soak")?;
            (t.0.clone(), Some(t))
        }
    };
    let write = |p: &Path, text: String| {
        std::fs::write(p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))
    };
    let (specs, redis) = if args.cluster {
        let redis = start_redis(&dir.join("redis"))?;
        let url = format!("redis://{}/0", redis.addr);
        let mut specs = Vec::new();
        for r in 0..2 {
            // A fixed replica id: a restarted replica is the same replica
            // (the default id, hostname:port, would change with the port).
            let cfg = dir.join(format!("soak-r{r}.toml"));
            write(
                &cfg,
                format!(
                    "{}\n[cluster]\nreplica_id = \"soak-r{r}\"\nredis_timeout = \"{}ms\"\n",
                    config(),
                    args.redis_timeout.as_millis()
                ),
            )?;
            specs.push(ServerSpec {
                config: cfg,
                data: dir.join(format!("data-r{r}")),
                args: vec!["--redis".into(), url.clone()],
            });
        }
        (specs, Some(redis))
    } else {
        let cfg = dir.join("soak.toml");
        write(&cfg, config())?;
        let spec = ServerSpec {
            config: cfg,
            data: dir.join("data"),
            args: Vec::new(),
        };
        (vec![spec], None)
    };
    println!(
        "soak: {:?} with kill -9 every {:?}{}, seed {seed}, data in {}",
        args.duration,
        args.kill_every,
        if args.cluster {
            " (one replica of two at a time; Redis frozen every third interval)"
        } else {
            ""
        },
        dir.display()
    );
    let mut servers = Vec::new();
    let mut conns = Vec::new();
    for spec in &specs {
        let (b, sp) = (bin.clone(), spec.clone());
        let server = tokio::task::spawn_blocking(move || start_server(&b, &sp, &[]))
            .await
            .map_err(|e| e.to_string())??;
        conns.push(Conn {
            cur: RwLock::new((
                conns.len() as u64,
                server.addr.clone(),
                channel(&server.addr)?,
            )),
        });
        servers.push(Some(server));
    }
    let n = conns.len();
    let cx = Arc::new(Cx {
        next_inc: AtomicU64::new(n as u64),
        conns,
        led: Ledger::new(args.cluster),
        deadline: args.deadline,
        stop: AtomicBool::new(false),
        stop_all: AtomicBool::new(false),
        next_payload: AtomicU64::new(0),
        seed,
    });
    {
        let mut s = cx.led.lock();
        for r in 0..n {
            s.replica_of.insert(r as u64, r);
        }
    }
    HOME.scope(0, setup(&cx)).await?;

    // Tasks alternate between the replicas (all on replica 0 without --cluster).
    let home = |i: u64| i as usize % n;
    let mut tasks = Vec::new();
    for i in 0..6 {
        tasks.push(tokio::spawn(HOME.scope(home(i), agent(cx.clone(), i))));
    }
    for i in 0..4 {
        tasks.push(tokio::spawn(HOME.scope(home(i), hunter(cx.clone(), i))));
    }
    for i in 0..2 {
        tasks.push(tokio::spawn(HOME.scope(home(i), producer(cx.clone(), i))));
    }
    let mut consumers = Vec::new();
    for i in 0..3 {
        consumers.push(tokio::spawn(HOME.scope(home(i), consumer(cx.clone(), i))));
    }
    tasks.push(tokio::spawn(vanisher(cx.clone())));
    if let Some(r) = &redis {
        tasks.push(tokio::spawn(freezer(
            cx.clone(),
            r.child.id(),
            args.kill_every,
        )));
    }
    let fault_task = tokio::spawn(faults(
        cx.clone(),
        servers,
        bin,
        specs,
        args.kill_every,
        args.restart_arg.clone(),
    ));

    // The continuous checker: a progress line every 5 s, and every new
    // violation's example as soon as it is seen.
    let end = tokio::time::Instant::now() + args.duration;
    let mut shown = std::collections::HashSet::new();
    while tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(5).min(end - tokio::time::Instant::now())).await;
        let r = cx.led.check(false);
        progress(&r);
        for e in r.examples {
            if !shown.contains(&e) {
                println!("soak: VIOLATION {e}");
                shown.insert(e);
            }
        }
    }
    cx.stop.store(true, Ordering::Relaxed);
    let servers = fault_task.await.map_err(|e| e.to_string())??;
    for t in tasks {
        let _ = t.await;
    }

    // Drain: consumers go on until every acknowledged Defer is acked.
    let drain_end = tokio::time::Instant::now() + args.drain;
    loop {
        let pending = {
            let s = cx.led.lock();
            s.items
                .values()
                .filter(|r| r.acknowledged && r.acks_ok == 0 && !r.ack_gone)
                .count()
        };
        if pending == 0 || tokio::time::Instant::now() >= drain_end {
            println!("soak: drain over, {pending} acknowledged item(s) not acked");
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    cx.stop_all.store(true, Ordering::Relaxed);
    for t in consumers {
        let _ = t.await;
    }
    let report = cx.led.check(true);
    drop(servers);
    drop(redis);
    print_report(&report);
    let json = serde_json::json!({ "soak": report });
    println!("{json}");
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&json).unwrap_or_default())
            .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    let v = report.total_violations();
    if v > 0 {
        Err(format!("{v} violation(s)"))
    } else {
        Ok(())
    }
}

fn progress(r: &Report) {
    println!(
        "soak: t={:.0}s faults={} redis_freezes={} decisions={} (degraded {}) defers_acknowledged={} items_acked={} violations={}",
        r.elapsed_s,
        r.faults,
        r.redis_freezes,
        r.decisions,
        r.degraded_decisions,
        r.defers_acknowledged,
        r.items_acked,
        r.total_violations()
    );
}

fn print_report(r: &Report) {
    let line = |k: &str, v: String| println!("  {k:<44} {v}");
    println!("---- chaos soak: {:.0} s", r.elapsed_s);
    line("faults injected (kill -9)", r.faults.to_string());
    line("restarts", r.restarts.to_string());
    line(
        "Redis freezes (SIGSTOP, cluster)",
        r.redis_freezes.to_string(),
    );
    line(
        "clients vanished holding leases",
        r.vanished_clients.to_string(),
    );
    line("calls", r.calls.to_string());
    line(
        "unanswered (all in kill windows?)",
        format!(
            "{} ({} excused, of which {} Claim/Ack by a Redis freeze)",
            r.unanswered, r.unanswered_excused, r.unanswered_excused_by_redis_freeze
        ),
    );
    if !r.unanswered_not_excused_by_call.is_empty() {
        line(
            "unanswered, not excused, by call",
            format!("{:?}", r.unanswered_not_excused_by_call),
        );
    }
    line(
        "decisions (CanProceed + RecordOutcome answered)",
        r.decisions.to_string(),
    );
    line(
        "decisions answered degraded (cluster)",
        r.degraded_decisions.to_string(),
    );
    line(
        "admitted / refused",
        format!("{} / {}", r.admitted, r.refused),
    );
    line("Defer calls", r.defer_calls.to_string());
    line(
        "defers acknowledged (of which duplicates)",
        format!("{} ({})", r.defers_acknowledged, r.defer_duplicates),
    );
    line(
        "deliveries (duplicates, allowed)",
        format!("{} ({})", r.deliveries, r.duplicate_deliveries),
    );
    line("items abandoned by consumers", r.abandoned.to_string());
    line("items acked", r.items_acked.to_string());
    line(
        "acks refused (lease gone) / acked by an unanswered Ack",
        format!("{} / {}", r.ack_refused, r.acked_by_unanswered_call),
    );
    line(
        "open periods told / spanning a restart / forgotten",
        format!(
            "{} / {} / {}",
            r.told_open, r.told_open_spanning_restart, r.open_forgotten_after_restart
        ),
    );
    line(
        "admitted while another replica, deciding without Redis, said open (cluster partition; allowed)",
        r.open_unknown_in_partition.to_string(),
    );
    line("probes seen", r.probes.to_string());
    line(
        "probes over the allowance in a partition: one replica through Redis, one alone within its share (cluster; allowed)",
        r.probes_in_partition.to_string(),
    );
    let maxes: Vec<String> = r
        .max_probes_by_incarnation
        .iter()
        .map(|(i, m)| format!("{i}:{m}"))
        .collect();
    line("max outstanding probes per incarnation", maxes.join(" "));
    for b in &r.budgets {
        line(
            &format!("budget {}", b.target),
            format!(
                "admitted {} ({} degraded; whole-run bound {:.0}); worst excess {:+.2} (interval {}..{}, {} degraded in it), within one incarnation {:+.2}",
                b.admitted,
                b.degraded_admitted,
                b.whole_run_bound,
                b.max_excess,
                b.worst_interval.0,
                b.worst_interval.1,
                b.degraded_in_worst_interval,
                b.max_excess_within_one_incarnation
            ),
        );
    }
    if !r.error_answers.is_empty() {
        line("error answers", format!("{:?}", r.error_answers));
    }
    line("lost / never acked", format!("{} / {}", r.lost, r.unacked));
    line("VIOLATIONS", r.total_violations().to_string());
    for (k, v) in &r.violations {
        line(&format!("  {k}"), v.to_string());
    }
    for e in &r.examples {
        println!("  example: {e}");
    }
}
