//! `[defaults]` and every `breaker` / `retry` table (defaults and per target).

use super::Cx;
use crate::config::TargetSettings;
use crate::config::raw::*;
use crate::domain::BreakerConfig;
use crate::domain::breaker::{RateRule, Treatment};
use crate::domain::retry::{Jitter, RetryConfig};
use crate::domain::taxonomy::OutcomeClass;
use std::ops::Range;

impl Cx {
    /// `[defaults]`: what every target starts from.
    pub(super) fn default_target(
        &mut self,
        d: &DefaultsToml,
        span: Range<usize>,
    ) -> TargetSettings {
        let mut base = TargetSettings::default();
        if let Some(b) = &d.breaker {
            self.breaker(b, &mut base.breaker, span.clone(), "[defaults.breaker]");
        }
        if let Some(r) = &d.retry {
            self.retry(r, &mut base.retry, span, "[defaults.retry]");
        }
        if let Some(Dur(dur)) = d.permit_lease {
            base.permit_lease = dur;
        }
        base
    }

    pub(super) fn breaker(
        &mut self,
        b: &BreakerToml,
        out: &mut BreakerConfig,
        span: Range<usize>,
        what: &str,
    ) {
        let u32v = |p: Positive| u32::try_from(p.0).unwrap_or(u32::MAX);
        if let Some(v) = b.failure_threshold {
            out.failure_threshold = u32v(v);
        }
        if let Some(v) = b.success_threshold {
            out.success_threshold = u32v(v);
        }
        if let Some(Dur(d)) = b.open_duration {
            out.open_duration = d;
        }
        if let Some(v) = b.half_open_max_probes {
            out.half_open_max_probes = u32v(v);
        }
        if let Some(Dur(d)) = b.probe_lease {
            out.probe_lease = d;
        }
        if let Some(m) = b.backoff_multiplier {
            if !(m.is_finite() && m >= 1.0) {
                self.err(
                    span.clone(),
                    format!("{what}: backoff_multiplier must be >= 1.0, got {m}"),
                );
            } else {
                out.backoff_multiplier = m;
            }
        }
        if let Some(Dur(d)) = b.max_open_duration {
            out.max_open_duration = d;
        }
        if let Some(Fraction(j)) = b.jitter {
            out.jitter = j;
        }
        if let Some(Dur(d)) = b.window {
            out.window = d;
        }
        if let Some(Fraction(t)) = b.failure_rate_threshold {
            if t <= 0.0 {
                self.err(
                    span.clone(),
                    format!("{what}: failure_rate_threshold must be above 0"),
                );
            }
            let minimum_calls = out.rate_rule.map_or(10, |r| r.minimum_calls);
            out.rate_rule = Some(RateRule {
                threshold: t,
                minimum_calls,
            });
        }
        if let Some(v) = b.minimum_calls {
            match out.rate_rule.as_mut() {
                Some(r) => r.minimum_calls = u32v(v),
                None => self.err(
                    span.clone(),
                    format!("{what}: minimum_calls only applies with failure_rate_threshold"),
                ),
            }
        }
        if let Some(Dur(d)) = b.slow_call_duration {
            out.slow_call_duration = Some(d);
        }
        if let Some(Dur(d)) = b.persistent_open_duration {
            out.persistent_open_duration = d;
        }
        if let Some(CallerQuorum(n)) = b.min_distinct_callers {
            out.min_distinct_callers = n;
        }
        if let Some(t) = &b.treat {
            let pairs = [
                (OutcomeClass::Transient, t.transient),
                (OutcomeClass::Timeout, t.timeout),
                (OutcomeClass::RateLimited, t.rate_limited),
                (OutcomeClass::Persistent, t.persistent),
                (OutcomeClass::BadInput, t.bad_input),
                (OutcomeClass::Partial, t.partial),
            ];
            for (class, v) in pairs {
                if let Some(v) = v {
                    let treatment = match v {
                        TreatmentToml::Failure => Treatment::Failure,
                        TreatmentToml::Success => Treatment::Success,
                        TreatmentToml::Ignore => Treatment::Ignore,
                        TreatmentToml::Open => Treatment::Open,
                    };
                    out.treatments.set(class, treatment);
                }
            }
        }
        if out.open_duration.is_zero() {
            self.err(
                span.clone(),
                format!("{what}: open_duration must be above 0"),
            );
        }
        if out.probe_lease.is_zero() {
            self.err(span.clone(), format!("{what}: probe_lease must be above 0"));
        }
        if out.window.is_zero() {
            self.err(span.clone(), format!("{what}: window must be above 0"));
        }
        if out.max_open_duration < out.open_duration {
            self.err(
                span,
                format!(
                    "{what}: max_open_duration ({:?}) is shorter than open_duration ({:?})",
                    out.max_open_duration, out.open_duration
                ),
            );
        }
    }

    pub(super) fn retry(
        &mut self,
        r: &RetryToml,
        out: &mut RetryConfig,
        span: Range<usize>,
        what: &str,
    ) {
        if let Some(n) = r.max_retries {
            out.max_retries = n;
        }
        if let Some(Dur(d)) = r.base_delay {
            out.base_delay = d;
        }
        if let Some(Dur(d)) = r.max_delay {
            out.max_delay = d;
        }
        if let Some(s) = r.strategy {
            out.jitter = match s {
                StrategyToml::Full => Jitter::Full,
                StrategyToml::Equal => Jitter::Equal,
                StrategyToml::Decorrelated => Jitter::Decorrelated,
            };
        }
        if let Some(NonNeg(x)) = r.retry_ratio {
            out.budget_ratio = x;
        }
        if let Some(Dur(d)) = r.retry_window {
            out.budget_window = d;
        }
        if let Some(NonNeg(x)) = r.min_retries_per_second {
            out.min_retries_per_second = x;
        }
        if out.max_delay < out.base_delay {
            self.err(
                span.clone(),
                format!("{what}: max_delay is shorter than base_delay"),
            );
        }
        if out.budget_window.is_zero() {
            self.err(span, format!("{what}: retry_window must be above 0"));
        }
    }
}
