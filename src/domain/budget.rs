//! Fleet-wide budgets: request and token rates (GCRA) and a concurrency bulkhead.
//!
//! # Rolling accounting
//! Rates use the generic cell rate algorithm: each budget keeps one number, the
//! *theoretical arrival time* (TAT). A budget of `amount` per `window` has an
//! emission interval `T = window / amount` and a capacity of `amount`: a call
//! costing `n` is admitted when `max(TAT, now) + n·T − now ≤ window`, and then
//! `TAT` advances by `n·T`. This is a token bucket of `amount` that refills
//! continuously, the same shape the providers enforce, so there is no window
//! boundary at which a fleet could spend its limit twice: over any interval of
//! length `t`, at most `amount + amount·t/window` is admitted.
//!
//! # Reserve, then settle
//! Admission reserves the caller's estimate; the outcome reports real usage and
//! [`BudgetState::settle`] charges or refunds the difference. An overcharge can
//! push the TAT past `now + window`: the budget is then in debt and refuses
//! until the debt has drained, exactly as the provider would.
//!
//! # Bounded debt
//! Reported usage comes from clients, and a client can be wrong or hostile: a
//! single `input_tokens = 2^64 - 1` must not refuse a budget (or a whole shared
//! group) for centuries. Debt is therefore capped at one window: after any
//! charge the budget admits again within at most one window (see
//! [`MAX_DEBT_WINDOWS`]); a stored TAT from before the cap is clamped on load.

use super::adaptive::AdaptiveBounds;
use super::time::Time;
use std::time::Duration;

/// What a budget meters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Requests,
    Tokens,
    InputTokens,
    OutputTokens,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Requests,
        Kind::Tokens,
        Kind::InputTokens,
        Kind::OutputTokens,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
            Kind::InputTokens => "input_tokens",
            Kind::OutputTokens => "output_tokens",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// `amount` per `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub amount: u64,
    pub window: Duration,
}

impl Rate {
    pub fn per_minute(amount: u64) -> Self {
        Rate {
            amount,
            window: Duration::from_secs(60),
        }
    }

    fn window_nanos(&self) -> u128 {
        self.window.as_nanos().max(1)
    }

    /// Nanoseconds of TAT that `cost` units occupy: `cost · window / amount`.
    ///
    /// Rounded down so that exactly `amount` units fit in a window (rounding
    /// up would make 3 per second admit only 2), but never zero for a
    /// non-zero cost, so an enormous amount cannot make calls free.
    fn cost_nanos(&self, cost: u64) -> u128 {
        let amount = u128::from(self.amount.max(1));
        let nanos = u128::from(cost) * self.window_nanos() / amount;
        if cost > 0 { nanos.max(1) } else { 0 }
    }
}

/// How urgent a call is. A budget can hold back part of itself for the
/// priorities above a call's (see [`BudgetConfig::reserve`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// A person is waiting.
    Interactive,
    #[default]
    Default,
    /// Background work that can wait.
    Batch,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::Interactive, Priority::Default, Priority::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Default => "default",
            Priority::Batch => "batch",
        }
    }

    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// Sizes of one budget scope (a key slot or a budget group). `None` = unlimited.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BudgetConfig {
    pub rates: [Option<Rate>; 4],
    pub max_concurrency: Option<u32>,
    /// Per mille of each budget held back for calls of at least this
    /// priority: `[interactive, default]` (`reserve = { interactive = 0.2 }`
    /// is `[200, 0]`). A call may use only what is left above the reserves
    /// of the priorities higher than its own, so when a budget runs low,
    /// batch calls are refused first and interactive ones keep flowing.
    pub reserve: [u16; 2],
    /// Money per window, in micro-units of the prices' currency (see
    /// `domain::spend`); None = no spend limit. Held outside the per-slot
    /// cells: a spend limit is the target's (or group's) as a whole.
    pub spend: Option<Rate>,
    /// `max_concurrency = "adaptive"`: the concurrency limit is learned from
    /// outcomes within these bounds (see [`super::adaptive`]);
    /// `max_concurrency` then holds the initial limit, and admission
    /// enforces the learned one through [`BudgetConfig::with_concurrency`].
    pub adaptive: Option<AdaptiveBounds>,
}

impl BudgetConfig {
    /// This budget with another concurrency limit (an adaptive target's
    /// learned one): the reserves apply to it like to a fixed limit.
    pub fn with_concurrency(&self, limit: u32) -> BudgetConfig {
        BudgetConfig {
            max_concurrency: Some(limit),
            ..self.clone()
        }
    }

    pub fn rate(&self, kind: Kind) -> Option<Rate> {
        self.rates[kind.index()]
    }

    pub fn is_unlimited(&self) -> bool {
        self.rates.iter().all(Option::is_none) && self.max_concurrency.is_none()
    }

    /// Per mille of the budget a call of priority `p` may not touch.
    pub fn held_back(&self, p: Priority) -> u16 {
        match p {
            Priority::Interactive => 0,
            Priority::Default => self.reserve[0],
            Priority::Batch => self.reserve[0].saturating_add(self.reserve[1]),
        }
        .min(1000)
    }
}

/// How far past `now` a TAT may reach, in windows: one window of capacity
/// plus at most one window of debt. So a budget refuses for at most one
/// window after any charge, however absurd the reported usage.
pub const MAX_DEBT_WINDOWS: u128 = 2;

/// One GCRA cell: the theoretical arrival time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gcra {
    tat: Time,
}

impl Gcra {
    fn base(&self, now: Time) -> u128 {
        u128::from(self.tat.max(now).as_nanos())
    }

    /// The TAT after admitting `cost`, or how long until it could be admitted.
    fn try_take(&self, now: Time, rate: &Rate, cost: u64) -> Result<Time, Duration> {
        self.try_take_above(now, rate, cost, 0)
    }

    /// Like `try_take`, leaving `held_back` per mille of the window untouched
    /// (a priority reserve): the TAT may reach only that much less far ahead.
    pub(crate) fn try_take_above(
        &self,
        now: Time,
        rate: &Rate,
        cost: u64,
        held_back: u16,
    ) -> Result<Time, Duration> {
        let new_tat = self.base(now) + rate.cost_nanos(cost);
        let usable = rate.window_nanos() * u128::from(1000 - held_back.min(1000)) / 1000;
        let limit = u128::from(now.as_nanos()) + usable;
        if new_tat <= limit {
            Ok(Time::from_nanos(u64::try_from(new_tat).unwrap_or(u64::MAX)))
        } else {
            let wait = u64::try_from(new_tat - limit).unwrap_or(u64::MAX);
            Err(Duration::from_nanos(wait))
        }
    }

    /// Charges (positive) or refunds (negative) `delta` units after the fact.
    /// A refund never lifts the budget above full; a charge never puts it
    /// more than one window into debt.
    pub(crate) fn adjust(&mut self, now: Time, rate: &Rate, delta: i64) {
        let nanos = rate.cost_nanos(delta.unsigned_abs());
        let tat = u128::from(self.tat.as_nanos());
        let new = if delta >= 0 {
            (self.base(now) + nanos).min(Self::debt_limit(now, rate))
        } else {
            tat.saturating_sub(nanos).max(u128::from(now.as_nanos()))
        };
        self.tat = Time::from_nanos(u64::try_from(new).unwrap_or(u64::MAX));
    }

    /// The latest TAT any charge may leave: empty, plus one window of debt.
    fn debt_limit(now: Time, rate: &Rate) -> u128 {
        u128::from(now.as_nanos()) + rate.window_nanos() * MAX_DEBT_WINDOWS
    }

    /// Clamps a TAT restored from storage (possibly written before debt was
    /// bounded, or by a clock far ahead) to the debt limit.
    pub fn clamp_debt(&mut self, now: Time, rate: &Rate) {
        let limit = Self::debt_limit(now, rate);
        if u128::from(self.tat.as_nanos()) > limit {
            self.tat = Time::from_nanos(u64::try_from(limit).unwrap_or(u64::MAX));
        }
    }

    /// Empty at `now` (never fuller than it was): see [`BudgetState::drain`].
    fn drain(&mut self, now: Time, rate: &Rate) {
        let empty = u128::from(now.as_nanos()) + rate.window_nanos();
        if u128::from(self.tat.as_nanos()) < empty {
            self.tat = Time::from_nanos(u64::try_from(empty).unwrap_or(u64::MAX));
        }
    }

    /// Units admissible right now (negative while in debt).
    pub fn available(&self, now: Time, rate: &Rate) -> f64 {
        let used = self.tat.as_nanos().saturating_sub(now.as_nanos()) as f64;
        let window = rate.window_nanos() as f64;
        rate.amount as f64 * (window - used) / window
    }

    /// Lowers the budget so that at most `remaining` units are admissible now
    /// (a provider's `remaining` header wins over our estimate). Never raises it.
    fn cap_available(&mut self, now: Time, rate: &Rate, remaining: u64) {
        let remaining = remaining.min(rate.amount);
        let target = u128::from(now.as_nanos()) + rate.cost_nanos(rate.amount - remaining);
        if target > u128::from(self.tat.as_nanos()) {
            self.tat = Time::from_nanos(u64::try_from(target).unwrap_or(u64::MAX));
        }
    }

    pub fn tat(&self) -> Time {
        self.tat
    }

    pub fn from_tat(tat: Time) -> Self {
        Gcra { tat }
    }
}

/// Why a budget refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BudgetRefusal {
    /// A rate budget is exhausted; admissible again after `retry_after`.
    Rate { kind: Kind, retry_after: Duration },
    /// `max_concurrency` calls in flight; a slot frees on an outcome or lease expiry.
    Concurrency { retry_after: Duration },
    /// The request costs more than the budget can ever hold.
    TooLarge {
        kind: Kind,
        cost: u64,
        capacity: u64,
    },
    /// What is left is held back for higher priorities (the budget itself
    /// would admit this call); admissible at this priority after `retry_after`.
    Reserved {
        priority: Priority,
        retry_after: Duration,
    },
}

impl BudgetRefusal {
    pub fn retry_after(&self) -> Option<Duration> {
        match *self {
            BudgetRefusal::Rate { retry_after, .. }
            | BudgetRefusal::Concurrency { retry_after }
            | BudgetRefusal::Reserved { retry_after, .. } => Some(retry_after),
            BudgetRefusal::TooLarge { .. } => None,
        }
    }
}

/// An in-flight admission holding a concurrency slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Unique per budget scope: (target index << 40) | admission number.
    pub key: u64,
    pub until: Time,
}

/// Longest CONCURRENCY_LIMIT retry_after: slots usually free when a call
/// reports, long before a lease expires, so waiters poll rather than wait it out.
pub const CONCURRENCY_POLL: Duration = Duration::from_millis(250);

/// The new state a successful check computed, applied by [`BudgetState::commit`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    tats: [Option<Time>; 4],
    lease: bool,
}

/// What admission reserves: the request itself and its estimated tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cost {
    pub tokens: u64,
    pub priority: Priority,
}

impl Cost {
    /// Units charged to a rate of this kind at admission. Input-token budgets
    /// take the estimate (the prompt dominates what is known before the call);
    /// output-token budgets are only charged at settle but must not be in debt.
    fn units(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Requests => 1,
            Kind::Tokens | Kind::InputTokens => self.tokens,
            Kind::OutputTokens => 0,
        }
    }
}

/// Live state of one budget scope.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BudgetState {
    cells: [Gcra; 4],
    /// In-flight admissions; boxed because only concurrency-limited budgets
    /// have any, and a million targets should not each carry an empty Vec
    /// (8 bytes instead of 24).
    #[allow(clippy::box_collection)]
    leases: Option<Box<Vec<Lease>>>,
}

impl BudgetState {
    /// Drops leases that ran out (crashed agents give their slots back).
    /// Returns how many were reclaimed.
    pub fn expire_leases(&mut self, now: Time) -> usize {
        let Some(leases) = self.leases.as_mut() else {
            return 0;
        };
        let before = leases.len();
        leases.retain(|l| l.until > now);
        before - leases.len()
    }

    /// The concurrency leases held, for serialising.
    pub fn leases(&self) -> &[Lease] {
        self.leases.as_deref().map_or(&[], |v| v.as_slice())
    }

    /// Replaces the leases (restoring serialised state).
    pub fn set_leases(&mut self, leases: Vec<Lease>) {
        self.leases = (!leases.is_empty()).then(|| Box::new(leases));
    }

    pub fn in_flight(&self) -> usize {
        self.leases.as_ref().map_or(0, |l| l.len())
    }

    pub fn cell(&self, kind: Kind) -> &Gcra {
        &self.cells[kind.index()]
    }

    pub fn set_cell(&mut self, kind: Kind, cell: Gcra) {
        self.cells[kind.index()] = cell;
    }

    /// Checks every budget of this scope without changing anything.
    pub fn check(
        &mut self,
        now: Time,
        cfg: &BudgetConfig,
        cost: Cost,
    ) -> Result<Plan, BudgetRefusal> {
        let mut plan = Plan::default();
        let held = cfg.held_back(cost.priority);
        // The longest wait over every kind: "retry after" must mean that all
        // of them will admit by then, not just the first one checked.
        let mut refusal: Option<(Kind, Duration)> = None;
        // Only the reserve stands in the way (the budget itself has room).
        let mut reserved_only = true;
        for kind in Kind::ALL {
            let Some(rate) = cfg.rate(kind) else { continue };
            let units = cost.units(kind);
            if units > rate.amount {
                return Err(BudgetRefusal::TooLarge {
                    kind,
                    cost: units,
                    capacity: rate.amount,
                });
            }
            let cell = &self.cells[kind.index()];
            match cell.try_take_above(now, &rate, units, held) {
                Ok(tat) => plan.tats[kind.index()] = Some(tat),
                Err(wait) => {
                    if held == 0 || cell.try_take(now, &rate, units).is_err() {
                        reserved_only = false;
                    }
                    if refusal.is_none_or(|(_, w)| wait > w) {
                        refusal = Some((kind, wait));
                    }
                }
            }
        }
        if let Some((kind, retry_after)) = refusal {
            return Err(if reserved_only {
                BudgetRefusal::Reserved {
                    priority: cost.priority,
                    retry_after,
                }
            } else {
                BudgetRefusal::Rate { kind, retry_after }
            });
        }
        if let Some(max) = cfg.max_concurrency {
            self.expire_leases(now);
            // Lower priorities may fill only the unreserved share of the slots.
            let usable = (u64::from(max) * u64::from(1000 - held) / 1000) as usize;
            if self.in_flight() >= usable {
                let soonest = self
                    .leases
                    .iter()
                    .flat_map(|l| l.iter())
                    .map(|l| l.until)
                    .min()
                    .unwrap_or(now);
                let retry_after = now.until(soonest).min(CONCURRENCY_POLL);
                if self.in_flight() < max as usize {
                    return Err(BudgetRefusal::Reserved {
                        priority: cost.priority,
                        retry_after,
                    });
                }
                return Err(BudgetRefusal::Concurrency { retry_after });
            }
            plan.lease = true;
        }
        Ok(plan)
    }

    /// Applies a plan from [`BudgetState::check`] made in the same critical section.
    pub fn commit(&mut self, plan: &Plan, lease: Lease) {
        for (cell, tat) in self.cells.iter_mut().zip(plan.tats) {
            if let Some(tat) = tat {
                cell.tat = tat;
            }
        }
        if plan.lease {
            self.leases.get_or_insert_with(Default::default).push(lease);
        }
    }

    /// Whether `commit` of this plan takes a concurrency lease.
    pub fn plan_leases(plan: &Plan) -> bool {
        plan.lease
    }

    /// Settles an admission: charges the difference between the real usage and
    /// the reservation, and releases its concurrency slot.
    pub fn settle(&mut self, now: Time, cfg: &BudgetConfig, usage: Usage, lease_key: Option<u64>) {
        if let Some(key) = lease_key
            && let Some(leases) = self.leases.as_mut()
            && let Some(pos) = leases.iter().position(|l| l.key == key)
        {
            leases.swap_remove(pos);
        }
        if !usage.reported {
            return;
        }
        let total = usage.input.saturating_add(usage.output);
        let deltas = [
            (Kind::Tokens, total as i128 - usage.reserved as i128),
            (
                Kind::InputTokens,
                usage.input as i128 - usage.reserved as i128,
            ),
            (Kind::OutputTokens, usage.output as i128),
        ];
        for (kind, delta) in deltas {
            if let Some(rate) = cfg.rate(kind) {
                let delta = delta.clamp(i64::MIN as i128, i64::MAX as i128) as i64;
                if delta != 0 {
                    self.cells[kind.index()].adjust(now, &rate, delta);
                }
            }
        }
    }

    /// Back to full: every rate cell refilled. Concurrency leases stay (those
    /// calls are still in flight and will report or expire).
    pub fn refill(&mut self) {
        self.cells = Default::default();
    }

    /// Re-expresses every rate cell under a new budget (a config reload):
    /// the fraction of the window used stays the same, so a window that
    /// grows from a minute to an hour keeps "all used" as all used. A kind
    /// the new budget adds starts full; one it drops is cleared.
    pub fn rescale(&mut self, now: Time, old: &BudgetConfig, new: &BudgetConfig) {
        for kind in Kind::ALL {
            let cell = &mut self.cells[kind.index()];
            match (old.rate(kind), new.rate(kind)) {
                (Some(o), Some(n)) if o.window_nanos() != n.window_nanos() => {
                    let debt = u128::from(cell.tat.as_nanos().saturating_sub(now.as_nanos()));
                    let scaled = debt * n.window_nanos() / o.window_nanos().max(1);
                    let tat = u128::from(now.as_nanos()) + scaled;
                    cell.tat = Time::from_nanos(u64::try_from(tat).unwrap_or(u64::MAX));
                    cell.clamp_debt(now, &n);
                }
                (Some(_), Some(n)) => cell.clamp_debt(now, &n),
                (_, None) => *cell = Gcra::default(),
                (None, Some(_)) => {}
            }
        }
    }

    /// Empties every rate cell at `now` (never refills one): after a crash,
    /// what the lost second of write-behind spent is unknown, and assuming
    /// none of it is left is the only guess that never admits past
    /// `burst + rate·t`. The budget refills at its rate from here.
    pub fn drain(&mut self, now: Time, cfg: &BudgetConfig) {
        for kind in Kind::ALL {
            if let Some(rate) = cfg.rate(kind) {
                self.cells[kind.index()].drain(now, &rate);
            }
        }
    }

    /// Charges `n` requests at `now` (at most one window into debt). Cluster
    /// mode: a replica that starts deciding without Redis seeds its share
    /// from the last shared level it read, which misses what the other
    /// replicas admitted since; each of them is assumed to have admitted
    /// one more, so that the shares never add up to more than was left
    /// (the chaos soak measured the excess at about one call per episode).
    pub fn charge_requests(&mut self, now: Time, cfg: &BudgetConfig, n: u64) {
        if let Some(rate) = cfg.rate(Kind::Requests)
            && n > 0
        {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            self.cells[Kind::Requests.index()].adjust(now, &rate, n);
        }
    }

    /// Clamps every cell's debt (after a restore).
    pub fn clamp_debt(&mut self, now: Time, cfg: &BudgetConfig) {
        for kind in Kind::ALL {
            if let Some(rate) = cfg.rate(kind) {
                self.cells[kind.index()].clamp_debt(now, &rate);
            }
        }
    }

    /// A provider reported `remaining` for `kind`: never believe we have more.
    pub fn observe_remaining(&mut self, now: Time, cfg: &BudgetConfig, kind: Kind, remaining: u64) {
        if let Some(rate) = cfg.rate(kind) {
            self.cells[kind.index()].cap_available(now, &rate, remaining);
        }
    }

    /// How long until this scope could admit `cost` (zero if it can now);
    /// `None` if it never can.
    pub fn wait_for(&self, now: Time, cfg: &BudgetConfig, cost: Cost) -> Option<Duration> {
        let mut wait = Duration::ZERO;
        let held = cfg.held_back(cost.priority);
        for kind in Kind::ALL {
            let Some(rate) = cfg.rate(kind) else { continue };
            let units = cost.units(kind);
            if units > rate.amount {
                return None;
            }
            if let Err(w) = self.cells[kind.index()].try_take_above(now, &rate, units, held) {
                wait = wait.max(w);
            }
        }
        Some(wait)
    }
}

/// Real usage reported by an outcome, against what admission reserved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens reserved at admission (the estimate).
    pub reserved: u64,
    pub input: u64,
    pub output: u64,
    /// False when the outcome reported no token counts: the reservation stands.
    pub reported: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Time = Time::from_secs(1_000_000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn rpm(n: u64) -> BudgetConfig {
        let mut c = BudgetConfig::default();
        c.rates[Kind::Requests.index()] = Some(Rate::per_minute(n));
        c
    }

    fn lease(k: u64) -> Lease {
        Lease {
            key: k,
            until: Time::MAX,
        }
    }

    /// Admits as many 1-request calls as possible at `now`.
    fn drain(b: &mut BudgetState, c: &BudgetConfig, now: Time) -> u64 {
        let mut n = 0;
        while let Ok(p) = b.check(now, c, Cost::default()) {
            b.commit(&p, lease(n));
            n += 1;
            assert!(n < 1_000_000);
        }
        n
    }

    #[test]
    fn charging_requests_for_peers_leaves_that_many_fewer() {
        let c = rpm(600);
        let mut b = BudgetState::default();
        b.charge_requests(T0, &c, 3);
        assert_eq!(drain(&mut b, &c, T0), 597);
        // Never more than the debt limit (two windows ahead), whatever is asked.
        let mut b = BudgetState::default();
        b.charge_requests(T0, &c, u64::MAX);
        assert_eq!(drain(&mut b, &c, T0 + Duration::from_secs(60)), 0);
        assert_eq!(drain(&mut b, &c, T0 + Duration::from_secs(120)), 600);
        // Zero charges nothing.
        let mut b = BudgetState::default();
        b.charge_requests(T0, &c, 0);
        assert_eq!(drain(&mut b, &c, T0), 600);
    }

    #[test]
    fn a_full_budget_admits_exactly_its_amount_then_one_per_interval() {
        let c = rpm(600); // T = 100 ms
        let mut b = BudgetState::default();
        assert_eq!(drain(&mut b, &c, T0), 600);
        assert_eq!(
            b.check(T0, &c, Cost::default()),
            Err(BudgetRefusal::Rate {
                kind: Kind::Requests,
                retry_after: ms(100)
            })
        );
        assert_eq!(drain(&mut b, &c, T0 + ms(99)), 0);
        assert_eq!(drain(&mut b, &c, T0 + ms(100)), 1);
        assert_eq!(drain(&mut b, &c, T0 + ms(1000)), 9);
    }

    #[test]
    fn no_double_spend_across_a_window_boundary() {
        // A fixed-window limiter admits 600 at 0:59.9 and 600 more at 1:00.0.
        // Rolling accounting admits 600 at 0:59.9 and only what refilled since.
        let c = rpm(600);
        let mut b = BudgetState::default();
        let edge = T0 + Duration::from_secs(60);
        assert_eq!(drain(&mut b, &c, edge - ms(100)), 600);
        assert_eq!(drain(&mut b, &c, edge), 1);
        assert_eq!(drain(&mut b, &c, edge + ms(100)), 1);
        // Over a 60 s span starting full: exactly amount + amount·t/window
        // (the bucket's contents plus its refill), never more.
        let mut b = BudgetState::default();
        let mut admitted = 0;
        for step in 0..=600u64 {
            admitted += drain(&mut b, &c, T0 + ms(step * 100));
        }
        assert_eq!(admitted, 600 + 600);
    }

    #[test]
    fn a_window_that_does_not_divide_evenly_still_admits_the_full_amount() {
        let mut c = BudgetConfig::default();
        c.rates[Kind::Requests.index()] = Some(Rate {
            amount: 3,
            window: Duration::from_secs(1),
        });
        let mut b = BudgetState::default();
        assert_eq!(drain(&mut b, &c, T0), 3);
    }

    #[test]
    fn any_window_length_works() {
        let mut c = BudgetConfig::default();
        c.rates[Kind::Requests.index()] = Some(Rate {
            amount: 5,
            window: Duration::from_secs(10),
        });
        let mut b = BudgetState::default();
        assert_eq!(drain(&mut b, &c, T0), 5);
        assert_eq!(drain(&mut b, &c, T0 + ms(1999)), 0);
        assert_eq!(drain(&mut b, &c, T0 + ms(2000)), 1);
    }

    #[test]
    fn tokens_reserve_then_settle_refunds_and_overcharges() {
        let mut c = BudgetConfig::default();
        c.rates[Kind::Tokens.index()] = Some(Rate::per_minute(1000));
        let mut b = BudgetState::default();
        let p = b
            .check(
                T0,
                &c,
                Cost {
                    tokens: 800,
                    ..Cost::default()
                },
            )
            .expect("fits");
        b.commit(&p, lease(1));
        assert_eq!(
            b.cell(Kind::Tokens)
                .available(T0, &c.rate(Kind::Tokens).unwrap()),
            200.0
        );
        assert!(matches!(
            b.check(
                T0,
                &c,
                Cost {
                    tokens: 300,
                    ..Cost::default()
                }
            ),
            Err(BudgetRefusal::Rate {
                kind: Kind::Tokens,
                ..
            })
        ));
        // The call used 500 of the 800 reserved: 300 come back.
        let usage = Usage {
            reserved: 800,
            input: 400,
            output: 100,
            reported: true,
        };
        b.settle(T0, &c, usage, None);
        assert_eq!(
            b.cell(Kind::Tokens)
                .available(T0, &c.rate(Kind::Tokens).unwrap()),
            500.0
        );
        assert!(
            b.check(
                T0,
                &c,
                Cost {
                    tokens: 300,
                    ..Cost::default()
                }
            )
            .is_ok()
        );
        // Another used 1500 against a reservation of 500: the budget goes into debt.
        let p = b
            .check(
                T0,
                &c,
                Cost {
                    tokens: 500,
                    ..Cost::default()
                },
            )
            .expect("fits");
        b.commit(&p, lease(2));
        let usage = Usage {
            reserved: 500,
            input: 1000,
            output: 500,
            reported: true,
        };
        b.settle(T0, &c, usage, None);
        let avail = b
            .cell(Kind::Tokens)
            .available(T0, &c.rate(Kind::Tokens).unwrap());
        assert_eq!(avail, -1000.0);
        // Refused until the debt drains: 1000 tokens at 1000/min = 60 s, plus the 1 token.
        match b.check(
            T0,
            &c,
            Cost {
                tokens: 1,
                ..Cost::default()
            },
        ) {
            Err(BudgetRefusal::Rate { retry_after, .. }) => {
                assert_eq!(retry_after, Duration::from_millis(60_060))
            }
            other => panic!("{other:?}"),
        }
        // A refund never lifts a budget above full.
        let mut b = BudgetState::default();
        b.settle(
            T0,
            &c,
            Usage {
                reserved: 900,
                input: 0,
                output: 0,
                reported: true,
            },
            None,
        );
        assert_eq!(
            b.cell(Kind::Tokens)
                .available(T0, &c.rate(Kind::Tokens).unwrap()),
            1000.0
        );
    }

    #[test]
    fn an_absurd_reported_usage_puts_the_budget_at_most_one_window_into_debt() {
        // 1,000 tokens/min; a client reports 2^64-1 tokens with no reservation.
        let mut c = BudgetConfig::default();
        c.rates[Kind::Tokens.index()] = Some(Rate::per_minute(1000));
        c.rates[Kind::InputTokens.index()] = Some(Rate::per_minute(1000));
        let mut b = BudgetState::default();
        let usage = Usage {
            reserved: 0,
            input: u64::MAX,
            output: u64::MAX,
            reported: true,
        };
        b.settle(T0, &c, usage, None);
        let cost = Cost {
            tokens: 1,
            ..Cost::default()
        };
        match b.check(T0, &c, cost) {
            Err(BudgetRefusal::Rate { retry_after, .. }) => {
                // One window of debt plus the 1-token cost: just over a minute, not 529 years.
                assert!(retry_after > Duration::from_secs(60), "{retry_after:?}");
                assert!(retry_after <= Duration::from_secs(61), "{retry_after:?}");
            }
            other => panic!("expected a rate refusal, got {other:?}"),
        }
        // Exactly when it said, it admits again.
        assert!(b.check(T0 + Duration::from_secs(61), &c, cost).is_ok());
        // A TAT stored before the cap existed is clamped on restore.
        let mut old = BudgetState::default();
        old.set_cell(Kind::Tokens, Gcra::from_tat(Time::MAX));
        old.clamp_debt(T0, &c);
        assert_eq!(
            old.cell(Kind::Tokens).tat(),
            T0 + Duration::from_secs(120),
            "empty plus one window of debt"
        );
        old.refill();
        assert_eq!(
            old.cell(Kind::Tokens)
                .available(T0, &Rate::per_minute(1000)),
            1000.0
        );
    }

    #[test]
    fn retry_after_is_the_longest_wait_over_every_kind() {
        // One request per 100 ms (checked first), and 1000 tokens per minute.
        let mut c = BudgetConfig::default();
        c.rates[Kind::Requests.index()] = Some(Rate {
            amount: 1,
            window: Duration::from_millis(100),
        });
        c.rates[Kind::Tokens.index()] = Some(Rate::per_minute(1000));
        let mut b = BudgetState::default();
        let p = b
            .check(
                T0,
                &c,
                Cost {
                    tokens: 1000,
                    ..Cost::default()
                },
            )
            .expect("fits");
        b.commit(&p, lease(1));
        match b.check(
            T0,
            &c,
            Cost {
                tokens: 500,
                ..Cost::default()
            },
        ) {
            Err(BudgetRefusal::Rate { kind, retry_after }) => {
                assert_eq!(kind, Kind::Tokens);
                assert_eq!(
                    retry_after,
                    Duration::from_secs(30),
                    "500 tokens at 1000/min"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unreported_usage_keeps_the_reservation() {
        let mut c = BudgetConfig::default();
        c.rates[Kind::Tokens.index()] = Some(Rate::per_minute(1000));
        let mut b = BudgetState::default();
        let p = b
            .check(
                T0,
                &c,
                Cost {
                    tokens: 600,
                    ..Cost::default()
                },
            )
            .expect("fits");
        b.commit(&p, lease(1));
        b.settle(
            T0,
            &c,
            Usage {
                reserved: 600,
                ..Usage::default()
            },
            None,
        );
        assert_eq!(
            b.cell(Kind::Tokens)
                .available(T0, &c.rate(Kind::Tokens).unwrap()),
            400.0
        );
    }

    #[test]
    fn output_budget_is_charged_at_settle_and_gates_when_in_debt() {
        let mut c = BudgetConfig::default();
        c.rates[Kind::OutputTokens.index()] = Some(Rate::per_minute(100));
        let mut b = BudgetState::default();
        let p = b
            .check(
                T0,
                &c,
                Cost {
                    tokens: 5000,
                    ..Cost::default()
                },
            )
            .expect("output is not reserved");
        b.commit(&p, lease(1));
        b.settle(
            T0,
            &c,
            Usage {
                reserved: 5000,
                input: 10,
                output: 150,
                reported: true,
            },
            None,
        );
        assert!(matches!(
            b.check(T0, &c, Cost::default()),
            Err(BudgetRefusal::Rate {
                kind: Kind::OutputTokens,
                ..
            })
        ));
    }

    #[test]
    fn a_request_larger_than_capacity_is_never_admissible() {
        let mut c = BudgetConfig::default();
        c.rates[Kind::Tokens.index()] = Some(Rate::per_minute(1000));
        let mut b = BudgetState::default();
        assert_eq!(
            b.check(
                T0,
                &c,
                Cost {
                    tokens: 1001,
                    ..Cost::default()
                }
            ),
            Err(BudgetRefusal::TooLarge {
                kind: Kind::Tokens,
                cost: 1001,
                capacity: 1000
            })
        );
        assert_eq!(
            b.wait_for(
                T0,
                &c,
                Cost {
                    tokens: 1001,
                    ..Cost::default()
                }
            ),
            None
        );
        assert_eq!(
            b.wait_for(
                T0,
                &c,
                Cost {
                    tokens: 1000,
                    ..Cost::default()
                }
            ),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn concurrency_is_released_by_outcome_and_by_lease_expiry() {
        let c = BudgetConfig {
            max_concurrency: Some(2),
            ..BudgetConfig::default()
        };
        let mut b = BudgetState::default();
        for k in 1..=2 {
            let p = b.check(T0, &c, Cost::default()).expect("slot");
            b.commit(
                &p,
                Lease {
                    key: k,
                    until: T0 + ms(5000),
                },
            );
        }
        assert_eq!(
            b.check(T0, &c, Cost::default()),
            Err(BudgetRefusal::Concurrency {
                retry_after: CONCURRENCY_POLL
            })
        );
        // An outcome releases its slot.
        b.settle(T0, &c, Usage::default(), Some(1));
        assert_eq!(b.in_flight(), 1);
        let p = b.check(T0, &c, Cost::default()).expect("released slot");
        b.commit(
            &p,
            Lease {
                key: 3,
                until: T0 + ms(10_000),
            },
        );
        assert!(b.check(T0 + ms(4999), &c, Cost::default()).is_err());
        // Lease 2 (the crashed agent) expires at 5 s and gives its slot back.
        assert!(b.check(T0 + ms(5000), &c, Cost::default()).is_ok());
        assert_eq!(b.in_flight(), 1);
        // Releasing an unknown lease is harmless.
        b.settle(T0, &c, Usage::default(), Some(99));
        assert_eq!(b.in_flight(), 1);
    }

    #[test]
    fn provider_remaining_lowers_but_never_raises_our_view() {
        let c = rpm(100);
        let rate = c.rate(Kind::Requests).unwrap();
        let mut b = BudgetState::default();
        b.observe_remaining(T0, &c, Kind::Requests, 10);
        assert_eq!(b.cell(Kind::Requests).available(T0, &rate), 10.0);
        b.observe_remaining(T0, &c, Kind::Requests, 50);
        assert_eq!(b.cell(Kind::Requests).available(T0, &rate), 10.0);
        assert_eq!(drain(&mut b, &c, T0), 10);
    }

    fn with_reserve(c: BudgetConfig, interactive: u16, default: u16) -> BudgetConfig {
        BudgetConfig {
            reserve: [interactive, default],
            ..c
        }
    }

    fn at(p: Priority) -> Cost {
        Cost {
            tokens: 0,
            priority: p,
        }
    }

    /// 10 a minute with 20 % held for interactive and 10 % more for default:
    /// batch gets 7, default 8 (batch's plus its own share), interactive
    /// the rest; a refusal that only the reserve causes says so.
    #[test]
    fn a_reserve_refuses_lower_priorities_first() {
        let c = with_reserve(rpm(10), 200, 100);
        let mut b = BudgetState::default();
        let took = |b: &mut BudgetState, p| match b.check(T0, &c, at(p)) {
            Ok(plan) => {
                b.commit(&plan, lease(0));
                Ok(())
            }
            Err(r) => Err(r),
        };
        for _ in 0..7 {
            assert!(took(&mut b, Priority::Batch).is_ok());
        }
        match took(&mut b, Priority::Batch) {
            Err(BudgetRefusal::Reserved {
                priority,
                retry_after,
            }) => {
                assert_eq!(priority, Priority::Batch);
                // One request's worth of window frees in 6 s.
                assert_eq!(retry_after, Duration::from_secs(6));
            }
            other => panic!("{other:?}"),
        }
        assert!(took(&mut b, Priority::Default).is_ok());
        assert!(matches!(
            took(&mut b, Priority::Default),
            Err(BudgetRefusal::Reserved { .. })
        ));
        assert!(took(&mut b, Priority::Interactive).is_ok());
        assert!(took(&mut b, Priority::Interactive).is_ok());
        // Now the budget itself is empty: an ordinary rate refusal for all.
        for p in Priority::ALL {
            assert!(
                matches!(took(&mut b, p), Err(BudgetRefusal::Rate { .. })),
                "{p:?}"
            );
        }
        // The wait a batch call is told is the wait for its own share.
        let w = b.wait_for(T0, &c, at(Priority::Batch)).unwrap_or_default();
        let wi = b
            .wait_for(T0, &c, at(Priority::Interactive))
            .unwrap_or_default();
        assert!(w > wi, "{w:?} vs {wi:?}");
    }

    #[test]
    fn a_reserve_holds_back_concurrency_slots() {
        let c = with_reserve(
            BudgetConfig {
                max_concurrency: Some(4),
                ..BudgetConfig::default()
            },
            500,
            0,
        );
        let mut b = BudgetState::default();
        for k in 0..2 {
            let plan = b
                .check(T0, &c, at(Priority::Batch))
                .expect("half is usable");
            b.commit(&plan, lease(k));
        }
        assert!(matches!(
            b.check(T0, &c, at(Priority::Default)),
            Err(BudgetRefusal::Reserved { .. })
        ));
        for k in 2..4 {
            let plan = b
                .check(T0, &c, at(Priority::Interactive))
                .expect("reserved for it");
            b.commit(&plan, lease(k));
        }
        assert!(matches!(
            b.check(T0, &c, at(Priority::Interactive)),
            Err(BudgetRefusal::Concurrency { .. })
        ));
    }

    #[test]
    fn without_a_reserve_priorities_are_equal() {
        let c = rpm(3);
        let mut b = BudgetState::default();
        for p in Priority::ALL {
            let plan = b.check(T0, &c, at(p)).expect("fits");
            b.commit(&plan, lease(0));
        }
        for p in Priority::ALL {
            assert!(matches!(
                b.check(T0, &c, at(p)),
                Err(BudgetRefusal::Rate { .. })
            ));
        }
    }
}
