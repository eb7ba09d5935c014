//! The results folder: summary.txt (with the fault matrix), results.json, latency.svg,
//! outcomes.svg, next to history.jsonl and schedule.json.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use crate::checker::{self, Verdict};
use crate::history::{self, Event, Op, Type, NEMESIS};
use crate::run::{RunConfig, RunOutput};

/// Checker settings matching what the run gave the nodes.
pub fn checker_config(
    election_timeout_ms: u64,
    presence_ttl_s: u64,
    convergence_ms: u64,
) -> checker::Config {
    checker::Config {
        election_timeout_ms,
        presence_ttl_ms: presence_ttl_s * 1000,
        presence_grace_ms: 2000,
        convergence_bound_ms: convergence_ms,
        ..checker::Config::default()
    }
}

/// Checks, writes the folder, prints the summary; true when every checker is valid
/// and the harness reported no error.
pub fn finish(cfg: &RunConfig, out: &RunOutput) -> Result<bool> {
    let ccfg = checker_config(
        cfg.election_timeout_ms,
        cfg.presence_ttl_s,
        cfg.convergence_bound.as_millis() as u64,
    );
    let verdicts = checker::check_all(&out.events, &ccfg);
    let mut text = format!(
        "Parley jepsen run: seed {}, {} nodes, faults [{}], {} schedule steps, {} history events\n\n",
        cfg.seed,
        cfg.nodes,
        cfg.faults.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "),
        out.schedule.len(),
        out.events.len()
    );
    text.push_str(&body(&out.events, &verdicts));
    if !out.harness_errors.is_empty() {
        text.push_str("\nHarness errors (the run itself did not go as planned):\n");
        for e in &out.harness_errors {
            let _ = writeln!(text, "  - {e}");
        }
    }
    let valid = verdicts.iter().all(|v| v.valid) && out.harness_errors.is_empty();
    let _ = writeln!(
        text,
        "\n{}",
        if valid {
            "VALID: no anomaly found"
        } else {
            "INVALID: see above"
        }
    );
    write_folder(&cfg.out, &out.events, &verdicts, &text, &out.harness_errors)?;
    print!("{text}");
    println!("results: {}", cfg.out.display());
    Ok(valid)
}

/// What a summary says after its title: operations, the fault matrix, the verdicts.
fn body(events: &[Event], verdicts: &[Verdict]) -> String {
    let mut text = ops_table(events);
    let _ = write!(
        text,
        "\nFault matrix: operations completed under each fault, ok / fail / info per workload;\n\
         anomalies by checker where one of their events lies inside the fault's windows;\n\
         the recovery row holds the first {} s after each window closes.\n\n",
        crate::matrix::RECOVERY_SECS
    );
    text.push_str(&crate::matrix::markdown(&crate::matrix::build(
        events, verdicts,
    )));
    text.push('\n');
    text.push_str(&checker::render_text(verdicts));
    text
}

fn write_folder(
    dir: &Path,
    events: &[Event],
    verdicts: &[Verdict],
    text: &str,
    errors: &[String],
) -> Result<()> {
    std::fs::write(dir.join("summary.txt"), text).context("writing summary.txt")?;
    let json = serde_json::json!({
        "valid": verdicts.iter().all(|v| v.valid) && errors.is_empty(),
        "verdicts": verdicts,
        "harness_errors": errors,
        "operations": op_counts(events),
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )
    .context("writing results.json")?;
    std::fs::write(dir.join("latency.svg"), latency_svg(events)).context("writing latency.svg")?;
    std::fs::write(dir.join("outcomes.svg"), outcomes_svg(events))
        .context("writing outcomes.svg")?;
    Ok(())
}

/// `jepsen check DIR|FILE`: checks a recorded history again with the run's settings.
pub fn recheck(path: &Path, membership_budget: u64) -> Result<bool> {
    let file = if path.is_dir() {
        path.join("history.jsonl")
    } else {
        path.to_path_buf()
    };
    let events = history::read(&file)?;
    let cfg = checker::Config {
        membership_search_budget: membership_budget,
        ..checker_config(600, 3, 30_000)
    };
    let verdicts = checker::check_all(&events, &cfg);
    let valid = verdicts.iter().all(|v| v.valid);
    let mut text = format!(
        "Parley jepsen history {} ({} events), checked again\n\n",
        file.display(),
        events.len()
    );
    text.push_str(&body(&events, &verdicts));
    let _ = writeln!(
        text,
        "\n{}",
        if valid {
            "VALID: no anomaly found"
        } else {
            "INVALID: see above"
        }
    );
    // A results folder gets its summary, JSON and plots (re)written: this finishes a
    // run whose own check was interrupted.
    if path.is_dir() {
        write_folder(path, &events, &verdicts, &text, &[])?;
    }
    print!("{text}");
    Ok(valid)
}

fn op_counts(events: &[Event]) -> BTreeMap<String, BTreeMap<&'static str, u64>> {
    let mut m: BTreeMap<String, BTreeMap<&'static str, u64>> = BTreeMap::new();
    for e in events.iter().filter(|e| e.process != NEMESIS) {
        let k = match e.kind {
            Type::Invoke => continue,
            Type::Ok => "ok",
            Type::Fail => "fail",
            Type::Info => "info",
        };
        *m.entry(e.op.name().to_string())
            .or_default()
            .entry(k)
            .or_default() += 1;
    }
    m
}

fn ops_table(events: &[Event]) -> String {
    let mut s = String::from("operation        ok     fail   info\n");
    for (name, c) in op_counts(events) {
        let g = |k: &str| c.get(k).copied().unwrap_or(0);
        let _ = writeln!(
            s,
            "{name:<14} {:>6} {:>6} {:>6}",
            g("ok"),
            g("fail"),
            g("info")
        );
    }
    s
}

/// Fault windows (start, end, label) in seconds, from the nemesis events.
pub fn fault_windows(events: &[Event]) -> Vec<(f64, f64, String)> {
    let mut open: BTreeMap<String, f64> = BTreeMap::new();
    let mut out = Vec::new();
    let end = events.last().map(|e| e.time as f64 / 1e9).unwrap_or(0.0);
    for e in events.iter().filter(|e| e.process == NEMESIS) {
        if let Op::Nemesis { fault, start, .. } = &e.op {
            if fault == "heal" {
                continue;
            }
            let t = e.time as f64 / 1e9;
            match (start, e.kind) {
                (true, Type::Invoke) => {
                    open.insert(fault.clone(), t);
                }
                (false, Type::Ok | Type::Info) => {
                    if let Some(s) = open.remove(fault) {
                        out.push((s, t, fault.clone()));
                    }
                }
                _ => {}
            }
        }
    }
    for (f, s) in open {
        out.push((s, end, f));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

const W: f64 = 1000.0;
const H: f64 = 420.0;
const L: f64 = 60.0;
const R: f64 = 20.0;
const T: f64 = 30.0;
const B: f64 = 50.0;

fn svg_frame(title: &str, tmax: f64, windows: &[(f64, f64, String)]) -> String {
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{L}\" y=\"18\" font-size=\"14\">{title}</text>\n"
    );
    let x = |t: f64| L + (W - L - R) * t / tmax.max(1e-9);
    for (i, (a, b, label)) in windows.iter().enumerate() {
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{T}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#f5c6c6\" opacity=\"0.6\"><title>{label}</title></rect>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#a33\" font-size=\"9\">{label}</text>",
            x(*a),
            (x(*b) - x(*a)).max(1.0),
            H - T - B,
            x(*a) + 2.0,
            T + 10.0 + (i % 4) as f64 * 10.0
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        H - B,
        W - R,
        H - B
    );
    let _ = writeln!(
        s,
        "<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{}\" stroke=\"black\"/>",
        H - B
    );
    let step = nice_step(tmax / 10.0);
    let mut t = 0.0;
    let mut guard = 0;
    while t <= tmax && guard < 100 {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{t:.0}</text>",
            x(t),
            H - B + 15.0
        );
        t += step;
        guard += 1;
    }
    let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time since start (s); shaded: fault windows</text>", (L + W - R) / 2.0, H - 12.0);
    s
}

fn nice_step(raw: f64) -> f64 {
    let candidates = [1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0];
    candidates
        .iter()
        .copied()
        .find(|c| *c >= raw)
        .unwrap_or(600.0)
}

/// Send latency over time, log scale, coloured by outcome, fault windows shaded.
pub fn latency_svg(events: &[Event]) -> String {
    let mut invokes: BTreeMap<u64, u64> = BTreeMap::new();
    let mut points: Vec<(f64, f64, Type)> = Vec::new();
    for e in events {
        if !matches!(e.op, Op::Send { .. }) {
            continue;
        }
        match e.kind {
            Type::Invoke => {
                invokes.insert(e.process, e.time);
            }
            k => {
                if let Some(t0) = invokes.remove(&e.process) {
                    let ms = (e.time.saturating_sub(t0)) as f64 / 1e6;
                    points.push((t0 as f64 / 1e9, ms.max(0.1), k));
                }
            }
        }
    }
    let tmax = events.last().map(|e| e.time as f64 / 1e9).unwrap_or(1.0);
    let windows = fault_windows(events);
    let mut s = svg_frame(
        "send latency (ms, log scale): blue ok, orange info (indeterminate), red fail",
        tmax,
        &windows,
    );
    let (lo, hi) = (0.1f64.log10(), 10_000f64.log10());
    let y = |ms: f64| H - B - (H - T - B) * ((ms.log10() - lo) / (hi - lo)).clamp(0.0, 1.0);
    for v in [1.0, 10.0, 100.0, 1000.0, 10000.0] {
        let _ = writeln!(s, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{v}</text><line x1=\"{L}\" x2=\"{}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>", L - 4.0, y(v) + 4.0, W - R, y(v), y(v));
    }
    let x = |t: f64| L + (W - L - R) * t / tmax.max(1e-9);
    // At most 20,000 points: evenly thinned (every k-th) so the file stays small.
    let k = (points.len() / 20_000).max(1);
    for (i, (t, ms, kind)) in points.iter().enumerate() {
        if i % k != 0 && *kind == Type::Ok {
            continue;
        }
        let color = match kind {
            Type::Ok => "#1f77b4",
            Type::Info => "#ff7f0e",
            _ => "#d62728",
        };
        let _ = writeln!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"1.3\" fill=\"{color}\"/>",
            x(*t),
            y(*ms)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Completed client operations per second by outcome (stacked), faults shaded.
pub fn outcomes_svg(events: &[Event]) -> String {
    let tmax = events.last().map(|e| e.time as f64 / 1e9).unwrap_or(1.0);
    let secs = tmax.ceil() as usize + 1;
    let mut counts = vec![[0u32; 3]; secs];
    for e in events
        .iter()
        .filter(|e| e.process != NEMESIS && !matches!(e.op, Op::Deliver { .. }))
    {
        let i = ((e.time / 1_000_000_000) as usize).min(secs - 1);
        match e.kind {
            Type::Ok => counts[i][0] += 1,
            Type::Info => counts[i][1] += 1,
            Type::Fail => counts[i][2] += 1,
            Type::Invoke => {}
        }
    }
    let max = counts
        .iter()
        .map(|c| c.iter().sum::<u32>())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let windows = fault_windows(events);
    let mut s = svg_frame(
        "completed operations per second: blue ok, orange info, red fail",
        tmax,
        &windows,
    );
    let x = |t: f64| L + (W - L - R) * t / tmax.max(1e-9);
    let h = |c: f64| (H - T - B) * c / max;
    let bw = ((W - L - R) / secs as f64).max(1.0);
    for (i, c) in counts.iter().enumerate() {
        let mut base = H - B;
        for (j, color) in ["#1f77b4", "#ff7f0e", "#d62728"].iter().enumerate() {
            let hh = h(f64::from(c[j]));
            if hh > 0.0 {
                let _ = writeln!(s, "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>", x(i as f64), base - hh, bw, hh);
                base -= hh;
            }
        }
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max:.0}</text>",
        L - 4.0,
        T + 4.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::history::Msg;

    fn ev(time: u64, process: u64, kind: Type, op: Op) -> Event {
        Event {
            index: 0,
            time,
            process,
            node: "n1".into(),
            kind,
            op,
            error: None,
        }
    }

    #[test]
    fn windows_pair_fault_start_and_end() {
        let nem = |start| Op::Nemesis {
            fault: "kill-one".into(),
            start,
            targets: vec!["n2".into()],
            detail: None,
        };
        let h = vec![
            ev(1_000_000_000, NEMESIS, Type::Invoke, nem(true)),
            ev(1_100_000_000, NEMESIS, Type::Ok, nem(true)),
            ev(5_000_000_000, NEMESIS, Type::Invoke, nem(false)),
            ev(5_500_000_000, NEMESIS, Type::Ok, nem(false)),
        ];
        let w = fault_windows(&h);
        assert_eq!(w.len(), 1);
        assert!((w[0].0 - 1.0).abs() < 1e-9 && (w[0].1 - 5.5).abs() < 1e-9);
    }

    #[test]
    fn plots_show_points_and_windows() {
        let send = |id: Option<String>| Op::Send {
            room: "c0".into(),
            user: "w1".into(),
            text: "c0-p1-1".into(),
            id,
        };
        let h = vec![
            ev(0, 1, Type::Invoke, send(None)),
            ev(20_000_000, 1, Type::Ok, send(Some("a".into()))),
            ev(
                30_000_000,
                1,
                Type::Ok,
                Op::Deliver {
                    room: "c0".into(),
                    subscriber: "s1@c0".into(),
                    msg: Msg {
                        id: "a".into(),
                        sender: "w1".into(),
                        text: "c0-p1-1".into(),
                    },
                },
            ),
        ];
        let svg = latency_svg(&h);
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(svg.ends_with("</svg>\n"));
        let o = outcomes_svg(&h);
        assert!(o.contains("#1f77b4"));
        assert!(ops_table(&h).contains("send"));
    }
}
