//! Nemeses: the faults, a schedule drawn from a seed, and applying and healing them
//! on the live cluster.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::history::{Op, Type};
use crate::net::{cut, Block, Hosts, Netem};
use crate::nodes::{self, Node};
use crate::recorder::Recorder;

/// Every fault the harness can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// One node cut off from the others.
    PartitionOne,
    /// A minority (n/2 nodes, at least one) cut off from the majority.
    PartitionMajority,
    /// A–B and B–C up, A–C down.
    PartitionBridge,
    /// The leader of a random partition's Raft group cut off.
    PartitionLeader,
    /// One direction only: B stops hearing A.
    DropOneWay,
    KillOne,
    KillLeader,
    KillMajority,
    KillAll,
    /// SIGSTOP for the hold time (longer than the election timeout).
    PauseOne,
    PauseLeader,
    /// netem delay, loss, duplication and reordering on every node.
    Netem,
    /// Wall clocks moved by up to ±30 s per node.
    Clock,
}

pub const ALL: [Fault; 13] = [
    Fault::PartitionOne,
    Fault::PartitionMajority,
    Fault::PartitionBridge,
    Fault::PartitionLeader,
    Fault::DropOneWay,
    Fault::KillOne,
    Fault::KillLeader,
    Fault::KillMajority,
    Fault::KillAll,
    Fault::PauseOne,
    Fault::PauseLeader,
    Fault::Netem,
    Fault::Clock,
];

impl Fault {
    pub fn name(self) -> &'static str {
        match self {
            Fault::PartitionOne => "partition-one",
            Fault::PartitionMajority => "partition-majority",
            Fault::PartitionBridge => "partition-bridge",
            Fault::PartitionLeader => "partition-leader",
            Fault::DropOneWay => "drop-one-way",
            Fault::KillOne => "kill-one",
            Fault::KillLeader => "kill-leader",
            Fault::KillMajority => "kill-majority",
            Fault::KillAll => "kill-all",
            Fault::PauseOne => "pause-one",
            Fault::PauseLeader => "pause-leader",
            Fault::Netem => "netem",
            Fault::Clock => "clock",
        }
    }

    /// The family a `--nemesis` name selects.
    pub fn family(self) -> &'static str {
        match self {
            Fault::PartitionOne
            | Fault::PartitionMajority
            | Fault::PartitionBridge
            | Fault::PartitionLeader
            | Fault::DropOneWay => "partition",
            Fault::KillOne | Fault::KillLeader | Fault::KillMajority | Fault::KillAll => "kill",
            Fault::PauseOne | Fault::PauseLeader => "pause",
            Fault::Netem => "netem",
            Fault::Clock => "clock",
        }
    }
}

/// Parses `--nemesis`: families (partition, kill, pause, netem, clock), single
/// faults by name, `all`, or `none`.
pub fn parse(spec: &str) -> Result<Vec<Fault>> {
    let mut out = BTreeSet::new();
    for word in spec.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match word {
            "all" => out.extend(ALL),
            "none" => {}
            w => {
                let hit: Vec<Fault> = ALL
                    .iter()
                    .copied()
                    .filter(|f| f.family() == w || f.name() == w)
                    .collect();
                if hit.is_empty() {
                    bail!("unknown nemesis `{w}`: use partition, kill, pause, netem, clock, all, none, or one of {}",
                        ALL.iter().map(|f| f.name()).collect::<Vec<_>>().join(", "));
                }
                out.extend(hit);
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// One fault window.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// From the start of the faulty phase.
    pub at: Duration,
    pub hold: Duration,
    pub fault: Fault,
    /// Random number for choosing targets when the fault is applied.
    pub pick: u64,
}

/// The mixed schedule: faults drawn at random, each held ~`hold` then healed for
/// ~`quiet`, until `total`.
pub fn mixed(
    faults: &[Fault],
    total: Duration,
    hold: Duration,
    quiet: Duration,
    seed: u64,
) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    if faults.is_empty() {
        return out;
    }
    let mut at = quiet / 2;
    // Bounded by `total` and a hard cap on steps.
    while at + hold <= total && out.len() < 10_000 {
        let jitter = |rng: &mut StdRng, d: Duration| {
            let ms = d.as_millis() as u64;
            Duration::from_millis(ms * 8 / 10 + rng.gen_range(0..=ms * 4 / 10))
        };
        let h = jitter(&mut rng, hold);
        let fault = faults[rng.gen_range(0..faults.len())];
        out.push(Step {
            at,
            hold: h,
            fault,
            pick: rng.gen(),
        });
        at += h + jitter(&mut rng, quiet);
    }
    out
}

/// Every fault once, in an order drawn from the seed: the short CI schedule.
pub fn each_once(faults: &[Fault], hold: Duration, quiet: Duration, seed: u64) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order = faults.to_vec();
    order.shuffle(&mut rng);
    let mut at = quiet / 2;
    order
        .into_iter()
        .map(|fault| {
            let s = Step {
                at,
                hold,
                fault,
                pick: rng.gen(),
            };
            at += hold + quiet;
            s
        })
        .collect()
}

/// Records in the history that netem ran in its fallback form on this kernel.
fn tracing_note(rec: &Recorder, how: &str) {
    rec.nemesis(
        Type::Info,
        Op::Nemesis {
            fault: "netem-mode".into(),
            start: true,
            targets: vec![],
            detail: Some(format!(
                "{how}: this kernel has no netem qdisc; bandwidth cap with queueing delay, random loss and duplication instead (no reordering)"
            )),
        },
    );
}

/// The nodes and the network, owned by the nemesis.
pub struct Cluster {
    pub hosts: Hosts,
    pub nodes: Vec<Node>,
    pub parley: PathBuf,
    pub partitions: u32,
}

/// What an applied fault changed, to undo it.
#[derive(Debug, Default)]
pub struct Active {
    pub fault: Option<Fault>,
    pub targets: Vec<usize>,
    blocked: bool,
    killed: Vec<usize>,
    paused: Vec<usize>,
    netem: Vec<usize>,
    clocks: Vec<usize>,
}

impl Cluster {
    pub fn names(&self, idx: &[usize]) -> Vec<String> {
        idx.iter().map(|&i| self.nodes[i].name.clone()).collect()
    }

    /// The node index leading partition group `1 + pick % partitions`, asking live
    /// nodes; falls back to a node drawn from `pick`.
    async fn leader(&self, pick: u64) -> (usize, String) {
        let n = self.nodes.len();
        let group = 1 + (pick % u64::from(self.partitions.max(1))) as u32;
        for node in &self.nodes {
            if node.paused {
                continue;
            }
            if let Ok(s) = nodes::status(&node.grpc, Duration::from_millis(800)).await {
                if let Some(g) = s.groups.iter().find(|g| g.group == group) {
                    if g.leader >= 1 && (g.leader as usize) <= n {
                        return ((g.leader - 1) as usize, format!("leader of group {group}"));
                    }
                }
            }
        }
        (
            (pick as usize) % n,
            format!("group {group} had no known leader; a random node"),
        )
    }

    /// Applies `step`'s fault and records it.
    pub async fn apply(&mut self, step: &Step, rec: &Recorder) -> Result<Active> {
        let n = self.nodes.len();
        let mut rng = StdRng::seed_from_u64(step.pick);
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let mut act = Active {
            fault: Some(step.fault),
            ..Active::default()
        };
        let mut detail = None;
        let targets: Vec<usize> = match step.fault {
            Fault::PartitionOne => vec![order[0]],
            Fault::PartitionMajority => order[..(n / 2).max(1)].to_vec(),
            Fault::PartitionBridge | Fault::DropOneWay => order.clone(),
            Fault::PartitionLeader | Fault::KillLeader | Fault::PauseLeader => {
                let (l, why) = self.leader(step.pick).await;
                detail = Some(why);
                vec![l]
            }
            Fault::KillOne | Fault::PauseOne => vec![order[0]],
            Fault::KillMajority => order[..n / 2 + 1].to_vec(),
            Fault::KillAll | Fault::Netem | Fault::Clock => (0..n).collect(),
        };
        let mut offsets = Vec::new();
        if step.fault == Fault::Clock {
            for _ in 0..n {
                offsets.push(rng.gen_range(-30i64..=30));
            }
            if offsets.iter().all(|o| *o == 0) {
                offsets[0] = 17;
            }
            detail = Some(format!("offsets (s): {offsets:?}"));
        }
        let netem = Netem {
            delay_ms: 40,
            jitter_ms: 20,
            loss_pct: 5.0,
            duplicate_pct: 2.0,
            reorder_pct: 10.0,
        };
        if step.fault == Fault::Netem {
            detail = Some(format!("{netem:?}"));
        }
        let blocks: BTreeSet<Block> = match step.fault {
            Fault::PartitionOne | Fault::PartitionMajority | Fault::PartitionLeader => {
                let rest: Vec<usize> = (0..n).filter(|i| !targets.contains(i)).collect();
                cut(&targets, &rest)
            }
            Fault::PartitionBridge => {
                // order[1] is the bridge: everyone else is split into two sides.
                let (a, c): (Vec<usize>, Vec<usize>) =
                    order[2..].iter().partition(|i| **i % 2 == 0);
                let mut side_a = vec![order[0]];
                side_a.extend(a);
                detail = Some(format!("bridge {}", self.nodes[order[1]].name));
                cut(&side_a, &c)
            }
            Fault::DropOneWay => {
                detail = Some(format!(
                    "{} stops hearing {}",
                    self.nodes[order[1]].name, self.nodes[order[0]].name
                ));
                [Block {
                    from: order[0],
                    to: order[1],
                }]
                .into_iter()
                .collect()
            }
            _ => BTreeSet::new(),
        };
        let names = self.names(&targets);
        let op = |start: bool| Op::Nemesis {
            fault: step.fault.name().to_string(),
            start,
            targets: names.clone(),
            detail: detail.clone(),
        };
        rec.nemesis(Type::Invoke, op(true));
        let mut mode_noted = false;
        let result = async {
            match step.fault {
                Fault::PartitionOne
                | Fault::PartitionMajority
                | Fault::PartitionLeader
                | Fault::PartitionBridge
                | Fault::DropOneWay => {
                    self.hosts.set_blocks(&blocks)?;
                    act.blocked = true;
                }
                Fault::KillOne | Fault::KillLeader | Fault::KillMajority | Fault::KillAll => {
                    for &i in &targets {
                        self.nodes[i].kill()?;
                        act.killed.push(i);
                    }
                }
                Fault::PauseOne | Fault::PauseLeader => {
                    for &i in &targets {
                        self.nodes[i].pause()?;
                        act.paused.push(i);
                    }
                }
                Fault::Netem => {
                    for &i in &targets {
                        let how = self.hosts.set_netem(i, Some(&netem))?;
                        act.netem.push(i);
                        if how != "netem" && !mode_noted {
                            mode_noted = true;
                            tracing_note(rec, how);
                        }
                    }
                }
                Fault::Clock => {
                    for &i in &targets {
                        self.nodes[i].set_clock(offsets[i])?;
                        act.clocks.push(i);
                    }
                }
            }
            anyhow::Ok(())
        }
        .await;
        act.targets = targets.clone();
        match result {
            Ok(()) => {
                rec.nemesis(Type::Ok, op(true));
                Ok(act)
            }
            Err(e) => {
                rec.nemesis(Type::Info, op(true));
                // Undo whatever part was applied before reporting.
                let _ = self.heal(&mut act, rec).await;
                Err(e)
            }
        }
    }

    /// Undoes `act` and records the end of the fault.
    pub async fn heal(&mut self, act: &mut Active, rec: &Recorder) -> Result<()> {
        let Some(fault) = act.fault.take() else {
            return Ok(());
        };
        let op = Op::Nemesis {
            fault: fault.name().to_string(),
            start: false,
            targets: self.names(&act.targets),
            detail: None,
        };
        rec.nemesis(Type::Invoke, op.clone());
        let mut first_err = None;
        if act.blocked {
            if let Err(e) = self.hosts.set_blocks(&BTreeSet::new()) {
                first_err.get_or_insert(e);
            }
        }
        for &i in &act.paused {
            if let Err(e) = self.nodes[i].resume() {
                first_err.get_or_insert(e);
            }
        }
        for &i in &act.netem {
            if let Err(e) = self.hosts.set_netem(i, None).map(|_| ()) {
                first_err.get_or_insert(e);
            }
        }
        for &i in &act.clocks {
            if let Err(e) = self.nodes[i].set_clock(0) {
                first_err.get_or_insert(e);
            }
        }
        for &i in &act.killed {
            if let Err(e) = self.nodes[i].start(&self.parley.clone()) {
                first_err.get_or_insert(e);
            }
        }
        *act = Active::default();
        match first_err {
            None => {
                rec.nemesis(Type::Ok, op);
                Ok(())
            }
            Some(e) => {
                rec.nemesis(Type::Info, op);
                Err(e)
            }
        }
    }

    /// Heals everything regardless of what is recorded as active: no rules, no
    /// netem, true clocks, nothing paused, every node running.
    pub fn heal_all(&mut self) -> Result<()> {
        self.hosts.set_blocks(&BTreeSet::new())?;
        for i in 0..self.nodes.len() {
            self.hosts.set_netem(i, None)?;
            self.nodes[i].set_clock(0).or_else(|e| {
                if nodes::libfaketime().is_none() {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            self.nodes[i].resume()?;
            if !self.nodes[i].running() {
                let parley = self.parley.clone();
                self.nodes[i].start(&parley)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parse_families_names_and_errors() {
        assert_eq!(parse("partition").unwrap().len(), 5);
        assert_eq!(parse("kill,clock").unwrap().len(), 5);
        assert_eq!(parse("all").unwrap().len(), ALL.len());
        assert_eq!(parse("kill-leader").unwrap(), vec![Fault::KillLeader]);
        assert!(parse("none").unwrap().is_empty());
        let e = parse("partition,earthquake").unwrap_err().to_string();
        assert!(e.contains("earthquake"), "{e}");
    }

    #[test]
    fn schedules_are_reproducible_from_the_seed() {
        let f = parse("all").unwrap();
        let a = mixed(
            &f,
            Duration::from_secs(600),
            Duration::from_secs(10),
            Duration::from_secs(10),
            7,
        );
        let b = mixed(
            &f,
            Duration::from_secs(600),
            Duration::from_secs(10),
            Duration::from_secs(10),
            7,
        );
        let c = mixed(
            &f,
            Duration::from_secs(600),
            Duration::from_secs(10),
            Duration::from_secs(10),
            8,
        );
        let key = |s: &[Step]| {
            s.iter()
                .map(|x| (x.at, x.fault, x.pick))
                .collect::<Vec<_>>()
        };
        assert_eq!(key(&a), key(&b));
        assert_ne!(key(&a), key(&c));
        assert!(a.len() >= 20, "{}", a.len());
        for w in a.windows(2) {
            assert!(w[0].at + w[0].hold < w[1].at, "windows overlap");
        }
        assert!(a
            .last()
            .map(|s| s.at + s.hold <= Duration::from_secs(600))
            .unwrap());
    }

    #[test]
    fn the_ci_schedule_has_every_fault_once() {
        let f = parse("all").unwrap();
        let s = each_once(&f, Duration::from_secs(8), Duration::from_secs(4), 1);
        let got: BTreeSet<Fault> = s.iter().map(|x| x.fault).collect();
        assert_eq!(got.len(), ALL.len());
        assert_eq!(s.len(), ALL.len());
    }
}
