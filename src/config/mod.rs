//! Configuration: the TOML file, validated and resolved into the settings the
//! engine uses.
//!
//! Loading collects *every* error with its line and column instead of stopping
//! at the first, so `backstop check-config` can show an operator everything to
//! fix in one go. With no file at all, [`Config::default`] is a working
//! service: gRPC on 127.0.0.1:50051, the seed's breaker defaults, no budgets.

mod raw;

use crate::domain::BreakerConfig;
use crate::domain::breaker::{RateRule, Treatment};
use crate::domain::budget::{BudgetConfig, Kind, Rate};
use crate::domain::retry::{Jitter, RetryConfig};
use crate::domain::taxonomy::OutcomeClass;
use raw::*;
use serde::Deserialize;
use serde::de::IntoDeserializer;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Longest target name, in bytes.
pub const MAX_TARGET_LEN: usize = 256;
/// Most candidates a route (configured or ad hoc) may list.
pub const MAX_ROUTE_LEN: usize = 32;
/// Longest route name (routes double as deferred queue names, which share the target limit).
pub const MAX_ROUTE_NAME: usize = MAX_TARGET_LEN;
/// Most key slots one target may declare.
pub const MAX_KEY_SLOTS: usize = 16;

/// Process-level settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// HTTP listener for metrics, events and the dashboard (None = off).
    pub http: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// Keep all state in memory only.
    pub ephemeral: bool,
    /// Targets created on first use stop being created beyond this many.
    pub max_targets: usize,
    pub admin_token: Option<String>,
    pub max_message_bytes: usize,
    /// How long shutdown waits for in-flight calls.
    pub shutdown_grace: Duration,
    /// Clamp on any pause a provider can impose.
    pub max_pause: Duration,
    /// Bounds on the `headers` map of one outcome.
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// Open gRPC connections at once (a socket past it is closed on accept).
    pub max_connections: usize,
    /// Time a new connection has to send the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// A connection that receives nothing (not even a ping reply) for this long is closed.
    pub idle_timeout: Duration,
    /// Server HTTP/2 PINGs: how often (None = off) and how long an answer may take.
    pub http2_keepalive_interval: Option<Duration>,
    pub http2_keepalive_timeout: Duration,
    /// Secret that signs permits; None = generated once, kept in the store.
    pub permit_key: Option<String>,
    /// What an outcome without a live permit may do.
    pub outcomes_without_permit: Permitless,
}

/// What a RecordOutcome without a live permit (none, expired, or from before
/// a restart) may do. A permit proves the report belongs to an admitted call;
/// without one, anyone could report anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Permitless {
    /// Counted (counters, failure streaks and rates, token usage) but never
    /// imposes anything alone: no opening at once on PERSISTENT, no disabled
    /// key, no pause, no learned limit. The default.
    #[default]
    Count,
    /// Treated like a report with a permit (the behaviour before permits
    /// were signed): only for fleets whose every client is trusted.
    Trusted,
    /// Refused with INVALID_ARGUMENT.
    Reject,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 9464))),
            data_dir: PathBuf::from("backstop-data"),
            ephemeral: false,
            max_targets: 100_000,
            admin_token: None,
            max_message_bytes: 4 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            max_pause: Duration::from_secs(3600),
            max_headers: 64,
            max_header_bytes: 16 * 1024,
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            http2_keepalive_interval: Some(Duration::from_secs(60)),
            http2_keepalive_timeout: Duration::from_secs(20),
            permit_key: None,
            outcomes_without_permit: Permitless::Count,
        }
    }
}

/// The event log and its subscribers.
#[derive(Clone, Debug, PartialEq)]
pub struct EventsConfig {
    /// Events kept for resumption (`since_seq`, `Last-Event-ID`).
    pub ring_size: usize,
    /// Events one subscriber may lag before it gets a Gap and a fresh Snapshot.
    pub subscriber_buffer: usize,
    /// Live subscribers (gRPC Watch + SSE) at once.
    pub max_subscribers: usize,
    /// Most targets one Snapshot lists.
    pub max_snapshot_targets: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            ring_size: 10_000,
            subscriber_buffer: 1024,
            max_subscribers: 256,
            max_snapshot_targets: 10_000,
        }
    }
}

/// Metrics labels and OpenTelemetry export.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryConfig {
    /// Targets beyond this many share the metrics label `target="_other"`.
    pub max_target_labels: usize,
    /// OTLP/gRPC endpoint for traces; None = off (unless OTEL_EXPORTER_OTLP_ENDPOINT is set).
    pub otlp_endpoint: Option<String>,
    pub service_name: String,
    /// Bucket bounds (seconds) of `backstop_call_latency_seconds`.
    pub latency_buckets: Arc<[f64]>,
}

/// Provider-call latency buckets: LLM calls take 0.5 s to minutes, so the
/// buckets are dense there (a p99 from `histogram_quantile` over them stays
/// within a few percent for calls of 0.2-3 s, where 2.5/5/10/30 gave +60 %).
pub const DEFAULT_LATENCY_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.5,
    15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 90.0, 120.0,
];

/// Most latency buckets a histogram may have (each is a series per target).
pub const MAX_LATENCY_BUCKETS: usize = 64;

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            max_target_labels: 1000,
            otlp_endpoint: None,
            service_name: "backstop".into(),
            latency_buckets: DEFAULT_LATENCY_BUCKETS.into(),
        }
    }
}

/// Bounds of the deferred-request queue.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// Largest payload one Defer may carry.
    pub max_payload_bytes: usize,
    /// Items waiting or in flight per queue.
    pub max_depth: usize,
    /// Payload bytes held across all queues (including dead letters).
    pub max_total_bytes: u64,
    pub default_max_attempts: u32,
    /// How long an idempotency key is remembered after its item was acked.
    pub idempotency_ttl: Duration,
    /// Items held across all queues, dead letters included.
    pub max_items: usize,
    /// Distinct queue names.
    pub max_queues: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_payload_bytes: 1024 * 1024,
            max_depth: 10_000,
            max_total_bytes: 256 * 1024 * 1024,
            default_max_attempts: 5,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            max_items: 100_000,
            max_queues: 1000,
        }
    }
}

/// Whether a target's refusals are enforced or only reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    Enforce,
    /// Decisions and metrics are computed, but every call is admitted.
    Shadow,
}

/// Everything the engine needs to know about one target.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetSettings {
    /// Declared in the config file (as opposed to created on first use).
    pub configured: bool,
    pub breaker: BreakerConfig,
    pub retry: RetryConfig,
    /// Budgets of each key slot (or of the target when it declares no keys).
    pub budget: BudgetConfig,
    pub keys: Vec<Arc<str>>,
    /// Indexes into [`Config::groups`].
    pub groups: Vec<usize>,
    pub mode: Enforcement,
    /// How long a concurrency slot stays taken without an outcome.
    pub permit_lease: Duration,
    pub max_tokens: u64,
    pub context_window: u64,
    pub cost_per_mtok_input: f64,
    pub cost_per_mtok_output: f64,
}

impl Default for TargetSettings {
    fn default() -> Self {
        TargetSettings {
            configured: false,
            breaker: BreakerConfig::default(),
            retry: RetryConfig::default(),
            budget: BudgetConfig::default(),
            keys: Vec::new(),
            groups: Vec::new(),
            mode: Enforcement::Enforce,
            permit_lease: Duration::from_secs(120),
            max_tokens: 0,
            context_window: 0,
            cost_per_mtok_input: 0.0,
            cost_per_mtok_output: 0.0,
        }
    }
}

/// A shared budget several targets draw on.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupSettings {
    pub name: Arc<str>,
    pub budget: BudgetConfig,
}

/// An ordered fallback list.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteSettings {
    pub name: Arc<str>,
    pub targets: Vec<Arc<str>>,
}

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    /// Settings for targets created on first use.
    pub default_target: Arc<TargetSettings>,
    pub targets: BTreeMap<String, Arc<TargetSettings>>,
    pub routes: HashMap<String, Arc<RouteSettings>>,
    pub groups: Vec<GroupSettings>,
    pub queue: QueueConfig,
    pub events: EventsConfig,
    pub telemetry: TelemetryConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            queue: QueueConfig::default(),
            events: EventsConfig::default(),
            telemetry: TelemetryConfig::default(),
            default_target: Arc::new(TargetSettings::default()),
            targets: BTreeMap::new(),
            routes: HashMap::new(),
            groups: Vec::new(),
        }
    }
}

impl Config {
    /// Settings for `target`: its own if declared, else the defaults.
    pub fn target(&self, name: &str) -> &Arc<TargetSettings> {
        self.targets.get(name).unwrap_or(&self.default_target)
    }

    /// Reads and validates a config file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigErrors> {
        let origin = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| ConfigErrors {
            origin: origin.clone(),
            src: String::new(),
            errors: vec![(0..0, format!("cannot read the config file: {e}"))],
        })?;
        let src = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                // Located at the first bad byte: the text before it is valid,
                // so it is kept for the line/column and the quoted line.
                let good = e.utf8_error().valid_up_to();
                let bytes = e.into_bytes();
                let src = String::from_utf8_lossy(&bytes).into_owned();
                let prefix = String::from_utf8_lossy(&bytes[..good]).len();
                return Err(ConfigErrors {
                    origin,
                    src,
                    errors: vec![(
                        prefix..prefix,
                        format!(
                            "the file is not valid UTF-8 (byte 0x{:02x} at offset {good}); save it as UTF-8",
                            bytes.get(good).copied().unwrap_or(0)
                        ),
                    )],
                });
            }
        };
        Config::parse(&src, &origin)
    }

    /// Validates config text; `origin` names it in error messages.
    pub fn parse(src: &str, origin: &str) -> Result<Config, ConfigErrors> {
        let mut cx = Cx { errors: Vec::new() };
        let config = cx.parse(src);
        if cx.errors.is_empty() {
            Ok(config)
        } else {
            cx.errors.sort_by_key(|(span, _)| span.start);
            Err(ConfigErrors {
                origin: origin.to_string(),
                src: src.to_string(),
                errors: cx.errors,
            })
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug)]
pub struct ConfigErrors {
    origin: String,
    src: String,
    errors: Vec<(Range<usize>, String)>,
}

impl ConfigErrors {
    /// `(line, column, message)` for each error, 1-based.
    pub fn located(&self) -> Vec<(usize, usize, &str)> {
        self.errors
            .iter()
            .map(|(span, msg)| {
                let (l, c) = line_col(&self.src, span.start);
                (l, c, msg.as_str())
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let before = &src[..offset.min(src.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (line, col, msg)) in self.located().into_iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{line}:{col}: {msg}", self.origin)?;
            if let Some(text) = self.src.lines().nth(line.saturating_sub(1)) {
                write!(f, "\n    {line:>4} | {text}\n         | {:>col$}", "^")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Error collection while resolving.
struct Cx {
    errors: Vec<(Range<usize>, String)>,
}

type Table<'i> = DeTable<'i>;

impl Cx {
    fn err(&mut self, span: Range<usize>, msg: impl Into<String>) {
        self.errors.push((span, msg.into()));
    }

    /// Deserializes one value, recording the error (with its span) on failure.
    fn de<'i, T: Deserialize<'i>>(&mut self, v: Spanned<DeValue<'i>>, what: &str) -> Option<T> {
        let outer = v.span();
        match T::deserialize(v.into_deserializer()) {
            Ok(t) => Some(t),
            Err(e) => {
                let span = e.span().unwrap_or(outer);
                self.err(span, format!("{what}: {}", e.message()));
                None
            }
        }
    }

    /// `[defaults]`, one sub-table at a time, so an error in
    /// `[defaults.breaker]` is reported under that name (not `[defaults]`).
    fn defaults(&mut self, v: Spanned<DeValue<'_>>) -> DefaultsToml {
        let mut d = DefaultsToml::default();
        let Some(t) = self.table(v, "[defaults]") else {
            return d;
        };
        for (key, value) in t {
            match key.get_ref().as_ref() {
                "breaker" => d.breaker = self.de(value, "[defaults.breaker]"),
                "retry" => d.retry = self.de(value, "[defaults.retry]"),
                "permit_lease" => d.permit_lease = self.de(value, "[defaults] permit_lease"),
                other => self.err(
                    key.span(),
                    format!(
                        "[defaults]: unknown key `{other}`; expected breaker, retry or permit_lease"
                    ),
                ),
            }
        }
        d
    }

    fn table<'i>(&mut self, v: Spanned<DeValue<'i>>, what: &str) -> Option<Table<'i>> {
        let span = v.span();
        match v.into_inner() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.err(span, format!("{what} must be a table"));
                None
            }
        }
    }

    fn parse(&mut self, src: &str) -> Config {
        let mut config = Config::default();
        let (doc, syntax) = DeTable::parse_recoverable(src);
        if !syntax.is_empty() {
            for e in syntax {
                self.err(e.span().unwrap_or(0..0), e.message().to_string());
            }
            return config;
        }
        let mut server = None;
        let mut defaults = DefaultsToml::default();
        let mut defaults_span = 0..0;
        let mut server_span = 0..0;
        let mut targets = Vec::new();
        let mut routes = Vec::new();
        let mut groups = Vec::new();
        for (key, value) in doc.into_inner() {
            let key_span = key.span();
            match key.get_ref().as_ref() {
                "server" => {
                    server_span = key_span;
                    server = self.de::<ServerToml>(value, "[server]");
                }
                "defaults" => {
                    defaults_span = key_span;
                    defaults = self.defaults(value);
                }
                "targets" => {
                    if let Some(t) = self.table(value, "[targets]") {
                        for (name, v) in t {
                            let span = name.span();
                            let name = name.into_inner().into_owned();
                            let what = format!("[targets.{name:?}]");
                            if let Some(t) = self.de::<TargetToml>(v, &what) {
                                targets.push((name, span, t));
                            }
                        }
                    }
                }
                "routes" => {
                    if let Some(t) = self.table(value, "[routes]") {
                        for (name, v) in t {
                            let span = name.span();
                            let name = name.into_inner().into_owned();
                            let what = format!("[routes.{name}]");
                            if let Some(r) = self.de::<RouteToml>(v, &what) {
                                routes.push((name, span, r));
                            }
                        }
                    }
                }
                "events" => {
                    if let Some(e) = self.de::<EventsToml>(value, "[events]") {
                        let d = EventsConfig::default();
                        let n = |p: Option<Positive>, d: usize| p.map_or(d, |Positive(n)| n as usize);
                        config.events = EventsConfig {
                            ring_size: n(e.ring_size, d.ring_size),
                            subscriber_buffer: n(e.subscriber_buffer, d.subscriber_buffer),
                            max_subscribers: n(e.max_subscribers, d.max_subscribers),
                            max_snapshot_targets: n(e.max_snapshot_targets, d.max_snapshot_targets),
                        };
                    }
                }
                "telemetry" => {
                    if let Some(t) = self.de::<TelemetryToml>(value, "[telemetry]") {
                        let d = TelemetryConfig::default();
                        config.telemetry = TelemetryConfig {
                            max_target_labels: t.max_target_labels.map_or(d.max_target_labels, |Positive(n)| n as usize),
                            otlp_endpoint: t
                                .otlp_endpoint
                                .filter(|e| !e.is_empty())
                                .filter(|e| self.otlp_endpoint(e, key_span.clone())),
                            service_name: t.service_name.unwrap_or(d.service_name),
                            latency_buckets: match t.latency_buckets {
                                Some(b) => self.buckets(b, key_span.clone()),
                                None => d.latency_buckets,
                            },
                        };
                    }
                }
                "queue" => {
                    if let Some(q) = self.de::<QueueToml>(value, "[queue]") {
                        config.queue = self.queue(q, key_span);
                    }
                }
                "budgets" => {
                    if let Some(t) = self.table(value, "[budgets]") {
                        for (name, v) in t {
                            let span = name.span();
                            let name = name.into_inner().into_owned();
                            let what = format!("[budgets.{name}]");
                            if let Some(g) = self.de::<GroupToml>(v, &what) {
                                groups.push((name, span, g));
                            }
                        }
                    }
                }
                other => self.err(
                    key_span,
                    format!(
                        "unknown section `{other}`; expected one of: server, defaults, targets, routes, budgets, queue, events, telemetry"
                    ),
                ),
            }
        }
        if let Some(s) = server {
            config.server = self.server(s, server_span);
        }
        if config.server.max_message_bytes < config.queue.max_payload_bytes + 64 * 1024 {
            self.err(
                0..0,
                format!(
                    "[server] max_message_bytes ({}) must exceed [queue] max_payload_bytes ({}) by at least 64 KiB",
                    config.server.max_message_bytes, config.queue.max_payload_bytes
                ),
            );
        }

        // Defaults every target starts from.
        let mut base = TargetSettings::default();
        if let Some(b) = &defaults.breaker {
            self.breaker(
                b,
                &mut base.breaker,
                defaults_span.clone(),
                "[defaults.breaker]",
            );
        }
        if let Some(r) = &defaults.retry {
            self.retry(r, &mut base.retry, defaults_span, "[defaults.retry]");
        }
        if let Some(Dur(d)) = defaults.permit_lease {
            base.permit_lease = d;
        }
        config.default_target = Arc::new(base.clone());

        // Budget groups first: targets refer to them by name.
        let mut group_ix: HashMap<String, usize> = HashMap::new();
        for (name, span, g) in groups {
            self.printable(&name, span.clone(), &format!("[budgets.{name:?}]"));
            let budget = self.budget(&g, g.window, span.clone(), &format!("[budgets.{name}]"));
            if budget.is_unlimited() {
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
            config.routes.insert(
                name.clone(),
                Arc::new(RouteSettings {
                    name: name.into(),
                    targets: list,
                }),
            );
        }
        config
    }

    fn queue(&mut self, q: QueueToml, span: Range<usize>) -> QueueConfig {
        let mut out = QueueConfig::default();
        if let Some(Positive(n)) = q.max_payload_bytes {
            out.max_payload_bytes = n as usize;
        }
        if let Some(Positive(n)) = q.max_depth {
            out.max_depth = n as usize;
        }
        if let Some(Positive(n)) = q.max_total_bytes {
            out.max_total_bytes = n;
        }
        if let Some(Positive(n)) = q.default_max_attempts {
            if n > 100 {
                self.err(span, "[queue] default_max_attempts must be at most 100");
            }
            out.default_max_attempts = n.min(100) as u32;
        }
        if let Some(Dur(d)) = q.idempotency_ttl {
            out.idempotency_ttl = d;
        }
        if let Some(Positive(n)) = q.max_items {
            out.max_items = n as usize;
        }
        if let Some(Positive(n)) = q.max_queues {
            out.max_queues = n as usize;
        }
        out
    }

    fn target_name(&mut self, name: &str, span: Range<usize>, what: &str) {
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
    fn printable(&mut self, name: &str, span: Range<usize>, what: &str) {
        if name.chars().any(char::is_control) {
            self.err(
                span,
                format!("{what}: the name {name:?} contains a control character; names must be printable"),
            );
        }
    }

    /// Histogram bounds: 1..=64 finite, positive, strictly increasing seconds.
    fn buckets(&mut self, b: Vec<f64>, span: Range<usize>) -> Arc<[f64]> {
        let increasing = b.windows(2).all(|w| w[0] < w[1]);
        if b.is_empty()
            || b.len() > MAX_LATENCY_BUCKETS
            || !increasing
            || b.iter().any(|x| !x.is_finite() || *x <= 0.0)
        {
            self.err(
                span,
                format!(
                    "[telemetry] latency_buckets must be 1..={MAX_LATENCY_BUCKETS} positive, strictly increasing seconds, e.g. [0.5, 1, 2, 5, 10, 30, 60, 120]"
                ),
            );
            return DEFAULT_LATENCY_BUCKETS.into();
        }
        b.into()
    }

    /// An OTLP endpoint must be an http(s) URL with a host, or `serve` would
    /// fail at startup after check-config said the file was fine.
    fn otlp_endpoint(&mut self, e: &str, span: Range<usize>) -> bool {
        let ok = e.parse::<axum::http::Uri>().ok().is_some_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty())
        });
        if !ok {
            self.err(
                span,
                format!(
                    "[telemetry] otlp_endpoint {e:?} is not a URL like \"http://127.0.0.1:4317\""
                ),
            );
        }
        ok
    }

    fn server(&mut self, s: ServerToml, span: Range<usize>) -> ServerConfig {
        let mut out = ServerConfig::default();
        if let Some(l) = s.listen {
            match l.get_ref().parse() {
                Ok(a) => out.listen = a,
                Err(_) => self.err(
                    l.span(),
                    format!(
                        "listen: {:?} is not an address like \"127.0.0.1:50051\"",
                        l.get_ref()
                    ),
                ),
            }
        }
        if let Some(h) = s.http {
            let v = h.get_ref();
            if v == "off" || v.is_empty() {
                out.http = None;
            } else {
                match v.parse() {
                    Ok(a) => out.http = Some(a),
                    Err(_) => self.err(
                        h.span(),
                        format!(
                            "http: {v:?} is not an address like \"127.0.0.1:9464\" (or \"off\")"
                        ),
                    ),
                }
            }
        }
        if let Some(d) = s.data_dir {
            out.data_dir = PathBuf::from(d);
        }
        if let Some(e) = s.ephemeral {
            out.ephemeral = e;
        }
        if let Some(Positive(n)) = s.max_targets {
            out.max_targets = n as usize;
        }
        if let Some(t) = s.admin_token {
            if t.get_ref().len() < 16 {
                self.err(t.span(), "admin_token must be at least 16 characters");
            }
            out.admin_token = Some(t.into_inner());
        }
        if let Some(Positive(n)) = s.max_message_bytes {
            out.max_message_bytes = n as usize;
        }
        if let Some(Dur(d)) = s.shutdown_grace {
            out.shutdown_grace = d;
        }
        if let Some(Dur(d)) = s.max_pause {
            out.max_pause = d;
        }
        if let Some(Positive(n)) = s.max_headers {
            out.max_headers = n as usize;
        }
        if let Some(Positive(n)) = s.max_header_bytes {
            out.max_header_bytes = n as usize;
        }
        if let Some(Positive(n)) = s.max_connections {
            out.max_connections = n as usize;
        }
        if let Some(Dur(d)) = s.handshake_timeout {
            out.handshake_timeout = d;
        }
        if let Some(Dur(d)) = s.idle_timeout {
            out.idle_timeout = d;
        }
        if let Some(Dur(d)) = s.http2_keepalive_interval {
            out.http2_keepalive_interval = (!d.is_zero()).then_some(d);
        }
        if let Some(Dur(d)) = s.http2_keepalive_timeout {
            out.http2_keepalive_timeout = d;
        }
        if let Some(k) = s.permit_key {
            if k.get_ref().len() < 32 {
                self.err(
                    k.span(),
                    "permit_key must be at least 32 characters (e.g. `openssl rand -hex 32`)",
                );
            }
            out.permit_key = Some(k.into_inner());
        }
        if let Some(p) = s.outcomes_without_permit {
            out.outcomes_without_permit = match p.get_ref().as_str() {
                "count" => Permitless::Count,
                "trusted" => Permitless::Trusted,
                "reject" => Permitless::Reject,
                other => {
                    self.err(
                        p.span(),
                        format!("outcomes_without_permit: {other:?} is not one of \"count\", \"trusted\", \"reject\""),
                    );
                    Permitless::Count
                }
            };
        }
        for (name, d) in [
            ("handshake_timeout", out.handshake_timeout),
            ("idle_timeout", out.idle_timeout),
            ("http2_keepalive_timeout", out.http2_keepalive_timeout),
        ] {
            if d.is_zero() {
                self.err(span.clone(), format!("[server] {name} must be above 0"));
            }
        }
        out
    }

    fn breaker(
        &mut self,
        b: &BreakerToml,
        out: &mut BreakerConfig,
        span: Range<usize>,
        what: &str,
    ) {
        let u32v = |p: Positive| u32::try_from(p.0).unwrap_or(u32::MAX);
        if let Some(v) = b.failure_threshold {
            out.failure_threshold = u32v(v);
        }
        if let Some(v) = b.success_threshold {
            out.success_threshold = u32v(v);
        }
        if let Some(Dur(d)) = b.open_duration {
            out.open_duration = d;
        }
        if let Some(v) = b.half_open_max_probes {
            out.half_open_max_probes = u32v(v);
        }
        if let Some(Dur(d)) = b.probe_lease {
            out.probe_lease = d;
        }
        if let Some(m) = b.backoff_multiplier {
            if !(m.is_finite() && m >= 1.0) {
                self.err(
                    span.clone(),
                    format!("{what}: backoff_multiplier must be >= 1.0, got {m}"),
                );
            } else {
                out.backoff_multiplier = m;
            }
        }
        if let Some(Dur(d)) = b.max_open_duration {
            out.max_open_duration = d;
        }
        if let Some(Fraction(j)) = b.jitter {
            out.jitter = j;
        }
        if let Some(Dur(d)) = b.window {
            out.window = d;
        }
        if let Some(Fraction(t)) = b.failure_rate_threshold {
            if t <= 0.0 {
                self.err(
                    span.clone(),
                    format!("{what}: failure_rate_threshold must be above 0"),
                );
            }
            let minimum_calls = out.rate_rule.map_or(10, |r| r.minimum_calls);
            out.rate_rule = Some(RateRule {
                threshold: t,
                minimum_calls,
            });
        }
        if let Some(v) = b.minimum_calls {
            match out.rate_rule.as_mut() {
                Some(r) => r.minimum_calls = u32v(v),
                None => self.err(
                    span.clone(),
                    format!("{what}: minimum_calls only applies with failure_rate_threshold"),
                ),
            }
        }
        if let Some(Dur(d)) = b.slow_call_duration {
            out.slow_call_duration = Some(d);
        }
        if let Some(Dur(d)) = b.persistent_open_duration {
            out.persistent_open_duration = d;
        }
        if let Some(t) = &b.treat {
            let pairs = [
                (OutcomeClass::Transient, t.transient),
                (OutcomeClass::Timeout, t.timeout),
                (OutcomeClass::RateLimited, t.rate_limited),
                (OutcomeClass::Persistent, t.persistent),
                (OutcomeClass::BadInput, t.bad_input),
                (OutcomeClass::Partial, t.partial),
            ];
            for (class, v) in pairs {
                if let Some(v) = v {
                    let treatment = match v {
                        TreatmentToml::Failure => Treatment::Failure,
                        TreatmentToml::Success => Treatment::Success,
                        TreatmentToml::Ignore => Treatment::Ignore,
                        TreatmentToml::Open => Treatment::Open,
                    };
                    out.treatments.set(class, treatment);
                }
            }
        }
        if out.open_duration.is_zero() {
            self.err(
                span.clone(),
                format!("{what}: open_duration must be above 0"),
            );
        }
        if out.probe_lease.is_zero() {
            self.err(span.clone(), format!("{what}: probe_lease must be above 0"));
        }
        if out.window.is_zero() {
            self.err(span.clone(), format!("{what}: window must be above 0"));
        }
        if out.max_open_duration < out.open_duration {
            self.err(
                span,
                format!(
                    "{what}: max_open_duration ({:?}) is shorter than open_duration ({:?})",
                    out.max_open_duration, out.open_duration
                ),
            );
        }
    }

    fn retry(&mut self, r: &RetryToml, out: &mut RetryConfig, span: Range<usize>, what: &str) {
        if let Some(n) = r.max_retries {
            out.max_retries = n;
        }
        if let Some(Dur(d)) = r.base_delay {
            out.base_delay = d;
        }
        if let Some(Dur(d)) = r.max_delay {
            out.max_delay = d;
        }
        if let Some(s) = r.strategy {
            out.jitter = match s {
                StrategyToml::Full => Jitter::Full,
                StrategyToml::Equal => Jitter::Equal,
                StrategyToml::Decorrelated => Jitter::Decorrelated,
            };
        }
        if let Some(NonNeg(x)) = r.retry_ratio {
            out.budget_ratio = x;
        }
        if let Some(Dur(d)) = r.retry_window {
            out.budget_window = d;
        }
        if let Some(NonNeg(x)) = r.min_retries_per_second {
            out.min_retries_per_second = x;
        }
        if out.max_delay < out.base_delay {
            self.err(
                span.clone(),
                format!("{what}: max_delay is shorter than base_delay"),
            );
        }
        if out.budget_window.is_zero() {
            self.err(span, format!("{what}: retry_window must be above 0"));
        }
    }

    fn budget<B: HasAmounts>(
        &mut self,
        b: &B,
        window: Option<Dur>,
        span: Range<usize>,
        what: &str,
    ) -> BudgetConfig {
        let mut out = BudgetConfig::default();
        let window = window.map(|Dur(d)| d);
        if window.is_some_and(|w| w.is_zero()) {
            self.err(span.clone(), format!("{what}: window must be above 0"));
        }
        let mut any_windowed = false;
        for (kind, (per_minute, per_window)) in Kind::ALL.into_iter().zip(b.amounts()) {
            match (per_minute, per_window) {
                (Some(_), Some(_)) => self.err(
                    span.clone(),
                    format!(
                        "{what}: set either {k}_per_minute or {k} (with window), not both",
                        k = kind.as_str()
                    ),
                ),
                (Some(Positive(n)), None) => out.rates[kind.index()] = Some(Rate::per_minute(n)),
                (None, Some(Positive(n))) => {
                    any_windowed = true;
                    match window {
                        Some(w) if !w.is_zero() => {
                            out.rates[kind.index()] = Some(Rate {
                                amount: n,
                                window: w,
                            })
                        }
                        _ => self.err(
                            span.clone(),
                            format!(
                                "{what}: {} needs a window, e.g. window = \"10s\"",
                                kind.as_str()
                            ),
                        ),
                    }
                }
                (None, None) => {}
            }
        }
        if window.is_some() && !any_windowed {
            self.err(
                span,
                format!("{what}: window is set but no per-window budget (requests, tokens, input_tokens, output_tokens) uses it"),
            );
        }
        out.max_concurrency = b
            .max_concurrency()
            .map(|Positive(n)| u32::try_from(n).unwrap_or(u32::MAX));
        out
    }
}

/// Targets and budget groups share the budget keys.
trait HasAmounts {
    fn amounts(&self) -> [(Option<Positive>, Option<Positive>); 4];
    fn max_concurrency(&self) -> Option<Positive>;
}

impl HasAmounts for TargetToml {
    fn amounts(&self) -> [(Option<Positive>, Option<Positive>); 4] {
        TargetToml::amounts(self)
    }
    fn max_concurrency(&self) -> Option<Positive> {
        self.max_concurrency
    }
}

impl HasAmounts for GroupToml {
    fn amounts(&self) -> [(Option<Positive>, Option<Positive>); 4] {
        GroupToml::amounts(self)
    }
    fn max_concurrency(&self) -> Option<Positive> {
        self.max_concurrency
    }
}

#[cfg(test)]
mod tests;
