//! `Subscribe`: a server stream of a caller's rooms' events.
//!
//! Per room the stream first replays, from the index, every durable timeline entry after
//! the cursor up to the watermark it got together with its live receiver, then forwards
//! live events, skipping any id it already sent. A subscriber that lags behind the
//! channel catches up from the index the same way. So each durable entry is sent once,
//! in id order per room, and a cursor taken here resumes with no gap.
//! A user removed from a room (left, kicked, banned) gets that event, then nothing more
//! from the room.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use parley_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tokio_stream::StreamMap;

use super::{ApiError, ApiResult, Ctx, EventStream, Metrics};
use crate::delivery::{Cursor, HubEvent};
use crate::ids::{MessageId, RoomId, UserId};

/// Entries read from the index per replay page.
const REPLAY_PAGE: usize = 512;

pub(super) async fn subscribe(
    ctx: Arc<Ctx>,
    user: UserId,
    req: pb::SubscribeRequest,
) -> ApiResult<EventStream> {
    let cursor = if req.cursor.is_empty() {
        None
    } else {
        Some(Cursor::decode(&req.cursor)?)
    };
    let mut rooms = Vec::new();
    if !req.rooms.is_empty() {
        for r in &req.rooms {
            rooms.push(ctx.resolve_room(r, false).await?);
        }
    } else if let Some(c) = &cursor {
        for id in c.0.keys() {
            rooms.push(ctx.resolve_room(id.as_str(), false).await?);
        }
    } else {
        rooms = ctx.rooms_of(&user);
    }
    if rooms.len() > 1000 {
        return Err(ApiError::Invalid(
            "subscribe to at most 1000 rooms per stream".into(),
        ));
    }
    let mut streams = StreamMap::new();
    let mut last: BTreeMap<RoomId, MessageId> = BTreeMap::new();
    let mut start: Vec<(RoomId, MessageId, MessageId)> = Vec::new();
    for room in &rooms {
        ctx.require_member(room, &user).await?;
        ctx.timelines.ensure_loaded(&room.id).await?;
        let (rx, watermark) = ctx
            .hub
            .subscribe(&room.id)
            .ok_or_else(|| ApiError::Unavailable(format!("room {} is not loaded", room.name)))?;
        let from = match cursor.as_ref().and_then(|c| c.0.get(&room.id)) {
            Some(&id) if id > watermark => {
                return Err(ApiError::NotFound(format!(
                    "unknown cursor: it is ahead of every entry of {} on this node",
                    room.name
                )))
            }
            Some(&id) => {
                start.push((room.id.clone(), id, watermark));
                id
            }
            None => watermark,
        };
        last.insert(room.id.clone(), from);
        streams.insert(room.id.clone(), BroadcastStream::new(rx));
    }
    if let Some(c) = &cursor {
        if let Some(stray) = c.0.keys().find(|r| !last.contains_key(*r)) {
            return Err(ApiError::Invalid(format!(
                "the cursor names room {stray}, which this subscription does not"
            )));
        }
    }
    Metrics::inc(&ctx.metrics.subscriptions_opened);
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(pump(ctx, user, streams, last, start, tx));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

type Tx = mpsc::Sender<Result<pb::Event, tonic::Status>>;

struct Sub {
    ctx: Arc<Ctx>,
    user: UserId,
    last: BTreeMap<RoomId, MessageId>,
    tx: Tx,
}

impl Sub {
    /// Sends one timeline event with the cursor after it. False once the client is gone.
    async fn timeline(&mut self, room: &RoomId, id: MessageId, ev: &pb::Event) -> bool {
        let cur = self.last.get(room).copied().unwrap_or(MessageId::MIN);
        if id <= cur {
            return true;
        }
        self.last.insert(room.clone(), id);
        let mut ev = ev.clone();
        ev.cursor = Cursor(self.last.clone()).encode();
        self.tx.send(Ok(ev)).await.is_ok()
    }

    /// Replays durable entries after our position up to `upto`. False once the client is gone.
    async fn catch_up(&mut self, room: &RoomId, upto: MessageId) -> bool {
        for _ in 0..1_000_000 {
            let from = self.last.get(room).copied().unwrap_or(MessageId::MIN);
            let page = match self.ctx.timelines.replay(room, from, upto, REPLAY_PAGE) {
                Ok(p) => p,
                Err(e) => {
                    let status: tonic::Status = ApiError::from(e).into();
                    let _ = self.tx.send(Err(status)).await;
                    return false;
                }
            };
            let n = page.len();
            for (id, ev) in page {
                if !self.timeline(room, id, &ev).await {
                    return false;
                }
            }
            if n < REPLAY_PAGE {
                return true;
            }
        }
        true
    }

    /// Whether a live event removes this subscriber from the room.
    fn removes_me(&self, ev: &pb::Event) -> bool {
        use pb::MembershipChange as C;
        match &ev.kind {
            Some(pb::event::Kind::Membership(m)) => {
                m.user == self.user.as_str()
                    && matches!(
                        C::try_from(m.change),
                        Ok(C::MembershipLeft | C::MembershipKicked | C::MembershipBanned)
                    )
                    || matches!(C::try_from(m.change), Ok(C::MembershipRoomDeleted))
            }
            _ => false,
        }
    }
}

async fn pump(
    ctx: Arc<Ctx>,
    user: UserId,
    mut streams: StreamMap<RoomId, BroadcastStream<HubEvent>>,
    last: BTreeMap<RoomId, MessageId>,
    start: Vec<(RoomId, MessageId, MessageId)>,
    tx: Tx,
) {
    let mut sub = Sub {
        ctx,
        user,
        last,
        tx,
    };
    for (room, _from, watermark) in start {
        if !sub.catch_up(&room, watermark).await {
            return;
        }
    }
    loop {
        let next = tokio::select! {
            n = streams.next() => n,
            _ = sub.tx.closed() => return,
        };
        let Some((room, item)) = next else { return };
        let ok = match item {
            Ok(HubEvent::Timeline { id, event }) => sub.timeline(&room, id, &event).await,
            Ok(HubEvent::Live(event)) => {
                let removed = sub.removes_me(&event);
                let ok = sub.tx.send(Ok((*event).clone())).await.is_ok();
                if removed {
                    streams.remove(&room);
                }
                ok
            }
            Err(BroadcastStreamRecvError::Lagged(_)) => {
                let upto = sub.ctx.hub.watermark(&room).unwrap_or(MessageId::MIN);
                sub.catch_up(&room, upto).await
            }
        };
        if !ok {
            return;
        }
    }
}
