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
                budgets: budget_views(&s.budget, &settings.budget, None, now),
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
