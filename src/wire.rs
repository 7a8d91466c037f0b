//! Conversions between the decision types and the public contract's
//! messages: used by the gRPC adapters, and by the Redis backend, whose
//! event stream carries the same `backstop.v1.Event` messages between
//! replicas that Watch sends to dashboards.

use crate::domain::breaker::{BreakerState, Mode};
use crate::domain::budget::Kind;
use crate::domain::event::EventKind;
use crate::domain::{OutcomeClass, Reason, Time};
use crate::engine::events::Event;
use crate::proto;
use crate::proto::event::Kind as PKind;
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

pub fn to_proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A client-supplied duration: unset is None; negative or malformed is INVALID_ARGUMENT.
pub fn from_proto_duration(
    d: Option<prost_types::Duration>,
    field: &str,
) -> Result<Option<Duration>, Status> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(Status::invalid_argument(format!(
            "{field} must be a non-negative duration (got {}s {}ns)",
            d.seconds, d.nanos
        )));
    }
    Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32)))
}

pub fn to_timestamp(t: Time) -> prost_types::Timestamp {
    let (seconds, nanos) = t.to_unix_parts();
    prost_types::Timestamp { seconds, nanos }
}

pub fn opt_timestamp(t: Option<Time>) -> Option<prost_types::Timestamp> {
    t.map(to_timestamp)
}

pub fn breaker_state(s: BreakerState) -> proto::BreakerState {
    match s {
        BreakerState::Closed => proto::BreakerState::Closed,
        BreakerState::Open => proto::BreakerState::Open,
        BreakerState::HalfOpen => proto::BreakerState::HalfOpen,
        BreakerState::ForcedOpen => proto::BreakerState::ForcedOpen,
        BreakerState::ForcedClosed => proto::BreakerState::ForcedClosed,
    }
}

pub fn reason(r: Reason) -> proto::Reason {
    match r {
        Reason::Allowed => proto::Reason::Allowed,
        Reason::CircuitOpen => proto::Reason::CircuitOpen,
        Reason::ProbeLimit => proto::Reason::ProbeLimit,
        Reason::ForcedOpen => proto::Reason::ForcedOpen,
        Reason::RateLimited => proto::Reason::RateLimited,
        Reason::ConcurrencyLimit => proto::Reason::ConcurrencyLimit,
        Reason::RetryBudgetExhausted => proto::Reason::RetryBudgetExhausted,
        Reason::KeySlotsUnavailable => proto::Reason::KeySlotsUnavailable,
        Reason::RequestTooLarge => proto::Reason::RequestTooLarge,
        Reason::Excluded => proto::Reason::Excluded,
        Reason::ContextTooSmall => proto::Reason::ContextTooSmall,
        Reason::PriorityReserved => proto::Reason::PriorityReserved,
        Reason::SpendLimit => proto::Reason::SpendLimit,
    }
}

pub fn outcome_class(c: OutcomeClass) -> proto::OutcomeClass {
    match c {
        OutcomeClass::Success => proto::OutcomeClass::Success,
        OutcomeClass::Transient => proto::OutcomeClass::Transient,
        OutcomeClass::RateLimited => proto::OutcomeClass::RateLimited,
        OutcomeClass::Persistent => proto::OutcomeClass::Persistent,
        OutcomeClass::BadInput => proto::OutcomeClass::BadInput,
        OutcomeClass::Partial => proto::OutcomeClass::Partial,
        OutcomeClass::Timeout => proto::OutcomeClass::Timeout,
    }
}

/// The client's explicit class; UNSPECIFIED means "classify for me".
pub fn from_outcome_class(v: i32) -> Result<Option<OutcomeClass>, Status> {
    let c = proto::OutcomeClass::try_from(v).map_err(|_| {
        Status::invalid_argument(format!(
            "outcome {v} is not an OutcomeClass; use 0 (UNSPECIFIED) to let the server classify"
        ))
    })?;
    Ok(match c {
        proto::OutcomeClass::Unspecified => None,
        proto::OutcomeClass::Success => Some(OutcomeClass::Success),
        proto::OutcomeClass::Transient => Some(OutcomeClass::Transient),
        proto::OutcomeClass::RateLimited => Some(OutcomeClass::RateLimited),
        proto::OutcomeClass::Persistent => Some(OutcomeClass::Persistent),
        proto::OutcomeClass::BadInput => Some(OutcomeClass::BadInput),
        proto::OutcomeClass::Partial => Some(OutcomeClass::Partial),
        proto::OutcomeClass::Timeout => Some(OutcomeClass::Timeout),
    })
}

/// Outcome totals on the wire.
pub fn outcome_counters(c: &crate::engine::Counters) -> proto::OutcomeCounters {
    let class = |cl: OutcomeClass| c.by_class[cl.index()];
    proto::OutcomeCounters {
        admitted: c.admitted,
        refused: c.refused,
        success: class(OutcomeClass::Success),
        transient: class(OutcomeClass::Transient),
        rate_limited: class(OutcomeClass::RateLimited),
        persistent: class(OutcomeClass::Persistent),
        bad_input: class(OutcomeClass::BadInput),
        partial: class(OutcomeClass::Partial),
        timeout: class(OutcomeClass::Timeout),
        stale: c.stale,
    }
}

pub(crate) fn mode(m: Mode) -> proto::BreakerMode {
    match m {
        Mode::Automatic => proto::BreakerMode::Automatic,
        Mode::ForcedOpen => proto::BreakerMode::ForceOpen,
        Mode::ForcedClosed => proto::BreakerMode::ForceClosed,
    }
}

/// An event as the public contract carries it (Watch, and the Redis stream
/// that carries events between replicas).
pub fn event_to_proto(e: &Event) -> proto::Event {
    let s = |o: &Option<Arc<str>>| o.as_deref().unwrap_or_default().to_string();
    let kind = match &e.kind {
        EventKind::BreakerTransition {
            from,
            to,
            cause,
            class,
            failures,
            caller,
            open_until,
        } => PKind::BreakerTransition(proto::BreakerTransition {
            from: breaker_state(*from) as i32,
            to: breaker_state(*to) as i32,
            cause_class: class.map_or(0, |c| outcome_class(c) as i32),
            failures: *failures,
            caller: s(caller),
            cause: cause.clone(),
            open_until: opt_timestamp(*open_until),
        }),
        EventKind::ProbeExpired { probe } => {
            PKind::ProbeExpired(proto::ProbeExpired { probe: *probe })
        }
        EventKind::TargetForced { mode: m, reason: r } => {
            PKind::TargetForced(proto::TargetForced {
                mode: mode(*m) as i32,
                reason: r.clone(),
            })
        }
        EventKind::RateLimited {
            key_slot,
            kind,
            until,
            why,
        } => PKind::RateLimited(proto::RateLimited {
            key_slot: s(key_slot),
            kind: kind.map(|k| k.as_str().to_string()).unwrap_or_default(),
            until: Some(to_timestamp(*until)),
            why: why.clone(),
        }),
        EventKind::BudgetRestored { key_slot } => PKind::BudgetRestored(proto::BudgetRestored {
            key_slot: s(key_slot),
        }),
        EventKind::KeySlotDisabled {
            key_slot,
            until,
            why,
        } => PKind::KeySlotDisabled(proto::KeySlotDisabled {
            key_slot: key_slot.to_string(),
            until: Some(to_timestamp(*until)),
            why: why.clone(),
        }),
        EventKind::FallbackActivated {
            route,
            from,
            to,
            depth,
            why,
        } => PKind::FallbackActivated(proto::FallbackActivated {
            route: route.to_string(),
            from: s(from),
            to: to.to_string(),
            depth: *depth,
            why: reason(*why) as i32,
        }),
        EventKind::RouteExhausted { route, retry_after } => {
            PKind::RouteExhausted(proto::RouteExhausted {
                route: route.to_string(),
                retry_after: retry_after.map(to_proto_duration),
            })
        }
        EventKind::TargetReset => PKind::TargetReset(proto::TargetReset {}),
        EventKind::ItemDeferred { queue, id, depth } => PKind::Deferred(proto::ItemDeferred {
            queue: queue.to_string(),
            id: id.to_string(),
            depth: *depth,
        }),
        EventKind::ItemDrained { queue, id } => PKind::Drained(proto::ItemDrained {
            queue: queue.to_string(),
            id: id.to_string(),
        }),
        EventKind::ItemDeadLettered {
            queue,
            id,
            reason: r,
            attempts,
        } => PKind::DeadLettered(proto::ItemDeadLettered {
            queue: queue.to_string(),
            id: id.to_string(),
            reason: r.clone(),
            attempts: *attempts,
        }),
        EventKind::RedisUnavailable { replica, error } => {
            PKind::RedisUnavailable(proto::RedisUnavailable {
                replica: replica.to_string(),
                error: error.clone(),
            })
        }
        EventKind::RedisRestored { replica, merged } => {
            PKind::RedisRestored(proto::RedisRestored {
                replica: replica.to_string(),
                merged: *merged,
            })
        }
        EventKind::ConfigMismatch { replicas } => PKind::ConfigMismatch(proto::ConfigMismatch {
            replicas: replicas.clone(),
        }),
        EventKind::ConfigReloaded {
            digest,
            previous_digest,
            added,
            removed,
            changed,
            needs_restart,
            source,
        } => PKind::ConfigReloaded(proto::ConfigReloaded {
            digest: digest.clone(),
            previous_digest: previous_digest.clone(),
            added: added.clone(),
            removed: removed.clone(),
            changed: changed.clone(),
            needs_restart: needs_restart.clone(),
            source: source.clone(),
        }),
        EventKind::TargetRemoved { reason } => PKind::TargetRemoved(proto::TargetRemoved {
            reason: reason.clone(),
        }),
        EventKind::SpendLimitReached {
            scope,
            limit,
            window,
            retry_after,
        } => PKind::SpendLimitReached(proto::SpendLimitReached {
            scope: scope.to_string(),
            limit: *limit,
            window: Some(to_proto_duration(*window)),
            retry_after: Some(to_proto_duration(*retry_after)),
        }),
        EventKind::LimitAdapted {
            limit,
            previous,
            why,
        } => PKind::LimitAdapted(proto::LimitAdapted {
            limit: *limit,
            previous: *previous,
            why: why.clone(),
        }),
        EventKind::OperatorAction {
            action,
            principal,
            tenant,
            reason,
            via,
        } => PKind::OperatorAction(proto::OperatorAction {
            action: action.to_string(),
            principal: principal.to_string(),
            tenant: tenant.to_string(),
            reason: reason.clone(),
            via: via.to_string(),
        }),
    };
    proto::Event {
        seq: e.seq,
        at: Some(to_timestamp(e.at)),
        target: e.target.to_string(),
        kind: Some(kind),
    }
}

fn state_from(v: i32) -> BreakerState {
    match proto::BreakerState::try_from(v) {
        Ok(proto::BreakerState::Open) => BreakerState::Open,
        Ok(proto::BreakerState::HalfOpen) => BreakerState::HalfOpen,
        Ok(proto::BreakerState::ForcedOpen) => BreakerState::ForcedOpen,
        Ok(proto::BreakerState::ForcedClosed) => BreakerState::ForcedClosed,
        _ => BreakerState::Closed,
    }
}

fn reason_from(v: i32) -> Reason {
    match proto::Reason::try_from(v) {
        Ok(proto::Reason::CircuitOpen) => Reason::CircuitOpen,
        Ok(proto::Reason::ProbeLimit) => Reason::ProbeLimit,
        Ok(proto::Reason::ForcedOpen) => Reason::ForcedOpen,
        Ok(proto::Reason::RateLimited) => Reason::RateLimited,
        Ok(proto::Reason::ConcurrencyLimit) => Reason::ConcurrencyLimit,
        Ok(proto::Reason::RetryBudgetExhausted) => Reason::RetryBudgetExhausted,
        Ok(proto::Reason::KeySlotsUnavailable) => Reason::KeySlotsUnavailable,
        Ok(proto::Reason::RequestTooLarge) => Reason::RequestTooLarge,
        Ok(proto::Reason::Excluded) => Reason::Excluded,
        Ok(proto::Reason::ContextTooSmall) => Reason::ContextTooSmall,
        Ok(proto::Reason::PriorityReserved) => Reason::PriorityReserved,
        Ok(proto::Reason::SpendLimit) => Reason::SpendLimit,
        _ => Reason::Allowed,
    }
}

fn time_from(t: Option<prost_types::Timestamp>) -> Option<Time> {
    let t = t?;
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    Some(Time::from_nanos(u64::try_from(nanos).unwrap_or(0)))
}

fn opt_name(s: String) -> Option<Arc<str>> {
    (!s.is_empty()).then(|| Arc::from(s.as_str()))
}

/// The inverse of [`event_to_proto`]: an event read from another replica.
/// None for Snapshot / Gap / unknown kinds (they are not events).
pub fn event_from_proto(e: proto::Event) -> Option<(Time, Arc<str>, EventKind)> {
    let at = time_from(e.at).unwrap_or(Time::ZERO);
    let kind = match e.kind? {
        PKind::BreakerTransition(t) => EventKind::BreakerTransition {
            from: state_from(t.from),
            to: state_from(t.to),
            cause: t.cause,
            class: from_outcome_class(t.cause_class).ok().flatten(),
            failures: t.failures,
            caller: opt_name(t.caller),
            open_until: time_from(t.open_until),
        },
        PKind::ProbeExpired(p) => EventKind::ProbeExpired { probe: p.probe },
        PKind::TargetForced(f) => EventKind::TargetForced {
            mode: match proto::BreakerMode::try_from(f.mode) {
                Ok(proto::BreakerMode::ForceOpen) => Mode::ForcedOpen,
                Ok(proto::BreakerMode::ForceClosed) => Mode::ForcedClosed,
                _ => Mode::Automatic,
            },
            reason: f.reason,
        },
        PKind::RateLimited(r) => EventKind::RateLimited {
            key_slot: opt_name(r.key_slot),
            kind: Kind::ALL.into_iter().find(|k| k.as_str() == r.kind),
            until: time_from(r.until).unwrap_or(Time::ZERO),
            why: r.why,
        },
        PKind::BudgetRestored(b) => EventKind::BudgetRestored {
            key_slot: opt_name(b.key_slot),
        },
        PKind::KeySlotDisabled(k) => EventKind::KeySlotDisabled {
            key_slot: Arc::from(k.key_slot.as_str()),
            until: time_from(k.until).unwrap_or(Time::ZERO),
            why: k.why,
        },
        PKind::FallbackActivated(f) => EventKind::FallbackActivated {
            route: Arc::from(f.route.as_str()),
            from: opt_name(f.from),
            to: Arc::from(f.to.as_str()),
            depth: f.depth,
            why: reason_from(f.why),
        },
        PKind::RouteExhausted(r) => EventKind::RouteExhausted {
            route: Arc::from(r.route.as_str()),
            retry_after: r
                .retry_after
                .and_then(|d| from_proto_duration(Some(d), "retry_after").ok().flatten()),
        },
        PKind::TargetReset(_) => EventKind::TargetReset,
        PKind::Deferred(d) => EventKind::ItemDeferred {
            queue: Arc::from(d.queue.as_str()),
            id: d.id.parse().unwrap_or(0),
            depth: d.depth,
        },
        PKind::Drained(d) => EventKind::ItemDrained {
            queue: Arc::from(d.queue.as_str()),
            id: d.id.parse().unwrap_or(0),
        },
        PKind::DeadLettered(d) => EventKind::ItemDeadLettered {
            queue: Arc::from(d.queue.as_str()),
            id: d.id.parse().unwrap_or(0),
            reason: d.reason,
            attempts: d.attempts,
        },
        PKind::RedisUnavailable(r) => EventKind::RedisUnavailable {
            replica: Arc::from(r.replica.as_str()),
            error: r.error,
        },
        PKind::RedisRestored(r) => EventKind::RedisRestored {
            replica: Arc::from(r.replica.as_str()),
            merged: r.merged,
        },
        PKind::ConfigMismatch(c) => EventKind::ConfigMismatch {
            replicas: c.replicas,
        },
        PKind::ConfigReloaded(c) => EventKind::ConfigReloaded {
            digest: c.digest,
            previous_digest: c.previous_digest,
            added: c.added,
            removed: c.removed,
            changed: c.changed,
            needs_restart: c.needs_restart,
            source: c.source,
        },
        PKind::TargetRemoved(r) => EventKind::TargetRemoved { reason: r.reason },
        PKind::SpendLimitReached(r) => EventKind::SpendLimitReached {
            scope: Arc::from(r.scope.as_str()),
            limit: r.limit,
            window: dur_or_zero(r.window),
            retry_after: dur_or_zero(r.retry_after),
        },
        PKind::LimitAdapted(r) => EventKind::LimitAdapted {
            limit: r.limit,
            previous: r.previous,
            why: r.why,
        },
        PKind::OperatorAction(a) => EventKind::OperatorAction {
            action: Arc::from(a.action.as_str()),
            principal: Arc::from(a.principal.as_str()),
            tenant: Arc::from(a.tenant.as_str()),
            reason: a.reason,
            via: Arc::from(a.via.as_str()),
        },
        PKind::Snapshot(_) | PKind::Gap(_) => return None,
    };
    Some((at, Arc::from(e.target.as_str()), kind))
}

/// A request's priority (unset = default).
pub fn priority_from(p: i32) -> Result<crate::domain::budget::Priority, String> {
    use crate::domain::budget::Priority;
    match proto::Priority::try_from(p) {
        Ok(proto::Priority::Unspecified) | Ok(proto::Priority::Default) => Ok(Priority::Default),
        Ok(proto::Priority::Interactive) => Ok(Priority::Interactive),
        Ok(proto::Priority::Batch) => Ok(Priority::Batch),
        Err(_) => Err(format!(
            "priority {p} is not a known Priority (1 INTERACTIVE, 2 DEFAULT, 3 BATCH)"
        )),
    }
}

/// How a user request ended; None = unset (allowed only where optional).
pub fn request_result_from(
    r: i32,
) -> Result<Option<crate::engine::requests::RequestResult>, String> {
    use crate::engine::requests::RequestResult;
    match proto::RequestResult::try_from(r) {
        Ok(proto::RequestResult::Unspecified) => Ok(None),
        Ok(proto::RequestResult::Completed) => Ok(Some(RequestResult::Completed)),
        Ok(proto::RequestResult::Deferred) => Ok(Some(RequestResult::Deferred)),
        Ok(proto::RequestResult::Failed) => Ok(Some(RequestResult::Failed)),
        Err(_) => Err(format!(
            "{r} is not a known RequestResult (1 COMPLETED, 2 DEFERRED, 3 FAILED)"
        )),
    }
}

/// A request's strategy override (unset = the route's own).
pub fn strategy_from(s: i32) -> Result<Option<crate::domain::strategy::Strategy>, String> {
    use crate::domain::strategy::Strategy;
    Ok(Some(match proto::RouteStrategy::try_from(s) {
        Ok(proto::RouteStrategy::Unspecified) => return Ok(None),
        Ok(proto::RouteStrategy::Ordered) => Strategy::Ordered,
        Ok(proto::RouteStrategy::Weighted) => Strategy::Weighted,
        Ok(proto::RouteStrategy::LeastBusy) => Strategy::LeastBusy,
        Ok(proto::RouteStrategy::LowestLatency) => Strategy::LowestLatency,
        Ok(proto::RouteStrategy::LowestCost) => Strategy::LowestCost,
        Ok(proto::RouteStrategy::MostHeadroom) => Strategy::MostHeadroom,
        Err(_) => return Err(format!("strategy {s} is not a known RouteStrategy (1..=6)")),
    }))
}

pub fn strategy(s: crate::domain::strategy::Strategy) -> proto::RouteStrategy {
    use crate::domain::strategy::Strategy;
    match s {
        Strategy::Ordered => proto::RouteStrategy::Ordered,
        Strategy::Weighted => proto::RouteStrategy::Weighted,
        Strategy::LeastBusy => proto::RouteStrategy::LeastBusy,
        Strategy::LowestLatency => proto::RouteStrategy::LowestLatency,
        Strategy::LowestCost => proto::RouteStrategy::LowestCost,
        Strategy::MostHeadroom => proto::RouteStrategy::MostHeadroom,
    }
}

/// A duration read back from Redis events: malformed or unset is zero.
fn dur_or_zero(d: Option<prost_types::Duration>) -> Duration {
    from_proto_duration(d, "duration")
        .ok()
        .flatten()
        .unwrap_or_default()
}
