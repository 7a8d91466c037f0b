//! Pure decision logic: the failure taxonomy, the circuit breaker, budgets,
//! backoff and routing.
//!
//! Nothing in here does I/O, spawns tasks, reads a clock or takes a lock: time
//! is passed in as a [`time::Time`] and randomness as a number in `[0, 1)`.
//! That keeps every rule exactly testable and lets the engine decide how state
//! is shared and persisted.

pub mod adaptive;
pub mod breaker;
pub mod budget;
pub mod duration;
pub mod event;
pub mod headers;
pub mod history;
pub mod reason;
pub mod retry;
pub mod route;
pub mod spend;
pub mod strategy;
pub mod taxonomy;
pub mod time;
pub mod unit;
pub mod window;

pub use breaker::{Breaker, BreakerConfig, BreakerState};
pub use reason::Reason;
pub use taxonomy::OutcomeClass;
pub use time::Time;
