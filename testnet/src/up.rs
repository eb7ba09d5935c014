//! `testnet up`: start local nodes, print where they listen, stay in the foreground.
//!
//! For now every node is an independent single-node cluster; forming one cluster
//! (`--join`, `--bootstrap-expect`) arrives with discovery in a later issue.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::nodes::{self, NodeProc};

const MAX_NODES: usize = 16;

/// Start N local `parley serve` processes on 127.0.0.1 (ports chosen by the OS).
///
/// NOTE: for now the nodes are independent single-node clusters; clustering them
/// (one cluster over N nodes) arrives in a later issue. Ctrl-C stops every node.
#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Nodes to start (each its own single-node cluster for now).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Where node data and logs live (DIR/node-N/, DIR/node-N.log).
    #[arg(long, default_value = ".testnet")]
    dir: PathBuf,
    /// Delete the nodes' earlier data (DIR/node-1 .. DIR/node-N) before starting.
    #[arg(long)]
    fresh: bool,
    /// The `parley` binary (default: beside this executable).
    #[arg(long, value_name = "PATH")]
    parley: Option<PathBuf>,
}

pub async fn run(args: UpArgs) -> Result<ExitCode> {
    if args.nodes == 0 || args.nodes > MAX_NODES {
        bail!("--nodes must be between 1 and {MAX_NODES}");
    }
    let parley = nodes::find_parley(args.parley.as_deref())?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let mut running: Vec<NodeProc> = Vec::new();
    for i in 1..=args.nodes {
        let name = format!("node-{i}");
        let data = dir.join(&name);
        let log = dir.join(format!("{name}.log"));
        if args.fresh && data.exists() {
            std::fs::remove_dir_all(&data)
                .with_context(|| format!("removing {}", data.display()))?;
        }
        let started = tokio::select! {
            r = nodes::start(&name, &parley, &data, &log) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        match started {
            Ok(n) => running.push(n),
            Err(e) => {
                stop_all(&mut running).await;
                return Err(e);
            }
        }
    }

    println!(
        "{:<8} {:>20} {:>8} {:<22} {:<22} data",
        "node", "id", "pid", "gRPC", "HTTP"
    );
    for n in &running {
        println!(
            "{:<8} {:>20} {:>8} {:<22} {:<22} {}",
            n.name,
            n.bound.node_id,
            n.pid(),
            n.bound.grpc.to_string(),
            n.bound
                .http
                .map(|h| h.to_string())
                .unwrap_or_else(|| "-".into()),
            n.data_dir.display()
        );
    }
    if let Some(first) = running.first() {
        println!();
        println!("export PARLEY_NODE={}", first.bound.grpc);
    }
    if args.nodes > 1 {
        println!("(independent single-node clusters for now: clustering arrives in a later issue)");
    }
    println!("Ctrl-C stops every node.");

    let mut exited = vec![false; running.len()];
    let mut code = ExitCode::SUCCESS;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for (i, n) in running.iter_mut().enumerate() {
            if exited[i] {
                continue;
            }
            if let Some(status) = n.exited() {
                exited[i] = true;
                code = ExitCode::FAILURE;
                eprintln!(
                    "{} (pid {}) exited: {status}; last log lines ({}):\n{}",
                    n.name,
                    n.pid(),
                    n.log.display(),
                    nodes::log_tail(&n.log, 10)
                );
            }
        }
        if exited.iter().all(|e| *e) {
            eprintln!("every node has exited");
            break;
        }
    }
    stop_all(&mut running).await;
    println!("data and logs are in {}", dir.display());
    Ok(code)
}

async fn stop_all(nodes: &mut [NodeProc]) {
    for n in nodes.iter_mut() {
        match n.stop().await {
            Ok(status) => eprintln!("stopped {} (pid {}): {status}", n.name, n.pid()),
            Err(e) => eprintln!("stopping {} (pid {}): {e:#}", n.name, n.pid()),
        }
    }
}
