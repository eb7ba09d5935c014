//! The one task that owns the swarm. It `select!`s over swarm events, commands from the
//! [`Discovery`](super::Discovery) handles and two timers, and publishes the member view
//! through a `watch` channel.
//!
//! To stay correct: nothing here may panic or return early on what a peer sends; a bad
//! record or a peer of another cluster is logged and ignored. Every collection is bounded:
//! `pending` holds at most one provider search plus one record lookup per known peer,
//! `joins` is fixed at start, `foreign` is capped.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt as _;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::kad::{self, GetProvidersOk, GetRecordOk, QueryId, QueryResult, Quorum};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{identify, identity::Keypair, noise, tcp, yamux};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::addr::{self, JoinAddr};
use super::{
    identity, members_key, node_key, validate_cluster, DiscoveryConfig, DiscoveryError,
    DiscoveryStatus, NodeRecord, JOIN_RETRY_MAX, LISTEN_TIMEOUT, MEMBER_TTL, REPUBLISH_EVERY,
};

/// First wait before re-dialing a join address; doubles up to [`JOIN_RETRY_MAX`].
const JOIN_RETRY_MIN: Duration = Duration::from_millis(250);
/// The fast timer: due join dials, coalesced publications and searches.
const TICK: Duration = Duration::from_millis(250);
/// A Kademlia query gives up after this long (small clusters answer in milliseconds).
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long records and provider entries live in the DHT without re-publication, so a
/// node that is gone fades out; several times [`REPUBLISH_EVERY`].
const RECORD_TTL: Duration = Duration::from_secs(90);
/// Connections between members stay open while idle; discovery traffic is light.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// At most this many peers of other clusters are remembered (for status and logs).
const FOREIGN_CAP: usize = 256;
/// Commands waiting for the loop.
const COMMAND_QUEUE: usize = 64;

pub(super) enum Command {
    Refresh {
        reply: oneshot::Sender<()>,
    },
    Status {
        reply: oneshot::Sender<DiscoveryStatus>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Refresh { .. } => "Refresh",
            Command::Status { .. } => "Status",
            Command::Shutdown { .. } => "Shutdown",
        })
    }
}

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
}

/// What [`start`] hands to the [`Discovery`](super::Discovery) handle.
pub(super) struct Started {
    pub commands: mpsc::Sender<Command>,
    pub local: watch::Receiver<NodeRecord>,
    pub members: watch::Receiver<Vec<NodeRecord>>,
}

/// A query whose answer the loop acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// `get_providers(members key)`.
    Providers,
    /// `get_record(node key of the peer)`.
    Record(PeerId),
}

#[derive(Debug)]
enum JoinState {
    Waiting {
        next: Instant,
        backoff: Duration,
    },
    Dialing {
        conn: ConnectionId,
        backoff: Duration,
    },
    /// `confirmed` once identify says the peer is in this cluster.
    Connected {
        peer: PeerId,
        confirmed: bool,
    },
    /// Not dialed again: it is this node, or a node of another cluster.
    Given {
        reason: &'static str,
    },
}

struct JoinTarget {
    addr: JoinAddr,
    state: JoinState,
}

struct Member {
    record: NodeRecord,
    last_seen: Instant,
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    cluster: String,
    identify_version: String,
    local_peer: PeerId,
    local: NodeRecord,
    local_tx: watch::Sender<NodeRecord>,
    members_tx: watch::Sender<Vec<NodeRecord>>,
    commands: mpsc::Receiver<Command>,
    listen_addrs: Vec<Multiaddr>,
    view: HashMap<PeerId, Member>,
    pending: HashMap<QueryId, Pending>,
    joins: Vec<JoinTarget>,
    /// Connected peers whose identify says they are in this cluster.
    cluster_peers: HashSet<PeerId>,
    /// Peers that turned out to be in another cluster.
    foreign: HashSet<PeerId>,
    /// Peers of other clusters to hang up on at the next tick.
    to_disconnect: Vec<PeerId>,
    publish_soon: bool,
    search_soon: bool,
}

/// Validates the config, loads the identity, starts listening and spawns the loop once
/// the first listen address is up.
pub(super) async fn start(cfg: DiscoveryConfig) -> Result<Started, DiscoveryError> {
    validate_cluster(&cfg.cluster)?;
    let listen = addr::parse_listen(&cfg.listen)?;
    let joins = cfg
        .join
        .iter()
        .map(|j| addr::parse_join(j))
        .collect::<Result<Vec<_>, _>>()?;
    let keypair = identity::load_or_create(&cfg.data_dir)?;
    let local_peer = keypair.public().to_peer_id();
    let kad_protocol = StreamProtocol::try_from_owned(format!("/parley/{}/kad/1.0.0", cfg.cluster))
        .map_err(|_| DiscoveryError::InvalidCluster(cfg.cluster.clone()))?;
    let identify_version = format!("/parley/{}/1.0.0", cfg.cluster);
    let mut swarm = build_swarm(keypair, kad_protocol, identify_version.clone())?;
    swarm
        .listen_on(listen.clone())
        .map_err(|e| DiscoveryError::Listen {
            addr: listen.to_string(),
            reason: e.to_string(),
        })?;

    let mut local = cfg.record;
    local.peer_id = local_peer.to_base58();
    local.p2p.clear();
    let (local_tx, local_rx) = watch::channel(local.clone());
    let (members_tx, members_rx) = watch::channel(vec![local.clone()]);
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let now = Instant::now();
    let mut el = EventLoop {
        swarm,
        cluster: cfg.cluster,
        identify_version,
        local_peer,
        local,
        local_tx,
        members_tx,
        commands: commands_rx,
        listen_addrs: Vec::new(),
        view: HashMap::new(),
        pending: HashMap::new(),
        joins: joins
            .into_iter()
            .map(|addr| JoinTarget {
                addr,
                state: JoinState::Waiting {
                    next: now,
                    backoff: JOIN_RETRY_MIN,
                },
            })
            .collect(),
        cluster_peers: HashSet::new(),
        foreign: HashSet::new(),
        to_disconnect: Vec::new(),
        publish_soon: false,
        search_soon: false,
    };

    let deadline = Instant::now() + LISTEN_TIMEOUT;
    while el.listen_addrs.is_empty() {
        let listen_failed = |reason: String| DiscoveryError::Listen {
            addr: listen.to_string(),
            reason,
        };
        match tokio::time::timeout_at(deadline, el.swarm.select_next_some()).await {
            Err(_) => return Err(listen_failed("timed out".into())),
            Ok(SwarmEvent::ListenerError { error, .. }) => {
                return Err(listen_failed(error.to_string()))
            }
            Ok(SwarmEvent::ListenerClosed { reason, .. }) => {
                return Err(listen_failed(match reason {
                    Err(e) => e.to_string(),
                    Ok(()) => "listener closed".into(),
                }))
            }
            Ok(event) => el.on_swarm_event(event),
        }
    }
    info!(peer = %el.local_peer, cluster = %el.cluster, addrs = ?el.local.p2p, "p2p discovery listening");
    el.publish();
    el.dial_due_joins();
    if el.joins.iter().any(|j| j.addr.peer.is_some()) {
        if let Err(e) = el.swarm.behaviour_mut().kad.bootstrap() {
            debug!(error = %e, "kademlia bootstrap skipped");
        }
    }
    tokio::spawn(el.run());
    Ok(Started {
        commands: commands_tx,
        local: local_rx,
        members: members_rx,
    })
}

fn build_swarm(
    keypair: Keypair,
    kad_protocol: StreamProtocol,
    identify_version: String,
) -> Result<Swarm<Behaviour>, DiscoveryError> {
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| DiscoveryError::Transport(e.to_string()))?
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            // One provider entry per member: the default (20, Kademlia's k) would cap
            // what a search can see of a bigger cluster.
            let store = MemoryStore::with_config(
                peer,
                MemoryStoreConfig {
                    max_providers_per_key: 1024,
                    ..MemoryStoreConfig::default()
                },
            );
            let mut cfg = kad::Config::new(kad_protocol);
            // The loop re-publishes every REPUBLISH_EVERY itself, so Kademlia's own
            // (hours-long) re-publication is off and entries expire soon after a node dies.
            cfg.set_query_timeout(QUERY_TIMEOUT)
                .set_record_ttl(Some(RECORD_TTL))
                .set_provider_record_ttl(Some(RECORD_TTL))
                .set_publication_interval(None)
                .set_provider_publication_interval(None)
                .set_replication_interval(None)
                .set_caching(kad::Caching::Disabled);
            let mut kad = kad::Behaviour::with_config(peer, store, cfg);
            // Nodes on loopback never get a confirmed external address, which is what
            // would switch Kademlia to server mode by itself; members must answer queries.
            kad.set_mode(Some(kad::Mode::Server));
            let identify = identify::Behaviour::new(
                identify::Config::new(identify_version, key.public())
                    .with_agent_version(format!("parley/{}", env!("CARGO_PKG_VERSION")))
                    .with_push_listen_addr_updates(true),
            );
            Behaviour { kad, identify }
        })
        .map_err(|e| DiscoveryError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_TIMEOUT))
        .build();
    Ok(swarm)
}

impl EventLoop {
    async fn run(mut self) {
        let mut maintain =
            tokio::time::interval_at(Instant::now() + REPUBLISH_EVERY, REPUBLISH_EVERY);
        maintain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stopped_by = loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Refresh { reply }) => {
                        self.search();
                        let _ = reply.send(());
                    }
                    Some(Command::Status { reply }) => {
                        let _ = reply.send(self.status());
                    }
                    Some(Command::Shutdown { reply }) => break Some(reply),
                    None => break None,
                },
                _ = maintain.tick() => self.maintain(),
                _ = tick.tick() => self.on_tick(),
            }
        };
        debug!(peer = %self.local_peer, "p2p discovery stopping");
        // Dropping the swarm closes its listeners and connections; then confirm.
        drop(self);
        if let Some(reply) = stopped_by {
            let _ = reply.send(());
        }
    }

    fn status(&self) -> DiscoveryStatus {
        let mut cluster_peers: Vec<String> =
            self.cluster_peers.iter().map(|p| p.to_base58()).collect();
        cluster_peers.sort();
        let mut foreign_peers: Vec<String> = self.foreign.iter().map(|p| p.to_base58()).collect();
        foreign_peers.sort();
        DiscoveryStatus {
            cluster_peers,
            foreign_peers,
        }
    }

    /// Every REPUBLISH_EVERY: re-publish, search, forget members gone quiet.
    fn maintain(&mut self) {
        self.publish();
        self.search();
        let now = Instant::now();
        let connected = &self.cluster_peers;
        self.view.retain(|peer, m| {
            connected.contains(peer) || now.duration_since(m.last_seen) < MEMBER_TTL
        });
        self.publish_view();
    }

    fn on_tick(&mut self) {
        for peer in std::mem::take(&mut self.to_disconnect) {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        self.dial_due_joins();
        if self.publish_soon {
            self.publish_soon = false;
            self.publish();
            // Also fills our routing table from the new peers' tables.
            if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
                debug!(error = %e, "kademlia bootstrap skipped");
            }
        }
        if self.search_soon {
            self.search_soon = false;
            self.search();
        }
    }

    /// Puts this node's record and announces it as a member. Alone, the puts only reach
    /// the local store (their quorum fails); they are repeated when peers show up.
    fn publish(&mut self) {
        let value = match serde_json::to_vec(&self.local) {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "cannot encode the local node record");
                return;
            }
        };
        let key = node_key(&self.cluster, &self.local.peer_id);
        let kad = &mut self.swarm.behaviour_mut().kad;
        if let Err(e) = kad.put_record(kad::Record::new(key, value), Quorum::One) {
            warn!(error = %e, "cannot store the local node record");
        }
        if let Err(e) = kad.start_providing(members_key(&self.cluster)) {
            warn!(error = %e, "cannot announce membership");
        }
    }

    /// Starts a provider search (unless one runs) and looks up every connected member.
    fn search(&mut self) {
        if !self.pending.values().any(|p| *p == Pending::Providers) {
            let id = self
                .swarm
                .behaviour_mut()
                .kad
                .get_providers(members_key(&self.cluster));
            self.pending.insert(id, Pending::Providers);
        }
        let peers: Vec<PeerId> = self.cluster_peers.iter().copied().collect();
        for peer in peers {
            self.fetch_record(peer);
        }
    }

    fn fetch_record(&mut self, peer: PeerId) {
        if peer == self.local_peer
            || self.foreign.contains(&peer)
            || self.pending.values().any(|p| *p == Pending::Record(peer))
        {
            return;
        }
        let key = node_key(&self.cluster, &peer.to_base58());
        let id = self.swarm.behaviour_mut().kad.get_record(key);
        self.pending.insert(id, Pending::Record(peer));
    }

    /// Publishes self + view, sorted by node id (then peer id, for a stable order).
    fn publish_view(&mut self) {
        let mut all: Vec<NodeRecord> = std::iter::once(self.local.clone())
            .chain(self.view.values().map(|m| m.record.clone()))
            .collect();
        all.sort_by(|a, b| (a.node_id, &a.peer_id).cmp(&(b.node_id, &b.peer_id)));
        self.members_tx.send_if_modified(|current| {
            if *current == all {
                false
            } else {
                *current = all;
                true
            }
        });
    }

    fn dial_due_joins(&mut self) {
        let now = Instant::now();
        for i in 0..self.joins.len() {
            let backoff = match self.joins[i].state {
                JoinState::Waiting { next, backoff } if next <= now => backoff,
                _ => continue,
            };
            let target = &self.joins[i].addr;
            let opts = match target.peer {
                Some(peer) => {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, target.addr.clone());
                    DialOpts::peer_id(peer)
                        .addresses(vec![target.addr.clone()])
                        .build()
                }
                None => DialOpts::unknown_peer_id()
                    .address(target.addr.clone())
                    .build(),
            };
            let conn = opts.connection_id();
            let text = target.text.clone();
            let peer = target.peer;
            let state = match self.swarm.dial(opts) {
                Ok(()) => {
                    debug!(addr = %text, "dialing join address");
                    JoinState::Dialing { conn, backoff }
                }
                Err(DialError::LocalPeerId { .. }) => JoinState::Given {
                    reason: "it is this node",
                },
                Err(DialError::DialPeerConditionFalse(_)) => match peer {
                    // Already connected (it dialed us first): nothing to do.
                    Some(p) if self.swarm.is_connected(&p) => JoinState::Connected {
                        peer: p,
                        confirmed: self.cluster_peers.contains(&p),
                    },
                    _ => retry_later(now, backoff),
                },
                Err(e) => {
                    debug!(addr = %text, error = %e, "cannot dial join address");
                    retry_later(now, backoff)
                }
            };
            if let JoinState::Given { reason } = &state {
                info!(addr = %text, reason, "not joining through this address");
            }
            self.joins[i].state = state;
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Identify(e)) => self.on_identify(e),
            SwarmEvent::Behaviour(BehaviourEvent::Kad(e)) => self.on_kad(e),
            SwarmEvent::NewListenAddr { address, .. } if !self.listen_addrs.contains(&address) => {
                self.listen_addrs.push(address);
                self.listen_addrs_changed();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
                self.listen_addrs_changed();
            }
            SwarmEvent::ListenerClosed { reason, .. } => {
                warn!(reason = ?reason, "p2p listener closed");
            }
            SwarmEvent::ListenerError { error, .. } => {
                warn!(error = %error, "p2p listener error");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                ..
            } => {
                for j in &mut self.joins {
                    let ours = match j.state {
                        JoinState::Dialing { conn, .. } => {
                            conn == connection_id || j.addr.peer == Some(peer_id)
                        }
                        JoinState::Waiting { .. } => j.addr.peer == Some(peer_id),
                        _ => false,
                    };
                    if ours {
                        debug!(addr = %j.addr.text, peer = %peer_id, "connected to join address");
                        j.state = JoinState::Connected {
                            peer: peer_id,
                            confirmed: false,
                        };
                    }
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.cluster_peers.remove(&peer_id);
                if let Some(m) = self.view.get_mut(&peer_id) {
                    m.last_seen = Instant::now();
                }
                let now = Instant::now();
                for j in &mut self.joins {
                    if let JoinState::Connected { peer, confirmed } = j.state {
                        if peer == peer_id {
                            // Keep a way into the cluster: dial again, e.g. after a restart.
                            // A connection that closed before identify confirmed the peer
                            // backs off, so a peer that keeps hanging up is not hammered.
                            j.state = if confirmed {
                                retry_later(now, JOIN_RETRY_MIN)
                            } else {
                                retry_later(now, JOIN_RETRY_MAX)
                            };
                        }
                    }
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                error,
                ..
            } => {
                let now = Instant::now();
                for j in &mut self.joins {
                    if let JoinState::Dialing { conn, backoff } = j.state {
                        if conn == connection_id {
                            debug!(addr = %j.addr.text, error = %error, "join dial failed");
                            j.state = match error {
                                DialError::LocalPeerId { .. } => {
                                    info!(addr = %j.addr.text, "join address is this node");
                                    JoinState::Given {
                                        reason: "it is this node",
                                    }
                                }
                                _ => retry_later(now, backoff),
                            };
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn listen_addrs_changed(&mut self) {
        self.local.p2p = self
            .listen_addrs
            .iter()
            .map(|a| addr::with_peer(a, self.local_peer).to_string())
            .collect();
        self.local_tx.send_replace(self.local.clone());
        self.publish_view();
        self.publish_soon = true;
    }

    fn on_identify(&mut self, event: identify::Event) {
        let identify::Event::Received { peer_id, info, .. } = event else {
            return;
        };
        if info.protocol_version != self.identify_version {
            info!(
                peer = %peer_id,
                theirs = %info.protocol_version,
                ours = %self.identify_version,
                "disconnecting a peer of another cluster"
            );
            if self.foreign.len() < FOREIGN_CAP {
                self.foreign.insert(peer_id);
            }
            self.cluster_peers.remove(&peer_id);
            if self.view.remove(&peer_id).is_some() {
                self.publish_view();
            }
            for j in &mut self.joins {
                if matches!(j.state, JoinState::Connected { peer, .. } if peer == peer_id) {
                    warn!(addr = %j.addr.text, "join address belongs to another cluster; not dialing it again");
                    j.state = JoinState::Given {
                        reason: "another cluster",
                    };
                }
            }
            self.swarm.behaviour_mut().kad.remove_peer(&peer_id);
            // Hang up on the next tick, so the peer gets our identify too and stops
            // dialing us instead of retrying a connection that just dropped.
            if self.to_disconnect.len() < FOREIGN_CAP {
                self.to_disconnect.push(peer_id);
            } else {
                let _ = self.swarm.disconnect_peer_id(peer_id);
            }
            return;
        }
        self.foreign.remove(&peer_id);
        for j in &mut self.joins {
            if let JoinState::Connected { peer, confirmed } = &mut j.state {
                if *peer == peer_id {
                    *confirmed = true;
                }
            }
        }
        for a in info.listen_addrs {
            // Only what our transport dials; /p2p suffixes are implied by the peer id.
            let dialable = a
                .iter()
                .filter(|p| !matches!(p, libp2p::multiaddr::Protocol::P2p(_)))
                .collect::<Multiaddr>();
            if addr::parse_listen(&dialable.to_string()).is_ok() {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer_id, dialable);
            }
        }
        if let Some(m) = self.view.get_mut(&peer_id) {
            m.last_seen = Instant::now();
        }
        if self.cluster_peers.insert(peer_id) {
            debug!(peer = %peer_id, "new cluster peer");
            self.fetch_record(peer_id);
            self.publish_soon = true;
            self.search_soon = true;
        }
    }

    fn on_kad(&mut self, event: kad::Event) {
        let kad::Event::OutboundQueryProgressed {
            id, result, step, ..
        } = event
        else {
            return;
        };
        match (self.pending.get(&id).copied(), result) {
            (
                Some(Pending::Providers),
                QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders { providers, .. })),
            ) => {
                for peer in providers {
                    self.fetch_record(peer);
                }
            }
            (Some(Pending::Providers), QueryResult::GetProviders(Err(e))) => {
                debug!(error = %e, "member search ended");
            }
            (
                Some(Pending::Record(peer)),
                QueryResult::GetRecord(Ok(GetRecordOk::FoundRecord(found))),
            ) => {
                self.on_record(peer, found.record);
                // One copy is enough: stop asking the rest of the DHT.
                if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                    q.finish();
                }
            }
            (Some(Pending::Record(peer)), QueryResult::GetRecord(Err(e))) => {
                debug!(peer = %peer, error = %e, "node record lookup failed");
            }
            (_, QueryResult::PutRecord(Err(e))) => {
                debug!(error = %e, "node record not replicated (yet)");
            }
            (_, QueryResult::StartProviding(Err(e))) => {
                debug!(error = %e, "membership announcement not replicated (yet)");
            }
            _ => {}
        }
        if step.last {
            self.pending.remove(&id);
        }
    }

    fn on_record(&mut self, peer: PeerId, record: kad::Record) {
        let parsed: NodeRecord = match serde_json::from_slice(&record.value) {
            Ok(r) => r,
            Err(e) => {
                warn!(peer = %peer, error = %e, "ignoring an unreadable node record");
                return;
            }
        };
        let peer_text = peer.to_base58();
        if parsed.peer_id != peer_text || record.publisher.is_some_and(|p| p != peer) {
            warn!(peer = %peer, claimed = %parsed.peer_id, "ignoring a node record published for another peer");
            return;
        }
        self.view.insert(
            peer,
            Member {
                record: parsed,
                last_seen: Instant::now(),
            },
        );
        self.publish_view();
    }
}

fn retry_later(now: Instant, backoff: Duration) -> JoinState {
    JoinState::Waiting {
        next: now + backoff,
        backoff: (backoff * 2).min(JOIN_RETRY_MAX),
    }
}
