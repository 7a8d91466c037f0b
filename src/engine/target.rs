//! One target's live state and the critical sections that decide for it.
//!
//! Each target has its own mutex; a decision locks only that target (and, in
//! index order, the budget groups it draws on), does arithmetic, and unlocks.
//! There is no I/O and no await inside; the few allocations happen only when
//! something changes (events, a new lease).

use super::Reason;
use super::events::EventKind;
use super::metrics::TargetMetrics;
use super::permit::Permit;
use super::persist::Pending;
use super::settled::SettledLog;
use super::store::{LearnedRecord, SlotRecord, TargetRecord};
use crate::config::{Enforcement, TargetSettings};
use crate::domain::breaker::{
    Breaker, BreakerEvent, BreakerState, Cause, Effect, PermitRef, Refusal, Ticket, Transition,
    Trigger,
};
use crate::domain::budget::{BudgetConfig, BudgetRefusal, BudgetState, Cost, Kind, Lease, Usage};
use crate::domain::headers::Signals;
use crate::domain::retry::{Advice, RetryBudget, advise, against_open_breaker};
use crate::domain::{OutcomeClass, Time};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
pub(crate) struct Slot {
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
pub(crate) enum Slots {
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

/// Rarely-set text, boxed together so targets without any carry one pointer.
#[derive(Debug, Default)]
pub(crate) struct Notes {
    pub forced_reason: Option<Box<str>>,
    pub last_cause: Option<Box<str>>,
}

impl TargetState {
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

pub(crate) struct TargetState {
    pub breaker: Breaker,
    pub slots: Slots,
    /// Allocated on the first failure or retry: healthy targets never need it.
    pub retry: Option<Box<RetryBudget>>,
    pub counters: Counters,
    /// The next permit id: a counter that never goes back (restored with a
    /// gap after a restart), so every permit of a target is unique.
    pub next_admission: u64,
    pub notes: Option<Box<Notes>>,
    /// Which permits were settled (allocated on the first report with a permit).
    pub settled: Option<Box<SettledLog<SettledAnswer>>>,
}

/// The first answer to a permit's report, kept to answer its duplicates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct SettledAnswer {
    pub class: OutcomeClass,
    pub advice: Advice,
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
    pub(crate) settings: Arc<TargetSettings>,
    /// Pre-resolved metric handles (shared `_other` beyond the label cap).
    pub(crate) metrics: Arc<TargetMetrics>,
    /// Hash of the name: seeds jitter, tags permits, namespaces lease keys.
    pub(crate) seed: u64,
    /// What changed since the last flush: [`DIRTY_STATE`] | [`DIRTY_COUNTERS`].
    pub(crate) dirty: std::sync::atomic::AtomicU8,
    /// Sequence number of this target's latest durable write (see persist.rs).
    pub(crate) durable_seq: std::sync::atomic::AtomicU64,
    pub(crate) state: Mutex<TargetState>,
}

/// A budget group: one shared budget several targets draw on.
pub(crate) struct Group {
    pub name: Arc<str>,
    pub config: BudgetConfig,
    pub state: Mutex<BudgetState>,
    pub limited: std::sync::atomic::AtomicBool,
}

/// The decision for one admission request.
#[derive(Clone, Debug, PartialEq)]
pub struct Admission {
    pub allowed: bool,
    pub reason: Reason,
    pub state: BreakerState,
    pub retry_after: Option<Duration>,
    pub permit: Option<Permit>,
    /// `permit`, signed: what the client carries to RecordOutcome (empty when refused).
    pub token: String,
    pub key_slot: Option<Arc<str>>,
    /// Shadow mode: the refusal that was not enforced.
    pub shadow_reason: Option<Reason>,
}

/// Admission inputs.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdmitArgs<'a> {
    pub caller: &'a str,
    pub estimated_tokens: u64,
    pub attempt: u32,
}

/// How far an outcome report is trusted, from its permit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Trust {
    /// A verified, unexpired, first report of a permit this process issued:
    /// it settles its lease and reservation and may move the breaker.
    Permit(Permit),
    /// A verified permit that can no longer settle anything (expired, or
    /// issued before a restart): its generation still decides staleness, but
    /// it counts like a report without a permit.
    Late(Permit),
    /// No permit.
    None,
}

impl Trust {
    fn permit(&self) -> Option<&Permit> {
        match self {
            Trust::Permit(p) | Trust::Late(p) => Some(p),
            Trust::None => None,
        }
    }
}

/// Outcome inputs, validated by the engine.
#[derive(Clone, Debug)]
pub(crate) struct OutcomeArgs<'a> {
    pub trust: Trust,
    /// Reports without a live permit may move the breaker like any other
    /// (`outcomes_without_permit = "trusted"`); by default they only count.
    pub trust_permitless: bool,
    pub class: OutcomeClass,
    /// Parsed provider headers.
    pub signals: Signals,
    /// Clamp on any pause.
    pub max_pause: Duration,
    pub http_status: i32,
    pub error_type: &'a str,
    pub slot: usize,
    pub latency: Option<Duration>,
    pub retry_after: Option<Duration>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub attempt: u32,
    pub caller: &'a str,
}

/// The result of applying an outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct OutcomeResult {
    pub classified_as: OutcomeClass,
    pub state: BreakerState,
    pub advice: Advice,
    pub stale: bool,
    /// This permit was already reported: nothing changed, and the answer is
    /// the first report's (or, if that is no longer remembered, fresh advice).
    pub duplicate: bool,
}

/// What a critical section did that others must hear about.
#[derive(Default)]
pub(crate) struct Effects {
    pub events: Vec<EventKind>,
    /// Durable state changed: persist before answering.
    pub durable: bool,
    /// The queued write of that change, awaited before the answer leaves.
    pub pending: Option<Pending>,
    /// Budget levels, failure streaks or provider signals changed: write
    /// behind within a second.
    pub state_dirty: bool,
    /// Only counters changed (written at a graceful shutdown).
    pub counted: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Budget levels, failure streaks or provider signals changed (written behind about every second).
pub(crate) const DIRTY_STATE: u8 = 1;
/// Only counters changed (written at graceful shutdown, or with the next write).
pub(crate) const DIRTY_COUNTERS: u8 = 2;

/// Provider pauses at least this long are durable before the answer leaves.
const DURABLE_PAUSE: Duration = Duration::from_secs(1);

/// Longest wait reported for a slot refusal that has no natural end (e.g. every slot disabled).
const NEVER: Duration = Duration::from_secs(3600);

impl Target {
    pub(crate) fn new(
        name: Arc<str>,
        settings: Arc<TargetSettings>,
        metrics: Arc<TargetMetrics>,
        first_id: u64,
    ) -> Self {
        let seed = name_hash(&name);
        let slots = if settings.keys.len() > 1 {
            Slots::Many((0..settings.keys.len()).map(|_| Slot::default()).collect())
        } else {
            Slots::One(Slot::default())
        };
        Target {
            state: Mutex::new(TargetState {
                breaker: Breaker::new(seed),
                slots,
                retry: None,
                counters: Counters::default(),
                next_admission: first_id.max(1),
                notes: None,
                settled: None,
            }),
            name,
            seed,
            settings,
            dirty: std::sync::atomic::AtomicU8::new(0),
            durable_seq: std::sync::atomic::AtomicU64::new(0),
            metrics,
        }
    }

    /// The durable record of this target's state.
    pub(crate) fn to_record(&self, st: &TargetState) -> TargetRecord {
        let b = st.breaker.snapshot();
        TargetRecord {
            configured: self.settings.configured,
            state: match b.state {
                BreakerState::Closed => 1,
                BreakerState::Open => 2,
                BreakerState::HalfOpen => 3,
                BreakerState::ForcedOpen => 4,
                BreakerState::ForcedClosed => 5,
            },
            open_until: b.open_until.as_nanos(),
            opened_at: b.opened_at.as_nanos(),
            generation: b.generation,
            reopen_count: b.reopen_count,
            consecutive_failures: b.consecutive_failures,
            half_open_successes: b.half_open_successes,
            persistent_open: b.persistent_open,
            forced_reason: st.forced_reason().unwrap_or_default().to_string(),
            last_cause: st.last_cause().unwrap_or_default().to_string(),
            slots: st
                .slots
                .iter()
                .enumerate()
                .map(|(i, s)| SlotRecord {
                    name: self.slot_name(i).as_deref().unwrap_or_default().to_string(),
                    paused_until: s.paused_until.as_nanos(),
                    disabled_until: s.disabled_until.as_nanos(),
                    disabled_reason: s.disabled_reason.as_deref().unwrap_or_default().to_string(),
                    learned: s
                        .learned
                        .as_ref()
                        .map(|l| {
                            Kind::ALL
                                .iter()
                                .filter_map(|k| {
                                    l[k.index()].map(|v| LearnedRecord {
                                        kind: k.index() as u32,
                                        limit: v.limit,
                                        remaining: v.remaining,
                                        reset_at: v.reset_at.as_nanos(),
                                        observed_at: v.observed_at.as_nanos(),
                                    })
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    tats: Kind::ALL
                        .iter()
                        .map(|k| s.budget.cell(*k).tat().as_nanos())
                        .collect(),
                })
                .collect(),
            admitted: st.counters.admitted,
            refused: st.counters.refused,
            by_class: st.counters.by_class.to_vec(),
            stale: st.counters.stale,
            next_admission: st.next_admission,
        }
    }

    /// Restores state saved before a restart. Key slots are matched by name
    /// (slots no longer configured are dropped); an open period that ran out
    /// while the server was down becomes half-open at `now`.
    pub(crate) fn restore(&self, st: &mut TargetState, rec: &TargetRecord, now: Time) {
        let state = match rec.state {
            2 => BreakerState::Open,
            3 => BreakerState::HalfOpen,
            4 => BreakerState::ForcedOpen,
            5 => BreakerState::ForcedClosed,
            _ => BreakerState::Closed,
        };
        let snap = crate::domain::breaker::BreakerSnapshot {
            state,
            open_until: Time::from_nanos(rec.open_until),
            opened_at: Time::from_nanos(rec.opened_at),
            generation: rec.generation,
            reopen_count: rec.reopen_count,
            consecutive_failures: rec.consecutive_failures,
            half_open_successes: rec.half_open_successes,
            persistent_open: rec.persistent_open,
        };
        st.breaker = Breaker::restore(&snap, self.seed);
        let mut ev = Vec::new();
        st.breaker.tick(now, &self.settings.breaker, &mut ev);
        st.set_forced_reason(
            (!rec.forced_reason.is_empty()).then(|| rec.forced_reason.clone().into_boxed_str()),
        );
        st.set_last_cause(
            (!rec.last_cause.is_empty()).then(|| rec.last_cause.clone().into_boxed_str()),
        );
        // Ids issued after the last write of this counter are not in the
        // record, but this process starts its ids above any earlier one's
        // (see `first_permit_id`): keep whichever is higher.
        st.next_admission = st.next_admission.max(rec.next_admission);
        st.counters.admitted = rec.admitted;
        st.counters.refused = rec.refused;
        st.counters.stale = rec.stale;
        for (dst, src) in st.counters.by_class.iter_mut().zip(&rec.by_class) {
            *dst = *src;
        }
        for sr in &rec.slots {
            let ix = if sr.name.is_empty() {
                (self.settings.keys.is_empty()).then_some(0)
            } else {
                self.slot_index(&sr.name)
            };
            let Some(ix) = ix else { continue };
            let slot = &mut st.slots[ix];
            slot.paused_until = Time::from_nanos(sr.paused_until);
            slot.disabled_until = Time::from_nanos(sr.disabled_until);
            slot.disabled_reason = (!sr.disabled_reason.is_empty())
                .then(|| sr.disabled_reason.clone().into_boxed_str());
            for (k, tat) in Kind::ALL.iter().zip(&sr.tats) {
                slot.budget.set_cell(
                    *k,
                    crate::domain::budget::Gcra::from_tat(Time::from_nanos(*tat)),
                );
            }
            slot.budget.clamp_debt(now, &self.settings.budget);
            if !sr.learned.is_empty() {
                let mut l: [Option<Learned>; 4] = Default::default();
                for lr in &sr.learned {
                    if let Some(k) = Kind::ALL.get(lr.kind as usize) {
                        l[k.index()] = Some(Learned {
                            limit: lr.limit,
                            remaining: lr.remaining,
                            reset_at: Time::from_nanos(lr.reset_at),
                            observed_at: Time::from_nanos(lr.observed_at),
                        });
                    }
                }
                slot.learned = Some(Box::new(l));
            }
        }
    }

    pub(crate) fn tag(&self) -> u16 {
        (self.seed >> 48) as u16
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, TargetState> {
        lock(&self.state)
    }

    pub fn settings(&self) -> &Arc<TargetSettings> {
        &self.settings
    }

    /// How long a permit of this target can settle anything: its concurrency
    /// lease, or a probe lease, whichever is longer.
    pub(crate) fn permit_lifetime(&self) -> Duration {
        self.settings
            .permit_lease
            .max(self.settings.breaker.probe_lease)
    }

    /// Name of slot `i` (None for the implicit slot).
    pub(crate) fn slot_name(&self, i: usize) -> Option<Arc<str>> {
        self.settings.keys.get(i).cloned()
    }

    /// Index of the named key slot.
    pub(crate) fn slot_index(&self, name: &str) -> Option<usize> {
        self.settings.keys.iter().position(|k| k.as_ref() == name)
    }

    /// Decides one admission. Called with the state locked; locks groups itself.
    pub(crate) fn admit(
        &self,
        st: &mut TargetState,
        groups: &[Group],
        now: Time,
        args: &AdmitArgs<'_>,
        fx: &mut Effects,
    ) -> Admission {
        let cfg = &self.settings;
        let mut bev = Vec::new();
        let checked = st.breaker.check(now, &cfg.breaker, &mut bev);
        self.absorb_breaker_events(st, &bev, None, fx);
        let state = st.breaker.state();

        let refuse = |reason: Reason, retry_after: Option<Duration>| Admission {
            allowed: false,
            reason,
            state,
            retry_after,
            permit: None,
            token: String::new(),
            key_slot: None,
            shadow_reason: None,
        };

        let admission_no = st.next_admission;
        let lease = Lease {
            key: lease_key(self.seed, admission_no),
            until: now + cfg.permit_lease,
        };
        let decision: Result<(Ticket, usize, bool), Admission> = (|| {
            let ticket = match checked {
                Ok(t) => t,
                Err((r, after)) => {
                    let reason = match r {
                        Refusal::CircuitOpen => Reason::CircuitOpen,
                        Refusal::ProbeLimit => Reason::ProbeLimit,
                        Refusal::ForcedOpen => Reason::ForcedOpen,
                    };
                    return Err(refuse(reason, after));
                }
            };
            if args.attempt > 0 {
                let rb = st
                    .retry
                    .get_or_insert_with(|| Box::new(RetryBudget::new(cfg.retry.budget_window)));
                if !rb.allows(now, &cfg.retry) {
                    return Err(refuse(
                        Reason::RetryBudgetExhausted,
                        Some(Duration::from_secs(1)),
                    ));
                }
            }
            let cost = Cost {
                tokens: args.estimated_tokens,
            };
            let (slot, leased) = self
                .choose_slot(st, groups, now, cost, lease, fx)
                .map_err(|(r, a)| refuse(r, a))?;
            Ok((ticket, slot, leased))
        })();

        match decision {
            Ok((ticket, slot_ix, leased)) => {
                let permit_ref = st.breaker.commit(now, &cfg.breaker, ticket);
                st.next_admission += 1;
                self.note_budget_ok(st, groups, slot_ix, fx);
                if args.attempt > 0 {
                    if let Some(rb) = st.retry.as_mut() {
                        rb.try_retry(now, &cfg.retry);
                    }
                } else if let Some(rb) = st.retry.as_mut() {
                    rb.record_first(now);
                }
                st.counters.admitted += 1;
                fx.counted = true;
                Admission {
                    allowed: true,
                    reason: Reason::Allowed,
                    state,
                    retry_after: None,
                    permit: Some(Permit {
                        id: admission_no,
                        generation: permit_ref.generation,
                        probe: permit_ref.probe.unwrap_or(0),
                        leased,
                        slot: slot_ix as u8,
                        reserved_tokens: args.estimated_tokens,
                        issued_ms: now.as_millis(),
                        expires_ms: (now + self.permit_lifetime()).as_millis(),
                        tag: self.tag(),
                    }),
                    token: String::new(),
                    key_slot: self.slot_name(slot_ix),
                    shadow_reason: None,
                }
            }
            Err(refusal) => {
                st.counters.refused += 1;
                fx.counted = true;
                if cfg.mode == Enforcement::Shadow {
                    // Dry run: report what would have happened, admit without reserving.
                    st.counters.admitted += 1;
                    let id = st.next_admission;
                    st.next_admission += 1;
                    return Admission {
                        allowed: true,
                        reason: Reason::Allowed,
                        state,
                        retry_after: None,
                        permit: Some(Permit {
                            id,
                            generation: st.breaker.generation(),
                            issued_ms: now.as_millis(),
                            expires_ms: (now + self.permit_lifetime()).as_millis(),
                            tag: self.tag(),
                            ..Permit::default()
                        }),
                        token: String::new(),
                        key_slot: self.slot_name(0),
                        shadow_reason: Some(refusal.reason),
                    };
                }
                refusal
            }
        }
    }

    /// Picks the usable key slot with the most headroom whose budgets (and the
    /// target's groups) admit `cost`, and charges them while the group locks
    /// are still held, so that a shared group can never be overspent by two
    /// targets checking at once. Returns the slot and whether a concurrency
    /// lease was taken, or the refusal with the soonest retry.
    fn choose_slot(
        &self,
        st: &mut TargetState,
        groups: &[Group],
        now: Time,
        cost: Cost,
        lease: Lease,
        fx: &mut Effects,
    ) -> Result<(usize, bool), (Reason, Option<Duration>)> {
        let cfg = &self.settings;
        let metered = !cfg.budget.is_unlimited() || !cfg.groups.is_empty();
        let n = st.slots.len();
        // Lift pauses and disables that have run out (restoration is an event).
        for i in 0..n {
            let slot = &mut st.slots[i];
            // An expired deadline means the same after a restart whether or not
            // it was cleared, so clearing it is written behind, not waited for.
            if slot.paused_until != Time::ZERO && now >= slot.paused_until {
                slot.paused_until = Time::ZERO;
                fx.state_dirty = true;
                fx.events.push(EventKind::BudgetRestored {
                    key_slot: self.slot_name(i),
                });
            }
            if slot.disabled_until != Time::ZERO && now >= slot.disabled_until {
                slot.disabled_until = Time::ZERO;
                slot.disabled_reason = None;
                fx.state_dirty = true;
            }
        }
        if n == 1 && !metered {
            let s = &st.slots[0];
            if s.paused_until > now {
                return Err((Reason::RateLimited, Some(now.until(s.paused_until))));
            }
            if s.disabled_until > now {
                return Err((
                    Reason::KeySlotsUnavailable,
                    Some(now.until(s.disabled_until)),
                ));
            }
            return Ok((0, false));
        }
        // Order slots by headroom, rotating ties so unmetered keys share load.
        let rotate = (st.next_admission as usize) % n;
        // On the stack: at most MAX_KEY_SLOTS slots (the config enforces it).
        let mut order = [(0usize, 0f64); crate::config::MAX_KEY_SLOTS];
        let n = n.min(order.len());
        for (k, o) in order.iter_mut().enumerate().take(n) {
            let i = (k + rotate) % n;
            *o = (i, headroom(&st.slots[i].budget, &cfg.budget, now));
        }
        let order = &mut order[..n];
        order.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));

        let mut best: Option<(Reason, Option<Duration>)> = None;
        let mut consider = |reason: Reason, after: Option<Duration>| {
            let better = match (&best, after) {
                (None, _) => true,
                (Some((_, Some(b))), Some(a)) => a < *b,
                (Some((_, None)), Some(_)) => true,
                _ => false,
            };
            if better {
                best = Some((reason, after));
            }
        };
        let mut guards: Vec<MutexGuard<'_, BudgetState>> = cfg
            .groups
            .iter()
            .map(|&gi| lock(&groups[gi].state))
            .collect();
        for &(i, _) in order.iter() {
            let slot = &mut st.slots[i];
            if slot.disabled_until > now {
                consider(
                    Reason::KeySlotsUnavailable,
                    Some(now.until(slot.disabled_until).min(NEVER)),
                );
                continue;
            }
            if slot.paused_until > now {
                consider(Reason::RateLimited, Some(now.until(slot.paused_until)));
                continue;
            }
            let slot_plan = match slot.budget.check(now, &cfg.budget, cost) {
                Ok(p) => p,
                Err(r) => {
                    let (reason, mut after) = budget_reason(&r);
                    // The groups must admit too: wait for the slowest of them.
                    if let Some(a) = after.as_mut() {
                        for (g, &gi) in guards.iter().zip(&cfg.groups) {
                            if let Some(w) = g.wait_for(now, &groups[gi].config, cost) {
                                *a = (*a).max(w);
                            }
                        }
                    }
                    if !slot.limited {
                        slot.limited = true;
                        fx.events.push(EventKind::RateLimited {
                            key_slot: self.slot_name(i),
                            kind: budget_kind(&r),
                            until: now + after.unwrap_or(Duration::ZERO),
                            why: describe_refusal(&r, None),
                        });
                    }
                    consider(reason, after);
                    continue;
                }
            };
            let mut group_plans = Vec::with_capacity(guards.len());
            for (g, &gi) in guards.iter_mut().zip(&cfg.groups) {
                match g.check(now, &groups[gi].config, cost) {
                    Ok(p) => group_plans.push(p),
                    Err(r) => {
                        let (reason, after) = budget_reason(&r);
                        if !groups[gi]
                            .limited
                            .swap(true, std::sync::atomic::Ordering::Relaxed)
                        {
                            fx.events.push(EventKind::RateLimited {
                                key_slot: None,
                                kind: budget_kind(&r),
                                until: now + after.unwrap_or(Duration::ZERO),
                                why: describe_refusal(&r, Some(&groups[gi].name)),
                            });
                        }
                        // Groups are shared by every slot: no other slot can pass.
                        return Err((reason, after));
                    }
                }
            }
            let mut leased = BudgetState::plan_leases(&slot_plan);
            slot.budget.commit(&slot_plan, lease);
            fx.state_dirty = true;
            for (g, plan) in guards.iter_mut().zip(&group_plans) {
                leased |= BudgetState::plan_leases(plan);
                g.commit(plan, lease);
            }
            return Ok((i, leased));
        }
        Err(best.unwrap_or((Reason::KeySlotsUnavailable, None)))
    }

    /// Emits BudgetRestored for a slot (and groups) that had been refusing.
    fn note_budget_ok(
        &self,
        st: &mut TargetState,
        groups: &[Group],
        slot: usize,
        fx: &mut Effects,
    ) {
        if std::mem::take(&mut st.slots[slot].limited) {
            fx.events.push(EventKind::BudgetRestored {
                key_slot: self.slot_name(slot),
            });
        }
        for &gi in &self.settings.groups {
            if groups[gi]
                .limited
                .swap(false, std::sync::atomic::Ordering::Relaxed)
            {
                fx.events.push(EventKind::BudgetRestored { key_slot: None });
            }
        }
    }

    /// Applies an outcome. Called with the state locked; locks groups itself.
    pub(crate) fn record(
        &self,
        st: &mut TargetState,
        groups: &[Group],
        now: Time,
        args: &OutcomeArgs<'_>,
        fx: &mut Effects,
    ) -> OutcomeResult {
        let cfg = &self.settings;
        let (class, max_pause) = (args.class, args.max_pause);
        // Without a live permit, a report may count but not impose anything on
        // the fleet: no pause, no learned limit, no disabled key, no open at
        // once (else anyone could force a target open for the fleet).
        let trusted = matches!(args.trust, Trust::Permit(_)) || args.trust_permitless;
        let no_signals = Signals::default();
        let signals = if trusted { &args.signals } else { &no_signals };
        let streak_before = st.breaker.consecutive_failures();
        if signals.limits.iter().any(|l| !l.is_empty()) {
            fx.state_dirty = true;
        }
        st.counters.by_class[class.index()] += 1;
        fx.counted = true;
        let slot_ix = args.slot.min(st.slots.len() - 1);

        // The provider's hint: the explicit field or the headers, whichever is longer.
        let hint = match (args.retry_after, signals.retry_after) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
        .map(|d| d.min(max_pause))
        .filter(|d| !d.is_zero());
        let paused_by_hint = trusted && class == OutcomeClass::RateLimited && hint.is_some();

        // Provider signals: pauses (fleet-wide) and learned limits.
        let mut pause: Option<(Duration, String)> = None;
        if paused_by_hint {
            pause = hint.map(|d| (d, "provider answered 429 with a retry hint".to_string()));
        }
        for kind in Kind::ALL {
            let sig = signals.limit(kind);
            if sig.is_empty() {
                continue;
            }
            let slot = &mut st.slots[slot_ix];
            let learned = slot.learned.get_or_insert_with(Default::default);
            let entry = learned[kind.index()].get_or_insert_with(Learned::default);
            if let Some(l) = sig.limit {
                entry.limit = l;
            }
            if let Some(r) = sig.remaining {
                entry.remaining = r;
                slot.budget.observe_remaining(now, &cfg.budget, kind, r);
            }
            if let Some(d) = sig.reset_after {
                entry.reset_at = now + d;
            }
            entry.observed_at = now;
            if let Some(d) = sig.exhausted_for() {
                let d = d.min(max_pause);
                if pause.as_ref().is_none_or(|(p, _)| d > *p) {
                    pause = Some((
                        d,
                        format!("provider reported 0 {} remaining", kind.as_str()),
                    ));
                }
            }
        }
        if let Some((d, why)) = pause {
            let until = now + d;
            let slot = &mut st.slots[slot_ix];
            if until > slot.paused_until {
                slot.paused_until = until;
                // A pause that ends before a restart could finish cannot be
                // forgotten by one: only longer ones are made durable first.
                if d >= DURABLE_PAUSE {
                    fx.durable = true;
                } else {
                    fx.state_dirty = true;
                }
                fx.events.push(EventKind::RateLimited {
                    key_slot: self.slot_name(slot_ix),
                    kind: None,
                    until,
                    why,
                });
            }
        }

        // The breaker (or, for keyed targets, the key slot) takes the class.
        let mut effect = cfg.breaker.effect(class, args.latency, paused_by_hint);
        if let (Effect::OpenFor(..), false) = (effect, trusted) {
            // Counted like any failure: it can add to a streak, not open alone.
            effect = Effect::Failure(Trigger::Outcome(class));
        }
        if let (Effect::OpenFor(d, _), false) = (effect, cfg.keys.is_empty()) {
            // An invalid key or exhausted quota disables that key, not the model.
            let until = now + d;
            let slot = &mut st.slots[slot_ix];
            let why = describe_outcome(class, args.http_status, args.error_type);
            if until > slot.disabled_until {
                slot.disabled_until = until;
                slot.disabled_reason = Some(why.clone().into_boxed_str());
                fx.durable = true;
                if let Some(key_slot) = self.slot_name(slot_ix) {
                    fx.events.push(EventKind::KeySlotDisabled {
                        key_slot,
                        until,
                        why,
                    });
                }
            }
            effect = Effect::Ignore;
        }
        let permit_ref = args.trust.permit().map(|p| PermitRef {
            generation: p.generation,
            // A late probe permit's lease is gone: it is stale for half-open.
            probe: (p.probe != 0 && matches!(args.trust, Trust::Permit(_))).then_some(p.probe),
        });
        let mut bev = Vec::new();
        let stale = st
            .breaker
            .record(now, &cfg.breaker, permit_ref, effect, &mut bev);
        if stale {
            st.counters.stale += 1;
        }
        if !bev.is_empty() {
            // Built only when something happened: most outcomes move nothing.
            let caller = (!args.caller.is_empty()).then(|| Arc::from(args.caller));
            let detail = describe_outcome(class, args.http_status, args.error_type);
            self.absorb_breaker_events(st, &bev, Some((caller, detail)), fx);
        }

        // Settle budgets: release the concurrency slot, charge real usage.
        // A late permit (expired, or from before a restart): its lease and
        // reservation are already gone, so only the real usage is charged.
        let own = match args.trust {
            Trust::Permit(p) => Some(p),
            Trust::Late(_) | Trust::None => None,
        };
        let usage = Usage {
            reserved: own.map_or(0, |p| p.reserved_tokens),
            input: args.input_tokens,
            output: args.output_tokens,
            reported: args.input_tokens > 0 || args.output_tokens > 0,
        };
        let lease_key = own.filter(|p| p.leased).map(|p| lease_key(self.seed, p.id));
        if st.breaker.consecutive_failures() != streak_before {
            fx.state_dirty = true;
        }
        let metered = !cfg.budget.is_unlimited() || !cfg.groups.is_empty();
        if metered && (own.is_some() || usage.reported) {
            fx.state_dirty = true;
            st.slots[slot_ix]
                .budget
                .settle(now, &cfg.budget, usage, lease_key);
            for &gi in &cfg.groups {
                lock(&groups[gi].state).settle(now, &groups[gi].config, usage, lease_key);
            }
        }

        // Retry advice, against the fleet's retry budget.
        if class != OutcomeClass::Success && st.retry.is_none() {
            st.retry = Some(Box::new(RetryBudget::new(cfg.retry.budget_window)));
        }
        let budget_ok = st
            .retry
            .as_ref()
            .is_none_or(|rb| rb.allows(now, &cfg.retry));
        let slot = &st.slots[slot_ix];
        let wait = (slot.paused_until > now).then(|| now.until(slot.paused_until));
        let hint = match (hint, wait) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let mut advice = advise(
            &cfg.retry,
            class,
            args.attempt,
            hint,
            budget_ok,
            rand::random::<f64>(),
        );
        match st.breaker.state() {
            BreakerState::Open => {
                let open_for = st.breaker.open_until().map(|u| now.until(u));
                advice = against_open_breaker(advice, Some(open_for.unwrap_or_default()));
            }
            BreakerState::ForcedOpen => advice = against_open_breaker(advice, None),
            _ => {}
        }
        OutcomeResult {
            classified_as: class,
            state: st.breaker.state(),
            advice,
            stale,
            duplicate: false,
        }
    }

    /// The answer to a duplicate report of an already settled permit: the
    /// first answer when it is remembered, otherwise advice for its class
    /// against the target's current state. Changes nothing.
    pub(crate) fn duplicate_answer(
        &self,
        st: &TargetState,
        now: Time,
        class: OutcomeClass,
        attempt: u32,
        first: Option<SettledAnswer>,
    ) -> OutcomeResult {
        let (classified_as, advice) = match first {
            Some(a) => (a.class, a.advice),
            None => {
                let advice = advise(&self.settings.retry, class, attempt, None, true, 0.5);
                (class, advice)
            }
        };
        let _ = now;
        OutcomeResult {
            classified_as,
            state: st.breaker.state(),
            advice,
            stale: false,
            duplicate: true,
        }
    }

    /// Turns the breaker's events into engine events and remembers the cause.
    pub(crate) fn absorb_breaker_events(
        &self,
        st: &mut TargetState,
        bev: &[BreakerEvent],
        origin: Option<(Option<Arc<str>>, String)>,
        fx: &mut Effects,
    ) {
        for e in bev {
            match *e {
                BreakerEvent::Transition(t) => {
                    let (cause, class, failures) =
                        describe_transition(&t, origin.as_ref().map(|o| o.1.as_str()));
                    st.set_last_cause(Some(cause.clone().into_boxed_str()));
                    if t.cause == Cause::OpenElapsed {
                        // Time-driven: a restart derives it again from the
                        // durable open-until, so it is written behind.
                        fx.state_dirty = true;
                    } else {
                        fx.durable = true;
                    }
                    fx.events.push(EventKind::BreakerTransition {
                        from: t.from,
                        to: t.to,
                        cause,
                        class,
                        failures,
                        caller: origin.as_ref().and_then(|o| o.0.clone()),
                        open_until: t.open_until,
                    });
                }
                BreakerEvent::ProbeExpired { probe } => {
                    fx.events.push(EventKind::ProbeExpired { probe });
                }
                BreakerEvent::OpenExtended { until } => {
                    fx.durable = true;
                    st.set_last_cause(Some(
                        format!(
                            "open period extended by {}",
                            origin
                                .as_ref()
                                .map_or("a persistent failure", |o| o.1.as_str())
                        )
                        .into_boxed_str(),
                    ));
                    fx.events.push(EventKind::BreakerTransition {
                        from: BreakerState::Open,
                        to: BreakerState::Open,
                        cause: "open period extended by a persistent failure".into(),
                        class: Some(OutcomeClass::Persistent),
                        failures: 0,
                        caller: origin.as_ref().and_then(|o| o.0.clone()),
                        open_until: Some(until),
                    });
                }
            }
        }
    }
}

/// Fraction of the tightest budget still available (1.0 = untouched or unmetered).
fn headroom(b: &BudgetState, cfg: &BudgetConfig, now: Time) -> f64 {
    let mut h: f64 = 1.0;
    for kind in Kind::ALL {
        if let Some(rate) = cfg.rate(kind) {
            h = h.min(b.cell(kind).available(now, &rate) / rate.amount as f64);
        }
    }
    if let Some(max) = cfg.max_concurrency {
        h = h.min(1.0 - b.in_flight() as f64 / f64::from(max.max(1)));
    }
    h
}

fn budget_reason(r: &BudgetRefusal) -> (Reason, Option<Duration>) {
    match r {
        BudgetRefusal::Rate { retry_after, .. } => (Reason::RateLimited, Some(*retry_after)),
        BudgetRefusal::Concurrency { retry_after } => {
            (Reason::ConcurrencyLimit, Some(*retry_after))
        }
        BudgetRefusal::TooLarge { .. } => (Reason::RequestTooLarge, None),
    }
}

fn budget_kind(r: &BudgetRefusal) -> Option<Kind> {
    match r {
        BudgetRefusal::Rate { kind, .. } | BudgetRefusal::TooLarge { kind, .. } => Some(*kind),
        BudgetRefusal::Concurrency { .. } => None,
    }
}

fn describe_refusal(r: &BudgetRefusal, group: Option<&str>) -> String {
    let scope = group.map_or(String::new(), |g| format!(" of budget group {g:?}"));
    match r {
        BudgetRefusal::Rate { kind, .. } => format!("{} budget{scope} exhausted", kind.as_str()),
        BudgetRefusal::Concurrency { .. } => format!("max_concurrency{scope} reached"),
        BudgetRefusal::TooLarge {
            kind,
            cost,
            capacity,
        } => {
            format!(
                "request of {cost} {} exceeds the budget{scope} of {capacity}",
                kind.as_str()
            )
        }
    }
}

pub(crate) fn describe_outcome(class: OutcomeClass, status: i32, error_type: &str) -> String {
    let mut s = class.as_str().to_string();
    if status != 0 || !error_type.is_empty() {
        s.push_str(" (");
        if status != 0 {
            s.push_str(&format!("http {status}"));
        }
        if !error_type.is_empty() {
            if status != 0 {
                s.push(' ');
            }
            s.extend(error_type.chars().take(64));
        }
        s.push(')');
    }
    s
}

fn trigger_class(t: Trigger) -> Option<OutcomeClass> {
    match t {
        Trigger::Outcome(c) => Some(c),
        Trigger::SlowCall => None,
    }
}

fn describe_transition(
    t: &Transition,
    outcome: Option<&str>,
) -> (String, Option<OutcomeClass>, u32) {
    let last = outcome.map_or(String::new(), |o| format!("; last: {o}"));
    match t.cause {
        Cause::ConsecutiveFailures { count, trigger } => {
            let what = match trigger {
                Trigger::Outcome(c) => format!("{c} failures"),
                Trigger::SlowCall => "slow calls".into(),
            };
            (
                format!("{count} consecutive {what}{last}"),
                trigger_class(trigger),
                count,
            )
        }
        Cause::FailureRate { failures, calls } => (
            format!("failure rate {failures}/{calls} over the window{last}"),
            None,
            u32::try_from(failures).unwrap_or(u32::MAX),
        ),
        Cause::Persistent { class } => (format!("persistent failure{last}"), Some(class), 1),
        Cause::ProbeFailed { trigger } => {
            (format!("probe failed{last}"), trigger_class(trigger), 1)
        }
        Cause::OpenElapsed => ("open period elapsed".into(), None, 0),
        Cause::ProbesSucceeded { count } => (
            format!("{count} probe successes"),
            Some(OutcomeClass::Success),
            0,
        ),
        Cause::Operator { mode } => {
            let what = match mode {
                crate::domain::breaker::Mode::ForcedOpen => "operator forced it open",
                crate::domain::breaker::Mode::ForcedClosed => "operator forced it closed",
                crate::domain::breaker::Mode::Automatic => "operator returned it to automatic",
            };
            (what.to_string(), None, 0)
        }
        Cause::Reset => ("operator reset".into(), None, 0),
    }
}

/// The first permit id a process issues for a new target: its start time in
/// milliseconds, shifted so each millisecond owns 2^20 ids. A later start
/// begins above everything an earlier one could have issued (it would need a
/// million admissions per millisecond of uptime to catch up), so ids stay
/// unique per target across restarts without waiting for any write.
pub(crate) fn first_permit_id(boot: Time) -> u64 {
    boot.as_millis().saturating_mul(1 << 20).max(1)
}

/// Concurrency lease keys: unique across targets (groups hold leases of
/// many) and processes (a permit settles on any replica): a mix of the
/// target's name hash and the permit id (a collision needs 2^32 live leases).
pub(crate) fn lease_key(target_seed: u64, permit_id: u64) -> u64 {
    crate::domain::breaker::mix64(target_seed ^ permit_id.rotate_left(29))
}

/// FNV-1a, mixed: stable across processes (permit tags must survive restarts).
pub(crate) fn name_hash(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    crate::domain::breaker::mix64(h)
}

#[cfg(test)]
mod size_tests {
    /// A million resident targets must fit in 512 MiB (BENCHMARKS.md measures
    /// ~490 bytes each, map and name included): keep the per-target struct lean.
    #[test]
    fn a_target_stays_small() {
        assert!(
            std::mem::size_of::<super::Target>() <= 352,
            "{}",
            std::mem::size_of::<super::Target>()
        );
        assert!(std::mem::size_of::<super::Slot>() <= 88);
    }
}
