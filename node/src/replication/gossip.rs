//! Gossip: presence, typing and read markers exchanged between every pair of nodes.
//!
//! Each node keeps presence, typing and read markers for all users, merged from every
//! node:
//! - **Presence** is a last-writer-wins register per user (see `presence`: ordered by
//!   the user's last-seen time on the node where `SetPresence` was called, then node id,
//!   then offline-beats-online). Rule: *each node gossips its local entries (those set by
//!   `SetPresence` on it) at once when they change and again every TTL/3; a receiver
//!   treats every copy as a heartbeat and lets a remote entry expire TTL after the last
//!   copy it received.* So when a node dies its users go offline everywhere within the
//!   TTL (plus one gossip round). A local entry whose own TTL ran out is sent as offline
//!   for one more TTL, so peers drop it at once rather than a TTL later.
//! - **Typing** is forwarded as is; every receiver marks it (expires after 5 s) and
//!   publishes the change to its own subscribers of the room.
//! - **Read markers** are merged with max into each node's durable `Markers` tree; a
//!   receiver publishes the markers that moved. Anti-entropy: a peer seen for the first
//!   time, one whose send failed or was skipped, and every peer every
//!   [`FULL_RESYNC_EVERY`] get the whole tree, [`RESYNC_PAGE`] markers per round, so
//!   markers converge after a partition heals or a node restarts.
//!
//! Transport: one background task ([`Gossip::run`]) drains the outbox every [`ROUND`]
//! and sends one `GossipRequest` per peer (the plan's members and the meta group's
//! registered nodes, minus this node) through a [`GossipTransport`]; a peer whose last
//! send is still in flight is skipped for the round. Failures are logged at debug and
//! repaired by the next round and by anti-entropy. API calls only push to the outbox;
//! they never wait for the network.
//!
//! This module does not check membership: the API does that before handing an item
//! over, and a receiver trusts its peers (they are cluster members).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use parley_proto::v1 as pb;
use parley_proto::v1::cluster_client::ClusterClient;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};

use super::markers::{Marker, Markers};
use super::presence::{Presence, Status};
use crate::consensus::cluster::META;
use crate::consensus::Groups;
use crate::delivery::Hub;
use crate::ids::{MessageId, NodeId, RoomId, UserId};

/// How often the outbox is drained.
pub const ROUND: Duration = Duration::from_millis(100);
/// Markers per anti-entropy page (one page per peer per round).
pub const RESYNC_PAGE: usize = 512;
/// Every peer gets the whole marker tree again this often.
pub const FULL_RESYNC_EVERY: Duration = Duration::from_secs(30);
/// Outbox bounds: typing beyond this is dropped (it is ephemeral); markers beyond it
/// are dropped from the outbox and sent by anti-entropy instead.
const MAX_PENDING_TYPING: usize = 4096;
const MAX_PENDING_MARKERS: usize = 16 * 1024;
/// Local presence entries per request.
const MAX_PRESENCE_PER_REQUEST: usize = 20_000;
/// How long one send may take before it counts as failed.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a gossip send failed. Only logged: the next round and anti-entropy repair it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("gossip to node {to} failed: {reason}")]
pub struct SendError {
    pub to: NodeId,
    pub reason: String,
}

/// How gossip reaches the other nodes. Production uses [`TonicTransport`]; tests plug in
/// an in-memory one.
///
/// To stay correct: `peers` lists every other node that should receive gossip (never
/// this node), and `send` returns `Ok` only once the peer applied the batch (its
/// `Gossip::handle` returned `Ok`), since markers acknowledged that way are not resent.
#[tonic::async_trait]
pub trait GossipTransport: Send + Sync + 'static {
    fn peers(&self) -> Vec<NodeId>;
    async fn send(&self, to: NodeId, req: pb::GossipRequest) -> Result<(), SendError>;
}

/// The rooms a user is in, for presence announcements (the API's `Ctx::rooms_of`).
pub type RoomsOf = Arc<dyn Fn(&UserId) -> Vec<RoomId> + Send + Sync>;

/// Counters, for metrics and tests.
#[derive(Debug, Default)]
pub struct GossipStats {
    pub sent: AtomicU64,
    pub send_failed: AtomicU64,
    pub received: AtomicU64,
    /// Incoming items dropped because a field did not validate.
    pub skipped: AtomicU64,
    /// Outgoing typing events or markers dropped because the outbox was full.
    pub dropped: AtomicU64,
}

#[derive(Default)]
struct Outbox {
    presence: BTreeSet<UserId>,
    typing: Vec<pb::TypingEvent>,
    markers: HashMap<(RoomId, UserId), MessageId>,
    /// Markers were dropped: every peer needs a full resync.
    overflow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Resync {
    Idle,
    /// Send the marker tree from after this key (`None` = from the start).
    From(Option<Vec<u8>>),
}

struct PeerState {
    busy: bool,
    resync: Resync,
    /// Bumped whenever `resync` restarts, so a late reply does not move a newer cursor.
    generation: u64,
}

impl PeerState {
    fn restart_resync(&mut self) {
        self.resync = Resync::From(None);
        self.generation += 1;
    }
}

struct Inner {
    me: NodeId,
    presence: Presence,
    markers: Markers,
    hub: Hub,
    outbox: Mutex<Outbox>,
    peers: Mutex<HashMap<NodeId, PeerState>>,
    rooms_of: OnceLock<RoomsOf>,
    stats: GossipStats,
}

/// The gossip of one node. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Gossip {
    inner: Arc<Inner>,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Gossip>();
};

/// A live presence event.
pub fn presence_event(user: &UserId, status: Status, last_seen_ms: u64) -> Arc<pb::Event> {
    Arc::new(pb::Event {
        cursor: String::new(),
        kind: Some(pb::event::Kind::Presence(presence_info(
            user,
            status,
            last_seen_ms,
        ))),
    })
}

fn presence_info(user: &UserId, status: Status, last_seen_ms: u64) -> pb::PresenceInfo {
    pb::PresenceInfo {
        user: user.to_string(),
        state: status.to_pb() as i32,
        last_seen: i64::try_from(last_seen_ms).unwrap_or(i64::MAX),
    }
}

/// A live typing event.
pub fn typing_event(room: &RoomId, user: &UserId, typing: bool) -> Arc<pb::Event> {
    Arc::new(pb::Event {
        cursor: String::new(),
        kind: Some(pb::event::Kind::Typing(pb::TypingEvent {
            room_id: room.to_string(),
            user: user.to_string(),
            typing,
        })),
    })
}

/// A live read-marker event.
pub fn read_event(room: &RoomId, user: &UserId, id: MessageId) -> Arc<pb::Event> {
    Arc::new(pb::Event {
        cursor: String::new(),
        kind: Some(pb::event::Kind::Read(pb::ReadMarkerEvent {
            room_id: room.to_string(),
            user: user.to_string(),
            message_id: id.to_string(),
        })),
    })
}

impl Gossip {
    pub fn new(me: NodeId, presence: Presence, markers: Markers, hub: Hub) -> Self {
        Self {
            inner: Arc::new(Inner {
                me,
                presence,
                markers,
                hub,
                outbox: Mutex::default(),
                peers: Mutex::default(),
                rooms_of: OnceLock::new(),
                stats: GossipStats::default(),
            }),
        }
    }

    pub fn stats(&self) -> &GossipStats {
        &self.inner.stats
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.inner.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The user's presence was set on this node: gossip it next round.
    pub fn presence_set(&self, user: &UserId) {
        self.outbox().presence.insert(user.clone());
    }

    /// A user on this node typed (or stopped) in a room: forward it next round.
    pub fn typing(&self, room: &RoomId, user: &UserId, typing: bool) {
        let mut o = self.outbox();
        if o.typing.len() >= MAX_PENDING_TYPING {
            self.inner.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        o.typing.push(pb::TypingEvent {
            room_id: room.to_string(),
            user: user.to_string(),
            typing,
        });
    }

    /// A read marker moved on this node: send it next round.
    pub fn marker(&self, room: &RoomId, user: &UserId, id: MessageId) {
        let mut o = self.outbox();
        let k = (room.clone(), user.clone());
        if let Some(cur) = o.markers.get_mut(&k) {
            *cur = (*cur).max(id);
            return;
        }
        if o.markers.len() >= MAX_PENDING_MARKERS {
            o.overflow = true;
            self.inner.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        o.markers.insert(k, id);
    }

    fn publish_presence(&self, user: &UserId, status: Status, last_seen_ms: u64) {
        let Some(rooms_of) = self.inner.rooms_of.get() else {
            return;
        };
        let ev = presence_event(user, status, last_seen_ms);
        for room in rooms_of(user) {
            self.inner.hub.publish_live(&room, ev.clone());
        }
    }

    /// Serves `Gossip`: applies a peer's batch and publishes what changed to this node's
    /// subscribers. Items with bad fields are skipped and counted, never fatal.
    #[allow(clippy::result_large_err)]
    pub async fn handle(&self, req: pb::GossipRequest) -> Result<pb::GossipReply, tonic::Status> {
        let inner = &self.inner;
        if req.from_node == 0 {
            return Err(tonic::Status::invalid_argument("gossip without from_node"));
        }
        let from = NodeId(req.from_node);
        if from == inner.me {
            return Ok(pb::GossipReply {});
        }
        inner.stats.received.fetch_add(1, Ordering::Relaxed);
        let skip = || {
            inner.stats.skipped.fetch_add(1, Ordering::Relaxed);
        };
        for p in &req.presence {
            let (Ok(user), Some(status), Ok(last_seen)) = (
                UserId::parse(&p.user),
                Status::from_pb(p.state),
                u64::try_from(p.last_seen),
            ) else {
                skip();
                continue;
            };
            if let Some((st, seen)) = inner
                .presence
                .merge_remote(&user, status, last_seen, from, inner.me)
            {
                self.publish_presence(&user, st, seen);
            }
        }
        for t in &req.typing {
            let (Ok(room), Ok(user)) = (RoomId::parse(&t.room_id), UserId::parse(&t.user)) else {
                skip();
                continue;
            };
            if inner.presence.set_typing(&room, &user, t.typing) {
                inner
                    .hub
                    .publish_live(&room, typing_event(&room, &user, t.typing));
            }
        }
        let mut batch: Vec<Marker> = Vec::with_capacity(req.markers.len());
        for m in &req.markers {
            let (Ok(room), Ok(user), Ok(id)) = (
                RoomId::parse(&m.room_id),
                UserId::parse(&m.user),
                m.message_id.parse::<MessageId>(),
            ) else {
                skip();
                continue;
            };
            batch.push((room, user, id));
        }
        if !batch.is_empty() {
            let moved = inner.markers.merge(&batch).await.map_err(|e| {
                tracing::warn!(from = %from, error = %e, "cannot store gossiped read markers");
                tonic::Status::unavailable("cannot store read markers")
            })?;
            for (room, user, id) in moved {
                inner.hub.publish_live(&room, read_event(&room, &user, id));
            }
        }
        Ok(pb::GossipReply {})
    }

    /// Runs the sender until `stop` turns true. `rooms_of` lets incoming presence be
    /// announced in the user's rooms (set once; later calls keep the first).
    pub async fn run(
        self,
        transport: Arc<dyn GossipTransport>,
        rooms_of: RoomsOf,
        mut stop: watch::Receiver<bool>,
    ) {
        let _ = self.inner.rooms_of.set(rooms_of);
        let refresh_every = (self.inner.presence.ttl() / 3).max(ROUND);
        let mut tick = tokio::time::interval(ROUND);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh = Instant::now();
        let mut last_full = Instant::now();
        let mut sends = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            while sends.try_join_next().is_some() {}
            let refresh = last_refresh.elapsed() >= refresh_every;
            if refresh {
                last_refresh = Instant::now();
            }
            let full = last_full.elapsed() >= FULL_RESYNC_EVERY;
            if full {
                last_full = Instant::now();
            }
            self.round(&transport, refresh, full, &mut sends);
        }
        sends.abort_all();
    }

    /// One round: drain the outbox and start one send per idle peer.
    fn round(
        &self,
        transport: &Arc<dyn GossipTransport>,
        refresh: bool,
        full: bool,
        sends: &mut tokio::task::JoinSet<()>,
    ) {
        let inner = &self.inner;
        let outbox = std::mem::take(&mut *self.outbox());
        let ttl = inner.presence.ttl();
        let presence: Vec<pb::PresenceInfo> = if refresh {
            inner.presence.local_entries(ttl * 2)
        } else {
            outbox
                .presence
                .iter()
                .filter_map(|u| inner.presence.local_entry(u))
                .collect()
        }
        .into_iter()
        .take(MAX_PRESENCE_PER_REQUEST)
        .map(|e| presence_info(&e.user, e.status, e.last_seen_ms))
        .collect();
        let markers: Vec<pb::ReadMarkerEvent> = outbox
            .markers
            .iter()
            .map(|((room, user), id)| pb::ReadMarkerEvent {
                room_id: room.to_string(),
                user: user.to_string(),
                message_id: id.to_string(),
            })
            .collect();
        let base = pb::GossipRequest {
            from_node: inner.me.0,
            presence,
            typing: outbox.typing,
            markers,
        };

        let current: BTreeSet<NodeId> = transport
            .peers()
            .into_iter()
            .filter(|n| *n != inner.me)
            .collect();
        let mut peers = inner.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.retain(|n, _| current.contains(n));
        for n in &current {
            peers.entry(*n).or_insert_with(|| PeerState {
                busy: false,
                // First contact (this node or the peer just started): send everything.
                resync: Resync::From(None),
                generation: 0,
            });
        }
        for (node, st) in peers.iter_mut() {
            if outbox.overflow || (full && st.resync == Resync::Idle) {
                st.restart_resync();
            }
            if st.busy {
                if !base.markers.is_empty() {
                    st.restart_resync();
                }
                continue;
            }
            let mut req = base.clone();
            let mut page_next = None;
            if let Resync::From(after) = &st.resync {
                match inner.markers.scan(after.as_deref(), RESYNC_PAGE) {
                    Ok((page, next)) => {
                        req.markers.extend(page.into_iter().map(|(room, user, id)| {
                            pb::ReadMarkerEvent {
                                room_id: room.to_string(),
                                user: user.to_string(),
                                message_id: id.to_string(),
                            }
                        }));
                        page_next = Some(next);
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read markers for anti-entropy"),
                }
            }
            if req.presence.is_empty() && req.typing.is_empty() && req.markers.is_empty() {
                // Nothing to send, but a finished (empty) resync scan is done.
                if page_next == Some(None) {
                    st.resync = Resync::Idle;
                }
                continue;
            }
            st.busy = true;
            let generation = st.generation;
            let (node, transport, this) = (*node, transport.clone(), self.clone());
            sends.spawn(async move {
                let res = match tokio::time::timeout(SEND_TIMEOUT, transport.send(node, req)).await
                {
                    Ok(r) => r,
                    Err(_) => Err(SendError {
                        to: node,
                        reason: "timed out".into(),
                    }),
                };
                this.finish_send(node, generation, page_next, res);
            });
        }
    }

    fn finish_send(
        &self,
        node: NodeId,
        generation: u64,
        page_next: Option<Option<Vec<u8>>>,
        res: Result<(), SendError>,
    ) {
        let inner = &self.inner;
        let mut peers = inner.peers.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) = peers.get_mut(&node) else {
            return;
        };
        st.busy = false;
        match res {
            Ok(()) => {
                inner.stats.sent.fetch_add(1, Ordering::Relaxed);
                if let (Some(next), true) = (page_next, st.generation == generation) {
                    st.resync = match next {
                        Some(k) => Resync::From(Some(k)),
                        None => Resync::Idle,
                    };
                }
            }
            Err(e) => {
                inner.stats.send_failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(peer = %node, error = %e, "gossip send failed");
                st.restart_resync();
            }
        }
    }
}

/// Gossip over the `Cluster` gRPC service, one lazily connected channel per peer.
/// Peers: the plan's members and the meta group's registered nodes (late joiners).
/// Honours the node's fault injection ([`Groups::faults`]) like Raft traffic does.
pub struct TonicTransport {
    groups: Groups,
    channels: Mutex<HashMap<NodeId, (String, Channel)>>,
}

impl TonicTransport {
    pub fn new(groups: Groups) -> Self {
        Self {
            groups,
            channels: Mutex::default(),
        }
    }

    fn addresses(&self) -> HashMap<NodeId, String> {
        let mut out: HashMap<NodeId, String> = self
            .groups
            .plan()
            .members
            .iter()
            .map(|(n, a)| (NodeId(*n), a.clone()))
            .collect();
        let registered = self
            .groups
            .read_group(META, |s| {
                s.nodes
                    .iter()
                    .map(|(n, info)| (NodeId(*n), info.grpc.clone()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        // The registry holds a node's current address; it wins over the genesis plan.
        out.extend(registered.into_iter().filter(|(_, a)| !a.is_empty()));
        out.remove(&self.groups.node_id());
        out
    }

    fn client(&self, to: NodeId) -> Result<ClusterClient<Channel>, SendError> {
        let fail = |reason: String| SendError { to, reason };
        let me = self.groups.node_id();
        if self.groups.faults().is_blocked(me.0, to.0) {
            return Err(fail("link blocked (fault injection)".into()));
        }
        let addr = self
            .addresses()
            .remove(&to)
            .ok_or_else(|| fail("unknown node".into()))?;
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((a, ch)) = channels.get(&to) {
            if *a == addr {
                return Ok(ClusterClient::new(ch.clone()));
            }
        }
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| fail(format!("bad address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            .timeout(SEND_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(to, (addr, ch.clone()));
        Ok(ClusterClient::new(ch))
    }
}

#[tonic::async_trait]
impl GossipTransport for TonicTransport {
    fn peers(&self) -> Vec<NodeId> {
        self.addresses().into_keys().collect()
    }

    async fn send(&self, to: NodeId, req: pb::GossipRequest) -> Result<(), SendError> {
        let mut client = self.client(to)?;
        client.gossip(req).await.map(|_| ()).map_err(|s| SendError {
            to,
            reason: format!("{}: {}", s.code(), s.message()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Db;
    use std::collections::HashSet;
    use tokio::sync::broadcast;

    use crate::delivery::HubEvent;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    fn room() -> RoomId {
        RoomId::parse("rm_00000000000000aa").unwrap()
    }

    fn node(id: u64, ttl: Duration) -> Gossip {
        let db = Db::temporary().unwrap();
        Gossip::new(
            NodeId(id),
            Presence::new(ttl).with_typing_ttl(Duration::from_millis(300)),
            Markers::open(&db).unwrap(),
            Hub::new(),
        )
    }

    fn presence_req(from: u64, u: &str, st: Status, seen: u64) -> pb::GossipRequest {
        pb::GossipRequest {
            from_node: from,
            presence: vec![presence_info(&user(u), st, seen)],
            ..Default::default()
        }
    }

    /// Polls `f` until it holds, failing after `within`.
    async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !f() {
            assert!(Instant::now() < deadline, "{what}: not within {within:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Receives live events until one matches, failing after `within`.
    async fn wait_event(
        rx: &mut broadcast::Receiver<HubEvent>,
        within: Duration,
        mut f: impl FnMut(&pb::event::Kind) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ev = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .expect("no matching event in time")
                .expect("hub channel closed");
            if let HubEvent::Live(e) = ev {
                if e.kind.as_ref().is_some_and(&mut f) {
                    return;
                }
            }
        }
    }

    #[tokio::test]
    async fn presence_is_last_writer_wins_by_time_then_node() {
        let g = node(1, Duration::from_secs(30));
        let a = user("alice");
        g.handle(presence_req(2, "alice", Status::Busy, 100))
            .await
            .unwrap();
        assert_eq!(g.inner.presence.get(&a), (Status::Busy, 100));
        // Older loses, whatever node.
        g.handle(presence_req(3, "alice", Status::Away, 99))
            .await
            .unwrap();
        assert_eq!(g.inner.presence.get(&a), (Status::Busy, 100));
        // Same time: the larger node id wins; the smaller loses.
        g.handle(presence_req(3, "alice", Status::Away, 100))
            .await
            .unwrap();
        assert_eq!(g.inner.presence.get(&a), (Status::Away, 100));
        g.handle(presence_req(2, "alice", Status::Online, 100))
            .await
            .unwrap();
        assert_eq!(g.inner.presence.get(&a), (Status::Away, 100));
        // Same version offline beats online.
        g.handle(presence_req(3, "alice", Status::Offline, 100))
            .await
            .unwrap();
        assert_eq!(g.inner.presence.get(&a), (Status::Offline, 100));
        g.handle(presence_req(3, "alice", Status::Away, 100))
            .await
            .unwrap();
        assert_eq!(g.inner.presence.get(&a).0, Status::Offline);
        // A later local set wins even if this node's clock is behind the remote's.
        let (changed, seen) = g.inner.presence.set(&a, Status::Online, 50);
        assert!(changed);
        assert_eq!(seen, 101);
        assert_eq!(g.inner.presence.get(&a), (Status::Online, 101));
        // And it is what this node gossips about alice.
        assert_eq!(
            g.inner
                .presence
                .local_entry(&a)
                .map(|e| (e.status, e.last_seen_ms)),
            Some((Status::Online, 101))
        );
    }

    #[tokio::test]
    async fn bad_items_are_skipped_and_counted() {
        let g = node(1, Duration::from_secs(30));
        let req = pb::GossipRequest {
            from_node: 2,
            presence: vec![
                pb::PresenceInfo {
                    user: "NOT A NAME".into(),
                    state: 1,
                    last_seen: 1,
                },
                pb::PresenceInfo {
                    user: "bob".into(),
                    state: 99,
                    last_seen: 1,
                },
                pb::PresenceInfo {
                    user: "bob".into(),
                    state: Status::Online.to_pb() as i32,
                    last_seen: -5,
                },
            ],
            typing: vec![pb::TypingEvent {
                room_id: "nope".into(),
                user: "bob".into(),
                typing: true,
            }],
            markers: vec![
                pb::ReadMarkerEvent {
                    room_id: room().to_string(),
                    user: "bob".into(),
                    message_id: "not-an-id".into(),
                },
                pb::ReadMarkerEvent {
                    room_id: room().to_string(),
                    user: "bob".into(),
                    message_id: MessageId(7).to_string(),
                },
            ],
        };
        g.handle(req).await.unwrap();
        assert_eq!(g.stats().skipped.load(Ordering::Relaxed), 5);
        assert_eq!(g.inner.presence.get(&user("bob")).0, Status::Offline);
        assert_eq!(
            g.inner.markers.get(&room(), &user("bob")).unwrap(),
            Some(MessageId(7))
        );
        assert!(g
            .handle(pb::GossipRequest::default())
            .await
            .is_err_and(|s| s.code() == tonic::Code::InvalidArgument));
    }

    #[tokio::test]
    async fn remote_presence_expires_ttl_after_the_last_copy() {
        let ttl = Duration::from_millis(300);
        let g = node(1, ttl);
        let a = user("alice");
        g.handle(presence_req(2, "alice", Status::Online, 10))
            .await
            .unwrap();
        // Copies of the same version are heartbeats: keep it alive past one TTL.
        let started = Instant::now();
        let mut last = Instant::now();
        while started.elapsed() < ttl * 2 {
            assert_eq!(g.inner.presence.get(&a).0, Status::Online);
            // Taken before the copy is applied: its heartbeat is no earlier than this.
            last = Instant::now();
            g.handle(presence_req(2, "alice", Status::Online, 10))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // No more copies: offline within the TTL, reported once by expire().
        eventually("remote entry expires", Duration::from_secs(5), || {
            g.inner.presence.get(&a).0 == Status::Offline
        })
        .await;
        assert!(last.elapsed() >= ttl, "expired before the TTL");
        assert_eq!(g.inner.presence.expire(), vec![(a.clone(), 10)]);
        assert!(g.inner.presence.expire().is_empty());
        // A newer version brings it back.
        g.handle(presence_req(2, "alice", Status::Away, 11))
            .await
            .unwrap();
        assert_eq!(g.inner.presence.get(&a), (Status::Away, 11));
    }

    #[tokio::test]
    async fn markers_merge_with_max_and_publish_only_moves() {
        let g = node(1, Duration::from_secs(30));
        let r = room();
        g.inner.hub.register(&r, MessageId::MIN);
        let (mut rx, _) = g.inner.hub.subscribe(&r).unwrap();
        let m = |id: u128| pb::GossipRequest {
            from_node: 2,
            markers: vec![pb::ReadMarkerEvent {
                room_id: r.to_string(),
                user: "bob".into(),
                message_id: MessageId(id).to_string(),
            }],
            ..Default::default()
        };
        g.handle(m(20)).await.unwrap();
        g.handle(m(10)).await.unwrap();
        g.handle(m(20)).await.unwrap();
        assert_eq!(
            g.inner.markers.get(&r, &user("bob")).unwrap(),
            Some(MessageId(20))
        );
        // Exactly one event: the move to 20.
        let mut reads = Vec::new();
        while let Ok(HubEvent::Live(e)) = rx.try_recv() {
            if let Some(pb::event::Kind::Read(ev)) = &e.kind {
                reads.push(ev.message_id.clone());
            }
        }
        assert_eq!(reads, vec![MessageId(20).to_string()]);
    }

    #[tokio::test]
    async fn gossiped_typing_is_published_and_expires() {
        let g = node(1, Duration::from_secs(30));
        let r = room();
        let t = |typing| pb::GossipRequest {
            from_node: 2,
            typing: vec![pb::TypingEvent {
                room_id: r.to_string(),
                user: "bob".into(),
                typing,
            }],
            ..Default::default()
        };
        g.inner.hub.register(&r, MessageId::MIN);
        let (mut rx, _) = g.inner.hub.subscribe(&r).unwrap();
        g.handle(t(true)).await.unwrap();
        wait_event(
            &mut rx,
            Duration::from_secs(2),
            |k| matches!(k, pb::event::Kind::Typing(e) if e.typing && e.user == "bob"),
        )
        .await;
        // The typing TTL here is 300 ms.
        let mut expired = Vec::new();
        eventually("typing expires", Duration::from_secs(5), || {
            expired.extend(g.inner.presence.expire_typing());
            !expired.is_empty()
        })
        .await;
        assert_eq!(expired, vec![(r.clone(), user("bob"))]);
    }

    /// An in-memory network of gossip nodes with cuttable links.
    #[derive(Default)]
    struct Mesh {
        nodes: Mutex<HashMap<NodeId, Gossip>>,
        cut: Mutex<HashSet<NodeId>>,
    }

    struct FakeTransport {
        me: NodeId,
        mesh: Arc<Mesh>,
    }

    #[tonic::async_trait]
    impl GossipTransport for FakeTransport {
        fn peers(&self) -> Vec<NodeId> {
            let nodes = self.mesh.nodes.lock().unwrap();
            nodes.keys().copied().filter(|n| *n != self.me).collect()
        }

        async fn send(&self, to: NodeId, req: pb::GossipRequest) -> Result<(), SendError> {
            let fail = |reason: &str| SendError {
                to,
                reason: reason.into(),
            };
            {
                let cut = self.mesh.cut.lock().unwrap();
                if cut.contains(&self.me) || cut.contains(&to) {
                    return Err(fail("cut"));
                }
            }
            let target = self.mesh.nodes.lock().unwrap().get(&to).cloned();
            let target = target.ok_or_else(|| fail("no such node"))?;
            target
                .handle(req)
                .await
                .map(|_| ())
                .map_err(|s| fail(s.message()))
        }
    }

    struct Cluster {
        mesh: Arc<Mesh>,
        stops: HashMap<NodeId, watch::Sender<bool>>,
    }

    impl Cluster {
        fn start(ids: &[u64], ttl: Duration) -> (Self, Vec<Gossip>) {
            let mesh = Arc::new(Mesh::default());
            let mut stops = HashMap::new();
            let mut out = Vec::new();
            for id in ids {
                let g = node(*id, ttl);
                g.inner.hub.register(&room(), MessageId::MIN);
                mesh.nodes.lock().unwrap().insert(NodeId(*id), g.clone());
                let (tx, rx) = watch::channel(false);
                let transport = Arc::new(FakeTransport {
                    me: NodeId(*id),
                    mesh: mesh.clone(),
                });
                let rooms_of: RoomsOf = Arc::new(|_u: &UserId| vec![room()]);
                tokio::spawn(g.clone().run(transport, rooms_of, rx));
                stops.insert(NodeId(*id), tx);
                out.push(g);
            }
            (Self { mesh, stops }, out)
        }

        /// Kills a node: its sender stops and nobody reaches it.
        fn kill(&self, id: u64) {
            self.mesh.cut.lock().unwrap().insert(NodeId(id));
            if let Some(tx) = self.stops.get(&NodeId(id)) {
                let _ = tx.send(true);
            }
        }
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            for tx in self.stops.values() {
                let _ = tx.send(true);
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_converge_and_presence_expires_after_node_death() {
        let ttl = Duration::from_millis(900);
        let (cluster, g) = Cluster::start(&[1, 2, 3], ttl);
        let (a, b) = (user("alice"), user("bob"));
        let r = room();
        let (mut rx3, _) = g[2].inner.hub.subscribe(&r).unwrap();

        // Presence set on node 1 reaches nodes 2 and 3, and 3's subscribers.
        g[0].inner.presence.set(&a, Status::Busy, 1_000);
        g[0].presence_set(&a);
        eventually("presence converges", Duration::from_secs(3), || {
            g[1..]
                .iter()
                .all(|n| n.inner.presence.get(&a) == (Status::Busy, 1_000))
        })
        .await;
        wait_event(&mut rx3, Duration::from_secs(2), |k| {
            matches!(k, pb::event::Kind::Presence(p) if p.user == "alice"
                && p.state == pb::PresenceState::PresenceBusy as i32)
        })
        .await;

        // Typing on node 2 is published on node 3.
        g[1].typing(&r, &b, true);
        wait_event(
            &mut rx3,
            Duration::from_secs(2),
            |k| matches!(k, pb::event::Kind::Typing(t) if t.user == "bob" && t.typing),
        )
        .await;

        // A read marker on node 3 reaches 1 and 2, and never goes back.
        g[2].inner
            .markers
            .mark(&r, &b, MessageId(50))
            .await
            .unwrap();
        g[2].marker(&r, &b, MessageId(50));
        g[0].marker(&r, &b, MessageId(40));
        eventually("markers converge", Duration::from_secs(3), || {
            g.iter()
                .all(|n| n.inner.markers.get(&r, &b).unwrap() == Some(MessageId(50)))
        })
        .await;

        // Alice keeps heartbeating on node 1 for three TTLs: the others keep her online
        // (they see node 1's refreshes, not her calls).
        let until = Instant::now() + ttl * 3;
        while Instant::now() < until {
            g[0].inner.presence.set(&a, Status::Busy, 1_000);
            for n in &g[1..] {
                assert_eq!(
                    n.inner.presence.get(&a).0,
                    Status::Busy,
                    "expired too early"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Node 1 dies while alice is still heartbeating there: she expires everywhere
        // else within TTL plus a round or two.
        cluster.kill(1);
        let died = Instant::now();
        eventually(
            "presence expires after node death",
            ttl * 2 + Duration::from_secs(2),
            || {
                g[0].inner.presence.set(&a, Status::Busy, 1_000);
                g[1..]
                    .iter()
                    .all(|n| n.inner.presence.get(&a).0 == Status::Offline)
            },
        )
        .await;
        assert!(
            died.elapsed() + ROUND * 2 >= ttl / 3,
            "expired implausibly fast"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn markers_converge_after_a_partition_heals() {
        let (cluster, g) = Cluster::start(&[1, 2], Duration::from_secs(30));
        let r = room();
        cluster.mesh.cut.lock().unwrap().insert(NodeId(2));
        // Written on node 1 while node 2 is unreachable; the outbox copy is lost.
        let users: Vec<UserId> = (0..1500).map(|i| user(&format!("u{i}"))).collect();
        let batch: Vec<Marker> = users
            .iter()
            .map(|u| (r.clone(), u.clone(), MessageId(9)))
            .collect();
        g[0].inner.markers.merge(&batch).await.unwrap();
        g[0].marker(&r, &users[0], MessageId(9));
        eventually("a send fails", Duration::from_secs(3), || {
            g[0].stats().send_failed.load(Ordering::Relaxed) > 0
        })
        .await;
        assert_eq!(g[1].inner.markers.get(&r, &users[0]).unwrap(), None);
        // Heal: anti-entropy pages the whole tree over (1500 > one page).
        cluster.mesh.cut.lock().unwrap().clear();
        eventually(
            "markers converge after heal",
            Duration::from_secs(10),
            || {
                users
                    .iter()
                    .all(|u| g[1].inner.markers.get(&r, u).unwrap() == Some(MessageId(9)))
            },
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_expiry_is_gossiped_as_offline() {
        let ttl = Duration::from_millis(600);
        let (_cluster, g) = Cluster::start(&[1, 2], ttl);
        let a = user("alice");
        g[0].inner.presence.set(&a, Status::Online, 5);
        g[0].presence_set(&a);
        eventually("online on node 2", Duration::from_secs(3), || {
            g[1].inner.presence.get(&a).0 == Status::Online
        })
        .await;
        // Alice stops heartbeating: node 1 expires her and tells node 2 (which would
        // otherwise keep her until a TTL after node 1's last refresh).
        eventually(
            "offline on node 2",
            ttl * 2 + Duration::from_secs(2),
            || g[1].inner.presence.get(&a).0 == Status::Offline,
        )
        .await;
        assert_eq!(
            g[0].inner.presence.local_entry(&a).map(|e| e.status),
            Some(Status::Offline)
        );
    }
}
