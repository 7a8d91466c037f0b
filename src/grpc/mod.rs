//! gRPC adapters: wire types in, engine calls, wire types out. No decisions here.

pub mod admin;
pub mod auth;
pub mod codec;
pub mod deferred;
pub mod events;
pub mod resilience;

use crate::domain::breaker::BreakerState;
use crate::domain::{OutcomeClass, Time};
use crate::engine::{EngineError, Reason};
use crate::proto;
use std::time::Duration;
use tonic::Status;

/// Maps an engine error to the gRPC status a client can act on.
pub fn status(e: EngineError) -> Status {
    match e {
        EngineError::InvalidArgument(m) => Status::invalid_argument(m),
        EngineError::NotFound(m) => Status::not_found(m),
        EngineError::ResourceExhausted(m) => Status::resource_exhausted(m),
        EngineError::FailedPrecondition(m) => Status::failed_precondition(m),
        EngineError::Unavailable(m) => Status::unavailable(m),
    }
}

pub(crate) fn to_proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

/// A client-supplied duration: unset is None; negative or malformed is INVALID_ARGUMENT.
pub(crate) fn from_proto_duration(
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

pub(crate) fn to_timestamp(t: Time) -> prost_types::Timestamp {
    let (seconds, nanos) = t.to_unix_parts();
    prost_types::Timestamp { seconds, nanos }
}

pub(crate) fn opt_timestamp(t: Option<Time>) -> Option<prost_types::Timestamp> {
    t.map(to_timestamp)
}

pub(crate) fn breaker_state(s: BreakerState) -> proto::BreakerState {
    match s {
        BreakerState::Closed => proto::BreakerState::Closed,
        BreakerState::Open => proto::BreakerState::Open,
        BreakerState::HalfOpen => proto::BreakerState::HalfOpen,
        BreakerState::ForcedOpen => proto::BreakerState::ForcedOpen,
        BreakerState::ForcedClosed => proto::BreakerState::ForcedClosed,
    }
}

pub(crate) fn reason(r: Reason) -> proto::Reason {
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
    }
}

pub(crate) fn outcome_class(c: OutcomeClass) -> proto::OutcomeClass {
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
pub(crate) fn from_outcome_class(v: i32) -> Result<Option<OutcomeClass>, Status> {
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
pub(crate) fn outcome_counters(c: &crate::engine::Counters) -> proto::OutcomeCounters {
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

/// Rejects oversized free-text fields before they reach the engine.
pub(crate) fn check_len(value: &str, field: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes; the maximum is {max}",
            value.len()
        )));
    }
    Ok(())
}
