//! `testnet failover`: how fast a partition recovers when its Raft leader is killed.
//!
//! A fresh cluster (temp dir, free ports), one room per partition. Then, `--kills`
//! times: pick a partition (round-robin), find its leader (the highest term any node
//! reports), `kill -9` it, and measure from the kill
//! - (a) until a surviving node's ClusterStatus names a different leader for that
//!   group (polled every 20 ms on every survivor), and
//! - (b) until a membership write (`JoinRoom`/`LeaveRoom` of that partition's room)
//!   goes through a surviving node (a new attempt every 20 ms, each with its own
//!   deadline, so one hung attempt does not hide a later success);
//!
//! then restart the killed node on its data dir and ports and wait until the cluster
//! is healthy again (every node alive, every group led) before the next kill.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::bench::setup::{self, User};
use crate::cluster::{self, Layout, Running};
use crate::nodes;
use crate::partitions::{self, Op, Outcome};

#[derive(Args, Debug, Clone)]
pub struct FailoverArgs {
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Leader kills.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// The `parley` binary (default: beside this executable).
    #[arg(long, value_name = "PATH")]
    parley: Option<PathBuf>,
    /// Give up on one measurement after this long.
    #[arg(long, value_parser = crate::duration::parse, default_value = "30s")]
    measure_timeout: Duration,
    /// Deadline of each write attempt.
    #[arg(long, value_parser = crate::duration::parse, default_value = "2s")]
    attempt_timeout: Duration,
    /// Write every figure as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Keep the cluster's data directory.
    #[arg(long)]
    keep: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct KillRow {
    pub kill: usize,
    pub partition: u32,
    pub victim: u64,
    pub old_term: u64,
    pub new_leader: u64,
    pub new_term: u64,
    /// Kill → a survivor reports another leader (ms).
    pub leader_ms: Option<f64>,
    /// Kill → first write through a survivor succeeds (ms).
    pub write_ms: Option<f64>,
    /// Failed write attempts before the first success.
    pub failed_attempts: u64,
    /// Restart of the victim → cluster healthy again (s).
    pub recovery_s: f64,
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Spread {
    pub count: usize,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    /// Nearest-rank percentiles of `v`.
    pub fn of(v: &[f64]) -> Spread {
        if v.is_empty() {
            return Spread::default();
        }
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let rank = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Spread {
            count: s.len(),
            median_ms: rank(0.5),
            p90_ms: rank(0.9),
            max_ms: s[s.len() - 1],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    pub nodes: usize,
    pub kills: usize,
    pub partitions: u32,
    pub poll_ms: u64,
    pub new_leader: Spread,
    pub first_write: Spread,
    pub leader_timeouts: usize,
    pub write_timeouts: usize,
    pub rows: Vec<KillRow>,
}

const POLL: Duration = Duration::from_millis(20);

pub async fn run(args: FailoverArgs) -> Result<ExitCode> {
    if args.nodes < 3 {
        bail!("--nodes must be at least 3 (a partition needs a majority after a kill)");
    }
    if args.kills == 0 {
        bail!("--kills must be at least 1");
    }
    let parley = nodes::find_parley(args.parley.as_deref())?;
    let tmp = tempfile::Builder::new()
        .prefix("parley-failover-")
        .tempdir()?;
    let layout = Layout::plan(tmp.path(), &parley, args.nodes, 0, &[])?;
    eprintln!(
        "starting a {}-node cluster in {}",
        args.nodes,
        tmp.path().display()
    );
    let mut running = Running::start(layout, Duration::from_secs(90)).await?;
    let outcome = tokio::select! {
        r = failover(&args, &mut running) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let died = running.exited();
    running.stop_all().await;
    if args.keep || outcome.is_err() {
        let kept = tmp.keep();
        eprintln!("cluster data and logs kept in {}", kept.display());
    }
    for (id, status) in died {
        eprintln!("node {id} exited on its own: {status}");
    }
    let report = outcome?;
    print!("{}", table(&report));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(if report.leader_timeouts + report.write_timeouts == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn failover(args: &FailoverArgs, running: &mut Running) -> Result<FailoverReport> {
    let addrs = running.layout.grpc_addrs();
    let n = addrs.len();
    let st = cluster::cluster_status(addrs[0], Duration::from_secs(5)).await?;
    let partitions = st.partitions.max(1);
    let run_id = format!("f{:06x}", rand::random::<u32>() & 0xff_ffff);

    // One room per partition, and one user who toggles its membership in each.
    let clients = {
        let mut v = Vec::new();
        for a in &addrs {
            v.push(setup::connect(*a, Some(args.attempt_timeout)).await?);
        }
        v
    };
    let hidden = ProgressBar::hidden();
    let users =
        setup::create_users(&clients[..1], &format!("{run_id}-u"), 2, |_| 0, 2, &hidden).await?;
    let (admin, prober) = match users.as_slice() {
        [a, p] => (a.clone(), p.clone()),
        _ => bail!("creating users"),
    };
    let names = partitions::room_names(&run_id, partitions, 1);
    let room_names: Vec<String> = names.iter().map(|(_, n)| n.clone()).collect();
    let ids = setup::create_rooms(&clients[0], &admin, &room_names, 0, 8, &hidden).await?;
    let room_of: Vec<String> = ids; // index = partition (one name per partition, in order)
    eprintln!(
        "{partitions} partitions, one room each; {} kills of a partition leader",
        args.kills
    );

    let pb = ProgressBar::new(args.kills as u64).with_style(
        ProgressStyle::with_template("failover [{bar:30}] {pos}/{len} {elapsed}  {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows = Vec::with_capacity(args.kills);
    for k in 0..args.kills {
        let p = (k as u32) % partitions;
        let group = p + 1;
        let (victim, old_term) = cluster::leader_of(&addrs, group).await;
        if victim == 0 {
            bail!("no leader known for partition {p} before kill {}", k + 1);
        }
        let vi = running.index(victim)?;
        let survivors: Vec<SocketAddr> = addrs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != vi)
            .map(|(_, a)| *a)
            .collect();
        let survivor_clients: Vec<_> = clients
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != vi)
            .map(|(_, c)| c.clone())
            .collect();

        running.kill9(victim).await?;
        let t0 = Instant::now();
        let leader = new_leader(&survivors, group, victim, t0, args.measure_timeout);
        let write = first_write(
            &survivor_clients,
            &prober,
            &room_of[p as usize],
            t0,
            args.measure_timeout,
            args.attempt_timeout,
        );
        let ((leader_ms, new_leader, new_term), (write_ms, failed_attempts)) =
            tokio::join!(leader, write);

        let r0 = Instant::now();
        running.restart(victim, Duration::from_secs(60)).await?;
        cluster::wait_healthy(&addrs, n, Duration::from_secs(60))
            .await
            .with_context(|| format!("after restarting node {victim} (kill {})", k + 1))?;
        let row = KillRow {
            kill: k + 1,
            partition: p,
            victim,
            old_term,
            new_leader,
            new_term,
            leader_ms,
            write_ms,
            failed_attempts,
            recovery_s: r0.elapsed().as_secs_f64(),
        };
        let show = |v: Option<f64>| v.map_or("timeout".to_string(), |v| format!("{v:.0} ms"));
        pb.set_message(format!(
            "p{p}: leader {victim}→{new_leader} in {}, write in {}",
            show(leader_ms),
            show(write_ms)
        ));
        pb.inc(1);
        if pb.is_hidden() {
            eprintln!(
                "kill {}/{}: p{p} leader {victim}→{new_leader}, new leader {}, write {}",
                k + 1,
                args.kills,
                show(leader_ms),
                show(write_ms)
            );
        }
        rows.push(row);
    }
    pb.finish_and_clear();
    let leaders: Vec<f64> = rows.iter().filter_map(|r| r.leader_ms).collect();
    let writes: Vec<f64> = rows.iter().filter_map(|r| r.write_ms).collect();
    Ok(FailoverReport {
        nodes: n,
        kills: rows.len(),
        partitions,
        poll_ms: POLL.as_millis() as u64,
        new_leader: Spread::of(&leaders),
        first_write: Spread::of(&writes),
        leader_timeouts: rows.len() - leaders.len(),
        write_timeouts: rows.len() - writes.len(),
        rows,
    })
}

/// Polls every survivor's ClusterStatus each 20 ms until one names a leader other
/// than `victim` for `group`. Returns (ms since `t0`, new leader, its term).
async fn new_leader(
    survivors: &[SocketAddr],
    group: u32,
    victim: u64,
    t0: Instant,
    within: Duration,
) -> (Option<f64>, u64, u64) {
    let clients: Vec<_> = survivors
        .iter()
        .filter_map(|a| cluster::status_client(*a, Duration::from_millis(500)).ok())
        .collect();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while t0.elapsed() < within {
        tick.tick().await;
        let asks = clients.iter().map(|c| {
            let mut c = c.clone();
            async move {
                c.cluster_status(parley_proto::v1::ClusterStatusRequest {})
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            }
        });
        for st in futures::future::join_all(asks).await.into_iter().flatten() {
            if let Some(g) = st
                .groups
                .iter()
                .find(|g| g.group == group && g.leader != 0 && g.leader != victim)
            {
                return (Some(ms(t0.elapsed())), g.leader, g.term);
            }
        }
    }
    (None, 0, 0)
}

/// Starts a membership write through a survivor every 20 ms (alternating survivors
/// and join/leave) until one goes through. Returns (ms since `t0`, failed attempts).
async fn first_write(
    survivors: &[parley_proto::v1::chat_client::ChatClient<tonic::transport::Channel>],
    user: &User,
    room: &str,
    t0: Instant,
    within: Duration,
    attempt_timeout: Duration,
) -> (Option<f64>, u64) {
    let deadline = tokio::time::Instant::from_std(t0 + within);
    let mut pending = FuturesUnordered::new();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut attempt: usize = 0;
    let mut failed = 0;
    // Bounded: at most within/POLL attempts start, each ends by its own deadline.
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return (None, failed),
            Some(outcome) = pending.next(), if !pending.is_empty() => {
                match outcome {
                    Outcome::Done | Outcome::Refused(_) => return (Some(ms(t0.elapsed())), failed),
                    Outcome::Failed(_) => failed += 1,
                }
            }
            _ = tick.tick() => {
                if survivors.is_empty() {
                    return (None, failed);
                }
                let c = &survivors[attempt % survivors.len()];
                let op = if attempt % 2 == 1 { Op::Leave } else { Op::Join };
                attempt += 1;
                pending.push(partitions::membership_write(c, user, room, op, attempt_timeout));
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn table(r: &FailoverReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "parley failover  ({} nodes, {} partitions, {} leader kills, kill -9, polled every {} ms)",
        r.nodes, r.partitions, r.kills, r.poll_ms
    );
    let _ = writeln!(
        s,
        "  {:>4} {:>5} {:>6} {:>6} {:>10} {:>10} {:>7} {:>9}",
        "kill", "part", "killed", "new", "leader ms", "write ms", "failed", "recover s"
    );
    let opt = |v: Option<f64>| v.map_or("timeout".into(), |v| format!("{v:.0}"));
    for row in &r.rows {
        let _ = writeln!(
            s,
            "  {:>4} {:>5} {:>6} {:>6} {:>10} {:>10} {:>7} {:>9.1}",
            row.kill,
            format!("p{}", row.partition),
            row.victim,
            row.new_leader,
            opt(row.leader_ms),
            opt(row.write_ms),
            row.failed_attempts,
            row.recovery_s
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "  {:<36} {:>8} {:>8} {:>8}", "", "median", "p90", "max");
    for (label, sp, to) in [
        (
            "kill -> survivor reports new leader",
            r.new_leader,
            r.leader_timeouts,
        ),
        (
            "kill -> first write through survivor",
            r.first_write,
            r.write_timeouts,
        ),
    ] {
        let _ = writeln!(
            s,
            "  {:<36} {:>5.0} ms {:>5.0} ms {:>5.0} ms{}",
            label,
            sp.median_ms,
            sp.p90_ms,
            sp.max_ms,
            if to > 0 {
                format!("  ({to} timed out)")
            } else {
                String::new()
            }
        );
    }
    let _ = writeln!(
        s,
        "RESULT failover_leader_median_ms={:.0} p90={:.0} max={:.0} write_median_ms={:.0} p90={:.0} max={:.0}",
        r.new_leader.median_ms,
        r.new_leader.p90_ms,
        r.new_leader.max_ms,
        r.first_write.median_ms,
        r.first_write.p90_ms,
        r.first_write.max_ms
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_spread() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        let s = Spread::of(&v);
        assert_eq!(s.count, 20);
        assert_eq!(s.median_ms, 10.0);
        assert_eq!(s.p90_ms, 18.0);
        assert_eq!(s.max_ms, 20.0);
        assert_eq!(Spread::of(&[]).count, 0);
        assert_eq!(Spread::of(&[5.0]).p90_ms, 5.0);
    }
}
