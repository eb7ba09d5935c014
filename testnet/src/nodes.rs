//! `parley serve` child processes: start, wait until serving, watch, stop by PID.
//!
//! A node announces that it serves by writing `<data-dir>/node.json` (the node's
//! `Bound`). A data dir reused from an earlier run still holds the old file, so a node
//! counts as ready only when the file names the PID we started.
//!
//! Stopping is always by the PID of a child we spawned: SIGTERM (through `kill(1)`,
//! since this crate forbids `unsafe`), a bounded wait, then SIGKILL. A `NodeProc`
//! dropped while its child still runs sends SIGKILL, so an error path never leaves a
//! node behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tokio::process::{Child, Command};

/// How long a node may take to write `node.json`.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may take to exit after SIGTERM before it gets SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Mirror of `parley_node::node::Bound` (kept here so this binary does not build the node).
#[derive(Debug, Clone, Deserialize)]
pub struct Bound {
    pub node_id: u64,
    pub grpc: SocketAddr,
    pub http: Option<SocketAddr>,
    pub pid: u32,
}

/// A running `parley serve` that this process started.
pub struct NodeProc {
    pub name: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub bound: Bound,
    child: Child,
    pid: u32,
}

/// Finds the `parley` binary: `--parley PATH`, else beside this executable.
pub fn find_parley(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--parley {}: no such file", p.display());
    }
    let exe = std::env::current_exe().context("locating the testnet executable")?;
    let beside = exe.with_file_name("parley");
    if beside.is_file() {
        return Ok(beside);
    }
    bail!(
        "no `parley` binary at {}; build it (cargo build --release -p parley-node) or pass --parley PATH",
        beside.display()
    )
}

/// Starts `parley serve` on 127.0.0.1 with OS-chosen ports; output goes to `log`.
pub async fn start(name: &str, parley: &Path, data_dir: &Path, log: &Path) -> Result<NodeProc> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut child = Command::new(parley)
        .arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0"])
        .args(["--http", "127.0.0.1:0"])
        .args(["--p2p", "/ip4/127.0.0.1/tcp/0"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Own process group: a terminal's Ctrl-C reaches only testnet, which then
        // stops each node by PID (and can report what it stopped).
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", parley.display()))?;
    let pid = child.id().context("child exited before it had a pid")?;
    let node_json = data_dir.join("node.json");
    let deadline = Instant::now() + START_TIMEOUT;
    let bound = loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{name} (pid {pid}) exited during start with {status}; log {}:\n{}",
                log.display(),
                log_tail(log, 20)
            );
        }
        if let Some(bound) = read_bound(&node_json).filter(|b| b.pid == pid) {
            break bound;
        }
        if Instant::now() >= deadline {
            // Dropping `child` (kill_on_drop) stops it.
            bail!(
                "{name} (pid {pid}) did not write {} within {:?}; log {}:\n{}",
                node_json.display(),
                START_TIMEOUT,
                log.display(),
                log_tail(log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok(NodeProc {
        name: name.to_string(),
        data_dir: data_dir.to_path_buf(),
        log: log.to_path_buf(),
        bound,
        child,
        pid,
    })
}

fn read_bound(path: &Path) -> Option<Bound> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// The last `lines` lines of a log file (for error messages).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl NodeProc {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, wait up to [`STOP_GRACE`], then SIGKILL. Returns the exit status.
    pub async fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exited() {
            return Ok(status);
        }
        // The child is not reaped yet, so its PID cannot have been reused.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => {
                self.child.start_kill()?;
                let status = tokio::time::timeout(STOP_GRACE, self.child.wait())
                    .await
                    .context("process did not exit after SIGKILL")??;
                Ok(status)
            }
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.start_kill();
        }
    }
}

/// CPU time and memory of a process, from `/proc`.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct ProcSample {
    /// utime + stime, seconds.
    pub cpu_secs: f64,
    /// VmHWM: peak resident set, KiB.
    pub peak_rss_kib: u64,
    /// VmRSS: current resident set, KiB.
    pub rss_kib: u64,
}

/// Reads `/proc/PID/stat` and `/proc/PID/status`. `None` if the process is gone.
pub fn sample(pid: u32, clk_tck: f64) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(ProcSample {
        cpu_secs: parse_stat_cpu_ticks(&stat)? as f64 / clk_tck,
        peak_rss_kib: parse_status_kib(&status, "VmHWM").unwrap_or(0),
        rss_kib: parse_status_kib(&status, "VmRSS").unwrap_or(0),
    })
}

/// Clock ticks per second for `/proc/PID/stat` (`getconf CLK_TCK`, 100 on Linux).
pub fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime (fields 14 and 15) from a `/proc/PID/stat` line. The command name
/// (field 2) is in parentheses and may itself hold spaces and parentheses, so fields
/// are counted after the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 -> index 11.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `Key:   1234 kB` line from `/proc/PID/status`.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_name() {
        let stat = "4242 (par ley) (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 75 0 0 20 0 9 0 12345 1000000 2000 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn status_fields() {
        let status = "Name:\tparley\nVmHWM:\t  51234 kB\nVmRSS:\t   40000 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(51234));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(40000));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id(), clk_tck());
        assert!(matches!(s, Some(s) if s.peak_rss_kib > 0 && s.cpu_secs >= 0.0));
    }
}
