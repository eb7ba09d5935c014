//! Wires the layers into a running node: `run(config, shutdown)`.
//!
//! The caller owns shutdown, so tests start several nodes in one process on port 0.
//! No global state: everything a node has hangs off the values created here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parley_proto::v1::chat_server::ChatServer;
use parley_proto::v1::cluster_server::ClusterServer;
use tokio::sync::{broadcast, watch};

use crate::api::{self, http, ChatService, Ctx};
use crate::clock::Hlc;
use crate::consensus::cluster::{ClusterPlan, META};
use crate::consensus::state::{Applied, Command, NodeInfo, Role};
use crate::consensus::ReplicationHandler;
use crate::consensus::{AppliedEvent, ClusterRaftService, Groups, Tuning};
use crate::delivery::Hub;
use crate::discovery::{Discovery, DiscoveryConfig, NodeRecord};
use crate::ids::NodeId;
use crate::ids::RoomId;
use crate::placement::Placement;
use crate::replication::lanes::{BatchTransport, PushLanes};
use crate::replication::markers::Markers;
use crate::replication::presence::Presence;
use crate::replication::{ChunkLimits, Network, Timelines};
use crate::store::Db;
use parley_proto::v1::cluster_client::ClusterClient;
use parley_proto::v1::{
    GossipReply, GossipRequest, PushBatchRequest, PushChangesReply, PushChangesRequest, SyncReply,
    SyncRequest,
};

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
    /// Cluster name: nodes of different clusters never mix.
    pub cluster: String,
    /// How long a fresh node waits for `bootstrap_expect` nodes (or for an existing
    /// cluster to answer) before giving up.
    pub genesis_timeout: Duration,
    /// Raft: build a snapshot after this many applied entries (0 = the default).
    pub snapshot_every: u64,
    /// Timelines: compact a room's open chunk after this many changes (0 = the default).
    pub compact_every: usize,
    /// Timelines: seal a room's open chunk once it holds this many entries (0 = the default).
    pub chunk_entries: usize,
    /// How long a busy commit round waits for more writes (`None`: the default, none).
    pub commit_linger: Option<Duration>,
    /// Hand partition leaderships over to their preferred nodes (`consensus::balance`).
    pub balance_leaders: bool,
    /// Sends this node writes at once; more wait for a place (`api::admission`)...
    pub max_sends_in_progress: usize,
    /// ...for at most this long.
    pub admission_wait: Duration,
    /// Page cache of each of the node's two stores, in MiB.
    pub store_cache_mib: u64,
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
            cluster: "parley".to_string(),
            genesis_timeout: Duration::from_secs(600),
            snapshot_every: 0,
            compact_every: 0,
            chunk_entries: 0,
            commit_linger: None,
            balance_leaders: true,
            max_sends_in_progress: crate::api::admission::DEFAULT_LIMIT,
            admission_wait: crate::api::admission::ADMIT_WAIT,
            store_cache_mib: crate::store::DEFAULT_CACHE_MIB,
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

/// How often each replica runs anti-entropy with its peers.
const ANTI_ENTROPY_EVERY: Duration = Duration::from_secs(10);

/// How long `run` waits for in-flight requests when shutting down.
const DRAIN: Duration = Duration::from_secs(5);

/// Runs a node until `shutdown` resolves: opens storage, recovers the Raft groups and
/// timelines, serves gRPC and HTTP, writes `<data_dir>/node.json` once it serves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    use anyhow::Context as _;

    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let bound_file = config.data_dir.join("node.json");
    let _ = std::fs::remove_file(&bound_file);
    let node = node_id(&config)?;
    // Two stores, each with its own group commit: Raft's log appends and votes must not
    // wait behind the flush of message data (under sustained load that flush grows
    // long enough to time out heartbeats and churn leaders).
    let cache = config.store_cache_mib.saturating_mul(1024 * 1024);
    let db = Db::open_with_cache(&config.data_dir.join("db"), cache)
        .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
    let raft_db = Db::open_with_cache(&config.data_dir.join("raft"), cache).with_context(|| {
        format!(
            "cannot open the Raft store in {}",
            config.data_dir.display()
        )
    })?;
    let hlc = Arc::new(Hlc::new(node.0 as u32, config.clock_offset_ms));

    let grpc_listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_listener = match config.http {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen for HTTP on {a}"))?,
        ),
        None => None,
    };
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());

    let discovery = match &config.p2p {
        Some(listen) => {
            let record = NodeRecord {
                node_id: node.0,
                grpc: grpc_addr,
                http: http_addr,
                peer_id: String::new(),
                p2p: Vec::new(),
            };
            let cfg = DiscoveryConfig {
                data_dir: config.data_dir.clone(),
                cluster: config.cluster.clone(),
                listen: listen.clone(),
                join: config.join.clone(),
                record,
            };
            let (d, rec) = Discovery::start(cfg)
                .await
                .context("cannot start discovery")?;
            tracing::info!(peer = %rec.peer_id, p2p = ?rec.p2p, "discovery listening");
            Some(d)
        }
        None if !config.join.is_empty() => {
            anyhow::bail!("--join needs --p2p (the address to listen on for peers)")
        }
        None => None,
    };
    let plan = match ClusterPlan::load(&raft_db)? {
        Some(_) => None,
        None => Some(genesis(&config, node, grpc_addr, discovery.as_ref()).await?),
    };
    let (applied_tx, applied_rx) = broadcast::channel(4096);
    // Peers can elect leaders only once this node serves the Cluster service, so open
    // without waiting and wait for leaders after the server is up.
    let mut tuning = Tuning {
        leader_wait: Duration::ZERO,
        ..Tuning::default()
    };
    if config.snapshot_every > 0 {
        tuning.snapshot_every = config.snapshot_every;
        tuning.keep_after_snapshot = tuning.keep_after_snapshot.min(config.snapshot_every);
    }
    let groups = Groups::open_cluster(&raft_db, node, grpc_addr, plan, tuning, applied_tx)
        .await
        .context("cannot start the Raft groups")?;
    let rf = groups
        .plan()
        .replicas
        .iter()
        .filter(|(g, _)| g.partition().is_some())
        .map(|(_, v)| v.len())
        .max()
        .unwrap_or(1);
    let hub = Hub::new();
    let mut limits = ChunkLimits::default();
    if config.compact_every > 0 {
        limits.compact_every = config.compact_every;
    }
    if config.chunk_entries > 0 {
        limits.max_entries = config.chunk_entries;
    }
    if let Some(linger) = config.commit_linger {
        limits.commit_linger = linger;
    }
    let timelines = Timelines::open(&db, hlc.clone(), hub.clone(), limits)?;
    let markers = Markers::open(&db)?;
    let presence = Presence::new(config.presence_ttl);
    let gossip = crate::replication::gossip::Gossip::new(
        node,
        presence.clone(),
        markers.clone(),
        hub.clone(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        node,
        groups: groups.clone(),
        timelines,
        hub,
        presence,
        markers,
        gossip: gossip.clone(),
        placement: Placement::new(config.partitions),
        hlc,
        write_quorum: config.write_quorum,
        replicas: rf.min(255) as u8,
        cluster: config.cluster.clone(),
        discovery: discovery.clone(),
        forward_channels: Default::default(),
        forward_lanes: Default::default(),
        admission: crate::api::admission::Admission::new(
            config.max_sends_in_progress,
            config.admission_wait,
        ),
        stopping: stop_rx.clone(),
        metrics: Default::default(),
        db: db.clone(),
    });

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(applied_events(ctx.clone(), applied_rx, stop_rx.clone()));
    tasks.spawn(expiry(ctx.clone(), stop_rx.clone()));
    if groups.plan().members.len() > 1 {
        let net = ClusterNet::new(groups.clone(), ctx.placement, node.0);
        ctx.timelines.set_network(node.0, Arc::new(net));
        let timelines = ctx.timelines.clone();
        let stop = stop_rx.clone();
        tasks.spawn(async move { timelines.anti_entropy(ANTI_ENTROPY_EVERY, stop).await });
        if config.balance_leaders {
            tasks.spawn(groups.clone().balance_leaders(stop_rx.clone()));
        }
    }
    let weak_ctx = Arc::downgrade(&ctx);
    let transport = crate::replication::gossip::TonicTransport::new(groups.clone());
    tasks.spawn(gossip.run(
        Arc::new(transport),
        Arc::new(move |u: &crate::ids::UserId| {
            weak_ctx
                .upgrade()
                .map(|c| c.rooms_of(u).into_iter().map(|r| r.id).collect())
                .unwrap_or_default()
        }),
        stop_rx.clone(),
    ));

    let (mut health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ChatServer<ChatService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(parley_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("cannot build gRPC reflection")?;
    let grpc = tonic::transport::Server::builder()
        .concurrency_limit_per_connection(256)
        .add_service(
            ChatServer::new(ChatService::new(ctx.clone())).max_decoding_message_size(1 << 20),
        )
        .add_service(ClusterServer::new(
            ClusterRaftService::new(groups.clone(), config.cluster.clone(), http_addr)
                .with_replication(Arc::new(NodeReplication { ctx: ctx.clone() })),
        ))
        .add_service(health_service)
        .add_service(reflection);
    let mut stop = stop_rx.clone();
    tasks.spawn(async move {
        // The builder's `tcp_nodelay` covers only listeners tonic binds itself: sockets
        // accepted from ours get it here, or Nagle holds back small responses and
        // streamed events until the previous segment is acknowledged.
        let incoming =
            match tonic::transport::server::TcpIncoming::from_listener(grpc_listener, true, None) {
                Ok(i) => i,
                Err(e) => {
                    tracing::error!(error = %e, "gRPC server failed to start");
                    return;
                }
            };
        let res = grpc
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    if let Some(listener) = http_listener {
        let router = http::router(ctx.clone());
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let res = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
    }

    let led = groups.wait_for_leaders(Duration::from_secs(10)).await;
    tracing::info!(node = %node, groups_with_leader = led, "raft groups ready");
    tasks.spawn(register_in_meta(
        ctx.clone(),
        http_addr,
        discovery.clone(),
        stop_rx.clone(),
    ));

    let bound = Bound {
        node_id: node.0,
        grpc: grpc_addr,
        http: http_addr,
        pid: std::process::id(),
    };
    let tmp = config.data_dir.join("node.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&bound)?)?;
    std::fs::rename(&tmp, &bound_file)?;
    tracing::info!(node = %node, grpc = %grpc_addr, http = ?http_addr, "serving");
    println!(
        "parley: serving node {node} grpc={grpc_addr} http={}",
        http_addr.map_or_else(|| "-".to_string(), |a| a.to_string())
    );

    shutdown.await;
    tracing::info!(node = %node, "shutting down");
    let _ = std::fs::remove_file(&bound_file);
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tasks.abort_all();
    }
    groups.shutdown().await;
    if let Some(d) = &discovery {
        d.shutdown().await;
    }
    db.flush().await?;
    raft_db.flush().await?;
    Ok(())
}

/// The plan a fresh node starts with.
/// - Alone (`--bootstrap-expect 1`, no `--join`): every group on this node.
/// - Otherwise it waits for peers through discovery. If one of them already has a plan
///   (the cluster formed earlier), that plan is used: this node joins and is registered,
///   though it holds no replicas yet. If not, once `bootstrap_expect` nodes are known,
///   the plan is computed from the `bootstrap_expect` smallest node ids; every genesis
///   node computes the same plan, provided exactly that many fresh nodes were started.
async fn genesis(
    config: &Config,
    node: NodeId,
    grpc: SocketAddr,
    discovery: Option<&Discovery>,
) -> anyhow::Result<ClusterPlan> {
    let expect = config.bootstrap_expect.max(1);
    let Some(discovery) = discovery.filter(|_| expect > 1 || !config.join.is_empty()) else {
        return Ok(ClusterPlan::genesis(
            &[(node.0, grpc)],
            config.partitions,
            1,
        ));
    };
    let deadline = tokio::time::Instant::now() + config.genesis_timeout;
    // A node joining a formed cluster needs one peer to learn the plan from.
    let want = expect.max(2);
    for round in 1u64.. {
        let started = tokio::time::Instant::now();
        let members = discovery
            .wait_for_members(want, Duration::from_secs(2))
            .await?;
        for m in members.iter().filter(|m| m.node_id != node.0) {
            if let Some(plan) = fetch_plan(&config.cluster, m.grpc).await {
                tracing::info!(from = m.node_id, "joining an existing cluster");
                return Ok(plan);
            }
        }
        if expect > 1 && members.len() >= expect {
            let chosen: Vec<(u64, SocketAddr)> = members
                .iter()
                .take(expect)
                .map(|m| (m.node_id, m.grpc))
                .collect();
            if chosen.iter().any(|(id, _)| *id == node.0) {
                tracing::info!(nodes = ?chosen.iter().map(|c| c.0).collect::<Vec<_>>(), "forming the cluster");
                return Ok(ClusterPlan::genesis(
                    &chosen,
                    config.partitions,
                    expect.min(3),
                ));
            }
            anyhow::bail!(
                "more than {expect} fresh nodes found and this one is not among the {expect} with the \
                 smallest ids; start it with --join once the cluster has formed"
            );
        }
        if round % 15 == 1 {
            tracing::info!(
                found = members.len(),
                expect,
                "waiting for peers before forming or joining the cluster"
            );
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "gave up after {:?}: found {} of {expect} nodes and no existing cluster",
                config.genesis_timeout,
                members.len()
            );
        }
        // Peers found but none has a plan yet (they are still forming): do not spin.
        let spent = started.elapsed();
        if spent < Duration::from_millis(500) {
            tokio::time::sleep(Duration::from_millis(500) - spent).await;
        }
    }
    anyhow::bail!("genesis loop ended unexpectedly")
}

/// The plan of the cluster a node at `addr` belongs to, if it is in ours and has one.
async fn fetch_plan(cluster: &str, addr: SocketAddr) -> Option<ClusterPlan> {
    let reply = crate::consensus::network::hello(
        &addr.to_string(),
        cluster,
        Duration::from_millis(500),
        Duration::from_secs(1),
    )
    .await?;
    if reply.plan.is_empty() {
        return None;
    }
    crate::consensus::codec::decode(&reply.plan).ok()
}

/// Records this node (and its current addresses) in the meta group's node registry,
/// retrying until it succeeds or the node stops.
async fn register_in_meta(
    ctx: Arc<Ctx>,
    http: Option<SocketAddr>,
    discovery: Option<Discovery>,
    mut stop: watch::Receiver<bool>,
) {
    let p2p = discovery.map(|d| d.local_record().p2p).unwrap_or_default();
    let info = NodeInfo {
        node_id: ctx.node.0,
        grpc: ctx.groups.grpc_addr().to_string(),
        http: http.map(|a| a.to_string()).unwrap_or_default(),
        p2p,
        registered_at: ctx.hlc.wall_ms(),
    };
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=10_000u32 {
        let cmd = Command::RegisterNode { info: info.clone() };
        match ctx.groups.write_group(META, cmd, 0, None).await {
            Ok(Ok(_)) => {
                tracing::info!(node = %ctx.node, "registered in the meta group");
                return;
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the meta group refused this node's registration");
                return;
            }
            Err(e) if attempt % 10 == 1 => tracing::info!(error = %e, "registration pending"),
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The node's id: from the config, else from `<data_dir>/node_id`, else a fresh random
/// one (kept in 1..2^32 because message ids carry 32 bits of origin node).
fn node_id(config: &Config) -> anyhow::Result<NodeId> {
    let path = config.data_dir.join("node_id");
    let stored = match std::fs::read_to_string(&path) {
        Ok(s) => Some(
            s.trim()
                .parse::<u64>()
                .map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    let id = match (config.node_id, stored) {
        (Some(want), Some(have)) if want != have => {
            anyhow::bail!(
                "--node-id {want} but {} says this data dir belongs to node {have}",
                path.display()
            )
        }
        (Some(id), _) | (None, Some(id)) => id,
        (None, None) => u64::from(rand::random::<u32>().max(1)),
    };
    if id == 0 || id > u64::from(u32::MAX) {
        anyhow::bail!("node id must be in 1..=4294967295");
    }
    if stored.is_none() {
        std::fs::write(&path, format!("{id}\n"))?;
    }
    Ok(NodeId(id))
}

/// Turns applied Raft commands into membership events for subscribers, and forgets the
/// timelines of deleted rooms. Runs on every replica.
async fn applied_events(
    ctx: Arc<Ctx>,
    mut rx: broadcast::Receiver<AppliedEvent>,
    mut stop: watch::Receiver<bool>,
) {
    use parley_proto::v1 as pb;
    use pb::MembershipChange as C;
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = stop.wait_for(|s| *s) => return,
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "membership event stream lagged; some live events were not sent"
                );
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let (room, user, change, by, role) = match (&ev.command, &ev.applied) {
            (_, Applied::Membership { changed: false, .. }) => continue,
            (Command::Join { room, user, .. }, _) => {
                (room, user, C::MembershipJoined, user, Role::Member)
            }
            (Command::Leave { room, user }, _) => {
                (room, user, C::MembershipLeft, user, Role::Member)
            }
            (Command::Invite { room, by, user, .. }, _) => {
                (room, user, C::MembershipInvited, by, Role::Member)
            }
            (Command::Kick { room, by, user }, _) => {
                (room, user, C::MembershipKicked, by, Role::Member)
            }
            (Command::Ban { room, by, user, .. }, _) => {
                (room, user, C::MembershipBanned, by, Role::Member)
            }
            (Command::Unban { room, by, user }, _) => {
                (room, user, C::MembershipUnbanned, by, Role::Member)
            }
            (
                Command::SetRole {
                    room,
                    by,
                    user,
                    role,
                },
                _,
            ) => (room, user, C::MembershipRoleChanged, by, *role),
            (Command::DeleteRoom { room, by }, _) => {
                publish_membership(&ctx, room, by, C::MembershipRoomDeleted, by, Role::Member);
                if let Err(e) = ctx.timelines.purge_room(room).await {
                    tracing::warn!(room = %room, error = %e, "could not purge a deleted room's timeline");
                }
                if let Err(e) = ctx.markers.purge_room(room) {
                    tracing::warn!(room = %room, error = %e, "could not purge a deleted room's markers");
                }
                continue;
            }
            _ => continue,
        };
        publish_membership(&ctx, room, user, change, by, role);
    }
}

fn publish_membership(
    ctx: &Ctx,
    room: &crate::ids::RoomId,
    user: &crate::ids::UserId,
    change: parley_proto::v1::MembershipChange,
    by: &crate::ids::UserId,
    role: Role,
) {
    use parley_proto::v1 as pb;
    let m = pb::MembershipEvent {
        room_id: room.to_string(),
        user: user.to_string(),
        change: change as i32,
        by: by.to_string(),
        role: api::role_pb(role) as i32,
    };
    ctx.hub.publish_live(
        room,
        Arc::new(pb::Event {
            cursor: String::new(),
            kind: Some(pb::event::Kind::Membership(m)),
        }),
    );
}

/// Announces presence that timed out and typing marks that expired.
async fn expiry(ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    use crate::replication::presence::Status;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for (user, last_seen) in ctx.presence.expire() {
            api::presence_announce(&ctx, &user, Status::Offline, last_seen);
        }
        for (room, user) in ctx.presence.expire_typing() {
            api::typing_announce(&ctx, &room, &user, false);
        }
    }
}

/// Timelines' view of the cluster: a room's replicas are its partition's voters; calls go
/// over the peer channels Raft uses.
struct ClusterNet {
    groups: Groups,
    placement: Placement,
    me: u64,
    /// Pushes travel in per-peer batches (see `replication::lanes`) over the link,
    /// which anti-entropy calls use too.
    lanes: PushLanes<PeerLink>,
}

impl ClusterNet {
    fn new(groups: Groups, placement: Placement, me: u64) -> Self {
        let link = PeerLink {
            groups: groups.clone(),
            peers: crate::consensus::Peers::new(me),
        };
        Self {
            groups,
            placement,
            me,
            lanes: PushLanes::new(link),
        }
    }

    fn link(&self) -> &PeerLink {
        self.lanes.transport()
    }
}

/// A node's replication connections to its peers.
struct PeerLink {
    groups: Groups,
    /// Connections of their own: pushes wait for the receiver's flush, and must not take
    /// the request slots of Raft's connection to the same peer.
    peers: crate::consensus::Peers,
}

impl PeerLink {
    fn client(&self, node: u64) -> Result<ClusterClient<tonic::transport::Channel>, String> {
        let addr = self
            .groups
            .addr_of(node)
            .ok_or_else(|| format!("no address for node {node}"))?;
        self.peers.client(node, &addr).map_err(|e| e.to_string())
    }
}

#[tonic::async_trait]
impl BatchTransport for PeerLink {
    async fn push_batch(
        &self,
        node: u64,
        pushes: Vec<PushChangesRequest>,
        timeout: Duration,
    ) -> Result<Vec<Result<PushChangesReply, String>>, String> {
        let mut c = self.client(node)?;
        let mut req = tonic::Request::new(PushBatchRequest { pushes });
        req.set_timeout(timeout);
        let r = c
            .push_batch(req)
            .await
            .map_err(|s| s.message().to_string())?;
        self.peers.mark_ok(node);
        Ok(r.into_inner()
            .outcomes
            .into_iter()
            .map(|o| match o.reply {
                Some(reply) => Ok(reply),
                None => Err(o.error),
            })
            .collect())
    }
}

#[tonic::async_trait]
impl Network for ClusterNet {
    fn peers_of(&self, room: &RoomId) -> Vec<u64> {
        let p = self.placement.of_room(room);
        self.groups
            .replicas_of(p)
            .into_iter()
            .filter(|n| *n != self.me)
            .collect()
    }

    fn local_rooms(&self) -> Vec<RoomId> {
        let mut out = Vec::new();
        for p in self.placement.all() {
            if let Some(rooms) = self
                .groups
                .try_read(p, |s| s.rooms.keys().cloned().collect::<Vec<_>>())
            {
                out.extend(rooms);
            }
        }
        out
    }

    fn reachable_peers(&self, room: &RoomId) -> usize {
        let raft = self.groups.peers();
        self.peers_of(room)
            .into_iter()
            .filter(|n| raft.recently_reachable(*n) || self.link().peers.recently_reachable(*n))
            .count()
    }

    async fn push(&self, node: u64, req: PushChangesRequest) -> Result<PushChangesReply, String> {
        self.lanes.push(node, req).await
    }

    async fn sync(&self, node: u64, req: SyncRequest) -> Result<SyncReply, String> {
        let link = self.link();
        let mut c = link.client(node)?;
        let r = c
            .sync_room(req)
            .await
            .map_err(|s| s.message().to_string())?;
        link.peers.mark_ok(node);
        Ok(r.into_inner())
    }
}

/// Serves the replication calls of the node-to-node service.
struct NodeReplication {
    ctx: Arc<Ctx>,
}

#[tonic::async_trait]
impl ReplicationHandler for NodeReplication {
    async fn push_changes(
        &self,
        req: PushChangesRequest,
    ) -> Result<PushChangesReply, tonic::Status> {
        let outcome = self.take_push(req).await;
        let m = &self.ctx.metrics;
        api::Metrics::inc(match &outcome {
            Ok(r) if r.durable => &m.pushes_received_taken,
            Ok(r) if r.rejected.is_empty() => &m.pushes_received_waiting,
            _ => &m.pushes_received_refused,
        });
        outcome
    }

    async fn sync_room(&self, req: SyncRequest) -> Result<SyncReply, tonic::Status> {
        match self.ctx.timelines.handle_sync(&req).await {
            Ok(reply) => Ok(reply),
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        }
    }

    async fn gossip(&self, req: GossipRequest) -> Result<GossipReply, tonic::Status> {
        self.ctx.gossip.handle(req).await
    }
}

impl NodeReplication {
    /// Admits a push past the fence and applies it: whether it is durable, or why not.
    async fn take_push(&self, req: PushChangesRequest) -> Result<PushChangesReply, tonic::Status> {
        let room = RoomId::parse(&req.room_id)
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        // The fence, before anything is applied (api::fence).
        match api::fence::admit_push(&self.ctx, &room, &req).await {
            Ok(()) => {}
            Err(r @ api::fence::Refusal::StaleHome(_)) => {
                tracing::debug!(room = %room, from = req.from_node, refusal = %r, "push refused");
                return Err(tonic::Status::failed_precondition(r.to_string()));
            }
            Err(r @ api::fence::Refusal::Invalid(_)) => {
                return Err(tonic::Status::invalid_argument(r.to_string()))
            }
            Err(r @ api::fence::Refusal::Author(_)) => {
                tracing::debug!(room = %room, from = req.from_node, refusal = %r, "push refused");
                return Ok(PushChangesReply {
                    durable: false,
                    rejected: r.to_string(),
                });
            }
        }
        match self
            .ctx
            .timelines
            .apply_remote(&room, req.chunk, &req.changes)
            .await
        {
            Ok(durable) => Ok(PushChangesReply {
                durable,
                rejected: String::new(),
            }),
            Err(e) => Ok(PushChangesReply {
                durable: false,
                rejected: e.to_string(),
            }),
        }
    }
}
