//! Discovery: how nodes of one cluster find each other. Owns the libp2p swarm (TCP +
//! noise + yamux, Kademlia, identify), run by one event-loop task (`event_loop`) behind
//! the cloneable [`Discovery`] handle. It never touches storage (except its own key file,
//! `<data_dir>/p2p_key`), Raft or the client API: it only answers "who is in my cluster and
//! where do they listen".
//!
//! How members are found:
//! - Each node puts its [`NodeRecord`] (JSON) in the DHT under `/parley/<cluster>/node/<peer
//!   id>` and announces itself as a provider of `/parley/<cluster>/members`, again every
//!   [`REPUBLISH_EVERY`] and whenever a new peer of the cluster shows up.
//! - A search is `get_providers(members)`, then `get_record(node key)` per provider. Peers
//!   connected directly are looked up at once (identify tells their listen addresses,
//!   which go to Kademlia's routing table).
//! - Clusters never mix: the Kademlia protocol is `/parley/<cluster>/kad/1.0.0`, so peers
//!   of another cluster cannot even exchange DHT messages, and identify's protocol version
//!   is `/parley/<cluster>/1.0.0`; a peer that reports another one is disconnected.
//!
//! `--join` addresses: with `/p2p/<peer id>` the peer goes into Kademlia and is dialed;
//! without it, the address is dialed and identify tells who answered. A join address that
//! does not parse (or is not `/ip4|ip6/<ip>/tcp/<port>[/p2p/<id>]`) is an error at
//! [`Discovery::start`]: a typo in an operator's command line should stop the node, not
//! leave it alone forever. Unreachable addresses are retried with backoff (at most every
//! [`JOIN_RETRY_MAX`]) until connected, and again whenever that connection drops.
//!
//! The view of members keeps a `last_seen` per peer; an entry not refreshed for
//! [`MEMBER_TTL`] while its peer is not connected is dropped. DHT entries live 90 s
//! without re-publication, so a node that is gone leaves every view within about
//! 90 s + [`MEMBER_TTL`]. A node re-created with a new key but the same node id shows up
//! twice until its old entry fades. The meta Raft group, not this view, is the truth about
//! cluster membership.

mod addr;
mod event_loop;
mod identity;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use event_loop::Command;

/// How often a node re-puts its record and re-announces itself as a member, and searches.
pub const REPUBLISH_EVERY: Duration = Duration::from_secs(30);
/// A member not seen (record fetched or peer connected) for this long is dropped.
pub const MEMBER_TTL: Duration = Duration::from_secs(120);
/// Longest wait between two dials of a join address that has not answered.
pub const JOIN_RETRY_MAX: Duration = Duration::from_secs(2);
/// How long [`Discovery::start`] waits for the listener to come up.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a node tells the cluster about itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NodeRecord {
    pub node_id: u64,
    /// gRPC: client API and node-to-node.
    pub grpc: SocketAddr,
    /// HTTP/JSON + WebSocket gateway, if served.
    pub http: Option<SocketAddr>,
    /// The libp2p peer id (base58), filled in by [`Discovery::start`].
    pub peer_id: String,
    /// The libp2p listen multiaddrs with `/p2p/<peer id>`, filled in by [`Discovery::start`].
    pub p2p: Vec<String>,
}

/// Everything discovery needs to start.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Where `p2p_key` lives (created if missing).
    pub data_dir: PathBuf,
    /// Cluster name: 1-64 of `A-Z a-z 0-9 . _ -`. Nodes of different clusters never mix.
    pub cluster: String,
    /// libp2p listen multiaddr, e.g. `/ip4/127.0.0.1/tcp/0`.
    pub listen: String,
    /// Multiaddrs of nodes to join, with or without `/p2p/<peer id>`.
    pub join: Vec<String>,
    /// This node's record; `peer_id` and `p2p` are filled in by [`Discovery::start`].
    pub record: NodeRecord,
}

/// Why discovery could not start or answer.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("invalid cluster name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ -")]
    InvalidCluster(String),
    #[error("cannot read or write the p2p key file {path}: {source}")]
    KeyIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the p2p key file {path} is corrupt ({reason}); restore it, or delete it to get a new \
         identity (the node's peer id changes)"
    )]
    CorruptKey { path: PathBuf, reason: String },
    #[error("invalid p2p listen address {addr:?}: {reason}")]
    BadListenAddress { addr: String, reason: String },
    #[error(
        "invalid join address {addr:?}: {reason} (expected /ip4/<ip>/tcp/<port> with an \
         optional /p2p/<peer id>)"
    )]
    BadJoinAddress { addr: String, reason: String },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("cannot build the libp2p transport: {0}")]
    Transport(String),
    #[error("discovery has stopped")]
    Stopped,
}

/// What the swarm is connected to, for health output and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryStatus {
    /// Connected peers (base58 ids) whose identify says they are in this cluster.
    pub cluster_peers: Vec<String>,
    /// Peers found to be in another cluster and disconnected (at most a few hundred kept).
    pub foreign_peers: Vec<String>,
}

/// A cloneable handle to the discovery task. Dropping every handle stops the task.
#[derive(Clone, Debug)]
pub struct Discovery {
    commands: mpsc::Sender<Command>,
    local: watch::Receiver<NodeRecord>,
    members: watch::Receiver<Vec<NodeRecord>>,
}

// Handles are shared across tasks.
const _: fn() = || {
    fn assert_send_sync<T: Clone + Send + Sync + 'static>() {}
    assert_send_sync::<Discovery>();
};

impl Discovery {
    /// Starts the swarm task; returns once listening. The returned record has `peer_id`
    /// and the actual listen multiaddrs (with `/p2p/<id>`) filled in.
    pub async fn start(cfg: DiscoveryConfig) -> Result<(Discovery, NodeRecord), DiscoveryError> {
        let started = event_loop::start(cfg).await?;
        let record = started.local.borrow().clone();
        Ok((
            Discovery {
                commands: started.commands,
                local: started.local,
                members: started.members,
            },
            record,
        ))
    }

    /// This node's record as published now.
    pub fn local_record(&self) -> NodeRecord {
        self.local.borrow().clone()
    }

    /// Records of every cluster member known now, including this node, sorted by node_id.
    pub async fn members(&self) -> Result<Vec<NodeRecord>, DiscoveryError> {
        // The event loop publishes the view on every change: no round trip needed, but a
        // stopped loop must not look like a quiet cluster.
        if self.members.has_changed().is_err() {
            return Err(DiscoveryError::Stopped);
        }
        Ok(self.members.borrow().clone())
    }

    /// Waits until at least `n` members (including self) are known, or the timeout passes;
    /// returns what is known. Searches again every couple of seconds while waiting.
    pub async fn wait_for_members(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<NodeRecord>, DiscoveryError> {
        const SEARCH_EVERY: Duration = Duration::from_secs(2);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.members.clone();
        let mut next_search = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            let known = rx.borrow_and_update().clone();
            if known.len() >= n || now >= deadline {
                return Ok(known);
            }
            if now >= next_search {
                self.refresh().await?;
                next_search = now + SEARCH_EVERY;
            }
            let wake = deadline.min(next_search);
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err(DiscoveryError::Stopped);
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Triggers an immediate search (get_providers + get_record); returns once it started.
    /// Found members show up in [`Discovery::members`] as the queries answer.
    pub async fn refresh(&self) -> Result<(), DiscoveryError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Refresh { reply })
            .await
            .map_err(|_| DiscoveryError::Stopped)?;
        rx.await.map_err(|_| DiscoveryError::Stopped)
    }

    /// What the swarm is connected to now.
    pub async fn status(&self) -> Result<DiscoveryStatus, DiscoveryError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Status { reply })
            .await
            .map_err(|_| DiscoveryError::Stopped)?;
        rx.await.map_err(|_| DiscoveryError::Stopped)
    }

    /// Stops the task and closes the swarm (listeners and connections); returns once it
    /// has. Calling it again, or from another clone, is harmless.
    pub async fn shutdown(&self) {
        let (reply, rx) = oneshot::channel();
        if self
            .commands
            .send(Command::Shutdown { reply })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }
}

/// The DHT key of a node's record.
fn node_key(cluster: &str, peer_id: &str) -> libp2p::kad::RecordKey {
    libp2p::kad::RecordKey::new(&format!("/parley/{cluster}/node/{peer_id}"))
}

/// The DHT key every member provides.
fn members_key(cluster: &str) -> libp2p::kad::RecordKey {
    libp2p::kad::RecordKey::new(&format!("/parley/{cluster}/members"))
}

fn validate_cluster(cluster: &str) -> Result<(), DiscoveryError> {
    let ok = !cluster.is_empty()
        && cluster.len() <= 64
        && cluster
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(DiscoveryError::InvalidCluster(cluster.to_owned()))
    }
}
