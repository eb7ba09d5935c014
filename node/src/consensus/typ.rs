//! The one openraft type configuration of Parley, and short aliases for its types.
//!
//! Every partition group (and, later, the meta group) uses [`TypeConfig`]: the log carries
//! [`state::Command`]s, a node is a `u64` id with its gRPC address, and snapshots are
//! in-memory byte buffers encoded with [`super::codec`].

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use super::state;

/// What the state machine returns for one applied log entry.
///
/// Only `Normal` entries carry a [`state::Command`]; blank and membership entries have no
/// outcome of their own, so they answer [`Reply::Internal`]. A client write always gets
/// [`Reply::Command`] back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Command(state::Outcome),
    Internal,
}

openraft::declare_raft_types!(
    /// Parley's Raft types.
    pub TypeConfig:
        D = state::Command,
        R = Reply,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, Node>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, Node>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, Node>;
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
pub type RpcError<E = openraft::error::Infallible> = openraft::error::RPCError<NodeId, Node, E>;
pub type AppendEntriesRequest = openraft::raft::AppendEntriesRequest<TypeConfig>;
pub type AppendEntriesResponse = openraft::raft::AppendEntriesResponse<NodeId>;
pub type VoteRequest = openraft::raft::VoteRequest<NodeId>;
pub type VoteResponse = openraft::raft::VoteResponse<NodeId>;
pub type InstallSnapshotRequest = openraft::raft::InstallSnapshotRequest<TypeConfig>;
pub type InstallSnapshotResponse = openraft::raft::InstallSnapshotResponse<NodeId>;
