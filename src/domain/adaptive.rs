//! Adaptive concurrency limits: the fleet learns how many calls a provider
//! takes at once (additive increase, multiplicative decrease).
//!
//! A fixed `max_concurrency` is a guess: too low wastes a provider's
//! capacity, too high turns its overload into a storm of 429s and 529s. An
//! adaptive target instead moves its limit with what its outcomes say:
//!
//! * **Additive increase.** Every success at normal latency is a credit;
//!   once there are as many credits as the limit (about one round of calls
//!   at the current limit) the limit grows by one, but only if the fleet
//!   actually reached the limit since the last increase
//!   ([`note_admitted`]): a limit nobody fills teaches nothing, and would
//!   otherwise creep up to its maximum while traffic is light, then let a
//!   burst through all at once.
//! * **Multiplicative decrease.** A 429, an overload (529, 503, or an error
//!   type saying "overloaded"), or latency grown to [`LATENCY_GROWTH`] times
//!   its slow-moving baseline cuts the limit to [`DECREASE`] of itself.
//! * **One cut per overload.** The calls in flight when an overload starts
//!   all report it, often within milliseconds: cutting once per report would
//!   take a limit of 20 to the minimum on one burst. A call admitted *before*
//!   the last cut therefore cannot cut again (it saw the overload the cut
//!   answered); only calls admitted under the new limit can. A report without
//!   an admission time waits out the recent latency instead (at least
//!   [`MIN_HOLD`]).
//!
//! Why ×0.8 rather than TCP's ×0.5 or the common ×0.7: the limit saws
//! between the cut and the provider's real limit, and with one cut per
//! overload it needs no deep cut to stop the bleeding; 0.8 keeps the whole
//! saw within 20 % of the provider's limit (better use of it), and a cycle
//! from 0.8·H back to H still takes about 0.2·H² successes, so a single 429
//! per cycle stays near 1 % for limits of 20 and well under for larger ones.
//!
//! The state is small and lives with the target's ([`AdaptiveState`]), so the
//! embedded backend and cluster replicas (which run these same functions on
//! state read from Redis) learn one limit for the whole fleet.

use super::event::EventKind;
use super::{OutcomeClass, Time};
use std::time::Duration;

/// Each cut keeps this share of the limit (see the module doc for why).
pub const DECREASE: f64 = 0.8;

/// Latency this many times the baseline means the provider is queueing.
pub const LATENCY_GROWTH: f64 = 2.0;

/// A limit moving by at least this share (or reaching a bound) is published.
pub const EVENT_STEP: f64 = 0.1;

/// Shortest time between two cuts caused by reports that do not say when
/// their call was admitted.
pub const MIN_HOLD: Duration = Duration::from_secs(1);

/// Largest `adaptive.max` the config accepts.
pub const MAX_LIMIT: u32 = 100_000;

/// Weight of a sample below the baseline: the baseline leans toward the
/// fast end of what the provider does when it is not busy.
const BASELINE_DOWN: f64 = 1.0 / 16.0;
/// Weight of a sample above it: slow, so growth caused by overload (tens of
/// calls) shows against it, while a provider that became slower for good is
/// learned again within a few hundred calls.
const BASELINE_UP: f64 = 1.0 / 128.0;

/// `max_concurrency = "adaptive"` with its bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdaptiveBounds {
    pub min: u32,
    pub max: u32,
    /// The limit before anything was learned.
    pub initial: u32,
    /// Replicas deciding alone (cluster degraded mode) each use 1/share of
    /// the learned limit; 1 otherwise.
    pub share: u32,
}

impl AdaptiveBounds {
    pub fn clamp(&self, limit: u32) -> u32 {
        limit.clamp(self.min, self.max.max(self.min))
    }

    /// The concurrency limit admission enforces now.
    pub fn effective(&self, st: Option<&AdaptiveState>) -> u32 {
        let learned = self.clamp(st.map_or(self.initial, |s| s.limit));
        (learned / self.share.max(1)).max(1)
    }

    /// A fresh state at the initial limit.
    pub fn start(&self) -> AdaptiveState {
        let limit = self.clamp(self.initial);
        AdaptiveState {
            limit,
            published: limit,
            from: limit,
            ..AdaptiveState::default()
        }
    }
}

/// Why the limit last moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Change {
    /// Nothing learned yet.
    #[default]
    Start,
    /// Successes at normal latency.
    Increased,
    /// The provider answered 429.
    RateLimited,
    /// The provider said it was overloaded (529, 503).
    Overloaded,
    /// Latency grew well past its baseline.
    Latency,
    /// A config reload moved the bounds past it.
    Bounds,
}

impl Change {
    pub fn code(self) -> u32 {
        match self {
            Change::Start => 0,
            Change::Increased => 1,
            Change::RateLimited => 2,
            Change::Overloaded => 3,
            Change::Latency => 4,
            Change::Bounds => 5,
        }
    }

    pub fn from_code(c: u32) -> Change {
        match c {
            1 => Change::Increased,
            2 => Change::RateLimited,
            3 => Change::Overloaded,
            4 => Change::Latency,
            5 => Change::Bounds,
            _ => Change::Start,
        }
    }

    fn cause(self) -> &'static str {
        match self {
            Change::Start => "initial limit",
            Change::Increased => "successes at normal latency",
            Change::RateLimited => "the provider answered 429",
            Change::Overloaded => "the provider said it was overloaded",
            Change::Latency => "latency grew past twice its baseline",
            Change::Bounds => "the configured bounds changed",
        }
    }
}

/// What an adaptive target has learned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdaptiveState {
    pub limit: u32,
    /// Successes at normal latency towards the next increase.
    pub credit: u32,
    /// Slow-moving latency baseline in microseconds (0 = none yet).
    pub baseline_us: u32,
    /// When the limit was last cut: calls admitted before cannot cut it again.
    pub cut_at: Time,
    /// An admission filled the limit since the last increase.
    pub reached: bool,
    /// The limit last published in a `LimitAdapted` event.
    pub published: u32,
    /// The limit before the last change, and why and when it changed.
    pub from: u32,
    pub change: Change,
    pub changed_at: Time,
}

impl AdaptiveState {
    /// "cut 20 → 16: the provider answered 429" (for status views).
    pub fn describe(&self) -> String {
        match self.change {
            Change::Start => format!("{} (initial, nothing learned yet)", self.limit),
            c => words(self.from, self.limit, c),
        }
    }

    /// Fits a limit learned under other bounds (a config reload) into these.
    pub fn fit(&mut self, b: &AdaptiveBounds) {
        let fitted = b.clamp(self.limit);
        if fitted != self.limit {
            self.from = self.limit;
            self.limit = fitted;
            self.change = Change::Bounds;
            self.credit = 0;
        }
        self.published = b.clamp(self.published);
    }
}

/// "raised 16 → 18: successes at normal latency".
fn words(from: u32, to: u32, why: Change) -> String {
    let verb = match to.cmp(&from) {
        std::cmp::Ordering::Greater => "raised",
        std::cmp::Ordering::Less => "cut",
        std::cmp::Ordering::Equal => "kept",
    };
    format!("{verb} {from} → {to}: {}", why.cause())
}

/// One reported outcome, as the limit sees it.
#[derive(Clone, Copy, Debug)]
pub struct Observation<'a> {
    pub class: OutcomeClass,
    pub http_status: i32,
    pub error_type: &'a str,
    /// This call's latency.
    pub latency: Option<Duration>,
    /// The target's recent latency (a fast moving average, this call included).
    pub recent: Option<Duration>,
    /// When the call was admitted (None: a report without a live permit).
    pub issued: Option<Time>,
}

/// What kind of signal an outcome is.
enum Signal {
    Good,
    Cut(Change),
    Neutral,
}

fn overloaded(o: &Observation<'_>) -> bool {
    o.class == OutcomeClass::Transient
        && (matches!(o.http_status, 503 | 529)
            || o.error_type.to_ascii_lowercase().contains("overloaded"))
}

/// Applies one outcome to the learned limit. Returns whether the limit
/// moved; a move of at least [`EVENT_STEP`] since the last published value,
/// or onto a bound, pushes a `LimitAdapted` event.
pub fn observe(
    b: &AdaptiveBounds,
    st: &mut AdaptiveState,
    now: Time,
    o: &Observation<'_>,
    events: &mut Vec<EventKind>,
) -> bool {
    let before = st.limit;
    st.limit = b.clamp(st.limit);
    let signal = match o.class {
        OutcomeClass::RateLimited => Signal::Cut(Change::RateLimited),
        _ if overloaded(o) => Signal::Cut(Change::Overloaded),
        OutcomeClass::Success => latency_signal(st, o),
        _ => Signal::Neutral,
    };
    match signal {
        Signal::Good => {
            // Credits wait (at most a round's worth) for the limit to be reached.
            st.credit = st.credit.saturating_add(1).min(st.limit);
            if st.credit >= st.limit && st.reached && st.limit < b.max {
                st.credit = 0;
                st.reached = false;
                st.from = st.limit;
                st.limit += 1;
                st.change = Change::Increased;
                st.changed_at = now;
            }
        }
        Signal::Cut(why) if may_cut(st, now, o) => {
            let cut = (f64::from(st.limit) * DECREASE).floor() as u32;
            let next = b.clamp(cut.min(st.limit.saturating_sub(1)));
            st.credit = 0;
            st.cut_at = now;
            if next != st.limit {
                st.from = st.limit;
                st.limit = next;
                st.change = why;
                st.changed_at = now;
            }
        }
        Signal::Cut(_) | Signal::Neutral => {}
    }
    publish(b, st, events);
    st.limit != before
}

/// An admission left `in_flight` calls on its key slot: if that fills the
/// limit, the limit is being tested and may grow. Returns whether the state
/// changed.
pub fn note_admitted(b: &AdaptiveBounds, st: &mut AdaptiveState, in_flight: u32) -> bool {
    if st.reached || in_flight < b.effective(Some(st)) {
        return false;
    }
    st.reached = true;
    true
}

/// Whether this report may cut the limit: its call was admitted after the
/// last cut (else it reports the overload that cut already answered).
fn may_cut(st: &AdaptiveState, now: Time, o: &Observation<'_>) -> bool {
    if st.cut_at == Time::ZERO {
        return true;
    }
    match o.issued {
        Some(t) => t > st.cut_at,
        None => now >= st.cut_at + o.recent.unwrap_or(MIN_HOLD).max(MIN_HOLD),
    }
}

/// A success's latency against the baseline (which it then moves).
fn latency_signal(st: &mut AdaptiveState, o: &Observation<'_>) -> Signal {
    let Some(d) = o.latency else {
        return Signal::Good;
    };
    let x = d.as_micros().min(u128::from(u32::MAX)) as f64;
    let base = f64::from(st.baseline_us);
    let signal = if base <= 0.0 {
        Signal::Good
    } else {
        let slow_now = x > base * LATENCY_GROWTH;
        let slow_lately = o
            .recent
            .is_some_and(|r| r.as_micros() as f64 > base * LATENCY_GROWTH);
        // One slow reply is noise; slow replies on top of a slow recent
        // average are a queue building up.
        match (slow_now, slow_lately) {
            (true, true) => Signal::Cut(Change::Latency),
            (true, false) => Signal::Neutral,
            _ => Signal::Good,
        }
    };
    let next = if base <= 0.0 {
        x
    } else if x < base {
        base + BASELINE_DOWN * (x - base)
    } else {
        base + BASELINE_UP * (x - base)
    };
    st.baseline_us = next.clamp(1.0, f64::from(u32::MAX)) as u32;
    signal
}

/// Publishes the limit when it moved enough since the last published value.
fn publish(b: &AdaptiveBounds, st: &mut AdaptiveState, events: &mut Vec<EventKind>) {
    if st.limit == st.published {
        return;
    }
    let moved = f64::from(st.limit.abs_diff(st.published));
    let bound = st.limit == b.min || st.limit == b.max;
    if bound || moved >= f64::from(st.published.max(1)) * EVENT_STEP {
        events.push(EventKind::LimitAdapted {
            limit: st.limit,
            previous: st.published,
            why: if bound {
                format!(
                    "{} (the configured {})",
                    words(st.published, st.limit, st.change),
                    if st.limit == b.max {
                        "maximum"
                    } else {
                        "minimum"
                    }
                )
            } else {
                words(st.published, st.limit, st.change)
            },
        });
        st.published = st.limit;
    }
}

#[cfg(test)]
#[path = "adaptive_tests.rs"]
mod tests;
