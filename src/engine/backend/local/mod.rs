//! The embedded decision backend: every unit's state in memory, durable in
//! an embedded store (redb), one process.
//!
//! # Concurrency
//! Targets live in a sharded map ([`DashMap`]); a lookup read-locks one shard
//! briefly, then the decision locks only that target's mutex (and the budget
//! groups it draws on, always in index order, so two decisions can never
//! deadlock), runs the pure decision function (`domain::unit`) and unlocks.
//! No lock is held across an await, and the decision path does no I/O.
//!
//! # Durability
//! A decision that changed durable state (a breaker transition, a pause, a
//! disabled key) queues a snapshot of the target *while still locked* (so
//! writes reach the store in order) and the answer waits for the commit
//! *after* the lock is released, so a client is never told about a
//! transition a crash could forget (see `persist.rs` for the watermark that
//! extends this to every later reader). Budget levels and counters are
//! written behind about once a second.

pub mod persist;
mod reload;
pub mod store;
mod target;

pub use reload::Reloaded;
pub use target::Target;

use crate::config::{Config, TargetSettings};
use crate::domain::Time;
use crate::domain::breaker::{BreakerState, Mode};
use crate::domain::budget::{BudgetConfig, Kind};
use crate::domain::event::EventKind;
use crate::domain::unit::settled::Seen;
use crate::domain::unit::view::{TargetPage, TargetSummary, TargetView, summary};
use crate::domain::unit::{
    self, Admission, AdmitArgs, Effects, GroupRef, GroupState, OutcomeArgs, OutcomeResult,
    SettledAnswer, Trust, codec, first_permit_id, operate,
};
use crate::engine::clock::Clock;
use crate::engine::error::{EngineError, Result, invalid};
use crate::engine::events::EventBus;
use crate::engine::permit::PermitKey;
use crate::engine::validate_target;
use crate::engine::{LoadReport, QueueLoad};
use crate::metrics::{self, Metrics};
use arc_swap::ArcSwap;
use dashmap::DashMap;
use persist::{Pending, Persister};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use store::{GroupRecord, Op, Store, StoreError};
use target::{Conf, DIRTY_COUNTERS, DIRTY_STATE, Locked};

/// Most targets one write-behind flush writes (bounds its memory and I/O; a
/// backlog drains over the following flushes).
pub const MAX_FLUSH: usize = 20_000;

/// A budget group: one shared budget several targets draw on.
pub(crate) struct LocalGroup {
    /// Unique in this process, never reused: the order decisions lock
    /// groups in (see [`Conf::groups`]).
    pub id: u64,
    pub name: Arc<str>,
    pub config: BudgetConfig,
    pub state: Mutex<GroupState>,
    /// False while a reload is still carrying the previous group's state
    /// in (see `reload.rs`): a decision that finds it false waits, holding
    /// no lock, instead of drawing on a budget that is not there yet.
    pub ready: std::sync::atomic::AtomicBool,
}

impl LocalGroup {
    fn new(name: Arc<str>, config: BudgetConfig) -> Arc<LocalGroup> {
        Self::with_readiness(name, config, true)
    }

    fn with_readiness(name: Arc<str>, config: BudgetConfig, ready: bool) -> Arc<LocalGroup> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Arc::new(LocalGroup {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            name,
            config,
            state: Mutex::new(GroupState::default()),
            ready: std::sync::atomic::AtomicBool::new(ready),
        })
    }
}

/// Resolves a target's settings against the groups of the config they came
/// from (`groups[i]` is the config's group `i`).
fn conf(settings: &Arc<TargetSettings>, groups: &[Arc<LocalGroup>]) -> Arc<Conf> {
    let mut resolved: Vec<Arc<LocalGroup>> = settings
        .groups
        .iter()
        .filter_map(|&g| groups.get(g).cloned())
        .collect();
    resolved.sort_by_key(|g| g.id);
    Arc::new(Conf {
        settings: settings.clone(),
        groups: resolved.into_boxed_slice(),
    })
}

/// Whether a decision must not run on `t` now (checked under its lock):
/// a reload retired it, or one of its groups is not carried over yet.
fn stale(t: &Target) -> bool {
    t.retired.load(Ordering::Relaxed)
        || t.conf
            .groups
            .iter()
            .any(|g| !g.ready.load(Ordering::Acquire))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every unit's state in this process, persisted to an embedded store.
pub struct LocalBackend {
    /// Replaced whole by a reload; decisions read what they need of it once.
    config: ArcSwap<Config>,
    clock: Arc<dyn Clock>,
    targets: DashMap<Arc<str>, Arc<Target>>,
    /// Targets created on first use (bounded by `max_targets`).
    created: AtomicUsize,
    /// The config's budget groups, in its order (a reload replaces the list;
    /// a group whose budget did not change keeps its state object).
    groups: ArcSwap<Vec<Arc<LocalGroup>>>,
    /// What a target created on first use gets.
    default_conf: ArcSwap<Conf>,
    /// One reload at a time.
    reloading: Mutex<()>,
    events: Arc<EventBus>,
    /// None in ephemeral mode.
    persister: Option<Arc<Persister>>,
    metrics: Arc<Metrics>,
    permit_key: PermitKey,
    /// When this process started: a permit issued before it is late (its
    /// lease and reservation died with the previous process).
    boot: Time,
    /// Non-zero while recovering from a failed commit: the sequence number
    /// from which every target was queued again (see `persist.rs`).
    recovering: std::sync::atomic::AtomicU64,
    /// The permit key's secret when it is kept in the store (not configured):
    /// written again after a failure, in case the file itself was lost.
    stored_secret: Option<Box<[u8]>>,
    /// Route, caller and tenant spend limits (see `backend::ledger`).
    pub(crate) ledger: super::ledger::Ledger,
    /// Targets created on first use per tenant (`[tenants.<name>] max_targets`).
    tenant_targets: super::quota::TenantTargets,
}

impl LocalBackend {
    /// A backend over `config` with nothing persisted (ephemeral, benches,
    /// tests), every configured target and route member created up front.
    pub fn new(
        config: Arc<Config>,
        clock: Arc<dyn Clock>,
        events: Arc<EventBus>,
        metrics: Arc<Metrics>,
    ) -> LocalBackend {
        let groups: Vec<Arc<LocalGroup>> = config
            .groups
            .iter()
            .map(|g| LocalGroup::new(g.name.clone(), g.budget.clone()))
            .collect();
        let default_conf = conf(&config.default_target, &groups);
        let secret = config
            .server
            .permit_key
            .as_deref()
            .map(|k| k.as_bytes().to_vec())
            .or_else(PermitKey::generate_secret)
            .unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec());
        let b = LocalBackend {
            targets: DashMap::new(),
            created: AtomicUsize::new(0),
            groups: ArcSwap::from_pointee(groups),
            default_conf: ArcSwap::new(default_conf),
            reloading: Mutex::new(()),
            events,
            persister: None,
            metrics,
            permit_key: PermitKey::new(&secret),
            boot: clock.now(),
            recovering: std::sync::atomic::AtomicU64::new(0),
            stored_secret: None,
            ledger: Default::default(),
            tenant_targets: Default::default(),
            clock,
            config: ArcSwap::new(config.clone()),
        };
        let groups = b.groups.load();
        for (name, settings) in &config.targets {
            b.insert_target(Arc::from(name.as_str()), conf(settings, &groups));
        }
        // Route members exist from the start (so GetTarget and dashboards see
        // them before their first call); they do not count towards max_targets.
        for name in config.routes.values().flat_map(|r| r.targets.iter()) {
            if !b.targets.contains_key(name.as_ref()) {
                b.insert_target(name.clone(), b.default_conf.load_full());
            }
        }
        drop(groups);
        b
    }

    /// A backend restored from `store`, reconciled with the config: targets
    /// removed from the config are dropped, changed settings apply, open
    /// periods that ran out while down become half-open. The deferred queue's
    /// records go to `queue`, whose cleanup writes are committed with the
    /// backend's before the writer thread starts.
    pub fn open<Q>(
        config: Arc<Config>,
        clock: Arc<dyn Clock>,
        events: Arc<EventBus>,
        metrics: Arc<Metrics>,
        store: Box<dyn Store>,
        queue: impl FnOnce(QueueLoad, Time) -> (Q, Vec<Op>),
    ) -> std::result::Result<(LocalBackend, LoadReport, Q), StoreError> {
        let started = std::time::Instant::now();
        let loaded = store.load()?;
        let mut b = LocalBackend::new(config.clone(), clock, events, metrics);
        let mut cleanup = Vec::new();
        if config.server.permit_key.is_none() {
            // A generated key is kept, so permits outlive a restart.
            match &loaded.permit_key {
                Some(k) if !k.is_empty() => {
                    b.permit_key = PermitKey::new(k);
                    b.stored_secret = Some(k.clone().into_boxed_slice());
                }
                _ => {
                    let secret = PermitKey::generate_secret().ok_or_else(|| {
                        StoreError("the OS could not provide random bytes for a permit key".into())
                    })?;
                    b.permit_key = PermitKey::new(&secret);
                    b.stored_secret = Some(secret.clone().into_boxed_slice());
                    cleanup.push(Op::PermitKey(secret));
                }
            }
        }
        let now = b.clock.now();
        let mut report = LoadReport::default();
        for (name, rec) in loaded.targets {
            let t = if let Some(t) = b.targets.get(name.as_str()).map(|t| t.clone()) {
                t
            } else if rec.configured {
                // Declared in the config it was saved under, gone from this one.
                report.dropped += 1;
                cleanup.push(Op::Target(Arc::from(name.as_str()), None));
                continue;
            } else {
                match b.target(&name) {
                    Ok(t) => t,
                    Err(_) => {
                        report.dropped += 1;
                        cleanup.push(Op::Target(Arc::from(name.as_str()), None));
                        continue;
                    }
                }
            };
            let mut l = t.lock();
            l.st = codec::restore(&t.cx(), &rec, now, first_permit_id(b.boot));
            b.metrics.set_state(&t.metrics, l.st.breaker.state());
            report.targets += 1;
            if l.st.breaker.state() != BreakerState::Closed {
                report.not_closed += 1;
            }
        }
        if loaded.unclean {
            // Targets without a record may have spent in the lost second too.
            for e in b.targets.iter() {
                let t = e.value();
                let mut l = t.lock();
                for slot in l.st.slots.iter_mut() {
                    slot.budget.drain(now, &t.conf.settings.budget);
                }
            }
        }
        for (name, rec) in loaded.groups {
            match b.groups.load().iter().find(|g| g.name.as_ref() == name) {
                Some(g) => *lock(&g.state) = codec::decode_group(&rec, &g.config, now, true),
                None => cleanup.push(Op::Group(Arc::from(name.as_str()), None)),
            }
        }
        cleanup.extend(
            b.ledger
                .restore(loaded.spends, &b.config.load().spend_scopes, now),
        );
        report.items = loaded.items.len();
        report.dead = loaded.dead.len();
        let (queue, queue_ops) = queue(
            QueueLoad {
                items: loaded.items,
                dead: loaded.dead,
                idem: loaded.idem,
                next_item_id: loaded.next_item_id,
            },
            now,
        );
        cleanup.extend(queue_ops);
        report.unclean = loaded.unclean;
        if loaded.unclean {
            for g in b.groups.load().iter() {
                lock(&g.state).budget.drain(now, &g.config);
            }
        }
        // Until a graceful shutdown says otherwise (see `mark_clean`).
        cleanup.push(Op::Running(true));
        store.commit(&cleanup)?;
        b.persister = Some(Arc::new(Persister::start(store, b.events.clone())));
        report.elapsed = started.elapsed();
        Ok((b, report, queue))
    }

    pub(crate) fn persister(&self) -> Option<&Arc<Persister>> {
        self.persister.as_ref()
    }

    pub fn permit_key(&self) -> &PermitKey {
        &self.permit_key
    }

    /// Number of targets held.
    pub fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// See [`super::DecisionBackend::reserve_spend`].
    pub fn reserve_spend(
        &self,
        scopes: &[Arc<crate::config::SpendScope>],
        cost: u64,
    ) -> super::SpendAnswer {
        super::SpendAnswer {
            refused: self.ledger.reserve(scopes, self.clock.now(), cost, 1).err(),
            degraded: false,
        }
    }

    /// See [`super::DecisionBackend::settle_spend`].
    pub fn settle_spend(
        &self,
        scopes: &[Arc<crate::config::SpendScope>],
        reserved: u64,
        actual: u64,
    ) {
        self.ledger
            .settle(scopes, self.clock.now(), reserved, actual, 1);
    }

    /// See [`super::DecisionBackend::spend_levels`].
    pub fn spend_levels(
        &self,
        scopes: &[Arc<crate::config::SpendScope>],
    ) -> Vec<super::ledger::ScopeLevel> {
        self.ledger.levels(scopes.iter(), self.clock.now())
    }

    fn insert_target(&self, name: Arc<str>, conf: Arc<Conf>) -> Arc<Target> {
        let t = Arc::new(Target::new(
            name.clone(),
            conf,
            self.metrics.for_target(&name),
            first_permit_id(self.boot),
        ));
        self.targets.insert(name, t.clone());
        t
    }

    /// The target, created with default settings on first use (up to `max_targets`).
    pub fn target(&self, name: &str) -> Result<Arc<Target>> {
        if let Some(t) = self.targets.get(name) {
            return Ok(t.clone());
        }
        validate_target(name)?;
        let config = self.config.load();
        let max = config.server.max_targets;
        if self.created.load(Ordering::Relaxed) >= max {
            return Err(EngineError::ResourceExhausted(format!(
                "target {name:?} is unknown and the server already tracks the maximum of {max} targets created on first use; \
                 declare it in the config file or raise [server] max_targets"
            )));
        }
        let tenant = self.tenant_targets.check(&config, name)?;
        drop(config);
        // One allocation of the name, shared by the map key and the target.
        let key: Arc<str> = Arc::from(name);
        let entry = self.targets.entry(key.clone());
        let t = entry.or_insert_with(|| {
            self.created.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = &tenant {
                self.tenant_targets.created(t);
            }
            // Read inside the map's entry lock: a reload's sweep, which
            // reads the map after replacing the default, cannot miss it.
            Arc::new(Target::new(
                key,
                self.default_conf.load_full(),
                self.metrics.for_target(name),
                first_permit_id(self.boot),
            ))
        });
        Ok(t.clone())
    }

    /// An existing target, without creating it.
    pub fn existing(&self, name: &str) -> Result<Arc<Target>> {
        validate_target(name)?;
        self.targets.get(name).map(|t| t.clone()).ok_or_else(|| {
            EngineError::NotFound(format!(
                "target {name:?} is not configured and has not been used yet"
            ))
        })
    }

    /// Runs `f` with the target's budget groups held, in index order (the
    /// target's own lock is already held: targets first, then groups, always).
    fn with_groups<R>(&self, t: &Target, f: impl FnOnce(&mut [GroupRef<'_>]) -> R) -> R {
        let groups = &t.conf.groups;
        if groups.is_empty() {
            return f(&mut []);
        }
        let mut guards: Vec<MutexGuard<'_, GroupState>> =
            groups.iter().map(|g| lock(&g.state)).collect();
        let mut refs: Vec<GroupRef<'_>> = guards
            .iter_mut()
            .zip(groups.iter())
            .map(|(state, g)| GroupRef {
                name: &g.name,
                config: &g.config,
                state,
            })
            .collect();
        f(&mut refs)
    }

    /// Ends a critical section (the target is still locked): publishes its
    /// events and, if durable state changed, queues a snapshot for the store.
    /// Snapshots are queued under the lock so they reach the store in order.
    /// Returns what the answer must wait for before it leaves.
    fn finish(&self, now: Time, target: &Target, l: &Locked, fx: &mut Effects) -> Option<Pending> {
        if let Some(limit) = fx.adaptive_limit {
            self.metrics.set_adaptive_limit(&target.metrics, limit);
        }
        for kind in &fx.events {
            if let EventKind::BreakerTransition { from, to, .. } = *kind {
                self.metrics.transition(&target.metrics, from, to);
            }
        }
        let Some(p) = &self.persister else {
            for kind in fx.events.drain(..) {
                self.events.publish(now, &target.name, kind);
            }
            return None;
        };
        let pending_events = |fx: &mut Effects| -> Vec<persist::PendingEvent> {
            fx.events
                .drain(..)
                .map(|k| (now, target.name.clone(), k))
                .collect()
        };
        if fx.durable {
            let record = Op::Target(
                target.name.clone(),
                Some(codec::encode(&target.cx(), &l.st)),
            );
            let (pending, seq) = p.write(vec![record], pending_events(fx));
            target.durable_seq.store(seq, Ordering::Release);
            return Some(pending);
        }
        let bits = if fx.state_dirty {
            DIRTY_STATE | DIRTY_COUNTERS
        } else if fx.counted {
            DIRTY_COUNTERS
        } else {
            0
        };
        // A load first: most decisions find the bits already set and skip the write.
        if bits != 0 && target.dirty.load(Ordering::Relaxed) & bits != bits {
            target.dirty.fetch_or(bits, Ordering::Relaxed);
        }
        let seq = target.durable_seq.load(Ordering::Acquire);
        if seq > p.committed() {
            // An earlier change of this target is not on disk yet: this answer
            // must not reveal it before it is, and its events queue behind it.
            if !fx.events.is_empty() {
                p.publish_after(pending_events(fx));
            }
            Some(p.wait_for(seq))
        } else {
            for kind in fx.events.drain(..) {
                self.events.publish(now, &target.name, kind);
            }
            None
        }
    }

    /// Waits until a decision's durable change is on disk, so that a client is
    /// never told about a transition a crash could forget.
    ///
    /// If the store failed, the change is still in memory (a breaker that
    /// opened stays open: the safe side) but not on disk: the target is marked
    /// dirty so the next write-behind flush that succeeds writes it, and the
    /// answer is UNAVAILABLE naming the store and the OS error.
    async fn durable(t: &Target, pending: Option<Pending>) -> Result<()> {
        match pending {
            None => Ok(()),
            Some(p) => p.wait().await.map_err(|e| {
                t.dirty
                    .fetch_or(DIRTY_STATE | DIRTY_COUNTERS, Ordering::Relaxed);
                EngineError::Unavailable(format!(
                    "the decision could not be made durable, so it was not acknowledged: {e}"
                ))
            }),
        }
    }

    /// Decides one admission (the permit is unsigned: the engine signs it).
    pub async fn admit(&self, name: &str, args: &AdmitArgs<'_>) -> Result<Admission> {
        let mut fx = Effects::default();
        let (t, adm, pending) = loop {
            let t = self.target(name)?;
            let mut l = t.lock();
            if stale(&t) {
                // A reload is putting its successor in the map, or carrying
                // a group's state in: look again, holding nothing.
                drop(l);
                std::thread::yield_now();
                continue;
            }
            let now = self.clock.now();
            let adm = self.with_groups(&t, |g| {
                unit::admit(&t.cx(), &mut l.st, g, now, args, &mut fx)
            });
            let pending = self.finish(now, &t, &l, &mut fx);
            drop(l);
            break (t, adm, pending);
        };
        t.metrics
            .decision(adm.shadow_reason.unwrap_or(adm.reason), args.attempt);
        Self::durable(&t, pending).await?;
        Ok(adm)
    }

    /// Applies a classified, validated outcome. Settles each permit once.
    pub async fn record(
        &self,
        name: &str,
        mut args: OutcomeArgs<'_>,
        rand01: f64,
    ) -> Result<OutcomeResult> {
        if let Trust::Permit(p) = args.trust
            && p.issued_ms < self.boot.as_millis()
        {
            // Issued by the previous process: its lease and reservation are gone.
            args.trust = Trust::Late(p);
        }
        let mut fx = Effects::default();
        let (t, result, pending) = loop {
            let t = self.target(name)?;
            let mut l = t.lock();
            if stale(&t) {
                // A reload is putting its successor in the map, or carrying
                // a group's state in: look again, holding nothing.
                drop(l);
                std::thread::yield_now();
                continue;
            }
            let now = self.clock.now();
            let mut duplicate = None;
            // Settle once: the first report of a permit counts; a duplicate
            // (a retried call, a replay) changes nothing and gets the first answer.
            if let Trust::Permit(p) = args.trust {
                let lifetime = t.cx().permit_lifetime();
                let issued = Time::from_millis(p.issued_ms);
                match l
                    .settled
                    .get_or_insert_with(Default::default)
                    .settle(p.id, issued, now, lifetime)
                {
                    Seen::First => {}
                    Seen::Again(first) => {
                        duplicate = Some(unit::duplicate_answer(
                            &t.cx(),
                            &l.st,
                            now,
                            args.class,
                            args.attempt,
                            first,
                        ));
                    }
                    Seen::Forgotten => args.trust = Trust::Late(p),
                }
            }
            let (r, pending) = match duplicate {
                Some(d) => {
                    // Answered only once the state it reflects is durable.
                    let seq = t.durable_seq.load(Ordering::Acquire);
                    (d, self.persister.as_ref().map(|p| p.wait_for(seq)))
                }
                None => {
                    let l = &mut *l;
                    let r = self.with_groups(&t, |g| {
                        unit::record(&t.cx(), &mut l.st, g, now, &args, rand01, &mut fx)
                    });
                    if let (Trust::Permit(p), Some(log)) = (args.trust, l.settled.as_mut()) {
                        log.answered(
                            p.id,
                            SettledAnswer {
                                class: r.classified_as,
                                advice: r.advice,
                            },
                        );
                    }
                    t.metrics
                        .outcome(args.class, args.latency, r.cost_micros, args.caller);
                    let pending = self.finish(now, &t, l, &mut fx);
                    (r, pending)
                }
            };
            drop(l);
            break (t, r, pending);
        };
        Self::durable(&t, pending).await?;
        Ok(result)
    }

    /// Forces a breaker open or closed, or returns it to automatic control.
    pub async fn force(&self, name: &str, mode: Mode, reason: &str) -> Result<TargetView> {
        let mut fx = Effects::default();
        let (t, pending) = loop {
            let t = self.target(name)?;
            let mut l = t.lock();
            if stale(&t) {
                // A reload is putting its successor in the map, or carrying
                // a group's state in: look again, holding nothing.
                drop(l);
                std::thread::yield_now();
                continue;
            }
            let now = self.clock.now();
            operate::force(&t.cx(), &mut l.st, now, mode, reason, &mut fx);
            let pending = self.finish(now, &t, &l, &mut fx);
            drop(l);
            break (t, pending);
        };
        Self::durable(&t, pending).await?;
        Ok(self.view_of(&t))
    }

    /// Back to a fresh closed breaker, full budgets, no pauses or disabled keys.
    pub async fn reset(&self, name: &str) -> Result<TargetView> {
        let mut fx = Effects::default();
        let (t, pending) = loop {
            let t = self.existing(name)?;
            let mut l = t.lock();
            if stale(&t) {
                // A reload is putting its successor in the map, or carrying
                // a group's state in: look again, holding nothing.
                drop(l);
                std::thread::yield_now();
                continue;
            }
            let now = self.clock.now();
            self.with_groups(&t, |g| operate::reset(&t.cx(), &mut l.st, g, now, &mut fx));
            let pending = self.finish(now, &t, &l, &mut fx);
            drop(l);
            break (t, pending);
        };
        Self::durable(&t, pending).await?;
        Ok(self.view_of(&t))
    }

    /// Before a read: applies what time did to the target and publishes it.
    /// Those changes follow from durable state, so nothing here waits.
    fn apply_time(&self, now: Time, t: &Target, l: &mut Locked) {
        let mut fx = Effects::default();
        operate::tick(&t.cx(), &mut l.st, now, &mut fx);
        if !fx.events.is_empty() || fx.state_dirty {
            // Never durable (time-driven), so finish never returns a wait here
            // unless an earlier write is pending, which a read need not await.
            let _ = self.finish(now, t, l, &mut fx);
        }
    }

    fn view_of(&self, t: &Arc<Target>) -> TargetView {
        let mut t = t.clone();
        loop {
            let l = t.lock();
            if !stale(&t) {
                break;
            }
            drop(l);
            std::thread::yield_now();
            if let Some(now_held) = self.targets.get(t.name.as_ref()).map(|e| e.clone()) {
                t = now_held;
            }
        }
        let t = &t;
        let now = self.clock.now();
        let mut l = t.lock();
        self.apply_time(now, t, &mut l);
        let l = &mut *l;
        self.with_groups(t, |g| {
            unit::view::view(&t.cx(), &t.name, &t.conf.settings, &mut l.st, g, now)
        })
    }

    /// Full state of one target.
    pub fn view(&self, name: &str) -> Result<TargetView> {
        let t = self.existing(name)?;
        Ok(self.view_of(&t))
    }

    /// Targets sorted by name, filtered by prefix, paginated by the last name seen.
    pub fn list(&self, prefix: &str, size: usize, page_token: &str) -> TargetPage {
        let mut names: Vec<Arc<str>> = self
            .targets
            .iter()
            .filter(|e| e.key().starts_with(prefix))
            .map(|e| e.key().clone())
            .collect();
        names.sort();
        let total = names.len() as u64;
        let start = if page_token.is_empty() {
            0
        } else {
            names.partition_point(|n| n.as_ref() <= page_token)
        };
        let now = self.clock.now();
        let mut targets: Vec<TargetSummary> = Vec::new();
        for name in names.iter().skip(start).take(size) {
            if let Some(t) = self.targets.get(name.as_ref()) {
                let mut l = t.lock();
                self.apply_time(now, &t, &mut l);
                targets.push(summary(name, &t.conf.settings, &l.st));
            }
        }
        let next_page_token = if start + size < names.len() {
            targets
                .last()
                .map(|t| t.name.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        TargetPage {
            targets,
            next_page_token,
            total,
        }
    }

    /// Views of every target (or of those named), sorted by name, at most `max`.
    pub fn views(&self, only: &std::collections::HashSet<String>, max: usize) -> Vec<TargetView> {
        let mut names: Vec<Arc<str>> = self
            .targets
            .iter()
            .filter(|e| only.is_empty() || only.contains(e.key().as_ref()))
            .map(|e| e.key().clone())
            .collect();
        names.sort();
        names.truncate(max);
        names
            .iter()
            .filter_map(|n| self.targets.get(n.as_ref()).map(|t| t.clone()))
            .map(|t| self.view_of(&t))
            .collect()
    }

    /// Write-behind: queues the state of up to [`MAX_FLUSH`] targets changed
    /// since the last flush (counters, budget levels) and of every budget
    /// group. Called about once a second; what it writes is approximate across
    /// a crash by design. Returns the pending write and how many targets it
    /// covers (call again while that is `MAX_FLUSH` to drain a backlog).
    ///
    /// The third value is Some(n) when this flush completed a recovery from
    /// a failed commit (every target written again since sequence number
    /// `n`): the caller writes what else it holds (the deferred queue), then
    /// [`LocalBackend::mark_recovered`].
    pub fn flush_dirty(&self) -> (Pending, usize, Option<u64>) {
        self.flush(DIRTY_STATE)
    }

    /// Ends a recovery (see [`LocalBackend::flush_dirty`]); resolves once
    /// the mark is committed.
    pub fn mark_recovered(&self, from: u64) -> Pending {
        match &self.persister {
            Some(p) => p.wait_for(p.mark_recovered(from)),
            None => Pending::none(),
        }
    }

    /// Queues targets with any of `mask` dirty (see [`LocalBackend::flush_dirty`]).
    fn flush(&self, mask: u8) -> (Pending, usize, Option<u64>) {
        let Some(p) = &self.persister else {
            return (Pending::none(), 0, None);
        };
        if let Some(from) = p.take_lost() {
            // A commit failed: what it carried may be any target's latest
            // state, so every target is written again, then a recovery mark
            // (persist.rs): the store is back once that mark commits with no
            // failure since `from`, or this flush fails too and it starts over.
            self.recovering.store(from, Ordering::Release);
            for entry in self.targets.iter() {
                entry
                    .value()
                    .dirty
                    .fetch_or(DIRTY_STATE | DIRTY_COUNTERS, Ordering::Relaxed);
            }
        }
        let (mut n, mut last) = (0, 0);
        for entry in self.targets.iter() {
            if n >= MAX_FLUSH {
                break;
            }
            let t = entry.value();
            if t.dirty.load(Ordering::Relaxed) & mask != 0
                && t.dirty.swap(0, Ordering::Relaxed) != 0
            {
                // Queued under the target's lock, like durable writes, so a
                // flushed snapshot can never land after a newer one.
                let l = t.lock();
                if t.retired.load(Ordering::Relaxed) {
                    // A reload replaced it after this flush read the map.
                    continue;
                }
                last = p.write_behind(vec![Op::Target(
                    t.name.clone(),
                    Some(codec::encode(&t.cx(), &l.st)),
                )]);
                n += 1;
            }
        }
        for g in self.groups.load().iter() {
            let rec: GroupRecord = codec::encode_group(&lock(&g.state));
            last = p.write_behind(vec![Op::Group(g.name.clone(), Some(rec))]);
        }
        let spends = self.ledger.flush();
        if !spends.is_empty() {
            last = p.write_behind(spends);
        }
        // An empty write: even an idle server notices within a second that
        // its store file was removed or replaced (see `RedbStore`). Waited
        // for with the rest, so a flush also reports that failure.
        last = last.max(p.publish_after(Vec::new()));
        let from = self.recovering.load(Ordering::Acquire);
        let recovered = (from != 0 && n < MAX_FLUSH).then(|| {
            // Every target dirty since the failure is queued; the key too,
            // in case the failure was the file itself.
            self.recovering.store(0, Ordering::Release);
            if let Some(k) = &self.stored_secret {
                p.write_behind(vec![Op::PermitKey(k.to_vec())]);
            }
            // The file may be new: it must still say a server is running.
            p.write_behind(vec![Op::Running(true)]);
            from
        });
        (p.wait_for(last), n, recovered)
    }

    /// Flushes every dirty target (shutdown).
    ///
    /// `rewrite_rest` queues what else must be written again when this
    /// flush completes a recovery (the deferred queue, see
    /// [`LocalBackend::flush_dirty`]), before the recovery mark.
    ///
    /// A failure found on the way (the file removed just before shutdown)
    /// gets a recovery here too, so nothing is lost; up to a few attempts,
    /// then the last error.
    pub async fn flush_all(&self, rewrite_rest: &dyn Fn()) -> std::result::Result<(), StoreError> {
        let mut failures = 0;
        loop {
            let (pending, n, recovered) = self.flush(DIRTY_STATE | DIRTY_COUNTERS);
            let pending = match recovered {
                Some(from) => {
                    rewrite_rest();
                    self.mark_recovered(from)
                }
                None => pending,
            };
            match pending.wait().await {
                Err(e) => {
                    failures += 1;
                    if failures >= 4 {
                        return Err(e);
                    }
                }
                Ok(()) => {
                    let healthy = self
                        .persister
                        .as_ref()
                        .is_none_or(|p| p.health().borrow().failing().is_none());
                    if n < MAX_FLUSH && healthy {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Records a graceful shutdown, once everything is flushed: the next
    /// start trusts the budget levels it finds (after a crash it empties
    /// them, see [`crate::domain::budget::BudgetState::drain`]).
    pub async fn mark_clean(&self) -> std::result::Result<(), StoreError> {
        match &self.persister {
            Some(p) => {
                p.wait_for(p.write_behind(vec![Op::Running(false)]))
                    .wait()
                    .await
            }
            None => Ok(()),
        }
    }

    /// Refreshes the budget-headroom gauges (read at scrape time).
    pub fn refresh_gauges(&self) {
        let now = self.clock.now();
        for entry in self.targets.iter() {
            let t = entry.value();
            if t.metrics.label.as_ref() == metrics::OTHER
                || (t.conf.settings.budget.is_unlimited() && t.conf.groups.is_empty())
            {
                continue;
            }
            let l = t.lock();
            if let Some(a) = &t.conf.settings.budget.adaptive {
                // Also after a restart or reload, before anything moved it.
                let limit = a.clamp(l.st.adaptive().map_or(a.initial, |s| s.limit));
                self.metrics.set_adaptive_limit(&t.metrics, limit);
            }
            for (i, slot) in l.st.slots.iter().enumerate() {
                for kind in Kind::ALL {
                    if let Some(rate) = t.conf.settings.budget.rate(kind) {
                        self.metrics.set_budget_remaining(
                            &t.name,
                            t.cx().slot_name(i).as_deref().unwrap_or_default(),
                            kind,
                            slot.budget.cell(kind).available(now, &rate),
                        );
                    }
                }
            }
        }
    }

    /// Charges every key slot's budget of a target `n` requests now
    /// (cluster mode: a fresh fallback's allowance for the other replicas'
    /// unseen admissions; see `BudgetState::charge_requests`).
    pub fn charge_for_peers(&self, name: &str, n: u64) {
        let Some(t) = self.targets.get(name).map(|t| t.clone()) else {
            return;
        };
        let now = self.clock.now();
        let mut l = t.lock();
        for slot in l.st.slots.iter_mut() {
            slot.budget.charge_requests(now, &t.conf.settings.budget, n);
        }
    }

    /// The same for a budget group (charged once, however many targets share it).
    pub fn charge_group_for_peers(&self, group: usize, n: u64) {
        if let Some(g) = self.groups.load().get(group) {
            lock(&g.state)
                .budget
                .charge_requests(self.clock.now(), &g.config, n);
        }
    }

    /// Makes a target's breaker open until at least `open_until` (cluster
    /// mode: a degraded fallback taking in an open period another replica
    /// announced; see `Breaker::learn_open`).
    pub fn learn_open(&self, name: &str, open_until: Time) {
        if let Ok(t) = self.target(name) {
            let now = self.clock.now();
            let mut l = t.lock();
            if l.st.breaker.learn_open(now, open_until) {
                self.metrics.set_state(&t.metrics, l.st.breaker.state());
            }
        }
    }

    /// Replaces a target's state with `rec`, exactly (cluster mode: seeds the
    /// degraded fallback with the last state known from Redis).
    pub fn seed(&self, name: &str, rec: &store::TargetRecord) {
        if let Ok(t) = self.target(name) {
            let mut l = t.lock();
            l.st = codec::decode(&t.cx(), rec, first_permit_id(self.boot));
        }
    }

    /// Replaces a budget group's state (cluster mode: seeding the fallback).
    pub fn seed_group(&self, group: usize, rec: &GroupRecord) {
        if let Some(g) = self.groups.load().get(group) {
            *lock(&g.state) = codec::decode_group(rec, &g.config, self.clock.now(), false);
        }
    }

    /// A target's state as a record, and its groups' (cluster mode: merging
    /// back what the fallback decided).
    pub fn export(&self, name: &str) -> Option<(store::TargetRecord, Vec<(usize, GroupRecord)>)> {
        let t = self.targets.get(name)?.clone();
        let l = t.lock();
        let all = self.groups.load();
        let groups = t
            .conf
            .groups
            .iter()
            .filter_map(|g| {
                let ix = all.iter().position(|a| Arc::ptr_eq(a, g))?;
                Some((ix, codec::encode_group(&lock(&g.state))))
            })
            .collect();
        Some((codec::encode(&t.cx(), &l.st), groups))
    }

    /// Where state is kept, for logs.
    pub fn store_description(&self) -> &str {
        self.persister
            .as_ref()
            .map_or("memory (ephemeral)", |p| p.describe())
    }

    /// Checks a key slot name of `name`'s target, for messages.
    pub fn unknown_slot(name: &str, slot: &str, keys: &[Arc<str>]) -> EngineError {
        invalid(format!(
            "unknown key slot {slot:?} for target {name:?}; its slots are {keys:?}"
        ))
    }
}
