//! The Parley node.
//!
//! Layers, bottom up (each folder's `mod.rs` says what it owns and must never touch):
//! - [`ids`], [`clock`]: typed ids and the hybrid logical clock that orders messages.
//! - [`store`]: the only module that names sled; trees, batches, group-commit flush.
//! - [`discovery`]: the libp2p swarm (Kademlia + identify) that finds the cluster's members.
//! - [`placement`]: room/user -> partition -> replica set.
//! - [`consensus`]: openraft, one group per partition; the pure partition state machine.
//! - [`replication`]: automerge room timelines, the history index, presence, read markers.
//! - [`delivery`]: live fan-out of events to subscribers, resume cursors.
//! - [`api`]: tonic services (one file per area), HTTP gateway, auth, error -> status.
//! - [`node`]: `run(config, shutdown)` wires the layers; several nodes may run in one process.
//! - [`cli`]: the `parley` command-line client.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod api;
pub mod cli;
pub mod clock;
pub mod consensus;
pub mod delivery;
pub mod discovery;
pub mod ids;
pub mod node;
pub mod placement;
pub mod replication;
pub mod store;
