//! Consensus: one openraft group per partition, and the pure partition state machine.
//!
//! Owns: the Raft type config ([`typ`]), the versioned encoding of everything Raft writes
//! or sends ([`codec`]), the log store ([`log_store`]) and state machine
//! ([`state_machine`]) on top of [`crate::store`], the gRPC transport ([`network`]) over
//! one shared channel per peer ([`peers`]), the cluster's genesis plan ([`cluster`]), the
//! registry of groups the node takes part in ([`groups::Groups`]) and the routing of
//! writes and strong reads to a partition's leader ([`routing`]), and the spreading of
//! partition leaderships over the nodes ([`balance`]).
//!
//! Never touches: sled (only through `store`), client-facing errors (the API layer maps
//! [`ConsensusError`]), rooms' message timelines (replication).

pub mod balance;
pub mod cluster;
pub mod codec;
pub mod groups;
pub mod log_store;
pub mod network;
pub mod peers;
pub mod raft_log;
pub mod routing;
pub mod state;
pub mod state_machine;
pub mod typ;

pub use cluster::ClusterPlan;
pub use groups::{AppliedEvent, ConsensusError, GroupStatus, Groups, NoLease, Tuning};
pub use network::{ClusterRaftService, ReplicationHandler};
pub use peers::Faults;
pub use peers::Peers;

#[cfg(test)]
mod cluster_tests;

#[cfg(test)]
pub(crate) mod test_support {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use crate::store::Db;

    /// Opens the store at `path`, polling (bounded) while a previous instance in this
    /// process still holds the directory's lock during its teardown.
    pub(crate) async fn open_db(path: &Path) -> Db {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Db::open(path) {
                Ok(db) => return db,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("store did not reopen within 10 s: {e}"),
            }
        }
    }
}
