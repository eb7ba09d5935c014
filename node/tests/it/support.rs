//! Shared helpers: the real `parley` binary as a node process (start, kill -9,
//! restart on the same data dir), CLI runs with captured output, gRPC clients.
//!
//! Processes are stopped by PID (`Child::kill`, which is SIGKILL on unix), never by name.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parley_node::cli::client::{self, Client};
use parley_node::node::Bound;
use parley_proto::v1 as pb;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_parley");

/// How long a node may take to write `node.json`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one CLI command may run.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);

/// A `parley serve` child process with its own temp dir (`data/` and `logs/`).
pub struct Node {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub bound: Bound,
    starts: u32,
    /// Extra `serve` flags, kept across restarts.
    extra: Vec<String>,
}

impl Node {
    /// Starts a fresh single-node cluster and waits (bounded) until it serves.
    pub fn start() -> Self {
        Self::start_with(&[], &[])
    }

    /// Like [`Node::start`], with extra `serve` flags (kept for restarts) and
    /// environment variables (this start only).
    pub fn start_with(extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("parley-it-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs dir");
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, bound) = spawn(dir.path(), 0, &extra, env);
        Self {
            child: Some(child),
            dir,
            bound,
            starts: 1,
            extra,
        }
    }

    /// The child process, if it has exited: its status (reaped).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// `HOST:PORT` of the node's gRPC API (as `--node` takes it).
    pub fn addr(&self) -> String {
        self.bound.grpc.to_string()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL (no shutdown code runs), then reap the process.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the process keeps its sockets open and answers nothing until
    /// [`Node::resume`] (a kill during the pause still works).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Node::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let Some(pid) = self.pid() else { return };
        let st = Command::new("kill").args([sig, &pid.to_string()]).status();
        assert!(
            matches!(st, Ok(s) if s.success()),
            "kill {sig} {pid}: {st:?}"
        );
    }

    /// SIGTERM (a clean shutdown that flushes the store), waiting up to 20 s for the
    /// exit; SIGKILL past that.
    pub fn stop(&mut self) {
        let Some(pid) = self.pid() else { return };
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.exited().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
    }

    /// Starts the node again on the same data dir (new ports), after killing it if it
    /// still runs. The stale `node.json` is removed first so the wait sees the new one.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    /// [`Node::restart`] with environment variables for this start.
    pub fn restart_with(&mut self, env: &[(&str, &str)]) {
        self.kill9();
        let _ = std::fs::remove_file(self.data_dir().join("node.json"));
        let (child, bound) = spawn(self.dir.path(), self.starts, &self.extra, env);
        self.starts += 1;
        self.child = Some(child);
        self.bound = bound;
    }

    /// Everything the node printed so far (all runs), for failure messages.
    pub fn logs(&self) -> String {
        logs(self.dir.path())
    }

    /// A `parley` client command aimed at this node, with a clean environment.
    pub fn command(&self, token: Option<&str>) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env_remove("PARLEY_NODE")
            .env_remove("PARLEY_TOKEN")
            .env_remove("RUST_LOG");
        cmd.arg("--node").arg(self.addr());
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        cmd
    }

    /// Runs `parley --node ADDR [--token T] ARGS...` to completion.
    pub fn cli(&self, token: Option<&str>, args: &[&str]) -> Run {
        let mut cmd = self.command(token);
        cmd.args(args);
        run(cmd, &args.join(" "))
    }

    /// Like [`Node::cli`] with arguments that may not be UTF-8.
    pub fn cli_os(&self, token: Option<&str>, args: &[OsString]) -> Run {
        let mut cmd = self.command(token);
        cmd.args(args);
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        run(cmd, &shown.join(" "))
    }

    /// A gRPC client as the CLI builds it.
    pub async fn client(&self, token: Option<&str>) -> Client {
        client::connect(&self.addr(), token)
            .await
            .expect("connect to the node")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        // A failed test leaves its nodes' data and logs behind for a post-mortem.
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!(
                "kept the node's data and logs in {}",
                self.dir.path().display()
            );
        }
    }
}

fn logs(dir: &Path) -> String {
    let mut out = String::new();
    let mut files: Vec<_> = std::fs::read_dir(dir.join("logs"))
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    for f in files {
        out.push_str(&format!("--- {} ---\n", f.display()));
        out.push_str(&std::fs::read_to_string(&f).unwrap_or_default());
    }
    out
}

/// Starts `parley serve` in `<dir>/data`, logging to `<dir>/logs/run-N.log`, and waits
/// until `node.json` names this child's pid.
fn spawn(dir: &Path, n: u32, extra: &[String], env: &[(&str, &str)]) -> (Child, Bound) {
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--http",
        "127.0.0.1:0",
        "--p2p",
        "/ip4/127.0.0.1/tcp/0",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().cloned());
    let child = spawn_child_env(dir, n, &args, env);
    wait_bound(dir, child, START_TIMEOUT)
}

/// Starts `parley serve` in `<dir>/data` with `args`, logging to `<dir>/logs/run-N.log`.
fn spawn_child(dir: &Path, n: u32, args: &[String]) -> Child {
    spawn_child_env(dir, n, args, &[])
}

fn spawn_child_env(dir: &Path, n: u32, args: &[String], env: &[(&str, &str)]) -> Child {
    let data = dir.join("data");
    let log = File::create(dir.join("logs").join(format!("run-{n}.log"))).expect("log file");
    let log2 = log.try_clone().expect("log file");
    Command::new(BIN)
        .env_remove("FAILPOINTS")
        .envs(env.iter().copied())
        .env_remove("PARLEY_NODE")
        .env_remove("PARLEY_TOKEN")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .arg("serve")
        .arg("--data-dir")
        .arg(&data)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .spawn()
        .expect("spawn parley serve")
}

/// Waits until `<dir>/data/node.json` names `child`'s pid.
fn wait_bound(dir: &Path, mut child: Child, within: Duration) -> (Child, Bound) {
    let data = dir.join("data");
    let pid = child.id();
    let file = data.join("node.json");
    let deadline = Instant::now() + within;
    loop {
        if let Some(b) = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Bound>(&b).ok())
        {
            if b.pid == pid {
                return (child, b);
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("parley serve exited early ({status}):\n{}", logs(dir));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "parley serve did not write node.json within {within:?}:\n{}",
                logs(dir)
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A finished CLI run.
#[derive(Debug)]
pub struct Run {
    pub what: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts success; returns stdout without the trailing newline.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(
            self.code, 0,
            "`parley {}` failed:\n{}",
            self.what, self.stderr
        );
        self.stdout.trim_end()
    }

    /// Asserts failure with `parley: CODE: ...` as the only stderr line and `exit` as
    /// the exit code; returns the message.
    #[track_caller]
    pub fn fails(&self, code: &str, exit: i32) -> String {
        let prefix = format!("parley: {code}: ");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with(&prefix),
            "`parley {}`: expected one stderr line `{prefix}...`, exit {exit}; got exit {}, stderr:\n{}stdout:\n{}",
            self.what,
            self.code,
            self.stderr,
            self.stdout
        );
        assert_eq!(
            self.code, exit,
            "`parley {}` exit code (stderr: {})",
            self.what, self.stderr
        );
        lines[0][prefix.len()..].to_owned()
    }

    /// Stdout as JSON lines (asserts success and that every line is an object).
    #[track_caller]
    pub fn json(&self) -> Vec<serde_json::Value> {
        self.ok()
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("`parley {}`: not JSON ({e}): {l}", self.what));
                assert!(v.is_object(), "`parley {}`: not an object: {l}", self.what);
                v
            })
            .collect()
    }

    /// The single JSON object printed.
    #[track_caller]
    pub fn json1(&self) -> serde_json::Value {
        let mut v = self.json();
        assert_eq!(
            v.len(),
            1,
            "`parley {}`: expected one JSON line:\n{}",
            self.what,
            self.stdout
        );
        v.remove(0)
    }
}

/// Runs a command to completion with a deadline (killing it by PID past that).
pub fn run(mut cmd: Command, what: &str) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn parley");
    let (out_rx, err_rx) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`parley {what}` did not finish within {CLI_TIMEOUT:?}");
            }
        }
    };
    Run {
        what: what.to_owned(),
        code: status.code().unwrap_or(-1),
        stdout: collect(out_rx),
        stderr: collect(err_rx),
    }
}

/// Reads a pipe to its end on a thread (so a chatty child never blocks on a full pipe).
fn drain<R: std::io::Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut p) = pipe {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = p.read_to_end(&mut s);
            let _ = tx.send(String::from_utf8_lossy(&s).into_owned());
        });
    }
    rx
}

fn collect(rx: mpsc::Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default()
}

/// Lines of a child's pipe, delivered as they are written.
pub fn lines<R: std::io::Read + Send + 'static>(pipe: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (bounded) for a line containing `needle`; returns the lines seen until then.
#[track_caller]
pub fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.contains(needle);
                seen.push(l);
                if hit {
                    return seen;
                }
            }
            Err(_) => panic!("no line containing {needle:?} within {within:?}; saw: {seen:?}"),
        }
    }
}

/// Waits (bounded) for a child to exit; kills it by PID and fails past the deadline.
#[track_caller]
pub fn wait_exit(child: &mut Child, within: Duration, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return s,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not exit within {within:?}");
            }
        }
    }
}

/// Creates a user through the CLI; returns its token.
pub fn user(node: &Node, name: &str) -> String {
    let token = node.cli(None, &["user", "create", name]).ok().to_owned();
    assert!(
        !token.is_empty() && !token.contains('\n'),
        "token for {name}: {token:?}"
    );
    token
}

/// The node's `/metrics` (Prometheus text) as sample name (with labels) -> value.
pub fn metrics(node: &Node) -> std::collections::HashMap<String, f64> {
    use std::io::{Read, Write};
    let addr = node.bound.http.expect("the node serves HTTP");
    let mut s = std::net::TcpStream::connect_timeout(&addr, CLI_TIMEOUT).expect("connect");
    s.set_read_timeout(Some(CLI_TIMEOUT)).expect("timeout");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            Some((name.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Whether every partition of a three-node, 16-partition cluster is led by its
/// preferred node (`consensus::balance`), as `node`'s `cluster status` shows it.
pub fn leaders_balanced(node: &Node) -> bool {
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let plan = parley_node::consensus::ClusterPlan::genesis(&[1, 2, 3].map(|n| (n, any)), 16, 3);
    let preferred = plan.preferred_leaders();
    let lines = node.cli(None, &["--json", "cluster", "status"]).json();
    let led: Vec<(u32, Option<u64>, Option<u64>)> = lines
        .iter()
        .filter_map(|g| {
            let p = g
                .get("group")?
                .as_str()?
                .strip_prefix('p')?
                .parse::<u32>()
                .ok()?;
            Some((p, g["leader"].as_u64(), g["preferred_leader"].as_u64()))
        })
        .collect();
    let want = |p: u32| {
        preferred
            .get(&parley_node::ids::PartitionId(p).group())
            .copied()
    };
    // The node names the same preferred leaders as the plan computed here.
    assert!(
        led.iter().all(|(p, _, shown)| *shown == want(*p)),
        "cluster status shows other preferred leaders: {led:?}"
    );
    led.len() == 16 && led.iter().all(|(p, l, _)| *l == want(*p))
}

/// Waits (at most 40 s) until the leaderships of a fresh three-node cluster have
/// settled on their preferred nodes: for tests that read a group's term or leader and
/// need it to stay put. How long it took.
pub fn wait_balanced(node: &Node) -> Duration {
    let start = Instant::now();
    while !leaders_balanced(node) {
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "partition leaderships did not settle on their preferred nodes within 40 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    start.elapsed()
}

/// A room's history as JSON messages (oldest first), as `who` sees it.
pub fn history(node: &Node, token: &str, room: &str) -> Vec<serde_json::Value> {
    node.cli(Some(token), &["--json", "history", room, "--limit", "1000"])
        .json()
}

/// A room's members as (user, role) pairs, as `who` sees them (banned users excluded).
pub fn members(node: &Node, token: &str, room: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = node
        .cli(Some(token), &["--json", "room", "members", room])
        .json()
        .into_iter()
        .filter(|m| m["banned"] != serde_json::Value::Bool(true))
        .map(|m| {
            (
                m["user"].as_str().unwrap_or_default().to_owned(),
                m["role"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Every message of a room, paging with `after` (bounded), oldest first.
pub async fn all_messages(c: &mut Client, room: &str) -> Result<Vec<pb::Message>, tonic::Status> {
    let mut out: Vec<pb::Message> = Vec::new();
    let mut after = String::new();
    for _ in 0..10_000 {
        let page = c
            .history(pb::HistoryRequest {
                room: room.to_owned(),
                limit: 1000,
                after: after.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let Some(last) = page.messages.last() else {
            break;
        };
        after = last.id.clone();
        let more = page.more;
        out.extend(page.messages);
        if !more {
            break;
        }
    }
    Ok(out)
}

/// `s` as an OS string (for [`Node::cli_os`]).
pub fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_owned()
}

/// A free TCP port on 127.0.0.1 (bound then released; cluster nodes need fixed ports
/// because Raft membership names each node's gRPC address).
///
/// Ports come from below Linux's ephemeral range (32768 and up), so that between the
/// release here and the node's bind an outgoing connection cannot take the port as its
/// local port: with `bind(0)`, a CI run once lost a node that way (its peers waited for
/// it until their genesis timeout). Each port is handed out once per test process; the
/// walk starts at an offset drawn from the PID so that test processes rarely overlap.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    let _ = NEXT.compare_exchange(u32::MAX, start, SeqCst, SeqCst);
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// N `parley serve` processes forming one cluster (`--bootstrap-expect N`, every node
/// joining the first), each on fixed ports so that it can be killed and restarted.
pub struct Cluster {
    pub nodes: Vec<Node>,
    args: Vec<Vec<String>>,
    seed: String,
}

impl Cluster {
    pub fn start(n: usize) -> Self {
        Self::start_with(n, &[])
    }

    /// Like `start`, with `extra` serve flags on every node.
    pub fn start_with(n: usize, extra: &[&str]) -> Self {
        let ports: Vec<(u16, u16, u16)> = (0..n)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let seed = format!("/ip4/127.0.0.1/tcp/{}", ports[0].2);
        let mut args = Vec::new();
        let mut started = Vec::new();
        for (i, (g, h, p)) in ports.iter().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix("parley-cluster-")
                .tempdir()
                .expect("temp dir");
            std::fs::create_dir_all(dir.path().join("logs")).expect("logs dir");
            let mut a: Vec<String> = vec![
                "--listen".into(),
                format!("127.0.0.1:{g}"),
                "--http".into(),
                format!("127.0.0.1:{h}"),
                "--p2p".into(),
                format!("/ip4/127.0.0.1/tcp/{p}"),
                "--bootstrap-expect".into(),
                n.to_string(),
                "--node-id".into(),
                (i + 1).to_string(),
                "--genesis-timeout".into(),
                "60".into(),
            ];
            if i > 0 {
                a.push("--join".into());
                a.push(seed.clone());
            }
            a.extend(extra.iter().map(|x| x.to_string()));
            let child = spawn_child(dir.path(), 0, &a);
            started.push((dir, child));
            args.push(a);
        }
        let nodes = started
            .into_iter()
            .map(|(dir, child)| {
                let (child, bound) = wait_bound(dir.path(), child, Duration::from_secs(90));
                Node {
                    child: Some(child),
                    dir,
                    bound,
                    starts: 1,
                    extra: Vec::new(),
                }
            })
            .collect();
        let c = Self { nodes, args, seed };
        // Tests start from the steady state: the handovers that spread a fresh cluster's
        // leaderships (a dozen leader changes in its first seconds) are over. The bench
        // measures sends during them.
        if n == 3 {
            let took = wait_balanced(&c.nodes[0]);
            eprintln!(
                "leaderships settled on their preferred nodes after {} ms",
                took.as_millis()
            );
        }
        c
    }

    /// Starts a fresh node that joins the formed cluster through the first node (no
    /// `--bootstrap-expect`); returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let dir = tempfile::Builder::new()
            .prefix("parley-cluster-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir_all(dir.path().join("logs")).expect("logs dir");
        let a: Vec<String> = vec![
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--http".into(),
            format!("127.0.0.1:{}", free_port()),
            "--p2p".into(),
            format!("/ip4/127.0.0.1/tcp/{}", free_port()),
            "--node-id".into(),
            (i + 1).to_string(),
            "--join".into(),
            self.seed.clone(),
            "--genesis-timeout".into(),
            "60".into(),
        ];
        let child = spawn_child(dir.path(), 0, &a);
        let (child, bound) = wait_bound(dir.path(), child, Duration::from_secs(90));
        self.nodes.push(Node {
            child: Some(child),
            dir,
            bound,
            starts: 1,
            extra: Vec::new(),
        });
        self.args.push(a);
        i
    }

    /// Starts node `i` again on its data dir and ports (killing it first if it runs).
    pub fn restart(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.kill9();
        let _ = std::fs::remove_file(node.data_dir().join("node.json"));
        let child = spawn_child(node.dir.path(), node.starts, &self.args[i]);
        let (child, bound) = wait_bound(node.dir.path(), child, Duration::from_secs(60));
        node.starts += 1;
        node.child = Some(child);
        node.bound = bound;
    }

    /// Every node's logs, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(Node::logs)
            .collect::<Vec<_>>()
            .join("\n")
    }
}
