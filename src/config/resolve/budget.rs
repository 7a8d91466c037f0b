//! Budgets: the rate and concurrency limits of a target or a budget group.

use super::Cx;
use crate::config::raw::*;
use crate::domain::adaptive::{AdaptiveBounds, MAX_LIMIT};
use crate::domain::budget::{BudgetConfig, Kind, Rate};
use std::ops::Range;

impl Cx {
    pub(super) fn budget<B: HasAmounts>(
        &mut self,
        b: &B,
        window: Option<Dur>,
        span: Range<usize>,
        what: &str,
    ) -> BudgetConfig {
        let mut out = BudgetConfig::default();
        let window = window.map(|Dur(d)| d);
        if window.is_some_and(|w| w.is_zero()) {
            self.err(span.clone(), format!("{what}: window must be above 0"));
        }
        let mut any_windowed = false;
        for (kind, (per_minute, per_window)) in Kind::ALL.into_iter().zip(b.amounts()) {
            match (per_minute, per_window) {
                (Some(_), Some(_)) => self.err(
                    span.clone(),
                    format!(
                        "{what}: set either {k}_per_minute or {k} (with window), not both",
                        k = kind.as_str()
                    ),
                ),
                (Some(Positive(n)), None) => out.rates[kind.index()] = Some(Rate::per_minute(n)),
                (None, Some(Positive(n))) => {
                    any_windowed = true;
                    match window {
                        Some(w) if !w.is_zero() => {
                            out.rates[kind.index()] = Some(Rate {
                                amount: n,
                                window: w,
                            })
                        }
                        _ => self.err(
                            span.clone(),
                            format!(
                                "{what}: {} needs a window, e.g. window = \"10s\"",
                                kind.as_str()
                            ),
                        ),
                    }
                }
                (None, None) => {}
            }
        }
        let (spend, spend_windowed) = self.spend_limit(b.spend_amounts(), window, what);
        out.spend = spend;
        any_windowed |= spend_windowed;
        if window.is_some() && !any_windowed {
            self.err(
                span,
                format!("{what}: window is set but no per-window budget (requests, tokens, input_tokens, output_tokens) uses it"),
            );
        }
        match b.max_concurrency().map(|c| (*c.get_ref(), c.span())) {
            Some((ConcurrencyToml::Fixed(n), _)) => {
                out.max_concurrency = Some(u32::try_from(n).unwrap_or(u32::MAX));
                if let Some(a) = b.adaptive() {
                    self.err(
                        a.span(),
                        format!("{what}: adaptive bounds need max_concurrency = \"adaptive\""),
                    );
                }
            }
            Some((ConcurrencyToml::Adaptive, span)) if b.is_group() => self.err(
                span,
                format!(
                    "{what}: max_concurrency = \"adaptive\" is learned per target; \
                     a budget group takes a fixed max_concurrency"
                ),
            ),
            Some((ConcurrencyToml::Adaptive, span)) => {
                if let Some(bounds) = self.adaptive_bounds(b.adaptive(), span, what) {
                    // The limit admission enforces before anything is learned.
                    out.max_concurrency = Some(bounds.initial);
                    out.adaptive = Some(bounds);
                }
            }
            None => {
                if let Some(a) = b.adaptive() {
                    self.err(
                        a.span(),
                        format!("{what}: adaptive bounds need max_concurrency = \"adaptive\""),
                    );
                }
            }
        }
        if let Some(r) = b.reserve() {
            let span = r.span();
            let r = *r.get_ref();
            let mut per_mille = [0u16; 2];
            for (i, (name, x)) in [("interactive", r.interactive), ("default", r.default)]
                .into_iter()
                .enumerate()
            {
                let Some(x) = x else { continue };
                if !(0.0..1.0).contains(&x) {
                    self.err(
                        span.clone(),
                        format!("{what}: reserve.{name} = {x} must be a share in 0.0..1.0"),
                    );
                    continue;
                }
                per_mille[i] = (x * 1000.0).round() as u16;
            }
            if per_mille[0] + per_mille[1] >= 1000 {
                self.err(
                    span.clone(),
                    format!("{what}: the reserves add up to the whole budget; batch calls could never run"),
                );
            }
            if out.is_unlimited() {
                self.err(
                    span,
                    format!(
                        "{what}: reserve needs a budget to hold back (a rate or max_concurrency)"
                    ),
                );
            }
            out.reserve = per_mille;
        }
        out
    }
}

impl Cx {
    /// The bounds of an adaptive limit: defaults [`DEFAULT_ADAPTIVE`], each
    /// checked (`1 <= min <= initial <= max <= MAX_LIMIT`).
    fn adaptive_bounds(
        &mut self,
        a: Option<&toml::Spanned<AdaptiveToml>>,
        span: Range<usize>,
        what: &str,
    ) -> Option<AdaptiveBounds> {
        let (span, t) = match a {
            Some(a) => (a.span(), *a.get_ref()),
            None => (span, AdaptiveToml::default()),
        };
        let d = DEFAULT_ADAPTIVE;
        let min = t.min.unwrap_or(i64::from(d.min));
        let max = t.max.unwrap_or(i64::from(d.max));
        // Unset, the initial limit is the default one fitted into the bounds.
        let initial = t
            .initial
            .unwrap_or_else(|| i64::from(d.initial).clamp(min.min(max), max.max(min)));
        let problem = if min < 1 {
            Some(format!("adaptive.min = {min} must be at least 1"))
        } else if max > i64::from(MAX_LIMIT) {
            Some(format!("adaptive.max = {max} must be at most {MAX_LIMIT}"))
        } else if min > max {
            Some(format!(
                "adaptive.min = {min} must not be above adaptive.max = {max}"
            ))
        } else if !(min..=max).contains(&initial) {
            Some(format!(
                "adaptive.initial = {initial} must be between adaptive.min = {min} and adaptive.max = {max}"
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            self.err(span, format!("{what}: {p}"));
            return None;
        }
        // In range of u32 now (1..=MAX_LIMIT).
        Some(AdaptiveBounds {
            min: min as u32,
            max: max as u32,
            initial: initial as u32,
            share: 1,
        })
    }
}

impl Cx {
    /// A spend limit from `spend` (with `window`), `spend_per_day` or
    /// `spend_per_hour` (at most one), as micro-units per window; the
    /// second value says whether `spend` used the window.
    pub(super) fn spend_limit(
        &mut self,
        amounts: [Option<&toml::Spanned<f64>>; 3],
        window: Option<std::time::Duration>,
        what: &str,
    ) -> (Option<Rate>, bool) {
        let spends = [
            (amounts[0], window, "spend"),
            (
                amounts[1],
                Some(std::time::Duration::from_secs(86_400)),
                "spend_per_day",
            ),
            (
                amounts[2],
                Some(std::time::Duration::from_secs(3600)),
                "spend_per_hour",
            ),
        ];
        let (mut out, mut windowed) = (None, false);
        for (amount, w, key) in spends {
            let Some(a) = amount else { continue };
            let x = *a.get_ref();
            if key == "spend" {
                windowed = true;
            }
            if !(x.is_finite() && x > 0.0 && x <= 1e9) {
                self.err(
                    a.span(),
                    format!("{what}: {key} = {x} must be an amount of money above 0 (at most 1e9)"),
                );
                continue;
            }
            if out.is_some() {
                self.err(
                    a.span(),
                    format!(
                        "{what}: set one of spend (with window), spend_per_hour or spend_per_day"
                    ),
                );
                continue;
            }
            match w {
                Some(w) if !w.is_zero() => {
                    out = Some(Rate {
                        amount: crate::domain::spend::limit_micros(x),
                        window: w,
                    })
                }
                _ => self.err(
                    a.span(),
                    format!(
                        "{what}: spend needs a window, e.g. window = \"1h\" (or use spend_per_day)"
                    ),
                ),
            }
        }
        (out, windowed)
    }

    /// The spend limit of a route, a caller or a tenant, as a scope named
    /// `<kind>:<name>`.
    pub(super) fn spend_scope<S: HasSpend>(
        &mut self,
        s: &S,
        kind: &str,
        name: &str,
        span: Range<usize>,
        what: &str,
    ) -> Option<std::sync::Arc<crate::config::SpendScope>> {
        let (amounts, window) = s.spend_keys();
        let window = window.map(|Dur(d)| d);
        if window.is_some_and(|w| w.is_zero()) {
            self.err(span.clone(), format!("{what}: window must be above 0"));
        }
        let (limit, windowed) = self.spend_limit(amounts, window, what);
        if window.is_some() && !windowed {
            self.err(
                span,
                format!("{what}: window is set but spend is not (window is the period of spend)"),
            );
        }
        limit.map(|l| std::sync::Arc::new(crate::config::SpendScope::new(kind, name, l)))
    }
}

/// Bounds of `max_concurrency = "adaptive"` when the `adaptive` table (or
/// one of its keys) is left out: start at 8 calls at once, never below 1,
/// never above 256 (past which a single provider deployment rarely scales,
/// and a runaway limit would take long to come back down).
pub const DEFAULT_ADAPTIVE: AdaptiveBounds = AdaptiveBounds {
    min: 1,
    max: 256,
    initial: 8,
    share: 1,
};

/// Targets and budget groups share the budget keys.
pub(super) trait HasAmounts {
    fn amounts(&self) -> [(Option<Positive>, Option<Positive>); 4];
    fn max_concurrency(&self) -> Option<&toml::Spanned<ConcurrencyToml>>;
    fn adaptive(&self) -> Option<&toml::Spanned<AdaptiveToml>>;
    fn reserve(&self) -> Option<&toml::Spanned<ReserveToml>>;
    /// (spend, spend_per_day, spend_per_hour).
    fn spend_amounts(&self) -> [Option<&toml::Spanned<f64>>; 3];
    /// Budget groups take fixed limits only.
    fn is_group(&self) -> bool;
}

/// Targets and budget groups read the same keys (the macro that declares
/// them, `with_budget_fields!`, repeats them in both structs).
macro_rules! has_amounts {
    ($t:ty, group: $group:expr) => {
        impl HasAmounts for $t {
            fn amounts(&self) -> [(Option<Positive>, Option<Positive>); 4] {
                <$t>::amounts(self)
            }
            fn max_concurrency(&self) -> Option<&toml::Spanned<ConcurrencyToml>> {
                self.max_concurrency.as_ref()
            }
            fn adaptive(&self) -> Option<&toml::Spanned<AdaptiveToml>> {
                self.adaptive.as_ref()
            }
            fn reserve(&self) -> Option<&toml::Spanned<ReserveToml>> {
                self.reserve.as_ref()
            }
            fn spend_amounts(&self) -> [Option<&toml::Spanned<f64>>; 3] {
                [
                    self.spend.as_ref(),
                    self.spend_per_day.as_ref(),
                    self.spend_per_hour.as_ref(),
                ]
            }
            fn is_group(&self) -> bool {
                $group
            }
        }
    };
}

has_amounts!(TargetToml, group: false);
has_amounts!(GroupToml, group: true);
