//! Backstop: a resilience control plane for fleets of AI agents.
//!
//! One service owns, for the whole fleet, the circuit breakers, budgets and
//! retry budgets that each agent process would otherwise keep (and get wrong)
//! on its own. The crate is layered so each part can be read alone:
//!
//! * [`domain`]: pure decision logic (taxonomy, breaker, budgets, backoff);
//!   no I/O, time passed in.
//! * [`engine`]: owns state for many targets, concurrency, events and persistence.
//! * [`metrics`]: Prometheus metrics with pre-resolved handles (used by every layer).
//! * [`grpc`]: thin adapters between the wire ([`proto`]) and the engine.
//! * [`config`]: the TOML file, validated with locations.
//! * [`server`]: wires it together and runs it.

pub mod config;
pub mod domain;
pub mod engine;
#[doc(hidden)]
pub mod fuzz;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod server;
pub mod telemetry;
pub mod wire;

/// Generated types and stubs for `proto/backstop/v1/*.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("backstop.v1");

    /// Encoded descriptors of every Backstop service, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("backstop_descriptor");
}
