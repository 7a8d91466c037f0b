//! End-to-end user-request metrics: the failure rate after all retries and
//! fallbacks, and latency with retries included, which per-call metrics
//! cannot show (see `engine::requests`). Labelled by route only, and the
//! route label is always a configured route's name or `direct`, so the
//! cardinality is bounded by the config, never by clients.

use super::{AtomicHistogram, Buckets, RouteLabel};
use crate::engine::requests::{Finished, RequestResult};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::Arc;
use std::time::Duration;

/// Attempts-per-request buckets: most requests take one, a storm takes many.
const ATTEMPT_BUCKETS: &[f64] = &[
    0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteResult {
    route: String,
    result: String,
}

/// The request families and counters.
#[derive(Debug)]
pub struct RequestMetrics {
    total: Family<RouteResult, Counter>,
    duration: Family<RouteLabel, AtomicHistogram, Buckets>,
    attempts: Family<RouteLabel, AtomicHistogram, Buckets>,
    untracked: Counter,
    open: Gauge,
}

impl RequestMetrics {
    /// Registers the families; `latency_buckets` are the configured
    /// provider-latency buckets (a request is one or more provider calls).
    pub fn register(registry: &mut Registry, latency_buckets: Arc<[f64]>) -> RequestMetrics {
        let m = RequestMetrics {
            total: Family::default(),
            duration: Family::new_with_constructor(Buckets(latency_buckets)),
            attempts: Family::new_with_constructor(Buckets(ATTEMPT_BUCKETS.into())),
            untracked: Counter::default(),
            open: Gauge::default(),
        };
        registry.register(
            "requests",
            "User requests finished, by route and result (completed, deferred, failed, expired): \
             the outcome after all retries and fallbacks",
            m.total.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "User request time from first admission to finish, retries and fallbacks included",
            Unit::Seconds,
            m.duration.clone(),
        );
        registry.register(
            "request_attempts",
            "Provider calls (reported outcomes) per finished user request",
            m.attempts.clone(),
        );
        registry.register(
            "requests_untracked",
            "Request ids not tracked because the open-request table was full (max_open_requests)",
            m.untracked.clone(),
        );
        registry.register(
            "requests_open",
            "Request ids held now (open, or finished within the last minute)",
            m.open.clone(),
        );
        m
    }

    /// Creates a route's series at 0 (so the first failure is an increase,
    /// and dashboards find every family before the first request).
    pub fn born(&self, route: &str) {
        let l = RouteLabel {
            route: route.into(),
        };
        let _ = self.duration.get_or_create(&l);
        let _ = self.attempts.get_or_create(&l);
        for r in [
            RequestResult::Completed,
            RequestResult::Deferred,
            RequestResult::Failed,
            RequestResult::Expired,
        ] {
            let _ = self.total.get_or_create(&RouteResult {
                route: route.into(),
                result: r.label().into(),
            });
        }
    }

    /// Counts a finished (or expired) request; a duplicate finish counts nothing.
    pub fn finished(&self, f: &Finished) {
        if f.duplicate {
            return;
        }
        self.total
            .get_or_create(&RouteResult {
                route: f.route.to_string(),
                result: f.result.label().into(),
            })
            .inc();
        if !f.measured {
            return;
        }
        let l = RouteLabel {
            route: f.route.to_string(),
        };
        if f.result != RequestResult::Expired {
            self.duration.get_or_create(&l).observe(f.duration);
        }
        // The histogram keeps its sum in nanoseconds of a Duration; one
        // "second" per attempt makes the exported sum the attempt count.
        self.attempts
            .get_or_create(&l)
            .observe(Duration::from_secs(u64::from(f.attempts)));
    }

    /// A route's requests since the server started, for the dashboard:
    /// counts by result, p50 / p99 duration and mean attempts.
    pub fn summary(&self, route: &str) -> serde_json::Value {
        let count = |result: RequestResult| {
            self.total
                .get_or_create(&RouteResult {
                    route: route.into(),
                    result: result.label().into(),
                })
                .get()
        };
        let l = RouteLabel {
            route: route.into(),
        };
        let d = self.duration.get_or_create(&l).clone();
        let a = self.attempts.get_or_create(&l).clone();
        serde_json::json!({
            "completed": count(RequestResult::Completed),
            "deferred": count(RequestResult::Deferred),
            "failed": count(RequestResult::Failed),
            "expired": count(RequestResult::Expired),
            "p50_s": d.quantile(0.5),
            "p99_s": d.quantile(0.99),
            "mean_attempts": (a.count() > 0).then(|| a.sum_secs() / a.count() as f64),
        })
    }

    pub fn untracked(&self) {
        self.untracked.inc();
    }

    pub fn set_open(&self, n: usize) {
        self.open.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}
