//! Routing: which candidates of a fallback list may be tried, in which order.
//!
//! This is the pure half of Route: it never admits anything. It filters the
//! candidates a request can never use (excluded by the caller, context
//! window too small) and orders the rest; the engine then admits them in that
//! order and the first admission wins, so Route and CanProceed are one
//! decision per candidate, never two racing ones.

use super::Reason;
use std::sync::Arc;
use std::time::Duration;

/// A candidate in route order, with the reason it is skipped without an
/// admission attempt (None: try it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub target: Arc<str>,
    /// Position in the route (0 = primary).
    pub depth: u32,
    pub skip: Option<Reason>,
}

/// What the route needs to know about one candidate target.
#[derive(Clone, Copy, Debug, Default)]
pub struct CandidateInfo {
    /// 0 = unknown (never too small).
    pub context_window: u64,
}

/// Orders and pre-filters `candidates` for a request.
pub fn plan(
    candidates: &[Arc<str>],
    exclude: &[String],
    required_context_tokens: u64,
    info: impl Fn(&str) -> CandidateInfo,
) -> Vec<Candidate> {
    candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let skip = if exclude.iter().any(|e| e.as_str() == c.as_ref()) {
                Some(Reason::Excluded)
            } else {
                let w = info(c).context_window;
                (required_context_tokens > 0 && w > 0 && w < required_context_tokens)
                    .then_some(Reason::ContextTooSmall)
            };
            Candidate {
                target: c.clone(),
                depth: i as u32,
                skip,
            }
        })
        .collect()
}

/// When nothing could be admitted: the soonest any candidate may be tried.
pub fn soonest(retry_afters: impl IntoIterator<Item = Option<Duration>>) -> Option<Duration> {
    retry_afters.into_iter().flatten().min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<Arc<str>> {
        v.iter().map(|s| Arc::from(*s)).collect()
    }

    #[test]
    fn excluded_and_too_small_candidates_are_skipped_in_order() {
        let c = names(&["a", "b", "c", "d"]);
        let info = |t: &str| CandidateInfo {
            context_window: match t {
                "b" => 8_000,
                "c" => 0,
                _ => 200_000,
            },
        };
        let p = plan(&c, &["a".to_string()], 100_000, info);
        let got: Vec<(&str, u32, Option<Reason>)> = p
            .iter()
            .map(|c| (c.target.as_ref(), c.depth, c.skip))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", 0, Some(Reason::Excluded)),
                ("b", 1, Some(Reason::ContextTooSmall)),
                ("c", 2, None), // unknown window: tried
                ("d", 3, None),
            ]
        );
        // Without a requirement nothing is too small.
        assert!(plan(&c, &[], 0, info).iter().all(|c| c.skip.is_none()));
        assert_eq!(
            soonest([
                None,
                Some(Duration::from_secs(3)),
                Some(Duration::from_secs(1))
            ]),
            Some(Duration::from_secs(1))
        );
    }
}
