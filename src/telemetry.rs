//! Logs and traces: `tracing` everywhere, exported over OTLP when asked.
//!
//! Logs go to stderr (pretty or JSON, filtered by `RUST_LOG`). Traces are
//! exported only when an endpoint is configured (`[telemetry] otlp_endpoint`
//! or the standard `OTEL_EXPORTER_OTLP_ENDPOINT`), so the default costs
//! nothing. Incoming W3C `traceparent` metadata is honoured: Backstop's span
//! for a CanProceed joins the calling agent's trace.

use crate::config::TelemetryConfig;
use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Per-RPC spans are INFO when traces are exported (they are what gets
/// exported), DEBUG otherwise: measured with backstop-bench, creating a span
/// per RPC under the default `info` filter tripled CanProceed's p99 for no
/// benefit when nothing consumes the spans. `RUST_LOG=debug` still shows them.
static RPC_SPANS_AT_INFO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether per-RPC spans are created at INFO (see [`RPC_SPANS_AT_INFO`]).
pub fn rpc_spans_at_info() -> bool {
    RPC_SPANS_AT_INFO.load(std::sync::atomic::Ordering::Relaxed)
}

/// A span for one RPC: INFO when traces are exported, DEBUG otherwise.
#[macro_export]
macro_rules! rpc_span {
    ($name:literal, $($fields:tt)*) => {
        if $crate::telemetry::rpc_spans_at_info() {
            tracing::info_span!($name, $($fields)*)
        } else {
            tracing::debug_span!($name, $($fields)*)
        }
    };
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Keeps the trace exporter alive; flushes it on drop.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("backstop: flushing traces failed: {e}");
        }
    }
}

/// Installs the global subscriber. Must run inside the Tokio runtime (the
/// OTLP exporter's gRPC channel needs it).
pub fn init(format: LogFormat, cfg: &TelemetryConfig) -> Result<Telemetry, String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let endpoint = cfg.otlp_endpoint.clone().or_else(|| {
        std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .filter(|e| !e.is_empty())
    });
    let provider = match endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| format!("cannot build the OTLP exporter for {endpoint}: {e}"))?;
            let service = std::env::var("OTEL_SERVICE_NAME")
                .ok()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| cfg.service_name.clone());
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    RPC_SPANS_AT_INFO.store(provider.is_some(), std::sync::atomic::Ordering::Relaxed);
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("backstop")));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = match format {
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(colour_logs())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    result.map_err(|e| format!("cannot install the log subscriber: {e}"))?;
    Ok(Telemetry { provider })
}

/// Colour only for a person at a terminal: logs piped to a file, a collector
/// or CI stay plain text, and `NO_COLOR` (any value, https://no-color.org)
/// turns colour off everywhere.
fn colour_logs() -> bool {
    use std::io::IsTerminal as _;
    std::env::var_os("NO_COLOR").is_none() && std::io::stderr().is_terminal()
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// An extractor over one `traceparent` value carried in a message rather
/// than in metadata (a Decide stream item).
struct TraceparentExtractor<'a>(&'a str);

impl Extractor for TraceparentExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

/// Makes `span` a child of the span `traceparent` names (a W3C
/// `traceparent` value); a no-op when it is empty. Used per item of a
/// Decide stream, where each decision may belong to a different trace.
pub fn join_traceparent(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&TraceparentExtractor(traceparent))
    });
    let _ = span.set_parent(cx);
}

/// Makes `span` a child of the caller's trace when the request carries a
/// W3C `traceparent` (a no-op otherwise).
pub fn join_caller_trace(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    if metadata.get("traceparent").is_none() {
        return;
    }
    let cx =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    let _ = span.set_parent(cx);
}
