//! Presence, typing and read markers: SetPresence, GetPresence, SetTyping, MarkRead,
//! GetReceipts. Presence and typing are ephemeral and fanned out live; read markers
//! are durable and never go backwards. Each handler publishes to this node's
//! subscribers and hands the item to gossip (`replication::gossip`), which carries it
//! to every other node; the receivers publish it to theirs.

use parley_proto::v1 as pb;

use super::{message_id, ApiError, ApiResult, Ctx};
use crate::ids::{RoomId, UserId};
use crate::replication::gossip::{presence_event, read_event, typing_event};
use crate::replication::presence::Status;

/// Announces a user's presence to every room the user is in.
pub fn announce_presence(ctx: &Ctx, user: &UserId, status: Status, last_seen: u64) {
    let ev = presence_event(user, status, last_seen);
    for room in ctx.rooms_of(user) {
        ctx.hub.publish_live(&room.id, ev.clone());
    }
}

/// Announces a typing change to a room.
pub fn announce_typing(ctx: &Ctx, room: &RoomId, user: &UserId, typing: bool) {
    ctx.hub.publish_live(room, typing_event(room, user, typing));
}

/// `SetPresence`: also the heartbeat; call it more often than the TTL.
pub(super) fn set(
    ctx: &Ctx,
    user: &UserId,
    req: pb::SetPresenceRequest,
) -> ApiResult<pb::SetPresenceResponse> {
    let status = Status::from_pb(req.state)
        .ok_or_else(|| ApiError::Invalid(format!("unknown presence state {}", req.state)))?;
    let (changed, last_seen) = ctx.presence.set(user, status, ctx.hlc.wall_ms());
    if changed {
        announce_presence(ctx, user, status, last_seen);
    }
    // Every call, not only changes: a peer counts each copy as a heartbeat.
    ctx.gossip.presence_set(user);
    Ok(pb::SetPresenceResponse {})
}

/// `GetPresence`: every member of a room the caller is in.
pub(super) async fn get(
    ctx: &Ctx,
    user: &UserId,
    req: pb::GetPresenceRequest,
) -> ApiResult<pb::GetPresenceResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    ctx.require_member(&room, user).await?;
    let members = members_of(ctx, &room.id);
    let users = members
        .iter()
        .map(|u| {
            let (s, seen) = ctx.presence.get(u);
            pb::PresenceInfo {
                user: u.to_string(),
                state: s.to_pb() as i32,
                last_seen: i64::try_from(seen).unwrap_or(i64::MAX),
            }
        })
        .collect();
    Ok(pb::GetPresenceResponse { users })
}

fn members_of(ctx: &Ctx, room: &RoomId) -> Vec<UserId> {
    ctx.groups.read(ctx.placement.of_room(room), |s| {
        s.members
            .get(room)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    })
}

/// `SetTyping`: fanned out, never stored; expires after 5 s.
pub(super) async fn typing(
    ctx: &Ctx,
    user: &UserId,
    req: pb::SetTypingRequest,
) -> ApiResult<pb::SetTypingResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    ctx.require_member(&room, user).await?;
    if ctx.presence.set_typing(&room.id, user, req.typing) {
        announce_typing(ctx, &room.id, user, req.typing);
    }
    // Every call: a repeated "typing" refreshes the 5 s mark on the other nodes too.
    ctx.gossip.typing(&room.id, user, req.typing);
    Ok(pb::SetTypingResponse {})
}

/// `MarkRead`: moves the caller's marker forward to an existing message.
pub(super) async fn mark_read(
    ctx: &Ctx,
    user: &UserId,
    req: pb::MarkReadRequest,
) -> ApiResult<pb::MarkReadResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    ctx.require_member(&room, user).await?;
    let id = message_id(&req.message_id)?;
    if ctx.timelines.get_message(&room.id, id)?.is_none() {
        return Err(ApiError::NotFound(format!(
            "message {id} not found in {}",
            room.name
        )));
    }
    let now = ctx.markers.mark(&room.id, user, id).await?;
    ctx.hub
        .publish_live(&room.id, read_event(&room.id, user, now));
    ctx.gossip.marker(&room.id, user, now);
    Ok(pb::MarkReadResponse {
        message_id: now.to_string(),
    })
}

/// `GetReceipts`: members whose marker is at or after the message. Off in mega-groups.
pub(super) async fn receipts(
    ctx: &Ctx,
    user: &UserId,
    req: pb::GetReceiptsRequest,
) -> ApiResult<pb::GetReceiptsResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    ctx.require_member(&room, user).await?;
    let id = message_id(&req.message_id)?;
    if ctx.timelines.get_message(&room.id, id)?.is_none() {
        return Err(ApiError::NotFound(format!(
            "message {id} not found in {}",
            room.name
        )));
    }
    let members = members_of(ctx, &room.id);
    if members.len() as u64 >= u64::from(room.settings.mega_threshold) {
        return Err(ApiError::Precondition(format!(
            "read receipts are off in {}: it has {} members (threshold {})",
            room.name,
            members.len(),
            room.settings.mega_threshold
        )));
    }
    let read_by = ctx.markers.readers(&room.id, id, &members)?;
    Ok(pb::GetReceiptsResponse {
        read_by: read_by.iter().map(|u| u.to_string()).collect(),
    })
}
