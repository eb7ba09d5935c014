//! `testnet`: local Parley clusters, failover measurements and the load generators.
//!
//! - [`up`]: start N `parley serve` processes forming one cluster, print their
//!   addresses, stay in the foreground until Ctrl-C.
//! - [`demo`]: a narrated end-to-end run on a fresh 3-node cluster, checked step by step.
//! - [`ctl`]: `status`, `down`, `kill`, `start` on a running testnet from any shell.
//! - [`cluster`]: the layout saved in `DIR/testnet.json` (fixed ports, flags, PIDs),
//!   node processes by PID, ClusterStatus polling and readiness.
//! - [`failover`]: kill partition leaders, time the new leader and the first write.
//! - [`raft_bench`]: Raft-backed operations per second (JoinRoom/LeaveRoom pairs).
//! - [`partitions`]: room names per partition, membership writes.
//! - [`bench`](mod@bench): the group-chat load benchmark (acked sends, subscriber fan-out,
//!   latency histograms, lost and duplicate deliveries, node CPU and memory).
//! - [`nodes`]: the `parley` binary, single child processes, CPU and memory from `/proc`.
//! - [`duration`]: `30s` / `500ms` / `2m` command-line durations.

mod bench;
mod cluster;
mod ctl;
mod demo;
mod duration;
mod failover;
mod nodes;
mod partitions;
mod raft_bench;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "testnet",
    version,
    about = "Local Parley clusters, failover measurements and load benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start an N-node cluster (default 3) and stay in the foreground until Ctrl-C.
    ///
    /// Ports: gRPC BASE+i-1, HTTP BASE+80+i-1, p2p BASE+100+i-1 (BASE 7100), saved in
    /// DIR/testnet.json; an existing DIR restarts the same cluster from its data.
    Up(up::UpArgs),
    /// Per node: PID running, gRPC reachable; then the cluster as a live node sees it.
    /// Exit 0 only when every node runs and the cluster is healthy.
    Status(ctl::StatusArgs),
    /// Stop every node of a testnet (SIGTERM, SIGKILL after 5 s), by saved PID.
    Down(ctl::DirArgs),
    /// Send a signal (default 9) to one node, by saved PID.
    Kill(ctl::KillArgs),
    /// Start one node again (detached) with its saved ports and flags.
    Start(ctl::StartArgs),
    /// Kill partition leaders (kill -9) and time the new leader and the first write.
    Failover(failover::FailoverArgs),
    /// Raft-backed operations per second (JoinRoom/LeaveRoom pairs) on a cluster.
    RaftBench(raft_bench::RaftBenchArgs),
    /// Group-chat load benchmark against a fresh cluster or running nodes.
    Bench(Box<bench::BenchArgs>),
    /// A narrated end-to-end run on a fresh 3-node cluster (temp dir, free ports):
    /// three users on three nodes chat in one room, node 1 is killed with kill -9 and
    /// restarted, every step is checked. Exit 0 only when every check passes.
    Demo(demo::DemoArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Before any node is spawned: children inherit the raised limit.
    if let Err(e) = nodes::raise_nofile_limit() {
        eprintln!("testnet: could not raise the open-file limit: {e}");
    }
    let result = match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Status(args) => ctl::status(args).await,
        Command::Down(args) => ctl::down(args).await,
        Command::Kill(args) => ctl::kill(args).await,
        Command::Start(args) => ctl::start(args).await,
        Command::Failover(args) => failover::run(args).await,
        Command::RaftBench(args) => raft_bench::run(args).await,
        Command::Bench(args) => bench::run(*args).await,
        Command::Demo(args) => demo::run(args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("testnet: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
