//! The state of one admission unit: everything its decisions read and write.
//!
//! A unit is a target (its breaker, key slots with their budgets, pauses,
//! disabled keys and learned provider limits, its retry budget, counters and
//! permit counter) plus, for targets in shared budget groups, the groups'
//! [`GroupState`]s. It is plain data: the local backend keeps it behind a
//! mutex per target, the Redis backend serialises it ([`super::codec`]) and
//! keeps it in Redis. The transitions over it are pure functions in
//! [`super::admit`], [`super::outcome`] and [`super::operate`].

use crate::domain::Time;
use crate::domain::adaptive::AdaptiveState;
use crate::domain::breaker::Breaker;
use crate::domain::budget::BudgetState;
use crate::domain::retry::RetryBudget;

/// What a provider's headers last said about one budget kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub limit: u64,
    pub remaining: u64,
    pub reset_at: Time,
    pub observed_at: Time,
}

/// One key slot (or the implicit slot of a target without keys).
#[derive(Debug, Default)]
pub struct Slot {
    pub budget: BudgetState,
    /// The provider asked the fleet to wait until then.
    pub paused_until: Time,
    /// Disabled by a PERSISTENT outcome until then.
    pub disabled_until: Time,
    pub disabled_reason: Option<Box<str>>,
    pub learned: Option<Box<[Option<Learned>; 4]>>,
    /// Set while the slot is refusing for budget reasons, so that
    /// RateLimited / BudgetRestored events fire on edges only.
    pub limited: bool,
}

/// Totals since creation or reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub admitted: u64,
    pub refused: u64,
    pub by_class: [u64; 7],
    pub stale: u64,
}

/// A target's key slots: one inline (the common case: no declared keys), or
/// several on the heap.
#[derive(Debug)]
pub enum Slots {
    One(Slot),
    Many(Box<[Slot]>),
}

impl std::ops::Deref for Slots {
    type Target = [Slot];
    fn deref(&self) -> &[Slot] {
        match self {
            Slots::One(s) => std::slice::from_ref(s),
            Slots::Many(v) => v,
        }
    }
}

impl std::ops::DerefMut for Slots {
    fn deref_mut(&mut self) -> &mut [Slot] {
        match self {
            Slots::One(s) => std::slice::from_mut(s),
            Slots::Many(v) => v,
        }
    }
}

/// The rarely needed parts of a target's state, boxed together so a target
/// that never needed any carries one pointer (a million idle targets must
/// fit in 512 MiB): operator text, and the fleet retry budget (created on
/// the first failure or retry; healthy targets never need it).
#[derive(Debug, Default)]
pub struct Notes {
    pub forced_reason: Option<Box<str>>,
    pub last_cause: Option<Box<str>>,
    pub retry: Option<RetryBudget>,
    /// Moving average of reported latency, in microseconds (0 = none yet).
    pub latency_us: u32,
    /// Money spent, and the target's spend limit cell (priced targets only).
    pub spend: crate::domain::spend::Spend,
    /// The learned concurrency limit of a `max_concurrency = "adaptive"`
    /// target (None until its first outcome, or when not adaptive). Here,
    /// not inline, so targets with fixed limits pay nothing for it.
    pub adaptive: Option<AdaptiveState>,
}

/// Weight of each new latency in the moving average.
pub const LATENCY_ALPHA: f64 = 0.2;

/// One target's decision state.
#[derive(Debug)]
pub struct TargetState {
    pub breaker: Breaker,
    pub slots: Slots,
    pub counters: Counters,
    /// The next permit id: a counter that never goes back (see
    /// [`super::first_permit_id`]), so every permit of a target is unique.
    pub next_admission: u64,
    pub notes: Option<Box<Notes>>,
}

impl TargetState {
    /// A fresh target: closed breaker, full budgets, one slot per key (or
    /// the implicit slot), first permit id `first_id`.
    pub fn new(seed: u64, key_slots: usize, first_id: u64) -> TargetState {
        let slots = if key_slots > 1 {
            Slots::Many((0..key_slots).map(|_| Slot::default()).collect())
        } else {
            Slots::One(Slot::default())
        };
        TargetState {
            breaker: Breaker::new(seed),
            slots,
            counters: Counters::default(),
            next_admission: first_id.max(1),
            notes: None,
        }
    }
}

impl TargetState {
    /// The fleet retry budget, if one was needed yet.
    pub fn retry(&self) -> Option<&RetryBudget> {
        self.notes.as_ref().and_then(|n| n.retry.as_ref())
    }
    pub fn retry_mut(&mut self) -> Option<&mut RetryBudget> {
        self.notes.as_mut().and_then(|n| n.retry.as_mut())
    }
    /// The retry budget, created (over `window`) if there is none yet.
    pub fn retry_or_new(&mut self, window: std::time::Duration) -> &mut RetryBudget {
        self.notes
            .get_or_insert_with(Default::default)
            .retry
            .get_or_insert_with(|| RetryBudget::new(window))
    }
    pub fn set_retry(&mut self, r: Option<RetryBudget>) {
        if r.is_some() || self.notes.is_some() {
            self.notes.get_or_insert_with(Default::default).retry = r;
        }
    }

    /// The target's spending (default: nothing spent, limit untouched).
    pub fn spend(&self) -> crate::domain::spend::Spend {
        self.notes.as_ref().map(|n| n.spend).unwrap_or_default()
    }
    pub fn spend_mut(&mut self) -> &mut crate::domain::spend::Spend {
        &mut self.notes.get_or_insert_with(Default::default).spend
    }

    /// Recent latency (a moving average of trusted reports), if any.
    pub fn latency(&self) -> Option<std::time::Duration> {
        self.notes
            .as_ref()
            .map(|n| n.latency_us)
            .filter(|&us| us > 0)
            .map(|us| std::time::Duration::from_micros(u64::from(us)))
    }
    pub fn set_latency(&mut self, d: Option<std::time::Duration>) {
        if d.is_some() || self.notes.is_some() {
            self.notes.get_or_insert_with(Default::default).latency_us =
                d.map_or(0, |d| d.as_micros().clamp(1, u128::from(u32::MAX)) as u32);
        }
    }
    /// Folds one latency into the moving average (weight [`LATENCY_ALPHA`]):
    /// recent enough that a slowdown shows within a handful of calls, smooth
    /// enough that one slow reply does not flip a `lowest_latency` route.
    pub fn observe_latency(&mut self, d: std::time::Duration) {
        let x = d.as_micros() as f64;
        let next = match self.latency() {
            Some(prev) => {
                let p = prev.as_micros() as f64;
                p + LATENCY_ALPHA * (x - p)
            }
            None => x,
        };
        self.set_latency(Some(std::time::Duration::from_micros(next as u64)));
    }

    /// What an adaptive target has learned, if anything yet.
    pub fn adaptive(&self) -> Option<&AdaptiveState> {
        self.notes.as_ref().and_then(|n| n.adaptive.as_ref())
    }
    /// The learned state, started with `start` if there is none yet.
    pub fn adaptive_or(&mut self, start: AdaptiveState) -> &mut AdaptiveState {
        self.notes
            .get_or_insert_with(Default::default)
            .adaptive
            .get_or_insert(start)
    }
    pub fn set_adaptive(&mut self, a: Option<AdaptiveState>) {
        if a.is_some() || self.notes.is_some() {
            self.notes.get_or_insert_with(Default::default).adaptive = a;
        }
    }

    /// Why an operator forced the breaker, if they said.
    pub fn forced_reason(&self) -> Option<&str> {
        self.notes.as_ref().and_then(|n| n.forced_reason.as_deref())
    }
    pub fn last_cause(&self) -> Option<&str> {
        self.notes.as_ref().and_then(|n| n.last_cause.as_deref())
    }
    pub fn set_forced_reason(&mut self, r: Option<Box<str>>) {
        if r.is_some() || self.notes.is_some() {
            self.notes
                .get_or_insert_with(Default::default)
                .forced_reason = r;
        }
    }
    pub fn set_last_cause(&mut self, c: Option<Box<str>>) {
        if c.is_some() || self.notes.is_some() {
            self.notes.get_or_insert_with(Default::default).last_cause = c;
        }
    }
}

/// A shared budget group's state: its budget and whether it is refusing
/// (so RateLimited / BudgetRestored are published on edges only).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupState {
    pub budget: BudgetState,
    pub limited: bool,
    /// The group's spend limit cell and total.
    pub spend: crate::domain::spend::Spend,
}
