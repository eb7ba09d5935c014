//! Latency histograms for the `/metrics` endpoint: fixed buckets, relaxed atomics, so
//! any layer can record into one without a lock (each value is exact on its own; a
//! scrape is not a consistent cut across them).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of [`Histogram`]'s buckets, in seconds.
pub const BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

/// A latency histogram with fixed buckets ([`BUCKETS`], then everything above).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// A histogram as Prometheus shows it: cumulative counts per upper bound (the last is
/// `+Inf`, equal to the count), and the sum of the observations in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub cumulative: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(BUCKETS.len() + 1);
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Relaxed);
            cumulative.push((BUCKETS.get(i).copied().unwrap_or(f64::INFINITY), total));
        }
        HistogramSnapshot {
            cumulative,
            sum_seconds: self.sum_micros.load(Relaxed) as f64 / 1e6,
            count: total,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::default();
        for ms in [0, 1, 3, 7, 150, 150, 9_000] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        let at = |bound: f64| {
            s.cumulative
                .iter()
                .find(|(b, _)| *b == bound)
                .map(|(_, n)| *n)
                .unwrap()
        };
        assert_eq!(at(0.0001), 1, "0 ms is at most 0.1 ms");
        assert_eq!(at(0.001), 2, "0 ms and 1 ms are at most 1 ms");
        assert_eq!(at(0.002), 2);
        assert_eq!(at(0.005), 3);
        assert_eq!(at(0.01), 4);
        assert_eq!(at(0.1), 4);
        assert_eq!(at(0.2), 6);
        assert_eq!(at(5.0), 6);
        assert_eq!(at(f64::INFINITY), 7);
        assert_eq!(s.count, 7);
        assert!((s.sum_seconds - 9.311).abs() < 1e-9, "{}", s.sum_seconds);
    }
}
