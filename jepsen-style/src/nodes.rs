//! Parley nodes, one per namespace, started and stopped by PID.
//!
//! A node runs as `ip netns exec <ns> parley serve ...`; `ip netns exec` switches
//! namespace and then execs parley, so the child's PID is the node's PID. Every node
//! runs under libfaketime with a per-node offset file (monotonic time untouched), so
//! the clock nemesis can move a live node's wall clock.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use parley_proto::v1::chat_client::ChatClient;
use parley_proto::v1::{ClusterStatusRequest, ClusterStatusResponse};
use tonic::transport::{Channel, Endpoint};

use crate::net::Hosts;

pub const GRPC_PORT: u16 = 7100;
pub const HTTP_PORT: u16 = 7180;
pub const P2P_PORT: u16 = 7200;

/// Where libfaketime lives on Debian (the MT variant: parley is multi-threaded).
pub fn libfaketime() -> Option<PathBuf> {
    let dirs = [
        "/usr/lib/x86_64-linux-gnu/faketime",
        "/usr/lib/aarch64-linux-gnu/faketime",
        "/usr/lib/faketime",
    ];
    dirs.iter()
        .map(|d| Path::new(d).join("libfaketimeMT.so.1"))
        .find(|p| p.exists())
}

pub struct Node {
    /// 0-based index; the node id is index + 1 and its name "n{index+1}".
    pub index: usize,
    pub name: String,
    pub ns: String,
    pub grpc: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub clock_file: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    pub paused: bool,
    /// Wall-clock offset in effect (seconds).
    pub clock_offset_s: i64,
}

/// Node settings the harness passes to every node.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub presence_ttl_s: u64,
    pub partitions: u32,
}

impl Node {
    pub fn plan(hosts: &Hosts, index: usize, dir: &Path, s: &NodeSettings) -> Node {
        let name = format!("n{}", index + 1);
        let addr = hosts.addr(index);
        let data_dir = dir.join("nodes").join(&name);
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            format!("{addr}:{GRPC_PORT}"),
            "--http".into(),
            format!("{addr}:{HTTP_PORT}"),
            "--p2p".into(),
            format!("/ip4/{addr}/tcp/{P2P_PORT}"),
            "--node-id".into(),
            (index + 1).to_string(),
            "--bootstrap-expect".into(),
            hosts.len().to_string(),
            "--partitions".into(),
            s.partitions.to_string(),
            "--presence-ttl".into(),
            s.presence_ttl_s.to_string(),
            "--genesis-timeout".into(),
            "120".into(),
        ];
        if index > 0 {
            args.push("--join".into());
            args.push(format!("/ip4/{}/tcp/{P2P_PORT}", hosts.addr(0)));
        }
        Node {
            index,
            ns: hosts.namespaces[index].clone(),
            grpc: format!("http://{addr}:{GRPC_PORT}"),
            log: dir.join("nodes").join(format!("{name}.log")),
            clock_file: dir.join("nodes").join(format!("{name}.faketime")),
            name,
            data_dir,
            args,
            child: None,
            paused: false,
            clock_offset_s: 0,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process this harness started is still running (reaps it if not).
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn start(&mut self, parley: &Path) -> Result<()> {
        if self.running() {
            bail!("{} is already running", self.name);
        }
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating {}", self.data_dir.display()))?;
        self.write_clock()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let err = log.try_clone()?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(parley)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("PARLEY_JEPSEN_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("PARLEY_NODE")
            .env_remove("PARLEY_TOKEN")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        if let Some(lib) = libfaketime() {
            cmd.env("LD_PRELOAD", lib)
                .env("FAKETIME_TIMESTAMP_FILE", &self.clock_file)
                .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
                .env("FAKETIME_CACHE_DURATION", "1");
        }
        use std::os::unix::process::CommandExt as _;
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} in {}", parley.display(), self.ns))?;
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    fn write_clock(&self) -> Result<()> {
        let text = if self.clock_offset_s >= 0 {
            format!("+{}s\n", self.clock_offset_s)
        } else {
            format!("{}s\n", self.clock_offset_s)
        };
        std::fs::write(&self.clock_file, text)
            .with_context(|| format!("writing {}", self.clock_file.display()))
    }

    /// Moves this node's wall clock by `offset_s` from true time (live: libfaketime
    /// re-reads the file every second).
    pub fn set_clock(&mut self, offset_s: i64) -> Result<()> {
        if libfaketime().is_none() {
            bail!("libfaketime is not installed (scripts/setup.sh installs it)");
        }
        self.clock_offset_s = offset_s;
        self.write_clock()
    }

    pub fn signal(&self, sig: &str) -> Result<()> {
        let Some(pid) = self.pid() else {
            bail!("{} has no process", self.name);
        };
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running kill(1)")?;
        if !status.success() {
            bail!("kill -{sig} {pid} ({}) failed", self.name);
        }
        Ok(())
    }

    /// SIGKILL and reap. A paused process dies too (SIGKILL needs no CONT).
    pub fn kill(&mut self) -> Result<()> {
        if self.running() {
            self.signal("KILL")?;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        self.paused = false;
        Ok(())
    }

    pub fn pause(&mut self) -> Result<()> {
        self.signal("STOP")?;
        self.paused = true;
        Ok(())
    }

    pub fn resume(&mut self) -> Result<()> {
        if self.paused && self.running() {
            self.signal("CONT")?;
        }
        self.paused = false;
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`; always reaps.
    pub fn stop(&mut self, grace: Duration) {
        if self.running() {
            let _ = self.resume();
            let _ = self.signal("TERM");
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && self.running() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.kill();
    }

    pub fn channel(&self, timeout: Duration) -> Result<Channel> {
        Ok(Endpoint::from_shared(self.grpc.clone())?
            .connect_timeout(Duration::from_secs(1))
            .timeout(timeout)
            .tcp_nodelay(true)
            .connect_lazy())
    }

    /// The last lines of the node's log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// One `ClusterStatus` call.
pub async fn status(grpc: &str, timeout: Duration) -> Result<ClusterStatusResponse> {
    let ch = Endpoint::from_shared(grpc.to_string())?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await?;
    let mut c = ChatClient::new(ch);
    Ok(c.cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner())
}

/// Whether every group the node knows has a leader, as that node sees it.
pub fn all_led(s: &ClusterStatusResponse) -> bool {
    !s.groups.is_empty() && s.groups.iter().all(|g| g.leader != 0)
}
