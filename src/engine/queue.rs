//! The deferred-request queue: requests saved while every model is down,
//! handed to workers when service returns, at the rate budgets allow.
//!
//! Promises: a Defer is acknowledged only once it is durable; a Claim hands
//! out items only while the queue's route (or target) admits a call, and
//! each item comes admitted (target + permit), so workers drain exactly as
//! fast as the breaker and budgets allow; delivery is at-least-once (a lease
//! that runs out returns the item); after `max_attempts` an item moves to the
//! dead-letter list instead of looping forever.
//!
//! Deferred operations are rare next to decisions, so the queue's index sits
//! behind one mutex; it is never held across an await (store writes are
//! queued under it, awaited after it is released).

use super::backend::local::persist::Pending;
use super::error::{EngineError, Result, invalid};
use super::events::EventKind;
use super::store::{IdemRecord, ItemRecord, Op};
use super::{AdmitArgs, Engine, Reason, RouteQuery, validate_target};
use crate::domain::Time;
use crate::domain::budget::Kind;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

/// What the end user is told when their request was deferred.
pub const DEFERRED_MESSAGE: &str =
    "Your request has been saved and will be processed as soon as service is restored.";

const MAX_METADATA_ENTRIES: usize = 32;
const MAX_METADATA_BYTES: usize = 8 * 1024;
const MAX_IDEMPOTENCY_KEY: usize = 256;
const MAX_ATTEMPTS_CAP: u32 = 100;
const MAX_CLAIM: u32 = 100;
const DEFAULT_LEASE: Duration = Duration::from_secs(60);
const MAX_LEASE: Duration = Duration::from_secs(3600);
const MAX_WAIT: Duration = Duration::from_secs(60);

struct Entry {
    rec: ItemRecord,
    /// (token, until) while claimed.
    lease: Option<(u64, Time)>,
}

#[derive(Default, Clone, Copy)]
struct Counts {
    waiting: u64,
    in_flight: u64,
    dead: u64,
    bytes: u64,
}

/// An idempotency key's item, and the store write that made it durable
/// (a duplicate Defer is answered only once that write is committed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IdemEntry {
    id: u64,
    expires_at: u64,
    seq: u64,
}

/// The idempotency index key: keys are scoped to their queue, so the same key
/// in two queues names two requests. Queue names cannot contain NUL (they are
/// route or target names), so the separator is unambiguous.
fn idem_key(queue: &str, key: &str) -> String {
    let mut k = String::with_capacity(queue.len() + 1 + key.len());
    k.push_str(queue);
    k.push('\0');
    k.push_str(key);
    k
}

/// Bytes an item holds against `[queue] max_total_bytes`: everything it stores.
fn item_bytes(rec: &ItemRecord) -> u64 {
    let meta: usize = rec.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    (rec.payload.len() + meta + rec.idempotency_key.len() + rec.queue.len()) as u64
}

#[derive(Default)]
pub(crate) struct QueueState {
    items: HashMap<u64, Entry>,
    /// Per queue: waiting items by (due, id).
    ready: HashMap<String, BTreeSet<(u64, u64)>>,
    /// Claimed items by (lease until, id), for expiry.
    leased: BTreeSet<(u64, u64)>,
    dead: BTreeMap<u64, ItemRecord>,
    /// Live keys (expires_at = 0) and tombstones of acked items.
    idem: HashMap<String, IdemEntry>,
    /// Tombstones by expiry, to forget them once `idempotency_ttl` has passed.
    idem_expiry: BTreeSet<(u64, String)>,
    counts: HashMap<String, Counts>,
    total_bytes: u64,
    next_id: u64,
}

/// The queue's state and its wake-up signal for long-polling workers.
#[derive(Default)]
pub(crate) struct Queues {
    state: Mutex<QueueState>,
    notify: tokio::sync::Notify,
}

impl Queues {
    pub(crate) fn state_lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        lock(self)
    }
}

/// A claimed item, admitted and leased.
#[derive(Clone, Debug, PartialEq)]
pub struct Claimed {
    pub item: ItemRecord,
    pub lease_token: String,
    pub lease_until: Time,
    pub target: Arc<str>,
    pub permit: String,
    pub key_slot: Option<Arc<str>>,
}

/// Claim's answer.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ClaimResult {
    pub items: Vec<Claimed>,
    /// Why nothing could be handed out, and when to ask again.
    pub blocked: Option<(Reason, Option<Duration>)>,
}

/// Defer's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct DeferResult {
    pub id: u64,
    pub duplicate: bool,
    pub depth: u64,
}

/// One queue's numbers.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueStat {
    pub queue: String,
    pub depth: u64,
    pub in_flight: u64,
    pub dead_letters: u64,
    pub oldest_age: Duration,
    pub bytes: u64,
}

/// A Defer request.
#[derive(Clone, Debug, Default)]
pub struct DeferArgs {
    pub queue: String,
    pub payload: Vec<u8>,
    pub metadata: HashMap<String, String>,
    pub idempotency_key: String,
    pub not_before: Option<Time>,
    pub max_attempts: u32,
    pub estimated_tokens: u64,
    pub required_context_tokens: u64,
}

/// Items taken off the ready list by a Claim and not yet leased; whatever is
/// left when this is dropped goes back to the queue.
struct Taken<'a> {
    queues: &'a Queues,
    queue: &'a str,
    items: std::collections::VecDeque<(u64, u64)>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if self.items.is_empty() {
            return;
        }
        let mut s = lock(self.queues);
        let ready = s.ready.entry(self.queue.to_string()).or_default();
        for item in self.items.drain(..) {
            ready.insert(item);
        }
        drop(s);
        self.queues.notify.notify_waiters();
    }
}

fn lock(q: &Queues) -> std::sync::MutexGuard<'_, QueueState> {
    q.state.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn parse_id(id: &str) -> Result<u64> {
    id.parse::<u64>().map_err(|_| {
        invalid(format!(
            "id {id:?} is not an item id (ids are decimal numbers returned by Defer)"
        ))
    })
}

fn parse_token(token: &str) -> Result<u64> {
    u64::from_str_radix(token, 16)
        .map_err(|_| invalid("lease_token does not parse; pass it exactly as Claim returned it"))
}

fn counts<'a>(s: &'a mut QueueState, queue: &str) -> &'a mut Counts {
    s.counts.entry(queue.to_string()).or_default()
}

impl QueueState {
    /// Restores from the store.
    pub(crate) fn load(
        items: Vec<ItemRecord>,
        dead: Vec<ItemRecord>,
        idem: Vec<(String, IdemRecord)>,
        next_id: u64,
        now: Time,
    ) -> (QueueState, Vec<Op>) {
        let mut s = QueueState::default();
        let mut ops = Vec::new();
        for rec in items {
            s.next_id = s.next_id.max(rec.id);
            let c = counts(&mut s, &rec.queue);
            c.waiting += 1;
            c.bytes += item_bytes(&rec);
            s.total_bytes += item_bytes(&rec);
            // Leases do not survive a restart: every item is waiting again.
            s.ready
                .entry(rec.queue.clone())
                .or_default()
                .insert((rec.due, rec.id));
            s.items.insert(rec.id, Entry { rec, lease: None });
        }
        for rec in dead {
            s.next_id = s.next_id.max(rec.id);
            let c = counts(&mut s, &rec.queue);
            c.dead += 1;
            c.bytes += item_bytes(&rec);
            s.total_bytes += item_bytes(&rec);
            s.dead.insert(rec.id, rec);
        }
        // Ids are never reused, even those of items already acked.
        s.next_id = s.next_id.max(next_id);
        for (key, r) in idem {
            s.next_id = s.next_id.max(r.id);
            // Keys written before they were scoped per queue: a live item's
            // key moves to its queue; a tombstone's queue is unknown, so it is dropped.
            let key = if key.contains('\0') {
                key
            } else {
                ops.push(Op::Idem(key.clone(), None));
                match s.items.get(&r.id) {
                    Some(e) => {
                        let scoped = idem_key(&e.rec.queue, &key);
                        ops.push(Op::Idem(scoped.clone(), Some(r.clone())));
                        scoped
                    }
                    None => continue,
                }
            };
            if r.expires_at != 0 && r.expires_at <= now.as_nanos() {
                ops.push(Op::Idem(key, None));
            } else {
                if r.expires_at != 0 {
                    s.idem_expiry.insert((r.expires_at, key.clone()));
                }
                s.idem.insert(
                    key,
                    IdemEntry {
                        id: r.id,
                        expires_at: r.expires_at,
                        seq: 0,
                    },
                );
            }
        }
        (s, ops)
    }

    /// Returns items whose lease ran out to their queue (or the dead letters).
    fn expire(
        &mut self,
        now: Time,
        ops: &mut Vec<Op>,
        events: &mut Vec<(String, EventKind)>,
    ) -> bool {
        let mut any = false;
        while let Some(&(until, id)) = self.leased.first() {
            if until > now.as_nanos() {
                break;
            }
            self.leased.pop_first();
            let Some(entry) = self.items.get_mut(&id) else {
                continue;
            };
            if entry.lease.map(|(_, u)| u.as_nanos()) != Some(until) {
                continue;
            }
            entry.lease = None;
            entry.rec.last_error = "lease expired without Ack or Nack".into();
            any = true;
            let queue = entry.rec.queue.clone();
            if entry.rec.attempt >= entry.rec.max_attempts {
                let c = counts(self, &queue);
                c.in_flight = c.in_flight.saturating_sub(1);
                self.dead_letter(
                    id,
                    now,
                    "lease expired without Ack or Nack on the last attempt",
                    ops,
                    events,
                );
            } else {
                let due = entry.rec.due;
                ops.push(Op::Item(id, Some(entry.rec.clone())));
                let c = counts(self, &queue);
                c.in_flight = c.in_flight.saturating_sub(1);
                c.waiting += 1;
                self.ready.entry(queue).or_default().insert((due, id));
            }
        }
        any
    }

    /// Forgets idempotency keys whose tombstone has expired.
    fn purge_idem(&mut self, now: Time, ops: &mut Vec<Op>) {
        while let Some((at, _)) = self.idem_expiry.first() {
            if *at > now.as_nanos() {
                break;
            }
            let Some((at, key)) = self.idem_expiry.pop_first() else {
                break;
            };
            if self.idem.get(&key).is_some_and(|e| e.expires_at == at) {
                self.idem.remove(&key);
                ops.push(Op::Idem(key, None));
            }
        }
    }

    /// Moves an item (no longer counted as waiting or in flight by the
    /// caller) to the dead letters.
    fn dead_letter(
        &mut self,
        id: u64,
        now: Time,
        why: &str,
        ops: &mut Vec<Op>,
        events: &mut Vec<(String, EventKind)>,
    ) {
        let Some(entry) = self.items.remove(&id) else {
            return;
        };
        let mut rec = entry.rec;
        rec.last_error = why.to_string();
        rec.dead_lettered_at = now.as_nanos();
        let queue = rec.queue.clone();
        counts(self, &queue).dead += 1;
        events.push((
            queue.clone(),
            EventKind::ItemDeadLettered {
                queue: Arc::from(queue.as_str()),
                id,
                reason: why.to_string(),
                attempts: rec.attempt,
            },
        ));
        ops.push(Op::Item(id, None));
        ops.push(Op::Dead(id, Some(rec.clone())));
        self.dead.insert(id, rec);
    }

    fn release_payload(&mut self, queue: &str, bytes: u64) {
        self.total_bytes = self.total_bytes.saturating_sub(bytes);
        let c = counts(self, queue);
        c.bytes = c.bytes.saturating_sub(bytes);
    }
}

impl Engine {
    fn queue_write(&self, ops: Vec<Op>) -> Pending {
        self.queue_write_seq(ops).0
    }

    /// Queues a write of the queue's state; also returns its sequence number.
    fn queue_write_seq(&self, ops: Vec<Op>) -> (Pending, u64) {
        match self.persister() {
            Some(p) if !ops.is_empty() => p.write(ops, Vec::new()),
            _ => (Pending::none(), 0),
        }
    }

    fn committed(&self) -> u64 {
        self.persister().map_or(u64::MAX, |p| p.committed())
    }

    fn publish_queue_events(&self, now: Time, events: Vec<(String, EventKind)>) {
        for (queue, kind) in events {
            if let EventKind::ItemDeadLettered { .. } = kind {
                self.metrics.dead_lettered(&queue);
            }
            self.events.publish(now, &Arc::from(queue.as_str()), kind);
        }
    }

    /// Why a request could never be delivered from `queue` (no candidate's
    /// context window or token budget can ever hold it), if so: such an item
    /// would only wait forever, so Defer refuses it.
    fn never_deliverable(&self, queue: &str, estimated: u64, context: u64) -> Option<String> {
        let candidates: Vec<Arc<str>> = match self.config.routes.get(queue) {
            Some(r) => r.targets.clone(),
            None => vec![Arc::from(queue)],
        };
        let fits = |name: &Arc<str>| {
            let t = self.config.target(name);
            let window_ok = context == 0 || t.context_window == 0 || t.context_window >= context;
            let capacity = |b: &crate::domain::budget::BudgetConfig| {
                [Kind::Tokens, Kind::InputTokens]
                    .iter()
                    .filter_map(|k| b.rate(*k))
                    .all(|r| estimated <= r.amount)
            };
            let tokens_ok = capacity(&t.budget)
                && t.groups
                    .iter()
                    .all(|&g| capacity(&self.config.groups[g].budget));
            window_ok && tokens_ok
        };
        if candidates.iter().any(fits) {
            return None;
        }
        Some(format!(
            "no target of queue {queue:?} can ever take this request (required_context_tokens {context}, estimated_tokens {estimated}): \
             their context windows or token budgets are smaller"
        ))
    }

    fn check_queue_name(&self, queue: &str) -> Result<()> {
        if self.config.routes.contains_key(queue) {
            return Ok(());
        }
        validate_target(queue).map_err(|_| {
            invalid(format!(
                "queue {queue:?} is neither a configured route nor a valid target name (1..=256 bytes)"
            ))
        })
    }

    /// Saves a request; returns once it is durable.
    pub async fn defer(&self, a: DeferArgs) -> Result<DeferResult> {
        self.check_queue_name(&a.queue)?;
        let limits = &self.config.queue;
        if a.payload.len() > limits.max_payload_bytes {
            return Err(invalid(format!(
                "payload is {} bytes; the limit is {} ([queue] max_payload_bytes)",
                a.payload.len(),
                limits.max_payload_bytes
            )));
        }
        let meta_bytes: usize = a.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if a.metadata.len() > MAX_METADATA_ENTRIES || meta_bytes > MAX_METADATA_BYTES {
            return Err(invalid(format!(
                "metadata has {} entries / {meta_bytes} bytes; at most {MAX_METADATA_ENTRIES} entries and {MAX_METADATA_BYTES} bytes",
                a.metadata.len()
            )));
        }
        if a.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
            return Err(invalid(format!(
                "idempotency_key is longer than {MAX_IDEMPOTENCY_KEY} bytes"
            )));
        }
        if a.max_attempts > MAX_ATTEMPTS_CAP {
            return Err(invalid(format!(
                "max_attempts {} is above the maximum of {MAX_ATTEMPTS_CAP}",
                a.max_attempts
            )));
        }
        if let Some(why) =
            self.never_deliverable(&a.queue, a.estimated_tokens, a.required_context_tokens)
        {
            return Err(invalid(why));
        }
        if !self.config.routes.contains_key(&a.queue) {
            // A target queue's target must exist to ever be claimed: create it
            // now, so a server at max_targets refuses the Defer instead of
            // accepting an item that no Claim could ever hand out.
            self.ensure_target(&a.queue)?;
        }
        let now = self.clock.now();
        let mut a = a;
        /// What one look at the queue decided.
        enum Step {
            /// A Defer with the same key is still being written: wait for it.
            WaitFor(u64),
            Duplicate(DeferResult, Vec<Op>),
            Added(DeferResult, Pending),
        }
        let (result, pending) = loop {
            let step = {
                let mut s = lock(&self.queues);
                let mut ops = Vec::new();
                s.purge_idem(now, &mut ops);
                let scoped = idem_key(&a.queue, &a.idempotency_key);
                if !a.idempotency_key.is_empty()
                    && let Some(e) = s.idem.get(&scoped).copied()
                {
                    if e.seq > self.committed() {
                        // The first Defer with this key is not durable yet: answer
                        // the duplicate only once it is (or retry if it failed).
                        Step::WaitFor(e.seq)
                    } else {
                        let depth = s
                            .counts
                            .get(&a.queue)
                            .map_or(0, |c| c.waiting + c.in_flight);
                        Step::Duplicate(
                            DeferResult {
                                id: e.id,
                                duplicate: true,
                                depth,
                            },
                            ops,
                        )
                    }
                } else {
                    let c = s.counts.get(&a.queue).copied();
                    if c.is_none() && s.counts.len() >= limits.max_queues {
                        return Err(EngineError::ResourceExhausted(format!(
                            "{} deferred queues exist already ([queue] max_queues); use an existing route or target as the queue",
                            limits.max_queues
                        )));
                    }
                    let c = c.unwrap_or_default();
                    if (c.waiting + c.in_flight) as usize >= limits.max_depth {
                        return Err(EngineError::ResourceExhausted(format!(
                            "queue {:?} already holds {} items, its limit ([queue] max_depth = {}); drain it or raise the limit",
                            a.queue,
                            c.waiting + c.in_flight,
                            limits.max_depth
                        )));
                    }
                    let held = s.items.len() + s.dead.len();
                    if held >= limits.max_items {
                        return Err(EngineError::ResourceExhausted(format!(
                            "deferred queues hold {held} items including dead letters, the limit ([queue] max_items); drain them, or Requeue / clear dead letters"
                        )));
                    }
                    s.next_id += 1;
                    let id = s.next_id;
                    let rec = ItemRecord {
                        id,
                        queue: a.queue.clone(),
                        payload: std::mem::take(&mut a.payload),
                        metadata: std::mem::take(&mut a.metadata),
                        idempotency_key: a.idempotency_key.clone(),
                        due: a.not_before.unwrap_or(now).as_nanos(),
                        max_attempts: if a.max_attempts == 0 {
                            limits.default_max_attempts
                        } else {
                            a.max_attempts
                        },
                        attempt: 0,
                        enqueued_at: now.as_nanos(),
                        last_error: String::new(),
                        dead_lettered_at: 0,
                        estimated_tokens: a.estimated_tokens,
                        required_context_tokens: a.required_context_tokens,
                    };
                    let bytes = item_bytes(&rec);
                    if s.total_bytes + bytes > limits.max_total_bytes {
                        s.next_id -= 1;
                        return Err(EngineError::ResourceExhausted(format!(
                            "deferred queues hold {} bytes; accepting {bytes} more would pass the limit of {} ([queue] max_total_bytes)",
                            s.total_bytes, limits.max_total_bytes
                        )));
                    }
                    s.total_bytes += bytes;
                    let c = counts(&mut s, &a.queue);
                    c.waiting += 1;
                    c.bytes += bytes;
                    let depth = c.waiting + c.in_flight;
                    s.ready
                        .entry(a.queue.clone())
                        .or_default()
                        .insert((rec.due, id));
                    ops.push(Op::Item(id, Some(rec.clone())));
                    ops.push(Op::NextItemId(id));
                    if !a.idempotency_key.is_empty() {
                        ops.push(Op::Idem(
                            scoped.clone(),
                            Some(IdemRecord { id, expires_at: 0 }),
                        ));
                    }
                    s.items.insert(id, Entry { rec, lease: None });
                    // Queued under the lock, so the idempotency entry knows its write.
                    let (pending, seq) = self.queue_write_seq(ops);
                    if !a.idempotency_key.is_empty() {
                        s.idem.insert(
                            scoped,
                            IdemEntry {
                                id,
                                expires_at: 0,
                                seq,
                            },
                        );
                    }
                    Step::Added(
                        DeferResult {
                            id,
                            duplicate: false,
                            depth,
                        },
                        pending,
                    )
                }
            };
            match step {
                Step::WaitFor(seq) => {
                    if let Some(p) = self.persister() {
                        let _ = p.wait_for(seq).wait().await;
                    }
                }
                Step::Duplicate(r, ops) => {
                    let _ = self.queue_write(ops);
                    return Ok(r);
                }
                Step::Added(r, pending) => break (r, pending),
            }
        };
        if let Err(e) = pending.wait().await {
            // Not durable, so not acknowledged: take it back out.
            let mut s = lock(&self.queues);
            if let Some(entry) = s.items.remove(&result.id) {
                let q = entry.rec.queue.clone();
                if let Some(r) = s.ready.get_mut(&q) {
                    r.remove(&(entry.rec.due, result.id));
                }
                let c = counts(&mut s, &q);
                c.waiting = c.waiting.saturating_sub(1);
                s.release_payload(&q, item_bytes(&entry.rec));
                if !entry.rec.idempotency_key.is_empty() {
                    s.idem
                        .remove(&idem_key(&entry.rec.queue, &entry.rec.idempotency_key));
                }
            }
            return Err(EngineError::Unavailable(format!(
                "the request could not be saved: {e}"
            )));
        }
        self.metrics.deferred(&a.queue);
        self.events.publish(
            now,
            &Arc::from(a.queue.as_str()),
            EventKind::ItemDeferred {
                queue: Arc::from(a.queue.as_str()),
                id: result.id,
                depth: result.depth,
            },
        );
        self.queues.notify.notify_waiters();
        Ok(result)
    }

    /// Hands out up to `max_items` due items, each admitted to the queue's
    /// route or target; long-polls up to `wait` when there is nothing to hand out.
    pub async fn claim(
        &self,
        queue: &str,
        max_items: u32,
        lease: Option<Duration>,
        wait: Option<Duration>,
        worker: &str,
    ) -> Result<ClaimResult> {
        self.check_queue_name(queue)?;
        let max_items = match max_items {
            0 => 1,
            n if n > MAX_CLAIM => {
                return Err(invalid(format!(
                    "max_items {n} is above the maximum of {MAX_CLAIM}"
                )));
            }
            n => n as usize,
        };
        let lease = lease.filter(|d| !d.is_zero()).unwrap_or(DEFAULT_LEASE);
        if lease > MAX_LEASE {
            return Err(invalid(format!(
                "lease is above the maximum of {}s",
                MAX_LEASE.as_secs()
            )));
        }
        let wait = wait.unwrap_or_default();
        if wait > MAX_WAIT {
            return Err(invalid(format!(
                "wait is above the maximum of {}s",
                MAX_WAIT.as_secs()
            )));
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut shutdown = self.hub.shutdown_signal();
        loop {
            // Subscribe before looking, so a Defer between the look and the wait is not missed.
            let notified = self.queues.notify.notified();
            let now = self.clock.now();
            let mut ops = Vec::new();
            let mut events = Vec::new();
            let (taken, next_due) = {
                let mut s = lock(&self.queues);
                s.expire(now, &mut ops, &mut events);
                let mut taken = Vec::new();
                let mut next_due = None;
                if let Some(ready) = s.ready.get_mut(queue) {
                    while taken.len() < max_items {
                        match ready.first() {
                            Some(&(due, id)) if due <= now.as_nanos() => {
                                ready.pop_first();
                                taken.push((due, id));
                            }
                            Some(&(due, _)) => {
                                next_due = Some(Time::from_nanos(due));
                                break;
                            }
                            None => break,
                        }
                    }
                }
                (taken, next_due)
            };
            let pending = self.queue_write(ops);
            self.publish_queue_events(now, events);
            // From here until they are leased, the taken items are in no list:
            // the guard puts back whatever is left if this call errors or its
            // client goes away (the future is dropped), so nothing is lost.
            let mut guard = Taken {
                queues: &self.queues,
                queue,
                items: taken.into_iter().collect(),
            };
            pending
                .wait()
                .await
                .map_err(|e| EngineError::Unavailable(e.to_string()))?;

            let mut result = ClaimResult::default();
            let mut ops = Vec::new();
            let mut events = Vec::new();
            while let Some(&(due, id)) = guard.items.front() {
                let need = lock(&self.queues)
                    .items
                    .get(&id)
                    .map(|e| {
                        (
                            e.rec.estimated_tokens,
                            e.rec.required_context_tokens,
                            e.rec.attempt,
                        )
                    })
                    .unwrap_or_default();
                let admitted = self.admit_for_queue(queue, worker, need).await?;
                let now = self.clock.now();
                let mut s = lock(&self.queues);
                guard.items.pop_front();
                match admitted {
                    Ok((target, permit, key_slot)) => {
                        // Leased at once: from now on a lost answer is a lease
                        // that runs out and redelivers, never a lost item.
                        let token: u64 = rand::random();
                        let until = now + lease;
                        let Some(entry) = s.items.get_mut(&id) else {
                            continue;
                        };
                        entry.rec.attempt += 1;
                        entry.lease = Some((token, until));
                        ops.push(Op::Item(id, Some(entry.rec.clone())));
                        result.items.push(Claimed {
                            item: entry.rec.clone(),
                            lease_token: format!("{token:x}"),
                            lease_until: until,
                            target,
                            permit,
                            key_slot,
                        });
                        s.leased.insert((until.as_nanos(), id));
                        let c = counts(&mut s, queue);
                        c.waiting = c.waiting.saturating_sub(1);
                        c.in_flight += 1;
                    }
                    Err((reason, None))
                        if matches!(reason, Reason::RequestTooLarge | Reason::ContextTooSmall) =>
                    {
                        // Can never be admitted: dead-letter it rather than let it block the queue.
                        let why = format!("can never be admitted: {}", reason.as_str());
                        let c = counts(&mut s, queue);
                        c.waiting = c.waiting.saturating_sub(1);
                        s.dead_letter(id, now, &why, &mut ops, &mut events);
                    }
                    Err(blocked) => {
                        result.blocked = Some(blocked);
                        s.ready
                            .entry(queue.to_string())
                            .or_default()
                            .insert((due, id));
                        break;
                    }
                }
            }
            drop(guard);
            // Attempts are durable before the items are handed out.
            self.queue_write(ops)
                .wait()
                .await
                .map_err(|e| EngineError::Unavailable(e.to_string()))?;
            self.publish_queue_events(self.clock.now(), events);
            if !result.items.is_empty() {
                return Ok(result);
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            // A draining server answers long polls at once (with nothing), so
            // a pending Claim never holds up shutdown for the grace period.
            if remaining.is_zero() || *shutdown.borrow() {
                return Ok(result);
            }
            // Sleep until something may change: new work, the next due item,
            // the target becoming admissible, or the deadline.
            let mut sleep_for = remaining;
            if let Some(due) = next_due {
                sleep_for = sleep_for.min(now.until(due).max(Duration::from_millis(1)));
            }
            if let Some((_, Some(after))) = result.blocked {
                sleep_for = sleep_for.min(after.max(Duration::from_millis(5)));
            }
            tokio::select! {
                _ = tokio::time::timeout(sleep_for, notified) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Admits one call for a queue: Route for a route queue, CanProceed for a
    /// target queue. `need` is (estimated tokens, required context, deliveries
    /// so far): a redelivery is a retry and draws on the retry budget.
    #[allow(clippy::type_complexity)]
    async fn admit_for_queue(
        &self,
        queue: &str,
        worker: &str,
        need: (u64, u64, u32),
    ) -> Result<std::result::Result<(Arc<str>, String, Option<Arc<str>>), (Reason, Option<Duration>)>>
    {
        if self.config.routes.contains_key(queue) {
            let (estimated_tokens, required_context_tokens, attempt) = need;
            let d = self
                .route(RouteQuery {
                    route: queue,
                    caller: worker,
                    estimated_tokens,
                    required_context_tokens,
                    attempt,
                    ..Default::default()
                })
                .await?;
            return Ok(match d.chosen {
                Some((target, adm, _)) => Ok((target, adm.token, adm.key_slot)),
                // Blocked: report the candidate that frees up soonest.
                None => Err((
                    d.skipped
                        .iter()
                        .find(|s| s.retry_after.is_some() && s.retry_after == d.retry_after)
                        .or(d.skipped.first())
                        .map_or(Reason::CircuitOpen, |s| s.reason),
                    d.retry_after,
                )),
            });
        }
        let adm = self
            .can_proceed(
                queue,
                AdmitArgs {
                    caller: worker,
                    estimated_tokens: need.0,
                    attempt: need.2,
                },
            )
            .await?;
        Ok(if adm.allowed {
            Ok((Arc::from(queue), adm.token, adm.key_slot))
        } else {
            Err((adm.reason, adm.retry_after))
        })
    }

    /// Finds a claimed item and checks its lease token.
    fn leased_entry(s: &mut QueueState, id: u64, token: u64, now: Time) -> Result<&mut Entry> {
        if s.dead.contains_key(&id) {
            return Err(EngineError::FailedPrecondition(format!(
                "item {id} is in the dead-letter list; Requeue it first"
            )));
        }
        let entry = s.items.get_mut(&id).ok_or_else(|| {
            EngineError::NotFound(format!(
                "no deferred item {id} (already acked, or never existed)"
            ))
        })?;
        match entry.lease {
            Some((t, until)) if t == token && until > now => Ok(entry),
            Some((t, _)) if t == token => Err(EngineError::FailedPrecondition(format!(
                "the lease on item {id} expired; it is being redelivered to another worker"
            ))),
            _ => Err(EngineError::FailedPrecondition(format!(
                "stale lease token for item {id}: its lease expired and it was redelivered, or it is not claimed"
            ))),
        }
    }

    /// Done: deletes the item (durably).
    pub async fn ack(&self, id: &str, token: &str) -> Result<()> {
        let id = parse_id(id)?;
        let token = parse_token(token)?;
        let now = self.clock.now();
        let (queue, pending) = {
            let mut s = lock(&self.queues);
            let mut ops = Vec::new();
            let mut events = Vec::new();
            s.expire(now, &mut ops, &mut events);
            self.publish_queue_events(now, events);
            let entry = Self::leased_entry(&mut s, id, token, now)?;
            let until = entry.lease.map_or(0, |(_, u)| u.as_nanos());
            let rec = s.items.remove(&id).map(|e| e.rec).unwrap_or_default();
            s.leased.remove(&(until, id));
            let c = counts(&mut s, &rec.queue);
            c.in_flight = c.in_flight.saturating_sub(1);
            s.release_payload(&rec.queue, item_bytes(&rec));
            ops.push(Op::Item(id, None));
            if !rec.idempotency_key.is_empty() {
                // Remember the key for a while, so a retried Defer is still a duplicate.
                let expires_at = (now + self.config.queue.idempotency_ttl).as_nanos();
                let key = idem_key(&rec.queue, &rec.idempotency_key);
                s.idem.insert(
                    key.clone(),
                    IdemEntry {
                        id,
                        expires_at,
                        seq: 0,
                    },
                );
                s.idem_expiry.insert((expires_at, key.clone()));
                ops.push(Op::Idem(key, Some(IdemRecord { id, expires_at })));
            }
            s.purge_idem(now, &mut ops);
            (rec.queue, self.queue_write(ops))
        };
        pending
            .wait()
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        self.metrics.drained(&queue);
        self.events.publish(
            now,
            &Arc::from(queue.as_str()),
            EventKind::ItemDrained {
                queue: Arc::from(queue.as_str()),
                id,
            },
        );
        Ok(())
    }

    /// Not done: back to the queue after `delay`, or to the dead letters after the last attempt.
    /// Returns (dead_lettered, attempt).
    pub async fn nack(
        &self,
        id: &str,
        token: &str,
        delay: Duration,
        reason: &str,
    ) -> Result<(bool, u32)> {
        let id = parse_id(id)?;
        let token = parse_token(token)?;
        if reason.len() > 1024 {
            return Err(invalid("reason is longer than 1024 bytes"));
        }
        if delay > Duration::from_secs(24 * 3600) {
            return Err(invalid("delay is longer than 24h"));
        }
        let now = self.clock.now();
        let mut events = Vec::new();
        let (out, pending) = {
            let mut s = lock(&self.queues);
            let mut ops = Vec::new();
            s.expire(now, &mut ops, &mut events);
            let entry = Self::leased_entry(&mut s, id, token, now)?;
            let until = entry.lease.map_or(0, |(_, u)| u.as_nanos());
            entry.lease = None;
            entry.rec.last_error = reason.to_string();
            let attempt = entry.rec.attempt;
            let queue = entry.rec.queue.clone();
            s.leased.remove(&(until, id));
            let c = counts(&mut s, &queue);
            c.in_flight = c.in_flight.saturating_sub(1);
            let dead = attempt >= s.items.get(&id).map_or(0, |e| e.rec.max_attempts);
            if dead {
                s.dead_letter(id, now, reason, &mut ops, &mut events);
            } else {
                let due = (now + delay).as_nanos();
                if let Some(e) = s.items.get_mut(&id) {
                    e.rec.due = due;
                    ops.push(Op::Item(id, Some(e.rec.clone())));
                }
                counts(&mut s, &queue).waiting += 1;
                s.ready.entry(queue).or_default().insert((due, id));
            }
            ((dead, attempt), self.queue_write(ops))
        };
        pending
            .wait()
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        self.publish_queue_events(now, events);
        self.queues.notify.notify_waiters();
        Ok(out)
    }

    /// Dead letters, by id, optionally of one queue.
    pub fn list_dead_letters(
        &self,
        queue: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<ItemRecord>, String)> {
        let size = match page_size {
            0 => 100,
            n if n > 1000 => {
                return Err(invalid(format!(
                    "page_size {n} is above the maximum of 1000"
                )));
            }
            n => n as usize,
        };
        let after = if page_token.is_empty() {
            0
        } else {
            parse_id(page_token)?
        };
        let s = lock(&self.queues);
        let mut items: Vec<ItemRecord> = s
            .dead
            .range(after + 1..)
            .filter(|(_, r)| queue.is_empty() || r.queue == queue)
            .take(size + 1)
            .map(|(_, r)| r.clone())
            .collect();
        let next = if items.len() > size {
            items.truncate(size);
            items.last().map(|r| r.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((items, next))
    }

    /// Moves a dead letter back to its queue with a fresh attempt count.
    pub async fn requeue(&self, id: &str) -> Result<()> {
        let id = parse_id(id)?;
        let now = self.clock.now();
        let pending = {
            let mut s = lock(&self.queues);
            let Some(rec) = s.dead.get(&id) else {
                return Err(EngineError::NotFound(format!(
                    "item {id} is not in the dead-letter list"
                )));
            };
            let queue = rec.queue.clone();
            let c = s.counts.get(&queue).copied().unwrap_or_default();
            if (c.waiting + c.in_flight) as usize >= self.config.queue.max_depth {
                return Err(EngineError::ResourceExhausted(format!(
                    "queue {queue:?} is at its limit of {} items ([queue] max_depth)",
                    self.config.queue.max_depth
                )));
            }
            let mut rec = s.dead.remove(&id).unwrap_or_default();
            rec.attempt = 0;
            rec.dead_lettered_at = 0;
            rec.due = now.as_nanos();
            let c = counts(&mut s, &queue);
            c.dead = c.dead.saturating_sub(1);
            c.waiting += 1;
            s.ready.entry(queue).or_default().insert((rec.due, id));
            let ops = vec![Op::Dead(id, None), Op::Item(id, Some(rec.clone()))];
            s.items.insert(id, Entry { rec, lease: None });
            self.queue_write(ops)
        };
        pending
            .wait()
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))?;
        self.queues.notify.notify_waiters();
        Ok(())
    }

    /// Depth, in flight, dead letters, oldest age and bytes per queue.
    pub fn queue_stats(&self, queue: &str) -> Vec<QueueStat> {
        let now = self.clock.now();
        let mut s = lock(&self.queues);
        let mut ops = Vec::new();
        let mut events = Vec::new();
        if s.expire(now, &mut ops, &mut events) {
            self.publish_queue_events(now, events);
            // Write-behind: expiry only moved items between in-memory lists.
            if let Some(p) = self.persister() {
                p.write_behind(ops);
            }
        }
        let mut oldest: HashMap<&str, u64> = HashMap::new();
        for e in s.items.values() {
            let o = oldest.entry(e.rec.queue.as_str()).or_insert(u64::MAX);
            *o = (*o).min(e.rec.enqueued_at);
        }
        let mut out: Vec<QueueStat> = s
            .counts
            .iter()
            .filter(|(q, _)| queue.is_empty() || q.as_str() == queue)
            .map(|(q, c)| QueueStat {
                queue: q.clone(),
                depth: c.waiting,
                in_flight: c.in_flight,
                dead_letters: c.dead,
                oldest_age: oldest
                    .get(q.as_str())
                    .map_or(Duration::ZERO, |&t| now.since(Time::from_nanos(t))),
                bytes: c.bytes,
            })
            .collect();
        out.sort_by(|a, b| a.queue.cmp(&b.queue));
        out
    }
}
