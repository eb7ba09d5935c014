//! Integration tests of the parley node: real sockets, real sled, real processes.
//!
//! - `api`: in-process nodes driven through the gRPC API.
//! - `cluster`: three real processes forming a cluster; leader kill, quorum loss, restarts.
//! - `cli`: the `parley` binary's command-line contract (DESIGN §6) against a real node.
//! - `replication`: replicated timelines on three processes: delivery, convergence, cursors, fences, quorums.
//! - `crash`: kill -9 under load; nothing acked is lost or duplicated.
//! - `failpoints` (feature `failpoints`): aborts at exact crash points in the durability path.
//! - `support`: starting the binary, running CLI commands, clients.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod api;
mod cli;
mod cluster;
mod crash;
#[cfg(feature = "failpoints")]
mod failpoints;
mod replication;
mod support;
