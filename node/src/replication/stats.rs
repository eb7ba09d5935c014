//! Replication counters, read by the `/metrics` endpoint. Relaxed atomics: each value is
//! exact on its own; a scrape is not a consistent cut across them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// What this node's replication did since it started.
#[derive(Debug, Default)]
pub struct ReplicationStats {
    /// Pushes of this node's writes that a peer answered as durable.
    pub pushes_taken: AtomicU64,
    /// Pushes a peer answered but did not take: refused (fence, damaged change) or
    /// applied while still waiting for earlier changes.
    pub pushes_not_taken: AtomicU64,
    /// Pushes with no answer: the call failed or timed out.
    pub pushes_failed: AtomicU64,
    /// Writes answered with a quorum error: fewer than `W` durable copies in time.
    pub writes_short_of_quorum: AtomicU64,
    /// Anti-entropy exchanges this node started that completed.
    pub exchanges_completed: AtomicU64,
    /// Anti-entropy exchanges this node started that failed or timed out.
    pub exchanges_failed: AtomicU64,
    /// Timeline entries this node gained through the exchanges it started.
    pub exchange_entries_gained: AtomicU64,
    /// Exchanges this node started over a chunk sealed on both sides that ended at
    /// the first call because both held the same heads (no load of the chunk).
    pub sealed_same_heads: AtomicU64,
    /// Sealed chunks loaded whole from the store (anti-entropy over a sealed chunk
    /// whose heads were not known or differed, or a peer's change to one).
    pub sealed_loads: AtomicU64,
    /// How long a message written here took from reaching its room until `W` replicas
    /// held it durably (acknowledged writes only).
    pub write_ack: crate::stats::Histogram,
}

impl ReplicationStats {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
}
