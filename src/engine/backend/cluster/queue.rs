//! The deferred queue in Redis (cluster mode): the same API and promises as
//! the embedded queue (`engine::queue`): due times, leases with tokens, Nack
//! delays, dead letters, idempotency keys scoped per queue and remembered
//! for `idempotency_ttl` after Ack, depth / item / byte bounds; but shared,
//! so a request deferred on one replica is claimed on another, and a replica
//! killed while holding leases loses nothing (its leases run out in Redis
//! and the items are handed out again).
//!
//! Every operation is one Lua script on the queue's keys (all under one hash
//! tag, `{q}`, so they live on one Redis Cluster node: queue operations are
//! rare next to decisions). Per item: its immutable record (payload,
//! metadata, limits) in one hash field, and what changes (attempts, due
//! time, last error, lease token) in small hashes beside it, so a script
//! never has to parse a record. Per queue: a ready set by due time, a leased
//! set by lease expiry, a dead-letter set, and the enqueue times (oldest
//! age).
//!
//! ```text
//! {prefix}:{q}:seq                      item ids (INCR; never reused)
//! {prefix}:{q}:item / att / max / due / err / tok / qof / deadat
//!                                       per item (hash fields by id): record,
//!                                       attempts, max attempts, due (ms), last
//!                                       error, lease token, queue, dead-letter time
//! {prefix}:{q}:ready:<queue>            waiting items by due time (ms)
//! {prefix}:{q}:leased:<queue>           claimed items by lease expiry (ms)
//! {prefix}:{q}:enq:<queue>              live items by enqueue time (oldest age)
//! {prefix}:{q}:dead:<queue>, deadall    dead letters by id
//! {prefix}:{q}:idem, idemx              idempotency keys -> id; acked keys' expiry
//! {prefix}:{q}:cnt                      counts: w:/f:/d:/b:<queue>, items, bytes
//! {prefix}:{q}:queues                   queue names (max_queues)
//! ```
//!
//! A Claim takes due items under a short *provisional* lease, asks the
//! engine to admit each (Route or CanProceed, deciding in Redis like any
//! other call), then leases the admitted ones for the requested time and
//! puts the others back. A replica that dies between the two steps leaves
//! provisional leases that run out within [`PROVISIONAL`], and the items
//! become claimable again, with no attempt counted.

use super::RedisBackend;
use super::link::LinkError;
use crate::config::QueueConfig;
use crate::domain::Time;
use crate::domain::event::EventKind;
use crate::engine::Reason;
use crate::engine::clock::Clock;
use crate::engine::error::{EngineError, Result};
use crate::engine::queue::{
    Admitter, ClaimResult, Claimed, DeferArgs, DeferResult, DeferredQueue, Item, QueueStat,
    check_defer, check_nack, claim_params, dead_letter_error, idem_key, item_bytes,
    lease_expired_error, new_record, no_item_error, page_params, parse_id, parse_token, queue_full,
    stale_token_error, too_many_bytes, too_many_items, too_many_queues,
};
use crate::engine::store::ItemRecord;
use crate::metrics::Metrics;
use prost::Message;
use redis::{Script, Value};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// How long taken items wait for their admission before they return to the
/// queue on their own (if the replica that took them died).
pub const PROVISIONAL: Duration = Duration::from_secs(10);

/// How often a long-polling Claim looks at Redis when nothing wakes it (a
/// Defer on this replica or one seen on the event stream wakes it at once).
const POLL: Duration = Duration::from_millis(500);

/// The common part of every queue script: key names (the same layout for
/// every script, for queue `ARGV[1]` at time `ARGV[2]` in ms), counting,
/// dead-lettering, lease expiry and idempotency-key expiry.
const PRELUDE: &str = r#"
local K_seq, K_item, K_att, K_max, K_due, K_err, K_tok, K_qof, K_deadat,
      K_ready, K_leased, K_enq, K_dead, K_deadall, K_idem, K_idemx, K_cnt, K_queues = unpack(KEYS)
local Q = ARGV[1]
local NOW = tonumber(ARGV[2])
local function cnt(kind, by) return redis.call('HINCRBY', K_cnt, kind .. ':' .. Q, by) end
local function get(kind) return tonumber(redis.call('HGET', K_cnt, kind .. ':' .. Q) or '0') end
local function bury(id, why)
  redis.call('ZADD', K_dead, id, id)
  redis.call('ZADD', K_deadall, id, id)
  redis.call('HSET', K_deadat, id, NOW)
  redis.call('HSET', K_err, id, why)
  redis.call('ZREM', K_enq, id)
  cnt('d', 1)
end
local function expire(out)
  local ids = redis.call('ZRANGEBYSCORE', K_leased, '-inf', NOW)
  for _, id in ipairs(ids) do
    redis.call('ZREM', K_leased, id)
    redis.call('HDEL', K_tok, id)
    cnt('f', -1)
    local att = tonumber(redis.call('HGET', K_att, id) or '0')
    local max = tonumber(redis.call('HGET', K_max, id) or '1')
    if att >= max then
      bury(id, 'lease expired without Ack or Nack on the last attempt')
      out[#out + 1] = id
      out[#out + 1] = att
    else
      redis.call('HSET', K_err, id, 'lease expired without Ack or Nack')
      redis.call('ZADD', K_ready, redis.call('HGET', K_due, id) or NOW, id)
      cnt('w', 1)
    end
  end
end
local function purge_idem()
  local keys = redis.call('ZRANGEBYSCORE', K_idemx, '-inf', NOW)
  for _, k in ipairs(keys) do redis.call('HDEL', K_idem, k) end
  if #keys > 0 then redis.call('ZREMRANGEBYSCORE', K_idemx, '-inf', NOW) end
end
-- The lease check shared by Ack and Nack: 0 = held, else an error code.
local function held(id, token)
  if redis.call('ZSCORE', K_deadall, id) then return -1 end
  if redis.call('HEXISTS', K_item, id) == 0 then return -2 end
  if redis.call('HGET', K_tok, id) ~= token then return -3 end
  local until_ = redis.call('ZSCORE', K_leased, id)
  if not until_ or tonumber(until_) <= NOW then return -4 end
  return 0
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// ARGV: Q, now, scoped key ('' = none), record, due, enqueued, max attempts,
/// bytes, max_queues, max_depth, max_items, max_total_bytes,
/// tenant prefix, tenant max bytes (0 = no tenant cap)
/// -> {0, id, depth} added; {1, id, depth} duplicate; {-1..-5, n} a limit.
static DEFER: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
purge_idem()
local scoped = ARGV[3]
local depth = get('w') + get('f')
if scoped ~= '' then
  local id = redis.call('HGET', K_idem, scoped)
  if id then return {1, tonumber(id), depth} end
end
if redis.call('SISMEMBER', K_queues, Q) == 0
   and redis.call('SCARD', K_queues) >= tonumber(ARGV[9]) then return {-1, 0} end
if depth >= tonumber(ARGV[10]) then return {-2, depth} end
local items = tonumber(redis.call('HGET', K_cnt, 'items') or '0')
if items >= tonumber(ARGV[11]) then return {-3, items} end
local bytes = tonumber(redis.call('HGET', K_cnt, 'bytes') or '0')
local b = tonumber(ARGV[8])
if bytes + b > tonumber(ARGV[12]) then return {-4, bytes} end
local tmax = tonumber(ARGV[14] or '0')
if tmax > 0 then
  -- The tenant's queues: a scan of the queue set (at most max_queues).
  local tp = ARGV[13]
  local held = 0
  for _, q in ipairs(redis.call('SMEMBERS', K_queues)) do
    if string.sub(q, 1, #tp) == tp then
      held = held + tonumber(redis.call('HGET', K_cnt, 'b:' .. q) or '0')
    end
  end
  if held + b > tmax then return {-5, held} end
end
local id = redis.call('INCR', K_seq)
redis.call('HSET', K_item, id, ARGV[4])
redis.call('HSET', K_att, id, 0)
redis.call('HSET', K_max, id, ARGV[7])
redis.call('HSET', K_due, id, ARGV[5])
redis.call('HSET', K_qof, id, Q)
redis.call('ZADD', K_ready, ARGV[5], id)
redis.call('ZADD', K_enq, ARGV[6], id)
cnt('w', 1)
cnt('b', b)
redis.call('HINCRBY', K_cnt, 'items', 1)
redis.call('HINCRBY', K_cnt, 'bytes', b)
redis.call('SADD', K_queues, Q)
if scoped ~= '' then redis.call('HSET', K_idem, scoped, id) end
return {0, id, depth + 1}
"#,
    )
});

/// ARGV: Q, now, max, provisional until, token
/// -> {n dead, (id, attempts)..., n taken, (id, record, attempts, due, error)..., next due or ''}
static TAKE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local dead = {}
expire(dead)
local out = {#dead / 2}
for _, x in ipairs(dead) do out[#out + 1] = x end
local ids = redis.call('ZRANGEBYSCORE', K_ready, '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[3]))
out[#out + 1] = #ids
for _, id in ipairs(ids) do
  redis.call('ZREM', K_ready, id)
  redis.call('ZADD', K_leased, ARGV[4], id)
  redis.call('HSET', K_tok, id, ARGV[5])
  cnt('w', -1)
  cnt('f', 1)
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', K_item, id) or ''
  out[#out + 1] = redis.call('HGET', K_att, id) or '0'
  out[#out + 1] = redis.call('HGET', K_due, id) or '0'
  out[#out + 1] = redis.call('HGET', K_err, id) or ''
end
local nxt = redis.call('ZRANGE', K_ready, 0, 0, 'WITHSCORES')
out[#out + 1] = nxt[2] or ''
return out
"#,
    )
});

/// ARGV: Q, now, id, token, lease until -> the attempt number, or -1 if the
/// provisional lease was lost (it ran out and another Claim took the item).
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id = ARGV[3]
if redis.call('HGET', K_tok, id) ~= ARGV[4] then return -1 end
redis.call('ZADD', K_leased, ARGV[5], id)
return redis.call('HINCRBY', K_att, id, 1)
"#,
    )
});

/// ARGV: Q, now, id, token, why ('' = back to the queue, else dead-letter
/// with this reason) -> 1 done, 0 not held any more.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id = ARGV[3]
if redis.call('HGET', K_tok, id) ~= ARGV[4] then return 0 end
redis.call('ZREM', K_leased, id)
redis.call('HDEL', K_tok, id)
cnt('f', -1)
if ARGV[5] == '' then
  redis.call('ZADD', K_ready, redis.call('HGET', K_due, id) or NOW, id)
  cnt('w', 1)
else
  bury(id, ARGV[5])
end
return 1
"#,
    )
});

/// ARGV: Q, now, id, token, idempotency ttl ms, scoped key, bytes
/// -> {0} acked, {code} (see `held`).
static ACK: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id = ARGV[3]
local h = held(id, ARGV[4])
if h ~= 0 then return {h} end
redis.call('ZREM', K_leased, id)
redis.call('ZREM', K_enq, id)
for _, k in ipairs({K_item, K_att, K_max, K_due, K_err, K_tok, K_qof}) do redis.call('HDEL', k, id) end
local b = tonumber(ARGV[7])
cnt('f', -1)
cnt('b', -b)
redis.call('HINCRBY', K_cnt, 'items', -1)
redis.call('HINCRBY', K_cnt, 'bytes', -b)
purge_idem()
if ARGV[6] ~= '' then
  redis.call('HSET', K_idem, ARGV[6], id)
  redis.call('ZADD', K_idemx, NOW + tonumber(ARGV[5]), ARGV[6])
end
return {0}
"#,
    )
});

/// ARGV: Q, now, id, token, delay ms, reason
/// -> {0, attempt} back in the queue, {1, attempt} dead-lettered, {code}.
static NACK: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id = ARGV[3]
local h = held(id, ARGV[4])
if h ~= 0 then return {h} end
redis.call('ZREM', K_leased, id)
redis.call('HDEL', K_tok, id)
cnt('f', -1)
local att = tonumber(redis.call('HGET', K_att, id) or '0')
local max = tonumber(redis.call('HGET', K_max, id) or '1')
if att >= max then
  bury(id, ARGV[6])
  return {1, att}
end
redis.call('HSET', K_err, id, ARGV[6])
local due = NOW + tonumber(ARGV[5])
redis.call('HSET', K_due, id, due)
redis.call('ZADD', K_ready, due, id)
cnt('w', 1)
return {0, att}
"#,
    )
});

/// ARGV: Q, now, id, max_depth, enqueued ms -> {0} | {-1} not dead | {-2, depth}.
static REQUEUE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id = ARGV[3]
if not redis.call('ZSCORE', K_deadall, id) then return {-1} end
local depth = get('w') + get('f')
if depth >= tonumber(ARGV[4]) then return {-2, depth} end
redis.call('ZREM', K_dead, id)
redis.call('ZREM', K_deadall, id)
redis.call('HDEL', K_deadat, id)
redis.call('HSET', K_att, id, 0)
redis.call('HSET', K_due, id, NOW)
redis.call('ZADD', K_ready, NOW, id)
redis.call('ZADD', K_enq, ARGV[5], id)
cnt('d', -1)
cnt('w', 1)
return {0}
"#,
    )
});

/// ARGV: Q, now -> {n dead, (id, attempts)..., waiting, in flight, dead, bytes, oldest enqueued ms or ''}
static STATS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local dead = {}
expire(dead)
local out = {#dead / 2}
for _, x in ipairs(dead) do out[#out + 1] = x end
out[#out + 1] = get('w')
out[#out + 1] = get('f')
out[#out + 1] = get('d')
out[#out + 1] = get('b')
local o = redis.call('ZRANGE', K_enq, 0, 0, 'WITHSCORES')
out[#out + 1] = o[2] or ''
return out
"#,
    )
});

/// ARGV: Q ('' = every queue), now, after id, count
/// -> (id, record, attempts, error, dead-lettered ms)...
static DEAD: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local set = K_dead
if Q == '' then set = K_deadall end
local ids = redis.call('ZRANGEBYSCORE', set, '(' .. ARGV[3], '+inf', 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', K_item, id) or ''
  out[#out + 1] = redis.call('HGET', K_att, id) or '0'
  out[#out + 1] = redis.call('HGET', K_err, id) or ''
  out[#out + 1] = redis.call('HGET', K_deadat, id) or '0'
end
return out
"#,
    )
});

/// Key names of the queue subsystem (one hash tag).
struct QueueKeys {
    base: String,
}

impl QueueKeys {
    /// Every script's KEYS, for `queue` (see PRELUDE for the order).
    fn for_queue(&self, queue: &str) -> Vec<String> {
        let b = &self.base;
        vec![
            format!("{b}:seq"),
            format!("{b}:item"),
            format!("{b}:att"),
            format!("{b}:max"),
            format!("{b}:due"),
            format!("{b}:err"),
            format!("{b}:tok"),
            format!("{b}:qof"),
            format!("{b}:deadat"),
            format!("{b}:ready:{queue}"),
            format!("{b}:leased:{queue}"),
            format!("{b}:enq:{queue}"),
            format!("{b}:dead:{queue}"),
            format!("{b}:deadall"),
            format!("{b}:idem"),
            format!("{b}:idemx"),
            format!("{b}:cnt"),
            format!("{b}:queues"),
        ]
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse::<f64>().ok())
            .map_or(0, |f| f as i64),
        Value::SimpleString(s) => s.parse::<f64>().map_or(0, |f| f as i64),
        _ => 0,
    }
}

fn bytes(v: &Value) -> &[u8] {
    match v {
        Value::BulkString(b) => b,
        _ => &[],
    }
}

fn text(v: &Value) -> String {
    String::from_utf8_lossy(bytes(v)).into_owned()
}

fn ms(t: Time) -> u64 {
    t.as_millis()
}

fn from_ms(ms: i64) -> Time {
    Time::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// An item's record as the API shows it, from what the scripts return.
fn item(id: i64, rec: &[u8], attempt: i64, err: String, dead_ms: i64) -> Item {
    let mut r = ItemRecord::decode(rec).unwrap_or_default();
    r.id = u64::try_from(id).unwrap_or(0);
    r.attempt = u32::try_from(attempt).unwrap_or(0);
    r.last_error = err;
    r.dead_lettered_at = from_ms(dead_ms).as_nanos();
    Item::from(&r)
}

/// The deferred queue over Redis.
pub struct RedisQueue {
    backend: RedisBackend,
    keys: QueueKeys,
    /// `[queue]` bounds, replaced by a config reload.
    limits: arc_swap::ArcSwap<QueueConfig>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// The last stats read (the metrics' queue gauges are read from here).
    stats: Mutex<Vec<QueueStat>>,
    /// Deferrals accepted while Redis was unreachable, durable in this
    /// replica's store until replayed into Redis (None with `--ephemeral`).
    spool: Option<DeferredQueue>,
}

/// Spooled deferrals answer with ids in their own range (their Redis id,
/// given at replay, differs; the idempotency key is what stays).
pub const SPOOL_ID_BASE: u64 = 1 << 62;

/// Maps a Redis failure to what the client is told: nothing was changed
/// (or, for a Defer, nothing acknowledged), so retrying is safe.
fn unavailable(e: LinkError) -> EngineError {
    EngineError::Unavailable(format!(
        "the deferred queue is in Redis, which is not answering ({e}); nothing was changed, retry (another replica may reach it)"
    ))
}

impl RedisQueue {
    /// New `[queue]` bounds (a config reload), for this replica's Defers;
    /// the spool follows.
    pub fn set_limits(&self, limits: QueueConfig) {
        if let Some(sp) = &self.spool {
            sp.set_limits(limits.clone());
        }
        self.limits.store(Arc::new(limits));
    }

    pub fn new(
        backend: RedisBackend,
        limits: QueueConfig,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> RedisQueue {
        let keys = QueueKeys {
            base: format!("{}:{{q}}", backend.inner.cluster.key_prefix),
        };
        RedisQueue {
            backend,
            keys,
            limits: arc_swap::ArcSwap::from_pointee(limits),
            clock,
            metrics,
            shutdown,
            stats: Mutex::new(Vec::new()),
            spool: None,
        }
    }

    /// Gives the queue a spool (see [`RedisQueue::replay_spool`]).
    pub fn set_spool(&mut self, spool: DeferredQueue) {
        self.spool = Some(spool);
    }

    /// Runs one queue script for `queue`: `args` after (queue, now).
    async fn run(
        &self,
        s: &'static Script,
        queue: &str,
        now: Time,
        args: Vec<Vec<u8>>,
    ) -> std::result::Result<Value, LinkError> {
        let keys = self.keys.for_queue(queue);
        let queue = queue.to_string();
        let link = &self.backend.inner.link;
        let call = |mut c: super::link::Conn| async move {
            let mut inv = s.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            inv.arg(queue).arg(ms(now));
            for a in &args {
                inv.arg(a.as_slice());
            }
            inv.invoke_async::<Value>(&mut c).await
        };
        // A Defer must answer within redis_timeout (it is spooled when Redis
        // does not answer); the rest of the queue waits for a slow Redis.
        if std::ptr::eq(s, &*DEFER) {
            link.call(call).await
        } else {
            link.call_patient(link.patience(), call).await
        }
    }

    async fn run_list(
        &self,
        s: &'static Script,
        queue: &str,
        now: Time,
        args: Vec<Vec<u8>>,
    ) -> Result<Vec<Value>> {
        match self.run(s, queue, now, args).await.map_err(unavailable)? {
            Value::Array(v) => Ok(v),
            Value::Int(i) => Ok(vec![Value::Int(i)]),
            other => Err(EngineError::Unavailable(format!(
                "unexpected answer from Redis: {other:?}"
            ))),
        }
    }

    /// Waits for `min_replicas_acked` Redis replicas (if set) after a write
    /// that was acknowledged to a client.
    async fn replicated(&self) -> Result<()> {
        self.backend.inner.wait_replicas().await
    }

    fn publish(&self, now: Time, queue: &str, kind: EventKind) {
        if let EventKind::ItemDeadLettered { .. } = kind {
            self.metrics.dead_lettered(queue);
        }
        self.backend.publish(now, &Arc::from(queue), kind);
    }

    /// Publishes the dead letters a script's lease expiry made:
    /// `{n, (id, attempts)...}` from `v[0]`; returns where the rest starts.
    fn publish_expired(&self, now: Time, queue: &str, v: &[Value]) -> usize {
        // Never more pairs than the reply holds (a malformed count must not
        // overflow the index arithmetic below).
        let n = (v.first().map_or(0, int).max(0) as usize).min(v.len() / 2);
        for k in 0..n {
            let (Some(id), Some(att)) = (v.get(1 + 2 * k), v.get(2 + 2 * k)) else {
                break;
            };
            self.publish(
                now,
                queue,
                EventKind::ItemDeadLettered {
                    queue: Arc::from(queue),
                    id: int(id) as u64,
                    reason: "lease expired without Ack or Nack on the last attempt".into(),
                    attempts: int(att) as u32,
                },
            );
        }
        1 + 2 * n
    }

    /// Saves a request; returns once Redis has it (and, with
    /// `min_replicas_acked`, that many Redis replicas). While Redis is
    /// unreachable, into this replica's spool (durable in its store), to be
    /// replayed into Redis with its idempotency key when Redis is back.
    pub async fn defer(&self, adm: &impl Admitter, mut a: DeferArgs) -> Result<DeferResult> {
        check_defer(&self.limits.load(), adm, &a)?;
        let now = self.clock.now();
        let rec = new_record(&self.limits.load(), &mut a, now);
        let scoped = if a.idempotency_key.is_empty() {
            String::new()
        } else {
            idem_key(&a.queue, &a.idempotency_key)
        };
        let cap = adm.tenant_queue_cap(&rec.queue);
        match self.insert(&rec, &scoped, now, cap.as_ref()).await {
            Ok(v) => {
                let r = self.interpret(&v, &rec.queue, item_bytes(&rec), cap.as_ref())?;
                self.replicated().await?;
                self.announce(now, &rec.queue, &r);
                Ok(r)
            }
            Err(e) => match &self.spool {
                Some(spool) => {
                    let args = DeferArgs {
                        queue: rec.queue.clone(),
                        payload: rec.payload,
                        metadata: rec.metadata,
                        idempotency_key: rec.idempotency_key,
                        not_before: Some(Time::from_nanos(rec.due)),
                        max_attempts: rec.max_attempts,
                        estimated_tokens: rec.estimated_tokens,
                        required_context_tokens: rec.required_context_tokens,
                    };
                    let r = spool.defer(adm, args).await?;
                    tracing::warn!(queue = %rec.queue, id = r.id, error = %e, "Redis unreachable: deferral spooled locally until it is back");
                    Ok(DeferResult {
                        id: SPOOL_ID_BASE | r.id,
                        ..r
                    })
                }
                None => Err(unavailable(e)),
            },
        }
    }

    /// Runs DEFER for a record (id 0; Redis assigns it).
    async fn insert(
        &self,
        rec: &ItemRecord,
        scoped: &str,
        now: Time,
        cap: Option<&crate::engine::queue::TenantCap>,
    ) -> std::result::Result<Vec<Value>, LinkError> {
        let l_guard = self.limits.load();
        let l: &QueueConfig = &l_guard;
        let args = vec![
            scoped.as_bytes().to_vec(),
            rec.encode_to_vec(),
            (rec.due / 1_000_000).to_string().into_bytes(),
            (rec.enqueued_at / 1_000_000).to_string().into_bytes(),
            rec.max_attempts.to_string().into_bytes(),
            item_bytes(rec).to_string().into_bytes(),
            l.max_queues.to_string().into_bytes(),
            l.max_depth.to_string().into_bytes(),
            l.max_items.to_string().into_bytes(),
            l.max_total_bytes.to_string().into_bytes(),
            cap.map_or_else(Vec::new, |c| c.prefix.as_bytes().to_vec()),
            cap.map_or(0, |c| c.max_bytes).to_string().into_bytes(),
        ];
        match self.run(&DEFER, &rec.queue, now, args).await? {
            Value::Array(v) => Ok(v),
            other => Err(LinkError::Redis(format!("unexpected answer: {other:?}"))),
        }
    }

    /// DEFER's answer: the item, or which limit refused it.
    fn interpret(
        &self,
        v: &[Value],
        queue: &str,
        b: u64,
        cap: Option<&crate::engine::queue::TenantCap>,
    ) -> Result<DeferResult> {
        let l_guard = self.limits.load();
        let l: &QueueConfig = &l_guard;
        let code = v.first().map_or(0, int);
        let n = v.get(1).map_or(0, int) as u64;
        match code {
            0 | 1 => Ok(DeferResult {
                id: n,
                duplicate: code == 1,
                depth: v.get(2).map_or(0, int) as u64,
            }),
            -1 => Err(too_many_queues(l)),
            -2 => Err(queue_full(l, queue, n)),
            -3 => Err(too_many_items(n)),
            -5 => match cap {
                Some(cap) => Err(crate::engine::queue::tenant_full(cap, n, b)),
                None => Err(too_many_bytes(l, n, b)),
            },
            _ => Err(too_many_bytes(l, n, b)),
        }
    }

    /// Counts and announces a new item (an event every replica sees).
    fn announce(&self, now: Time, queue: &str, r: &DeferResult) {
        if r.duplicate {
            return;
        }
        self.metrics.deferred(queue);
        self.publish(
            now,
            queue,
            EventKind::ItemDeferred {
                queue: Arc::from(queue),
                id: r.id,
                depth: r.depth,
            },
        );
        self.backend.inner.queue_wake.notify_waiters();
    }

    /// Moves spooled deferrals into Redis (oldest first, at most 100 per
    /// call), each with its idempotency key, or one made from this replica's
    /// id and the spool id, so a replay interrupted by a crash is not
    /// duplicated. Returns how many were moved.
    pub async fn replay_spool(&self) -> usize {
        let Some(spool) = &self.spool else {
            return 0;
        };
        if self.backend.inner.link.is_open() {
            return 0;
        }
        let mut moved = 0;
        for mut rec in spool.spooled(100) {
            let spool_id = rec.id;
            if rec.idempotency_key.is_empty() {
                rec.idempotency_key = format!("spool:{}:{spool_id}", self.backend.inner.replica_id);
            }
            let scoped = idem_key(&rec.queue, &rec.idempotency_key);
            rec.id = 0;
            let now = self.clock.now();
            // Accepted already (into the spool): no tenant cap refuses it now.
            let v = match self.insert(&rec, &scoped, now, None).await {
                Ok(v) => v,
                Err(_) => break,
            };
            match self.interpret(&v, &rec.queue, item_bytes(&rec), None) {
                Ok(r) => {
                    if self.replicated().await.is_err() {
                        break;
                    }
                    self.announce(now, &rec.queue, &r);
                    if spool.forget(spool_id).await.is_err() {
                        break;
                    }
                    moved += 1;
                }
                Err(e) => {
                    // A full queue: kept, tried again on the next round.
                    tracing::warn!(queue = %rec.queue, error = %e, "spooled deferral not replayed yet");
                }
            }
        }
        if moved > 0 {
            tracing::info!(moved, "spooled deferrals replayed into Redis");
        }
        moved
    }

    /// Hands out up to `max_items` due items, each admitted to the queue's
    /// route or target; long-polls up to `wait` when there is nothing.
    pub async fn claim(
        &self,
        adm: &impl Admitter,
        queue: &str,
        max_items: u32,
        lease: Option<Duration>,
        wait: Option<Duration>,
        worker: crate::engine::queue::Worker<'_>,
    ) -> Result<ClaimResult> {
        adm.check_queue(queue)?;
        let (max_items, lease, wait) = claim_params(max_items, lease, wait)?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut shutdown = self.shutdown.clone();
        loop {
            let notified = self.backend.inner.queue_wake.notified();
            let now = self.clock.now();
            let token = format!("{:x}", rand::random::<u64>());
            let args = vec![
                max_items.to_string().into_bytes(),
                ms(now + PROVISIONAL.min(lease)).to_string().into_bytes(),
                token.clone().into_bytes(),
            ];
            let v = self.run_list(&TAKE, queue, now, args).await?;
            let mut i = self.publish_expired(now, queue, &v);
            let n = (v.get(i).map_or(0, int).max(0) as usize).min(v.len() / 5);
            i += 1;
            let mut taken = std::collections::VecDeque::new();
            for _ in 0..n {
                let (Some(id), Some(rec), Some(att), Some(due), Some(err)) = (
                    v.get(i),
                    v.get(i + 1),
                    v.get(i + 2),
                    v.get(i + 3),
                    v.get(i + 4),
                ) else {
                    break;
                };
                let it = item(int(id), bytes(rec), int(att), text(err), 0);
                taken.push_back((it, int(due)));
                i += 5;
            }
            let next_due = v
                .get(i)
                .filter(|x| !bytes(x).is_empty())
                .map(|x| from_ms(int(x)));

            let mut result = ClaimResult::default();
            while let Some((it, _due)) = taken.pop_front() {
                let need = (it.estimated_tokens, it.required_context_tokens, it.attempt);
                let admitted = match adm.admit_for_queue(queue, worker, need).await {
                    Ok(a) => a,
                    Err(e) => {
                        self.release_all(
                            queue,
                            &token,
                            std::iter::once(it.id).chain(taken.iter().map(|(t, _)| t.id)),
                        )
                        .await;
                        return Err(e);
                    }
                };
                let now = self.clock.now();
                match admitted {
                    Ok((target, permit, key_slot)) => {
                        let until = now + lease;
                        let args = vec![
                            it.id.to_string().into_bytes(),
                            token.clone().into_bytes(),
                            ms(until).to_string().into_bytes(),
                        ];
                        let attempt = match self.run(&LEASE, queue, now, args).await {
                            Ok(v) => int(&v),
                            Err(e) => {
                                // Unknown whether it was leased: the
                                // provisional lease runs out and returns it.
                                return Err(unavailable(e));
                            }
                        };
                        if attempt < 0 {
                            continue;
                        }
                        let mut item = it;
                        item.attempt = attempt as u32;
                        result.items.push(Claimed {
                            item,
                            lease_token: token.clone(),
                            lease_until: until,
                            target,
                            permit,
                            key_slot,
                        });
                    }
                    Err((reason, None))
                        if matches!(reason, Reason::RequestTooLarge | Reason::ContextTooSmall) =>
                    {
                        let why = format!("can never be admitted: {}", reason.as_str());
                        let args = vec![
                            it.id.to_string().into_bytes(),
                            token.clone().into_bytes(),
                            why.clone().into_bytes(),
                        ];
                        if self
                            .run(&RELEASE, queue, now, args)
                            .await
                            .is_ok_and(|v| int(&v) == 1)
                        {
                            self.publish(
                                now,
                                queue,
                                EventKind::ItemDeadLettered {
                                    queue: Arc::from(queue),
                                    id: it.id,
                                    reason: why,
                                    attempts: it.attempt,
                                },
                            );
                        }
                    }
                    Err(blocked) => {
                        result.blocked = Some(blocked);
                        self.release_all(
                            queue,
                            &token,
                            std::iter::once(it.id).chain(taken.iter().map(|(t, _)| t.id)),
                        )
                        .await;
                        taken.clear();
                        break;
                    }
                }
            }
            if !result.items.is_empty() {
                return Ok(result);
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() || *shutdown.borrow() {
                return Ok(result);
            }
            let now = self.clock.now();
            let mut sleep_for = remaining.min(POLL);
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

    /// Returns taken items to the queue (best effort: if Redis does not
    /// answer, their provisional leases run out and return them).
    async fn release_all(&self, queue: &str, token: &str, ids: impl Iterator<Item = u64>) {
        let now = self.clock.now();
        for id in ids {
            let args = vec![
                id.to_string().into_bytes(),
                token.as_bytes().to_vec(),
                Vec::new(),
            ];
            let _ = self.run(&RELEASE, queue, now, args).await;
        }
    }

    /// The queue an item is in, and its record (None: no such item).
    async fn locate(&self, id: u64) -> Result<Option<(String, ItemRecord)>> {
        let keys = self.keys.for_queue("");
        let (qof, item) = (keys[7].clone(), keys[1].clone());
        let v: Vec<Value> = self
            .backend
            .inner
            .link
            .call(|mut c| async move {
                redis::pipe()
                    .cmd("HGET")
                    .arg(&qof)
                    .arg(id)
                    .cmd("HGET")
                    .arg(&item)
                    .arg(id)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(unavailable)?;
        match (v.first(), v.get(1)) {
            (Some(Value::BulkString(q)), Some(Value::BulkString(r))) => Ok(Some((
                String::from_utf8_lossy(q).into_owned(),
                ItemRecord::decode(r.as_slice()).unwrap_or_default(),
            ))),
            _ => Ok(None),
        }
    }

    fn held_error(code: i64, id: u64) -> EngineError {
        match code {
            -1 => dead_letter_error(id),
            -2 => no_item_error(id),
            -4 => lease_expired_error(id),
            _ => stale_token_error(id),
        }
    }

    /// Done: deletes the item.
    pub async fn ack(&self, id: &str, token: &str) -> Result<()> {
        let id = parse_id(id)?;
        parse_token(token)?;
        let Some((queue, rec)) = self.locate(id).await? else {
            return Err(no_item_error(id));
        };
        let now = self.clock.now();
        let scoped = if rec.idempotency_key.is_empty() {
            String::new()
        } else {
            idem_key(&queue, &rec.idempotency_key)
        };
        let args = vec![
            id.to_string().into_bytes(),
            token.as_bytes().to_vec(),
            self.limits
                .load()
                .idempotency_ttl
                .as_millis()
                .to_string()
                .into_bytes(),
            scoped.into_bytes(),
            item_bytes(&ItemRecord {
                queue: queue.clone(),
                ..rec
            })
            .to_string()
            .into_bytes(),
        ];
        let v = self.run_list(&ACK, &queue, now, args).await?;
        match v.first().map_or(0, int) {
            0 => {}
            code => return Err(Self::held_error(code, id)),
        }
        self.replicated().await?;
        self.metrics.drained(&queue);
        self.publish(
            now,
            &queue,
            EventKind::ItemDrained {
                queue: Arc::from(queue.as_str()),
                id,
            },
        );
        Ok(())
    }

    /// Not done: back to the queue after `delay`, or to the dead letters
    /// after the last attempt. Returns (dead_lettered, attempt).
    pub async fn nack(
        &self,
        id: &str,
        token: &str,
        delay: Duration,
        reason: &str,
    ) -> Result<(bool, u32)> {
        let id = parse_id(id)?;
        parse_token(token)?;
        check_nack(delay, reason)?;
        let Some((queue, _)) = self.locate(id).await? else {
            return Err(no_item_error(id));
        };
        let now = self.clock.now();
        let args = vec![
            id.to_string().into_bytes(),
            token.as_bytes().to_vec(),
            delay.as_millis().to_string().into_bytes(),
            reason.as_bytes().to_vec(),
        ];
        let v = self.run_list(&NACK, &queue, now, args).await?;
        let code = v.first().map_or(0, int);
        if code < 0 {
            return Err(Self::held_error(code, id));
        }
        let attempt = v.get(1).map_or(0, int) as u32;
        self.replicated().await?;
        if code == 1 {
            self.publish(
                now,
                &queue,
                EventKind::ItemDeadLettered {
                    queue: Arc::from(queue.as_str()),
                    id,
                    reason: reason.to_string(),
                    attempts: attempt,
                },
            );
        } else {
            self.backend.inner.queue_wake.notify_waiters();
        }
        Ok((code == 1, attempt))
    }

    /// Dead letters, by id, optionally of one queue.
    pub async fn list_dead_letters(
        &self,
        queue: &str,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Item>, String)> {
        let (size, after) = page_params(page_size, page_token)?;
        let now = self.clock.now();
        let args = vec![
            after.to_string().into_bytes(),
            (size + 1).to_string().into_bytes(),
        ];
        let v = self.run_list(&DEAD, queue, now, args).await?;
        let mut items: Vec<Item> = v
            .chunks_exact(5)
            .map(|c| {
                item(
                    int(&c[0]),
                    bytes(&c[1]),
                    int(&c[2]),
                    text(&c[3]),
                    int(&c[4]),
                )
            })
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
        let not_dead =
            || EngineError::NotFound(format!("item {id} is not in the dead-letter list"));
        let Some((queue, rec)) = self.locate(id).await? else {
            return Err(not_dead());
        };
        if !owns(&queue) {
            return Err(not_dead());
        }
        let now = self.clock.now();
        let args = vec![
            id.to_string().into_bytes(),
            self.limits.load().max_depth.to_string().into_bytes(),
            (rec.enqueued_at / 1_000_000).to_string().into_bytes(),
        ];
        let v = self.run_list(&REQUEUE, &queue, now, args).await?;
        match v.first().map_or(0, int) {
            0 => {}
            -1 => return Err(not_dead()),
            _ => {
                return Err(EngineError::ResourceExhausted(format!(
                    "queue {queue:?} is at its limit of {} items ([queue] max_depth)",
                    self.limits.load().max_depth
                )));
            }
        }
        self.replicated().await?;
        self.backend.inner.queue_wake.notify_waiters();
        Ok(())
    }

    /// Depth, in flight, dead letters, oldest age and bytes per queue.
    pub async fn queue_stats(&self, queue: &str) -> Result<Vec<QueueStat>> {
        let now = self.clock.now();
        let names: Vec<String> = if queue.is_empty() {
            let key = self.keys.for_queue("")[17].clone();
            let mut v: Vec<String> =
                self.backend
                    .inner
                    .link
                    .call(|mut c| async move {
                        redis::cmd("SMEMBERS").arg(&key).query_async(&mut c).await
                    })
                    .await
                    .map_err(unavailable)?;
            v.sort();
            v
        } else {
            vec![queue.to_string()]
        };
        let mut out = Vec::with_capacity(names.len());
        for q in names {
            let v = self.run_list(&STATS, &q, now, Vec::new()).await?;
            let i = self.publish_expired(now, &q, &v);
            let at = |k: usize| v.get(i + k).map_or(0, int).max(0) as u64;
            let (waiting, in_flight, dead, b) = (at(0), at(1), at(2), at(3));
            if waiting.saturating_add(in_flight).saturating_add(dead) == 0
                && !queue.is_empty()
                && b == 0
            {
                // A queue never used: none (as embedded).
                let known = self.stats_known(&q).await?;
                if !known {
                    continue;
                }
            }
            let oldest = v
                .get(i + 4)
                .filter(|x| !bytes(x).is_empty())
                .map_or(Duration::ZERO, |x| now.since(from_ms(int(x))));
            out.push(QueueStat {
                queue: q,
                depth: waiting,
                in_flight,
                dead_letters: dead,
                oldest_age: oldest,
                bytes: b,
            });
        }
        if queue.is_empty() {
            *self.stats.lock().unwrap_or_else(|e| e.into_inner()) = out.clone();
        }
        Ok(out)
    }

    async fn stats_known(&self, queue: &str) -> Result<bool> {
        let key = self.keys.for_queue("")[17].clone();
        let q = queue.to_string();
        self.backend
            .inner
            .link
            .call(|mut c| async move {
                redis::cmd("SISMEMBER")
                    .arg(&key)
                    .arg(&q)
                    .query_async::<bool>(&mut c)
                    .await
            })
            .await
            .map_err(unavailable)
    }

    /// The last stats read (for the metrics' gauges, read without Redis).
    pub fn last_stats(&self) -> Vec<QueueStat> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
