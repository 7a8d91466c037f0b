//! The chaos soak's ledger and checker.
//!
//! Every workload task writes what it saw into one [`Ledger`]: admissions
//! (with the server's own admission time, read from the permit), breaker
//! states the server reported, probes and when they were given back, queue
//! items deferred, delivered and acked, calls left unanswered, and the fault
//! windows (kill → ready). [`Ledger::check`] turns that into verdicts; it runs
//! every few seconds while the soak runs and once at the end.
//!
//! # Why every comparison is conservative
//! A client only sees a server event somewhere between sending a call and
//! receiving its answer. Each check therefore uses the interval that the
//! event certainly lies in, and only calls something a violation when it is
//! one for every position the event could have had: a probe counts as
//! outstanding from its admission (server time, in the permit) until the
//! client *sent* its outcome (the server released it no earlier), a breaker
//! the client was told is open is open from the moment the answer *arrived*
//! until `sent + delay` (the server's open-until is no earlier), and so on.
//! Server and client read the same wall clock (the server's is anchored once
//! at start and advanced monotonically), so comparisons allow [`SLACK_MS`].
//!
//! # Cluster mode (`soak --cluster`)
//! Two replicas share one Redis; one replica at a time is killed, and Redis
//! is frozen (SIGSTOP) now and then. The invariants stay the same; only the
//! places where cluster semantics really differ change, each marked
//! "Cluster:" below: which calls a fault excuses (a kill excuses calls to
//! the killed replica only; a Redis freeze excuses only Claim/Ack/Nack,
//! which need Redis), how queue items are matched (a Defer spooled while
//! Redis was frozen gets a new item id when replayed, so the payload is the
//! identity, not the id), and probes (half-open probes are counted
//! fleet-wide per breaker generation: the generation lives in Redis and
//! survives a replica's restart).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Allowance for the server's clock (wall time at start + monotonic time)
/// and this process's wall clock to differ, and for millisecond truncation.
pub const SLACK_MS: u64 = 5;

/// After a restart is ready, calls may still fail for this long (clients
/// find the new process): the "kill → ready plus a 1 s grace".
pub const GRACE_MS: u64 = 1000;

/// Milliseconds since the Unix epoch, as the server's permits count them.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The fields of a permit the checker needs. The text format is documented
/// in `src/engine/permit.rs` (`2.<tag>.<id>.<gen>.<probe>.<flags>.<reserved>.<issued_ms>.<expires_ms>.<mac>`,
/// hex); clients treat it as opaque, but a checker may read it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PermitFields {
    pub generation: u64,
    pub probe: u64,
    pub issued_ms: u64,
}

pub fn parse_permit(s: &str) -> Option<PermitFields> {
    let f: Vec<&str> = s.split('.').collect();
    if f.len() != 10 || f[0] != "2" {
        return None;
    }
    let hex = |i: usize| u64::from_str_radix(f[i], 16).ok();
    Some(PermitFields {
        generation: hex(3)?,
        probe: hex(4)?,
        issued_ms: hex(7)?,
    })
}

/// What the soak knows about each target it drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tgt {
    /// requests_per_minute budget, hammered above its rate.
    BudgetA,
    /// a short-window budget (requests + window), hammered above its rate.
    BudgetB,
    /// its breaker is driven open by failures; half_open_max_probes = 2.
    Flaky,
    /// forced open by an operator at the start: admits nothing, ever.
    Forced,
    /// paused by a provider's retry-after of ~an hour at the start.
    Paused,
    /// two key slots; `k1` disabled by a 401 at the start.
    Keyed,
}

impl Tgt {
    pub fn name(self) -> &'static str {
        match self {
            Tgt::BudgetA => "soak/budget-a",
            Tgt::BudgetB => "soak/budget-b",
            Tgt::Flaky => "soak/flaky",
            Tgt::Forced => "soak/forced",
            Tgt::Paused => "soak/paused",
            Tgt::Keyed => "soak/keyed",
        }
    }

    /// (burst, admissions per second) of a budgeted target.
    pub fn budget(self) -> Option<(f64, f64)> {
        match self {
            Tgt::BudgetA => Some((600.0, 10.0)),
            Tgt::BudgetB => Some((50.0, 10.0)),
            _ => None,
        }
    }
}

/// The flaky target's probe lease, as configured (see `soak::config`).
pub const PROBE_LEASE_MS: u64 = 2000;
pub const MAX_PROBES: usize = 2;
pub const DISABLED_SLOT: &str = "k1";

/// One admission the soak saw.
#[derive(Clone, Copy, Debug)]
pub struct Adm {
    pub issued_ms: u64,
    pub probe: bool,
    pub inc: u64,
    /// Cluster: decided without Redis, under the replica's share of the budget.
    pub degraded: bool,
}

/// One half-open probe: outstanding from `start` (server admission) to `end`.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub inc: u64,
    pub generation: u64,
    pub start: u64,
    pub end: u64,
    /// Cluster: admitted by a replica deciding without Redis.
    pub degraded: bool,
}

/// A breaker the server said is open: from `from` (the answer arrived) to
/// `until` (sent + the delay it gave), learnt in incarnation `inc`.
#[derive(Clone, Copy, Debug)]
pub struct ToldOpen {
    pub from: u64,
    pub until: u64,
    pub inc: u64,
    /// Cluster: the answer was decided without Redis (the open lives only
    /// in that replica's fallback until it merges back).
    pub degraded: bool,
}

/// A call that got no answer (deadline passed, connection refused or broken).
#[derive(Clone, Debug)]
pub struct Unanswered {
    pub start: u64,
    pub end: u64,
    pub what: &'static str,
    pub why: String,
    /// The replica the call went to (always 0 without `--cluster`).
    pub replica: usize,
}

/// One deferred item, by the soak's own id (its payload).
#[derive(Clone, Debug, Default)]
pub struct ItemRec {
    /// Defer was answered OK (acknowledged: durable).
    pub acknowledged: bool,
    /// Server item ids the Defer calls returned (one, by idempotency).
    pub defer_ids: HashSet<String>,
    /// Server item ids the item was delivered as.
    pub delivered_ids: HashSet<String>,
    pub deliveries: u32,
    /// Ack answered OK.
    pub acks_ok: u32,
    /// An Ack retried after a call that got no answer found the item gone:
    /// the unanswered Ack (or another worker's) deleted it.
    pub ack_gone: bool,
}

/// Counters and raw observations; see the module comment.
#[derive(Default)]
pub struct State {
    pub faults: u64,
    pub restarts: u64,
    pub vanished_clients: u64,
    /// (kill, ready, replica) per fault; ready None while restarting.
    pub windows: Vec<(u64, Option<u64>, usize)>,
    /// Cluster: (SIGSTOP, SIGCONT) per Redis freeze; SIGCONT None while frozen.
    pub freezes: Vec<(u64, Option<u64>)>,
    /// Cluster: CanProceed / RecordOutcome answers flagged `degraded`.
    pub degraded_decisions: u64,
    /// Cluster: which replica each incarnation (one process) was.
    pub replica_of: HashMap<u64, usize>,
    pub calls: u64,
    pub decisions: u64,
    pub admitted: u64,
    pub refused: u64,
    pub unanswered: Vec<Unanswered>,
    pub error_answers: BTreeMap<String, u64>,
    pub admissions: BTreeMap<Tgt, Vec<Adm>>,
    pub told_open: Vec<ToldOpen>,
    pub probes: Vec<Probe>,
    pub defer_calls: u64,
    pub defers_acknowledged: u64,
    pub defer_duplicates: u64,
    pub deliveries: u64,
    pub abandoned: u64,
    pub items_acked: u64,
    pub ack_refused: u64,
    pub items: HashMap<u64, ItemRec>,
    /// Violations decided the moment they are seen (they cannot be undone).
    pub immediate: BTreeMap<&'static str, u64>,
    pub examples: Vec<String>,
}

pub struct Ledger {
    pub s: Mutex<State>,
    pub start_ms: u64,
    /// `soak --cluster`: the checks marked "Cluster:" apply.
    pub cluster: bool,
}

const MAX_EXAMPLES: usize = 30;

impl State {
    fn violate(&mut self, what: &'static str, example: String) {
        *self.immediate.entry(what).or_default() += 1;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(format!("{what}: {example}"));
        }
    }
}

impl Default for Ledger {
    fn default() -> Self {
        Self::new(false)
    }
}

impl Ledger {
    pub fn new(cluster: bool) -> Ledger {
        Ledger {
            s: Mutex::new(State::default()),
            start_ms: now_ms(),
            cluster,
        }
    }

    /// Cluster: whether the probes in `open` (more than `MAX_PROBES`) are
    /// a partition, not a broken allowance. A replica that cannot reach
    /// Redis decides alone (`on_redis_unavailable = "local"`) and may hand
    /// out its share of the probes (`MAX_PROBES` / replicas, at least one)
    /// while the other replica, which does reach Redis, hands out the shared
    /// allowance: that happens at the edges of a Redis freeze, when one
    /// replica has noticed the change and the other has not yet. It is a
    /// partition only if every bound still holds on its own side: the
    /// probes decided through Redis are within the allowance, the probes of
    /// each degraded replica come from one incarnation (a replica killed
    /// while degraded loses its fallback: not excused) and are within its
    /// share, and no replica has probes on both sides (what a replica
    /// decided alone is merged back before it decides through Redis again,
    /// so that case is a real excess).
    fn probes_split_by_partition(&self, s: &State, open: &[usize]) -> bool {
        const REPLICAS: usize = 2;
        let share = (MAX_PROBES / REPLICAS).max(1);
        let mut through_redis = 0usize;
        let mut redis_replicas = HashSet::new();
        // replica -> (incarnations, probes) decided degraded
        let mut alone: HashMap<usize, (HashSet<u64>, usize)> = HashMap::new();
        for &i in open {
            let p = &s.probes[i];
            let Some(&replica) = s.replica_of.get(&p.inc) else {
                return false;
            };
            if p.degraded {
                let e = alone.entry(replica).or_default();
                e.0.insert(p.inc);
                e.1 += 1;
            } else {
                through_redis += 1;
                redis_replicas.insert(replica);
            }
        }
        through_redis > 0
            && through_redis <= MAX_PROBES
            && !alone.is_empty()
            && alone.iter().all(|(replica, (incs, n))| {
                incs.len() == 1 && *n <= share && !redis_replicas.contains(replica)
            })
    }

    /// The state, even if a task panicked while holding it (the soak's
    /// counters are still worth reporting).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.s.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn admission(&self, t: Tgt, permit: &str, key_slot: &str, inc: u64, degraded: bool) {
        let mut s = self.lock();
        s.admitted += 1;
        let Some(p) = parse_permit(permit) else {
            s.violate(
                "unparsable_permit",
                format!("{} permit {permit:?}", t.name()),
            );
            return;
        };
        match t {
            Tgt::Forced => s.violate(
                "forced_open_admitted",
                format!(
                    "{} admitted at {} (incarnation {inc}{})",
                    t.name(),
                    p.issued_ms,
                    if degraded { ", degraded" } else { "" }
                ),
            ),
            Tgt::Paused => s.violate(
                "pause_forgotten",
                format!(
                    "{} admitted at {} (incarnation {inc}{})",
                    t.name(),
                    p.issued_ms,
                    if degraded { ", degraded" } else { "" }
                ),
            ),
            Tgt::Keyed if key_slot == DISABLED_SLOT => s.violate(
                "disabled_key_admitted",
                format!(
                    "{} slot {key_slot} admitted at {} (incarnation {inc}{})",
                    t.name(),
                    p.issued_ms,
                    if degraded { ", degraded" } else { "" }
                ),
            ),
            _ => {}
        }
        s.admissions.entry(t).or_default().push(Adm {
            issued_ms: p.issued_ms,
            probe: p.probe != 0,
            inc,
            degraded,
        });
    }

    pub fn delivered(&self, payload: &[u8], server_id: &str) -> Option<u64> {
        let mut s = self.lock();
        s.deliveries += 1;
        let Some(n) = std::str::from_utf8(payload)
            .ok()
            .and_then(|p| p.parse().ok())
        else {
            s.violate(
                "foreign_payload",
                format!("item {server_id} payload {payload:?}"),
            );
            return None;
        };
        let cluster = self.cluster;
        let rec = s.items.entry(n).or_default();
        rec.deliveries += 1;
        rec.delivered_ids.insert(server_id.to_string());
        // Cluster: a Defer spooled while Redis was frozen answered the
        // spool's id and is delivered under the id its replay got, so only
        // delivered ids are compared (two delivered ids for one payload are
        // two queue items for one idempotency key: a duplicate).
        let ids = if cluster {
            rec.delivered_ids.len()
        } else {
            rec.delivered_ids.union(&rec.defer_ids).count()
        };
        if ids > 1 {
            s.violate(
                "idempotency_broken",
                format!("payload {n} delivered as {ids} distinct items"),
            );
        }
        Some(n)
    }

    pub fn acked(&self, n: u64) {
        let mut s = self.lock();
        s.items_acked += 1;
        let rec = s.items.entry(n).or_default();
        rec.acks_ok += 1;
        if rec.acks_ok > 1 {
            let k = rec.acks_ok;
            s.violate(
                "duplicate_successful_ack",
                format!("payload {n} acked successfully {k} times"),
            );
        }
    }

    pub fn defer_ok(&self, n: u64, server_id: &str, duplicate: bool) {
        let mut s = self.lock();
        s.defers_acknowledged += 1;
        if duplicate {
            s.defer_duplicates += 1;
        }
        let cluster = self.cluster;
        let rec = s.items.entry(n).or_default();
        rec.acknowledged = true;
        rec.defer_ids.insert(server_id.to_string());
        // Cluster: see `delivered` (a spooled Defer's id is not the item's).
        if !cluster && rec.delivered_ids.union(&rec.defer_ids).count() > 1 {
            s.violate(
                "idempotency_broken",
                format!("payload {n}: a retried Defer returned another item id {server_id}"),
            );
        }
    }

    /// The verdicts on everything seen so far. `final_` adds the end-of-run
    /// queue checks (lost and unacked items), which mean nothing mid-run.
    pub fn check(&self, final_: bool) -> Report {
        let s = self.lock();
        let mut v: BTreeMap<&'static str, u64> = s.immediate.clone();
        let mut examples = s.examples.clone();
        let mut note = |v: &mut BTreeMap<&'static str, u64>, what: &'static str, ex: String| {
            *v.entry(what).or_default() += 1;
            if examples.len() < MAX_EXAMPLES {
                examples.push(format!("{what}: {ex}"));
            }
        };

        // Deadlines: an unanswered call is excused only if it overlaps a
        // kill window (kill → ready + grace; a restart not yet ready is open)
        // of the replica it went to. Cluster: the other replica keeps
        // serving, so a kill does not excuse calls to it. A Redis freeze
        // (SIGSTOP → SIGCONT + grace) excuses only Claim / Ack / Nack, which
        // need Redis; decisions and Defers must be answered (degraded,
        // spooled) within the deadline all through it.
        let mut excused = 0u64;
        let mut excused_freeze = 0u64;
        let mut unexcused_by_call: BTreeMap<&'static str, u64> = BTreeMap::new();
        for u in &s.unanswered {
            let in_window = s.windows.iter().any(|&(k, r, rep)| {
                let end = r.map_or(u64::MAX, |r| r + GRACE_MS);
                rep == u.replica && u.start <= end && u.end >= k
            });
            let needs_redis = matches!(u.what, "Claim" | "Ack" | "Nack");
            let in_freeze = needs_redis
                && s.freezes.iter().any(|&(st, c)| {
                    let end = c.map_or(u64::MAX, |c| c + GRACE_MS);
                    u.start <= end && u.end >= st
                });
            if in_window {
                excused += 1;
            } else if in_freeze {
                excused += 1;
                excused_freeze += 1;
            } else {
                *unexcused_by_call.entry(u.what).or_default() += 1;
                note(
                    &mut v,
                    "unanswered_outside_kill_windows",
                    format!(
                        "{} to replica {} {}..{} (+{} ms from start): {}",
                        u.what,
                        u.replica,
                        u.start,
                        u.end,
                        u.start.saturating_sub(self.start_ms),
                        u.why
                    ),
                );
            }
        }

        // A breaker the client was told is open admits nothing before its
        // open-until: not across a restart, not ever.
        let flaky: Vec<Adm> = {
            let mut a = s.admissions.get(&Tgt::Flaky).cloned().unwrap_or_default();
            a.sort_by_key(|a| a.issued_ms);
            a
        };
        let mut open_forgotten_after_restart = 0u64;
        let mut open_unknown_in_partition = 0u64;
        let mut told_open_spanning_restart = 0u64;
        // Cluster: when incarnation `inc` next decided on the flaky target
        // through Redis after `after` (an admission or a refusal not
        // flagged degraded): by then it had merged back what it decided
        // alone (a target decided degraded stays on the fallback until its
        // merge is done).
        let back_on_redis = |inc: u64, after: u64| -> Option<u64> {
            let i = flaky.partition_point(|a| a.issued_ms <= after);
            let admitted = flaky[i..]
                .iter()
                .find(|a| a.inc == inc && !a.degraded)
                .map(|a| a.issued_ms);
            let refused = s
                .told_open
                .iter()
                .filter(|o| o.inc == inc && !o.degraded && o.from > after)
                .map(|o| o.from)
                .min();
            admitted.into_iter().chain(refused).min()
        };
        for t in &s.told_open {
            // Told open, then killed, and the new process was ready while
            // still inside the open period: the case "never forgotten" is about.
            if s.windows
                .iter()
                .any(|&(k, r, _)| k >= t.from && r.is_some_and(|r| r + SLACK_MS < t.until))
            {
                told_open_spanning_restart += 1;
            }
            let from = t.from + SLACK_MS;
            let until = t.until.saturating_sub(SLACK_MS);
            if from >= until {
                continue;
            }
            // Cluster, an open decided without Redis: it reaches Redis when
            // its replica merges back, which is no later than that
            // replica's next decision through Redis, and (when the open
            // was decided in a Redis freeze) about when Redis thaws (the
            // replica probes every 100 ms; 1 s allowed).
            let unmerged_until = if self.cluster && t.degraded {
                let thaw = s
                    .freezes
                    .iter()
                    .find(|&&(stop, cont)| {
                        stop <= t.from + SLACK_MS && cont.is_none_or(|c| t.from <= c + 1000)
                    })
                    .and_then(|&(_, cont)| cont.map(|c| c + 1000));
                let back = back_on_redis(t.inc, t.from);
                // Killed before it merged back: what it decided alone is
                // lost, and admissions after that are violations (a
                // degraded replica's fallback is not durable).
                let killed = s
                    .windows
                    .iter()
                    .filter(|&&(k, _, r)| k >= t.from && Some(&r) == s.replica_of.get(&t.inc))
                    .map(|&(k, _, _)| k)
                    .min();
                [thaw, back, killed]
                    .into_iter()
                    .flatten()
                    .min()
                    .unwrap_or(u64::MAX)
            } else {
                0
            };
            let i = flaky.partition_point(|a| a.issued_ms < from);
            for a in flaky[i..].iter().take_while(|a| a.issued_ms < until) {
                let other_replica = s.replica_of.get(&a.inc) != s.replica_of.get(&t.inc);
                // Cluster: with Redis unreachable, each replica decides
                // alone (`on_redis_unavailable = "local"`). An open decided
                // there by one replica is in no place another can read
                // until it merges back: another replica, itself degraded,
                // cannot honour it, nor can Redis answer for it before the
                // merge (at the edge of a freeze one replica is back on
                // Redis before the other). A partition, not forgetting:
                // counted and reported, not a violation. An open decided
                // through Redis stays a violation for every replica, and so
                // does an admission through Redis after the merge.
                if self.cluster
                    && t.degraded
                    && other_replica
                    && (a.degraded || a.issued_ms < unmerged_until)
                {
                    open_unknown_in_partition += 1;
                    continue;
                }
                if !other_replica && a.inc != t.inc {
                    open_forgotten_after_restart += 1;
                }
                note(
                    &mut v,
                    "open_breaker_admitted",
                    format!(
                        "told open {}..{} (incarnation {}{}), admitted {} at {} (incarnation {}{})",
                        t.from,
                        t.until,
                        t.inc,
                        if t.degraded { ", degraded" } else { "" },
                        if a.probe { "a probe" } else { "a call" },
                        a.issued_ms,
                        a.inc,
                        if a.degraded { ", degraded" } else { "" }
                    ),
                );
            }
        }

        // Outstanding probes per breaker generation (a restart starts a new
        // generation, so this is also per incarnation). Cluster: the breaker
        // and its generation live in Redis, shared by both replicas and kept
        // across a replica's restart, so probes are counted fleet-wide per
        // generation (reported under incarnation 0).
        // (incarnation, generation) -> (time, +1 start / -1 end, probe index)
        type Edges = Vec<(u64, i32, usize)>;
        let mut by_gen: BTreeMap<(u64, u64), Edges> = BTreeMap::new();
        for (i, p) in s.probes.iter().enumerate() {
            let end = p.end.saturating_sub(SLACK_MS).max(p.start);
            let inc = if self.cluster { 0 } else { p.inc };
            let ev = by_gen.entry((inc, p.generation)).or_default();
            ev.push((p.start, 1, i));
            ev.push((end, -1, i));
        }
        let mut max_probes_by_inc: BTreeMap<u64, usize> = BTreeMap::new();
        let mut probes_in_partition = 0u64;
        for ((inc, generation), mut ev) in by_gen {
            // Ends before starts at the same millisecond: a probe given back
            // then is not outstanding alongside one admitted then.
            ev.sort();
            let (mut cur, mut max, mut worst_noted) = (0i64, 0i64, MAX_PROBES as i64);
            let mut open: Vec<usize> = Vec::new();
            for (t, d, i) in ev {
                cur += i64::from(d);
                if d > 0 {
                    open.push(i);
                } else {
                    open.retain(|&o| o != i);
                }
                max = max.max(cur);
                if d < 0 || cur as usize <= MAX_PROBES {
                    continue;
                }
                if self.cluster && self.probes_split_by_partition(&s, &open) {
                    probes_in_partition += 1;
                    continue;
                }
                if cur > worst_noted {
                    worst_noted = cur;
                    // Which processes gave them, and whether decided
                    // without Redis (cluster), to tell the cases apart.
                    let who: Vec<String> = open
                        .iter()
                        .map(|&o| {
                            let p = &s.probes[o];
                            format!(
                                "{}@{}{}",
                                p.start,
                                p.inc,
                                if p.degraded { " degraded" } else { "" }
                            )
                        })
                        .collect();
                    note(
                        &mut v,
                        "too_many_probes",
                        format!(
                            "{cur} outstanding at {t} (incarnation {inc}, generation {generation}): admitted at@incarnation {}",
                            who.join(", ")
                        ),
                    );
                }
            }
            let m = max_probes_by_inc.entry(inc).or_default();
            *m = (*m).max(max as usize);
        }

        // Budgets: over every interval [a, b] between two admissions,
        // count ≤ burst + rate·(b − a). Cluster: the same strict bound,
        // fleet-wide, whether admissions were decided through Redis or
        // `degraded` under each replica's share (the shares must add up to
        // no more than the budget); the report says how many admissions were
        // degraded, in the whole run and in the worst interval.
        let mut budgets = Vec::new();
        for t in [Tgt::BudgetA, Tgt::BudgetB] {
            let Some((burst, rate)) = t.budget() else {
                continue;
            };
            let mut adm: Vec<Adm> = s.admissions.get(&t).cloned().unwrap_or_default();
            adm.sort_by_key(|a| a.issued_ms);
            let times: Vec<u64> = adm.iter().map(|a| a.issued_ms).collect();
            let (excess, at) = max_excess(&times, burst, rate);
            let degraded = adm.iter().filter(|a| a.degraded).count() as u64;
            let degraded_in_worst = adm
                .iter()
                .filter(|a| a.degraded && a.issued_ms >= at.0 && a.issued_ms <= at.1)
                .count() as u64;
            let freezes_in_worst = s
                .freezes
                .iter()
                .filter(|&&(st, c)| st <= at.1 && c.is_none_or(|c| c >= at.0))
                .count();
            let mut within = f64::NEG_INFINITY;
            let incs: HashSet<u64> = adm.iter().map(|a| a.inc).collect();
            for inc in incs {
                let ts: Vec<u64> = adm
                    .iter()
                    .filter(|a| a.inc == inc)
                    .map(|a| a.issued_ms)
                    .collect();
                within = within.max(max_excess(&ts, burst, rate).0);
            }
            let elapsed = now_ms().saturating_sub(self.start_ms) as f64 / 1000.0;
            let whole_bound = burst + rate * elapsed;
            // Millisecond truncation of both ends: allow one ms of refill.
            if excess > rate / 1000.0 + 1e-9 {
                let kills = s
                    .windows
                    .iter()
                    .filter(|&&(k, _, _)| k >= at.0 && k <= at.1)
                    .count();
                note(
                    &mut v,
                    "budget_over_admitted",
                    format!(
                        "{}: {excess:.2} admissions over burst + rate·t in the interval {}..{} ({:.1} s, {kills} kill(s) and {freezes_in_worst} Redis freeze(s) inside, {degraded_in_worst} degraded admission(s))",
                        t.name(),
                        at.0,
                        at.1,
                        at.1.saturating_sub(at.0) as f64 / 1000.0
                    ),
                );
            }
            budgets.push(BudgetFigure {
                target: t.name(),
                admitted: times.len() as u64,
                whole_run_bound: whole_bound,
                max_excess: excess,
                max_excess_within_one_incarnation: within,
                worst_interval: at,
                degraded_admitted: degraded,
                degraded_in_worst_interval: degraded_in_worst,
            });
        }

        // Queue, at the end: every acknowledged Defer delivered and acked once.
        let (mut lost, mut unacked, mut ack_gone, mut dup_deliveries) = (0u64, 0u64, 0u64, 0u64);
        for (n, r) in &s.items {
            dup_deliveries += u64::from(r.deliveries.saturating_sub(1));
            if r.ack_gone && r.acks_ok == 0 {
                ack_gone += 1;
            }
            if !final_ || !r.acknowledged {
                continue;
            }
            if r.deliveries == 0 {
                lost += 1;
                note(
                    &mut v,
                    "lost_item",
                    format!("payload {n} acknowledged, never delivered"),
                );
            } else if r.acks_ok == 0 && !r.ack_gone {
                unacked += 1;
                note(
                    &mut v,
                    "never_acked",
                    format!("payload {n} delivered {} times, never acked", r.deliveries),
                );
            }
        }

        Report {
            elapsed_s: now_ms().saturating_sub(self.start_ms) as f64 / 1000.0,
            faults: s.faults,
            restarts: s.restarts,
            vanished_clients: s.vanished_clients,
            calls: s.calls,
            decisions: s.decisions,
            admitted: s.admitted,
            refused: s.refused,
            unanswered: s.unanswered.len() as u64,
            unanswered_excused: excused,
            unanswered_excused_by_redis_freeze: excused_freeze,
            unanswered_not_excused_by_call: unexcused_by_call,
            redis_freezes: s.freezes.len() as u64,
            degraded_decisions: s.degraded_decisions,
            error_answers: s.error_answers.clone(),
            defer_calls: s.defer_calls,
            defers_acknowledged: s.defers_acknowledged,
            defer_duplicates: s.defer_duplicates,
            deliveries: s.deliveries,
            duplicate_deliveries: dup_deliveries,
            abandoned: s.abandoned,
            items_acked: s.items_acked,
            ack_refused: s.ack_refused,
            acked_by_unanswered_call: ack_gone,
            lost,
            unacked,
            told_open: s.told_open.len() as u64,
            open_forgotten_after_restart,
            open_unknown_in_partition,
            probes_in_partition,
            told_open_spanning_restart,
            probes: s.probes.len() as u64,
            max_probes_by_incarnation: max_probes_by_inc,
            budgets,
            violations: v,
            examples,
        }
    }
}

/// max over i ≤ j of (j − i + 1) − burst − rate·(t_j − t_i), with the
/// interval achieving it. Linear: keep the best (rate·t_i − i) so far.
fn max_excess(times: &[u64], burst: f64, rate: f64) -> (f64, (u64, u64)) {
    let mut best = (f64::NEG_INFINITY, (0, 0));
    let mut lead = (f64::NEG_INFINITY, 0u64);
    // Relative to the first admission: epoch milliseconds times a rate lose
    // precision in an f64.
    let base = times.first().copied().unwrap_or(0);
    for (j, &abs) in times.iter().enumerate() {
        let t = abs - base;
        let cand = rate * t as f64 / 1000.0 - j as f64;
        if cand > lead.0 {
            lead = (cand, abs);
        }
        let e = (j as f64 + 1.0 - rate * t as f64 / 1000.0) + lead.0 - burst;
        if e > best.0 {
            best = (e, (lead.1, abs));
        }
    }
    best
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BudgetFigure {
    pub target: &'static str,
    pub admitted: u64,
    /// burst + rate·(soak duration so far): the whole-run bound.
    pub whole_run_bound: f64,
    /// The worst interval's admissions − (burst + rate·length); ≤ 0 is correct.
    pub max_excess: f64,
    /// The same, over intervals inside one server incarnation only.
    pub max_excess_within_one_incarnation: f64,
    /// The worst interval (first and last admission, server ms).
    pub worst_interval: (u64, u64),
    /// Cluster: admissions answered `degraded` (under a replica's share).
    pub degraded_admitted: u64,
    pub degraded_in_worst_interval: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub elapsed_s: f64,
    pub faults: u64,
    pub restarts: u64,
    pub vanished_clients: u64,
    pub calls: u64,
    pub decisions: u64,
    pub admitted: u64,
    pub refused: u64,
    pub unanswered: u64,
    pub unanswered_excused: u64,
    /// Cluster: Claim / Ack / Nack excused by a Redis freeze.
    pub unanswered_excused_by_redis_freeze: u64,
    /// The unexcused unanswered calls, by RPC (which faults hit what).
    pub unanswered_not_excused_by_call: BTreeMap<&'static str, u64>,
    pub redis_freezes: u64,
    pub degraded_decisions: u64,
    pub error_answers: BTreeMap<String, u64>,
    pub defer_calls: u64,
    pub defers_acknowledged: u64,
    pub defer_duplicates: u64,
    pub deliveries: u64,
    pub duplicate_deliveries: u64,
    pub abandoned: u64,
    pub items_acked: u64,
    pub ack_refused: u64,
    pub acked_by_unanswered_call: u64,
    pub lost: u64,
    pub unacked: u64,
    pub told_open: u64,
    pub open_forgotten_after_restart: u64,
    /// Cluster: admissions while another replica, deciding without Redis,
    /// had said open: by a replica itself degraded, or through Redis before
    /// the open was merged back (see the rule in `check`): not violations.
    pub open_unknown_in_partition: u64,
    /// Cluster: moments more than `MAX_PROBES` probes were outstanding
    /// because a replica cut off from Redis probed within its share while
    /// the other probed through Redis (see `probes_split_by_partition`):
    /// not violations.
    pub probes_in_partition: u64,
    /// Open periods a client was told about that outlived a kill and restart.
    pub told_open_spanning_restart: u64,
    pub probes: u64,
    pub max_probes_by_incarnation: BTreeMap<u64, usize>,
    pub budgets: Vec<BudgetFigure>,
    pub violations: BTreeMap<&'static str, u64>,
    pub examples: Vec<String>,
}

impl Report {
    pub fn total_violations(&self) -> u64 {
        self.violations.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excess_of_a_burst_then_rate() {
        // 3 at once with burst 3: excess 0; a 4th 100 ms later at 10/s: 0 too.
        let (e, _) = max_excess(&[0, 0, 0, 100], 3.0, 10.0);
        assert!(e.abs() < 1e-9, "{e}");
        let (e, _) = max_excess(&[0, 0, 0, 50], 3.0, 10.0);
        assert!((e - 0.5).abs() < 1e-9, "{e}");
    }

    /// Probes (start, end, incarnation, degraded) of generation 1, with
    /// incarnations 4 and 6 on replica 1 and 5 on replica 0.
    fn probe_report(probes: &[(u64, u64, u64, bool)]) -> Report {
        let ledger = Ledger::new(true);
        {
            let mut s = ledger.lock();
            s.replica_of.extend([(4, 1), (5, 0), (6, 1)]);
            for &(start, end, inc, degraded) in probes {
                s.probes.push(Probe {
                    inc,
                    generation: 1,
                    start,
                    end,
                    degraded,
                });
            }
        }
        ledger.check(true)
    }

    #[test]
    fn probes_over_the_allowance_are_a_partition_only_when_each_side_keeps_its_bound() {
        let too_many = |r: &Report| r.violations.get("too_many_probes").copied().unwrap_or(0);
        // Two through Redis (replica 0) and one alone within replica 1's
        // share: the case the fresh-clone CI caught; a partition.
        let r = probe_report(&[
            (1000, 5000, 5, false),
            (1100, 5000, 4, true),
            (1200, 5000, 5, false),
        ]);
        assert_eq!(
            (too_many(&r), r.probes_in_partition),
            (0, 1),
            "{:?}",
            r.examples
        );
        // Three through Redis: a broken allowance, whatever else happens.
        let r = probe_report(&[
            (1000, 5000, 5, false),
            (1100, 5000, 5, false),
            (1200, 5000, 4, false),
        ]);
        assert_eq!((too_many(&r), r.probes_in_partition), (1, 0));
        // Two alone from one degraded replica: over its share of one.
        let r = probe_report(&[
            (1000, 5000, 5, false),
            (1100, 5000, 4, true),
            (1200, 5000, 4, true),
        ]);
        assert_eq!(too_many(&r), 1);
        // One alone from each incarnation of a replica killed while
        // degraded (its fallback forgot the first): not excused.
        let r = probe_report(&[
            (1000, 5000, 5, false),
            (1100, 5000, 4, true),
            (1200, 5000, 6, true),
        ]);
        assert_eq!(too_many(&r), 1);
        // Replica 0 probing alone and through Redis at once: it merges back
        // before deciding through Redis, so this is a real excess.
        let r = probe_report(&[
            (1000, 5000, 5, true),
            (1100, 5000, 5, false),
            (1200, 5000, 4, false),
        ]);
        assert_eq!(too_many(&r), 1);
        // Within the allowance: nothing to excuse or report.
        let r = probe_report(&[
            (1000, 1050, 5, false),
            (1100, 5000, 4, true),
            (1200, 5000, 5, false),
        ]);
        assert_eq!((too_many(&r), r.probes_in_partition), (0, 0));
    }

    /// An open told by incarnation 4 (replica 1) from 1000 to 9000, and
    /// one admission of the flaky target; incarnation 5 is replica 0.
    fn open_report(
        told_degraded: bool,
        admitted: (u64, u64, bool),
        setup: impl FnOnce(&mut State),
    ) -> Report {
        let ledger = Ledger::new(true);
        {
            let mut s = ledger.lock();
            s.replica_of.extend([(4, 1), (5, 0)]);
            s.told_open.push(ToldOpen {
                from: 1000,
                until: 9000,
                inc: 4,
                degraded: told_degraded,
            });
            let (issued_ms, inc, degraded) = admitted;
            s.admissions.entry(Tgt::Flaky).or_default().push(Adm {
                issued_ms,
                probe: true,
                inc,
                degraded,
            });
            setup(&mut s);
        }
        ledger.check(true)
    }

    #[test]
    fn an_open_decided_alone_is_a_partition_only_until_it_can_have_been_merged() {
        let bad = |r: &Report| {
            r.violations
                .get("open_breaker_admitted")
                .copied()
                .unwrap_or(0)
        };
        let freeze = |s: &mut State| s.freezes.push((900, Some(3000)));
        // Told open alone in a freeze; the other replica, back on Redis
        // first, admits before the thaw + 1 s: the open was not merged yet.
        let r = open_report(true, (3200, 5, false), freeze);
        assert_eq!(
            (bad(&r), r.open_unknown_in_partition),
            (0, 1),
            "{:?}",
            r.examples
        );
        // The same admission 1.5 s after the thaw: merged by then; a violation.
        let r = open_report(true, (4500, 5, false), freeze);
        assert_eq!(bad(&r), 1);
        // No freeze (Redis slow for one replica): partition until the
        // degraded replica decides through Redis again.
        let back = |s: &mut State| {
            // A refusal through Redis (its own short open period ends
            // before the admission below).
            s.told_open.push(ToldOpen {
                from: 2000,
                until: 2100,
                inc: 4,
                degraded: false,
            })
        };
        assert_eq!(bad(&open_report(true, (1500, 5, false), back)), 0);
        assert_eq!(bad(&open_report(true, (2500, 5, false), back)), 1);
        // Killed before merging back: what it decided alone is lost.
        let killed = |s: &mut State| s.windows.push((2000, Some(2500), 1));
        assert_eq!(bad(&open_report(true, (1500, 5, false), killed)), 0);
        assert_eq!(bad(&open_report(true, (2600, 5, false), killed)), 1);
        // An open decided through Redis binds every replica at once.
        assert_eq!(bad(&open_report(false, (3200, 5, false), freeze)), 1);
        // Both degraded: neither can know the other's open.
        assert_eq!(bad(&open_report(true, (8000, 5, true), |_| {})), 0);
    }

    #[test]
    fn parses_a_permit() {
        let p = parse_permit(
            "2.ab.1f.3.2.100.0.18f00000000.18f00001000.00112233445566778899aabbccddeeff",
        );
        assert_eq!(
            p,
            Some(PermitFields {
                generation: 3,
                probe: 2,
                issued_ms: 0x18f00000000
            })
        );
        assert_eq!(parse_permit("garbage"), None);
    }
}
