//! Room timelines: automerge chunk documents, the history index, and the commit
//! pipeline that makes a write durable before it is acknowledged or delivered.
//!
//! A room's timeline is a sequence of chunks. A chunk is one automerge document whose
//! root map holds one entry per timeline entry: key = the entry's [`MessageId`] (32 hex
//! digits), value = the protobuf bytes of a `TimelineEntry` (message, edit, delete or
//! reaction). The open chunk lives in memory; when it holds `max_entries` entries or
//! `max_bytes` bytes it is sealed (saved whole) and leaves memory.
//!
//! Keys in the `timeline` tree (a room id is always 19 bytes, ids 16, so keys need no
//! separators; one tree so that a write and its index entries are one atomic batch):
//! - `h room` -> open chunk number (u32 BE)
//! - `s room chunk` -> the chunk saved whole (compacted or sealed)
//! - `c room chunk seq` -> an incremental automerge change not yet compacted
//! - `e room id` -> the entry's protobuf bytes (resume/replay index)
//! - `m room id` -> the current state of a message amended at least once, a
//!   `parley.v1.Message`; a message never amended has no `m` record, its `e` record is
//!   its state (history reads `e` and puts `m` records over it)
//! - `k room sender 0 client_msg_id` -> the message id (idempotent retries)
//! - `a room target id` -> an amendment (edit, delete, reaction) of message `target`;
//!   a message's `m` record is rebuilt from its own entry and these, in id order, so
//!   replicas that received entries in different orders agree
//! - `l room stamp id` -> empty: entry `id` reached this node or a peer (through this
//!   node) late, when this node's clock read `stamp` (ms, u64 BE); see `late_since`
//!
//! To stay correct:
//! - Writes to a room are serialized by the room's lock; ids are assigned, written and
//!   queued to the commit pipeline under it, so the pipeline sees each room's entries in
//!   id order and publishes them in that order.
//! - A write is acknowledged (and delivered) only after `Db::flush` returned after it.
//! - Reads never show an entry above the room's durable watermark, so nothing a reader
//!   saw can vanish in a crash.
//! - The index is derived from the documents and written in the same batch; it is never
//!   the source of truth for replication.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ChangeHash, ReadDoc, ScalarValue, ROOT};
use parley_proto::v1::{
    event, timeline_entry, DeleteEntry, EditEntry, Event, Message, MessageDeleted, MessageEdited,
    Reaction, ReactionChanged, ReactionEntry, TimelineEntry,
};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

use crate::clock::Hlc;
use crate::delivery::Hub;
use crate::ids::{MessageId, RoomId, UserId};
use crate::store::{Batch, Db, StoreError, Tree};

/// Why a timeline operation was refused or failed. Nothing was written in any case.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TimelineError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{reason}")]
    PermissionDenied { reason: String },
    #[error("{reason}")]
    Precondition { reason: String },
    #[error("{reason}")]
    Invalid { reason: String },
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// Durable on `have` replicas, fewer than the `need` the room asks for; the entry
    /// may still reach the others (anti-entropy) and appear later.
    #[error(
        "written on {have} of the {need} replicas the room needs before the deadline; it may still appear"
    )]
    Quorum { need: u8, have: u8 },
}

/// How long a write waits for the other replicas' durable acknowledgements.
pub const QUORUM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Chunk size limits (DESIGN §2: at most ~10,000 messages or ~4 MiB). The default
/// seals at 1,000 entries: automerge merges a peer's change into a map by walking
/// every entry of it (`BatchApply` in automerge 0.12), so what a replica pays per push
/// grows with the open chunk, and open chunks are what a node holds in memory.
#[derive(Debug, Clone, Copy)]
pub struct ChunkLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
    /// Incremental changes kept before the open chunk is compacted into one save.
    pub compact_every: usize,
    /// Under load, how long a commit round waits for more writes before it persists and
    /// flushes (zero, the default: never). A round lingers only after one of at least
    /// [`LINGER_AFTER_ROUND`] writes, so a lone write is not delayed. Off by default: on
    /// the dev machine a linger of 3–6 ms cut CPU per message by 5–19 % at full load, and
    /// 3 ms raised ack p99 at half load from 47 to 75 ms (BENCHMARKS §3).
    pub commit_linger: std::time::Duration,
}

/// Rounds of fewer writes than this are not followed by a linger (see
/// [`ChunkLimits::commit_linger`]).
pub const LINGER_AFTER_ROUND: usize = 4;

impl Default for ChunkLimits {
    fn default() -> Self {
        Self {
            max_entries: 1_000,
            max_bytes: 4 * 1024 * 1024,
            compact_every: 2_000,
            commit_linger: std::time::Duration::ZERO,
        }
    }
}

/// A new message to append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub room: RoomId,
    pub sender: UserId,
    pub text: String,
    /// Empty: no idempotency key.
    pub client_msg_id: String,
    /// The last id the client saw; the new id sorts after it.
    pub after: Option<MessageId>,
    /// Replicas (this one included) that must hold the message durably before the ack.
    pub write_quorum: u8,
    /// The writer's fence, pushed with the change (`None`: an unfenced write).
    pub fence: Option<Fence>,
}

/// What the writer knew of the room's partition when it checked the author: the Raft
/// group and its term (see `PushChangesRequest` in cluster.proto). Opaque to this layer:
/// it travels with the write's change to the other replicas, which judge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub group: u32,
    pub term: u64,
}

impl Fence {
    /// The fence of a change holding entries written under `a` and `b`: the older term,
    /// so a replica that knows a newer one refuses the whole change.
    pub fn merge(a: Option<Fence>, b: Option<Fence>) -> Option<Fence> {
        match (a, b) {
            (Some(x), Some(y)) => Some(if y.term < x.term { y } else { x }),
            (x, None) | (None, x) => x,
        }
    }
}

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub id: MessageId,
    pub sent_at: u64,
    /// The client message id matched an earlier send; nothing new was written.
    pub duplicate: bool,
}

/// A history page request. At most one of `before`, `after`, `since` is used, in that order.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub limit: usize,
    pub before: Option<MessageId>,
    pub after: Option<MessageId>,
    pub since_ms: Option<u64>,
}

pub(super) struct RoomDoc {
    pub(super) chunk: u32,
    pub(super) doc: AutoCommit,
    pub(super) entries: usize,
    pub(super) bytes: usize,
    pub(super) next_seq: u64,
    pub(super) since_compact: usize,
    /// Index writes of entries already in `doc` but not yet in the store; the commit
    /// pipeline writes them together with the automerge change that holds the entries.
    pub(super) pending: Vec<(Vec<u8>, Vec<u8>)>,
    /// Events of those entries, in id order, published once they are durable.
    pub(super) pending_events: Vec<(MessageId, Arc<Event>)>,
    /// Writers waiting for those entries (and barrier waiters, see `wait_for_pending`).
    pub(super) pending_waiters: Vec<Waiter>,
    /// Entries written on this node since the last persist: only a room's writer seals
    /// its chunks and pushes its changes; replicas follow.
    pub(super) local_pending: usize,
    /// Authors of those entries and the writers' merged fence, pushed with their change.
    pub(super) pending_authors: std::collections::BTreeSet<String>,
    pub(super) pending_fence: Option<Fence>,
    /// The open chunk's heads when its changes were last stored: the next round stores
    /// (and, for local entries, pushes) what the chunk gained since.
    pub(super) saved_heads: Vec<ChangeHash>,
    /// Changes peers pushed, as they encoded them, that are everything the open chunk
    /// gained since `saved_heads`, and the heads they brought it to. The next round
    /// stores these bytes as they are, instead of automerge finding and encoding the
    /// new changes again (which walks the whole chunk). `None` once anything else (a
    /// local write, an anti-entropy exchange) changed the chunk: the round then asks
    /// automerge.
    pub(super) unsaved: Option<(Vec<ChangeHash>, Vec<u8>)>,
}

/// A writer waiting for its entry to be durable on `quorum` replicas (this one included).
pub(super) struct Waiter {
    pub(super) quorum: u8,
    pub(super) done: oneshot::Sender<Result<(), TimelineError>>,
}

impl RoomDoc {
    /// `doc` as the store holds it: nothing in it is waiting to be stored.
    fn new(
        chunk: u32,
        mut doc: AutoCommit,
        entries: usize,
        bytes: usize,
        next_seq: u64,
        since_compact: usize,
    ) -> Self {
        let saved_heads = doc.get_heads();
        let mut rd = Self {
            saved_heads: Vec::new(),
            unsaved: None,
            chunk,
            doc,
            entries,
            bytes,
            next_seq,
            since_compact,
            pending: Vec::new(),
            pending_events: Vec::new(),
            pending_waiters: Vec::new(),
            local_pending: 0,
            pending_authors: std::collections::BTreeSet::new(),
            pending_fence: None,
        };
        rd.stored_at(saved_heads);
        rd
    }

    /// Everything the open chunk holds up to `heads` is in the store: the next round
    /// stores what it gains after them, which no push has brought yet.
    fn stored_at(&mut self, heads: Vec<ChangeHash>) {
        self.unsaved = Some((heads.clone(), Vec::new()));
        self.saved_heads = heads;
    }

    /// Pairs whose key starts with `prefix`: the store's, overridden by pending writes.
    pub(super) fn scan_through(
        &self,
        tree: &Tree,
        prefix: &[u8],
    ) -> Result<std::collections::BTreeMap<Vec<u8>, Vec<u8>>, StoreError> {
        let mut out: std::collections::BTreeMap<_, _> =
            tree.scan_prefix(prefix)?.into_iter().collect();
        for (k, v) in &self.pending {
            if k.starts_with(prefix) {
                out.insert(k.clone(), v.clone());
            }
        }
        Ok(out)
    }

    /// Whether any key starts with `prefix`, pending writes included. Cheaper than
    /// [`Self::scan_through`] when the answer is almost always no: nothing is copied.
    pub(super) fn any_through(&self, tree: &Tree, prefix: &[u8]) -> Result<bool, StoreError> {
        if self.pending.iter().any(|(k, _)| k.starts_with(prefix)) {
            return Ok(true);
        }
        Ok(tree.first_with_prefix(prefix)?.is_some())
    }

    /// The latest value of `key`: a pending write, else the store's.
    pub(super) fn read_through(
        &self,
        tree: &Tree,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        match self.pending.iter().rev().find(|(k, _)| k.as_slice() == key) {
            Some((_, v)) => Ok(Some(v.clone())),
            None => tree.get(key),
        }
    }
}

/// A write waiting for the flush: the room to persist and the writer to answer.
pub(super) struct Commit {
    slot: RoomSlot,
    room: RoomId,
}

/// A peer's exchange over one chunk as this node answers it: the sync state, and the
/// heads the peer started from until this node has worked out what the peer lacked
/// (`None` after; see `remote::peer_lacked`).
pub(super) type PeerSync = (automerge::sync::State, Option<Vec<ChangeHash>>);

pub(super) type RoomSlot = Arc<tokio::sync::Mutex<Option<RoomDoc>>>;

pub(super) struct Inner {
    pub(super) db: Db,
    pub(super) tree: Tree,
    pub(super) hlc: Arc<Hlc>,
    pub(super) hub: Hub,
    pub(super) limits: ChunkLimits,
    pub(super) rooms: Mutex<HashMap<RoomId, RoomSlot>>,
    pub(super) commit_tx: mpsc::UnboundedSender<Commit>,
    /// Set once the node knows its peers (`set_network`); `None` on a lone node.
    pub(super) network: Mutex<Option<(u64, Arc<dyn super::Network>)>>,
    /// One sequential pusher per room, so each peer receives a room's changes in order.
    pub(super) pushers: Mutex<HashMap<RoomId, mpsc::UnboundedSender<super::remote::PushItem>>>,
    /// automerge sync state per (peer, room, chunk) of exchanges peers started.
    pub(super) sync_states: Mutex<HashMap<(u64, RoomId, u32), PeerSync>>,
    /// Sealed chunks (peer, room, chunk) already synced with a peer since start.
    pub(super) synced_sealed: Mutex<std::collections::HashSet<(u64, RoomId, u32)>>,
    /// Heads of sealed chunks, as saved: recorded when a chunk seals and whenever a
    /// sealed chunk is loaded or changed, so that an anti-entropy exchange over a
    /// sealed chunk both sides hold whole needs no load of it (see `Timelines::sync_chunk`).
    pub(super) sealed_heads: Mutex<HashMap<(RoomId, u32), Vec<ChangeHash>>>,
    /// Per room: when the newest anti-entropy exchange this node completed with another
    /// replica started, and the catch-up epoch it belongs to (see `Timelines::caught_up`).
    pub(super) synced_at: Mutex<HashMap<RoomId, (std::time::Instant, u64)>>,
    /// The last catch-up epoch handed out.
    pub(super) sync_epochs: std::sync::atomic::AtomicU64,
    /// Peers that missed a push of this node's, by (peer, room), with when the push
    /// failed: the anti-entropy loop starts an exchange with each within a second,
    /// instead of waiting for a full round (see `Timelines::anti_entropy`).
    pub(super) owed: Arc<super::remote::Owed>,
    pub(super) stats: Arc<super::ReplicationStats>,
}

impl Inner {
    /// Records the heads of `room`'s sealed `chunk` as it is saved (sorted, so that two
    /// nodes' lists compare equal when they hold the same changes).
    pub(super) fn note_sealed_heads(&self, room: &RoomId, chunk: u32, mut heads: Vec<ChangeHash>) {
        heads.sort_unstable();
        self.sealed_heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((room.clone(), chunk), heads);
    }

    /// The recorded heads of `room`'s sealed `chunk`, sorted.
    pub(super) fn sealed_heads_of(&self, room: &RoomId, chunk: u32) -> Option<Vec<ChangeHash>> {
        self.sealed_heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(room.clone(), chunk))
            .cloned()
    }

    /// Forgets the recorded heads of `room`'s sealed chunks: the room is gone, or a
    /// failed write left memory ahead of the store.
    pub(super) fn forget_sealed_heads(&self, room: &RoomId) {
        self.sealed_heads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(r, _), _| r != room);
    }
}

/// The timelines of every room this node replicates. Cheap to clone.
#[derive(Clone)]
pub struct Timelines {
    pub(super) inner: Arc<Inner>,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Timelines>();
};

pub(super) fn key(tag: u8, room: &RoomId, rest: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 19 + rest.iter().map(|r| r.len()).sum::<usize>());
    k.push(tag);
    k.extend_from_slice(room.as_str().as_bytes());
    for r in rest {
        k.extend_from_slice(r);
    }
    k
}

/// The `k` key of a sender's idempotency key in a room.
pub(super) fn client_key(room: &RoomId, sender: &str, client_msg_id: &str) -> Vec<u8> {
    let mut rest = sender.as_bytes().to_vec();
    rest.push(0);
    rest.extend_from_slice(client_msg_id.as_bytes());
    key(b'k', room, &[&rest])
}

/// Loads incremental saves (each a run of change chunks) into `doc`, in order: all of
/// them, or nothing and an error. Every chunk is parsed and its checksum checked before
/// anything is applied: automerge's `load_incremental` applies the chunks before a
/// damaged one and still returns Ok, so a truncated or garbled push would be answered
/// as durable with some of its entries missing. One apply for all of them: automerge
/// applies changes as one batch, and a batch walks the chunk's map once.
pub(super) fn load_changes(doc: &mut AutoCommit, saves: &[Vec<u8>]) -> Result<(), String> {
    let mut changes = Vec::new();
    for save in saves {
        match parse_change_run(save)? {
            Some(parsed) => changes.extend(parsed),
            // A whole document or a bundle among them: the general path.
            None => {
                let data = saves.concat();
                check_in_scratch(&data)?;
                return doc
                    .load_incremental(&data)
                    .map(drop)
                    .map_err(|e| e.to_string());
            }
        }
    }
    if changes.is_empty() {
        return Ok(());
    }
    doc.apply_changes(changes).map_err(|e| e.to_string())
}

/// Whether `data`, a run of automerge chunks of any kind, parses whole, checksums
/// included. For runs that may hold more than changes: sync messages, whose receipt
/// applies them with `load_incremental` too. A run of changes only (the usual case) is
/// checked change by change ([`parse_change_run`]); anything else is loaded into a
/// scratch document, where changes waiting for dependencies it lacks are expected and
/// fine. Not the scratch document for changes: automerge's loader logs an ERROR for
/// every run whose dependencies it lacks, which is every incremental one, so each
/// anti-entropy message logged a false error (5,352 lines in a minute of heavy load).
pub(super) fn check_changes(data: &[u8]) -> Result<(), String> {
    if parse_change_run(data)?.is_some() {
        return Ok(());
    }
    check_in_scratch(data)
}

/// Whether `data` parses whole into a scratch document (see [`check_changes`]); for
/// runs known to hold more than changes.
fn check_in_scratch(data: &[u8]) -> Result<(), String> {
    let strict = automerge::LoadOptions::new().on_partial_load(automerge::OnPartialLoad::Error);
    match automerge::Automerge::load_with_options(data, strict) {
        Ok(_) | Err(automerge::AutomergeError::MissingDeps) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// The first bytes of every automerge chunk.
const CHUNK_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];

/// Parses `data`, a run of automerge chunks, into its changes, each whole and with the
/// checksum its header carries; an error names the first chunk that is not. `None` when
/// the run holds a chunk other than a change (a document or a bundle), which the caller
/// hands to automerge's general loader instead. Cheaper than [`check_changes`] followed
/// by `load_incremental`: it parses each change once and builds no scratch document.
fn parse_change_run(data: &[u8]) -> Result<Option<Vec<automerge::Change>>, String> {
    let mut changes = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = changes.len();
        // Magic (4 bytes), checksum (4), chunk type (1), data length (LEB128, as
        // protobuf's varints), data.
        let (Some(magic), Some(checksum), Some(&kind)) =
            (rest.get(..4), rest.get(4..8), rest.get(8))
        else {
            return Err(format!("chunk {n}: truncated header"));
        };
        if magic != CHUNK_MAGIC {
            return Err(format!("chunk {n}: not an automerge chunk"));
        }
        let mut after_len = &rest[9..];
        let len = prost::encoding::decode_varint(&mut after_len)
            .map_err(|e| format!("chunk {n}: bad length: {e}"))?;
        let leb = rest.len() - 9 - after_len.len();
        let total = usize::try_from(len)
            .ok()
            .and_then(|len| len.checked_add(9 + leb))
            .filter(|t| *t <= rest.len())
            .ok_or_else(|| format!("chunk {n}: truncated ({len} bytes of data announced)"))?;
        // 1: a change; 2: a compressed change. Anything else goes the general way.
        if kind != 1 && kind != 2 {
            return Ok(None);
        }
        let (chunk, tail) = rest.split_at(total);
        let change = automerge::Change::try_from(chunk).map_err(|e| format!("chunk {n}: {e}"))?;
        // The header's checksum is the first 4 bytes of the (uncompressed) change's hash.
        if change.hash().0.get(..4) != Some(checksum) {
            return Err(format!("chunk {n}: checksum mismatch"));
        }
        changes.push(change);
        rest = tail;
    }
    Ok(Some(changes))
}

fn id_from_key(k: &[u8]) -> Option<MessageId> {
    k.len()
        .checked_sub(16)
        .and_then(|s| MessageId::from_bytes(&k[s..]).ok())
}

impl Timelines {
    /// Opens the timeline store and starts the commit pipeline. Needs a tokio runtime.
    pub fn open(db: &Db, hlc: Arc<Hlc>, hub: Hub, limits: ChunkLimits) -> Result<Self, StoreError> {
        let (commit_tx, commit_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            db: db.clone(),
            tree: db.tree("timeline")?,
            hlc,
            hub: hub.clone(),
            limits,
            rooms: Mutex::new(HashMap::new()),
            commit_tx,
            network: Mutex::new(None),
            pushers: Mutex::new(HashMap::new()),
            sync_states: Mutex::new(HashMap::new()),
            synced_sealed: Mutex::new(std::collections::HashSet::new()),
            sealed_heads: Mutex::new(HashMap::new()),
            synced_at: Mutex::new(HashMap::new()),
            sync_epochs: std::sync::atomic::AtomicU64::new(0),
            owed: Arc::default(),
            stats: Arc::default(),
        });
        tokio::spawn(commit_pipeline(
            Arc::downgrade(&inner),
            commit_rx,
            limits.commit_linger,
        ));
        Ok(Self { inner })
    }

    pub(super) fn slot(&self, room: &RoomId) -> RoomSlot {
        let mut rooms = self.inner.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.entry(room.clone()).or_default().clone()
    }

    /// Makes sure the room's open chunk is in memory and its channel registered with the
    /// hub (with the watermark read from disk), so subscribers can attach.
    pub async fn ensure_loaded(&self, room: &RoomId) -> Result<(), TimelineError> {
        if self.inner.hub.is_registered(room) {
            return Ok(());
        }
        let slot = self.slot(room);
        let mut g = slot.lock().await;
        self.load_locked(room, &mut g)?;
        Ok(())
    }

    pub(super) fn load_locked<'a>(
        &self,
        room: &RoomId,
        g: &'a mut Option<RoomDoc>,
    ) -> Result<&'a mut RoomDoc, TimelineError> {
        if g.is_none() {
            *g = Some(blocking(|| self.load(room))?);
        }
        g.as_mut().ok_or(TimelineError::Storage(StoreError::Closed))
    }

    fn load(&self, room: &RoomId) -> Result<RoomDoc, TimelineError> {
        let t = &self.inner.tree;
        let chunk = match t.get(key(b'h', room, &[]))? {
            Some(v) => {
                let b: [u8; 4] = v
                    .as_slice()
                    .try_into()
                    .map_err(|_| t.corrupt("chunk number"))?;
                u32::from_be_bytes(b)
            }
            None => 0,
        };
        let cb = chunk.to_be_bytes();
        let mut bytes = 0;
        let mut doc = match t.get(key(b's', room, &[&cb]))? {
            Some(full) => {
                bytes += full.len();
                AutoCommit::load(&full)
                    .map_err(|e| t.corrupt(format!("chunk {chunk} of {room}: {e}")))?
            }
            None => AutoCommit::new(),
        };
        let mut next_seq = 0;
        let mut changes = Vec::new();
        for (k, change) in t.scan_prefix(key(b'c', room, &[&cb]))? {
            bytes += change.len();
            changes.push(change);
            if let Some(seq) = k.len().checked_sub(8).and_then(|s| k[s..].try_into().ok()) {
                next_seq = u64::from_be_bytes(seq) + 1;
            }
        }
        let since_compact = changes.len();
        load_changes(&mut doc, &changes)
            .map_err(|e| t.corrupt(format!("changes of {room}: {e}")))?;
        // A fresh actor per load: a crash may have lost changes of the previous actor
        // whose sequence numbers must never be reused for different changes.
        doc.set_actor(automerge::ActorId::random());
        let entries = doc.length(ROOT);
        let durable = t
            .last_with_prefix(key(b'e', room, &[]))?
            .and_then(|(k, _)| id_from_key(&k))
            .unwrap_or(MessageId::MIN);
        self.inner.hlc.observe(durable);
        self.inner.hub.register(room, durable);
        Ok(RoomDoc::new(
            chunk,
            doc,
            entries,
            bytes,
            next_seq,
            since_compact,
        ))
    }

    /// Puts one entry into the open chunk and queues it, with its index `writes`, for the
    /// commit pipeline. Called with the room lock held. Returns the receiver that resolves
    /// once the entry is durable on `quorum` replicas (this one included) and published.
    #[allow(clippy::too_many_arguments)]
    fn commit_entry(
        &self,
        room: &RoomId,
        rd: &mut RoomDoc,
        id: MessageId,
        entry: &TimelineEntry,
        writes: Vec<(Vec<u8>, Vec<u8>)>,
        event: Event,
        quorum: u8,
        fence: Option<Fence>,
    ) -> Result<oneshot::Receiver<Result<(), TimelineError>>, TimelineError> {
        let bytes = entry.encode_to_vec();
        rd.unsaved = None;
        rd.doc
            .put(ROOT, id.chunk_key(), ScalarValue::Bytes(bytes.clone()))
            .map_err(|e| TimelineError::Storage(StoreError::Io(format!("automerge put: {e}"))))?;
        rd.pending.push((key(b'e', room, &[&id.to_bytes()]), bytes));
        rd.pending.extend(writes);
        rd.pending_events.push((id, Arc::new(event)));
        rd.entries += 1;
        rd.local_pending += 1;
        if let Some(a) = entry.kind.as_ref().map(author) {
            rd.pending_authors.insert(a.to_owned());
        }
        rd.pending_fence = Fence::merge(rd.pending_fence, fence);
        self.wait_for_pending(room, rd, quorum)
    }

    /// A receiver that resolves once everything pending for `room` now is durable here
    /// (and on `quorum` replicas in all). Called with the room lock held.
    pub(super) fn wait_for_pending(
        &self,
        room: &RoomId,
        rd: &mut RoomDoc,
        quorum: u8,
    ) -> Result<oneshot::Receiver<Result<(), TimelineError>>, TimelineError> {
        let (done, rx) = oneshot::channel();
        rd.pending_waiters.push(Waiter { quorum, done });
        let commit = Commit {
            slot: self.slot(room),
            room: room.clone(),
        };
        self.inner
            .commit_tx
            .send(commit)
            .map_err(|_| TimelineError::Storage(StoreError::Closed))?;
        Ok(rx)
    }

    pub(super) async fn wait_durable(
        rx: oneshot::Receiver<Result<(), TimelineError>>,
    ) -> Result<(), TimelineError> {
        rx.await
            .map_err(|_| TimelineError::Storage(StoreError::Closed))?
    }

    /// Waits for a write made here to be durable on its quorum; counts a write that
    /// fell short.
    async fn acknowledged(
        &self,
        rx: oneshot::Receiver<Result<(), TimelineError>>,
    ) -> Result<(), TimelineError> {
        let r = Self::wait_durable(rx).await;
        if let Err(TimelineError::Quorum { .. }) = r {
            super::ReplicationStats::inc(&self.inner.stats.writes_short_of_quorum);
        }
        r
    }

    /// Appends a message; returns once it is durable. A retry with the same
    /// `client_msg_id` from the same sender returns the first id with `duplicate`.
    pub async fn send(&self, m: NewMessage) -> Result<Appended, TimelineError> {
        let started = std::time::Instant::now();
        let slot = self.slot(&m.room);
        let rx = {
            let mut g = slot.lock().await;
            let rd = self.load_locked(&m.room, &mut g)?;
            let k_key = (!m.client_msg_id.is_empty())
                .then(|| client_key(&m.room, m.sender.as_str(), &m.client_msg_id));
            if let Some(kk) = &k_key {
                if let Some(v) = rd.read_through(&self.inner.tree, kk)? {
                    let id = MessageId::from_bytes(&v)
                        .map_err(|e| self.inner.tree.corrupt(e.to_string()))?;
                    // The first send may still be pending: answer once the pipeline has
                    // made everything queued for this room so far durable.
                    let rx = self.wait_for_pending(&m.room, rd, 1)?;
                    drop(g);
                    Self::wait_durable(rx).await?;
                    return Ok(Appended {
                        id,
                        sent_at: id.physical_ms(),
                        duplicate: true,
                    });
                }
            }
            let id = self.inner.hlc.next(m.after);
            let msg = Message {
                id: id.to_string(),
                room_id: m.room.to_string(),
                sender: m.sender.to_string(),
                text: m.text,
                sent_at: id.physical_ms() as i64,
                client_msg_id: m.client_msg_id,
                ..Default::default()
            };
            // No `m` record: until it is amended, the message's state is its entry.
            let writes: Vec<_> = k_key
                .map(|kk| (kk, id.to_bytes().to_vec()))
                .into_iter()
                .collect();
            let entry = TimelineEntry {
                kind: Some(timeline_entry::Kind::Message(msg.clone())),
            };
            let event = Event {
                cursor: String::new(),
                kind: Some(event::Kind::Message(msg)),
            };
            let quorum = m.write_quorum;
            let rx = self.commit_entry(&m.room, rd, id, &entry, writes, event, quorum, m.fence)?;
            (rx, id)
        };
        let (rx, id) = rx;
        self.acknowledged(rx).await?;
        self.inner.stats.write_ack.observe(started.elapsed());
        Ok(Appended {
            id,
            sent_at: id.physical_ms(),
            duplicate: false,
        })
    }

    fn read_message(&self, room: &RoomId, id: MessageId) -> Result<Option<Message>, TimelineError> {
        let t = &self.inner.tree;
        Ok(message_state(t, room, id, |k| t.get(k))?)
    }

    /// Looks up one message (above-watermark entries are invisible).
    pub fn get_message(
        &self,
        room: &RoomId,
        id: MessageId,
    ) -> Result<Option<Message>, TimelineError> {
        if self.inner.hub.watermark(room).is_some_and(|w| id > w) {
            return Ok(None);
        }
        self.read_message(room, id)
    }

    /// Writes an entry that changes an existing message: `change` checks the target and
    /// returns the entry, the target's new state and the event; nothing is written if it
    /// refuses.
    async fn amend(
        &self,
        room: &RoomId,
        target: MessageId,
        quorum: u8,
        fence: Option<Fence>,
        check: impl FnOnce(&Message, MessageId) -> Result<timeline_entry::Kind, TimelineError>,
    ) -> Result<Appended, TimelineError> {
        let slot = self.slot(room);
        let (rx, id) = {
            let mut g = slot.lock().await;
            let rd = self.load_locked(room, &mut g)?;
            let t = &self.inner.tree;
            // Pending writes included: the lock is held, the pipeline may not have run.
            let Some(msg) = message_state(t, room, target, |k| rd.read_through(t, k))? else {
                return Err(TimelineError::NotFound {
                    what: format!("message {target}"),
                });
            };
            let id = self.inner.hlc.next(Some(target));
            let entry = TimelineEntry {
                kind: Some(check(&msg, id)?),
            };
            let amendment = entry.encode_to_vec();
            // The new entry has the greatest id this node knows (the clock observed every
            // entry it indexed), so it applies last.
            let mut current = rebuild_message(t, rd, room, target)?.unwrap_or(msg);
            if let Some(kind) = &entry.kind {
                apply_amendment(&mut current, kind);
            }
            let writes = vec![
                (
                    key(b'a', room, &[&target.to_bytes(), &id.to_bytes()]),
                    amendment,
                ),
                (
                    key(b'm', room, &[&target.to_bytes()]),
                    current.encode_to_vec(),
                ),
            ];
            let event = entry_event(room, entry.clone()).ok_or_else(|| TimelineError::Invalid {
                reason: "an amendment without content".into(),
            })?;
            (
                self.commit_entry(room, rd, id, &entry, writes, event, quorum, fence)?,
                id,
            )
        };
        self.acknowledged(rx).await?;
        Ok(Appended {
            id,
            sent_at: id.physical_ms(),
            duplicate: false,
        })
    }

    /// Edits the editor's own message (last writer wins by entry id).
    pub async fn edit(
        &self,
        room: &RoomId,
        editor: &UserId,
        target: MessageId,
        text: String,
        quorum: u8,
        fence: Option<Fence>,
    ) -> Result<Appended, TimelineError> {
        self.amend(room, target, quorum, fence, |msg, id| {
            if msg.sender != editor.as_str() {
                return Err(TimelineError::PermissionDenied {
                    reason: "you can only edit your own messages".into(),
                });
            }
            if msg.deleted {
                return Err(TimelineError::Precondition {
                    reason: format!("message {target} is deleted"),
                });
            }
            Ok(timeline_entry::Kind::Edit(EditEntry {
                target: target.to_string(),
                text,
                editor: editor.to_string(),
                at: id.physical_ms() as i64,
            }))
        })
        .await
    }

    /// Deletes a message (its author, or a room admin): a tombstone; the text is dropped
    /// from the history index.
    pub async fn delete(
        &self,
        room: &RoomId,
        by: &UserId,
        is_admin: bool,
        target: MessageId,
        quorum: u8,
        fence: Option<Fence>,
    ) -> Result<Appended, TimelineError> {
        self.amend(room, target, quorum, fence, |msg, id| {
            if msg.sender != by.as_str() && !is_admin {
                return Err(TimelineError::PermissionDenied {
                    reason: "only the author or a room admin can delete a message".into(),
                });
            }
            if msg.deleted {
                return Err(TimelineError::Precondition {
                    reason: format!("message {target} is already deleted"),
                });
            }
            Ok(timeline_entry::Kind::Delete(DeleteEntry {
                target: target.to_string(),
                by: by.to_string(),
                at: id.physical_ms() as i64,
            }))
        })
        .await
    }

    /// Adds or removes the user's reaction to a message.
    #[allow(clippy::too_many_arguments)]
    pub async fn react(
        &self,
        room: &RoomId,
        user: &UserId,
        target: MessageId,
        emoji: String,
        remove: bool,
        quorum: u8,
        fence: Option<Fence>,
    ) -> Result<Appended, TimelineError> {
        self.amend(room, target, quorum, fence, |msg, id| {
            if msg.deleted {
                return Err(TimelineError::Precondition {
                    reason: format!("message {target} is deleted"),
                });
            }
            Ok(timeline_entry::Kind::Reaction(ReactionEntry {
                target: target.to_string(),
                user: user.to_string(),
                emoji,
                remove,
                at: id.physical_ms() as i64,
            }))
        })
        .await
    }

    fn upper(&self, room: &RoomId) -> MessageId {
        self.inner
            .hub
            .watermark(room)
            .unwrap_or(MessageId(u128::MAX))
    }

    /// A page of history, oldest first, and whether more exist in the direction asked.
    /// Walks the room's entries (`e`), keeping messages, then puts the current state of
    /// those amended since (`m`) in their place.
    pub fn history(
        &self,
        room: &RoomId,
        q: &HistoryQuery,
    ) -> Result<(Vec<Message>, bool), TimelineError> {
        let t = &self.inner.tree;
        let limit = q.limit.clamp(1, 1000);
        let upper = self.upper(room);
        let hi = key(b'e', room, &[&upper.to_bytes()]);
        let lo_all = key(b'e', room, &[]);
        let keep = |k: &[u8], v: &[u8]| -> Result<Option<(MessageId, Message)>, StoreError> {
            let id = id_from_key(k).ok_or_else(|| t.corrupt("entry key"))?;
            Ok(entry_message(t, id, v)?.map(|m| (id, m)))
        };
        let rows = if let Some(before) = q.before {
            let end = key(
                b'e',
                room,
                &[&before.min(MessageId(upper.0.saturating_add(1))).to_bytes()],
            );
            let mut rows = t.range_map(lo_all..end, true, limit + 1, keep)?;
            rows.reverse();
            rows
        } else if let Some(after) = q.after.or(q
            .since_ms
            .map(|ms| MessageId(MessageId::floor_of_ms(ms).0.saturating_sub(1))))
        {
            let start = key(b'e', room, &[&after.to_bytes()]);
            t.range_map(
                (
                    std::ops::Bound::Excluded(start),
                    std::ops::Bound::Included(hi),
                ),
                false,
                limit + 1,
                keep,
            )?
        } else {
            let mut rows = t.range_map(lo_all..=hi, true, limit + 1, keep)?;
            rows.reverse();
            rows
        };
        let more = rows.len() > limit;
        let mut rows = if more {
            if q.before.is_some() || (q.after.is_none() && q.since_ms.is_none()) {
                rows.into_iter().skip(1).collect()
            } else {
                rows.into_iter().take(limit).collect()
            }
        } else {
            rows
        };
        if let (Some((first, _)), Some((last, _))) = (rows.first(), rows.last()) {
            let amended = t.range(
                key(b'm', room, &[&first.to_bytes()])..=key(b'm', room, &[&last.to_bytes()]),
                usize::MAX,
            )?;
            for (k, v) in amended {
                let id = id_from_key(&k).ok_or_else(|| t.corrupt("message key"))?;
                if let Ok(i) = rows.binary_search_by_key(&id, |(id, _)| *id) {
                    rows[i].1 = decode_message(t, id, &v)?;
                }
            }
        }
        Ok((rows.into_iter().map(|(_, m)| m).collect(), more))
    }

    /// Durable timeline entries of a room with `after < id <= upto`, as events, at most `limit`.
    pub fn replay(
        &self,
        room: &RoomId,
        after: MessageId,
        upto: MessageId,
        limit: usize,
    ) -> Result<Vec<(MessageId, Event)>, TimelineError> {
        let t = &self.inner.tree;
        if upto <= after {
            return Ok(Vec::new());
        }
        let start = key(b'e', room, &[&after.to_bytes()]);
        let end = key(b'e', room, &[&upto.to_bytes()]);
        let rows = t.range(
            (
                std::ops::Bound::Excluded(start),
                std::ops::Bound::Included(end),
            ),
            limit,
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for (k, v) in rows {
            let id = id_from_key(&k).ok_or_else(|| t.corrupt("entry key"))?;
            if let Some(ev) = stored_event(t, room, id, &v)? {
                out.push((id, ev));
            }
        }
        Ok(out)
    }

    /// Entries of `room` this node journaled as late (`Timelines::journal_late`) at
    /// `since_ms` or after, whose ids are at most `upto`, as events in id order (at most
    /// `limit` journal records read). A resume adds these to its window: they may be
    /// far older than the cursor, yet reached this node (or left it) after the client's
    /// previous node handed the cursor out.
    pub fn late_since(
        &self,
        room: &RoomId,
        since_ms: u64,
        upto: MessageId,
        limit: usize,
    ) -> Result<Vec<(MessageId, Event)>, TimelineError> {
        let t = &self.inner.tree;
        let start = key(b'l', room, &[&since_ms.to_be_bytes()]);
        let mut end = key(b'l', room, &[]);
        end.push(0xff);
        let rows = t.range(start..end, limit)?;
        let mut ids = std::collections::BTreeSet::new();
        for (k, _) in rows {
            let id = id_from_key(&k).ok_or_else(|| t.corrupt("late journal key"))?;
            if id <= upto {
                ids.insert(id);
            }
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(v) = t.get(key(b'e', room, &[&id.to_bytes()]))? else {
                continue;
            };
            if let Some(ev) = stored_event(t, room, id, &v)? {
                out.push((id, ev));
            }
        }
        Ok(out)
    }

    /// Drops `room`'s late-journal records stamped before `before_ms`.
    pub fn prune_late(&self, room: &RoomId, before_ms: u64) -> Result<usize, TimelineError> {
        let lo = key(b'l', room, &[]);
        let hi = key(b'l', room, &[&before_ms.to_be_bytes()]);
        Ok(self.inner.tree.remove_range(lo..hi)?)
    }

    /// Forgets a deleted room: its documents, index and channel.
    pub async fn purge_room(&self, room: &RoomId) -> Result<(), TimelineError> {
        let slot = self.slot(room);
        let mut g = slot.lock().await;
        *g = None;
        for tag in [b'h', b's', b'c', b'e', b'm', b'k', b'a', b'l'] {
            let lo = key(tag, room, &[]);
            let mut hi = lo.clone();
            hi.push(0xff);
            self.inner.tree.remove_range(lo..hi)?;
        }
        self.inner.hub.remove(room);
        self.inner.forget_sealed_heads(room);
        drop(g);
        let mut rooms = self.inner.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.remove(room);
        Ok(())
    }

    /// What replication did since start, for metrics.
    pub fn stats(&self) -> &super::ReplicationStats {
        &self.inner.stats
    }

    /// Open chunks held in memory, for metrics.
    pub fn rooms_in_memory(&self) -> usize {
        let rooms = self.inner.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.len()
    }
}

/// The event of entry `id` as stored in the `e` index (`None` for kinds with no event).
fn stored_event(
    t: &Tree,
    room: &RoomId,
    id: MessageId,
    bytes: &[u8],
) -> Result<Option<Event>, TimelineError> {
    let entry = TimelineEntry::decode(bytes).map_err(|e| t.corrupt(format!("entry {id}: {e}")))?;
    Ok(entry_event(room, entry))
}

/// The message an `e` record holds (`None` for edits, deletes and reactions).
fn entry_message(t: &Tree, id: MessageId, bytes: &[u8]) -> Result<Option<Message>, StoreError> {
    let entry = TimelineEntry::decode(bytes).map_err(|e| t.corrupt(format!("entry {id}: {e}")))?;
    Ok(match entry.kind {
        Some(timeline_entry::Kind::Message(m)) => Some(m),
        _ => None,
    })
}

/// A message's `m` record: its state after amendments.
fn decode_message(t: &Tree, id: MessageId, bytes: &[u8]) -> Result<Message, StoreError> {
    Message::decode(bytes).map_err(|e| t.corrupt(format!("message {id}: {e}")))
}

/// A message's current state: its `m` record if it was amended, else its own entry.
/// `None` if `id` is not a message this replica holds. `get` reads one key: from the
/// store, or through a room's pending writes (`RoomDoc::read_through`).
fn message_state(
    t: &Tree,
    room: &RoomId,
    id: MessageId,
    get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<Option<Message>, StoreError> {
    if let Some(v) = get(&key(b'm', room, &[&id.to_bytes()]))? {
        return decode_message(t, id, &v).map(Some);
    }
    match get(&key(b'e', room, &[&id.to_bytes()]))? {
        Some(v) => entry_message(t, id, &v),
        None => Ok(None),
    }
}

/// Recomputes a message's current state (its history record) from the message's own
/// entry and every amendment of it, in id order: edits and each (user, emoji) reaction
/// are last-writer-wins by entry id, a delete is final. The result does not depend on
/// the order entries arrived in. `None` while the message itself has not arrived.
pub(super) fn rebuild_message(
    tree: &Tree,
    rd: &RoomDoc,
    room: &RoomId,
    target: MessageId,
) -> Result<Option<Message>, TimelineError> {
    let Some(base) = rd.read_through(tree, &key(b'e', room, &[&target.to_bytes()]))? else {
        return Ok(None);
    };
    let entry = TimelineEntry::decode(base.as_slice())
        .map_err(|e| tree.corrupt(format!("entry {target}: {e}")))?;
    let Some(timeline_entry::Kind::Message(mut msg)) = entry.kind else {
        return Ok(None);
    };
    for (_, v) in rd.scan_through(tree, &key(b'a', room, &[&target.to_bytes()]))? {
        let e = TimelineEntry::decode(v.as_slice())
            .map_err(|e| tree.corrupt(format!("amendment of {target}: {e}")))?;
        if let Some(kind) = e.kind {
            apply_amendment(&mut msg, &kind);
        }
    }
    Ok(Some(msg))
}

/// Applies an edit, delete or reaction entry to the current state of its message (the
/// history index); [`rebuild_message`] applies them in id order.
pub(super) fn apply_amendment(msg: &mut Message, kind: &timeline_entry::Kind) {
    match kind {
        timeline_entry::Kind::Edit(e) => {
            if !msg.deleted {
                msg.text = e.text.clone();
                msg.edited_at = e.at;
            }
        }
        timeline_entry::Kind::Delete(_) => {
            msg.deleted = true;
            msg.text.clear();
            msg.reactions.clear();
        }
        timeline_entry::Kind::Reaction(r) => {
            if msg.deleted {
                return;
            }
            let pos = msg.reactions.iter().position(|x| x.emoji == r.emoji);
            match (pos, r.remove) {
                (Some(i), true) => {
                    msg.reactions[i].users.retain(|u| *u != r.user);
                    if msg.reactions[i].users.is_empty() {
                        msg.reactions.remove(i);
                    }
                }
                (None, true) => {}
                (Some(i), false) => {
                    if !msg.reactions[i].users.contains(&r.user) {
                        msg.reactions[i].users.push(r.user.clone());
                    }
                }
                (None, false) => msg.reactions.push(Reaction {
                    emoji: r.emoji.clone(),
                    users: vec![r.user.clone()],
                }),
            }
        }
        timeline_entry::Kind::Message(_) => {}
    }
}

/// The subscriber-facing event of a stored entry.
/// The user who wrote an entry: a message's sender, an edit's editor, a delete's
/// deleter, a reaction's reactor. Replicas check them against the room's membership.
pub(super) fn author(kind: &timeline_entry::Kind) -> &str {
    match kind {
        timeline_entry::Kind::Message(m) => &m.sender,
        timeline_entry::Kind::Edit(e) => &e.editor,
        timeline_entry::Kind::Delete(d) => &d.by,
        timeline_entry::Kind::Reaction(r) => &r.user,
    }
}

pub(super) fn entry_event(room: &RoomId, entry: TimelineEntry) -> Option<Event> {
    let kind = match entry.kind? {
        timeline_entry::Kind::Message(m) => event::Kind::Message(m),
        timeline_entry::Kind::Edit(e) => event::Kind::Edited(MessageEdited {
            room_id: room.to_string(),
            message_id: e.target,
            text: e.text,
            edited_at: e.at,
            editor: e.editor,
        }),
        timeline_entry::Kind::Delete(d) => event::Kind::Deleted(MessageDeleted {
            room_id: room.to_string(),
            message_id: d.target,
            deleted_by: d.by,
        }),
        timeline_entry::Kind::Reaction(r) => event::Kind::Reaction(ReactionChanged {
            room_id: room.to_string(),
            message_id: r.target,
            user: r.user,
            emoji: r.emoji,
            removed: r.remove,
        }),
    };
    Some(Event {
        cursor: String::new(),
        kind: Some(kind),
    })
}

/// Takes every queued commit; per room, writes the pending entries' automerge change and
/// index entries as one atomic batch; flushes once; publishes each room's events in id
/// order; then answers the writers: those that need only this replica at once, the
/// others once the room's pusher has their change durable on enough replicas. A room
/// whose batch fails is dropped from memory (it reloads from disk on next use) and its
/// writers get the error: nothing half-written is acknowledged or delivered.
///
/// A flush costs about the same for one write as for fifty, so with a `linger` a round
/// that follows one of at least `LINGER_AFTER_ROUND` writes first waits that long for
/// more to join (see [`ChunkLimits::commit_linger`]); at low rates a write is flushed
/// at once.
async fn commit_pipeline(
    inner: std::sync::Weak<Inner>,
    mut rx: mpsc::UnboundedReceiver<Commit>,
    linger: std::time::Duration,
) {
    let mut last_round = 0;
    while let Some(first) = rx.recv().await {
        if !linger.is_zero() && last_round >= LINGER_AFTER_ROUND {
            tokio::time::sleep(linger).await;
        }
        let mut commits = vec![first];
        while commits.len() < 4096 {
            match rx.try_recv() {
                Ok(c) => commits.push(c),
                Err(_) => break,
            }
        }
        last_round = commits.len();
        let Some(inner) = inner.upgrade() else { return };
        let mut rooms: Vec<(RoomId, RoomSlot)> = Vec::new();
        for c in commits {
            if !rooms.iter().any(|(r, _)| *r == c.room) {
                rooms.push((c.room, c.slot));
            }
        }
        // Every room of the batch is locked first, then persisted in one blocking section:
        // handing the worker's other tasks to another thread costs a thread wake-up, once
        // per batch rather than once per room. No other task holds two room locks.
        let mut guards = Vec::with_capacity(rooms.len());
        for (room, slot) in rooms {
            guards.push((room, slot.lock_owned().await));
        }
        let done: Vec<(RoomId, Persisted)> = blocking(|| persist_all(&inner, guards));
        // Changes go to the peers now, while this node flushes: a writer is answered
        // once its entry is flushed here and acknowledged by enough peers.
        let network = inner
            .network
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (flush_tx, flush_rx) = tokio::sync::watch::channel(None);
        let mut publish = Vec::with_capacity(done.len());
        for (room, p) in done {
            let (local, remote): (Vec<Waiter>, Vec<Waiter>) =
                p.waiters.into_iter().partition(|w| w.quorum <= 1);
            match &network {
                Some((_, net)) if !p.change.is_empty() => super::remote::push(
                    &inner,
                    net,
                    &room,
                    super::remote::PushItem {
                        chunk: p.chunk,
                        change: p.change,
                        waiters: remote,
                        flushed: flush_rx.clone(),
                        authors: p.authors,
                        fence: p.fence,
                    },
                ),
                _ => {
                    // Nobody to push to: only this replica holds it.
                    for w in remote {
                        let _ = w.done.send(Err(TimelineError::Quorum {
                            need: w.quorum,
                            have: 1,
                        }));
                    }
                }
            }
            publish.push((room, p.events, local));
        }
        crate::crash_point!("timeline-before-flush");
        let flushed = inner.db.flush().await;
        let _ = flush_tx.send(Some(flushed.clone()));
        match flushed {
            Err(e) => {
                tracing::error!(error = %e, "timeline flush failed; sends are refused");
                for (_, _, local) in publish {
                    for w in local {
                        let _ = w.done.send(Err(e.clone().into()));
                    }
                }
            }
            Ok(()) => {
                for (room, events, local) in publish {
                    inner.hub.publish_timeline(&room, events);
                    for w in local {
                        let _ = w.done.send(Ok(()));
                    }
                }
            }
        }
    }
}

/// Runs heavy synchronous work (automerge loads, saves and diffs, sled batches) without
/// stalling the runtime: on a multi-thread runtime the worker first hands its other
/// tasks (Raft heartbeats among them) to another thread.
pub(super) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// What one room's persist produced: events to publish, the automerge change to push,
/// and the writers waiting for it.
struct Persisted {
    events: Vec<(MessageId, Arc<Event>)>,
    chunk: u32,
    change: Vec<u8>,
    waiters: Vec<Waiter>,
    /// Authors of this node's entries in `change`, and their writers' merged fence.
    authors: Vec<String>,
    fence: Option<Fence>,
}

/// A room's part of a pipeline round, staged into the round's shared batch.
struct Staged {
    chunk: u32,
    change: Vec<u8>,
}

/// Writes the pending entries of every room of a pipeline round (per room, one
/// automerge change holding all of them, plus their index entries) as ONE sled batch,
/// then compacts or seals the chunks that are due (only a room's writer seals: see
/// `remote`). One batch per round, not per room: sled writes out its log buffer before
/// and after every batch (`pin_log`), so batches per room cost two buffer writes each.
/// If the batch fails, nothing of it was written: every room of the round is answered
/// with the error and dropped from memory, to be reloaded from what the store holds.
fn persist_all(
    inner: &Inner,
    guards: Vec<(RoomId, tokio::sync::OwnedMutexGuard<Option<RoomDoc>>)>,
) -> Vec<(RoomId, Persisted)> {
    let t = &inner.tree;
    let mut batch = Batch::default();
    let mut staged = Vec::with_capacity(guards.len());
    for (room, mut g) in guards {
        let Some(rd) = g.as_mut() else { continue };
        let s = stage(&room, rd, &mut batch);
        staged.push((room, g, s));
    }
    if let Err(e) = t.apply(batch) {
        for (room, g, _) in staged {
            fail_room(inner, &room, g, e.clone());
        }
        return Vec::new();
    }
    staged
        .into_iter()
        .filter_map(|(room, mut g, s)| {
            let rd = g.as_mut()?;
            match finish(inner, &room, rd, s) {
                Ok(p) => Some((room, p)),
                Err(e) => {
                    fail_room(inner, &room, g, e);
                    None
                }
            }
        })
        .collect()
}

/// Answers a room's waiters with a storage error and drops the room, and the heads
/// recorded for its sealed chunks, from memory: both may be ahead of the store.
fn fail_room(
    inner: &Inner,
    room: &RoomId,
    mut g: tokio::sync::OwnedMutexGuard<Option<RoomDoc>>,
    e: StoreError,
) {
    tracing::error!(room = %room, error = %e, "timeline write failed; reloading the room");
    if let Some(rd) = g.as_mut() {
        for w in std::mem::take(&mut rd.pending_waiters) {
            let _ = w.done.send(Err(e.clone().into()));
        }
    }
    *g = None;
    inner.forget_sealed_heads(room);
}

/// Puts a room's new automerge change and its pending index entries into `batch`.
/// If the batch fails the room is dropped from memory, so the saved heads move here.
fn stage(room: &RoomId, rd: &mut RoomDoc, batch: &mut Batch) -> Staged {
    let heads = rd.doc.get_heads();
    let change = match rd.unsaved.take() {
        Some((reached, pushed)) if reached == heads => pushed,
        _ => rd.doc.save_after(&rd.saved_heads),
    };
    rd.stored_at(heads);
    if !change.is_empty() {
        batch.insert(
            key(
                b'c',
                room,
                &[&rd.chunk.to_be_bytes(), &rd.next_seq.to_be_bytes()],
            ),
            &change,
        );
    }
    for (k, v) in rd.pending.drain(..) {
        batch.insert(k, v);
    }
    Staged {
        chunk: rd.chunk,
        change,
    }
}

/// After the round's batch is written: counts the room's change, compacts or seals its
/// chunk if due, and hands over what to push and publish.
fn finish(
    inner: &Inner,
    room: &RoomId,
    rd: &mut RoomDoc,
    s: Staged,
) -> Result<Persisted, StoreError> {
    let t = &inner.tree;
    let Staged { chunk, change } = s;
    if !change.is_empty() {
        rd.next_seq += 1;
        rd.bytes += change.len();
        rd.since_compact += 1;
    }
    let events = std::mem::take(&mut rd.pending_events);
    let waiters = std::mem::take(&mut rd.pending_waiters);
    let authors = std::mem::take(&mut rd.pending_authors)
        .into_iter()
        .collect();
    let fence = rd.pending_fence.take();
    let local = std::mem::take(&mut rd.local_pending) > 0;
    if local && (rd.entries >= inner.limits.max_entries || rd.bytes >= inner.limits.max_bytes) {
        seal(inner, room, rd)?;
    } else if rd.since_compact >= inner.limits.compact_every {
        compact(t, room, rd)?;
    }
    Ok(Persisted {
        events,
        chunk,
        change: if local { change } else { Vec::new() },
        waiters,
        authors,
        fence,
    })
}

/// Saves the open chunk whole and drops its incremental changes. The save is written
/// before the changes are removed; a crash in between only leaves duplicates, which
/// automerge ignores on load.
pub(super) fn compact(t: &Tree, room: &RoomId, rd: &mut RoomDoc) -> Result<(), StoreError> {
    let cb = rd.chunk.to_be_bytes();
    let full = rd.doc.save();
    t.insert(key(b's', room, &[&cb]), &full)?;
    crate::crash_point!("timeline-compact-before-removing-changes");
    let lo = key(b'c', room, &[&cb]);
    let hi = key(b'c', room, &[&cb, &[0xff; 9]]);
    t.remove_range(lo..hi)?;
    rd.since_compact = 0;
    rd.bytes = full.len();
    // The whole save holds everything, including changes a replica applied but has
    // not stored yet (it seals when it follows the writer into the next chunk).
    let heads = rd.doc.get_heads();
    rd.stored_at(heads);
    Ok(())
}

/// Seals the open chunk (saved whole, left alone from now on), records its heads and
/// opens the next one.
pub(super) fn seal(inner: &Inner, room: &RoomId, rd: &mut RoomDoc) -> Result<(), StoreError> {
    let t = &inner.tree;
    compact(t, room, rd)?;
    inner.note_sealed_heads(room, rd.chunk, rd.doc.get_heads());
    let next = rd.chunk + 1;
    t.insert(key(b'h', room, &[]), next.to_be_bytes())?;
    let mut doc = AutoCommit::new();
    doc.set_actor(automerge::ActorId::random());
    let mut fresh = RoomDoc::new(next, doc, 0, 0, 0, 0);
    // Writes not persisted yet stay queued: their entries are in the sealed save.
    fresh.pending = std::mem::take(&mut rd.pending);
    fresh.pending_events = std::mem::take(&mut rd.pending_events);
    fresh.pending_waiters = std::mem::take(&mut rd.pending_waiters);
    *rd = fresh;
    tracing::debug!(room = %room, chunk = next, "sealed timeline chunk");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(n: u64) -> RoomId {
        RoomId::parse(&format!("rm_{n:016x}")).unwrap()
    }

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    async fn open(dir: &std::path::Path, limits: ChunkLimits) -> (Db, Timelines, Hub) {
        let db = Db::open(dir).unwrap();
        let hub = Hub::new();
        let tl = Timelines::open(&db, Arc::new(Hlc::new(1, 0)), hub.clone(), limits).unwrap();
        (db, tl, hub)
    }

    /// [`open`] again after a handle on `dir` was dropped. sled allows one opener per
    /// directory and lets go of it in the background: retry until it has (at most 2 s).
    async fn reopen(dir: &std::path::Path, limits: ChunkLimits) -> (Db, Timelines, Hub) {
        for _ in 0..200 {
            match Db::open(dir) {
                Ok(db) => {
                    let hub = Hub::new();
                    let tl = Timelines::open(&db, Arc::new(Hlc::new(1, 0)), hub.clone(), limits)
                        .unwrap();
                    return (db, tl, hub);
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
        panic!(
            "the store under {} did not reopen within 2 s",
            dir.display()
        );
    }

    fn msg(r: &RoomId, text: &str, cid: &str) -> NewMessage {
        NewMessage {
            room: r.clone(),
            sender: user("alice"),
            text: text.into(),
            client_msg_id: cid.into(),
            after: None,
            write_quorum: 1,
            fence: None,
        }
    }

    #[test]
    fn merged_fence_keeps_the_older_term() {
        let f = |term| Some(Fence { group: 3, term });
        assert_eq!(Fence::merge(f(5), f(4)), f(4));
        assert_eq!(Fence::merge(f(4), f(5)), f(4));
        assert_eq!(Fence::merge(None, f(5)), f(5));
        assert_eq!(Fence::merge(f(5), None), f(5));
        assert_eq!(Fence::merge(None, None), None);
    }

    /// A peer that keeps every push it receives and acknowledges it as durable.
    #[derive(Default)]
    struct Recorder {
        pushes: Mutex<Vec<parley_proto::v1::PushChangesRequest>>,
    }

    #[tonic::async_trait]
    impl crate::replication::Network for Recorder {
        fn peers_of(&self, _room: &RoomId) -> Vec<u64> {
            vec![2]
        }
        fn local_rooms(&self) -> Vec<RoomId> {
            Vec::new()
        }
        fn reachable_peers(&self, _room: &RoomId) -> usize {
            1
        }
        async fn push(
            &self,
            _node: u64,
            req: parley_proto::v1::PushChangesRequest,
        ) -> Result<parley_proto::v1::PushChangesReply, String> {
            self.pushes.lock().unwrap().push(req);
            Ok(parley_proto::v1::PushChangesReply {
                durable: true,
                rejected: String::new(),
            })
        }
        async fn sync(
            &self,
            _node: u64,
            _req: parley_proto::v1::SyncRequest,
        ) -> Result<parley_proto::v1::SyncReply, String> {
            Err("not in this test".into())
        }
    }

    #[tokio::test]
    async fn pushes_name_the_authors_and_the_writers_fence() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, tl, _hub) = open(dir.path(), ChunkLimits::default()).await;
        let rec = Arc::new(Recorder::default());
        tl.set_network(1, rec.clone());
        let r = room(9);
        let fence = |term| Some(Fence { group: 4, term });
        let a = tl
            .send(NewMessage {
                write_quorum: 2,
                fence: fence(7),
                ..msg(&r, "hello", "f1")
            })
            .await
            .unwrap();
        tl.react(&r, &user("bob"), a.id, "+1".into(), false, 2, fence(7))
            .await
            .unwrap();
        let pushed = rec.pushes.lock().unwrap().clone();
        assert!(!pushed.is_empty());
        // Every push names its authors and its fence; together they name both writers.
        let mut authors: Vec<String> = pushed.iter().flat_map(|p| p.authors.clone()).collect();
        authors.sort();
        authors.dedup();
        assert_eq!(authors, vec!["alice".to_string(), "bob".to_string()]);
        for p in &pushed {
            assert_eq!((p.group, p.term), (4, Some(7)), "{p:?}");
            assert!(!p.authors.is_empty());
        }
        // An unfenced write (W=1, no leader) pushes no term.
        rec.pushes.lock().unwrap().clear();
        tl.send(NewMessage {
            write_quorum: 2,
            ..msg(&r, "unfenced", "f2")
        })
        .await
        .unwrap();
        let pushed = rec.pushes.lock().unwrap().clone();
        assert!(pushed
            .iter()
            .all(|p| p.term.is_none() && p.authors == ["alice"]));
    }

    /// A room's open chunk loaded from the store (a restart) saves and pushes only the
    /// changes made after the load: its first round does not write, or push to every
    /// peer, the whole chunk's history again.
    #[tokio::test]
    async fn the_first_write_after_a_reload_pushes_only_its_own_change() {
        let dir = tempfile::tempdir().unwrap();
        let r = room(12);
        {
            let (db, tl, _hub) = open(dir.path(), ChunkLimits::default()).await;
            for i in 0..30 {
                tl.send(msg(&r, &format!("m{i}"), &format!("c{i}")))
                    .await
                    .unwrap();
            }
            db.flush().await.unwrap();
        }
        let (_db, tl, _hub) = reopen(dir.path(), ChunkLimits::default()).await;
        let rec = Arc::new(Recorder::default());
        tl.set_network(1, rec.clone());
        tl.send(NewMessage {
            write_quorum: 2,
            ..msg(&r, "after the reload", "c30")
        })
        .await
        .unwrap();
        let pushed = rec.pushes.lock().unwrap().clone();
        let changes: Vec<automerge::Change> = pushed
            .iter()
            .flat_map(|p| p.changes.iter())
            .flat_map(|c| parse_change_run(c).unwrap().unwrap())
            .collect();
        assert_eq!(changes.len(), 1, "pushed {} changes", changes.len());
        assert_eq!(changes[0].len(), 1, "one op: the new message");
        // The store holds it once more, as one change.
        let stored = stored_changes(&tl, &r);
        let last = stored.last().unwrap();
        assert_eq!(parse_change_run(last).unwrap().unwrap().len(), 1);
    }

    /// The texts of the first ten messages of `r`'s history, in id order.
    fn texts(tl: &Timelines, r: &RoomId) -> Vec<String> {
        let q = HistoryQuery {
            limit: 10,
            ..Default::default()
        };
        let (page, _) = tl.history(r, &q).unwrap();
        page.into_iter().map(|m| m.text).collect()
    }

    /// The change a writer's open chunk makes when it adds message `seq`.
    fn writer_change(doc: &mut AutoCommit, r: &RoomId, seq: u32) -> Vec<u8> {
        keyed_change(doc, r, seq, MessageId::chunk_key)
    }

    /// The change a writer makes when it adds message `seq` under the chunk key `key`
    /// gives its id.
    fn keyed_change(
        doc: &mut AutoCommit,
        r: &RoomId,
        seq: u32,
        key: fn(MessageId) -> String,
    ) -> Vec<u8> {
        let id = MessageId::new(1_700_000_000_000, 0, 2, seq);
        let entry = TimelineEntry {
            kind: Some(timeline_entry::Kind::Message(Message {
                id: id.to_string(),
                room_id: r.to_string(),
                sender: "bob".into(),
                text: format!("m{seq}"),
                ..Default::default()
            })),
        };
        doc.put(ROOT, key(id), ScalarValue::Bytes(entry.encode_to_vec()))
            .unwrap();
        doc.save_incremental()
    }

    #[test]
    fn change_runs_parse_whole_or_not_at_all() {
        let r = room(13);
        let mut writer = AutoCommit::new();
        let first = writer_change(&mut writer, &r, 1);
        let second = writer_change(&mut writer, &r, 2);
        let run = [first.clone(), second].concat();
        let parsed = parse_change_run(&run).unwrap().unwrap();
        let hashes: Vec<ChangeHash> = parsed.iter().map(|c| c.hash()).collect();
        assert_eq!(hashes.len(), 2);
        assert_eq!(hashes[1..], writer.get_heads()[..]);
        assert_eq!(parse_change_run(&[]).unwrap().map(|c| c.len()), Some(0));

        // Cut anywhere but between the chunks: an error, and nothing applied.
        for cut in 1..run.len() {
            let mut doc = AutoCommit::new();
            let r = load_changes(&mut doc, &[run[..cut].to_vec()]);
            if cut == first.len() {
                r.unwrap();
                assert_eq!(doc.length(ROOT), 1);
            } else {
                assert!(r.is_err(), "cut at {cut} of {} loaded", run.len());
                assert_eq!(doc.length(ROOT), 0, "cut at {cut}");
            }
        }
        // Any one byte changed: an error, and nothing applied, the good chunk before it
        // included.
        for i in 0..run.len() {
            let mut damaged = run.clone();
            damaged[i] ^= 0x21;
            let mut doc = AutoCommit::new();
            assert!(
                load_changes(&mut doc, &[damaged]).is_err(),
                "byte {i} of {} changed and loaded",
                run.len()
            );
            assert_eq!(doc.length(ROOT), 0, "byte {i}");
        }
        // A run holding a whole document takes automerge's general loader.
        let whole = writer.save();
        assert_eq!(parse_change_run(&whole).unwrap().map(|c| c.len()), None);
        let mut doc = AutoCommit::new();
        load_changes(&mut doc, &[whole]).unwrap();
        assert_eq!(doc.length(ROOT), 2);
        assert_eq!(doc.get_heads(), writer.get_heads());
    }

    /// The `c` records of `r`'s open chunk 0, oldest first.
    fn stored_changes(tl: &Timelines, r: &RoomId) -> Vec<Vec<u8>> {
        let t = &tl.inner.tree;
        t.scan_prefix(key(b'c', r, &[&0u32.to_be_bytes()]))
            .unwrap()
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    /// A replica stores a peer's pushed changes as the peer encoded them, and the
    /// store reloads to the same document. A change automerge held back for a missing
    /// dependency, received in an anti-entropy exchange (not a push), is stored too
    /// when a later push releases it: that round asks automerge what the chunk gained.
    #[tokio::test]
    async fn a_replica_stores_pushed_changes_as_they_came_and_what_they_release() {
        let dir = tempfile::tempdir().unwrap();
        let r = room(14);
        let mut writer = AutoCommit::new();
        let c: Vec<Vec<u8>> = (1..=4).map(|i| writer_change(&mut writer, &r, i)).collect();
        {
            let (db, tl, _hub) = open(dir.path(), ChunkLimits::default()).await;
            assert!(tl.apply_remote(&r, 0, &c[..1]).await.unwrap());
            assert_eq!(stored_changes(&tl, &r), [c[0].clone()], "stored as pushed");
            // Change 3 arrives through an exchange, before 2: held back, nothing gained.
            let slot = tl.slot(&r);
            let rx = {
                let mut g = slot.lock().await;
                let rd = tl.load_locked(&r, &mut g).unwrap();
                tl.with_chunk(&r, rd, 0, false, None, |doc| {
                    load_changes(doc, &c[2..3]).unwrap();
                    Ok(())
                })
                .unwrap();
                tl.wait_for_pending(&r, rd, 1).unwrap()
            };
            Timelines::wait_durable(rx).await.unwrap();
            // The push of 2 releases 3; 4 follows in a push of its own.
            assert!(tl.apply_remote(&r, 0, &c[1..2]).await.unwrap());
            assert!(tl.apply_remote(&r, 0, &c[3..4]).await.unwrap());
            assert_eq!(stored_changes(&tl, &r).last(), Some(&c[3]));
            assert_eq!(texts(&tl, &r), ["m1", "m2", "m3", "m4"]);
            db.flush().await.unwrap();
        }
        let (_db, tl, _hub) = reopen(dir.path(), ChunkLimits::default()).await;
        assert_eq!(texts(&tl, &r), ["m1", "m2", "m3", "m4"]);
        let slot = tl.slot(&r);
        let mut g = slot.lock().await;
        let rd = tl.load_locked(&r, &mut g).unwrap();
        assert_eq!(rd.doc.get_heads(), writer.get_heads());
    }

    #[tokio::test]
    async fn entries_keyed_by_older_builds_apply_beside_newest_first_keys() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, tl, _hub) = open(dir.path(), ChunkLimits::default()).await;
        let r = room(12);
        let mut writer = AutoCommit::new();
        // Messages 1 and 3 keyed by their plain id (builds before newest-first keys),
        // 2 and 4 newest first: all four are indexed, and history is in id order.
        let plain = |m: MessageId| m.to_string();
        let changes = [
            keyed_change(&mut writer, &r, 1, plain),
            keyed_change(&mut writer, &r, 2, MessageId::chunk_key),
            keyed_change(&mut writer, &r, 3, plain),
            keyed_change(&mut writer, &r, 4, MessageId::chunk_key),
        ];
        assert!(tl.apply_remote(&r, 0, &changes[..2]).await.unwrap());
        assert!(tl.apply_remote(&r, 0, &changes[2..]).await.unwrap());
        assert_eq!(texts(&tl, &r), ["m1", "m2", "m3", "m4"]);
        // This node's own writes use newest-first keys.
        tl.send(msg(&r, "m5", "c5")).await.unwrap();
        let slot = tl.slot(&r);
        let g = slot.lock().await;
        let keys: Vec<String> = g.as_ref().unwrap().doc.keys(ROOT).collect();
        assert_eq!(keys.len(), 5);
        assert!(keys[0].starts_with('-'), "{keys:?}");
        let newest = MessageId::from_chunk_key(&keys[0]).unwrap();
        assert!(
            newest > MessageId::new(1_700_000_000_000, 0, 2, 4),
            "{keys:?}"
        );
    }

    #[tokio::test]
    async fn several_pushed_changes_apply_together_and_a_gap_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, tl, _hub) = open(dir.path(), ChunkLimits::default()).await;
        let r = room(9);
        let mut writer = AutoCommit::new();
        let changes: Vec<Vec<u8>> = (1..=5).map(|i| writer_change(&mut writer, &r, i)).collect();
        // Three in one push: all applied, in order, and the push is complete.
        assert!(tl.apply_remote(&r, 0, &changes[..3]).await.unwrap());
        // The fifth without the fourth: applied once the fourth comes, not before.
        assert!(!tl.apply_remote(&r, 0, &changes[4..]).await.unwrap());
        assert_eq!(texts(&tl, &r), ["m1", "m2", "m3"]);
        assert!(tl.apply_remote(&r, 0, &changes[3..4]).await.unwrap());
        assert_eq!(texts(&tl, &r), ["m1", "m2", "m3", "m4", "m5"]);
    }

    #[tokio::test]
    async fn a_damaged_push_is_refused_and_applies_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, tl, _hub) = open(dir.path(), ChunkLimits::default()).await;
        let r = room(10);
        let mut writer = AutoCommit::new();
        let changes: Vec<Vec<u8>> = (1..=3).map(|i| writer_change(&mut writer, &r, i)).collect();
        let truncated = changes[1][..changes[1].len() - 3].to_vec();
        let mut flipped = changes[1].clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        let not_automerge = b"definitely not an automerge change".to_vec();
        // A good change followed by a damaged one: the whole push is refused, the good
        // change included, on an empty replica and on one that holds entries.
        for damaged in [&truncated, &flipped, &not_automerge] {
            let push = [changes[0].clone(), damaged.clone()];
            let err = tl.apply_remote(&r, 0, &push).await.unwrap_err();
            assert!(matches!(err, TimelineError::Invalid { .. }), "{err:?}");
            assert!(texts(&tl, &r).is_empty());
        }
        assert!(tl.apply_remote(&r, 0, &changes[..1]).await.unwrap());
        for damaged in [&truncated, &flipped, &not_automerge] {
            let push = [changes[1].clone(), changes[2].clone(), damaged.clone()];
            let err = tl.apply_remote(&r, 0, &push).await.unwrap_err();
            assert!(matches!(err, TimelineError::Invalid { .. }), "{err:?}");
            assert_eq!(texts(&tl, &r), ["m1"]);
        }
        // The undamaged push still applies afterwards.
        assert!(tl.apply_remote(&r, 0, &changes[1..]).await.unwrap());
        assert_eq!(texts(&tl, &r), ["m1", "m2", "m3"]);
    }

    #[tokio::test]
    async fn a_sync_message_carrying_a_damaged_change_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, tl, _hub) = open(dir.path(), ChunkLimits::default()).await;
        let r = room(11);
        let mut writer = AutoCommit::new();
        let changes: Vec<Vec<u8>> = (1..=2).map(|i| writer_change(&mut writer, &r, i)).collect();
        let request = |carried: Vec<Vec<u8>>| parley_proto::v1::SyncRequest {
            room_id: r.to_string(),
            chunk: 0,
            message: automerge::sync::Message {
                heads: Vec::new(),
                need: Vec::new(),
                have: Vec::new(),
                changes: automerge::sync::ChunkList::from(carried),
                flags: None,
                version: automerge::sync::MessageVersion::V1,
            }
            .encode(),
            from_node: 2,
            first: true,
            sealed_heads: Vec::new(),
        };
        let truncated = changes[1][..changes[1].len() - 3].to_vec();
        let err = tl
            .handle_sync(&request(vec![changes[0].clone(), truncated]))
            .await
            .unwrap_err();
        assert!(matches!(err, TimelineError::Invalid { .. }), "{err:?}");
        assert!(texts(&tl, &r).is_empty());
        tl.handle_sync(&request(changes.clone())).await.unwrap();
        assert_eq!(texts(&tl, &r), ["m1", "m2"]);
    }

    /// Checking a sync message's changes logs nothing for changes whose dependencies
    /// are elsewhere (every change after a room's first), and still refuses damage.
    #[test]
    fn checking_incremental_changes_logs_no_error() {
        use crate::test_log::Captured;
        let r = room(12);
        let mut writer = AutoCommit::new();
        let _first = writer_change(&mut writer, &r, 1);
        let second = writer_change(&mut writer, &r, 2);
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(check_changes(&second), Ok(()));
            assert!(check_changes(&second[..second.len() - 2]).is_err());
        });
        let logged = out.text();
        assert!(!logged.contains("ERROR"), "{logged}");
    }

    #[tokio::test]
    async fn send_history_and_idempotent_retry() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, tl, _hub) = open(dir.path(), ChunkLimits::default()).await;
        let r = room(1);
        let a = tl.send(msg(&r, "one", "c1")).await.unwrap();
        let b = tl.send(msg(&r, "two", "c2")).await.unwrap();
        let again = tl.send(msg(&r, "one (retry)", "c1")).await.unwrap();
        assert!(b.id > a.id);
        assert!(again.duplicate);
        assert_eq!(again.id, a.id);
        let (page, more) = tl
            .history(
                &r,
                &HistoryQuery {
                    limit: 10,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(!more);
        assert_eq!(
            page.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
            ["one", "two"]
        );
        let (page, more) = tl
            .history(
                &r,
                &HistoryQuery {
                    limit: 1,
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(more);
        assert_eq!(page[0].text, "two");
        let (page, _) = tl
            .history(
                &r,
                &HistoryQuery {
                    limit: 10,
                    before: Some(b.id),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(page.len(), 1);
        let (page, _) = tl
            .history(
                &r,
                &HistoryQuery {
                    limit: 10,
                    after: Some(a.id),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(page[0].text, "two");
        let (page, _) = tl
            .history(
                &r,
                &HistoryQuery {
                    limit: 10,
                    since_ms: Some(a.sent_at),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(page.len(), 2);
        let (page, _) = tl
            .history(
                &r,
                &HistoryQuery {
                    limit: 10,
                    since_ms: Some(b.sent_at + 60_000),
                    ..Default::default()
                },
            )
            .unwrap();
        assert!(page.is_empty());
    }

    #[tokio::test]
    async fn edits_deletes_reactions_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, tl, _hub) = open(dir.path(), ChunkLimits::default()).await;
        let r = room(2);
        let a = tl.send(msg(&r, "hello", "")).await.unwrap();
        let err = tl
            .edit(&r, &user("bob"), a.id, "hijack".into(), 1, None)
            .await
            .unwrap_err();
        assert!(matches!(err, TimelineError::PermissionDenied { .. }));
        tl.edit(&r, &user("alice"), a.id, "hello!".into(), 1, None)
            .await
            .unwrap();
        tl.react(&r, &user("bob"), a.id, "👍".into(), false, 1, None)
            .await
            .unwrap();
        tl.react(&r, &user("carol"), a.id, "👍".into(), false, 1, None)
            .await
            .unwrap();
        tl.react(&r, &user("bob"), a.id, "👍".into(), true, 1, None)
            .await
            .unwrap();
        let m = tl.get_message(&r, a.id).unwrap().unwrap();
        assert_eq!(m.text, "hello!");
        assert!(m.edited_at > 0);
        assert_eq!(m.reactions[0].users, vec!["carol".to_string()]);
        assert!(tl
            .delete(&r, &user("bob"), false, a.id, 1, None)
            .await
            .is_err());
        tl.delete(&r, &user("bob"), true, a.id, 1, None)
            .await
            .unwrap();
        let m = tl.get_message(&r, a.id).unwrap().unwrap();
        assert!(m.deleted && m.text.is_empty());
        let all = tl
            .replay(&r, MessageId::MIN, MessageId(u128::MAX), 100)
            .unwrap();
        assert_eq!(all.len(), 6, "message, edit, 3 reactions, delete");
        assert!(all.windows(2).all(|w| w[0].0 < w[1].0));
        let after_first = tl.replay(&r, all[0].0, MessageId(u128::MAX), 100).unwrap();
        assert_eq!(after_first.len(), 5);
        assert!(tl
            .edit(&r, &user("alice"), MessageId(7), "x".into(), 1, None)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn history_pages_skip_amendments_and_show_current_state() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, tl, _hub) = open(dir.path(), ChunkLimits::default()).await;
        let r = room(5);
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(tl.send(msg(&r, &format!("m{i}"), "")).await.unwrap().id);
        }
        tl.edit(&r, &user("alice"), ids[1], "m1 edited".into(), 1, None)
            .await
            .unwrap();
        tl.react(&r, &user("bob"), ids[0], "👍".into(), false, 1, None)
            .await
            .unwrap();
        ids.push(tl.send(msg(&r, "m3", "")).await.unwrap().id);
        tl.delete(&r, &user("alice"), false, ids[3], 1, None)
            .await
            .unwrap();
        ids.push(tl.send(msg(&r, "m4", "")).await.unwrap().id);
        for who in ["bob", "carol"] {
            tl.react(&r, &user(who), ids[4], "🎉".into(), false, 1, None)
                .await
                .unwrap();
        }
        ids.push(tl.send(msg(&r, "m5", "")).await.unwrap().id);
        // Only amended messages have an `m` record.
        let t = &tl.inner.tree;
        let has_m = |id: MessageId| t.get(key(b'm', &r, &[&id.to_bytes()])).unwrap().is_some();
        assert_eq!(
            ids.iter().map(|id| has_m(*id)).collect::<Vec<_>>(),
            vec![true, true, false, true, true, false]
        );
        let page = |q: HistoryQuery| {
            let (msgs, more) = tl.history(&r, &q).unwrap();
            let got: Vec<(String, String)> = msgs.into_iter().map(|m| (m.id, m.text)).collect();
            (got, more)
        };
        let q = |limit, before, after| HistoryQuery {
            limit,
            before,
            after,
            since_ms: None,
        };
        let s = |i: usize, text: &str| (ids[i].to_string(), text.to_string());
        assert_eq!(page(q(2, None, None)), (vec![s(4, "m4"), s(5, "m5")], true));
        assert_eq!(
            page(q(2, Some(ids[4]), None)),
            (vec![s(2, "m2"), s(3, "")], true)
        );
        assert_eq!(
            page(q(2, Some(ids[2]), None)),
            (vec![s(0, "m0"), s(1, "m1 edited")], false)
        );
        assert_eq!(
            page(q(3, None, Some(ids[0]))),
            (vec![s(1, "m1 edited"), s(2, "m2"), s(3, "")], true)
        );
        assert_eq!(
            page(q(3, None, Some(ids[3]))),
            (vec![s(4, "m4"), s(5, "m5")], false)
        );
        let (latest, _) = tl.history(&r, &q(6, None, None)).unwrap();
        assert_eq!(latest.len(), 6);
        assert_eq!(latest[0].reactions[0].users, vec!["bob".to_string()]);
        assert_eq!(latest[4].reactions[0].users.len(), 2);
        assert!(latest[3].deleted);
        // Data written by older builds has an `m` record for every message: the same.
        for m in &latest {
            let id: MessageId = m.id.parse().unwrap();
            t.insert(key(b'm', &r, &[&id.to_bytes()]), m.encode_to_vec())
                .unwrap();
        }
        assert_eq!(tl.history(&r, &q(6, None, None)).unwrap().0, latest);
        assert_eq!(tl.get_message(&r, ids[2]).unwrap().unwrap(), latest[2]);
        // An amendment's id is not a message.
        let last = tl.replay(&r, ids[4], ids[5], 10).unwrap();
        assert!(tl.get_message(&r, last[0].0).unwrap().is_none());
    }

    /// A lone write is flushed at once; a round that follows one of
    /// `LINGER_AFTER_ROUND` writes or more waits `commit_linger` first. The linger is
    /// set far longer than any step here, so neither check depends on the machine's speed.
    #[tokio::test]
    async fn only_a_busy_round_lingers() {
        let dir = tempfile::tempdir().unwrap();
        let limits = ChunkLimits {
            commit_linger: std::time::Duration::from_secs(60),
            ..ChunkLimits::default()
        };
        let (_db, tl, _hub) = open(dir.path(), limits).await;
        let quick = std::time::Duration::from_secs(20);
        for i in 0..3 {
            let sent = tokio::time::timeout(quick, tl.send(msg(&room(40), &format!("{i}"), "")));
            assert!(sent.await.is_ok(), "lone write {i} waited for the linger");
        }
        // Five writes queued with no await between them (this runtime has one thread,
        // so the pipeline cannot run meanwhile): one round of five.
        let rooms: Vec<RoomId> = (41..46).map(room).collect();
        let mut acks = Vec::new();
        for r in &rooms {
            let slot = tl.slot(r);
            let mut g = slot.try_lock().unwrap();
            let rd = tl.load_locked(r, &mut g).unwrap();
            acks.push(tl.wait_for_pending(r, rd, 1).unwrap());
        }
        for a in acks {
            let done = tokio::time::timeout(quick, Timelines::wait_durable(a));
            done.await.expect("the round of five ran at once").unwrap();
        }
        let after_busy = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            tl.send(msg(&room(40), "late", "")),
        );
        assert!(
            after_busy.await.is_err(),
            "the round after five writes did not linger"
        );
    }

    #[tokio::test]
    async fn chunks_seal_and_everything_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let limits = ChunkLimits {
            max_entries: 25,
            max_bytes: 1 << 20,
            compact_every: 7,
            ..ChunkLimits::default()
        };
        let r = room(3);
        let mut ids = Vec::new();
        {
            let (db, tl, _hub) = open(dir.path(), limits).await;
            for i in 0..60 {
                ids.push(
                    tl.send(msg(&r, &format!("m{i}"), &format!("c{i}")))
                        .await
                        .unwrap()
                        .id,
                );
            }
            db.flush().await.unwrap();
        }
        let (_db, tl, hub) = reopen(dir.path(), limits).await;
        let (page, _) = tl
            .history(
                &r,
                &HistoryQuery {
                    limit: 100,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(
            page.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
            ids.iter().map(|i| i.to_string()).collect::<Vec<_>>()
        );
        let next = tl.send(msg(&r, "after restart", "")).await.unwrap();
        assert!(
            next.id > *ids.last().unwrap(),
            "ids keep increasing across restarts"
        );
        let dup = tl.send(msg(&r, "m3 again", "c3")).await.unwrap();
        assert!(dup.duplicate && dup.id == ids[3]);
        assert_eq!(hub.watermark(&r), Some(next.id));
    }

    /// Rounds of the commit pipeline hold several rooms in one store batch, and seal or
    /// compact some of them in the same round: every acknowledged message of every room
    /// is there after a reopen, in id order, in the chunk each room's next send expects.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rooms_written_in_one_round_all_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let limits = ChunkLimits {
            max_entries: 10,
            max_bytes: 1 << 20,
            compact_every: 3,
            ..ChunkLimits::default()
        };
        let rooms: Vec<RoomId> = (10..16).map(room).collect();
        let mut acked: Vec<Vec<MessageId>> = vec![Vec::new(); rooms.len()];
        {
            let (db, tl, _hub) = open(dir.path(), limits).await;
            let mut tasks = Vec::new();
            for (ri, r) in rooms.iter().enumerate() {
                for i in 0..35 {
                    let tl = tl.clone();
                    let m = msg(r, &format!("r{ri} m{i}"), &format!("c{i}"));
                    tasks.push((ri, tokio::spawn(async move { tl.send(m).await })));
                }
            }
            for (ri, t) in tasks {
                let a = t.await.unwrap().unwrap();
                assert!(!a.duplicate);
                acked[ri].push(a.id);
            }
            db.flush().await.unwrap();
        }
        let (_db, tl, _hub) = reopen(dir.path(), limits).await;
        for (ri, r) in rooms.iter().enumerate() {
            let (page, _) = tl
                .history(
                    r,
                    &HistoryQuery {
                        limit: 100,
                        ..Default::default()
                    },
                )
                .unwrap();
            let mut want = acked[ri].clone();
            want.sort();
            assert_eq!(
                page.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
                want.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "room {ri}"
            );
            assert!(page.iter().all(|m| m.text.starts_with(&format!("r{ri} "))));
            // A retry after the reopen finds the first write, wherever its chunk went.
            let dup = tl.send(msg(r, "again", "c0")).await.unwrap();
            assert!(dup.duplicate && acked[ri].contains(&dup.id), "room {ri}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sends_retries_and_reactions_batch_correctly() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, tl, hub) = open(
            dir.path(),
            ChunkLimits {
                max_entries: 150,
                max_bytes: 1 << 20,
                compact_every: 5,
                ..ChunkLimits::default()
            },
        )
        .await;
        let r = room(4);
        tl.ensure_loaded(&r).await.unwrap();
        let (mut rx, _) = hub.subscribe(&r).unwrap();
        // 100 client ids, each sent twice concurrently: one message per id.
        let mut tasks = Vec::new();
        for i in 0..200 {
            let tl = tl.clone();
            let m = msg(&r, &format!("m{}", i % 100), &format!("c{}", i % 100));
            tasks.push(tokio::spawn(async move { tl.send(m).await.unwrap() }));
        }
        let mut acks = Vec::new();
        for t in tasks {
            acks.push(t.await.unwrap());
        }
        let fresh: std::collections::BTreeSet<_> =
            acks.iter().filter(|a| !a.duplicate).map(|a| a.id).collect();
        assert_eq!(fresh.len(), 100, "exactly one write per client id");
        assert_eq!(
            acks.iter()
                .map(|a| a.id)
                .collect::<std::collections::BTreeSet<_>>(),
            fresh
        );
        let (page, _) = tl
            .history(
                &r,
                &HistoryQuery {
                    limit: 1000,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(page.len(), 100);
        // Live events arrived once each, in id order, although the chunk sealed on the way.
        let mut seen = Vec::new();
        while let Ok(crate::delivery::HubEvent::Timeline { id, .. }) = rx.try_recv() {
            seen.push(id);
        }
        assert_eq!(seen, fresh.iter().copied().collect::<Vec<_>>());
        // 40 users react to one message at once: every reaction survives.
        let target = *fresh.iter().next().unwrap();
        let mut tasks = Vec::new();
        for u in 0..40 {
            let tl = tl.clone();
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                tl.react(
                    &r,
                    &user(&format!("u{u}")),
                    target,
                    "+1".into(),
                    false,
                    1,
                    None,
                )
                .await
                .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let m = tl.get_message(&r, target).unwrap().unwrap();
        assert_eq!(m.reactions[0].users.len(), 40);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Garbage where a record should be gives a Corrupt error, never a panic.
        #[test]
        fn corrupt_records_are_errors_not_panics(garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let db = Db::temporary().unwrap();
                let tl = Timelines::open(&db, Arc::new(Hlc::new(1, 0)), Hub::new(), ChunkLimits::default()).unwrap();
                let r = room(9);
                let id = MessageId::new(1_000, 0, 1, 1);
                let t = &tl.inner.tree;
                t.insert(key(b'm', &r, &[&id.to_bytes()]), &garbage).unwrap();
                t.insert(key(b'e', &r, &[&id.to_bytes()]), &garbage).unwrap();
                t.insert(key(b'c', &r, &[&0u32.to_be_bytes(), &0u64.to_be_bytes()]), &garbage).unwrap();
                t.insert(key(b'h', &r, &[]), &garbage).unwrap();
                let q = HistoryQuery { limit: 10, ..Default::default() };
                // Each may succeed (garbage that happens to decode) but must not panic.
                let _ = tl.history(&r, &q);
                let _ = tl.replay(&r, MessageId::MIN, MessageId(u128::MAX), 10);
                let _ = tl.get_message(&r, id);
                let loaded = tl.ensure_loaded(&r).await;
                if garbage.len() != 4 {
                    assert!(loaded.is_err(), "a chunk number that is not 4 bytes must be refused");
                }
            });
        }

        /// A run of changes behind a chunk header, with bytes changed, cut or added:
        /// refused with nothing applied, never a panic, unless it is unchanged.
        #[test]
        fn damaged_change_runs_apply_nothing(
            edits in proptest::collection::vec((proptest::prelude::any::<usize>(), 1u8..=255), 0..4),
            cut in proptest::prelude::any::<usize>(),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12),
        ) {
            let r = room(14);
            let mut writer = AutoCommit::new();
            let first = writer_change(&mut writer, &r, 1);
            let run = [first.clone(), writer_change(&mut writer, &r, 2)].concat();
            let mut damaged = run.clone();
            for (at, x) in &edits {
                let i = at % damaged.len();
                damaged[i] ^= x;
            }
            damaged.truncate(1 + cut % damaged.len());
            // Bytes after the run: the start of a chunk header, then anything.
            if !tail.is_empty() {
                damaged.extend(CHUNK_MAGIC);
                damaged.extend(&tail);
            }
            let mut doc = AutoCommit::new();
            let r = load_changes(&mut doc, &[damaged.clone()]);
            if damaged == run {
                proptest::prop_assert!(r.is_ok());
                proptest::prop_assert_eq!(doc.length(ROOT), 2);
            } else if r.is_err() {
                proptest::prop_assert_eq!(doc.length(ROOT), 0);
            } else {
                // Only a cut exactly after the first change, with nothing appended, loads.
                proptest::prop_assert_eq!(&damaged, &first);
                proptest::prop_assert_eq!(doc.length(ROOT), 1);
            }
        }
    }
}
