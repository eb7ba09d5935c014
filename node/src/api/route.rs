//! Where a room's timeline writes happen: on its home, the leader of the room's
//! partition. The home checks membership and bans against the partition state it leads
//! (so an acknowledged ban fences every later message exactly), assigns ids in one
//! order, and pushes to the other replicas. A write that arrives elsewhere is forwarded
//! to the home once, with the caller's token. With no leader (the minority side of a
//! partition), only rooms with write quorum 1 accept writes, on the node they reach.

use std::time::Duration;

use parley_proto::v1::chat_client::ChatClient;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use super::{ApiError, ApiResult, Ctx};
use crate::consensus::state::RoomRecord;

/// Set on a forwarded write: the receiver writes it itself, whatever it thinks of
/// leadership, so a request is forwarded at most once.
const FORWARDED: &str = "x-parley-forwarded";

/// How long a forwarded write may take on the home.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) enum Route {
    Local,
    Forward(ChatClient<Channel>),
}

/// The room's write quorum: the room's own, else the cluster default, clamped to the
/// partition's replica count.
pub(super) fn write_quorum(ctx: &Ctx, room: &RoomRecord) -> ApiResult<u8> {
    let w = room
        .settings
        .write_quorum
        .unwrap_or(ctx.write_quorum)
        .min(ctx.replicas.max(1));
    if w == 0 {
        return Err(ApiError::Invalid("write quorum is 0".into()));
    }
    Ok(w)
}

/// Where a write to `room` with quorum `w` goes.
pub(super) fn route(ctx: &Ctx, room: &RoomRecord, md: &MetadataMap, w: u8) -> ApiResult<Route> {
    if is_forwarded(md) {
        return Ok(Route::Local);
    }
    let p = ctx.placement.of_room(&room.id);
    match ctx.groups.leader_of(p) {
        Some(n) if n == ctx.node.0 => Ok(Route::Local),
        Some(n) => {
            let addr = ctx
                .groups
                .addr_of(n)
                .ok_or_else(|| ApiError::Unavailable(format!("the home of {} (node {n}) has no known address", room.name)))?;
            Ok(Route::Forward(client(ctx, &addr)?))
        }
        None if w <= 1 => Ok(Route::Local),
        None => Err(ApiError::Unavailable(format!(
            "{} needs W={w} copies of each message and its partition has no leader right now; nothing was written",
            room.name
        ))),
    }
}

/// Before a local write: refuse (writing nothing) if fewer than `w` replicas can be reached.
pub(super) fn check_reachable(ctx: &Ctx, room: &RoomRecord, w: u8) -> ApiResult<()> {
    let have = ctx.timelines.reachable_replicas(&room.id);
    if have < usize::from(w) {
        return Err(ApiError::Unavailable(format!(
            "{} needs W={w} durable copies of each message but only {have} replica(s) are reachable; nothing was written",
            room.name
        )));
    }
    Ok(())
}

fn client(ctx: &Ctx, addr: &str) -> ApiResult<ChatClient<Channel>> {
    let mut map = ctx
        .forward_channels
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(ch) = map.get(addr) {
        return Ok(ChatClient::new(ch.clone()));
    }
    let ch = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| ApiError::Internal(format!("bad peer address {addr}: {e}")))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .connect_lazy();
    map.insert(addr.to_owned(), ch.clone());
    Ok(ChatClient::new(ch).max_decoding_message_size(1 << 20))
}

/// Whether a request came from another node's forward rather than from a client.
pub(super) fn is_forwarded(md: &MetadataMap) -> bool {
    md.contains_key(FORWARDED)
}

/// The same request for the home: the caller's token, marked as forwarded.
pub(super) fn forwarded<T>(body: T, md: &MetadataMap) -> Request<T> {
    let mut r = Request::new(body);
    if let Some(auth) = md.get("authorization") {
        r.metadata_mut().insert("authorization", auth.clone());
    }
    r.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    r.set_timeout(FORWARD_TIMEOUT);
    r
}

/// The home's answer, passed through as it is (status code and text).
pub(super) fn relay<T>(r: Result<tonic::Response<T>, Status>) -> ApiResult<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| ApiError::Relayed(Box::new(s)))
}
