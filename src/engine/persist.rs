//! The write path to the store: one writer thread, group commits.
//!
//! Decisions never touch the disk themselves. A decision that changed durable
//! state takes a snapshot of the target *while still holding its lock* and
//! queues it here; the writer thread commits everything queued in one
//! transaction (one fsync for many waiters) and then releases the waiters.
//! Because snapshots are queued under the target's lock, they reach the store
//! in the order the target changed, so an older snapshot can never overwrite
//! a newer one.

use super::store::{Op, Store, StoreError};
use std::sync::mpsc;
use std::thread::JoinHandle;
use tokio::sync::oneshot;

struct Job {
    ops: Vec<Op>,
    done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

/// A handle that resolves when a queued write is durable.
pub struct Pending(Option<oneshot::Receiver<Result<(), StoreError>>>);

impl Pending {
    /// Nothing to wait for (ephemeral mode or nothing written).
    pub fn none() -> Pending {
        Pending(None)
    }

    /// Waits until the write is durable.
    pub async fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err(StoreError("the state writer stopped".into()))),
        }
    }

    /// Blocking wait, for code outside the async runtime (tests, shutdown).
    pub fn wait_blocking(self) -> Result<(), StoreError> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx
                .blocking_recv()
                .unwrap_or_else(|_| Err(StoreError("the state writer stopped".into()))),
        }
    }
}

/// Owns the writer thread.
pub struct Persister {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    describe: String,
}

/// Most jobs folded into one commit.
const MAX_GROUP: usize = 4096;

impl Persister {
    pub fn start(store: Box<dyn Store>) -> Persister {
        let describe = store.describe();
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("backstop-writer".into())
            .spawn(move || writer(store, rx))
            .ok();
        Persister {
            tx: Some(tx),
            thread,
            describe,
        }
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// Queues `ops`; the returned handle resolves once they are durable.
    pub fn write(&self, ops: Vec<Op>) -> Pending {
        if ops.is_empty() {
            return Pending::none();
        }
        let (done, rx) = oneshot::channel();
        let job = Job {
            ops,
            done: Some(done),
        };
        match &self.tx {
            Some(tx) if tx.send(job).is_ok() => Pending(Some(rx)),
            _ => {
                let (fail, rx) = oneshot::channel();
                let _ = fail.send(Err(StoreError("the state writer is not running".into())));
                Pending(Some(rx))
            }
        }
    }

    /// Queues `ops` without waiting (write-behind).
    pub fn write_behind(&self, ops: Vec<Op>) {
        if ops.is_empty() {
            return;
        }
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job { ops, done: None });
        }
    }
}

impl Drop for Persister {
    /// Finishes every queued write, then stops the thread.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn writer(store: Box<dyn Store>, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let ops: Vec<Op> = jobs.iter_mut().flat_map(|j| j.ops.drain(..)).collect();
        let result = store.commit(&ops);
        if let Err(e) = &result {
            tracing::error!(error = %e, ops = ops.len(), "state store commit failed");
        }
        for j in jobs {
            if let Some(done) = j.done {
                let _ = done.send(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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
    fn waits_resolve_after_commit_and_drop_flushes() {
        let rec = Recorder::default();
        let p = Persister::start(Box::new(rec.clone()));
        let w = p.write(vec![Op::Item(1, None), Op::Item(2, None)]);
        w.wait_blocking().expect("durable");
        assert_eq!(rec.0.lock().expect("lock").iter().sum::<usize>(), 2);
        p.write_behind(vec![Op::Item(3, None)]);
        drop(p);
        assert_eq!(
            rec.0.lock().expect("lock").iter().sum::<usize>(),
            3,
            "drop finished the queue"
        );
    }
}
