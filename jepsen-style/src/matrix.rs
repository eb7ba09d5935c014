//! The fault matrix of a run: for each fault (and for the time without one), how the
//! operations of each workload that completed inside its windows turned out, and which
//! checkers found anomalies there.
//!
//! An operation counts for a fault when it completed inside one of that fault's
//! windows (from the nemesis starting it to the nemesis confirming its end). Windows of
//! different faults may overlap; an operation then counts for each. An anomaly counts
//! for a fault when one of the events it names lies inside a window of that fault, and
//! for "no fault" when none does.
//!
//! The first [`RECOVERY_SECS`] after a window closes belong to neither: the cluster is
//! healing then (a restarted node replaying its log, a new leader taking over, clients
//! reconnecting), and refusals there say how fast it heals, not how it behaves at rest.
//! They get a row of their own, [`RECOVERY`], so that "no fault" is the steady state.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::checker::Verdict;
use crate::history::{Event, Op, Type, NEMESIS};
use crate::report::fault_windows;

/// The workloads, in column order.
pub const WORKLOADS: [&str; 6] = [
    "chat-set",
    "delivery",
    "membership",
    "ban fence",
    "markers",
    "presence",
];

/// The row of operations completed outside every fault window and every recovery
/// period (and before the final heal).
pub const NO_FAULT: &str = "no fault";

/// How long after a fault window closes its recovery period lasts.
pub const RECOVERY_SECS: f64 = 5.0;

/// The row of operations completed in a recovery period (outside every window).
pub const RECOVERY: &str = "recovery (5 s after a fault)";

/// The workload an operation belongs to, or `None` for the harness's own (final reads,
/// liveness, nemesis). The ban-fence workload works in rooms named `f…`.
pub fn workload_of(op: &Op) -> Option<&'static str> {
    let fence = |room: &str| room.starts_with('f');
    Some(match op {
        Op::Send { room, .. } | Op::Read { room, .. } if fence(room) => "ban fence",
        Op::Send { .. } | Op::Read { .. } => "chat-set",
        Op::Subscribe { .. } | Op::Deliver { .. } => "delivery",
        Op::Join { room, .. }
        | Op::Leave { room, .. }
        | Op::Kick { room, .. }
        | Op::Ban { room, .. }
        | Op::Unban { room, .. }
        | Op::SetRole { room, .. }
        | Op::Members { room, .. } => {
            if fence(room) {
                "ban fence"
            } else {
                "membership"
            }
        }
        Op::MarkRead { .. } => "markers",
        Op::SetPresence { .. } | Op::GetPresence { .. } => "presence",
        Op::FinalRead { .. } | Op::Nemesis { .. } | Op::Liveness { .. } => return None,
    })
}

/// Outcomes of the operations of one workload under one fault.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
}

/// One fault's row.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Row {
    /// Windows of this fault in the run.
    pub windows: usize,
    /// Seconds under this fault in all.
    pub seconds: f64,
    pub cells: BTreeMap<&'static str, Cell>,
    /// Anomalies by checker.
    pub anomalies: BTreeMap<&'static str, usize>,
}

/// The matrix: a row per fault that occurred, in name order, then [`RECOVERY`] and
/// [`NO_FAULT`].
pub fn build(events: &[Event], verdicts: &[Verdict]) -> BTreeMap<String, Row> {
    let windows = fault_windows(events);
    // Operations after the final heal (final reads, liveness) are the harness's own.
    let heal = events
        .iter()
        .find(|e| {
            e.process == NEMESIS
                && matches!(&e.op, Op::Nemesis { fault, start: true, .. } if fault == "heal")
        })
        .map_or(f64::INFINITY, |e| e.time as f64 / 1e9);
    // Where an operation completed at `t` counts: the faults whose windows hold it;
    // else recovery if a window closed less than RECOVERY_SECS before; else no fault.
    let faults_at = |t: f64| -> Vec<&str> {
        let inside: Vec<&str> = windows
            .iter()
            .filter(|(a, b, _)| *a <= t && t <= *b)
            .map(|(_, _, f)| f.as_str())
            .collect();
        if !inside.is_empty() {
            inside
        } else if windows
            .iter()
            .any(|(_, b, _)| *b < t && t <= b + RECOVERY_SECS)
        {
            vec![RECOVERY]
        } else {
            vec![NO_FAULT]
        }
    };
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for (i, (a, b, f)) in windows.iter().enumerate() {
        let r = rows.entry(f.clone()).or_default();
        r.windows += 1;
        r.seconds += b - a;
        // The recovery period, cut short where another window opens or the run heals.
        let next = windows.iter().skip(i + 1).map(|w| w.0).fold(heal, f64::min);
        let until = (b + RECOVERY_SECS).min(next);
        if until > *b {
            let r = rows.entry(RECOVERY.to_string()).or_default();
            r.windows += 1;
            r.seconds += until - b;
        }
    }
    for e in events.iter().filter(|e| e.process != NEMESIS) {
        let Some(w) = workload_of(&e.op) else {
            continue;
        };
        let t = e.time as f64 / 1e9;
        if t >= heal {
            continue;
        }
        for name in faults_at(t) {
            let c = rows
                .entry(name.to_string())
                .or_default()
                .cells
                .entry(w)
                .or_default();
            match e.kind {
                Type::Invoke => {}
                Type::Ok => c.ok += 1,
                Type::Fail => c.fail += 1,
                Type::Info => c.info += 1,
            }
        }
    }
    let time_of: BTreeMap<u64, f64> = events
        .iter()
        .map(|e| (e.index, e.time as f64 / 1e9))
        .collect();
    for v in verdicts {
        for an in &v.anomalies {
            // The faults any of its events lies under; else recovery if one lies in a
            // recovery period; else no fault.
            let mut hit: BTreeSet<&str> = BTreeSet::new();
            for t in an.events.iter().filter_map(|i| time_of.get(i)) {
                hit.extend(faults_at(*t));
            }
            let healing = hit.remove(RECOVERY);
            hit.remove(NO_FAULT);
            if hit.is_empty() {
                hit.insert(if healing { RECOVERY } else { NO_FAULT });
            }
            for name in hit {
                let row = rows.entry(name.to_string()).or_default();
                *row.anomalies.entry(v.checker).or_default() += 1;
            }
        }
    }
    rows
}

/// The matrix as a markdown table: one row per fault, one column per workload
/// (`ok / fail / info` of the operations completed under it), then the anomalies found
/// there by checker (`none` when every checker is clean there).
pub fn markdown(rows: &BTreeMap<String, Row>) -> String {
    let mut s = String::from("| fault | windows | seconds |");
    for w in WORKLOADS {
        let _ = write!(s, " {w} |");
    }
    s.push_str(" anomalies |\n|---|---:|---:|");
    for _ in WORKLOADS {
        s.push_str("---:|");
    }
    s.push_str("---|\n");
    let last = |n: &str| n == RECOVERY || n == NO_FAULT;
    let order = rows
        .iter()
        .filter(|(n, _)| !last(n))
        .chain(rows.iter().filter(|(n, _)| n.as_str() == RECOVERY))
        .chain(rows.iter().filter(|(n, _)| n.as_str() == NO_FAULT));
    for (name, r) in order {
        if name == NO_FAULT {
            let _ = write!(s, "| {name} | – | – |");
        } else {
            let _ = write!(s, "| {name} | {} | {:.0} |", r.windows, r.seconds);
        }
        for w in WORKLOADS {
            let c = r.cells.get(w).copied().unwrap_or_default();
            let _ = write!(s, " {} / {} / {} |", c.ok, c.fail, c.info);
        }
        if r.anomalies.is_empty() {
            s.push_str(" none |\n");
        } else {
            let list: Vec<String> = r
                .anomalies
                .iter()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            let _ = writeln!(s, " {} |", list.join(", "));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testkit::H;
    use crate::checker::Anomaly;

    #[test]
    fn operations_and_anomalies_land_in_the_windows_they_completed_in() {
        let mut h = H::new();
        h.advance_ms(1000);
        h.sent(1, "n1", "c0", "u1", "a", "01");
        h.nemesis("kill-one", true, &["n2"]);
        h.advance_ms(1000);
        let inside = h.invoke(2, "n1", H::join("m0", "u2"));
        h.fail(2, "n1", H::join("m0", "u2"), "UNAVAILABLE");
        h.sent(3, "n1", "f0", "u3", "b", "02");
        h.advance_ms(1000);
        h.nemesis("kill-one", false, &["n2"]);
        h.advance_ms(1000);
        let healing = h.invoke(4, "n1", H::join("m0", "u4"));
        h.fail(4, "n1", H::join("m0", "u4"), "UNAVAILABLE");
        h.sent(1, "n1", "c0", "u1", "c", "03");
        h.advance_ms(5000);
        let calm_event = h.sent(1, "n1", "c0", "u1", "d", "04");
        let events = h.events;
        let verdict = Verdict {
            checker: "membership",
            valid: false,
            summary: String::new(),
            anomalies: vec![
                Anomaly::new("planted", String::new(), vec![inside]),
                // One event while healing, one at rest: counted for recovery only.
                Anomaly::new("planted", String::new(), vec![healing, calm_event]),
            ],
            stats: serde_json::Value::Null,
        };
        let rows = build(&events, &[verdict]);

        let kill = &rows["kill-one"];
        assert_eq!(kill.windows, 1);
        assert!(
            kill.seconds >= 2.0 && kill.seconds < 3.0,
            "{}",
            kill.seconds
        );
        assert_eq!(
            kill.cells["membership"],
            Cell {
                ok: 0,
                fail: 1,
                info: 0
            }
        );
        assert_eq!(
            kill.cells["ban fence"],
            Cell {
                ok: 1,
                fail: 0,
                info: 0
            }
        );
        assert!(!kill.cells.contains_key("chat-set"));
        assert_eq!(kill.anomalies["membership"], 1);

        let healing = &rows[RECOVERY];
        assert_eq!(healing.windows, 1);
        assert!(
            (healing.seconds - RECOVERY_SECS).abs() < 1e-9,
            "{}",
            healing.seconds
        );
        assert_eq!(
            healing.cells["membership"],
            Cell {
                ok: 0,
                fail: 1,
                info: 0
            }
        );
        assert_eq!(healing.cells["chat-set"].ok, 1);
        assert_eq!(healing.anomalies["membership"], 1);

        let calm = &rows[NO_FAULT];
        assert_eq!(
            calm.cells["chat-set"],
            Cell {
                ok: 2,
                fail: 0,
                info: 0
            }
        );
        assert!(!calm.cells.contains_key("membership"));
        assert!(calm.anomalies.is_empty());

        let md = markdown(&rows);
        assert!(md.contains("| kill-one | 1 |"), "{md}");
        assert!(md.contains("membership 1"), "{md}");
        assert!(
            RECOVERY.contains(&format!("({RECOVERY_SECS} s ")),
            "{RECOVERY}"
        );
        let recovery = md.find("| recovery (5 s after a fault) | 1 | 5 |");
        let calm = md.find("| no fault |");
        assert!(
            matches!((recovery, calm), (Some(r), Some(c)) if r < c),
            "the recovery row comes before the no-fault row: {md}"
        );
        assert!(
            md.trim_end().ends_with("none |"),
            "the no-fault row comes last: {md}"
        );
    }
}
