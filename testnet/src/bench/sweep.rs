//! `bench --sweep-senders` / `--sweep-write-quorum`: the same bench once per value,
//! against one cluster, summarised as a markdown table and one JSON document.
//!
//! Every point creates its own users and rooms (a fresh run id), so points do not share
//! state except what the nodes carry over from earlier points (history on disk, caches).

use std::fmt::Write as _;

use serde::Serialize;

use super::report::Report;

/// One run of a sweep: its parameters, and its report or why it failed.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub senders: usize,
    /// 0 = the cluster's default.
    pub write_quorum: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepReport {
    pub points: Vec<SweepPoint>,
}

/// The `(write quorum, senders)` pairs to run, write quorum outermost, in the order
/// given. An empty sweep list stands for the single value of the plain flag.
pub fn plan(
    sweep_senders: &[usize],
    senders: usize,
    sweep_w: &[u32],
    w: Option<u32>,
) -> Vec<(u32, usize)> {
    let ws: Vec<u32> = if sweep_w.is_empty() {
        vec![w.unwrap_or(0)]
    } else {
        sweep_w.to_vec()
    };
    let ss: Vec<usize> = if sweep_senders.is_empty() {
        vec![senders]
    } else {
        sweep_senders.to_vec()
    };
    ws.iter()
        .flat_map(|w| ss.iter().map(move |s| (*w, *s)))
        .collect()
}

/// The figures of one table row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    pub write_quorum: u32,
    pub senders: usize,
    pub acked_per_s: f64,
    pub deliveries_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub errors: u64,
    pub lost: u64,
}

impl Row {
    fn of(p: &SweepPoint) -> Option<Row> {
        let r = p.report.as_ref()?;
        Some(Row {
            write_quorum: p.write_quorum,
            senders: p.senders,
            acked_per_s: r.acked_per_s,
            deliveries_per_s: r.deliveries_per_s,
            p50_ms: r.delivery_latency.p50_ms,
            p99_ms: r.delivery_latency.p99_ms,
            max_ms: r.delivery_latency.max_ms,
            errors: r.send_errors,
            lost: r.delivery_check.lost,
        })
    }
}

fn w_label(w: u32) -> String {
    if w == 0 {
        "default".into()
    } else {
        w.to_string()
    }
}

/// One table line of a finished point.
fn row_line(r: &Row) -> String {
    format!(
        "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
        w_label(r.write_quorum),
        r.senders,
        r.acked_per_s,
        r.deliveries_per_s,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.errors,
        r.lost
    )
}

/// The markdown table: one line per point; a failed point says why in place of figures.
/// Latencies are send → delivery.
pub fn table(points: &[SweepPoint]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| W | senders | acked/s | deliveries/s | p50 ms | p99 ms | max ms | errors | lost |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in points {
        match (Row::of(p), &p.error) {
            (Some(r), _) => s.push_str(&row_line(&r)),
            (None, err) => {
                let why = err.as_deref().unwrap_or("no report").replace('|', "/");
                let _ = writeln!(
                    s,
                    "| {} | {} | failed: {why} | | | | | | |",
                    w_label(p.write_quorum),
                    p.senders
                );
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_the_product_write_quorum_outermost() {
        assert_eq!(
            plan(&[1, 16], 64, &[1, 2], None),
            vec![(1, 1), (1, 16), (2, 1), (2, 16)]
        );
        assert_eq!(plan(&[], 64, &[1, 2], Some(3)), vec![(1, 64), (2, 64)]);
        assert_eq!(plan(&[1, 16], 64, &[], Some(2)), vec![(2, 1), (2, 16)]);
        assert_eq!(plan(&[], 8, &[], None), vec![(0, 8)]);
    }

    #[test]
    fn finished_point_row() {
        let r = Row {
            write_quorum: 0,
            senders: 64,
            acked_per_s: 12345.6,
            deliveries_per_s: 37036.9,
            p50_ms: 1.234,
            p99_ms: 20.0,
            max_ms: 101.5,
            errors: 3,
            lost: 0,
        };
        assert_eq!(
            row_line(&r),
            "| default | 64 | 12346 | 37037 | 1.23 | 20.00 | 101.50 | 3 | 0 |\n"
        );
    }

    #[test]
    fn failed_points_keep_their_row() {
        let points = vec![SweepPoint {
            senders: 16,
            write_quorum: 2,
            report: None,
            error: Some("setup: a|b".into()),
        }];
        let t = table(&points);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("| W | senders | acked/s"));
        assert_eq!(lines[2], "| 2 | 16 | failed: setup: a/b | | | | | | |");
        // Every line has the same number of columns.
        let cols = |l: &str| l.matches('|').count();
        assert!(lines.iter().all(|l| cols(l) == cols(lines[0])), "{t}");
    }
}
