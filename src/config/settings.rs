//! What a validated config resolves to: the settings every part of the
//! server reads (servers, targets, budget groups, routes, queues, events,
//! telemetry), with the defaults that apply when a key is absent.

use crate::domain::BreakerConfig;
use crate::domain::budget::BudgetConfig;
use crate::domain::retry::RetryConfig;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// Request ids (`request_id`) tracked at once for end-to-end metrics;
    /// past it, new ids are counted as untracked (see engine::requests).
    pub max_open_requests: usize,
    /// An unfinished request id is dropped (counted `expired`) this long
    /// after its first call.
    pub request_ttl: Duration,
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
    /// TLS for both listeners (None = plaintext).
    pub tls: Option<TlsConfig>,
}

/// `[server.tls]`.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub require_client_cert: bool,
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
            max_open_requests: 100_000,
            request_ttl: Duration::from_secs(600),
            max_connections: 10_000,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            http2_keepalive_interval: Some(Duration::from_secs(60)),
            http2_keepalive_timeout: Duration::from_secs(20),
            permit_key: None,
            outcomes_without_permit: Permitless::Count,
            tls: None,
        }
    }
}

/// Where replicas share decision state.
#[derive(Clone, Debug, PartialEq)]
pub enum RedisTarget {
    /// One Redis (or a Sentinel-managed primary) at this URL.
    Url(String),
    /// A Redis Cluster, reached through these seed nodes (host:port).
    Cluster(Vec<String>),
}

/// What a replica does while Redis is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnRedisUnavailable {
    /// Decide locally from the last known state, each shared budget divided
    /// by the number of live replicas; answers are flagged `degraded`.
    #[default]
    Local,
    /// Admit everything (flagged `degraded`).
    Open,
    /// Refuse with UNAVAILABLE.
    Closed,
}

/// `[cluster]`: replicas sharing decision state through Redis.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterConfig {
    pub redis: RedisTarget,
    /// Every key starts with this (several fleets can share one Redis).
    pub key_prefix: String,
    /// Per Redis call; past it the call counts as a failure.
    pub redis_timeout: Duration,
    pub on_redis_unavailable: OnRedisUnavailable,
    /// Default: hostname + listen port (filled in at startup).
    pub replica_id: Option<String>,
    /// WAIT for this many Redis replicas after transitions and Defers (0 = off).
    pub min_replicas_acked: u32,
    /// Certificates for TLS to Redis; used when the URL (or a cluster node)
    /// says `rediss://`.
    pub tls: RedisTls,
}

/// TLS material for Redis, as paths: read again at every connection, so a
/// rotated CA bundle or client certificate is picked up when the replica
/// reconnects. Without a CA the system's roots are trusted.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RedisTls {
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl RedisTarget {
    /// Whether connections are TLS (`rediss://`).
    pub fn uses_tls(&self) -> bool {
        match self {
            RedisTarget::Url(u) => u.starts_with("rediss://"),
            RedisTarget::Cluster(nodes) => nodes.iter().any(|n| n.starts_with("rediss://")),
        }
    }
}

impl ClusterConfig {
    /// A standalone-Redis cluster config with the defaults (for `--redis`).
    pub fn for_url(url: &str) -> ClusterConfig {
        ClusterConfig {
            redis: RedisTarget::Url(url.to_string()),
            key_prefix: "backstop".into(),
            redis_timeout: Duration::from_millis(50),
            on_redis_unavailable: OnRedisUnavailable::Local,
            replica_id: None,
            min_replicas_acked: 0,
            tls: RedisTls::default(),
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
    /// Most targets the dashboard's 15-minute traffic history is kept for
    /// (about 15 KB each); others have none.
    pub history_targets: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            ring_size: 10_000,
            subscriber_buffer: 1024,
            max_subscribers: 256,
            max_snapshot_targets: 10_000,
            history_targets: 2000,
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
    pub strategy: crate::domain::strategy::Strategy,
    /// One per target (all 1.0 unless `weights` was given).
    pub weights: Vec<f64>,
    pub explore: f64,
    pub expected_output_tokens: u64,
    /// Money calls through this route may spend (`spend` + `window`,
    /// `spend_per_hour`, `spend_per_day` on the route).
    pub spend: Option<Arc<SpendScope>>,
}

/// A spend limit wider than one target: a route's, a caller's or a
/// tenant's. Checked by the engine beside the target's own limits and kept
/// by the decision backend like them (reserved at admission, settled at
/// the outcome with the real tokens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpendScope {
    /// `route:<name>`, `caller:<name>` or `tenant:<name>`: its name in
    /// events, metrics, storage and Redis keys.
    pub key: Arc<str>,
    pub limit: crate::domain::budget::Rate,
    /// 32 bits of the key's hash: what a permit carries to find the scope
    /// again when its outcome settles (checked unique when the config loads).
    pub hash: u32,
}

impl SpendScope {
    pub fn new(kind: &str, name: &str, limit: crate::domain::budget::Rate) -> SpendScope {
        let key = format!("{kind}:{name}");
        SpendScope {
            hash: scope_hash(&key),
            key: Arc::from(key.as_str()),
            limit,
        }
    }
}

/// The permit's handle on a spend scope (never 0: 0 means "none").
pub fn scope_hash(key: &str) -> u32 {
    (crate::domain::unit::name_hash(key) as u32).max(1)
}

/// `[callers."<name>"]`: what one caller (the `caller` field of its
/// requests) may spend, whichever targets and routes it uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerSettings {
    pub name: Arc<str>,
    pub spend: Option<Arc<SpendScope>>,
}

/// Most callers a config may name (`[callers]` is config-bound so the
/// `caller` label of the spend metric stays bounded).
pub const MAX_CALLERS: usize = 10_000;

/// Default exploration share of `lowest_latency` routes.
pub const DEFAULT_EXPLORE: f64 = 0.05;

/// The resolved configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub server: ServerConfig,
    /// Cluster mode (None = embedded: one process, state in its own store).
    pub cluster: Option<ClusterConfig>,
    /// Settings for targets created on first use.
    pub default_target: Arc<TargetSettings>,
    pub targets: BTreeMap<String, Arc<TargetSettings>>,
    pub routes: HashMap<String, Arc<RouteSettings>>,
    pub groups: Vec<GroupSettings>,
    pub queue: QueueConfig,
    pub events: EventsConfig,
    pub telemetry: TelemetryConfig,
    /// `[auth]`: None = no principals (the admin token alone guards
    /// operator calls, as before roles existed).
    pub auth: Option<AuthConfig>,
    /// `[tenants.<name>]`, by name.
    pub tenants: BTreeMap<String, Arc<Tenant>>,
    /// `[callers."<name>"]`, by name.
    pub callers: HashMap<String, Arc<CallerSettings>>,
    /// Every route, caller and tenant spend limit, by [`SpendScope::hash`].
    pub spend_scopes: HashMap<u32, Arc<SpendScope>>,
    /// Tenants with a spend limit (most configs: none, so admission
    /// skips the prefix checks entirely).
    pub tenant_spend: Vec<Arc<Tenant>>,
}

/// What a principal may do. A principal may hold several; `operator`
/// includes everything `viewer` may.
pub mod roles {
    /// Resilience calls, Defer / Claim / Ack / Nack, Watch.
    pub const AGENT: u8 = 1;
    /// Admin reads, Watch, QueueStats, dead letters, the dashboard and `/events`.
    pub const VIEWER: u8 = 2;
    /// Viewer, plus SetBreakerState, ResetTarget, Requeue, ReloadConfig.
    pub const OPERATOR: u8 = 4;

    /// The role names as written in the config, in order.
    pub const NAMES: [(&str, u8); 3] =
        [("agent", AGENT), ("viewer", VIEWER), ("operator", OPERATOR)];

    /// "agent, viewer" for a set of roles.
    pub fn describe(bits: u8) -> String {
        let names: Vec<&str> = NAMES
            .iter()
            .filter(|(_, b)| bits & b != 0)
            .map(|(n, _)| *n)
            .collect();
        if names.is_empty() {
            "no role".into()
        } else {
            names.join(", ")
        }
    }
}

/// `[auth]`, resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthConfig {
    pub principals: Vec<Principal>,
    /// `/metrics` without a credential.
    pub metrics_open: bool,
}

/// An identity that may call the server.
#[derive(Clone, Debug, PartialEq)]
pub struct Principal {
    pub name: std::sync::Arc<str>,
    /// Bits of [`roles`].
    pub roles: u8,
    /// SHA-256 of its bearer token (None: certificate only).
    pub token_sha256: Option<[u8; 32]>,
    /// Client-certificate name (CN or a DNS / URI SAN) that stands for it.
    pub cert_identity: Option<String>,
    /// How many decisions per second it may ask for (None: unlimited), so a
    /// runaway agent cannot flood the control plane every agent shares.
    pub decision_rate: Option<DecisionRate>,
    /// The tenant it is confined to (None: it sees the whole server).
    pub tenant: Option<Arc<Tenant>>,
}

/// A tenant (`[tenants.<name>]`): the names starting with `prefix` are its
/// targets, routes and queues; its principals see and affect nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    pub name: Arc<str>,
    pub prefix: Arc<str>,
    /// Money all of the tenant's targets together may spend.
    pub spend: Option<Arc<SpendScope>>,
    /// Caps (None: only the server's): targets it may hold, bytes of
    /// payload its queues may hold, Watch streams open at once.
    pub max_targets: Option<usize>,
    pub max_queue_bytes: Option<u64>,
    pub max_watchers: Option<usize>,
}

impl Tenant {
    /// Whether `name` (a target, route or queue) belongs to this tenant.
    pub fn owns(&self, name: &str) -> bool {
        name.starts_with(self.prefix.as_ref())
    }
}

/// A principal's decision rate: `per_second` sustained, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecisionRate {
    pub per_second: f64,
    pub burst: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            cluster: None,
            queue: QueueConfig::default(),
            events: EventsConfig::default(),
            telemetry: TelemetryConfig::default(),
            default_target: Arc::new(TargetSettings::default()),
            targets: BTreeMap::new(),
            routes: HashMap::new(),
            groups: Vec::new(),
            auth: None,
            tenants: BTreeMap::new(),
            callers: HashMap::new(),
            spend_scopes: HashMap::new(),
            tenant_spend: Vec::new(),
        }
    }
}
