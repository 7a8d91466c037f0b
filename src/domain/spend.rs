//! Spend limits: money per window, reserved at admission and settled with
//! the real usage.
//!
//! Money is counted in micro-units of the currency the prices are written
//! in (`cost_per_mtok_*` is per million tokens, so one token at a price of
//! 3.0 costs exactly 3 micro-units: no floating point accumulates). A limit
//! is a GCRA cell like the rate budgets (see [`super::budget`]): the same
//! guarantee of never admitting more than the limit within any window, the
//! same bounded debt when real usage exceeds the reservation.
//!
//! At admission the call reserves `estimated_tokens` at the input price plus
//! `max_output_tokens` at the output price (when the caller says how much it
//! may produce); its outcome charges the difference to the real usage. A
//! report without token counts keeps the reservation.

use super::Time;
use super::budget::{Gcra, Rate};
use std::time::Duration;

/// Prices per million tokens, as configured on a target.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Prices {
    pub input: f64,
    pub output: f64,
}

impl Prices {
    pub fn is_priced(&self) -> bool {
        self.input > 0.0 || self.output > 0.0
    }

    /// Micro-units for `input` and `output` tokens, rounded up (a call is
    /// never free because it was small), saturating on absurd counts.
    pub fn micros(&self, input: u64, output: u64) -> u64 {
        let m = input as f64 * self.input + output as f64 * self.output;
        if m <= 0.0 || !m.is_finite() {
            0
        } else if m >= u64::MAX as f64 {
            u64::MAX
        } else {
            m.ceil() as u64
        }
    }
}

/// Money in micro-units to the currency (for views and metrics).
pub fn dollars(micros: u64) -> f64 {
    micros as f64 / 1e6
}

/// A configured limit in the currency (`spend = 10.0`), as micro-units.
pub fn limit_micros(amount: f64) -> u64 {
    (amount * 1e6).round().clamp(1.0, u64::MAX as f64) as u64
}

/// One scope's spending: its limit cell, what it has spent in all, and
/// whether it is refusing (so the event fires on the edge only).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spend {
    cell: Gcra,
    /// Settled spend since creation or reset, in micro-units.
    pub total_micros: u64,
    pub limited: bool,
}

impl Spend {
    /// Whether `cost` fits under `limit` now (leaving `held_back` per mille
    /// for higher priorities): the cell's next state, or how long until it
    /// would fit.
    pub fn check(
        &self,
        now: Time,
        limit: &Rate,
        cost: u64,
        held_back: u16,
    ) -> Result<Time, Duration> {
        self.cell.try_take_above(now, limit, cost, held_back)
    }

    /// Applies a successful [`Spend::check`] made in the same critical section.
    pub fn commit(&mut self, tat: Time) {
        self.cell = Gcra::from_tat(tat);
        self.limited = false;
    }

    /// Settles a call: charges (or refunds) the difference between its real
    /// cost and what admission reserved, and counts the real cost.
    pub fn settle(&mut self, now: Time, limit: Option<&Rate>, reserved: u64, actual: u64) {
        if let Some(rate) = limit {
            let delta = i128::from(actual) - i128::from(reserved);
            let delta = i64::try_from(delta).unwrap_or(if delta > 0 { i64::MAX } else { i64::MIN });
            self.cell.adjust(now, rate, delta);
        }
        self.total_micros = self.total_micros.saturating_add(actual);
    }

    /// Charges what was spent elsewhere against this cell: `moved` net
    /// micro-units taken (negative: given back) and `settled` real cost
    /// counted. A cluster replica that decided alone merges its spending
    /// back this way.
    pub fn absorb(&mut self, now: Time, limit: &Rate, moved: i64, settled: u64) {
        self.cell.adjust(now, limit, moved);
        self.total_micros = self.total_micros.saturating_add(settled);
    }

    /// Money still available under `limit` now, in micro-units (negative in debt).
    pub fn available(&self, now: Time, limit: &Rate) -> f64 {
        self.cell.available(now, limit)
    }

    /// The cell's theoretical arrival time (persistence).
    pub fn tat(&self) -> Time {
        self.cell.tat()
    }

    pub fn restore(tat: Time, total_micros: u64, limited: bool) -> Spend {
        Spend {
            cell: Gcra::from_tat(tat),
            total_micros,
            limited,
        }
    }

    /// Full again, totals kept (an operator reset of the limit).
    pub fn refill(&mut self) {
        self.cell = Gcra::default();
        self.limited = false;
    }
}

/// Reserves `cost` against several limits at once, all or nothing (a
/// route's, a caller's and a tenant's: see `config::SpendScope`). On a
/// refusal nothing is taken, and the answer names the limit that waits
/// longest (the one the call must wait for) with whether it only now
/// started refusing (its edge flag: the event fires once per episode).
pub fn reserve_all(cells: &mut [(&mut Spend, &Rate)], now: Time, cost: u64) -> Result<(), Refusal> {
    let mut tats = Vec::with_capacity(cells.len());
    let mut worst: Option<(usize, Duration)> = None;
    for (i, (spend, limit)) in cells.iter().enumerate() {
        match spend.check(now, limit, cost, 0) {
            Ok(tat) => tats.push(tat),
            Err(wait) => {
                if worst.is_none_or(|(_, w)| wait > w) {
                    worst = Some((i, wait));
                }
            }
        }
    }
    if let Some((index, wait)) = worst {
        let first = !std::mem::replace(&mut cells[index].0.limited, true);
        return Err(Refusal { index, wait, first });
    }
    for ((spend, _), tat) in cells.iter_mut().zip(tats) {
        spend.commit(tat);
    }
    Ok(())
}

/// Why [`reserve_all`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Which limit (index into the cells).
    pub index: usize,
    /// When it frees enough for the call.
    pub wait: Duration,
    /// It was not refusing before this call.
    pub first: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Time = Time::from_secs(1_000_000);

    fn per_hour(dollars: f64) -> Rate {
        Rate {
            amount: limit_micros(dollars),
            window: Duration::from_secs(3600),
        }
    }

    #[test]
    fn micros_are_exact_for_per_million_prices() {
        let p = Prices {
            input: 3.0,
            output: 15.0,
        };
        assert_eq!(p.micros(1000, 500), 3000 + 7500);
        assert_eq!(
            Prices {
                input: 0.25,
                output: 0.0
            }
            .micros(3, 0),
            1,
            "rounded up"
        );
        assert_eq!(Prices::default().micros(1_000_000, 1_000_000), 0);
        assert!(!Prices::default().is_priced());
        assert_eq!(p.micros(u64::MAX, u64::MAX), u64::MAX);
        assert!((dollars(limit_micros(10.0)) - 10.0).abs() < 1e-12);
    }

    /// $1 an hour: reservations fill it, a refund on settle frees room,
    /// real usage above the reservation goes into bounded debt, and the
    /// wait is when the window frees enough.
    #[test]
    fn reserve_then_settle_keeps_spend_under_the_limit() {
        let limit = per_hour(1.0);
        let mut s = Spend::default();
        // Two reservations of 40 cents fit, a third does not.
        for _ in 0..2 {
            let tat = s.check(T0, &limit, 400_000, 0).expect("fits");
            s.commit(tat);
        }
        let wait = s.check(T0, &limit, 400_000, 0).expect_err("over");
        // 20 cents are missing: a fifth of the hour.
        assert_eq!(wait, Duration::from_secs(720));
        // The first call really cost 10 cents: 30 refunded.
        s.settle(T0, Some(&limit), 400_000, 100_000);
        assert_eq!(s.total_micros, 100_000);
        let tat = s
            .check(T0, &limit, 400_000, 0)
            .expect("fits after the refund");
        s.commit(tat);
        assert!((s.available(T0, &limit) - 100_000.0).abs() < 1.0);
        // The second cost $5: one window of debt at most.
        s.settle(T0, Some(&limit), 400_000, 5_000_000);
        assert!(s.available(T0, &limit) >= -1_000_001.0);
        assert!(
            s.check(T0 + Duration::from_secs(3599), &limit, 1, 0)
                .is_err()
        );
        assert!(
            s.check(T0 + Duration::from_secs(7200), &limit, 1, 0)
                .is_ok()
        );
        // Without a limit, only the total moves.
        let mut free = Spend::default();
        free.settle(T0, None, 0, 42);
        assert_eq!(free.total_micros, 42);
    }

    /// Three limits: one that is short refuses the call, nothing is taken
    /// from the others, the refusal names the one that waits longest and
    /// says "first" only once; once it frees, all three are charged.
    #[test]
    fn absorbing_absurd_amounts_stays_bounded() {
        let limit = per_hour(1.0);
        let now = Time::from_secs(1_000_000);
        let mut s = Spend::default();
        // The most a merge could ever carry: debt bounded to one window.
        s.absorb(now, &limit, i64::MAX, u64::MAX);
        assert_eq!(s.total_micros, u64::MAX);
        assert!(s.available(now, &limit) >= -(limit.amount as f64) - 1.0);
        s.absorb(now, &limit, 1, u64::MAX);
        assert_eq!(s.total_micros, u64::MAX, "the total saturates");
        // The most it could give back: never more than full.
        s.absorb(now, &limit, i64::MIN, 0);
        assert!(s.available(now, &limit) <= limit.amount as f64);
    }

    #[test]
    fn reserve_all_is_all_or_nothing() {
        let (roomy, tight) = (per_hour(10.0), per_hour(1.0));
        let (mut a, mut b, mut c) = (Spend::default(), Spend::default(), Spend::default());
        let tat = b.check(T0, &tight, 900_000, 0).expect("fits");
        b.commit(tat);
        let mut cells = [(&mut a, &roomy), (&mut b, &tight), (&mut c, &roomy)];
        let r = reserve_all(&mut cells, T0, 500_000).expect_err("b is short");
        assert_eq!((r.index, r.first), (1, true));
        assert_eq!(
            r.wait,
            Duration::from_secs(1440),
            "40 cents of an hour's dollar"
        );
        let again = reserve_all(&mut cells, T0, 500_000).expect_err("still short");
        assert!(!again.first, "the edge fires once");
        assert!(
            (a.available(T0, &roomy) - 10_000_000.0).abs() < 1.0,
            "a untouched"
        );
        let later = T0 + Duration::from_secs(1440);
        let mut cells = [(&mut a, &roomy), (&mut b, &tight), (&mut c, &roomy)];
        reserve_all(&mut cells, later, 500_000).expect("fits now");
        assert!(!b.limited, "admitting clears the edge");
        assert!((a.available(later, &roomy) - 9_500_000.0).abs() < 1.0);
        assert!((c.available(later, &roomy) - 9_500_000.0).abs() < 1.0);
    }

    #[test]
    fn a_priority_reserve_holds_back_money_too() {
        let limit = per_hour(1.0);
        let s = Spend::default();
        assert!(s.check(T0, &limit, 900_000, 200).is_err());
        assert!(s.check(T0, &limit, 800_000, 200).is_ok());
    }
}
