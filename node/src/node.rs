//! Wires the layers into a running node: `run(config, shutdown)`.
//!
//! The caller owns shutdown, so tests start several nodes in one process on port 0.
//! No global state: everything a node has hangs off the values created here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything a node needs to start. `Config::default_for(dir)` gives test defaults.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// gRPC address (client API and node-to-node); port 0 picks a free port.
    pub listen: SocketAddr,
    /// HTTP/JSON + WebSocket gateway, health and metrics.
    pub http: Option<SocketAddr>,
    /// libp2p listen multiaddr (used by discovery once the cluster exists).
    pub p2p: Option<String>,
    /// Peers to join (libp2p multiaddrs).
    pub join: Vec<String>,
    /// Nodes a fresh cluster waits for before genesis.
    pub bootstrap_expect: usize,
    /// Fixed node id; otherwise read from the data dir or chosen at random on first start.
    pub node_id: Option<u64>,
    /// Partitions at genesis.
    pub partitions: u32,
    /// Default write quorum for message sends (clamped to the replica count).
    pub write_quorum: u8,
    /// Presence turns offline after this long without a heartbeat.
    pub presence_ttl: Duration,
    /// Test-only shift of this node's wall clock (clock-skew experiments).
    pub clock_offset_ms: i64,
}

impl Config {
    pub fn default_for(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            p2p: None,
            join: Vec::new(),
            bootstrap_expect: 1,
            node_id: None,
            partitions: 16,
            write_quorum: 2,
            presence_ttl: Duration::from_secs(30),
            clock_offset_ms: 0,
        }
    }
}

/// Where a started node listens, written to `<data_dir>/node.json` once it serves.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Bound {
    pub node_id: u64,
    pub grpc: SocketAddr,
    pub http: Option<SocketAddr>,
    pub pid: u32,
}

/// Runs a node until `shutdown` resolves. (Being wired; see api/ and replication/.)
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _ = config;
    shutdown.await;
    Ok(())
}
