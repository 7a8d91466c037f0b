//! Merging state decided apart back together (cluster mode, after a replica
//! decided without Redis): the most restrictive deadline wins.
//!
//! While Redis was unreachable, a replica decided from its last known state
//! with its share of each budget. When Redis returns, what it learned must
//! not be lost, and nothing it did may loosen the shared state:
//! * an open breaker (with the later open-until) wins over a closed or
//!   half-open one, and the breaker gets a new generation;
//! * pauses and disabled keys end at the later deadline;
//! * budget levels take the later theoretical arrival time (the spending of
//!   both sides is at least accounted for: conservative, never generous);
//! * learned provider limits keep the most recent observation.
//!
//! Counters are not merged: what a replica counted while degraded stays in
//! its own metrics.

use super::narrate::absorb_breaker_events;
use super::state::{GroupState, TargetState};
use super::{Effects, UnitCx};
use crate::domain::Time;
use crate::domain::breaker::{Breaker, BreakerEvent, BreakerState, Cause, Mode, Probe, Transition};
use crate::domain::budget::{Gcra, Kind};

/// Merges `local` (decided apart) into `shared` (read from the shared store).
pub fn merge(
    cx: &UnitCx<'_>,
    shared: &mut TargetState,
    local: &TargetState,
    now: Time,
    fx: &mut Effects,
) {
    let (sp, lp) = (shared.breaker.parts(), local.breaker.parts());
    let local_open = lp.mode == Mode::Automatic && lp.phase == 1 && lp.open_until > now;
    let shared_open_until = (sp.phase == 1).then_some(sp.open_until);
    if sp.mode == Mode::Automatic
        && local_open
        && shared_open_until.is_none_or(|u| lp.open_until > u)
    {
        let from = shared.breaker.state();
        let mut p = lp.clone();
        p.generation = sp.generation.max(lp.generation) + 1;
        p.probes.clear();
        shared.breaker = Breaker::from_parts(p, cx.seed);
        let t = Transition {
            from,
            to: BreakerState::Open,
            cause: Cause::Persistent {
                class: crate::domain::OutcomeClass::Transient,
            },
            generation: shared.breaker.generation(),
            open_until: shared.breaker.open_until(),
        };
        absorb_breaker_events(
            cx,
            shared,
            &[BreakerEvent::Transition(t)],
            Some((
                None,
                "opened by a replica while Redis was unreachable".into(),
            )),
            fx,
        );
        fx.durable = true;
    }
    carry_probes(cx, shared, local, now, fx);
    for (s, l) in shared.slots.iter_mut().zip(local.slots.iter()) {
        if l.paused_until > s.paused_until {
            s.paused_until = l.paused_until;
            fx.durable = true;
        }
        if l.disabled_until > s.disabled_until {
            s.disabled_until = l.disabled_until;
            s.disabled_reason.clone_from(&l.disabled_reason);
            fx.durable = true;
        }
        for k in Kind::ALL {
            let (st, lt) = (s.budget.cell(k).tat(), l.budget.cell(k).tat());
            if lt > st {
                s.budget.set_cell(k, Gcra::from_tat(lt));
                fx.state_dirty = true;
            }
        }
        if let Some(ll) = &l.learned {
            let sl = s.learned.get_or_insert_with(Default::default);
            for (dst, src) in sl.iter_mut().zip(ll.iter()) {
                if let Some(src) = src
                    && dst.is_none_or(|d| src.observed_at > d.observed_at)
                {
                    *dst = Some(*src);
                }
            }
        }
    }
}

/// Probes the local side handed out that are still leased count against
/// the shared half-open allowance: the shared breaker never saw them, and
/// without them it would admit `half_open_max_probes` more while they are
/// still out (the cluster chaos soak: 3 outstanding with a limit of 2, one
/// admitted degraded just before Redis returned). Each becomes a lease of
/// the shared breaker with a fresh id and the same expiry; the probe's own
/// report (its permit names the local id) does not release it, so the slot
/// stays taken until the lease runs out: fewer probes for a while, never more.
fn carry_probes(
    cx: &UnitCx<'_>,
    shared: &mut TargetState,
    local: &TargetState,
    now: Time,
    fx: &mut Effects,
) {
    let out: Vec<Time> = local
        .breaker
        .probes()
        .iter()
        .filter(|p| p.lease_until > now)
        .map(|p| p.lease_until)
        .collect();
    if out.is_empty() {
        return;
    }
    // Half-open now, if its open period has ended (probes are per half-open period).
    super::operate::tick(cx, shared, now, fx);
    let sp = shared.breaker.parts();
    if sp.mode != Mode::Automatic || sp.phase != 2 {
        return;
    }
    let mut p = sp;
    let mut next = p.next_probe.max(local.breaker.parts().next_probe);
    for lease_until in out {
        p.probes.push(Probe {
            id: next,
            lease_until,
        });
        next += 1;
    }
    p.next_probe = next;
    shared.breaker = Breaker::from_parts(p, cx.seed);
    fx.state_dirty = true;
}

/// Merges a group's budget levels: the later arrival time wins.
pub fn merge_group(shared: &mut GroupState, local: &GroupState) {
    for k in Kind::ALL {
        let (st, lt) = (shared.budget.cell(k).tat(), local.budget.cell(k).tat());
        if lt > st {
            shared.budget.set_cell(k, Gcra::from_tat(lt));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TargetSettings;
    use crate::domain::breaker::Effect;
    use std::time::Duration;

    #[test]
    fn an_outage_learned_apart_is_not_forgotten_and_nothing_loosens() {
        let settings = TargetSettings::default();
        let cx = UnitCx {
            settings: &settings,
            seed: 7,
        };
        let now = Time::from_secs(1_000_000);
        let mut shared = TargetState::new(7, 1, 1);
        let mut local = TargetState::new(7, 1, 1);
        // The local side saw its failure threshold and opened; and a pause.
        trip(&mut local.breaker, &settings, now);
        assert_eq!(local.breaker.state(), BreakerState::Open);
        local.slots[0].paused_until = now + Duration::from_secs(30);
        shared.slots[0].paused_until = now + Duration::from_secs(10);
        let mut fx = Effects::default();
        merge(&cx, &mut shared, &local, now, &mut fx);
        assert_eq!(shared.breaker.state(), BreakerState::Open);
        assert!(shared.breaker.generation() > local.breaker.generation());
        assert_eq!(shared.slots[0].paused_until, now + Duration::from_secs(30));
        assert!(fx.durable);
        // Merging a closed local state changes nothing.
        let before = shared.breaker.open_until();
        let mut fx = Effects::default();
        merge(&cx, &mut shared, &TargetState::new(7, 1, 1), now, &mut fx);
        assert_eq!(shared.breaker.open_until(), before);
        assert!(!fx.durable);
    }

    /// Opens `b` with `failure_threshold` failures at `now`.
    fn trip(b: &mut Breaker, settings: &TargetSettings, now: Time) {
        let mut ev = Vec::new();
        for _ in 0..settings.breaker.failure_threshold {
            b.record(
                now,
                &settings.breaker,
                None,
                Effect::Failure(crate::domain::breaker::Trigger::Outcome(
                    crate::domain::OutcomeClass::Transient,
                )),
                &mut ev,
            );
        }
    }

    #[test]
    fn probes_handed_out_apart_count_against_the_shared_allowance() {
        let mut settings = TargetSettings::default();
        settings.breaker.half_open_max_probes = 2;
        settings.breaker.jitter = 0.0;
        let cx = UnitCx {
            settings: &settings,
            seed: 7,
        };
        let c = &settings.breaker;
        let t0 = Time::from_secs(1_000_000);
        let mut shared = TargetState::new(7, 1, 1);
        trip(&mut shared.breaker, &settings, t0);
        let mut local = TargetState::new(7, 1, 1);
        trip(&mut local.breaker, &settings, t0);
        // Both sides' open period ends; the local side (deciding alone)
        // hands out one probe.
        let now = shared.breaker.open_until().expect("open");
        let mut ev = Vec::new();
        local.breaker.admit(now, c, &mut ev).expect("a probe");
        assert_eq!(local.breaker.probes().len(), 1);
        // Merged into the shared breaker, still open in the record (no one
        // ticked it): it half-opens with that probe outstanding, so only
        // one more is admitted, not two.
        let mut fx = Effects::default();
        merge(&cx, &mut shared, &local, now, &mut fx);
        assert_eq!(shared.breaker.state(), BreakerState::HalfOpen);
        assert_eq!(shared.breaker.probes().len(), 1);
        assert!(shared.breaker.admit(now, c, &mut ev).is_ok());
        assert!(
            shared.breaker.admit(now, c, &mut ev).is_err(),
            "a third probe while two are out"
        );
        // Once the carried lease runs out, its slot is free again.
        let later = now + c.probe_lease;
        let mut fx = Effects::default();
        crate::domain::unit::operate::tick(&cx, &mut shared, later, &mut fx);
        assert_eq!(shared.breaker.probes().len(), 0);
        // Expired local probes are not carried.
        let mut fresh = TargetState::new(7, 1, 1);
        trip(&mut fresh.breaker, &settings, t0);
        let mut fx = Effects::default();
        merge(&cx, &mut fresh, &local, later, &mut fx);
        assert!(fresh.breaker.probes().is_empty());
    }
}
