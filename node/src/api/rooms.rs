//! Rooms: CreateRoom, ListRooms, GetRoom, DeleteRoom.

use parley_proto::v1 as pb;

use super::{ApiError, ApiResult, Ctx, Metrics};
use crate::consensus::state::{Applied, Command, RoomKind};
use crate::ids::{validate_room_name, RoomId, UserId};

/// `CreateRoom`: a group room with a unique name; the creator is its admin. The id is
/// drawn inside the name's partition, so the room and its name reservation are one
/// Raft command.
pub(super) async fn create(
    ctx: &Ctx,
    user: &UserId,
    req: pb::CreateRoomRequest,
) -> ApiResult<pb::Room> {
    let name = req.name.trim().to_owned();
    validate_room_name(&name)?;
    let write_quorum = match req.write_quorum {
        0 => None,
        q @ 1..=5 => Some(q as u8),
        q => {
            return Err(ApiError::Invalid(format!(
                "write quorum {q} is out of range 1..=5"
            )))
        }
    };
    let p = ctx.placement.of_room_name(&name);
    let id = RoomId::random_in_partition(p, ctx.placement.partitions);
    let at = ctx.hlc.wall_ms();
    Metrics::inc(&ctx.metrics.raft_writes);
    let applied = ctx
        .groups
        .write(
            p,
            Command::CreateRoom {
                id,
                name,
                creator: user.clone(),
                write_quorum,
                at,
            },
        )
        .await??;
    match applied {
        Applied::RoomCreated(room) => Ok(ctx.room_view(&room, user)),
        other => Err(ApiError::Internal(format!(
            "unexpected outcome of create room: {other:?}"
        ))),
    }
}

/// `ListRooms`: every group room, and the direct rooms the caller is in, by name.
pub(super) async fn list(
    ctx: &Ctx,
    user: &UserId,
    req: pb::ListRoomsRequest,
) -> ApiResult<pb::ListRoomsResponse> {
    let strong = req.consistency == pb::Consistency::Strong as i32;
    let mut rooms = Vec::new();
    for p in ctx.placement.all() {
        let pick = |s: &crate::consensus::state::State| {
            s.rooms
                .values()
                .filter(|r| {
                    let member = s.member(&r.id, user).is_some();
                    if req.joined_only {
                        member
                    } else {
                        r.kind == RoomKind::Group || member
                    }
                })
                .cloned()
                .collect::<Vec<_>>()
        };
        let found = if strong {
            ctx.groups.read_strong(p, pick).await?
        } else {
            ctx.groups.read(p, pick)
        };
        rooms.extend(found);
    }
    rooms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(pb::ListRoomsResponse {
        rooms: rooms.iter().map(|r| ctx.room_view(r, user)).collect(),
    })
}

/// `GetRoom`: a room by id or name. Direct rooms are visible to their members only.
pub(super) async fn get(ctx: &Ctx, user: &UserId, req: pb::GetRoomRequest) -> ApiResult<pb::Room> {
    let strong = req.consistency == pb::Consistency::Strong as i32;
    let room = ctx.resolve_room(&req.room, strong).await?;
    if room.kind == RoomKind::Direct {
        ctx.require_member(&room, user).await?;
    }
    Ok(ctx.room_view(&room, user))
}

/// `DeleteRoom`: admins only. Once applied, every replica forgets the room's timeline and
/// read markers (see `node::applied_events`).
pub(super) async fn delete(
    ctx: &Ctx,
    user: &UserId,
    req: pb::DeleteRoomRequest,
) -> ApiResult<pb::DeleteRoomResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    let p = ctx.placement.of_room(&room.id);
    Metrics::inc(&ctx.metrics.raft_writes);
    ctx.groups
        .write(
            p,
            Command::DeleteRoom {
                room: room.id.clone(),
                by: user.clone(),
            },
        )
        .await??;
    Ok(pb::DeleteRoomResponse {})
}
