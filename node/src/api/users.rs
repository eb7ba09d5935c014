//! Users: CreateUser (no token needed), WhoAmI.

use parley_proto::v1 as pb;

use super::auth::new_token;
use super::{ApiError, ApiResult, Ctx, Metrics};
use crate::consensus::state::Command;
use crate::ids::UserId;

/// `CreateUser`: registers a unique name and returns its token (shown once).
pub(super) async fn create(
    ctx: &Ctx,
    req: pb::CreateUserRequest,
) -> ApiResult<pb::CreateUserResponse> {
    let name = UserId::parse(req.name.trim())?;
    let (token, token_hash) = new_token(&name);
    let at = ctx.hlc.wall_ms();
    let p = ctx.placement.of_user(&name);
    Metrics::inc(&ctx.metrics.raft_writes);
    ctx.groups
        .write(
            p,
            Command::CreateUser {
                name: name.clone(),
                token_hash,
                at,
            },
        )
        .await??;
    Ok(pb::CreateUserResponse {
        user: Some(pb::User {
            name: name.to_string(),
            created_at: at as i64,
        }),
        token,
    })
}

/// `WhoAmI`: the caller's user record.
pub(super) fn who_am_i(ctx: &Ctx, user: &UserId) -> ApiResult<pb::User> {
    ctx.groups
        .read(ctx.placement.of_user(user), |s| s.users.get(user).cloned())
        .map(|u| pb::User {
            name: u.name.to_string(),
            created_at: u.created_at as i64,
        })
        .ok_or_else(|| ApiError::NotFound(format!("user {user} not found")))
}
