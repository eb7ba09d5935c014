//! The registry of this node's Raft groups: one per partition, opened from the store,
//! and the API the rest of the node uses to write commands and read state.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, Fatal};
use tokio::sync::broadcast;

use super::log_store::LogStore;
use super::network::NetworkFactory;
use super::state::{self, State};
use super::state_machine::StateMachine;
use super::typ::{Raft, RaftError, Reply, StorageError};
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

/// Why a consensus operation failed. `Unavailable` and `Timeout` are retryable.
#[derive(Debug, Clone, thiserror::Error)]
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

/// What `status()` reports for one group (from openraft's metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    pub group: GroupId,
    pub leader: Option<u64>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub applied_index: Option<u64>,
}

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
    pub write_timeout: Duration,
    pub ready_timeout: Duration,
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
        }
    }
}

impl Tuning {
    fn raft_config(&self) -> Result<openraft::Config, ConsensusError> {
        openraft::Config {
            cluster_name: "parley".to_owned(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_min_ms,
            election_timeout_max: self.election_max_ms,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every),
            max_in_snapshot_log_to_keep: self.keep_after_snapshot,
            purge_batch_size: self.purge_batch,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ConsensusError::Fatal(format!("raft config: {e}")))
    }
}

struct Group {
    raft: Raft,
    state: Arc<RwLock<State>>,
}

struct Inner {
    node: NodeId,
    grpc_addr: SocketAddr,
    tuning: Tuning,
    /// Partition `p` is at index `p`.
    groups: Vec<Group>,
}

/// This node's Raft groups. Cheap to clone; clones share the groups.
#[derive(Clone)]
pub struct Groups {
    inner: Arc<Inner>,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Groups>();
};

fn storage_err(e: impl std::fmt::Display) -> ConsensusError {
    ConsensusError::Storage(e.to_string())
}

fn fatal_err(e: Fatal<u64>) -> ConsensusError {
    match e {
        Fatal::Stopped => ConsensusError::Unavailable {
            reason: "the node is shutting down".to_owned(),
        },
        Fatal::StorageError(e) => ConsensusError::Storage(e.to_string()),
        Fatal::Panicked => ConsensusError::Fatal("raft core panicked".to_owned()),
    }
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
        let config = Arc::new(tuning.raft_config()?);
        let mut groups = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let gid = PartitionId(p).group();
            let tree = db.tree(&format!("raft-{gid}")).map_err(storage_err)?;
            let log = LogStore::new(db.clone(), tree.clone());
            let fresh = log.is_pristine().map_err(storage_err)?;
            let sm =
                StateMachine::open(gid, db.clone(), tree, events.clone()).map_err(storage_err)?;
            let state = sm.state();
            let raft = Raft::new(node.0, config.clone(), NetworkFactory::new(gid), log, sm)
                .await
                .map_err(fatal_err)?;
            if fresh {
                let members =
                    BTreeMap::from([(node.0, openraft::BasicNode::new(grpc_addr.to_string()))]);
                match raft.initialize(members).await {
                    Ok(()) => {}
                    // Raced with an existing vote or log: the group is initialized already.
                    Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
                    Err(RaftError::APIError(e)) => {
                        return Err(ConsensusError::Fatal(format!("initialize {gid}: {e}")))
                    }
                    Err(RaftError::Fatal(e)) => return Err(fatal_err(e)),
                }
            }
            groups.push(Group { raft, state });
        }
        let this = Self {
            inner: Arc::new(Inner {
                node,
                grpc_addr,
                tuning,
                groups,
            }),
        };
        this.wait_ready().await?;
        Ok(this)
    }

    /// Waits, for all groups at once, until this node leads each and has applied its log.
    async fn wait_ready(&self) -> Result<(), ConsensusError> {
        let me = self.inner.node.0;
        let timeout = self.inner.tuning.ready_timeout;
        let waits = self.inner.groups.iter().map(|g| {
            let raft = g.raft.clone();
            async move {
                raft.wait(Some(timeout))
                    .metrics(
                        move |m| {
                            m.current_leader == Some(me)
                                && m.last_log_index.is_some()
                                && m.last_applied.map(|l| l.index) == m.last_log_index
                        },
                        "leader elected and log applied",
                    )
                    .await
            }
        });
        for (p, r) in futures::future::join_all(waits)
            .await
            .into_iter()
            .enumerate()
        {
            if let Err(e) = r {
                return Err(ConsensusError::Unavailable {
                    reason: format!("partition {p} has no leader yet: {e}"),
                });
            }
        }
        Ok(())
    }

    pub fn partitions(&self) -> u32 {
        self.inner.groups.len() as u32
    }

    pub fn node_id(&self) -> NodeId {
        self.inner.node
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.inner.grpc_addr
    }

    fn group(&self, p: PartitionId) -> Option<&Group> {
        self.inner.groups.get(p.0 as usize)
    }

    /// The Raft of a group hosted here (for the `Cluster` service).
    pub fn raft(&self, group: GroupId) -> Option<Raft> {
        group
            .partition()
            .and_then(|p| self.group(p))
            .map(|g| g.raft.clone())
    }

    fn no_partition(&self, p: PartitionId) -> ConsensusError {
        ConsensusError::Unavailable {
            reason: format!(
                "partition {p} does not exist (the cluster has {})",
                self.partitions()
            ),
        }
    }

    /// Proposes `cmd` to partition `p` and waits until it is committed and applied; returns
    /// the state machine's outcome (a refused command is `Ok(Err(..))`). Bounded by the
    /// write timeout (5 s) -> `Timeout`; no leader here -> `Unavailable`.
    pub async fn write(
        &self,
        p: PartitionId,
        cmd: state::Command,
    ) -> Result<state::Outcome, ConsensusError> {
        let group = self.group(p).ok_or_else(|| self.no_partition(p))?;
        let res = tokio::time::timeout(
            self.inner.tuning.write_timeout,
            group.raft.client_write(cmd),
        )
        .await
        .map_err(|_| ConsensusError::Timeout)?;
        match res {
            Ok(resp) => match resp.data {
                Reply::Command(outcome) => Ok(outcome),
                Reply::Internal => Err(ConsensusError::Fatal(
                    "a command was answered as an internal entry".into(),
                )),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ConsensusError::Unavailable {
                    reason: match f.leader_id {
                        Some(l) => format!("partition {p} is led by node {l}, not this node"),
                        None => format!("partition {p} has no leader right now"),
                    },
                })
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => Err(
                ConsensusError::Fatal(format!("unexpected membership error: {e}")),
            ),
            Err(RaftError::Fatal(e)) => Err(fatal_err(e)),
        }
    }

    /// Local read (may be stale in a cluster). A partition this node does not have reads as
    /// empty.
    pub fn read<T>(&self, p: PartitionId, f: impl FnOnce(&State) -> T) -> T {
        match self.group(p) {
            Some(g) => f(&g.state.read().unwrap_or_else(|e| e.into_inner())),
            None => f(&State::default()),
        }
    }

    /// Linearizable read: confirms leadership with a quorum and waits until everything
    /// committed before the call is applied, then reads.
    pub async fn read_strong<T>(
        &self,
        p: PartitionId,
        f: impl FnOnce(&State) -> T,
    ) -> Result<T, ConsensusError> {
        let group = self.group(p).ok_or_else(|| self.no_partition(p))?;
        let res = tokio::time::timeout(
            self.inner.tuning.write_timeout,
            group.raft.ensure_linearizable(),
        )
        .await
        .map_err(|_| ConsensusError::Timeout)?;
        match res {
            Ok(_) => Ok(self.read(p, f)),
            Err(RaftError::APIError(e)) => Err(ConsensusError::Unavailable {
                reason: format!("partition {p}: cannot read linearizably: {e}"),
            }),
            Err(RaftError::Fatal(e)) => Err(fatal_err(e)),
        }
    }

    /// One line per group, from openraft's metrics.
    pub fn status(&self) -> Vec<GroupStatus> {
        self.inner
            .groups
            .iter()
            .enumerate()
            .map(|(p, g)| {
                let m = g.raft.metrics().borrow().clone();
                GroupStatus {
                    group: PartitionId(p as u32).group(),
                    leader: m.current_leader,
                    term: m.current_term,
                    last_log_index: m.last_log_index,
                    applied_index: m.last_applied.map(|l| l.index),
                }
            })
            .collect()
    }

    /// Stops every group's Raft. Writes after this fail with `Unavailable`.
    pub async fn shutdown(&self) {
        for (p, g) in self.inner.groups.iter().enumerate() {
            if let Err(e) = g.raft.shutdown().await {
                tracing::warn!(partition = p, error = %e, "raft shutdown failed");
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
