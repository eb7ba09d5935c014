//! `Subscribe`: a server stream of a caller's rooms' events.
//!
//! Per room the stream first replays, from the index, every durable timeline entry after
//! the cursor (see below for the window before it) up to the watermark it got together with its
//! live receiver, then forwards live events, skipping any id it already sent on this
//! stream. A subscriber that lags behind the channel catches up from the index the same
//! way.
//!
//! Entries can reach a replica late and out of id order: written on the other side of a
//! partition, they arrive by anti-entropy after newer ones were already delivered. A
//! live stream forwards such a late entry when it arrives (once: the stream remembers
//! the ids it sent). A cursor names the newest id its stream sent, and the node a client
//! resumes on may hold entries older than that which the old node did not have. So a
//! cursor also carries a digest of the ids its stream sent in the window
//! ([`crate::delivery::RESUME_WINDOW_MS`]) before its position: a node holding exactly those entries
//! there resumes exactly after the position (no gap, no duplicate); one holding others
//! replays the whole window as well, and the client drops the ids it already showed
//! (DESIGN §3: at least once, shown once). Within one stream every entry is sent once.
//! An entry can also surface far more than the window behind the cursors of the
//! streams that missed it: a send that failed ambiguously leaves its entry on its home
//! node alone, and anti-entropy spreads it after the home comes back, maybe minutes
//! later. Nodes journal such late entries when they gain them or hand them to a peer
//! (`Timelines::late_since`), and a resume replays journal records stamped from shortly
//! before its window on, besides the window itself (see [`LATE_SLACK_WINDOWS`]).
//!
//! A node that was down or cut off may lack entries far older than the window (written
//! meanwhile on the other replicas), yet still deliver newer ones (its own, or pushed).
//! So a stream's cursors move only while the node is caught up in the room
//! (`Timelines::caught_up`: a recent completed anti-entropy exchange). While it is not,
//! events carry the position last vouched for; once it is caught up again the stream
//! first replays from that position's window, sending the entries it gained, and only
//! then moves the cursor on. A resume on a node not caught up first tries one exchange
//! (bounded by [`CATCH_UP_BUDGET`]); a new stream does not wait for it.
//! A user removed from a room (left, kicked, banned) gets that event, then nothing more
//! from the room.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound::{Excluded, Included};
use std::sync::Arc;

use futures::StreamExt;
use parley_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::{BroadcastStream, ReceiverStream};
use tokio_stream::StreamMap;

use super::{ApiError, ApiResult, Ctx, EventStream, Metrics};
use crate::delivery::{resume_window_ms, window_floor, Cursor, HubEvent, Position, WindowDigest};
use crate::ids::{MessageId, RoomId, UserId};

/// Entries read from the index per replay page.
const REPLAY_PAGE: usize = 512;
/// Ids a stream remembers per room to send each entry once. Beyond this the oldest
/// are forgotten; if one of them is still inside the resume window the stream stops
/// putting a window digest in its cursors (a resume then replays the window).
const SENT_MEMORY: usize = 100_000;

/// A resume replays late-journal records stamped after its cursor's position less this
/// many resume windows: the node that handed the cursor out caught up (within
/// `CAUGHT_UP_FOR`, under half a window) with a peer that still lacked the entry, so
/// the entry moved between nodes, and was journaled, after about that time; the second
/// window absorbs clock skew between nodes.
const LATE_SLACK_WINDOWS: u64 = 2;

/// Journal records one resume reads at most per room.
const LATE_LIMIT: usize = 100_000;

/// How long opening a stream may spend catching this node up in its rooms.
const CATCH_UP_BUDGET: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a resume waits for this node to hold the client's window: steps × step.
const RESUME_WAIT_STEPS: u32 = 20;
const RESUME_WAIT_STEP: std::time::Duration = std::time::Duration::from_millis(50);

/// A stream's state in one room.
#[derive(Default)]
struct RoomPos {
    /// The newest id sent (or the cursor's): what the next cursor names.
    last: MessageId,
    /// Ids sent on this stream (and, after an exact resume, the window's ids the
    /// client already had), so late and replayed entries go out once.
    sent: BTreeSet<MessageId>,
    /// Digest of `sent` ∩ `(window_floor(last), last]`; `None` once untrackable.
    window: Option<WindowDigest>,
    /// What this stream's cursors name: `position()` when it was last vouched for.
    published: Position,
    /// The node's catch-up epoch the cursor follows; `None` while not caught up.
    trusted: Option<u64>,
}

impl RoomPos {
    fn new(last: MessageId, sent: BTreeSet<MessageId>, window: Option<WindowDigest>) -> Self {
        let published = Position { id: last, window };
        Self {
            last,
            sent,
            window,
            published,
            trusted: None,
        }
    }

    fn position(&self) -> Position {
        Position {
            id: self.last,
            window: self.window,
        }
    }

    /// Records `id` as sent; false if it was sent already.
    fn record(&mut self, id: MessageId) -> bool {
        if !self.sent.insert(id) {
            return false;
        }
        if id > self.last {
            // The window slides: ids now at or below the new floor leave the digest.
            let (old_floor, new_floor) = (window_floor(self.last), window_floor(id));
            if let Some(w) = self.window.as_mut() {
                for gone in self.sent.range((Excluded(old_floor), Included(new_floor))) {
                    if *gone <= self.last {
                        w.remove(*gone);
                    }
                }
            }
            self.last = id;
        }
        if id > window_floor(self.last) {
            if let Some(w) = self.window.as_mut() {
                w.add(id);
            }
        }
        if self.sent.len() > SENT_MEMORY {
            if let Some(first) = self.sent.pop_first() {
                if first > window_floor(self.last) {
                    self.window = None;
                }
            }
        }
        true
    }
}

/// This node's entries of `room` in the resume window before `at`,
/// `(window_floor(at), at]` (bounded pages), and their digest.
fn window_before(
    ctx: &Ctx,
    room: &RoomId,
    at: MessageId,
) -> Result<(Vec<MessageId>, WindowDigest), ApiError> {
    let upto = at;
    let mut out = Vec::new();
    let mut from = window_floor(at);
    for _ in 0..10_000 {
        let page = ctx.timelines.replay(room, from, upto, REPLAY_PAGE)?;
        let n = page.len();
        out.extend(page.iter().map(|(id, _)| *id));
        match page.last() {
            Some((id, _)) if n == REPLAY_PAGE => from = *id,
            _ => break,
        }
    }
    let mut digest = WindowDigest::default();
    for id in &out {
        digest.add(*id);
    }
    Ok((out, digest))
}

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
    let mut pos: BTreeMap<RoomId, RoomPos> = BTreeMap::new();
    // Per room: replay after this id up to the watermark, and the late journal from the
    // cursor's position, if resuming.
    let mut start: Vec<(RoomId, MessageId, MessageId, Option<MessageId>)> = Vec::new();
    // One wait budget for the whole stream, however many rooms it resumes; time spent
    // in catch-up exchanges extends it, so they do not use up the wait.
    let catch_up_deadline = tokio::time::Instant::now() + CATCH_UP_BUDGET;
    let mut wait_deadline = tokio::time::Instant::now() + RESUME_WAIT_STEP * RESUME_WAIT_STEPS;
    for room in &rooms {
        ctx.require_member(room, &user).await?;
        ctx.timelines.ensure_loaded(&room.id).await?;
        // Resuming on a node back from a crash or a partition: one exchange first, if it
        // is quick, so the stream's cursors can move from the start. (A new stream does
        // not wait: it starts from this node's watermark, and the sooner the better.)
        let resuming = cursor.as_ref().is_some_and(|c| c.0.contains_key(&room.id));
        if resuming && ctx.timelines.caught_up(&room.id).is_none() {
            let began = tokio::time::Instant::now();
            let _ =
                tokio::time::timeout_at(catch_up_deadline, ctx.timelines.catch_up_room(&room.id))
                    .await;
            wait_deadline += began.elapsed();
        }
        // Resuming: give this node a moment (bounded) to hold what the client was sent
        // in the window; a node a few pushes behind then still resumes exactly.
        let mut exact_ids: Option<Vec<MessageId>> = None;
        if let Some(c) = cursor.as_ref().and_then(|c| c.0.get(&room.id)) {
            if c.window.is_some()
                && c.id.physical_ms() <= ctx.hlc.wall_ms().saturating_add(resume_window_ms())
            {
                for attempt in 0..RESUME_WAIT_STEPS {
                    let wm = ctx.hub.watermark(&room.id).unwrap_or(MessageId::MIN);
                    if c.id <= wm {
                        let (here, digest) = window_before(&ctx, &room.id, c.id)?;
                        if c.window == Some(digest) {
                            exact_ids = Some(here);
                            break;
                        }
                    }
                    if attempt + 1 < RESUME_WAIT_STEPS
                        && tokio::time::Instant::now() + RESUME_WAIT_STEP <= wait_deadline
                    {
                        tokio::time::sleep(RESUME_WAIT_STEP).await;
                    } else {
                        break;
                    }
                }
            }
        }
        let (rx, watermark) = ctx
            .hub
            .subscribe(&room.id)
            .ok_or_else(|| ApiError::Unavailable(format!("room {} is not loaded", room.name)))?;
        let trusted = ctx.timelines.caught_up(&room.id);
        let mut p = match cursor.as_ref().and_then(|c| c.0.get(&room.id)) {
            Some(c)
                if c.id.physical_ms() > ctx.hlc.wall_ms().saturating_add(resume_window_ms()) =>
            {
                return Err(ApiError::NotFound(format!(
                    "unknown cursor: it is more than {} s ahead of this node's clock in room {}",
                    resume_window_ms() / 1000,
                    room.name
                )))
            }
            Some(c) => {
                // Exact resume when this node holds the same entries in the window as
                // the client was sent; else replay the window too. A cursor ahead of
                // this node's watermark (taken on a node further along) replays the
                // window and then goes live.
                match exact_ids.take() {
                    Some(here) => {
                        start.push((room.id.clone(), c.id, watermark, Some(c.id)));
                        RoomPos::new(c.id, here.into_iter().collect(), c.window)
                    }
                    None => {
                        start.push((room.id.clone(), window_floor(c.id), watermark, Some(c.id)));
                        // Until it is caught up the stream hands the client's cursor back.
                        let mut p =
                            RoomPos::new(c.id, BTreeSet::new(), Some(WindowDigest::default()));
                        p.published = Position {
                            id: c.id,
                            window: c.window,
                        };
                        p
                    }
                }
            }
            None => {
                // A new stream starts at the watermark: the client is deemed to have
                // what came before, so the window digest starts from this node's
                // entries there.
                let (here, digest) = window_before(&ctx, &room.id, watermark)?;
                RoomPos::new(watermark, here.into_iter().collect(), Some(digest))
            }
        };
        p.trusted = trusted;
        pos.insert(room.id.clone(), p);
        streams.insert(room.id.clone(), BroadcastStream::new(rx));
    }
    if let Some(c) = &cursor {
        if let Some(stray) = c.0.keys().find(|r| !pos.contains_key(*r)) {
            return Err(ApiError::Invalid(format!(
                "the cursor names room {stray}, which this subscription does not"
            )));
        }
    }
    Metrics::inc(&ctx.metrics.subscriptions_opened);
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(pump(ctx, user, streams, pos, start, tx));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

type Tx = mpsc::Sender<Result<pb::Event, tonic::Status>>;

struct Sub {
    ctx: Arc<Ctx>,
    user: UserId,
    pos: BTreeMap<RoomId, RoomPos>,
    tx: Tx,
}

impl Sub {
    /// Sends one timeline event (unless this stream sent it already) with the cursor
    /// after it: one that moved past it only if the node is caught up in the room.
    /// False once the client is gone.
    async fn timeline(&mut self, room: &RoomId, id: MessageId, ev: &pb::Event) -> bool {
        let p = self.pos.entry(room.clone()).or_default();
        if !p.record(id) {
            return true;
        }
        if p.trusted.is_some() {
            p.published = p.position();
        }
        let cursor = Cursor(
            self.pos
                .iter()
                .map(|(r, p)| (r.clone(), p.published))
                .collect(),
        );
        let mut ev = ev.clone();
        ev.cursor = cursor.encode();
        self.tx.send(Ok(ev)).await.is_ok()
    }

    /// Follows the node's catch-up state in `room`. Once the node is caught up again
    /// (a new epoch), first sends what it now holds from the window of the position last
    /// vouched for (entries it lacked then), and only then lets the cursor move.
    /// False once the client is gone.
    async fn follow_catch_up(&mut self, room: &RoomId) -> bool {
        let now = self.ctx.timelines.caught_up(room);
        let p = self.pos.entry(room.clone()).or_default();
        match now {
            None => {
                p.trusted = None;
                true
            }
            Some(e) if p.trusted == Some(e) => true,
            Some(e) => {
                p.trusted = None;
                let from = window_floor(p.published.id);
                let upto = self.ctx.hub.watermark(room).unwrap_or(MessageId::MIN);
                if !self.catch_up(room, from, upto).await {
                    return false;
                }
                let p = self.pos.entry(room.clone()).or_default();
                p.trusted = Some(e);
                p.published = p.position();
                true
            }
        }
    }

    /// Replays durable entries after `from` up to `upto`. False once the client is gone.
    async fn catch_up(&mut self, room: &RoomId, from: MessageId, upto: MessageId) -> bool {
        let mut from = from;
        for _ in 0..1_000_000 {
            let page = match self.ctx.timelines.replay(room, from, upto, REPLAY_PAGE) {
                Ok(p) => p,
                Err(e) => {
                    let status: tonic::Status = ApiError::from(e).into();
                    let _ = self.tx.send(Err(status)).await;
                    return false;
                }
            };
            let n = page.len();
            if let Some((id, _)) = page.last() {
                from = *id;
            }
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

    /// Sends the entries this node journaled as late (at most `upto`) that sit at or
    /// below the window of position `at`, from records stamped no earlier than
    /// [`LATE_SLACK_WINDOWS`] windows before it (the window itself is replayed apart).
    /// False once the client is gone.
    async fn replay_late(&mut self, room: &RoomId, at: MessageId, upto: MessageId) -> bool {
        let since = at
            .physical_ms()
            .saturating_sub(LATE_SLACK_WINDOWS * resume_window_ms());
        let below = window_floor(at).min(upto);
        let late = match self
            .ctx
            .timelines
            .late_since(room, since, below, LATE_LIMIT)
        {
            Ok(l) => l,
            Err(e) => {
                let status: tonic::Status = ApiError::from(e).into();
                let _ = self.tx.send(Err(status)).await;
                return false;
            }
        };
        for (id, ev) in late {
            if !self.timeline(room, id, &ev).await {
                return false;
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
    pos: BTreeMap<RoomId, RoomPos>,
    start: Vec<(RoomId, MessageId, MessageId, Option<MessageId>)>,
    tx: Tx,
) {
    let mut sub = Sub { ctx, user, pos, tx };
    for (room, from, watermark, late) in start {
        if !sub.follow_catch_up(&room).await {
            return;
        }
        if let Some(at) = late {
            if !sub.replay_late(&room, at, watermark).await {
                return;
            }
        }
        if !sub.catch_up(&room, from, watermark).await {
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
            Ok(HubEvent::Timeline { id, event }) => {
                sub.follow_catch_up(&room).await && sub.timeline(&room, id, &event).await
            }
            Ok(HubEvent::Live(event)) => {
                let removed = sub.removes_me(&event);
                let ok = sub.tx.send(Ok((*event).clone())).await.is_ok();
                if removed {
                    streams.remove(&room);
                }
                ok
            }
            Err(BroadcastStreamRecvError::Lagged(_)) => {
                // The dropped events may include late entries behind our position.
                let upto = sub.ctx.hub.watermark(&room).unwrap_or(MessageId::MIN);
                let at = sub.pos.get(&room).map(|p| p.last).unwrap_or(MessageId::MIN);
                sub.catch_up(&room, window_floor(at), upto).await
                    && sub.replay_late(&room, at, upto).await
            }
        };
        if !ok {
            return;
        }
    }
}
