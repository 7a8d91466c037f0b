//! A unit's state as one protobuf record: what the local store writes and
//! the Redis backend keeps, so the state can travel between processes.
//!
//! Records are protobuf (prost) messages, so they grow fields without a
//! migration, exactly like the public contract. Two readings of a record:
//! * [`decode`]: exactly the state that was written (every field, leases and
//!   probes included): what another replica reads from Redis;
//! * [`restore`]: the state a *restarted* process should resume from: the
//!   durable core (breaker, pauses, disabled keys, learned limits, budget
//!   levels, counters) without the previous process's probe and concurrency
//!   leases (their permits died with it), and a new breaker generation.
//!   The callers that recently failed (quorum tripping) are kept: they are
//!   timestamped facts, not leases of the previous process.

use super::UnitCx;
use super::state::{Counters, GroupState, Learned, Slot, TargetState};
use crate::domain::Time;
use crate::domain::adaptive::{AdaptiveState, Change};
use crate::domain::breaker::{
    Breaker, BreakerParts, BreakerSnapshot, BreakerState, FailureCallers, Mode, Probe,
};
use crate::domain::budget::{BudgetConfig, BudgetState, Gcra, Kind, Lease};
use crate::domain::retry::RetryBudget;
use crate::domain::window::{BUCKETS, RollingPair};

/// A breaker's durable core plus the key-slot state providers imposed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TargetRecord {
    /// Declared in config when written (a target later removed from config is dropped on load).
    #[prost(bool, tag = "1")]
    pub configured: bool,
    /// `BreakerState` as 1..=5 (closed, open, half-open, forced open, forced closed).
    #[prost(uint32, tag = "2")]
    pub state: u32,
    #[prost(uint64, tag = "3")]
    pub open_until: u64,
    #[prost(uint64, tag = "4")]
    pub opened_at: u64,
    #[prost(uint64, tag = "5")]
    pub generation: u64,
    #[prost(uint32, tag = "6")]
    pub reopen_count: u32,
    #[prost(uint32, tag = "7")]
    pub consecutive_failures: u32,
    #[prost(uint32, tag = "8")]
    pub half_open_successes: u32,
    #[prost(bool, tag = "9")]
    pub persistent_open: bool,
    #[prost(string, tag = "10")]
    pub forced_reason: String,
    #[prost(string, tag = "11")]
    pub last_cause: String,
    #[prost(message, repeated, tag = "12")]
    pub slots: Vec<SlotRecord>,
    #[prost(uint64, tag = "13")]
    pub admitted: u64,
    #[prost(uint64, tag = "14")]
    pub refused: u64,
    /// Outcomes per class, indexed like `OutcomeClass::index`.
    #[prost(uint64, repeated, tag = "15")]
    pub by_class: Vec<u64>,
    #[prost(uint64, tag = "16")]
    pub stale: u64,
    /// The next permit id.
    #[prost(uint64, tag = "17")]
    pub next_admission: u64,
    /// Set by writers that record every field below (the Redis backend needs
    /// all of them); records without it are from before and carry the core.
    #[prost(bool, tag = "18")]
    pub full: bool,
    /// 0 closed, 1 open, 2 half-open (`state` folds the mode in).
    #[prost(uint32, tag = "19")]
    pub phase: u32,
    /// 0 automatic, 1 forced open, 2 forced closed.
    #[prost(uint32, tag = "20")]
    pub mode: u32,
    #[prost(uint64, tag = "21")]
    pub next_probe: u64,
    #[prost(message, repeated, tag = "22")]
    pub probes: Vec<LeaseRecord>,
    #[prost(message, optional, tag = "23")]
    pub breaker_window: Option<WindowRecord>,
    #[prost(message, optional, tag = "24")]
    pub retry_window: Option<WindowRecord>,
    /// Moving average of reported latency in microseconds (0 = none yet);
    /// `lowest_latency` routes read it, so replicas share it.
    #[prost(uint64, tag = "40")]
    pub latency_us: u64,
    /// Spend: the limit cell's TAT (ns), the total spent (micro-units), and
    /// whether the limit is refusing (for the event's edge).
    #[prost(uint64, tag = "50")]
    pub spend_tat: u64,
    #[prost(uint64, tag = "51")]
    pub spend_total: u64,
    #[prost(bool, tag = "52")]
    pub spend_limited: bool,
    /// Callers that reported a failure recently (quorum tripping, kept only
    /// with `min_distinct_callers` > 1). Read by [`decode`] and [`restore`] alike.
    #[prost(message, repeated, tag = "25")]
    pub failure_callers: Vec<CallerRecord>,
    /// An adaptive concurrency limit's learned state (absent for fixed
    /// limits). Tag 45 leaves 41..44 for neighbouring work. Read by
    /// [`decode`] and [`restore`] alike: what the fleet learned about a
    /// provider outlives a restart.
    #[prost(message, optional, tag = "45")]
    pub adaptive: Option<AdaptiveRecord>,
}

/// See [`crate::domain::adaptive::AdaptiveState`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct AdaptiveRecord {
    #[prost(uint32, tag = "1")]
    pub limit: u32,
    #[prost(uint32, tag = "2")]
    pub credit: u32,
    #[prost(uint32, tag = "3")]
    pub baseline_us: u32,
    #[prost(uint64, tag = "4")]
    pub cut_at: u64,
    #[prost(uint32, tag = "5")]
    pub published: u32,
    #[prost(uint32, tag = "6")]
    pub from: u32,
    /// `Change::code`.
    #[prost(uint32, tag = "7")]
    pub change: u32,
    #[prost(uint64, tag = "8")]
    pub changed_at: u64,
    #[prost(bool, tag = "9")]
    pub reached: bool,
}

fn adaptive_record(a: &AdaptiveState) -> AdaptiveRecord {
    AdaptiveRecord {
        limit: a.limit,
        credit: a.credit,
        baseline_us: a.baseline_us,
        cut_at: a.cut_at.as_nanos(),
        published: a.published,
        from: a.from,
        change: a.change.code(),
        changed_at: a.changed_at.as_nanos(),
        reached: a.reached,
    }
}

/// The learned state a record carries, fitted into the bounds the target
/// has now (a reload may have moved them; a target no longer adaptive
/// forgets it).
fn adaptive_from(cx: &UnitCx<'_>, r: &AdaptiveRecord) -> Option<AdaptiveState> {
    let bounds = cx.settings.budget.adaptive?;
    let mut a = AdaptiveState {
        limit: r.limit,
        credit: r.credit,
        baseline_us: r.baseline_us,
        cut_at: Time::from_nanos(r.cut_at),
        published: r.published,
        from: r.from,
        change: Change::from_code(r.change),
        changed_at: Time::from_nanos(r.changed_at),
        reached: r.reached,
    };
    a.fit(&bounds);
    Some(a)
}

/// One caller towards `min_distinct_callers`: a hash of its name and when
/// it last reported a failure.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CallerRecord {
    #[prost(uint64, tag = "1")]
    pub caller: u64,
    #[prost(uint64, tag = "2")]
    pub last_failure: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SlotRecord {
    /// Key slot name; empty for the implicit slot.
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint64, tag = "2")]
    pub paused_until: u64,
    #[prost(uint64, tag = "3")]
    pub disabled_until: u64,
    #[prost(string, tag = "4")]
    pub disabled_reason: String,
    #[prost(message, repeated, tag = "5")]
    pub learned: Vec<LearnedRecord>,
    /// GCRA theoretical arrival times per budget kind (written behind; approximate after a crash).
    #[prost(uint64, repeated, tag = "6")]
    pub tats: Vec<u64>,
    /// Concurrency leases in flight.
    #[prost(message, repeated, tag = "7")]
    pub leases: Vec<LeaseRecord>,
    #[prost(bool, tag = "8")]
    pub limited: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LearnedRecord {
    /// `Kind::index`.
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    #[prost(uint64, tag = "2")]
    pub limit: u64,
    #[prost(uint64, tag = "3")]
    pub remaining: u64,
    #[prost(uint64, tag = "4")]
    pub reset_at: u64,
    #[prost(uint64, tag = "5")]
    pub observed_at: u64,
}

/// A budget group's levels (written behind).
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupRecord {
    #[prost(uint64, repeated, tag = "1")]
    pub tats: Vec<u64>,
    #[prost(message, repeated, tag = "2")]
    pub leases: Vec<LeaseRecord>,
    #[prost(bool, tag = "3")]
    pub limited: bool,
    /// The group's spend limit cell (TAT, ns), total spent (micro-units) and edge flag.
    #[prost(uint64, tag = "4")]
    pub spend_tat: u64,
    #[prost(uint64, tag = "5")]
    pub spend_total: u64,
    #[prost(bool, tag = "6")]
    pub spend_limited: bool,
}

/// A lease (a concurrency slot or a half-open probe): its key and expiry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRecord {
    #[prost(uint64, tag = "1")]
    pub key: u64,
    #[prost(uint64, tag = "2")]
    pub until: u64,
}

/// A rolling window's buckets.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WindowRecord {
    #[prost(uint64, tag = "1")]
    pub width_nanos: u64,
    /// (epoch, a, b) per bucket, flattened.
    #[prost(uint64, repeated, tag = "2")]
    pub buckets: Vec<u64>,
}

fn window_record(w: &RollingPair) -> WindowRecord {
    let (width_nanos, buckets) = w.parts();
    WindowRecord {
        width_nanos,
        buckets: buckets
            .iter()
            .flat_map(|&(e, a, b)| [e, u64::from(a), u64::from(b)])
            .collect(),
    }
}

fn window_from(r: &WindowRecord) -> Option<RollingPair> {
    if r.buckets.len() != BUCKETS * 3 {
        return None;
    }
    let mut b = [(0u64, 0u32, 0u32); BUCKETS];
    for (i, slot) in b.iter_mut().enumerate() {
        let c = &r.buckets[i * 3..i * 3 + 3];
        *slot = (
            c[0],
            u32::try_from(c[1]).unwrap_or(u32::MAX),
            u32::try_from(c[2]).unwrap_or(u32::MAX),
        );
    }
    Some(RollingPair::from_parts(r.width_nanos, b))
}

fn leases(b: &BudgetState) -> Vec<LeaseRecord> {
    b.leases()
        .iter()
        .map(|l| LeaseRecord {
            key: l.key,
            until: l.until.as_nanos(),
        })
        .collect()
}

fn leases_from(r: &[LeaseRecord]) -> Vec<Lease> {
    r.iter()
        .map(|l| Lease {
            key: l.key,
            until: Time::from_nanos(l.until),
        })
        .collect()
}

fn tats(b: &BudgetState) -> Vec<u64> {
    Kind::ALL
        .iter()
        .map(|k| b.cell(*k).tat().as_nanos())
        .collect()
}

fn set_tats(b: &mut BudgetState, tats: &[u64]) {
    for (k, tat) in Kind::ALL.iter().zip(tats) {
        b.set_cell(*k, Gcra::from_tat(Time::from_nanos(*tat)));
    }
}

/// The whole state of a target as a record.
pub fn encode(cx: &UnitCx<'_>, st: &TargetState) -> TargetRecord {
    let b = st.breaker.snapshot();
    let p = st.breaker.parts();
    TargetRecord {
        configured: cx.settings.configured,
        state: match b.state {
            BreakerState::Closed => 1,
            BreakerState::Open => 2,
            BreakerState::HalfOpen => 3,
            BreakerState::ForcedOpen => 4,
            BreakerState::ForcedClosed => 5,
        },
        open_until: b.open_until.as_nanos(),
        opened_at: b.opened_at.as_nanos(),
        generation: b.generation,
        reopen_count: b.reopen_count,
        consecutive_failures: b.consecutive_failures,
        half_open_successes: b.half_open_successes,
        persistent_open: b.persistent_open,
        forced_reason: st.forced_reason().unwrap_or_default().to_string(),
        last_cause: st.last_cause().unwrap_or_default().to_string(),
        latency_us: st.latency().map_or(0, |d| d.as_micros().max(1) as u64),
        spend_tat: st.spend().tat().as_nanos(),
        spend_total: st.spend().total_micros,
        spend_limited: st.spend().limited,
        slots: st
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| SlotRecord {
                name: cx.slot_name(i).as_deref().unwrap_or_default().to_string(),
                paused_until: s.paused_until.as_nanos(),
                disabled_until: s.disabled_until.as_nanos(),
                disabled_reason: s.disabled_reason.as_deref().unwrap_or_default().to_string(),
                learned: s
                    .learned
                    .as_ref()
                    .map(|l| {
                        Kind::ALL
                            .iter()
                            .filter_map(|k| {
                                l[k.index()].map(|v| LearnedRecord {
                                    kind: k.index() as u32,
                                    limit: v.limit,
                                    remaining: v.remaining,
                                    reset_at: v.reset_at.as_nanos(),
                                    observed_at: v.observed_at.as_nanos(),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                tats: tats(&s.budget),
                leases: leases(&s.budget),
                limited: s.limited,
            })
            .collect(),
        admitted: st.counters.admitted,
        refused: st.counters.refused,
        by_class: st.counters.by_class.to_vec(),
        stale: st.counters.stale,
        next_admission: st.next_admission,
        full: true,
        phase: u32::from(p.phase),
        mode: match p.mode {
            Mode::Automatic => 0,
            Mode::ForcedOpen => 1,
            Mode::ForcedClosed => 2,
        },
        next_probe: p.next_probe,
        probes: p
            .probes
            .iter()
            .map(|pr| LeaseRecord {
                key: pr.id,
                until: pr.lease_until.as_nanos(),
            })
            .collect(),
        breaker_window: p.window.as_ref().map(window_record),
        retry_window: st.retry().map(|r| window_record(r.counts())),
        adaptive: st.adaptive().map(adaptive_record),
        failure_callers: st
            .breaker
            .failure_callers()
            .map(|c| {
                c.entries()
                    .iter()
                    .map(|&(caller, at)| CallerRecord {
                        caller,
                        last_failure: at.as_nanos(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Restores the parts both readings share: notes, counters, slots (matched
/// by name: slots no longer configured are dropped), with leases or not.
fn fill(cx: &UnitCx<'_>, st: &mut TargetState, rec: &TargetRecord, keep_leases: bool) {
    st.set_adaptive(rec.adaptive.as_ref().and_then(|r| adaptive_from(cx, r)));
    st.set_forced_reason(
        (!rec.forced_reason.is_empty()).then(|| rec.forced_reason.clone().into_boxed_str()),
    );
    st.set_latency((rec.latency_us > 0).then(|| std::time::Duration::from_micros(rec.latency_us)));
    if rec.spend_tat > 0 || rec.spend_total > 0 || rec.spend_limited {
        *st.spend_mut() = crate::domain::spend::Spend::restore(
            Time::from_nanos(rec.spend_tat),
            rec.spend_total,
            rec.spend_limited,
        );
    }
    st.set_last_cause(
        (!rec.last_cause.is_empty()).then(|| rec.last_cause.clone().into_boxed_str()),
    );
    // Never go back: ids issued after the last write of this counter are not
    // in the record, and a new process starts above any earlier one's.
    st.next_admission = st.next_admission.max(rec.next_admission);
    st.counters = Counters {
        admitted: rec.admitted,
        refused: rec.refused,
        by_class: std::array::from_fn(|i| rec.by_class.get(i).copied().unwrap_or(0)),
        stale: rec.stale,
    };
    for sr in &rec.slots {
        let ix = if sr.name.is_empty() {
            (cx.settings.keys.is_empty()).then_some(0)
        } else {
            cx.slot_index(&sr.name)
        };
        let Some(ix) = ix else { continue };
        let slot: &mut Slot = &mut st.slots[ix];
        slot.paused_until = Time::from_nanos(sr.paused_until);
        slot.disabled_until = Time::from_nanos(sr.disabled_until);
        slot.disabled_reason =
            (!sr.disabled_reason.is_empty()).then(|| sr.disabled_reason.clone().into_boxed_str());
        set_tats(&mut slot.budget, &sr.tats);
        if keep_leases {
            slot.budget.set_leases(leases_from(&sr.leases));
            slot.limited = sr.limited;
        }
        if !sr.learned.is_empty() {
            let mut l: [Option<Learned>; 4] = Default::default();
            for lr in &sr.learned {
                if let Some(k) = Kind::ALL.get(lr.kind as usize) {
                    l[k.index()] = Some(Learned {
                        limit: lr.limit,
                        remaining: lr.remaining,
                        reset_at: Time::from_nanos(lr.reset_at),
                        observed_at: Time::from_nanos(lr.observed_at),
                    });
                }
            }
            slot.learned = Some(Box::new(l));
        }
    }
}

/// The recent failing callers a record carries (None when it has none).
fn callers_of(rec: &TargetRecord) -> Option<FailureCallers> {
    (!rec.failure_callers.is_empty()).then(|| {
        FailureCallers::from_entries(
            rec.failure_callers
                .iter()
                .map(|c| (c.caller, Time::from_nanos(c.last_failure))),
        )
    })
}

fn snapshot_of(rec: &TargetRecord) -> BreakerSnapshot {
    BreakerSnapshot {
        state: match rec.state {
            2 => BreakerState::Open,
            3 => BreakerState::HalfOpen,
            4 => BreakerState::ForcedOpen,
            5 => BreakerState::ForcedClosed,
            _ => BreakerState::Closed,
        },
        open_until: Time::from_nanos(rec.open_until),
        opened_at: Time::from_nanos(rec.opened_at),
        generation: rec.generation,
        reopen_count: rec.reopen_count,
        consecutive_failures: rec.consecutive_failures,
        half_open_successes: rec.half_open_successes,
        persistent_open: rec.persistent_open,
    }
}

/// Exactly the state that was written (what another replica wrote to Redis).
/// A record from before full records is read like [`restore`] without the
/// restart's generation bump.
pub fn decode(cx: &UnitCx<'_>, rec: &TargetRecord, first_id: u64) -> TargetState {
    let mut st = TargetState::new(cx.seed, cx.settings.keys.len(), first_id);
    if rec.full {
        st.breaker = Breaker::from_parts(
            BreakerParts {
                phase: u8::try_from(rec.phase).unwrap_or(0),
                mode: match rec.mode {
                    1 => Mode::ForcedOpen,
                    2 => Mode::ForcedClosed,
                    _ => Mode::Automatic,
                },
                open_until: Time::from_nanos(rec.open_until),
                opened_at: Time::from_nanos(rec.opened_at),
                generation: rec.generation,
                consecutive_failures: rec.consecutive_failures,
                half_open_successes: rec.half_open_successes,
                reopen_count: rec.reopen_count,
                persistent_open: rec.persistent_open,
                next_probe: rec.next_probe,
                probes: rec
                    .probes
                    .iter()
                    .map(|p| Probe {
                        id: p.key,
                        lease_until: Time::from_nanos(p.until),
                    })
                    .collect(),
                window: rec.breaker_window.as_ref().and_then(window_from),
                callers: callers_of(rec),
            },
            cx.seed,
        );
        st.set_retry(
            rec.retry_window
                .as_ref()
                .and_then(window_from)
                .map(RetryBudget::from_counts),
        );
    } else {
        let mut b = Breaker::restore(&snapshot_of(rec), cx.seed);
        b.set_generation(rec.generation);
        b.set_failure_callers(callers_of(rec));
        st.breaker = b;
    }
    fill(cx, &mut st, rec, true);
    st
}

/// The state a restarted process resumes from (see the module doc): the
/// previous process's leases are dropped, the breaker gets a new generation
/// (so its permits are stale), an open period that ran out while down
/// becomes half-open at `now`, and budget debt is clamped.
pub fn restore(cx: &UnitCx<'_>, rec: &TargetRecord, now: Time, first_id: u64) -> TargetState {
    let mut st = TargetState::new(cx.seed, cx.settings.keys.len(), first_id);
    st.breaker = Breaker::restore(&snapshot_of(rec), cx.seed);
    // Unlike probes and leases, who failed recently did not die with the
    // previous process: it is wall-clock facts that expire by themselves
    // (after the breaker's window), and the failure streak they qualify is
    // restored too. Dropping them would let the restored streak wait for a
    // quorum that had already been reached.
    st.breaker.set_failure_callers(callers_of(rec));
    let mut ev = Vec::new();
    st.breaker.tick(now, &cx.settings.breaker, &mut ev);
    fill(cx, &mut st, rec, false);
    for s in st.slots.iter_mut() {
        s.budget.clamp_debt(now, &cx.settings.budget);
    }
    st
}

/// A group's state as a record.
pub fn encode_group(g: &GroupState) -> GroupRecord {
    GroupRecord {
        tats: tats(&g.budget),
        leases: leases(&g.budget),
        limited: g.limited,
        spend_tat: g.spend.tat().as_nanos(),
        spend_total: g.spend.total_micros,
        spend_limited: g.spend.limited,
    }
}

/// A group's state from a record; `restart` drops the leases of the previous
/// process and clamps debt (like [`restore`]).
pub fn decode_group(rec: &GroupRecord, cfg: &BudgetConfig, now: Time, restart: bool) -> GroupState {
    let mut g = GroupState::default();
    set_tats(&mut g.budget, &rec.tats);
    g.spend = crate::domain::spend::Spend::restore(
        Time::from_nanos(rec.spend_tat),
        rec.spend_total,
        rec.spend_limited,
    );
    if restart {
        g.budget.clamp_debt(now, cfg);
    } else {
        g.budget.set_leases(leases_from(&rec.leases));
        g.limited = rec.limited;
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::domain::OutcomeClass;
    use crate::domain::breaker::Mode;
    use crate::domain::headers::Signals;
    use crate::domain::unit::{
        AdmitArgs, Effects, GroupRef, OutcomeArgs, Permit, Trust, UnitCx, admit, name_hash,
        operate, record,
    };
    use proptest::prelude::*;
    use std::time::Duration;

    /// A target with every kind of state: a rate rule, slow calls, key
    /// slots, request / token / concurrency budgets and a shared group.
    const CONFIG: &str = r#"
[targets.t]
keys = ["k1", "k2"]
requests_per_minute = 60
tokens_per_minute = 6000
max_concurrency = 3
budgets = ["g"]
breaker = { failure_threshold = 3, failure_rate_threshold = 0.5, minimum_calls = 4, half_open_max_probes = 2, open_duration = "2s", slow_call_duration = "5s" }
[budgets.g]
requests_per_minute = 100
"#;

    #[derive(Clone, Debug)]
    enum Op {
        Admit {
            attempt: u32,
            tokens: u64,
        },
        /// Report on the i-th permit handed out (or none).
        Record {
            permit: Option<usize>,
            class: u8,
            tokens: u64,
        },
        Advance(u64),
        Force(u8),
        Reset,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u32..3, 0u64..3000).prop_map(|(attempt, tokens)| Op::Admit { attempt, tokens }),
            4 => (proptest::option::of(0usize..12), 0u8..7, 0u64..3000)
                .prop_map(|(permit, class, tokens)| Op::Record { permit, class, tokens }),
            3 => (1u64..3000).prop_map(Op::Advance),
            1 => (0u8..3).prop_map(Op::Force),
            1 => Just(Op::Reset),
        ]
    }

    /// Everything an operation answered, to compare two runs.
    #[derive(Debug, PartialEq)]
    enum Out {
        Admit(crate::domain::unit::Admission, Vec<String>),
        Record(crate::domain::unit::OutcomeResult, Vec<String>),
        Other(Vec<String>),
    }

    fn events(fx: &Effects) -> Vec<String> {
        fx.events.iter().map(|e| format!("{e:?}")).collect()
    }

    /// Applies `ops` to one target and its group, returning every answer.
    fn run(
        cx: &UnitCx<'_>,
        st: &mut TargetState,
        g: &mut GroupState,
        cfg: &crate::domain::budget::BudgetConfig,
        now: &mut Time,
        permits: &mut Vec<Permit>,
        ops: &[Op],
    ) -> Vec<Out> {
        let mut out = Vec::new();
        for op in ops {
            let mut fx = Effects::default();
            let mut groups = [GroupRef {
                name: "g",
                config: cfg,
                state: g,
            }];
            match op {
                Op::Admit { attempt, tokens } => {
                    let args = AdmitArgs {
                        caller: "c",
                        estimated_tokens: *tokens,
                        attempt: *attempt,
                        priority: Default::default(),
                        max_output_tokens: 0,
                        spend_scoped: false,
                    };
                    let a = admit(cx, st, &mut groups, *now, &args, &mut fx);
                    if let Some(p) = a.permit {
                        permits.push(p);
                    }
                    out.push(Out::Admit(a, events(&fx)));
                }
                Op::Record {
                    permit,
                    class,
                    tokens,
                } => {
                    let p = permit.and_then(|i| permits.get(i).copied());
                    let class = OutcomeClass::ALL[usize::from(*class) % OutcomeClass::ALL.len()];
                    let args = OutcomeArgs {
                        trust: p.map_or(Trust::None, Trust::Permit),
                        trust_permitless: false,
                        class,
                        signals: Signals::default(),
                        max_pause: Duration::from_secs(3600),
                        http_status: 0,
                        error_type: "",
                        slot: p.map_or(0, |p| usize::from(p.slot)),
                        latency: Some(Duration::from_millis(*tokens)),
                        retry_after: None,
                        input_tokens: *tokens,
                        output_tokens: tokens / 2,
                        attempt: 0,
                        caller: "c",
                    };
                    let r = record(cx, st, &mut groups, *now, &args, 0.5, &mut fx);
                    out.push(Out::Record(r, events(&fx)));
                }
                Op::Advance(ms) => {
                    *now = *now + Duration::from_millis(*ms);
                    operate::tick(cx, st, *now, &mut fx);
                    out.push(Out::Other(events(&fx)));
                }
                Op::Force(m) => {
                    let mode =
                        [Mode::Automatic, Mode::ForcedOpen, Mode::ForcedClosed][usize::from(*m)];
                    operate::force(cx, st, *now, mode, "test", &mut fx);
                    out.push(Out::Other(events(&fx)));
                }
                Op::Reset => {
                    operate::reset(cx, st, &mut groups, *now, &mut fx);
                    out.push(Out::Other(events(&fx)));
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// State that travels decides the same: run a prefix, serialise the
        /// target and its group, deserialise, then run the same suffix on the
        /// original and on the copy: every answer, every event and the final
        /// records are identical.
        #[test]
        fn serialised_state_makes_the_same_decisions(
            prefix in proptest::collection::vec(op(), 0..60),
            suffix in proptest::collection::vec(op(), 1..60),
        ) {
            let config = Config::parse(CONFIG, "t").expect("config");
            let settings = config.target("t").clone();
            let gcfg = config.groups[0].budget.clone();
            let cx = UnitCx { settings: &settings, seed: name_hash("t") };
            let mut now = Time::from_secs(1_800_000_000);
            let mut a = TargetState::new(cx.seed, settings.keys.len(), 1);
            let mut ga = GroupState::default();
            let mut permits = Vec::new();
            run(&cx, &mut a, &mut ga, &gcfg, &mut now, &mut permits, &prefix);

            let rec = encode(&cx, &a);
            let grec = encode_group(&ga);
            use prost::Message as _;
            let rec = TargetRecord::decode(rec.encode_to_vec().as_slice()).expect("decodes");
            let grec = GroupRecord::decode(grec.encode_to_vec().as_slice()).expect("decodes");
            let mut b = decode(&cx, &rec, 1);
            let mut gb = decode_group(&grec, &gcfg, now, false);
            prop_assert_eq!(encode(&cx, &b), encode(&cx, &a));

            let (mut now_a, mut now_b) = (now, now);
            let (mut pa, mut pb) = (permits.clone(), permits);
            let out_a = run(&cx, &mut a, &mut ga, &gcfg, &mut now_a, &mut pa, &suffix);
            let out_b = run(&cx, &mut b, &mut gb, &gcfg, &mut now_b, &mut pb, &suffix);
            prop_assert_eq!(out_a, out_b);
            prop_assert_eq!(encode(&cx, &a), encode(&cx, &b));
            prop_assert_eq!(encode_group(&ga), encode_group(&gb));
        }
    }
}
