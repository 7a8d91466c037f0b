//! A unit's state as operators and dashboards see it (Admin GetTarget,
//! ListTargets, Watch snapshots): copies, never references into live state.

use super::state::TargetState;
use super::{Counters, Learned};
use super::{GroupRef, UnitCx};
use crate::config::TargetSettings;
use crate::domain::Time;
use crate::domain::breaker::BreakerState;
use crate::domain::budget::{BudgetConfig, BudgetState, Kind};
use std::sync::Arc;
use std::time::Duration;

/// One budget's size and headroom, for status views.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetView {
    pub kind: &'static str,
    pub limit: u64,
    pub window: Duration,
    pub available: f64,
    pub group: Option<Arc<str>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SlotView {
    pub name: Option<Arc<str>>,
    pub disabled_until: Option<Time>,
    pub disabled_reason: Option<String>,
    pub paused_until: Option<Time>,
    pub budgets: Vec<BudgetView>,
    pub learned: Vec<(Kind, Learned)>,
    pub in_flight: u32,
}

/// Everything known about one target (Admin GetTarget).
#[derive(Clone, Debug, PartialEq)]
pub struct TargetView {
    pub name: Arc<str>,
    pub state: BreakerState,
    pub configured: bool,
    pub open_until: Option<Time>,
    pub opened_at: Option<Time>,
    pub consecutive_failures: u32,
    pub half_open_successes: u32,
    pub probes_outstanding: u32,
    pub reopen_count: u32,
    pub generation: u64,
    pub counters: Counters,
    pub window_calls: u64,
    pub window_failures: u64,
    pub settings: Arc<TargetSettings>,
    pub slots: Vec<SlotView>,
    pub forced_reason: Option<String>,
    pub last_cause: Option<String>,
    pub in_flight: u32,
    pub groups: Vec<BudgetView>,
    /// Names of the budget groups the target draws on, in config order.
    pub group_names: Vec<Arc<str>>,
    /// Recent latency (moving average of trusted reports).
    pub latency: Option<Duration>,
    /// Distinct callers with a failure in the breaker window (quorum tripping).
    pub distinct_failing_callers: u32,
    /// Money spent by this target (settled outcomes), in the prices' currency.
    pub spend_total: f64,
    /// Every spend limit the target draws on, with what is left now.
    pub spend_limits: Vec<SpendView>,
    /// `max_concurrency = "adaptive"`: the limit learned so far.
    pub adaptive: Option<AdaptiveView>,
}

/// One spend limit, for status views.
#[derive(Clone, Debug, PartialEq)]
pub struct SpendView {
    /// "target", or the budget group's name.
    pub scope: Arc<str>,
    pub limit: f64,
    pub window: Duration,
    pub available: f64,
}

/// An adaptive concurrency limit as operators see it.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveView {
    /// What admission enforces now (per key slot).
    pub limit: u32,
    pub min: u32,
    pub max: u32,
    /// Why it last moved, e.g. "cut 20 → 16: the provider answered 429".
    pub last_change: String,
}

/// One line of a target listing.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetSummary {
    pub name: Arc<str>,
    pub state: BreakerState,
    pub configured: bool,
    pub open_until: Option<Time>,
    pub consecutive_failures: u32,
}

/// A page of targets (Admin ListTargets).
#[derive(Clone, Debug, PartialEq)]
pub struct TargetPage {
    pub targets: Vec<TargetSummary>,
    pub next_page_token: String,
    pub total: u64,
}

/// Every budget of one scope (a key slot or a group), with its headroom at `now`.
fn budget_views(
    b: &BudgetState,
    cfg: &BudgetConfig,
    group: Option<Arc<str>>,
    now: Time,
) -> Vec<BudgetView> {
    let mut v = Vec::new();
    for kind in Kind::ALL {
        if let Some(rate) = cfg.rate(kind) {
            v.push(BudgetView {
                kind: kind.as_str(),
                limit: rate.amount,
                window: rate.window,
                available: b.cell(kind).available(now, &rate),
                group: group.clone(),
            });
        }
    }
    if let Some(max) = cfg.max_concurrency {
        v.push(BudgetView {
            kind: "concurrency",
            limit: u64::from(max),
            window: Duration::ZERO,
            available: f64::from(max) - b.in_flight() as f64,
            group,
        });
    }
    v
}

/// The full view of a target. Expired leases are dropped first (a view
/// shows what is really in flight), which is the only change it makes; the
/// caller applies time (see [`super::operate::tick`]) before it.
pub fn view(
    cx: &UnitCx<'_>,
    name: &Arc<str>,
    settings: &Arc<TargetSettings>,
    st: &mut TargetState,
    groups: &mut [GroupRef<'_>],
    now: Time,
) -> TargetView {
    let mut in_flight = 0u32;
    let budget = super::slot_budget(settings, st);
    let adaptive = settings.budget.adaptive.map(|b| AdaptiveView {
        limit: b.effective(st.adaptive()),
        min: b.min,
        max: b.max,
        last_change: st
            .adaptive()
            .map_or_else(|| b.start().describe(), |a| a.describe()),
    });
    let slots = st
        .slots
        .iter_mut()
        .enumerate()
        .map(|(i, s)| {
            s.budget.expire_leases(now);
            in_flight += s.budget.in_flight() as u32;
            SlotView {
                name: cx.slot_name(i),
                disabled_until: (s.disabled_until > now).then_some(s.disabled_until),
                disabled_reason: s.disabled_reason.as_deref().map(str::to_string),
                paused_until: (s.paused_until > now).then_some(s.paused_until),
                budgets: budget_views(&s.budget, &budget, None, now),
                learned: s
                    .learned
                    .as_ref()
                    .map(|l| {
                        Kind::ALL
                            .iter()
                            .filter_map(|k| l[k.index()].map(|v| (*k, v)))
                            .collect()
                    })
                    .unwrap_or_default(),
                in_flight: s.budget.in_flight() as u32,
            }
        })
        .collect();
    let group_views = groups
        .iter_mut()
        .flat_map(|g| {
            g.state.budget.expire_leases(now);
            budget_views(&g.state.budget, g.config, Some(Arc::from(g.name)), now)
        })
        .collect();
    let (window_calls, window_failures) = st.breaker.window_totals(now);
    let dollars = |m: f64| m / 1e6;
    let mut spend_limits = Vec::new();
    if let Some(l) = settings.budget.spend {
        spend_limits.push(SpendView {
            scope: Arc::from("target"),
            limit: crate::domain::spend::dollars(l.amount),
            window: l.window,
            available: dollars(st.spend().available(now, &l)),
        });
    }
    for g in groups.iter() {
        if let Some(l) = g.config.spend {
            spend_limits.push(SpendView {
                scope: Arc::from(g.name),
                limit: crate::domain::spend::dollars(l.amount),
                window: l.window,
                available: dollars(g.state.spend.available(now, &l)),
            });
        }
    }
    TargetView {
        name: name.clone(),
        state: st.breaker.state(),
        configured: settings.configured,
        open_until: st.breaker.open_until(),
        opened_at: st.breaker.opened_at(),
        consecutive_failures: st.breaker.consecutive_failures(),
        half_open_successes: st.breaker.half_open_successes(),
        probes_outstanding: st.breaker.probes().len() as u32,
        reopen_count: st.breaker.reopen_count(),
        generation: st.breaker.generation(),
        counters: st.counters,
        window_calls,
        window_failures,
        settings: settings.clone(),
        slots,
        forced_reason: st.forced_reason().map(str::to_string),
        last_cause: st.last_cause().map(str::to_string),
        in_flight: in_flight + st.breaker.probes().len() as u32,
        groups: group_views,
        group_names: groups.iter().map(|g| Arc::from(g.name)).collect(),
        latency: st.latency(),
        distinct_failing_callers: st.breaker.distinct_failing_callers(now, &settings.breaker),
        spend_total: crate::domain::spend::dollars(st.spend().total_micros),
        spend_limits,
        adaptive,
    }
}

/// One line of a listing.
pub fn summary(name: &Arc<str>, settings: &TargetSettings, st: &TargetState) -> TargetSummary {
    TargetSummary {
        name: name.clone(),
        state: st.breaker.state(),
        configured: settings.configured,
        open_until: st.breaker.open_until(),
        consecutive_failures: st.breaker.consecutive_failures(),
    }
}

/// What a routing strategy needs from a view (see [`crate::domain::strategy`]):
/// whether the target looks worth trying now (and if not, the refusal it
/// would most likely give, with when it may admit again), how busy it is,
/// how fast, and the smallest fraction left of any budget it draws on (from
/// its best key slot). Price and weight come from the route and the
/// request, not from state, so the engine fills them in.
pub fn glance(
    v: &TargetView,
    now: Time,
) -> (
    crate::domain::strategy::Glance,
    Option<(crate::domain::Reason, Option<Duration>)>,
) {
    use crate::domain::Reason;
    let fraction = |b: &BudgetView| {
        if b.limit == 0 {
            0.0
        } else {
            (b.available / b.limit as f64).clamp(0.0, 1.0)
        }
    };
    let usable = |s: &SlotView| {
        s.disabled_until.is_none_or(|t| t <= now) && s.paused_until.is_none_or(|t| t <= now)
    };
    let slot_room = v
        .slots
        .iter()
        .filter(|s| usable(s))
        .map(|s| s.budgets.iter().map(fraction).fold(1.0, f64::min))
        .fold(None, |best: Option<f64>, x| {
            Some(best.map_or(x, |b| b.max(x)))
        });
    let group_room = v.groups.iter().map(fraction).fold(1.0, f64::min);
    let headroom = slot_room.map_or(0.0, |r| r.min(group_room));
    let until = |t: Option<Time>| t.map(|t| now.until(t));
    let breaker = match v.state {
        BreakerState::Closed | BreakerState::ForcedClosed => None,
        BreakerState::HalfOpen => (v.probes_outstanding
            >= v.settings.breaker.half_open_max_probes.max(1))
        .then_some((Reason::ProbeLimit, None)),
        BreakerState::Open => v
            .open_until
            .filter(|t| *t > now)
            .map(|t| (Reason::CircuitOpen, until(Some(t)))),
        BreakerState::ForcedOpen => Some((Reason::ForcedOpen, None)),
    };
    // Every key slot paused or disabled, or less than one request's worth
    // left of some budget: it would refuse.
    let slots = if !v.slots.iter().any(usable) {
        let paused = v.slots.iter().filter_map(|s| s.paused_until).min();
        Some(match paused {
            Some(t) if v.slots.len() == 1 => (Reason::RateLimited, until(Some(t))),
            _ => (
                Reason::KeySlotsUnavailable,
                until(
                    v.slots
                        .iter()
                        .filter_map(|s| s.disabled_until.or(s.paused_until))
                        .min(),
                ),
            ),
        })
    } else {
        let room = v
            .slots
            .iter()
            .filter(|s| usable(s))
            .any(|s| s.budgets.iter().all(|b| b.limit == 0 || b.available >= 1.0))
            && v.groups.iter().all(|b| b.limit == 0 || b.available >= 1.0);
        (!room).then_some((Reason::RateLimited, None))
    };
    let why = breaker.or(slots);
    let g = crate::domain::strategy::Glance {
        admissible: why.is_none(),
        in_flight: v.in_flight,
        latency: v.latency,
        headroom,
        cost: None,
        weight: 1.0,
    };
    (g, why)
}
