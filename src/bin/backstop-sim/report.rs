//! What happened in one mode, from the provider's log (what it saw) and the
//! fleet's results (what users got).

use crate::agents::{Fate, Result1};
use crate::provider::Call;
use crate::scenario::{Kind, Scenario};
use serde::Serialize;

#[derive(Serialize, Clone)]
pub struct ModelCalls {
    pub model: String,
    pub calls: usize,
    /// Calls answered by an outage or a revoked key: made while the model was down.
    pub wasted: usize,
    pub rate_limited_429: usize,
    pub bad_input_400: usize,
    pub ok: usize,
}

#[derive(Serialize, Clone)]
pub struct ModeReport {
    pub mode: String,
    pub skipped: Option<String>,
    pub models: Vec<ModelCalls>,
    pub wasted_calls: usize,
    pub rate_limited_429: usize,
    /// 429s from the end of the first outage of the primary onwards.
    pub rate_limited_after_recovery: usize,
    pub completed: usize,
    pub deferred_then_completed: usize,
    pub failed: usize,
    pub lost: usize,
    pub queued_at_end: usize,
    /// Simulated seconds from the end of the primary's first outage until its
    /// successful calls per second are back to 80 % of the pre-outage rate.
    pub recovery_to_full_traffic_s: Option<f64>,
    /// Calls to the primary per half-open episode during its first outage
    /// (the opening burst excluded): groups of calls separated by >= 20 s.
    pub probes_per_half_open_episode: Vec<usize>,
    pub opening_burst_calls: usize,
    pub p50_time_to_answer_s: Option<f64>,
    pub p99_time_to_answer_s: Option<f64>,
    pub tokens: u64,
    pub cost: f64,
    pub provider_calls: usize,
    pub retries_per_success: Option<f64>,
    /// Per simulated second: calls to each model.
    pub calls_per_second: Vec<Vec<u32>>,
    /// Per simulated second: completed, deferred-then-completed, failed/lost at the end.
    pub answers_per_second: Vec<[u32; 2]>,
    /// Backstop modes: the end-to-end figures Backstop reported against what
    /// the agents measured (issue #17 part 3).
    pub end_to_end: Option<EndToEndCheck>,
}

/// The two user-request signals, as the agents measured them and as
/// Backstop reported them (its metrics and FinishRequest answers).
#[derive(Serialize, Clone, Debug)]
pub struct EndToEndCheck {
    /// Requests the agents finished (completed, deferred or failed).
    pub requests: usize,
    /// Of those, how many the server measured itself (saw start to finish).
    pub tracked: usize,
    /// Failed over finished, by the agents' count.
    pub failure_rate_agents: f64,
    /// (failed + expired) over all finished, from backstop_requests_total.
    pub failure_rate_backstop: f64,
    /// Requests backstop_requests_total counted (all results).
    pub requests_backstop: f64,
    pub p99_agents_s: Option<f64>,
    /// p99 of the durations Backstop measured (FinishRequest answers).
    pub p99_backstop_s: Option<f64>,
}

/// Compares the agents' measures with Backstop's.
pub fn end_to_end(
    all: &[crate::agents::EndToEnd],
    reported: &std::collections::BTreeMap<String, f64>,
) -> EndToEndCheck {
    let sorted = |f: &dyn Fn(&crate::agents::EndToEnd) -> f64| {
        let mut v: Vec<f64> = all.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let failed = all.iter().filter(|e| e.failed).count();
    let total: f64 = reported.values().sum();
    let bad = reported.get("failed").copied().unwrap_or(0.0)
        + reported.get("expired").copied().unwrap_or(0.0);
    EndToEndCheck {
        requests: all.len(),
        tracked: all.iter().filter(|e| e.tracked).count(),
        failure_rate_agents: if all.is_empty() {
            0.0
        } else {
            failed as f64 / all.len() as f64
        },
        failure_rate_backstop: if total > 0.0 { bad / total } else { 0.0 },
        requests_backstop: total,
        p99_agents_s: quantile(&sorted(&|e| e.agent_s), 0.99),
        p99_backstop_s: quantile(&sorted(&|e| e.server_s), 0.99),
    }
}

fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied()
}

fn first_outage(s: &Scenario) -> Option<(f64, f64)> {
    s.phases
        .iter()
        .filter(|p| p.model == 0 && matches!(p.kind, Kind::Outage { .. }))
        .map(|p| (p.from, p.to))
        .min_by(|a, b| a.0.total_cmp(&b.0))
}

pub fn build(mode: &str, s: &Scenario, log: &[Call], results: &[Result1]) -> ModeReport {
    let secs = s.duration.ceil() as usize + 1;
    let mut models: Vec<ModelCalls> = s
        .models
        .iter()
        .map(|m| ModelCalls {
            model: m.name.clone(),
            calls: 0,
            wasted: 0,
            rate_limited_429: 0,
            bad_input_400: 0,
            ok: 0,
        })
        .collect();
    let mut cps = vec![vec![0u32; secs]; s.models.len()];
    let outage = first_outage(s);
    let mut after = 0;
    for c in log {
        let m = &mut models[c.model];
        m.calls += 1;
        m.wasted += usize::from(c.wasted);
        m.rate_limited_429 += usize::from(c.status == 429);
        m.bad_input_400 += usize::from(c.status == 400);
        m.ok += usize::from(c.status == 200);
        if let Some(slot) = cps[c.model].get_mut(c.t.max(0.0) as usize) {
            *slot += 1;
        }
        if c.status == 429 && outage.is_some_and(|(_, to)| c.t >= to) {
            after += 1;
        }
    }
    // Recovery: the primary's successes per second, 5 s moving average.
    let mut recovery = None;
    let mut probes = Vec::new();
    let mut burst = 0;
    if let Some((from, to)) = outage {
        let ok_at = |a: f64, b: f64| {
            log.iter()
                .filter(|c| c.model == 0 && c.status == 200 && c.t >= a && c.t < b)
                .count() as f64
                / (b - a)
        };
        let base = ok_at((from - 30.0).max(0.0), from);
        let mut t = to;
        while base > 0.0 && t + 5.0 <= s.duration {
            if ok_at(t, t + 5.0) >= 0.8 * base {
                recovery = Some(t - to);
                break;
            }
            t += 1.0;
        }
        let mut groups: Vec<Vec<f64>> = Vec::new();
        for c in log
            .iter()
            .filter(|c| c.model == 0 && c.t >= from && c.t < to)
        {
            match groups.last_mut() {
                Some(g) if c.t - g.last().copied().unwrap_or(c.t) < 20.0 => g.push(c.t),
                _ => groups.push(vec![c.t]),
            }
        }
        let mut it = groups.into_iter();
        burst = it.next().map(|g| g.len()).unwrap_or(0);
        probes = it.map(|g| g.len()).collect();
    }
    let count = |f: Fate| results.iter().filter(|r| r.fate == f).count();
    let mut tta: Vec<f64> = results
        .iter()
        .filter_map(|r| r.done.map(|d| d - r.at))
        .collect();
    tta.sort_by(|a, b| a.total_cmp(b));
    let mut answers = vec![[0u32; 2]; secs];
    let (mut tokens, mut cost) = (0, 0.0);
    for r in results {
        if let (Some(d), Some(m)) = (r.done, r.model) {
            let i = usize::from(r.fate == Fate::DeferredThenCompleted);
            if let Some(slot) = answers.get_mut(d.max(0.0) as usize) {
                slot[i] += 1;
            }
            tokens += r.tokens_in + r.tokens_out;
            cost += (r.tokens_in as f64 * s.models[m].price_in
                + r.tokens_out as f64 * s.models[m].price_out)
                / 1e6;
        }
    }
    let answered = tta.len();
    ModeReport {
        mode: mode.into(),
        skipped: None,
        wasted_calls: models.iter().map(|m| m.wasted).sum(),
        rate_limited_429: models.iter().map(|m| m.rate_limited_429).sum(),
        rate_limited_after_recovery: after,
        models,
        completed: count(Fate::Completed),
        deferred_then_completed: count(Fate::DeferredThenCompleted),
        failed: count(Fate::Failed),
        lost: count(Fate::Lost),
        queued_at_end: count(Fate::QueuedAtEnd),
        recovery_to_full_traffic_s: recovery,
        probes_per_half_open_episode: probes,
        opening_burst_calls: burst,
        p50_time_to_answer_s: quantile(&tta, 0.5),
        p99_time_to_answer_s: quantile(&tta, 0.99),
        tokens,
        cost,
        provider_calls: log.len(),
        retries_per_success: (answered > 0)
            .then(|| (log.len() as f64 - answered as f64) / answered as f64),
        calls_per_second: cps,
        answers_per_second: answers,
        end_to_end: None,
    }
}

pub fn skipped(mode: &str, why: String) -> ModeReport {
    let mut r = build(mode, &Scenario::empty(), &[], &[]);
    r.skipped = Some(why);
    r
}

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.1}")).unwrap_or_else(|| "—".into())
}

/// The Markdown table: one column per mode.
pub fn markdown(s: &Scenario, modes: &[ModeReport]) -> String {
    let mut out = format!(
        "## backstop-sim: {} ({} agents, {:.0} simulated s)\n\n{}\n\n| | {} |\n|---|{}\n",
        s.name,
        s.agents,
        s.duration,
        s.description.trim(),
        modes
            .iter()
            .map(|m| m.mode.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(modes.len())
    );
    let row = |name: &str, f: &dyn Fn(&ModeReport) -> String| {
        format!(
            "| {name} | {} |\n",
            modes
                .iter()
                .map(|m| if m.skipped.is_some() {
                    "skipped".into()
                } else {
                    f(m)
                })
                .collect::<Vec<_>>()
                .join(" | ")
        )
    };
    out += &row("calls to a model while it was down (wasted)", &|m| {
        let per: Vec<String> = m
            .models
            .iter()
            .filter(|x| x.wasted > 0)
            .map(|x| format!("{} {}", x.model, x.wasted))
            .collect();
        format!("**{}** ({})", m.wasted_calls, per.join(", "))
    });
    out += &row("429s received (after recovery)", &|m| {
        format!("{} ({})", m.rate_limited_429, m.rate_limited_after_recovery)
    });
    out += &row(
        "primary calls in the outage: opening burst / per half-open episode",
        &|m| {
            format!(
                "{} / {:?}",
                m.opening_burst_calls, m.probes_per_half_open_episode
            )
        },
    );
    out += &row("user requests completed", &|m| m.completed.to_string());
    out += &row("deferred, then completed", &|m| {
        m.deferred_then_completed.to_string()
    });
    out += &row("failed (fits no model)", &|m| m.failed.to_string());
    out += &row("lost (in process memory at the end)", &|m| {
        m.lost.to_string()
    });
    out += &row("still queued at the end (durable)", &|m| {
        m.queued_at_end.to_string()
    });
    out += &row("recovery to full traffic (s)", &|m| {
        opt(m.recovery_to_full_traffic_s)
    });
    out += &row("time to answer p50 / p99 (s)", &|m| {
        format!(
            "{} / {}",
            opt(m.p50_time_to_answer_s),
            opt(m.p99_time_to_answer_s)
        )
    });
    out += &row("tokens / cost", &|m| {
        format!("{} / ${:.2}", m.tokens, m.cost)
    });
    out += &row("provider calls / retries per success", &|m| {
        format!(
            "{} / {}",
            m.provider_calls,
            m.retries_per_success
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "—".into())
        )
    });
    if modes.iter().any(|m| m.end_to_end.is_some()) {
        fn e2e(m: &ModeReport, f: impl Fn(&EndToEndCheck) -> String) -> String {
            m.end_to_end.as_ref().map(f).unwrap_or_else(|| "—".into())
        }
        out += &row(
            "end-to-end failure rate: agents / Backstop's metrics",
            &|m| {
                e2e(m, |e| {
                    format!(
                        "{:.2} % / {:.2} %",
                        100.0 * e.failure_rate_agents,
                        100.0 * e.failure_rate_backstop
                    )
                })
            },
        );
        out += &row("end-to-end p99 (s): agents / Backstop", &|m| {
            e2e(m, |e| {
                format!("{} / {}", opt(e.p99_agents_s), opt(e.p99_backstop_s))
            })
        });
    }
    for m in modes.iter().filter(|m| m.skipped.is_some()) {
        out += &format!(
            "\n{} skipped: {}\n",
            m.mode,
            m.skipped.clone().unwrap_or_default()
        );
    }
    out
}
