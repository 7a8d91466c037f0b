//! The circuit breaker: one per target, shared by the whole fleet.
//!
//! ```text
//!            failures >= threshold / rate rule / PERSISTENT
//!   CLOSED ─────────────────────────────────────────────────▶ OPEN
//!     ▲                                                        │ open period elapses
//!     │ success_threshold probe successes                      ▼
//!     └──────────────────────────────────────────────── HALF_OPEN
//!                                   any probe failure ──▶ OPEN (longer: backoff)
//! ```
//!
//! Two lessons from the breakers our users run today shape this module:
//! * A half-open breaker whose probe never reports back must not stay stuck:
//!   every probe holds a **lease** that expires, and an expired probe slot is
//!   reclaimed for another agent.
//! * Late results from calls started before a transition must not corrupt the
//!   new state: every transition bumps a **generation**, permits carry the
//!   generation they were issued in, and an outcome from an older generation
//!   (or for a probe that was already reclaimed) is tallied but ignored.
//!
//! And one from running it for a fleet: one broken agent must not open the
//! breaker for everyone. With `min_distinct_callers` > 1, failures trip a
//! closed breaker only once enough distinct callers reported one within the
//! window ([`quorum`]); PERSISTENT outcomes and failed probes do not wait.
//!
//! Everything here is pure: time comes in as `now`, jitter is derived from a
//! per-breaker seed and the generation, and events are pushed into a caller's
//! buffer. The engine owns locking and persistence.

use super::taxonomy::OutcomeClass;
use super::time::{Time, scale};
use std::time::Duration;

pub mod quorum;
pub use quorum::FailureCallers;

/// The reported breaker state (mirrors `backstop.v1.BreakerState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
    ForcedOpen,
    ForcedClosed,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
            BreakerState::ForcedOpen => "forced_open",
            BreakerState::ForcedClosed => "forced_closed",
        }
    }
}

/// Operator control over a breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Automatic,
    ForcedOpen,
    ForcedClosed,
}

/// What an outcome class does to the breaker. Defaults follow the taxonomy;
/// each can be overridden per target (`[targets.X.breaker.treat]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Treatment {
    /// Resets the consecutive-failure count; a probe success.
    Success,
    /// Counts towards tripping; a failed probe re-opens.
    Failure,
    /// Leaves the breaker untouched (releases a probe slot without counting).
    Ignore,
    /// Opens at once for `persistent_open_duration`.
    Open,
}

impl Treatment {
    pub fn parse(s: &str) -> Option<Treatment> {
        Some(match s {
            "success" => Treatment::Success,
            "failure" => Treatment::Failure,
            "ignore" => Treatment::Ignore,
            "open" => Treatment::Open,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Treatment::Success => "success",
            Treatment::Failure => "failure",
            Treatment::Ignore => "ignore",
            Treatment::Open => "open",
        }
    }
}

/// Per-class treatments. SUCCESS is always a success.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Treatments {
    pub transient: Treatment,
    pub timeout: Treatment,
    /// Applies to a 429 that came without a retry hint (with one, the target is paused instead).
    pub rate_limited: Treatment,
    pub persistent: Treatment,
    pub bad_input: Treatment,
    pub partial: Treatment,
}

impl Default for Treatments {
    fn default() -> Self {
        Treatments {
            transient: Treatment::Failure,
            timeout: Treatment::Failure,
            rate_limited: Treatment::Failure,
            persistent: Treatment::Open,
            bad_input: Treatment::Ignore,
            partial: Treatment::Success,
        }
    }
}

impl Treatments {
    pub fn get(&self, class: OutcomeClass) -> Treatment {
        match class {
            OutcomeClass::Success => Treatment::Success,
            OutcomeClass::Transient => self.transient,
            OutcomeClass::Timeout => self.timeout,
            OutcomeClass::RateLimited => self.rate_limited,
            OutcomeClass::Persistent => self.persistent,
            OutcomeClass::BadInput => self.bad_input,
            OutcomeClass::Partial => self.partial,
        }
    }

    pub fn set(&mut self, class: OutcomeClass, t: Treatment) -> bool {
        match class {
            OutcomeClass::Success => return false,
            OutcomeClass::Transient => self.transient = t,
            OutcomeClass::Timeout => self.timeout = t,
            OutcomeClass::RateLimited => self.rate_limited = t,
            OutcomeClass::Persistent => self.persistent = t,
            OutcomeClass::BadInput => self.bad_input = t,
            OutcomeClass::Partial => self.partial = t,
        }
        true
    }
}

/// The optional failure-rate rule (resilience4j / Polly style).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateRule {
    /// Trip when failures / calls reaches this fraction (0, 1].
    pub threshold: f64,
    /// ...and at least this many calls were seen in the window.
    pub minimum_calls: u32,
}

/// Breaker settings for one target.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that trip a closed breaker.
    pub failure_threshold: u32,
    /// Probe successes that close a half-open breaker.
    pub success_threshold: u32,
    /// First open period; re-opens back off from here.
    pub open_duration: Duration,
    /// Probes admitted at once, fleet-wide, while half-open.
    pub half_open_max_probes: u32,
    /// How long a probe may stay unreported before its slot is reclaimed.
    pub probe_lease: Duration,
    /// Each re-open without a full close multiplies the open period by this.
    pub backoff_multiplier: f64,
    /// Cap on the backed-off open period.
    pub max_open_duration: Duration,
    /// Backed-off open periods are stretched by up to this fraction, so that
    /// breakers that opened together do not all probe in the same instant.
    pub jitter: f64,
    pub rate_rule: Option<RateRule>,
    /// Rolling window of the rate rule.
    pub window: Duration,
    /// A success slower than this counts as a failure (None = off).
    pub slow_call_duration: Option<Duration>,
    /// How long a PERSISTENT outcome (invalid key, no quota) keeps the breaker open.
    pub persistent_open_duration: Duration,
    pub treatments: Treatments,
    /// Failures open a closed breaker only when at least this many distinct
    /// callers reported one within `window` (see [`quorum`]), so that one
    /// broken agent cannot open the breaker for the whole fleet. 1 = any
    /// caller's failures count (the behaviour before quorum existed).
    /// PERSISTENT outcomes and failed half-open probes do not wait for a
    /// quorum: a provider's definitive answer and the fleet's own probe are
    /// not one agent's network glitch.
    pub min_distinct_callers: u32,
}

impl Default for BreakerConfig {
    /// The seed's defaults: 5 failures, 2 successes, 60 s open, 1 probe.
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            success_threshold: 2,
            open_duration: Duration::from_secs(60),
            half_open_max_probes: 1,
            probe_lease: Duration::from_secs(30),
            backoff_multiplier: 2.0,
            max_open_duration: Duration::from_secs(600),
            jitter: 0.1,
            rate_rule: None,
            window: Duration::from_secs(60),
            slow_call_duration: None,
            persistent_open_duration: Duration::from_secs(600),
            treatments: Treatments::default(),
            min_distinct_callers: 1,
        }
    }
}

/// What one outcome does to the breaker, after config is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    Success,
    Failure(Trigger),
    Ignore,
    /// Open at once for this long.
    OpenFor(Duration, OutcomeClass),
}

/// What made an outcome count as a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Outcome(OutcomeClass),
    /// A success slower than `slow_call_duration`.
    SlowCall,
}

impl BreakerConfig {
    /// Maps a classified outcome to its effect on the breaker.
    ///
    /// `paused_by_hint` is true for a RATE_LIMITED outcome that carried a retry
    /// hint: the engine pauses the budget instead, so the breaker ignores it.
    pub fn effect(
        &self,
        class: OutcomeClass,
        latency: Option<Duration>,
        paused_by_hint: bool,
    ) -> Effect {
        if class == OutcomeClass::RateLimited && paused_by_hint {
            return Effect::Ignore;
        }
        match self.treatments.get(class) {
            Treatment::Success => match (self.slow_call_duration, latency) {
                (Some(slow), Some(l)) if l > slow => Effect::Failure(Trigger::SlowCall),
                _ => Effect::Success,
            },
            Treatment::Failure => Effect::Failure(Trigger::Outcome(class)),
            Treatment::Ignore => Effect::Ignore,
            Treatment::Open => Effect::OpenFor(self.persistent_open_duration, class),
        }
    }

    /// The open period for the `n`-th consecutive re-open (0 = first open).
    ///
    /// `open_duration × backoff_multiplier^n`, capped at `max_open_duration`;
    /// re-opens (n ≥ 1) are stretched by up to `jitter` using `unit` ∈ [0, 1).
    pub fn open_period(&self, n: u32, unit: f64) -> Duration {
        let factor = self.backoff_multiplier.max(1.0).powi(n.min(64) as i32);
        let base = scale(self.open_duration, factor).min(self.max_open_duration);
        if n == 0 || self.jitter <= 0.0 {
            return base;
        }
        scale(base, 1.0 + self.jitter * unit.clamp(0.0, 1.0)).min(self.max_open_duration)
    }
}

/// Why the breaker changed state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cause {
    ConsecutiveFailures {
        count: u32,
        trigger: Trigger,
    },
    FailureRate {
        failures: u64,
        calls: u64,
    },
    /// A PERSISTENT-class outcome (invalid key, exhausted quota).
    Persistent {
        class: OutcomeClass,
    },
    ProbeFailed {
        trigger: Trigger,
    },
    OpenElapsed,
    ProbesSucceeded {
        count: u32,
    },
    Operator {
        mode: Mode,
    },
    Reset,
}

/// A state change, for events, logs and persistence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
    pub cause: Cause,
    /// The generation after the transition.
    pub generation: u64,
    /// When OPEN: until when.
    pub open_until: Option<Time>,
}

/// Something the engine should publish.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BreakerEvent {
    Transition(Transition),
    /// A probe lease ran out without an outcome; its slot was reclaimed.
    ProbeExpired {
        probe: u64,
    },
    /// A PERSISTENT outcome arrived while open and lengthened the open period.
    OpenExtended {
        until: Time,
    },
    /// Failures would have opened the breaker (`cause`), but fewer than
    /// `min_distinct_callers` callers reported them within the window. The
    /// breaker stays closed; this is for the target's visible cause only
    /// (it is raised on every such failure, so it is not a fleet event).
    TripSuppressed {
        cause: Cause,
        callers: u32,
        needed: u32,
    },
}

/// Why admission was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    CircuitOpen,
    ProbeLimit,
    ForcedOpen,
}

/// An admission that passed the breaker's check and may be committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ticket {
    Normal,
    Probe,
}

/// The part of a permit the breaker cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PermitRef {
    pub generation: u64,
    /// Set for half-open probes.
    pub probe: Option<u64>,
}

/// An outstanding half-open probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub id: u64,
    pub lease_until: Time,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Closed,
    Open,
    HalfOpen,
}

/// Longest PROBE_LIMIT retry_after: a probe usually reports within seconds,
/// long before its lease runs out, so waiters poll instead of waiting out the lease.
const PROBE_POLL: Duration = Duration::from_secs(1);

/// The breaker's durable core: what must survive a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSnapshot {
    pub state: BreakerState,
    pub open_until: Time,
    pub opened_at: Time,
    pub generation: u64,
    pub reopen_count: u32,
    pub consecutive_failures: u32,
    pub half_open_successes: u32,
    pub persistent_open: bool,
}

/// Every field of a breaker, for serialising it whole (the Redis backend
/// keeps breakers in Redis; [`BreakerSnapshot`] is the durable core only).
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerParts {
    /// 0 closed, 1 open, 2 half-open.
    pub phase: u8,
    pub mode: Mode,
    pub open_until: Time,
    pub opened_at: Time,
    pub generation: u64,
    pub consecutive_failures: u32,
    pub half_open_successes: u32,
    pub reopen_count: u32,
    pub persistent_open: bool,
    pub next_probe: u64,
    pub probes: Vec<Probe>,
    pub window: Option<super::window::RollingPair>,
    /// Callers that failed recently (only kept with `min_distinct_callers` > 1).
    pub callers: Option<FailureCallers>,
}

/// What a breaker tallies over its window, boxed together so that a
/// breaker needing neither carries one null pointer (a million idle targets
/// must fit in 512 MiB: see `unit/state.rs`).
#[derive(Clone, Debug, Default)]
struct Tallies {
    /// (calls, failures) for the rate rule: only when the rule is on.
    window: Option<super::window::RollingPair>,
    /// Who failed recently, for quorum tripping: only while a target with
    /// `min_distinct_callers` > 1 is failing.
    callers: Option<FailureCallers>,
}

/// One target's breaker.
#[derive(Clone, Debug)]
pub struct Breaker {
    phase: Phase,
    mode: Mode,
    open_until: Time,
    opened_at: Time,
    generation: u64,
    consecutive_failures: u32,
    half_open_successes: u32,
    reopen_count: u32,
    /// The current open period came from a PERSISTENT outcome.
    persistent_open: bool,
    next_probe: u64,
    probes: Vec<Probe>,
    /// The rate rule's window and the recent failing callers; allocated
    /// only when needed (see [`Tallies`]).
    tallies: Option<Box<Tallies>>,
    /// Seeds the re-open jitter; differs per target so breakers spread out.
    seed: u64,
}

/// A well-mixed 64-bit hash step (splitmix64), used to derive jitter purely.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The caller of every report that names none (see [`Breaker::record_from`]):
/// all anonymous reports count as one caller towards `min_distinct_callers`.
pub const ANONYMOUS: u64 = 0;

/// Maps a hash to [0, 1).
pub fn unit_f64(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

impl Breaker {
    /// A fresh closed breaker. `seed` should differ per target (e.g. a hash of its name).
    pub fn new(seed: u64) -> Self {
        Breaker {
            phase: Phase::Closed,
            mode: Mode::Automatic,
            open_until: Time::ZERO,
            opened_at: Time::ZERO,
            generation: 1,
            consecutive_failures: 0,
            half_open_successes: 0,
            reopen_count: 0,
            persistent_open: false,
            next_probe: 1,
            probes: Vec::new(),
            tallies: None,
            seed,
        }
    }

    /// The state as clients see it (call [`Breaker::tick`] first for an up-to-date answer).
    pub fn state(&self) -> BreakerState {
        match (self.mode, self.phase) {
            (Mode::ForcedOpen, _) => BreakerState::ForcedOpen,
            (Mode::ForcedClosed, _) => BreakerState::ForcedClosed,
            (Mode::Automatic, Phase::Closed) => BreakerState::Closed,
            (Mode::Automatic, Phase::Open) => BreakerState::Open,
            (Mode::Automatic, Phase::HalfOpen) => BreakerState::HalfOpen,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn open_until(&self) -> Option<Time> {
        (self.phase == Phase::Open).then_some(self.open_until)
    }
    pub fn opened_at(&self) -> Option<Time> {
        (self.phase != Phase::Closed).then_some(self.opened_at)
    }
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }
    pub fn half_open_successes(&self) -> u32 {
        self.half_open_successes
    }
    pub fn reopen_count(&self) -> u32 {
        self.reopen_count
    }
    pub fn probes(&self) -> &[Probe] {
        &self.probes
    }
    /// (calls, failures) in the rate rule's window.
    pub fn window_totals(&self, now: Time) -> (u64, u64) {
        self.window().map_or((0, 0), |w| w.totals(now))
    }
    /// Distinct callers that reported a failure within `cfg.window` (kept
    /// only while `min_distinct_callers` > 1; otherwise 0).
    pub fn distinct_failing_callers(&self, now: Time, cfg: &BreakerConfig) -> u32 {
        self.failure_callers()
            .map_or(0, |c| c.distinct(now, cfg.window))
    }
    /// The recent failing callers as kept (for serialising).
    pub fn failure_callers(&self) -> Option<&FailureCallers> {
        self.tallies.as_ref()?.callers.as_ref()
    }
    /// Replaces the recent failing callers (reading a record).
    pub fn set_failure_callers(&mut self, callers: Option<FailureCallers>) {
        let callers = callers.filter(|c| !c.entries().is_empty());
        if callers.is_some() || self.tallies.is_some() {
            self.tallies.get_or_insert_with(Default::default).callers = callers;
        }
        self.drop_empty_tallies();
    }

    fn window(&self) -> Option<&super::window::RollingPair> {
        self.tallies.as_ref()?.window.as_ref()
    }

    /// Frees the tallies when they hold nothing.
    fn drop_empty_tallies(&mut self) {
        if self
            .tallies
            .as_ref()
            .is_some_and(|t| t.window.is_none() && t.callers.is_none())
        {
            self.tallies = None;
        }
    }

    /// Clears both tallies (on every transition to open or closed), keeping
    /// the window's allocation as before quorum existed.
    fn clear_tallies(&mut self) {
        if let Some(t) = self.tallies.as_mut() {
            if let Some(w) = t.window.as_mut() {
                w.clear();
            }
            t.callers = None;
        }
        self.drop_empty_tallies();
    }

    /// Applies what the passage of time does: an elapsed open period becomes
    /// half-open; probe leases that ran out are reclaimed.
    pub fn tick(&mut self, now: Time, _cfg: &BreakerConfig, out: &mut Vec<BreakerEvent>) {
        if self.mode != Mode::Automatic {
            return;
        }
        if self.phase == Phase::Open && now >= self.open_until {
            let from = self.state();
            self.phase = Phase::HalfOpen;
            self.half_open_successes = 0;
            self.probes.clear();
            self.generation += 1;
            self.push_transition(from, Cause::OpenElapsed, out);
        }
        if self.phase == Phase::HalfOpen {
            self.probes.retain(|p| {
                let alive = p.lease_until > now;
                if !alive {
                    out.push(BreakerEvent::ProbeExpired { probe: p.id });
                }
                alive
            });
        }
    }

    /// Would a call be admitted now? Does not reserve anything; pair with [`Breaker::commit`].
    pub fn check(
        &mut self,
        now: Time,
        cfg: &BreakerConfig,
        out: &mut Vec<BreakerEvent>,
    ) -> Result<Ticket, (Refusal, Option<Duration>)> {
        self.tick(now, cfg, out);
        match (self.mode, self.phase) {
            (Mode::ForcedOpen, _) => Err((Refusal::ForcedOpen, None)),
            (Mode::ForcedClosed, _) | (Mode::Automatic, Phase::Closed) => Ok(Ticket::Normal),
            (Mode::Automatic, Phase::Open) => {
                Err((Refusal::CircuitOpen, Some(now.until(self.open_until))))
            }
            (Mode::Automatic, Phase::HalfOpen) => {
                if (self.probes.len() as u64) < u64::from(cfg.half_open_max_probes.max(1)) {
                    Ok(Ticket::Probe)
                } else {
                    let soonest = self
                        .probes
                        .iter()
                        .map(|p| p.lease_until)
                        .min()
                        .unwrap_or(now);
                    Err((
                        Refusal::ProbeLimit,
                        Some(now.until(soonest).min(PROBE_POLL)),
                    ))
                }
            }
        }
    }

    /// Commits an admission that [`Breaker::check`] allowed in the same critical
    /// section. Returns the permit reference to hand to the caller.
    pub fn commit(&mut self, now: Time, cfg: &BreakerConfig, ticket: Ticket) -> PermitRef {
        match ticket {
            Ticket::Normal => PermitRef {
                generation: self.generation,
                probe: None,
            },
            Ticket::Probe => {
                let id = self.next_probe;
                self.next_probe += 1;
                self.probes.push(Probe {
                    id,
                    lease_until: now + cfg.probe_lease,
                });
                PermitRef {
                    generation: self.generation,
                    probe: Some(id),
                }
            }
        }
    }

    /// `check` + `commit` in one step, for callers with nothing else to reserve.
    pub fn admit(
        &mut self,
        now: Time,
        cfg: &BreakerConfig,
        out: &mut Vec<BreakerEvent>,
    ) -> Result<PermitRef, (Refusal, Option<Duration>)> {
        let ticket = self.check(now, cfg, out)?;
        Ok(self.commit(now, cfg, ticket))
    }

    /// Applies an outcome from an anonymous caller (see [`Breaker::record_from`]).
    pub fn record(
        &mut self,
        now: Time,
        cfg: &BreakerConfig,
        permit: Option<PermitRef>,
        effect: Effect,
        out: &mut Vec<BreakerEvent>,
    ) -> bool {
        self.record_from(now, cfg, permit, effect, ANONYMOUS, out)
    }

    /// Applies an outcome reported by `caller` (a hash of its name; every
    /// anonymous report is the same caller). Returns `true` if the outcome
    /// was stale (tallied by the caller but ignored here): its permit came
    /// from an older generation, or it was a half-open probe whose lease had
    /// already been reclaimed.
    pub fn record_from(
        &mut self,
        now: Time,
        cfg: &BreakerConfig,
        permit: Option<PermitRef>,
        effect: Effect,
        caller: u64,
        out: &mut Vec<BreakerEvent>,
    ) -> bool {
        self.tick(now, cfg, out);
        match self.mode {
            // An operator holds the breaker open: nothing moves it.
            Mode::ForcedOpen => return false,
            Mode::ForcedClosed => {
                if permit.is_some_and(|p| p.generation != self.generation) {
                    return true;
                }
                self.count(now, cfg, effect, caller);
                return false;
            }
            Mode::Automatic => {}
        }
        match self.phase {
            Phase::Closed => {
                if permit.is_some_and(|p| p.generation != self.generation) {
                    return true;
                }
                match effect {
                    Effect::OpenFor(d, class) => {
                        self.open(now, d, true, Cause::Persistent { class }, out);
                    }
                    Effect::Ignore => {}
                    Effect::Success | Effect::Failure(_) => {
                        self.count(now, cfg, effect, caller);
                        if let Effect::Failure(trigger) = effect {
                            self.maybe_trip(now, cfg, trigger, out);
                        }
                    }
                }
                false
            }
            Phase::Open => {
                // Outcomes of calls started before the break carry no news,
                // except that a key or quota is dead: that outlives any open period.
                if let Effect::OpenFor(d, _) = effect {
                    let until = now + d;
                    if until > self.open_until {
                        self.open_until = until;
                        self.persistent_open = true;
                        out.push(BreakerEvent::OpenExtended { until });
                        return false;
                    }
                }
                true
            }
            Phase::HalfOpen => {
                let Some(PermitRef {
                    generation,
                    probe: Some(id),
                }) = permit
                else {
                    return true;
                };
                if generation != self.generation {
                    return true;
                }
                let Some(pos) = self.probes.iter().position(|p| p.id == id) else {
                    return true; // lease already reclaimed
                };
                self.probes.swap_remove(pos);
                match effect {
                    Effect::Ignore => {}
                    Effect::Success => {
                        self.half_open_successes += 1;
                        if self.half_open_successes >= cfg.success_threshold.max(1) {
                            let from = self.state();
                            let count = self.half_open_successes;
                            self.close();
                            self.generation += 1;
                            self.push_transition(from, Cause::ProbesSucceeded { count }, out);
                        }
                    }
                    Effect::Failure(trigger) => {
                        self.reopen_count = self.reopen_count.saturating_add(1);
                        let unit = unit_f64(mix64(self.seed ^ self.generation));
                        let d = cfg.open_period(self.reopen_count, unit);
                        self.open(now, d, false, Cause::ProbeFailed { trigger }, out);
                    }
                    Effect::OpenFor(d, class) => {
                        self.open(now, d, true, Cause::Persistent { class }, out);
                    }
                }
                false
            }
        }
    }

    /// Operator override. Returning to automatic starts a fresh closed breaker.
    pub fn set_mode(&mut self, mode: Mode, out: &mut Vec<BreakerEvent>) {
        if mode == self.mode {
            return;
        }
        let from = self.state();
        if mode == Mode::Automatic {
            self.close();
            self.reopen_count = 0;
        } else {
            self.probes.clear();
        }
        self.mode = mode;
        self.generation += 1;
        self.push_transition(from, Cause::Operator { mode }, out);
    }

    /// Takes in an open period decided elsewhere (cluster mode: another
    /// replica's breaker transition, read from the shared event stream,
    /// for a replica about to decide without Redis). Until `open_until` the
    /// breaker that sent it is open (only an operator can end that early,
    /// and that comes as its own event), so this one is made open at least
    /// that long. Forced modes win; an open period already as long is kept.
    /// Returns whether anything changed.
    pub fn learn_open(&mut self, now: Time, open_until: Time) -> bool {
        if self.mode != Mode::Automatic || open_until <= now {
            return false;
        }
        if self.phase == Phase::Open {
            if self.open_until >= open_until {
                return false;
            }
        } else {
            // A new open period: probes of the old generation are void.
            self.phase = Phase::Open;
            self.opened_at = now;
            self.half_open_successes = 0;
            self.probes.clear();
            self.generation += 1;
        }
        self.open_until = open_until;
        true
    }

    /// Back to a fresh, automatic, closed breaker.
    pub fn reset(&mut self, out: &mut Vec<BreakerEvent>) {
        let from = self.state();
        self.mode = Mode::Automatic;
        self.close();
        self.reopen_count = 0;
        self.generation += 1;
        if from != BreakerState::Closed {
            self.push_transition(from, Cause::Reset, out);
        }
    }

    /// Every field (see [`BreakerParts`]).
    pub fn parts(&self) -> BreakerParts {
        BreakerParts {
            phase: match self.phase {
                Phase::Closed => 0,
                Phase::Open => 1,
                Phase::HalfOpen => 2,
            },
            mode: self.mode,
            open_until: self.open_until,
            opened_at: self.opened_at,
            generation: self.generation,
            consecutive_failures: self.consecutive_failures,
            half_open_successes: self.half_open_successes,
            reopen_count: self.reopen_count,
            persistent_open: self.persistent_open,
            next_probe: self.next_probe,
            probes: self.probes.clone(),
            window: self.window().cloned(),
            callers: self.failure_callers().cloned(),
        }
    }

    /// The breaker `parts` describes, exactly (no restart semantics: see
    /// [`Breaker::restore`] for that).
    pub fn from_parts(p: BreakerParts, seed: u64) -> Breaker {
        Breaker {
            phase: match p.phase {
                1 => Phase::Open,
                2 => Phase::HalfOpen,
                _ => Phase::Closed,
            },
            mode: p.mode,
            open_until: p.open_until,
            opened_at: p.opened_at,
            generation: p.generation,
            consecutive_failures: p.consecutive_failures,
            half_open_successes: p.half_open_successes,
            reopen_count: p.reopen_count,
            persistent_open: p.persistent_open,
            next_probe: p.next_probe.max(1),
            probes: p.probes,
            tallies: (p.window.is_some() || p.callers.is_some()).then(|| {
                Box::new(Tallies {
                    window: p.window,
                    callers: p.callers,
                })
            }),
            seed,
        }
    }

    /// The durable core of the breaker.
    pub fn snapshot(&self) -> BreakerSnapshot {
        BreakerSnapshot {
            state: self.state(),
            open_until: self.open_until,
            opened_at: self.opened_at,
            generation: self.generation,
            reopen_count: self.reopen_count,
            consecutive_failures: self.consecutive_failures,
            half_open_successes: self.half_open_successes,
            persistent_open: self.persistent_open,
        }
    }

    /// Sets the generation (reading a record exactly, without a restart's bump).
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Rebuilds a breaker from a snapshot taken before a restart.
    ///
    /// Probe leases do not survive a restart, so a half-open breaker comes
    /// back half-open with no probes outstanding and a new generation (permits
    /// handed out before the restart are stale). An open breaker keeps its
    /// open-until; if that has passed, the next tick makes it half-open.
    pub fn restore(snap: &BreakerSnapshot, seed: u64) -> Self {
        let mut b = Breaker::new(seed);
        b.generation = snap.generation.saturating_add(1);
        b.open_until = snap.open_until;
        b.opened_at = snap.opened_at;
        b.reopen_count = snap.reopen_count;
        b.consecutive_failures = snap.consecutive_failures;
        b.persistent_open = snap.persistent_open;
        match snap.state {
            BreakerState::Closed => {}
            BreakerState::Open => b.phase = Phase::Open,
            BreakerState::HalfOpen => {
                b.phase = Phase::HalfOpen;
                b.half_open_successes = snap.half_open_successes;
            }
            BreakerState::ForcedOpen => b.mode = Mode::ForcedOpen,
            BreakerState::ForcedClosed => b.mode = Mode::ForcedClosed,
        }
        b
    }

    fn count(&mut self, now: Time, cfg: &BreakerConfig, effect: Effect, caller: u64) {
        let failed = match effect {
            Effect::Success => false,
            Effect::Failure(_) => true,
            Effect::Ignore | Effect::OpenFor(..) => return,
        };
        if failed {
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            if cfg.min_distinct_callers > 1 {
                let cap = 2 * cfg.min_distinct_callers as usize;
                self.tallies
                    .get_or_insert_with(Default::default)
                    .callers
                    .get_or_insert_with(Default::default)
                    .note(caller, now, cap);
            }
        } else {
            self.consecutive_failures = 0;
        }
        if cfg.rate_rule.is_some() {
            let w = self
                .tallies
                .get_or_insert_with(Default::default)
                .window
                .get_or_insert_with(|| super::window::RollingPair::new(cfg.window));
            if w.window() != cfg.window {
                *w = super::window::RollingPair::new(cfg.window);
            }
            w.add(now, 1, u32::from(failed));
        }
    }

    fn maybe_trip(
        &mut self,
        now: Time,
        cfg: &BreakerConfig,
        trigger: Trigger,
        out: &mut Vec<BreakerEvent>,
    ) {
        let cause = if self.consecutive_failures >= cfg.failure_threshold.max(1) {
            Cause::ConsecutiveFailures {
                count: self.consecutive_failures,
                trigger,
            }
        } else {
            let Some((rule, w)) = cfg.rate_rule.zip(self.window()) else {
                return;
            };
            let (calls, failures) = w.totals(now);
            if calls < u64::from(rule.minimum_calls.max(1))
                || (failures as f64) < rule.threshold * calls as f64
            {
                return;
            }
            Cause::FailureRate { failures, calls }
        };
        let needed = cfg.min_distinct_callers;
        if needed > 1 {
            let callers = self.distinct_failing_callers(now, cfg);
            if callers < needed {
                out.push(BreakerEvent::TripSuppressed {
                    cause,
                    callers,
                    needed,
                });
                return;
            }
        }
        let unit = unit_f64(mix64(self.seed ^ self.generation));
        let d = cfg.open_period(self.reopen_count, unit);
        self.open(now, d, false, cause, out);
    }

    fn open(
        &mut self,
        now: Time,
        period: Duration,
        persistent: bool,
        cause: Cause,
        out: &mut Vec<BreakerEvent>,
    ) {
        let from = self.state();
        self.phase = Phase::Open;
        self.opened_at = now;
        self.open_until = now + period;
        self.persistent_open = persistent;
        self.probes.clear();
        self.half_open_successes = 0;
        self.consecutive_failures = 0;
        // Like the streak, the callers counted towards it start afresh.
        self.clear_tallies();
        self.generation += 1;
        self.push_transition(from, cause, out);
    }

    fn close(&mut self) {
        self.phase = Phase::Closed;
        self.open_until = Time::ZERO;
        self.persistent_open = false;
        self.probes.clear();
        self.half_open_successes = 0;
        self.consecutive_failures = 0;
        self.reopen_count = 0;
        self.clear_tallies();
    }

    fn push_transition(&self, from: BreakerState, cause: Cause, out: &mut Vec<BreakerEvent>) {
        out.push(BreakerEvent::Transition(Transition {
            from,
            to: self.state(),
            cause,
            generation: self.generation,
            open_until: self.open_until(),
        }));
    }
}

#[cfg(test)]
mod tests;
