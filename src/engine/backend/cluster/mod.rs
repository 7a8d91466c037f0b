//! The cluster decision backend: every replica shares decision state through
//! Redis, so any replica gives the same answer and any replica can die.
//!
//! # How a decision is made
//! Decisions for one admission unit (see `keys.rs`) queue on that unit in
//! this replica; one task at a time runs the queue: it takes every queued
//! decision, makes them in order with the pure functions of `domain::unit`
//! on the unit's state as last read from Redis, and commits them with one
//! compare-and-set script (`scripts.rs`). If another replica committed first,
//! the script returns the current state and the batch is decided again on
//! it. So a decision costs one Redis round trip, and a hot unit's decisions
//! share round trips instead of queueing for one each.
//!
//! # Hot path
//! A refusal with a known end (an open breaker, a provider pause, an
//! exhausted budget) is cached until its `retry_after` and answered without
//! Redis; admissions are never cached. Operator overrides and resets
//! (seen on the event stream) clear the cache.
//!
//! # Redis unreachable
//! See `link.rs`: every call has a deadline, a breaker opens after
//! consecutive failures, and while it is open decisions are made by an
//! embedded backend seeded with the last known state of each target, every
//! budget divided by the number of live replicas, and answered `degraded`
//! (or, per `on_redis_unavailable`, all admitted or all refused).

pub mod keys;
pub mod link;
pub mod queue;
mod reload;
mod replica;
pub mod scripts;
mod spend;
/// The spend cell codec, for the fuzz properties (`crate::fuzz`).
pub(crate) use spend::{decode as decode_spend, encode as encode_spend};
mod stream;

use crate::config::{ClusterConfig, Config, OnRedisUnavailable, TargetSettings};
use crate::domain::Time;
use crate::domain::breaker::{BreakerState, Mode};
use crate::domain::budget::Priority;
use crate::domain::event::EventKind;
use crate::domain::retry::{Advice, RetryReason};
use crate::domain::unit::view::{TargetPage, TargetView, summary};
use crate::domain::unit::{
    self, Admission, AdmitArgs, Effects, GroupRef, GroupState, OutcomeArgs, OutcomeResult,
    SettledAnswer, TargetState, Trust, UnitCx, codec, first_permit_id, name_hash, operate,
};
use crate::domain::{OutcomeClass, Reason};
use crate::engine::backend::LocalBackend;
use crate::engine::clock::Clock;
use crate::engine::error::{EngineError, Result};
use crate::engine::events::EventBus;
use crate::engine::permit::PermitKey;
use crate::engine::validate_target;
use crate::metrics::{Metrics, TargetMetrics};
use dashmap::DashMap;
use keys::Keys;
use link::{Link, LinkError};
use prost::Message as _;
use redis::Value;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::oneshot;

/// How long idle state stays in Redis (refreshed by every write). A target
/// unused for this long comes back closed, with full budgets.
const STATE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Events kept in the stream (approximately: `MAXLEN ~`).
const STREAM_MAXLEN: usize = 100_000;
/// Attempts at committing one batch before giving up (contention).
const MAX_ATTEMPTS: usize = 32;

/// One target as this replica knows it: settings, identity, metric handles,
/// and its refusal cache.
pub(crate) struct Meta {
    pub name: Arc<str>,
    pub settings: Arc<TargetSettings>,
    pub seed: u64,
    pub tag: Arc<str>,
    pub metrics: Arc<TargetMetrics>,
    /// A refusal that holds until then: answered without Redis.
    refusal: Mutex<Option<CachedRefusal>>,
    /// Refusals answered from the cache since the last flush (counted into
    /// the target's shared `refused` by the flusher).
    pub(crate) refused_delta: AtomicU64,
    /// Already in the cluster's list of targets.
    indexed: AtomicBool,
    /// The latest open-until (ms) any replica announced for this breaker on
    /// the shared event stream; 0 after an operator reset or force. A
    /// degraded replica honours it, so that an open breaker decided by
    /// another replica shortly before Redis stopped answering is not
    /// forgotten because this replica's cache of the target was older.
    heard_open_until: AtomicU64,
}

impl Meta {
    /// Whether its budget or one of its groups' holds a reserve back from
    /// `p`. As such a budget refills, a refusal at `p` turns from
    /// RATE_LIMITED into PRIORITY_RESERVED before it admits, so the first
    /// reason cannot stand for the whole wait (the refusal cache skips it).
    fn holds_back(&self, p: Priority, config: &Config) -> bool {
        self.settings.budget.held_back(p) > 0
            || self.settings.groups.iter().any(|&g| {
                config
                    .groups
                    .get(g)
                    .is_some_and(|gr| gr.budget.held_back(p) > 0)
            })
    }

    fn cx(&self) -> UnitCx<'_> {
        UnitCx {
            settings: &self.settings,
            seed: self.seed,
        }
    }
}

/// A decision waiting for its unit's runner.
enum Op {
    Admit {
        caller: String,
        estimated_tokens: u64,
        attempt: u32,
        priority: Priority,
        max_output_tokens: u64,
        spend_scoped: bool,
    },
    Record {
        args: OwnedOutcome,
        rand01: f64,
    },
    Force {
        mode: Mode,
        reason: String,
    },
    Reset,
    /// A report of a permit Redis says was settled already: answered as a
    /// duplicate on the current state (`first` is the first report's answer,
    /// if still remembered), changing nothing.
    Duplicate {
        class: OutcomeClass,
        attempt: u32,
        first: Option<SettledAnswer>,
    },
    /// Merge what this replica decided while degraded back into the shared state.
    Merge {
        target: codec::TargetRecord,
        groups: Vec<(usize, codec::GroupRecord)>,
    },
}

/// An outcome's arguments, owned (they wait in a queue).
struct OwnedOutcome {
    args: OutcomeArgs<'static>,
    error_type: String,
    caller: String,
}

enum Answer {
    Admission(Admission),
    Outcome(OutcomeResult),
    /// Boxed: a view is much larger than the decisions that share the queue.
    View(Box<TargetView>),
}

/// Why a queued decision was not made in Redis.
enum Fail {
    /// Redis did not answer: decide without it.
    Link(LinkError),
    Engine(EngineError),
}

struct Job {
    meta: Arc<Meta>,
    op: Op,
    reply: oneshot::Sender<std::result::Result<Answer, Fail>>,
}

/// A target's state as last read from or written to Redis.
struct Cached {
    version: u64,
    st: TargetState,
    record: Vec<u8>,
}

struct CachedGroup {
    version: u64,
    st: GroupState,
    record: Vec<u8>,
}

/// One admission unit in this replica: the decisions waiting for it, and
/// the state its runner decides on.
struct Unit {
    queue: Mutex<Vec<Job>>,
    busy: AtomicBool,
    cache: tokio::sync::Mutex<UnitCache>,
}

#[derive(Default)]
struct UnitCache {
    targets: HashMap<Arc<str>, Cached>,
    groups: HashMap<usize, CachedGroup>,
}

/// What a commit answered.
#[derive(Debug, PartialEq)]
pub(crate) enum Committed {
    Ok(Vec<u64>),
    /// Current (version, record) of every key, in the order sent.
    Conflict(Vec<(u64, Vec<u8>)>),
    /// Settled-permit keys that already existed: (index among them, first answer).
    Duplicates(Vec<(usize, Vec<u8>)>),
}

/// A settled permit's first answer, as stored in Redis.
pub(crate) fn encode_answer(a: &SettledAnswer) -> Vec<u8> {
    let mut b = Vec::with_capacity(11);
    b.push(a.class.index() as u8);
    b.push(u8::from(a.advice.retry));
    b.push(match a.advice.reason {
        RetryReason::Succeeded => 0,
        RetryReason::Retryable => 1,
        RetryReason::Persistent => 2,
        RetryReason::BadInput => 3,
        RetryReason::MaxRetries => 4,
        RetryReason::BudgetExhausted => 5,
        RetryReason::CorrectAndRetry => 6,
        RetryReason::CircuitOpen => 7,
    });
    b.extend_from_slice(
        &u64::try_from(a.advice.delay.as_nanos())
            .unwrap_or(u64::MAX)
            .to_le_bytes(),
    );
    b
}

pub(crate) fn decode_answer(b: &[u8]) -> Option<SettledAnswer> {
    if b.len() != 11 {
        return None;
    }
    let class = *OutcomeClass::ALL.get(usize::from(b[0]))?;
    let reason = match b[2] {
        0 => RetryReason::Succeeded,
        1 => RetryReason::Retryable,
        2 => RetryReason::Persistent,
        3 => RetryReason::BadInput,
        4 => RetryReason::MaxRetries,
        5 => RetryReason::BudgetExhausted,
        6 => RetryReason::CorrectAndRetry,
        _ => RetryReason::CircuitOpen,
    };
    let delay = u64::from_le_bytes(b[3..11].try_into().ok()?);
    Some(SettledAnswer {
        class,
        advice: Advice {
            retry: b[1] != 0,
            delay: Duration::from_nanos(delay),
            reason,
        },
    })
}

/// The COMMIT script's reply for `n` state keys and `m` settled-permit
/// keys, checked for the shape the callers index by: exactly `n` versions,
/// exactly `n` (version, record) pairs, or 1..=`m` permit indexes. A reply
/// of any other shape (a Redis-compatible server or proxy that answers
/// differently) is an error naming it, never a panic further on.
pub(crate) fn parse_commit(
    vals: &[Value],
    n: usize,
    m: usize,
) -> std::result::Result<Committed, String> {
    let bad = |what: &str| Err(format!("unexpected answer from the commit script: {what}"));
    let rest = vals.get(1..).unwrap_or_default();
    match vals.first().map(int) {
        Some(1) if rest.len() == n => Ok(Committed::Ok(rest.iter().map(int).collect())),
        Some(1) => bad(&format!("{} versions for {n} keys", rest.len())),
        Some(0) => parse_pairs(rest, n)
            .map(Committed::Conflict)
            .or_else(|e| bad(&e)),
        Some(2) => {
            if rest.is_empty() || rest.len() % 2 != 0 {
                return bad("an odd or empty list of settled permits");
            }
            let mut out = Vec::with_capacity(rest.len() / 2);
            for p in rest.chunks(2) {
                let j = int(&p[0]);
                if j == 0 || j > m as u64 {
                    return bad(&format!("settled permit {j} of {m}"));
                }
                out.push(((j - 1) as usize, bytes(&p[1])));
            }
            Ok(Committed::Duplicates(out))
        }
        _ => bad("no status"),
    }
}

/// The READ script's reply for `n` keys: exactly `n` (version, record) pairs.
pub(crate) fn parse_read(
    vals: &[Value],
    n: usize,
) -> std::result::Result<Vec<(u64, Vec<u8>)>, String> {
    parse_pairs(vals, n).map_err(|e| format!("unexpected answer from the read script: {e}"))
}

fn parse_pairs(vals: &[Value], n: usize) -> std::result::Result<Vec<(u64, Vec<u8>)>, String> {
    if vals.len() != 2 * n {
        return Err(format!(
            "{} values for {n} (version, record) pairs",
            vals.len()
        ));
    }
    Ok(vals.chunks(2).map(|p| (int(&p[0]), bytes(&p[1]))).collect())
}

fn bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b.clone(),
        Value::SimpleString(s) => s.clone().into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

fn int(v: &Value) -> u64 {
    match v {
        Value::Int(i) => u64::try_from(*i).unwrap_or(0),
        other => String::from_utf8_lossy(&bytes(other)).parse().unwrap_or(0),
    }
}

/// Shared by the backend handle and its background tasks.
pub(crate) struct Inner {
    /// Replaced by a config reload (see [`RedisBackend::reload`]).
    config: arc_swap::ArcSwap<Config>,
    cluster: ClusterConfig,
    clock: Arc<dyn Clock>,
    pub(crate) link: Arc<Link>,
    pub(crate) keys: Keys,
    units: DashMap<Arc<str>, Arc<Unit>>,
    metas: DashMap<Arc<str>, Arc<Meta>>,
    /// Targets created on first use by this replica.
    created: AtomicUsize,
    /// Signing key (shared through Redis), and older keys still accepted.
    keys_for_permits: RwLock<(Arc<PermitKey>, Vec<Arc<PermitKey>>)>,
    pub(crate) events: Arc<EventBus>,
    metrics: Arc<Metrics>,
    /// Decides while Redis is unreachable (a fresh one per outage, with this
    /// replica's share of every budget).
    fallback: RwLock<Arc<LocalBackend>>,
    /// Corrected to Redis TIME by the heartbeat (None: an injected clock).
    clock_sync: Option<Arc<crate::engine::clock::OffsetClock>>,
    /// Targets the fallback has decided on since Redis was last reachable.
    degraded_targets: Mutex<HashSet<Arc<str>>>,
    /// Wakes long-polling Claims: a Defer here, or one seen on the stream.
    pub(crate) queue_wake: tokio::sync::Notify,
    /// True from entering degraded mode (fallback built and seeded) until
    /// merged back; transitions take `transition`.
    pub(crate) degraded: AtomicBool,
    transition: tokio::sync::Mutex<()>,
    /// Refusals are cached until their retry_after (on by default).
    refusal_cache: AtomicBool,
    pub(crate) replica_id: String,
    pub(crate) address: RwLock<String>,
    /// This replica's config digest (heartbeats carry it; a reload changes it).
    pub(crate) digest: arc_swap::ArcSwap<String>,
    pub(crate) live_replicas: AtomicUsize,
    boot: Time,
    /// Targets created on first use per tenant (`[tenants.<name>] max_targets`).
    tenant_targets: crate::engine::backend::quota::TenantTargets,
    /// Spend scope cells as last read or written: (version, cell) by key.
    spend_cache: Mutex<HashMap<Arc<str>, (u64, crate::domain::spend::Spend)>>,
}

/// The cluster backend (a cheap handle; clones share everything).
#[derive(Clone)]
pub struct RedisBackend {
    pub(crate) inner: Arc<Inner>,
}

impl RedisBackend {
    /// A backend over Redis. It does not wait for Redis: the connection is
    /// made in the background, and until it is up decisions are degraded.
    pub fn new(
        config: Arc<Config>,
        cluster: ClusterConfig,
        clock: Arc<dyn Clock>,
        events: Arc<EventBus>,
        metrics: Arc<Metrics>,
        replica: Replica,
    ) -> RedisBackend {
        let Replica {
            id: replica_id,
            digest,
            clock_sync,
        } = replica;
        let keys = Keys::new(&cluster.key_prefix, &config);
        let link = Arc::new(Link::new(
            link::Endpoint::of(&cluster),
            cluster.redis_timeout,
        ));
        // Until Redis gives the shared key, the configured one (or a
        // temporary one: permits signed with it verify only here).
        let secret = config
            .server
            .permit_key
            .as_deref()
            .map(|k| k.as_bytes().to_vec())
            .or_else(PermitKey::generate_secret)
            .unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec());
        let fallback = LocalBackend::new(
            Arc::new(degraded_config(&config, 1)),
            clock.clone(),
            events.clone(),
            metrics.clone(),
        );
        let boot = clock.now();
        RedisBackend {
            inner: Arc::new(Inner {
                keys,
                link,
                units: DashMap::new(),
                metas: DashMap::new(),
                created: AtomicUsize::new(0),
                keys_for_permits: RwLock::new((Arc::new(PermitKey::new(&secret)), Vec::new())),
                events,
                metrics,
                fallback: RwLock::new(Arc::new(fallback)),
                clock_sync,
                degraded_targets: Mutex::new(HashSet::new()),
                queue_wake: tokio::sync::Notify::new(),
                degraded: AtomicBool::new(false),
                transition: tokio::sync::Mutex::new(()),
                refusal_cache: AtomicBool::new(true),
                replica_id,
                address: RwLock::new(String::new()),
                digest: arc_swap::ArcSwap::from_pointee(digest),
                live_replicas: AtomicUsize::new(1),
                boot,
                spend_cache: Mutex::new(HashMap::new()),
                tenant_targets: Default::default(),
                config: arc_swap::ArcSwap::new(config),
                cluster,
                clock,
            }),
        }
    }

    /// Starts the background work: connecting, probing while unreachable,
    /// heartbeats, the event reader and the refusal-count flusher.
    pub fn start(&self, address: String) {
        *self
            .inner
            .address
            .write()
            .unwrap_or_else(|e| e.into_inner()) = address;
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.supervise().await });
        let inner = self.inner.clone();
        tokio::spawn(async move { stream::read(inner).await });
    }

    /// Waits (up to `limit`) until the background connection made by
    /// [`RedisBackend::start`] is up. A server calls this before it serves:
    /// a replica restarted while Redis is fine then decides from the shared
    /// state from its first call, instead of degraded from an empty fallback
    /// (the chaos soak caught a restarted replica admitting through a
    /// breaker the fleet had just opened). With Redis down it gives up after
    /// `limit` and the replica serves degraded: never "will not start".
    pub async fn wait_linked(&self, limit: std::time::Duration) -> bool {
        let started = std::time::Instant::now();
        loop {
            let link = &self.inner.link;
            if link.is_connected() && !link.is_open() {
                return true;
            }
            if started.elapsed() >= limit {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Connects now and waits for it (tests and tools; `start` does this in
    /// the background for a server).
    pub async fn connect(&self) -> std::result::Result<(), String> {
        self.inner
            .link
            .probe()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Turns the refusal cache off (the differential test compares every
    /// answer with the embedded backend's, including exact retry_after).
    pub fn without_refusal_cache(self) -> Self {
        self.inner.refusal_cache.store(false, Ordering::Relaxed);
        self
    }

    pub fn sign(&self, target: &str, p: &unit::Permit) -> String {
        self.inner.signing_key().sign(target, p)
    }

    pub fn verify(
        &self,
        target: &str,
        tag: u16,
        s: &str,
    ) -> std::result::Result<unit::Permit, crate::engine::permit::PermitError> {
        let (key, old) = self
            .inner
            .keys_for_permits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match key.verify(target, tag, s) {
            Err(crate::engine::permit::PermitError::Forged) => {
                for k in &old {
                    if let Ok(p) = k.verify(target, tag, s) {
                        return Ok(p);
                    }
                }
                Err(crate::engine::permit::PermitError::Forged)
            }
            other => other,
        }
    }

    pub fn target_count(&self) -> usize {
        self.inner.metas.len()
    }

    pub fn describe(&self) -> String {
        format!(
            "Redis ({:?}, prefix {:?})",
            self.inner.cluster.redis, self.inner.cluster.key_prefix
        )
    }

    /// Whether decisions are being made without Redis right now.
    pub fn degraded(&self) -> bool {
        self.inner.link.is_open()
    }

    pub fn ensure(&self, target: &str) -> Result<()> {
        self.inner.meta(target).map(|_| ())
    }

    pub async fn admit(&self, target: &str, args: &AdmitArgs<'_>) -> Result<Admission> {
        let inner = &self.inner;
        let meta = inner.meta(target)?;
        let now = inner.clock.now();
        if inner.refusal_cache.load(Ordering::Relaxed)
            && let Some(a) = meta.cached_refusal(now, args)
        {
            inner.metrics.refusal_cache_hit();
            meta.refused_delta.fetch_add(1, Ordering::Relaxed);
            meta.metrics
                .decision(a.shadow_reason.unwrap_or(a.reason), args.attempt);
            return Ok(a);
        }
        let op = Op::Admit {
            caller: args.caller.to_string(),
            estimated_tokens: args.estimated_tokens,
            attempt: args.attempt,
            priority: args.priority,
            max_output_tokens: args.max_output_tokens,
            spend_scoped: args.spend_scoped,
        };
        if inner.awaiting_merge(&meta.name) {
            return inner.fallback_admit(&meta, args).await;
        }
        match inner.submit(meta.clone(), op).await {
            Ok(Answer::Admission(a)) => Ok(a),
            Ok(_) => Err(EngineError::Unavailable("unexpected answer".into())),
            Err(Fail::Engine(e)) => Err(e),
            Err(Fail::Link(e)) => inner.degraded_admit(&meta, args, e).await,
        }
    }

    pub async fn record(
        &self,
        target: &str,
        args: OutcomeArgs<'_>,
        rand01: f64,
    ) -> Result<OutcomeResult> {
        let inner = &self.inner;
        let meta = inner.meta(target)?;
        // What this outcome does may make a cached refusal wrong (a longer
        // pause, a refund): this replica asks Redis again next time.
        meta.forget_refusal();
        if inner.awaiting_merge(&meta.name) {
            return inner.fallback_record(&meta, args, rand01).await;
        }
        let owned = OwnedOutcome::from(&args);
        match inner
            .submit(
                meta.clone(),
                Op::Record {
                    args: owned,
                    rand01,
                },
            )
            .await
        {
            Ok(Answer::Outcome(r)) => Ok(r),
            Ok(_) => Err(EngineError::Unavailable("unexpected answer".into())),
            Err(Fail::Engine(e)) => Err(e),
            Err(Fail::Link(e)) => inner.degraded_record(&meta, args, rand01, e).await,
        }
    }

    pub async fn force(&self, target: &str, mode: Mode, reason: &str) -> Result<TargetView> {
        let meta = self.inner.meta(target)?;
        let op = Op::Force {
            mode,
            reason: reason.to_string(),
        };
        self.inner.operate(meta, op).await
    }

    pub async fn reset(&self, target: &str) -> Result<TargetView> {
        let meta = self.inner.existing(target).await?;
        // A reset zeroes the counters: refusals this replica answered from
        // its cache and has not yet flushed go too.
        meta.refused_delta.store(0, Ordering::Relaxed);
        self.inner.operate(meta, Op::Reset).await
    }

    pub async fn view(&self, target: &str) -> Result<TargetView> {
        let meta = self.inner.existing(target).await?;
        self.inner.read_view(&meta).await
    }

    pub async fn list(&self, prefix: &str, size: usize, page_token: &str) -> Result<TargetPage> {
        let inner = &self.inner;
        let mut names = inner.names().await?;
        names.retain(|n| n.starts_with(prefix));
        names.sort();
        let total = names.len() as u64;
        let start = if page_token.is_empty() {
            0
        } else {
            names.partition_point(|n| n.as_str() <= page_token)
        };
        let mut targets = Vec::new();
        for name in names.iter().skip(start).take(size) {
            let meta = inner.meta(name)?;
            let (st, _) = inner.read_state(&meta).await?;
            targets.push(summary(&meta.name, &meta.settings, &st));
        }
        let next_page_token = if start + size < names.len() {
            targets
                .last()
                .map(|t| t.name.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(TargetPage {
            targets,
            next_page_token,
            total,
        })
    }

    pub async fn views(&self, only: &HashSet<String>, max: usize) -> Vec<TargetView> {
        let inner = &self.inner;
        let mut names = match inner.names().await {
            Ok(n) => n,
            // Unreachable: what this replica knows.
            Err(_) => inner.metas.iter().map(|m| m.key().to_string()).collect(),
        };
        names.retain(|n| only.is_empty() || only.contains(n));
        names.sort();
        names.truncate(max);
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            if let Ok(meta) = inner.meta(&n)
                && let Ok(v) = inner.read_view(&meta).await
            {
                out.push(v);
            }
        }
        out
    }

    /// Publishes an engine-level event (fallbacks, queue activity) to every
    /// replica through the stream.
    pub fn publish(&self, at: Time, target: &Arc<str>, kind: EventKind) {
        let inner = self.inner.clone();
        let target = target.clone();
        tokio::spawn(async move {
            let ev = stream::encode(at, &target, kind);
            let key = inner.keys.events();
            let _ = inner
                .link
                .call(|mut c| async move {
                    redis::cmd("XADD")
                        .arg(&key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(STREAM_MAXLEN)
                        .arg("*")
                        .arg("e")
                        .arg(ev)
                        .query_async::<Value>(&mut c)
                        .await
                })
                .await;
        });
    }

    pub fn refresh_gauges(&self) {
        self.inner.metrics.set_cluster(
            self.inner.link.is_open(),
            self.inner.live_replicas.load(Ordering::Relaxed),
        );
    }

    /// What GetCluster answers.
    pub async fn status(&self) -> ClusterStatus {
        let inner = &self.inner;
        ClusterStatus {
            replica_id: inner.replica_id.clone(),
            redis_reachable: !inner.link.is_open(),
            redis_role: inner.link.role(),
            redis_rtt: inner.link.rtt(),
            degraded: inner.link.is_open(),
            replicas: inner.replicas().await.unwrap_or_default(),
            config_digest: inner.digest.load().to_string(),
        }
    }
}

/// Who this replica is: its id, its config's digest, and the clock the
/// heartbeat corrects to Redis TIME (None when a clock is injected).
pub struct Replica {
    pub id: String,
    pub digest: String,
    pub clock_sync: Option<Arc<crate::engine::clock::OffsetClock>>,
}

/// This replica and its view of the cluster (Admin GetCluster).
#[derive(Clone, Debug, Default)]
pub struct ClusterStatus {
    pub replica_id: String,
    pub redis_reachable: bool,
    pub redis_role: String,
    pub redis_rtt: Duration,
    pub degraded: bool,
    pub replicas: Vec<ReplicaInfo>,
    pub config_digest: String,
}

/// A live replica, from its heartbeat.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ReplicaInfo {
    pub id: String,
    pub address: String,
    /// Milliseconds since the Unix epoch.
    pub heartbeat_ms: u64,
    pub config_digest: String,
}

/// Declared in the config: as a target, or named by a route (such targets
/// do not count against `max_targets`).
fn is_configured(config: &Config, name: &str) -> bool {
    config.targets.contains_key(name)
        || config
            .routes
            .values()
            .any(|r| r.targets.iter().any(|t| t.as_ref() == name))
}

/// The config a degraded replica decides with: every rate and concurrency
/// budget, and the half-open probe allowance, divided by the number of live
/// replicas, so N replicas deciding
/// alone admit what the cluster would (Sentinel applied the cluster-wide
/// threshold on every node: N times the limit).
fn degraded_config(config: &Config, replicas: usize) -> Config {
    let n = replicas.max(1) as u64;
    let divide = |b: &crate::domain::budget::BudgetConfig| {
        let mut b = b.clone();
        // Spend limits like rate budgets: N replicas spending alone must
        // not spend N times the money.
        for r in b
            .rates
            .iter_mut()
            .chain(std::iter::once(&mut b.spend))
            .flatten()
        {
            r.amount = (r.amount / n).max(1);
        }
        if let Some(c) = b.max_concurrency.as_mut() {
            *c = (*c / n as u32).max(1);
        }
        // An adaptive limit is learned fleet-wide: each replica alone takes
        // its share of whatever was learned.
        if let Some(a) = b.adaptive.as_mut() {
            a.share = n as u32;
        }
        b
    };
    // Half-open probes too: N replicas probing alone would send N times
    // the probes to a provider that is just recovering (never below one
    // each, so with fewer probes than replicas the fleet may send more).
    let share = |s: &mut crate::config::TargetSettings| {
        s.budget = divide(&s.budget);
        let p = &mut s.breaker.half_open_max_probes;
        *p = (*p / n as u32).max(1);
    };
    let mut c = config.clone();
    c.server.ephemeral = true;
    for t in c.targets.values_mut() {
        let mut s = (**t).clone();
        share(&mut s);
        *t = Arc::new(s);
    }
    let mut d = (*c.default_target).clone();
    share(&mut d);
    c.default_target = Arc::new(d);
    for g in c.groups.iter_mut() {
        g.budget = divide(&g.budget);
    }
    c
}

impl OwnedOutcome {
    fn from(a: &OutcomeArgs<'_>) -> OwnedOutcome {
        OwnedOutcome {
            args: OutcomeArgs {
                trust: a.trust,
                trust_permitless: a.trust_permitless,
                class: a.class,
                signals: a.signals.clone(),
                max_pause: a.max_pause,
                http_status: a.http_status,
                error_type: "",
                slot: a.slot,
                latency: a.latency,
                retry_after: a.retry_after,
                input_tokens: a.input_tokens,
                output_tokens: a.output_tokens,
                attempt: a.attempt,
                caller: "",
            },
            error_type: a.error_type.to_string(),
            caller: a.caller.to_string(),
        }
    }

    fn args(&self) -> OutcomeArgs<'_> {
        OutcomeArgs {
            error_type: &self.error_type,
            caller: &self.caller,
            signals: self.args.signals.clone(),
            ..self.args.clone()
        }
    }
}

/// A refusal remembered until it runs out, and which requests it answers.
struct CachedRefusal {
    until: Time,
    answer: Admission,
    /// `None`: the breaker refused, whatever was asked (it is checked
    /// first). `Some(tokens)`: a budget or key-slot refusal, which depends on
    /// the request's size and, for retries, on the retry budget checked
    /// before it; it answers only first attempts of exactly this size.
    only_for: Option<(u64, Priority)>,
}

impl Meta {
    fn cached_refusal(&self, now: Time, args: &AdmitArgs<'_>) -> Option<Admission> {
        let mut r = self.refusal.lock().unwrap_or_else(|e| e.into_inner());
        match &*r {
            Some(CachedRefusal {
                until,
                answer: a,
                only_for,
            }) if *until > now => {
                if only_for.is_some_and(|(t, p)| {
                    t != args.estimated_tokens || p != args.priority || args.attempt > 0
                }) {
                    return None;
                }
                let mut a = a.clone();
                // A refusal without a retry_after (forced open) keeps none.
                if a.retry_after.is_some() {
                    a.retry_after = Some(now.until(*until));
                }
                Some(a)
            }
            Some(_) => {
                *r = None;
                None
            }
            None => None,
        }
    }

    fn remember_refusal(&self, now: Time, a: &Admission, args: Option<(u64, u32, Priority)>) {
        let only_for = match (a.reason, args) {
            (Reason::CircuitOpen | Reason::ForcedOpen, _) => None,
            // A budget's answer depends on the size and the priority asked.
            (Reason::RateLimited | Reason::KeySlotsUnavailable, Some((tokens, 0, p))) => {
                Some((tokens, p))
            }
            _ => return,
        };
        if !a.allowed {
            // A forced-open breaker has no end: re-checked every second.
            let for_ = a.retry_after.unwrap_or(Duration::from_secs(1));
            *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(CachedRefusal {
                until: now + for_,
                answer: a.clone(),
                only_for,
            });
        }
    }

    pub(crate) fn forget_refusal(&self) {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// An open period announced on the event stream (max of all heard).
    pub(crate) fn heard_open(&self, until: Time) {
        self.heard_open_until
            .fetch_max(until.as_millis(), Ordering::Relaxed);
    }

    /// An operator changed the breaker: what was heard no longer holds.
    pub(crate) fn forget_heard_open(&self) {
        self.heard_open_until.store(0, Ordering::Relaxed);
    }

    /// The open-until heard, while it is still in the future.
    fn heard_open_until(&self, now: Time) -> Option<Time> {
        let ms = self.heard_open_until.load(Ordering::Relaxed);
        (ms > now.as_millis()).then(|| Time::from_millis(ms))
    }
}

impl Inner {
    /// With `[cluster] min_replicas_acked = n`: waits (Redis `WAIT`) until
    /// n Redis replicas have the writes made so far on this connection, so
    /// an acknowledged write survives a failover to one of them.
    pub(crate) async fn wait_replicas(&self) -> Result<()> {
        let n = self.cluster.min_replicas_acked;
        if n == 0 {
            return Ok(());
        }
        // Within the call's own deadline, so a slow replica is "not enough
        // replicas", not "Redis unreachable".
        let wait_ms = (self.cluster.redis_timeout.as_millis() as u64 * 3 / 4).max(1);
        let acked: i64 = self
            .link
            .call(|mut c| async move {
                redis::cmd("WAIT")
                    .arg(n)
                    .arg(wait_ms)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(|e| EngineError::Unavailable(format!("Redis WAIT failed: {e}")))?;
        if acked < i64::from(n) {
            self.metrics.redis_error("wait");
            return Err(EngineError::Unavailable(format!(
                "only {acked} of the {n} Redis replicas required ([cluster] min_replicas_acked) acknowledged within {wait_ms} ms: \
                 the write is on the primary but could be lost in a failover; retrying is safe with an idempotency key"
            )));
        }
        Ok(())
    }

    fn signing_key(&self) -> Arc<PermitKey> {
        self.keys_for_permits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// The target's meta if this replica has one or the config declares
    /// the target (then it is made); never one created on first use.
    fn known_meta(&self, name: &str) -> Option<Arc<Meta>> {
        if let Some(m) = self.metas.get(name) {
            return Some(m.clone());
        }
        if is_configured(&self.config.load(), name) {
            self.meta(name).ok()
        } else {
            None
        }
    }

    /// This replica's record of `target`, created on first use (within max_targets).
    fn meta(&self, name: &str) -> Result<Arc<Meta>> {
        if let Some(m) = self.metas.get(name) {
            return Ok(m.clone());
        }
        validate_target(name)?;
        let config = self.config.load_full();
        let configured = is_configured(&config, name);
        let mut tenant = None;
        if !configured {
            let max = config.server.max_targets;
            if self.created.load(Ordering::Relaxed) >= max {
                return Err(EngineError::ResourceExhausted(format!(
                    "target {name:?} is unknown and the server already tracks the maximum of {max} targets created on first use; \
                     declare it in the config file or raise [server] max_targets"
                )));
            }
            tenant = self.tenant_targets.check(&config, name)?;
        }
        let key: Arc<str> = Arc::from(name);
        let meta = self
            .metas
            .entry(key.clone())
            .or_insert_with(|| {
                if !configured {
                    self.created.fetch_add(1, Ordering::Relaxed);
                    if let Some(t) = &tenant {
                        self.tenant_targets.created(t);
                    }
                }
                let settings = config.target(name).clone();
                Arc::new(Meta {
                    seed: name_hash(name),
                    tag: self.keys.tag(name, &settings.groups),
                    metrics: self.metrics.for_target(name),
                    name: key.clone(),
                    settings,
                    refusal: Mutex::new(None),
                    refused_delta: AtomicU64::new(0),
                    indexed: AtomicBool::new(false),
                    heard_open_until: AtomicU64::new(0),
                })
            })
            .clone();
        Ok(meta)
    }

    /// A target that exists somewhere in the cluster (NOT_FOUND otherwise).
    async fn existing(&self, name: &str) -> Result<Arc<Meta>> {
        validate_target(name)?;
        if self.metas.contains_key(name) || is_configured(&self.config.load(), name) {
            return self.meta(name);
        }
        let key = self.keys.index();
        let name_owned = name.to_string();
        let known: bool = self
            .link
            .call(|mut c| async move {
                redis::cmd("SISMEMBER")
                    .arg(&key)
                    .arg(&name_owned)
                    .query_async(&mut c)
                    .await
            })
            .await
            .unwrap_or(false);
        if known {
            self.meta(name)
        } else {
            Err(EngineError::NotFound(format!(
                "target {name:?} is not configured and has not been used yet"
            )))
        }
    }

    /// Every target name the cluster knows.
    async fn names(&self) -> Result<Vec<String>> {
        let key = self.keys.index();
        let mut names: HashSet<String> = self
            .link
            .call(|mut c| async move { redis::cmd("SMEMBERS").arg(&key).query_async(&mut c).await })
            .await
            .map_err(|e| EngineError::Unavailable(format!("cannot list targets: {e}")))?;
        let config = self.config.load_full();
        names.extend(config.targets.keys().cloned());
        for r in config.routes.values() {
            names.extend(r.targets.iter().map(|t| t.to_string()));
        }
        Ok(names.into_iter().collect())
    }

    fn unit(&self, tag: &Arc<str>) -> Arc<Unit> {
        self.units
            .entry(tag.clone())
            .or_insert_with(|| {
                Arc::new(Unit {
                    queue: Mutex::new(Vec::new()),
                    busy: AtomicBool::new(false),
                    cache: tokio::sync::Mutex::new(UnitCache::default()),
                })
            })
            .clone()
    }

    /// Queues a decision on its unit and waits for the answer. If no runner
    /// is active for the unit, this call starts one.
    async fn submit(
        self: &Arc<Self>,
        meta: Arc<Meta>,
        op: Op,
    ) -> std::result::Result<Answer, Fail> {
        if self.link.is_open() {
            return Err(Fail::Link(LinkError::Open));
        }
        let unit = self.unit(&meta.tag);
        let (tx, rx) = oneshot::channel();
        unit.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Job {
                meta,
                op,
                reply: tx,
            });
        if !unit.busy.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            tokio::spawn(async move { me.run(unit).await });
        }
        rx.await.unwrap_or(Err(Fail::Link(LinkError::Redis(
            "the unit's runner stopped".into(),
        ))))
    }

    /// Drains a unit's queue, a batch at a time.
    async fn run(self: Arc<Self>, unit: Arc<Unit>) {
        loop {
            let jobs = std::mem::take(&mut *unit.queue.lock().unwrap_or_else(|e| e.into_inner()));
            if jobs.is_empty() {
                unit.busy.store(false, Ordering::Release);
                // A job queued between the take and the store would wait forever.
                let more = !unit
                    .queue
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_empty();
                if more && !unit.busy.swap(true, Ordering::AcqRel) {
                    continue;
                }
                return;
            }
            self.process(&unit, jobs).await;
        }
    }

    /// Keys of every target and group a batch reads: targets first.
    fn batch_keys(&self, jobs: &[Job]) -> (Vec<Arc<Meta>>, Vec<usize>) {
        let mut metas: Vec<Arc<Meta>> = Vec::new();
        let mut groups: Vec<usize> = Vec::new();
        for j in jobs {
            if !metas.iter().any(|m| Arc::ptr_eq(m, &j.meta)) {
                metas.push(j.meta.clone());
            }
            for &g in &j.meta.settings.groups {
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
        }
        groups.sort_unstable();
        (metas, groups)
    }

    /// Reads state records: targets then groups, (version, record) each.
    async fn read(&self, keys: Vec<String>) -> std::result::Result<Vec<(u64, Vec<u8>)>, LinkError> {
        let n = keys.len();
        let vals: Vec<Value> = self
            .link
            .call(|mut c| async move {
                let mut inv = scripts::READ.prepare_invoke();
                for k in &keys {
                    inv.key(k);
                }
                inv.invoke_async(&mut c).await
            })
            .await?;
        parse_read(&vals, n).map_err(LinkError::Redis)
    }

    fn decode_target(&self, meta: &Meta, version: u64, record: Vec<u8>) -> Cached {
        let st = match codec::TargetRecord::decode(record.as_slice()) {
            Ok(rec) if version > 0 => codec::decode(&meta.cx(), &rec, first_permit_id(self.boot)),
            _ => TargetState::new(
                meta.seed,
                meta.settings.keys.len(),
                first_permit_id(self.boot),
            ),
        };
        Cached {
            version,
            st,
            record: if version > 0 { record } else { Vec::new() },
        }
    }

    fn decode_group(&self, gi: usize, version: u64, record: Vec<u8>, now: Time) -> CachedGroup {
        let st = match codec::GroupRecord::decode(record.as_slice()) {
            Ok(rec) if version > 0 => {
                let config = self.config.load();
                codec::decode_group(&rec, &config.groups[gi].budget, now, false)
            }
            _ => GroupState::default(),
        };
        CachedGroup {
            version,
            st,
            record: if version > 0 { record } else { Vec::new() },
        }
    }

    /// Decides a batch and commits it (see the module doc).
    async fn process(self: &Arc<Self>, unit: &Unit, mut jobs: Vec<Job>) {
        let config = self.config.load_full();
        let mut cache = unit.cache.lock().await;
        for _ in 0..MAX_ATTEMPTS {
            let (metas, groups) = self.batch_keys(&jobs);
            let tag = metas[0].tag.clone();
            let state_keys: Vec<String> = metas
                .iter()
                .map(|m| self.keys.state(&tag, &m.name))
                .chain(
                    groups
                        .iter()
                        .map(|&g| self.keys.group(&tag, &config.groups[g].name)),
                )
                .collect();
            // Load what this replica has not seen yet.
            let missing: Vec<usize> = (0..state_keys.len())
                .filter(|&i| {
                    if i < metas.len() {
                        !cache.targets.contains_key(&metas[i].name)
                    } else {
                        !cache.groups.contains_key(&groups[i - metas.len()])
                    }
                })
                .collect();
            let now = self.clock.now();
            if !missing.is_empty() {
                let keys = missing.iter().map(|&i| state_keys[i].clone()).collect();
                match self.read(keys).await {
                    Ok(vals) => {
                        for (&i, (v, rec)) in missing.iter().zip(vals) {
                            if i < metas.len() {
                                let c = self.decode_target(&metas[i], v, rec);
                                cache.targets.insert(metas[i].name.clone(), c);
                            } else {
                                let gi = groups[i - metas.len()];
                                cache.groups.insert(gi, self.decode_group(gi, v, rec, now));
                            }
                        }
                    }
                    Err(e) => return fail_all(jobs, e),
                }
            }
            // Decide every job in order on the cached state.
            let mut answers: Vec<Answer> = Vec::with_capacity(jobs.len());
            let mut events: Vec<Vec<u8>> = Vec::new();
            let mut settled: Vec<(usize, String, Vec<u8>, u64)> = Vec::new();
            let mut transitions = Vec::new();
            let mut adapted = Vec::new();
            let mut durable = false;
            for (ji, job) in jobs.iter().enumerate() {
                let meta = &job.meta;
                let mut fx = Effects::default();
                let UnitCache {
                    targets,
                    groups: cached_groups,
                } = &mut *cache;
                // Groups are held in cache.groups; take them out for the call.
                let mut taken: Vec<(usize, GroupState)> = meta
                    .settings
                    .groups
                    .iter()
                    .map(|&g| {
                        (
                            g,
                            cached_groups
                                .get_mut(&g)
                                .map(|c| std::mem::take(&mut c.st))
                                .unwrap_or_default(),
                        )
                    })
                    .collect();
                let Some(c) = targets.get_mut(&meta.name) else {
                    drop(cache);
                    return fail_all(jobs, LinkError::NotConnected);
                };
                let st = &mut c.st;
                let answer = {
                    let mut refs: Vec<GroupRef<'_>> = taken
                        .iter_mut()
                        .map(|(g, s)| GroupRef {
                            name: &config.groups[*g].name,
                            config: &config.groups[*g].budget,
                            state: s,
                        })
                        .collect();
                    let cx = meta.cx();
                    match &job.op {
                        Op::Admit {
                            caller,
                            estimated_tokens,
                            attempt,
                            priority,
                            max_output_tokens,
                            spend_scoped,
                        } => {
                            let args = AdmitArgs {
                                caller,
                                estimated_tokens: *estimated_tokens,
                                attempt: *attempt,
                                priority: *priority,
                                max_output_tokens: *max_output_tokens,
                                spend_scoped: *spend_scoped,
                            };
                            Answer::Admission(unit::admit(&cx, st, &mut refs, now, &args, &mut fx))
                        }
                        Op::Record { args, rand01 } => {
                            let a = args.args();
                            let r = unit::record(&cx, st, &mut refs, now, &a, *rand01, &mut fx);
                            if let Trust::Permit(p) = a.trust {
                                let ans = SettledAnswer {
                                    class: r.classified_as,
                                    advice: r.advice,
                                };
                                let ttl = p.expires_ms.saturating_sub(now.as_millis()) + 1000;
                                settled.push((
                                    ji,
                                    self.keys.settled(&tag, &meta.name, p.id),
                                    encode_answer(&ans),
                                    ttl,
                                ));
                            }
                            Answer::Outcome(r)
                        }
                        Op::Duplicate {
                            class,
                            attempt,
                            first,
                        } => Answer::Outcome(unit::duplicate_answer(
                            &cx, st, now, *class, *attempt, *first,
                        )),
                        Op::Force { mode, reason } => {
                            operate::force(&cx, st, now, *mode, reason, &mut fx);
                            Answer::View(Box::new(unit::view::view(
                                &cx,
                                &meta.name,
                                &meta.settings,
                                st,
                                &mut refs,
                                now,
                            )))
                        }
                        Op::Reset => {
                            operate::reset(&cx, st, &mut refs, now, &mut fx);
                            Answer::View(Box::new(unit::view::view(
                                &cx,
                                &meta.name,
                                &meta.settings,
                                st,
                                &mut refs,
                                now,
                            )))
                        }
                        Op::Merge { target, groups } => {
                            let local = codec::decode(&cx, target, 1);
                            unit::merge::merge(&cx, st, &local, now, &mut fx);
                            for (g, rec) in groups {
                                if let Some(r) = refs
                                    .iter_mut()
                                    .zip(&meta.settings.groups)
                                    .find(|(_, gi)| *gi == g)
                                {
                                    let lg = codec::decode_group(rec, r.0.config, now, false);
                                    unit::merge::merge_group(r.0.state, &lg);
                                }
                            }
                            Answer::View(Box::new(unit::view::view(
                                &cx,
                                &meta.name,
                                &meta.settings,
                                st,
                                &mut refs,
                                now,
                            )))
                        }
                    }
                };
                for (g, s) in taken {
                    if let Some(c) = cached_groups.get_mut(&g) {
                        c.st = s;
                    }
                }
                durable |= fx.durable;
                if let Some(limit) = fx.adaptive_limit {
                    adapted.push((ji, limit));
                }
                for k in fx.events {
                    if let EventKind::BreakerTransition { from, to, .. } = k {
                        transitions.push((ji, from, to));
                    }
                    events.push(stream::encode(now, &meta.name, k));
                }
                answers.push(answer);
            }
            // Commit: every key read, with its version; new records where changed.
            let mut expected = Vec::with_capacity(state_keys.len());
            let mut records: Vec<Vec<u8>> = Vec::with_capacity(state_keys.len());
            for m in &metas {
                let c = &cache.targets[&m.name];
                let rec = codec::encode(&m.cx(), &c.st).encode_to_vec();
                expected.push(c.version);
                records.push(if rec == c.record { Vec::new() } else { rec });
            }
            for g in &groups {
                let c = &cache.groups[g];
                let rec = codec::encode_group(&c.st).encode_to_vec();
                expected.push(c.version);
                records.push(if rec == c.record { Vec::new() } else { rec });
            }
            let in_script = matches!(self.cluster.redis, crate::config::RedisTarget::Url(_));
            let result = self
                .commit(
                    &state_keys,
                    &expected,
                    &records,
                    &settled,
                    &events,
                    in_script,
                )
                .await;
            match result {
                Ok(Committed::Ok(versions)) => {
                    for (i, m) in metas.iter().enumerate() {
                        if let Some(c) = cache.targets.get_mut(&m.name) {
                            c.version = versions[i];
                            if !records[i].is_empty() {
                                c.record = std::mem::take(&mut records[i]);
                            }
                        }
                    }
                    for (k, g) in groups.iter().enumerate() {
                        let i = metas.len() + k;
                        if let Some(c) = cache.groups.get_mut(g) {
                            c.version = versions[i];
                            if !records[i].is_empty() {
                                c.record = std::mem::take(&mut records[i]);
                            }
                        }
                    }
                    drop(cache);
                    if !in_script && !events.is_empty() {
                        self.xadd(events).await;
                    }
                    // A transition a client is told about is on enough Redis
                    // replicas first (min_replicas_acked). It is committed
                    // either way: a shortfall is counted, not refused.
                    if durable {
                        let _ = self.wait_replicas().await;
                    }
                    for (ji, from, to) in transitions {
                        self.metrics.transition(&jobs[ji].meta.metrics, from, to);
                    }
                    for (ji, limit) in adapted {
                        self.metrics
                            .set_adaptive_limit(&jobs[ji].meta.metrics, limit);
                    }
                    for m in metas
                        .iter()
                        .filter(|m| !m.indexed.swap(true, Ordering::Relaxed))
                    {
                        self.index(m);
                    }
                    deliver(jobs, answers, now, &config);
                    return;
                }
                Ok(Committed::Conflict(current)) => {
                    // Another replica decided first: decide again on its state.
                    for (i, (v, rec)) in current.into_iter().enumerate() {
                        if i < metas.len() {
                            let c = self.decode_target(&metas[i], v, rec);
                            cache.targets.insert(metas[i].name.clone(), c);
                        } else {
                            let gi = groups[i - metas.len()];
                            cache.groups.insert(gi, self.decode_group(gi, v, rec, now));
                        }
                    }
                }
                Ok(Committed::Duplicates(dups)) => {
                    // Those permits were settled already: they become
                    // duplicates (answered on the current state, like the
                    // embedded backend does), and the batch is decided again
                    // on fresh state.
                    for (k, a) in dups {
                        let job = &mut jobs[settled[k].0];
                        if let Op::Record { args, .. } = &job.op {
                            job.op = Op::Duplicate {
                                class: args.args.class,
                                attempt: args.args.attempt,
                                first: decode_answer(&a),
                            };
                        }
                    }
                    cache.targets.clear();
                    cache.groups.clear();
                }
                Err(e) => {
                    // Back to the last committed records, not forgotten:
                    // if Redis is gone for good, degraded mode seeds from
                    // them (a forgotten cache made the fallback forget open
                    // breakers and disabled keys; chaos soak --cluster). If
                    // the commit did apply after all, the version check
                    // on the next batch reads the newer state.
                    for m in &metas {
                        if let Some(c) = cache.targets.get(&m.name) {
                            let c = self.decode_target(m, c.version, c.record.clone());
                            cache.targets.insert(m.name.clone(), c);
                        }
                    }
                    for &g in &groups {
                        if let Some(c) = cache.groups.get(&g) {
                            let c = self.decode_group(g, c.version, c.record.clone(), now);
                            cache.groups.insert(g, c);
                        }
                    }
                    return fail_all(jobs, e);
                }
            }
        }
        cache.targets.clear();
        cache.groups.clear();
        for j in jobs {
            let _ = j.reply.send(Err(Fail::Engine(EngineError::Unavailable(
                "the decision could not be committed: too much contention on this target in Redis; retry".into(),
            ))));
        }
    }

    /// Runs the COMMIT script.
    async fn commit(
        &self,
        state_keys: &[String],
        expected: &[u64],
        records: &[Vec<u8>],
        settled: &[(usize, String, Vec<u8>, u64)],
        events: &[Vec<u8>],
        in_script: bool,
    ) -> std::result::Result<Committed, LinkError> {
        let n = state_keys.len();
        let stream = self.keys.events();
        let started = std::time::Instant::now();
        let vals: Vec<Value> = self
            .link
            .call(|mut c| async move {
                let mut inv = scripts::COMMIT.prepare_invoke();
                for k in state_keys {
                    inv.key(k);
                }
                for (_, k, _, _) in settled {
                    inv.key(k);
                }
                if in_script {
                    inv.key(&stream);
                }
                inv.arg(n)
                    .arg(settled.len())
                    .arg(if in_script { "1" } else { "0" })
                    .arg(STATE_TTL.as_millis() as u64)
                    .arg(STREAM_MAXLEN);
                for v in expected {
                    inv.arg(*v);
                }
                for r in records {
                    inv.arg(r.as_slice());
                }
                for (_, _, a, ttl) in settled {
                    inv.arg(a.as_slice()).arg(*ttl);
                }
                let evs: &[Vec<u8>] = if in_script { events } else { &[] };
                inv.arg(evs.len());
                for e in evs {
                    inv.arg(e.as_slice());
                }
                inv.invoke_async(&mut c).await
            })
            .await?;
        self.metrics.redis_round_trip(started.elapsed());
        parse_commit(&vals, n, settled.len()).map_err(LinkError::Redis)
    }

    /// Appends events to the stream outside the commit (Redis Cluster: the
    /// stream lives in another slot than the unit).
    async fn xadd(&self, events: Vec<Vec<u8>>) {
        let key = self.keys.events();
        let _ = self
            .link
            .call(|mut c| async move {
                let mut p = redis::pipe();
                for e in &events {
                    p.cmd("XADD")
                        .arg(&key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(STREAM_MAXLEN)
                        .arg("*")
                        .arg("e")
                        .arg(e.as_slice())
                        .ignore();
                }
                p.query_async::<()>(&mut c).await
            })
            .await;
    }

    /// Remembers a target in the cluster's index (listing, NOT_FOUND checks).
    fn index(self: &Arc<Self>, meta: &Meta) {
        let key = self.keys.index();
        let name = meta.name.to_string();
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me
                .link
                .call(|mut c| async move {
                    redis::cmd("SADD")
                        .arg(&key)
                        .arg(&name)
                        .query_async::<Value>(&mut c)
                        .await
                })
                .await;
        });
    }

    /// A target's state as Redis has it now, with time applied (not written).
    async fn read_state(&self, meta: &Meta) -> Result<(TargetState, Vec<GroupState>)> {
        let tag = &meta.tag;
        let mut keys = vec![self.keys.state(tag, &meta.name)];
        keys.extend(
            meta.settings
                .groups
                .iter()
                .map(|&g| self.keys.group(tag, &self.config.load().groups[g].name)),
        );
        keys.push(self.keys.counts(tag, &meta.name));
        let counts_key = keys.pop().unwrap_or_default();
        let now = self.clock.now();
        let vals = match self.read(keys).await {
            Ok(v) => v,
            Err(e) => {
                // Unreachable: the degraded view of this replica.
                let fallback = self
                    .fallback
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                return match fallback.view(&meta.name) {
                    Ok(_) => Err(EngineError::Unavailable(format!(
                        "Redis is unreachable ({e}); GetTarget shows shared state only"
                    ))),
                    Err(err) => Err(err),
                };
            }
        };
        let mut it = vals.into_iter();
        let (v, rec) = it.next().unwrap_or_default();
        let mut st = self.decode_target(meta, v, rec).st;
        let groups = meta
            .settings
            .groups
            .iter()
            .zip(it)
            .map(|(&g, (v, rec))| self.decode_group(g, v, rec, now).st)
            .collect();
        let extra: Option<u64> = self
            .link
            .call(|mut c| async move {
                redis::cmd("HGET")
                    .arg(&counts_key)
                    .arg("refused")
                    .query_async(&mut c)
                    .await
            })
            .await
            .ok()
            .flatten();
        st.counters.refused += extra.unwrap_or(0) + meta.refused_delta.load(Ordering::Relaxed);
        let mut fx = Effects::default();
        operate::tick(&meta.cx(), &mut st, now, &mut fx);
        Ok((st, groups))
    }

    async fn read_view(&self, meta: &Meta) -> Result<TargetView> {
        let (mut st, mut groups) = self.read_state(meta).await?;
        let now = self.clock.now();
        // What time did (an open period ended, probe leases ran out), on
        // this copy: the next decision applies and commits it.
        operate::tick(&meta.cx(), &mut st, now, &mut Effects::default());
        let config = self.config.load_full();
        let mut refs: Vec<GroupRef<'_>> = meta
            .settings
            .groups
            .iter()
            .zip(groups.iter_mut())
            .map(|(&g, s)| GroupRef {
                name: &config.groups[g].name,
                config: &config.groups[g].budget,
                state: s,
            })
            .collect();
        Ok(unit::view::view(
            &meta.cx(),
            &meta.name,
            &meta.settings,
            &mut st,
            &mut refs,
            now,
        ))
    }

    async fn operate(self: &Arc<Self>, meta: Arc<Meta>, op: Op) -> Result<TargetView> {
        meta.forget_refusal();
        match self.submit(meta.clone(), op).await {
            Ok(Answer::View(v)) => Ok(*v),
            Ok(_) => Err(EngineError::Unavailable("unexpected answer".into())),
            Err(Fail::Engine(e)) => Err(e),
            Err(Fail::Link(e)) => Err(EngineError::Unavailable(format!(
                "the override could not be applied fleet-wide: {e}; retry when Redis is reachable"
            ))),
        }
    }

    /// Decides an admission without Redis, per `on_redis_unavailable`.
    async fn degraded_admit(
        &self,
        meta: &Meta,
        args: &AdmitArgs<'_>,
        e: LinkError,
    ) -> Result<Admission> {
        self.metrics.redis_error(e.kind());
        match self.cluster.on_redis_unavailable {
            OnRedisUnavailable::Closed => Err(EngineError::Unavailable(format!(
                "Redis is unreachable ({e}) and [cluster] on_redis_unavailable = \"closed\""
            ))),
            OnRedisUnavailable::Open => Ok(Admission {
                allowed: true,
                reason: Reason::Allowed,
                state: BreakerState::Closed,
                retry_after: None,
                permit: None,
                token: String::new(),
                key_slot: meta.settings.keys.first().cloned(),
                shadow_reason: None,
                degraded: true,
            }),
            OnRedisUnavailable::Local => {
                self.ensure_degraded(&e.to_string()).await;
                self.fallback_admit(meta, args).await
            }
        }
    }

    /// True while this target's decisions must stay on the fallback: it was
    /// decided there during this outage and is not merged back yet. Until
    /// it is, Redis holds none of what the fallback decided (an open breaker
    /// would be half-open there and hand out probes). Takes the set's lock
    /// only while degraded, never on the normal path.
    fn awaiting_merge(&self, name: &str) -> bool {
        self.degraded.load(Ordering::Acquire)
            && self
                .degraded_targets
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(name)
    }

    fn fallback_now(&self, meta: &Meta) -> Arc<LocalBackend> {
        self.degraded_targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(meta.name.clone());
        let fallback = self
            .fallback
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(until) = meta.heard_open_until(self.clock.now()) {
            fallback.learn_open(&meta.name, until);
        }
        fallback
    }

    /// An admission decided by this replica alone (degraded).
    async fn fallback_admit(&self, meta: &Meta, args: &AdmitArgs<'_>) -> Result<Admission> {
        let mut a = self.fallback_now(meta).admit(&meta.name, args).await?;
        a.degraded = true;
        Ok(a)
    }

    /// An outcome taken in by this replica alone (degraded).
    async fn fallback_record(
        &self,
        meta: &Meta,
        args: OutcomeArgs<'_>,
        rand01: f64,
    ) -> Result<OutcomeResult> {
        let mut r = self
            .fallback_now(meta)
            .record(&meta.name, args, rand01)
            .await?;
        r.degraded = true;
        Ok(r)
    }

    async fn degraded_record(
        &self,
        meta: &Meta,
        args: OutcomeArgs<'_>,
        rand01: f64,
        e: LinkError,
    ) -> Result<OutcomeResult> {
        self.metrics.redis_error(e.kind());
        match self.cluster.on_redis_unavailable {
            OnRedisUnavailable::Closed => Err(EngineError::Unavailable(format!(
                "Redis is unreachable ({e}) and [cluster] on_redis_unavailable = \"closed\""
            ))),
            _ => {
                self.ensure_degraded(&e.to_string()).await;
                self.fallback_record(meta, args, rand01).await
            }
        }
    }
}

fn fail_all(jobs: Vec<Job>, e: LinkError) {
    for j in jobs {
        let _ = j.reply.send(Err(Fail::Link(e.clone())));
    }
}

fn deliver(jobs: Vec<Job>, answers: Vec<Answer>, now: Time, config: &Config) {
    for (job, answer) in jobs.into_iter().zip(answers) {
        match &answer {
            Answer::Admission(a) => {
                let asked = match &job.op {
                    Op::Admit {
                        estimated_tokens,
                        attempt,
                        priority,
                        ..
                    } => (!job.meta.holds_back(*priority, config)).then_some((
                        *estimated_tokens,
                        *attempt,
                        *priority,
                    )),
                    _ => None,
                };
                job.meta.remember_refusal(now, a, asked);
                job.meta.metrics.decision(
                    a.shadow_reason.unwrap_or(a.reason),
                    match &job.op {
                        Op::Admit { attempt, .. } => *attempt,
                        _ => 0,
                    },
                );
            }
            Answer::Outcome(r) => {
                if let Op::Record { args, .. } = &job.op {
                    job.meta.metrics.outcome(
                        r.classified_as,
                        args.args.latency,
                        r.cost_micros,
                        args.args.caller,
                    );
                }
            }
            Answer::View(_) => {}
        }
        let _ = job.reply.send(Ok(answer));
    }
}

#[cfg(test)]
mod degraded_tests {
    use super::*;

    #[test]
    fn a_degraded_replica_gets_its_share_of_budgets_and_probes() {
        let c = Config::parse(
            "[targets.t]\nrequests_per_minute = 100\ncost_per_mtok_input = 1.0\nspend_per_day = 10.0\nbreaker = { half_open_max_probes = 4 }\n[targets.one]\nbreaker = { half_open_max_probes = 1 }\n",
            "t.toml",
        )
        .expect("valid");
        let d = degraded_config(&c, 2);
        let t = d.target("t");
        assert_eq!(
            t.budget
                .rate(crate::domain::budget::Kind::Requests)
                .map(|r| r.amount),
            Some(50)
        );
        assert_eq!(
            t.breaker.half_open_max_probes, 2,
            "4 probes shared by 2 replicas"
        );
        assert_eq!(
            t.budget.spend.map(|r| r.amount),
            Some(5_000_000),
            "$10 a day shared by 2 replicas"
        );
        assert_eq!(
            d.target("one").breaker.half_open_max_probes,
            1,
            "never below one"
        );
        assert_eq!(
            degraded_config(&c, 1)
                .target("t")
                .breaker
                .half_open_max_probes,
            4
        );
    }
}
