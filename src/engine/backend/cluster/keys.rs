//! Redis key names, and which keys decide together.
//!
//! An *admission unit* is a target, or, for targets in shared budget groups,
//! every target and group connected through those groups (a decision on one
//! target draws on its groups, so their state must change in the same
//! atomic step). Every key of a unit carries the unit's hash tag, so a
//! unit's script touches one Redis Cluster slot:
//!
//! ```text
//! {prefix}:{t:<hash of target>}:t:<target>          the target's state (record + version)
//! {prefix}:{g:<hash of component>}:t:<target>       ... for a target in budget groups
//! {prefix}:{g:<hash of component>}:g:<group>        a budget group's state
//! {prefix}:{tag}:p:<target>:<permit id>             a settled permit (its first answer), until the permit expires
//! {prefix}:{tag}:c:<target>                         refusals answered from a replica's cache
//! {prefix}:{s}:s:<scope>                            a route's, caller's or tenant's spend cell
//! {prefix}:targets                                  the names of every target (listing, max_targets)
//! {prefix}:events                                   the event stream (all replicas read it)
//! {prefix}:permit-key                               the key that signs permits (set once)
//! {prefix}:replica:<id>, {prefix}:replicas          heartbeats
//! ```
//!
//! Tags are a hash of the name, not the name: a name may contain `{` or `}`,
//! which would change what Redis takes as the tag.

use crate::config::Config;
use crate::domain::unit::name_hash;
use std::collections::HashMap;
use std::sync::Arc;

/// Key names under one prefix, with the unit tag of every configured group.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// Group index -> its component's tag.
    group_tags: Vec<Arc<str>>,
}

fn find(parent: &mut [usize], mut i: usize) -> usize {
    while parent[i] != i {
        parent[i] = parent[parent[i]];
        i = parent[i];
    }
    i
}

impl Keys {
    /// Computes the connected components of targets and groups (targets
    /// that share a group, and groups shared by one target, are one unit).
    pub fn new(prefix: &str, config: &Config) -> Keys {
        let n = config.groups.len();
        let mut parent: Vec<usize> = (0..n).collect();
        for t in config.targets.values() {
            if let Some((&first, rest)) = t.groups.split_first() {
                for &g in rest {
                    let (a, b) = (find(&mut parent, first), find(&mut parent, g));
                    parent[a.max(b)] = a.min(b);
                }
            }
        }
        let mut names: HashMap<usize, String> = HashMap::new();
        for g in 0..n {
            let root = find(&mut parent, g);
            let name = config.groups[g].name.to_string();
            names
                .entry(root)
                .and_modify(|m| {
                    if name < *m {
                        m.clone_from(&name);
                    }
                })
                .or_insert(name);
        }
        let group_tags = (0..n)
            .map(|g| {
                let root = find(&mut parent, g);
                Arc::from(format!("{{g:{:016x}}}", name_hash(&names[&root])).as_str())
            })
            .collect();
        Keys {
            prefix: prefix.to_string(),
            group_tags,
        }
    }

    /// The unit tag of a target drawing on `groups`.
    pub fn tag(&self, target: &str, groups: &[usize]) -> Arc<str> {
        match groups.first() {
            Some(&g) => self.group_tags[g].clone(),
            None => Arc::from(format!("{{t:{:016x}}}", name_hash(target)).as_str()),
        }
    }

    pub fn state(&self, tag: &str, target: &str) -> String {
        format!("{}:{tag}:t:{target}", self.prefix)
    }

    pub fn group(&self, tag: &str, group: &str) -> String {
        format!("{}:{tag}:g:{group}", self.prefix)
    }

    pub fn settled(&self, tag: &str, target: &str, id: u64) -> String {
        format!("{}:{tag}:p:{target}:{id:x}", self.prefix)
    }

    pub fn counts(&self, tag: &str, target: &str) -> String {
        format!("{}:{tag}:c:{target}", self.prefix)
    }

    /// A spend scope's cell (`scope` = `caller:<name>`...). Every scope
    /// shares one tag: a reservation across a route, a caller and a tenant
    /// commits in one script on one Redis Cluster slot.
    pub fn spend(&self, scope: &str) -> String {
        format!("{}:{{s}}:s:{scope}", self.prefix)
    }

    pub fn index(&self) -> String {
        format!("{}:targets", self.prefix)
    }

    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    pub fn permit_key(&self) -> String {
        format!("{}:permit-key", self.prefix)
    }

    pub fn replica(&self, id: &str) -> String {
        format!("{}:replica:{id}", self.prefix)
    }

    pub fn replicas(&self) -> String {
        format!("{}:replicas", self.prefix)
    }

    /// Keys of the deferred queue (one hash tag for all of them: queue
    /// operations move items between lists atomically).
    pub fn queue(&self, part: &str) -> String {
        format!("{}:{{q}}:{part}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_sharing_groups_share_one_tag() {
        let config = Config::parse(
            r#"
[budgets.a]
requests_per_minute = 1
[budgets.b]
requests_per_minute = 1
[budgets.c]
requests_per_minute = 1
[targets.x]
budgets = ["a", "b"]
[targets.y]
budgets = ["b"]
[targets.z]
budgets = ["c"]
"#,
            "t",
        )
        .expect("config");
        let k = Keys::new("bs", &config);
        let tag = |t: &str| k.tag(t, &config.target(t).groups);
        assert_eq!(tag("x"), tag("y"), "x and y meet in group b");
        assert_ne!(tag("x"), tag("z"));
        assert_ne!(tag("free"), tag("other"));
        // A name with braces cannot change the tag Redis hashes.
        let weird = k.state(&tag("a}{b"), "a}{b");
        assert!(weird.starts_with("bs:{t:"), "{weird}");
    }
}
