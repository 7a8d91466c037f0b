//! The connection to Redis, and the breaker in front of it.
//!
//! Every call has a deadline (`redis_timeout`, 50 ms by default): an
//! unreachable or frozen Redis must cost a decision milliseconds, never
//! seconds (envoy ratelimit cost 1-10 s per request before failing open;
//! LiteLLM blocked every request with no socket timeout at all). After
//! [`FAILURES_TO_OPEN`] consecutive failures the link opens: calls fail at
//! once, without touching the network, and the replica decides locally
//! (degraded) while a prober pings Redis about once a second; the first
//! success closes it again. A replica also starts while Redis is down: the
//! connection is made in the background and the link starts open.

use crate::config::{ClusterConfig, RedisTarget, RedisTls};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where Redis is and how to reach it: the address, and for `rediss://`
/// the certificates, read from their files at every dial (a CA bundle or a
/// client certificate rotated on disk is used from the next reconnect).
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub redis: RedisTarget,
    pub tls: RedisTls,
}

impl Endpoint {
    pub fn of(c: &ClusterConfig) -> Endpoint {
        Endpoint {
            redis: c.redis.clone(),
            tls: c.tls.clone(),
        }
    }

    /// The PEM material for TLS, or None to use the system's roots (and
    /// plain connections for `redis://`). A file that cannot be read is a
    /// connection failure naming it (the replica stays degraded and keeps
    /// trying, as for any unreachable Redis).
    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, LinkError> {
        if !self.redis.uses_tls() || self.tls == RedisTls::default() {
            return Ok(None);
        }
        let read = |p: &std::path::Path, what: &str| {
            std::fs::read(p).map_err(|e| {
                LinkError::Redis(format!("cannot read [cluster] {what} {}: {e}", p.display()))
            })
        };
        let root_cert = match &self.tls.ca {
            Some(p) => {
                let pem = read(p, "redis_ca")?;
                // A file that holds no certificate would leave nothing to
                // trust and surface only as a vague handshake failure.
                if !pem
                    .windows(CERT_PEM.len())
                    .any(|w| w == CERT_PEM.as_bytes())
                {
                    return Err(LinkError::Redis(format!(
                        "[cluster] redis_ca {} holds no PEM certificate ({CERT_PEM:?})",
                        p.display()
                    )));
                }
                Some(pem)
            }
            None => None,
        };
        let client_tls = match (&self.tls.client_cert, &self.tls.client_key) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: read(c, "redis_client_cert")?,
                client_key: read(k, "redis_client_key")?,
            }),
            _ => None,
        };
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

/// How a PEM certificate starts.
const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----";

/// Consecutive failures that open the link.
pub const FAILURES_TO_OPEN: u32 = 3;
/// How often an open link is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A connection to standalone Redis (reconnecting) or to a Redis Cluster.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Why a Redis call did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkError {
    /// The link is open (Redis failed recently): not attempted.
    Open,
    /// No answer within `redis_timeout`.
    Timeout,
    /// Not connected yet.
    NotConnected,
    /// Redis answered with an error, or the connection broke.
    Redis(String),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::Open => f.write_str("Redis is marked unreachable (recent failures)"),
            LinkError::Timeout => f.write_str("Redis did not answer within redis_timeout"),
            LinkError::NotConnected => f.write_str("not connected to Redis yet"),
            LinkError::Redis(e) => write!(f, "Redis error: {e}"),
        }
    }
}

impl LinkError {
    /// A label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkError::Open => "open",
            LinkError::Timeout => "timeout",
            LinkError::NotConnected => "not_connected",
            LinkError::Redis(_) => "error",
        }
    }
}

/// The shared connection with its deadline and breaker.
pub struct Link {
    target: Endpoint,
    conn: RwLock<Option<Conn>>,
    timeout: Duration,
    failures: AtomicU32,
    open: AtomicBool,
    /// Last round trip, in microseconds.
    rtt_micros: AtomicU64,
    /// "master", "slave" or "cluster", from the last probe.
    role: RwLock<String>,
}

/// How long a decision connection waits for any response before it gives
/// up on it: `redis_timeout` × 4, at least 200 ms. A decision stops waiting
/// at `redis_timeout` (and decides degraded); the connection keeps the
/// request a while longer so that a late answer is read, not mistaken for
/// the next one, and the patient queue calls wait this long.
fn response_timeout(redis_timeout: Duration) -> Duration {
    redis_timeout.max(Duration::from_millis(50)) * 4
}

impl Link {
    /// A link that is not connected yet (see [`Link::connect`]); it starts
    /// open, so decisions made before the first connection are degraded.
    pub fn new(target: Endpoint, timeout: Duration) -> Link {
        Link {
            target,
            conn: RwLock::new(None),
            timeout,
            failures: AtomicU32::new(0),
            open: AtomicBool::new(true),
            rtt_micros: AtomicU64::new(0),
            role: RwLock::new(String::new()),
        }
    }

    /// Opens a fresh connection of the configured kind (also used for the
    /// event reader, which blocks and so needs its own).
    pub async fn dial(target: &Endpoint, timeout: Duration) -> Result<Conn, LinkError> {
        let connect = timeout.max(Duration::from_millis(200));
        let dial = Self::open(
            target,
            connect,
            response_timeout(timeout),
            Some(Duration::from_millis(500)),
        );
        tokio::time::timeout(Duration::from_secs(2), dial)
            .await
            .map_err(|_| LinkError::Timeout)?
    }

    /// A connection for blocking reads (`XREAD BLOCK`): its response
    /// timeout must outlast the block time, unlike the decision connection's.
    pub async fn dial_reader(target: &Endpoint) -> Result<Conn, LinkError> {
        let dial = Self::open(target, Duration::from_secs(1), Duration::from_secs(3), None);
        tokio::time::timeout(Duration::from_secs(3), dial)
            .await
            .map_err(|_| LinkError::Timeout)?
    }

    /// A client of the configured kind; `max_delay` caps the connection
    /// manager's reconnect backoff.
    async fn open(
        target: &Endpoint,
        connect: Duration,
        response: Duration,
        max_delay: Option<Duration>,
    ) -> Result<Conn, LinkError> {
        let err = |e: redis::RedisError| LinkError::Redis(e.to_string());
        match &target.redis {
            RedisTarget::Url(url) => {
                let client = match target.certificates()? {
                    Some(certs) => redis::Client::build_with_tls(url.as_str(), certs),
                    None => redis::Client::open(url.as_str()),
                }
                .map_err(err)?;
                let mut cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect))
                    .set_response_timeout(Some(response))
                    .set_number_of_retries(1);
                if let Some(d) = max_delay {
                    cfg = cfg.set_max_delay(d);
                }
                ConnectionManager::new_with_config(client, cfg)
                    .await
                    .map(Conn::Single)
                    .map_err(err)
            }
            RedisTarget::Cluster(nodes) => {
                let urls: Vec<String> = nodes
                    .iter()
                    .map(|n| {
                        if n.starts_with("rediss://") {
                            n.clone()
                        } else {
                            format!("redis://{n}")
                        }
                    })
                    .collect();
                let mut b = redis::cluster::ClusterClient::builder(urls)
                    .connection_timeout(connect)
                    .response_timeout(response)
                    .retries(1);
                if let Some(certs) = target.certificates()? {
                    b = b.certs(certs);
                }
                b.build()
                    .map_err(err)?
                    .get_async_connection()
                    .await
                    .map(Conn::Cluster)
                    .map_err(err)
            }
        }
    }

    /// Connects (or reconnects) the shared connection.
    pub async fn connect(&self) -> Result<(), LinkError> {
        let c = Self::dial(&self.target, self.timeout).await?;
        *self.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(c);
        Ok(())
    }

    pub fn is_connected(&self) -> bool {
        self.conn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// True while decisions must not wait for Redis.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Relaxed)
    }

    pub fn rtt(&self) -> Duration {
        Duration::from_micros(self.rtt_micros.load(Ordering::Relaxed))
    }

    pub fn role(&self) -> String {
        self.role.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn conn(&self) -> Result<Conn, LinkError> {
        self.conn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(LinkError::NotConnected)
    }

    fn failed(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= FAILURES_TO_OPEN {
            self.open.store(true, Ordering::Relaxed);
        }
    }

    fn succeeded(&self, rtt: Duration) {
        self.failures.store(0, Ordering::Relaxed);
        self.rtt_micros.store(
            u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Runs one call (a command, a script, a pipeline) with the deadline,
    /// counting it for the breaker. Fails at once while the link is open.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<T, LinkError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if self.is_open() {
            return Err(LinkError::Open);
        }
        self.call_anyway(f).await
    }

    /// Like [`Link::call`] but also while open (the prober, merge-back).
    pub async fn call_anyway<T, F, Fut>(&self, f: F) -> Result<T, LinkError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn()?;
        let started = Instant::now();
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(v)) => {
                self.succeeded(started.elapsed());
                Ok(v)
            }
            Ok(Err(e)) => {
                // Script-level errors (e.g. NOSCRIPT) are Redis answering: not a link failure.
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) {
                    return Err(LinkError::Redis(e.to_string()));
                }
                self.failed();
                Err(LinkError::Redis(e.to_string()))
            }
            Err(_) => {
                self.failed();
                Err(LinkError::Timeout)
            }
        }
    }

    /// For the deferred queue's Claim / Ack / Nack and listings, which are
    /// not on the decision path: tried even while the link is open, with
    /// `patience` instead of `redis_timeout`, and their failures do not move
    /// the breaker. Redis slower than `redis_timeout` is slow, not gone: a
    /// decision must not wait for it (it decides degraded), but a Claim can,
    /// and failing it would only make the worker retry.
    pub async fn call_patient<T, F, Fut>(&self, patience: Duration, f: F) -> Result<T, LinkError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let conn = self.conn()?;
        match tokio::time::timeout(patience, f(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(LinkError::Redis(e.to_string())),
            Err(_) => Err(LinkError::Timeout),
        }
    }

    /// How long [`Link::call_patient`] waits: what the connection itself
    /// allows a response (see [`response_timeout`]).
    pub fn patience(&self) -> Duration {
        response_timeout(self.timeout)
    }

    /// One probe: PING (and the role). Closes the link on success; returns
    /// whether it was open before (so the caller can merge back).
    pub async fn probe(&self) -> Result<bool, LinkError> {
        if !self.is_connected() {
            self.connect().await?;
        }
        let role: Vec<Value> = self
            .call_anyway(|mut c| async move { redis::cmd("ROLE").query_async(&mut c).await })
            .await
            .or_else(|e| match e {
                // Redis Cluster routes ROLE to a random node; PING is enough.
                LinkError::Redis(_) => Ok(Vec::new()),
                other => Err(other),
            })?;
        let role = match (&self.target.redis, role.first()) {
            (RedisTarget::Cluster(_), _) => "cluster".to_string(),
            (_, Some(Value::BulkString(b))) => String::from_utf8_lossy(b).into_owned(),
            (_, Some(Value::SimpleString(s))) => s.clone(),
            _ => {
                let _: String = self
                    .call_anyway(
                        |mut c| async move { redis::cmd("PING").query_async(&mut c).await },
                    )
                    .await?;
                "unknown".to_string()
            }
        };
        *self.role.write().unwrap_or_else(|e| e.into_inner()) = role;
        let was_open = self.open.swap(false, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        Ok(was_open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_that_cannot_serve_are_named() {
        let dir = std::env::temp_dir().join(format!("backstop-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let garbage = dir.join("ca.pem");
        std::fs::write(&garbage, "not a pem\n").expect("write");
        let endpoint = |ca: std::path::PathBuf| Endpoint {
            redis: RedisTarget::Url("rediss://cache:6380/0".into()),
            tls: RedisTls {
                ca: Some(ca),
                ..RedisTls::default()
            },
        };
        let err = |e: Result<Option<redis::TlsCertificates>, LinkError>| match e {
            Err(LinkError::Redis(m)) => m,
            other => panic!("{other:?}"),
        };
        let m = err(endpoint(garbage.clone()).certificates());
        assert!(
            m.contains("holds no PEM certificate") && m.contains("ca.pem"),
            "{m}"
        );
        let m = err(endpoint(dir.join("missing.pem")).certificates());
        assert!(
            m.contains("cannot read [cluster] redis_ca") && m.contains("missing.pem"),
            "{m}"
        );
        std::fs::write(
            &garbage,
            format!("{CERT_PEM}\nAAAA\n-----END CERTIFICATE-----\n"),
        )
        .expect("write");
        assert!(matches!(endpoint(garbage).certificates(), Ok(Some(_))));
        // A plain address uses no certificates at all.
        let plain = Endpoint {
            redis: RedisTarget::Url("redis://cache:6379/0".into()),
            tls: RedisTls::default(),
        };
        assert!(matches!(plain.certificates(), Ok(None)));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
