//! Scenario files (`sims/*.toml`): the fake provider's timeline and the
//! fleet's request stream, in simulated seconds. Users edit these, so every
//! field is checked and unknown keys are errors (a typo must not silently
//! turn an outage off).

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: String,
    #[serde(default)]
    description: String,
    duration: String,
    arrivals_until: String,
    #[serde(default = "default_seed")]
    seed: u64,
    agents: RawAgents,
    models: Vec<RawModel>,
    #[serde(default)]
    phases: Vec<RawPhase>,
}

fn default_seed() -> u64 {
    17
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgents {
    count: usize,
    mean_interval: String,
    min_tokens: u64,
    max_tokens: u64,
    #[serde(default)]
    oversized_every: u64,
    #[serde(default)]
    oversized_tokens: u64,
    #[serde(default = "default_output")]
    output_tokens: u64,
}

fn default_output() -> u64 {
    400
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    latency: String,
    context_window: u64,
    #[serde(default)]
    price_in: f64,
    #[serde(default)]
    price_out: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPhase {
    model: String,
    kind: String,
    from: String,
    to: String,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    rps: Option<f64>,
    #[serde(default)]
    burst: Option<f64>,
    #[serde(default)]
    factor: Option<f64>,
}

/// One model the fake provider serves, in route order (the first is the primary).
#[derive(Clone, Debug)]
pub struct Model {
    pub name: String,
    /// Simulated seconds a normal answer takes.
    pub latency: f64,
    pub context_window: u64,
    pub price_in: f64,
    pub price_out: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// Every call fails with `status` (529 or 5xx).
    Outage { status: u16 },
    /// A hidden limit of `rps` calls per simulated second (bucket of `burst`), answered with 429.
    RateLimit { rps: f64, burst: f64 },
    /// The API key was revoked: 401 for every call.
    Revoked,
    /// Answers take `factor` times as long.
    Slow { factor: f64 },
}

#[derive(Clone, Debug)]
pub struct Phase {
    pub model: usize,
    pub kind: Kind,
    pub from: f64,
    pub to: f64,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub duration: f64,
    pub arrivals_until: f64,
    pub seed: u64,
    pub agents: usize,
    pub mean_interval: f64,
    pub min_tokens: u64,
    pub max_tokens: u64,
    pub oversized_every: u64,
    pub oversized_tokens: u64,
    pub output_tokens: u64,
    pub models: Vec<Model>,
    pub phases: Vec<Phase>,
}

fn secs(field: &str, s: &str) -> Result<f64, String> {
    backstop::domain::duration::parse_duration(s)
        .map(|d| d.as_secs_f64())
        .map_err(|e| format!("{field}: {e}"))
}

impl Scenario {
    pub fn load(path: &std::path::Path) -> Result<Scenario, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Scenario, String> {
        let raw: Raw = toml::from_str(text).map_err(|e| e.to_string())?;
        if raw.models.is_empty() {
            return Err("at least one [[models]] is needed".into());
        }
        let a = &raw.agents;
        if a.count == 0 || a.min_tokens == 0 || a.min_tokens > a.max_tokens {
            return Err("agents: count >= 1 and 1 <= min_tokens <= max_tokens".into());
        }
        let models: Vec<Model> = raw
            .models
            .iter()
            .map(|m| {
                Ok(Model {
                    name: m.name.clone(),
                    latency: secs("models.latency", &m.latency)?,
                    context_window: m.context_window,
                    price_in: m.price_in,
                    price_out: m.price_out,
                })
            })
            .collect::<Result<_, String>>()?;
        let mut phases = Vec::new();
        for p in &raw.phases {
            let model = models
                .iter()
                .position(|m| m.name == p.model)
                .ok_or_else(|| format!("phase names unknown model {:?}", p.model))?;
            let kind = match p.kind.as_str() {
                "outage" => Kind::Outage {
                    status: p.status.unwrap_or(529),
                },
                "rate_limit" => {
                    let rps = p.rps.ok_or("a rate_limit phase needs rps")?;
                    if rps <= 0.0 {
                        return Err("rps must be > 0".into());
                    }
                    Kind::RateLimit {
                        rps,
                        burst: p.burst.unwrap_or(rps * 2.0).max(1.0),
                    }
                }
                "revoked" => Kind::Revoked,
                "slow" => Kind::Slow {
                    factor: p.factor.unwrap_or(4.0).max(1.0),
                },
                k => {
                    return Err(format!(
                        "phase kind {k:?}: outage | rate_limit | revoked | slow"
                    ));
                }
            };
            let (from, to) = (secs("phases.from", &p.from)?, secs("phases.to", &p.to)?);
            if to <= from {
                return Err(format!("phase {:?}: to must be after from", p.kind));
            }
            phases.push(Phase {
                model,
                kind,
                from,
                to,
            });
        }
        let duration = secs("duration", &raw.duration)?;
        let arrivals_until = secs("arrivals_until", &raw.arrivals_until)?;
        if arrivals_until > duration {
            return Err("arrivals_until must not exceed duration".into());
        }
        Ok(Scenario {
            name: raw.name,
            description: raw.description,
            duration,
            arrivals_until,
            seed: raw.seed,
            agents: a.count,
            mean_interval: secs("agents.mean_interval", &a.mean_interval)?,
            min_tokens: a.min_tokens,
            max_tokens: a.max_tokens,
            oversized_every: a.oversized_every,
            oversized_tokens: a.oversized_tokens,
            output_tokens: a.output_tokens,
            models,
            phases,
        })
    }

    /// The phases in force for `model` at simulated time `t`.
    pub fn active(&self, model: usize, t: f64) -> impl Iterator<Item = &Phase> {
        self.phases
            .iter()
            .filter(move |p| p.model == model && p.from <= t && t < p.to)
    }

    /// The lowest hidden rate limit of a model (what an operator who read the
    /// provider's docs would configure as a Backstop budget).
    pub fn rate_limit(&self, model: usize) -> Option<(f64, f64)> {
        self.phases
            .iter()
            .filter(|p| p.model == model)
            .filter_map(|p| match p.kind {
                Kind::RateLimit { rps, burst } => Some((rps, burst)),
                _ => None,
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
    }
}

/// A small deterministic PRNG (splitmix64): the request stream must be the
/// same in every mode, and owning the generator keeps it independent of any
/// crate's stream changing between versions.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One user request of the stream.
#[derive(Clone, Debug)]
pub struct Request {
    pub id: u64,
    pub agent: usize,
    pub at: f64,
    pub tokens: u64,
    pub output_tokens: u64,
}

/// The request stream: per agent, exponential gaps with the scenario's mean,
/// from the seed alone, so all modes see the identical stream.
pub fn requests(s: &Scenario) -> Vec<Request> {
    let mut rng = Rng::new(s.seed);
    let mut out = Vec::new();
    for agent in 0..s.agents {
        let mut t = rng.unit() * s.mean_interval;
        while t < s.arrivals_until {
            let tokens = s.min_tokens + rng.next_u64() % (s.max_tokens - s.min_tokens + 1);
            out.push(Request {
                id: 0,
                agent,
                at: t,
                tokens,
                output_tokens: s.output_tokens,
            });
            t += -s.mean_interval * (1.0 - rng.unit()).ln();
        }
    }
    out.sort_by(|a, b| a.at.total_cmp(&b.at));
    for (i, r) in out.iter_mut().enumerate() {
        r.id = i as u64;
        if s.oversized_every > 0 && (i as u64 + 1).is_multiple_of(s.oversized_every) {
            r.tokens = s.oversized_tokens;
        }
    }
    out
}

impl Scenario {
    /// A scenario with nothing in it, for a mode that was skipped.
    pub fn empty() -> Scenario {
        Scenario {
            name: String::new(),
            description: String::new(),
            duration: 0.0,
            arrivals_until: 0.0,
            seed: 0,
            agents: 0,
            mean_interval: 1.0,
            min_tokens: 1,
            max_tokens: 1,
            oversized_every: 0,
            oversized_tokens: 0,
            output_tokens: 0,
            models: Vec::new(),
            phases: Vec::new(),
        }
    }
}
