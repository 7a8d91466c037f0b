//! The write path to the store: one writer thread, group commits, a commit
//! watermark.
//!
//! Decisions never touch the disk themselves. A decision that changed durable
//! state takes a snapshot of the target *while still holding its lock* and
//! queues it here; the writer thread commits everything queued in one
//! transaction (one fsync for many waiters), then advances the commit
//! watermark and releases the waiters.
//!
//! Every write gets a sequence number in queue order, so "committed up to N"
//! means every earlier write is on disk too. That watermark is how the engine
//! keeps its promise that nobody is told about a transition a crash could
//! forget: the RPC that caused it waits for its own write, and any other RPC
//! that reads the target before the write is committed waits for the
//! watermark to pass it. Events about such a target are handed to the writer
//! and published after the commit, in order.

use super::store::{Op, Store, StoreError};
use crate::domain::Time;
use crate::engine::events::{EventBus, EventKind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::{oneshot, watch};

/// An event to publish once its write is durable.
pub type PendingEvent = (Time, Arc<str>, EventKind);

struct Job {
    seq: u64,
    ops: Vec<Op>,
    events: Vec<PendingEvent>,
    done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// Resolves when a queued write (or the watermark) says the state is durable.
pub struct Pending(PendingKind);

enum PendingKind {
    None,
    Job(oneshot::Receiver<Result<(), StoreError>>),
    Watermark(u64, watch::Receiver<Result<u64, StoreError>>),
}

impl Pending {
    /// Nothing to wait for (ephemeral mode or nothing written).
    pub fn none() -> Pending {
        Pending(PendingKind::None)
    }

    /// Waits until the write is durable.
    pub async fn wait(self) -> Result<(), StoreError> {
        let stopped = || StoreError("the state writer stopped".into());
        match self.0 {
            PendingKind::None => Ok(()),
            PendingKind::Job(rx) => rx.await.unwrap_or_else(|_| Err(stopped())),
            PendingKind::Watermark(seq, mut rx) => {
                let r = rx
                    .wait_for(|v| v.as_ref().map_or(true, |c| *c >= seq))
                    .await
                    .map_err(|_| stopped())?;
                r.clone().map(|_| ())
            }
        }
    }

    /// Blocking wait, for code outside the async runtime (tests, shutdown).
    pub fn wait_blocking(self) -> Result<(), StoreError> {
        match self.0 {
            PendingKind::Job(rx) => rx
                .blocking_recv()
                .unwrap_or_else(|_| Err(StoreError("the state writer stopped".into()))),
            other => {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .map_err(|e| StoreError(e.to_string()))?;
                rt.block_on(Pending(other).wait())
            }
        }
    }
}

/// Owns the writer thread.
pub struct Persister {
    /// Held while assigning a sequence number and sending, so queue order is seq order.
    tx: Mutex<Option<(u64, mpsc::Sender<Job>)>>,
    committed: Arc<AtomicU64>,
    watermark: watch::Receiver<Result<u64, StoreError>>,
    thread: Option<JoinHandle<()>>,
    describe: String,
}

/// Most jobs folded into one commit.
const MAX_GROUP: usize = 4096;

impl Persister {
    pub fn start(store: Box<dyn Store>, events: Arc<EventBus>) -> Persister {
        let describe = store.describe();
        let (tx, rx) = mpsc::channel::<Job>();
        let committed = Arc::new(AtomicU64::new(0));
        let (wm_tx, wm_rx) = watch::channel(Ok(0));
        let c = committed.clone();
        let thread = std::thread::Builder::new()
            .name("backstop-writer".into())
            .spawn(move || writer(store, rx, c, wm_tx, events))
            .ok();
        Persister {
            tx: Mutex::new(Some((0, tx))),
            committed,
            watermark: wm_rx,
            thread,
            describe,
        }
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn send(
        &self,
        ops: Vec<Op>,
        events: Vec<PendingEvent>,
        done: Option<oneshot::Sender<Result<(), StoreError>>>,
    ) -> Option<u64> {
        let mut guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let (seq, tx) = guard.as_mut()?;
        *seq += 1;
        let job = Job {
            seq: *seq,
            ops,
            events,
            done,
        };
        tx.send(job).ok().map(|_| *seq)
    }

    /// Queues `ops` (and events to publish once they are durable); the
    /// returned handle resolves once they are committed. Also returns the
    /// write's sequence number.
    pub fn write(&self, ops: Vec<Op>, events: Vec<PendingEvent>) -> (Pending, u64) {
        let (done, rx) = oneshot::channel();
        match self.send(ops, events, Some(done)) {
            Some(seq) => (Pending(PendingKind::Job(rx)), seq),
            None => {
                let (fail, rx) = oneshot::channel();
                let _ = fail.send(Err(StoreError("the state writer is not running".into())));
                (Pending(PendingKind::Job(rx)), 0)
            }
        }
    }

    /// Queues `ops` without waiting (write-behind); returns its sequence number.
    pub fn write_behind(&self, ops: Vec<Op>) -> u64 {
        if ops.is_empty() {
            return 0;
        }
        self.send(ops, Vec::new(), None).unwrap_or(0)
    }

    /// Queues events behind the writes already queued: they are published
    /// once everything before them is committed (keeps a target's events in order).
    pub fn publish_after(&self, events: Vec<PendingEvent>) -> u64 {
        self.send(Vec::new(), events, None).unwrap_or(0)
    }

    /// Every write with a sequence number up to this is durable.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Resolves once write `seq` (and all before it) is durable.
    pub fn wait_for(&self, seq: u64) -> Pending {
        if seq <= self.committed() {
            return Pending::none();
        }
        Pending(PendingKind::Watermark(seq, self.watermark.clone()))
    }
}

impl Drop for Persister {
    /// Finishes every queued write, then stops the thread.
    fn drop(&mut self) {
        drop(self.tx.lock().unwrap_or_else(|e| e.into_inner()).take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer(
    store: Box<dyn Store>,
    rx: mpsc::Receiver<Job>,
    committed: Arc<AtomicU64>,
    watermark: watch::Sender<Result<u64, StoreError>>,
    events: Arc<EventBus>,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let last = jobs.last().map_or(0, |j| j.seq);
        let ops: Vec<Op> = jobs.iter_mut().flat_map(|j| j.ops.drain(..)).collect();
        let result = store.commit(&ops);
        match &result {
            Ok(()) => {
                committed.store(last, Ordering::Release);
                let _ = watermark.send_replace(Ok(last));
            }
            Err(e) => {
                tracing::error!(error = %e, ops = ops.len(), "state store commit failed");
                let _ = watermark.send_replace(Err(e.clone()));
            }
        }
        for j in jobs {
            // Events go out only once their state is durable; after a failed
            // commit they are dropped, like the answers that wait on it.
            if result.is_ok() {
                for (at, target, kind) in j.events {
                    events.publish(at, &target, kind);
                }
            }
            if let Some(done) = j.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records commits, to observe grouping and ordering.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<usize>>>);

    impl Store for Recorder {
        fn load(&self) -> Result<super::super::store::Loaded, StoreError> {
            Ok(Default::default())
        }
        fn commit(&self, ops: &[Op]) -> Result<(), StoreError> {
            self.0.lock().expect("lock").push(ops.len());
            Ok(())
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    #[test]
    fn waits_resolve_after_commit_events_follow_and_drop_flushes() {
        let rec = Recorder::default();
        let bus = Arc::new(EventBus::new(16, 16));
        let p = Persister::start(Box::new(rec.clone()), bus.clone());
        let t: Arc<str> = Arc::from("t");
        let (w, seq) = p.write(
            vec![Op::Item(1, None), Op::Item(2, None)],
            vec![(Time::ZERO, t.clone(), EventKind::TargetReset)],
        );
        w.wait_blocking().expect("durable");
        assert!(p.committed() >= seq);
        assert_eq!(
            bus.last_seq(),
            1,
            "the event was published after the commit"
        );
        assert_eq!(rec.0.lock().expect("lock").iter().sum::<usize>(), 2);
        p.wait_for(seq).wait_blocking().expect("already committed");
        p.write_behind(vec![Op::Item(3, None)]);
        drop(p);
        assert_eq!(
            rec.0.lock().expect("lock").iter().sum::<usize>(),
            3,
            "drop finished the queue"
        );
    }
}
