//! gRPC adapters: wire types in, engine calls, wire types out. No decisions here.

pub mod admin;
pub mod auth;
pub mod codec;
pub mod deferred;
pub mod events;
pub mod resilience;
pub mod tenant;

use crate::engine::EngineError;
pub(crate) use crate::wire::*;
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
