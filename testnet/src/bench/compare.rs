//! `bench --compare A,B --rounds N`: the load bench on a fresh cluster of each `parley`
//! binary in turn, N times each, and per binary the median and range of what a run
//! measures. Runs on this machine move by 10–20 % from one to the next, so one run of
//! each build cannot tell a 5 % change; alternating the order from round to round
//! (A B, B A, A B, ...) keeps a machine that gets faster or slower during the runs from
//! favouring one build.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use super::report::{fmt_count, Report};
use super::{on_cluster, BenchArgs, Outcome};
use crate::nodes;

/// Bounds on `--rounds` and on the binaries `--compare` takes.
pub const MAX_ROUNDS: usize = 50;
pub const MAX_BINARIES: usize = 26;

/// One run: which binary, and its report or why it has none.
#[derive(Debug, Clone, Serialize)]
pub struct CompareRun {
    /// 1-based, in the order run.
    pub run: usize,
    /// Index into the binaries given, 0-based.
    pub binary: usize,
    pub parley: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A node exited during the run (its report, if any, is suspect).
    pub node_died: bool,
}

/// Medians and ranges over one binary's runs that produced a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub binary: usize,
    pub parley: String,
    pub runs: usize,
    pub acked_per_s: Spread,
    /// Mean over the run's nodes of their CPU microseconds per acknowledged message.
    pub node_cpu_us_per_msg: Spread,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub binaries: Vec<String>,
    pub rounds: usize,
    pub runs: Vec<CompareRun>,
    pub summary: Vec<Summary>,
}

/// The binary (by index) of each run: every binary once per round, the order reversed
/// in every other round.
pub fn order(binaries: usize, rounds: usize) -> Vec<usize> {
    (0..rounds)
        .flat_map(|r| {
            let round: Vec<usize> = if r % 2 == 0 {
                (0..binaries).collect()
            } else {
                (0..binaries).rev().collect()
            };
            round
        })
        .collect()
}

/// "A", "B", ... for the binaries in the order given.
pub fn label(binary: usize) -> String {
    u8::try_from(binary)
        .ok()
        .filter(|b| usize::from(*b) < MAX_BINARIES)
        .map(|b| char::from(b'A' + b).to_string())
        .unwrap_or_else(|| format!("#{}", binary + 1))
}

/// Mean CPU µs per acked message over the nodes this run started.
fn node_cpu(r: &Report) -> Option<f64> {
    let v: Vec<f64> = r
        .nodes
        .iter()
        .map(|n| n.cpu_us_per_msg)
        .filter(|x| x.is_finite())
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

pub fn summarize(binaries: &[String], runs: &[CompareRun]) -> Vec<Summary> {
    binaries
        .iter()
        .enumerate()
        .filter_map(|(b, parley)| {
            let reports: Vec<&Report> = runs
                .iter()
                .filter(|r| r.binary == b && !r.node_died)
                .filter_map(|r| r.report.as_ref())
                .collect();
            let acked: Vec<f64> = reports.iter().map(|r| r.acked_per_s).collect();
            let cpu: Vec<f64> = reports.iter().filter_map(|r| node_cpu(r)).collect();
            Some(Summary {
                binary: b,
                parley: parley.clone(),
                runs: reports.len(),
                acked_per_s: Spread::of(&acked)?,
                node_cpu_us_per_msg: Spread::of(&cpu)?,
            })
        })
        .collect()
}

fn pct(new: f64, base: f64) -> String {
    if base == 0.0 {
        return "–".into();
    }
    format!("{:+.1} %", (new / base - 1.0) * 100.0)
}

/// The markdown tables: one row per run, then one per binary.
pub fn table(report: &CompareReport) -> String {
    let mut s = String::new();
    for (b, p) in report.binaries.iter().enumerate() {
        let _ = writeln!(s, "{}: {p}", label(b));
    }
    let _ = writeln!(
        s,
        "\n| run | build | acked/s | ack p50 / p99 ms | delivery p50 / p99 ms | node CPU µs/msg | errors | lost / dup |"
    );
    let _ = writeln!(s, "|---:|---|---:|---|---|---|---:|---|");
    for r in &report.runs {
        let b = label(r.binary);
        match (&r.report, &r.error) {
            (Some(rep), _) => {
                let cpu: Vec<f64> = rep.nodes.iter().map(|n| n.cpu_us_per_msg).collect();
                let lo = cpu.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = cpu.iter().copied().fold(0.0, f64::max);
                let _ = writeln!(
                    s,
                    "| {} | {b}{} | {} | {:.0} / {:.0} | {:.0} / {:.0} | {} | {} | {} / {} |",
                    r.run,
                    if r.node_died { " (a node died)" } else { "" },
                    fmt_count(rep.acked_per_s),
                    rep.ack_latency.p50_ms,
                    rep.ack_latency.p99_ms,
                    rep.delivery_latency.p50_ms,
                    rep.delivery_latency.p99_ms,
                    if cpu.is_empty() {
                        "–".to_string()
                    } else {
                        format!("{lo:.0}–{hi:.0}")
                    },
                    rep.send_errors,
                    rep.delivery_check.lost,
                    rep.delivery_check.duplicates,
                );
            }
            (None, e) => {
                let _ = writeln!(
                    s,
                    "| {} | {b} | failed: {} | | | | | |",
                    r.run,
                    e.as_deref().unwrap_or("no report").replace('|', "/")
                );
            }
        }
    }
    let _ = writeln!(
        s,
        "\n| build | runs | acked/s median (min–max) | node CPU µs/msg median (min–max) | against A |"
    );
    let _ = writeln!(s, "|---|---:|---|---|---|");
    let base = report.summary.iter().find(|x| x.binary == 0);
    for x in &report.summary {
        let against = match base {
            Some(a) if x.binary != 0 => format!(
                "acked/s {}, CPU/msg {}",
                pct(x.acked_per_s.median, a.acked_per_s.median),
                pct(x.node_cpu_us_per_msg.median, a.node_cpu_us_per_msg.median)
            ),
            _ => "–".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} ({}–{}) | {:.0} ({:.0}–{:.0}) | {against} |",
            label(x.binary),
            x.runs,
            fmt_count(x.acked_per_s.median),
            fmt_count(x.acked_per_s.min),
            fmt_count(x.acked_per_s.max),
            x.node_cpu_us_per_msg.median,
            x.node_cpu_us_per_msg.min,
            x.node_cpu_us_per_msg.max,
        );
    }
    s
}

pub async fn run(args: &BenchArgs) -> Result<ExitCode> {
    let bins: Vec<PathBuf> = args
        .compare
        .iter()
        .map(|p| nodes::find_parley(Some(p)))
        .collect::<Result<_>>()?;
    let names: Vec<String> = bins.iter().map(|b| b.display().to_string()).collect();
    let plan = order(bins.len(), args.rounds);
    let mut runs = Vec::with_capacity(plan.len());
    for (i, b) in plan.iter().copied().enumerate() {
        eprintln!(
            "== compare run {}/{}: {} ({}) ==",
            i + 1,
            plan.len(),
            label(b),
            names[b]
        );
        let mut one = args.clone();
        one.compare.clear();
        one.parley = Some(bins[b].clone());
        one.json = None;
        let mut run = CompareRun {
            run: i + 1,
            binary: b,
            parley: names[b].clone(),
            report: None,
            error: None,
            node_died: false,
        };
        let mut interrupted = false;
        match on_cluster(&one).await {
            Ok(done) => {
                run.node_died = done.node_died;
                interrupted = done.interrupted;
                match done.outcome {
                    Ok(Outcome::Load(rep)) => {
                        eprintln!(
                            "   {} acked/s, node CPU {} µs/msg, {} errors, {} lost",
                            rep.acked_per_s.round(),
                            node_cpu(&rep).map_or("–".into(), |c| format!("{c:.0}")),
                            rep.send_errors,
                            rep.delivery_check.lost
                        );
                        run.report = Some(*rep);
                    }
                    Ok(_) => run.error = Some("not a load run".into()),
                    Err(e) => run.error = Some(format!("{e:#}")),
                }
            }
            Err(e) => run.error = Some(format!("{e:#}")),
        }
        runs.push(run);
        if interrupted {
            return Err(anyhow!(
                "interrupted after {} of {} runs",
                i + 1,
                plan.len()
            ));
        }
    }
    let summary = summarize(&names, &runs);
    let report = CompareReport {
        binaries: names,
        rounds: args.rounds,
        runs,
        summary,
    };
    println!("{}", table(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let all_ran = report
        .runs
        .iter()
        .all(|r| r.report.is_some() && !r.node_died);
    Ok(if all_ran {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rounds_alternate_the_order() {
        assert_eq!(order(2, 3), [0, 1, 1, 0, 0, 1]);
        assert_eq!(order(3, 2), [0, 1, 2, 2, 1, 0]);
        assert_eq!(order(1, 3), [0, 0, 0]);
        assert!(order(2, 0).is_empty());
    }

    #[test]
    fn labels_are_letters_then_numbers() {
        assert_eq!(label(0), "A");
        assert_eq!(label(1), "B");
        assert_eq!(label(25), "Z");
        assert_eq!(label(26), "#27");
    }

    #[test]
    fn spread_takes_the_median_of_what_is_finite() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, f64::NAN, 2.0, 10.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 10.0));
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::INFINITY]), None);
    }

    #[test]
    fn change_against_the_first_build_is_signed() {
        assert_eq!(pct(110.0, 100.0), "+10.0 %");
        assert_eq!(pct(95.0, 100.0), "-5.0 %");
        assert_eq!(pct(1.0, 0.0), "–");
    }
}
