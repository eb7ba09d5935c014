//! A local Parley cluster: N `parley serve` processes on fixed 127.0.0.1 ports, one
//! data dir each, recorded in `DIR/testnet.json` so that `status`, `kill`, `start` and
//! `down` work from another shell.
//!
//! Fixed ports matter: Raft membership names each node by its gRPC address, so a node
//! must come back on the same port after a kill. The ports are chosen once (from
//! `--base-port`, or free ones) and reused by every later start of that directory.
//!
//! Processes are always addressed by PID. A PID read back from `testnet.json` is
//! signalled only if `/proc/PID/cmdline` still shows `parley serve --data-dir <that
//! node's dir>`, so a reused PID is never hit.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use parley_proto::v1::chat_client::ChatClient;
use parley_proto::v1::{ClusterStatusRequest, ClusterStatusResponse};
use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, Endpoint};

use parley_node::node::Bound;

use crate::nodes::log_tail;

/// The state file inside a testnet directory.
pub const STATE_FILE: &str = "testnet.json";
/// How long a node may take to write `node.json` (genesis waits for its peers).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// SIGTERM → SIGKILL grace.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// Offsets from `--base-port`: gRPC at +0.., HTTP at +80.., p2p at +100...
pub const HTTP_OFFSET: u16 = 80;
pub const P2P_OFFSET: u16 = 100;
/// At most this many nodes (the port offsets leave room for 80).
pub const MAX_NODES: usize = 16;

/// One node of the layout: where it listens, where it keeps data, how it is started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeSpec {
    pub id: u64,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub p2p: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Everything after `parley` (starting with `serve`).
    pub args: Vec<String>,
    /// The last PID started for this node (it may have exited since).
    pub pid: Option<u32>,
}

/// `DIR/testnet.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layout {
    pub version: u32,
    pub dir: PathBuf,
    pub parley: PathBuf,
    pub cluster: String,
    pub nodes: Vec<NodeSpec>,
    /// PID of the `testnet up` holding this cluster in the foreground, if any.
    #[serde(default)]
    pub up_pid: Option<u32>,
}

impl Layout {
    /// A fresh layout for `n` nodes in `dir`: ports from `base_port` (0 = free ports
    /// chosen now), node i (1-based) has `--node-id i`, all expect `n` at genesis, and
    /// nodes 2..n join node 1.
    pub fn plan(
        dir: &Path,
        parley: &Path,
        n: usize,
        base_port: u16,
        extra: &[String],
    ) -> Result<Layout> {
        if n == 0 || n > MAX_NODES {
            bail!("--nodes must be between 1 and {MAX_NODES}");
        }
        let ports: Vec<(u16, u16, u16)> = if base_port == 0 {
            let mut seen = Vec::new();
            let mut out = Vec::new();
            for _ in 0..n {
                let mut three = [0u16; 3];
                for p in &mut three {
                    *p = free_port_not_in(&seen)?;
                    seen.push(*p);
                }
                out.push((three[0], three[1], three[2]));
            }
            out
        } else {
            let top = u32::from(base_port) + u32::from(P2P_OFFSET) + n as u32;
            if top > u32::from(u16::MAX) {
                bail!("--base-port {base_port} is too high for {n} nodes");
            }
            (0..n as u16)
                .map(|i| {
                    (
                        base_port + i,
                        base_port + HTTP_OFFSET + i,
                        base_port + P2P_OFFSET + i,
                    )
                })
                .collect()
        };
        for (g, h, p) in &ports {
            for port in [g, h, p] {
                if !port_free(*port) {
                    bail!("port {port} on 127.0.0.1 is in use; pass another --base-port (or 0 for free ports)");
                }
            }
        }
        // The default cluster name: a node's Cluster service answers Hello with
        // "parley" whatever `--cluster` says (node.rs), so another name would make
        // ClusterStatus call every peer dead. Clusters stay apart anyway: nodes meet
        // only through `--join` on this layout's own ports.
        let cluster = "parley".to_string();
        let seed = format!("/ip4/127.0.0.1/tcp/{}", ports[0].2);
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (g, h, p))| {
                let id = i as u64 + 1;
                let data_dir = dir.join(format!("node{id}"));
                let p2p = format!("/ip4/127.0.0.1/tcp/{p}");
                let mut args: Vec<String> = vec![
                    "serve".into(),
                    "--data-dir".into(),
                    data_dir.display().to_string(),
                    "--listen".into(),
                    format!("127.0.0.1:{g}"),
                    "--http".into(),
                    format!("127.0.0.1:{h}"),
                    "--p2p".into(),
                    p2p.clone(),
                    "--node-id".into(),
                    id.to_string(),
                    "--bootstrap-expect".into(),
                    n.to_string(),
                    "--genesis-timeout".into(),
                    START_TIMEOUT.as_secs().to_string(),
                ];
                if i > 0 {
                    args.push("--join".into());
                    args.push(seed.clone());
                }
                args.extend(extra.iter().cloned());
                NodeSpec {
                    id,
                    grpc: SocketAddr::from(([127, 0, 0, 1], *g)),
                    http: SocketAddr::from(([127, 0, 0, 1], *h)),
                    p2p,
                    data_dir,
                    log: dir.join(format!("node{id}.log")),
                    args,
                    pid: None,
                }
            })
            .collect();
        Ok(Layout {
            version: 1,
            dir: dir.to_path_buf(),
            parley: parley.to_path_buf(),
            cluster,
            nodes,
            up_pid: None,
        })
    }

    pub fn state_file(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Reads `DIR/testnet.json`.
    pub fn load(dir: &Path) -> Result<Layout> {
        let path = Self::state_file(dir);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (is there a testnet in {}? start one with `testnet up --dir {}`)",
                path.display(),
                dir.display(),
                dir.display()
            )
        })?;
        let layout: Layout = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a testnet state file", path.display()))?;
        if layout.version != 1 {
            bail!("{}: unknown version {}", path.display(), layout.version);
        }
        Ok(layout)
    }

    /// Writes `DIR/testnet.json` atomically (temp file + rename), so a concurrent reader
    /// never sees half a file.
    pub fn save(&self) -> Result<()> {
        let path = Self::state_file(&self.dir);
        let tmp = self
            .dir
            .join(format!(".{STATE_FILE}.{}.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// The node with id `id`.
    pub fn node(&self, id: u64) -> Result<&NodeSpec> {
        self.nodes.iter().find(|n| n.id == id).ok_or_else(|| {
            anyhow!(
                "no node {id} in {} (nodes 1..={})",
                self.dir.display(),
                self.nodes.len()
            )
        })
    }

    pub fn node_mut(&mut self, id: u64) -> Result<&mut NodeSpec> {
        let n = self.nodes.len();
        let dir = self.dir.clone();
        self.nodes
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or_else(|| anyhow!("no node {id} in {} (nodes 1..={n})", dir.display()))
    }

    /// Nodes whose recorded PID is still a live `parley serve` on their data dir.
    pub fn running(&self) -> Vec<(u64, u32)> {
        self.nodes
            .iter()
            .filter_map(|n| n.pid.filter(|p| is_our_node(*p, n)).map(|p| (n.id, p)))
            .collect()
    }

    pub fn grpc_addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.grpc).collect()
    }
}

/// Binds 127.0.0.1:`port` to see whether it is free.
/// `--target` addresses (`IP:PORT`, an `http://` prefix allowed).
pub fn parse_targets(targets: &[String]) -> Result<Vec<SocketAddr>> {
    targets
        .iter()
        .map(|t| {
            let t = t.trim().trim_start_matches("http://");
            t.parse::<SocketAddr>()
                .with_context(|| format!("--target {t}: expected IP:PORT"))
        })
        .collect()
}

pub fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn free_port_not_in(taken: &[u16]) -> Result<u16> {
    for _ in 0..100 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .context("finding a free port")?;
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
    bail!("could not find distinct free ports")
}

// ---- processes by PID ----

/// Whether `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // State is the first field after the command name's closing parenthesis.
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// The argv of `pid`, from `/proc/PID/cmdline`.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `argv` is `…/parley serve … --data-dir <data_dir> …`.
pub fn argv_is_node(argv: &[String], data_dir: &Path) -> bool {
    let exe_ok = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|f| f == "parley");
    let serve = argv.get(1).is_some_and(|a| a == "serve");
    let dir = data_dir.display().to_string();
    let dir_ok = argv.windows(2).any(|w| w[0] == "--data-dir" && w[1] == dir)
        || argv.iter().any(|a| *a == format!("--data-dir={dir}"));
    exe_ok && serve && dir_ok
}

/// Whether `pid` is alive and still this node's `parley serve`.
pub fn is_our_node(pid: u32, node: &NodeSpec) -> bool {
    pid_alive(pid) && cmdline(pid).is_some_and(|a| argv_is_node(&a, &node.data_dir))
}

/// Sends `signal` (a name like `TERM` or a number) to `pid` through `kill(1)` (this
/// crate forbids `unsafe`, so no libc).
pub fn signal(pid: u32, signal: &str) -> Result<()> {
    if signal.is_empty() || !signal.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("bad signal `{signal}` (use a name like KILL, TERM, STOP, CONT or a number)");
    }
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("running kill(1)")?;
    if !status.success() {
        bail!("kill -{signal} {pid} failed ({status})");
    }
    Ok(())
}

/// Starts node `spec` as a child in its own process group (a terminal's Ctrl-C reaches
/// only testnet, which stops nodes by PID). Output is appended to the node's log.
pub fn spawn(parley: &Path, spec: &NodeSpec) -> Result<Child> {
    std::fs::create_dir_all(&spec.data_dir)
        .with_context(|| format!("creating {}", spec.data_dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("opening {}", spec.log.display()))?;
    let err = log.try_clone()?;
    use std::os::unix::process::CommandExt as _;
    Command::new(parley)
        .args(&spec.args)
        .env_remove("PARLEY_NODE")
        .env_remove("PARLEY_TOKEN")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", parley.display()))
}

fn read_bound(path: &Path) -> Option<Bound> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Waits (bounded) until `node.json` names `pid`. `exited` reports an early exit.
pub async fn wait_bound(
    spec: &NodeSpec,
    pid: u32,
    within: Duration,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<Bound> {
    let file = spec.data_dir.join("node.json");
    let deadline = Instant::now() + within;
    loop {
        if let Some(b) = read_bound(&file).filter(|b| b.pid == pid) {
            return Ok(b);
        }
        if let Some(how) = exited() {
            bail!(
                "node {} (pid {pid}) exited during start ({how}); last lines of {}:\n{}",
                spec.id,
                spec.log.display(),
                log_tail(&spec.log, 15)
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "node {} (pid {pid}) did not serve within {within:?}; last lines of {}:\n{}",
                spec.id,
                spec.log.display(),
                log_tail(&spec.log, 15)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node process this testnet started and holds; SIGKILLed if dropped while running,
/// so no error path leaves it behind.
pub struct Proc {
    child: Child,
    pub pid: u32,
    pub bound: Option<Bound>,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(parley: &Path, spec: &NodeSpec) -> Result<Proc> {
        let child = spawn(parley, spec)?;
        Ok(Proc {
            pid: child.id(),
            child,
            bound: None,
            status: None,
        })
    }

    /// `Some(status)` once exited (reaped here; the PID is then free for reuse, so
    /// nothing may signal it afterwards — `stop` and `kill9` check this first).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits (bounded) until the node writes its `node.json`.
    pub async fn wait_serving(&mut self, spec: &NodeSpec, within: Duration) -> Result<Bound> {
        let pid = self.pid;
        let child = &mut self.child;
        let status = &mut self.status;
        let b = wait_bound(spec, pid, within, || {
            if status.is_none() {
                *status = child.try_wait().ok().flatten();
            }
            status.map(|s| s.to_string())
        })
        .await?;
        self.bound = Some(b.clone());
        Ok(b)
    }

    /// SIGKILL and reap (bounded).
    pub async fn kill9(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.exited() {
            return Ok(s);
        }
        self.child.kill().context("SIGKILL")?;
        self.wait_exit(STOP_GRACE)
            .await
            .ok_or_else(|| anyhow!("pid {} did not exit after SIGKILL", self.pid))
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL.
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.exited() {
            return Ok(s);
        }
        // Not reaped yet, so the PID is still ours.
        let _ = signal(self.pid, "TERM");
        if let Some(s) = self.wait_exit(STOP_GRACE).await {
            return Ok(s);
        }
        eprintln!(
            "pid {} ignored SIGTERM for {STOP_GRACE:?}: SIGKILL",
            self.pid
        );
        self.kill9().await
    }

    async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Stops a PID we did not spawn (read from `testnet.json`): SIGTERM, up to
/// [`STOP_GRACE`], then SIGKILL, each only while it still looks like `node`.
pub async fn stop_pid(pid: u32, node: &NodeSpec) -> Result<&'static str> {
    if !is_our_node(pid, node) {
        return Ok("not running");
    }
    signal(pid, "TERM")?;
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return Ok("stopped (SIGTERM)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if is_our_node(pid, node) {
        signal(pid, "KILL")?;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return Ok("killed (SIGKILL after 5s)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("pid {pid} still runs after SIGKILL")
}

// ---- ClusterStatus ----

/// A lazily connecting client with short deadlines, for status polling.
pub fn status_client(addr: SocketAddr, timeout: Duration) -> Result<ChatClient<Channel>> {
    let ep = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_millis(500))
        .timeout(timeout)
        .tcp_nodelay(true);
    Ok(ChatClient::new(ep.connect_lazy()))
}

/// `ClusterStatus` of the node at `addr` (a fresh connection), bounded by `timeout`.
pub async fn cluster_status(addr: SocketAddr, timeout: Duration) -> Result<ClusterStatusResponse> {
    let mut c = status_client(addr, timeout)?;
    let call = c.cluster_status(ClusterStatusRequest {});
    match tokio::time::timeout(timeout + Duration::from_millis(200), call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(anyhow!("{addr}: {:?}: {}", s.code(), s.message())),
        Err(_) => Err(anyhow!("{addr}: no answer within {timeout:?}")),
    }
}

/// Why a ClusterStatus view is not healthy for `n` nodes (all alive, every group led),
/// or `None` when it is.
pub fn unhealthy(st: &ClusterStatusResponse, n: usize) -> Option<String> {
    let alive = st.nodes.iter().filter(|x| x.alive).count();
    if st.nodes.len() < n || alive < n {
        return Some(format!("node {} sees {alive}/{n} nodes alive", st.node_id));
    }
    let leaderless: Vec<String> = st
        .groups
        .iter()
        .filter(|g| g.leader == 0)
        .map(|g| group_name(g.group))
        .collect();
    if st.groups.is_empty() {
        return Some(format!("node {} knows no groups yet", st.node_id));
    }
    if !leaderless.is_empty() {
        return Some(format!(
            "node {} sees no leader for {} group(s): {}",
            st.node_id,
            leaderless.len(),
            leaderless.join(",")
        ));
    }
    None
}

/// `meta` or `p<N>` for group ids (0 = meta, partition p = group p + 1).
pub fn group_name(g: u32) -> String {
    if g == 0 {
        "meta".into()
    } else {
        format!("p{}", g - 1)
    }
}

/// Waits (bounded) until every node in `addrs` answers ClusterStatus with a healthy
/// view of `n` nodes. Returns the view of the first address.
pub async fn wait_healthy(
    addrs: &[SocketAddr],
    n: usize,
    within: Duration,
) -> Result<ClusterStatusResponse> {
    wait_healthy_while(addrs, n, within, || None).await
}

/// [`wait_healthy`], giving up early when `gone` reports a reason (a node exited).
pub async fn wait_healthy_while(
    addrs: &[SocketAddr],
    n: usize,
    within: Duration,
    mut gone: impl FnMut() -> Option<String>,
) -> Result<ClusterStatusResponse> {
    let deadline = Instant::now() + within;
    let mut why = String::from("not asked yet");
    loop {
        if let Some(g) = gone() {
            bail!("{g}");
        }
        let views = futures::future::join_all(
            addrs
                .iter()
                .map(|a| cluster_status(*a, Duration::from_secs(2))),
        )
        .await;
        let mut first = None;
        let mut bad = None;
        for v in views {
            match v {
                Ok(st) => {
                    if let Some(w) = unhealthy(&st, n) {
                        bad.get_or_insert(w);
                    }
                    first.get_or_insert(st);
                }
                Err(e) => {
                    bad.get_or_insert(format!("{e:#}"));
                }
            }
        }
        match (bad, first) {
            (None, Some(st)) => return Ok(st),
            (Some(w), _) => why = w,
            (None, None) => {}
        }
        if Instant::now() >= deadline {
            bail!("the cluster was not healthy within {within:?}: {why}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ClusterStatus tables (nodes, then groups) as text.
pub fn status_table(st: &ClusterStatusResponse) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let yes = |b: bool| if b { "yes" } else { "no" };
    let _ = writeln!(
        s,
        "cluster {} seen from node {}; {} partitions",
        st.cluster, st.node_id, st.partitions
    );
    let _ = writeln!(
        s,
        "  {:<6} {:<22} {:<22} {:<6} registered",
        "node", "gRPC", "HTTP", "alive"
    );
    for n in &st.nodes {
        let _ = writeln!(
            s,
            "  {:<6} {:<22} {:<22} {:<6} {}",
            n.node_id,
            n.grpc_addr,
            n.http_addr,
            yes(n.alive),
            yes(n.registered)
        );
    }
    let _ = writeln!(
        s,
        "  {:<6} {:<10} {:<7} {:<6} {:<8} local",
        "group", "voters", "leader", "term", "applied"
    );
    for g in &st.groups {
        let voters = g
            .voters
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let leader = if g.leader == 0 {
            "-".to_string()
        } else {
            g.leader.to_string()
        };
        let _ = writeln!(
            s,
            "  {:<6} {:<10} {:<7} {:<6} {:<8} {}",
            group_name(g.group),
            voters,
            leader,
            g.term,
            g.applied_index,
            yes(g.local)
        );
    }
    s
}

/// The leader of `group` as the nodes in `addrs` report it: the one named by the
/// highest term among the answers (0 if none).
pub async fn leader_of(addrs: &[SocketAddr], group: u32) -> (u64, u64) {
    let views = futures::future::join_all(
        addrs
            .iter()
            .map(|a| cluster_status(*a, Duration::from_secs(2))),
    )
    .await;
    views
        .into_iter()
        .filter_map(Result::ok)
        .filter_map(|st| {
            st.groups
                .iter()
                .find(|g| g.group == group && g.leader != 0)
                .map(|g| (g.term, g.leader))
        })
        .max()
        .map(|(term, leader)| (leader, term))
        .unwrap_or((0, 0))
}

/// A cluster this process started (bench, failover): the layout and one held child
/// per node (`None` while killed).
pub struct Running {
    pub layout: Layout,
    pub procs: Vec<Option<Proc>>,
}

impl Running {
    /// Starts every node of `layout` at once (genesis needs them all), then waits for
    /// each to serve and for the cluster to be healthy.
    pub async fn start(layout: Layout, within: Duration) -> Result<Running> {
        let mut run = Running {
            procs: Vec::with_capacity(layout.nodes.len()),
            layout,
        };
        for spec in &run.layout.nodes {
            let _ = std::fs::remove_file(spec.data_dir.join("node.json"));
            run.procs.push(Some(Proc::spawn(&run.layout.parley, spec)?));
        }
        for (i, spec) in run.layout.nodes.iter_mut().enumerate() {
            if let Some(p) = run.procs[i].as_mut() {
                spec.pid = Some(p.pid);
                p.wait_serving(spec, within).await?;
            }
        }
        run.layout.save()?;
        let addrs = run.layout.grpc_addrs();
        let n = run.layout.nodes.len();
        wait_healthy_while(&addrs, n, within, || run.exit_note()).await?;
        Ok(run)
    }

    /// Index of node `id`.
    pub fn index(&self, id: u64) -> Result<usize> {
        self.layout
            .nodes
            .iter()
            .position(|n| n.id == id)
            .ok_or_else(|| anyhow!("no node {id}"))
    }

    /// `kill -9` node `id`, reaped.
    pub async fn kill9(&mut self, id: u64) -> Result<()> {
        let i = self.index(id)?;
        if let Some(mut p) = self.procs[i].take() {
            p.kill9().await?;
        }
        Ok(())
    }

    /// Starts node `id` again on its data dir and ports; waits until it serves.
    pub async fn restart(&mut self, id: u64, within: Duration) -> Result<()> {
        let i = self.index(id)?;
        if let Some(mut p) = self.procs[i].take() {
            p.kill9().await?;
        }
        let spec = self.layout.nodes[i].clone();
        let _ = std::fs::remove_file(spec.data_dir.join("node.json"));
        let mut p = Proc::spawn(&self.layout.parley, &spec)?;
        self.layout.nodes[i].pid = Some(p.pid);
        p.wait_serving(&spec, within).await?;
        self.procs[i] = Some(p);
        let _ = self.layout.save();
        Ok(())
    }

    /// Nodes that exited although nobody here stopped them: `(id, status)`.
    pub fn exited(&mut self) -> Vec<(u64, ExitStatus)> {
        let ids: Vec<u64> = self.layout.nodes.iter().map(|n| n.id).collect();
        self.procs
            .iter_mut()
            .zip(ids)
            .filter_map(|(p, id)| p.as_mut().and_then(|p| p.exited()).map(|s| (id, s)))
            .collect()
    }

    /// "node N exited: STATUS; log tail" for the first node that exited, if any.
    pub fn exit_note(&mut self) -> Option<String> {
        let (id, status) = self.exited().into_iter().next()?;
        let log = self.layout.node(id).map(|s| s.log.clone()).ok()?;
        Some(format!(
            "node {id} exited: {status}; last lines of {}:\n{}",
            log.display(),
            log_tail(&log, 15)
        ))
    }

    /// Stops every node (SIGTERM, then SIGKILL after the grace), in parallel.
    pub async fn stop_all(&mut self) {
        let ids: Vec<u64> = self.layout.nodes.iter().map(|n| n.id).collect();
        let stops = self
            .procs
            .iter_mut()
            .zip(ids)
            .filter_map(|(p, id)| p.as_mut().map(|p| (id, p)))
            .map(|(id, p)| async move {
                let pid = p.pid;
                (id, pid, p.stop().await)
            });
        for (id, pid, r) in futures::future::join_all(stops).await {
            if let Err(e) = r {
                eprintln!("stopping node {id} (pid {pid}): {e:#}");
            }
        }
        for n in &mut self.layout.nodes {
            n.pid = None;
        }
        let _ = self.layout.save();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn recognises_our_node_only() {
        let dir = Path::new("/tmp/t/node1");
        assert!(argv_is_node(
            &argv(&[
                "/x/target/release/parley",
                "serve",
                "--data-dir",
                "/tmp/t/node1",
                "--listen",
                "a"
            ]),
            dir
        ));
        assert!(!argv_is_node(
            &argv(&["/x/parley", "serve", "--data-dir", "/tmp/t/node2"]),
            dir
        ));
        assert!(!argv_is_node(
            &argv(&["/bin/sleep", "serve", "--data-dir", "/tmp/t/node1"]),
            dir
        ));
        assert!(!argv_is_node(
            &argv(&["/x/parley", "send", "--data-dir", "/tmp/t/node1"]),
            dir
        ));
        assert!(!argv_is_node(&[], dir));
    }

    #[test]
    fn fixed_ports_follow_the_base() {
        // A high base unlikely to be in use on a test machine.
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::plan(dir.path(), Path::new("/x/parley"), 3, 47100, &[]);
        let Ok(l) = l else { return }; // ports taken by someone else: nothing to check
        assert_eq!(l.nodes[2].grpc.port(), 47102);
        assert_eq!(l.nodes[2].http.port(), 47182);
        assert_eq!(l.nodes[2].p2p, "/ip4/127.0.0.1/tcp/47202");
        assert!(!l.nodes[0].args.contains(&"--join".to_string()));
        let j = l.nodes[1].args.iter().position(|a| a == "--join").unwrap();
        assert_eq!(l.nodes[1].args[j + 1], "/ip4/127.0.0.1/tcp/47200");
        assert!(l.nodes[1].args.windows(2).any(|w| w == ["--node-id", "2"]));
        assert!(l.nodes[1]
            .args
            .windows(2)
            .any(|w| w == ["--bootstrap-expect", "3"]));
    }

    #[test]
    fn free_ports_are_distinct_and_state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::plan(
            dir.path(),
            Path::new("/x/parley"),
            3,
            0,
            &["--partitions".into(), "4".into()],
        )
        .unwrap();
        let mut ports: Vec<u16> = l
            .nodes
            .iter()
            .flat_map(|n| [n.grpc.port(), n.http.port()])
            .collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 6);
        assert!(l.nodes[0]
            .args
            .ends_with(&["--partitions".to_string(), "4".to_string()]));
        l.save().unwrap();
        let back = Layout::load(dir.path()).unwrap();
        assert_eq!(back.nodes.len(), 3);
        assert_eq!(back.nodes[1].grpc, l.nodes[1].grpc);
        assert!(Layout::plan(dir.path(), Path::new("p"), 0, 0, &[]).is_err());
    }

    #[test]
    fn this_process_is_alive_and_not_a_node() {
        let me = std::process::id();
        assert!(pid_alive(me));
        let spec = NodeSpec {
            id: 1,
            grpc: SocketAddr::from(([127, 0, 0, 1], 1)),
            http: SocketAddr::from(([127, 0, 0, 1], 2)),
            p2p: String::new(),
            data_dir: PathBuf::from("/nowhere"),
            log: PathBuf::from("/nowhere.log"),
            args: Vec::new(),
            pid: Some(me),
        };
        assert!(!is_our_node(me, &spec));
        assert!(signal(me, "KILL;rm").is_err());
    }
}
