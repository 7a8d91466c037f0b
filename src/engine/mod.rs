//! The engine: owns every target's state, decides concurrently, publishes
//! events and makes durable what must survive a restart.
//!
//! # Concurrency
//! Targets live in a sharded map ([`DashMap`]); a lookup read-locks one shard
//! briefly, then the decision locks only that target's mutex (and the budget
//! groups it draws on, always in index order, so two decisions can never
//! deadlock). No lock is held across an await, and the decision path does no
//! I/O: when a decision changes durable state (a breaker transition, a pause,
//! a disabled key), the answer waits for the store *after* the lock is
//! released, so a client is never told about a transition that a crash could
//! forget.

pub mod clock;
pub mod error;
pub mod events;
pub mod metrics;
pub mod permit;
pub mod persist;
pub mod queue;
mod settled;
pub mod store;
mod target;
pub mod watch;

pub use error::{EngineError, Result};
pub use target::{Admission, AdmitArgs, Counters, Learned, OutcomeResult, Target};

use crate::config::{
    Config, MAX_ROUTE_LEN, MAX_TARGET_LEN, Permitless, RouteSettings, TargetSettings,
};
use crate::domain::breaker::{BreakerState, Mode};
use crate::domain::budget::{BudgetState, Kind};
use crate::domain::headers::parse_headers;
use crate::domain::taxonomy::classify;
use crate::domain::{OutcomeClass, Time};
use clock::Clock;
use dashmap::DashMap;
use error::invalid;
use events::{EventBus, EventKind};
use metrics::Metrics;
use permit::{PermitError, PermitKey};
use persist::Persister;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{Op, Store, StoreError};
use target::{Effects, Group, OutcomeArgs, SettledAnswer, TargetState, Trust};

/// Why a call was admitted or refused (mirrors `backstop.v1.Reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Allowed,
    CircuitOpen,
    ProbeLimit,
    ForcedOpen,
    RateLimited,
    ConcurrencyLimit,
    RetryBudgetExhausted,
    KeySlotsUnavailable,
    RequestTooLarge,
    Excluded,
    ContextTooSmall,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::Allowed,
        Reason::CircuitOpen,
        Reason::ProbeLimit,
        Reason::ForcedOpen,
        Reason::RateLimited,
        Reason::ConcurrencyLimit,
        Reason::RetryBudgetExhausted,
        Reason::KeySlotsUnavailable,
        Reason::RequestTooLarge,
        Reason::Excluded,
        Reason::ContextTooSmall,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Allowed => "allowed",
            Reason::CircuitOpen => "circuit_open",
            Reason::ProbeLimit => "probe_limit",
            Reason::ForcedOpen => "forced_open",
            Reason::RateLimited => "rate_limited",
            Reason::ConcurrencyLimit => "concurrency_limit",
            Reason::RetryBudgetExhausted => "retry_budget_exhausted",
            Reason::KeySlotsUnavailable => "key_slots_unavailable",
            Reason::RequestTooLarge => "request_too_large",
            Reason::Excluded => "excluded",
            Reason::ContextTooSmall => "context_too_small",
        }
    }
}

/// An outcome report, as received.
#[derive(Clone, Debug, Default)]
pub struct OutcomeReport<'a> {
    pub permit: &'a str,
    /// None = let the server classify.
    pub class: Option<OutcomeClass>,
    pub http_status: i32,
    pub error_type: &'a str,
    pub latency: Option<Duration>,
    pub retry_after: Option<Duration>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub attempt: u32,
    pub headers: Vec<(&'a str, &'a str)>,
    pub key_slot: &'a str,
    pub caller: &'a str,
}

/// A route request, as received.
#[derive(Clone, Debug, Default)]
pub struct RouteQuery<'a> {
    pub route: &'a str,
    pub candidates: &'a [String],
    pub estimated_tokens: u64,
    pub required_context_tokens: u64,
    pub exclude: &'a [String],
    pub caller: &'a str,
    pub attempt: u32,
}

/// A candidate Route passed over.
#[derive(Clone, Debug, PartialEq)]
pub struct Skip {
    pub target: Arc<str>,
    pub reason: Reason,
    pub retry_after: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RouteDecision {
    /// The admitted target and its admission; None when every candidate was skipped.
    pub chosen: Option<(Arc<str>, Admission, Arc<TargetSettings>)>,
    pub fallback_depth: u32,
    pub skipped: Vec<Skip>,
    /// When nothing was admitted: the soonest any candidate may be tried.
    pub retry_after: Option<Duration>,
}

/// One budget's size and headroom, for status views.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetView {
    pub kind: &'static str,
    pub limit: u64,
    pub window: Duration,
    pub available: f64,
    pub group: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SlotView {
    pub name: Option<Arc<str>>,
    pub disabled_until: Option<Time>,
    pub disabled_reason: Option<String>,
    pub paused_until: Option<Time>,
    pub budgets: Vec<BudgetView>,
    pub learned: Vec<(Kind, Learned)>,
    pub in_flight: u32,
}

/// Everything known about one target (Admin GetTarget).
#[derive(Clone, Debug, PartialEq)]
pub struct TargetView {
    pub name: Arc<str>,
    pub state: BreakerState,
    pub configured: bool,
    pub open_until: Option<Time>,
    pub opened_at: Option<Time>,
    pub consecutive_failures: u32,
    pub half_open_successes: u32,
    pub probes_outstanding: u32,
    pub reopen_count: u32,
    pub generation: u64,
    pub counters: Counters,
    pub window_calls: u64,
    pub window_failures: u64,
    pub settings: Arc<TargetSettings>,
    pub slots: Vec<SlotView>,
    pub forced_reason: Option<String>,
    pub last_cause: Option<String>,
    pub in_flight: u32,
    pub groups: Vec<BudgetView>,
    /// Names of the budget groups the target draws on, in config order.
    pub group_names: Vec<Arc<str>>,
}

/// One line of a target listing.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetSummary {
    pub name: Arc<str>,
    pub state: BreakerState,
    pub configured: bool,
    pub open_until: Option<Time>,
    pub consecutive_failures: u32,
}

/// A page of targets (Admin ListTargets).
#[derive(Clone, Debug, PartialEq)]
pub struct TargetPage {
    pub targets: Vec<TargetSummary>,
    pub next_page_token: String,
    pub total: u64,
}

/// Tracks which candidate a configured route last served, so fallbacks are
/// published as events when they start and end, not on every request.
struct RouteRuntime {
    settings: Arc<RouteSettings>,
    /// Depth last served (NO_DEPTH = none yet, EXHAUSTED = nothing available):
    /// read without a lock on every Route; the lock is taken only on a change.
    last: AtomicU32,
    publish: Mutex<()>,
    metrics: metrics::RouteMetrics,
}

const NO_DEPTH: u32 = u32::MAX - 1;
/// The route name ad-hoc candidate lists are reported under.
const ADHOC_ROUTE: &str = "_adhoc";
const EXHAUSTED: u32 = u32::MAX;

pub struct Engine {
    config: Arc<Config>,
    clock: Arc<dyn Clock>,
    targets: DashMap<Arc<str>, Arc<Target>>,
    created: AtomicUsize,
    groups: Box<[Group]>,
    routes: HashMap<String, RouteRuntime>,
    events: Arc<EventBus>,
    /// None in ephemeral mode.
    persister: Option<Persister>,
    metrics: Arc<Metrics>,
    /// Route metrics of ad-hoc candidate lists (`route="_adhoc"`).
    adhoc_route_metrics: metrics::RouteMetrics,
    /// Live event subscribers (bounded by `[events] max_subscribers`).
    subscribers: AtomicUsize,
    /// Flips to true when the server starts draining: live streams end.
    shutdown: tokio::sync::watch::Sender<bool>,
    /// Signs and verifies permits (see permit.rs).
    permit_key: PermitKey,
    /// When this process started: a permit issued before it is "late" (its
    /// lease and reservation died with the previous process).
    boot: Time,
    queues: queue::Queues,
    /// One snapshot shared by watchers that ask at about the same time.
    snapshot_cache: Mutex<watch::SnapshotCache>,
}

/// What startup restored from the store.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadReport {
    pub targets: usize,
    /// Targets whose breaker came back not closed (open, half-open, forced).
    pub not_closed: usize,
    /// Saved targets no longer in the config.
    pub dropped: usize,
    pub items: usize,
    pub dead: usize,
    pub elapsed: Duration,
}

/// Logs ignored provider headers at most once a second: a misbehaving proxy
/// sends the same nonsense on every response, and a log line per outcome
/// would be synchronous I/O on the decision path.
fn warn_rate_limited(target: &str, warnings: &[String]) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if now > last
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        tracing::warn!(
            target_name = target,
            ?warnings,
            suppressed,
            "provider headers partly ignored"
        );
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a reset did, recorded as the target's last cause (and shown in GetTarget).
pub const RESET_CAUSE: &str = "operator reset: breaker closed, budgets refilled (the target's and its groups'), pauses and disabled keys cleared";

/// Most targets one write-behind flush writes (bounds its memory and I/O; a
/// backlog drains over the following flushes).
pub const MAX_FLUSH: usize = 20_000;

/// Checks a target name from a client.
pub fn validate_target(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(invalid(
            "target is empty; name the provider/model, e.g. \"anthropic/claude-sonnet\"",
        ));
    }
    if name.len() > MAX_TARGET_LEN {
        return Err(invalid(format!(
            "target is {} bytes; the maximum is {MAX_TARGET_LEN}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("target contains control characters"));
    }
    Ok(())
}

impl Engine {
    /// An engine over `config`, with every configured target created up front.
    pub fn new(config: Arc<Config>, clock: Arc<dyn Clock>) -> Engine {
        let groups = config
            .groups
            .iter()
            .map(|g| Group {
                name: g.name.clone(),
                config: g.budget.clone(),
                state: Mutex::new(BudgetState::default()),
                limited: AtomicBool::new(false),
            })
            .collect();
        let metrics = Arc::new(Metrics::new(
            config.telemetry.max_target_labels,
            config.telemetry.latency_buckets.clone(),
        ));
        let routes = config
            .routes
            .iter()
            .map(|(name, r)| {
                (
                    name.clone(),
                    RouteRuntime {
                        settings: r.clone(),
                        last: AtomicU32::new(NO_DEPTH),
                        publish: Mutex::new(()),
                        metrics: metrics.for_route(name, r.targets.len()),
                    },
                )
            })
            .collect();
        let engine = Engine {
            targets: DashMap::new(),
            created: AtomicUsize::new(0),
            groups,
            routes,
            events: Arc::new(EventBus::starting_at(
                clock.now().as_nanos() / 1000,
                config.events.ring_size,
                config.events.subscriber_buffer,
            )),
            adhoc_route_metrics: metrics.for_route(ADHOC_ROUTE, MAX_ROUTE_LEN),
            metrics,
            subscribers: AtomicUsize::new(0),
            shutdown: tokio::sync::watch::Sender::new(false),
            permit_key: PermitKey::new(
                config
                    .server
                    .permit_key
                    .as_deref()
                    .map(str::as_bytes)
                    .map(<[u8]>::to_vec)
                    .or_else(PermitKey::generate_secret)
                    .unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec())
                    .as_slice(),
            ),
            boot: clock.now(),
            persister: None,
            queues: queue::Queues::default(),
            snapshot_cache: Mutex::default(),
            clock,
            config,
        };
        for (name, settings) in &engine.config.targets {
            engine.insert_target(Arc::from(name.as_str()), settings.clone());
        }
        // Route members exist from the start (so GetTarget and dashboards see
        // them before their first call); they do not count towards max_targets.
        let members: Vec<Arc<str>> = engine
            .config
            .routes
            .values()
            .flat_map(|r| r.targets.iter().cloned())
            .collect();
        for name in members {
            if !engine.targets.contains_key(name.as_ref()) {
                engine.insert_target(name, engine.config.default_target.clone());
            }
        }
        engine
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    pub fn now(&self) -> Time {
        self.clock.now()
    }

    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Number of targets held.
    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    fn insert_target(&self, name: Arc<str>, settings: Arc<TargetSettings>) -> Arc<Target> {
        let t = Arc::new(Target::new(
            name.clone(),
            settings,
            self.metrics.for_target(&name),
            target::first_permit_id(self.boot),
        ));
        self.targets.insert(name, t.clone());
        t
    }

    /// The target, created with default settings on first use (up to `max_targets`).
    pub fn target(&self, name: &str) -> Result<Arc<Target>> {
        if let Some(t) = self.targets.get(name) {
            return Ok(t.clone());
        }
        validate_target(name)?;
        let max = self.config.server.max_targets;
        if self.created.load(Ordering::Relaxed) >= max {
            return Err(EngineError::ResourceExhausted(format!(
                "target {name:?} is unknown and the server already tracks the maximum of {max} targets created on first use; \
                 declare it in the config file or raise [server] max_targets"
            )));
        }
        // One allocation of the name, shared by the map key and the target.
        let key: Arc<str> = Arc::from(name);
        let entry = self.targets.entry(key.clone());
        let t = entry.or_insert_with(|| {
            self.created.fetch_add(1, Ordering::Relaxed);
            Arc::new(Target::new(
                key,
                self.config.default_target.clone(),
                self.metrics.for_target(name),
                target::first_permit_id(self.boot),
            ))
        });
        Ok(t.clone())
    }

    /// An existing target, without creating it.
    pub fn existing(&self, name: &str) -> Result<Arc<Target>> {
        validate_target(name)?;
        self.targets.get(name).map(|t| t.clone()).ok_or_else(|| {
            EngineError::NotFound(format!(
                "target {name:?} is not configured and has not been used yet"
            ))
        })
    }

    /// Ends a critical section (the target is still locked): publishes its
    /// events and, if durable state changed, queues a snapshot for the store.
    /// Snapshots are queued under the lock so they reach the store in order.
    fn finish(&self, now: Time, target: &Target, st: &TargetState, fx: &mut Effects) {
        for kind in &fx.events {
            if let EventKind::BreakerTransition { from, to, .. } = kind {
                self.metrics.transition(&target.metrics, *from, *to);
            }
        }
        let Some(p) = &self.persister else {
            for kind in fx.events.drain(..) {
                self.events.publish(now, &target.name, kind);
            }
            return;
        };
        let pending_events = |fx: &mut Effects| -> Vec<persist::PendingEvent> {
            fx.events
                .drain(..)
                .map(|k| (now, target.name.clone(), k))
                .collect()
        };
        if fx.durable {
            let record = Op::Target(target.name.clone(), Some(target.to_record(st)));
            let (pending, seq) = p.write(vec![record], pending_events(fx));
            target.durable_seq.store(seq, Ordering::Release);
            fx.pending = Some(pending);
            return;
        }
        let bits = if fx.state_dirty {
            target::DIRTY_STATE | target::DIRTY_COUNTERS
        } else if fx.counted {
            target::DIRTY_COUNTERS
        } else {
            0
        };
        // A load first: most decisions find the bits already set and skip the write.
        if bits != 0 && target.dirty.load(Ordering::Relaxed) & bits != bits {
            target.dirty.fetch_or(bits, Ordering::Relaxed);
        }
        let seq = target.durable_seq.load(Ordering::Acquire);
        if seq > p.committed() {
            // An earlier change of this target is not on disk yet: this answer
            // must not reveal it before it is, and its events queue behind it.
            if !fx.events.is_empty() {
                p.publish_after(pending_events(fx));
            }
            fx.pending = Some(p.wait_for(seq));
        } else {
            for kind in fx.events.drain(..) {
                self.events.publish(now, &target.name, kind);
            }
        }
    }

    /// Waits until the critical section's durable change is on disk, so that a
    /// client is never told about a transition a crash could forget.
    async fn persist(&self, fx: &mut Effects) -> Result<()> {
        match fx.pending.take() {
            None => Ok(()),
            Some(p) => p.wait().await.map_err(|e| {
                EngineError::Unavailable(format!(
                    "the decision could not be made durable, so it was not acknowledged: {e}"
                ))
            }),
        }
    }

    /// Write-behind: queues the state of up to [`MAX_FLUSH`] targets changed
    /// since the last flush (counters, budget levels) and of every budget
    /// group. Called about once a second; what it writes is approximate across
    /// a crash by design. Returns the pending write and how many targets it
    /// covers (call again while that is `MAX_FLUSH` to drain a backlog).
    pub fn flush_dirty(&self) -> (persist::Pending, usize) {
        self.flush(target::DIRTY_STATE)
    }

    /// Queues targets with any of `mask` dirty (see [`Engine::flush_dirty`]).
    fn flush(&self, mask: u8) -> (persist::Pending, usize) {
        let Some(p) = &self.persister else {
            return (persist::Pending::none(), 0);
        };
        let (mut n, mut last) = (0, 0);
        for entry in self.targets.iter() {
            if n >= MAX_FLUSH {
                break;
            }
            let t = entry.value();
            if t.dirty.load(Ordering::Relaxed) & mask != 0
                && t.dirty.swap(0, Ordering::Relaxed) != 0
            {
                // Queued under the target's lock, like durable writes, so a
                // flushed snapshot can never land after a newer one.
                let st = t.lock();
                last = p.write_behind(vec![Op::Target(t.name.clone(), Some(t.to_record(&st)))]);
                n += 1;
            }
        }
        for g in self.groups.iter() {
            let st = g.state.lock().unwrap_or_else(|e| e.into_inner());
            let tats = Kind::ALL
                .iter()
                .map(|k| st.cell(*k).tat().as_nanos())
                .collect();
            last = p.write_behind(vec![Op::Group(
                g.name.clone(),
                Some(store::GroupRecord { tats }),
            )]);
        }
        (p.wait_for(last), n)
    }

    /// Flushes every dirty target (shutdown).
    pub async fn flush_all(&self) -> std::result::Result<(), StoreError> {
        loop {
            let (pending, n) = self.flush(target::DIRTY_STATE | target::DIRTY_COUNTERS);
            pending.wait().await?;
            if n < MAX_FLUSH {
                return Ok(());
            }
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Refreshes the gauges read at scrape time (budget headroom, queue depth)
    /// and returns the Prometheus text exposition.
    pub fn render_metrics(&self) -> String {
        let now = self.clock.now();
        for entry in self.targets.iter() {
            let t = entry.value();
            if t.metrics.label.as_ref() == metrics::OTHER
                || (t.settings.budget.is_unlimited() && t.settings.groups.is_empty())
            {
                continue;
            }
            let st = t.lock();
            for (i, slot) in st.slots.iter().enumerate() {
                for kind in Kind::ALL {
                    if let Some(rate) = t.settings.budget.rate(kind) {
                        let labels = metrics::BudgetLabels {
                            target: t.name.to_string(),
                            key_slot: t.slot_name(i).as_deref().unwrap_or_default().to_string(),
                            kind: kind.as_str().into(),
                        };
                        self.metrics
                            .budget_remaining
                            .get_or_create(&labels)
                            .set(slot.budget.cell(kind).available(now, &rate));
                    }
                }
            }
        }
        for q in self.queue_stats("") {
            self.metrics.set_queue(&q.queue, q.depth, q.oldest_age);
        }
        self.metrics.encode()
    }

    /// Starts draining: live event streams end.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Where state is kept, for logs.
    pub fn store_description(&self) -> &str {
        self.persister
            .as_ref()
            .map_or("memory (ephemeral)", |p| p.describe())
    }

    /// An engine restored from `store`, reconciled with the config: targets
    /// removed from the config are dropped, changed settings apply, open
    /// periods that ran out while down become half-open.
    pub fn open(
        config: Arc<Config>,
        clock: Arc<dyn Clock>,
        store: Box<dyn Store>,
    ) -> std::result::Result<(Engine, LoadReport), StoreError> {
        let started = std::time::Instant::now();
        let loaded = store.load()?;
        let mut engine = Engine::new(config, clock);
        let mut cleanup = Vec::new();
        if engine.config.server.permit_key.is_none() {
            // A generated key is kept, so permits outlive a restart.
            match &loaded.permit_key {
                Some(k) if !k.is_empty() => engine.permit_key = PermitKey::new(k),
                _ => {
                    let secret = PermitKey::generate_secret().ok_or_else(|| {
                        StoreError("the OS could not provide random bytes for a permit key".into())
                    })?;
                    engine.permit_key = PermitKey::new(&secret);
                    cleanup.push(Op::PermitKey(secret));
                }
            }
        }
        let now = engine.clock.now();
        let mut report = LoadReport::default();
        for (name, rec) in loaded.targets {
            let t = if let Some(t) = engine.targets.get(name.as_str()).map(|t| t.clone()) {
                t
            } else if rec.configured {
                // Declared in the config it was saved under, gone from this one.
                report.dropped += 1;
                cleanup.push(Op::Target(Arc::from(name.as_str()), None));
                continue;
            } else {
                match engine.target(&name) {
                    Ok(t) => t,
                    Err(_) => {
                        report.dropped += 1;
                        cleanup.push(Op::Target(Arc::from(name.as_str()), None));
                        continue;
                    }
                }
            };
            let mut st = t.lock();
            t.restore(&mut st, &rec, now);
            engine.metrics.set_state(&t.metrics, st.breaker.state());
            report.targets += 1;
            if st.breaker.state() != BreakerState::Closed {
                report.not_closed += 1;
            }
        }
        for (name, rec) in loaded.groups {
            match engine.groups.iter().find(|g| g.name.as_ref() == name) {
                Some(g) => {
                    let mut st = g.state.lock().unwrap_or_else(|e| e.into_inner());
                    for (k, tat) in Kind::ALL.iter().zip(&rec.tats) {
                        st.set_cell(
                            *k,
                            crate::domain::budget::Gcra::from_tat(Time::from_nanos(*tat)),
                        );
                    }
                    st.clamp_debt(now, &g.config);
                }
                None => cleanup.push(Op::Group(Arc::from(name.as_str()), None)),
            }
        }
        report.items = loaded.items.len();
        report.dead = loaded.dead.len();
        let (qs, idem_ops) = queue::QueueState::load(
            loaded.items,
            loaded.dead,
            loaded.idem,
            loaded.next_item_id,
            now,
        );
        cleanup.extend(idem_ops);
        *engine.queues_state() = qs;
        store.commit(&cleanup)?;
        engine.persister = Some(Persister::start(store, engine.events.clone()));
        report.elapsed = started.elapsed();
        Ok((engine, report))
    }

    fn queues_state(&self) -> std::sync::MutexGuard<'_, queue::QueueState> {
        self.queues.state_lock()
    }

    fn admit_locked(
        &self,
        target: &Arc<Target>,
        args: &AdmitArgs<'_>,
        fx: &mut Effects,
    ) -> Admission {
        let mut st = target.lock();
        let now = self.clock.now();
        let mut adm = target.admit(&mut st, &self.groups, now, args, fx);
        if let Some(p) = &adm.permit {
            adm.token = self.permit_key.sign(&target.name, p);
        }
        if matches!(adm.reason, Reason::RateLimited | Reason::ConcurrencyLimit) {
            // Budget and pause refusals are clamped like the pauses themselves.
            adm.retry_after = adm.retry_after.map(|d| d.min(self.config.server.max_pause));
        }
        self.finish(now, target, &st, fx);
        drop(st);
        target
            .metrics
            .decision(adm.shadow_reason.unwrap_or(adm.reason), args.attempt);
        adm
    }

    /// May a call go to `target` now? Admission reserves what it needs.
    pub async fn can_proceed(&self, target: &str, args: AdmitArgs<'_>) -> Result<Admission> {
        let t = self.target(target)?;
        let mut fx = Effects::default();
        let adm = self.admit_locked(&t, &args, &mut fx);
        self.persist(&mut fx).await?;
        Ok(adm)
    }

    /// Applies an outcome: classification, provider signals, breaker, budgets, retry advice.
    pub async fn record_outcome(
        &self,
        target: &str,
        report: OutcomeReport<'_>,
    ) -> Result<OutcomeResult> {
        let t = self.target(target)?;
        let class = classify(report.class, report.http_status, report.error_type)
            .map_err(|e| invalid(e.to_string()))?;
        let permit = if report.permit.is_empty() {
            if self.config.server.outcomes_without_permit == Permitless::Reject {
                return Err(invalid(
                    "this server requires the permit from CanProceed / Route with every outcome \
                     ([server] outcomes_without_permit = \"reject\")",
                ));
            }
            None
        } else {
            let p = self
                .permit_key
                .verify(&t.name, t.tag(), report.permit)
                .map_err(|e| match e {
                    PermitError::WrongTarget => invalid(format!(
                        "permit was issued for a different target than {target:?}; report the outcome with the target the permit came from"
                    )),
                    e => invalid(e.to_string()),
                })?;
            Some(p)
        };
        let slot = match (permit, report.key_slot) {
            (Some(p), "") => usize::from(p.slot),
            (_, "") => 0,
            (_, name) => t.slot_index(name).ok_or_else(|| {
                invalid(format!(
                    "unknown key slot {name:?} for target {target:?}; its slots are {:?}",
                    t.settings.keys
                ))
            })?,
        };
        if slot >= t.settings.keys.len().max(1) {
            return Err(invalid("permit names a key slot this target does not have"));
        }
        let server = &self.config.server;
        if report.headers.len() > server.max_headers {
            return Err(invalid(format!(
                "{} headers; at most {} are accepted (send the provider's response headers only)",
                report.headers.len(),
                server.max_headers
            )));
        }
        let bytes: usize = report.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > server.max_header_bytes {
            return Err(invalid(format!(
                "headers total {bytes} bytes; at most {} are accepted",
                server.max_header_bytes
            )));
        }
        let now = self.clock.now();
        let signals = parse_headers(report.headers.iter().copied(), now, server.max_pause);
        if !signals.warnings.is_empty() {
            warn_rate_limited(target, &signals.warnings);
        }
        // Late: issued before this process started (its lease and
        // reservation are gone), or past its lifetime (reclaimed).
        let trust = match permit {
            None => Trust::None,
            Some(p) if p.issued_ms < self.boot.as_millis() || p.expires_ms < now.as_millis() => {
                Trust::Late(p)
            }
            Some(p) => Trust::Permit(p),
        };
        let mut args = OutcomeArgs {
            trust,
            trust_permitless: self.config.server.outcomes_without_permit == Permitless::Trusted,
            class,
            signals,
            max_pause: server.max_pause,
            http_status: report.http_status,
            error_type: report.error_type,
            slot,
            latency: report.latency,
            retry_after: report.retry_after,
            input_tokens: report.input_tokens,
            output_tokens: report.output_tokens,
            attempt: report.attempt,
            caller: report.caller,
        };
        let mut fx = Effects::default();
        let mut duplicate = None;
        let result = {
            let mut st = t.lock();
            let now = self.clock.now();
            // Settle once: the first report of a permit counts; a duplicate
            // (a retried call, a replay) changes nothing and gets the first answer.
            if let Trust::Permit(p) = args.trust {
                let lifetime = t.permit_lifetime();
                let issued = Time::from_millis(p.issued_ms);
                match st
                    .settled
                    .get_or_insert_with(Default::default)
                    .settle(p.id, issued, now, lifetime)
                {
                    settled::Seen::First => {}
                    settled::Seen::Again(first) => {
                        duplicate =
                            Some(t.duplicate_answer(&st, now, class, report.attempt, first));
                    }
                    settled::Seen::Forgotten => args.trust = Trust::Late(p),
                }
            }
            if let Some(d) = duplicate {
                d
            } else {
                let r = t.record(&mut st, &self.groups, now, &args, &mut fx);
                if let (Trust::Permit(p), Some(log)) = (args.trust, st.settled.as_mut()) {
                    log.answered(
                        p.id,
                        SettledAnswer {
                            class: r.classified_as,
                            advice: r.advice,
                        },
                    );
                }
                t.metrics.outcome(class, report.latency);
                self.finish(now, &t, &st, &mut fx);
                r
            }
        };
        if result.duplicate {
            return self.wait_visible(&t, result).await;
        }
        self.persist(&mut fx).await?;
        Ok(result)
    }

    /// Answers a duplicate report only once the state it reflects is durable
    /// (the first report's transition may still be on its way to disk).
    async fn wait_visible(&self, t: &Target, r: OutcomeResult) -> Result<OutcomeResult> {
        if let Some(p) = &self.persister {
            let seq = t.durable_seq.load(Ordering::Acquire);
            let mut fx = Effects {
                pending: Some(p.wait_for(seq)),
                ..Effects::default()
            };
            self.persist(&mut fx).await?;
        }
        Ok(r)
    }

    /// Picks the first admissible candidate of a route and admits it.
    pub async fn route(&self, q: RouteQuery<'_>) -> Result<RouteDecision> {
        let (name, list): (Arc<str>, Vec<Arc<str>>) = match (
            q.route.is_empty(),
            q.candidates.is_empty(),
        ) {
            (false, true) => {
                let r = self.routes.get(q.route).ok_or_else(|| {
                    let mut known: Vec<&String> = self.routes.keys().collect();
                    known.sort();
                    EngineError::NotFound(format!(
                        "route {:?} is not configured; configured routes: {known:?}",
                        q.route
                    ))
                })?;
                (r.settings.name.clone(), r.settings.targets.clone())
            }
            (true, false) => {
                if q.candidates.len() > MAX_ROUTE_LEN {
                    return Err(invalid(format!(
                        "{} candidates; at most {MAX_ROUTE_LEN} are accepted",
                        q.candidates.len()
                    )));
                }
                for c in q.candidates {
                    validate_target(c)?;
                }
                (
                    Arc::from(ADHOC_ROUTE),
                    q.candidates.iter().map(|c| Arc::from(c.as_str())).collect(),
                )
            }
            (false, false) => return Err(invalid("set either route or candidates, not both")),
            (true, true) => {
                return Err(invalid(
                    "set route (a configured route name) or candidates (an ordered list of targets)",
                ));
            }
        };
        if q.exclude.len() > MAX_ROUTE_LEN {
            return Err(invalid(format!(
                "exclude lists {} targets; at most {MAX_ROUTE_LEN}",
                q.exclude.len()
            )));
        }
        let args = AdmitArgs {
            caller: q.caller,
            estimated_tokens: q.estimated_tokens,
            attempt: q.attempt,
        };
        let mut skipped = Vec::new();
        let mut chosen = None;
        let mut depth = 0;
        for (i, cand) in list.iter().enumerate() {
            if q.exclude.iter().any(|e| e.as_str() == cand.as_ref()) {
                skipped.push(Skip {
                    target: cand.clone(),
                    reason: Reason::Excluded,
                    retry_after: None,
                });
                continue;
            }
            let settings = self.config.target(cand);
            if q.required_context_tokens > 0
                && settings.context_window > 0
                && settings.context_window < q.required_context_tokens
            {
                skipped.push(Skip {
                    target: cand.clone(),
                    reason: Reason::ContextTooSmall,
                    retry_after: None,
                });
                continue;
            }
            let t = self.target(cand)?;
            let mut fx = Effects::default();
            let adm = self.admit_locked(&t, &args, &mut fx);
            self.persist(&mut fx).await?;
            if adm.allowed {
                depth = i as u32;
                chosen = Some((cand.clone(), adm, t.settings.clone()));
                break;
            }
            skipped.push(Skip {
                target: cand.clone(),
                reason: adm.reason,
                retry_after: adm.retry_after,
            });
        }
        let retry_after = if chosen.is_none() {
            skipped.iter().filter_map(|s| s.retry_after).min()
        } else {
            None
        };
        let served = chosen.as_ref().map(|_| depth);
        match self.routes.get(name.as_ref()) {
            Some(rt) => {
                rt.metrics.record(served);
                self.note_route(rt, served, &skipped, retry_after);
            }
            None => self.adhoc_route_metrics.record(served),
        }
        Ok(RouteDecision {
            chosen,
            fallback_depth: depth,
            skipped,
            retry_after,
        })
    }

    /// Publishes FallbackActivated / RouteExhausted when a route's choice changes.
    fn note_route(
        &self,
        rt: &RouteRuntime,
        depth: Option<u32>,
        skipped: &[Skip],
        retry_after: Option<Duration>,
    ) {
        let current = depth.unwrap_or(EXHAUSTED);
        if rt.last.load(Ordering::Relaxed) == current {
            return;
        }
        // Changes are published in the order they happen.
        let _order = rt.publish.lock().unwrap_or_else(|e| e.into_inner());
        let previous = rt.last.swap(current, Ordering::Relaxed);
        if previous == current {
            return;
        }
        let now = self.clock.now();
        let name = &rt.settings.name;
        match depth {
            Some(d) => {
                if d == 0 && previous == NO_DEPTH {
                    return; // the primary serving from the start is not news
                }
                let target_at = |i: u32| rt.settings.targets.get(i as usize).cloned();
                let Some(to) = target_at(d) else { return };
                let why = skipped.last().map_or(Reason::Allowed, |s| s.reason);
                self.events.publish(
                    now,
                    name,
                    EventKind::FallbackActivated {
                        route: name.clone(),
                        from: target_at(previous),
                        to,
                        depth: d,
                        why,
                    },
                );
            }
            None => {
                self.events.publish(
                    now,
                    name,
                    EventKind::RouteExhausted {
                        route: name.clone(),
                        retry_after,
                    },
                );
            }
        }
    }

    /// Targets sorted by name, filtered by prefix, paginated by the last name seen.
    pub fn list_targets(
        &self,
        prefix: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<TargetPage> {
        let size = match page_size {
            0 => 100,
            n if n > 1000 => {
                return Err(invalid(format!(
                    "page_size {n} is above the maximum of 1000"
                )));
            }
            n => n as usize,
        };
        let mut names: Vec<Arc<str>> = self
            .targets
            .iter()
            .filter(|e| e.key().starts_with(prefix))
            .map(|e| e.key().clone())
            .collect();
        names.sort();
        let total = names.len() as u64;
        let start = if page_token.is_empty() {
            0
        } else {
            names.partition_point(|n| n.as_ref() <= page_token)
        };
        let now = self.clock.now();
        let mut targets = Vec::new();
        for name in names.iter().skip(start).take(size) {
            if let Some(t) = self.targets.get(name.as_ref()) {
                let mut st = t.lock();
                self.apply_time(now, &t, &mut st);
                targets.push(TargetSummary {
                    name: name.clone(),
                    state: st.breaker.state(),
                    configured: t.settings.configured,
                    open_until: st.breaker.open_until(),
                    consecutive_failures: st.breaker.consecutive_failures(),
                });
            }
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

    /// Full state of one target.
    pub fn get_target(&self, name: &str) -> Result<TargetView> {
        let t = self.existing(name)?;
        Ok(self.view(&t))
    }

    /// Before a read: applies what time did to the target (an open period
    /// that ended, probe leases that ran out) and publishes it. Those changes
    /// follow from durable state, so nothing here waits for the store.
    fn apply_time(&self, now: Time, t: &Target, st: &mut TargetState) {
        let mut bev = Vec::new();
        st.breaker.tick(now, &t.settings.breaker, &mut bev);
        if bev.is_empty() {
            return;
        }
        let mut fx = Effects::default();
        t.absorb_breaker_events(st, &bev, None, &mut fx);
        self.finish(now, t, st, &mut fx);
    }

    fn view(&self, t: &Arc<Target>) -> TargetView {
        let now = self.clock.now();
        let mut st = t.lock();
        self.apply_time(now, t, &mut st);
        let budget_views = |b: &BudgetState,
                            cfg: &crate::domain::budget::BudgetConfig,
                            group: Option<Arc<str>>| {
            let mut v = Vec::new();
            for kind in Kind::ALL {
                if let Some(rate) = cfg.rate(kind) {
                    v.push(BudgetView {
                        kind: kind.as_str(),
                        limit: rate.amount,
                        window: rate.window,
                        available: b.cell(kind).available(now, &rate),
                        group: group.clone(),
                    });
                }
            }
            if let Some(max) = cfg.max_concurrency {
                v.push(BudgetView {
                    kind: "concurrency",
                    limit: u64::from(max),
                    window: Duration::ZERO,
                    available: f64::from(max) - b.in_flight() as f64,
                    group,
                });
            }
            v
        };
        let mut in_flight = 0u32;
        let slots = st
            .slots
            .iter_mut()
            .enumerate()
            .map(|(i, s)| {
                s.budget.expire_leases(now);
                in_flight += s.budget.in_flight() as u32;
                SlotView {
                    name: t.slot_name(i),
                    disabled_until: (s.disabled_until > now).then_some(s.disabled_until),
                    disabled_reason: s.disabled_reason.as_deref().map(str::to_string),
                    paused_until: (s.paused_until > now).then_some(s.paused_until),
                    budgets: budget_views(&s.budget, &t.settings.budget, None),
                    learned: s
                        .learned
                        .as_ref()
                        .map(|l| {
                            Kind::ALL
                                .iter()
                                .filter_map(|k| l[k.index()].map(|v| (*k, v)))
                                .collect()
                        })
                        .unwrap_or_default(),
                    in_flight: s.budget.in_flight() as u32,
                }
            })
            .collect();
        let groups = t
            .settings
            .groups
            .iter()
            .flat_map(|&gi| {
                let g = &self.groups[gi];
                let mut gs = g.state.lock().unwrap_or_else(|e| e.into_inner());
                gs.expire_leases(now);
                budget_views(&gs, &g.config, Some(g.name.clone()))
            })
            .collect();
        let (window_calls, window_failures) = st.breaker.window_totals(now);
        TargetView {
            name: t.name.clone(),
            state: st.breaker.state(),
            configured: t.settings.configured,
            open_until: st.breaker.open_until(),
            opened_at: st.breaker.opened_at(),
            consecutive_failures: st.breaker.consecutive_failures(),
            half_open_successes: st.breaker.half_open_successes(),
            probes_outstanding: st.breaker.probes().len() as u32,
            reopen_count: st.breaker.reopen_count(),
            generation: st.breaker.generation(),
            counters: st.counters,
            window_calls,
            window_failures,
            settings: t.settings.clone(),
            slots,
            forced_reason: st.forced_reason().map(str::to_string),
            last_cause: st.last_cause().map(str::to_string),
            in_flight: in_flight + st.breaker.probes().len() as u32,
            groups,
            group_names: t
                .settings
                .groups
                .iter()
                .map(|&gi| self.groups[gi].name.clone())
                .collect(),
        }
    }

    /// Forces a breaker open or closed, or returns it to automatic control.
    pub async fn set_breaker_mode(
        &self,
        name: &str,
        mode: Mode,
        reason: &str,
    ) -> Result<TargetView> {
        if reason.len() > 1024 {
            return Err(invalid("reason is longer than 1024 bytes"));
        }
        let t = self.target(name)?;
        let mut fx = Effects::default();
        {
            let mut st = t.lock();
            let now = self.clock.now();
            let mut bev = Vec::new();
            st.breaker.tick(now, &t.settings.breaker, &mut bev);
            st.breaker.set_mode(mode, &mut bev);
            st.set_forced_reason(
                (mode != Mode::Automatic && !reason.is_empty()).then(|| reason.into()),
            );
            if !bev.is_empty() {
                fx.events.push(EventKind::TargetForced {
                    mode,
                    reason: reason.to_string(),
                });
            }
            let origin = Some((
                None,
                format!(
                    "operator: {}",
                    if reason.is_empty() {
                        "no reason given"
                    } else {
                        reason
                    }
                ),
            ));
            t.absorb_breaker_events(&mut st, &bev, origin, &mut fx);
            self.finish(now, &t, &st, &mut fx);
        }
        self.persist(&mut fx).await?;
        Ok(self.view(&t))
    }

    /// Back to a fresh closed breaker with no pauses, disabled keys or counters.
    pub async fn reset_target(&self, name: &str) -> Result<TargetView> {
        let t = self.existing(name)?;
        let mut fx = Effects::default();
        {
            let mut st = t.lock();
            let now = self.clock.now();
            let mut bev = Vec::new();
            st.breaker.reset(&mut bev);
            for s in st.slots.iter_mut() {
                s.paused_until = Time::ZERO;
                s.disabled_until = Time::ZERO;
                s.disabled_reason = None;
                s.learned = None;
                s.limited = false;
                s.budget.refill();
            }
            // A group in debt would keep refusing this target: the operator
            // asked for it to admit again, so its groups are refilled too.
            for &gi in &t.settings.groups {
                let g = &self.groups[gi];
                g.state.lock().unwrap_or_else(|e| e.into_inner()).refill();
                g.limited.store(false, Ordering::Relaxed);
            }
            st.counters = Counters::default();
            st.retry = None;
            st.notes = None;
            fx.durable = true;
            fx.state_dirty = true;
            fx.events.push(EventKind::TargetReset);
            t.absorb_breaker_events(
                &mut st,
                &bev,
                Some((None, "operator reset".into())),
                &mut fx,
            );
            st.set_last_cause(Some(RESET_CAUSE.into()));
            self.finish(now, &t, &st, &mut fx);
        }
        self.persist(&mut fx).await?;
        Ok(self.view(&t))
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod queue_tests;
