//! `jepsen`: Parley's fault-injection harness.
//!
//! `jepsen run` starts a cluster in network namespaces, drives the workloads while
//! the nemesis injects faults, heals, reads everything back, checks the history and
//! writes a results folder. `jepsen check` re-checks a recorded history;
//! `jepsen cleanup` removes what an interrupted run left behind.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::{Parser, Subcommand};

use parley_jepsen::nemesis;
use parley_jepsen::run::{self, RunConfig};
use parley_jepsen::workload::Shape;

#[derive(Parser, Debug)]
#[command(name = "jepsen", version, about = "Fault-injection harness for Parley")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a cluster under faults, then check the history. Exit 0 = every checker
    /// valid, 1 = an anomaly was found, 2 = the harness itself failed.
    Run(RunArgs),
    /// Check a recorded history (history.jsonl) again.
    Check {
        /// A results folder or a history.jsonl file.
        path: PathBuf,
        /// Most search steps the membership checker spends on one room before it
        /// answers "undecided" (invalid).
        #[arg(long, default_value_t = parley_jepsen::checker::Config::default().membership_search_budget)]
        membership_budget: u64,
    },
    /// Remove the namespaces and node processes an interrupted run left behind.
    Cleanup {
        /// The run's results folder (it holds hosts.json).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Faults: families partition, kill, pause, netem, clock; single faults by name
    /// (partition-one, partition-majority, partition-bridge, partition-leader,
    /// drop-one-way, kill-one, kill-leader, kill-majority, kill-all, pause-one,
    /// pause-leader, netem, clock); `all`; `none`.
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// Length of the faulty phase (mixed schedule).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    time: Duration,
    /// Seed of the schedule and the workload's choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Results folder (default: jepsen-results/SEED-UNIXTIME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Every selected fault exactly once, in an order drawn from the seed (the CI
    /// schedule); `--time` is then ignored.
    #[arg(long)]
    each_once: bool,
    /// How long each fault is held (±20%).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    hold: Duration,
    /// Healthy time between faults (±20%).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    quiet: Duration,
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// The parley binary (default: beside this binary).
    #[arg(long)]
    parley: Option<PathBuf>,
    /// Writers (chat-set processes).
    #[arg(long, default_value_t = 6)]
    writers: usize,
    /// Pause between a writer's operations.
    #[arg(long, value_parser = parse_duration, default_value = "20ms")]
    think: Duration,
    /// No progress bar.
    #[arg(long)]
    quiet_progress: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        return Err(format!(
            "`{s}`: expected a duration like 500ms, 30s, 10m, 1h"
        ));
    };
    let v: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: not a whole number"))?;
    v.checked_mul(mult)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{s}` is too long"))
}

fn default_parley() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("parley")))
        .unwrap_or_else(|| PathBuf::from("parley"))
}

async fn cmd_run(a: RunArgs) -> Result<bool> {
    let faults = nemesis::parse(&a.nemesis)?;
    let out = a.out.unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from("jepsen-results").join(format!("{}-{now}", a.seed))
    });
    if out.join("history.jsonl").exists() {
        return Err(anyhow!(
            "{} already holds a run; choose another --out",
            out.display()
        ));
    }
    let cfg = RunConfig {
        out: out.clone(),
        parley: a.parley.unwrap_or_else(default_parley),
        nodes: a.nodes,
        faults,
        time: a.time,
        seed: a.seed,
        each_once: a.each_once,
        hold: a.hold,
        quiet: a.quiet,
        shape: Shape {
            writers: a.writers,
            think: a.think,
            ..Shape::default()
        },
        presence_ttl_s: 3,
        partitions: 8,
        progress: !a.quiet_progress,
        election_timeout_ms: 600,
        convergence_bound: Duration::from_secs(30),
    };
    let output = run::run(cfg.clone()).await?;
    parley_jepsen::report::finish(&cfg, &output)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("jepsen: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Run(a) => cmd_run(a).await,
            Cmd::Check {
                path,
                membership_budget,
            } => parley_jepsen::report::recheck(&path, membership_budget),
            Cmd::Cleanup { out } => run::cleanup(&out).map(|()| true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("jepsen: {e:#}");
            ExitCode::from(2)
        }
    }
}
