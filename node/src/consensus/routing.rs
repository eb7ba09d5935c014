//! Routing of writes and linearizable-read barriers to a partition's leader.
//!
//! One loop serves both: pick a target (this node if it leads the group, the leader it
//! knows of, or, on a node without a replica, the partition's planned replicas in turn),
//! run the operation there (locally, or over the `Forward` / `LinearizableBarrier` RPCs),
//! and on "not the leader" follow openraft's hint. With no leader in sight it backs off
//! and tries again until the route deadline, then fails with `Unavailable`.
//!
//! To stay correct:
//! - `Unavailable` only when nothing was proposed: the local leader refused before
//!   proposing (no recent quorum contact, ForwardToLeader), or the forward never reached
//!   the peer (blocked, refused connection). A proposal or forward that was sent but did
//!   not answer in time is `Timeout`: the command may still commit.
//! - Every loop is bounded: at most `MAX_ATTEMPTS` attempts and the route deadline; a
//!   forwarded request carries its remaining budget and hop count ([`MAX_HOPS`]), so a
//!   chain of forwards cannot outlive the original caller or cycle.

use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader};
use parley_proto::v1::{BarrierRequest, ForwardRequest};

use super::codec;
use super::groups::{fatal_err, ConsensusError, Group, Groups};
use super::peers::Peers;
use super::state;
use super::typ::{Node, RaftError, Reply};
use crate::ids::{GroupId, PartitionId};

/// How many times a request may be forwarded from node to node.
pub const MAX_HOPS: u32 = 3;

/// Upper bound on attempts of one routed operation (the deadline usually ends it first).
const MAX_ATTEMPTS: u32 = 200;

const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_millis(400);

/// How long a reachability probe of a peer may take when building an error message.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);

/// What is routed.
enum Op {
    Write(state::Command),
    Barrier,
}

/// What a routed operation returns.
enum Done {
    Outcome(state::Outcome),
    Index(Option<u64>),
}

/// Where to run the next attempt.
enum Target {
    Local,
    Remote(u64, String),
    Unknown(String),
}

/// The result of one attempt.
enum Step {
    Done(Result<Done, ConsensusError>),
    Retry {
        hint: Option<(u64, String)>,
        why: String,
    },
}

fn hint_of(f: &ForwardToLeader<u64, Node>) -> Option<(u64, String)> {
    f.leader_id
        .zip(f.leader_node.as_ref().map(|n| n.addr.clone()))
}

/// Resolves once the leader of `g` has not heard from a quorum for longer than `stale`
/// and a quorum of the group's voters has not answered any call lately (never for a
/// single-voter group, or if that does not happen within `timeout`). Acks that are only
/// slow (a starved machine) do not count as lost: the entry may well commit.
async fn quorum_lost(g: &Group, peers: &Peers, stale: Duration, timeout: Duration) {
    let voters = g.voters();
    if voters.len() > 1 {
        let stale_ms = stale.as_millis() as u64;
        let peers = peers.clone();
        let seen = g
            .raft
            .wait(Some(timeout))
            .metrics(
                move |m| {
                    m.millis_since_quorum_ack.is_some_and(|ms| ms > stale_ms)
                        && !peers.quorum_reachable(&voters)
                },
                "quorum contact lost",
            )
            .await;
        if seen.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await
}

impl Groups {
    /// [`Groups::write`] as the `Forward` RPC runs it: `hops` forwards so far, `budget`
    /// the time the original caller has left.
    pub async fn write_routed(
        &self,
        p: PartitionId,
        cmd: state::Command,
        hops: u32,
        budget: Option<Duration>,
    ) -> Result<state::Outcome, ConsensusError> {
        self.write_group(p.group(), cmd, hops, budget).await
    }

    /// Like [`Self::write_routed`] for any group, the meta group (0) included.
    pub async fn write_group(
        &self,
        gid: GroupId,
        cmd: state::Command,
        hops: u32,
        budget: Option<Duration>,
    ) -> Result<state::Outcome, ConsensusError> {
        match self.route(gid, Op::Write(cmd), hops, budget).await? {
            Done::Outcome(o) => Ok(o),
            Done::Index(_) => Err(ConsensusError::Fatal("a write answered as a read".into())),
        }
    }

    /// Runs a linearizable-read barrier on partition `p`'s leader: returns the log index
    /// a replica must have applied before a read there is linearizable.
    pub async fn barrier_routed(
        &self,
        p: PartitionId,
        hops: u32,
        budget: Option<Duration>,
    ) -> Result<Option<u64>, ConsensusError> {
        match self.route(p.group(), Op::Barrier, hops, budget).await? {
            Done::Index(i) => Ok(i),
            Done::Outcome(_) => Err(ConsensusError::Fatal("a read answered as a write".into())),
        }
    }

    async fn route(
        &self,
        gid: GroupId,
        op: Op,
        hops: u32,
        budget: Option<Duration>,
    ) -> Result<Done, ConsensusError> {
        if !self.plan().replicas.contains_key(&gid) {
            return Err(ConsensusError::Unavailable {
                reason: format!("group {gid} does not exist in this cluster"),
            });
        }
        let p = GroupName(gid);
        let limit = self.inner.tuning.route_timeout;
        let deadline = Instant::now() + budget.map_or(limit, |b| b.min(limit));
        let mut hint = None;
        let mut last_remote: Option<u64> = None;
        let mut turn = 0usize;
        let mut backoff = BACKOFF_MIN;
        let mut why = String::from("no attempt was made");
        for _ in 0..MAX_ATTEMPTS {
            if Instant::now() >= deadline {
                break;
            }
            let target = match hint.take() {
                Some((n, addr)) if n != self.inner.node.0 => Target::Remote(n, addr),
                _ => self.pick_target(gid, &mut turn),
            };
            let tried = match &target {
                Target::Remote(n, _) => Some(*n),
                _ => None,
            };
            let step = match target {
                Target::Local => self.run_local(gid, &op).await,
                Target::Remote(n, _) if hops >= MAX_HOPS => {
                    Step::Done(Err(ConsensusError::Unavailable {
                        reason: format!(
                            "{p}: forwarded {hops} times without reaching its leader \
                             (next would be node {n})"
                        ),
                    }))
                }
                Target::Remote(n, addr) => {
                    self.run_remote(gid, n, &addr, &op, hops, deadline).await
                }
                Target::Unknown(w) => Step::Retry { hint: None, why: w },
            };
            match step {
                Step::Done(r) => return r,
                Step::Retry { hint: h, why: w } => {
                    why = w;
                    // A new leader named by the node just asked: go there at once.
                    let fresh = h
                        .as_ref()
                        .is_some_and(|(n, _)| Some(*n) != tried && Some(*n) != last_remote);
                    last_remote = tried;
                    hint = h;
                    if !fresh {
                        let left = deadline.saturating_duration_since(Instant::now());
                        tokio::time::sleep(backoff.min(left)).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
        let (reachable, total) = self.reachable_replicas(gid).await;
        Err(ConsensusError::Unavailable {
            reason: format!("{p} has no leader: {reachable} of {total} replicas reachable ({why})"),
        })
    }

    /// Where to send the next attempt, from this node's view of the group.
    fn pick_target(&self, gid: GroupId, turn: &mut usize) -> Target {
        let me = self.inner.node.0;
        if let Some(g) = self.inner.groups.get(&gid) {
            let m = g.raft.metrics().borrow().clone();
            return match m.current_leader {
                Some(l) if l == me => Target::Local,
                Some(l) => {
                    let addr = m
                        .membership_config
                        .membership()
                        .get_node(&l)
                        .map(|n| n.addr.clone())
                        .or_else(|| self.inner.plan.members.get(&l).cloned());
                    match addr {
                        Some(a) => Target::Remote(l, a),
                        None => Target::Unknown(format!("leader {l} has no known address")),
                    }
                }
                // A stopped Raft reports no leader: let the local attempt say why.
                None if m.running_state.is_err() => Target::Local,
                None => Target::Unknown(format!(
                    "node {me} knows no leader in term {}",
                    m.current_term
                )),
            };
        }
        // No replica here: ask the planned replicas in turn; they forward to their leader.
        let candidates: Vec<u64> = self
            .inner
            .plan
            .replicas
            .get(&gid)
            .into_iter()
            .flatten()
            .copied()
            .filter(|n| *n != me)
            .collect();
        if candidates.is_empty() {
            return Target::Unknown(format!("group {gid} has no planned replicas"));
        }
        let n = candidates[*turn % candidates.len()];
        *turn += 1;
        match self.inner.plan.members.get(&n) {
            Some(a) => Target::Remote(n, a.clone()),
            None => Target::Unknown(format!("replica {n} has no known address")),
        }
    }

    async fn run_local(&self, gid: GroupId, op: &Op) -> Step {
        let Some(g) = self.inner.groups.get(&gid) else {
            return Step::Retry {
                hint: None,
                why: format!("group {gid} is not on node {}", self.inner.node),
            };
        };
        super::balance::settled(g).await;
        let m = g.raft.metrics().borrow().clone();
        let voters = m.membership_config.membership().voter_ids().count();
        let stale = self.inner.tuning.quorum_stale();
        if let Some(ms) = m.millis_since_quorum_ack {
            if voters > 1 && Duration::from_millis(ms) > stale {
                return Step::Retry {
                    hint: None,
                    why: format!(
                        "leader node {} has not heard from a quorum for {ms} ms",
                        self.inner.node
                    ),
                };
            }
        }
        let timeout = self.inner.tuning.write_timeout;
        match op {
            Op::Write(cmd) => {
                // Proposed from here on: a give-up is `Timeout`, the entry may still commit.
                // Give up early when the leader loses its quorum meanwhile.
                let lost = quorum_lost(g, &self.inner.peers, stale, timeout);
                let res = tokio::select! {
                    r = tokio::time::timeout(timeout, g.raft.client_write(cmd.clone())) => match r {
                        Ok(r) => r,
                        Err(_) => return Step::Done(Err(ConsensusError::Timeout)),
                    },
                    () = lost => return Step::Done(Err(ConsensusError::Timeout)),
                };
                match res {
                    Ok(resp) => Step::Done(match resp.data {
                        Reply::Command(outcome) => Ok(Done::Outcome(outcome)),
                        Reply::Internal => Err(ConsensusError::Fatal(
                            "a command was answered as an internal entry".into(),
                        )),
                    }),
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Step::Retry {
                        hint: hint_of(&f),
                        why: format!("node {} is not the leader", self.inner.node),
                    },
                    Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                        Step::Done(Err(ConsensusError::Fatal(format!(
                            "unexpected membership error: {e}"
                        ))))
                    }
                    Err(RaftError::Fatal(e)) => Step::Done(Err(fatal_err(e))),
                }
            }
            Op::Barrier => {
                let lost = quorum_lost(g, &self.inner.peers, stale, timeout);
                let res = tokio::select! {
                    r = tokio::time::timeout(timeout, g.raft.ensure_linearizable()) => match r {
                        Ok(r) => r,
                        Err(_) => return Step::Done(Err(ConsensusError::Timeout)),
                    },
                    // Nothing was written: another attempt may find a new leader.
                    () = lost => return Step::Retry {
                        hint: None,
                        why: format!("leader node {} lost its quorum", self.inner.node),
                    },
                };
                match res {
                    Ok(log_id) => Step::Done(Ok(Done::Index(log_id.map(|l| l.index)))),
                    Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                        Step::Retry {
                            hint: hint_of(&f),
                            why: format!("node {} is not the leader", self.inner.node),
                        }
                    }
                    Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                        Step::Retry {
                            hint: None,
                            why: e.to_string(),
                        }
                    }
                    Err(RaftError::Fatal(e)) => Step::Done(Err(fatal_err(e))),
                }
            }
        }
    }

    async fn run_remote(
        &self,
        gid: GroupId,
        node: u64,
        addr: &str,
        op: &Op,
        hops: u32,
        deadline: Instant,
    ) -> Step {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Step::Retry {
                hint: None,
                why: "out of time".into(),
            };
        }
        let mut client = match self.inner.peers.client(node, addr) {
            Ok(c) => c,
            Err(e) => {
                return Step::Retry {
                    hint: None,
                    why: e.to_string(),
                }
            }
        };
        // The receiver may spend `left` looking for the leader plus a write timeout.
        let rpc_timeout = left + self.inner.tuning.write_timeout + Duration::from_secs(1);
        let budget_ms = left.as_millis().max(1) as u64;
        let (ok, err, is_write) = match op {
            Op::Write(cmd) => {
                let mut req = tonic::Request::new(ForwardRequest {
                    group: gid.0,
                    payload: codec::encode(cmd),
                    hops: hops + 1,
                    budget_ms,
                });
                req.set_timeout(rpc_timeout);
                match client.forward(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        (r.ok, r.err, true)
                    }
                    Err(status) => return self.forward_failed(node, status, true),
                }
            }
            Op::Barrier => {
                let mut req = tonic::Request::new(BarrierRequest {
                    group: gid.0,
                    hops: hops + 1,
                    budget_ms,
                });
                req.set_timeout(rpc_timeout);
                match client.linearizable_barrier(req).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        (r.ok, r.err, false)
                    }
                    Err(status) => return self.forward_failed(node, status, false),
                }
            }
        };
        self.inner.peers.mark_ok(node);
        let malformed = |e: codec::CodecError| {
            Step::Done(Err(ConsensusError::Fatal(format!(
                "node {node} sent a malformed forward reply: {e}"
            ))))
        };
        if !err.is_empty() {
            return match codec::decode::<ConsensusError>(&err) {
                Ok(e) => Step::Done(Err(e)),
                Err(e) => malformed(e),
            };
        }
        let done = if is_write {
            codec::decode(&ok).map(Done::Outcome)
        } else {
            codec::decode(&ok).map(Done::Index)
        };
        match done {
            Ok(d) => Step::Done(Ok(d)),
            Err(e) => malformed(e),
        }
    }

    /// A forward that failed in transport: retry if it surely never reached the peer's
    /// group (refused connection, group not hosted there), else the write may have gone
    /// through: `Timeout`.
    fn forward_failed(&self, node: u64, status: tonic::Status, is_write: bool) -> Step {
        let why = format!("forward to node {node} failed: {}", status.message());
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::NotFound => Step::Retry { hint: None, why },
            tonic::Code::InvalidArgument | tonic::Code::Unimplemented => {
                Step::Done(Err(ConsensusError::Fatal(why)))
            }
            _ if is_write => Step::Done(Err(ConsensusError::Timeout)),
            _ => Step::Retry { hint: None, why },
        }
    }

    /// How many of the group's voters answer (this node counts; others are asked with a
    /// short `Hello` unless a call to them succeeded recently). For error messages.
    async fn reachable_replicas(&self, gid: GroupId) -> (usize, usize) {
        let voters: Vec<u64> = match self.inner.groups.get(&gid) {
            Some(g) => g.voters(),
            None => self
                .inner
                .plan
                .replicas
                .get(&gid)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default(),
        };
        let probes = voters.iter().map(|n| self.probe(*n));
        let reachable = futures::future::join_all(probes)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count();
        (reachable, voters.len())
    }

    async fn probe(&self, node: u64) -> bool {
        let peers = &self.inner.peers;
        if peers.recently_reachable(node) {
            return true;
        }
        let Some(addr) = self.inner.plan.members.get(&node) else {
            return false;
        };
        let Ok(mut client) = peers.client(node, addr) else {
            return false;
        };
        let mut req = tonic::Request::new(parley_proto::v1::HelloRequest {
            cluster: String::new(),
            node_id: self.inner.node.0,
        });
        req.set_timeout(PROBE_TIMEOUT);
        let ok = client.hello(req).await.is_ok();
        if ok {
            peers.mark_ok(node);
        }
        ok
    }
}

/// A group as error texts name it: "partition N" or "the meta group".
struct GroupName(GroupId);

impl std::fmt::Display for GroupName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.partition() {
            Some(p) => write!(f, "partition {p}"),
            None => f.write_str("the meta group"),
        }
    }
}
