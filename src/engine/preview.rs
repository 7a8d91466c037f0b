//! A read-only look at each configured route for the dashboard: its
//! ordered targets and the one a Route call would choose now.
//!
//! Computed with the same planning, glances and strategy ranking Route
//! uses, but never admits: no budget is reserved, no permit issued, no
//! fallback event published. Exploration is off (a preview that picked a
//! random target now and then would flicker on the page), so for
//! `lowest_latency` it is the exploiting choice.

use super::Engine;
use crate::domain::Reason;
use crate::domain::route::{self, CandidateInfo};
use crate::domain::strategy::{self, Glance, Strategy};
use std::sync::Arc;

/// One route as it stands.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutePreview {
    pub name: Arc<str>,
    pub strategy: Strategy,
    /// In configured order.
    pub targets: Vec<Arc<str>>,
    /// What Route would likely admit now; None if every target looks unavailable.
    pub chosen: Option<Arc<str>>,
    /// Targets that look unavailable now, with the refusal they would give.
    pub unavailable: Vec<(Arc<str>, Reason)>,
}

impl Engine {
    /// Every configured route, by name, with the target it would choose now.
    pub async fn preview_routes(&self) -> Vec<RoutePreview> {
        let routes = self.routes.load_full();
        let mut names: Vec<&String> = routes.keys().collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let Some(rt) = routes.get(name) else { continue };
            let s = &rt.settings;
            let plan = {
                let c = self.cfg();
                route::plan(&s.targets, &[], 0, |t| CandidateInfo {
                    context_window: c.target(t).context_window,
                })
            };
            let tries: Vec<route::Candidate> =
                plan.into_iter().filter(|c| c.skip.is_none()).collect();
            let looks = self
                .glances(&tries, Some(rt), 0, s.expected_output_tokens)
                .await;
            let names: Vec<&str> = tries.iter().map(|c| c.target.as_ref()).collect();
            let glances: Vec<Glance> = looks.iter().map(|l| l.0).collect();
            let ranking = strategy::rank(s.strategy, &names, &glances, 0.0, &mut || 0.5);
            let chosen = ranking
                .order
                .iter()
                .find(|&&i| {
                    looks
                        .get(i)
                        .is_some_and(|l| l.0.admissible && l.1.is_none())
                })
                .and_then(|&i| tries.get(i))
                .map(|c| c.target.clone());
            let unavailable = tries
                .iter()
                .zip(&looks)
                .filter_map(|(c, l)| l.1.map(|(why, _)| (c.target.clone(), why)))
                .collect();
            out.push(RoutePreview {
                name: s.name.clone(),
                strategy: s.strategy,
                targets: s.targets.clone(),
                chosen,
                unavailable,
            });
        }
        out
    }
}
