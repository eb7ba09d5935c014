//! One run: hosts, nodes, set-up, workload under the nemesis schedule, the final
//! heal and reads, then teardown. Whatever happens, every process and namespace the
//! run made is removed before it returns.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::history::{Event, Op, Type};
use crate::nemesis::{self, Cluster, Fault, Step};
use crate::net::Hosts;
use crate::nodes::{self, Node, NodeSettings};
use crate::recorder::Recorder;
use crate::workload::{self, Ctx, Shape, Target};

/// Process number of the final reads and liveness probes.
pub const FINAL_PROCESS: u64 = 100_000;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub out: PathBuf,
    pub parley: PathBuf,
    pub nodes: usize,
    pub faults: Vec<Fault>,
    pub time: Duration,
    pub seed: u64,
    /// Every fault once (the CI schedule) instead of the mixed schedule.
    pub each_once: bool,
    pub hold: Duration,
    pub quiet: Duration,
    pub shape: Shape,
    pub presence_ttl_s: u64,
    pub partitions: u32,
    pub progress: bool,
    /// Election timeout (max) of the nodes, for the liveness bound.
    pub election_timeout_ms: u64,
    pub convergence_bound: Duration,
}

/// What a run produced.
pub struct RunOutput {
    pub events: Vec<Event>,
    pub schedule: Vec<Step>,
    pub harness_errors: Vec<String>,
}

pub fn schedule(cfg: &RunConfig) -> Vec<Step> {
    if cfg.each_once {
        nemesis::each_once(&cfg.faults, cfg.hold, cfg.quiet, cfg.seed)
    } else {
        nemesis::mixed(&cfg.faults, cfg.time, cfg.hold, cfg.quiet, cfg.seed)
    }
}

/// The length of the faulty phase.
pub fn faulty_phase(cfg: &RunConfig, steps: &[Step]) -> Duration {
    let end = steps
        .last()
        .map(|s| s.at + s.hold + cfg.quiet / 2)
        .unwrap_or_default();
    if cfg.each_once {
        end
    } else {
        cfg.time.max(end)
    }
}

/// Checks that the machine can run the harness, before anything is made.
pub fn preflight(cfg: &RunConfig) -> Result<()> {
    for (bin, pkg) in [
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("tc", "iproute2"),
        ("kill", "procps"),
    ] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).exists()))
            .unwrap_or(false);
        if !found {
            bail!("`{bin}` not found: install {pkg} (scripts/setup.sh does it)");
        }
    }
    if cfg.faults.contains(&Fault::Clock) && nodes::libfaketime().is_none() {
        bail!("the clock nemesis needs libfaketime (scripts/setup.sh installs it)");
    }
    if !cfg.parley.exists() {
        bail!("parley binary not found at {} (build it: cargo build -p parley-node, or pass --parley)", cfg.parley.display());
    }
    Ok(())
}

/// Stops every node and removes the namespaces; returns leftovers as errors.
fn teardown(cluster: &mut Cluster) -> Vec<String> {
    let mut errs = Vec::new();
    for n in &mut cluster.nodes {
        n.stop(Duration::from_secs(5));
    }
    cluster.hosts.destroy();
    let left = cluster.hosts.leftovers();
    if !left.is_empty() {
        errs.push(format!("namespaces left behind: {left:?}"));
    }
    errs
}

/// Removes what an interrupted run left (namespaces from `DIR/hosts.json`, node
/// processes whose command line names `DIR`).
pub fn cleanup(out: &Path) -> Result<()> {
    let hosts = Hosts::load(out)?;
    let nodes_dir = out.join("nodes").display().to_string();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let argv: Vec<String> = cmd
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).to_string())
                .collect();
            let is_node = argv.get(1).is_some_and(|a| a == "serve")
                && argv.iter().any(|a| a.starts_with(&nodes_dir));
            if is_node {
                let _ = std::process::Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
    }
    hosts.destroy();
    let left = hosts.leftovers();
    if !left.is_empty() {
        bail!("could not remove {left:?}");
    }
    Ok(())
}

/// Waits (bounded) until every node answers and sees a leader for every group.
async fn wait_all_led(cluster: &mut Cluster, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let mut ok = true;
        for n in &mut cluster.nodes {
            if !n.running() {
                bail!(
                    "{} exited; last lines of {}:\n{}",
                    n.name,
                    n.log.display(),
                    n.log_tail(20)
                );
            }
            match nodes::status(&n.grpc, Duration::from_millis(800)).await {
                Ok(s) if nodes::all_led(&s) => {}
                _ => ok = false,
            }
        }
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the cluster did not form within {within:?} (node logs under nodes/)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every node answers at all (bounded).
async fn wait_all_answer(cluster: &mut Cluster, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let mut ok = true;
        for n in &cluster.nodes {
            if nodes::status(&n.grpc, Duration::from_millis(800))
                .await
                .is_err()
            {
                ok = false;
            }
        }
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("not every node answered within {within:?} after the heal");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(cfg: RunConfig) -> Result<RunOutput> {
    preflight(&cfg)?;
    std::fs::create_dir_all(cfg.out.join("nodes"))
        .with_context(|| format!("creating {}", cfg.out.display()))?;
    let hosts = Hosts::create(&cfg.out, cfg.nodes, cfg.seed)?;
    let settings = NodeSettings {
        presence_ttl_s: cfg.presence_ttl_s,
        partitions: cfg.partitions,
    };
    let nodes: Vec<Node> = (0..cfg.nodes)
        .map(|i| Node::plan(&hosts, i, &cfg.out, &settings))
        .collect();
    let mut cluster = Cluster {
        hosts,
        nodes,
        parley: cfg.parley.clone(),
        partitions: cfg.partitions,
    };
    let rec = Recorder::create(&cfg.out.join("history.jsonl"))?;
    let steps = schedule(&cfg);
    std::fs::write(
        cfg.out.join("schedule.json"),
        serde_json::to_string_pretty(&steps)?,
    )?;

    // Ctrl-C ends the run early but still heals, reads, checks and cleans up.
    let (interrupt_tx, interrupt) = watch::channel(false);
    let ctrlc = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = interrupt_tx.send(true);
        }
    });
    let result = drive(&cfg, &mut cluster, &rec, &steps, interrupt).await;
    ctrlc.abort();
    let mut errors = teardown(&mut cluster);
    let (events, write_err) = rec.finish();
    if let Some(e) = write_err {
        errors.push(format!("writing the history: {e}"));
    }
    match result {
        Ok(mut errs) => {
            errs.extend(errors);
            Ok(RunOutput {
                events,
                schedule: steps,
                harness_errors: errs,
            })
        }
        Err(e) => {
            let extra = if errors.is_empty() {
                String::new()
            } else {
                format!(" (teardown: {})", errors.join("; "))
            };
            Err(anyhow!("{e:#}{extra}"))
        }
    }
}

/// Everything between hosts-up and teardown. Returns non-fatal harness errors.
async fn drive(
    cfg: &RunConfig,
    cluster: &mut Cluster,
    rec: &Recorder,
    steps: &[Step],
    interrupt: watch::Receiver<bool>,
) -> Result<Vec<String>> {
    let mut errors = Vec::new();
    let say = |m: &str| {
        if cfg.progress {
            eprintln!("jepsen: {m}");
        }
    };
    say(&format!(
        "starting {} nodes in namespaces {}",
        cfg.nodes,
        cluster.hosts.namespaces.join(", ")
    ));
    let parley = cluster.parley.clone();
    for n in &mut cluster.nodes {
        n.start(&parley)?;
    }
    wait_all_led(cluster, Duration::from_secs(120)).await?;
    let targets: Vec<Target> = cluster
        .nodes
        .iter()
        .map(|n| Target {
            name: n.name.clone(),
            grpc: n.grpc.clone(),
        })
        .collect();
    say("cluster formed; creating users and rooms");
    let world = Arc::new(workload::setup(&targets, &cfg.shape).await?);

    let (stop_tx, stop) = watch::channel(false);
    let (stop_subs_tx, stop_subs) = watch::channel(false);
    let seen: workload::Seen = Arc::default();
    let ctx = Ctx {
        rec: rec.clone(),
        targets: targets.clone(),
        world: world.clone(),
        shape: cfg.shape.clone(),
        stop,
        acked: Arc::new(Mutex::new(Default::default())),
    };
    workload::initial_reads(&ctx, FINAL_PROCESS).await?;
    let n = targets.len();
    let mut tasks: Vec<(String, JoinHandle<Result<()>>)> = Vec::new();
    let mut subs: Vec<(String, JoinHandle<Result<()>>)> = Vec::new();
    let mut p = 0u64;
    let seed = cfg.seed;
    for user in world.writers.clone() {
        tasks.push((
            format!("writer {user}"),
            tokio::spawn(workload::writer(
                ctx.clone(),
                p,
                user,
                p as usize % n,
                seed ^ p,
            )),
        ));
        p += 1;
    }
    for room in world.chat_rooms.clone() {
        for (j, user) in world.subscribers.clone().into_iter().enumerate() {
            subs.push((
                format!("subscriber {user}@{room}"),
                tokio::spawn(workload::subscriber(
                    ctx.clone(),
                    p,
                    user,
                    room.clone(),
                    j % n,
                    seed ^ p,
                    seen.clone(),
                    stop_subs.clone(),
                )),
            ));
            p += 1;
        }
    }
    for room in world.membership_rooms.clone() {
        for which in 0..3u8 {
            tasks.push((
                format!("membership {room}/{which}"),
                tokio::spawn(workload::membership(
                    ctx.clone(),
                    p,
                    room.clone(),
                    which,
                    p as usize % n,
                    seed ^ p,
                )),
            ));
            p += 1;
        }
    }
    tasks.push((
        "fenced sender".into(),
        tokio::spawn(workload::fenced_sender(ctx.clone(), p, p as usize % n)),
    ));
    p += 1;
    tasks.push((
        "fence admin".into(),
        tokio::spawn(workload::fence_admin(
            ctx.clone(),
            p,
            p as usize % n,
            seed ^ p,
        )),
    ));
    p += 1;
    for user in world.writers.iter().take(2).cloned() {
        tasks.push((
            format!("markers {user}"),
            tokio::spawn(workload::markers(
                ctx.clone(),
                p,
                user,
                p as usize % n,
                seed ^ p,
            )),
        ));
        p += 1;
    }
    for (i, user) in world.presence_users.clone().into_iter().enumerate() {
        tasks.push((
            format!("presence {user}"),
            tokio::spawn(workload::presence_user(ctx.clone(), p, user, i % n)),
        ));
        p += 1;
    }
    tasks.push((
        "presence reader".into(),
        tokio::spawn(workload::presence_reader(ctx.clone(), p)),
    ));

    // The faulty phase.
    let phase = faulty_phase(cfg, steps);
    let bar = if cfg.progress {
        ProgressBar::new(phase.as_secs().max(1))
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let tick = |bar: &ProgressBar| bar.set_position(t0.elapsed().as_secs().min(phase.as_secs()));
    let interrupted = || *interrupt.borrow();
    let mut active = nemesis::Active::default();
    for step in steps {
        if interrupted() {
            break;
        }
        wait_until(t0 + step.at, &bar, &tick, &interrupt).await;
        if interrupted() {
            break;
        }
        bar.set_message(format!("{} on", step.fault.name()));
        match cluster.apply(step, rec).await {
            Ok(a) => active = a,
            Err(e) => errors.push(format!("applying {}: {e:#}", step.fault.name())),
        }
        wait_until(t0 + step.at + step.hold, &bar, &tick, &interrupt).await;
        if let Err(e) = cluster.heal(&mut active, rec).await {
            errors.push(format!("healing {}: {e:#}", step.fault.name()));
        }
        bar.set_message("healed");
    }
    if !interrupted() {
        wait_until(t0 + phase, &bar, &tick, &interrupt).await;
    }
    bar.finish_and_clear();

    // The end: stop the clients, heal everything, measure liveness, read.
    say("faults over: stopping clients, healing, final reads");
    let _ = stop_tx.send(true);
    for (name, t) in tasks {
        match tokio::time::timeout(cfg.shape.op_timeout * 3, t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => errors.push(format!("{name}: {e:#}")),
            Ok(Err(e)) => errors.push(format!("{name} panicked: {e}")),
            Err(_) => errors.push(format!(
                "{name} did not stop within {:?}",
                cfg.shape.op_timeout * 3
            )),
        }
    }
    if let Err(e) = cluster.heal(&mut active, rec).await {
        errors.push(format!("healing: {e:#}"));
    }
    rec.nemesis(
        Type::Invoke,
        Op::Nemesis {
            fault: "heal".into(),
            start: true,
            targets: vec![],
            detail: Some("final: every fault off, every node running".into()),
        },
    );
    cluster.heal_all()?;
    rec.nemesis(
        Type::Ok,
        Op::Nemesis {
            fault: "heal".into(),
            start: true,
            targets: vec![],
            detail: None,
        },
    );
    wait_all_answer(cluster, Duration::from_secs(60)).await?;

    let bound = 2 * cfg.election_timeout_ms;
    let leaders_op = |elapsed: Option<u64>| Op::Liveness {
        what: "leaders".into(),
        elapsed_ms: elapsed,
        bound_ms: bound,
    };
    rec.invoke(FINAL_PROCESS, "", leaders_op(None));
    let t = Instant::now();
    match wait_all_led(cluster, Duration::from_secs(30)).await {
        Ok(()) => rec.ok(
            FINAL_PROCESS,
            "",
            leaders_op(Some(t.elapsed().as_millis() as u64)),
        ),
        Err(e) => {
            rec.failed(
                FINAL_PROCESS,
                "",
                leaders_op(None),
                Type::Fail,
                "NO_LEADER".into(),
            );
            errors.push(format!("leaders after heal: {e:#}"));
        }
    }

    let cbound = cfg.convergence_bound.as_millis() as u64;
    let conv_op = |elapsed: Option<u64>| Op::Liveness {
        what: "converged".into(),
        elapsed_ms: elapsed,
        bound_ms: cbound,
    };
    rec.invoke(FINAL_PROCESS, "", conv_op(None));
    let t = Instant::now();
    let mut converged = false;
    let mut last_err = String::new();
    // Bounded by 2x the bound (the checker judges the bound itself).
    while t.elapsed() < cfg.convergence_bound * 2 {
        match workload::probe(&targets, &world, Duration::from_secs(10)).await {
            Ok(reads) => {
                let mut by_room: std::collections::BTreeMap<&str, Vec<&Vec<crate::history::Msg>>> =
                    Default::default();
                for ((_, room), m) in &reads {
                    by_room.entry(room.as_str()).or_default().push(m);
                }
                if by_room.values().all(|v| v.windows(2).all(|w| w[0] == w[1])) {
                    converged = true;
                    break;
                }
                last_err = "timelines differ".into();
            }
            Err(e) => last_err = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if converged {
        rec.ok(
            FINAL_PROCESS,
            "",
            conv_op(Some(t.elapsed().as_millis() as u64)),
        );
    } else {
        rec.failed(
            FINAL_PROCESS,
            "",
            conv_op(None),
            Type::Fail,
            "NOT_CONVERGED".into(),
        );
        errors.push(format!(
            "not converged within {:?}: {last_err}",
            cfg.convergence_bound * 2
        ));
    }
    let finals = workload::final_reads(
        rec,
        FINAL_PROCESS,
        &targets,
        &world,
        Duration::from_secs(10),
    )
    .await?;

    // Let the subscribers catch up to the final timelines (bounded), then stop them.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let done = seen.lock().map(|s| {
            world.chat_rooms.iter().all(|room| {
                let want: std::collections::BTreeSet<&String> = finals
                    .iter()
                    .filter(|((_, r), _)| r == room)
                    .flat_map(|(_, m)| m.iter().map(|x| &x.id))
                    .collect();
                world.subscribers.iter().all(|u| {
                    let got = s.get(&format!("{u}@{room}"));
                    want.iter().all(|id| got.is_some_and(|g| g.contains(*id)))
                })
            })
        });
        if done.unwrap_or(false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_subs_tx.send(true);
    for (name, t) in subs {
        match tokio::time::timeout(Duration::from_secs(10), t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => errors.push(format!("{name}: {e:#}")),
            Ok(Err(e)) => errors.push(format!("{name} panicked: {e}")),
            Err(_) => errors.push(format!("{name} did not stop within 10 s")),
        }
    }
    Ok(errors)
}

/// Sleeps until `at`, ticking the bar, unless interrupted.
async fn wait_until(
    at: Instant,
    bar: &ProgressBar,
    tick: &impl Fn(&ProgressBar),
    interrupt: &watch::Receiver<bool>,
) {
    let mut intr = interrupt.clone();
    // Bounded: ends at `at` (one tick per 250 ms) or on interrupt.
    while Instant::now() < at && !*intr.borrow() {
        let left = at
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(250));
        let _ = tokio::time::timeout(left, intr.changed()).await;
        tick(bar);
    }
}
