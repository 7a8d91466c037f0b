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

mod state;

pub(crate) use state::QueueState;
pub(crate) use state::{idem_key, item_bytes};

use super::backend::local::persist::{Pending, Persister};
use super::error::{EngineError, Result, invalid};
use super::events::{EventBus, EventKind};
use super::store::{IdemRecord, ItemRecord, Op};
use super::{AdmitArgs, Engine, Reason, RouteQuery, validate_target};
use crate::config::QueueConfig;
use crate::domain::Time;
use crate::domain::budget::Kind;
use crate::engine::clock::Clock;
use crate::metrics::Metrics;
use state::{Entry, IdemEntry, counts};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
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

/// A deferred request, as the API shows it.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Item {
    pub id: u64,
    pub queue: String,
    pub payload: Vec<u8>,
    pub metadata: HashMap<String, String>,
    /// Deliveries so far.
    pub attempt: u32,
    pub max_attempts: u32,
    pub enqueued_at: Time,
    pub last_error: String,
    /// When it moved to the dead letters (dead letters only).
    pub dead_lettered_at: Option<Time>,
    pub estimated_tokens: u64,
    pub required_context_tokens: u64,
}

impl From<&ItemRecord> for Item {
    fn from(r: &ItemRecord) -> Item {
        Item {
            id: r.id,
            queue: r.queue.clone(),
            payload: r.payload.clone(),
            metadata: r.metadata.clone(),
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            enqueued_at: Time::from_nanos(r.enqueued_at),
            last_error: r.last_error.clone(),
            dead_lettered_at: (r.dead_lettered_at != 0)
                .then(|| Time::from_nanos(r.dead_lettered_at)),
            estimated_tokens: r.estimated_tokens,
            required_context_tokens: r.required_context_tokens,
        }
    }
}

/// A claimed item, admitted and leased.
#[derive(Clone, Debug, PartialEq)]
pub struct Claimed {
    pub item: Item,
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

/// Where a queue's items go when claimed: the queue needs admission (the
/// engine's Route or CanProceed) without knowing how it is decided.
/// Who claims deferred items, and at what priority their deliveries are
/// admitted (a background drain claims as `batch`, so replaying deferred
/// work never eats into what a budget holds back for interactive calls).
#[derive(Clone, Copy, Debug, Default)]
pub struct Worker<'a> {
    pub name: &'a str,
    pub priority: crate::domain::budget::Priority,
}

pub trait Admitter: Sync {
    /// `queue` names a configured route or a valid target.
    fn check_queue(&self, queue: &str) -> Result<()>;
    /// A target queue's target exists (created within `max_targets`).
    fn ensure_queue_target(&self, queue: &str) -> Result<()>;
    /// Why a request could never be delivered from `queue`, if so.
    fn never_deliverable(&self, queue: &str, estimated: u64, context: u64) -> Option<String>;
    /// The `[tenants.<name>] max_queue_bytes` that `queue` falls under, if
    /// any: (the tenant, its prefix, the cap).
    fn tenant_queue_cap(&self, queue: &str) -> Option<TenantCap> {
        let _ = queue;
        None
    }
    /// Admits one delivery: (target, signed permit, key slot), or why not and
    /// when to ask again. `need` is (estimated tokens, required context,
    /// deliveries so far): a redelivery is a retry.
    #[allow(clippy::type_complexity)]
    fn admit_for_queue(
        &self,
        queue: &str,
        worker: Worker<'_>,
        need: (u64, u64, u32),
    ) -> impl Future<
        Output = Result<
            std::result::Result<(Arc<str>, String, Option<Arc<str>>), (Reason, Option<Duration>)>,
        >,
    > + Send;
}

/// The deferred-request queue: its index (one mutex: deferred operations
/// are rare next to decisions), the wake-up signal for long polls, and where
/// it writes (the embedded store's writer).
pub struct DeferredQueue {
    /// `[queue]` bounds, replaced by a config reload.
    limits: arc_swap::ArcSwap<QueueConfig>,
    clock: Arc<dyn Clock>,
    state: Mutex<QueueState>,
    notify: tokio::sync::Notify,
    persister: Option<Arc<Persister>>,
    events: Arc<EventBus>,
    metrics: Arc<Metrics>,
    /// True once the server drains: long polls answer at once.
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl DeferredQueue {
    /// Queues every item, dead letter, idempotency key and the id counter
    /// for writing again (recovery after a failed commit, see `persist.rs`).
    /// Writes what memory holds; a removal that was lost in the failure
    /// stays on disk, which after a crash means one redelivery, never a loss.
    pub(crate) fn rewrite_all(&self) {
        let Some(p) = &self.persister else { return };
        let ops = {
            let s = self.lock();
            let mut ops = Vec::with_capacity(s.items.len() + s.dead.len() + s.idem.len() + 1);
            ops.extend(
                s.items
                    .iter()
                    .map(|(id, e)| Op::Item(*id, Some(e.rec.clone()))),
            );
            ops.extend(
                s.dead
                    .iter()
                    .map(|(id, rec)| Op::Dead(*id, Some(rec.clone()))),
            );
            ops.extend(s.idem.iter().map(|(k, e)| {
                Op::Idem(
                    k.clone(),
                    Some(IdemRecord {
                        id: e.id,
                        expires_at: e.expires_at,
                    }),
                )
            }));
            ops.push(Op::NextItemId(s.next_id));
            ops
        };
        p.write_behind(ops);
    }

    /// New `[queue]` bounds (a config reload): they apply to the next
    /// Defer; items already held stay, even past a lowered depth.
    pub(crate) fn set_limits(&self, limits: QueueConfig) {
        self.limits.store(Arc::new(limits));
    }

    pub(crate) fn new(
        limits: QueueConfig,
        clock: Arc<dyn Clock>,
        state: QueueState,
        persister: Option<Arc<Persister>>,
        events: Arc<EventBus>,
        metrics: Arc<Metrics>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> DeferredQueue {
        DeferredQueue {
            limits: arc_swap::ArcSwap::from_pointee(limits),
            clock,
            state: Mutex::new(state),
            notify: tokio::sync::Notify::new(),
            persister,
            events,
            metrics,
            shutdown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Items taken off the ready list by a Claim and not yet leased; whatever is
/// left when this is dropped goes back to the queue.
struct Taken<'a> {
    queue_of: &'a DeferredQueue,
    queue: &'a str,
    items: std::collections::VecDeque<(u64, u64)>,
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if self.items.is_empty() {
            return;
        }
        let mut s = self.queue_of.lock();
        let ready = s.ready.entry(self.queue.to_string()).or_default();
        for item in self.items.drain(..) {
            ready.insert(item);
        }
        drop(s);
        self.queue_of.notify.notify_waiters();
    }
}

/// Checks a Defer against the API's and `[queue]`'s limits and makes sure
/// its queue can ever deliver it (shared by the embedded and Redis queues).
pub(crate) fn check_defer(limits: &QueueConfig, adm: &impl Admitter, a: &DeferArgs) -> Result<()> {
    adm.check_queue(&a.queue)?;
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
        adm.never_deliverable(&a.queue, a.estimated_tokens, a.required_context_tokens)
    {
        return Err(invalid(why));
    }
    // A target queue's target must exist to ever be claimed: created now,
    // so a server at max_targets refuses the Defer instead of accepting
    // an item that no Claim could ever hand out.
    adm.ensure_queue_target(&a.queue)
}

pub(crate) fn too_many_queues(limits: &QueueConfig) -> EngineError {
    EngineError::ResourceExhausted(format!(
        "{} deferred queues exist already ([queue] max_queues); use an existing route or target as the queue",
        limits.max_queues
    ))
}

pub(crate) fn queue_full(limits: &QueueConfig, queue: &str, held: u64) -> EngineError {
    EngineError::ResourceExhausted(format!(
        "queue {queue:?} already holds {held} items, its limit ([queue] max_depth = {}); drain it or raise the limit",
        limits.max_depth
    ))
}

pub(crate) fn too_many_items(held: u64) -> EngineError {
    EngineError::ResourceExhausted(format!(
        "deferred queues hold {held} items including dead letters, the limit ([queue] max_items); drain them, or Requeue / clear dead letters"
    ))
}

/// A tenant's cap on the payload bytes its queues hold.
#[derive(Clone, Debug)]
pub struct TenantCap {
    pub tenant: Arc<str>,
    pub prefix: Arc<str>,
    pub max_bytes: u64,
}

/// Bytes the tenant's queues hold, from per-queue counts (at most
/// `max_queues` of them: Defer is not the decision hot path).
fn tenant_bytes(s: &QueueState, cap: &TenantCap) -> u64 {
    s.counts
        .iter()
        .filter(|(q, _)| q.starts_with(cap.prefix.as_ref()))
        .map(|(_, c)| c.bytes)
        .sum()
}

pub(crate) fn tenant_full(cap: &TenantCap, held: u64, more: u64) -> EngineError {
    EngineError::ResourceExhausted(format!(
        "tenant {:?}'s queues hold {held} bytes; accepting {more} more would pass its limit of {} ([tenants.{}] max_queue_bytes); ack or drain its queues first",
        cap.tenant.as_ref(),
        cap.max_bytes,
        cap.tenant.as_ref()
    ))
}

pub(crate) fn too_many_bytes(limits: &QueueConfig, total: u64, more: u64) -> EngineError {
    EngineError::ResourceExhausted(format!(
        "deferred queues hold {total} bytes; accepting {more} more would pass the limit of {} ([queue] max_total_bytes)",
        limits.max_total_bytes
    ))
}

/// A new item's record (id 0: the queue assigns it).
pub(crate) fn new_record(limits: &QueueConfig, a: &mut DeferArgs, now: Time) -> ItemRecord {
    ItemRecord {
        id: 0,
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
    }
}

/// Claim's parameters, checked: (max items, lease, long-poll wait).
pub(crate) fn claim_params(
    max_items: u32,
    lease: Option<Duration>,
    wait: Option<Duration>,
) -> Result<(usize, Duration, Duration)> {
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
    Ok((max_items, lease, wait))
}

/// Nack's parameters, checked.
pub(crate) fn check_nack(delay: Duration, reason: &str) -> Result<()> {
    if reason.len() > 1024 {
        return Err(invalid("reason is longer than 1024 bytes"));
    }
    if delay > Duration::from_secs(24 * 3600) {
        return Err(invalid("delay is longer than 24h"));
    }
    Ok(())
}

/// ListDeadLetters' paging: (page size, the last id of the previous page).
pub(crate) fn page_params(page_size: u32, page_token: &str) -> Result<(usize, u64)> {
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
    Ok((size, after))
}

/// A dead-lettered item can be neither acked nor nacked.
pub(crate) fn dead_letter_error(id: u64) -> EngineError {
    EngineError::FailedPrecondition(format!(
        "item {id} is in the dead-letter list; Requeue it first"
    ))
}

pub(crate) fn no_item_error(id: u64) -> EngineError {
    EngineError::NotFound(format!(
        "no deferred item {id} (already acked, or never existed)"
    ))
}

pub(crate) fn lease_expired_error(id: u64) -> EngineError {
    EngineError::FailedPrecondition(format!(
        "the lease on item {id} expired; it is being redelivered to another worker"
    ))
}

pub(crate) fn stale_token_error(id: u64) -> EngineError {
    EngineError::FailedPrecondition(format!(
        "stale lease token for item {id}: its lease expired and it was redelivered, or it is not claimed"
    ))
}

pub fn parse_id(id: &str) -> Result<u64> {
    id.parse::<u64>().map_err(|_| {
        invalid(format!(
            "id {id:?} is not an item id (ids are decimal numbers returned by Defer)"
        ))
    })
}

pub(crate) fn parse_token(token: &str) -> Result<u64> {
    u64::from_str_radix(token, 16)
        .map_err(|_| invalid("lease_token does not parse; pass it exactly as Claim returned it"))
}

impl DeferredQueue {
    fn queue_write(&self, ops: Vec<Op>) -> Pending {
        self.queue_write_seq(ops).0
    }

    /// Queues a write of the queue's state; also returns its sequence number.
    fn queue_write_seq(&self, ops: Vec<Op>) -> (Pending, u64) {
        match &self.persister {
            Some(p) if !ops.is_empty() => p.write(ops, Vec::new()),
            _ => (Pending::none(), 0),
        }
    }

    fn committed(&self) -> u64 {
        self.persister.as_ref().map_or(u64::MAX, |p| p.committed())
    }

    fn publish_queue_events(&self, now: Time, events: Vec<(String, EventKind)>) {
        for (queue, kind) in events {
            if let EventKind::ItemDeadLettered { .. } = kind {
                self.metrics.dead_lettered(&queue);
            }
            self.events.publish(now, &Arc::from(queue.as_str()), kind);
        }
    }

    /// Saves a request; returns once it is durable.
    pub async fn defer(&self, adm: &impl Admitter, a: DeferArgs) -> Result<DeferResult> {
        check_defer(&self.limits.load(), adm, &a)?;
        let limits_guard = self.limits.load();
        let limits: &QueueConfig = &limits_guard;
        let now = self.clock.now();
        let mut a = a;
        let tenant_cap = adm.tenant_queue_cap(&a.queue);
        /// What one look at the queue decided.
        enum Step {
            /// A Defer with the same key is still being written: wait for it.
            WaitFor(u64),
            Duplicate(DeferResult, Vec<Op>),
            Added(DeferResult, Pending),
        }
        let (result, pending) = loop {
            let step = {
                let mut s = self.lock();
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
                        return Err(too_many_queues(limits));
                    }
                    let c = c.unwrap_or_default();
                    if (c.waiting + c.in_flight) as usize >= limits.max_depth {
                        return Err(queue_full(limits, &a.queue, c.waiting + c.in_flight));
                    }
                    let held = s.items.len() + s.dead.len();
                    if held >= limits.max_items {
                        return Err(too_many_items(held as u64));
                    }
                    s.next_id += 1;
                    let id = s.next_id;
                    let rec = ItemRecord {
                        id,
                        ..new_record(limits, &mut a, now)
                    };
                    let bytes = item_bytes(&rec);
                    if s.total_bytes + bytes > limits.max_total_bytes {
                        s.next_id -= 1;
                        return Err(too_many_bytes(limits, s.total_bytes, bytes));
                    }
                    if let Some(cap) = &tenant_cap {
                        let held = tenant_bytes(&s, cap);
                        if held + bytes > cap.max_bytes {
                            s.next_id -= 1;
                            return Err(tenant_full(cap, held, bytes));
                        }
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
                    if let Some(p) = &self.persister {
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
            let mut s = self.lock();
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
        self.notify.notify_waiters();
        Ok(result)
    }

    /// Hands out up to `max_items` due items, each admitted to the queue's
    /// route or target; long-polls up to `wait` when there is nothing to hand out.
    pub async fn claim(
        &self,
        adm: &impl Admitter,
        queue: &str,
        max_items: u32,
        lease: Option<Duration>,
        wait: Option<Duration>,
        worker: Worker<'_>,
    ) -> Result<ClaimResult> {
        adm.check_queue(queue)?;
        let (max_items, lease, wait) = claim_params(max_items, lease, wait)?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut shutdown = self.shutdown.clone();
        loop {
            // Subscribe before looking, so a Defer between the look and the wait is not missed.
            let notified = self.notify.notified();
            let now = self.clock.now();
            let mut ops = Vec::new();
            let mut events = Vec::new();
            let (taken, next_due) = {
                let mut s = self.lock();
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
                queue_of: self,
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
                let need = self
                    .lock()
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
                let admitted = adm.admit_for_queue(queue, worker, need).await?;
                let now = self.clock.now();
                let mut s = self.lock();
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
                            item: Item::from(&entry.rec),
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

    /// Finds a claimed item and checks its lease token.
    fn leased_entry(s: &mut QueueState, id: u64, token: u64, now: Time) -> Result<&mut Entry> {
        if s.dead.contains_key(&id) {
            return Err(dead_letter_error(id));
        }
        let entry = s.items.get_mut(&id).ok_or_else(|| no_item_error(id))?;
        match entry.lease {
            Some((t, until)) if t == token && until > now => Ok(entry),
            Some((t, _)) if t == token => Err(lease_expired_error(id)),
            _ => Err(stale_token_error(id)),
        }
    }

    /// Done: deletes the item (durably).
    pub async fn ack(&self, id: &str, token: &str) -> Result<()> {
        let id = parse_id(id)?;
        let token = parse_token(token)?;
        let now = self.clock.now();
        let (queue, pending) = {
            let mut s = self.lock();
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
                let expires_at = (now + self.limits.load().idempotency_ttl).as_nanos();
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
        check_nack(delay, reason)?;
        let now = self.clock.now();
        let mut events = Vec::new();
        let (out, pending) = {
            let mut s = self.lock();
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
        self.notify.notify_waiters();
        Ok(out)
    }

    /// Dead letters, by id, optionally of one queue.
    pub fn list_dead_letters(
        &self,
        queue: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Item>, String)> {
        let (size, after) = page_params(page_size, page_token)?;
        let s = self.lock();
        let mut items: Vec<Item> = s
            .dead
            .range(after + 1..)
            .filter(|(_, r)| queue.is_empty() || r.queue == queue)
            .take(size + 1)
            .map(|(_, r)| Item::from(r))
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
    pub async fn requeue(&self, id: &str, owns: &(dyn Fn(&str) -> bool + Sync)) -> Result<()> {
        let id = parse_id(id)?;
        let now = self.clock.now();
        let pending = {
            let mut s = self.lock();
            let Some(rec) = s.dead.get(&id).filter(|r| owns(&r.queue)) else {
                return Err(EngineError::NotFound(format!(
                    "item {id} is not in the dead-letter list"
                )));
            };
            let queue = rec.queue.clone();
            let c = s.counts.get(&queue).copied().unwrap_or_default();
            if (c.waiting + c.in_flight) as usize >= self.limits.load().max_depth {
                return Err(EngineError::ResourceExhausted(format!(
                    "queue {queue:?} is at its limit of {} items ([queue] max_depth)",
                    self.limits.load().max_depth
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
        self.notify.notify_waiters();
        Ok(())
    }

    /// Up to `max` waiting items, oldest first (a cluster replica's spool:
    /// deferrals it accepted while Redis was unreachable, to be replayed).
    pub(crate) fn spooled(&self, max: usize) -> Vec<ItemRecord> {
        let s = self.lock();
        let mut out: Vec<&ItemRecord> = s
            .items
            .values()
            .filter(|e| e.lease.is_none())
            .map(|e| &e.rec)
            .collect();
        out.sort_by_key(|r| r.id);
        out.into_iter().take(max).cloned().collect()
    }

    /// Deletes a waiting item durably (a spooled deferral now in Redis);
    /// its idempotency key goes with it (Redis remembers it now).
    pub(crate) async fn forget(&self, id: u64) -> Result<()> {
        let pending = {
            let mut s = self.lock();
            let Some(entry) = s.items.remove(&id) else {
                return Ok(());
            };
            let rec = entry.rec;
            if let Some(r) = s.ready.get_mut(&rec.queue) {
                r.remove(&(rec.due, id));
            }
            let c = counts(&mut s, &rec.queue);
            c.waiting = c.waiting.saturating_sub(1);
            s.release_payload(&rec.queue, item_bytes(&rec));
            let mut ops = vec![Op::Item(id, None)];
            if !rec.idempotency_key.is_empty() {
                let key = idem_key(&rec.queue, &rec.idempotency_key);
                s.idem.remove(&key);
                ops.push(Op::Idem(key, None));
            }
            self.queue_write(ops)
        };
        pending
            .wait()
            .await
            .map_err(|e| EngineError::Unavailable(e.to_string()))
    }

    /// Depth, in flight, dead letters, oldest age and bytes per queue.
    pub fn queue_stats(&self, queue: &str) -> Vec<QueueStat> {
        let now = self.clock.now();
        let mut s = self.lock();
        let mut ops = Vec::new();
        let mut events = Vec::new();
        if s.expire(now, &mut ops, &mut events) {
            self.publish_queue_events(now, events);
            // Write-behind: expiry only moved items between in-memory lists.
            if let Some(p) = &self.persister {
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

impl Admitter for Engine {
    fn tenant_queue_cap(&self, queue: &str) -> Option<TenantCap> {
        let c = self.cfg();
        c.tenants.values().find(|t| t.owns(queue)).and_then(|t| {
            t.max_queue_bytes.map(|max_bytes| TenantCap {
                tenant: t.name.clone(),
                prefix: t.prefix.clone(),
                max_bytes,
            })
        })
    }

    fn check_queue(&self, queue: &str) -> Result<()> {
        if self.config().routes.contains_key(queue) {
            return Ok(());
        }
        validate_target(queue).map_err(|_| {
            invalid(format!(
                "queue {queue:?} is neither a configured route nor a valid target name (1..=256 bytes)"
            ))
        })
    }

    fn ensure_queue_target(&self, queue: &str) -> Result<()> {
        if self.config().routes.contains_key(queue) {
            return Ok(());
        }
        self.ensure_target(queue)
    }

    fn never_deliverable(&self, queue: &str, estimated: u64, context: u64) -> Option<String> {
        let c = self.config();
        let candidates: Vec<Arc<str>> = match c.routes.get(queue) {
            Some(r) => r.targets.clone(),
            None => vec![Arc::from(queue)],
        };
        let fits = |name: &Arc<str>| {
            let t = c.target(name);
            let window_ok = context == 0 || t.context_window == 0 || t.context_window >= context;
            let capacity = |b: &crate::domain::budget::BudgetConfig| {
                [Kind::Tokens, Kind::InputTokens]
                    .iter()
                    .filter_map(|k| b.rate(*k))
                    .all(|r| estimated <= r.amount)
            };
            let tokens_ok =
                capacity(&t.budget) && t.groups.iter().all(|&g| capacity(&c.groups[g].budget));
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

    #[allow(clippy::type_complexity)]
    /// Admits one call for a queue: Route for a route queue, CanProceed for a
    /// target queue. `need` is (estimated tokens, required context, deliveries
    /// so far): a redelivery is a retry and draws on the retry budget.
    async fn admit_for_queue(
        &self,
        queue: &str,
        worker: Worker<'_>,
        need: (u64, u64, u32),
    ) -> Result<std::result::Result<(Arc<str>, String, Option<Arc<str>>), (Reason, Option<Duration>)>>
    {
        if self.config().routes.contains_key(queue) {
            let (estimated_tokens, required_context_tokens, attempt) = need;
            let d = self
                .route(RouteQuery {
                    route: queue,
                    caller: worker.name,
                    estimated_tokens,
                    required_context_tokens,
                    attempt,
                    priority: worker.priority,
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
                    caller: worker.name,
                    estimated_tokens: need.0,
                    attempt: need.2,
                    priority: worker.priority,
                    max_output_tokens: 0,
                    spend_scoped: false,
                },
            )
            .await?;
        Ok(if adm.allowed {
            Ok((Arc::from(queue), adm.token, adm.key_slot))
        } else {
            Err((adm.reason, adm.retry_after))
        })
    }
}
