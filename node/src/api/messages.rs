//! Messages: SendMessage, EditMessage, DeleteMessage, React, SendDirect, History.
//!
//! Writes happen on the room's home (see `route.rs`); membership and bans are checked
//! there, under the home's fence (`fence.rs`), before the timeline is touched; a refused
//! request writes nothing.

use parley_proto::v1 as pb;

use tonic::metadata::MetadataMap;

use super::route::{check_reachable, forwarded, relay, route, write_quorum, Route};
use super::{fence, forward};
use super::{message_id, opt_message_id, validate_text, ApiError, ApiResult, Ctx, Metrics};
use crate::consensus::state::{Applied, Command, Role, RoomRecord};
use crate::ids::{RoomId, UserId};
use crate::replication::{HistoryQuery, NewMessage};

/// Largest idempotency key, in bytes.
const MAX_CLIENT_ID: usize = 64;

fn ack(a: crate::replication::Appended) -> pb::SendMessageResponse {
    pb::SendMessageResponse {
        id: a.id.to_string(),
        duplicate: a.duplicate,
        sent_at: a.sent_at as i64,
    }
}

#[allow(clippy::too_many_arguments)]
async fn append(
    ctx: &Ctx,
    user: &UserId,
    room: &RoomRecord,
    text: Vec<u8>,
    client_msg_id: String,
    after: &str,
    md: &MetadataMap,
    forward: impl Fn() -> pb::SendMessageRequest,
) -> ApiResult<pb::SendMessageResponse> {
    let text = validate_text(text)?;
    if client_msg_id.len() > MAX_CLIENT_ID {
        return Err(ApiError::Invalid(format!(
            "client_msg_id is longer than {MAX_CLIENT_ID} bytes"
        )));
    }
    let after = opt_message_id(after, "after")?;
    let w = write_quorum(ctx, room)?;
    if let Route::Forward(home) = route(ctx, room, md, w).await? {
        let sent = match forward::send(ctx, &home.addr, &home.client, md, forward()).await {
            // A home older than the forwarding stream: the unary call.
            Err(ApiError::Relayed(s)) if s.code() == tonic::Code::Unimplemented => {
                let mut client = home.client;
                relay(client.send_message(forwarded(forward(), md)).await)
            }
            other => other,
        };
        match sent {
            // W=1 needs no home: if it cannot be reached, write here (DESIGN §4).
            Err(ApiError::Relayed(s)) if w <= 1 && s.code() == tonic::Code::Unavailable => {}
            other => return other,
        }
    }
    // A place to write it first (admission.rs): the checks below judge the room as it
    // is when the write is made, not before a wait.
    let _place = ctx.admission.admit().await?;
    // The fence first, then the membership check it covers (see fence.rs).
    let fence = fence::stamp(ctx, room, w).await?;
    ctx.require_member(room, user).await?;
    check_reachable(ctx, room, w)?;
    let appended = ctx
        .timelines
        .send(NewMessage {
            room: room.id.clone(),
            sender: user.clone(),
            text,
            client_msg_id,
            after,
            write_quorum: w,
            fence,
        })
        .await?;
    if appended.duplicate {
        Metrics::inc(&ctx.metrics.messages_duplicate);
    } else {
        Metrics::inc(&ctx.metrics.messages_sent);
    }
    Ok(ack(appended))
}

/// `SendMessage`: on the room's home; durable on W replicas before the ack;
/// idempotent by `client_msg_id`.
pub(super) async fn send(
    ctx: &Ctx,
    user: &UserId,
    req: pb::SendMessageRequest,
    md: &MetadataMap,
) -> ApiResult<pb::SendMessageResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    let fwd = || pb::SendMessageRequest {
        room: room.id.to_string(),
        ..req.clone()
    };
    append(
        ctx,
        user,
        &room,
        req.text.clone(),
        req.client_msg_id.clone(),
        &req.after,
        md,
        fwd,
    )
    .await
}

/// `SendDirect`: creates the two users' direct room on first use, then sends into it.
pub(super) async fn send_direct(
    ctx: &Ctx,
    user: &UserId,
    req: pb::SendDirectRequest,
    md: &MetadataMap,
) -> ApiResult<pb::SendMessageResponse> {
    let to = ctx.existing_user(&req.user).await?;
    if &to == user {
        return Err(ApiError::Invalid(
            "you cannot send a direct message to yourself".into(),
        ));
    }
    // Validate before creating the room, so bad input changes nothing.
    validate_text(req.text.clone())?;
    let id = RoomId::direct(user, &to);
    let p = ctx.placement.of_room(&id);
    let existing = ctx.groups.read(p, |s| s.room(&id).cloned());
    let room = match existing {
        Some(r) => r,
        None => {
            Metrics::inc(&ctx.metrics.raft_writes);
            let at = ctx.hlc.wall_ms();
            match ctx
                .groups
                .write(
                    p,
                    Command::EnsureDirect {
                        id: id.clone(),
                        a: user.clone(),
                        b: to.clone(),
                        at,
                    },
                )
                .await??
            {
                Applied::DirectReady { room, .. } => room,
                other => {
                    return Err(ApiError::Internal(format!(
                        "unexpected outcome of direct room: {other:?}"
                    )))
                }
            }
        }
    };
    let fwd = || pb::SendMessageRequest {
        room: room.id.to_string(),
        text: req.text.clone(),
        client_msg_id: req.client_msg_id.clone(),
        after: String::new(),
    };
    append(
        ctx,
        user,
        &room,
        req.text.clone(),
        req.client_msg_id.clone(),
        "",
        md,
        fwd,
    )
    .await
}

/// `EditMessage`: the author only.
pub(super) async fn edit(
    ctx: &Ctx,
    user: &UserId,
    req: pb::EditMessageRequest,
    md: &MetadataMap,
) -> ApiResult<pb::SendMessageResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    let target = message_id(&req.message_id)?;
    let text = validate_text(req.text.clone())?;
    let w = write_quorum(ctx, &room)?;
    if let Route::Forward(mut home) = route(ctx, &room, md, w).await? {
        return relay(home.client.edit_message(forwarded(req, md)).await);
    }
    let fence = fence::stamp(ctx, &room, w).await?;
    ctx.require_member(&room, user).await?;
    check_reachable(ctx, &room, w)?;
    Ok(ack(ctx
        .timelines
        .edit(&room.id, user, target, text, w, fence)
        .await?))
}

/// `DeleteMessage`: the author, or a room admin.
pub(super) async fn delete(
    ctx: &Ctx,
    user: &UserId,
    req: pb::DeleteMessageRequest,
    md: &MetadataMap,
) -> ApiResult<pb::SendMessageResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    let target = message_id(&req.message_id)?;
    let w = write_quorum(ctx, &room)?;
    if let Route::Forward(mut home) = route(ctx, &room, md, w).await? {
        return relay(home.client.delete_message(forwarded(req, md)).await);
    }
    let fence = fence::stamp(ctx, &room, w).await?;
    let me = ctx.require_member(&room, user).await?;
    check_reachable(ctx, &room, w)?;
    Ok(ack(ctx
        .timelines
        .delete(&room.id, user, me.role == Role::Admin, target, w, fence)
        .await?))
}

/// `React`: adds or removes the caller's reaction (an emoji or short code, 1-32 bytes).
pub(super) async fn react(
    ctx: &Ctx,
    user: &UserId,
    req: pb::ReactRequest,
    md: &MetadataMap,
) -> ApiResult<pb::SendMessageResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    let target = message_id(&req.message_id)?;
    let emoji = req.emoji.trim().to_owned();
    if emoji.is_empty() || emoji.len() > 32 || emoji.chars().any(char::is_whitespace) {
        return Err(ApiError::Invalid(
            "a reaction is 1 to 32 bytes without spaces".into(),
        ));
    }
    let w = write_quorum(ctx, &room)?;
    if let Route::Forward(mut home) = route(ctx, &room, md, w).await? {
        return relay(home.client.react(forwarded(req, md)).await);
    }
    let fence = fence::stamp(ctx, &room, w).await?;
    ctx.require_member(&room, user).await?;
    check_reachable(ctx, &room, w)?;
    Ok(ack(ctx
        .timelines
        .react(&room.id, user, target, emoji, req.remove, w, fence)
        .await?))
}

/// `History`: a page of the room's messages, oldest first. Members only.
pub(super) async fn history(
    ctx: &Ctx,
    user: &UserId,
    req: pb::HistoryRequest,
) -> ApiResult<pb::HistoryResponse> {
    let room = ctx.resolve_room(&req.room, false).await?;
    ctx.require_member(&room, user).await?;
    let given = [
        !req.before.is_empty(),
        !req.after.is_empty(),
        req.since != 0,
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(ApiError::Invalid(
            "give at most one of before, after and since".into(),
        ));
    }
    if req.since < 0 {
        return Err(ApiError::Invalid(
            "since must be a Unix time in milliseconds".into(),
        ));
    }
    let q = HistoryQuery {
        limit: match req.limit {
            0 => 50,
            n => n.min(1000) as usize,
        },
        before: opt_message_id(&req.before, "before")?,
        after: opt_message_id(&req.after, "after")?,
        since_ms: (req.since > 0).then_some(req.since as u64),
    };
    let (messages, more) = ctx.timelines.history(&room.id, &q)?;
    Ok(pb::HistoryResponse { messages, more })
}
