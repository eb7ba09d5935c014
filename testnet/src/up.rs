//! `testnet up`: start N `parley serve` processes forming one cluster, wait until it is
//! ready, print where the nodes listen, stay in the foreground until Ctrl-C.
//!
//! The layout (ports, flags, PIDs) goes to `DIR/testnet.json`; without `--fresh` an
//! existing DIR restarts the same cluster from its data on the same ports. Nodes that
//! exit are reported once and not restarted; `testnet start NODE` (another shell)
//! restarts one detached, and `up` reports it as restarted by hand and stops it on
//! Ctrl-C with the others.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::cluster::{self, Layout, Proc, MAX_NODES};
use crate::nodes;

#[derive(Args, Debug, Clone)]
pub struct UpArgs {
    /// Nodes in the cluster (default 3; an existing DIR keeps its own count).
    #[arg(long)]
    nodes: Option<usize>,
    /// Where node data, logs and testnet.json live (DIR/nodeN/, DIR/nodeN.log).
    #[arg(long, default_value = ".testnet")]
    dir: PathBuf,
    /// Delete the earlier cluster in DIR (its node dirs, logs and testnet.json) first.
    #[arg(long)]
    fresh: bool,
    /// The `parley` binary (default: beside this executable).
    #[arg(long, value_name = "PATH")]
    parley: Option<PathBuf>,
    /// gRPC on BASE+i-1, HTTP on BASE+80+i-1, p2p on BASE+100+i-1; 0 = free ports
    /// (chosen once, kept in testnet.json).
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
    /// How long to wait for the cluster to form (every node serving, all alive, every
    /// Raft group led).
    #[arg(long, value_parser = crate::duration::parse, default_value = "90s")]
    timeout: Duration,
    /// Extra `parley serve` flags for a fresh cluster, after `--`
    /// (e.g. `-- --partitions 8 --write-quorum 1`).
    #[arg(last = true, value_name = "SERVE_FLAGS")]
    serve_flags: Vec<String>,
}

pub async fn run(args: UpArgs) -> Result<ExitCode> {
    let parley = nodes::find_parley(args.parley.as_deref())?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = args.dir.canonicalize()?;
    let mut layout = prepare(&args, &dir, &parley)?;
    layout.up_pid = Some(std::process::id());
    let n = layout.nodes.len();

    // Start every node at once: a fresh cluster forms only when all N have met.
    let mut procs: Vec<Option<Proc>> = Vec::with_capacity(n);
    for spec in &mut layout.nodes {
        let _ = std::fs::remove_file(spec.data_dir.join("node.json"));
        let p = Proc::spawn(&layout.parley, spec)?;
        spec.pid = Some(p.pid);
        procs.push(Some(p));
    }
    layout.save()?;
    eprintln!(
        "starting {n} node(s) of cluster {} in {} (logs: {}/node<i>.log)",
        layout.cluster,
        dir.display(),
        dir.display()
    );
    let ready = tokio::select! {
        r = wait_ready(&mut layout, &mut procs, args.timeout) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted while starting")),
    };
    if let Err(e) = ready {
        stop_all(&mut layout, &mut procs, &BTreeMap::new()).await;
        return Err(e);
    }

    println!(
        "{:<5} {:<22} {:<22} {:<28} {:>8}  data",
        "node", "gRPC", "HTTP", "p2p", "pid"
    );
    for (spec, p) in layout.nodes.iter().zip(&procs) {
        println!(
            "{:<5} {:<22} {:<22} {:<28} {:>8}  {}",
            spec.id,
            spec.grpc.to_string(),
            spec.http.to_string(),
            spec.p2p,
            p.as_ref().map(|p| p.pid.to_string()).unwrap_or_default(),
            spec.data_dir.display()
        );
    }
    println!();
    println!("export PARLEY_NODE={}", layout.nodes[0].grpc);
    println!(
        "cluster ready: {n} node(s) alive, every Raft group has a leader. Ctrl-C stops every node."
    );
    println!(
        "(from another shell: testnet status|kill N|start N|down --dir {})",
        dir.display()
    );

    let code = watch(&mut layout, &mut procs).await;
    Ok(code)
}

/// The layout to start: the saved one (same ports and flags), or a fresh plan.
fn prepare(args: &UpArgs, dir: &std::path::Path, parley: &std::path::Path) -> Result<Layout> {
    let state = Layout::state_file(dir);
    let existing = if state.exists() {
        Some(Layout::load(dir)?)
    } else {
        None
    };
    if let Some(old) = &existing {
        if let Some(up) = old.up_pid.filter(|p| *p != std::process::id()) {
            let is_up = cluster::pid_alive(up)
                && cluster::cmdline(up).is_some_and(|a| {
                    a.first().is_some_and(|x| x.ends_with("testnet")) && a.iter().any(|x| x == "up")
                });
            if is_up {
                bail!(
                    "another `testnet up` (pid {up}) holds {}; stop it first",
                    dir.display()
                );
            }
        }
        let running = old.running();
        if !running.is_empty() {
            let list: Vec<String> = running
                .iter()
                .map(|(id, pid)| format!("node {id} pid {pid}"))
                .collect();
            bail!(
                "nodes of {} are still running ({}); run `testnet down --dir {}` first",
                dir.display(),
                list.join(", "),
                dir.display()
            );
        }
    }
    match existing {
        Some(old) if !args.fresh => {
            if let Some(n) = args.nodes.filter(|n| *n != old.nodes.len()) {
                bail!(
                    "{} holds a {}-node cluster, not {n}; pass --fresh to start a new one",
                    dir.display(),
                    old.nodes.len()
                );
            }
            if !args.serve_flags.is_empty() {
                bail!("extra serve flags apply to a fresh cluster only (pass --fresh)");
            }
            let mut layout = old;
            for spec in &layout.nodes {
                let (g, h) = (spec.grpc.port(), spec.http.port());
                if !cluster::port_free(g) || !cluster::port_free(h) {
                    bail!(
                        "node {}'s port {g} or {h} is taken by another process; the cluster must restart on its own ports",
                        spec.id
                    );
                }
            }
            layout.parley = parley.to_path_buf();
            eprintln!(
                "restarting the {}-node cluster in {} from its data (same ports)",
                layout.nodes.len(),
                dir.display()
            );
            Ok(layout)
        }
        old => {
            let n = args.nodes.unwrap_or(3);
            if n == 0 || n > MAX_NODES {
                bail!("--nodes must be between 1 and {MAX_NODES}");
            }
            if args.fresh {
                // Only what a testnet put there: node dirs and logs, never DIR itself.
                let count = old.as_ref().map_or(0, |o| o.nodes.len()).max(n);
                for i in 1..=count {
                    let data = dir.join(format!("node{i}"));
                    if data.exists() {
                        std::fs::remove_dir_all(&data)
                            .with_context(|| format!("removing {}", data.display()))?;
                    }
                    let _ = std::fs::remove_file(dir.join(format!("node{i}.log")));
                }
                let _ = std::fs::remove_file(&state);
            } else if (1..=n).any(|i| dir.join(format!("node{i}")).exists()) {
                bail!(
                    "{} has node data but no {}; pass --fresh to start over",
                    dir.display(),
                    cluster::STATE_FILE
                );
            }
            Layout::plan(dir, parley, n, args.base_port, &args.serve_flags)
        }
    }
}

/// Waits for each node's `node.json`, then for a healthy cluster.
async fn wait_ready(
    layout: &mut Layout,
    procs: &mut [Option<Proc>],
    within: Duration,
) -> Result<()> {
    for (spec, p) in layout.nodes.iter().zip(procs.iter_mut()) {
        if let Some(p) = p {
            p.wait_serving(spec, within).await?;
        }
    }
    let first = [layout.nodes[0].grpc];
    let n = layout.nodes.len();
    cluster::wait_healthy_while(&first, n, within, || {
        layout
            .nodes
            .iter()
            .zip(procs.iter_mut())
            .find_map(|(spec, p)| {
                let status = p.as_mut()?.exited()?;
                Some(format!(
                    "node {} exited: {status}; last lines of {}:\n{}",
                    spec.id,
                    spec.log.display(),
                    nodes::log_tail(&spec.log, 15)
                ))
            })
    })
    .await
    .map(|_| ())
}

/// What `up` knows about a node while it watches.
enum Watched {
    /// Our child.
    Child(Proc),
    /// Started by `testnet start` from another shell: watched by PID.
    External(u32),
    /// Exited (reported once).
    Gone,
}

/// Stays in the foreground: reports exits once, notices nodes restarted by hand, and
/// on Ctrl-C (or when every node is gone) stops what still runs.
async fn watch(layout: &mut Layout, procs: &mut Vec<Option<Proc>>) -> ExitCode {
    let mut state: Vec<Watched> = procs
        .drain(..)
        .map(|p| p.map_or(Watched::Gone, Watched::Child))
        .collect();
    let mut code = ExitCode::SUCCESS;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        // Another shell may have run `testnet start` or `testnet down`.
        let saved = Layout::load(&layout.dir).ok();
        for (i, w) in state.iter_mut().enumerate() {
            let spec = &layout.nodes[i];
            let saved_pid = saved
                .as_ref()
                .and_then(|s| s.nodes.get(i))
                .and_then(|n| n.pid);
            match w {
                Watched::Child(p) => {
                    if let Some(status) = p.exited() {
                        if saved_pid.is_none() {
                            eprintln!(
                                "node {} (pid {}) stopped by `testnet down`: {status}",
                                spec.id, p.pid
                            );
                        } else {
                            code = ExitCode::FAILURE;
                            eprintln!(
                                "node {} (pid {}) exited: {status}; not restarting it (`testnet start {} --dir {}` does). Last lines of {}:\n{}",
                                spec.id,
                                p.pid,
                                spec.id,
                                layout.dir.display(),
                                spec.log.display(),
                                nodes::log_tail(&spec.log, 5)
                            );
                        }
                        *w = Watched::Gone;
                    }
                }
                Watched::External(pid) => {
                    if !cluster::pid_alive(*pid) {
                        if saved_pid.is_none() {
                            eprintln!(
                                "node {} (pid {pid}, started by hand) stopped by `testnet down`",
                                spec.id
                            );
                        } else {
                            code = ExitCode::FAILURE;
                            eprintln!("node {} (pid {pid}, started by hand) exited", spec.id);
                        }
                        *w = Watched::Gone;
                    }
                }
                Watched::Gone => {
                    if let Some(pid) = saved_pid.filter(|p| cluster::is_our_node(*p, spec)) {
                        eprintln!(
                            "node {} restarted by hand (pid {pid}); watching it and stopping it on Ctrl-C",
                            spec.id
                        );
                        *w = Watched::External(pid);
                    }
                }
            }
        }
        if state.iter().all(|w| matches!(w, Watched::Gone)) {
            eprintln!("every node has exited");
            break;
        }
    }
    let mut external = BTreeMap::new();
    let mut held: Vec<Option<Proc>> = Vec::with_capacity(state.len());
    for (i, w) in state.into_iter().enumerate() {
        match w {
            Watched::Child(p) => held.push(Some(p)),
            Watched::External(pid) => {
                external.insert(i, pid);
                held.push(None);
            }
            Watched::Gone => held.push(None),
        }
    }
    stop_all(layout, &mut held, &external).await;
    code
}

/// Stops our children and the hand-started nodes (by PID, after checking they are
/// still our nodes), records that nothing runs, and says where the data is.
async fn stop_all(
    layout: &mut Layout,
    procs: &mut [Option<Proc>],
    external: &BTreeMap<usize, u32>,
) {
    let stops = procs.iter_mut().enumerate().map(|(i, p)| {
        let spec = layout.nodes[i].clone();
        let ext = external.get(&i).copied();
        async move {
            match (p, ext) {
                (Some(p), _) => {
                    let pid = p.pid;
                    match p.stop().await {
                        Ok(s) => eprintln!("stopped node {} (pid {pid}): {s}", spec.id),
                        Err(e) => eprintln!("stopping node {} (pid {pid}): {e:#}", spec.id),
                    }
                }
                (None, Some(pid)) => match cluster::stop_pid(pid, &spec).await {
                    Ok(how) => eprintln!("node {} (pid {pid}): {how}", spec.id),
                    Err(e) => eprintln!("stopping node {} (pid {pid}): {e:#}", spec.id),
                },
                (None, None) => {}
            }
        }
    });
    futures::future::join_all(stops).await;
    for n in &mut layout.nodes {
        n.pid = None;
    }
    layout.up_pid = None;
    if let Err(e) = layout.save() {
        eprintln!("{e:#}");
    }
    println!(
        "data and logs are in {} (`testnet up --dir {}` restarts this cluster)",
        layout.dir.display(),
        layout.dir.display()
    );
}
