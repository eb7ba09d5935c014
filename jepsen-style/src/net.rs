//! Hosts: one network namespace per node, each with a veth pair into one bridge in
//! the harness's namespace, on a private /24 picked per run. The harness (and its
//! clients) reach every node through the bridge; faults are nftables rules and
//! `tc netem` qdiscs *inside* the node namespaces, so the machine's own network is
//! never touched.
//!
//! Everything made is recorded in `DIR/hosts.json` before it is made, so
//! `jepsen cleanup --out DIR` removes it even after the harness itself was killed.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// What a run created, for cleanup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hosts {
    /// Short run tag in every name (`pj<tag>...`), 4 hex digits.
    pub tag: String,
    pub bridge: String,
    /// The third octet of 10.213.X.0/24.
    pub subnet: u8,
    pub namespaces: Vec<String>,
    /// Host-side veth ends.
    pub veths: Vec<String>,
    #[serde(skip)]
    state_file: PathBuf,
}

/// A blocked direction: packets from node `from` to node `to` are dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Block {
    pub from: usize,
    pub to: usize,
}

/// netem parameters for one node's interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Netem {
    pub delay_ms: u32,
    pub jitter_ms: u32,
    pub loss_pct: f32,
    pub duplicate_pct: f32,
    pub reorder_pct: f32,
}

impl Netem {
    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "delay".to_string(),
            format!("{}ms", self.delay_ms),
            format!("{}ms", self.jitter_ms),
        ];
        if self.loss_pct > 0.0 {
            a.extend(["loss".into(), format!("{}%", self.loss_pct)]);
        }
        if self.duplicate_pct > 0.0 {
            a.extend(["duplicate".into(), format!("{}%", self.duplicate_pct)]);
        }
        if self.reorder_pct > 0.0 {
            a.extend(["reorder".into(), format!("{}%", self.reorder_pct)]);
        }
        a
    }
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("running {cmd} (is it installed? scripts/setup.sh installs it)")
        })?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn run_stdin(cmd: &str, args: &[&str], input: &str) -> Result<()> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed: {}\ninput:\n{input}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Hosts {
    /// Creates `n` namespaces on a fresh bridge. Fails cleanly (removing what it
    /// made) if namespaces cannot be made here (not root, no iproute2).
    pub fn create(dir: &Path, n: usize, seed: u64) -> Result<Hosts> {
        if n == 0 || n > 9 {
            bail!("between 1 and 9 nodes");
        }
        // Tag and subnet from the process id and the seed, so two runs at once on one
        // machine (a CI run beside a manual one) do not collide; a clash is detected
        // below (the bridge or a namespace already exists) and reported.
        let mix = (u64::from(std::process::id()) << 16) ^ seed.rotate_left(7);
        let tag = format!("{:04x}", mix & 0xffff);
        let subnet = 1 + ((mix >> 16) % 250) as u8;
        let mut hosts = Hosts {
            bridge: format!("pj{tag}br"),
            namespaces: (1..=n).map(|i| format!("pj{tag}-n{i}")).collect(),
            veths: (1..=n).map(|i| format!("pj{tag}v{i}")).collect(),
            tag,
            subnet,
            state_file: dir.join("hosts.json"),
        };
        hosts.save()?;
        if let Err(e) = hosts.build() {
            hosts.destroy();
            return Err(e.context(
                "creating the network namespaces (the harness needs root and iproute2; run scripts/setup.sh)",
            ));
        }
        Ok(hosts)
    }

    fn save(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&self.state_file, text)
            .with_context(|| format!("writing {}", self.state_file.display()))
    }

    /// Reads what an earlier run recorded.
    pub fn load(dir: &Path) -> Result<Hosts> {
        let path = dir.join("hosts.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut h: Hosts =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        h.state_file = path;
        Ok(h)
    }

    fn build(&mut self) -> Result<()> {
        let br = self.bridge.as_str();
        run("ip", &["link", "add", br, "type", "bridge"])?;
        run(
            "ip",
            &["addr", "add", &format!("{}/24", self.gateway()), "dev", br],
        )?;
        run("ip", &["link", "set", br, "up"])?;
        for i in 0..self.namespaces.len() {
            let ns = self.namespaces[i].clone();
            let veth = self.veths[i].clone();
            let peer = format!("{veth}p");
            run("ip", &["netns", "add", &ns])?;
            run(
                "ip",
                &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            )?;
            run("ip", &["link", "set", &peer, "netns", &ns])?;
            run("ip", &["-n", &ns, "link", "set", &peer, "name", "eth0"])?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{}/24", self.addr(i)),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run("ip", &["link", "set", &veth, "master", br, "up"])?;
        }
        Ok(())
    }

    /// The bridge's address (the harness side).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 1)
    }

    /// Node `i`'s (0-based) address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.subnet, 11 + i as u8)
    }

    pub fn len(&self) -> usize {
        self.namespaces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
    }

    /// Replaces every node's filter with exactly `blocks` (empty = heal). Each
    /// namespace gets one nftables table, replaced atomically.
    pub fn set_blocks(&self, blocks: &BTreeSet<Block>) -> Result<()> {
        for (i, ns) in self.namespaces.iter().enumerate() {
            let script = nft_script(i, blocks, |j| self.addr(j));
            run_stdin("ip", &["netns", "exec", ns, "nft", "-f", "-"], &script)?;
        }
        Ok(())
    }

    /// Puts netem on node `i`'s interface (`None` removes it). Returns how: "netem",
    /// or, on kernels without the netem qdisc (sch_netem), "tbf+nft": a token bucket
    /// (bandwidth cap, queueing delay up to 100 ms) plus nftables random loss and
    /// duplication on egress (no reordering, no fixed delay).
    pub fn set_netem(&self, i: usize, netem: Option<&Netem>) -> Result<&'static str> {
        let ns = &self.namespaces[i];
        // Remove whatever is there; "no qdisc"/"no table" errors are fine.
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        quiet(&[
            "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root",
        ]);
        quiet(&[
            "netns",
            "exec",
            ns,
            "nft",
            "delete",
            "table",
            "netdev",
            "parley_jepsen_netem",
        ]);
        let Some(n) = netem else {
            return Ok("off");
        };
        let mut args: Vec<String> = [
            "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "netem",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(n.args());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        match run("ip", &refs) {
            Ok(()) => Ok("netem"),
            Err(e) if e.to_string().contains("qdisc kind is unknown") => {
                run(
                    "ip",
                    &[
                        "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                        "rate", "4mbit", "burst", "32kbit", "latency", "100ms",
                    ],
                )?;
                let script = format!(
                    "table netdev parley_jepsen_netem {{\n  chain egress {{\n    type filter hook egress device eth0 priority 0; policy accept;\n    numgen random mod 1000 < {} dup to eth0\n    numgen random mod 1000 < {} drop\n  }}\n}}\n",
                    (n.duplicate_pct * 10.0) as u32,
                    (n.loss_pct * 10.0) as u32
                );
                run_stdin("ip", &["netns", "exec", ns, "nft", "-f", "-"], &script)?;
                Ok("tbf+nft")
            }
            Err(e) => Err(e),
        }
    }

    /// Removes every namespace, veth and the bridge; keeps going past errors (some
    /// may never have been made) and reports the first real one.
    pub fn destroy(&self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for v in &self.veths {
            let _ = Command::new("ip")
                .args(["link", "del", v])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Whether any of this run's namespaces still exists.
    pub fn leftovers(&self) -> Vec<String> {
        let out = Command::new("ip").args(["netns", "list"]).output();
        let listed = out
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        self.namespaces
            .iter()
            .filter(|ns| {
                listed
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(ns.as_str()))
            })
            .cloned()
            .collect()
    }
}

/// The nftables script for node `me`: drop input from every node that is blocked
/// towards `me`, and output to every node `me` is blocked towards. Traffic from the
/// harness (the bridge address) is never dropped.
fn nft_script(me: usize, blocks: &BTreeSet<Block>, addr: impl Fn(usize) -> Ipv4Addr) -> String {
    let mut s = String::new();
    // `add` then `delete` makes the delete succeed whether or not the table existed.
    s.push_str("add table inet parley_jepsen\ndelete table inet parley_jepsen\n");
    s.push_str("table inet parley_jepsen {\n");
    s.push_str("  chain input {\n    type filter hook input priority 0; policy accept;\n");
    for b in blocks.iter().filter(|b| b.to == me) {
        s.push_str(&format!("    ip saddr {} drop\n", addr(b.from)));
    }
    s.push_str("  }\n");
    s.push_str("  chain output {\n    type filter hook output priority 0; policy accept;\n");
    for b in blocks.iter().filter(|b| b.from == me) {
        s.push_str(&format!("    ip daddr {} drop\n", addr(b.to)));
    }
    s.push_str("  }\n}\n");
    s
}

/// Both directions between every node of `a` and every node of `b`.
pub fn cut(a: &[usize], b: &[usize]) -> BTreeSet<Block> {
    let mut out = BTreeSet::new();
    for &x in a {
        for &y in b {
            if x != y {
                out.insert(Block { from: x, to: y });
                out.insert(Block { from: y, to: x });
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn nft_script_drops_only_the_blocked_directions() {
        let blocks: BTreeSet<Block> = [Block { from: 1, to: 0 }].into_iter().collect();
        let addr = |i: usize| Ipv4Addr::new(10, 213, 5, 11 + i as u8);
        let s0 = nft_script(0, &blocks, addr);
        assert!(s0.contains("ip saddr 10.213.5.12 drop"), "{s0}");
        assert!(!s0.contains("daddr"), "{s0}");
        let s1 = nft_script(1, &blocks, addr);
        assert!(s1.contains("ip daddr 10.213.5.11 drop"), "{s1}");
        assert!(!s1.contains("saddr"), "{s1}");
        let s2 = nft_script(2, &blocks, addr);
        assert!(!s2.contains("drop"), "{s2}");
    }

    #[test]
    fn cut_is_symmetric_and_skips_self() {
        let c = cut(&[0], &[1, 2]);
        assert_eq!(c.len(), 4);
        assert!(c.contains(&Block { from: 2, to: 0 }));
        assert!(cut(&[0, 1], &[1]).len() == 2);
    }
}
