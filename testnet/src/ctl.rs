//! `testnet status | down | kill | start`: act on a testnet from any shell, through
//! the PIDs and flags saved in `DIR/testnet.json`.
//!
//! A saved PID is signalled only while `/proc/PID/cmdline` still shows our `parley
//! serve --data-dir <that node's dir>`; a node restarted with `start` runs detached
//! (its own process group, output appended to its log) and a running `testnet up`
//! reports it as restarted by hand.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use serde_json::json;

use crate::cluster::{self, Layout};

#[derive(Args, Debug, Clone)]
pub struct DirArgs {
    /// The testnet directory (as given to `testnet up`).
    #[arg(long, default_value = ".testnet")]
    pub dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    dir: DirArgs,
    /// One JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct KillArgs {
    /// Node id (1..N).
    node: u64,
    #[command(flatten)]
    dir: DirArgs,
    /// Signal name or number (KILL, TERM, STOP, CONT, 9, ...).
    #[arg(long, default_value = "9")]
    signal: String,
}

#[derive(Args, Debug, Clone)]
pub struct StartArgs {
    /// Node id (1..N).
    node: u64,
    #[command(flatten)]
    dir: DirArgs,
    /// The `parley` binary (default: the one saved in testnet.json).
    #[arg(long, value_name = "PATH")]
    parley: Option<PathBuf>,
    /// How long to wait for the node to serve and the cluster to be healthy again.
    #[arg(long, value_parser = crate::duration::parse, default_value = "60s")]
    timeout: Duration,
}

/// `testnet status`: per node PID alive / gRPC reachable, then ClusterStatus as a live
/// node sees it. Exit 0 only when every node runs and the cluster is healthy.
pub async fn status(args: StatusArgs) -> Result<ExitCode> {
    let layout = Layout::load(&args.dir.dir)?;
    let n = layout.nodes.len();
    let views = futures::future::join_all(
        layout
            .nodes
            .iter()
            .map(|s| cluster::cluster_status(s.grpc, Duration::from_secs(2))),
    )
    .await;
    let mut rows = Vec::new();
    let mut all_up = true;
    let mut view = None;
    for (spec, v) in layout.nodes.iter().zip(views) {
        let running = spec.pid.is_some_and(|p| cluster::is_our_node(p, spec));
        let reachable = v.is_ok();
        all_up &= running && reachable;
        let error = v.as_ref().err().map(|e| format!("{e:#}"));
        if let Ok(st) = v {
            view.get_or_insert(st);
        }
        rows.push((spec, running, reachable, error));
    }
    let healthy = view.as_ref().map(|st| cluster::unhealthy(st, n));
    if args.json {
        let nodes: Vec<_> = rows
            .iter()
            .map(|(s, running, reachable, error)| {
                json!({"id": s.id, "pid": s.pid, "running": running, "reachable": reachable,
                    "grpc": s.grpc.to_string(), "http": s.http.to_string(), "p2p": s.p2p,
                    "data_dir": s.data_dir, "error": error})
            })
            .collect();
        let cs = view.as_ref().map(|st| {
            json!({"seen_from": st.node_id, "cluster": st.cluster,
                "nodes": st.nodes.iter().map(|x| json!({"id": x.node_id, "alive": x.alive, "grpc": x.grpc_addr})).collect::<Vec<_>>(),
                "groups": st.groups.iter().map(|g| json!({"group": cluster::group_name(g.group), "leader": g.leader, "term": g.term, "voters": g.voters, "applied_index": g.applied_index})).collect::<Vec<_>>()})
        });
        let out = json!({"dir": layout.dir, "cluster": layout.cluster, "nodes": nodes,
            "cluster_status": cs,
            "healthy": all_up && matches!(healthy, Some(None)),
            "problem": healthy.clone().flatten()});
        println!("{out}");
    } else {
        println!(
            "testnet {} (cluster {}, {n} nodes)",
            layout.dir.display(),
            layout.cluster
        );
        println!(
            "  {:<5} {:>8} {:<8} {:<22} {:<10} note",
            "node", "pid", "running", "gRPC", "reachable"
        );
        for (s, running, reachable, error) in &rows {
            println!(
                "  {:<5} {:>8} {:<8} {:<22} {:<10} {}",
                s.id,
                s.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                if *running { "yes" } else { "no" },
                s.grpc.to_string(),
                if *reachable { "yes" } else { "no" },
                error.as_deref().unwrap_or("")
            );
        }
        println!();
        match &view {
            Some(st) => print!("{}", cluster::status_table(st)),
            None => println!("no node answers ClusterStatus"),
        }
        match (&healthy, all_up) {
            (Some(None), true) => println!("healthy: every node runs, all alive, every group led"),
            (Some(Some(why)), _) => println!("NOT healthy: {why}"),
            (_, false) => println!("NOT healthy: some node is down"),
            (None, _) => println!("NOT healthy: no node answers"),
        }
    }
    Ok(if all_up && matches!(healthy, Some(None)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `testnet down`: SIGTERM every running node (by its saved PID, only if still ours),
/// SIGKILL after 5 s.
pub async fn down(args: DirArgs) -> Result<ExitCode> {
    let mut layout = Layout::load(&args.dir)?;
    let targets: Vec<(cluster::NodeSpec, u32)> = layout
        .nodes
        .iter()
        .filter_map(|s| s.pid.map(|p| (s.clone(), p)))
        .collect();
    // Record first, so a watching `testnet up` knows these exits are intended.
    for n in &mut layout.nodes {
        n.pid = None;
    }
    layout.save()?;
    let results =
        futures::future::join_all(targets.iter().map(|(spec, pid)| async move {
            (spec.id, *pid, cluster::stop_pid(*pid, spec).await)
        }))
        .await;
    let mut code = ExitCode::SUCCESS;
    for (id, pid, r) in results {
        match r {
            Ok(how) => println!("node {id} (pid {pid}): {how}"),
            Err(e) => {
                code = ExitCode::FAILURE;
                println!("node {id} (pid {pid}): {e:#}");
            }
        }
    }
    if targets.is_empty() {
        println!("no node of {} was running", layout.dir.display());
    }
    println!("data and logs stay in {}", layout.dir.display());
    Ok(code)
}

/// `testnet kill NODE`: send a signal (default SIGKILL) to one node by its saved PID.
pub async fn kill(args: KillArgs) -> Result<ExitCode> {
    let layout = Layout::load(&args.dir.dir)?;
    let spec = layout.node(args.node)?;
    let Some(pid) = spec.pid.filter(|p| cluster::is_our_node(*p, spec)) else {
        bail!("node {} is not running", args.node);
    };
    cluster::signal(pid, &args.signal)?;
    println!("sent SIG{} to node {} (pid {pid})", args.signal, args.node);
    Ok(ExitCode::SUCCESS)
}

/// `testnet start NODE`: start one node again, detached, with its saved ports and
/// flags; waits until it serves and the cluster is healthy.
pub async fn start(args: StartArgs) -> Result<ExitCode> {
    let mut layout = Layout::load(&args.dir.dir)?;
    let spec = layout.node(args.node)?.clone();
    if let Some(pid) = spec.pid.filter(|p| cluster::is_our_node(*p, &spec)) {
        bail!("node {} is already running (pid {pid})", args.node);
    }
    for port in [spec.grpc.port(), spec.http.port()] {
        if !cluster::port_free(port) {
            bail!(
                "node {}'s port {port} is taken by another process",
                args.node
            );
        }
    }
    let parley = match &args.parley {
        Some(p) => p.clone(),
        None => layout.parley.clone(),
    };
    let _ = std::fs::remove_file(spec.data_dir.join("node.json"));
    let mut child = cluster::spawn(&parley, &spec)?;
    let pid = child.id();
    layout.node_mut(args.node)?.pid = Some(pid);
    layout.save()?;
    let served = cluster::wait_bound(&spec, pid, args.timeout, || {
        child.try_wait().ok().flatten().map(|s| s.to_string())
    })
    .await;
    if let Err(e) = served {
        if child.try_wait().ok().flatten().is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        return Err(e);
    }
    println!(
        "node {} started (pid {pid}), gRPC {}, log {}",
        args.node,
        spec.grpc,
        spec.log.display()
    );
    // Detached: dropping the handle leaves the node running (std never kills on drop).
    drop(child);
    let n = layout.nodes.len();
    let running: Vec<_> = layout
        .nodes
        .iter()
        .filter(|s| s.pid.is_some_and(|p| cluster::is_our_node(p, s)))
        .map(|s| s.grpc)
        .collect();
    match cluster::wait_healthy(&running, n, args.timeout).await {
        Ok(_) => println!("cluster healthy: all {n} nodes alive, every group led"),
        Err(e) => println!("started, but {e:#}"),
    }
    Ok(ExitCode::SUCCESS)
}
