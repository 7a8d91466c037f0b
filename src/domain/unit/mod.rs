//! One admission unit's decisions as pure functions over its state.
//!
//! Everything that decides for a target lives here, free of locks, clocks,
//! randomness and I/O: `now` and a random `unit` are arguments, and what
//! happened comes back as [`Effects`] (events to publish, and whether the
//! change must be durable before the answer leaves). That is what makes the
//! state able to travel: the local backend runs these functions under a
//! per-target mutex, the Redis backend runs the very same functions on state
//! it read from Redis and writes back atomically, and a differential test can
//! drive both with the same inputs.
//!
//! * [`state`]: the data ([`TargetState`], [`GroupState`]);
//! * [`admit`]: may a call go ahead (breaker, retry budget, key slots, budgets);
//! * [`outcome`]: what a reported outcome does (classification already done);
//! * [`operate`]: time passing, operator overrides and resets;
//! * [`narrate`]: breaker events turned into fleet events with readable causes;
//! * [`codec`]: the state as a protobuf record (persistence and Redis);
//! * [`view`]: the state as operators and dashboards see it.

pub mod admit;
pub mod codec;
pub mod merge;
pub mod narrate;
pub mod operate;
pub mod outcome;
pub mod permit;
pub mod settled;
pub mod state;
pub mod view;

#[cfg(test)]
mod quorum_tests;

pub use admit::{Admission, AdmitArgs, admit};
pub use outcome::{OutcomeArgs, OutcomeResult, SettledAnswer, Trust, duplicate_answer, record};
pub use permit::Permit;
pub use state::{Counters, GroupState, Learned, Notes, Slot, Slots, TargetState};

use super::Time;
use super::budget::BudgetConfig;
use super::event::EventKind;
use crate::config::TargetSettings;
use std::sync::Arc;
use std::time::Duration;

/// The budget a target's key slots enforce now: its configured budget, with
/// an adaptive target's learned concurrency limit in place of the fixed one.
/// Borrowed unless the target is adaptive.
pub fn slot_budget<'a>(
    settings: &'a TargetSettings,
    st: &TargetState,
) -> std::borrow::Cow<'a, BudgetConfig> {
    match &settings.budget.adaptive {
        Some(a) => {
            std::borrow::Cow::Owned(settings.budget.with_concurrency(a.effective(st.adaptive())))
        }
        None => std::borrow::Cow::Borrowed(&settings.budget),
    }
}

/// What a decision reads besides its state: the target's settings and
/// identity (the seed is a hash of its name).
#[derive(Clone, Copy, Debug)]
pub struct UnitCx<'a> {
    pub settings: &'a TargetSettings,
    pub seed: u64,
}

impl UnitCx<'_> {
    /// Name of key slot `i` (None for the implicit slot).
    pub fn slot_name(&self, i: usize) -> Option<Arc<str>> {
        self.settings.keys.get(i).cloned()
    }

    /// Index of the named key slot.
    pub fn slot_index(&self, name: &str) -> Option<usize> {
        self.settings.keys.iter().position(|k| k.as_ref() == name)
    }

    /// 16 bits of the name hash, stamped on permits.
    pub fn tag(&self) -> u16 {
        tag(self.seed)
    }

    /// How long a permit of this target can settle anything: its concurrency
    /// lease, or a probe lease, whichever is longer.
    pub fn permit_lifetime(&self) -> Duration {
        self.settings
            .permit_lease
            .max(self.settings.breaker.probe_lease)
    }
}

/// A shared budget group a decision draws on, in the order of the target's
/// `groups` (the caller holds it exclusively for the decision).
pub struct GroupRef<'a> {
    pub name: &'a str,
    pub config: &'a BudgetConfig,
    pub state: &'a mut GroupState,
}

/// What a decision did that others must hear about.
#[derive(Debug, Default)]
pub struct Effects {
    pub events: Vec<EventKind>,
    /// Durable state changed: persist before answering.
    pub durable: bool,
    /// Budget levels, failure streaks or provider signals changed: write
    /// behind within a second.
    pub state_dirty: bool,
    /// Only counters changed (written at a graceful shutdown).
    pub counted: bool,
    /// An adaptive target's learned concurrency limit moved to this (the
    /// engine sets its gauge; events are published only on larger moves).
    pub adaptive_limit: Option<u32>,
}

/// Provider pauses at least this long are durable before the answer leaves.
pub(crate) const DURABLE_PAUSE: Duration = Duration::from_secs(1);

/// Longest wait reported for a slot refusal that has no natural end (e.g. every slot disabled).
pub(crate) const NEVER: Duration = Duration::from_secs(3600);

/// The permit tag of a target with this name hash.
pub fn tag(seed: u64) -> u16 {
    (seed >> 48) as u16
}

/// The first permit id a process issues for a new target: its start time in
/// milliseconds, shifted so each millisecond owns 2^20 ids. A later start
/// begins above everything an earlier one could have issued (it would need a
/// million admissions per millisecond of uptime to catch up), so ids stay
/// unique per target across restarts without waiting for any write.
pub fn first_permit_id(boot: Time) -> u64 {
    boot.as_millis().saturating_mul(1 << 20).max(1)
}

/// Concurrency lease keys: unique across targets (groups hold leases of
/// many) and processes (a permit settles on any replica): a mix of the
/// target's name hash and the permit id (a collision needs 2^32 live leases).
pub fn lease_key(target_seed: u64, permit_id: u64) -> u64 {
    crate::domain::breaker::mix64(target_seed ^ permit_id.rotate_left(29))
}

/// FNV-1a, mixed: stable across processes (permit tags must survive restarts).
pub fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    crate::domain::breaker::mix64(h)
}
