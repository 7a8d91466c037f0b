//! Routing strategies: in which order Route tries a route's candidates.
//!
//! A strategy never admits anything and never skips a candidate. It reads a
//! [`Glance`] of each candidate (is it worth trying, how busy, how fast, how
//! expensive, how much budget is left) and returns every candidate in the
//! order to try them, with a short reason for the first choice. The engine
//! then admits them in that order and the first admission wins, so every
//! strategy still falls back through the whole list, and an open breaker,
//! a pause or an exhausted budget is refused by the same admission
//! CanProceed uses (a glance can be a moment old; the admission cannot).
//!
//! Candidates a glance says are not admissible go last, in list order: they
//! are tried only after every admissible one refused, which keeps their
//! refusal reasons in Route's `skipped` list without ever preferring them.

use std::fmt::Write as _;
use std::time::Duration;

/// How a route orders its candidates (`strategy = "..."` on a route).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// First admissible in list order (a fallback list).
    #[default]
    Ordered,
    /// Random by weight among admissible candidates (load balancing).
    Weighted,
    /// Fewest outstanding permits.
    LeastBusy,
    /// Lowest recent latency, with a small share of exploration so a target
    /// that got faster (or recovered) is measured again.
    LowestLatency,
    /// Lowest expected price of this request.
    LowestCost,
    /// Largest remaining budget fraction: spreads load before a 429 happens.
    MostHeadroom,
}

impl Strategy {
    pub const ALL: [Strategy; 6] = [
        Strategy::Ordered,
        Strategy::Weighted,
        Strategy::LeastBusy,
        Strategy::LowestLatency,
        Strategy::LowestCost,
        Strategy::MostHeadroom,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Ordered => "ordered",
            Strategy::Weighted => "weighted",
            Strategy::LeastBusy => "least_busy",
            Strategy::LowestLatency => "lowest_latency",
            Strategy::LowestCost => "lowest_cost",
            Strategy::MostHeadroom => "most_headroom",
        }
    }

    pub fn parse(s: &str) -> Option<Strategy> {
        Strategy::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// What a strategy knows about one candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Glance {
    /// The breaker lets calls through and some key slot has budget: worth
    /// trying first.
    pub admissible: bool,
    /// Permits outstanding (concurrency leases and probes).
    pub in_flight: u32,
    /// Recent latency (a moving average of reported outcomes); None until
    /// one was reported.
    pub latency: Option<Duration>,
    /// Smallest remaining fraction over the target's budgets, in [0, 1]
    /// (1 when it has none).
    pub headroom: f64,
    /// Expected price of this request in dollars; None when the target has
    /// no prices configured.
    pub cost: Option<f64>,
    /// `weights` entry of the route (1 when the route has none).
    pub weight: f64,
}

impl Default for Glance {
    fn default() -> Glance {
        Glance {
            admissible: true,
            in_flight: 0,
            latency: None,
            headroom: 1.0,
            cost: None,
            weight: 1.0,
        }
    }
}

/// The order to try candidates in, and why the first was preferred.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranking {
    /// Indexes into the candidates, every one exactly once.
    pub order: Vec<usize>,
    /// Why `order[0]` comes first (for RouteResponse.reason and traces).
    pub reason: String,
}

/// Expected price of a request: input tokens at the input price plus
/// expected output tokens at the output price (prices per million tokens).
/// None when the target has no prices (unknown is not free).
pub fn expected_cost(input_tokens: u64, output_tokens: u64, per_mtok: (f64, f64)) -> Option<f64> {
    let (i, o) = per_mtok;
    if i <= 0.0 && o <= 0.0 {
        return None;
    }
    Some((input_tokens as f64 * i + output_tokens as f64 * o) / 1e6)
}

/// Orders `cands` for `strategy`. `explore` is the share of requests
/// `lowest_latency` sends somewhere other than the fastest; `rand` yields
/// uniform numbers in [0, 1) (weighted draws and exploration).
pub fn rank(
    strategy: Strategy,
    names: &[&str],
    cands: &[Glance],
    explore: f64,
    rand: &mut dyn FnMut() -> f64,
) -> Ranking {
    debug_assert_eq!(names.len(), cands.len());
    let (ok, rest): (Vec<usize>, Vec<usize>) = (0..cands.len()).partition(|&i| cands[i].admissible);
    let name = |i: usize| names.get(i).copied().unwrap_or("?");
    let (mut order, reason) = if ok.is_empty() {
        (Vec::new(), String::new())
    } else {
        match strategy {
            Strategy::Ordered => {
                let first = ok[0];
                let why = if first == 0 {
                    "first in list order".to_string()
                } else {
                    format!("first admissible in list order (position {first})")
                };
                (ok, why)
            }
            Strategy::Weighted => weighted(ok, cands, rand, name),
            Strategy::LeastBusy => {
                let mut v = ok;
                v.sort_by_key(|&i| cands[i].in_flight);
                let f = v[0];
                let why = format!(
                    "{} has the fewest permits outstanding ({})",
                    name(f),
                    cands[f].in_flight
                );
                (v, why)
            }
            Strategy::LowestLatency => lowest_latency(ok, cands, explore, rand, name),
            Strategy::LowestCost => {
                let mut v = ok;
                // Priced candidates by price, then unpriced ones in list order.
                v.sort_by(|&a, &b| match (cands[a].cost, cands[b].cost) {
                    (Some(x), Some(y)) => x.total_cmp(&y),
                    (Some(_), None) => std::cmp::Ordering::Less,
                    (None, Some(_)) => std::cmp::Ordering::Greater,
                    (None, None) => std::cmp::Ordering::Equal,
                });
                let f = v[0];
                let why = match cands[f].cost {
                    Some(c) => format!("{} is the cheapest for this request (${c:.6})", name(f)),
                    None => format!(
                        "no candidate has prices; {} is first in list order",
                        name(f)
                    ),
                };
                (v, why)
            }
            Strategy::MostHeadroom => {
                let mut v = ok;
                v.sort_by(|&a, &b| cands[b].headroom.total_cmp(&cands[a].headroom));
                let f = v[0];
                let why = format!(
                    "{} has the most budget left ({:.0}%)",
                    name(f),
                    cands[f].headroom * 100.0
                );
                (v, why)
            }
        }
    };
    let reason = if order.is_empty() {
        "no candidate looked admissible; trying them in list order".to_string()
    } else {
        reason
    };
    order.extend(rest);
    Ranking { order, reason }
}

/// Weighted sampling without replacement: the first pick is random by
/// weight, then the next among the rest, and so on (so the fallback order is
/// weighted too). Zero weights come last, in list order.
fn weighted<'a>(
    ok: Vec<usize>,
    cands: &[Glance],
    rand: &mut dyn FnMut() -> f64,
    name: impl Fn(usize) -> &'a str,
) -> (Vec<usize>, String) {
    let w = |i: usize| {
        let x = cands[i].weight;
        if x.is_finite() && x > 0.0 { x } else { 0.0 }
    };
    let (mut pool, zero): (Vec<usize>, Vec<usize>) = ok.into_iter().partition(|&i| w(i) > 0.0);
    let total_first: f64 = pool.iter().map(|&i| w(i)).sum();
    let mut order = Vec::with_capacity(pool.len() + zero.len());
    while !pool.is_empty() {
        let total: f64 = pool.iter().map(|&i| w(i)).sum();
        let mut x = rand().clamp(0.0, 1.0) * total;
        let mut pick = pool.len() - 1;
        for (k, &i) in pool.iter().enumerate() {
            if x < w(i) {
                pick = k;
                break;
            }
            x -= w(i);
        }
        order.push(pool.remove(pick));
    }
    let why = match order.first() {
        Some(&f) => {
            let mut s = String::new();
            let _ = write!(
                s,
                "{} drawn by weight ({} of {})",
                name(f),
                trim(w(f)),
                trim(total_first)
            );
            s
        }
        None => match zero.first() {
            Some(&f) => format!(
                "every admissible weight is 0; {} is first in list order",
                name(f)
            ),
            None => String::new(),
        },
    };
    order.extend(zero);
    (order, why)
}

fn trim(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// Fastest first. Unmeasured candidates come before measured ones (they are
/// measured by being tried); with probability `explore` a random other
/// admissible candidate goes first, so a target that recovered is seen to.
fn lowest_latency<'a>(
    ok: Vec<usize>,
    cands: &[Glance],
    explore: f64,
    rand: &mut dyn FnMut() -> f64,
    name: impl Fn(usize) -> &'a str,
) -> (Vec<usize>, String) {
    let mut v = ok;
    v.sort_by(|&a, &b| match (cands[a].latency, cands[b].latency) {
        (Some(x), Some(y)) => x.cmp(&y),
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    let ms = |i: usize| cands[i].latency.map_or(0, |d| d.as_millis());
    if v.len() > 1 && cands[v[0]].latency.is_some() && rand() < explore.clamp(0.0, 1.0) {
        let k = 1 + ((rand().clamp(0.0, 1.0) * (v.len() - 1) as f64) as usize).min(v.len() - 2);
        let picked = v.remove(k);
        v.insert(0, picked);
        let why = format!(
            "exploring: re-measuring {} (last {} ms; fastest {} ms)",
            name(picked),
            ms(picked),
            ms(v[1])
        );
        return (v, why);
    }
    let f = v[0];
    let why = match cands[f].latency {
        Some(_) => format!("{} is the fastest recently ({} ms average)", name(f), ms(f)),
        None => format!(
            "{} has no latency measured yet; trying it measures it",
            name(f)
        ),
    };
    (v, why)
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use proptest::prelude::{any, prop_assert, prop_assert_eq, proptest};
    use proptest::strategy::Strategy as _;

    fn seq(xs: &[f64]) -> impl FnMut() -> f64 + '_ {
        let mut i = 0;
        move || {
            let x = xs[i % xs.len()];
            i += 1;
            x
        }
    }

    fn g() -> Glance {
        Glance::default()
    }

    const N: [&str; 4] = ["a", "b", "c", "d"];

    #[test]
    fn ordered_keeps_list_order_and_puts_inadmissible_last() {
        let c = [
            Glance {
                admissible: false,
                ..g()
            },
            g(),
            g(),
        ];
        let r = rank(Strategy::Ordered, &N[..3], &c, 0.0, &mut seq(&[0.5]));
        assert_eq!(r.order, vec![1, 2, 0]);
        assert!(r.reason.contains("position 1"), "{}", r.reason);
    }

    #[test]
    fn least_busy_picks_fewest_outstanding_ties_in_list_order() {
        let c = [
            Glance {
                in_flight: 4,
                ..g()
            },
            Glance {
                in_flight: 1,
                ..g()
            },
            Glance {
                in_flight: 1,
                ..g()
            },
            Glance {
                in_flight: 0,
                admissible: false,
                ..g()
            },
        ];
        let r = rank(Strategy::LeastBusy, &N, &c, 0.0, &mut seq(&[0.5]));
        assert_eq!(r.order, vec![1, 2, 0, 3]);
        assert!(
            r.reason
                .contains("b has the fewest permits outstanding (1)"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn lowest_cost_prefers_cheapest_and_puts_unpriced_after_priced() {
        let c = [
            Glance { cost: None, ..g() },
            Glance {
                cost: expected_cost(1000, 500, (3.0, 15.0)),
                ..g()
            },
            Glance {
                cost: expected_cost(1000, 500, (0.25, 1.25)),
                ..g()
            },
        ];
        let r = rank(Strategy::LowestCost, &N[..3], &c, 0.0, &mut seq(&[0.5]));
        assert_eq!(r.order, vec![2, 1, 0]);
        assert!(r.reason.contains("c is the cheapest"), "{}", r.reason);
        assert_eq!(expected_cost(1, 1, (0.0, 0.0)), None);
        let x = expected_cost(1_000_000, 1_000_000, (3.0, 15.0)).unwrap_or(0.0);
        assert!((x - 18.0).abs() < 1e-9);
    }

    #[test]
    fn most_headroom_prefers_the_fullest_budget() {
        let c = [
            Glance {
                headroom: 0.1,
                ..g()
            },
            Glance {
                headroom: 0.9,
                ..g()
            },
            Glance {
                headroom: 0.5,
                ..g()
            },
        ];
        let r = rank(Strategy::MostHeadroom, &N[..3], &c, 0.0, &mut seq(&[0.5]));
        assert_eq!(r.order, vec![1, 2, 0]);
        assert!(r.reason.contains("90%"), "{}", r.reason);
    }

    #[test]
    fn lowest_latency_tries_unmeasured_first_then_fastest() {
        let ms = |x| Some(Duration::from_millis(x));
        let c = [
            Glance {
                latency: ms(900),
                ..g()
            },
            Glance {
                latency: ms(200),
                ..g()
            },
            Glance {
                latency: None,
                ..g()
            },
        ];
        let r = rank(Strategy::LowestLatency, &N[..3], &c, 0.0, &mut seq(&[0.5]));
        assert_eq!(r.order, vec![2, 1, 0]);
        let c = [c[0], c[1]];
        let r = rank(Strategy::LowestLatency, &N[..2], &c, 0.05, &mut seq(&[0.5]));
        assert_eq!(r.order, vec![1, 0]);
        assert!(r.reason.contains("b is the fastest"), "{}", r.reason);
        // An exploration draw puts the slower one first, and says so.
        let r = rank(
            Strategy::LowestLatency,
            &N[..2],
            &c,
            0.05,
            &mut seq(&[0.01, 0.3]),
        );
        assert_eq!(r.order, vec![0, 1]);
        assert!(
            r.reason.starts_with("exploring: re-measuring a"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn weighted_with_zero_weights_uses_them_only_as_fallback() {
        let c = [
            Glance { weight: 0.0, ..g() },
            Glance { weight: 2.0, ..g() },
            Glance { weight: 1.0, ..g() },
        ];
        // 0.7 * 3 = 2.1: past b's 2, so c; then b; then a.
        let r = rank(Strategy::Weighted, &N[..3], &c, 0.0, &mut seq(&[0.7, 0.0]));
        assert_eq!(r.order, vec![2, 1, 0]);
        assert!(
            r.reason.contains("c drawn by weight (1 of 3)"),
            "{}",
            r.reason
        );
    }

    #[test]
    fn nothing_admissible_means_list_order() {
        let c = [Glance {
            admissible: false,
            ..g()
        }; 3];
        for s in Strategy::ALL {
            let r = rank(s, &N[..3], &c, 0.1, &mut seq(&[0.3]));
            assert_eq!(r.order, vec![0, 1, 2], "{s:?}");
        }
    }

    #[test]
    fn names_round_trip() {
        for s in Strategy::ALL {
            assert_eq!(Strategy::parse(s.as_str()), Some(s));
        }
        assert_eq!(Strategy::parse("fastest"), None);
    }

    fn glance() -> impl proptest::strategy::Strategy<Value = Glance> {
        (
            any::<bool>(),
            0u32..50,
            proptest::option::of(1u64..5000),
            0.0f64..=1.0,
            proptest::option::of(0.0f64..10.0),
            0.0f64..5.0,
        )
            .prop_map(
                |(admissible, in_flight, lat, headroom, cost, weight)| Glance {
                    admissible,
                    in_flight,
                    latency: lat.map(Duration::from_millis),
                    headroom,
                    cost,
                    weight,
                },
            )
    }

    proptest! {
        /// Every strategy returns a permutation, and when any candidate is
        /// admissible the first choice is one of them (never an open
        /// breaker or an exhausted budget while a good one exists).
        #[test]
        fn never_prefers_an_inadmissible_candidate(
            cands in proptest::collection::vec(glance(), 1..8),
            draws in proptest::collection::vec(0.0f64..1.0, 1..16),
            s in 0usize..6,
            explore in 0.0f64..0.5,
        ) {
            let names: Vec<String> = (0..cands.len()).map(|i| format!("t{i}")).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let r = rank(Strategy::ALL[s], &names, &cands, explore, &mut seq(&draws));
            let mut sorted = r.order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..cands.len()).collect::<Vec<_>>());
            let any_ok = cands.iter().any(|c| c.admissible);
            prop_assert_eq!(cands[r.order[0]].admissible, any_ok);
            // Admissible ones all come before inadmissible ones.
            let k = cands.iter().filter(|c| c.admissible).count();
            prop_assert!(r.order[..k].iter().all(|&i| cands[i].admissible));
            prop_assert!(!r.reason.is_empty());
        }
    }

    /// Over 10,000 weighted picks each target's share is within 2 percentage
    /// points of its weight's share.
    #[test]
    fn weighted_frequencies_follow_weights() {
        let weights = [5.0, 3.0, 2.0, 0.0];
        let c: Vec<Glance> = weights
            .iter()
            .map(|&w| Glance { weight: w, ..g() })
            .collect();
        let mut draw = rng(7);
        let mut counts = [0u32; 4];
        for _ in 0..10_000 {
            let r = rank(Strategy::Weighted, &N, &c, 0.0, &mut draw);
            counts[r.order[0]] += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            let share = f64::from(counts[i]) / 10_000.0;
            assert!(
                (share - w / 10.0).abs() < 0.02,
                "{i}: {share} vs {}",
                w / 10.0
            );
        }
        assert_eq!(counts[3], 0);
    }

    /// Fed the latencies its own picks produce, lowest_latency settles on
    /// the fastest target and keeps re-measuring the others (about the
    /// exploration share), so a target that speeds up is found.
    #[test]
    fn lowest_latency_converges_and_re_probes() {
        let mut truth = [300.0f64, 120.0, 800.0];
        let mut seen: [Option<f64>; 3] = [None; 3];
        let mut draw = rng(11);
        let mut picks = [0u32; 3];
        let mut pick_round =
            |truth: &[f64; 3], seen: &mut [Option<f64>; 3], picks: &mut [u32; 3]| {
                let c: Vec<Glance> = seen
                    .iter()
                    .map(|s| Glance {
                        latency: s.map(|ms| Duration::from_micros((ms * 1000.0) as u64)),
                        ..g()
                    })
                    .collect();
                let r = rank(Strategy::LowestLatency, &N[..3], &c, 0.05, &mut draw);
                let i = r.order[0];
                picks[i] += 1;
                let s = seen[i].get_or_insert(truth[i]);
                *s = 0.8 * *s + 0.2 * truth[i];
            };
        for _ in 0..2000 {
            pick_round(&truth, &mut seen, &mut picks);
        }
        let share = f64::from(picks[1]) / 2000.0;
        assert!(share > 0.9, "fastest got {share}");
        assert!(
            picks[0] > 10 && picks[2] > 10,
            "others re-measured: {picks:?}"
        );
        // Target a becomes the fastest: exploration finds it.
        truth[0] = 50.0;
        picks = [0; 3];
        for _ in 0..2000 {
            pick_round(&truth, &mut seen, &mut picks);
        }
        assert!(f64::from(picks[0]) / 2000.0 > 0.85, "{picks:?}");
    }

    /// A deterministic stream of uniform numbers (seeded splitmix).
    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut n = seed;
        move || {
            n = n.wrapping_add(1);
            crate::domain::breaker::unit_f64(crate::domain::breaker::mix64(n))
        }
    }
}
