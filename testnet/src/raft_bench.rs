//! `testnet raft-bench`: Raft-backed operations per second.
//!
//! `--clients` concurrent clients (one user and one connection each, spread over the
//! nodes) repeat JoinRoom / LeaveRoom pairs, closed loop, over rooms spread across
//! every partition (`--rooms-per-partition` each), for `--duration`. Every operation
//! is one Raft write in the room's partition, forwarded to its leader when the node
//! that got it is a follower. Reported: completed ops/s and latency p50/p99.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::bench::setup;
use crate::bench::stats::{new_hist, record, LatencySummary};
use crate::cluster::{self, Layout, Running};
use crate::nodes;
use crate::partitions::{self, Op, Outcome};

#[derive(Args, Debug, Clone)]
pub struct RaftBenchArgs {
    /// gRPC addresses of a running cluster (HOST:PORT,...). Without it a fresh
    /// `--nodes` cluster is started in a temporary directory and stopped at the end.
    #[arg(long, value_delimiter = ',', value_name = "ADDR,...")]
    target: Vec<String>,
    /// Nodes of the cluster started here.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// The `parley` binary (default: beside this executable).
    #[arg(long, value_name = "PATH")]
    parley: Option<PathBuf>,
    /// Concurrent clients (one user and one connection each), closed loop.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Rooms per partition.
    #[arg(long, default_value_t = 2)]
    rooms_per_partition: usize,
    /// How long to run.
    #[arg(long, value_parser = crate::duration::parse, default_value = "20s")]
    duration: Duration,
    /// Deadline of each operation.
    #[arg(long, value_parser = crate::duration::parse, default_value = "5s")]
    rpc_timeout: Duration,
    /// Write every figure as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RaftReport {
    pub targets: Vec<String>,
    pub started_cluster: bool,
    pub partitions: u32,
    pub rooms: usize,
    pub clients: usize,
    pub duration_s: f64,
    pub ops: u64,
    pub ops_per_s: f64,
    /// Refused by the state machine (already a member / not a member): they went
    /// through Raft but are not counted in `ops`.
    pub refused: u64,
    pub errors: u64,
    pub errors_by_code: BTreeMap<String, u64>,
    pub latency: LatencySummary,
    pub node_cpu_s: Vec<(u64, f64)>,
}

pub async fn run(args: RaftBenchArgs) -> Result<ExitCode> {
    if args.clients == 0 || args.rooms_per_partition == 0 {
        bail!("--clients and --rooms-per-partition must be at least 1");
    }
    let mut running = None;
    let mut tmp = None;
    let targets: Vec<SocketAddr> = if args.target.is_empty() {
        let parley = nodes::find_parley(args.parley.as_deref())?;
        let dir = tempfile::Builder::new()
            .prefix("parley-raft-bench-")
            .tempdir()?;
        let layout = Layout::plan(dir.path(), &parley, args.nodes, 0, &[])?;
        eprintln!(
            "starting a {}-node cluster in {}",
            args.nodes,
            dir.path().display()
        );
        let r = Running::start(layout, Duration::from_secs(90)).await?;
        let addrs = r.layout.grpc_addrs();
        running = Some(r);
        tmp = Some(dir);
        addrs
    } else {
        cluster::parse_targets(&args.target)?
    };
    let pids: Vec<(u64, u32)> = running
        .as_ref()
        .map(|r| {
            r.layout
                .nodes
                .iter()
                .filter_map(|n| n.pid.map(|p| (n.id, p)))
                .collect()
        })
        .unwrap_or_default();
    let hard = args.duration + Duration::from_secs(180);
    let outcome = tokio::select! {
        r = tokio::time::timeout(hard, bench(&args, &targets, &pids)) => {
            r.unwrap_or_else(|_| Err(anyhow!("hard timeout of {hard:?} reached")))
        }
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    if let Some(mut r) = running {
        for (id, status) in r.exited() {
            eprintln!("node {id} exited during the bench: {status}");
        }
        r.stop_all().await;
    }
    if let (Some(dir), true) = (tmp, outcome.is_err()) {
        eprintln!("cluster data and logs kept in {}", dir.keep().display());
    }
    let mut report = outcome?;
    report.started_cluster = args.target.is_empty();
    print!("{}", table(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

async fn bench(
    args: &RaftBenchArgs,
    targets: &[SocketAddr],
    pids: &[(u64, u32)],
) -> Result<RaftReport> {
    let st = cluster::cluster_status(targets[0], Duration::from_secs(5)).await?;
    let partitions = st.partitions.max(1);
    let run_id = format!("r{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut clients = Vec::new();
    for a in targets {
        clients.push(setup::connect(*a, Some(args.rpc_timeout)).await?);
    }
    let pb = ProgressBar::new((1 + args.clients) as u64).with_style(
        ProgressStyle::with_template("{msg:>16} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message("creating users");
    let admin = setup::create_users(&clients, &format!("{run_id}-admin"), 1, |_| 0, 1, &pb)
        .await?
        .into_iter()
        .next()
        .context("admin user")?;
    let users = setup::create_users(
        &clients,
        &format!("{run_id}-c"),
        args.clients,
        |i| i,
        32,
        &pb,
    )
    .await?;
    let names: Vec<String> = partitions::room_names(&run_id, partitions, args.rooms_per_partition)
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    pb.set_length(names.len() as u64);
    pb.set_position(0);
    pb.set_message("creating rooms");
    let rooms = Arc::new(setup::create_rooms(&clients[0], &admin, &names, 0, 16, &pb).await?);
    pb.finish_and_clear();
    eprintln!(
        "{} clients over {} node(s), {} rooms over {partitions} partitions; running {:?}",
        args.clients,
        targets.len(),
        rooms.len(),
        args.duration
    );

    let clk = nodes::clk_tck();
    let cpu0: Vec<Option<nodes::ProcSample>> =
        pids.iter().map(|(_, p)| nodes::sample(*p, clk)).collect();
    let done_ops = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let stop_at = start + args.duration;
    let mut tasks = Vec::with_capacity(users.len());
    let mut conns = Vec::with_capacity(users.len());
    for u in &users {
        conns
            .push(setup::connect(targets[u.target % targets.len()], Some(args.rpc_timeout)).await?);
    }
    for (i, (user, client)) in users.into_iter().zip(conns).enumerate() {
        let rooms = rooms.clone();
        let done_ops = done_ops.clone();
        let timeout = args.rpc_timeout;
        tasks.push(tokio::spawn(async move {
            let mut hist = new_hist();
            let mut ops = 0u64;
            let mut refused = 0u64;
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            // Bounded by the duration: every call has its own deadline.
            let mut j: usize = 0;
            while Instant::now() < stop_at {
                // A pair on one room: join then leave; the next pair moves on.
                let room = &rooms[(i + j / 2) % rooms.len()];
                let op = if j % 2 == 1 { Op::Leave } else { Op::Join };
                let t = Instant::now();
                match partitions::membership_write(&client, &user, room, op, timeout).await {
                    Outcome::Done => {
                        record(&mut hist, t.elapsed().as_micros() as u64);
                        ops += 1;
                        done_ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Refused(_) => refused += 1,
                    Outcome::Failed(code) => {
                        *errors.entry(code).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                j += 1;
            }
            (hist, ops, refused, errors)
        }));
    }
    let pb = ProgressBar::new(args.duration.as_millis() as u64).with_style(
        ProgressStyle::with_template("raft ops [{bar:30}] {elapsed}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut last = (Instant::now(), 0u64);
    while Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n = done_ops.load(Ordering::Relaxed);
        let dt = last.0.elapsed().as_secs_f64();
        if dt >= 1.0 {
            pb.set_message(format!("{n} ops ({:.0}/s)", (n - last.1) as f64 / dt));
            last = (Instant::now(), n);
        }
        pb.set_position(start.elapsed().as_millis() as u64);
    }
    pb.finish_and_clear();
    let mut hist = new_hist();
    let (mut ops, mut refused) = (0, 0);
    let mut errors = BTreeMap::new();
    for t in tasks {
        let (h, o, r, e) = t.await.context("client task failed")?;
        let _ = hist.add(&h);
        ops += o;
        refused += r;
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let node_cpu_s = pids
        .iter()
        .zip(cpu0)
        .filter_map(|((id, p), before)| {
            let after = nodes::sample(*p, clk)?;
            Some((*id, after.cpu_secs - before?.cpu_secs))
        })
        .collect();
    Ok(RaftReport {
        targets: targets.iter().map(ToString::to_string).collect(),
        started_cluster: false,
        partitions,
        rooms: rooms.len(),
        clients: args.clients,
        duration_s: wall,
        ops,
        ops_per_s: ops as f64 / wall.max(1e-6),
        refused,
        errors: errors.values().sum(),
        errors_by_code: errors,
        latency: LatencySummary::of(&hist),
        node_cpu_s,
    })
}

fn table(r: &RaftReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "parley raft-bench  (JoinRoom/LeaveRoom pairs, closed loop, {} clients, {:.0}s)",
        r.clients, r.duration_s
    );
    let _ = writeln!(
        s,
        "  targets {}{}  rooms {} over {} partitions",
        r.targets.join(","),
        if r.started_cluster {
            " (started here)"
        } else {
            ""
        },
        r.rooms,
        r.partitions
    );
    let _ = writeln!(
        s,
        "  ops                {:>10}   {:>8.0} /s",
        r.ops, r.ops_per_s
    );
    let _ = writeln!(
        s,
        "  latency            p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        r.latency.p50_ms, r.latency.p90_ms, r.latency.p99_ms, r.latency.max_ms
    );
    let _ = writeln!(s, "  refused (state)    {:>10}", r.refused);
    let _ = writeln!(
        s,
        "  errors             {:>10}  {:?}",
        r.errors, r.errors_by_code
    );
    for (id, cpu) in &r.node_cpu_s {
        let _ = writeln!(
            s,
            "  node {id} CPU        {cpu:>9.1}s ({:.2} cores)",
            cpu / r.duration_s.max(1e-6)
        );
    }
    let _ = writeln!(
        s,
        "RESULT raft_ops_per_s={:.0} p50_ms={:.1} p99_ms={:.1}",
        r.ops_per_s, r.latency.p50_ms, r.latency.p99_ms
    );
    s
}
