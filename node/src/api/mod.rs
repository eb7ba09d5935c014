//! The client API: tonic services, one file per area, the HTTP gateway, auth, and the
//! single error -> status mapping.
//!
//! - `users.rs`: CreateUser, WhoAmI
//! - `rooms.rs`: CreateRoom, ListRooms, GetRoom, DeleteRoom
//! - `members.rs`: JoinRoom, LeaveRoom, ListMembers, Moderate
//! - `messages.rs`: SendMessage, EditMessage, DeleteMessage, React, SendDirect, History
//! - `subscribe.rs`: Subscribe (replay from a cursor, then live)
//! - `presence.rs`: SetPresence, GetPresence, SetTyping, MarkRead, GetReceipts
//! - `cluster.rs`: ClusterStatus (operators; no token)
//! - `http.rs`: `/healthz`, `/metrics`
//! - `fence.rs`: the fence on writes: the home's stamp, a replica's check of a push
//!
//! This layer checks who may do what (auth, membership, bans) before it calls into
//! consensus or replication; those layers never see an unauthenticated request.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::Stream;
use parley_proto::v1 as pb;
use parley_proto::v1::chat_server::Chat;
use tonic::{Request, Response, Status};

use crate::clock::Hlc;
use crate::consensus::state::{MemberRecord, RoomRecord, State};
use crate::consensus::Groups;
use crate::delivery::Hub;
use crate::ids::{validate_room_name, MessageId, NodeId, RoomId, UserId};
use crate::placement::Placement;
use crate::replication::markers::Markers;
use crate::replication::presence::Presence;
use crate::replication::Timelines;

pub mod admission;
pub mod auth;
mod cluster;
pub mod error;
pub mod fence;
mod forward;
pub mod http;
mod members;
mod messages;
mod presence;
mod rooms;
mod route;
mod subscribe;
mod users;

pub use error::{ApiError, ApiResult};
pub use presence::{announce_presence as presence_announce, announce_typing as typing_announce};

/// Largest message text, in bytes.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub messages_sent: AtomicU64,
    pub messages_duplicate: AtomicU64,
    pub requests_failed: AtomicU64,
    pub raft_writes: AtomicU64,
    pub subscriptions_opened: AtomicU64,
    /// Pushes from peers applied whole and durable.
    pub pushes_received_taken: AtomicU64,
    /// Pushes from peers applied and durable, but waiting for earlier changes.
    pub pushes_received_waiting: AtomicU64,
    /// Pushes from peers refused (fence, stale home, damaged or undecodable change).
    pub pushes_received_refused: AtomicU64,
    /// Acknowledged `SendMessage` calls from clients (not forwarded ones), from the call
    /// reaching this node's handler to its answer: auth, the forward to the room's home
    /// when this is not it, and the write.
    pub send_latency: crate::stats::Histogram,
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything a request handler may use. Shared by every service of one node.
pub struct Ctx {
    pub node: NodeId,
    pub groups: Groups,
    pub timelines: Timelines,
    pub hub: Hub,
    pub presence: Presence,
    pub markers: Markers,
    pub gossip: crate::replication::gossip::Gossip,
    pub placement: Placement,
    pub hlc: Arc<Hlc>,
    /// Cluster default write quorum, before clamping to the replica count.
    pub write_quorum: u8,
    /// Replicas per partition (1 on a single node).
    pub replicas: u8,
    pub cluster: String,
    pub discovery: Option<crate::discovery::Discovery>,
    /// Channels to other nodes' client API, for writes forwarded to a room's home.
    pub forward_channels:
        std::sync::Mutex<std::collections::HashMap<String, tonic::transport::Channel>>,
    /// Streams to other nodes that carry the sends forwarded to them (`forward.rs`).
    pub forward_lanes: forward::ForwardLanes,
    /// How many sends this node writes at once (`admission.rs`).
    pub admission: admission::Admission,
    /// Turns true when the node starts shutting down: long-lived streams between nodes
    /// end then, so the server's graceful shutdown does not wait on them.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    pub metrics: Metrics,
    pub db: crate::store::Db,
}

impl Ctx {
    /// Finds a room by id or name, from the local replica or linearizably.
    pub async fn resolve_room(&self, room: &str, strong: bool) -> ApiResult<RoomRecord> {
        /// How the room is named: its id lives in the id's partition, its name in the name's.
        enum Key {
            Id(RoomId),
            Name(String),
        }
        impl Key {
            fn find(&self, s: &State) -> Option<RoomRecord> {
                match self {
                    Key::Id(id) => s.room(id).cloned(),
                    Key::Name(name) => s.room_by_name(name).cloned(),
                }
            }
        }
        let room = room.trim();
        let (p, key) = if RoomId::looks_like_id(room) {
            let id = RoomId::parse(room)?;
            (self.placement.of_room(&id), Key::Id(id))
        } else {
            validate_room_name(room)?;
            (
                self.placement.of_room_name(room),
                Key::Name(room.to_owned()),
            )
        };
        let found = if strong {
            self.groups.read_strong(p, |s| key.find(s)).await?
        } else {
            match self.groups.read(p, |s| key.find(s)) {
                Some(r) => Some(r),
                // Created through another node a moment ago, or this replica is behind
                // (just restarted)? Ask the leader before saying no; if it cannot be
                // asked, say that rather than "not found".
                None => self.groups.read_strong(p, |s| key.find(s)).await?,
            }
        };
        found.ok_or_else(|| ApiError::NotFound(format!("room {room} not found")))
    }

    /// The caller's membership of a room, or PERMISSION_DENIED saying why not. A refusal
    /// from the local replica is confirmed by a linearizable read first, so a join made
    /// through another node a moment ago counts here too.
    pub async fn require_member(
        &self,
        room: &RoomRecord,
        user: &UserId,
    ) -> ApiResult<MemberRecord> {
        let p = self.placement.of_room(&room.id);
        let look = |s: &State| {
            (
                s.member(&room.id, user).cloned(),
                s.is_banned(&room.id, user),
            )
        };
        let mut found = self.groups.read(p, look);
        if found.0.is_none() {
            match self.groups.read_strong(p, look).await {
                Ok(strong) => found = strong,
                // Not known here, and the partition cannot confirm it now (a node just
                // restarted, a minority side): say so rather than "not a member".
                Err(e) if !found.1 => {
                    return Err(ApiError::Unavailable(format!(
                        "cannot confirm your membership of {} now: {e}",
                        room.name
                    )))
                }
                Err(_) => {}
            }
        }
        match found {
            (Some(m), _) => Ok(m),
            (None, true) => Err(ApiError::PermissionDenied(format!(
                "you are banned from {}",
                room.name
            ))),
            (None, false) => Err(ApiError::PermissionDenied(format!(
                "you are not a member of {}",
                room.name
            ))),
        }
    }

    /// Whether a user exists: the local replica, confirmed linearizably when it says no
    /// (an error if that confirmation cannot be had, rather than a wrong "no").
    pub async fn user_exists(&self, user: &UserId) -> ApiResult<bool> {
        let p = self.placement.of_user(user);
        let look = |s: &State| s.users.contains_key(user);
        if self.groups.read(p, look) {
            return Ok(true);
        }
        Ok(self.groups.read_strong(p, look).await?)
    }

    /// Parses a user name and checks the user exists.
    pub async fn existing_user(&self, name: &str) -> ApiResult<UserId> {
        let u = UserId::parse(name.trim())?;
        if !self.user_exists(&u).await? {
            return Err(ApiError::NotFound(format!("user {u} not found")));
        }
        Ok(u)
    }

    /// Every room `user` is a member of (scans each partition's local state).
    pub fn rooms_of(&self, user: &UserId) -> Vec<RoomRecord> {
        let mut out = Vec::new();
        for p in self.placement.all() {
            self.groups.read(p, |s| {
                for (id, members) in &s.members {
                    if members.contains_key(user) {
                        if let Some(r) = s.room(id) {
                            out.push(r.clone());
                        }
                    }
                }
            });
        }
        out
    }

    /// The room as the API shows it to `viewer`.
    pub fn room_view(&self, room: &RoomRecord, viewer: &UserId) -> pb::Room {
        let p = self.placement.of_room(&room.id);
        let (count, joined) = self.groups.read(p, |s| {
            (
                s.member_count(&room.id),
                s.member(&room.id, viewer).is_some(),
            )
        });
        pb::Room {
            id: room.id.to_string(),
            name: room.name.clone(),
            kind: match room.kind {
                crate::consensus::state::RoomKind::Group => pb::RoomKind::Group as i32,
                crate::consensus::state::RoomKind::Direct => pb::RoomKind::Direct as i32,
            },
            creator: room.creator.to_string(),
            created_at: room.created_at as i64,
            member_count: count as u32,
            write_quorum: room.settings.write_quorum.map_or(0, u32::from),
            joined,
            mega: count as u64 >= u64::from(room.settings.mega_threshold),
        }
    }
}

/// A role as the wire names it.
pub fn role_pb(r: crate::consensus::state::Role) -> pb::Role {
    match r {
        crate::consensus::state::Role::Admin => pb::Role::Admin,
        crate::consensus::state::Role::Member => pb::Role::Member,
    }
}

/// Checks message text: valid UTF-8, not blank, at most [`MAX_TEXT_BYTES`].
pub fn validate_text(text: Vec<u8>) -> ApiResult<String> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(ApiError::Invalid(format!(
            "message is {} bytes; the limit is {MAX_TEXT_BYTES}",
            text.len()
        )));
    }
    let s = String::from_utf8(text).map_err(|e| {
        ApiError::Invalid(format!(
            "text is not valid UTF-8 (bad byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    if s.trim().is_empty() {
        return Err(ApiError::Invalid("text is empty".into()));
    }
    Ok(s)
}

/// Parses an optional message id argument ("" = none).
pub fn opt_message_id(s: &str, what: &str) -> ApiResult<Option<MessageId>> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| ApiError::Invalid(format!("{what}: {e}")))
}

/// Parses a required message id argument.
pub fn message_id(s: &str) -> ApiResult<MessageId> {
    opt_message_id(s, "message id")?
        .ok_or_else(|| ApiError::Invalid("message id is required".into()))
}

/// The gRPC `parley.v1.Chat` service.
#[derive(Clone)]
pub struct ChatService {
    ctx: Arc<Ctx>,
}

impl ChatService {
    pub fn new(ctx: Arc<Ctx>) -> Self {
        Self { ctx }
    }
}

// tonic's Status is large, and it is what every RPC returns.
#[allow(clippy::result_large_err)]
fn answer<T>(ctx: &Ctx, r: ApiResult<T>) -> Result<Response<T>, Status> {
    match r {
        Ok(v) => Ok(Response::new(v)),
        Err(e) => {
            Metrics::inc(&ctx.metrics.requests_failed);
            Err(e.into())
        }
    }
}

/// Authenticates the request, runs the handler with the caller and the request body,
/// and answers through the one error mapping.
/// Like `authed!`, also handing the handler the request's metadata (for forwarding).
macro_rules! authed_md {
    ($self:ident, $req:ident, |$u:ident, $body:ident, $md:ident| $call:expr) => {{
        let $md = $req.metadata().clone();
        let r = match auth::authenticate(&$self.ctx, &$md).await {
            Ok($u) => {
                let $body = $req.into_inner();
                $call
            }
            Err(e) => Err(e),
        };
        answer(&$self.ctx, r)
    }};
}

macro_rules! authed {
    ($self:ident, $req:ident, |$u:ident, $body:ident| $call:expr) => {{
        let r = match auth::authenticate(&$self.ctx, $req.metadata()).await {
            Ok($u) => {
                let $body = $req.into_inner();
                $call
            }
            Err(e) => Err(e),
        };
        answer(&$self.ctx, r)
    }};
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Chat for ChatService {
    async fn create_user(
        &self,
        req: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        answer(&self.ctx, users::create(&self.ctx, req.into_inner()).await)
    }

    async fn who_am_i(
        &self,
        req: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let r = auth::authenticate(&self.ctx, req.metadata())
            .await
            .and_then(|u| users::who_am_i(&self.ctx, &u));
        answer(&self.ctx, r)
    }

    async fn create_room(
        &self,
        req: Request<pb::CreateRoomRequest>,
    ) -> Result<Response<pb::Room>, Status> {
        authed!(self, req, |u, body| rooms::create(&self.ctx, &u, body)
            .await)
    }

    async fn list_rooms(
        &self,
        req: Request<pb::ListRoomsRequest>,
    ) -> Result<Response<pb::ListRoomsResponse>, Status> {
        authed!(self, req, |u, body| rooms::list(&self.ctx, &u, body).await)
    }

    async fn get_room(
        &self,
        req: Request<pb::GetRoomRequest>,
    ) -> Result<Response<pb::Room>, Status> {
        authed!(self, req, |u, body| rooms::get(&self.ctx, &u, body).await)
    }

    async fn delete_room(
        &self,
        req: Request<pb::DeleteRoomRequest>,
    ) -> Result<Response<pb::DeleteRoomResponse>, Status> {
        authed!(self, req, |u, body| rooms::delete(&self.ctx, &u, body)
            .await)
    }

    async fn join_room(
        &self,
        req: Request<pb::JoinRoomRequest>,
    ) -> Result<Response<pb::Room>, Status> {
        authed!(self, req, |u, body| members::join(&self.ctx, &u, body)
            .await)
    }

    async fn leave_room(
        &self,
        req: Request<pb::LeaveRoomRequest>,
    ) -> Result<Response<pb::LeaveRoomResponse>, Status> {
        authed!(self, req, |u, body| members::leave(&self.ctx, &u, body)
            .await)
    }

    async fn list_members(
        &self,
        req: Request<pb::ListMembersRequest>,
    ) -> Result<Response<pb::ListMembersResponse>, Status> {
        authed!(self, req, |u, body| members::list(&self.ctx, &u, body)
            .await)
    }

    async fn moderate(
        &self,
        req: Request<pb::ModerateRequest>,
    ) -> Result<Response<pb::ModerateResponse>, Status> {
        authed!(self, req, |u, body| members::moderate(&self.ctx, &u, body)
            .await)
    }

    async fn send_message(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        let started = std::time::Instant::now();
        let from_client = !route::is_forwarded(req.metadata());
        let r = authed_md!(self, req, |u, body, md| messages::send(
            &self.ctx, &u, body, &md
        )
        .await);
        if from_client && r.is_ok() {
            self.ctx.metrics.send_latency.observe(started.elapsed());
        }
        r
    }

    async fn edit_message(
        &self,
        req: Request<pb::EditMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        authed_md!(self, req, |u, body, md| messages::edit(
            &self.ctx, &u, body, &md
        )
        .await)
    }

    async fn delete_message(
        &self,
        req: Request<pb::DeleteMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        authed_md!(self, req, |u, body, md| messages::delete(
            &self.ctx, &u, body, &md
        )
        .await)
    }

    async fn react(
        &self,
        req: Request<pb::ReactRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        authed_md!(self, req, |u, body, md| messages::react(
            &self.ctx, &u, body, &md
        )
        .await)
    }

    async fn send_direct(
        &self,
        req: Request<pb::SendDirectRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        authed_md!(self, req, |u, body, md| messages::send_direct(
            &self.ctx, &u, body, &md
        )
        .await)
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        authed!(self, req, |u, body| messages::history(&self.ctx, &u, body)
            .await)
    }

    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        authed!(self, req, |u, body| subscribe::subscribe(
            self.ctx.clone(),
            u,
            body
        )
        .await)
    }

    async fn set_presence(
        &self,
        req: Request<pb::SetPresenceRequest>,
    ) -> Result<Response<pb::SetPresenceResponse>, Status> {
        authed!(self, req, |u, body| presence::set(&self.ctx, &u, body))
    }

    async fn get_presence(
        &self,
        req: Request<pb::GetPresenceRequest>,
    ) -> Result<Response<pb::GetPresenceResponse>, Status> {
        authed!(self, req, |u, body| presence::get(&self.ctx, &u, body)
            .await)
    }

    async fn set_typing(
        &self,
        req: Request<pb::SetTypingRequest>,
    ) -> Result<Response<pb::SetTypingResponse>, Status> {
        authed!(self, req, |u, body| presence::typing(&self.ctx, &u, body)
            .await)
    }

    async fn mark_read(
        &self,
        req: Request<pb::MarkReadRequest>,
    ) -> Result<Response<pb::MarkReadResponse>, Status> {
        authed!(self, req, |u, body| presence::mark_read(
            &self.ctx, &u, body
        )
        .await)
    }

    async fn get_receipts(
        &self,
        req: Request<pb::GetReceiptsRequest>,
    ) -> Result<Response<pb::GetReceiptsResponse>, Status> {
        authed!(self, req, |u, body| presence::receipts(&self.ctx, &u, body)
            .await)
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        answer(&self.ctx, cluster::status(&self.ctx).await)
    }

    type ForwardSendsStream = forward::AnswerStream;

    async fn forward_sends(
        &self,
        req: Request<tonic::Streaming<pb::ForwardedSends>>,
    ) -> Result<Response<Self::ForwardSendsStream>, Status> {
        Ok(Response::new(forward::serve(
            self.ctx.clone(),
            req.into_inner(),
        )))
    }
}
