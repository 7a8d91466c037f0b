//! The config file as written: serde structs that mirror the TOML exactly.
//!
//! Every struct denies unknown keys (a typo must be an error, not a silently
//! ignored setting), and value types validate themselves so that serde's error
//! carries the location of the offending value.

use crate::domain::breaker::quorum::MAX_MIN_DISTINCT_CALLERS;
use crate::domain::duration::parse_duration;
use serde::{Deserialize, Deserializer};
use std::time::Duration;
use toml::Spanned;

/// A human duration string ("250ms", "30s", "10m").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

/// A strictly positive integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Positive(pub u64);

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        if v <= 0 {
            return Err(serde::de::Error::custom(format!(
                "must be a positive integer, got {v}"
            )));
        }
        Ok(Positive(v as u64))
    }
}

/// A non-negative number (costs, rates).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NonNeg(pub f64);

impl<'de> Deserialize<'de> for NonNeg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() || v < 0.0 {
            return Err(serde::de::Error::custom(format!(
                "must be a non-negative number, got {v}"
            )));
        }
        Ok(NonNeg(v))
    }
}

/// A fraction in (0, 1] (failure-rate threshold) or [0, 1] (jitter), checked at resolution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fraction(pub f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() || !(0.0..=1.0).contains(&v) {
            return Err(serde::de::Error::custom(format!(
                "must be a fraction between 0 and 1 (e.g. 0.5 for 50%), got {v}"
            )));
        }
        Ok(Fraction(v))
    }
}

/// `min_distinct_callers`: 1 to [`MAX_MIN_DISTINCT_CALLERS`]. Checked here
/// so the error points at the value. The upper bound keeps the breaker's
/// set of recent failing callers small (it holds up to twice this many).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallerQuorum(pub u32);

impl<'de> Deserialize<'de> for CallerQuorum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        match u32::try_from(v) {
            Ok(n) if (1..=MAX_MIN_DISTINCT_CALLERS).contains(&n) => Ok(CallerQuorum(n)),
            _ => Err(serde::de::Error::custom(format!(
                "min_distinct_callers must be between 1 and {MAX_MIN_DISTINCT_CALLERS} \
                 (how many distinct callers must report failures before the breaker opens; \
                 1 = any caller), got {v}"
            ))),
        }
    }
}

/// `max_concurrency`: a positive integer, or "adaptive" (learned from
/// outcomes within the bounds of the `adaptive` table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConcurrencyToml {
    Fixed(u64),
    Adaptive,
}

impl<'de> Deserialize<'de> for ConcurrencyToml {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ConcurrencyToml;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a positive integer or \"adaptive\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
                if v <= 0 {
                    return Err(E::custom(format!(
                        "must be a positive integer or \"adaptive\", got {v}"
                    )));
                }
                Ok(ConcurrencyToml::Fixed(v as u64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
                match i64::try_from(v) {
                    Ok(v) => self.visit_i64(v),
                    Err(_) => Err(E::custom(format!("{v} is too large"))),
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v == "adaptive" {
                    Ok(ConcurrencyToml::Adaptive)
                } else {
                    Err(E::custom(format!(
                        "must be a positive integer or \"adaptive\", got {v:?}"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// `adaptive = { min = 2, max = 64, initial = 8 }`: the bounds of an
/// adaptive `max_concurrency` (checked at resolution, with the defaults).
#[derive(Deserialize, Debug, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveToml {
    pub min: Option<i64>,
    pub max: Option<i64>,
    pub initial: Option<i64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ServerToml {
    /// gRPC listen address.
    pub listen: Option<Spanned<String>>,
    /// HTTP listen address (metrics, events, dashboard); "off" disables it.
    pub http: Option<Spanned<String>>,
    pub data_dir: Option<String>,
    pub ephemeral: Option<bool>,
    pub max_targets: Option<Positive>,
    /// When set, Admin calls need `authorization: Bearer <token>`.
    pub admin_token: Option<Spanned<String>>,
    /// `[server.tls]`: serve gRPC and HTTP over TLS.
    pub tls: Option<Spanned<TlsToml>>,
    pub max_message_bytes: Option<Positive>,
    pub shutdown_grace: Option<Dur>,
    /// Longest pause a provider header or retry hint can impose.
    pub max_pause: Option<Dur>,
    pub max_headers: Option<Positive>,
    pub max_open_requests: Option<Positive>,
    pub request_ttl: Option<Dur>,
    pub max_header_bytes: Option<Positive>,
    /// Open gRPC connections at once; more are closed on accept.
    pub max_connections: Option<Positive>,
    /// A new connection must complete its handshake within this.
    pub handshake_timeout: Option<Dur>,
    /// A connection that receives nothing for this long is closed.
    pub idle_timeout: Option<Dur>,
    /// HTTP/2 PING interval ("0s" = off) and how long a ping may go unanswered.
    pub http2_keepalive_interval: Option<Dur>,
    pub http2_keepalive_timeout: Option<Dur>,
    /// Secret that signs permits (>= 32 characters). Default: generated once
    /// and kept in the state store.
    pub permit_key: Option<Spanned<String>>,
    /// "count" (default) | "trusted" | "reject": what a RecordOutcome
    /// without a live permit may do.
    pub outcomes_without_permit: Option<Spanned<String>>,
}

/// `[cluster]`: replicas sharing decision state through Redis.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct ClusterToml {
    /// Standalone Redis (or a Sentinel-managed primary): redis://host:port/db.
    pub redis_url: Option<Spanned<String>>,
    /// Redis Cluster seed nodes, instead of redis_url.
    pub redis_cluster_nodes: Option<Spanned<Vec<String>>>,
    pub key_prefix: Option<Spanned<String>>,
    /// Per Redis call; past it the call counts as a Redis failure.
    pub redis_timeout: Option<Dur>,
    /// "local" | "open" | "closed".
    pub on_redis_unavailable: Option<Spanned<String>>,
    pub replica_id: Option<Spanned<String>>,
    /// With replicas: WAIT for this many to acknowledge transitions and Defers.
    pub min_replicas_acked: Option<u32>,
    /// TLS to Redis (`rediss://`): a PEM CA bundle to trust instead of the
    /// system's roots (a private CA).
    pub redis_ca: Option<Spanned<String>>,
    /// TLS to Redis: a client certificate (PEM) for Redis's `tls-auth-clients`.
    pub redis_client_cert: Option<Spanned<String>>,
    /// TLS to Redis: the client certificate's private key (PEM).
    pub redis_client_key: Option<Spanned<String>>,
}

/// `[events]`: the event log and its subscribers.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct EventsToml {
    pub ring_size: Option<Positive>,
    pub subscriber_buffer: Option<Positive>,
    pub max_subscribers: Option<Positive>,
    pub max_snapshot_targets: Option<Positive>,
    pub history_targets: Option<Positive>,
}

/// `[telemetry]`: metrics labels and OpenTelemetry export.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct TelemetryToml {
    pub max_target_labels: Option<Positive>,
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    /// Upper bounds (seconds) of the provider-call latency histogram buckets.
    pub latency_buckets: Option<Vec<f64>>,
}

/// `[queue]`: bounds of the deferred-request queue.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct QueueToml {
    pub max_payload_bytes: Option<Positive>,
    pub max_depth: Option<Positive>,
    pub max_total_bytes: Option<Positive>,
    pub default_max_attempts: Option<Positive>,
    pub idempotency_ttl: Option<Dur>,
    pub max_items: Option<Positive>,
    pub max_queues: Option<Positive>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct DefaultsToml {
    pub breaker: Option<BreakerToml>,
    pub retry: Option<RetryToml>,
    pub permit_lease: Option<Dur>,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct BreakerToml {
    pub failure_threshold: Option<Positive>,
    pub success_threshold: Option<Positive>,
    pub open_duration: Option<Dur>,
    pub half_open_max_probes: Option<Positive>,
    pub probe_lease: Option<Dur>,
    pub backoff_multiplier: Option<f64>,
    pub max_open_duration: Option<Dur>,
    pub jitter: Option<Fraction>,
    pub failure_rate_threshold: Option<Fraction>,
    pub window: Option<Dur>,
    pub minimum_calls: Option<Positive>,
    pub slow_call_duration: Option<Dur>,
    pub persistent_open_duration: Option<Dur>,
    pub treat: Option<TreatToml>,
    /// Quorum tripping: failures open the breaker only when this many
    /// distinct callers reported one within `window`.
    pub min_distinct_callers: Option<CallerQuorum>,
}

/// Per-class breaker treatment overrides: "failure", "success", "ignore" or "open".
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct TreatToml {
    pub transient: Option<TreatmentToml>,
    pub timeout: Option<TreatmentToml>,
    pub rate_limited: Option<TreatmentToml>,
    pub persistent: Option<TreatmentToml>,
    pub bad_input: Option<TreatmentToml>,
    pub partial: Option<TreatmentToml>,
}

#[derive(Deserialize, Debug, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum TreatmentToml {
    Failure,
    Success,
    Ignore,
    Open,
}

#[derive(Deserialize, Debug, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RetryToml {
    pub max_retries: Option<u32>,
    pub base_delay: Option<Dur>,
    pub max_delay: Option<Dur>,
    pub strategy: Option<StrategyToml>,
    pub retry_ratio: Option<NonNeg>,
    pub retry_window: Option<Dur>,
    pub min_retries_per_second: Option<NonNeg>,
}

#[derive(Deserialize, Debug, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub enum StrategyToml {
    Full,
    Equal,
    Decorrelated,
}

#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ModeToml {
    Enforce,
    Shadow,
}

/// `reserve = { interactive = 0.2, default = 0.1 }`: the share of a budget
/// only calls of at least that priority may use.
#[derive(Deserialize, Debug, Default, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct ReserveToml {
    pub interactive: Option<f64>,
    pub default: Option<f64>,
}

/// Declares a struct holding the budget keys, shared by targets and budget groups,
/// plus the struct's own keys. (serde cannot combine `flatten` with
/// `deny_unknown_fields`, so the shared keys are repeated by this macro.)
macro_rules! with_budget_fields {
    ($(#[$m:meta])* pub struct $name:ident { $($(#[$fm:meta])* pub $f:ident: $t:ty,)* }) => {
        $(#[$m])*
        pub struct $name {
            pub requests_per_minute: Option<Positive>,
            pub tokens_per_minute: Option<Positive>,
            pub input_tokens_per_minute: Option<Positive>,
            pub output_tokens_per_minute: Option<Positive>,
            /// Budgets per `window` instead of per minute.
            pub requests: Option<Positive>,
            pub tokens: Option<Positive>,
            pub input_tokens: Option<Positive>,
            pub output_tokens: Option<Positive>,
            pub window: Option<Dur>,
            /// Money per `window` (in the currency of the prices), or per day / hour.
            pub spend: Option<Spanned<f64>>,
            pub spend_per_day: Option<Spanned<f64>>,
            pub spend_per_hour: Option<Spanned<f64>>,
            /// A positive integer, or "adaptive" (bounds in `adaptive`).
            pub max_concurrency: Option<Spanned<ConcurrencyToml>>,
            /// Bounds of `max_concurrency = "adaptive"`.
            pub adaptive: Option<Spanned<AdaptiveToml>>,
            /// Shares held back for higher priorities, e.g. `{ interactive = 0.2 }`.
            pub reserve: Option<Spanned<ReserveToml>>,
            $($(#[$fm])* pub $f: $t,)*
        }
        impl $name {
            /// (per-minute, per-window) amounts for each budget kind, in `Kind::ALL` order.
            pub fn amounts(&self) -> [(Option<Positive>, Option<Positive>); 4] {
                [
                    (self.requests_per_minute, self.requests),
                    (self.tokens_per_minute, self.tokens),
                    (self.input_tokens_per_minute, self.input_tokens),
                    (self.output_tokens_per_minute, self.output_tokens),
                ]
            }
        }
    };
}

with_budget_fields! {
    #[derive(Deserialize, Debug, Default)]
    #[serde(deny_unknown_fields)]
    pub struct TargetToml {
        pub max_tokens: Option<u64>,
        pub context_window: Option<u64>,
        pub cost_per_mtok_input: Option<NonNeg>,
        pub cost_per_mtok_output: Option<NonNeg>,
        pub breaker: Option<BreakerToml>,
        pub retry: Option<RetryToml>,
        /// Key slot names (never secrets).
        pub keys: Option<Vec<Spanned<String>>>,
        /// Shared budget groups this target also draws on.
        pub budgets: Option<Vec<Spanned<String>>>,
        pub mode: Option<ModeToml>,
        pub permit_lease: Option<Dur>,
    }
}

with_budget_fields! {
    #[derive(Deserialize, Debug, Default)]
    #[serde(deny_unknown_fields)]
    pub struct GroupToml {
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct RouteToml {
    pub targets: Vec<Spanned<String>>,
    /// How candidates are ordered (see `domain::strategy`); "ordered" by default.
    pub strategy: Option<Spanned<String>>,
    /// `weighted`: one weight per target, in the same order.
    pub weights: Option<Spanned<Vec<f64>>>,
    /// `lowest_latency`: share of requests sent to a random other target so
    /// it is measured again (default 0.05).
    pub explore: Option<Spanned<f64>>,
    /// `lowest_cost`: output tokens to price when a request does not say.
    pub expected_output_tokens: Option<u64>,
    /// Money per `window` (in the currency of the prices), or per day / hour.
    pub spend: Option<Spanned<f64>>,
    pub window: Option<Dur>,
    pub spend_per_day: Option<Spanned<f64>>,
    pub spend_per_hour: Option<Spanned<f64>>,
}

/// One `[callers."<name>"]` entry.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct CallerToml {
    /// Money per `window` (in the currency of the prices), or per day / hour.
    pub spend: Option<Spanned<f64>>,
    pub window: Option<Dur>,
    pub spend_per_day: Option<Spanned<f64>>,
    pub spend_per_hour: Option<Spanned<f64>>,
}

/// Routes, callers and tenants take the same spend keys (`spend` with
/// `window`, `spend_per_hour` or `spend_per_day`).
pub trait HasSpend {
    /// (spend, spend_per_day, spend_per_hour), and the window of `spend`.
    fn spend_keys(&self) -> ([Option<&Spanned<f64>>; 3], Option<Dur>);
}

macro_rules! has_spend {
    ($($t:ty),*) => {$(
        impl HasSpend for $t {
            fn spend_keys(&self) -> ([Option<&Spanned<f64>>; 3], Option<Dur>) {
                (
                    [
                        self.spend.as_ref(),
                        self.spend_per_day.as_ref(),
                        self.spend_per_hour.as_ref(),
                    ],
                    self.window,
                )
            }
        }
    )*};
}
has_spend!(RouteToml, CallerToml, TenantToml);

/// `[auth]`: principals with roles (see `grpc/auth.rs`).
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthToml {
    /// "open" (default) or "token": whether `/metrics` needs a viewer credential.
    pub metrics: Option<Spanned<String>>,
    /// Decisions per second each principal may ask for (default: unlimited).
    pub decision_rate: Option<Spanned<f64>>,
    /// Decisions a principal may ask for at once (default: one second's worth).
    pub decision_burst: Option<Positive>,
    #[serde(default)]
    pub principals: Vec<Spanned<PrincipalToml>>,
}

/// `[server.tls]`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct TlsToml {
    /// PEM certificate chain and private key (reloaded when the files change).
    pub cert: String,
    pub key: String,
    /// PEM CA bundle that client certificates must chain to (mTLS).
    pub client_ca: Option<String>,
    /// Refuse peers without a valid client certificate at the handshake.
    pub require_client_cert: Option<bool>,
}

/// One `[tenants.<name>]` entry.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct TenantToml {
    /// Names (targets, routes, queues) starting with it belong to the
    /// tenant (default: "<name>/").
    pub prefix: Option<Spanned<String>>,
    /// Targets the tenant may hold (within the server's `max_targets`).
    pub max_targets: Option<Positive>,
    /// Bytes of payload the tenant's queues may hold (within the server's).
    pub max_queue_bytes: Option<Positive>,
    /// Watch streams the tenant's principals may hold open at once.
    pub max_watchers: Option<Positive>,
    /// Money per `window` (in the currency of the prices), or per day / hour.
    pub spend: Option<Spanned<f64>>,
    pub window: Option<Dur>,
    pub spend_per_day: Option<Spanned<f64>>,
    pub spend_per_hour: Option<Spanned<f64>>,
}

/// One `[[auth.principals]]` entry.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct PrincipalToml {
    pub name: Spanned<String>,
    pub roles: Spanned<Vec<String>>,
    /// SHA-256 of the bearer token, hex (the token itself is never stored).
    pub token_sha256: Option<Spanned<String>>,
    /// A client certificate's subject common name or one of its DNS / URI
    /// names (mTLS) that stands for this principal.
    pub cert_identity: Option<Spanned<String>>,
    /// The tenant it belongs to (`[tenants.<name>]`): it then sees and
    /// affects only that tenant's targets, routes and queues.
    pub tenant: Option<Spanned<String>>,
    /// Overrides `[auth] decision_rate` / `decision_burst` for this principal.
    pub decision_rate: Option<Spanned<f64>>,
    pub decision_burst: Option<Positive>,
}
