//! Replication: what a room holds besides its Raft-managed membership.
//!
//! - [`timeline`]: automerge chunk documents per room, the history index and the commit
//!   pipeline (durable before acknowledged, published in id order).
//! - [`presence`]: last-writer-wins presence per user with a TTL, and ephemeral typing.
//! - [`markers`]: per (room, user) read markers that never go backwards.
//!
//! This layer must not touch Raft or the network API types beyond the wire messages it
//! stores; membership checks are the caller's (the API) job, made before calling in.
//! Replication of documents between nodes arrives with the cluster.

pub mod markers;
pub mod presence;
pub mod timeline;

pub use timeline::{Appended, ChunkLimits, HistoryQuery, NewMessage, TimelineError, Timelines};
