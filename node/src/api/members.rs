//! Membership and roles: JoinRoom, LeaveRoom, ListMembers, Moderate (invite, kick, ban,
//! unban, set role). All changes are Raft commands; acked = committed and applied.

use parley_proto::v1 as pb;

use super::{ApiError, ApiResult, Ctx, Metrics};
use crate::consensus::state::{Command, Role};
use crate::ids::UserId;

/// `JoinRoom`: joins a group room (not when banned).
pub(super) async fn join(
    ctx: &Ctx,
    user: &UserId,
    req: pb::JoinRoomRequest,
) -> ApiResult<pb::Room> {
    let room = ctx.resolve_room(&req.room, false).await?;
    let p = ctx.placement.of_room(&room.id);
    let at = ctx.hlc.wall_ms();
    Metrics::inc(&ctx.metrics.raft_writes);
    ctx.groups
        .write(
            p,
            Command::Join {
                room: room.id.clone(),
                user: user.clone(),
                at,
            },
        )
        .await??;
    Ok(ctx.room_view(&room, user))
}

/// `LeaveRoom`.
pub(super) async fn leave(
    ctx: &Ctx,
    user: &UserId,
    req: pb::LeaveRoomRequest,
) -> ApiResult<pb::LeaveRoomResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    let p = ctx.placement.of_room(&room.id);
    Metrics::inc(&ctx.metrics.raft_writes);
    ctx.groups
        .write(
            p,
            Command::Leave {
                room: room.id.clone(),
                user: user.clone(),
            },
        )
        .await??;
    Ok(pb::LeaveRoomResponse {})
}

/// `ListMembers`: members (with roles) and bans; members of the room only.
pub(super) async fn list(
    ctx: &Ctx,
    user: &UserId,
    req: pb::ListMembersRequest,
) -> ApiResult<pb::ListMembersResponse> {
    let strong = req.consistency == pb::Consistency::Strong as i32;
    let room = ctx.resolve_room(&req.room, strong).await?;
    let p = ctx.placement.of_room(&room.id);
    let id = room.id.clone();
    let read = move |s: &crate::consensus::state::State| {
        let members: Vec<pb::Member> = s
            .members
            .get(&id)
            .map(|ms| {
                ms.iter()
                    .map(|(u, m)| pb::Member {
                        user: u.to_string(),
                        role: super::role_pb(m.role) as i32,
                        joined_at: m.joined_at as i64,
                        muted: m.muted,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let banned: Vec<String> = s
            .bans
            .get(&id)
            .map(|b| b.keys().map(|u| u.to_string()).collect())
            .unwrap_or_default();
        let is_member = s.member(&id, user).is_some();
        (members, banned, is_member)
    };
    let (members, banned, is_member) = if strong {
        ctx.groups.read_strong(p, read).await?
    } else {
        ctx.groups.read(p, read)
    };
    if !is_member {
        ctx.require_member(&room, user).await?;
    }
    Ok(pb::ListMembersResponse { members, banned })
}

/// `Moderate`: invite (any member), kick, ban, unban, set role (admins).
pub(super) async fn moderate(
    ctx: &Ctx,
    by: &UserId,
    req: pb::ModerateRequest,
) -> ApiResult<pb::ModerateResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    let action = pb::ModerateAction::try_from(req.action)
        .map_err(|_| ApiError::Invalid(format!("unknown moderation action {}", req.action)))?;
    let target = match action {
        // An unban must work even for a user deleted since the ban.
        pb::ModerateAction::ModerateUnban => UserId::parse(req.user.trim())?,
        _ => ctx.existing_user(&req.user).await?,
    };
    let (room_id, by, at) = (room.id.clone(), by.clone(), ctx.hlc.wall_ms());
    let cmd = match action {
        pb::ModerateAction::ModerateUnspecified => {
            return Err(ApiError::Invalid("moderation action is required".into()))
        }
        pb::ModerateAction::ModerateInvite => Command::Invite {
            room: room_id,
            by,
            user: target,
            at,
        },
        pb::ModerateAction::ModerateKick => Command::Kick {
            room: room_id,
            by,
            user: target,
        },
        pb::ModerateAction::ModerateBan => Command::Ban {
            room: room_id,
            by,
            user: target,
            at,
        },
        pb::ModerateAction::ModerateUnban => Command::Unban {
            room: room_id,
            by,
            user: target,
        },
        pb::ModerateAction::ModerateSetRole => {
            let role = match pb::Role::try_from(req.role) {
                Ok(pb::Role::Admin) => Role::Admin,
                Ok(pb::Role::Member) => Role::Member,
                Err(_) => return Err(ApiError::Invalid(format!("unknown role {}", req.role))),
            };
            Command::SetRole {
                room: room_id,
                by,
                user: target,
                role,
            }
        }
    };
    Metrics::inc(&ctx.metrics.raft_writes);
    ctx.groups
        .write(ctx.placement.of_room(&room.id), cmd)
        .await??;
    Ok(pb::ModerateResponse {})
}
