//! Runs the service: binds listeners, serves gRPC, drains on SIGTERM.

pub mod conn;
pub mod status_map;
pub mod tls;

use crate::config::Config;
use crate::engine::Engine;
use crate::engine::clock::SystemClock;
use crate::engine::store::{MemoryStore, RedbStore, Store};
use crate::grpc::admin::AdminService;
use crate::grpc::deferred::DeferredService;
use crate::grpc::events::EventsService;
use crate::grpc::resilience::ResilienceService;
use crate::proto::admin_server::AdminServer;
use crate::proto::deferred_server::DeferredServer;
use crate::proto::events_server::EventsServer;
use crate::proto::resilience_server::ResilienceServer;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::transport::Server;

/// A startup failure, with a message an operator can act on.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|e| {
        StartError(format!(
            "cannot listen for {what} on {addr}: {e} (is another backstop running? pick another address with --listen / --http)"
        ))
    })
}

/// Resolves when the process is asked to stop (SIGTERM or Ctrl-C).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How to treat the state store at startup.
#[derive(Clone, Copy, Debug, Default)]
pub struct StateOptions {
    /// Discard the saved state before starting.
    pub reset: bool,
}

/// This host's name, for the default replica id.
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "backstop".into())
}

/// Opens the store the config asks for and restores the engine from it; in
/// cluster mode, an engine over Redis (which does not wait for Redis).
fn open_engine(
    config: Arc<Config>,
    opts: StateOptions,
    grpc_addr: std::net::SocketAddr,
) -> Result<Engine, StartError> {
    if let Some(cluster) = &config.cluster {
        let replica = cluster
            .replica_id
            .clone()
            .unwrap_or_else(|| format!("{}:{}", hostname(), grpc_addr.port()));
        let clock = Arc::new(crate::engine::clock::OffsetClock::new());
        let mut engine =
            Engine::cluster(config.clone(), clock.clone(), Some(clock), replica.clone());
        // The replica's own store holds only its spool: Defers accepted
        // while Redis is unreachable, until they are replayed into Redis.
        if !config.server.ephemeral {
            let store = RedbStore::open(&config.server.data_dir, opts.reset)
                .map_err(|e| StartError(e.0))?;
            engine = engine
                .with_spool(Box::new(store))
                .map_err(|e| StartError(e.0))?;
        }
        tracing::info!(replica = %replica, store = engine.store_description(), "cluster mode");
        return Ok(engine);
    }
    let store: Box<dyn Store> = if config.server.ephemeral {
        Box::new(MemoryStore)
    } else {
        Box::new(RedbStore::open(&config.server.data_dir, opts.reset).map_err(|e| StartError(e.0))?)
    };
    let (engine, report) =
        Engine::open(config, Arc::new(SystemClock::new()), store).map_err(|e| StartError(e.0))?;
    tracing::info!(
        store = engine.store_description(),
        targets = report.targets,
        not_closed = report.not_closed,
        dropped = report.dropped,
        queued = report.items,
        dead_letters = report.dead,
        after_crash = report.unclean,
        load_ms = report.elapsed.as_secs_f64() * 1000.0,
        "state loaded"
    );
    Ok(engine)
}

/// Serves the HTTP side on `listener` (plain or TLS) until `stop`.
async fn serve_http<L>(
    listener: L,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

/// Starts listening for SIGHUP (replacing its default action, which would
/// end the process).
fn sighup() -> Hangup {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP: reload with Admin/ReloadConfig instead");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Re-reads the config on every SIGHUP (the usual signal for it). An
/// invalid file is logged with every error, located, and changes nothing.
fn spawn_reload_on_sighup(engine: Arc<Engine>, hup: Hangup) -> Option<tokio::task::JoinHandle<()>> {
    #[cfg(unix)]
    {
        let mut hup = hup?;
        Some(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if let Err(e) = engine.reload_from_source("sighup").await {
                    tracing::error!("config reload on SIGHUP failed: {e}");
                }
            }
        }))
    }
    #[cfg(not(unix))]
    {
        let _ = (engine, hup);
        None
    }
}

/// How long a state-store commit may run before health calls the store
/// failing: fsync on a healthy disk takes milliseconds; this is a disk that
/// hangs.
const STORE_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// Cluster mode: how long a starting replica waits for Redis before it
/// serves anyway (degraded). Long enough for a connection to a healthy
/// Redis, short enough that an outage does not keep the fleet's fallback
/// control plane from starting.
const REDIS_AT_START: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves until SIGTERM / Ctrl-C, then drains in-flight calls (up to
/// `shutdown_grace`) and returns.
///
/// `source` is where the config came from: SIGHUP and Admin/ReloadConfig
/// re-read it (see `engine/reload.rs`).
pub async fn run(
    config: Config,
    source: crate::config::reload::Source,
    opts: StateOptions,
) -> Result<(), StartError> {
    let config = Arc::new(config);
    let max_msg = config.server.max_message_bytes;

    let grpc_listener = bind(config.server.listen, "gRPC").await?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|e| StartError(format!("cannot read the bound gRPC address: {e}")))?;
    if config.auth.is_none() && !config.server.listen.ip().is_loopback() {
        tracing::warn!(listen = %config.server.listen,
            "listening beyond loopback without [auth]: any host that reaches this port can decide for the fleet; declare [[auth.principals]]");
    }
    // Installed before the (possibly long) load: a SIGHUP during startup
    // must not terminate the server (the default action), it waits.
    let hup = sighup();
    let engine = Arc::new(open_engine(config.clone(), opts, grpc_addr)?.with_source(source));
    engine.start_cluster(grpc_addr.to_string());
    if config.cluster.is_some() && !engine.wait_for_redis(REDIS_AT_START).await {
        tracing::warn!(
            "Redis did not answer within {REDIS_AT_START:?} of starting: serving degraded (deciding locally) until it does"
        );
    }
    let reloader = spawn_reload_on_sighup(engine.clone(), hup);
    if config.cluster.is_some() {
        let e = engine.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                e.replay_spool().await;
            }
        });
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ResilienceServer<ResilienceService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    health_reporter
        .set_serving::<DeferredServer<DeferredService>>()
        .await;
    health_reporter
        .set_serving::<EventsServer<EventsService>>()
        .await;
    // A failing state store (disk full, I/O error) turns the services whose
    // answers need durability (Deferred: Defer; Admin: force, reset) to
    // NOT_SERVING until a commit succeeds again; Resilience stays SERVING,
    // since decisions that change nothing durable keep flowing.
    let store_watch = engine.store_health().map(|mut health| {
        let reporter = health_reporter.clone();
        let engine = engine.clone();
        let store = config.server.data_dir.display().to_string();
        tokio::spawn(async move {
            let mut failing = false;
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                // A commit that failed, or one that has not returned for
                // STORE_STALL (a disk that hangs instead of failing).
                let problem = match health.borrow_and_update().failing() {
                    Some(e) => Some(e.to_string()),
                    None => engine
                        .store_stalled_for()
                        .filter(|d| *d >= STORE_STALL)
                        .map(|d| format!("a commit has not returned for {} s", d.as_secs())),
                };
                if let Some(why) = &problem
                    && !failing
                {
                    tracing::error!(store = %store, error = %why,
                        "state store failing: Defer and operator changes answer UNAVAILABLE (or wait) until it recovers");
                }
                let now_failing = problem.is_some();
                if now_failing != failing {
                    failing = now_failing;
                    engine.metrics().set_store_failing(failing);
                    if failing {
                        reporter.set_not_serving::<DeferredServer<DeferredService>>().await;
                        reporter.set_not_serving::<AdminServer<AdminService>>().await;
                    } else {
                        tracing::info!(store = %store, "state store recovered");
                        reporter.set_serving::<DeferredServer<DeferredService>>().await;
                        reporter.set_serving::<AdminServer<AdminService>>().await;
                    }
                }
                tokio::select! {
                    changed = health.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    _ = tick.tick() => {}
                }
            }
        })
    });
    // Reflection in both versions: grpcurl and current tools speak v1, while
    // older grpcurl, grpcui, Postman and Evans speak only v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_err = |e| StartError(format!("cannot build the reflection service: {e}"));
    let reflection = reflection_builder().build_v1().map_err(reflection_err)?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .map_err(reflection_err)?;

    let resilience = ResilienceServer::new(ResilienceService::new(engine.clone()))
        .max_decoding_message_size(max_msg);
    let events = EventsServer::new(EventsService::new(engine.clone()));
    let deferred = DeferredServer::new(DeferredService::new(engine.clone()))
        .max_decoding_message_size(max_msg);
    let admin =
        AdminServer::new(AdminService::new(engine.clone())).max_decoding_message_size(max_msg);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (accept_stop_tx, accept_stop_rx) = tokio::sync::watch::channel(false);
    let limits = conn::Limits {
        max_connections: config.server.max_connections,
        handshake_timeout: config.server.handshake_timeout,
        idle_timeout: config.server.idle_timeout,
    };
    let conn_stats = Arc::new(conn::Stats::default());
    let tls = match &config.server.tls {
        None => None,
        Some(t) => {
            let tls = tls::Tls::load(t).map_err(StartError)?;
            tls.watch(std::time::Duration::from_secs(2));
            Some(tls)
        }
    };
    let incoming = conn::incoming(
        grpc_listener,
        limits,
        conn_stats.clone(),
        accept_stop_rx,
        tls.as_ref().map(|t| t.grpc.clone()),
    );
    let server = Server::builder()
        .http2_keepalive_interval(config.server.http2_keepalive_interval)
        .http2_keepalive_timeout(Some(config.server.http2_keepalive_timeout))
        .layer(status_map::StatusMapLayer)
        // Who may call what (see grpc/auth.rs), before any service runs.
        .layer(crate::grpc::auth::AuthLayer {
            engine: engine.clone(),
        })
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(resilience)
        .add_service(deferred)
        .add_service(events)
        .add_service(admin)
        .serve_with_incoming_shutdown(
            // Bounded accept (see conn.rs); TCP_NODELAY is set there too:
            // small request/response RPCs never wait for Nagle's algorithm.
            incoming,
            async {
                let _ = stop_rx.await;
            },
        );
    let server = tokio::spawn(server);

    // Write-behind of counters and budget levels, about once a second.
    let flusher = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                engine.sweep_requests();
                if let Err(e) = engine.flush_dirty().0.wait().await {
                    tracing::error!(error = %e, "write-behind flush failed");
                }
            }
        })
    };

    // HTTP: metrics, SSE events, dashboard, probes.
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let http_addr = match config.server.http {
        Some(addr) => {
            let listener = bind(addr, "HTTP").await?;
            let bound = listener
                .local_addr()
                .map_err(|e| StartError(format!("cannot read the bound HTTP address: {e}")))?;
            let app = crate::http::router(crate::http::HttpState {
                engine: engine.clone(),
                ready: ready.clone(),
            });
            let stop = async {
                let _ = http_stop_rx.await;
            };
            match &tls {
                Some(t) => {
                    let listener = tls::HttpsListener::new(listener, t.http.clone())
                        .map_err(|e| StartError(format!("cannot serve HTTPS: {e}")))?;
                    tokio::spawn(serve_http(listener, app, stop));
                }
                None => {
                    tokio::spawn(serve_http(listener, app, stop));
                }
            }
            bound.to_string()
        }
        None => "off".to_string(),
    };

    // Tests and supervisors read this line to learn the bound ports.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "backstop listening grpc={grpc_addr} http={http_addr}");
    let _ = out.flush();
    tracing::info!(%grpc_addr, %http_addr, targets = engine.target_count(), "backstop serving");

    shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight calls");
    if let Some(w) = &store_watch {
        // Health is NOT_SERVING from here on, whatever the store does.
        w.abort();
    }
    health_reporter
        .set_not_serving::<ResilienceServer<ResilienceService>>()
        .await;
    health_reporter
        .set_not_serving::<AdminServer<AdminService>>()
        .await;
    health_reporter
        .set_not_serving::<DeferredServer<DeferredService>>()
        .await;
    health_reporter
        .set_not_serving::<EventsServer<EventsService>>()
        .await;
    health_reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    ready.store(false, std::sync::atomic::Ordering::Relaxed);
    // Live event streams end so the drain is not held up by dashboards.
    engine.begin_shutdown();
    let _ = accept_stop_tx.send(true);
    let _ = stop_tx.send(());
    let _ = http_stop_tx.send(());
    let drained = tokio::time::timeout(config.server.shutdown_grace, server).await;
    flusher.abort();
    if let Some(r) = &reloader {
        r.abort();
    }
    // Calls still running past the grace period may change state after the
    // final flush: then the store is not marked clean (the next start
    // treats budgets as after a crash).
    if let Err(e) = engine.flush_all(drained.is_ok()).await {
        tracing::error!(error = %e, "final state flush failed");
    }
    match drained {
        Ok(Ok(Ok(()))) => tracing::info!("drained; bye"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "server stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
        Err(_) => tracing::warn!(
            grace = ?config.server.shutdown_grace,
            "in-flight calls did not finish within the grace period; stopping anyway"
        ),
    }
    Ok(())
}
