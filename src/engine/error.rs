//! Errors the engine reports to its adapters, one variant per gRPC status they map to.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// The request is malformed; the message says which field and how to fix it.
    InvalidArgument(String),
    NotFound(String),
    /// A bound was reached (target cap, queue depth, subscribers).
    ResourceExhausted(String),
    /// The request is valid but not in the current state (e.g. a stale lease token).
    FailedPrecondition(String),
    /// The store failed: the decision was not made durable, so it was not acknowledged.
    Unavailable(String),
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, msg) = match self {
            EngineError::InvalidArgument(m) => ("invalid argument", m),
            EngineError::NotFound(m) => ("not found", m),
            EngineError::ResourceExhausted(m) => ("resource exhausted", m),
            EngineError::FailedPrecondition(m) => ("failed precondition", m),
            EngineError::Unavailable(m) => ("unavailable", m),
        };
        write!(f, "{kind}: {msg}")
    }
}

impl std::error::Error for EngineError {}

pub type Result<T> = std::result::Result<T, EngineError>;

pub fn invalid(msg: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument(msg.into())
}
