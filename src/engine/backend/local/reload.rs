//! Applying a new config to the embedded backend without losing state.
//!
//! A target's settings are immutable (every decision reads them without a
//! lock), so a target whose settings changed is *replaced*: under the old
//! target's lock its state is encoded with the old settings and decoded
//! with the new ones (the same exact record cluster replicas exchange, so
//! leases, probes, permit ids, pauses, disabled keys and the breaker's phase
//! all carry over), the new target goes into the map, and the old one is
//! marked `retired` before its lock is released. A decision that had looked
//! up the old target finds it retired once it gets the lock and looks up
//! again, so no decision ever lands on a state that was already copied.
//!
//! Budget levels keep the *fraction* of the window used (50 of 100 used
//! becomes 5 of 10 used; a minute's budget fully used stays fully used when
//! the window becomes an hour), so what is admitted after the reload never
//! exceeds the new limit, and old plus new never exceeds the larger.
//!
//! Budget groups are replaced the same way: a group whose budget changed
//! gets a new state object, not `ready` until every target that drew on the
//! old one is retired and the old state is carried in. A decision on a
//! target that draws on a group not ready yet lets go of every lock and
//! looks again, so nothing the reload waits for (a map shard, a target)
//! is ever held by a decision waiting for the reload.

use super::store::Op;
use super::target::{Conf, DIRTY_COUNTERS, DIRTY_STATE, Locked};
use super::{LocalBackend, LocalGroup, Target, conf, lock};
use crate::config::Config;
use crate::domain::event::EventKind;
use crate::domain::unit::{codec, first_permit_id};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// What a reload did to the targets held (names sorted).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reloaded {
    /// Declared by the new config and not held before.
    pub added: Vec<String>,
    /// Declared by the old config only: dropped with their state.
    pub removed: Vec<String>,
    /// Held before with other settings (or other budget groups): replaced,
    /// state carried over.
    pub changed: Vec<String>,
}

impl LocalBackend {
    /// Applies `new` (already validated, with restart-only settings kept at
    /// their running values). One reload at a time; decisions go on
    /// throughout (those on a target being replaced wait for it, holding
    /// no lock).
    pub fn reload(&self, new: &Arc<Config>) -> Reloaded {
        let _one = lock(&self.reloading);
        let now = self.clock.now();
        let old_groups = self.groups.load_full();

        // 1. Groups: one whose name and budget are unchanged keeps its state
        //    object; the others are new and not `ready` until step 4, so no
        //    decision draws on them before the old state is carried in.
        let mut carried: Vec<(Arc<LocalGroup>, Arc<LocalGroup>)> = Vec::new();
        let groups: Vec<Arc<LocalGroup>> = new
            .groups
            .iter()
            .map(|g| {
                let old = old_groups.iter().find(|o| o.name == g.name);
                match old {
                    Some(o) if o.config == g.budget => o.clone(),
                    Some(o) => {
                        let fresh =
                            LocalGroup::with_readiness(g.name.clone(), g.budget.clone(), false);
                        carried.push((o.clone(), fresh.clone()));
                        fresh
                    }
                    None => LocalGroup::new(g.name.clone(), g.budget.clone()),
                }
            })
            .collect();

        // 2. The new config and defaults: targets created on first use from
        //    here on get the new defaults.
        let default_conf = conf(&new.default_target, &groups);
        self.default_conf.store(default_conf.clone());
        self.config.store(new.clone());
        self.groups.store(Arc::new(groups.clone()));

        // 3. Every target held: replaced if what it should be differs. No
        //    lock is held while the map is written (readers of the map lock
        //    targets while holding a shard).
        let members: HashSet<&str> = new
            .routes
            .values()
            .flat_map(|r| r.targets.iter().map(|t| t.as_ref()))
            .collect();
        let mut report = Reloaded::default();
        let held_now: Vec<Arc<Target>> = self.targets.iter().map(|e| e.value().clone()).collect();
        let mut seen: HashSet<Arc<str>> = HashSet::new();
        for t in held_now {
            seen.insert(t.name.clone());
            let wanted = match new.targets.get(t.name.as_ref()) {
                Some(s) => conf(s, &groups),
                None if t.conf.settings.configured && !members.contains(t.name.as_ref()) => {
                    self.remove(&t, now);
                    report.removed.push(t.name.to_string());
                    continue;
                }
                None => default_conf.clone(),
            };
            if same(&t.conf, &wanted) {
                continue;
            }
            let was_configured = t.conf.settings.configured;
            self.replace(&t, wanted, now);
            if was_configured {
                report.changed.push(t.name.to_string());
            } else if new.targets.contains_key(t.name.as_ref()) {
                report.added.push(t.name.to_string());
            }
        }
        // 4. Every target (held before this reload) that drew on a replaced group is retired: the old
        //    state is final. It moves in, re-expressed under the new budget,
        //    and the group opens for decisions.
        for (old, fresh) in &carried {
            let rec = codec::encode_group(&lock(&old.state));
            let mut g = codec::decode_group(&rec, &old.config, now, false);
            g.budget.rescale(now, &old.config, &fresh.config);
            *lock(&fresh.state) = g;
            fresh.ready.store(true, Ordering::Release);
        }
        let wanted_new = new
            .targets
            .iter()
            .filter(|(n, _)| !seen.contains(n.as_str()))
            .map(|(n, s)| (n.as_str(), conf(s, &groups), true))
            .chain(
                members
                    .iter()
                    .filter(|n| !seen.contains(**n) && !new.targets.contains_key(**n))
                    .map(|n| (*n, default_conf.clone(), false)),
            );
        for (name, wanted, declared) in wanted_new.collect::<Vec<_>>() {
            let key: Arc<str> = Arc::from(name);
            // One atomic step: a first use of the same name racing this
            // either lands first (and is replaced, state carried) or finds
            // the new target.
            let raced = match self.targets.entry(key.clone()) {
                dashmap::mapref::entry::Entry::Occupied(e) => Some(e.get().clone()),
                dashmap::mapref::entry::Entry::Vacant(v) => {
                    v.insert(Arc::new(Target::new(
                        key,
                        wanted.clone(),
                        self.metrics.for_target(name),
                        first_permit_id(self.boot),
                    )));
                    None
                }
            };
            if let Some(t) = raced {
                self.replace(&t, wanted, now);
            }
            if declared {
                report.added.push(name.to_string());
            }
        }
        // Targets created on first use, counted again from what is held
        // (declaring one, or a route member, takes it out of the count).
        let first_use = self
            .targets
            .iter()
            .filter(|e| !e.value().conf.settings.configured && !members.contains(e.key().as_ref()))
            .count();
        self.created.store(first_use, Ordering::Relaxed);

        for g in old_groups.iter() {
            if !new.groups.iter().any(|n| n.name == g.name)
                && let Some(p) = &self.persister
            {
                p.write_behind(vec![Op::Group(g.name.clone(), None)]);
            }
        }
        report.added.sort();
        report.removed.sort();
        report.changed.sort();
        report
    }

    /// Puts a target with `conf` in place of `t`, carrying its state.
    ///
    /// The map is touched only after the old target's lock is released
    /// (readers of the map lock targets while holding a shard): a decision
    /// that finds the old one retired in between simply looks again.
    fn replace(&self, t: &Arc<Target>, conf: Arc<Conf>, now: crate::domain::Time) {
        let (rec, settled, seq) = {
            let mut l = t.lock();
            if t.retired.load(Ordering::Relaxed) {
                return;
            }
            t.retired.store(true, Ordering::Relaxed);
            (
                codec::encode(&t.cx(), &l.st),
                l.settled.take(),
                t.durable_seq.load(Ordering::Acquire),
            )
        };
        let fresh = Target::new(
            t.name.clone(),
            conf,
            t.metrics.clone(),
            first_permit_id(self.boot),
        );
        {
            let mut st = codec::decode(&fresh.cx(), &rec, first_permit_id(self.boot));
            for s in st.slots.iter_mut() {
                s.budget
                    .rescale(now, &t.conf.settings.budget, &fresh.conf.settings.budget);
            }
            *fresh.lock() = Locked { st, settled };
        }
        // Answers on the new target wait for the old one's pending write.
        fresh.durable_seq.store(seq, Ordering::Release);
        // Written behind with the new settings' encoding.
        fresh
            .dirty
            .store(DIRTY_STATE | DIRTY_COUNTERS, Ordering::Relaxed);
        self.targets.insert(t.name.clone(), Arc::new(fresh));
    }

    /// Drops a target the config no longer declares, with an event once the
    /// deletion is on disk. The deletion is queued under the target's lock,
    /// before it leaves the map, so a first use of the same name right after
    /// writes its record after it, never before.
    fn remove(&self, t: &Arc<Target>, now: crate::domain::Time) {
        {
            let _l = t.lock();
            if t.retired.load(Ordering::Relaxed) {
                return;
            }
            t.retired.store(true, Ordering::Relaxed);
            let kind = EventKind::TargetRemoved {
                reason: "no longer in the config".into(),
            };
            match &self.persister {
                Some(p) => {
                    let _ = p.write(
                        vec![Op::Target(t.name.clone(), None)],
                        vec![(now, t.name.clone(), kind)],
                    );
                }
                None => {
                    self.events.publish(now, &t.name, kind);
                }
            }
        }
        self.targets
            .remove_if(t.name.as_ref(), |_, held| Arc::ptr_eq(held, t));
    }
}

/// Whether a target with `have` already is what `want` asks for.
fn same(have: &Conf, want: &Conf) -> bool {
    (Arc::ptr_eq(&have.settings, &want.settings) || have.settings == want.settings)
        && have.groups.len() == want.groups.len()
        && have
            .groups
            .iter()
            .zip(want.groups.iter())
            .all(|(a, b)| Arc::ptr_eq(a, b))
}
