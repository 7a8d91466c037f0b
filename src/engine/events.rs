//! The engine's event log: every breaker transition, pause, fallback and
//! override, numbered by one server-wide sequence.
//!
//! Events are kept in a bounded in-memory ring (so a dashboard that
//! reconnects with its last `seq` resumes with no loss) and fanned out live
//! through a broadcast channel. Publishing never waits for a subscriber: a
//! slow subscriber's channel overflows and it is told so (a gap), instead of
//! the engine slowing down. Publishing happens inside the target's critical
//! section so that one target's events are in the order its state changed.

use crate::domain::Time;
pub use crate::domain::event::EventKind;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Strictly increasing across the server.
    pub seq: u64,
    pub at: Time,
    /// The target (or, for route events, the route name).
    pub target: Arc<str>,
    pub kind: EventKind,
}

struct Ring {
    next_seq: u64,
    buf: VecDeque<Arc<Event>>,
}

/// The event log and its live fan-out.
pub struct EventBus {
    ring: Mutex<Ring>,
    capacity: usize,
    tx: broadcast::Sender<Arc<Event>>,
}

impl EventBus {
    /// `capacity` events are kept for resumption; each live subscriber may lag
    /// by up to `subscriber_buffer` events before it is told it missed some.
    pub fn new(capacity: usize, subscriber_buffer: usize) -> Self {
        Self::starting_at(1, capacity, subscriber_buffer)
    }

    /// A bus whose first event gets `first_seq`. The server starts it at the
    /// wall-clock time in microseconds, so seqs keep increasing across
    /// restarts and a `since_seq` from before a restart is recognised as
    /// evicted (a Gap) rather than mistaken for a seq of the new process.
    pub fn starting_at(first_seq: u64, capacity: usize, subscriber_buffer: usize) -> Self {
        let (tx, _) = broadcast::channel(subscriber_buffer.max(1));
        EventBus {
            ring: Mutex::new(Ring {
                next_seq: first_seq.max(1),
                buf: VecDeque::with_capacity(capacity.min(4096)),
            }),
            capacity: capacity.max(1),
            tx,
        }
    }

    /// Appends an event and hands it to live subscribers. Never blocks on them.
    pub fn publish(&self, at: Time, target: &Arc<str>, kind: EventKind) -> u64 {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let seq = ring.next_seq;
        ring.next_seq += 1;
        let ev = Arc::new(Event {
            seq,
            at,
            target: target.clone(),
            kind,
        });
        if ring.buf.len() == self.capacity {
            ring.buf.pop_front();
        }
        ring.buf.push_back(ev.clone());
        // Sent under the ring lock so live order equals seq order. An error
        // only means nobody is listening.
        let _ = self.tx.send(ev);
        seq
    }

    /// Appends an event numbered elsewhere (cluster mode: by its position in
    /// the Redis stream every replica reads, so all replicas agree on seqs).
    /// Seqs must increase; an event at or below the last one is dropped
    /// (a re-read of the stream after a reconnect).
    pub fn publish_numbered(&self, seq: u64, at: Time, target: &Arc<str>, kind: EventKind) -> bool {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if seq < ring.next_seq {
            return false;
        }
        ring.next_seq = seq + 1;
        let ev = Arc::new(Event {
            seq,
            at,
            target: target.clone(),
            kind,
        });
        if ring.buf.len() == self.capacity {
            ring.buf.pop_front();
        }
        ring.buf.push_back(ev.clone());
        let _ = self.tx.send(ev);
        true
    }

    /// The newest `limit` retained events matching `keep`, oldest first.
    /// Scans from the newest end, so a small `limit` reads little of the ring.
    pub fn recent(&self, limit: usize, keep: impl Fn(&Event) -> bool) -> Vec<Arc<Event>> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Arc<Event>> = ring
            .buf
            .iter()
            .rev()
            .filter(|e| keep(e))
            .take(limit)
            .cloned()
            .collect();
        drop(ring);
        out.reverse();
        out
    }

    /// The last seq handed out (0 if none yet).
    pub fn last_seq(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).next_seq - 1
    }

    /// Subscribes to live events and returns, atomically with it, the retained
    /// events with `seq > since` (or `None` if some of those were already
    /// evicted from the ring; `since = 0` means everything retained) and the
    /// last seq at subscription time.
    pub fn subscribe_since(&self, since: u64) -> Subscription {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        let last = ring.next_seq - 1;
        let oldest = ring.buf.front().map_or(ring.next_seq, |e| e.seq);
        // 0 asks for everything retained (never a gap).
        let backlog = if since == 0 || since + 1 >= oldest || since >= last {
            Some(ring.buf.iter().filter(|e| e.seq > since).cloned().collect())
        } else {
            None
        };
        Subscription {
            rx,
            backlog,
            last_seq: last,
        }
    }
}

/// A live subscription plus what it missed.
pub struct Subscription {
    pub rx: broadcast::Receiver<Arc<Event>>,
    /// Retained events after the requested seq; None if some were evicted (a gap).
    pub backlog: Option<Vec<Arc<Event>>>,
    /// The newest seq at the moment of subscribing.
    pub last_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t() -> Arc<str> {
        Arc::from("t")
    }

    #[test]
    fn seqs_increase_and_the_ring_is_bounded() {
        let bus = EventBus::new(3, 16);
        for _ in 0..5 {
            bus.publish(Time::ZERO, &t(), EventKind::TargetReset);
        }
        assert_eq!(bus.last_seq(), 5);
        let sub = bus.subscribe_since(2);
        assert_eq!(sub.last_seq, 5);
        let seqs: Vec<u64> = sub
            .backlog
            .expect("3..=5 retained")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![3, 4, 5]);
        // seq 2 was evicted: resuming after 1 cannot be lossless.
        assert!(bus.subscribe_since(1).backlog.is_none());
        // Resuming at the head is an empty backlog, not a gap.
        assert_eq!(bus.subscribe_since(5).backlog.map(|b| b.len()), Some(0));
        // The newest two, oldest first; a filter that matches nothing is empty.
        let seqs: Vec<u64> = bus.recent(2, |_| true).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![4, 5]);
        assert!(bus.recent(10, |e| e.seq > 5).is_empty());
        assert_eq!(bus.recent(100, |_| true).len(), 3);
    }

    #[tokio::test]
    async fn live_subscribers_see_events_in_order() {
        let bus = EventBus::new(100, 16);
        let sub = bus.subscribe_since(0);
        let mut rx = sub.rx;
        assert_eq!(sub.backlog.map(|b| b.len()), Some(0));
        for _ in 0..3 {
            bus.publish(Time::ZERO, &t(), EventKind::TargetReset);
        }
        for want in 1..=3 {
            assert_eq!(rx.recv().await.expect("event").seq, want);
        }
    }
}
