//! Decision backends: where the state of every admission unit lives, and
//! what makes decisions on it correct under concurrency.
//!
//! The engine (validation, routing, views, events) decides *what* to ask; a
//! backend answers the same four kinds of calls with the same semantics:
//! **admit** (may this call go ahead?), **record** (what did this outcome
//! do?), **operate** (operator overrides and resets) and **view** (reads).
//! The decisions themselves are the pure functions of `domain::unit`; a
//! backend only decides where the state is read from and written to, and
//! how concurrent decisions are serialised.
//!
//! # What a backend must promise
//! * **Linearisable per admission unit.** Decisions on one unit (a target,
//!   with the budget groups it draws on) take effect one at a time, each on
//!   the state the previous one left: fifty concurrent CanProceed calls on a
//!   half-open breaker admit exactly `half_open_max_probes`, whichever
//!   process (or replica) they reach.
//! * **Durable before the answer leaves.** A transition a client is told
//!   about (a breaker opening, a forced state, a provider pause, a disabled
//!   key) is durable when the answer leaves, in the backend's sense of
//!   durable (fsync'd locally; in Redis, as durable as its persistence and
//!   replication settings make it). Budget levels and counters may be
//!   written behind.
//! * **Settle once.** A permit's first report counts; later ones answer the
//!   first answer with `duplicate` set and change nothing.
//! * **Never block on a lock across I/O, never do I/O on the hot path** of
//!   the embedded backend.

pub mod cluster;
pub mod ledger;
pub mod local;
pub mod quota;

#[cfg(test)]
pub(crate) mod props;

pub use cluster::RedisBackend;
pub use local::LocalBackend;

use crate::config::SpendScope;
use crate::domain::breaker::Mode;
use crate::domain::unit::view::{TargetPage, TargetView};
use crate::domain::unit::{Admission, AdmitArgs, OutcomeArgs, OutcomeResult};
use crate::engine::error::Result;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

/// What a spend reservation answered.
#[derive(Clone, Debug, Default)]
pub struct SpendAnswer {
    /// The scope that refused, when it went to wait (nothing was reserved).
    pub refused: Option<(Arc<SpendScope>, crate::domain::spend::Refusal)>,
    /// Cluster mode: decided without Redis (this replica's share).
    pub degraded: bool,
}

/// The calls every decision backend answers (see the module doc for what
/// each must promise). Futures are `Send`: the engine awaits them on any
/// runtime thread.
pub trait DecisionBackend: Send + Sync {
    /// May a call go to `target` now? The permit comes back unsigned.
    fn admit(
        &self,
        target: &str,
        args: &AdmitArgs<'_>,
    ) -> impl Future<Output = Result<Admission>> + Send;

    /// Applies a classified, validated outcome (settling its permit once).
    fn record(
        &self,
        target: &str,
        args: OutcomeArgs<'_>,
        rand01: f64,
    ) -> impl Future<Output = Result<OutcomeResult>> + Send;

    /// Operator override: force open or closed, or back to automatic.
    fn force(
        &self,
        target: &str,
        mode: Mode,
        reason: &str,
    ) -> impl Future<Output = Result<TargetView>> + Send;

    /// Operator reset: fresh breaker, full budgets, no pauses or disabled keys.
    fn reset(&self, target: &str) -> impl Future<Output = Result<TargetView>> + Send;

    /// One target's full state.
    fn view(&self, target: &str) -> impl Future<Output = Result<TargetView>> + Send;

    /// A page of targets, sorted by name.
    fn list(
        &self,
        prefix: &str,
        size: usize,
        page_token: &str,
    ) -> impl Future<Output = Result<TargetPage>> + Send;

    /// Views of every target (or the named ones), at most `max`, by name.
    fn views(
        &self,
        only: &HashSet<String>,
        max: usize,
    ) -> impl Future<Output = Vec<TargetView>> + Send;

    /// Makes sure a target exists (creating it within `max_targets`).
    fn ensure(&self, target: &str) -> Result<()>;

    /// Signs a permit with the key shared by every process that shares the
    /// state (so a permit settles anywhere).
    fn sign(&self, target: &str, p: &crate::domain::unit::Permit) -> String;

    /// Verifies a permit presented with `target` (tag: its name hash's).
    fn verify(
        &self,
        target: &str,
        tag: u16,
        s: &str,
    ) -> std::result::Result<crate::domain::unit::Permit, crate::engine::permit::PermitError>;

    /// Reserves `cost` (micro-units) against route, caller and tenant
    /// spend limits, all or nothing (see `ledger.rs`).
    fn reserve_spend(
        &self,
        scopes: &[Arc<SpendScope>],
        cost: u64,
    ) -> impl Future<Output = Result<SpendAnswer>> + Send;

    /// Settles what [`DecisionBackend::reserve_spend`] reserved against the
    /// real cost (a refused admission settles at 0: the money comes back).
    fn settle_spend(
        &self,
        scopes: &[Arc<SpendScope>],
        reserved: u64,
        actual: u64,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Levels of these scopes, as this process last knew them.
    fn spend_levels(&self, scopes: &[Arc<SpendScope>]) -> Vec<ledger::ScopeLevel>;

    /// Number of targets held.
    fn target_count(&self) -> usize;

    /// Refreshes gauges read at scrape time.
    fn refresh_gauges(&self);

    /// Where the state is kept, for logs.
    fn describe(&self) -> String;
}

impl DecisionBackend for LocalBackend {
    async fn admit(&self, target: &str, args: &AdmitArgs<'_>) -> Result<Admission> {
        LocalBackend::admit(self, target, args).await
    }

    async fn record(
        &self,
        target: &str,
        args: OutcomeArgs<'_>,
        rand01: f64,
    ) -> Result<OutcomeResult> {
        LocalBackend::record(self, target, args, rand01).await
    }

    async fn force(&self, target: &str, mode: Mode, reason: &str) -> Result<TargetView> {
        LocalBackend::force(self, target, mode, reason).await
    }

    async fn reset(&self, target: &str) -> Result<TargetView> {
        LocalBackend::reset(self, target).await
    }

    async fn view(&self, target: &str) -> Result<TargetView> {
        LocalBackend::view(self, target)
    }

    async fn list(&self, prefix: &str, size: usize, page_token: &str) -> Result<TargetPage> {
        Ok(LocalBackend::list(self, prefix, size, page_token))
    }

    async fn views(&self, only: &HashSet<String>, max: usize) -> Vec<TargetView> {
        LocalBackend::views(self, only, max)
    }

    fn ensure(&self, target: &str) -> Result<()> {
        self.target(target).map(|_| ())
    }

    fn sign(&self, target: &str, p: &crate::domain::unit::Permit) -> String {
        self.permit_key().sign(target, p)
    }

    fn verify(
        &self,
        target: &str,
        tag: u16,
        s: &str,
    ) -> std::result::Result<crate::domain::unit::Permit, crate::engine::permit::PermitError> {
        self.permit_key().verify(target, tag, s)
    }

    async fn reserve_spend(&self, scopes: &[Arc<SpendScope>], cost: u64) -> Result<SpendAnswer> {
        Ok(LocalBackend::reserve_spend(self, scopes, cost))
    }
    async fn settle_spend(
        &self,
        scopes: &[Arc<SpendScope>],
        reserved: u64,
        actual: u64,
    ) -> Result<()> {
        LocalBackend::settle_spend(self, scopes, reserved, actual);
        Ok(())
    }
    fn spend_levels(&self, scopes: &[Arc<SpendScope>]) -> Vec<ledger::ScopeLevel> {
        LocalBackend::spend_levels(self, scopes)
    }
    fn target_count(&self) -> usize {
        LocalBackend::target_count(self)
    }

    fn refresh_gauges(&self) {
        LocalBackend::refresh_gauges(self)
    }

    fn describe(&self) -> String {
        self.store_description().to_string()
    }
}

impl DecisionBackend for RedisBackend {
    async fn admit(&self, target: &str, args: &AdmitArgs<'_>) -> Result<Admission> {
        RedisBackend::admit(self, target, args).await
    }

    async fn record(
        &self,
        target: &str,
        args: OutcomeArgs<'_>,
        rand01: f64,
    ) -> Result<OutcomeResult> {
        RedisBackend::record(self, target, args, rand01).await
    }

    async fn force(&self, target: &str, mode: Mode, reason: &str) -> Result<TargetView> {
        RedisBackend::force(self, target, mode, reason).await
    }

    async fn reset(&self, target: &str) -> Result<TargetView> {
        RedisBackend::reset(self, target).await
    }

    async fn view(&self, target: &str) -> Result<TargetView> {
        RedisBackend::view(self, target).await
    }

    async fn list(&self, prefix: &str, size: usize, page_token: &str) -> Result<TargetPage> {
        RedisBackend::list(self, prefix, size, page_token).await
    }

    async fn views(&self, only: &HashSet<String>, max: usize) -> Vec<TargetView> {
        RedisBackend::views(self, only, max).await
    }

    fn ensure(&self, target: &str) -> Result<()> {
        RedisBackend::ensure(self, target)
    }

    fn sign(&self, target: &str, p: &crate::domain::unit::Permit) -> String {
        RedisBackend::sign(self, target, p)
    }

    fn verify(
        &self,
        target: &str,
        tag: u16,
        s: &str,
    ) -> std::result::Result<crate::domain::unit::Permit, crate::engine::permit::PermitError> {
        RedisBackend::verify(self, target, tag, s)
    }

    async fn reserve_spend(&self, scopes: &[Arc<SpendScope>], cost: u64) -> Result<SpendAnswer> {
        RedisBackend::reserve_spend(self, scopes, cost).await
    }
    async fn settle_spend(
        &self,
        scopes: &[Arc<SpendScope>],
        reserved: u64,
        actual: u64,
    ) -> Result<()> {
        RedisBackend::settle_spend(self, scopes, reserved, actual).await
    }
    fn spend_levels(&self, scopes: &[Arc<SpendScope>]) -> Vec<ledger::ScopeLevel> {
        RedisBackend::spend_levels(self, scopes)
    }
    fn target_count(&self) -> usize {
        RedisBackend::target_count(self)
    }

    fn refresh_gauges(&self) {
        RedisBackend::refresh_gauges(self)
    }

    fn describe(&self) -> String {
        RedisBackend::describe(self)
    }
}
