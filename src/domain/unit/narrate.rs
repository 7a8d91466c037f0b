//! Breaker events turned into fleet events, with causes a person can read
//! ("5 consecutive transient failures; last: transient (http 529 overloaded_error)").

use super::state::TargetState;
use super::{Effects, UnitCx};
use crate::domain::OutcomeClass;
use crate::domain::breaker::{BreakerEvent, BreakerState, Cause, Trigger};
use crate::domain::budget::BudgetRefusal;
use crate::domain::event::EventKind;
use std::sync::Arc;

/// Turns the breaker's events into engine events and remembers the cause.
pub fn absorb_breaker_events(
    _cx: &UnitCx<'_>,
    st: &mut TargetState,
    bev: &[BreakerEvent],
    origin: Option<(Option<Arc<str>>, String)>,
    fx: &mut Effects,
) {
    for e in bev {
        match *e {
            BreakerEvent::Transition(t) => {
                let (cause, class, failures) =
                    describe_cause(t.cause, origin.as_ref().map(|o| o.1.as_str()));
                st.set_last_cause(Some(cause.clone().into_boxed_str()));
                if t.cause == Cause::OpenElapsed {
                    // Time-driven: a restart derives it again from the
                    // durable open-until, so it is written behind.
                    fx.state_dirty = true;
                } else {
                    fx.durable = true;
                }
                fx.events.push(EventKind::BreakerTransition {
                    from: t.from,
                    to: t.to,
                    cause,
                    class,
                    failures,
                    caller: origin.as_ref().and_then(|o| o.0.clone()),
                    open_until: t.open_until,
                });
            }
            BreakerEvent::ProbeExpired { probe } => {
                fx.events.push(EventKind::ProbeExpired { probe });
            }
            BreakerEvent::OpenExtended { until } => {
                fx.durable = true;
                st.set_last_cause(Some(
                    format!(
                        "open period extended by {}",
                        origin
                            .as_ref()
                            .map_or("a persistent failure", |o| o.1.as_str())
                    )
                    .into_boxed_str(),
                ));
                fx.events.push(EventKind::BreakerTransition {
                    from: BreakerState::Open,
                    to: BreakerState::Open,
                    cause: "open period extended by a persistent failure".into(),
                    class: Some(OutcomeClass::Persistent),
                    failures: 0,
                    caller: origin.as_ref().and_then(|o| o.0.clone()),
                    open_until: Some(until),
                });
            }
            BreakerEvent::TripSuppressed {
                cause,
                callers,
                needed,
            } => {
                // Said where an operator looks (the target's cause), and
                // written behind like the streak it explains; never
                // published: it comes with every failure while it lasts.
                let (what, _, _) = describe_cause(cause, None);
                let last = origin
                    .as_ref()
                    .map_or(String::new(), |o| format!("; last: {}", o.1));
                let noun = if callers == 1 { "caller" } else { "callers" };
                st.set_last_cause(Some(
                    format!(
                        "{what}, but from {callers} {noun} of the {needed} needed (min_distinct_callers){last}"
                    )
                    .into_boxed_str(),
                ));
                fx.state_dirty = true;
            }
        }
    }
}

pub fn describe_refusal(r: &BudgetRefusal, group: Option<&str>) -> String {
    let scope = group.map_or(String::new(), |g| format!(" of budget group {g:?}"));
    match r {
        BudgetRefusal::Rate { kind, .. } => format!("{} budget{scope} exhausted", kind.as_str()),
        BudgetRefusal::Concurrency { .. } => format!("max_concurrency{scope} reached"),
        BudgetRefusal::Reserved { priority, .. } => format!(
            "what is left{scope} is reserved for priorities above {}",
            priority.as_str()
        ),
        BudgetRefusal::TooLarge {
            kind,
            cost,
            capacity,
        } => {
            format!(
                "request of {cost} {} exceeds the budget{scope} of {capacity}",
                kind.as_str()
            )
        }
    }
}

pub fn describe_outcome(class: OutcomeClass, status: i32, error_type: &str) -> String {
    let mut s = class.as_str().to_string();
    if status != 0 || !error_type.is_empty() {
        s.push_str(" (");
        if status != 0 {
            s.push_str(&format!("http {status}"));
        }
        if !error_type.is_empty() {
            if status != 0 {
                s.push(' ');
            }
            s.extend(error_type.chars().take(64));
        }
        s.push(')');
    }
    s
}

fn trigger_class(t: Trigger) -> Option<OutcomeClass> {
    match t {
        Trigger::Outcome(c) => Some(c),
        Trigger::SlowCall => None,
    }
}

fn describe_cause(cause: Cause, outcome: Option<&str>) -> (String, Option<OutcomeClass>, u32) {
    let last = outcome.map_or(String::new(), |o| format!("; last: {o}"));
    match cause {
        Cause::ConsecutiveFailures { count, trigger } => {
            let what = match trigger {
                Trigger::Outcome(c) => format!("{c} failures"),
                Trigger::SlowCall => "slow calls".into(),
            };
            (
                format!("{count} consecutive {what}{last}"),
                trigger_class(trigger),
                count,
            )
        }
        Cause::FailureRate { failures, calls } => (
            format!("failure rate {failures}/{calls} over the window{last}"),
            None,
            u32::try_from(failures).unwrap_or(u32::MAX),
        ),
        Cause::Persistent { class } => (format!("persistent failure{last}"), Some(class), 1),
        Cause::ProbeFailed { trigger } => {
            (format!("probe failed{last}"), trigger_class(trigger), 1)
        }
        Cause::OpenElapsed => ("open period elapsed".into(), None, 0),
        Cause::ProbesSucceeded { count } => (
            format!("{count} probe successes"),
            Some(OutcomeClass::Success),
            0,
        ),
        Cause::Operator { mode } => {
            let what = match mode {
                crate::domain::breaker::Mode::ForcedOpen => "operator forced it open",
                crate::domain::breaker::Mode::ForcedClosed => "operator forced it closed",
                crate::domain::breaker::Mode::Automatic => "operator returned it to automatic",
            };
            (what.to_string(), None, 0)
        }
        Cause::Reset => ("operator reset".into(), None, 0),
    }
}
