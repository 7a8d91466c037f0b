//! Admission: may a call go to this target now, and what does it reserve?

use super::narrate::{absorb_breaker_events, describe_refusal};
use super::state::TargetState;
use super::{Effects, GroupRef, NEVER, Permit, UnitCx, lease_key};
use crate::config::Enforcement;
use crate::domain::Reason;
use crate::domain::Time;
use crate::domain::adaptive;
use crate::domain::breaker::{BreakerState, Refusal, Ticket};
use crate::domain::budget::{
    BudgetConfig, BudgetRefusal, BudgetState, Cost, Kind, Lease, Priority, Rate,
};
use crate::domain::event::EventKind;
use std::sync::Arc;
use std::time::Duration;

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
    /// Cluster mode: decided without Redis (from this replica's last known state).
    pub degraded: bool,
}

/// Admission inputs.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdmitArgs<'a> {
    pub caller: &'a str,
    pub estimated_tokens: u64,
    pub attempt: u32,
    /// Budgets with a `reserve` refuse lower priorities first.
    pub priority: Priority,
    /// Output tokens the call may produce: reserved at the output price
    /// against spend limits (0 = only the input estimate is reserved).
    pub max_output_tokens: u64,
    /// The engine reserved this call's cost against route, caller or tenant
    /// spend limits: the permit carries the cost even when the target and
    /// its groups have no limit of their own, so the outcome settles it.
    pub spend_scoped: bool,
}

/// Decides one admission: breaker (and half-open probe slots), the fleet's
/// retry budget, key slots, the target's budgets and its groups'. All or
/// nothing: a refusal charges nothing. `groups` are the target's budget
/// groups in its `groups` order, held exclusively by the caller.
pub fn admit(
    cx: &UnitCx<'_>,
    st: &mut TargetState,
    groups: &mut [GroupRef<'_>],
    now: Time,
    args: &AdmitArgs<'_>,
    fx: &mut Effects,
) -> Admission {
    let cfg = cx.settings;
    let mut bev = Vec::new();
    let checked = st.breaker.check(now, &cfg.breaker, &mut bev);
    absorb_breaker_events(cx, st, &bev, None, fx);
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
        degraded: false,
    };

    let admission_no = st.next_admission;
    let lease = Lease {
        key: lease_key(cx.seed, admission_no),
        until: now + cfg.permit_lease,
    };
    // The refusal is the answer itself, built once and returned as is: no
    // point boxing it for a closure that runs once per decision.
    #[allow(clippy::result_large_err)]
    let decision: Result<(Ticket, usize, bool, SpendPlan), Admission> = (|| {
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
            let rb = st.retry_or_new(cfg.retry.budget_window);
            if !rb.allows(now, &cfg.retry) {
                return Err(refuse(
                    Reason::RetryBudgetExhausted,
                    Some(Duration::from_secs(1)),
                ));
            }
        }
        let cost = Cost {
            tokens: args.estimated_tokens,
            priority: args.priority,
        };
        let spend = check_spend(cx, st, groups, now, args, fx).map_err(|(r, a)| refuse(r, a))?;
        let (slot, leased) =
            choose_slot(cx, st, groups, now, cost, lease, fx).map_err(|(r, a)| refuse(r, a))?;
        Ok((ticket, slot, leased, spend))
    })();

    match decision {
        Ok((ticket, slot_ix, leased, spend)) => {
            let reserved_spend = spend.commit(st, groups);
            if let (Some(b), true) = (&cfg.budget.adaptive, leased) {
                // Filling an adaptive limit is what lets it grow.
                let in_flight = st.slots[slot_ix].budget.in_flight() as u32;
                adaptive::note_admitted(b, st.adaptive_or(b.start()), in_flight);
            }
            let permit_ref = st.breaker.commit(now, &cfg.breaker, ticket);
            st.next_admission += 1;
            note_budget_ok(cx, st, groups, slot_ix, fx);
            if args.attempt > 0 {
                if let Some(rb) = st.retry_mut() {
                    rb.try_retry(now, &cfg.retry);
                }
            } else if let Some(rb) = st.retry_mut() {
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
                    reserved_spend,
                    scopes: [0; 3],
                    issued_ms: now.as_millis(),
                    expires_ms: (now + cx.permit_lifetime()).as_millis(),
                    tag: cx.tag(),
                }),
                token: String::new(),
                key_slot: cx.slot_name(slot_ix),
                shadow_reason: None,
                degraded: false,
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
                        expires_ms: (now + cx.permit_lifetime()).as_millis(),
                        tag: cx.tag(),
                        ..Permit::default()
                    }),
                    token: String::new(),
                    key_slot: cx.slot_name(0),
                    shadow_reason: Some(refusal.reason),
                    degraded: false,
                };
            }
            refusal
        }
    }
}

/// A spend reservation checked against every limit it draws on (the
/// target's and its groups'), applied only once the whole admission passed.
struct SpendPlan {
    cost: u64,
    target: Option<Time>,
    /// Per group, in the target's group order (empty when no limit applies).
    groups: Vec<Option<Time>>,
}

impl SpendPlan {
    /// Applies the reservation; returns it (what the permit carries).
    fn commit(&self, st: &mut TargetState, groups: &mut [GroupRef<'_>]) -> u64 {
        if let Some(tat) = self.target {
            st.spend_mut().commit(tat);
        }
        for (g, tat) in groups.iter_mut().zip(self.groups.iter().copied()) {
            if let Some(tat) = tat {
                g.state.spend.commit(tat);
            }
        }
        self.cost
    }
}

/// Checks the call's reservation (estimated input at the input price, plus
/// `max_output_tokens` at the output price) against the target's spend
/// limit and its groups'. Changes nothing but the edge flags (the
/// SpendLimitReached event fires once per episode, not per refusal).
fn check_spend(
    cx: &UnitCx<'_>,
    st: &mut TargetState,
    groups: &mut [GroupRef<'_>],
    now: Time,
    args: &AdmitArgs<'_>,
    fx: &mut Effects,
) -> Result<SpendPlan, (Reason, Option<Duration>)> {
    let cfg = cx.settings;
    // Most targets have no spend limit: one test, no arithmetic, nothing
    // reserved (their spend is still counted when the outcome reports usage).
    let prices = crate::domain::spend::Prices {
        input: cfg.cost_per_mtok_input,
        output: cfg.cost_per_mtok_output,
    };
    let limited = cfg.budget.spend.is_some() || groups.iter().any(|g| g.config.spend.is_some());
    let mut plan = SpendPlan {
        cost: 0,
        target: None,
        groups: Vec::new(),
    };
    if !limited && !args.spend_scoped {
        return Ok(plan);
    }
    let cost = prices.micros(args.estimated_tokens, args.max_output_tokens);
    plan.cost = cost;
    if cost == 0 || !limited {
        return Ok(plan);
    }
    let scopes = std::iter::once((None, &cfg.budget))
        .chain(groups.iter().enumerate().map(|(i, g)| (Some(i), g.config)));
    let mut refusal: Option<(Option<usize>, Rate, Duration)> = None;
    let mut tats = Vec::with_capacity(groups.len() + 1);
    for (scope, bc) in scopes {
        let Some(limit) = bc.spend else { continue };
        if cost > limit.amount {
            return Err((Reason::RequestTooLarge, None));
        }
        let held = bc.held_back(args.priority);
        let spend = match scope {
            None => st.spend(),
            Some(i) => groups[i].state.spend,
        };
        match spend.check(now, &limit, cost, held) {
            Ok(tat) => tats.push((scope, tat)),
            Err(wait) => {
                if refusal.is_none_or(|(_, _, w)| wait > w) {
                    refusal = Some((scope, limit, wait));
                }
            }
        }
    }
    if let Some((scope, limit, wait)) = refusal {
        let (flag, name) = match scope {
            None => (&mut st.spend_mut().limited, Arc::from("target")),
            Some(i) => (
                &mut groups[i].state.spend.limited,
                Arc::from(groups[i].name),
            ),
        };
        if !std::mem::replace(flag, true) {
            fx.state_dirty = true;
            fx.events.push(EventKind::SpendLimitReached {
                scope: name,
                limit: crate::domain::spend::dollars(limit.amount),
                window: limit.window,
                retry_after: wait,
            });
        }
        return Err((Reason::SpendLimit, Some(wait)));
    }
    plan.groups = vec![None; groups.len()];
    for (scope, tat) in tats {
        match scope {
            None => plan.target = Some(tat),
            Some(i) => plan.groups[i] = Some(tat),
        }
    }
    Ok(plan)
}

/// Picks the usable key slot with the most headroom whose budgets (and the
/// target's groups) admit `cost`, and charges them together, so that a
/// shared group can never be overspent by two targets checking at once (the
/// caller holds the groups for the whole decision). Returns the slot and whether a concurrency
/// lease was taken, or the refusal with the soonest retry.
fn choose_slot(
    cx: &UnitCx<'_>,
    st: &mut TargetState,
    groups: &mut [GroupRef<'_>],
    now: Time,
    cost: Cost,
    lease: Lease,
    fx: &mut Effects,
) -> Result<(usize, bool), (Reason, Option<Duration>)> {
    let cfg = cx.settings;
    let metered = !cfg.budget.is_unlimited() || !cfg.groups.is_empty();
    // An adaptive target enforces what it has learned, reserves included.
    let budget = super::slot_budget(cfg, st);
    let budget: &BudgetConfig = &budget;
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
                key_slot: cx.slot_name(i),
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
        *o = (i, headroom(&st.slots[i].budget, budget, now));
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
        let slot_plan = match slot.budget.check(now, budget, cost) {
            Ok(p) => p,
            Err(r) => {
                let (reason, mut after) = budget_reason(&r);
                // The groups must admit too: wait for the slowest of them.
                if let Some(a) = after.as_mut() {
                    for g in groups.iter() {
                        if let Some(w) = g.state.budget.wait_for(now, g.config, cost) {
                            *a = (*a).max(w);
                        }
                    }
                }
                // Held back for higher priorities is not a limit being hit:
                // no RateLimited event (the budget still serves the fleet).
                let reserved = matches!(r, BudgetRefusal::Reserved { .. });
                if !slot.limited && !reserved {
                    slot.limited = true;
                    fx.events.push(EventKind::RateLimited {
                        key_slot: cx.slot_name(i),
                        kind: budget_kind(&r),
                        until: now + after.unwrap_or(Duration::ZERO),
                        why: describe_refusal(&r, None),
                    });
                }
                consider(reason, after);
                continue;
            }
        };
        let mut group_plans = Vec::with_capacity(groups.len());
        for g in groups.iter_mut() {
            match g.state.budget.check(now, g.config, cost) {
                Ok(p) => group_plans.push(p),
                Err(r) => {
                    let (reason, after) = budget_reason(&r);
                    let reserved = matches!(r, BudgetRefusal::Reserved { .. });
                    if !reserved && !std::mem::replace(&mut g.state.limited, true) {
                        fx.events.push(EventKind::RateLimited {
                            key_slot: None,
                            kind: budget_kind(&r),
                            until: now + after.unwrap_or(Duration::ZERO),
                            why: describe_refusal(&r, Some(g.name)),
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
        for (g, plan) in groups.iter_mut().zip(&group_plans) {
            leased |= BudgetState::plan_leases(plan);
            g.state.budget.commit(plan, lease);
        }
        return Ok((i, leased));
    }
    Err(best.unwrap_or((Reason::KeySlotsUnavailable, None)))
}

/// Emits BudgetRestored for a slot (and groups) that had been refusing.
fn note_budget_ok(
    cx: &UnitCx<'_>,
    st: &mut TargetState,
    groups: &mut [GroupRef<'_>],
    slot: usize,
    fx: &mut Effects,
) {
    if std::mem::take(&mut st.slots[slot].limited) {
        fx.events.push(EventKind::BudgetRestored {
            key_slot: cx.slot_name(slot),
        });
    }
    for g in groups.iter_mut() {
        if std::mem::take(&mut g.state.limited) {
            fx.events.push(EventKind::BudgetRestored { key_slot: None });
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

pub(crate) fn budget_reason(r: &BudgetRefusal) -> (Reason, Option<Duration>) {
    match r {
        BudgetRefusal::Rate { retry_after, .. } => (Reason::RateLimited, Some(*retry_after)),
        BudgetRefusal::Concurrency { retry_after } => {
            (Reason::ConcurrencyLimit, Some(*retry_after))
        }
        BudgetRefusal::TooLarge { .. } => (Reason::RequestTooLarge, None),
        BudgetRefusal::Reserved { retry_after, .. } => {
            (Reason::PriorityReserved, Some(*retry_after))
        }
    }
}

fn budget_kind(r: &BudgetRefusal) -> Option<Kind> {
    match r {
        BudgetRefusal::Rate { kind, .. } | BudgetRefusal::TooLarge { kind, .. } => Some(*kind),
        BudgetRefusal::Concurrency { .. } | BudgetRefusal::Reserved { .. } => None,
    }
}
