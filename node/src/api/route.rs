//! Where a room's timeline writes happen: on its home, the leader of the room's
//! partition. The home checks membership and bans against the partition state it leads
//! (so an acknowledged ban fences every later message exactly), assigns ids in one
//! order, and pushes to the other replicas. A write that arrives elsewhere is forwarded
//! to the home with the caller's token (once more if the node it reached has just
//! stopped leading). With no leader (the minority side of a
//! partition), only rooms with write quorum 1 accept writes, on the node they reach.

use std::time::Duration;

use parley_proto::v1::chat_client::ChatClient;
use tonic::metadata::MetadataMap;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use super::{ApiError, ApiResult, Ctx};
use crate::consensus::state::RoomRecord;

/// Set on a forwarded write: how many times it was forwarded ("1" or "2"). A write
/// reaches its home in one hop; a second is taken only when the node it reached no
/// longer leads the partition (a handover or an election between the two decisions);
/// after two the receiver writes it itself, whatever it thinks of leadership.
const FORWARDED: &str = "x-parley-forwarded";
const MAX_HOPS: u8 = 2;

/// How long a write that needs a leader waits for one to be known before it is refused
/// (two of the longest election timeouts).
const LEADER_WAIT: Duration = Duration::from_millis(1200);

/// How long a forwarded write may take on the home.
pub(super) const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to a home that has read nothing for this long is pinged...
const FORWARD_KEEPALIVE: Duration = Duration::from_secs(2);
/// ...and closed if the ping is not answered within this. A home that stops answering
/// without closing its connections (paused, or cut off without a reset) then fails
/// the sends in flight to it after about 5 s, as a broken connection ("transport
/// error", may have been written), instead of each waiting out its 10 s budget. The
/// forward lane's next stream then either opens on a new connection or, if the home
/// still does not answer, fails its sends as "nothing was written" (a stream carries
/// no send before the home has answered its opening). Connections with no call open
/// are not pinged.
const FORWARD_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

pub(super) enum Route {
    Local,
    Forward(Box<Home>),
}

/// The node a write goes to.
pub(super) struct Home {
    pub addr: String,
    pub client: ChatClient<Channel>,
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

/// Where a write to `room` with quorum `w` goes. While this node hands the room's
/// partition over to another leader (`consensus::balance`), the write waits for that
/// first. A write forwarded here by a node that took this one for the home goes on to
/// the actual home once more, if this node knows another.
pub(super) async fn route(
    ctx: &Ctx,
    room: &RoomRecord,
    md: &MetadataMap,
    w: u8,
) -> ApiResult<Route> {
    let p = ctx.placement.of_room(&room.id);
    ctx.groups.settle(p).await;
    let hops = hops(md);
    if hops >= MAX_HOPS {
        return Ok(Route::Local);
    }
    // With no leader known (an election, a handover), a write that needs one waits a
    // little for it before it is refused.
    let leader = match ctx.groups.leader_of(p) {
        None if w > 1 && hops == 0 => ctx.groups.leader_within(p, LEADER_WAIT).await,
        known => known,
    };
    match leader {
        Some(n) if n == ctx.node.0 => Ok(Route::Local),
        Some(n) => {
            let addr = ctx
                .groups
                .addr_of(n)
                .ok_or_else(|| ApiError::Unavailable(format!("the home of {} (node {n}) has no known address", room.name)))?;
            let client = client(ctx, &addr)?;
            Ok(Route::Forward(Box::new(Home { addr, client })))
        }
        // Forwarded by a node that saw a leader: the fence decides here.
        None if w <= 1 || hops > 0 => Ok(Route::Local),
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
        .http2_keep_alive_interval(FORWARD_KEEPALIVE)
        .keep_alive_timeout(FORWARD_KEEPALIVE_TIMEOUT)
        .connect_lazy();
    map.insert(addr.to_owned(), ch.clone());
    Ok(ChatClient::new(ch).max_decoding_message_size(1 << 20))
}

/// How many times a request was forwarded (0: it came from a client).
fn hops(md: &MetadataMap) -> u8 {
    match md.get(FORWARDED).map(|v| v.as_bytes()) {
        None => 0,
        Some(b"1") => 1,
        // "2", or anything a newer or broken peer sent: do not forward it again.
        Some(_) => MAX_HOPS,
    }
}

/// Whether a request came from another node's forward rather than from a client.
pub(super) fn is_forwarded(md: &MetadataMap) -> bool {
    hops(md) > 0
}

/// The hop count of a request forwarded from one that arrived with `md`.
pub(super) fn hops_after(md: &MetadataMap) -> u8 {
    if hops(md) == 0 {
        1
    } else {
        MAX_HOPS
    }
}

/// Marks a request as forwarded `hops` times (1; anything more is sent as 2).
pub(super) fn mark_forwarded(md: &mut MetadataMap, hops: u32) {
    let hop = if hops <= 1 { "1" } else { "2" };
    md.insert(FORWARDED, tonic::metadata::MetadataValue::from_static(hop));
}

/// The same request for the home: the caller's token, its hop count one higher.
pub(super) fn forwarded<T>(body: T, md: &MetadataMap) -> Request<T> {
    let mut r = Request::new(body);
    if let Some(auth) = md.get("authorization") {
        r.metadata_mut().insert("authorization", auth.clone());
    }
    mark_forwarded(r.metadata_mut(), u32::from(hops_after(md)));
    r.set_timeout(FORWARD_TIMEOUT);
    r
}

/// The home's answer, passed through as it is (status code and text).
pub(super) fn relay<T>(r: Result<tonic::Response<T>, Status>) -> ApiResult<T> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| ApiError::Relayed(Box::new(s)))
}
