//! The bench's figures: one `Report`, printed as a table, written as JSON, charted.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::stats::{DeliveryCheck, LatencySummary, SecondPoint};
use super::svg;

#[derive(Debug, Clone, Serialize)]
pub struct ConfigEcho {
    pub targets: Vec<String>,
    pub started_node: bool,
    /// Nodes started here (0 with --target).
    #[serde(default)]
    pub nodes_started: usize,
    /// Caveats printed under the header (write quorum chosen, room home nodes).
    #[serde(default)]
    pub notes: Vec<String>,
    pub rooms: usize,
    pub senders: usize,
    pub rooms_per_sender: usize,
    pub subscribers_per_room: usize,
    pub subscribers: usize,
    pub size: usize,
    pub duration_s: Option<f64>,
    pub messages: Option<u64>,
    /// msgs/s in total; 0 = closed loop.
    pub rate: f64,
    pub inflight: usize,
    pub write_quorum: u32,
    pub drain_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcReport {
    pub label: String,
    pub pid: u32,
    /// CPU seconds (user + system) used during the load phase (first send to drain end).
    pub cpu_s: f64,
    /// `cpu_s` over the load phase's wall time.
    pub cores: f64,
    /// CPU microseconds per acked message.
    pub cpu_us_per_msg: f64,
    pub peak_rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub config: ConfigEcho,
    pub unix_time_s: u64,
    pub setup_s: f64,
    /// First send to drain end.
    pub load_wall_s: f64,
    pub acked: u64,
    /// Acked sends over load start → last ack (the NATS peer bench's definition).
    pub acked_per_s: f64,
    pub send_errors: u64,
    pub send_errors_by_code: BTreeMap<String, u64>,
    /// One message per error code, as a node gave it.
    #[serde(default)]
    pub send_error_samples: BTreeMap<String, String>,
    /// Sends due but not made because the safety bound ran out.
    pub unsent: u64,
    /// First copies received by subscribers (all messages, acked or not).
    pub deliveries: u64,
    /// Deliveries over load start → last delivery.
    pub deliveries_per_s: f64,
    pub delivery_check: DeliveryCheck,
    pub ack_latency: LatencySummary,
    pub delivery_latency: LatencySummary,
    pub subscriber_stream_errors: u64,
    pub subscriber_error_sample: Option<String>,
    pub foreign_messages: u64,
    pub nodes: Vec<ProcReport>,
    pub client: Option<ProcReport>,
    pub timeline: Vec<SecondPoint>,
}

pub(super) fn fmt_count(n: f64) -> String {
    let s = format!("{:.0}", n.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn lat_row(name: &str, l: &LatencySummary) -> String {
    format!(
        "  {name:<18} p50 {:>9.2}  p90 {:>9.2}  p99 {:>9.2}  max {:>9.2}  ms   (n={})\n",
        l.p50_ms,
        l.p90_ms,
        l.p99_ms,
        l.max_ms,
        fmt_count(l.count as f64)
    )
}

impl Report {
    /// The human summary printed at the end of a run.
    pub fn table(&self) -> String {
        let c = &self.config;
        let mut s = String::new();
        let mode = if c.rate > 0.0 {
            format!("open loop {} msgs/s", fmt_count(c.rate))
        } else {
            format!("closed loop, {} in flight per sender", c.inflight)
        };
        let bound = match (c.messages, c.duration_s) {
            (Some(m), _) => format!("{} messages", fmt_count(m as f64)),
            (None, Some(d)) => format!("{d:.0}s"),
            (None, None) => "-".into(),
        };
        let _ = writeln!(s, "parley bench  ({mode}, {bound})");
        let _ = writeln!(
            s,
            "  targets {}{}  rooms {}  senders {} (rooms each {})  subscribers {} ({}/room)  size {} B  W={}",
            c.targets.join(","),
            if c.started_node { " (started here)" } else { "" },
            c.rooms,
            c.senders,
            c.rooms_per_sender,
            c.subscribers,
            c.subscribers_per_room,
            c.size,
            if c.write_quorum == 0 { "default".to_string() } else { c.write_quorum.to_string() }
        );
        for note in &c.notes {
            let _ = writeln!(s, "  NOTE: {note}");
        }
        let _ = writeln!(
            s,
            "  setup {:.1}s, load {:.1}s",
            self.setup_s, self.load_wall_s
        );
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "  acked sends        {:>12}   {:>10} /s",
            fmt_count(self.acked as f64),
            fmt_count(self.acked_per_s)
        );
        let _ = writeln!(
            s,
            "  deliveries         {:>12}   {:>10} /s",
            fmt_count(self.deliveries as f64),
            fmt_count(self.deliveries_per_s)
        );
        let dc = &self.delivery_check;
        let _ = writeln!(
            s,
            "  delivered / expected {}/{}   lost {}   duplicates {}   unacked-but-delivered {}",
            dc.delivered, dc.expected, dc.lost, dc.duplicates, dc.unacked_delivered
        );
        let codes: Vec<String> = self
            .send_errors_by_code
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let _ = writeln!(
            s,
            "  send errors        {:>12}   {}",
            self.send_errors,
            if codes.is_empty() {
                String::new()
            } else {
                codes.join(" ")
            }
        );
        for (code, message) in &self.send_error_samples {
            let _ = writeln!(s, "    e.g. {code}: {message}");
        }
        if self.unsent > 0 {
            let _ = writeln!(s, "  unsent (bound hit) {:>12}", self.unsent);
        }
        if self.subscriber_stream_errors > 0 {
            let _ = writeln!(
                s,
                "  subscriber streams lost {}  (e.g. {})",
                self.subscriber_stream_errors,
                self.subscriber_error_sample.as_deref().unwrap_or("?")
            );
        }
        if self.foreign_messages > 0 {
            let _ = writeln!(s, "  foreign messages   {:>12}", self.foreign_messages);
        }
        let _ = writeln!(s);
        s.push_str(&lat_row("ack (send→ack)", &self.ack_latency));
        s.push_str(&lat_row("delivery (send→sub)", &self.delivery_latency));
        if !self.nodes.is_empty() || self.client.is_some() {
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "  {:<18} {:>8} {:>9} {:>7} {:>11} {:>10}",
                "process", "pid", "cpu s", "cores", "cpu µs/msg", "peak MiB"
            );
            for p in self.nodes.iter().chain(self.client.iter()) {
                let _ = writeln!(
                    s,
                    "  {:<18} {:>8} {:>9.2} {:>7.2} {:>11.1} {:>10.1}",
                    p.label, p.pid, p.cpu_s, p.cores, p.cpu_us_per_msg, p.peak_rss_mib
                );
            }
        }
        let _ = writeln!(
            s,
            "RESULT acked_per_s={:.0} deliveries_per_s={:.0} e2e_p50_ms={:.3} e2e_p99_ms={:.3} e2e_max_ms={:.3} ack_p50_ms={:.3} ack_p99_ms={:.3} delivered={} expected={} lost={} duplicates={} errors={}",
            self.acked_per_s,
            self.deliveries_per_s,
            self.delivery_latency.p50_ms,
            self.delivery_latency.p99_ms,
            self.delivery_latency.max_ms,
            self.ack_latency.p50_ms,
            self.ack_latency.p99_ms,
            dc.delivered,
            dc.expected,
            dc.lost,
            dc.duplicates,
            self.send_errors
        );
        s
    }

    /// p50 and p99 delivery latency per second of the run.
    pub fn plot(&self) -> String {
        let series = |name, color, f: fn(&SecondPoint) -> f64| svg::Series {
            name,
            color,
            points: self
                .timeline
                .iter()
                .filter(|p| p.latency_samples > 0)
                .map(|p| (p.t_s as f64, f(p)))
                .collect(),
        };
        let title = format!(
            "parley bench: delivery latency ({} acked/s, {} subscribers)",
            fmt_count(self.acked_per_s),
            self.config.subscribers
        );
        svg::line_chart(
            &title,
            "send time (s since load start)",
            "send → delivery latency (ms)",
            &[
                series("p50", "#1f77b4", |p| p.delivery_p50_ms),
                series("p99", "#d62728", |p| p.delivery_p99_ms),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(fmt_count(0.0), "0");
        assert_eq!(fmt_count(999.4), "999");
        assert_eq!(fmt_count(1000.0), "1,000");
        assert_eq!(fmt_count(23081.0), "23,081");
        assert_eq!(fmt_count(1_234_567.0), "1,234,567");
    }
}
