//! Prometheus metrics (prometheus-client), shaped for a hot path.
//!
//! Every target holds an `Arc<TargetMetrics>` of pre-resolved handles, so a
//! decision bumps plain atomics: no label hashing, no family lock. Label
//! cardinality is bounded: the first `max_target_labels` targets get their own
//! label, every later one shares the `_other` handles. Histograms are a
//! lock-free fixed-bucket implementation (prometheus-client's own takes a
//! mutex per observation, which would be a global lock per RPC method).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

mod histogram;
mod requests;

pub use histogram::{AtomicHistogram, Buckets};
pub use requests::RequestMetrics;

use crate::domain::OutcomeClass;
use crate::domain::breaker::BreakerState;
use crate::engine::Reason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabel {
    target: String,
}

/// Spend by target and caller (`caller` is one of `[callers]`, or empty:
/// config-bound, so the label stays bounded).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetCaller {
    target: String,
    caller: String,
}

/// Which tenant a target belongs to: joined onto any per-target series in
/// PromQL (`... * on(target) group_left(tenant) backstop_target_tenant`), so
/// the per-target families do not each carry one more label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetTenant {
    target: String,
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabel {
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetReason {
    target: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetAttempt {
    target: String,
    attempt: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetClass {
    target: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    target: String,
    from: String,
    to: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteDepth {
    route: String,
    depth: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BudgetLabels {
    pub target: String,
    pub key_slot: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrincipalLabel {
    principal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

/// Pre-resolved handles for one target label.
#[derive(Debug)]
pub struct TargetMetrics {
    pub label: Arc<str>,
    decisions: Vec<Counter>,
    attempts: [Counter; 2],
    outcomes: Vec<Counter>,
    latency: AtomicHistogram,
    state: Gauge,
    /// Spend with no caller label (the caller is not in `[callers]`).
    spend: Counter<f64, AtomicU64>,
    spend_by_caller: Family<TargetCaller, Counter<f64, AtomicU64>>,
    /// The `[callers]` names (replaced by a reload).
    callers: Arc<arc_swap::ArcSwap<std::collections::HashSet<String>>>,
    /// The adaptive concurrency gauge, created on the first learned limit
    /// (targets with fixed limits never get a series).
    adaptive: std::sync::OnceLock<Gauge>,
}

impl TargetMetrics {
    pub fn decision(&self, reason: Reason, attempt: u32) {
        self.decisions[reason as usize].inc();
        self.attempts[usize::from(attempt > 0)].inc();
    }

    /// An outcome, with what the call cost (in micro-units of the prices'
    /// currency) and who reported it (a label only if in `[callers]`).
    pub fn outcome(
        &self,
        class: OutcomeClass,
        latency: Option<Duration>,
        cost_micros: u64,
        caller: &str,
    ) {
        self.outcomes[class.index()].inc();
        if let Some(l) = latency {
            self.latency.observe(l);
        }
        if cost_micros > 0 {
            let dollars = crate::domain::spend::dollars(cost_micros);
            if !caller.is_empty() && self.callers.load().contains(caller) {
                self.spend_by_caller
                    .get_or_create(&TargetCaller {
                        target: self.label.to_string(),
                        caller: caller.to_string(),
                    })
                    .inc_by(dollars);
            } else {
                self.spend.inc_by(dollars);
            }
        }
    }
}

/// Numeric value of a breaker state for the state gauge.
pub fn state_value(s: BreakerState) -> i64 {
    match s {
        BreakerState::Closed => 0,
        BreakerState::Open => 1,
        BreakerState::HalfOpen => 2,
        BreakerState::ForcedOpen => 3,
        BreakerState::ForcedClosed => 4,
    }
}

/// Every metric Backstop exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<TargetReason, Counter>,
    attempts: Family<TargetAttempt, Counter>,
    outcomes: Family<TargetClass, Counter>,
    call_latency: Family<TargetLabel, AtomicHistogram, Buckets>,
    breaker_state: Family<TargetLabel, Gauge>,
    adaptive_limit: Family<TargetLabel, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    route_decisions: Family<RouteDepth, Counter>,
    route_exhausted: Family<RouteLabel, Counter>,
    rpc_duration: Family<MethodLabel, AtomicHistogram>,
    pub(crate) budget_remaining: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    scope_remaining: Family<ScopeLabel, Gauge<f64, AtomicU64>>,
    scope_spent: Family<ScopeLabel, Gauge<f64, AtomicU64>>,
    scope_refusals: Family<ScopeLabel, Counter>,
    target_tenant: Family<TargetTenant, Gauge>,
    /// (tenant, prefix) of every `[tenants]` entry.
    tenants: arc_swap::ArcSwap<Vec<(String, String)>>,
    callers: Arc<arc_swap::ArcSwap<std::collections::HashSet<String>>>,
    /// Money spent per target.
    spend: Family<TargetCaller, Counter<f64, AtomicU64>>,
    subscribers: Gauge,
    queue_depth: Family<QueueLabel, Gauge>,
    queue_oldest: Family<QueueLabel, Gauge<f64, AtomicU64>>,
    deferrals: Family<QueueLabel, Counter>,
    drains: Family<QueueLabel, Counter>,
    dead_letters: Family<QueueLabel, Counter>,
    cluster_degraded: Gauge,
    store_failing: Gauge,
    cluster_replicas: Gauge,
    redis_errors: Family<KindLabel, Counter>,
    config_mismatch: Gauge,
    redis_rtt: AtomicHistogram,
    refusal_cache_hits: Counter,
    /// End-to-end user-request figures.
    pub requests: RequestMetrics,
    /// Calls refused by a principal's decision_rate (labels: configured principals).
    throttled: Family<PrincipalLabel, Counter>,
    labels_used: AtomicUsize,
    /// Raised or lowered by a config reload; applies to targets labelled from then on.
    max_labels: AtomicUsize,
    other: Arc<TargetMetrics>,
    /// Pre-resolved RPC histograms, indexed like [`RPC_METHODS`]: timing an
    /// RPC must not hash a label set or take the family's lock.
    rpc_handles: Vec<AtomicHistogram>,
}

/// The RPCs timed by `backstop_rpc_duration_seconds` without a family lookup
/// (others fall back to the family).
pub const RPC_METHODS: &[&str] = &[
    "CanProceed",
    "RecordOutcome",
    "Route",
    "CanProceedBatch",
    "RecordOutcomeBatch",
    "Decide.CanProceed",
    "Decide.RecordOutcome",
    "Decide.Route",
    "FinishRequest",
];

/// Transition series created at 0 for every labelled target.
const ALERTED_TRANSITIONS: [(BreakerState, BreakerState); 4] = [
    (BreakerState::Closed, BreakerState::Open),
    (BreakerState::Open, BreakerState::HalfOpen),
    (BreakerState::HalfOpen, BreakerState::Open),
    (BreakerState::HalfOpen, BreakerState::Closed),
];

/// The label shared by targets beyond the cardinality cap.
pub const OTHER: &str = "_other";

impl Metrics {
    pub fn new(max_target_labels: usize, latency_buckets: Arc<[f64]>) -> Metrics {
        let mut registry = Registry::with_prefix("backstop");
        let decisions = Family::<TargetReason, Counter>::default();
        let attempts = Family::<TargetAttempt, Counter>::default();
        let outcomes = Family::<TargetClass, Counter>::default();
        let call_latency = Family::<TargetLabel, AtomicHistogram, Buckets>::new_with_constructor(
            Buckets(latency_buckets.clone()),
        );
        let breaker_state = Family::<TargetLabel, Gauge>::default();
        let adaptive_limit = Family::<TargetLabel, Gauge>::default();
        let transitions = Family::<TransitionLabels, Counter>::default();
        let route_decisions = Family::<RouteDepth, Counter>::default();
        let route_exhausted = Family::<RouteLabel, Counter>::default();
        let rpc_duration = Family::<MethodLabel, AtomicHistogram>::default();
        let budget_remaining = Family::<BudgetLabels, Gauge<f64, AtomicU64>>::default();
        let subscribers = Gauge::default();
        let spend = Family::<TargetCaller, Counter<f64, AtomicU64>>::default();
        registry.register(
            "spend",
            "Money spent per target (and caller, for callers named in [callers]) at the target's configured prices (cost_per_mtok_*), from settled outcomes",
            spend.clone(),
        );
        let scope_remaining = Family::<ScopeLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "spend_scope_remaining",
            "Money a route, caller or tenant spend limit (scope = route:<name>, caller:<name>, tenant:<name>) may still reserve now (negative in debt)",
            scope_remaining.clone(),
        );
        let scope_refusals = Family::<ScopeLabel, Counter>::default();
        registry.register(
            "spend_scope_refusals",
            "Admissions refused with SPEND_LIMIT by a route, caller or tenant spend limit (the target's own decisions metric does not count these: its unit was not asked)",
            scope_refusals.clone(),
        );
        let target_tenant = Family::<TargetTenant, Gauge>::default();
        registry.register(
            "target_tenant",
            "1 for each target that belongs to a tenant ([tenants.<name>]); join it on `target` to break any per-target series down by tenant",
            target_tenant.clone(),
        );
        let scope_spent = Family::<ScopeLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "spend_scope_spent",
            "Money settled against a route, caller or tenant spend limit since its cell was created",
            scope_spent.clone(),
        );
        let queue_depth = Family::<QueueLabel, Gauge>::default();
        let queue_oldest = Family::<QueueLabel, Gauge<f64, AtomicU64>>::default();
        let deferrals = Family::<QueueLabel, Counter>::default();
        let drains = Family::<QueueLabel, Counter>::default();
        let dead_letters = Family::<QueueLabel, Counter>::default();
        registry.register(
            "attempts",
            "Admission requests by target and whether they were a first try or a retry",
            attempts.clone(),
        );
        registry.register(
            "decisions",
            "Admission decisions by target and reason (allowed, circuit_open, rate_limited, ...)",
            decisions.clone(),
        );
        registry.register(
            "outcomes",
            "Reported call outcomes by target and failure class",
            outcomes.clone(),
        );
        registry.register_with_unit(
            "call_latency",
            "Latency of provider calls as reported in RecordOutcome",
            Unit::Seconds,
            call_latency.clone(),
        );
        registry.register(
            "breaker_state",
            "Breaker state per target: 0 closed, 1 open, 2 half-open, 3 forced open, 4 forced closed",
            breaker_state.clone(),
        );
        registry.register(
            "adaptive_concurrency_limit",
            "Learned concurrency limit per key slot of targets with max_concurrency = \"adaptive\"",
            adaptive_limit.clone(),
        );
        registry.register(
            "breaker_transitions",
            "Breaker state changes by target, from and to",
            transitions.clone(),
        );
        registry.register(
            "route_decisions",
            "Route answers by route and fallback depth (0 = primary, none = exhausted)",
            route_decisions.clone(),
        );
        registry.register(
            "route_exhausted",
            "Route calls where no candidate was available",
            route_exhausted.clone(),
        );
        registry.register_with_unit(
            "rpc_duration",
            "Time Backstop spent answering each RPC",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        registry.register(
            "budget_remaining",
            "Budget headroom (units admissible now) by target, key slot and kind, refreshed at scrape",
            budget_remaining.clone(),
        );
        registry.register(
            "event_subscribers",
            "Live event-stream subscribers (gRPC Watch and SSE)",
            subscribers.clone(),
        );
        registry.register(
            "queue_depth",
            "Deferred items waiting per queue, refreshed at scrape",
            queue_depth.clone(),
        );
        registry.register_with_unit(
            "queue_oldest_age",
            "Age of the oldest deferred item per queue, refreshed at scrape",
            Unit::Seconds,
            queue_oldest.clone(),
        );
        registry.register(
            "deferrals",
            "Requests deferred per queue",
            deferrals.clone(),
        );
        registry.register(
            "drains",
            "Deferred items processed (acked) per queue",
            drains.clone(),
        );
        registry.register(
            "dead_letters",
            "Deferred items dead-lettered per queue",
            dead_letters.clone(),
        );
        let cluster_degraded = Gauge::default();
        let store_failing = Gauge::default();
        registry.register(
            "store_failing",
            "Whether the embedded state store is failing (disk full, I/O error, file removed) \
             or not yet caught up: answers that need durability are UNAVAILABLE while it is 1",
            store_failing.clone(),
        );
        let cluster_replicas = Gauge::default();
        let redis_errors = Family::<KindLabel, Counter>::default();
        let config_mismatch = Gauge::default();
        let redis_rtt = AtomicHistogram::default();
        let refusal_cache_hits = Counter::default();
        registry.register(
            "degraded",
            "Cluster mode: 1 while this replica decides without Redis",
            cluster_degraded.clone(),
        );
        registry.register(
            "cluster_replicas",
            "Cluster mode: live replicas (heartbeats seen)",
            cluster_replicas.clone(),
        );
        registry.register(
            "redis_errors",
            "Cluster mode: failed Redis calls by kind (timeout, open, error, not_connected)",
            redis_errors.clone(),
        );
        registry.register(
            "cluster_config_mismatch",
            "Cluster mode: 1 while live replicas run different configs",
            config_mismatch.clone(),
        );
        registry.register_with_unit(
            "redis_round_trip",
            "Cluster mode: round trip of a decision's commit to Redis",
            Unit::Seconds,
            redis_rtt.clone(),
        );
        registry.register(
            "refusal_cache_hits",
            "Cluster mode: refusals answered from this replica's cache, without Redis",
            refusal_cache_hits.clone(),
        );
        let requests = RequestMetrics::register(&mut registry, latency_buckets.clone());
        let throttled = Family::<PrincipalLabel, Counter>::default();
        registry.register(
            "principal_throttled",
            "Decisions refused because a principal exceeded its decision_rate",
            throttled.clone(),
        );
        let mut m = Metrics {
            throttled,
            requests,
            cluster_degraded,
            store_failing,
            cluster_replicas,
            redis_errors,
            config_mismatch,
            redis_rtt,
            refusal_cache_hits,
            registry,
            decisions,
            attempts,
            outcomes,
            call_latency,
            breaker_state,
            adaptive_limit,
            transitions,
            route_decisions,
            route_exhausted,
            rpc_duration,
            budget_remaining,
            spend,
            scope_remaining,
            scope_spent,
            scope_refusals,
            target_tenant,
            tenants: Default::default(),
            callers: Default::default(),
            subscribers,
            queue_depth,
            queue_oldest,
            deferrals,
            drains,
            dead_letters,
            labels_used: AtomicUsize::new(0),
            max_labels: AtomicUsize::new(max_target_labels),
            other: Arc::new(TargetMetrics {
                label: Arc::from(OTHER),
                decisions: Vec::new(),
                attempts: Default::default(),
                outcomes: Vec::new(),
                latency: AtomicHistogram::with_bounds(latency_buckets),
                state: Gauge::default(),
                spend: Counter::default(),
                spend_by_caller: Default::default(),
                callers: Default::default(),
                adaptive: Default::default(),
            }),
            rpc_handles: Vec::new(),
        };
        m.other = Arc::new(m.build(OTHER));
        m.rpc_handles = RPC_METHODS
            .iter()
            .map(|method| {
                m.rpc_duration
                    .get_or_create(&MethodLabel {
                        method: (*method).into(),
                    })
                    .clone()
            })
            .collect();
        m
    }

    fn build(&self, label: &str) -> TargetMetrics {
        let target = label.to_string();
        if let Some((tenant, _)) = self
            .tenants
            .load()
            .iter()
            .find(|(_, prefix)| label.starts_with(prefix.as_str()))
        {
            self.target_tenant
                .get_or_create(&TargetTenant {
                    target: target.clone(),
                    tenant: tenant.clone(),
                })
                .set(1);
        }
        TargetMetrics {
            label: Arc::from(label),
            decisions: Reason::ALL
                .iter()
                .map(|r| {
                    self.decisions
                        .get_or_create(&TargetReason {
                            target: target.clone(),
                            reason: r.as_str().into(),
                        })
                        .clone()
                })
                .collect(),
            attempts: ["first", "retry"].map(|a| {
                self.attempts
                    .get_or_create(&TargetAttempt {
                        target: target.clone(),
                        attempt: a.into(),
                    })
                    .clone()
            }),
            outcomes: OutcomeClass::ALL
                .iter()
                .map(|c| {
                    self.outcomes
                        .get_or_create(&TargetClass {
                            target: target.clone(),
                            class: c.as_str().into(),
                        })
                        .clone()
                })
                .collect(),
            latency: self
                .call_latency
                .get_or_create(&TargetLabel {
                    target: target.clone(),
                })
                .clone(),
            state: {
                // The transitions users alert on exist from the start at 0, so
                // the first breaker open is an increase Prometheus can see
                // (a series born at 1 has no increase).
                for (from, to) in ALERTED_TRANSITIONS {
                    let _ = self.transitions.get_or_create(&TransitionLabels {
                        target: target.clone(),
                        from: from.as_str().into(),
                        to: to.as_str().into(),
                    });
                }
                self.breaker_state
                    .get_or_create(&TargetLabel {
                        target: target.clone(),
                    })
                    .clone()
            },
            spend: self
                .spend
                .get_or_create(&TargetCaller {
                    target,
                    caller: String::new(),
                })
                .clone(),
            spend_by_caller: self.spend.clone(),
            callers: self.callers.clone(),
            adaptive: Default::default(),
        }
    }

    /// A new label cap (config reload): targets already labelled keep their
    /// label; new ones get one while under the new cap.
    pub fn set_max_target_labels(&self, n: usize) {
        self.max_labels.store(n, Ordering::Relaxed);
    }

    /// Handles for a new target: its own label while under the cap, else `_other`.
    pub fn for_target(&self, name: &str) -> Arc<TargetMetrics> {
        let used = self.labels_used.fetch_add(1, Ordering::Relaxed);
        if used >= self.max_labels.load(Ordering::Relaxed) {
            self.labels_used.fetch_sub(1, Ordering::Relaxed);
            return self.other.clone();
        }
        Arc::new(self.build(name))
    }

    pub fn transition(&self, t: &TargetMetrics, from: BreakerState, to: BreakerState) {
        self.transitions
            .get_or_create(&TransitionLabels {
                target: t.label.to_string(),
                from: from.as_str().into(),
                to: to.as_str().into(),
            })
            .inc();
        if t.label.as_ref() != OTHER {
            t.state.set(state_value(to));
        }
    }

    pub fn set_state(&self, t: &TargetMetrics, s: BreakerState) {
        if t.label.as_ref() != OTHER {
            t.state.set(state_value(s));
        }
    }

    /// An adaptive target's learned concurrency limit (targets folded into
    /// `_other` have no gauge: one series cannot hold many limits).
    pub fn set_adaptive_limit(&self, t: &TargetMetrics, limit: u32) {
        if t.label.as_ref() == OTHER {
            return;
        }
        t.adaptive
            .get_or_init(|| {
                self.adaptive_limit
                    .get_or_create(&TargetLabel {
                        target: t.label.to_string(),
                    })
                    .clone()
            })
            .set(i64::from(limit));
    }

    /// Whether the embedded state store is failing to commit.
    pub fn set_store_failing(&self, failing: bool) {
        self.store_failing.set(i64::from(failing));
    }

    /// Cluster mode: whether this replica decides without Redis, and how
    /// many replicas are live.
    pub fn set_cluster(&self, degraded: bool, live_replicas: usize) {
        self.cluster_degraded.set(i64::from(degraded));
        self.cluster_replicas
            .set(i64::try_from(live_replicas).unwrap_or(i64::MAX));
    }

    /// Cluster mode: a Redis call failed (`kind`: timeout, open, error, not_connected).
    pub fn redis_error(&self, kind: &str) {
        self.redis_errors
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc();
    }

    /// Cluster mode: live replicas disagree on their config.
    pub fn set_config_mismatch(&self, mismatch: bool) {
        self.config_mismatch.set(i64::from(mismatch));
    }

    /// Cluster mode: a decision's Redis round trip.
    pub fn redis_round_trip(&self, d: Duration) {
        self.redis_rtt.observe(d);
    }

    /// Cluster mode: a refusal answered from the replica's cache.
    pub fn refusal_cache_hit(&self) {
        self.refusal_cache_hits.inc();
    }

    /// The `[callers]` names, which the spend metric labels by caller.
    pub fn set_callers<'a>(&self, names: impl Iterator<Item = &'a String>) {
        self.callers.store(Arc::new(names.cloned().collect()));
    }

    /// The tenants, by prefix (targets labelled from now on get their
    /// `backstop_target_tenant` series).
    pub fn set_tenants<'a>(&self, tenants: impl Iterator<Item = &'a crate::config::Tenant>) {
        self.tenants.store(Arc::new(
            tenants
                .map(|t| (t.name.to_string(), t.prefix.to_string()))
                .collect(),
        ));
    }

    /// A refusal by a route, caller or tenant spend limit.
    pub fn scope_refusal(&self, scope: &str) {
        self.scope_refusals
            .get_or_create(&ScopeLabel {
                scope: scope.to_string(),
            })
            .inc();
    }

    /// Sets the gauges of route, caller and tenant spend limits (at scrape time).
    pub fn set_scope_levels(&self, levels: &[crate::engine::backend::ledger::ScopeLevel]) {
        for l in levels {
            let label = ScopeLabel {
                scope: l.key.to_string(),
            };
            self.scope_remaining
                .get_or_create(&label)
                .set(l.available_micros / 1e6);
            self.scope_spent
                .get_or_create(&label)
                .set(crate::domain::spend::dollars(l.total_micros));
        }
    }

    /// Sets the headroom gauge of one budget (refreshed at scrape time).
    pub fn set_budget_remaining(
        &self,
        target: &str,
        key_slot: &str,
        kind: crate::domain::budget::Kind,
        available: f64,
    ) {
        self.budget_remaining
            .get_or_create(&BudgetLabels {
                target: target.to_string(),
                key_slot: key_slot.to_string(),
                kind: kind.as_str().into(),
            })
            .set(available);
    }

    /// Handles for a route with `len` candidates.
    pub fn for_route(&self, route: &str, len: usize) -> RouteMetrics {
        let depth = |d: String| {
            self.route_decisions
                .get_or_create(&RouteDepth {
                    route: route.into(),
                    depth: d,
                })
                .clone()
        };
        RouteMetrics {
            depths: (0..len).map(|d| depth(d.to_string())).collect(),
            none: depth("none".into()),
            exhausted: self
                .route_exhausted
                .get_or_create(&RouteLabel {
                    route: route.into(),
                })
                .clone(),
        }
    }

    /// Times one RPC; record with [`RpcTimer::finish`] or on drop.
    pub fn rpc(&self, method: &'static str) -> RpcTimer {
        let hist = match RPC_METHODS.iter().position(|m| *m == method) {
            Some(i) => self.rpc_handles[i].clone(),
            None => self
                .rpc_duration
                .get_or_create(&MethodLabel {
                    method: method.into(),
                })
                .clone(),
        };
        RpcTimer {
            hist,
            started: std::time::Instant::now(),
        }
    }

    /// A principal's decisions were refused by its decision_rate.
    pub fn principal_throttled(&self, principal: &str) {
        self.throttled
            .get_or_create(&PrincipalLabel {
                principal: principal.into(),
            })
            .inc();
    }

    pub fn subscribers(&self) -> &Gauge {
        &self.subscribers
    }

    pub fn deferred(&self, queue: &str) {
        let l = QueueLabel {
            queue: queue.into(),
        };
        self.deferrals.get_or_create(&l).inc();
        // Born at 0 with the queue, so the first drain or dead letter is an
        // increase Prometheus can see.
        let _ = self.drains.get_or_create(&l);
        let _ = self.dead_letters.get_or_create(&l);
    }

    pub fn drained(&self, queue: &str) {
        self.drains
            .get_or_create(&QueueLabel {
                queue: queue.into(),
            })
            .inc();
    }

    pub fn dead_lettered(&self, queue: &str) {
        self.dead_letters
            .get_or_create(&QueueLabel {
                queue: queue.into(),
            })
            .inc();
    }

    pub fn set_queue(&self, queue: &str, depth: u64, oldest: Duration) {
        let l = QueueLabel {
            queue: queue.into(),
        };
        self.queue_depth
            .get_or_create(&l)
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        self.queue_oldest
            .get_or_create(&l)
            .set(oldest.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// One route's pre-resolved counters: answering Route bumps an atomic, with
/// no label hashing and no family lock.
#[derive(Debug)]
pub struct RouteMetrics {
    depths: Vec<Counter>,
    none: Counter,
    exhausted: Counter,
}

impl RouteMetrics {
    /// Records a Route answer served at `depth` (None = nothing available).
    pub fn record(&self, depth: Option<u32>) {
        match depth {
            Some(d) => {
                if let Some(c) = self.depths.get(d as usize) {
                    c.inc();
                }
            }
            None => {
                self.none.inc();
                self.exhausted.inc();
            }
        }
    }
}

/// Records an RPC's duration when dropped.
pub struct RpcTimer {
    hist: AtomicHistogram,
    started: std::time::Instant,
}

impl Drop for RpcTimer {
    fn drop(&mut self) {
        self.hist.observe(self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cardinality_cap_folds_targets_into_other() {
        let m = Metrics::new(2, crate::config::DEFAULT_LATENCY_BUCKETS.into());
        let a = m.for_target("a");
        let b = m.for_target("b");
        let c = m.for_target("c");
        let d = m.for_target("d");
        assert_eq!((a.label.as_ref(), b.label.as_ref()), ("a", "b"));
        assert_eq!((c.label.as_ref(), d.label.as_ref()), (OTHER, OTHER));
        c.decision(Reason::Allowed, 0);
        d.decision(Reason::Allowed, 1);
        let text = m.encode();
        assert!(
            text.contains("backstop_decisions_total{target=\"_other\",reason=\"allowed\"} 2"),
            "{text}"
        );
        assert!(text.contains("backstop_attempts_total{target=\"_other\",attempt=\"retry\"} 1"));
        assert!(!text.contains("target=\"c\""));
    }

    #[test]
    fn histograms_encode_cumulative_buckets() {
        let m = Metrics::new(10, crate::config::DEFAULT_LATENCY_BUCKETS.into());
        let t = m.for_target("t");
        m.set_callers([String::from("bot")].iter());
        t.outcome(
            OutcomeClass::Success,
            Some(Duration::from_millis(30)),
            1_250_000,
            "someone",
        );
        t.outcome(OutcomeClass::Success, Some(Duration::from_secs(3)), 0, "");
        t.outcome(OutcomeClass::Timeout, None, 500_000, "bot");
        let text = m.encode();
        assert!(
            text.contains("backstop_call_latency_seconds_count{target=\"t\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("backstop_call_latency_seconds_bucket{le=\"0.05\",target=\"t\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("backstop_call_latency_seconds_bucket{le=\"+Inf\",target=\"t\"} 2"),
            "{text}"
        );
        assert!(text.contains("backstop_outcomes_total{target=\"t\",class=\"success\"} 2"));
        assert!(
            text.contains("backstop_spend_total{target=\"t\",caller=\"\"} 1.25"),
            "a caller not in [callers] gets no label of its own: {text}"
        );
        assert!(
            text.contains("backstop_spend_total{target=\"t\",caller=\"bot\"} 0.5"),
            "{text}"
        );
    }
}
