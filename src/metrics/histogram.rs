//! A fixed-bucket histogram updated with atomics only.
//!
//! prometheus-client's own histogram takes a mutex per observation, which on
//! the RPC timer would be a global lock on the hot path. This one is a row of
//! atomic counters: an observation is a binary search over the bounds and
//! three relaxed increments.

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Buckets of Backstop's own RPC durations, in seconds: 100 µs to 10 s
/// (Backstop answers in microseconds; provider calls use configured buckets).
const RPC_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A fixed-bucket histogram updated with atomics only.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<HistInner>);

#[derive(Debug)]
struct HistInner {
    bounds: Arc<[f64]>,
    /// One per bound, plus +Inf.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// Sum in nanoseconds.
    sum_nanos: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram::with_bounds(RPC_BUCKETS.into())
    }
}

/// Builds histograms with given bounds, for a `Family` (one per label set).
#[derive(Clone, Debug)]
pub struct Buckets(pub Arc<[f64]>);

impl prometheus_client::metrics::family::MetricConstructor<AtomicHistogram> for Buckets {
    fn new_metric(&self) -> AtomicHistogram {
        AtomicHistogram::with_bounds(self.0.clone())
    }
}

impl AtomicHistogram {
    pub fn with_bounds(bounds: Arc<[f64]>) -> Self {
        AtomicHistogram(Arc::new(HistInner {
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            bounds,
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let bounds = &self.0.bounds;
        let i = bounds.partition_point(|b| secs > *b);
        self.0.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.0.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }

    /// Sum of the observations, in seconds.
    pub fn sum_secs(&self) -> f64 {
        self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// The `q` quantile by linear interpolation inside its bucket (what
    /// Prometheus' `histogram_quantile` computes), None when empty. Past the
    /// last bound it answers the last bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let counts: Vec<u64> = self
            .0
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        for (i, c) in counts.iter().enumerate() {
            if (below + c) as f64 >= rank && *c > 0 {
                let lo = if i == 0 { 0.0 } else { self.0.bounds[i - 1] };
                let Some(&hi) = self.0.bounds.get(i) else {
                    return Some(lo);
                };
                return Some(lo + (hi - lo) * (rank - below as f64) / *c as f64);
            }
            below += c;
        }
        self.0.bounds.last().copied()
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.0.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, self.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Prometheus' `histogram_quantile`: linear interpolation inside the
    /// bucket holding the rank (what the Grafana panels compute).
    fn histogram_quantile(q: f64, bounds: &[f64], counts: &[u64]) -> f64 {
        let total: u64 = counts.iter().sum();
        let rank = q * total as f64;
        let mut cum = 0u64;
        for (i, c) in counts.iter().enumerate() {
            if (cum + c) as f64 >= rank {
                let lo = if i == 0 { 0.0 } else { bounds[i - 1] };
                let hi = bounds.get(i).copied().unwrap_or(lo);
                return lo + (hi - lo) * (rank - cum as f64) / (*c).max(1) as f64;
            }
            cum += c;
        }
        f64::NAN
    }

    #[test]
    fn quantile_interpolates_inside_the_bucket_like_prometheus() {
        let h = AtomicHistogram::with_bounds([1.0, 2.0, 4.0].into());
        assert_eq!(h.quantile(0.5), None);
        for _ in 0..10 {
            h.observe(Duration::from_millis(1500));
        }
        // All ten in (1, 2]: the median is halfway, the p99 near the top.
        assert_eq!(h.quantile(0.5), Some(1.5));
        assert!((h.quantile(0.99).unwrap_or(0.0) - 1.99).abs() < 1e-9);
        h.observe(Duration::from_secs(100));
        assert_eq!(
            h.quantile(1.0),
            Some(4.0),
            "past the last bound: the last bound"
        );
        assert!((h.sum_secs() - 115.0).abs() < 1e-9);
    }

    #[test]
    fn llm_latencies_get_an_accurate_p99_from_the_default_buckets() {
        let h = AtomicHistogram::with_bounds(crate::config::DEFAULT_LATENCY_BUCKETS.into());
        // Uniform 0.2-3 s: the true p99 is about 2.97 s.
        let n = 10_000;
        for i in 0..n {
            h.observe(Duration::from_secs_f64(0.2 + 2.8 * i as f64 / n as f64));
        }
        let counts: Vec<u64> =
            h.0.buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
        let p99 = histogram_quantile(0.99, &h.0.bounds, &counts);
        assert!((p99 - 2.972).abs() / 2.972 < 0.15, "p99 {p99}");
        // The old buckets (2.5 -> 5) gave about 4.8 s for the same load.
        let old: Arc<[f64]> = [0.5, 1.0, 2.5, 5.0, 10.0, 30.0].into();
        let h = AtomicHistogram::with_bounds(old.clone());
        for i in 0..n {
            h.observe(Duration::from_secs_f64(0.2 + 2.8 * i as f64 / n as f64));
        }
        let counts: Vec<u64> =
            h.0.buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect();
        assert!(histogram_quantile(0.99, &old, &counts) > 4.0);
    }
}
