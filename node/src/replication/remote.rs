//! Timelines between nodes: the writer's pushes, applying changes that arrive from
//! peers (pushed or found by anti-entropy), and the anti-entropy exchange itself.
//!
//! To stay correct:
//! - A room's changes leave its writer through one pusher task, in the order they were
//!   flushed, so a peer applies them in order; a peer that misses some (down, slow,
//!   partitioned) gets them from anti-entropy, and automerge holds any change whose
//!   dependencies have not arrived until they do.
//! - A peer acknowledges a push as durable only once every change in it is applied
//!   (no missing dependencies) and flushed; entries become visible (index, delivery)
//!   through the same commit pipeline as local writes, in id order per batch.
//! - A push carries its writer's fence and the authors of its entries; the receiving
//!   node (not this layer) refuses it before anything is applied when the fence is stale
//!   or an author may not write to the room (DESIGN §3 "Fences"). Anti-entropy carries
//!   neither: it converges what writers already made durable, it acknowledges nothing.
//! - Anti-entropy runs the automerge sync protocol over the open chunk. Of each pair of
//!   replicas only the one with the smaller node id starts exchanges, and every exchange
//!   starts from a fresh sync state on both sides, so a restart on either side cannot
//!   leave a stale state that withholds changes.
//! - A node knows it is caught up in a room ([`Timelines::caught_up`]) only while an
//!   exchange it started with another replica completed recently ([`CAUGHT_UP_FOR`]).
//!   Every entry acknowledged with `W = 2` before that exchange started is on the peer,
//!   so this node holds it too; ones acknowledged since carry ids no older than the
//!   exchange less a send's timeout. Delivery uses this to let resume cursors move only
//!   over what the node is sure it holds (see `api::subscribe`). So that every node
//!   stays caught up, the replica with the greatest id also starts one exchange per
//!   round, and a node not caught up in a room tries every peer.
//! - A writer whose push a peer did not take (down, cut off, slow, refused) owes that
//!   peer an exchange over the room: the loop's retries between rounds start it every
//!   second until one completes that began after the failure, so a heal is followed by
//!   convergence within seconds, not at the next full round.
//! - That covers acknowledged entries only. An entry that was never acknowledged (its
//!   home died right after writing it) may sit on one node for minutes and then spread
//!   after cursors elsewhere moved far past it. So a node journals every entry older
//!   than a quarter of the resume window that it gains from a peer (pushed or by
//!   anti-entropy) or that a peer lacked and got from it in an exchange (worked out from
//!   the heads the peer started from), stamped with its own clock; a resume replays the
//!   journal records stamped since shortly before its window (`api::subscribe`).

use std::collections::HashMap;
use std::sync::Arc;

use automerge::sync::SyncDoc;
use automerge::{AutoCommit, ChangeHash, PatchAction, ScalarValue, Value, ROOT};
use futures::stream::{FuturesUnordered, StreamExt};
use parley_proto::v1::{
    timeline_entry, PushChangesReply, PushChangesRequest, SyncReply, SyncRequest, TimelineEntry,
};
use prost::Message as _;
use tokio::sync::mpsc;

use super::timeline::{client_key, entry_event, key, rebuild_message, Inner, RoomDoc, Waiter};
use super::{Fence, Network, ReplicationStats, TimelineError, Timelines, QUORUM_TIMEOUT};
use crate::ids::{MessageId, RoomId};
use crate::store::StoreError;

/// One flushed change of a room's writer, and the writers waiting for replicas to hold it.
pub(crate) struct PushItem {
    pub(super) chunk: u32,
    pub(super) change: Vec<u8>,
    pub(super) waiters: Vec<Waiter>,
    /// Resolves with the result of this node's flush of the change.
    pub(super) flushed: Flushed,
    /// Who wrote the change's entries, and the fence they were written under.
    pub(super) authors: Vec<String>,
    pub(super) fence: Option<Fence>,
}

/// One request's worth of pushes: consecutive changes of one chunk written under one
/// fence, in order, with their authors and writers.
struct PushRequest {
    chunk: u32,
    fence: Option<Fence>,
    changes: Vec<Vec<u8>>,
    authors: Vec<String>,
    waiters: Vec<(Waiter, Flushed)>,
}

/// The local flush of a pipeline round: `None` until it finished.
pub(crate) type Flushed = tokio::sync::watch::Receiver<Option<Result<(), StoreError>>>;

/// Most rounds of one anti-entropy exchange.
const SYNC_ROUNDS: usize = 16;

/// How long a completed anti-entropy exchange vouches that this node holds every entry
/// of the room acknowledged before it started. With a send's quorum timeout and HLC
/// skew this must stay well inside the delivery resume window (60 s).
pub const CAUGHT_UP_FOR: std::time::Duration = std::time::Duration::from_secs(25);

/// Longest one anti-entropy exchange (one room, one peer) may take in the background loop.
const EXCHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How many rooms the anti-entropy loop works on at once. One room at a time made a round
/// the sum of its exchanges: 78 s after a heal on a starved machine (FAULTS anomaly 7).
const ANTI_ENTROPY_ROOMS_AT_ONCE: usize = 4;

/// Pushes up to this many bytes of changes apply in place on the open chunk (see
/// `with_chunk`): one message's change is a few hundred bytes.
const SHORT_PUSH: usize = 16 * 1024;

/// Peers whose anti-entropy exchange failed during one pass, skipped for its rest.
type FailedPeers = std::sync::Mutex<std::collections::HashSet<u64>>;

/// (peer, room) pairs where the peer missed a push, with when the push failed.
pub(crate) type Owed = std::sync::Mutex<HashMap<(u64, RoomId), std::time::Instant>>;

/// Notes that `peer` missed a push in `room` (failed, timed out or refused).
fn owe(owed: &Owed, peer: u64, room: &RoomId) {
    owed.lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((peer, room.clone()), std::time::Instant::now());
}

/// How long a room's late-journal records are kept (`Timelines::late_since`): a resume
/// from a cursor older than this may miss an entry that reached the room late.
pub const LATE_RETAIN: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How often a node tries to catch up in rooms it is not caught up in, between rounds.
const CATCH_UP_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Hands a flushed change to the room's pusher (started on first use).
pub(super) fn push(inner: &Arc<Inner>, net: &Arc<dyn Network>, room: &RoomId, item: PushItem) {
    let me = inner
        .network
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map_or(0, |(n, _)| *n);
    let mut pushers = inner.pushers.lock().unwrap_or_else(|p| p.into_inner());
    let tx = pushers.entry(room.clone()).or_insert_with(|| {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(pusher(
            net.clone(),
            inner.owed.clone(),
            inner.stats.clone(),
            me,
            room.clone(),
            rx,
        ));
        tx
    });
    if let Err(mpsc::error::SendError(item)) = tx.send(item) {
        for w in item.waiters {
            let _ = w.done.send(Err(TimelineError::Quorum {
                need: w.quorum,
                have: 1,
            }));
        }
    }
}

/// Sends a room's changes to its peers in order. Each batch answers its writers as soon
/// as enough peers hold it; pushes to the remaining peers finish in the background.
async fn pusher(
    net: Arc<dyn Network>,
    owed: Arc<Owed>,
    stats: Arc<ReplicationStats>,
    me: u64,
    room: RoomId,
    mut rx: mpsc::UnboundedReceiver<PushItem>,
) {
    while let Some(first) = rx.recv().await {
        let mut items = vec![first];
        while items.len() < 64 {
            match rx.try_recv() {
                Ok(i) => items.push(i),
                Err(_) => break,
            }
        }
        // Consecutive items of the same chunk and fence travel in one request, in order.
        let mut requests: Vec<PushRequest> = Vec::new();
        for item in items {
            let waiters = item.waiters.into_iter().map(|w| (w, item.flushed.clone()));
            match requests.last_mut() {
                Some(r) if r.chunk == item.chunk && r.fence == item.fence => {
                    r.changes.push(item.change);
                    r.authors.extend(item.authors);
                    r.waiters.extend(waiters);
                }
                _ => requests.push(PushRequest {
                    chunk: item.chunk,
                    fence: item.fence,
                    changes: vec![item.change],
                    authors: item.authors,
                    waiters: waiters.collect(),
                }),
            }
        }
        for mut r in requests {
            r.authors.sort_unstable();
            r.authors.dedup();
            let req = PushChangesRequest {
                room_id: room.to_string(),
                chunk: r.chunk,
                changes: r.changes,
                from_node: me,
                group: r.fence.map_or(0, |f| f.group),
                term: r.fence.map(|f| f.term),
                authors: r.authors,
            };
            replicate(&net, &owed, &stats, &room, req, r.waiters).await;
        }
    }
}

/// Pushes one request to every peer and answers `waiters` as acknowledgements arrive:
/// a writer is answered once its own round's local flush succeeded and `quorum - 1`
/// peers hold the change durably. A peer that does not take it is noted in `owed`.
async fn replicate(
    net: &Arc<dyn Network>,
    owed: &Arc<Owed>,
    stats: &Arc<ReplicationStats>,
    room: &RoomId,
    req: PushChangesRequest,
    mut waiters: Vec<(Waiter, Flushed)>,
) {
    let peers = net.peers_of(room);
    let mut pending: FuturesUnordered<_> = peers
        .into_iter()
        .map(|peer| {
            let net = net.clone();
            let req = req.clone();
            async move {
                let r = tokio::time::timeout(QUORUM_TIMEOUT, net.push(peer, req)).await;
                (peer, r)
            }
        })
        .collect();
    let mut acks: u8 = 0;
    waiters.sort_by_key(|(w, _)| w.quorum);
    let deadline = tokio::time::Instant::now() + QUORUM_TIMEOUT;
    while !waiters.is_empty() {
        // Answer every waiter whose local flush is done and whose quorum is met. Of
        // those whose flush was still under way, keep one receiver to wait on: it was
        // cloned after this pass read it, so an outcome that lands later wakes the wait
        // at once. (A flush with an outcome is never waited on: its sender is gone, so
        // `changed` would return at once, again and again.)
        let mut still = Vec::with_capacity(waiters.len());
        let mut flush: Option<Flushed> = None;
        for (w, mut f) in waiters {
            let local = f.borrow_and_update().clone();
            match local {
                Some(Err(e)) => {
                    let _ = w.done.send(Err(e.into()));
                }
                Some(Ok(())) if w.quorum <= acks.saturating_add(1) => {
                    let _ = w.done.send(Ok(()));
                }
                None => {
                    flush.get_or_insert_with(|| f.clone());
                    still.push((w, f));
                }
                Some(Ok(())) => still.push((w, f)),
            }
        }
        waiters = still;
        // Done, or no acknowledgement can still come for those left (answered below).
        if waiters.is_empty() || (pending.is_empty() && flush.is_none()) {
            break;
        }
        let flush_changed = async {
            match flush.as_mut() {
                Some(f) => f.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            reply = pending.next(), if !pending.is_empty() => {
                if let Some((peer, r)) = reply {
                    if took_push(owed, stats, peer, room, r) {
                        acks = acks.saturating_add(1);
                    }
                }
            }
            changed = flush_changed => {
                if !changed {
                    // The pipeline went away without an outcome (shutdown): nothing
                    // more will come; those left are answered below.
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    for (w, f) in waiters {
        let have = acks.saturating_add(u8::from(matches!(*f.borrow(), Some(Ok(())))));
        let _ = w.done.send(Err(TimelineError::Quorum {
            need: w.quorum,
            have,
        }));
    }
    if !pending.is_empty() {
        // Slower peers still get the change; nobody waits for them.
        let (owed, stats, room) = (owed.clone(), stats.clone(), room.clone());
        tokio::spawn(async move {
            while let Some((peer, r)) = pending.next().await {
                took_push(&owed, &stats, peer, &room, r);
            }
        });
    }
}

/// Whether `peer` holds a pushed change durably, from its reply; notes it in `owed` if not.
fn took_push(
    owed: &Owed,
    stats: &ReplicationStats,
    peer: u64,
    room: &RoomId,
    reply: Result<Result<PushChangesReply, String>, tokio::time::error::Elapsed>,
) -> bool {
    let count = ReplicationStats::inc;
    match reply {
        Ok(Ok(r)) if r.durable => {
            count(&stats.pushes_taken);
            return true;
        }
        Ok(Ok(r)) => {
            count(&stats.pushes_not_taken);
            tracing::debug!(room = %room, peer, rejected = %r.rejected, "a peer did not take a push")
        }
        Ok(Err(e)) => {
            count(&stats.pushes_failed);
            tracing::debug!(room = %room, peer, error = %e, "push failed")
        }
        Err(_) => {
            count(&stats.pushes_failed);
            tracing::debug!(room = %room, peer, "push timed out")
        }
    }
    owe(owed, peer, room);
    false
}

/// Decodes a peer's sync message, refusing it whole if a change it carries is damaged:
/// receiving it would apply the changes before the damaged one and report success.
fn decode_sync(bytes: &[u8], what: &str) -> Result<automerge::sync::Message, TimelineError> {
    let invalid = |e: &dyn std::fmt::Display| TimelineError::Invalid {
        reason: format!("bad {what}: {e}"),
    };
    let msg = automerge::sync::Message::decode(bytes).map_err(|e| invalid(&e))?;
    for changes in msg.changes.iter() {
        super::timeline::check_changes(changes).map_err(|e| invalid(&e))?;
    }
    Ok(msg)
}

/// Once every head the peer started an exchange from (`start`) is in `doc`: the ids of
/// the entries `doc` holds that the peer did not then (and `start` becomes `None`).
fn peer_lacked(
    room: &RoomId,
    doc: &mut AutoCommit,
    start: &mut Option<Vec<ChangeHash>>,
) -> Vec<MessageId> {
    let Some(heads) = start.as_ref() else {
        return Vec::new();
    };
    if heads.iter().any(|h| doc.get_change_by_hash(h).is_none()) {
        return Vec::new();
    }
    let heads = start.take().unwrap_or_default();
    collect_new(room, doc, &heads)
        .into_iter()
        .map(|(id, _, _)| id)
        .collect()
}

/// Runs `f` on `doc`; its result, and the timeline entries the document gained (in id
/// order) even if `f` failed partway (a batch whose third change does not decode still
/// applied the first two: the index must follow the document). automerge records the
/// ops applied meanwhile (its patch log, active only here), so finding the new entries
/// costs what `f` applied, not a pass over the whole chunk.
#[allow(clippy::type_complexity)]
fn apply_and_collect<R>(
    room: &RoomId,
    doc: &mut AutoCommit,
    f: impl FnOnce(&mut AutoCommit) -> Result<R, TimelineError>,
) -> (
    Result<R, TimelineError>,
    Vec<(MessageId, Vec<u8>, TimelineEntry)>,
) {
    doc.update_diff_cursor();
    let before = doc.get_heads();
    let r = f(doc);
    let new = collect_new(room, doc, &before);
    doc.reset_diff_cursor();
    (r, new)
}

/// Timeline entries `doc` gained since `before`, in id order.
fn collect_new(
    room: &RoomId,
    doc: &mut AutoCommit,
    before: &[ChangeHash],
) -> Vec<(MessageId, Vec<u8>, TimelineEntry)> {
    let after = doc.get_heads();
    if after.as_slice() == before {
        return Vec::new();
    }
    let mut new = Vec::new();
    for patch in doc.diff(before, &after) {
        if patch.obj != ROOT {
            continue;
        }
        let PatchAction::PutMap {
            key: k,
            value: (Value::Scalar(v), _),
            ..
        } = patch.action
        else {
            continue;
        };
        let ScalarValue::Bytes(bytes) = v.as_ref() else {
            continue;
        };
        let Ok(id) = MessageId::from_chunk_key(&k) else {
            tracing::warn!(room = %room, key = %k, "skipping a timeline key that is not a message id");
            continue;
        };
        match TimelineEntry::decode(bytes.as_slice()) {
            Ok(entry) => new.push((id, bytes.clone(), entry)),
            Err(e) => {
                tracing::warn!(room = %room, id = %id, error = %e, "skipping an entry that does not decode")
            }
        }
    }
    new.sort_by_key(|(id, _, _)| *id);
    new
}

impl Timelines {
    /// Lets this node push to and sync with its peers; `me` is this node's id.
    pub fn set_network(&self, me: u64, net: Arc<dyn Network>) {
        *self.inner.network.lock().unwrap_or_else(|p| p.into_inner()) = Some((me, net));
    }

    /// Replicas of `room` that can be reached now, this one included.
    pub fn reachable_replicas(&self, room: &RoomId) -> usize {
        match self.network() {
            Some((_, net)) => 1 + net.reachable_peers(room),
            None => 1,
        }
    }

    fn network(&self) -> Option<(u64, Arc<dyn Network>)> {
        self.inner
            .network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies changes a peer pushed for `room`'s chunk `chunk`. Returns whether every
    /// change could be applied (none waits for a missing dependency) and is now durable.
    pub async fn apply_remote(
        &self,
        room: &RoomId,
        chunk: u32,
        changes: &[Vec<u8>],
    ) -> Result<bool, TimelineError> {
        let slot = self.slot(room);
        let (rx, complete) = {
            let mut g = slot.lock().await;
            let rd = self.load_locked(room, &mut g)?;
            let short = changes.iter().map(Vec::len).sum::<usize>() <= SHORT_PUSH;
            let complete = self.with_chunk(room, rd, chunk, short, Some(changes), |doc| {
                super::timeline::load_changes(doc, changes).map_err(|e| {
                    TimelineError::Invalid {
                        reason: format!("a pushed change does not decode: {e}"),
                    }
                })?;
                Ok(doc.get_missing_deps(&[]).is_empty())
            })?;
            (self.wait_for_pending(room, rd, 1)?, complete)
        };
        Self::wait_durable(rx).await?;
        Ok(complete)
    }

    /// Runs `f` on the document of `chunk` and queues index entries and events for the
    /// entries it gained. The open chunk is used in place; a later chunk first seals the
    /// open one (the writer sealed: follow it); an earlier, sealed chunk is loaded from
    /// disk and saved back with the same batch. Called with the room lock held.
    ///
    /// `short`: `f` is short work (a small push) and runs in place on the open chunk,
    /// since it takes about as long as handing the worker's other tasks to another
    /// thread would. Anything else (sync exchanges, seals, sealed chunks) runs in a
    /// blocking section.
    ///
    /// `pushed`: the changes `f` applies, as a peer encoded them (a push). If they are
    /// all the open chunk gains, the next round stores them as they are (see
    /// `RoomDoc::unsaved`). They are not when automerge held back changes from
    /// elsewhere for missing dependencies, which these may release: then, as after any
    /// other `f`, the round asks automerge what the chunk gained.
    pub(super) fn with_chunk<R>(
        &self,
        room: &RoomId,
        rd: &mut RoomDoc,
        chunk: u32,
        short: bool,
        pushed: Option<&[Vec<u8>]>,
        f: impl FnOnce(&mut AutoCommit) -> Result<R, TimelineError>,
    ) -> Result<R, TimelineError> {
        if chunk >= rd.chunk {
            let open = |rd: &mut RoomDoc| {
                while rd.chunk < chunk {
                    super::timeline::seal(&self.inner, room, rd)?;
                }
                let extend = match (pushed, rd.unsaved.take()) {
                    (Some(changes), Some((reached, bytes)))
                        if rd.doc.get_missing_deps(&[]).is_empty()
                            && reached == rd.doc.get_heads() =>
                    {
                        Some((changes, bytes))
                    }
                    _ => None,
                };
                let (r, new) = apply_and_collect(room, &mut rd.doc, f);
                if let (Some((changes, mut bytes)), Ok(_)) = (extend, &r) {
                    for c in changes {
                        bytes.extend_from_slice(c);
                    }
                    rd.unsaved = Some((rd.doc.get_heads(), bytes));
                }
                self.queue_new(room, rd, new, true)?;
                r
            };
            return if short && chunk == rd.chunk {
                open(rd)
            } else {
                super::timeline::blocking(|| open(rd))
            };
        }
        super::timeline::blocking(|| {
            let t = &self.inner.tree;
            let skey = key(b's', room, &[&chunk.to_be_bytes()]);
            let mut doc = match rd.read_through(t, &skey)? {
                Some(bytes) => {
                    super::ReplicationStats::inc(&self.inner.stats.sealed_loads);
                    AutoCommit::load(&bytes)
                        .map_err(|e| t.corrupt(format!("sealed chunk {chunk} of {room}: {e}")))?
                }
                None => AutoCommit::new(),
            };
            doc.set_actor(automerge::ActorId::random());
            let before = doc.get_heads();
            let (r, new) = apply_and_collect(room, &mut doc, f);
            let after = doc.get_heads();
            if !new.is_empty() || after != before {
                rd.pending.push((skey, doc.save()));
            }
            self.inner.note_sealed_heads(room, chunk, after);
            self.queue_new(room, rd, new, false)?;
            r
        })
    }

    /// Queues index entries and events for new timeline entries, in id order.
    fn queue_new(
        &self,
        room: &RoomId,
        rd: &mut RoomDoc,
        new: Vec<(MessageId, Vec<u8>, TimelineEntry)>,
        open_chunk: bool,
    ) -> Result<usize, TimelineError> {
        let t = &self.inner.tree;
        let n = new.len();
        self.journal_late(room, rd, new.iter().map(|(id, _, _)| *id));
        for (id, bytes, entry) in new {
            self.inner.hlc.observe(id);
            rd.pending.push((key(b'e', room, &[&id.to_bytes()]), bytes));
            match &entry.kind {
                Some(timeline_entry::Kind::Message(m)) => {
                    if !m.client_msg_id.is_empty() {
                        let k = client_key(room, &m.sender, &m.client_msg_id);
                        rd.pending.push((k, id.to_bytes().to_vec()));
                    }
                    // Amendments that arrived before the message apply now; a message
                    // with none needs no `m` record (its entry is its state).
                    if rd.any_through(t, &key(b'a', room, &[&id.to_bytes()]))? {
                        if let Some(msg) = rebuild_message(t, rd, room, id)? {
                            rd.pending
                                .push((key(b'm', room, &[&id.to_bytes()]), msg.encode_to_vec()));
                        }
                    }
                }
                Some(kind) => {
                    if let Some(target) = amendment_target(kind) {
                        let ak = key(b'a', room, &[&target.to_bytes(), &id.to_bytes()]);
                        let amendment = TimelineEntry {
                            kind: Some(kind.clone()),
                        };
                        rd.pending.push((ak, amendment.encode_to_vec()));
                        if let Some(msg) = rebuild_message(t, rd, room, target)? {
                            rd.pending.push((
                                key(b'm', room, &[&target.to_bytes()]),
                                msg.encode_to_vec(),
                            ));
                        }
                    }
                }
                None => {}
            }
            if let Some(ev) = entry_event(room, entry) {
                rd.pending_events.push((id, Arc::new(ev)));
            }
            if open_chunk {
                rd.entries += 1;
            }
        }
        Ok(n)
    }

    /// Journals those of `ids` that are late: older than a quarter of the resume window
    /// by this node's clock (`l` records, written with the room's next batch). Called
    /// for entries this node gained from a peer and for entries a peer lacked and got
    /// from this node in an exchange: either way the entry was on fewer nodes until now,
    /// so a cursor handed out meanwhile elsewhere may have passed it unseen, and a resume
    /// replays the journal (`Timelines::late_since`) besides its window.
    fn journal_late(
        &self,
        room: &RoomId,
        rd: &mut RoomDoc,
        ids: impl IntoIterator<Item = MessageId>,
    ) {
        let now = self.inner.hlc.latest_ms();
        let late_ms = crate::delivery::resume_window_ms() / 4;
        for id in ids {
            if id.physical_ms().saturating_add(late_ms) < now {
                rd.pending.push((
                    key(b'l', room, &[&now.to_be_bytes(), &id.to_bytes()]),
                    Vec::new(),
                ));
            }
        }
    }

    /// Answers one message of a peer's anti-entropy exchange for `room`'s chunk
    /// `req.chunk`; the reply also names this node's open chunk.
    pub async fn handle_sync(&self, req: &SyncRequest) -> Result<SyncReply, TimelineError> {
        let room = RoomId::parse(&req.room_id).map_err(|e| TimelineError::Invalid {
            reason: e.to_string(),
        })?;
        let slot = self.slot(&room);
        let mut g = slot.lock_owned().await;
        let rd = self.load_locked(&room, &mut g)?;
        let k = (req.from_node, room.clone(), req.chunk);
        if self.same_sealed_heads(&room, rd, req)? {
            self.inner
                .sync_states
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&k);
            let reply = SyncReply {
                message: Vec::new(),
                open_chunk: rd.chunk,
                same_heads: true,
            };
            // The heads may include a change to the chunk not written yet.
            return self.reply_when_durable(&room, g, reply).await;
        }
        let (mut state, mut start) = {
            let mut states = self
                .inner
                .sync_states
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if req.first {
                states.remove(&k);
            }
            states.remove(&k).unwrap_or_default()
        };
        let (message, lacked) = self.with_chunk(&room, rd, req.chunk, false, None, |doc| {
            if !req.message.is_empty() {
                let msg = decode_sync(&req.message, "sync message")?;
                doc.sync()
                    .receive_sync_message(&mut state, msg)
                    .map_err(|e| TimelineError::Invalid {
                        reason: format!("sync message refused: {e}"),
                    })?;
                if req.first {
                    start = state.their_heads.clone();
                }
            }
            let lacked = peer_lacked(&room, doc, &mut start);
            let message = doc
                .sync()
                .generate_sync_message(&mut state)
                .map(|m| m.encode())
                .unwrap_or_default();
            Ok((message, lacked))
        })?;
        self.journal_late(&room, rd, lacked);
        self.inner
            .sync_states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(k, (state, start));
        let reply = SyncReply {
            message,
            open_chunk: rd.chunk,
            same_heads: false,
        };
        self.reply_when_durable(&room, g, reply).await
    }

    /// Whether `req` asks with the heads of a chunk sealed here and they are this
    /// node's heads of it (recorded, or read from the chunk once and recorded).
    fn same_sealed_heads(
        &self,
        room: &RoomId,
        rd: &mut RoomDoc,
        req: &SyncRequest,
    ) -> Result<bool, TimelineError> {
        if req.sealed_heads.is_empty() || req.chunk >= rd.chunk {
            return Ok(false);
        }
        let mut theirs = req
            .sealed_heads
            .iter()
            .map(|h| ChangeHash::try_from(h.as_slice()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TimelineError::Invalid {
                reason: format!("sealed chunk heads: {e}"),
            })?;
        theirs.sort_unstable();
        let ours = match self.inner.sealed_heads_of(room, req.chunk) {
            Some(heads) => heads,
            None => {
                let mut heads =
                    self.with_chunk(room, rd, req.chunk, false, None, |doc| Ok(doc.get_heads()))?;
                heads.sort_unstable();
                heads
            }
        };
        Ok(ours == theirs)
    }

    /// Returns `reply` once everything the room has pending is durable, waiting with
    /// the room's lock `g` released.
    async fn reply_when_durable(
        &self,
        room: &RoomId,
        mut g: tokio::sync::OwnedMutexGuard<Option<RoomDoc>>,
        reply: SyncReply,
    ) -> Result<SyncReply, TimelineError> {
        let rx = {
            let rd = self.load_locked(room, &mut g)?;
            if rd.pending.is_empty() {
                None
            } else {
                Some(self.wait_for_pending(room, rd, 1)?)
            }
        };
        drop(g);
        if let Some(rx) = rx {
            Self::wait_durable(rx).await?;
        }
        Ok(reply)
    }

    /// One anti-entropy exchange with `peer` over `room`: the open chunk, then every
    /// other chunk up to the later of both sides' open chunks, except sealed chunks
    /// already synced with this peer. Returns how many entries this side gained.
    pub async fn sync_with(&self, peer: u64, room: &RoomId) -> Result<usize, TimelineError> {
        let Some((_, _net)) = self.network() else {
            return Ok(0);
        };
        let started = std::time::Instant::now();
        let open = {
            let slot = self.slot(room);
            let mut g = slot.lock().await;
            self.load_locked(room, &mut g)?.chunk
        };
        let (mut gained, peer_open) = self.sync_chunk(peer, room, open).await?;
        let last = open.max(peer_open);
        for chunk in 0..=last {
            if chunk == open {
                continue;
            }
            let sealed_both = chunk < open.min(peer_open);
            let key = (peer, room.clone(), chunk);
            if sealed_both
                && self
                    .inner
                    .synced_sealed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&key)
            {
                continue;
            }
            let (n, _) = self.sync_chunk(peer, room, chunk).await?;
            gained += n;
            if sealed_both {
                self.inner
                    .synced_sealed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key);
            }
        }
        self.mark_synced(room, started);
        Ok(gained)
    }

    /// Records an exchange over `room` that started at `started` and completed.
    fn mark_synced(&self, room: &RoomId, started: std::time::Instant) {
        let mut map = self
            .inner
            .synced_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match map.get_mut(room) {
            Some((at, _)) if at.elapsed() < CAUGHT_UP_FOR => {
                if started > *at {
                    *at = started;
                }
            }
            _ => {
                let epoch = self
                    .inner
                    .sync_epochs
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                map.insert(room.clone(), (started, epoch));
            }
        }
    }

    /// `Some(epoch)` while this node is sure it holds every entry of `room` that was
    /// acknowledged with `W = 2` more than `CAUGHT_UP_FOR` plus a send's timeout ago:
    /// an exchange it started with another replica completed within `CAUGHT_UP_FOR`
    /// (or the room has no other replica). The epoch changes whenever the node gets
    /// caught up again after it was not (restart, partition, overload).
    pub fn caught_up(&self, room: &RoomId) -> Option<u64> {
        {
            let map = self
                .inner
                .synced_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some((at, epoch)) = map.get(room) {
                if at.elapsed() < CAUGHT_UP_FOR {
                    return Some(*epoch);
                }
            }
        }
        match self.network() {
            Some((_, net)) if !net.peers_of(room).is_empty() => None,
            _ => Some(0),
        }
    }

    /// Completes one exchange over `room` with the first peer that answers, unless this
    /// node is caught up in it already. Returns whether it is caught up now.
    pub async fn catch_up_room(&self, room: &RoomId) -> bool {
        if self.caught_up(room).is_some() {
            return true;
        }
        let Some((_, net)) = self.network() else {
            return true;
        };
        self.exchange_with_first(net.peers_of(room), room, &FailedPeers::default())
            .await
    }

    /// Rounds of the automerge sync protocol with `peer` over one chunk, until neither
    /// side has anything to send. Returns the entries gained and the peer's open chunk.
    async fn sync_chunk(
        &self,
        peer: u64,
        room: &RoomId,
        chunk: u32,
    ) -> Result<(usize, u32), TimelineError> {
        let Some((me, net)) = self.network() else {
            return Ok((0, 0));
        };
        let slot = self.slot(room);
        let mut gained = 0;
        let mut peer_open = 0;
        let mut state = automerge::sync::State::new();
        // The heads the peer started from, until what it lacked is known.
        let mut start: Option<Vec<ChangeHash>> = None;
        let mut started = false;
        for round in 0..SYNC_ROUNDS {
            let (msg, sealed_heads) = {
                let mut g = slot.lock().await;
                let rd = self.load_locked(room, &mut g)?;
                // A chunk sealed here whose heads are known: first ask whether the
                // peer's is the same, which needs no load of the chunk on either side.
                let known = if round == 0 && chunk < rd.chunk {
                    self.inner.sealed_heads_of(room, chunk)
                } else {
                    None
                };
                match known {
                    Some(heads) => (None, heads),
                    None => {
                        let before = rd.pending.len();
                        let m = self.with_chunk(room, rd, chunk, false, None, |doc| {
                            Ok(doc
                                .sync()
                                .generate_sync_message(&mut state)
                                .map(|m| m.encode()))
                        })?;
                        debug_assert_eq!(before, rd.pending.len());
                        (m, Vec::new())
                    }
                }
            };
            let sent = msg.is_some();
            let asked_heads = !sealed_heads.is_empty();
            let req = SyncRequest {
                room_id: room.to_string(),
                chunk,
                message: msg.unwrap_or_default(),
                from_node: me,
                first: round == 0,
                sealed_heads: sealed_heads.iter().map(|h| h.as_ref().to_vec()).collect(),
            };
            let reply = net.sync(peer, req).await.map_err(|e| {
                TimelineError::Storage(StoreError::Io(format!("sync with node {peer}: {e}")))
            })?;
            peer_open = reply.open_chunk;
            if asked_heads && reply.same_heads {
                super::ReplicationStats::inc(&self.inner.stats.sealed_same_heads);
                break;
            }
            if reply.message.is_empty() {
                if !sent {
                    break;
                }
                continue;
            }
            let rx = {
                let mut g = slot.lock().await;
                let rd = self.load_locked(room, &mut g)?;
                let msg = decode_sync(&reply.message, "sync reply")?;
                let had = rd.pending_events.len();
                let lacked = self.with_chunk(room, rd, chunk, false, None, |doc| {
                    doc.sync()
                        .receive_sync_message(&mut state, msg)
                        .map_err(|e| TimelineError::Invalid {
                            reason: format!("sync reply refused: {e}"),
                        })?;
                    if !started {
                        started = true;
                        start = state.their_heads.clone();
                    }
                    Ok(peer_lacked(room, doc, &mut start))
                })?;
                gained += rd.pending_events.len().saturating_sub(had);
                self.journal_late(room, rd, lacked);
                if rd.pending.is_empty() {
                    None
                } else {
                    Some(self.wait_for_pending(room, rd, 1)?)
                }
            };
            if let Some(rx) = rx {
                Self::wait_durable(rx).await?;
            }
        }
        Ok((gained, peer_open))
    }

    /// Anti-entropy until `stop`: every `every`, each room this node replicates is synced
    /// with each peer whose id is greater than this node's; where there is none, or the
    /// node is not caught up in the room, also with the first other peer that answers.
    /// Between rounds, every `CATCH_UP_RETRY`, rooms it is not caught up in are tried,
    /// and so is each peer that missed one of this node's pushes in a room since its last
    /// exchange there. Up to `ANTI_ENTROPY_ROOMS_AT_ONCE` rooms are worked on at a time.
    pub async fn anti_entropy(
        &self,
        every: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(CATCH_UP_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let full = tokio::select! {
                _ = tick.tick() => true,
                _ = retry.tick() => false,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Some((me, net)) = self.network() else {
                continue;
            };
            let round = std::time::Instant::now();
            let pass = self.anti_entropy_pass(me, net.as_ref(), full);
            tokio::select! {
                () = pass => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if full && round.elapsed() > every {
                tracing::warn!(
                    took_ms = round.elapsed().as_millis() as u64,
                    "an anti-entropy round took longer than its period"
                );
            }
        }
    }

    /// One pass of the anti-entropy loop over this node's rooms: a full round, or (between
    /// rounds) only the rooms this node is not caught up in and the peers it owes.
    async fn anti_entropy_pass(&self, me: u64, net: &dyn Network, full: bool) {
        use futures::StreamExt as _;
        // A peer whose exchange failed or timed out is skipped for the rest of this pass:
        // one cut-off peer must not cost a timeout per room (rounds of over a minute in
        // the fault runs), delaying every other room.
        let failed = FailedPeers::default();
        let prune_before = self
            .inner
            .hlc
            .latest_ms()
            .saturating_sub(LATE_RETAIN.as_millis() as u64);
        let failed = &failed;
        let rooms = net.local_rooms();
        let owed = &self.owed_by_room(&rooms);
        futures::stream::iter(rooms)
            .for_each_concurrent(ANTI_ENTROPY_ROOMS_AT_ONCE, |room| async move {
                if !full {
                    if self.caught_up(&room).is_none() {
                        self.exchange_with_first(net.peers_of(&room), &room, failed)
                            .await;
                    }
                    // The catch-up above may have settled a debt already.
                    for peer in owed.get(&room).into_iter().flatten() {
                        if self.owes(*peer, &room) {
                            self.anti_entropy_exchange(*peer, &room, failed).await;
                        }
                    }
                    return;
                }
                if let Err(e) = self.prune_late(&room, prune_before) {
                    tracing::warn!(room = %room, error = %e, "could not prune the late journal");
                }
                let peers = net.peers_of(&room);
                let mut done = false;
                for peer in peers.iter().copied().filter(|p| *p > me) {
                    done |= self.anti_entropy_exchange(peer, &room, failed).await;
                }
                // The greatest id, or a node behind: one more exchange, with a smaller id.
                if !done || self.caught_up(&room).is_none() {
                    let smaller = peers.iter().copied().filter(|p| *p < me);
                    self.exchange_with_first(smaller, &room, failed).await;
                }
            })
            .await;
    }

    /// The peers owed an exchange (a push of ours failed to reach them), by room, among
    /// `rooms`; entries of rooms this node no longer replicates are dropped.
    fn owed_by_room(&self, rooms: &[RoomId]) -> HashMap<RoomId, Vec<u64>> {
        let local: std::collections::HashSet<&RoomId> = rooms.iter().collect();
        let mut owed = self.inner.owed.lock().unwrap_or_else(|p| p.into_inner());
        owed.retain(|(_, room), _| local.contains(room));
        let mut by_room: HashMap<RoomId, Vec<u64>> = HashMap::new();
        for (peer, room) in owed.keys() {
            by_room.entry(room.clone()).or_default().push(*peer);
        }
        by_room
    }

    /// Whether this node still owes `peer` an exchange over `room`.
    fn owes(&self, peer: u64, room: &RoomId) -> bool {
        self.inner
            .owed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&(peer, room.clone()))
    }

    /// Exchanges over `room` with `peers` in turn until one completes; whether one did.
    async fn exchange_with_first(
        &self,
        peers: impl IntoIterator<Item = u64>,
        room: &RoomId,
        failed: &FailedPeers,
    ) -> bool {
        for peer in peers {
            if self.anti_entropy_exchange(peer, room, failed).await {
                return true;
            }
        }
        false
    }

    /// One exchange of the anti-entropy loop, bounded by [`EXCHANGE_TIMEOUT`]; whether it
    /// completed. Skips peers in `failed` and adds `peer` there when it fails.
    async fn anti_entropy_exchange(&self, peer: u64, room: &RoomId, failed: &FailedPeers) -> bool {
        let failed = || failed.lock().unwrap_or_else(|p| p.into_inner());
        if failed().contains(&peer) {
            return false;
        }
        let fail = || {
            failed().insert(peer);
        };
        let started = std::time::Instant::now();
        let stats = &self.inner.stats;
        let outcome = tokio::time::timeout(EXCHANGE_TIMEOUT, self.sync_with(peer, room)).await;
        ReplicationStats::inc(match outcome {
            Ok(Ok(_)) => &stats.exchanges_completed,
            _ => &stats.exchanges_failed,
        });
        match outcome {
            Ok(Ok(n)) => {
                stats
                    .exchange_entries_gained
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                if n > 0 {
                    tracing::info!(room = %room, peer, entries = n, "anti-entropy caught up");
                }
                // The peer now holds every push that failed before this exchange began.
                let key = (peer, room.clone());
                let mut owed = self.inner.owed.lock().unwrap_or_else(|p| p.into_inner());
                if owed.get(&key).is_some_and(|at| *at <= started) {
                    owed.remove(&key);
                }
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(room = %room, peer, error = %e, "anti-entropy exchange failed");
                fail();
                false
            }
            Err(_) => {
                tracing::debug!(room = %room, peer, "anti-entropy exchange timed out");
                fail();
                false
            }
        }
    }
}

/// The message an edit, delete or reaction entry changes.
fn amendment_target(kind: &timeline_entry::Kind) -> Option<MessageId> {
    let t = match kind {
        timeline_entry::Kind::Edit(e) => &e.target,
        timeline_entry::Kind::Delete(d) => &d.target,
        timeline_entry::Kind::Reaction(r) => &r.target,
        timeline_entry::Kind::Message(_) => return None,
    };
    t.parse().ok()
}
