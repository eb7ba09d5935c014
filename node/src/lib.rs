//! The Parley node.
//!
//! Layers, bottom up (each folder's `mod.rs` says what it owns and must never touch):
//! - [`ids`], [`clock`]: typed ids and the hybrid logical clock that orders messages.
//! - [`store`]: the only module that names sled; trees, batches, group-commit flush.
//! - [`stats`]: latency histograms any layer records into for `/metrics`.
//! - [`discovery`]: the libp2p swarm (Kademlia + identify) that finds the cluster's members.
//! - [`placement`]: room/user -> partition -> replica set.
//! - [`consensus`]: openraft, one group per partition; the pure partition state machine.
//! - [`replication`]: automerge room timelines, the history index, presence, read markers.
//! - [`delivery`]: live fan-out of events to subscribers, resume cursors.
//! - [`api`]: tonic services (one file per area), HTTP gateway, auth, error -> status.
//! - [`node`]: `run(config, shutdown)` wires the layers; several nodes may run in one process.
//! - [`cli`]: the `parley` command-line client.

#![cfg_attr(test, allow(clippy::unwrap_used))]

/// A crash point for the durability tests. Built with the `failpoints` feature and
/// `FAILPOINTS=<name>=return` (fail crate syntax: `3*off->return` passes three
/// times, then fires), the process aborts right there, as a power cut would stop it.
/// Without the feature it compiles to nothing.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        if fail::eval($name, |_| ()).is_some() {
            eprintln!("crash point {} reached: aborting", $name);
            std::process::abort();
        }
    };
}

/// See the `failpoints` variant.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {};
}

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
pub mod stats;
pub mod store;

/// Helpers shared by unit tests across modules.
#[cfg(test)]
pub(crate) mod test_log {
    use std::sync::{Arc, Mutex};

    /// A log writer that keeps what it is given, for tests that check what was logged.
    #[derive(Clone, Default)]
    pub struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        /// Everything written so far, as text.
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
