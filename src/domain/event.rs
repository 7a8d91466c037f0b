//! What the decision logic tells the world: breaker transitions, pauses,
//! overrides, fallbacks and queue activity. Pure data; the engine numbers and
//! fans them out (`engine::events`), the adapters put them on the wire.

use super::Reason;
use super::breaker::{BreakerState, Mode};
use super::budget::Kind;
use super::{OutcomeClass, Time};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    BreakerTransition {
        from: BreakerState,
        to: BreakerState,
        /// Human-readable cause, e.g. "5 consecutive transient failures".
        cause: String,
        /// The outcome class that moved the breaker, when one did.
        class: Option<OutcomeClass>,
        /// Consecutive failures (or failures in the window) behind a trip.
        failures: u32,
        /// The agent whose outcome caused the transition, if it said.
        caller: Option<Arc<str>>,
        open_until: Option<Time>,
    },
    ProbeExpired {
        probe: u64,
    },
    TargetForced {
        mode: Mode,
        reason: String,
    },
    /// A budget or a provider pause started refusing.
    RateLimited {
        key_slot: Option<Arc<str>>,
        kind: Option<Kind>,
        until: Time,
        why: String,
    },
    /// The budget admits again.
    BudgetRestored {
        key_slot: Option<Arc<str>>,
    },
    /// A key slot was disabled by a PERSISTENT outcome.
    KeySlotDisabled {
        key_slot: Arc<str>,
        until: Time,
        why: String,
    },
    FallbackActivated {
        route: Arc<str>,
        from: Option<Arc<str>>,
        to: Arc<str>,
        depth: u32,
        why: Reason,
    },
    RouteExhausted {
        route: Arc<str>,
        retry_after: Option<Duration>,
    },
    /// An operator reset the target.
    TargetReset,
    /// A request was saved to a deferred queue.
    ItemDeferred {
        queue: Arc<str>,
        id: u64,
        depth: u64,
    },
    /// A deferred item was processed.
    ItemDrained {
        queue: Arc<str>,
        id: u64,
    },
    /// A deferred item used its last attempt.
    ItemDeadLettered {
        queue: Arc<str>,
        id: u64,
        reason: String,
        attempts: u32,
    },
    /// Cluster mode: this replica lost Redis and decides alone (degraded).
    RedisUnavailable {
        replica: Arc<str>,
        error: String,
    },
    /// Cluster mode: Redis is back; `merged` targets' degraded decisions were merged.
    RedisRestored {
        replica: Arc<str>,
        merged: u32,
    },
    /// Cluster mode: live replicas run different configs ("replica=digest" each).
    ConfigMismatch {
        replicas: Vec<String>,
    },
    /// The config was re-read and applied (SIGHUP or Admin/ReloadConfig).
    ConfigReloaded {
        /// The digest now in force (see `Config::digest`), and the one before.
        digest: String,
        previous_digest: String,
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
        /// Settings that changed in the file but take effect only after a
        /// restart ("server.listen", ...): they keep their running value.
        needs_restart: Vec<String>,
        /// Who asked: "sighup", or "admin" with the reason given.
        source: String,
    },
    /// A target the config no longer declares was dropped by a reload.
    TargetRemoved {
        reason: String,
    },
    /// A spend limit started refusing (on the edge, not per refusal).
    SpendLimitReached {
        /// "target", or the budget group's name.
        scope: Arc<str>,
        /// In the currency of the configured prices.
        limit: f64,
        window: Duration,
        retry_after: Duration,
    },
    /// An adaptive concurrency limit moved by at least 10 % (or hit a bound).
    LimitAdapted {
        limit: u32,
        previous: u32,
        why: String,
    },
    /// The audit of an operator action (force, reset, requeue, reload):
    /// who, of which tenant, what and why.
    OperatorAction {
        action: Arc<str>,
        principal: Arc<str>,
        tenant: Arc<str>,
        reason: String,
        via: Arc<str>,
    },
}

impl EventKind {
    /// Every kind's stable name, in the order of `backstop.v1.EventKind`
    /// (after SNAPSHOT and GAP, which are not events). The one list the gRPC
    /// filter, the SSE filter and the dashboard (via `/api/event-kinds`) use.
    pub const NAMES: [&'static str; 20] = [
        "breaker_transition",
        "probe_expired",
        "target_forced",
        "rate_limited",
        "budget_restored",
        "fallback_activated",
        "route_exhausted",
        "key_slot_disabled",
        "target_reset",
        "deferred",
        "drained",
        "dead_lettered",
        "redis_unavailable",
        "redis_restored",
        "config_mismatch",
        "config_reloaded",
        "target_removed",
        "spend_limit_reached",
        "limit_adapted",
        "operator_action",
    ];

    /// The known name equal to `s`, if any.
    pub fn parse_name(s: &str) -> Option<&'static str> {
        Self::NAMES.iter().copied().find(|n| *n == s)
    }

    /// Stable name, for filters and metrics (one of [`EventKind::NAMES`]).
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::BreakerTransition { .. } => "breaker_transition",
            EventKind::ProbeExpired { .. } => "probe_expired",
            EventKind::TargetForced { .. } => "target_forced",
            EventKind::RateLimited { .. } => "rate_limited",
            EventKind::BudgetRestored { .. } => "budget_restored",
            EventKind::KeySlotDisabled { .. } => "key_slot_disabled",
            EventKind::FallbackActivated { .. } => "fallback_activated",
            EventKind::RouteExhausted { .. } => "route_exhausted",
            EventKind::TargetReset => "target_reset",
            EventKind::ItemDeferred { .. } => "deferred",
            EventKind::ItemDrained { .. } => "drained",
            EventKind::RedisUnavailable { .. } => "redis_unavailable",
            EventKind::RedisRestored { .. } => "redis_restored",
            EventKind::ConfigMismatch { .. } => "config_mismatch",
            EventKind::ItemDeadLettered { .. } => "dead_lettered",
            EventKind::ConfigReloaded { .. } => "config_reloaded",
            EventKind::TargetRemoved { .. } => "target_removed",
            EventKind::SpendLimitReached { .. } => "spend_limit_reached",
            EventKind::LimitAdapted { .. } => "limit_adapted",
            EventKind::OperatorAction { .. } => "operator_action",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_named_once_in_the_list() {
        let samples = [
            EventKind::ProbeExpired { probe: 1 },
            EventKind::TargetReset,
            EventKind::BudgetRestored { key_slot: None },
        ];
        for k in samples {
            assert!(EventKind::NAMES.contains(&k.name()));
        }
        let mut names = EventKind::NAMES.to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), EventKind::NAMES.len());
        assert_eq!(EventKind::parse_name("drained"), Some("drained"));
        assert_eq!(EventKind::parse_name("nope"), None);
    }
}
