//! The deferred queue's index: items by id, ready lists per queue ordered
//! by due time, leases by expiry, dead letters, idempotency keys (scoped per
//! queue) and per-queue counts, with the bookkeeping every operation shares.

use super::super::events::EventKind;
use super::super::store::{IdemRecord, ItemRecord, Op};
use crate::domain::Time;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

pub(crate) struct Entry {
    pub(crate) rec: ItemRecord,
    /// (token, until) while claimed.
    pub(crate) lease: Option<(u64, Time)>,
}

#[derive(Default, Clone, Copy)]
pub(crate) struct Counts {
    pub(crate) waiting: u64,
    pub(crate) in_flight: u64,
    pub(crate) dead: u64,
    pub(crate) bytes: u64,
}

/// An idempotency key's item, and the store write that made it durable
/// (a duplicate Defer is answered only once that write is committed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IdemEntry {
    pub(crate) id: u64,
    pub(crate) expires_at: u64,
    pub(crate) seq: u64,
}

/// The idempotency index key: keys are scoped to their queue, so the same key
/// in two queues names two requests. Queue names cannot contain NUL (they are
/// route or target names), so the separator is unambiguous.
pub(crate) fn idem_key(queue: &str, key: &str) -> String {
    let mut k = String::with_capacity(queue.len() + 1 + key.len());
    k.push_str(queue);
    k.push('\0');
    k.push_str(key);
    k
}

/// Bytes an item holds against `[queue] max_total_bytes`: everything it stores.
pub(crate) fn item_bytes(rec: &ItemRecord) -> u64 {
    let meta: usize = rec.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
    (rec.payload.len() + meta + rec.idempotency_key.len() + rec.queue.len()) as u64
}

#[derive(Default)]
pub(crate) struct QueueState {
    pub(crate) items: HashMap<u64, Entry>,
    /// Per queue: waiting items by (due, id).
    pub(crate) ready: HashMap<String, BTreeSet<(u64, u64)>>,
    /// Claimed items by (lease until, id), for expiry.
    pub(crate) leased: BTreeSet<(u64, u64)>,
    pub(crate) dead: BTreeMap<u64, ItemRecord>,
    /// Live keys (expires_at = 0) and tombstones of acked items.
    pub(crate) idem: HashMap<String, IdemEntry>,
    /// Tombstones by expiry, to forget them once `idempotency_ttl` has passed.
    pub(crate) idem_expiry: BTreeSet<(u64, String)>,
    pub(crate) counts: HashMap<String, Counts>,
    pub(crate) total_bytes: u64,
    pub(crate) next_id: u64,
}

pub(crate) fn counts<'a>(s: &'a mut QueueState, queue: &str) -> &'a mut Counts {
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
    pub(crate) fn expire(
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
    pub(crate) fn purge_idem(&mut self, now: Time, ops: &mut Vec<Op>) {
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
    pub(crate) fn dead_letter(
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

    pub(crate) fn release_payload(&mut self, queue: &str, bytes: u64) {
        self.total_bytes = self.total_bytes.saturating_sub(bytes);
        let c = counts(self, queue);
        c.bytes = c.bytes.saturating_sub(bytes);
    }
}
