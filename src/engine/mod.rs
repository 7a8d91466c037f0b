//! The engine: validation, routing, views and events over a decision backend.
//!
//! The engine decides *what* to ask and the backend (`backend/`) decides for
//! one admission unit at a time, holding the state: the engine owns no target
//! state. Requests are validated here (names, sizes, permits, headers), Route
//! is planned here (`domain::route`) and admitted candidate by candidate
//! through the backend, permits are signed here with the backend's key, and
//! fleet events (fallbacks, route exhaustion, queue activity) are published
//! here. See `backend/mod.rs` for what every backend promises.

pub mod backend;
pub mod clock;
pub mod error;
pub mod events;
pub mod history;
pub mod permit;
pub mod preview;
pub mod principal_rate;
pub mod queue;
pub mod reload;
pub mod requests;
pub mod watch;

pub use crate::domain::Reason;
pub use crate::domain::unit::view::{BudgetView, SlotView, TargetPage, TargetSummary, TargetView};
pub use crate::domain::unit::{Admission, AdmitArgs, Counters, Learned, OutcomeResult};
pub use backend::local::store;
pub use backend::{DecisionBackend, LocalBackend};
pub use error::{EngineError, Result};

use crate::config::{
    Config, MAX_ROUTE_LEN, MAX_TARGET_LEN, Permitless, RouteSettings, TargetSettings,
};
use crate::domain::breaker::Mode;
use crate::domain::event::EventKind;
use crate::domain::headers::parse_headers;
use crate::domain::route::{self, CandidateInfo};
use crate::domain::strategy::{self, Glance, Strategy};
use crate::domain::taxonomy::classify;
use crate::domain::unit::{OutcomeArgs, Trust, UnitCx, name_hash};
use crate::domain::{OutcomeClass, Time};
use crate::metrics::{self, Metrics};
use backend::local::persist::Pending;
use clock::Clock;
use error::invalid;
use events::EventBus;
use permit::PermitError;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use store::{IdemRecord, ItemRecord, Store, StoreError};

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
    /// Overrides the route's strategy for this request (None: the route's;
    /// `ordered` for ad-hoc candidate lists).
    pub strategy: Option<Strategy>,
    /// Output tokens `lowest_cost` prices (0: the route's `expected_output_tokens`).
    pub expected_output_tokens: u64,
    pub priority: crate::domain::budget::Priority,
    /// Output tokens reserved at the output price against spend limits.
    pub max_output_tokens: u64,
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
    /// The strategy that ordered the candidates, and why it chose as it did.
    pub strategy: Strategy,
    pub reason: String,
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
/// Pages of other tenants' dead letters one ListDeadLetters reads through.
const MAX_SKIPPED_PAGES: usize = 64;
/// The route name ad-hoc candidate lists are reported under.
const ADHOC_ROUTE: &str = "_adhoc";
const EXHAUSTED: u32 = u32::MAX;

/// The decision backend in use (one variant per kind of backend, so the
/// engine calls it without boxing a future per decision).
// One value per process, inside the engine: the variants' sizes do not matter,
// and boxing the embedded one would add an indirection to every decision.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    /// Embedded: state in this process, durable in its own store.
    Local(LocalBackend),
    /// Cluster mode: state shared by every replica through Redis.
    Redis(backend::RedisBackend),
}

impl Backend {
    /// The embedded backend, for what only it has (its store).
    pub fn local(&self) -> Option<&LocalBackend> {
        match self {
            Backend::Local(b) => Some(b),
            Backend::Redis(_) => None,
        }
    }

    /// The cluster backend.
    pub fn redis(&self) -> Option<&backend::RedisBackend> {
        match self {
            Backend::Redis(b) => Some(b),
            Backend::Local(_) => None,
        }
    }
}

/// Forwards a trait call to whichever backend is in use.
macro_rules! each {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            Backend::Local($b) => $e,
            Backend::Redis($b) => $e,
        }
    };
}

impl DecisionBackend for Backend {
    async fn admit(&self, target: &str, args: &AdmitArgs<'_>) -> Result<Admission> {
        each!(self, b => DecisionBackend::admit(b, target, args).await)
    }
    async fn record(
        &self,
        target: &str,
        args: OutcomeArgs<'_>,
        rand01: f64,
    ) -> Result<OutcomeResult> {
        each!(self, b => DecisionBackend::record(b, target, args, rand01).await)
    }
    async fn force(&self, target: &str, mode: Mode, reason: &str) -> Result<TargetView> {
        each!(self, b => DecisionBackend::force(b, target, mode, reason).await)
    }
    async fn reset(&self, target: &str) -> Result<TargetView> {
        each!(self, b => DecisionBackend::reset(b, target).await)
    }
    async fn view(&self, target: &str) -> Result<TargetView> {
        each!(self, b => DecisionBackend::view(b, target).await)
    }
    async fn list(&self, prefix: &str, size: usize, page_token: &str) -> Result<TargetPage> {
        each!(self, b => DecisionBackend::list(b, prefix, size, page_token).await)
    }
    async fn views(&self, only: &HashSet<String>, max: usize) -> Vec<TargetView> {
        each!(self, b => DecisionBackend::views(b, only, max).await)
    }
    async fn reserve_spend(
        &self,
        scopes: &[Arc<crate::config::SpendScope>],
        cost: u64,
    ) -> Result<backend::SpendAnswer> {
        each!(self, b => DecisionBackend::reserve_spend(b, scopes, cost).await)
    }
    async fn settle_spend(
        &self,
        scopes: &[Arc<crate::config::SpendScope>],
        reserved: u64,
        actual: u64,
    ) -> Result<()> {
        each!(self, b => DecisionBackend::settle_spend(b, scopes, reserved, actual).await)
    }
    fn spend_levels(
        &self,
        scopes: &[Arc<crate::config::SpendScope>],
    ) -> Vec<backend::ledger::ScopeLevel> {
        each!(self, b => DecisionBackend::spend_levels(b, scopes))
    }
    fn ensure(&self, target: &str) -> Result<()> {
        each!(self, b => DecisionBackend::ensure(b, target))
    }
    fn sign(&self, target: &str, p: &crate::domain::unit::Permit) -> String {
        each!(self, b => DecisionBackend::sign(b, target, p))
    }
    fn verify(
        &self,
        target: &str,
        tag: u16,
        s: &str,
    ) -> std::result::Result<crate::domain::unit::Permit, PermitError> {
        each!(self, b => DecisionBackend::verify(b, target, tag, s))
    }
    fn target_count(&self) -> usize {
        each!(self, b => DecisionBackend::target_count(b))
    }
    fn refresh_gauges(&self) {
        each!(self, b => DecisionBackend::refresh_gauges(b))
    }
    fn describe(&self) -> String {
        each!(self, b => DecisionBackend::describe(b))
    }
}

pub struct Engine {
    /// Replaced whole by a reload ([`Engine::reload`]); readers take what
    /// they need of it without a lock.
    config: arc_swap::ArcSwap<Config>,
    /// Where the config came from, for reloads (None: nothing to re-read).
    source: Option<crate::config::reload::Source>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    clock: Arc<dyn Clock>,
    backend: Backend,
    routes: arc_swap::ArcSwap<HashMap<String, Arc<RouteRuntime>>>,
    events: Arc<EventBus>,
    metrics: Arc<Metrics>,
    /// Route metrics of ad-hoc candidate lists (`route="_adhoc"`).
    adhoc_route_metrics: metrics::RouteMetrics,
    /// Event subscribers and the shared snapshot (see watch.rs).
    hub: watch::Hub,
    /// The dashboard's per-target 15-minute traffic history (see history.rs).
    history: history::History,
    queue: Queues,
    /// User requests named by `request_id`, open until finished (see requests.rs).
    requests: requests::Requests,
    /// Per-principal decision buckets (see principal_rate.rs).
    principal_rates: principal_rate::PrincipalRates,
    /// Where the jitter of advised backoffs comes from (uniform in [0, 1)):
    /// the thread RNG, or a fixed sequence in tests that compare engines.
    rng: Rng01,
}

/// Where deferred requests are kept: in this process (and its store), or
/// in Redis, shared by every replica (cluster mode). One per engine, so the
/// variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Queues {
    Local(queue::DeferredQueue),
    Redis(backend::cluster::queue::RedisQueue),
}

/// The per-call limits of `[server]` an outcome is checked against, copied
/// out of the config in force so a decision never holds it across an await.
#[derive(Clone, Copy)]
struct Limits {
    permitless: Permitless,
    max_headers: usize,
    max_header_bytes: usize,
    max_pause: Duration,
}

impl Limits {
    fn of(s: &crate::config::ServerConfig) -> Limits {
        Limits {
            permitless: s.outcomes_without_permit,
            max_headers: s.max_headers,
            max_header_bytes: s.max_header_bytes,
            max_pause: s.max_pause,
        }
    }
}

/// The runtime of each configured route: a route whose candidate list did
/// not change keeps its runtime (its fallback state, so a reload does not
/// re-announce a fallback in progress).
fn route_runtimes(
    config: &Config,
    old: &HashMap<String, Arc<RouteRuntime>>,
    metrics: &Metrics,
) -> HashMap<String, Arc<RouteRuntime>> {
    config
        .routes
        .iter()
        .map(|(name, r)| {
            let rt = match old.get(name) {
                Some(o) if o.settings == *r => o.clone(),
                _ => Arc::new(RouteRuntime {
                    settings: {
                        metrics.requests.born(name);
                        r.clone()
                    },
                    last: AtomicU32::new(NO_DEPTH),
                    publish: Mutex::new(()),
                    metrics: metrics.for_route(name, r.targets.len()),
                }),
            };
            (name.clone(), rt)
        })
        .collect()
}

/// RouteResponse.reason: why the strategy chose this target, and which
/// preferred candidates refused first.
fn explain(
    strategy: Strategy,
    ranked: String,
    chosen: Option<&Arc<str>>,
    skipped: &[Skip],
) -> String {
    use std::fmt::Write as _;
    let mut s = String::from(strategy.as_str());
    s.push_str(": ");
    let passed: Vec<&Skip> = skipped
        .iter()
        .filter(|k| !matches!(k.reason, Reason::Excluded | Reason::ContextTooSmall))
        .collect();
    match chosen {
        None => s.push_str("no candidate could be admitted"),
        Some(t) if ranked.is_empty() || !passed.is_empty() => {
            if passed.is_empty() {
                let _ = write!(s, "{t} is the first candidate");
            } else {
                let _ = write!(s, "{t} after skipping ");
                for (i, k) in passed.iter().enumerate() {
                    let _ = write!(
                        s,
                        "{}{} ({})",
                        if i > 0 { ", " } else { "" },
                        k.target,
                        k.reason.as_str()
                    );
                }
                if !ranked.is_empty() {
                    let _ = write!(s, " (ranking: {ranked})");
                }
            }
        }
        Some(_) => s.push_str(&ranked),
    }
    s
}

/// A source of uniform numbers in [0, 1) (see [`Engine::with_rng`]).
pub type Rng01 = Arc<dyn Fn() -> f64 + Send + Sync>;

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
    /// The previous process did not shut down gracefully (budgets restart empty).
    pub unclean: bool,
    pub elapsed: Duration,
}

/// What the deferred queue needs of the store at startup.
#[derive(Debug, Default)]
pub struct QueueLoad {
    pub items: Vec<ItemRecord>,
    pub dead: Vec<ItemRecord>,
    pub idem: Vec<(String, IdemRecord)>,
    pub next_item_id: u64,
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

/// Checks a target name from a client.
/// A request id is a map key, never a label: only its length is bounded.
fn check_request_id(id: &str) -> Result<()> {
    // Room for the tenant's name the adapter puts in front of a tenant's ids.
    if id.len() > requests::MAX_REQUEST_ID + 80 {
        return Err(invalid(format!(
            "request_id is {} bytes; at most {} are accepted",
            id.len(),
            requests::MAX_REQUEST_ID
        )));
    }
    Ok(())
}

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
    /// An engine over `config` with nothing persisted (ephemeral mode,
    /// benches, tests), every configured target created up front.
    pub fn new(config: Arc<Config>, clock: Arc<dyn Clock>) -> Engine {
        let (events, metrics) = Self::parts(&config, &clock);
        let backend = LocalBackend::new(
            config.clone(),
            clock.clone(),
            events.clone(),
            metrics.clone(),
        );
        Self::assemble(
            config,
            clock,
            events,
            metrics,
            Backend::Local(backend),
            Default::default(),
        )
    }

    /// An engine restored from `store`, reconciled with the config: targets
    /// removed from the config are dropped, changed settings apply, open
    /// periods that ran out while down become half-open.
    pub fn open(
        config: Arc<Config>,
        clock: Arc<dyn Clock>,
        store: Box<dyn Store>,
    ) -> std::result::Result<(Engine, LoadReport), StoreError> {
        let (events, metrics) = Self::parts(&config, &clock);
        let (backend, report, qs) = LocalBackend::open(
            config.clone(),
            clock.clone(),
            events.clone(),
            metrics.clone(),
            store,
            |l, now| queue::QueueState::load(l.items, l.dead, l.idem, l.next_item_id, now),
        )?;
        let engine = Self::assemble(config, clock, events, metrics, Backend::Local(backend), qs);
        Ok((engine, report))
    }

    /// A cluster-mode engine: decisions over Redis, shared by every replica
    /// with the same `[cluster]` settings. It does not wait for Redis (see
    /// `backend/cluster`); call [`Engine::start_cluster`] once serving.
    pub fn cluster(
        config: Arc<Config>,
        clock: Arc<dyn Clock>,
        clock_sync: Option<Arc<clock::OffsetClock>>,
        replica_id: String,
    ) -> Engine {
        let (events, metrics) = Self::parts(&config, &clock);
        let cluster = config
            .cluster
            .clone()
            .unwrap_or_else(|| crate::config::ClusterConfig::for_url("redis://127.0.0.1:6379/0"));
        let backend = backend::RedisBackend::new(
            config.clone(),
            cluster,
            clock.clone(),
            events.clone(),
            metrics.clone(),
            backend::cluster::Replica {
                id: replica_id,
                digest: config.digest(),
                clock_sync,
            },
        );
        Self::assemble(
            config,
            clock,
            events,
            metrics,
            Backend::Redis(backend),
            Default::default(),
        )
    }

    /// Gives a cluster engine a spool: Defers accepted while Redis is
    /// unreachable are kept durably in `store` (this replica's own data
    /// directory) and replayed into Redis when it is back
    /// ([`Engine::replay_spool`]). Anything spooled before a restart is
    /// replayed too.
    pub fn with_spool(mut self, store: Box<dyn Store>) -> std::result::Result<Engine, StoreError> {
        let limits = self.cfg().queue.clone();
        let Queues::Redis(q) = &mut self.queue else {
            return Ok(self);
        };
        let loaded = store.load()?;
        let now = self.clock.now();
        let (state, ops) = queue::QueueState::load(
            loaded.items,
            loaded.dead,
            loaded.idem,
            loaded.next_item_id,
            now,
        );
        store.commit(&ops)?;
        let persister = Arc::new(backend::local::persist::Persister::start(
            store,
            self.events.clone(),
        ));
        q.set_spool(queue::DeferredQueue::new(
            limits,
            self.clock.clone(),
            state,
            Some(persister),
            self.events.clone(),
            self.metrics.clone(),
            self.hub.shutdown_signal(),
        ));
        Ok(self)
    }

    /// Moves deferrals spooled while Redis was unreachable into Redis (a
    /// server calls this about once a second in cluster mode).
    pub async fn replay_spool(&self) -> usize {
        match &self.queue {
            Queues::Redis(q) => q.replay_spool().await,
            Queues::Local(_) => 0,
        }
    }

    /// Starts a cluster engine's background work (connection, heartbeats,
    /// the event stream); `address` is this replica's gRPC address.
    pub fn start_cluster(&self, address: String) {
        if let Some(b) = self.backend.redis() {
            b.start(address);
        }
    }

    /// Cluster mode: waits up to `limit` for Redis to answer before serving
    /// (see `RedisBackend::wait_linked`); true at once when embedded.
    pub async fn wait_for_redis(&self, limit: std::time::Duration) -> bool {
        match self.backend.redis() {
            Some(b) => b.wait_linked(limit).await,
            None => true,
        }
    }

    /// Publishes an engine-level event (fallbacks, route exhaustion): on this
    /// server's bus, or in cluster mode to every replica.
    fn publish(&self, at: Time, target: &Arc<str>, kind: EventKind) {
        match &self.backend {
            Backend::Local(_) => {
                self.events.publish(at, target, kind);
            }
            Backend::Redis(b) => b.publish(at, target, kind),
        }
    }

    /// Publishes the audit event of an operator action on `subject` (a
    /// target, a queue, or "" for the whole server), so Watch, `/events`
    /// and the dashboard show who did what, of which tenant, and why.
    pub fn audit(
        &self,
        subject: &str,
        action: &str,
        by: Option<&crate::config::Principal>,
        reason: &str,
        via: &str,
    ) {
        self.publish(
            self.clock.now(),
            &Arc::from(subject),
            EventKind::OperatorAction {
                action: Arc::from(action),
                principal: by.map_or_else(|| Arc::from("-"), |p| p.name.clone()),
                tenant: by
                    .and_then(|p| p.tenant.as_ref())
                    .map_or_else(|| Arc::from(""), |t| t.name.clone()),
                reason: reason.to_string(),
                via: Arc::from(via),
            },
        );
    }

    /// This replica and the cluster (Admin GetCluster).
    pub async fn cluster_status(&self) -> backend::cluster::ClusterStatus {
        match &self.backend {
            Backend::Redis(b) => b.status().await,
            Backend::Local(_) => backend::cluster::ClusterStatus {
                replica_id: String::new(),
                redis_reachable: false,
                config_digest: self.cfg().digest(),
                ..Default::default()
            },
        }
    }

    fn parts(config: &Arc<Config>, clock: &Arc<dyn Clock>) -> (Arc<EventBus>, Arc<Metrics>) {
        let events = Arc::new(EventBus::starting_at(
            clock.now().as_nanos() / 1000,
            config.events.ring_size,
            config.events.subscriber_buffer,
        ));
        let metrics = Arc::new(Metrics::new(
            config.telemetry.max_target_labels,
            config.telemetry.latency_buckets.clone(),
        ));
        metrics.set_callers(config.callers.keys());
        metrics.set_tenants(config.tenants.values().map(|t| t.as_ref()));
        (events, metrics)
    }

    fn assemble(
        config: Arc<Config>,
        clock: Arc<dyn Clock>,
        events: Arc<EventBus>,
        metrics: Arc<Metrics>,
        backend: Backend,
        queue_state: queue::QueueState,
    ) -> Engine {
        let routes = route_runtimes(&config, &HashMap::new(), &metrics);
        let hub = watch::Hub::new(config.events.max_subscribers);
        let queue = match &backend {
            Backend::Redis(b) => Queues::Redis(backend::cluster::queue::RedisQueue::new(
                b.clone(),
                config.queue.clone(),
                clock.clone(),
                metrics.clone(),
                hub.shutdown_signal(),
            )),
            Backend::Local(b) => Queues::Local(queue::DeferredQueue::new(
                config.queue.clone(),
                clock.clone(),
                queue_state,
                b.persister().cloned(),
                events.clone(),
                metrics.clone(),
                hub.shutdown_signal(),
            )),
        };
        metrics.requests.born(requests::DIRECT);
        Engine {
            principal_rates: Default::default(),
            requests: requests::Requests::new(
                config.server.max_open_requests,
                config.server.request_ttl,
            ),
            hub,
            history: history::History::new(config.events.history_targets),
            queue,
            adhoc_route_metrics: metrics.for_route(ADHOC_ROUTE, MAX_ROUTE_LEN),
            routes: arc_swap::ArcSwap::from_pointee(routes),
            events,
            metrics,
            backend,
            clock,
            config: arc_swap::ArcSwap::new(config),
            source: None,
            reloading: tokio::sync::Mutex::new(()),
            rng: Arc::new(rand::random::<f64>),
        }
    }

    /// Replaces the jitter source: two engines given the same sequence (and
    /// the same clock) make identical decisions, which is what the
    /// differential test between the embedded and Redis backends relies on.
    pub fn with_rng(mut self, rng: Rng01) -> Engine {
        self.rng = rng;
        self
    }

    /// The config in force now (a reload may replace it at any time).
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The config in force, borrowed for one decision (no reference count,
    /// so readers on every core do not contend on one counter).
    pub fn cfg(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// Where [`Engine::reload_from_source`] re-reads the config from.
    pub fn with_source(mut self, source: crate::config::reload::Source) -> Engine {
        self.source = Some(source);
        self
    }

    pub fn now(&self) -> Time {
        self.clock.now()
    }

    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// This replica's recent traffic per target, for the dashboard.
    pub fn history(&self) -> &history::History {
        &self.history
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Number of targets held.
    pub fn target_count(&self) -> usize {
        self.backend.target_count()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Write-behind of counters and budget levels (the embedded backend's;
    /// see `LocalBackend::flush_dirty`).
    pub fn flush_dirty(&self) -> (Pending, usize) {
        let Some(b) = self.backend.local() else {
            return (Pending::none(), 0);
        };
        let (pending, n, recovered) = b.flush_dirty();
        if let Some(from) = recovered {
            // A commit failed earlier (perhaps the file itself was lost):
            // the queue's items, dead letters and keys are written again too
            // before the store counts as recovered.
            self.rewrite_queue();
            // Health tells when it is committed; nothing here waits for it.
            drop(b.mark_recovered(from));
        }
        (pending, n)
    }

    /// Queues the embedded deferred queue's whole content for writing again
    /// (recovery after a failed commit, see `persist.rs`).
    fn rewrite_queue(&self) {
        if let Queues::Local(q) = &self.queue {
            q.rewrite_all();
        }
    }

    /// Flushes everything written behind (shutdown).
    /// `clean` says nothing can change state after it (every call drained):
    /// then the store is marked as stopped gracefully.
    pub async fn flush_all(&self, clean: bool) -> std::result::Result<(), StoreError> {
        match self.backend.local() {
            Some(b) => {
                b.flush_all(&|| self.rewrite_queue()).await?;
                if clean {
                    b.mark_clean().await?;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Refreshes the gauges read at scrape time (budget headroom, queue depth)
    /// and returns the Prometheus text exposition.
    pub fn render_metrics(&self) -> String {
        self.backend.refresh_gauges();
        self.metrics.set_scope_levels(&self.spend_levels());
        let stats = match &self.queue {
            Queues::Local(q) => q.queue_stats(""),
            // As last read (reading Redis here would make a scrape wait on it).
            Queues::Redis(q) => q.last_stats(),
        };
        for q in stats {
            self.metrics.set_queue(&q.queue, q.depth, q.oldest_age);
        }
        self.metrics.encode()
    }

    /// Every route, caller and tenant spend limit with its level, by key
    /// (in cluster mode, as this replica last read or wrote it).
    pub fn spend_levels(&self) -> Vec<backend::ledger::ScopeLevel> {
        let mut scopes: Vec<Arc<crate::config::SpendScope>> =
            self.cfg().spend_scopes.values().cloned().collect();
        scopes.sort_by(|a, b| a.key.cmp(&b.key));
        self.backend.spend_levels(&scopes)
    }

    /// The embedded store's health as its writer sees it
    /// ([`backend::local::persist::Mark::failing`]); None in ephemeral and
    /// cluster mode. The server turns it into health status and a gauge.
    pub fn store_health(
        &self,
    ) -> Option<tokio::sync::watch::Receiver<backend::local::persist::Mark>> {
        self.backend.local()?.persister().map(|p| p.health())
    }

    /// How long the embedded store's commit in progress has been running
    /// (see `Persister::stalled_for`); None when none is, or no store.
    pub fn store_stalled_for(&self) -> Option<Duration> {
        self.backend.local()?.persister()?.stalled_for()
    }

    /// Whether a decision may wait on I/O (cluster mode: every decision is a
    /// Redis round trip). Adapters decide many items concurrently only then;
    /// embedded decisions never wait, so one after another is cheapest.
    pub fn decisions_wait(&self) -> bool {
        self.backend.redis().is_some()
    }

    /// Resolves (or reads true) once the server is draining: long-lived
    /// streams (Watch, Decide) end.
    pub fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.hub.shutdown_signal()
    }

    /// Starts draining: live event streams end, long polls answer.
    pub fn begin_shutdown(&self) {
        self.hub.begin_shutdown();
    }

    /// Where state is kept, for logs.
    pub fn store_description(&self) -> String {
        self.backend.describe()
    }

    /// Saves a request; returns once it is durable.
    pub async fn defer(&self, a: queue::DeferArgs) -> Result<queue::DeferResult> {
        match &self.queue {
            Queues::Local(q) => q.defer(self, a).await,
            Queues::Redis(q) => q.defer(self, a).await,
        }
    }

    /// Hands out up to `max_items` due items, each admitted to the queue's
    /// route or target; long-polls up to `wait` when there is nothing to hand out.
    pub async fn claim(
        &self,
        queue: &str,
        max_items: u32,
        lease: Option<Duration>,
        wait: Option<Duration>,
        worker: &str,
    ) -> Result<queue::ClaimResult> {
        let w = queue::Worker {
            name: worker,
            priority: Default::default(),
        };
        self.claim_as(queue, max_items, lease, wait, w).await
    }

    /// Claim, admitting the deliveries at the worker's priority.
    pub async fn claim_as(
        &self,
        queue: &str,
        max_items: u32,
        lease: Option<Duration>,
        wait: Option<Duration>,
        worker: queue::Worker<'_>,
    ) -> Result<queue::ClaimResult> {
        match &self.queue {
            Queues::Local(q) => q.claim(self, queue, max_items, lease, wait, worker).await,
            Queues::Redis(q) => q.claim(self, queue, max_items, lease, wait, worker).await,
        }
    }

    /// Done: deletes the item (durably).
    pub async fn ack(&self, id: &str, token: &str) -> Result<()> {
        match &self.queue {
            Queues::Local(q) => q.ack(id, token).await,
            Queues::Redis(q) => q.ack(id, token).await,
        }
    }

    /// Not done: back to the queue after `delay`, or to the dead letters after
    /// the last attempt. Returns (dead_lettered, attempt).
    pub async fn nack(
        &self,
        id: &str,
        token: &str,
        delay: Duration,
        reason: &str,
    ) -> Result<(bool, u32)> {
        match &self.queue {
            Queues::Local(q) => q.nack(id, token, delay, reason).await,
            Queues::Redis(q) => q.nack(id, token, delay, reason).await,
        }
    }

    /// Dead letters, by id, optionally of one queue.
    pub async fn list_dead_letters(
        &self,
        queue: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<queue::Item>, String)> {
        match &self.queue {
            Queues::Local(q) => q.list_dead_letters(queue, page_size, page_token),
            Queues::Redis(q) => q.list_dead_letters(queue, page_size, page_token).await,
        }
    }

    /// Dead letters of every queue `owns` (a tenant's), a page at a time:
    /// pages of other tenants' items are read through, so a page comes back
    /// empty only at the end (or after [`MAX_SKIPPED_PAGES`] pages with
    /// nothing of the tenant's, with a token to go on from).
    pub async fn list_dead_letters_within(
        &self,
        page_size: u32,
        page_token: &str,
        owns: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<(Vec<queue::Item>, String)> {
        let mut token = page_token.to_string();
        for _ in 0..MAX_SKIPPED_PAGES {
            let (items, next) = self.list_dead_letters("", page_size, &token).await?;
            let mine: Vec<queue::Item> = items.into_iter().filter(|i| owns(&i.queue)).collect();
            if !mine.is_empty() || next.is_empty() {
                return Ok((mine, next));
            }
            token = next;
        }
        Ok((Vec::new(), token))
    }

    /// Moves a dead letter back to its queue with a fresh attempt count.
    pub async fn requeue(&self, id: &str) -> Result<()> {
        self.requeue_within(id, &|_| true).await
    }

    /// Requeues a dead letter only if `owns` its queue (a tenant's
    /// operator); otherwise it answers exactly as for an unknown id.
    pub async fn requeue_within(
        &self,
        id: &str,
        owns: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<()> {
        match &self.queue {
            Queues::Local(q) => q.requeue(id, owns).await,
            Queues::Redis(q) => q.requeue(id, owns).await,
        }
    }

    /// Depth, in flight, dead letters, oldest age and bytes per queue.
    pub async fn queue_stats(&self, queue: &str) -> Result<Vec<queue::QueueStat>> {
        match &self.queue {
            Queues::Local(q) => Ok(q.queue_stats(queue)),
            Queues::Redis(q) => q.queue_stats(queue).await,
        }
    }

    /// Makes sure a target exists (within `max_targets`).
    pub(crate) fn ensure_target(&self, name: &str) -> Result<()> {
        self.backend.ensure(name)
    }

    /// May a call go to `target` now? Admission reserves what it needs.
    pub async fn can_proceed(&self, target: &str, args: AdmitArgs<'_>) -> Result<Admission> {
        let scopes = self.spend_scopes(target, None, args.caller);
        let mut adm = self.admit_scoped(target, &args, &scopes).await?;
        self.seal(target, &mut adm);
        self.history
            .admission(target, self.clock.now(), adm.allowed);
        Ok(adm)
    }

    /// The route, caller and tenant spend limits a call to `target` draws
    /// on. Most configs have none: then this allocates nothing.
    fn spend_scopes(
        &self,
        target: &str,
        route: Option<&RouteSettings>,
        caller: &str,
    ) -> Vec<Arc<crate::config::SpendScope>> {
        let c = self.cfg();
        let mut out = Vec::new();
        if let Some(s) = route.and_then(|r| r.spend.as_ref()) {
            out.push(s.clone());
        }
        if !caller.is_empty()
            && let Some(s) = c.callers.get(caller).and_then(|c| c.spend.as_ref())
        {
            out.push(s.clone());
        }
        // Prefixes never overlap: one tenant at most.
        if let Some(s) = c
            .tenant_spend
            .iter()
            .find(|t| t.owns(target))
            .and_then(|t| t.spend.as_ref())
        {
            out.push(s.clone());
        }
        out
    }

    /// Admits through the backend, reserving the call's cost against its
    /// wider spend limits first (they span many admission units, so they
    /// cannot be decided inside one): a scope that is spent refuses with
    /// SPEND_LIMIT and the unit is never asked; a unit that refuses gives
    /// the money back. The permit names the scopes, so the outcome settles
    /// them with the real cost.
    async fn admit_scoped(
        &self,
        target: &str,
        args: &AdmitArgs<'_>,
        scopes: &[Arc<crate::config::SpendScope>],
    ) -> Result<Admission> {
        if scopes.is_empty() {
            return self.backend.admit(target, args).await;
        }
        let cost = {
            let c = self.cfg();
            let t = c.target(target);
            crate::domain::spend::Prices {
                input: t.cost_per_mtok_input,
                output: t.cost_per_mtok_output,
            }
            .micros(args.estimated_tokens, args.max_output_tokens)
        };
        // A call that could never fit one of these limits is not asked to
        // wait (as with a target's own limit).
        if scopes.iter().any(|s| cost > s.limit.amount) {
            return Ok(Admission {
                allowed: false,
                reason: Reason::RequestTooLarge,
                state: crate::domain::breaker::BreakerState::Closed,
                retry_after: None,
                permit: None,
                token: String::new(),
                key_slot: None,
                shadow_reason: None,
                degraded: false,
            });
        }
        if cost > 0 {
            let ans = self.backend.reserve_spend(scopes, cost).await?;
            if let Some((scope, r)) = ans.refused {
                let now = self.clock.now();
                if r.first {
                    self.publish(
                        now,
                        &Arc::from(target),
                        EventKind::SpendLimitReached {
                            scope: scope.key.clone(),
                            limit: crate::domain::spend::dollars(scope.limit.amount),
                            window: scope.limit.window,
                            retry_after: r.wait,
                        },
                    );
                }
                // The unit was not asked; its breaker state is still worth
                // telling (a read, on this refusal path only).
                let state = match self.backend.view(target).await {
                    Ok(v) => v.state,
                    Err(_) => crate::domain::breaker::BreakerState::Closed,
                };
                self.metrics.scope_refusal(&scope.key);
                return Ok(Admission {
                    allowed: false,
                    reason: Reason::SpendLimit,
                    state,
                    retry_after: Some(r.wait),
                    permit: None,
                    token: String::new(),
                    key_slot: None,
                    shadow_reason: None,
                    degraded: ans.degraded,
                });
            }
        }
        let scoped = AdmitArgs {
            spend_scoped: true,
            ..*args
        };
        let res = self.backend.admit(target, &scoped).await;
        // Kept only when the permit carries exactly this reservation (a
        // shadow-mode target reserves nothing: its money comes back too).
        let kept = matches!(&res, Ok(a) if a.allowed
            && a.permit.is_some_and(|p| p.reserved_spend == cost));
        if !kept {
            if cost > 0
                && let Err(e) = self.backend.settle_spend(scopes, cost, 0).await
            {
                tracing::warn!(target = %target, error = %e, "could not give back a spend reservation");
            }
            return res;
        }
        let mut adm = res?;
        if let Some(p) = adm.permit.as_mut() {
            for (slot, s) in p.scopes.iter_mut().zip(scopes) {
                *slot = s.hash;
            }
        }
        Ok(adm)
    }

    /// Settles an outcome's cost against the wider spend limits: those its
    /// permit names (a reload that dropped one skips it), or, for a trusted
    /// report without a permit, the caller's and the tenant's (nothing was
    /// reserved).
    async fn settle_scopes(
        &self,
        target: &str,
        permit: Option<&crate::domain::unit::Permit>,
        report: &OutcomeReport<'_>,
        settings: &TargetSettings,
    ) {
        let c = self.cfg();
        if c.spend_scopes.is_empty() {
            return;
        }
        let (scopes, reserved) = match permit {
            Some(p) => (
                p.scopes
                    .iter()
                    .filter(|&&h| h != 0)
                    .filter_map(|h| c.spend_scopes.get(h).cloned())
                    .collect::<Vec<_>>(),
                p.reserved_spend,
            ),
            // Without a permit a report imposes nothing on its own (see
            // `outcomes_without_permit`): it is charged to its caller's and
            // tenant's limits only when such reports are trusted.
            None if c.server.outcomes_without_permit == Permitless::Trusted => {
                drop(c);
                (self.spend_scopes(target, None, report.caller), 0)
            }
            None => return,
        };
        if scopes.is_empty() {
            return;
        }
        let reported = report.input_tokens > 0 || report.output_tokens > 0;
        let actual = if reported {
            crate::domain::spend::Prices {
                input: settings.cost_per_mtok_input,
                output: settings.cost_per_mtok_output,
            }
            .micros(report.input_tokens, report.output_tokens)
        } else {
            reserved
        };
        if actual == 0 && reserved == 0 {
            return;
        }
        if let Err(e) = self.backend.settle_spend(&scopes, reserved, actual).await {
            tracing::warn!(target = %target, error = %e, "could not settle spend limits");
        }
    }

    /// Signs an admission's permit and clamps budget refusals like pauses.
    fn seal(&self, target: &str, adm: &mut Admission) {
        if let Some(p) = &adm.permit {
            adm.token = self.backend.sign(target, p);
        }
        if matches!(adm.reason, Reason::RateLimited | Reason::ConcurrencyLimit) {
            let max = self.cfg().server.max_pause;
            adm.retry_after = adm.retry_after.map(|d| d.min(max));
        }
    }

    /// The decision bucket of the principal a call was authenticated as
    /// (None: no principal, or no `decision_rate`).
    pub fn decision_limiter(
        &self,
        p: Option<&crate::config::Principal>,
    ) -> Option<Arc<principal_rate::Limiter>> {
        self.principal_rates.limiter(p?)
    }

    /// Charges `n` decisions to a principal's bucket; past its rate, the
    /// call is RESOURCE_EXHAUSTED and nothing is decided.
    pub fn charge_decisions(&self, l: Option<&principal_rate::Limiter>, n: u64) -> Result<()> {
        let Some(l) = l else { return Ok(()) };
        if n > l.rate().burst {
            // It would never fit: say so rather than advise a wait.
            self.metrics.principal_throttled(l.principal());
            return Err(invalid(format!(
                "{n} decisions in one call exceed principal {:?}'s decision_burst of {}: \
                 split the batch",
                l.principal(),
                l.rate().burst
            )));
        }
        l.try_take(self.clock.now(), n).map_err(|wait| {
            self.metrics.principal_throttled(l.principal());
            let r = l.rate();
            EngineError::ResourceExhausted(format!(
                "principal {:?} is over its decision_rate of {}/s (burst {}): {n} decision(s) refused; \
                 slow down, this fits again in {} ms",
                l.principal(),
                r.per_second,
                r.burst,
                wait.as_millis().max(1)
            ))
        })
    }

    /// A CanProceed / Route call serving user request `id` (empty: none).
    /// `route` is the configured route named on a Route call; other names
    /// are not remembered (labels stay bounded).
    pub fn note_request(&self, id: &str, route: &str) -> Result<()> {
        if id.is_empty() {
            return Ok(());
        }
        check_request_id(id)?;
        let name = (!route.is_empty())
            .then(|| {
                self.routes
                    .load()
                    .get(route)
                    .map(|r| r.settings.name.clone())
            })
            .flatten();
        if self.requests.note_call(id, name.as_ref(), self.clock.now()) == requests::Noted::Full {
            self.metrics.requests.untracked();
        }
        Ok(())
    }

    /// A RecordOutcome for user request `id` (empty: none): one more
    /// attempt, and the request is closed when `finish` is set.
    pub fn note_request_outcome(
        &self,
        id: &str,
        finish: Option<requests::RequestResult>,
    ) -> Result<Option<requests::Finished>> {
        if id.is_empty() {
            return match finish {
                None => Ok(None),
                Some(_) => Err(invalid(
                    "finish needs the request_id of the request it closes",
                )),
            };
        }
        check_request_id(id)?;
        if self.requests.note_outcome(id, self.clock.now()) == requests::Noted::Full {
            self.metrics.requests.untracked();
        }
        finish
            .map(|r| self.finish_request(id, r, requests::ClientMeasure::default()))
            .transpose()
    }

    /// Closes user request `id` and counts it (once).
    pub fn finish_request(
        &self,
        id: &str,
        result: requests::RequestResult,
        client: requests::ClientMeasure<'_>,
    ) -> Result<requests::Finished> {
        if id.is_empty() {
            return Err(invalid(
                "request_id is empty; give the id used on the request's CanProceed / Route / RecordOutcome calls",
            ));
        }
        check_request_id(id)?;
        let routes = self.routes.load();
        let f = self
            .requests
            .finish(id, result, client, self.clock.now(), |name| {
                routes.get(name).map(|r| r.settings.name.clone())
            });
        self.metrics.requests.finished(&f);
        Ok(f)
    }

    /// Expires request ids past `request_ttl` (counted `expired`) and
    /// forgets finished ones; called about once a second.
    pub fn sweep_requests(&self) {
        for f in self.requests.sweep(self.clock.now()) {
            self.metrics.requests.finished(&f);
        }
        self.metrics.requests.set_open(self.requests.len());
    }

    /// Applies an outcome: classification, provider signals, breaker, budgets, retry advice.
    pub async fn record_outcome(
        &self,
        target: &str,
        report: OutcomeReport<'_>,
    ) -> Result<OutcomeResult> {
        validate_target(target)?;
        let (settings, server) = {
            let c = self.cfg();
            (c.target(target).clone(), Limits::of(&c.server))
        };
        let cx = UnitCx {
            settings: &settings,
            seed: name_hash(target),
        };
        let class = classify(report.class, report.http_status, report.error_type)
            .map_err(|e| invalid(e.to_string()))?;
        let permit = if report.permit.is_empty() {
            if server.permitless == Permitless::Reject {
                return Err(invalid(
                    "this server requires the permit from CanProceed / Route with every outcome \
                     ([server] outcomes_without_permit = \"reject\")",
                ));
            }
            None
        } else {
            let p = self
                .backend
                .verify(target, cx.tag(), report.permit)
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
            (_, name) => cx.slot_index(name).ok_or_else(|| {
                invalid(format!(
                    "unknown key slot {name:?} for target {target:?}; its slots are {:?}",
                    settings.keys
                ))
            })?,
        };
        if slot >= settings.keys.len().max(1) {
            return Err(invalid("permit names a key slot this target does not have"));
        }
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
        // Late: past its lifetime (its lease and reservation were reclaimed).
        // The backend also treats permits from before its start as late.
        let trust = match permit {
            None => Trust::None,
            Some(p) if p.expires_ms < now.as_millis() => Trust::Late(p),
            Some(p) => Trust::Permit(p),
        };
        let args = OutcomeArgs {
            trust,
            trust_permitless: server.permitless == Permitless::Trusted,
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
        let latency = report.latency;
        let res = self.backend.record(target, args, (self.rng)()).await?;
        if !res.duplicate {
            self.settle_scopes(target, permit.as_ref(), &report, &settings)
                .await;
            use OutcomeClass::*;
            let failed = matches!(
                res.classified_as,
                Transient | RateLimited | Persistent | Timeout
            );
            self.history
                .outcome(target, self.clock.now(), failed, latency);
        }
        Ok(res)
    }

    /// Picks the first admissible candidate of a route and admits it.
    pub async fn route(&self, q: RouteQuery<'_>) -> Result<RouteDecision> {
        let mut runtime: Option<Arc<RouteRuntime>> = None;
        let (_name, list): (Arc<str>, Vec<Arc<str>>) = match (
            q.route.is_empty(),
            q.candidates.is_empty(),
        ) {
            (false, true) => {
                let routes = self.routes.load();
                let r = routes.get(q.route).ok_or_else(|| {
                    let mut known: Vec<&String> = routes.keys().collect();
                    known.sort();
                    EngineError::NotFound(format!(
                        "route {:?} is not configured; configured routes: {known:?}",
                        q.route
                    ))
                })?;
                runtime = Some(r.clone());
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
            priority: q.priority,
            max_output_tokens: q.max_output_tokens,
            spend_scoped: false,
        };
        let (strategy, explore, expected_output) = match &runtime {
            Some(rt) => (
                q.strategy.unwrap_or(rt.settings.strategy),
                rt.settings.explore,
                if q.expected_output_tokens > 0 {
                    q.expected_output_tokens
                } else {
                    rt.settings.expected_output_tokens
                },
            ),
            None => (
                q.strategy.unwrap_or_default(),
                crate::config::DEFAULT_EXPLORE,
                q.expected_output_tokens,
            ),
        };
        let plan = {
            let c = self.cfg();
            route::plan(&list, q.exclude, q.required_context_tokens, |t| {
                CandidateInfo {
                    context_window: c.target(t).context_window,
                }
            })
        };
        let mut skipped = Vec::new();
        // Candidates worth an admission attempt, in the strategy's order.
        let mut tries = Vec::with_capacity(plan.len());
        for cand in plan {
            match cand.skip {
                Some(reason) => skipped.push(Skip {
                    target: cand.target,
                    reason,
                    retry_after: None,
                }),
                None => tries.push(cand),
            }
        }
        // Candidates a glance found unavailable, with the refusal they would
        // give: ranked last, and reported as skipped if never reached.
        let mut unavailable: Vec<Option<(Reason, Option<Duration>)>> = vec![None; tries.len()];
        let reason = if strategy == Strategy::Ordered || tries.len() < 2 {
            String::new()
        } else {
            let looks = self
                .glances(
                    &tries,
                    runtime.as_deref(),
                    q.estimated_tokens,
                    expected_output,
                )
                .await;
            let names: Vec<&str> = tries.iter().map(|c| c.target.as_ref()).collect();
            let glances: Vec<Glance> = looks.iter().map(|l| l.0).collect();
            let rng = &self.rng;
            let ranking = strategy::rank(strategy, &names, &glances, explore, &mut || rng());
            let mut slots: Vec<Option<route::Candidate>> = tries.into_iter().map(Some).collect();
            tries = Vec::with_capacity(slots.len());
            unavailable.clear();
            for &i in &ranking.order {
                if let Some(c) = slots.get_mut(i).and_then(Option::take) {
                    tries.push(c);
                    unavailable.push(looks[i].1);
                }
            }
            ranking.reason
        };
        let mut chosen = None;
        let mut depth = 0;
        let mut position = 0;
        let mut rest = tries.into_iter().zip(unavailable).enumerate();
        for (i, (cand, _)) in rest.by_ref() {
            let scopes = self.spend_scopes(
                &cand.target,
                runtime.as_deref().map(|r| r.settings.as_ref()),
                q.caller,
            );
            let mut adm = self.admit_scoped(&cand.target, &args, &scopes).await?;
            self.history
                .admission(&cand.target, self.clock.now(), adm.allowed);
            if adm.allowed {
                self.seal(&cand.target, &mut adm);
                depth = cand.depth;
                position = i as u32;
                let settings = self.cfg().target(&cand.target).clone();
                chosen = Some((cand.target, adm, settings));
                break;
            }
            self.seal(&cand.target, &mut adm);
            skipped.push(Skip {
                target: cand.target,
                reason: adm.reason,
                retry_after: adm.retry_after,
            });
        }
        // Never reached: only the unavailable ones (ranked last) are news.
        for (_, (cand, why)) in rest {
            if let Some((reason, retry_after)) = why {
                skipped.push(Skip {
                    target: cand.target,
                    reason,
                    retry_after,
                });
            }
        }
        if strategy == Strategy::Ordered {
            // A fallback list reports its skips in list order.
            let pos = |t: &Arc<str>| list.iter().position(|x| x == t).unwrap_or(usize::MAX);
            skipped.sort_by_key(|s| pos(&s.target));
        }
        let retry_after = if chosen.is_none() {
            route::soonest(skipped.iter().map(|s| s.retry_after))
        } else {
            None
        };
        let reason = explain(strategy, reason, chosen.as_ref().map(|c| &c.0), &skipped);
        // For an ordered route the list position is the fallback depth; for
        // the others it is the position in the strategy's order (0 = its
        // first choice), so "fallback" means the same thing: the preferred
        // candidate refused.
        let (served, fallback_depth) = match strategy {
            Strategy::Ordered => (chosen.as_ref().map(|_| depth), depth),
            _ => (chosen.as_ref().map(|_| position), position),
        };
        match &runtime {
            Some(rt) => {
                rt.metrics.record(served);
                let chosen_name = chosen.as_ref().map(|c| c.0.clone());
                // Events follow list positions for a fallback list; a
                // balancing strategy moves between targets by design, so
                // only its exhaustion and recovery are news.
                let key = match strategy {
                    Strategy::Ordered => served,
                    _ => served.map(|_| 0),
                };
                self.note_route(rt, key, chosen_name, &skipped, retry_after);
            }
            None => self.adhoc_route_metrics.record(served),
        }
        Ok(RouteDecision {
            chosen,
            fallback_depth,
            skipped,
            retry_after,
            strategy,
            reason,
        })
    }

    /// What a strategy needs to know about each candidate: a glance at its
    /// state (with the refusal it would likely give), its price for this
    /// request and its weight in the route. In cluster mode each glance is
    /// a read from Redis: strategies other than `ordered` cost one more
    /// round trip per candidate.
    async fn glances(
        &self,
        tries: &[route::Candidate],
        rt: Option<&RouteRuntime>,
        input_tokens: u64,
        output_tokens: u64,
    ) -> Vec<(Glance, Option<(Reason, Option<Duration>)>)> {
        let now = self.clock.now();
        let mut out = Vec::with_capacity(tries.len());
        for c in tries {
            let (mut g, why) = match self.backend.view(&c.target).await {
                Ok(v) => crate::domain::unit::view::glance(&v, now),
                // Never used yet (or unreadable this moment): a fresh target.
                Err(_) => (Glance::default(), None),
            };
            let t = self.cfg().target(&c.target).clone();
            g.cost = strategy::expected_cost(
                input_tokens,
                output_tokens,
                (t.cost_per_mtok_input, t.cost_per_mtok_output),
            );
            g.weight = rt
                .and_then(|r| r.settings.weights.get(c.depth as usize).copied())
                .unwrap_or(1.0);
            out.push((g, why));
        }
        out
    }

    /// Publishes FallbackActivated / RouteExhausted when a route's choice changes.
    fn note_route(
        &self,
        rt: &RouteRuntime,
        depth: Option<u32>,
        chosen: Option<Arc<str>>,
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
                let Some(to) = chosen else { return };
                let why = skipped.last().map_or(Reason::Allowed, |s| s.reason);
                self.publish(
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
                self.publish(
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
    pub async fn list_targets(
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
        self.backend.list(prefix, size, page_token).await
    }

    /// Full state of one target.
    pub async fn get_target(&self, name: &str) -> Result<TargetView> {
        validate_target(name)?;
        let mut v = self.backend.view(name).await?;
        // Every call to it draws on its tenant's spend limit too (a route's
        // or a caller's depends on the call: those show in /api/spend).
        let tenant = self
            .cfg()
            .tenant_spend
            .iter()
            .find(|t| t.owns(name))
            .and_then(|t| t.spend.clone());
        if let Some(scope) = tenant {
            for l in self.backend.spend_levels(std::slice::from_ref(&scope)) {
                v.spend_limits.push(crate::domain::unit::view::SpendView {
                    scope: l.key.clone(),
                    limit: crate::domain::spend::dollars(l.limit.amount),
                    window: l.limit.window,
                    available: l.available_micros / 1e6,
                });
            }
        }
        Ok(v)
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
        validate_target(name)?;
        self.backend.force(name, mode, reason).await
    }

    /// Back to a fresh closed breaker with no pauses, disabled keys or
    /// counters, and full budgets (the target's and its groups').
    pub async fn reset_target(&self, name: &str) -> Result<TargetView> {
        validate_target(name)?;
        self.backend.reset(name).await
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod queue_tests;
#[cfg(test)]
mod reload_tests;
