//! `[targets]`, `[budgets]` and `[routes]`: names, key slots, budget groups
//! and fallback lists.

use super::Cx;
use crate::config::raw::*;
use crate::config::{
    Config, DEFAULT_EXPLORE, Enforcement, GroupSettings, MAX_KEY_SLOTS, MAX_ROUTE_LEN,
    MAX_ROUTE_NAME, MAX_TARGET_LEN, RouteSettings, TargetSettings,
};
use crate::domain::strategy::Strategy;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

impl Cx {
    /// `[budgets.<name>]`; returns each group's index by name.
    pub(super) fn groups(
        &mut self,
        groups: Vec<(String, Range<usize>, GroupToml)>,
        config: &mut Config,
    ) -> HashMap<String, usize> {
        let mut group_ix: HashMap<String, usize> = HashMap::new();
        for (name, span, g) in groups {
            self.printable(&name, span.clone(), &format!("[budgets.{name:?}]"));
            let budget = self.budget(&g, g.window, span.clone(), &format!("[budgets.{name}]"));
            if budget.is_unlimited() && budget.spend.is_none() {
                self.err(
                    span.clone(),
                    format!("[budgets.{name}] sets no limit; give it e.g. requests_per_minute or tokens_per_minute"),
                );
            }
            group_ix.insert(name.clone(), config.groups.len());
            config.groups.push(GroupSettings {
                name: name.into(),
                budget,
            });
        }

        group_ix
    }

    /// `[targets.<name>]`, over the defaults.
    pub(super) fn targets(
        &mut self,
        targets: Vec<(String, Range<usize>, TargetToml)>,
        base: &TargetSettings,
        group_ix: &HashMap<String, usize>,
        config: &mut Config,
    ) {
        for (name, span, t) in targets {
            let what = format!("[targets.{name:?}]");
            self.target_name(&name, span.clone(), &what);
            let mut s = base.clone();
            s.configured = true;
            if let Some(b) = &t.breaker {
                self.breaker(b, &mut s.breaker, span.clone(), &format!("{what}.breaker"));
            }
            if let Some(r) = &t.retry {
                self.retry(r, &mut s.retry, span.clone(), &format!("{what}.retry"));
            }
            s.budget = self.budget(&t, t.window, span.clone(), &what);
            s.max_tokens = t.max_tokens.unwrap_or(0);
            s.context_window = t.context_window.unwrap_or(0);
            s.cost_per_mtok_input = t.cost_per_mtok_input.map_or(0.0, |c| c.0);
            s.cost_per_mtok_output = t.cost_per_mtok_output.map_or(0.0, |c| c.0);
            if s.budget.spend.is_some()
                && s.cost_per_mtok_input <= 0.0
                && s.cost_per_mtok_output <= 0.0
            {
                self.err(
                    span.clone(),
                    format!("{what}: a spend limit needs prices; set cost_per_mtok_input and cost_per_mtok_output (per million tokens)"),
                );
            }
            if let Some(ModeToml::Shadow) = t.mode {
                s.mode = Enforcement::Shadow;
            }
            if let Some(Dur(d)) = t.permit_lease {
                s.permit_lease = d;
            }
            if let Some(keys) = &t.keys {
                let mut seen = HashSet::new();
                if keys.is_empty() || keys.len() > MAX_KEY_SLOTS {
                    self.err(
                        span.clone(),
                        format!("{what}.keys must list 1..={MAX_KEY_SLOTS} key slot names"),
                    );
                }
                for k in keys {
                    let n = k.get_ref();
                    if n.is_empty() || n.len() > 64 {
                        self.err(k.span(), "a key slot name must be 1..=64 bytes");
                    } else if n.chars().any(char::is_control) {
                        self.err(
                            k.span(),
                            format!("key slot {n:?} contains a control character"),
                        );
                    } else if !seen.insert(n.clone()) {
                        self.err(k.span(), format!("duplicate key slot {n:?}"));
                    }
                    s.keys.push(Arc::from(n.as_str()));
                }
            }
            if let Some(bs) = &t.budgets {
                for b in bs {
                    match group_ix.get(b.get_ref()) {
                        Some(&ix) if !s.groups.contains(&ix) => s.groups.push(ix),
                        Some(_) => self.err(
                            b.span(),
                            format!("budget group {:?} listed twice", b.get_ref()),
                        ),
                        None => self.err(
                            b.span(),
                            format!(
                                "unknown budget group {:?}; declare it as [budgets.{}]",
                                b.get_ref(),
                                b.get_ref()
                            ),
                        ),
                    }
                }
                s.groups.sort_unstable();
            }
            config.targets.insert(name, Arc::new(s));
        }
    }

    /// `[routes.<name>]`.
    pub(super) fn routes(
        &mut self,
        routes: Vec<(String, Range<usize>, RouteToml)>,
        config: &mut Config,
    ) {
        for (name, span, r) in routes {
            let what = format!("[routes.{name}]");
            if name.is_empty() || name.len() > MAX_ROUTE_NAME {
                self.err(
                    span.clone(),
                    format!("{what}: route names must be 1..={MAX_ROUTE_NAME} bytes"),
                );
            }
            self.printable(&name, span.clone(), &what);
            if r.targets.is_empty() || r.targets.len() > MAX_ROUTE_LEN {
                self.err(
                    span.clone(),
                    format!("{what} must list 1..={MAX_ROUTE_LEN} targets"),
                );
            }
            let mut seen = HashSet::new();
            let mut list = Vec::new();
            for t in &r.targets {
                self.target_name(t.get_ref(), t.span(), &what);
                if !seen.insert(t.get_ref().clone()) {
                    self.err(t.span(), format!("{what} lists {:?} twice", t.get_ref()));
                }
                list.push(Arc::from(t.get_ref().as_str()));
            }
            let strategy = match &r.strategy {
                None => Strategy::Ordered,
                Some(s) => Strategy::parse(s.get_ref()).unwrap_or_else(|| {
                    let known: Vec<&str> = Strategy::ALL.iter().map(|s| s.as_str()).collect();
                    self.err(
                        s.span(),
                        format!(
                            "{what}: unknown strategy {:?}; one of {known:?}",
                            s.get_ref()
                        ),
                    );
                    Strategy::Ordered
                }),
            };
            let weights = match &r.weights {
                None => {
                    if strategy == Strategy::Weighted {
                        self.err(
                            span.clone(),
                            format!("{what}: strategy \"weighted\" needs weights = [...], one per target"),
                        );
                    }
                    vec![1.0; list.len()]
                }
                Some(w) => {
                    let v = w.get_ref();
                    if strategy != Strategy::Weighted {
                        self.err(
                            w.span(),
                            format!("{what}: weights only apply with strategy = \"weighted\""),
                        );
                    }
                    if v.len() != list.len() {
                        self.err(
                            w.span(),
                            format!(
                                "{what}: {} weights for {} targets; give one per target, in order",
                                v.len(),
                                list.len()
                            ),
                        );
                    } else if v.iter().any(|x| !x.is_finite() || *x < 0.0 || *x > 1e6) {
                        self.err(
                            w.span(),
                            format!("{what}: weights must be numbers in 0..=1000000"),
                        );
                    } else if v.iter().all(|x| *x == 0.0) {
                        self.err(
                            w.span(),
                            format!("{what}: at least one weight must be above 0"),
                        );
                    }
                    v.clone()
                }
            };
            let explore = match &r.explore {
                None => DEFAULT_EXPLORE,
                Some(e) => {
                    let x = *e.get_ref();
                    if strategy != Strategy::LowestLatency {
                        self.err(
                            e.span(),
                            format!(
                                "{what}: explore only applies with strategy = \"lowest_latency\""
                            ),
                        );
                    }
                    if !(0.0..=0.5).contains(&x) {
                        self.err(
                            e.span(),
                            format!("{what}: explore must be in 0.0..=0.5 (a share of requests)"),
                        );
                    }
                    x
                }
            };
            let spend = self.spend_scope(&r, "route", &name, span.clone(), &what);
            config.routes.insert(
                name.clone(),
                Arc::new(RouteSettings {
                    name: name.into(),
                    targets: list,
                    strategy,
                    weights,
                    explore,
                    expected_output_tokens: r.expected_output_tokens.unwrap_or(0),
                    spend,
                }),
            );
        }
    }

    /// `[callers."<name>"]`: a caller's spend limit, across every target
    /// and route it uses.
    pub(super) fn callers(
        &mut self,
        callers: Vec<(String, Range<usize>, CallerToml)>,
        config: &mut Config,
    ) {
        if callers.len() > crate::config::MAX_CALLERS {
            self.err(
                0..0,
                format!(
                    "[callers] names {} callers; at most {}",
                    callers.len(),
                    crate::config::MAX_CALLERS
                ),
            );
            return;
        }
        for (name, span, c) in callers {
            let what = format!("[callers.{name:?}]");
            if name.is_empty() || name.len() > MAX_TARGET_LEN {
                self.err(
                    span.clone(),
                    format!("{what}: caller names must be 1..={MAX_TARGET_LEN} bytes"),
                );
            }
            self.printable(&name, span.clone(), &what);
            let spend = self.spend_scope(&c, "caller", &name, span.clone(), &what);
            if spend.is_none() {
                self.err(
                    span,
                    format!("{what} sets no limit; give it e.g. spend_per_day = 50.0"),
                );
            }
            config.callers.insert(
                name.clone(),
                Arc::new(crate::config::CallerSettings {
                    name: name.into(),
                    spend,
                }),
            );
        }
    }

    /// Tenants stay apart in the config too: a tenant's route lists only
    /// that tenant's targets (else its principals could Route into another
    /// tenant's target), and a budget group is drawn on by targets of one
    /// tenant at most (else one tenant could spend another's budget).
    pub(super) fn tenant_boundaries(&mut self, config: &Config) {
        let owner = |name: &str| {
            config
                .tenants
                .values()
                .find(|t| t.owns(name))
                .map(|t| t.name.clone())
        };
        let mut routes: Vec<&Arc<RouteSettings>> = config.routes.values().collect();
        routes.sort_by(|a, b| a.name.cmp(&b.name));
        for r in routes {
            let Some(tenant) = owner(&r.name) else {
                continue;
            };
            for t in &r.targets {
                if owner(t).as_ref() != Some(&tenant) {
                    self.err(
                        0..0,
                        format!(
                            "[routes.{:?}] belongs to tenant {:?} but lists {:?}, which does not: a tenant's routes may only list its own targets",
                            r.name.as_ref(),
                            tenant.as_ref(),
                            t.as_ref()
                        ),
                    );
                }
            }
        }
        let mut group_owner: HashMap<usize, (Option<Arc<str>>, &str)> = HashMap::new();
        for (name, t) in &config.targets {
            let mine = owner(name);
            for &g in &t.groups {
                match group_owner.get(&g) {
                    None => {
                        group_owner.insert(g, (mine.clone(), name));
                    }
                    Some((other, first)) if *other != mine => {
                        let who = |o: &Option<Arc<str>>| {
                            o.as_ref().map_or("no tenant".to_string(), |t| {
                                format!("tenant {:?}", t.as_ref())
                            })
                        };
                        self.err(
                            0..0,
                            format!(
                                "[budgets.{}] is drawn on by {first:?} ({}) and {name:?} ({}): a budget group may not be shared across tenants",
                                config.groups.get(g).map_or("?", |g| g.name.as_ref()),
                                who(other),
                                who(&mine)
                            ),
                        );
                    }
                    Some(_) => {}
                }
            }
        }
    }

    /// Indexes every route, caller and tenant spend limit by its hash (what
    /// a permit carries); two scopes with one hash would settle each
    /// other's money, so the config is refused (rename one).
    pub(super) fn index_spend_scopes(&mut self, config: &mut Config) {
        let scopes: Vec<Arc<crate::config::SpendScope>> = config
            .routes
            .values()
            .filter_map(|r| r.spend.clone())
            .chain(config.callers.values().filter_map(|c| c.spend.clone()))
            .chain(config.tenants.values().filter_map(|t| t.spend.clone()))
            .collect();
        for s in scopes {
            if let Some(other) = config.spend_scopes.insert(s.hash, s.clone())
                && other.key != s.key
            {
                self.err(
                    0..0,
                    format!(
                        "spend limits {:?} and {:?} have the same 32-bit hash; rename one",
                        other.key, s.key
                    ),
                );
            }
        }
        config.tenant_spend = config
            .tenants
            .values()
            .filter(|t| t.spend.is_some())
            .cloned()
            .collect();
    }

    pub(super) fn target_name(&mut self, name: &str, span: Range<usize>, what: &str) {
        if name.is_empty() || name.len() > MAX_TARGET_LEN {
            self.err(
                span,
                format!("{what}: target names must be 1..={MAX_TARGET_LEN} bytes"),
            );
        } else {
            self.printable(name, span, what);
        }
    }

    /// Names clients must send back (targets, routes, groups, key slots)
    /// cannot hold control characters: no client could use such a name (and
    /// the server refuses them on the wire), so the config is wrong.
    pub(super) fn printable(&mut self, name: &str, span: Range<usize>, what: &str) {
        if name.chars().any(char::is_control) {
            self.err(
                span,
                format!("{what}: the name {name:?} contains a control character; names must be printable"),
            );
        }
    }
}
