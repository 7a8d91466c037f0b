//! One target as the local backend holds it: identity and settings (read
//! by every decision, never written) and its state behind its own mutex.
//!
//! Settings never change in place: a config reload that changes them puts
//! a new `Target` in the map with the state carried over, and marks the old
//! one `retired` under its lock, so a decision that looked up the old one
//! just before notices and looks again (see `reload.rs`).

use super::LocalGroup;
use crate::config::TargetSettings;
use crate::domain::unit::settled::SettledLog;
use crate::domain::unit::{SettledAnswer, TargetState, UnitCx, name_hash};
use crate::metrics::TargetMetrics;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};

/// What the mutex guards: the unit's state, and which of its permits were
/// settled (kept beside the state, not in it: it is this process's memory,
/// while the state is what travels).
#[derive(Debug)]
pub(crate) struct Locked {
    pub st: TargetState,
    /// Allocated on the first report with a permit.
    pub settled: Option<Box<SettledLog<SettledAnswer>>>,
}

/// A target's settings with its budget groups resolved: shared by every
/// target with the same settings (all first-use targets share one), so it
/// costs a target one pointer.
pub(crate) struct Conf {
    pub settings: Arc<TargetSettings>,
    /// The groups it draws on, sorted by [`LocalGroup::id`]: every decision
    /// locks them in that order, which stays one total order across reloads
    /// (config indexes do not), so two decisions can never deadlock.
    pub groups: Box<[Arc<LocalGroup>]>,
}

/// A target: name, settings and state.
/// Field order is deliberate (`repr(C)` keeps it): the read-mostly fields
/// come first and the mutex-guarded state last, so threads deciding on a hot
/// target do not invalidate each other's cached copy of the name, settings and
/// metric handles while they write the state. Measured with `cargo bench
/// --bench decision`: 2 threads on one target went from 690 ns back to 220 ns
/// per decision once a new field had pushed them onto a shared cache line.
#[repr(C)]
pub struct Target {
    pub name: Arc<str>,
    pub(crate) conf: Arc<Conf>,
    /// Pre-resolved metric handles (shared `_other` beyond the label cap).
    pub(crate) metrics: Arc<TargetMetrics>,
    /// Hash of the name: seeds jitter, tags permits, namespaces lease keys.
    pub(crate) seed: u64,
    /// What changed since the last flush: [`DIRTY_STATE`] | [`DIRTY_COUNTERS`].
    pub(crate) dirty: AtomicU8,
    /// Replaced by a reload (or removed from the config): this state is no
    /// longer the target's, so a decision that finds it set (under the
    /// lock, which orders it) looks up again. In `dirty`'s padding.
    pub(crate) retired: AtomicBool,
    /// Sequence number of this target's latest durable write (see persist.rs).
    pub(crate) durable_seq: AtomicU64,
    pub(crate) state: Mutex<Locked>,
}

/// Budget levels, failure streaks or provider signals changed (written behind about every second).
pub(crate) const DIRTY_STATE: u8 = 1;
/// Only counters changed (written at graceful shutdown, or with the next write).
pub(crate) const DIRTY_COUNTERS: u8 = 2;

impl Target {
    pub(crate) fn new(
        name: Arc<str>,
        conf: Arc<Conf>,
        metrics: Arc<TargetMetrics>,
        first_id: u64,
    ) -> Self {
        let seed = name_hash(&name);
        Target {
            state: Mutex::new(Locked {
                st: TargetState::new(seed, conf.settings.keys.len(), first_id),
                settled: None,
            }),
            name,
            seed,
            conf,
            dirty: AtomicU8::new(0),
            retired: AtomicBool::new(false),
            durable_seq: AtomicU64::new(0),
            metrics,
        }
    }

    /// What the pure decision functions read besides the state.
    pub(crate) fn cx(&self) -> UnitCx<'_> {
        UnitCx {
            settings: &self.conf.settings,
            seed: self.seed,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Locked> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn settings(&self) -> &Arc<TargetSettings> {
        &self.conf.settings
    }
}

#[cfg(test)]
mod size_tests {
    /// A million resident targets must fit in 512 MiB (BENCHMARKS.md measures
    /// ~500 bytes each, map and name included): keep the per-target struct
    /// lean. 344 bytes + the Arc's counts is a 368-byte allocation; 352 would
    /// be a 384-byte one.
    #[test]
    fn a_target_stays_small() {
        assert!(
            std::mem::size_of::<super::Target>() <= 344,
            "{}",
            std::mem::size_of::<super::Target>()
        );
        assert!(std::mem::size_of::<crate::domain::unit::Slot>() <= 88);
    }
}
