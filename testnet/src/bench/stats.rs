//! Aggregation: latency histograms, the per-second timeline, and the delivery check
//! (every acked message reached every subscriber of its room, once).
//!
//! All latencies are recorded in microseconds.

use std::collections::{BTreeMap, HashMap, HashSet};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency a histogram holds (larger values are clamped): one hour.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Seconds the timeline keeps; later seconds are not charted (totals still count them).
pub const MAX_TIMELINE_SECS: u64 = 3_600;

/// Full-precision latency histogram (3 significant digits).
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Per-second histogram: 2 significant digits keeps thousands of them small.
fn new_coarse_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 2).expect("constant histogram bounds are valid")
}

/// Records one latency, clamped into the histogram's range.
pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_LATENCY_US));
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[derive(Default)]
struct Bucket {
    acked: u64,
    errors: u64,
    deliveries: u64,
    /// Delivery latency of messages *due* in this second.
    delivery: Option<Histogram<u64>>,
}

/// Counters and delivery latency per second since the load started.
#[derive(Default)]
pub struct Timeline {
    buckets: Vec<Bucket>,
}

/// One second of the timeline, as written to JSON and charted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SecondPoint {
    /// Seconds since the load started (this second is `[t_s, t_s + 1)`).
    pub t_s: u64,
    /// Sends acked in this second.
    pub acked: u64,
    /// Sends failed in this second.
    pub errors: u64,
    /// Messages received by subscribers in this second.
    pub deliveries: u64,
    /// Deliveries of messages due in this second, and their latency.
    pub latency_samples: u64,
    pub delivery_p50_ms: f64,
    pub delivery_p99_ms: f64,
    pub delivery_max_ms: f64,
}

impl Timeline {
    fn bucket(&mut self, sec: u64) -> Option<&mut Bucket> {
        if sec >= MAX_TIMELINE_SECS {
            return None;
        }
        let i = sec as usize;
        if self.buckets.len() <= i {
            self.buckets.resize_with(i + 1, Bucket::default);
        }
        self.buckets.get_mut(i)
    }

    pub fn add_acked(&mut self, at_us: u64) {
        if let Some(b) = self.bucket(at_us / 1_000_000) {
            b.acked += 1;
        }
    }

    pub fn add_error(&mut self, at_us: u64) {
        if let Some(b) = self.bucket(at_us / 1_000_000) {
            b.errors += 1;
        }
    }

    /// A delivery of a message due at `sent_us`, received at `recv_us`.
    pub fn add_delivery(&mut self, sent_us: u64, recv_us: u64) {
        if let Some(b) = self.bucket(recv_us / 1_000_000) {
            b.deliveries += 1;
        }
        if let Some(b) = self.bucket(sent_us / 1_000_000) {
            record(
                b.delivery.get_or_insert_with(new_coarse_hist),
                recv_us.saturating_sub(sent_us),
            );
        }
    }

    pub fn merge(&mut self, other: &Timeline) {
        for (i, o) in other.buckets.iter().enumerate() {
            if let Some(b) = self.bucket(i as u64) {
                b.acked += o.acked;
                b.errors += o.errors;
                b.deliveries += o.deliveries;
                if let Some(oh) = &o.delivery {
                    let _ = b.delivery.get_or_insert_with(new_coarse_hist).add(oh);
                }
            }
        }
    }

    pub fn points(&self) -> Vec<SecondPoint> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let lat = b
                    .delivery
                    .as_ref()
                    .map(LatencySummary::of)
                    .unwrap_or_default();
                SecondPoint {
                    t_s: i as u64,
                    acked: b.acked,
                    errors: b.errors,
                    deliveries: b.deliveries,
                    latency_samples: lat.count,
                    delivery_p50_ms: lat.p50_ms,
                    delivery_p99_ms: lat.p99_ms,
                    delivery_max_ms: lat.max_ms,
                }
            })
            .collect()
    }
}

/// What subscribers report, shared behind one mutex and fed in batches.
pub struct Collector {
    pub delivery: Histogram<u64>,
    pub timeline: Timeline,
}

impl Default for Collector {
    fn default() -> Self {
        Self {
            delivery: new_hist(),
            timeline: Timeline::default(),
        }
    }
}

impl Collector {
    /// `(due µs, received µs)` pairs.
    pub fn record_deliveries(&mut self, batch: &[(u64, u64)]) {
        for &(sent, recv) in batch {
            record(&mut self.delivery, recv.saturating_sub(sent));
            self.timeline.add_delivery(sent, recv);
        }
    }
}

/// Sends failed, by gRPC code name.
pub fn merge_codes(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// What one subscriber stream saw.
#[derive(Debug, Default)]
pub struct SubscriberLog {
    pub room: usize,
    pub seen: HashSet<u64>,
    pub duplicates: u64,
    /// Messages whose text is not a bench stamp (someone else's traffic).
    pub foreign: u64,
    /// The stream ended with this error before the bench stopped it.
    pub error: Option<String>,
}

impl SubscriberLog {
    pub fn new(room: usize) -> Self {
        Self {
            room,
            ..Self::default()
        }
    }

    /// Notes a delivery; `false` when this subscriber already had it.
    pub fn observe(&mut self, key: u64) -> bool {
        let first = self.seen.insert(key);
        if !first {
            self.duplicates += 1;
        }
        first
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DeliveryCheck {
    /// Acked messages × subscribers of their room.
    pub expected: u64,
    /// Of those, how many arrived.
    pub delivered: u64,
    /// Of those, how many never arrived.
    pub lost: u64,
    /// Second and later copies of a message at the same subscriber.
    pub duplicates: u64,
    /// Deliveries of messages whose send was not acked (failed or timed out sends).
    pub unacked_delivered: u64,
}

/// Checks every acked `(key, room)` against the subscribers of its room.
pub fn check_deliveries(acked: &[(u64, u32)], subs: &[SubscriberLog]) -> DeliveryCheck {
    let mut by_room: HashMap<usize, Vec<&SubscriberLog>> = HashMap::new();
    for s in subs {
        by_room.entry(s.room).or_default().push(s);
    }
    let mut c = DeliveryCheck::default();
    for &(key, room) in acked {
        for s in by_room
            .get(&(room as usize))
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            c.expected += 1;
            if s.seen.contains(&key) {
                c.delivered += 1;
            } else {
                c.lost += 1;
            }
        }
    }
    let unique_seen: u64 = subs.iter().map(|s| s.seen.len() as u64).sum();
    c.unacked_delivered = unique_seen.saturating_sub(c.delivered);
    c.duplicates = subs.iter().map(|s| s.duplicates).sum();
    c
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn summary_of_known_values() {
        let mut h = new_hist();
        for us in 1..=1000u64 {
            record(&mut h, us * 1000); // 1 ms .. 1000 ms
        }
        let s = LatencySummary::of(&h);
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 500.0).abs() < 1.0, "{s:?}");
        assert!((s.p90_ms - 900.0).abs() < 1.0, "{s:?}");
        assert!((s.p99_ms - 990.0).abs() < 1.0, "{s:?}");
        assert!((s.max_ms - 1000.0).abs() < 1.0, "{s:?}");
        assert_eq!(LatencySummary::of(&new_hist()), LatencySummary::default());
    }

    #[test]
    fn out_of_range_latencies_are_clamped() {
        let mut h = new_hist();
        record(&mut h, 0);
        record(&mut h, u64::MAX);
        assert_eq!(h.len(), 2);
        assert!(h.max() >= MAX_LATENCY_US);
    }

    #[test]
    fn timeline_buckets_by_second() {
        let mut c = Collector::default();
        // due in second 0, received in second 1 (latency 600 ms) and 0 (10 ms)
        c.record_deliveries(&[(500_000, 1_100_000), (900_000, 910_000)]);
        c.timeline.add_acked(1_500_000);
        c.timeline.add_error(2_000_001);
        let p = c.timeline.points();
        assert_eq!(p.len(), 3);
        assert_eq!(
            (p[0].deliveries, p[1].deliveries, p[2].deliveries),
            (1, 1, 0)
        );
        assert_eq!(p[0].latency_samples, 2);
        assert!((p[0].delivery_p99_ms - 600.0).abs() < 6.0, "{:?}", p[0]);
        assert!((p[0].delivery_p50_ms - 10.0).abs() < 0.2, "{:?}", p[0]);
        assert_eq!((p[1].acked, p[2].errors), (1, 1));
        assert_eq!(c.delivery.len(), 2);
    }

    #[test]
    fn timeline_merge_and_cap() {
        let mut a = Timeline::default();
        let mut b = Timeline::default();
        a.add_acked(0);
        b.add_acked(10);
        b.add_acked(3_000_000);
        b.add_delivery(0, 5_000);
        b.add_acked(MAX_TIMELINE_SECS * 1_000_000); // beyond the cap: dropped
        a.merge(&b);
        let p = a.points();
        assert_eq!(p.len(), 4);
        assert_eq!(p[0].acked, 2);
        assert_eq!(p[3].acked, 1);
        assert_eq!(p[0].latency_samples, 1);
    }

    #[test]
    fn codes_merge() {
        let mut a = BTreeMap::from([("Unavailable".to_string(), 2)]);
        let b = BTreeMap::from([("Unavailable".to_string(), 3), ("Internal".to_string(), 1)]);
        merge_codes(&mut a, &b);
        assert_eq!(a["Unavailable"], 5);
        assert_eq!(a["Internal"], 1);
    }

    #[test]
    fn delivery_check_counts_lost_duplicate_and_unacked() {
        // room 0 has two subscribers, room 1 has one.
        let mut s0 = SubscriberLog::new(0);
        let mut s1 = SubscriberLog::new(0);
        let mut s2 = SubscriberLog::new(1);
        assert!(s0.observe(1));
        assert!(!s0.observe(1)); // duplicate
        assert!(s0.observe(2));
        assert!(s1.observe(1)); // s1 misses 2
        assert!(s2.observe(3));
        assert!(s2.observe(99)); // never acked
        let acked = [(1, 0), (2, 0), (3, 1)];
        let c = check_deliveries(&acked, &[s0, s1, s2]);
        assert_eq!(
            c,
            DeliveryCheck {
                expected: 5,
                delivered: 4,
                lost: 1,
                duplicates: 1,
                unacked_delivered: 1,
            }
        );
    }
}
