//! The AIMD rules one by one, then the whole loop (admission with the
//! learned limit, outcomes teaching it) against a simulated provider.

use super::*;
use crate::domain::event::EventKind;

const T0: Time = Time::from_secs(1_800_000_000);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn bounds(min: u32, max: u32, initial: u32) -> AdaptiveBounds {
    AdaptiveBounds {
        min,
        max,
        initial,
        share: 1,
    }
}

/// A success at `latency` (also the recent average), admitted at `issued`.
fn ok(latency: u64, issued: Time) -> Observation<'static> {
    Observation {
        class: OutcomeClass::Success,
        http_status: 200,
        error_type: "",
        latency: Some(ms(latency)),
        recent: Some(ms(latency)),
        issued: Some(issued),
    }
}

fn rate_limited(issued: Time) -> Observation<'static> {
    Observation {
        class: OutcomeClass::RateLimited,
        http_status: 429,
        latency: None,
        recent: None,
        ..ok(0, issued)
    }
}

/// Feeds `n` good successes of a fleet that keeps the limit full.
fn successes(b: &AdaptiveBounds, st: &mut AdaptiveState, now: Time, n: u32) -> Vec<EventKind> {
    let mut ev = Vec::new();
    for _ in 0..n {
        note_admitted(b, st, st.limit);
        observe(b, st, now, &ok(100, now), &mut ev);
    }
    ev
}

#[test]
fn one_round_of_good_successes_raises_the_limit_by_one() {
    let b = bounds(1, 64, 8);
    let mut st = b.start();
    successes(&b, &mut st, T0, 7);
    assert_eq!(st.limit, 8, "7 of 8 credits");
    successes(&b, &mut st, T0, 1);
    assert_eq!(st.limit, 9);
    assert_eq!(st.change, Change::Increased);
    // The next step takes a round of the new limit: 9 more.
    successes(&b, &mut st, T0, 8);
    assert_eq!(st.limit, 9);
    successes(&b, &mut st, T0, 1);
    assert_eq!(st.limit, 10);
    assert_eq!(st.describe(), "raised 9 → 10: successes at normal latency");
}

#[test]
fn a_limit_the_fleet_does_not_use_does_not_grow() {
    let b = bounds(1, 64, 8);
    let mut st = b.start();
    let mut ev = Vec::new();
    for _ in 0..1000 {
        // Never more than 7 calls in flight against a limit of 8: nothing is being tested.
        assert!(!note_admitted(&b, &mut st, 7));
        observe(&b, &mut st, T0, &ok(100, T0), &mut ev);
    }
    assert_eq!(st.limit, 8);
    assert_eq!(st.credit, 8, "credits wait, at most a round's worth");
    // The fleet fills the limit once: it may grow.
    assert!(note_admitted(&b, &mut st, 8));
    observe(&b, &mut st, T0, &ok(100, T0), &mut ev);
    assert_eq!(st.limit, 9);
    assert!(!st.reached, "the next step needs the new limit reached");
}

#[test]
fn a_burst_of_429s_from_one_overload_cuts_once() {
    let b = bounds(1, 64, 20);
    let mut st = b.start();
    let mut ev = Vec::new();
    // 20 calls admitted at T0 all run into the same overload.
    let t1 = T0 + ms(300);
    assert!(observe(&b, &mut st, t1, &rate_limited(T0), &mut ev));
    assert_eq!(st.limit, 16, "20 × 0.8");
    assert_eq!(st.change, Change::RateLimited);
    for i in 1..20 {
        let changed = observe(&b, &mut st, t1 + ms(i), &rate_limited(T0), &mut ev);
        assert!(!changed, "report {i} of the same burst");
    }
    assert_eq!(st.limit, 16);
    assert_eq!(st.describe(), "cut 20 → 16: the provider answered 429");
    // A call admitted under the new limit that still hits a 429: the
    // overload persists, cut again.
    let t2 = t1 + ms(500);
    assert!(observe(
        &b,
        &mut st,
        t2,
        &rate_limited(t1 + ms(50)),
        &mut ev
    ));
    assert_eq!(st.limit, 12);
}

#[test]
fn reports_without_an_admission_time_cut_at_most_once_per_hold() {
    let b = bounds(1, 64, 20);
    let mut st = b.start();
    let mut ev = Vec::new();
    let o = Observation {
        issued: None,
        ..rate_limited(T0)
    };
    observe(&b, &mut st, T0, &o, &mut ev);
    assert_eq!(st.limit, 16);
    observe(&b, &mut st, T0 + ms(999), &o, &mut ev);
    assert_eq!(st.limit, 16, "within MIN_HOLD");
    observe(&b, &mut st, T0 + MIN_HOLD, &o, &mut ev);
    assert_eq!(st.limit, 12);
}

#[test]
fn overloads_cut_and_other_failures_do_not() {
    let b = bounds(1, 64, 20);
    let mut ev = Vec::new();
    for (status, error_type, cuts) in [
        (529, "", true),
        (503, "", true),
        (500, "overloaded_error", true),
        (500, "", false),
        (502, "", false),
    ] {
        let mut st = b.start();
        let o = Observation {
            class: OutcomeClass::Transient,
            http_status: status,
            error_type,
            ..rate_limited(T0)
        };
        observe(&b, &mut st, T0, &o, &mut ev);
        assert_eq!(st.limit < 20, cuts, "{status} {error_type}");
        if cuts {
            assert_eq!(st.change, Change::Overloaded);
        }
    }
    // Timeouts and bad input neither raise nor cut.
    let mut st = b.start();
    for class in [OutcomeClass::Timeout, OutcomeClass::BadInput] {
        for _ in 0..100 {
            let o = Observation {
                class,
                ..ok(100, T0)
            };
            observe(&b, &mut st, T0, &o, &mut ev);
        }
    }
    assert_eq!(st.limit, 20);
}

#[test]
fn the_limit_stays_within_its_bounds() {
    let b = bounds(4, 10, 8);
    let mut st = b.start();
    let mut ev = Vec::new();
    let mut now = T0;
    for _ in 0..20 {
        now = now + ms(10);
        observe(&b, &mut st, now, &rate_limited(now - ms(1)), &mut ev);
    }
    assert_eq!(st.limit, 4, "never below min");
    ev.extend(successes(&b, &mut st, now, 1000));
    assert_eq!(st.limit, 10, "never above max");
    // Reaching either bound is published.
    let at_bounds: Vec<u32> = ev
        .iter()
        .filter_map(|e| match e {
            EventKind::LimitAdapted { limit, .. } => Some(*limit),
            _ => None,
        })
        .collect();
    assert_eq!(at_bounds.first(), Some(&6), "8 → 6 is 25 %");
    assert!(
        at_bounds.contains(&4) && at_bounds.last() == Some(&10),
        "{at_bounds:?}"
    );
    // A state learned under other bounds is fitted into these.
    let mut old = AdaptiveState {
        limit: 50,
        published: 50,
        ..b.start()
    };
    old.fit(&b);
    assert_eq!((old.limit, old.from, old.change), (10, 50, Change::Bounds));
    assert_eq!(b.effective(Some(&old)), 10);
    // A replica deciding alone takes its share.
    let half = AdaptiveBounds { share: 2, ..b };
    assert_eq!(half.effective(Some(&old)), 5);
    assert_eq!(half.effective(None), 4, "initial 8 / 2");
}

#[test]
fn latency_grown_past_twice_its_baseline_cuts() {
    let b = bounds(1, 64, 20);
    let mut st = b.start();
    let mut ev = Vec::new();
    let mut now = T0;
    // A provider answering in 100 ms: the baseline settles there.
    for _ in 0..200 {
        now = now + ms(10);
        let o = ok(100, now - ms(100));
        observe(&b, &mut st, now, &o, &mut ev);
    }
    let limit = st.limit;
    assert!(
        (95_000..=105_000).contains(&st.baseline_us),
        "{}",
        st.baseline_us
    );
    // One slow reply against a normal recent average: noise, no cut (and no credit).
    let credit = st.credit;
    let o = Observation {
        recent: Some(ms(120)),
        ..ok(400, now - ms(400))
    };
    observe(&b, &mut st, now, &o, &mut ev);
    assert_eq!((st.limit, st.credit), (limit, credit));
    // Slow replies on top of a slow average: a queue is building. Cut.
    now = now + ms(10);
    let o = Observation {
        recent: Some(ms(250)),
        ..ok(300, now - ms(300))
    };
    assert!(observe(&b, &mut st, now, &o, &mut ev));
    assert_eq!(st.change, Change::Latency);
    assert_eq!(st.limit, (f64::from(limit) * DECREASE) as u32);
    // The baseline moved only a little towards the slow replies.
    assert!(st.baseline_us < 110_000, "{}", st.baseline_us);
    // A reply below 2× the baseline is a good one again.
    let o = ok(150, now);
    st.credit = 0;
    let c = st.credit;
    observe(&b, &mut st, now + ms(1), &o, &mut ev);
    assert_eq!(st.credit, c + 1);
}

#[test]
fn only_moves_of_ten_percent_or_onto_a_bound_are_published() {
    let b = bounds(1, 64, 20);
    let mut st = b.start();
    let ev = successes(&b, &mut st, T0, 20);
    assert_eq!(st.limit, 21);
    assert!(ev.is_empty(), "+5 % is not news: {ev:?}");
    let ev = successes(&b, &mut st, T0, 21);
    assert_eq!(st.limit, 22);
    assert_eq!(
        ev,
        vec![EventKind::LimitAdapted {
            limit: 22,
            previous: 20,
            why: "raised 20 → 22: successes at normal latency".into(),
        }]
    );
    // Every cut is news (20 % > 10 %).
    let mut ev = Vec::new();
    observe(&b, &mut st, T0 + ms(1), &rate_limited(T0), &mut ev);
    assert_eq!(
        ev,
        vec![EventKind::LimitAdapted {
            limit: 17,
            previous: 22,
            why: "cut 22 → 17: the provider answered 429".into(),
        }]
    );
}

/// The whole loop through the unit's pure functions, in virtual time: many
/// agents admit through [`crate::domain::unit::admit`] (which enforces the
/// learned limit), call a fake provider, and report through
/// [`crate::domain::unit::record`].
mod simulation {
    use crate::config::Config;
    use crate::domain::headers::Signals;
    use crate::domain::unit::{
        AdmitArgs, Effects, OutcomeArgs, Permit, TargetState, Trust, UnitCx, admit, name_hash,
        record,
    };
    use crate::domain::{OutcomeClass, Time};
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::time::Duration;

    /// A provider that takes `hidden` calls at once: the call past that is
    /// answered 429 at once; the others take `base` latency, growing as it
    /// fills up (half as long again at the limit: under the latency rule's
    /// 2×, so the 429s are what the fleet learns from here).
    struct Provider {
        hidden: u32,
        in_flight: u32,
        base: Duration,
    }

    impl Provider {
        /// `None`: 429; else the call's latency.
        fn call(&mut self, noise: f64) -> Option<Duration> {
            if self.in_flight >= self.hidden {
                return None;
            }
            self.in_flight += 1;
            let fill = f64::from(self.in_flight) / f64::from(self.hidden);
            Some(
                self.base
                    .mul_f64((1.0 + 0.5 * fill * fill) * (0.9 + 0.2 * noise)),
            )
        }
    }

    /// xorshift: deterministic noise.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Ev {
        /// The agent tries to admit a call.
        Try,
        /// The agent's call answered (true: success).
        Done(bool),
    }

    struct Run {
        /// (time, learned limit) sampled at every outcome.
        limits: Vec<(Time, u32)>,
        /// (time, was a 429) per provider answer.
        answers: Vec<(Time, bool)>,
        events: usize,
    }

    fn simulate(hidden: u32, agents: usize, initial: u32, secs: u64) -> Run {
        let config = Config::parse(
            &format!(
                "[targets.p]\nmax_concurrency = \"adaptive\"\n\
                 adaptive = {{ min = 2, max = 500, initial = {initial} }}\n\
                 breaker = {{ treat = {{ rate_limited = \"ignore\" }} }}\n"
            ),
            "sim",
        )
        .expect("config");
        let settings = config.target("p").clone();
        let cx = UnitCx {
            settings: &settings,
            seed: name_hash("p"),
        };
        let mut st = TargetState::new(cx.seed, 0, 1);
        let mut provider = Provider {
            hidden,
            in_flight: 0,
            base: Duration::from_millis(200),
        };
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let start = Time::from_secs(1_800_000_000);
        let end = start + Duration::from_secs(secs);
        let mut queue: BinaryHeap<Reverse<(Time, usize, Ev)>> = BinaryHeap::new();
        for a in 0..agents {
            let jitter = Duration::from_micros((rng.next() * 100_000.0) as u64);
            queue.push(Reverse((start + jitter, a, Ev::Try)));
        }
        let mut permits: Vec<Option<(Permit, Duration)>> = vec![None; agents];
        let mut run = Run {
            limits: Vec::new(),
            answers: Vec::new(),
            events: 0,
        };
        while let Some(Reverse((now, a, ev))) = queue.pop() {
            if now > end {
                break;
            }
            let mut fx = Effects::default();
            match ev {
                Ev::Try => {
                    let args = AdmitArgs {
                        caller: "agent",
                        ..AdmitArgs::default()
                    };
                    let adm = admit(&cx, &mut st, &mut [], now, &args, &mut fx);
                    match adm.permit.filter(|_| adm.allowed) {
                        Some(p) => match provider.call(rng.next()) {
                            Some(lat) => {
                                permits[a] = Some((p, lat));
                                queue.push(Reverse((now + lat, a, Ev::Done(true))));
                            }
                            None => {
                                // The 429 comes back in a millisecond.
                                permits[a] = Some((p, Duration::from_millis(1)));
                                let at = now + Duration::from_millis(1);
                                queue.push(Reverse((at, a, Ev::Done(false))));
                            }
                        },
                        None => {
                            // Refused at the limit: poll again soon.
                            let wait = adm
                                .retry_after
                                .unwrap_or(Duration::from_millis(20))
                                .min(Duration::from_millis(20));
                            let jitter = Duration::from_micros((rng.next() * 5_000.0) as u64);
                            queue.push(Reverse((now + wait + jitter, a, Ev::Try)));
                        }
                    }
                }
                Ev::Done(success) => {
                    let Some((p, lat)) = permits[a].take() else {
                        continue;
                    };
                    if success {
                        provider.in_flight -= 1;
                    }
                    let args = OutcomeArgs {
                        trust: Trust::Permit(p),
                        trust_permitless: false,
                        class: if success {
                            OutcomeClass::Success
                        } else {
                            OutcomeClass::RateLimited
                        },
                        signals: Signals::default(),
                        max_pause: Duration::from_secs(60),
                        http_status: if success { 200 } else { 429 },
                        error_type: "",
                        slot: 0,
                        latency: Some(lat),
                        retry_after: None,
                        input_tokens: 0,
                        output_tokens: 0,
                        attempt: 0,
                        caller: "agent",
                    };
                    record(&cx, &mut st, &mut [], now, &args, 0.5, &mut fx);
                    run.answers.push((now, !success));
                    let limit = settings
                        .budget
                        .adaptive
                        .expect("adaptive")
                        .effective(st.adaptive());
                    run.limits.push((now, limit));
                    // The agent's next task, after a little think time.
                    let think = Duration::from_micros((rng.next() * 10_000.0) as u64);
                    queue.push(Reverse((now + think, a, Ev::Try)));
                }
            }
            run.events += fx
                .events
                .iter()
                .filter(|e| matches!(e, crate::domain::event::EventKind::LimitAdapted { .. }))
                .count();
        }
        run
    }

    /// Limits and 429 rate after `settle` (convergence) until the end.
    fn after(run: &Run, settle: Time) -> (u32, u32, f64, f64) {
        let limits: Vec<u32> = run
            .limits
            .iter()
            .filter(|(t, _)| *t >= settle)
            .map(|(_, l)| *l)
            .collect();
        let answers: Vec<bool> = run
            .answers
            .iter()
            .filter(|(t, _)| *t >= settle)
            .map(|(_, x)| *x)
            .collect();
        let lo = limits.iter().copied().min().unwrap_or(0);
        let hi = limits.iter().copied().max().unwrap_or(0);
        let mean = limits.iter().map(|&l| f64::from(l)).sum::<f64>() / limits.len().max(1) as f64;
        let rate = answers.iter().filter(|x| **x).count() as f64 / answers.len().max(1) as f64;
        (lo, hi, mean, rate)
    }

    #[test]
    fn the_learned_limit_converges_on_the_providers_hidden_one() {
        // From below, from far above (a flood of 429s first), and large.
        for (hidden, agents, initial) in [(40, 120, 8), (20, 60, 60), (100, 250, 30)] {
            let run = simulate(hidden, agents, initial, 100);
            let start = run.limits.first().map(|l| l.0).expect("ran");
            let (lo, hi, mean, rate) = after(&run, start + Duration::from_secs(40));
            let h = f64::from(hidden);
            eprintln!(
                "hidden {hidden}: limit {lo}..{hi} (mean {mean:.1}), 429 rate {:.2} %, {} events",
                rate * 100.0,
                run.events
            );
            assert!(
                f64::from(lo) >= 0.8 * h && f64::from(hi) <= 1.2 * h,
                "hidden {hidden}: limit {lo}..{hi} not within 20 %"
            );
            assert!(rate < 0.02, "hidden {hidden}: 429 rate {rate}");
            // Events are news, not a tick per +1.
            assert!(run.events < run.limits.len() / 20, "{} events", run.events);
        }
    }
}
