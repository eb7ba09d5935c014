//! `testnet bench`: the group-chat load benchmark.
//!
//! The workload mirrors the NATS JetStream peer bench (`/work/shared/peers/nats-bench`)
//! so figures compare: `--senders` connections send `--size`-byte messages round-robin
//! over `--rooms` rooms and await every ack (`--inflight` outstanding per sender, or
//! open loop at `--rate`), while `--subscribers-per-room` Subscribe streams per room
//! (one connection and user each) time send→delivery from a stamp in the text.
//!
//! - [`payload`]: the stamp in each message's text.
//! - [`schedule`]: message split, open-loop pacing, room choice.
//! - [`setup`]: users, rooms, joins, subscriptions (bounded retries).
//! - [`load`]: sender and subscriber tasks, live counters.
//! - [`stats`]: histograms, per-second timeline, lost/duplicate check.
//! - [`report`], [`svg`]: the table, JSON and chart.
//!
//! Two more modes share the cluster start-up and teardown:
//! - [`clients`] (`--clients N`): N idle subscribed connections, node memory per
//!   connection, connect times, and a delivery probe to every client.
//! - [`sweep`] (`--sweep-senders`, `--sweep-write-quorum`): the load bench once per
//!   value against one cluster, as a markdown table and one JSON document.
//! - [`compare`] (`--compare A,B`): the load bench on a fresh cluster of each given
//!   `parley` build in turn, alternated over `--rounds`, with medians per build.
//!
//! Every phase is bounded: setup by per-step retry budgets, sending by `--duration`
//! or `--messages` plus a safety bound, the drain by `--drain`, the whole run by
//! `--timeout`. Nodes started here are stopped by PID on every path out.

mod clients;
mod compare;
mod load;
mod payload;
mod report;
mod schedule;
pub(crate) mod setup;
pub(crate) mod stats;
mod svg;
mod sweep;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;

use crate::cluster::{self, Layout, Running};
use crate::duration;
use crate::nodes::{self, ProcSample};
use load::{Clock, SenderLog, SenderPlan, Shared};
use report::{ConfigEcho, ProcReport, Report};
use stats::{check_deliveries, merge_codes, new_hist, LatencySummary, SubscriberLog};

/// What the hard cap allows for starting a cluster, setup and the report, around the
/// send phase and the drain.
const SETUP_ALLOWANCE: Duration = Duration::from_secs(180);

#[derive(Args, Debug, Clone)]
#[command(after_long_help = "\
MODES
  (default)   the load bench: --senders send into --rooms, subscribers time deliveries.
  --clients N N idle subscribed connections, one HTTP/2 connection and user each, spread
              over the nodes and over min(--rooms, N) rooms. Reports each node's RSS
              before and after, memory per connection (summed node RSS growth / clients
              connected), connect and connect+subscribe p50/p99, then sends
              --probe-messages into every room and checks every client received them
              (delivered/expected). Exit 1 unless all connected and all were delivered.
  sweeps      --sweep-senders 1,16,64,256 and/or --sweep-write-quorum 1,2 run the load
              bench once per value (the product of both lists, write quorum outermost)
              against one cluster, each point with its own users and rooms. Prints a
              markdown table (W, senders, acked/s, deliveries/s, p50/p99/max send to
              delivery, errors, lost); --json writes {\"points\": [...]} with every report.
  compare     --compare OLD,NEW runs the load bench on a fresh cluster of each `parley`
              binary in turn, --rounds times, alternating the order (OLD NEW NEW OLD
              ...) so that a machine getting faster or slower during the runs weighs on
              both alike. Prints one row per run and, per binary, the median and range
              of acked/s and of node CPU per message, with the change against the first
              binary; --json writes every run's report.

EXAMPLES
  testnet bench --clients 10000
  testnet bench --sweep-senders 1,16,64,256 --duration 30s --json sweep-senders.json
  testnet bench --sweep-write-quorum 1,2 --duration 30s --json sweep-w.json
  testnet bench --compare old/parley,target/release/parley --rounds 3 --inflight 8")]
pub struct BenchArgs {
    /// gRPC addresses of running nodes (HOST:PORT,...). Without it a fresh cluster of
    /// `--nodes` nodes is started in a temporary directory and stopped at the end.
    #[arg(long, value_delimiter = ',', value_name = "ADDR,...")]
    target: Vec<String>,
    /// Nodes of the cluster started here (without --target).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// The `parley` binary to start (default: beside this executable).
    #[arg(long, value_name = "PATH")]
    parley: Option<PathBuf>,
    /// Rooms.
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Sending connections (one user each).
    #[arg(long, default_value_t = 64)]
    senders: usize,
    /// Rooms each sender is a member of and sends to, round-robin (default: all).
    #[arg(long)]
    rooms_per_sender: Option<usize>,
    /// Subscribe streams per room (one connection and user each).
    #[arg(long, default_value_t = 3)]
    subscribers_per_room: usize,
    /// Message text size in bytes (at least 32: the timing stamp).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// How long to send (default 30s unless --messages is given).
    #[arg(long, value_parser = duration::parse, conflicts_with = "messages")]
    duration: Option<Duration>,
    /// Total messages to send, split evenly over the senders.
    #[arg(long)]
    messages: Option<u64>,
    /// Total send rate in msgs/s, spread over the senders (open loop, latency measured
    /// from each message's scheduled time). 0 = closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Write quorum of the bench rooms (default: the cluster's, `W = 2` unless its nodes
    /// were started with another `--write-quorum`).
    #[arg(long)]
    write_quorum: Option<u32>,
    /// Unacked sends allowed per sender.
    #[arg(long, default_value_t = 1)]
    inflight: usize,
    /// How long to wait for outstanding deliveries after the last ack.
    #[arg(long, value_parser = duration::parse, default_value = "5s")]
    drain: Duration,
    /// Deadline of each RPC.
    #[arg(long, value_parser = duration::parse, default_value = "10s")]
    rpc_timeout: Duration,
    /// Hard cap on the whole run (default: 3 min + the send phase + the drain). With
    /// `--messages` in a closed loop it also lets sending go on past 10 minutes, until
    /// 3 min + the drain + one RPC deadline before the cap.
    #[arg(long, value_parser = duration::parse)]
    timeout: Option<Duration>,
    /// PIDs of externally started nodes whose CPU and memory to report.
    #[arg(long, value_delimiter = ',', value_name = "PID,...")]
    pids: Vec<u32>,
    /// Concurrent setup calls (user creation, joins).
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// Write every figure as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write an SVG chart of p50/p99 delivery latency per second.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Keep the started cluster's data directory.
    #[arg(long)]
    keep: bool,
    /// Clients mode: open N idle subscribed connections instead of the load bench
    /// (see MODES below).
    #[arg(long, value_name = "N", conflicts_with_all = ["sweep_senders", "sweep_write_quorum", "plot", "messages", "rate"])]
    clients: Option<usize>,
    /// Clients mode: probe messages sent into each room once every client is subscribed.
    #[arg(long, default_value_t = 2, value_name = "K")]
    probe_messages: usize,
    /// Run the load bench once per sender count (overrides --senders).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "N,...",
        conflicts_with = "plot"
    )]
    sweep_senders: Vec<usize>,
    /// Run the load bench once per write quorum (overrides --write-quorum).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "W,...",
        conflicts_with = "plot"
    )]
    sweep_write_quorum: Vec<u32>,
    /// Compare `parley` builds: the load bench on a fresh cluster of each, in turn
    /// (see MODES below).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "PARLEY,...",
        conflicts_with_all = ["target", "parley", "pids", "clients", "sweep_senders", "sweep_write_quorum", "plot"]
    )]
    compare: Vec<PathBuf>,
    /// Compare mode: runs of each binary.
    #[arg(long, default_value_t = 2, value_name = "N")]
    rounds: usize,
}

/// What one invocation runs.
#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Load,
    Clients(usize),
    /// `(write quorum, senders)` per point.
    Sweep(Vec<(u32, usize)>),
}

/// What one invocation produced.
enum Outcome {
    Load(Box<Report>),
    Clients(Box<clients::ClientsReport>),
    Sweep(sweep::SweepReport),
}

impl BenchArgs {
    fn validate(&self) -> Result<()> {
        if self.size < payload::HEADER_LEN {
            bail!("--size must be at least {}", payload::HEADER_LEN);
        }
        if self.rooms == 0 || self.senders == 0 || self.inflight == 0 {
            bail!("--rooms, --senders and --inflight must be at least 1");
        }
        if self.senders > u32::MAX as usize {
            bail!("--senders too large");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a number >= 0");
        }
        if self.messages == Some(0) {
            bail!("--messages must be at least 1");
        }
        if self.clients == Some(0) {
            bail!("--clients must be at least 1");
        }
        if self
            .sweep_senders
            .iter()
            .any(|s| *s == 0 || *s > u32::MAX as usize)
        {
            bail!("--sweep-senders values must be at least 1");
        }
        if self.sweep_write_quorum.contains(&0) {
            bail!("--sweep-write-quorum values must be at least 1");
        }
        if !(1..=compare::MAX_ROUNDS).contains(&self.rounds) {
            bail!("--rounds must be between 1 and {}", compare::MAX_ROUNDS);
        }
        if self.compare.len() > compare::MAX_BINARIES {
            bail!("--compare takes at most {} binaries", compare::MAX_BINARIES);
        }
        Ok(())
    }

    fn mode(&self) -> Mode {
        if let Some(n) = self.clients {
            return Mode::Clients(n);
        }
        if self.sweep_senders.is_empty() && self.sweep_write_quorum.is_empty() {
            return Mode::Load;
        }
        Mode::Sweep(sweep::plan(
            &self.sweep_senders,
            self.senders,
            &self.sweep_write_quorum,
            self.write_quorum,
        ))
    }

    fn send_window(&self) -> Duration {
        self.duration.unwrap_or(Duration::from_secs(30))
    }

    /// When sending must stop at the latest, counted from the load start. Closed loop
    /// with a duration stops at the duration; open loop sends every message that fell
    /// due (late ones count their lateness) but gives up after a grace period. Closed
    /// loop with `--messages` gives up after 10 minutes, or, with `--timeout`, when what
    /// is left of the hard cap is the setup allowance, the drain and one RPC deadline.
    fn send_bound(&self) -> Duration {
        let grace = |planned: Duration| planned + (planned / 2).max(Duration::from_secs(10));
        match (self.messages, self.rate > 0.0) {
            (None, false) => self.send_window(),
            (None, true) => grace(self.send_window()),
            (Some(m), true) => grace(Duration::from_secs_f64(m as f64 / self.rate)),
            (Some(_), false) => match self.timeout {
                Some(cap) => cap
                    .saturating_sub(SETUP_ALLOWANCE + self.drain + self.rpc_timeout)
                    .max(Duration::from_secs(1)),
                None => Duration::from_secs(600),
            },
        }
    }

    fn hard_timeout(&self) -> Duration {
        let one = SETUP_ALLOWANCE + self.send_bound() + self.drain + self.rpc_timeout;
        self.timeout.unwrap_or(match self.mode() {
            Mode::Load => one,
            Mode::Sweep(points) => one * points.len().max(1) as u32,
            // Users, joins and connections take a few ms each on a loaded machine.
            Mode::Clients(n) => {
                Duration::from_secs(180)
                    + Duration::from_millis(30) * n.min(1_000_000) as u32
                    + self.drain
                    + self.rpc_timeout
            }
        })
    }
}

pub async fn run(args: BenchArgs) -> Result<ExitCode> {
    args.validate()?;
    if !args.compare.is_empty() {
        return compare::run(&args).await;
    }
    let done = on_cluster(&args).await?;
    let node_died = done.node_died;
    let (json, passed) = match done.outcome? {
        Outcome::Load(report) => {
            println!("{}", report.table());
            if let Some(path) = &args.plot {
                std::fs::write(path, report.plot())
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
            }
            (serde_json::to_string_pretty(&report)?, true)
        }
        Outcome::Clients(report) => {
            println!("{}", report.table());
            (serde_json::to_string_pretty(&report)?, report.passed())
        }
        Outcome::Sweep(report) => {
            println!("{}", sweep::table(&report.points));
            let ok = report.points.iter().all(|p| p.error.is_none());
            (serde_json::to_string_pretty(&report)?, ok)
        }
    };
    if let Some(path) = &args.json {
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(if node_died || !passed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// What [`on_cluster`] produced, and how the nodes it started fared.
struct OnCluster {
    outcome: Result<Outcome>,
    /// A node this invocation started exited during the run.
    node_died: bool,
    /// Ctrl-C ended the run.
    interrupted: bool,
}

/// Runs what `args` asks for: against `--target`, or on a fresh cluster of `--nodes`
/// nodes started here and stopped by PID on every path out. Errs only when that
/// cluster does not start.
async fn on_cluster(args: &BenchArgs) -> Result<OnCluster> {
    let mut started: Option<Running> = None;
    let mut tmp: Option<tempfile::TempDir> = None;
    let targets: Vec<SocketAddr> = if args.target.is_empty() {
        let parley = nodes::find_parley(args.parley.as_deref())?;
        let dir = tempfile::Builder::new().prefix("parley-bench-").tempdir()?;
        eprintln!(
            "starting a {}-node cluster ({}) in {}",
            args.nodes,
            parley.display(),
            dir.path().display()
        );
        let layout = Layout::plan(dir.path(), &parley, args.nodes, 0, &[])?;
        tmp = Some(dir);
        let run = tokio::select! {
            r = Running::start(layout, Duration::from_secs(90)) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted while starting")),
        };
        let run = match run {
            Ok(r) => r,
            Err(e) => {
                if let Some(dir) = tmp {
                    eprintln!("cluster data and logs kept in {}", dir.keep().display());
                }
                return Err(e);
            }
        };
        for n in &run.layout.nodes {
            eprintln!(
                "node {} pid {} serving gRPC on {}",
                n.id,
                n.pid.unwrap_or(0),
                n.grpc
            );
        }
        let addrs = run.layout.grpc_addrs();
        started = Some(run);
        addrs
    } else {
        cluster::parse_targets(&args.target)?
    };
    let mut watched: Vec<(String, u32)> = started
        .iter()
        .flat_map(|r| r.layout.nodes.iter())
        .filter_map(|n| n.pid.map(|p| (format!("node-{}", n.id), p)))
        .collect();
    watched.extend(args.pids.iter().map(|p| (format!("pid {p}"), *p)));

    let hard = args.hard_timeout();
    let mut interrupted = false;
    let nodes_started = started.as_ref().map_or(0, |r| r.layout.nodes.len());
    let outcome = tokio::select! {
        r = tokio::time::timeout(hard, execute(args, &targets, nodes_started, &watched)) => {
            r.unwrap_or_else(|_| Err(anyhow!("hard timeout of {hard:?} reached (--timeout)")))
        }
        _ = tokio::signal::ctrl_c() => {
            interrupted = true;
            Err(anyhow!("interrupted"))
        }
    };

    let mut node_died = false;
    if let Some(run) = started.as_mut() {
        for (id, status) in run.exited() {
            node_died = true;
            let log = run.layout.node(id).map(|s| s.log.clone());
            eprintln!(
                "node {id} exited during the bench: {status}; log:\n{}",
                log.map(|l| nodes::log_tail(&l, 20)).unwrap_or_default()
            );
        }
        run.stop_all().await;
    }
    if let Some(dir) = tmp {
        // Keep what a failed run left for a post-mortem, not what Ctrl-C cut short.
        if args.keep || (outcome.is_err() && !interrupted) {
            let kept = dir.keep();
            eprintln!("node data and log kept in {}", kept.display());
        }
    }
    Ok(OnCluster {
        outcome,
        node_died,
        interrupted,
    })
}

/// Runs what `args` asks for against `targets`.
async fn execute(
    args: &BenchArgs,
    targets: &[SocketAddr],
    nodes_started: usize,
    watched: &[(String, u32)],
) -> Result<Outcome> {
    match args.mode() {
        Mode::Load => Ok(Outcome::Load(Box::new(
            bench(args, targets, nodes_started, watched).await?,
        ))),
        Mode::Clients(n) => Ok(Outcome::Clients(Box::new(
            clients::run(args, n, targets, nodes_started > 0, watched).await?,
        ))),
        Mode::Sweep(plan) => {
            let mut points = Vec::with_capacity(plan.len());
            for (i, (w, senders)) in plan.iter().copied().enumerate() {
                eprintln!(
                    "== sweep point {}/{}: senders {senders}, W={} ==",
                    i + 1,
                    plan.len(),
                    if w == 0 {
                        "default".to_string()
                    } else {
                        w.to_string()
                    }
                );
                let mut one = args.clone();
                one.senders = senders;
                one.write_quorum = (w > 0).then_some(w);
                let (report, error) = match bench(&one, targets, nodes_started, watched).await {
                    Ok(r) => {
                        eprintln!("{}", r.table());
                        (Some(r), None)
                    }
                    Err(e) => {
                        eprintln!("sweep point failed: {e:#}");
                        (None, Some(format!("{e:#}")))
                    }
                };
                points.push(sweep::SweepPoint {
                    senders,
                    write_quorum: w,
                    report,
                    error,
                });
            }
            Ok(Outcome::Sweep(sweep::SweepReport { points }))
        }
    }
}

/// Nodes in the cluster behind `addr` (ClusterStatus), 1 if it does not say.
async fn cluster_size(addr: SocketAddr) -> usize {
    match cluster::cluster_status(addr, Duration::from_secs(5)).await {
        Ok(st) => st.nodes.len().max(1),
        Err(_) => 1,
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

async fn bench(
    args: &BenchArgs,
    targets: &[SocketAddr],
    nodes_started: usize,
    watched: &[(String, u32)],
) -> Result<Report> {
    let started_node = nodes_started > 0;
    let setup_t0 = Instant::now();
    let clock = Clock::new();
    let shared = Arc::new(Shared::new(clock));
    let run_id = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let n_subs = args.rooms * args.subscribers_per_room;
    let per_sender = args
        .rooms_per_sender
        .unwrap_or(args.rooms)
        .clamp(1, args.rooms);
    let conc = args.setup_concurrency.max(1);

    // ---- setup ----
    let mut clients = Vec::new();
    for &t in targets {
        clients.push(setup::connect(t, Some(args.rpc_timeout)).await?);
    }
    let cluster_nodes = match nodes_started {
        0 => cluster_size(targets[0]).await,
        n => n,
    };
    let mut notes = Vec::new();
    // 0 = the cluster's default (W=2 of 3 on a cluster).
    let write_quorum = args.write_quorum.unwrap_or(0);
    if targets.len() > 1 {
        notes.push(format!(
            "senders and subscribers are spread over the {} nodes (sender i and subscriber i \
             use node i % {}); each node forwards a write to its room's home (the leader of \
             the room's partition), which acknowledges once W replicas hold it",
            targets.len(),
            targets.len()
        ));
    }
    let _ = cluster_nodes;
    for n in &notes {
        eprintln!("NOTE: {n}");
    }
    let pb = ProgressBar::new((1 + args.senders + n_subs) as u64)
        .with_style(style("{msg:>24} [{bar:30}] {pos}/{len} {elapsed}"));
    pb.set_message("creating users");
    let admin =
        setup::create_users(&clients, &format!("b{run_id}-admin"), 1, |_| 0, 1, &pb).await?;
    let admin = admin.into_iter().next().context("admin user")?;
    let sub_users =
        setup::create_users(&clients, &format!("b{run_id}-u"), n_subs, |i| i, conc, &pb).await?;
    let send_users = setup::create_users(
        &clients,
        &format!("b{run_id}-s"),
        args.senders,
        |i| n_subs + i,
        conc,
        &pb,
    )
    .await?;

    pb.set_length(args.rooms as u64);
    pb.set_position(0);
    pb.set_message("creating rooms");
    let names: Vec<String> = (0..args.rooms).map(|r| format!("b{run_id}-r{r}")).collect();
    let room_ids =
        Arc::new(setup::create_rooms(&clients[0], &admin, &names, write_quorum, conc, &pb).await?);

    let mut pairs = Vec::new();
    for (i, u) in sub_users.iter().enumerate() {
        pairs.push((
            u.clone(),
            room_ids[i / args.subscribers_per_room.max(1)].clone(),
        ));
    }
    for (p, u) in send_users.iter().enumerate() {
        for r in schedule::rooms_of(p, args.rooms, per_sender) {
            pairs.push((u.clone(), room_ids[r].clone()));
        }
    }
    pb.set_length(pairs.len() as u64);
    pb.set_position(0);
    pb.set_message("joining rooms");
    setup::join_all(&clients, pairs, conc, &pb).await?;

    pb.set_length(n_subs as u64);
    pb.set_position(0);
    pb.set_message("subscribing");
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sub_tasks = Vec::with_capacity(n_subs);
    {
        let jobs = sub_users.iter().enumerate().map(|(i, u)| {
            let room = i / args.subscribers_per_room.max(1);
            // Spread over the nodes (see the header note).
            let addr = targets[i % targets.len()];
            let room_id = room_ids[room].clone();
            let pb = &pb;
            async move {
                let s = setup::subscribe(addr, u, &room_id).await;
                pb.inc(1);
                s.map(|s| (room, s))
            }
        });
        let mut opened = futures::stream::iter(jobs).buffer_unordered(conc);
        while let Some(r) = opened.next().await {
            let (room, stream) = r?;
            sub_tasks.push(tokio::spawn(load::subscriber(
                room,
                stream,
                shared.clone(),
                stop_rx.clone(),
            )));
        }
    }

    // Each sender: one connection per node; it sends through node `index % nodes`.
    let mut send_clients = Vec::with_capacity(args.senders);
    for _ in &send_users {
        let mut per_target = Vec::with_capacity(targets.len());
        for t in targets {
            per_target.push(setup::connect(*t, Some(args.rpc_timeout)).await?);
        }
        send_clients.push(per_target);
    }
    // Let the last subscriptions settle before the first message.
    tokio::time::sleep(Duration::from_millis(300)).await;
    pb.finish_and_clear();
    let setup_s = setup_t0.elapsed().as_secs_f64();
    eprintln!(
        "setup done in {setup_s:.1}s: {} users, {} rooms, {} subscriptions on {} node(s)",
        1 + n_subs + args.senders,
        args.rooms,
        sub_tasks.len(),
        targets.len()
    );

    // ---- load ----
    let clk = nodes::clk_tck();
    let load_start = Instant::now();
    let cpu_before: Vec<Option<ProcSample>> = watched
        .iter()
        .map(|(_, p)| nodes::sample(*p, clk))
        .collect();
    let self_before = nodes::sample(std::process::id(), clk);
    shared
        .load_start_us
        .store(clock.us_at(load_start), Ordering::Relaxed);
    let quotas: Vec<u64> = match args.messages {
        Some(m) => schedule::split_total(m, args.senders),
        None => vec![u64::MAX; args.senders],
    };
    let stop_sending = load_start + args.send_bound();
    let mut send_tasks = Vec::with_capacity(args.senders);
    for (p, (user, client)) in send_users.into_iter().zip(send_clients).enumerate() {
        let pace = schedule::Pace::for_sender(args.rate, args.senders, p);
        let quota = match (args.messages, pace) {
            (Some(_), _) => quotas[p],
            (None, Some(pace)) => pace.due_within(args.send_window()),
            (None, None) => u64::MAX,
        };
        let plan = SenderPlan {
            index: p,
            clients: client,
            user,
            room_ids: room_ids.clone(),
            rooms_per_sender: per_sender,
            size: args.size,
            inflight: args.inflight,
            quota,
            stop_sending,
            pace,
            load_start,
            rpc_timeout: args.rpc_timeout,
            run_id: run_id.clone(),
        };
        send_tasks.push(tokio::spawn(load::sender(plan, shared.clone())));
    }

    let total_msgs = args.messages;
    let pb = match total_msgs {
        Some(m) => {
            ProgressBar::new(m).with_style(style("sending [{bar:30}] {pos}/{len} {elapsed}  {msg}"))
        }
        None => ProgressBar::new(args.send_window().as_millis() as u64)
            .with_style(style("sending [{bar:30}] {elapsed}  {msg}")),
    };
    let ticker = {
        let shared = shared.clone();
        let pb = pb.clone();
        let mut tick_stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(250));
            let mut last = (Instant::now(), 0u64);
            let mut rate = 0.0;
            let mut last_print = Instant::now();
            loop {
                tokio::select! {
                    _ = tick_stop_rx.changed() => break,
                    _ = every.tick() => {}
                }
                let acked = shared.live.acked.load(Ordering::Relaxed);
                let errors = shared.live.errors.load(Ordering::Relaxed);
                let delivered = shared.live.delivered.load(Ordering::Relaxed);
                let dt = last.0.elapsed().as_secs_f64();
                if dt >= 1.0 {
                    rate = (acked - last.1) as f64 / dt;
                    last = (Instant::now(), acked);
                }
                let msg =
                    format!("acked {acked} ({rate:.0}/s)  delivered {delivered}  errors {errors}");
                match total_msgs {
                    Some(_) => pb.set_position(acked + errors),
                    None => pb.set_position(load_start.elapsed().as_millis() as u64),
                }
                if pb.is_hidden() && last_print.elapsed() >= Duration::from_secs(5) {
                    eprintln!("[{:>5.1}s] {msg}", load_start.elapsed().as_secs_f64());
                    last_print = Instant::now();
                }
                pb.set_message(msg);
            }
        })
    };

    let mut ack = new_hist();
    let mut acked: Vec<(u64, u32)> = Vec::new();
    let mut errors_by_code = BTreeMap::new();
    let mut error_samples = BTreeMap::new();
    let mut unsent = 0;
    let mut sender_timeline = stats::Timeline::default();
    for t in send_tasks {
        let log: SenderLog = t.await.context("sender task failed")?;
        let _ = ack.add(&log.ack);
        acked.extend_from_slice(&log.acked);
        merge_codes(&mut errors_by_code, &log.errors);
        for (code, message) in log.error_samples {
            error_samples.entry(code).or_insert(message);
        }
        unsent += log.unsent;
        sender_timeline.merge(&log.timeline);
    }

    // ---- drain ----
    pb.set_message("draining");
    let expected = acked.len() as u64 * args.subscribers_per_room as u64;
    let uncertain = !errors_by_code.is_empty();
    drain(&shared.live.delivered, expected, uncertain, args.drain).await;
    let _ = stop_tx.send(true);
    let _ = ticker.await;
    pb.finish_and_clear();
    let mut logs: Vec<SubscriberLog> = Vec::with_capacity(sub_tasks.len());
    for t in sub_tasks {
        logs.push(t.await.context("subscriber task failed")?);
    }
    let load_wall = load_start.elapsed().as_secs_f64();
    let cpu_after: Vec<Option<ProcSample>> = watched
        .iter()
        .map(|(_, p)| nodes::sample(*p, clk))
        .collect();
    let self_after = nodes::sample(std::process::id(), clk);

    // ---- figures ----
    let check = check_deliveries(&acked, &logs);
    let (delivery, mut timeline) = match shared.collector.lock() {
        Ok(mut c) => (c.delivery.clone(), std::mem::take(&mut c.timeline)),
        Err(_) => (new_hist(), stats::Timeline::default()),
    };
    timeline.merge(&sender_timeline);
    let origin = clock.us_at(load_start);
    let window = |last: u64| (last.saturating_sub(origin) as f64 / 1e6).max(1e-6);
    let acked_n = acked.len() as u64;
    let deliveries = shared.live.delivered.load(Ordering::Relaxed);
    let proc_report =
        |label: &str, pid: u32, before: Option<ProcSample>, after: Option<ProcSample>| {
            let (Some(b), Some(a)) = (before, after) else {
                return None;
            };
            let cpu = (a.cpu_secs - b.cpu_secs).max(0.0);
            Some(ProcReport {
                label: label.to_string(),
                pid,
                cpu_s: cpu,
                cores: cpu / load_wall.max(1e-6),
                cpu_us_per_msg: if acked_n > 0 {
                    cpu * 1e6 / acked_n as f64
                } else {
                    0.0
                },
                peak_rss_mib: a.peak_rss_kib as f64 / 1024.0,
            })
        };
    let nodes_report = watched
        .iter()
        .zip(cpu_before.into_iter().zip(cpu_after))
        .filter_map(|((label, pid), (b, a))| proc_report(label, *pid, b, a))
        .collect();
    let sub_errors: Vec<&String> = logs.iter().filter_map(|l| l.error.as_ref()).collect();
    Ok(Report {
        config: ConfigEcho {
            targets: targets.iter().map(ToString::to_string).collect(),
            started_node,
            nodes_started,
            notes,
            rooms: args.rooms,
            senders: args.senders,
            rooms_per_sender: per_sender,
            subscribers_per_room: args.subscribers_per_room,
            subscribers: n_subs,
            size: args.size,
            duration_s: if args.messages.is_none() {
                Some(args.send_window().as_secs_f64())
            } else {
                None
            },
            messages: args.messages,
            rate: args.rate,
            inflight: args.inflight,
            write_quorum,
            drain_s: args.drain.as_secs_f64(),
        },
        unix_time_s: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        setup_s,
        load_wall_s: load_wall,
        acked: acked_n,
        acked_per_s: acked_n as f64 / window(shared.live.last_ack_us.load(Ordering::Relaxed)),
        send_errors: errors_by_code.values().sum(),
        send_errors_by_code: errors_by_code,
        send_error_samples: error_samples,
        unsent,
        deliveries,
        deliveries_per_s: deliveries as f64
            / window(shared.live.last_delivery_us.load(Ordering::Relaxed)),
        delivery_check: check,
        ack_latency: LatencySummary::of(&ack),
        delivery_latency: LatencySummary::of(&delivery),
        subscriber_stream_errors: sub_errors.len() as u64,
        subscriber_error_sample: sub_errors.first().map(|s| s.to_string()),
        foreign_messages: logs.iter().map(|l| l.foreign).sum(),
        nodes: nodes_report,
        client: proc_report(
            "testnet (client)",
            std::process::id(),
            self_before,
            self_after,
        ),
        timeline: timeline.points(),
    })
}

/// How long deliveries must stay still before a drain that cannot trust its count ends.
const DRAIN_QUIET: Duration = Duration::from_secs(2);

/// Waits until the subscribers have `expected` deliveries, or for `within`. The live count
/// also holds deliveries of sends that failed but were written (an error that says
/// "may have been written"), so when any send failed (`uncertain`) reaching the count
/// proves nothing: the drain then also waits for deliveries to stop arriving for
/// [`DRAIN_QUIET`], and the check afterwards compares the acknowledged sends one by one.
pub(crate) async fn drain(
    delivered: &std::sync::atomic::AtomicU64,
    expected: u64,
    uncertain: bool,
    within: Duration,
) {
    use tokio::time::Instant;
    let until = Instant::now() + within;
    let mut last = (delivered.load(Ordering::Relaxed), Instant::now());
    while Instant::now() < until {
        let now = delivered.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        }
        if now >= expected && (!uncertain || last.1.elapsed() >= DRAIN_QUIET) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_at_the_count_unless_failed_sends_may_inflate_it() {
        use std::sync::atomic::AtomicU64;
        use tokio::time::Instant;
        let within = Duration::from_secs(60);

        // No send failed: the count is exact, so reaching it ends the drain.
        let delivered = Arc::new(AtomicU64::new(10));
        let t = Instant::now();
        drain(&delivered, 10, false, within).await;
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );

        // Some failed: deliveries still arriving keep it going until they stop.
        let late = {
            let delivered = delivered.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let t = Instant::now();
        drain(&delivered, 10, true, within).await;
        let waited = t.elapsed();
        late.await.unwrap();
        assert_eq!(delivered.load(Ordering::Relaxed), 20);
        assert!(
            waited >= Duration::from_secs(5) + DRAIN_QUIET && waited < Duration::from_secs(8),
            "{waited:?}"
        );

        // Never reached: it gives up at its bound.
        let t = Instant::now();
        drain(&delivered, 100, false, Duration::from_secs(3)).await;
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_secs(3) && waited < Duration::from_secs(4),
            "{waited:?}"
        );
    }

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied())).map(|c| c.bench)
    }

    #[test]
    fn plain_bench_is_the_load_mode() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.mode(), Mode::Load);
        a.validate().unwrap();
    }

    #[test]
    fn sweeps_parse_as_lists_and_override_the_plain_flags() {
        let a = parse(&["--sweep-senders", "1,16", "--sweep-write-quorum", "1,2"]).unwrap();
        assert_eq!(a.sweep_senders, vec![1, 16]);
        assert_eq!(
            a.mode(),
            Mode::Sweep(vec![(1, 1), (1, 16), (2, 1), (2, 16)])
        );
        let a = parse(&["--sweep-senders", "4,8", "--write-quorum", "2"]).unwrap();
        assert_eq!(a.mode(), Mode::Sweep(vec![(2, 4), (2, 8)]));
        // Each point gets the whole send phase, so the hard cap scales with the points.
        assert_eq!(
            a.hard_timeout(),
            parse(&["--write-quorum", "2"]).unwrap().hard_timeout() * 2
        );
    }

    #[test]
    fn a_message_count_sends_for_10_minutes_or_until_the_timeout_leaves_room_to_finish() {
        let a = parse(&["--messages", "1000000"]).unwrap();
        assert_eq!(a.send_bound(), Duration::from_secs(600));
        let a = parse(&["--messages", "1000000", "--timeout", "75m"]).unwrap();
        // 75 min less 3 min of setup, the 5 s drain and the 10 s RPC deadline.
        assert_eq!(a.send_bound(), Duration::from_secs(75 * 60 - 180 - 5 - 10));
        assert_eq!(a.hard_timeout(), Duration::from_secs(75 * 60));
        let a = parse(&["--messages", "10", "--timeout", "1m"]).unwrap();
        assert_eq!(a.send_bound(), Duration::from_secs(1));
        // A duration bounds a closed loop by itself; the timeout does not stretch it.
        let a = parse(&["--duration", "20s", "--timeout", "75m"]).unwrap();
        assert_eq!(a.send_bound(), Duration::from_secs(20));
    }

    #[test]
    fn clients_mode_and_its_conflicts() {
        let a = parse(&["--clients", "200", "--rooms", "10"]).unwrap();
        assert_eq!(a.mode(), Mode::Clients(200));
        assert_eq!(a.probe_messages, 2);
        assert!(parse(&["--clients", "10", "--sweep-senders", "1"]).is_err());
        assert!(parse(&["--clients", "10", "--plot", "x.svg"]).is_err());
        assert!(parse(&["--sweep-senders", "1", "--plot", "x.svg"]).is_err());
        assert!(parse(&["--clients", "0"]).unwrap().validate().is_err());
        assert!(parse(&["--sweep-senders", "0,4"])
            .unwrap()
            .validate()
            .is_err());
        assert!(parse(&["--sweep-write-quorum", "0"])
            .unwrap()
            .validate()
            .is_err());
        assert!(parse(&["--sweep-senders", "x"]).is_err());
    }
}
