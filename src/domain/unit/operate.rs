//! What time and operators do to a target: the passage of time (an open
//! period ending, probe leases running out), forced states, and resets.

use super::narrate::absorb_breaker_events;
use super::state::TargetState;
use super::{Effects, GroupRef, UnitCx};
use crate::domain::Time;
use crate::domain::breaker::Mode;
use crate::domain::event::EventKind;

/// What a reset did, recorded as the target's last cause (and shown in GetTarget).
pub const RESET_CAUSE: &str = "operator reset: breaker closed, budgets refilled (the target's and its groups'), pauses and disabled keys cleared";

/// Applies what time did to the target (an open period that ended, probe
/// leases that ran out). Those changes follow from durable state, so they
/// are written behind, never waited for.
pub fn tick(cx: &UnitCx<'_>, st: &mut TargetState, now: Time, fx: &mut Effects) {
    let mut bev = Vec::new();
    st.breaker.tick(now, &cx.settings.breaker, &mut bev);
    if !bev.is_empty() {
        absorb_breaker_events(cx, st, &bev, None, fx);
    }
}

/// Forces the breaker open or closed, or returns it to automatic control.
pub fn force(
    cx: &UnitCx<'_>,
    st: &mut TargetState,
    now: Time,
    mode: Mode,
    reason: &str,
    fx: &mut Effects,
) {
    let mut bev = Vec::new();
    st.breaker.tick(now, &cx.settings.breaker, &mut bev);
    st.breaker.set_mode(mode, &mut bev);
    st.set_forced_reason((mode != Mode::Automatic && !reason.is_empty()).then(|| reason.into()));
    if !bev.is_empty() {
        fx.events.push(EventKind::TargetForced {
            mode,
            reason: reason.to_string(),
        });
    }
    let origin = Some((
        None,
        format!(
            "operator: {}",
            if reason.is_empty() {
                "no reason given"
            } else {
                reason
            }
        ),
    ));
    absorb_breaker_events(cx, st, &bev, origin, fx);
}

/// Back to a fresh closed breaker with no pauses, disabled keys or counters,
/// and full budgets: the target's and its groups' (a group in debt would
/// keep refusing it, and the operator asked for it to admit again).
/// Concurrency leases stay: those calls are still in flight. What time did
/// is applied first (as for `force`), so the generation a reset leaves does
/// not depend on whether someone happened to look at the target before.
pub fn reset(
    cx: &UnitCx<'_>,
    st: &mut TargetState,
    groups: &mut [GroupRef<'_>],
    now: Time,
    fx: &mut Effects,
) {
    let mut bev = Vec::new();
    st.breaker.tick(now, &cx.settings.breaker, &mut bev);
    st.breaker.reset(&mut bev);
    for s in st.slots.iter_mut() {
        s.paused_until = Time::ZERO;
        s.disabled_until = Time::ZERO;
        s.disabled_reason = None;
        s.learned = None;
        s.limited = false;
        s.budget.refill();
    }
    for g in groups.iter_mut() {
        g.state.budget.refill();
        g.state.limited = false;
        g.state.spend.refill();
    }
    st.counters = Default::default();
    st.notes = None;
    fx.durable = true;
    fx.state_dirty = true;
    fx.events.push(EventKind::TargetReset);
    absorb_breaker_events(cx, st, &bev, Some((None, "operator reset".into())), fx);
    st.set_last_cause(Some(RESET_CAUSE.into()));
}
