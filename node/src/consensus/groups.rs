//! The registry of this node's Raft groups and the API the rest of the node uses to write
//! commands and read state.
//!
//! Two ways to open it: [`Groups::open`] runs every partition on this node alone (the
//! single-node layout), [`Groups::open_cluster`] runs the groups a [`ClusterPlan`] gives
//! this node (its partition replicas and the meta group). Writes and strong reads are
//! routed to the partition's leader wherever it is ([`super::routing`]); plain reads are
//! served from the local replica.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, Fatal};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::cluster::ClusterPlan;
use super::log_store::LogStore;
use super::network::NetworkFactory;
use super::peers::{Faults, Peers};
use super::state::{self, State};
use super::state_machine::StateMachine;
use super::typ::{Raft, RaftError, StorageError};
use crate::ids::{GroupId, NodeId, PartitionId};
use crate::store::Db;

/// A command that a group applied successfully, for the event stream (delivery). Sent on
/// every replica that applies it, at least once (again after a restart, see
/// [`super::state_machine`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedEvent {
    pub group: GroupId,
    pub command: state::Command,
    pub applied: state::Applied,
}

/// Why a consensus operation failed. `Unavailable` and `Timeout` are retryable; `Timeout`
/// means the command may still commit, `Unavailable` that it was not proposed. Travels
/// between nodes (forwarded writes), hence serde.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ConsensusError {
    #[error("unavailable: {reason}")]
    Unavailable { reason: String },
    #[error("timed out waiting for the partition to commit")]
    Timeout,
    #[error("storage: {0}")]
    Storage(String),
    #[error("consensus failure: {0}")]
    Fatal(String),
}

/// Why this node may not write a partition's rooms as their home right now
/// ([`Groups::home_lease`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoLease {
    #[error("node {node} holds no replica of partition {p}")]
    NoReplica { node: NodeId, p: PartitionId },
    #[error("node {node} does not lead partition {p}")]
    NotLeader { node: NodeId, p: PartitionId },
    #[error("node {node} is handing partition {p} over to node {to}")]
    HandingOver {
        node: NodeId,
        p: PartitionId,
        to: u64,
    },
    #[error(
        "node {node} leads partition {p} but has not applied its first entry of term {term} yet"
    )]
    TermNotApplied {
        node: NodeId,
        p: PartitionId,
        term: u64,
    },
    #[error(
        "node {node} leads partition {p} but its lease ran out (last quorum contact {}, lease {} ms)",
        age.map_or_else(|| "never".to_string(), |a| format!("{} ms ago", a.as_millis())),
        lease.as_millis()
    )]
    Expired {
        node: NodeId,
        p: PartitionId,
        age: Option<Duration>,
        lease: Duration,
    },
}

/// What `status()` reports for one group (from openraft's metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub group: GroupId,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
    /// The group's voters, from its current membership.
    pub voters: Vec<u64>,
    /// Whether this node leads the group right now (as far as it knows).
    pub is_leader: bool,
}

/// At most this many heartbeat rounds per [`Groups::renew_lease`],
const RENEW_ROUNDS: usize = 20;
/// this long apart.
const RENEW_PAUSE: Duration = Duration::from_millis(20);

/// Timing and log-compaction knobs. [`Tuning::default`] is what a node runs with; tests
/// lower the snapshot threshold.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot (to feed slightly lagging followers).
    pub keep_after_snapshot: u64,
    /// Purge the log only once this many entries can go at once (fewer, larger deletes).
    pub purge_batch: u64,
    /// How long a proposed entry may take to commit and apply (then `Timeout`).
    pub write_timeout: Duration,
    /// Single-node open: how long to wait for this node to lead every partition.
    pub ready_timeout: Duration,
    /// How long a write or strong read may look for a leader (then `Unavailable`).
    pub route_timeout: Duration,
    /// Cluster open: how long to wait for every local group to know some leader.
    pub leader_wait: Duration,
    /// The home's lease: a partition's leader writes its rooms' timelines only while a
    /// quorum acknowledged a heartbeat or append it sent less than this long ago (see
    /// [`Groups::home_lease`]). Must stay below `election_min_ms`: the follower whose ack
    /// made the quorum may itself be the next candidate, and its own timer runs from
    /// when it got that heartbeat (after it was sent), so it cannot campaign sooner than
    /// `election_min_ms` after the send; the other voters refuse votes for
    /// `election_max_ms` after hearing from the leader (openraft's vote lease). The
    /// margin (50 ms by default) covers clock-rate differences. Under CPU saturation a
    /// heartbeat's round trip can pass the lease: the home then refuses writes
    /// (UNAVAILABLE) until the next ack, which is the price of the fence.
    pub home_lease_ms: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_min_ms: 300,
            election_max_ms: 600,
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            purge_batch: 256,
            write_timeout: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(10),
            route_timeout: Duration::from_secs(5),
            leader_wait: Duration::from_secs(3),
            home_lease_ms: 250,
        }
    }
}

impl Tuning {
    fn raft_config(&self) -> Result<openraft::Config, ConsensusError> {
        if self.home_lease_ms >= self.election_min_ms {
            return Err(ConsensusError::Fatal(format!(
                "the home lease ({} ms) must be shorter than the minimum election timeout ({} ms)",
                self.home_lease_ms, self.election_min_ms
            )));
        }
        openraft::Config {
            cluster_name: "parley".to_owned(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            install_snapshot_timeout: super::network::SNAPSHOT_TIMEOUT.as_millis() as u64,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            purge_batch_size: self.purge_batch,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ConsensusError::Fatal(format!("raft config: {e}")))
    }

    /// A leader that has not heard from a quorum for this long does not take new writes:
    /// followers have started, or are about to start, an election without it.
    pub(super) fn quorum_stale(&self) -> Duration {
        Duration::from_millis(self.election_max_ms.max(3 * self.heartbeat_ms))
    }
}

pub(super) struct Group {
    pub(super) raft: Raft,
    pub(super) state: Arc<RwLock<State>>,
    /// When, as this group's leader, this node last had a quorum acknowledge something it
    /// sent (see [`track_quorum_ack`]); `None` when it does not lead.
    pub(super) quorum_acked: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// `Some(node)` while this node hands the group over to `node` ([`super::balance`]):
    /// it does not write as the rooms' home meanwhile.
    pub(super) yielding: tokio::sync::watch::Sender<Option<u64>>,
}

impl Group {
    /// The group's voters, as this node's Raft sees its membership now.
    pub(super) fn voters(&self) -> Vec<u64> {
        self.raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }
}

/// Keeps `at` = the instant a quorum last acknowledged what this node sent as `raft`'s
/// leader, until the Raft shuts down. openraft computes `millis_since_quorum_ack` only
/// when it publishes metrics (on events, and on its tick every 1.5 heartbeats), so the
/// value read later is older than it says; turned into an instant as soon as it is
/// published, the age measured from it is right at any later moment.
///
/// Within one term the instant only moves forward: a publish computed from an older ack
/// must not undo a newer one [`Groups::renew_lease`] recorded. A new term starts over.
async fn track_quorum_ack(raft: Raft, at: Arc<std::sync::Mutex<Option<std::time::Instant>>>) {
    let mut rx = raft.metrics();
    let mut term = None;
    loop {
        let (acked, now_term) = {
            let m = rx.borrow_and_update();
            let acked = m
                .millis_since_quorum_ack
                .and_then(|ms| std::time::Instant::now().checked_sub(Duration::from_millis(ms)));
            (acked, m.current_term)
        };
        {
            let mut at = at.lock().unwrap_or_else(|p| p.into_inner());
            *at = match (acked, *at) {
                (Some(new), Some(old)) if term == Some(now_term) => Some(new.max(old)),
                _ => acked,
            };
        }
        term = Some(now_term);
        // Ends when the Raft shuts down and drops its metrics sender.
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Whether the node has applied an entry of its current term: as a leader, it then has
/// every entry committed before its term (a ban among them) in its state.
fn applied_own_term(m: &super::typ::RaftMetrics) -> bool {
    m.last_applied.map(|l| l.leader_id.term) == Some(m.current_term)
}

pub(super) struct Inner {
    pub(super) node: NodeId,
    pub(super) grpc_addr: SocketAddr,
    pub(super) tuning: Tuning,
    pub(super) plan: ClusterPlan,
    /// The groups this node is a voter of.
    pub(super) groups: BTreeMap<GroupId, Group>,
    pub(super) peers: Peers,
    pub(super) handovers: super::balance::HandoverStats,
    /// Where the groups' Raft cores, their connections and their lease trackers run.
    /// Last, so the groups are dropped before it.
    _runtime: RaftRuntime,
}

/// A runtime of Raft's own: one worker thread for every group's core, its heartbeats,
/// elections and connections to peers. On the node's main runtime, with hundreds of
/// sends in progress, a heartbeat waited behind all of them and often timed out (three
/// times as often as on this runtime: BENCHMARKS §3, "Raft on a runtime of its own").
/// Answering peers' heartbeats is still the main runtime's work (one port serves
/// clients and peers). The operating
/// system shares the cores fairly between threads, so a thread of its own gets a
/// heartbeat out on time however long the main runtime's queue is.
struct RaftRuntime {
    /// `None` only while being dropped.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl RaftRuntime {
    fn new() -> Result<Self, ConsensusError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("parley-raft")
            .enable_all()
            .build()
            .map_err(|e| ConsensusError::Fatal(format!("starting Raft's runtime: {e}")))?;
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }
}

impl Drop for RaftRuntime {
    /// Dropping a runtime waits for its threads, which an async context may not do.
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// This node's Raft groups. Cheap to clone; clones share the groups.
#[derive(Clone)]
pub struct Groups {
    pub(super) inner: Arc<Inner>,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Groups>();
};

fn storage_err(e: impl std::fmt::Display) -> ConsensusError {
    ConsensusError::Storage(e.to_string())
}

pub(super) fn fatal_err(e: Fatal<u64>) -> ConsensusError {
    match e {
        Fatal::Stopped => ConsensusError::Unavailable {
            reason: "the node is shutting down".to_owned(),
        },
        Fatal::StorageError(e) => ConsensusError::Storage(e.to_string()),
        Fatal::Panicked => ConsensusError::Fatal("raft core panicked".to_owned()),
    }
}

/// The group's leader, as soon as one is known (at once if it is), waiting at most `wait`.
async fn leader_known(raft: &Raft, wait: Duration) -> Option<u64> {
    raft.wait(Some(wait))
        .metrics(|m| m.current_leader.is_some(), "some leader known")
        .await
        .ok()
        .and_then(|m| m.current_leader)
}

impl Groups {
    /// Opens (or recovers from `db`) one Raft group per partition, each with the single
    /// member `node`, and initializes fresh ones. Waits until every group has a leader
    /// and has applied its whole log (bounded, 10 s).
    pub async fn open(
        db: &Db,
        node: NodeId,
        grpc_addr: SocketAddr,
        partitions: u32,
        events: broadcast::Sender<AppliedEvent>,
    ) -> Result<Self, ConsensusError> {
        Self::open_with(db, node, grpc_addr, partitions, events, Tuning::default()).await
    }

    /// [`Groups::open`] with explicit timing and compaction settings.
    pub async fn open_with(
        db: &Db,
        node: NodeId,
        grpc_addr: SocketAddr,
        partitions: u32,
        events: broadcast::Sender<AppliedEvent>,
        tuning: Tuning,
    ) -> Result<Self, ConsensusError> {
        let plan = ClusterPlan::single(node.0, grpc_addr, partitions);
        let this = Self::start(db, node, grpc_addr, plan, events, tuning).await?;
        this.wait_ready().await?;
        Ok(this)
    }

    /// Opens this node's share of a cluster: the groups `plan` makes it a voter of.
    ///
    /// - `Some(plan)` on a fresh store (genesis): stores the plan (flushed), then
    ///   initializes each local group with its planned voters. Every genesis node does the
    ///   same with the same plan; openraft accepts that.
    /// - `None` (restart): recovers every group of the plan stored on disk.
    /// - `Some(plan)` on a store that has one already: the stored plan wins (a warning is
    ///   logged if they differ).
    ///
    /// Waits until each local group knows some leader, at most `tuning.leader_wait`, and
    /// then returns even if some do not (other nodes may be down): writes to such a group
    /// fail with `Unavailable` until a leader is elected.
    pub async fn open_cluster(
        db: &Db,
        node: NodeId,
        grpc_addr: SocketAddr,
        plan: Option<ClusterPlan>,
        tuning: Tuning,
        events: broadcast::Sender<AppliedEvent>,
    ) -> Result<Self, ConsensusError> {
        let stored = ClusterPlan::load(db).map_err(storage_err)?;
        let plan = match (stored, plan) {
            (Some(stored), given) => {
                if given.as_ref().is_some_and(|g| *g != stored) {
                    tracing::warn!(node = %node, "a different cluster plan is stored; keeping the stored one");
                }
                stored
            }
            (None, Some(given)) => {
                given.save(db).await.map_err(storage_err)?;
                given
            }
            (None, None) => {
                return Err(ConsensusError::Unavailable {
                    reason: "no cluster plan in the store and none given: this store was never \
                             part of a cluster"
                        .to_owned(),
                })
            }
        };
        match plan.members.get(&node.0) {
            // A node that joined after genesis: registered in the meta group, no replicas
            // until partitions are moved onto it.
            None => {
                tracing::info!(node = %node, "not in the genesis plan: this node holds no replicas yet")
            }
            Some(a) if *a != grpc_addr.to_string() => tracing::warn!(
                node = %node, planned = %a, actual = %grpc_addr,
                "this node listens on another address than the plan says; peers use the plan's"
            ),
            Some(_) => {}
        }
        let this = Self::start(db, node, grpc_addr, plan, events, tuning).await?;
        this.wait_some_leader().await;
        Ok(this)
    }

    /// Creates the Raft of every group `plan` gives `node`, initializing pristine ones.
    async fn start(
        db: &Db,
        node: NodeId,
        grpc_addr: SocketAddr,
        plan: ClusterPlan,
        events: broadcast::Sender<AppliedEvent>,
        tuning: Tuning,
    ) -> Result<Self, ConsensusError> {
        let config = Arc::new(tuning.raft_config()?);
        let runtime = RaftRuntime::new()?;
        let rt = runtime.handle.clone();
        let peers = Peers::new(node.0).on_runtime(rt.clone());
        let mut groups = BTreeMap::new();
        for gid in plan.groups_of(node.0) {
            let tree = db.tree(&format!("raft-{gid}")).map_err(storage_err)?;
            let log = LogStore::of_node(db.clone(), tree.clone(), node.0);
            let fresh = log.is_pristine().map_err(storage_err)?;
            let sm =
                StateMachine::open(gid, db.clone(), tree, events.clone()).map_err(storage_err)?;
            let state = sm.state();
            let network = NetworkFactory::new(gid, peers.clone());
            // Made on Raft's runtime, so that the core and every task it spawns run there.
            let raft = rt
                .spawn(Raft::new(node.0, config.clone(), network, log, sm))
                .await
                .map_err(|e| ConsensusError::Fatal(format!("starting group {gid}: {e}")))?
                .map_err(fatal_err)?;
            if fresh {
                match raft.initialize(plan.membership(gid)).await {
                    Ok(()) => {}
                    // Raced with an existing vote or log: the group is initialized already.
                    Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
                    Err(RaftError::APIError(e)) => {
                        return Err(ConsensusError::Fatal(format!("initialize {gid}: {e}")))
                    }
                    Err(RaftError::Fatal(e)) => return Err(fatal_err(e)),
                }
            }
            let quorum_acked = Arc::new(std::sync::Mutex::new(None));
            rt.spawn(track_quorum_ack(raft.clone(), quorum_acked.clone()));
            groups.insert(
                gid,
                Group {
                    raft,
                    state,
                    quorum_acked,
                    yielding: tokio::sync::watch::Sender::new(None),
                },
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                node,
                grpc_addr,
                tuning,
                plan,
                groups,
                peers,
                handovers: Default::default(),
                _runtime: runtime,
            }),
        })
    }

    /// Waits, for all groups at once, until this node leads each and has applied its log.
    async fn wait_ready(&self) -> Result<(), ConsensusError> {
        let me = self.inner.node.0;
        let timeout = self.inner.tuning.ready_timeout;
        let waits = self.inner.groups.iter().map(|(gid, g)| {
            let raft = g.raft.clone();
            let gid = *gid;
            async move {
                let r = raft
                    .wait(Some(timeout))
                    .metrics(
                        move |m| {
                            m.current_leader == Some(me)
                                && m.last_log_index.is_some()
                                && m.last_applied.map(|l| l.index) == m.last_log_index
                        },
                        "leader elected and log applied",
                    )
                    .await;
                (gid, r)
            }
        });
        for (gid, r) in futures::future::join_all(waits).await {
            if let Err(e) = r {
                let what = gid
                    .partition()
                    .map_or("the meta group".to_owned(), |p| format!("partition {p}"));
                return Err(ConsensusError::Unavailable {
                    reason: format!("{what} has no leader yet: {e}"),
                });
            }
        }
        Ok(())
    }

    /// Waits (bounded by `tuning.leader_wait`) until every local group knows a leader.
    /// Not an error when some do not: a cluster may be started one node at a time.
    async fn wait_some_leader(&self) {
        let total = self.inner.groups.len();
        let led = self.wait_for_leaders(self.inner.tuning.leader_wait).await;
        if led < total {
            tracing::warn!(node = %self.inner.node, led, total, "some groups have no leader yet");
        }
    }

    /// Waits at most `timeout` until every local group knows some leader; returns how
    /// many do. For a caller that opened with a zero `leader_wait` so that it could start
    /// serving the `Cluster` service first (peers need it to elect anyone).
    pub async fn wait_for_leaders(&self, timeout: Duration) -> usize {
        let waits = self
            .inner
            .groups
            .values()
            .map(|g| async move { leader_known(&g.raft, timeout).await.is_some() });
        futures::future::join_all(waits)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count()
    }

    pub fn partitions(&self) -> u32 {
        self.inner.plan.partitions
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.inner.grpc_addr
    }

    /// The cluster plan this node was opened with (for a single-node open: every
    /// partition on this node, no meta group).
    pub fn plan(&self) -> &ClusterPlan {
        &self.inner.plan
    }

    /// The fault-injection hook of this node's transport. Empty (no effect) unless a test
    /// blocks links through it.
    pub fn faults(&self) -> Faults {
        self.inner.peers.faults().clone()
    }

    pub(super) fn group(&self, p: PartitionId) -> Option<&Group> {
        self.inner.groups.get(&p.group())
    }

    /// Whether this node holds a replica of partition `p`. Reads ([`Groups::read`],
    /// [`Groups::read_strong`]) need one; writes do not (they are forwarded).
    pub fn is_local(&self, p: PartitionId) -> bool {
        self.group(p).is_some()
    }

    /// The Raft of a group hosted here (for the `Cluster` service).
    pub fn raft(&self, group: GroupId) -> Option<Raft> {
        self.inner.groups.get(&group).map(|g| g.raft.clone())
    }

    pub(super) fn no_partition(&self, p: PartitionId) -> ConsensusError {
        ConsensusError::Unavailable {
            reason: format!(
                "partition {p} does not exist (the cluster has {})",
                self.partitions()
            ),
        }
    }

    fn not_local(&self, p: PartitionId) -> ConsensusError {
        ConsensusError::Unavailable {
            reason: format!(
                "partition {p} has no replica on node {}: reads need a local replica",
                self.inner.node
            ),
        }
    }

    /// Proposes `cmd` to partition `p` and waits until it is committed and applied; returns
    /// the state machine's outcome (a refused command is `Ok(Err(..))`). Sent to the
    /// partition's leader wherever it is (forwarded over gRPC if that is another node).
    /// No leader found within the route timeout (5 s) -> `Unavailable`; proposed but not
    /// committed within the write timeout (5 s) -> `Timeout`.
    pub async fn write(
        &self,
        p: PartitionId,
        cmd: state::Command,
    ) -> Result<state::Outcome, ConsensusError> {
        self.write_routed(p, cmd, 0, None).await
    }

    /// Local read (may be stale in a cluster). Needs a local replica: check
    /// [`Groups::is_local`] first, or use [`Groups::try_read`]. A partition this node does
    /// not hold reads as empty (and logs a warning), which is never the right answer for
    /// a cluster: it is kept only so that this signature stays infallible.
    pub fn read<T>(&self, p: PartitionId, f: impl FnOnce(&State) -> T) -> T {
        match self.group(p) {
            Some(g) => f(&g.state.read().unwrap_or_else(|e| e.into_inner())),
            None => {
                tracing::warn!(partition = %p, node = %self.inner.node, "read of a partition without a local replica");
                f(&State::default())
            }
        }
    }

    /// This node's shared channels to its peers.
    pub fn peers(&self) -> Peers {
        self.inner.peers.clone()
    }

    /// The leader of partition `p` as this node knows it (needs a local replica).
    pub fn leader_of(&self, p: PartitionId) -> Option<u64> {
        self.group(p)
            .and_then(|g| g.raft.metrics().borrow().current_leader)
    }

    /// The leader of partition `p`, waiting at most `wait` for one to be known: an
    /// election or a handover is usually over within an election timeout.
    pub async fn leader_within(&self, p: PartitionId, wait: Duration) -> Option<u64> {
        leader_known(&self.group(p)?.raft, wait).await
    }

    /// Whether this node may write partition `p`'s room timelines as their home now, and
    /// the term to fence the write with. Yes only while it leads the group, a quorum
    /// acknowledged something it sent within [`Tuning::home_lease_ms`] (shorter than any
    /// election timeout, so no newer leader can exist yet), it has applied an entry of
    /// its own term (so every entry committed before, a ban among them, is in its state),
    /// and it is not handing the group over ([`super::balance`]). Why not otherwise.
    pub fn home_lease(&self, p: PartitionId) -> Result<u64, NoLease> {
        let node = self.inner.node;
        let g = self.group(p).ok_or(NoLease::NoReplica { node, p })?;
        let m = g.raft.metrics().borrow().clone();
        if m.current_leader != Some(node.0) {
            return Err(NoLease::NotLeader { node, p });
        }
        if let Some(to) = *g.yielding.borrow() {
            return Err(NoLease::HandingOver { node, p, to });
        }
        if !applied_own_term(&m) {
            return Err(NoLease::TermNotApplied {
                node,
                p,
                term: m.current_term,
            });
        }
        let voters = m.membership_config.membership().voter_ids().count();
        if voters > 1 {
            let acked = *g.quorum_acked.lock().unwrap_or_else(|e| e.into_inner());
            let lease = Duration::from_millis(self.inner.tuning.home_lease_ms);
            match acked.map(|t| t.elapsed()) {
                Some(age) if age < lease => {}
                age => {
                    return Err(NoLease::Expired {
                        node,
                        p,
                        age,
                        lease,
                    })
                }
            }
        }
        Ok(m.current_term)
    }

    /// Waits (at most `within`) until this node, leading partition `p`, has applied an
    /// entry of its current term: a new leader's first entry commits within a round
    /// trip, and until then [`Groups::home_lease`] says [`NoLease::TermNotApplied`].
    /// Whether it has.
    pub async fn await_term_applied(&self, p: PartitionId, within: Duration) -> bool {
        let Some(g) = self.group(p) else {
            return false;
        };
        let me = self.inner.node.0;
        let mut rx = g.raft.metrics();
        let done = tokio::time::timeout(
            within,
            rx.wait_for(|m| m.current_leader != Some(me) || applied_own_term(m)),
        )
        .await;
        matches!(done, Ok(Ok(m)) if m.current_leader == Some(me))
    }

    /// Renews the home lease of partition `p` by confirming leadership with a quorum
    /// now (a heartbeat round sent after this call began); false if that fails within
    /// `within`. Under load heartbeats answer late and the lease runs out between
    /// them; a write then pays one round trip instead of being refused.
    ///
    /// openraft gives each heartbeat of such a round one heartbeat interval to answer; on
    /// a starved machine a round can miss a quorum only because replies came late, so a
    /// failed round is repeated (at most `RENEW_ROUNDS`) while `within` lasts and this
    /// node still leads.
    pub async fn renew_lease(&self, p: PartitionId, within: Duration) -> bool {
        let Some(g) = self.group(p) else {
            return false;
        };
        let deadline = tokio::time::Instant::now() + within;
        for _ in 0..RENEW_ROUNDS {
            let asked = std::time::Instant::now();
            match tokio::time::timeout_at(deadline, g.raft.ensure_linearizable()).await {
                Ok(Ok(_)) => {
                    let mut at = g.quorum_acked.lock().unwrap_or_else(|e| e.into_inner());
                    if at.is_none_or(|t| t < asked) {
                        *at = Some(asked);
                    }
                    return true;
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                    let pause = tokio::time::Instant::now() + RENEW_PAUSE;
                    if pause >= deadline {
                        return false;
                    }
                    tokio::time::sleep_until(pause).await;
                }
                // Not the leader, stopped, or out of time.
                _ => return false,
            }
        }
        false
    }

    /// Whether a majority of partition `p`'s voters answered a call lately: its quorum is
    /// slow rather than gone (see [`super::peers::Peers::quorum_reachable`]).
    pub fn quorum_reachable(&self, p: PartitionId) -> bool {
        self.group(p)
            .is_some_and(|g| self.inner.peers.quorum_reachable(&g.voters()))
    }

    /// The sum of this node's groups' current terms. Terms only grow, each election by
    /// one, so its growth over a while counts the elections this node's groups saw.
    pub fn terms_sum(&self) -> u64 {
        self.inner
            .groups
            .values()
            .map(|g| g.raft.metrics().borrow().current_term)
            .sum()
    }

    /// This node's current term of group `gid` (`None` without a local replica).
    pub fn current_term(&self, gid: GroupId) -> Option<u64> {
        self.inner
            .groups
            .get(&gid)
            .map(|g| g.raft.metrics().borrow().current_term)
    }

    /// The gRPC address of `node`: from the plan, else from the meta group's registry.
    pub fn addr_of(&self, node: u64) -> Option<String> {
        self.plan().members.get(&node).cloned().or_else(|| {
            self.read_group(crate::consensus::cluster::META, |s| {
                s.nodes.get(&node).map(|n| n.grpc.clone())
            })
            .flatten()
        })
    }

    /// Voters of partition `p` in the plan.
    pub fn replicas_of(&self, p: PartitionId) -> Vec<u64> {
        self.plan()
            .replicas
            .get(&p.group())
            .map(|v| v.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Local read of any group (the meta group included), or `None` without a local replica.
    pub fn read_group<T>(&self, gid: GroupId, f: impl FnOnce(&State) -> T) -> Option<T> {
        self.inner
            .groups
            .get(&gid)
            .map(|g| f(&g.state.read().unwrap_or_else(|e| e.into_inner())))
    }

    /// Local read, or `None` when this node holds no replica of `p`.
    pub fn try_read<T>(&self, p: PartitionId, f: impl FnOnce(&State) -> T) -> Option<T> {
        self.group(p)
            .map(|g| f(&g.state.read().unwrap_or_else(|e| e.into_inner())))
    }

    /// Linearizable read: the partition's leader confirms its leadership with a quorum and
    /// names the log index committed before the call; once the local replica has applied
    /// it, the read runs locally. Needs a local replica (else `Unavailable`).
    pub async fn read_strong<T>(
        &self,
        p: PartitionId,
        f: impl FnOnce(&State) -> T,
    ) -> Result<T, ConsensusError> {
        if p.0 >= self.partitions() {
            return Err(self.no_partition(p));
        }
        let group = self.group(p).ok_or_else(|| self.not_local(p))?;
        let index = self.barrier_routed(p, 0, None).await?;
        if index.is_some() {
            group
                .raft
                .wait(Some(self.inner.tuning.write_timeout))
                .applied_index_at_least(index, "applied up to the read index")
                .await
                .map_err(|e| match e {
                    openraft::metrics::WaitError::Timeout(..) => ConsensusError::Timeout,
                    openraft::metrics::WaitError::ShuttingDown => ConsensusError::Unavailable {
                        reason: "the node is shutting down".to_owned(),
                    },
                })?;
        }
        self.try_read(p, f).ok_or_else(|| self.not_local(p))
    }

    /// One line per local group (the meta group first, when this node has it), from
    /// openraft's metrics.
    pub fn status(&self) -> Vec<GroupStatus> {
        let me = self.inner.node.0;
        self.inner
            .groups
            .iter()
            .map(|(gid, g)| {
                let m = g.raft.metrics().borrow().clone();
                GroupStatus {
                    group: *gid,
                    leader: m.current_leader,
                    term: m.current_term,
                    last_log_index: m.last_log_index,
                    applied_index: m.last_applied.map(|l| l.index),
                    voters: m.membership_config.membership().voter_ids().collect(),
                    is_leader: m.current_leader == Some(me),
                }
            })
            .collect()
    }

    /// Stops every group's Raft. Writes after this fail with `Unavailable`.
    pub async fn shutdown(&self) {
        for (gid, g) in &self.inner.groups {
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(group = %gid, error = %e, "raft shutdown failed");
            }
        }
    }
}

/// Storage errors that openraft reports while opening become [`ConsensusError::Storage`].
impl From<StorageError> for ConsensusError {
    fn from(e: StorageError) -> Self {
        ConsensusError::Storage(e.to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::consensus::state::{Applied, Command, CommandError};
    use crate::consensus::test_support::open_db;
    use crate::ids::{RoomId, UserId};

    const ME: NodeId = NodeId(1);

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7001))
    }

    fn user(n: &str) -> UserId {
        UserId::parse(n).unwrap()
    }

    fn create_user(name: &str) -> Command {
        Command::CreateUser {
            name: user(name),
            token_hash: [7; 32],
            at: 1,
        }
    }

    /// Raft runs on a runtime of its own: with the runtime that opened the groups not
    /// running at all (a current-thread runtime outside `block_on` polls nothing), a
    /// leadership check still completes. On the caller's runtime it could not start.
    #[test]
    fn raft_runs_while_the_runtime_that_opened_it_is_stalled() {
        let rt = |name: &str| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(name)
                .build()
                .unwrap()
        };
        let opener = rt("opener");
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = broadcast::channel(64);
        let (_db, groups) = opener.block_on(async {
            let db = open_db(dir.path()).await;
            let groups = Groups::open(&db, ME, addr(), 2, tx).await.unwrap();
            (db, groups)
        });
        // `opener` is stalled from here on; another runtime asks.
        let other = rt("other");
        let p = PartitionId(1);
        let started = std::time::Instant::now();
        assert!(other.block_on(groups.renew_lease(p, Duration::from_secs(2))));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(groups.leader_of(p) == Some(ME.0));
    }

    /// `leader_within` answers at once when a leader is known, waits for one elected
    /// meanwhile, and gives up after its bound when none can be.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leader_within_waits_for_an_election_and_is_bounded() {
        let (tx, _rx) = broadcast::channel(64);
        let no_wait = Tuning {
            leader_wait: Duration::ZERO,
            ..Tuning::default()
        };
        // One voter, opened without waiting for its elections: they finish meanwhile.
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path()).await;
        let plan = ClusterPlan::single(ME.0, addr(), 2);
        let solo = Groups::open_cluster(&db, ME, addr(), Some(plan), no_wait.clone(), tx.clone())
            .await
            .unwrap();
        for p in 0..2 {
            let leader = solo
                .leader_within(PartitionId(p), Duration::from_secs(10))
                .await;
            assert_eq!(leader, Some(ME.0), "partition {p}");
        }
        // Three voters, two of which never start: no leader, and the wait ends.
        let dir3 = tempfile::tempdir().unwrap();
        let db3 = open_db(dir3.path()).await;
        // Port 9 (discard) on loopback: nothing answers there.
        let nobody = SocketAddr::from(([127, 0, 0, 1], 9));
        let plan3 = ClusterPlan::genesis(&[(ME.0, addr()), (2, nobody), (3, nobody)], 1, 3);
        let lonely = Groups::open_cluster(&db3, ME, addr(), Some(plan3), no_wait, tx)
            .await
            .unwrap();
        let started = std::time::Instant::now();
        assert_eq!(
            lonely
                .leader_within(PartitionId(0), Duration::from_millis(400))
                .await,
            None
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
            "waited {waited:?}"
        );
        solo.shutdown().await;
        lonely.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_survive_restart() {
        const P: u32 = 4;
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = broadcast::channel(64);
        let alice = user("alice");
        let pa = PartitionId::of_user(&alice, P);
        let room = RoomId::random_in_partition(PartitionId::of_room_name("general", P), P);
        let pr = PartitionId::of_room(&room, P);
        {
            let db = open_db(dir.path()).await;
            let groups = Groups::open(&db, ME, addr(), P, tx.clone()).await.unwrap();
            assert_eq!(groups.partitions(), P);
            assert!(groups.status().iter().all(|s| s.leader == Some(ME.0)));

            assert_eq!(
                groups.write(pa, create_user("alice")).await.unwrap(),
                Ok(Applied::UserCreated)
            );
            assert!(matches!(
                groups.write(pa, create_user("alice")).await.unwrap(),
                Err(CommandError::AlreadyExists { .. })
            ));
            let created = groups
                .write(
                    pr,
                    Command::CreateRoom {
                        id: room.clone(),
                        name: "general".into(),
                        creator: alice.clone(),
                        write_quorum: None,
                        at: 2,
                    },
                )
                .await
                .unwrap();
            assert!(matches!(created, Ok(Applied::RoomCreated(_))));
            let joined = groups
                .write(
                    pr,
                    Command::Join {
                        room: room.clone(),
                        user: user("bob"),
                        at: 3,
                    },
                )
                .await
                .unwrap();
            assert!(matches!(
                joined,
                Ok(Applied::Membership { changed: true, .. })
            ));

            assert!(groups.read(pa, |s| s.users.contains_key(&alice)));
            assert_eq!(
                groups
                    .read_strong(pr, |s| s.member_count(&room))
                    .await
                    .unwrap(),
                2
            );
            // Three successful commands, three events; the refused one sent none.
            let events: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            assert_eq!(events.len(), 3);
            assert_eq!(events[0].group, pa.group());
            // A partition that does not exist is an error, not a panic.
            assert!(matches!(
                groups.write(PartitionId(P), create_user("carol")).await,
                Err(ConsensusError::Unavailable { .. })
            ));
            groups.shutdown().await;
            assert!(groups.write(pa, create_user("dave")).await.is_err());
        }

        let db = open_db(dir.path()).await;
        let groups = Groups::open(&db, ME, addr(), P, tx).await.unwrap();
        assert!(groups.read(pa, |s| s.users.contains_key(&alice)));
        assert_eq!(
            groups.read(pr, |s| s.room_by_name("general").map(|r| r.id.clone())),
            Some(room.clone())
        );
        assert!(groups.read(pr, |s| s.member(&room, &user("bob")).is_some()));
        assert!(!groups.read(PartitionId::of_user(&user("dave"), P), |s| s
            .users
            .contains_key(&user("dave"))));
        // Still writable after recovery, led by this node again.
        assert_eq!(
            groups.write(pa, create_user("erin")).await.unwrap(),
            Ok(Applied::UserCreated)
        );
        assert!(groups
            .status()
            .iter()
            .all(|s| s.leader == Some(ME.0) && s.applied_index.is_some()));
        groups.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_from_snapshot_with_purged_log() {
        let dir = tempfile::tempdir().unwrap();
        let tuning = Tuning {
            snapshot_every: 20,
            keep_after_snapshot: 5,
            purge_batch: 1,
            ..Tuning::default()
        };
        let (tx, _rx) = broadcast::channel(16);
        let names: Vec<String> = (0..60).map(|i| format!("user-{i}")).collect();
        {
            let db = open_db(dir.path()).await;
            let groups = Groups::open_with(&db, ME, addr(), 1, tx.clone(), tuning.clone())
                .await
                .unwrap();
            for n in &names {
                assert_eq!(
                    groups.write(PartitionId(0), create_user(n)).await.unwrap(),
                    Ok(Applied::UserCreated)
                );
            }
            let raft = groups.raft(GroupId(1)).unwrap();
            let m = raft
                .wait(Some(Duration::from_secs(10)))
                .metrics(
                    |m| {
                        m.snapshot.is_some_and(|s| s.index >= 40)
                            && m.purged.is_some_and(|p| p.index >= 30)
                    },
                    "snapshot built and log purged",
                )
                .await
                .unwrap();
            assert!(m.purged.unwrap().index < m.snapshot.unwrap().index);
            groups.shutdown().await;
        }

        let db = open_db(dir.path()).await;
        // The log really starts after the purge point: recovery must come from the snapshot.
        let mut log = LogStore::new(db.clone(), db.tree("raft-1").unwrap());
        let st = openraft::storage::RaftLogStorage::get_log_state(&mut log)
            .await
            .unwrap();
        assert!(st.last_purged_log_id.unwrap().index >= 30);
        let groups = Groups::open_with(&db, ME, addr(), 1, tx, tuning)
            .await
            .unwrap();
        let count = groups.read(PartitionId(0), |s| s.users.len());
        assert_eq!(count, names.len());
        assert!(groups.read(PartitionId(0), |s| s.users.contains_key(&user("user-59"))));
        groups.shutdown().await;
    }
}
