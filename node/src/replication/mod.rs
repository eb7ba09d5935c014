//! Replication: what a room holds besides its Raft-managed membership.
//!
//! - [`timeline`]: automerge chunk documents per room, the history index and the commit
//!   pipeline (durable before acknowledged, published in id order).
//! - [`presence`]: last-writer-wins presence per user with a TTL, and ephemeral typing.
//! - [`markers`]: per (room, user) read markers that never go backwards.
//!
//! This layer must not touch Raft or the network API types beyond the wire messages it
//! stores; membership checks are the caller's (the API) job, made before calling in.
//! Between nodes: the node that writes a room's entries (its home, the leader of the
//! room's partition) pushes each flushed change to the other replicas and acknowledges
//! once `W` replicas hold it durably; every replica also runs the automerge sync
//! protocol with its peers on a timer (anti-entropy), so replicas converge after any
//! fault.

#[cfg(test)]
mod convergence_tests;
pub mod gossip;
pub mod lanes;
pub mod markers;
pub mod presence;
mod remote;
pub mod stats;
pub mod timeline;

pub use stats::ReplicationStats;
pub use timeline::{
    Appended, ChunkLimits, Fence, HistoryQuery, NewMessage, TimelineError, Timelines,
    QUORUM_TIMEOUT,
};

use parley_proto::v1::{PushChangesReply, PushChangesRequest, SyncReply, SyncRequest};

use crate::ids::RoomId;

/// How timelines reach the other replicas of a room. `node.rs` implements it on the
/// cluster's peer channels; without one (a single node, unit tests) nothing is pushed.
#[tonic::async_trait]
pub trait Network: Send + Sync + 'static {
    /// The other replicas of the room's partition (node ids), never this node.
    fn peers_of(&self, room: &RoomId) -> Vec<u64>;
    /// Rooms this node replicates, for anti-entropy.
    fn local_rooms(&self) -> Vec<RoomId>;
    /// Of `peers_of(room)`, how many answered recently (a send that needs more replicas
    /// than this plus one is refused before anything is written).
    fn reachable_peers(&self, room: &RoomId) -> usize;
    async fn push(&self, node: u64, req: PushChangesRequest) -> Result<PushChangesReply, String>;
    async fn sync(&self, node: u64, req: SyncRequest) -> Result<SyncReply, String>;
}
