//! Watching the event log: what a dashboard subscription sees, shared by the
//! gRPC `Watch` stream and the HTTP Server-Sent Events endpoint.
//!
//! A watcher starts with a Snapshot (or resumes after `since_seq` from the
//! retained ring), then yields live events in seq order. When it cannot be
//! lossless (the requested seq was evicted, or the subscriber fell so far
//! behind that its buffer overflowed) it says so with a Gap and follows with
//! a fresh Snapshot, so a dashboard is never silently wrong.

use super::error::{EngineError, Result};
use super::events::Event;
use super::{DecisionBackend, Engine, TargetView};
use crate::domain::Time;
use crate::domain::event::EventKind;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::broadcast::error::RecvError;

/// Targets per Snapshot part. A snapshot of 10,000 targets is one shared
/// list streamed as 100 parts, so a watcher that does not read holds a few
/// parts in its connection buffer, not its own copy of the whole list.
pub const SNAPSHOT_PART: usize = 100;

/// What a watcher yields.
#[derive(Clone, Debug)]
pub enum WatchItem {
    Event(Arc<Event>),
    /// Part `part` of `parts` (1-based) of every matching target's state;
    /// `seq` is the last event it includes. Parts of one snapshot share `seq`.
    Snapshot(SnapshotPart),
    /// Events from `missed_from` on may be missing; a Snapshot follows.
    Gap {
        missed_from: u64,
        reason: String,
    },
}

/// One part of a snapshot: a window into a list shared by every watcher that
/// asked for a snapshot at about the same time.
#[derive(Clone, Debug)]
pub struct SnapshotPart {
    pub seq: u64,
    pub at: Time,
    pub part: u32,
    pub parts: u32,
    all: Arc<[TargetView]>,
    range: std::ops::Range<usize>,
}

impl SnapshotPart {
    /// The whole snapshot as one part (polling endpoints).
    pub fn whole(seq: u64, at: Time, all: Arc<[TargetView]>) -> SnapshotPart {
        let range = 0..all.len();
        SnapshotPart {
            seq,
            at,
            part: 1,
            parts: 1,
            all,
            range,
        }
    }

    /// Splits a shared snapshot into parts of at most [`SNAPSHOT_PART`] targets
    /// (one empty part when there are no targets).
    pub fn split(seq: u64, at: Time, all: Arc<[TargetView]>) -> Vec<SnapshotPart> {
        let n = all.len();
        let parts = n.div_ceil(SNAPSHOT_PART).max(1);
        (0..parts)
            .map(|i| SnapshotPart {
                seq,
                at,
                part: i as u32 + 1,
                parts: parts as u32,
                range: (i * SNAPSHOT_PART).min(n)..((i + 1) * SNAPSHOT_PART).min(n),
                all: all.clone(),
            })
            .collect()
    }

    pub fn targets(&self) -> &[TargetView] {
        &self.all[self.range.clone()]
    }
}

/// Which events a watcher wants. Empty sets match everything.
#[derive(Clone, Debug, Default)]
pub struct WatchFilter {
    pub targets: HashSet<String>,
    /// Event kind names (see [`super::events::EventKind::name`]).
    pub kinds: HashSet<&'static str>,
    /// A tenant's watcher sees only events about its own names (and none
    /// of the server-wide ones: cluster and config events name every
    /// tenant's replicas and targets).
    pub tenant: Option<Arc<crate::config::Tenant>>,
}

/// Most names a filter may list.
pub const MAX_FILTER: usize = 1000;

impl WatchFilter {
    pub fn matches(&self, e: &Event) -> bool {
        (self.targets.is_empty() || self.targets.contains(e.target.as_ref()))
            && (self.kinds.is_empty() || self.kinds.contains(e.kind.name()))
            && self.tenant.as_ref().is_none_or(|t| {
                t.owns(&e.target)
                    && !matches!(
                        e.kind,
                        EventKind::RedisUnavailable { .. }
                            | EventKind::RedisRestored { .. }
                            | EventKind::ConfigMismatch { .. }
                            | EventKind::ConfigReloaded { .. }
                    )
            })
    }
}

/// Everything about watching that is not one subscription: the subscriber
/// count and its bound, the shutdown signal every live stream (and long
/// poll) listens to, and the snapshot watchers share.
pub struct Hub {
    subscribers: AtomicUsize,
    max_subscribers: usize,
    /// Open subscriptions per tenant, for `[tenants.<name>] max_watchers`
    /// (a lock taken only when a stream opens or closes).
    per_tenant: Mutex<std::collections::HashMap<Arc<str>, usize>>,
    /// Flips to true when the server starts draining.
    shutdown: tokio::sync::watch::Sender<bool>,
    snapshot: Mutex<SnapshotCache>,
}

impl Hub {
    pub fn new(max_subscribers: usize) -> Hub {
        Hub {
            subscribers: AtomicUsize::new(0),
            max_subscribers,
            per_tenant: Mutex::default(),
            shutdown: tokio::sync::watch::Sender::new(false),
            snapshot: Mutex::default(),
        }
    }

    /// Takes a subscriber slot (and one of its tenant's), or says which
    /// bound is reached. A tenant at its `max_watchers` cannot crowd the
    /// server's slots out from under the other tenants.
    fn join(&self, tenant: Option<&crate::config::Tenant>) -> Result<()> {
        let max = self.max_subscribers;
        if self.subscribers.fetch_add(1, Ordering::Relaxed) >= max {
            self.subscribers.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::ResourceExhausted(format!(
                "{max} event subscribers are already connected ([events] max_subscribers); close one or raise the limit"
            )));
        }
        if let Some(t) = tenant {
            let mut per = self.per_tenant.lock().unwrap_or_else(|e| e.into_inner());
            let n = per.entry(t.name.clone()).or_default();
            if let Some(cap) = t.max_watchers
                && *n >= cap
            {
                drop(per);
                self.subscribers.fetch_sub(1, Ordering::Relaxed);
                return Err(EngineError::ResourceExhausted(format!(
                    "tenant {:?} already has {cap} event streams open ([tenants.{}] max_watchers); close one first",
                    t.name.as_ref(),
                    t.name.as_ref()
                )));
            }
            *n += 1;
        }
        Ok(())
    }

    fn leave(&self, tenant: Option<&Arc<str>>) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
        if let Some(t) = tenant {
            let mut per = self.per_tenant.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = per.get_mut(t) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per.remove(t);
                }
            }
        }
    }

    /// Live streams end and long polls answer from now on.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Resolves (or reads true) once the server is draining.
    pub fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

/// Releases a subscriber slot when the watcher goes away.
struct SubscriberGuard(Arc<Engine>, Option<Arc<str>>);

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.hub.leave(self.1.as_ref());
        self.0.metrics.subscribers().dec();
    }
}

/// One live subscription.
pub struct Watcher {
    engine: Arc<Engine>,
    rx: tokio::sync::broadcast::Receiver<Arc<Event>>,
    filter: WatchFilter,
    /// Highest seq already delivered (or covered by a snapshot).
    last_seq: u64,
    pending: VecDeque<WatchItem>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    _guard: SubscriberGuard,
}

impl Engine {
    /// Subscribes to the event log. `since_seq = 0` starts with a Snapshot.
    pub async fn watch(self: &Arc<Self>, since_seq: u64, filter: WatchFilter) -> Result<Watcher> {
        if filter.targets.len() > MAX_FILTER {
            return Err(EngineError::InvalidArgument(format!(
                "the targets filter lists {} names; at most {MAX_FILTER}",
                filter.targets.len()
            )));
        }
        self.hub.join(filter.tenant.as_deref())?;
        self.metrics.subscribers().inc();
        let guard = SubscriberGuard(self.clone(), filter.tenant.as_ref().map(|t| t.name.clone()));
        let sub = self.events.subscribe_since(since_seq);
        let mut w = Watcher {
            engine: self.clone(),
            rx: sub.rx,
            filter,
            last_seq: sub.last_seq,
            pending: VecDeque::new(),
            shutdown: self.hub.shutdown_signal(),
            _guard: guard,
        };
        match (since_seq, sub.backlog) {
            (0, _) => w.push_snapshot(sub.last_seq).await,
            // A since_seq from the future (a server that restarted with a
            // clock stepped back) cannot be resumed: resynchronise.
            (_, Some(_)) if since_seq > sub.last_seq => {
                w.last_seq = sub.last_seq;
                w.pending.push_back(WatchItem::Gap {
                    missed_from: 0,
                    reason: format!("seq {since_seq} is ahead of this server's log"),
                });
                w.push_snapshot(sub.last_seq).await;
            }
            (_, Some(backlog)) => {
                w.last_seq = since_seq.max(backlog.last().map_or(since_seq, |e| e.seq));
                for e in backlog {
                    if w.filter.matches(&e) {
                        w.pending.push_back(WatchItem::Event(e));
                    }
                }
            }
            (_, None) => {
                w.pending.push_back(WatchItem::Gap {
                    missed_from: since_seq + 1,
                    reason: format!(
                        "seq {} is no longer retained ([events] ring_size)",
                        since_seq + 1
                    ),
                });
                w.push_snapshot(sub.last_seq).await;
            }
        }
        Ok(w)
    }

    /// The current state of every target matching `filter`, shared: watchers
    /// asking within the same second, with no event in between, get the same
    /// list (one copy for 200 dashboards, not 200). Held weakly: once the
    /// last watcher has streamed it, the memory is freed.
    pub async fn shared_snapshot(&self, filter: &WatchFilter) -> Arc<[TargetView]> {
        if !filter.targets.is_empty() || filter.tenant.is_some() {
            return self.snapshot(filter).await.into();
        }
        let seq = self.events.last_seq();
        let now = self.clock.now();
        {
            let cache = self.hub.snapshot.lock().unwrap_or_else(|e| e.into_inner());
            if cache.seq == seq
                && now.as_nanos().saturating_sub(cache.at.as_nanos()) < 1_000_000_000
                && let Some(s) = cache.list.upgrade()
            {
                return s;
            }
        }
        let list: Arc<[TargetView]> = self.snapshot(filter).await.into();
        *self.hub.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = SnapshotCache {
            seq,
            at: now,
            list: Arc::downgrade(&list),
        };
        list
    }

    /// Current state of every target matching `filter` (at most `max_snapshot_targets`).
    pub async fn snapshot(&self, filter: &WatchFilter) -> Vec<TargetView> {
        let max = self.cfg().events.max_snapshot_targets;
        let mut only = filter.targets.clone();
        if let Some(t) = &filter.tenant
            && only.is_empty()
        {
            // The tenant's first `max` names, not the server's first `max`
            // names filtered (which could hold none of the tenant's).
            match self.backend.list(&t.prefix, max, "").await {
                Ok(page) if !page.targets.is_empty() => {
                    only = page.targets.iter().map(|s| s.name.to_string()).collect();
                }
                _ => return Vec::new(),
            }
        }
        let mut views = self.backend.views(&only, max).await;
        if let Some(t) = &filter.tenant {
            views.retain(|v| t.owns(&v.name));
        }
        views
    }
}

/// The last shared snapshot (see [`Engine::shared_snapshot`]).
pub(crate) struct SnapshotCache {
    seq: u64,
    at: Time,
    list: std::sync::Weak<[TargetView]>,
}

impl Default for SnapshotCache {
    fn default() -> Self {
        let empty: Arc<[TargetView]> = Arc::from(Vec::new());
        SnapshotCache {
            seq: u64::MAX,
            at: Time::ZERO,
            list: Arc::downgrade(&empty),
        }
    }
}

impl Watcher {
    async fn push_snapshot(&mut self, seq: u64) {
        let all = self.engine.shared_snapshot(&self.filter).await;
        self.last_seq = self.last_seq.max(seq);
        let at = self.engine.now();
        self.pending.extend(
            SnapshotPart::split(seq, at, all)
                .into_iter()
                .map(WatchItem::Snapshot),
        );
    }

    /// The next item; `None` when the server is shutting down.
    pub async fn next(&mut self) -> Option<WatchItem> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if *self.shutdown.borrow() {
                return None;
            }
            let received = tokio::select! {
                r = self.rx.recv() => r,
                _ = self.shutdown.changed() => return None,
            };
            match received {
                Ok(e) => {
                    if e.seq <= self.last_seq {
                        continue;
                    }
                    self.last_seq = e.seq;
                    if self.filter.matches(&e) {
                        return Some(WatchItem::Event(e));
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    let missed_from = self.last_seq + 1;
                    self.pending.push_back(WatchItem::Gap {
                        missed_from,
                        reason: format!("this subscriber fell behind by {n} events"),
                    });
                    let seq = self.engine.events.last_seq();
                    self.push_snapshot(seq).await;
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}
