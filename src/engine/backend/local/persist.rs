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
//!
//! # When a commit fails
//! A failed commit (disk full, I/O error) loses the writes it carried. Their
//! waiters get the error, and so does anyone who waits for one of those
//! sequence numbers later (the failed ranges are remembered). The fast-path
//! watermark ([`Persister::committed`]) then stops at the last write before
//! the first failure, so no decision can read past the lost state without
//! waiting; it moves again only once the store is *recovered*: the backend
//! marks every target dirty after a failure, writes them all again, and ends
//! that flush with a recovery mark ([`Persister::mark_recovered`]) carrying
//! the sequence number at which it started. When that mark commits and no
//! failure since hit a write queued after that point, every lost state has
//! been written again: the watermark catches up and health returns.

use super::store::{Op, Store, StoreError};
use crate::domain::Time;
use crate::engine::events::{EventBus, EventKind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// A recovery mark: every target was queued again from sequence number
    /// `n` on (see the module doc).
    recovers_from: Option<u64>,
}

/// Most failed ranges remembered; beyond it the oldest two merge (a wider
/// range only makes more waiters see the error: the safe side).
const MAX_LOST: usize = 1024;

/// What the writer has done so far, as waiters and health see it.
#[derive(Clone, Debug, Default)]
pub struct Mark {
    /// The highest sequence number whose commit finished, well or not.
    pub attempted: u64,
    /// Failed commits, as inclusive ranges of sequence numbers, oldest first.
    pub lost: std::collections::VecDeque<(u64, u64, StoreError)>,
    /// Some(first lost seq) from a failure until the recovery flush after it
    /// committed: the store is failing, or has not caught up yet.
    pub unrecovered: Option<u64>,
}

impl Mark {
    /// Whether the store is failing (or recovering): health NOT_SERVING.
    pub fn failing(&self) -> Option<&StoreError> {
        self.unrecovered?;
        self.lost.back().map(|(_, _, e)| e)
    }

    /// The outcome of write `seq`, once known.
    fn outcome(&self, seq: u64) -> Option<Result<(), StoreError>> {
        if let Some((_, _, e)) = self
            .lost
            .iter()
            .rev()
            .find(|(from, to, _)| (*from..=*to).contains(&seq))
        {
            return Some(Err(e.clone()));
        }
        (seq <= self.attempted).then_some(Ok(()))
    }
}

/// Resolves when a queued write (or the watermark) says the state is durable.
pub struct Pending(PendingKind);

enum PendingKind {
    None,
    Job(oneshot::Receiver<Result<(), StoreError>>),
    Watermark(u64, watch::Receiver<Mark>),
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
                let m = rx
                    .wait_for(|m| m.outcome(seq).is_some())
                    .await
                    .map_err(|_| stopped())?;
                m.outcome(seq).unwrap_or(Ok(()))
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
    watermark: watch::Receiver<Mark>,
    /// Set when a commit failed: what it carried is not on disk, so the
    /// next flush writes every target again (see [`Persister::take_lost`]).
    lost: Arc<AtomicBool>,
    /// Milliseconds since `epoch` at which the commit in progress started
    /// (0: none): a disk that hangs rather than fails shows up here.
    in_commit: Arc<AtomicU64>,
    epoch: std::time::Instant,
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
        let (wm_tx, wm_rx) = watch::channel(Mark::default());
        let c = committed.clone();
        let lost = Arc::new(AtomicBool::new(false));
        let l = lost.clone();
        let in_commit = Arc::new(AtomicU64::new(0));
        let epoch = std::time::Instant::now();
        let ic = in_commit.clone();
        let thread = std::thread::Builder::new()
            .name("backstop-writer".into())
            .spawn(move || writer(store, rx, c, wm_tx, events, l, (ic, epoch)))
            .ok();
        Persister {
            tx: Mutex::new(Some((0, tx))),
            committed,
            watermark: wm_rx,
            lost,
            in_commit,
            epoch,
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
        self.send_job(ops, events, done, None)
    }

    fn send_job(
        &self,
        ops: Vec<Op>,
        events: Vec<PendingEvent>,
        done: Option<oneshot::Sender<Result<(), StoreError>>>,
        recovers_from: Option<u64>,
    ) -> Option<u64> {
        let mut guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let (seq, tx) = guard.as_mut()?;
        *seq += 1;
        let job = Job {
            seq: *seq,
            ops,
            events,
            done,
            recovers_from,
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

    /// If a commit failed since the last call (clearing the flag): the
    /// sequence number from which writes queued now are "after the failure"
    /// (for [`Persister::mark_recovered`]).
    pub fn take_lost(&self) -> Option<u64> {
        if !self.lost.swap(false, Ordering::AcqRel) {
            return None;
        }
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|(seq, _)| *seq + 1)
    }

    /// Queues the recovery mark: every target was queued again from `from`
    /// on (see the module doc). It carries a no-op write, so it also
    /// re-tests the store when there is nothing else to write.
    /// Returns the mark's sequence number.
    pub fn mark_recovered(&self, from: u64) -> u64 {
        self.send_job(vec![Op::Check], Vec::new(), None, Some(from))
            .unwrap_or(0)
    }

    /// How long the commit in progress has been running, if one is: a disk
    /// that hangs (a frozen network mount) never fails a commit, so health
    /// watches this too.
    pub fn stalled_for(&self) -> Option<std::time::Duration> {
        let started = self.in_commit.load(Ordering::Acquire);
        (started != 0).then(|| {
            let now = self.epoch.elapsed().as_millis() as u64;
            std::time::Duration::from_millis(now.saturating_sub(started - 1))
        })
    }

    /// What the writer has done, for health (see [`Mark::failing`]).
    pub fn health(&self) -> watch::Receiver<Mark> {
        self.watermark.clone()
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
    watermark: watch::Sender<Mark>,
    events: Arc<EventBus>,
    lost: Arc<AtomicBool>,
    (in_commit, epoch): (Arc<AtomicU64>, std::time::Instant),
) {
    // The latest lost write's sequence number (0: none yet).
    let mut last_lost = 0u64;
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let from = jobs.first().map_or(0, |j| j.seq);
        let last = jobs.last().map_or(0, |j| j.seq);
        let recovers_from = jobs.iter().filter_map(|j| j.recovers_from).max();
        let ops: Vec<Op> = jobs.iter_mut().flat_map(|j| j.ops.drain(..)).collect();
        // +1 so a commit starting in the first millisecond is not "none".
        in_commit.store(epoch.elapsed().as_millis() as u64 + 1, Ordering::Release);
        let result = store.commit(&ops);
        in_commit.store(0, Ordering::Release);
        watermark.send_modify(|m| {
            m.attempted = last;
            match &result {
                Ok(()) => {
                    // Recovered once a recovery flush that began after the
                    // latest failure is on disk.
                    if recovers_from.is_some_and(|r| r > last_lost) {
                        m.unrecovered = None;
                        m.lost.clear();
                    }
                }
                Err(e) => {
                    lost.store(true, Ordering::Release);
                    last_lost = last;
                    m.unrecovered.get_or_insert(from);
                    m.lost.push_back((from, last, e.clone()));
                    if m.lost.len() > MAX_LOST
                        && let (Some(a), Some(b)) = (m.lost.pop_front(), m.lost.pop_front())
                    {
                        m.lost.push_front((a.0, b.1, b.2));
                    }
                }
            }
            // The fast path never passes a lost write that was not written again.
            let upto = match m.unrecovered {
                Some(first_lost) => first_lost - 1,
                None => last,
            };
            committed.fetch_max(upto, Ordering::AcqRel);
        });
        if let Err(e) = &result {
            tracing::error!(error = %e, ops = ops.len(), "state store commit failed");
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

    /// Fails every commit while `fail` is set.
    #[derive(Clone, Default)]
    struct Switch(Arc<std::sync::atomic::AtomicBool>);

    impl Store for Switch {
        fn load(&self) -> Result<super::super::store::Loaded, StoreError> {
            Ok(Default::default())
        }
        fn commit(&self, _ops: &[Op]) -> Result<(), StoreError> {
            if self.0.load(Ordering::SeqCst) {
                Err(StoreError("disk full".into()))
            } else {
                Ok(())
            }
        }
        fn describe(&self) -> String {
            "switch".into()
        }
    }

    #[test]
    fn a_lost_write_stays_lost_until_a_recovery_flush_commits() {
        let sw = Switch::default();
        let p = Persister::start(Box::new(sw.clone()), Arc::new(EventBus::new(16, 16)));
        let t: Arc<str> = Arc::from("t");
        let (w, ok_seq) = p.write(vec![Op::Item(1, None)], vec![]);
        w.wait_blocking().expect("durable");
        sw.0.store(true, Ordering::SeqCst);
        let (w, lost_seq) = p.write(
            vec![Op::Item(2, None)],
            vec![(Time::ZERO, t.clone(), EventKind::TargetReset)],
        );
        assert!(
            w.wait_blocking().is_err(),
            "the failed write's waiter is told"
        );
        sw.0.store(false, Ordering::SeqCst);
        // A later write succeeds: the lost one is still lost for anyone who
        // waits for it afterwards, and the fast path stops before it.
        let (w, later) = p.write(vec![Op::Item(3, None)], vec![]);
        w.wait_blocking().expect("durable");
        assert!(p.wait_for(lost_seq).wait_blocking().is_err());
        assert!(
            p.wait_for(later).wait_blocking().is_ok(),
            "its own write is durable"
        );
        assert_eq!(p.committed(), lost_seq - 1);
        assert!(p.health().borrow().failing().is_some());
        assert!(ok_seq < lost_seq);
        // The recovery flush: lost noticed, everything queued again, marked.
        let from = p.take_lost().expect("a commit failed");
        assert!(p.take_lost().is_none(), "taken once");
        let (w, rewritten) = p.write(vec![Op::Item(2, None)], vec![]);
        p.mark_recovered(from);
        w.wait_blocking().expect("durable");
        p.wait_for(rewritten + 1)
            .wait_blocking()
            .expect("the mark committed");
        assert!(p.health().borrow().failing().is_none(), "recovered");
        assert!(p.committed() > rewritten);
        assert_eq!(
            p.health().borrow().lost.len(),
            0,
            "nothing lost is left unwritten"
        );
    }

    #[test]
    fn a_recovery_mark_from_before_a_later_failure_does_not_count() {
        let sw = Switch::default();
        let p = Persister::start(Box::new(sw.clone()), Arc::new(EventBus::new(16, 16)));
        sw.0.store(true, Ordering::SeqCst);
        let (w, _) = p.write(vec![Op::Item(1, None)], vec![]);
        assert!(w.wait_blocking().is_err());
        let from = p.take_lost().expect("lost");
        // Another failure after the recovery flush began...
        let (w, _) = p.write(vec![Op::Item(2, None)], vec![]);
        assert!(w.wait_blocking().is_err());
        sw.0.store(false, Ordering::SeqCst);
        // ...so its mark, committing fine, does not declare recovery.
        let (w, seq) = p.write(vec![], vec![]);
        p.mark_recovered(from);
        w.wait_blocking().expect("durable");
        p.wait_for(seq + 1).wait_blocking().ok();
        assert!(p.health().borrow().failing().is_some(), "still recovering");
        // The next recovery flush does.
        let from = p.take_lost().expect("the second failure");
        p.mark_recovered(from);
        let (w, _) = p.write(vec![Op::Item(3, None)], vec![]);
        w.wait_blocking().expect("durable");
        assert!(p.health().borrow().failing().is_none());
    }

    /// Holds every commit until released: a disk that hangs.
    #[derive(Clone, Default)]
    struct Frozen(Arc<(Mutex<bool>, std::sync::Condvar)>);

    impl Store for Frozen {
        fn load(&self) -> Result<super::super::store::Loaded, StoreError> {
            Ok(Default::default())
        }
        fn commit(&self, _ops: &[Op]) -> Result<(), StoreError> {
            let (m, c) = &*self.0;
            let mut thawed = m.lock().expect("lock");
            while !*thawed {
                thawed = c.wait(thawed).expect("wait");
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "frozen".into()
        }
    }

    #[test]
    fn a_hanging_commit_shows_as_stalled_until_it_returns() {
        let disk = Frozen::default();
        let p = Persister::start(Box::new(disk.clone()), Arc::new(EventBus::new(16, 16)));
        assert_eq!(p.stalled_for(), None, "idle");
        let (w, _) = p.write(vec![Op::Item(1, None)], vec![]);
        std::thread::sleep(std::time::Duration::from_millis(60));
        let stalled = p.stalled_for().expect("a commit is in progress");
        assert!(
            stalled >= std::time::Duration::from_millis(40),
            "{stalled:?}"
        );
        {
            let (m, c) = &*disk.0;
            *m.lock().expect("lock") = true;
            c.notify_all();
        }
        w.wait_blocking().expect("durable once thawed");
        assert_eq!(p.stalled_for(), None, "returned");
    }
}
