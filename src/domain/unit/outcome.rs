//! What a reported outcome does to a target.

use super::narrate::{absorb_breaker_events, describe_outcome};
use super::state::{Learned, TargetState};
use super::{DURABLE_PAUSE, Effects, GroupRef, Permit, UnitCx, lease_key, name_hash};
use crate::domain::adaptive::{self, Observation};
use crate::domain::breaker::{ANONYMOUS, BreakerState, Effect, PermitRef, Trigger};
use crate::domain::budget::{Kind, Usage};
use crate::domain::event::EventKind;
use crate::domain::headers::Signals;
use crate::domain::retry::{Advice, advise, against_open_breaker};
use crate::domain::{OutcomeClass, Time};
use std::sync::Arc;
use std::time::Duration;

/// How far an outcome report is trusted, from its permit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trust {
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
    pub fn permit(&self) -> Option<&Permit> {
        match self {
            Trust::Permit(p) | Trust::Late(p) => Some(p),
            Trust::None => None,
        }
    }
}

/// Outcome inputs, validated by the engine.
#[derive(Clone, Debug)]
pub struct OutcomeArgs<'a> {
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
    /// Cluster mode: applied without Redis (to this replica's local state).
    pub degraded: bool,
    /// What the call cost at the target's prices, in micro-units (0 when
    /// unpriced or no usage was reported).
    pub cost_micros: u64,
}

/// The first answer to a permit's report, kept to answer its duplicates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SettledAnswer {
    pub class: OutcomeClass,
    pub advice: Advice,
}

/// Applies a classified outcome: provider signals (pauses, learned limits),
/// the breaker (or, for keyed targets, the key slot), budget settlement and
/// retry advice. `rand01` in [0, 1) jitters the advised backoff. Settling
/// once per permit is the caller's job (see [`super::settled`]).
pub fn record(
    cx: &UnitCx<'_>,
    st: &mut TargetState,
    groups: &mut [GroupRef<'_>],
    now: Time,
    args: &OutcomeArgs<'_>,
    rand01: f64,
    fx: &mut Effects,
) -> OutcomeResult {
    let cfg = cx.settings;
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
    // Latency feeds `lowest_latency` routes: only from reports that may
    // steer the fleet (a permit-less report could otherwise pull traffic),
    // and only for calls that got an answer or ran out of time.
    let timed = matches!(
        class,
        OutcomeClass::Success | OutcomeClass::Partial | OutcomeClass::Timeout
    );
    if let (Some(d), true, true) = (args.latency, trusted, timed) {
        st.observe_latency(d);
        fx.state_dirty = true;
    }
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
                key_slot: cx.slot_name(slot_ix),
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
            if let Some(key_slot) = cx.slot_name(slot_ix) {
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
    // Callers are told apart for quorum tripping (`min_distinct_callers`);
    // every report without a name is the one anonymous caller.
    let caller = if args.caller.is_empty() {
        ANONYMOUS
    } else {
        name_hash(args.caller)
    };
    let mut bev = Vec::new();
    let stale = st
        .breaker
        .record_from(now, &cfg.breaker, permit_ref, effect, caller, &mut bev);
    if stale {
        st.counters.stale += 1;
    }
    if !bev.is_empty() {
        // Built only when something happened: most outcomes move nothing.
        let caller = (!args.caller.is_empty()).then(|| Arc::from(args.caller));
        let detail = describe_outcome(class, args.http_status, args.error_type);
        absorb_breaker_events(cx, st, &bev, Some((caller, detail)), fx);
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
    let lease_key = own.filter(|p| p.leased).map(|p| lease_key(cx.seed, p.id));
    if st.breaker.consecutive_failures() != streak_before {
        fx.state_dirty = true;
    }
    let metered = !cfg.budget.is_unlimited() || !cfg.groups.is_empty();
    if metered && (own.is_some() || usage.reported) {
        fx.state_dirty = true;
        st.slots[slot_ix]
            .budget
            .settle(now, &cfg.budget, usage, lease_key);
        for g in groups.iter_mut() {
            g.state.budget.settle(now, g.config, usage, lease_key);
        }
    }

    // Spend: charge the real cost against the reservation (limits), and
    // count it (totals, metrics). Without token counts the reservation stands.
    let prices = crate::domain::spend::Prices {
        input: cfg.cost_per_mtok_input,
        output: cfg.cost_per_mtok_output,
    };
    let reserved_spend = own.map_or(0, |p| p.reserved_spend);
    let cost_micros = if usage.reported {
        prices.micros(args.input_tokens, args.output_tokens)
    } else {
        0
    };
    if usage.reported || reserved_spend > 0 {
        let actual = if usage.reported {
            cost_micros
        } else {
            reserved_spend
        };
        if actual > 0 || reserved_spend > 0 {
            st.spend_mut()
                .settle(now, cfg.budget.spend.as_ref(), reserved_spend, actual);
            for g in groups.iter_mut() {
                g.state
                    .spend
                    .settle(now, g.config.spend.as_ref(), reserved_spend, actual);
            }
            fx.state_dirty = true;
        }
    }

    // An adaptive concurrency limit learns from reports that may steer the
    // fleet (like latency and provider signals: not from permit-less ones).
    if let (Some(bounds), true) = (&cfg.budget.adaptive, trusted) {
        let obs = Observation {
            class,
            http_status: args.http_status,
            error_type: args.error_type,
            latency: args.latency,
            recent: st.latency(),
            issued: own.map(|p| Time::from_millis(p.issued_ms)),
        };
        let a = st.adaptive_or(bounds.start());
        let before = *a;
        if adaptive::observe(bounds, a, now, &obs, &mut fx.events) {
            fx.adaptive_limit = Some(a.limit);
        }
        if *a != before {
            fx.state_dirty = true;
        }
    }

    // Retry advice, against the fleet's retry budget.
    if class != OutcomeClass::Success {
        st.retry_or_new(cfg.retry.budget_window);
    }
    let budget_ok = st.retry().is_none_or(|rb| rb.allows(now, &cfg.retry));
    let slot = &st.slots[slot_ix];
    let wait = (slot.paused_until > now).then(|| now.until(slot.paused_until));
    let hint = match (hint, wait) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let mut advice = advise(&cfg.retry, class, args.attempt, hint, budget_ok, rand01);
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
        degraded: false,
        cost_micros,
    }
}

/// The answer to a duplicate report of an already settled permit: the
/// first answer when it is remembered, otherwise advice for its class
/// against the target's current state. Changes nothing.
pub fn duplicate_answer(
    cx: &UnitCx<'_>,
    st: &TargetState,
    now: Time,
    class: OutcomeClass,
    attempt: u32,
    first: Option<SettledAnswer>,
) -> OutcomeResult {
    let (classified_as, advice) = match first {
        Some(a) => (a.class, a.advice),
        None => {
            let advice = advise(&cx.settings.retry, class, attempt, None, true, 0.5);
            (class, advice)
        }
    };
    // The state as of now, without changing anything (a duplicate is a
    // read): an open period that has ended shows as half-open whether or
    // not anything has applied it yet.
    let mut breaker = st.breaker.clone();
    breaker.tick(now, &cx.settings.breaker, &mut Vec::new());
    OutcomeResult {
        classified_as,
        state: breaker.state(),
        advice,
        stale: false,
        duplicate: true,
        degraded: false,
        cost_micros: 0,
    }
}
