//! `[events]`, `[telemetry]` and `[queue]`.

use super::Cx;
use crate::config::raw::*;
use crate::config::{
    DEFAULT_LATENCY_BUCKETS, EventsConfig, MAX_LATENCY_BUCKETS, QueueConfig, TelemetryConfig,
};
use std::ops::Range;
use std::sync::Arc;

impl Cx {
    /// `[events]`.
    pub(super) fn events(&mut self, e: EventsToml) -> EventsConfig {
        let d = EventsConfig::default();
        let n = |p: Option<Positive>, d: usize| p.map_or(d, |Positive(n)| n as usize);
        EventsConfig {
            ring_size: n(e.ring_size, d.ring_size),
            subscriber_buffer: n(e.subscriber_buffer, d.subscriber_buffer),
            max_subscribers: n(e.max_subscribers, d.max_subscribers),
            max_snapshot_targets: n(e.max_snapshot_targets, d.max_snapshot_targets),
            history_targets: n(e.history_targets, d.history_targets),
        }
    }

    /// `[telemetry]`.
    pub(super) fn telemetry(&mut self, t: TelemetryToml, span: Range<usize>) -> TelemetryConfig {
        let d = TelemetryConfig::default();
        TelemetryConfig {
            max_target_labels: t
                .max_target_labels
                .map_or(d.max_target_labels, |Positive(n)| n as usize),
            otlp_endpoint: t
                .otlp_endpoint
                .filter(|e| !e.is_empty())
                .filter(|e| self.otlp_endpoint(e, span.clone())),
            service_name: t.service_name.unwrap_or(d.service_name),
            latency_buckets: match t.latency_buckets {
                Some(b) => self.buckets(b, span),
                None => d.latency_buckets,
            },
        }
    }

    pub(super) fn queue(&mut self, q: QueueToml, span: Range<usize>) -> QueueConfig {
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
}
