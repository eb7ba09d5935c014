//! The node's connections to its peers: one lazily connected tonic [`Channel`] per peer
//! node, shared by every Raft group and by request forwarding, and the [`Faults`] hook
//! that tests use to cut links.
//!
//! To stay correct:
//! - A channel is keyed by (node id, address). A peer that comes back at another address
//!   gets a fresh channel; one that comes back at the same address is reconnected by tonic
//!   on the next call (`connect_lazy` never gives a peer up).
//! - [`Faults`] is consulted before every outgoing call; a blocked link fails at once as
//!   unreachable, exactly like a peer that refuses connections. An empty `Faults` (the
//!   production case) blocks nothing.
//! - Channels are made on the runtime [`Peers::on_runtime`] names, if any: a channel's
//!   connection task runs where the channel was made, so Raft's connections run on Raft's
//!   own runtime however busy the node's main runtime is.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parley_proto::v1::cluster_client::ClusterClient;
use tonic::transport::{Channel, Endpoint};

/// How long a connection attempt to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A peer counts as reachable if a call to it succeeded this recently.
const REACHABLE_WITHIN: Duration = Duration::from_secs(2);

/// Why a peer could not be called.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("link {from} -> {to} is blocked (fault injection)")]
    Blocked { from: u64, to: u64 },
    #[error("bad address {addr:?} of node {node}: {reason}")]
    BadAddress {
        node: u64,
        addr: String,
        reason: String,
    },
}

#[derive(Default)]
struct FaultSet {
    blocked: BTreeSet<(u64, u64)>,
    isolated: BTreeSet<u64>,
}

/// Links cut on purpose, for tests. Cheap to clone; clones share the set. Directional:
/// `block(a, b)` stops calls from `a` to `b` made through a [`Peers`] of node `a`.
#[derive(Clone, Default)]
pub struct Faults {
    set: Arc<Mutex<FaultSet>>,
}

impl Faults {
    fn with<T>(&self, f: impl FnOnce(&mut FaultSet) -> T) -> T {
        f(&mut self.set.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Cuts calls from `from` to `to`.
    pub fn block(&self, from: u64, to: u64) {
        self.with(|s| s.blocked.insert((from, to)));
    }

    /// Cuts every call to and from `node`.
    pub fn isolate(&self, node: u64) {
        self.with(|s| s.isolated.insert(node));
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.with(|s| *s = FaultSet::default());
    }

    pub fn is_blocked(&self, from: u64, to: u64) -> bool {
        self.with(|s| {
            s.isolated.contains(&from)
                || s.isolated.contains(&to)
                || s.blocked.contains(&(from, to))
        })
    }
}

struct Peer {
    addr: String,
    channel: Channel,
    last_ok: Option<Instant>,
}

/// This node's channels to the other nodes. Cheap to clone; clones share the channels.
#[derive(Clone)]
pub struct Peers {
    me: u64,
    faults: Faults,
    map: Arc<Mutex<HashMap<u64, Peer>>>,
    /// Where channels' connection tasks run; the caller's runtime if `None`.
    runtime: Option<tokio::runtime::Handle>,
}

impl Peers {
    pub fn new(me: u64) -> Self {
        Self {
            me,
            faults: Faults::default(),
            map: Arc::default(),
            runtime: None,
        }
    }

    /// These peers with their channels made (and their connections driven) on `runtime`.
    pub fn on_runtime(self, runtime: tokio::runtime::Handle) -> Self {
        Self {
            runtime: Some(runtime),
            ..self
        }
    }

    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// A client for `node` at `addr` over the shared channel (made on first use).
    pub fn client(&self, node: u64, addr: &str) -> Result<ClusterClient<Channel>, PeerError> {
        if self.faults.is_blocked(self.me, node) {
            return Err(PeerError::Blocked {
                from: self.me,
                to: node,
            });
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = map.get(&node).filter(|p| p.addr == addr) {
            return Ok(ClusterClient::new(p.channel.clone()));
        }
        let bad = |reason: String| PeerError::BadAddress {
            node,
            addr: addr.to_owned(),
            reason,
        };
        let _on = self.runtime.as_ref().map(|r| r.enter());
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            // No I/O here: the connection is made (and remade) on use.
            .connect_lazy();
        map.insert(
            node,
            Peer {
                addr: addr.to_owned(),
                channel: channel.clone(),
                last_ok: None,
            },
        );
        Ok(ClusterClient::new(channel))
    }

    /// Records that a call to `node` just succeeded.
    pub fn mark_ok(&self, node: u64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = map.get_mut(&node) {
            p.last_ok = Some(Instant::now());
        }
    }

    /// Whether a majority of `voters` (this node among them, if it is one) answered a
    /// call recently: a slow quorum rather than a lost one.
    pub fn quorum_reachable(&self, voters: &[u64]) -> bool {
        let up = voters
            .iter()
            .filter(|n| self.recently_reachable(**n))
            .count();
        up > voters.len() / 2
    }

    /// Whether `node` answered a call recently (this node always counts as reachable).
    pub fn recently_reachable(&self, node: u64) -> bool {
        if node == self.me {
            return true;
        }
        if self.faults.is_blocked(self.me, node) {
            return false;
        }
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&node)
            .and_then(|p| p.last_ok)
            .is_some_and(|t| t.elapsed() < REACHABLE_WITHIN)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    #[tokio::test]
    async fn faults_block_and_heal() {
        let peers = Peers::new(1);
        let f = peers.faults().clone();
        assert!(!f.is_blocked(1, 2));
        assert!(peers.client(2, "127.0.0.1:1").is_ok());
        f.block(1, 2);
        assert!(f.is_blocked(1, 2) && !f.is_blocked(2, 1));
        assert!(matches!(
            peers.client(2, "127.0.0.1:1"),
            Err(PeerError::Blocked { from: 1, to: 2 })
        ));
        f.heal();
        f.isolate(3);
        assert!(f.is_blocked(3, 1) && f.is_blocked(2, 3) && !f.is_blocked(1, 2));
        assert!(!peers.recently_reachable(3));
        assert!(peers.recently_reachable(1));
        f.heal();
        assert!(!f.is_blocked(2, 3));
        assert!(matches!(
            peers.client(4, "not an address\n"),
            Err(PeerError::BadAddress { node: 4, .. })
        ));
    }

    #[tokio::test]
    async fn a_quorum_is_reachable_only_with_a_majority_answering() {
        let peers = Peers::new(1);
        for n in [2, 3, 4, 5] {
            assert!(peers.client(n, "127.0.0.1:1").is_ok());
        }
        // Nobody has answered yet: this node alone is no majority of three.
        assert!(!peers.quorum_reachable(&[1, 2, 3]));
        assert!(peers.quorum_reachable(&[1]));
        peers.mark_ok(2);
        assert!(peers.quorum_reachable(&[1, 2, 3]));
        // Two of five is not a majority; three is.
        assert!(!peers.quorum_reachable(&[1, 2, 3, 4, 5]));
        peers.mark_ok(4);
        assert!(peers.quorum_reachable(&[1, 2, 3, 4, 5]));
        // A cut link does not count, however recent its last answer.
        peers.faults().block(1, 2);
        assert!(!peers.quorum_reachable(&[1, 2, 3]));
        // Voters that do not include this node need a majority of their own.
        peers.faults().heal();
        assert!(!peers.quorum_reachable(&[2, 3, 5]));
        peers.mark_ok(3);
        assert!(peers.quorum_reachable(&[2, 3, 5]));
    }
}
