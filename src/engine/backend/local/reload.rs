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
//! Budget levels are GCRA arrival times, kept as they are: under a new rate
//! the same time-debt means the same *fraction* of the budget used (50 of
//! 100 used becomes 5 of 10 used), so what is admitted after the reload
//! never exceeds the new limit, and old plus new never exceeds the larger.
//!
//! Budget groups are replaced the same way: a group whose budget changed
//! gets a new state object, locked by the reload from before the first
//! target that draws on it is replaced until every target that drew on the
//! old one is retired and the old state is copied in. Decisions on those
//! targets wait on that lock for the length of the reload; nothing else does.

use super::store::Op;
use super::target::{Conf, DIRTY_COUNTERS, DIRTY_STATE, Locked};
use super::{LocalBackend, LocalGroup, Target, conf, lock};
use crate::config::Config;
use crate::domain::event::EventKind;
use crate::domain::unit::{codec, first_permit_id};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

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
    /// their running values). One reload runs at a time; decisions go on
    /// throughout.
    pub fn reload(&self, new: &Arc<Config>) -> Reloaded {
        let _one = lock(&self.reloading);
        let now = self.clock.now();
        let old_groups = self.groups.load_full();

        // 1. Groups: one whose name and budget are unchanged keeps its state
        //    object; the others are new, and stay locked until step 4.
        let mut carried: Vec<(Arc<LocalGroup>, Arc<LocalGroup>)> = Vec::new();
        let groups: Vec<Arc<LocalGroup>> = new
            .groups
            .iter()
            .map(|g| {
                let old = old_groups.iter().find(|o| o.name == g.name);
                match old {
                    Some(o) if o.config == g.budget => o.clone(),
                    _ => {
                        let fresh = LocalGroup::new(g.name.clone(), g.budget.clone());
                        if let Some(o) = old {
                            carried.push((o.clone(), fresh.clone()));
                        }
                        fresh
                    }
                }
            })
            .collect();
        // Locked before any target can reach them (only targets inserted
        // below can), so this cannot deadlock with a decision.
        let fresh_locks: Vec<Arc<LocalGroup>> = carried.iter().map(|(_, n)| n.clone()).collect();
        let mut held: Vec<MutexGuard<'_, _>> = fresh_locks.iter().map(|g| lock(&g.state)).collect();

        // 2. The new config and defaults: targets created on first use from
        //    here on get the new defaults.
        let default_conf = conf(&new.default_target, &groups);
        self.default_conf.store(default_conf.clone());
        self.config.store(new.clone());
        self.groups.store(Arc::new(groups.clone()));

        // 3. Every target held: replaced if what it should be differs.
        let members: HashSet<&str> = new
            .routes
            .values()
            .flat_map(|r| r.targets.iter().map(|t| t.as_ref()))
            .collect();
        let mut confs: HashMap<Arc<str>, Arc<Conf>> = HashMap::new();
        let mut report = Reloaded::default();
        let held_now: Vec<Arc<Target>> = self.targets.iter().map(|e| e.value().clone()).collect();
        let mut seen: HashSet<Arc<str>> = HashSet::new();
        for t in held_now {
            seen.insert(t.name.clone());
            let wanted = match new.targets.get(t.name.as_ref()) {
                Some(s) => confs
                    .entry(t.name.clone())
                    .or_insert_with(|| conf(s, &groups))
                    .clone(),
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
            if wanted.settings.configured && !t.conf.settings.configured {
                // Declared now: no longer counts as created on first use.
                self.created.fetch_sub(1, Ordering::Relaxed);
            }
            self.replace(&t, wanted, now);
            if t.conf.settings.configured {
                report.changed.push(t.name.to_string());
            } else if new.targets.contains_key(t.name.as_ref()) {
                report.added.push(t.name.to_string());
            }
        }
        for (name, s) in &new.targets {
            if seen.contains(name.as_str()) {
                continue;
            }
            let key: Arc<str> = Arc::from(name.as_str());
            let wanted = conf(s, &groups);
            match self.targets.get(name.as_str()).map(|e| e.clone()) {
                // Created on first use while this reload ran.
                Some(t) => self.replace(&t, wanted, now),
                None => {
                    self.insert_target(key, wanted);
                }
            }
            report.added.push(name.clone());
        }
        for name in members {
            if !self.targets.contains_key(name) {
                self.insert_target(Arc::from(name), default_conf.clone());
            }
        }

        // 4. Every target that drew on a replaced group is retired: its
        //    state is final and moves to the new group.
        for ((old, fresh), guard) in carried.iter().zip(held.iter_mut()) {
            let rec = codec::encode_group(&lock(&old.state));
            let mut g = codec::decode_group(&rec, &old.config, now, false);
            g.budget.clamp_debt(now, &fresh.config);
            **guard = g;
        }
        drop(held);
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
                s.budget.clamp_debt(now, &fresh.conf.settings.budget);
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
    /// deletion is on disk.
    fn remove(&self, t: &Arc<Target>, now: crate::domain::Time) {
        {
            let _l = t.lock();
            if t.retired.load(Ordering::Relaxed) {
                return;
            }
            t.retired.store(true, Ordering::Relaxed);
        }
        self.targets
            .remove_if(t.name.as_ref(), |_, held| Arc::ptr_eq(held, t));
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
