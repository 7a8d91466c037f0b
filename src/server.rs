//! Runs the service: binds listeners, serves gRPC, drains on SIGTERM.

use crate::config::Config;
use crate::engine::Engine;
use crate::engine::clock::SystemClock;
use crate::grpc::admin::{AdminService, auth_interceptor};
use crate::grpc::resilience::ResilienceService;
use crate::proto::admin_server::AdminServer;
use crate::proto::resilience_server::ResilienceServer;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
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

/// Serves until SIGTERM / Ctrl-C, then drains in-flight calls (up to
/// `shutdown_grace`) and returns.
pub async fn run(config: Config) -> Result<(), StartError> {
    let config = Arc::new(config);
    let engine = Arc::new(Engine::new(config.clone(), Arc::new(SystemClock::new())));
    let max_msg = config.server.max_message_bytes;

    let grpc_listener = bind(config.server.listen, "gRPC").await?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|e| StartError(format!("cannot read the bound gRPC address: {e}")))?;

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ResilienceServer<ResilienceService>>()
        .await;
    health_reporter
        .set_serving::<AdminServer<AdminService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| StartError(format!("cannot build the reflection service: {e}")))?;

    let resilience = ResilienceServer::new(ResilienceService::new(engine.clone()))
        .max_decoding_message_size(max_msg);
    let admin = tonic::service::interceptor::InterceptedService::new(
        AdminServer::new(AdminService::new(engine.clone())).max_decoding_message_size(max_msg),
        auth_interceptor(config.server.admin_token.clone()),
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(resilience)
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(grpc_listener), async {
            let _ = stop_rx.await;
        });
    let server = tokio::spawn(server);

    // Tests and supervisors read this line to learn the bound ports.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "backstop listening grpc={grpc_addr}");
    let _ = out.flush();
    tracing::info!(%grpc_addr, targets = engine.target_count(), "backstop serving");

    shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight calls");
    health_reporter
        .set_not_serving::<ResilienceServer<ResilienceService>>()
        .await;
    health_reporter
        .set_not_serving::<AdminServer<AdminService>>()
        .await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(config.server.shutdown_grace, server).await {
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
