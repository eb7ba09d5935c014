//! Delivery: live fan-out of events to this node's subscribers.
//!
//! Owns one broadcast channel per room and the room's *durable watermark*: the greatest
//! timeline entry id whose write was flushed and published. It never reads storage;
//! the replication layer publishes into it and subscribers replay from the index up to
//! the watermark they got together with their receiver, so a subscriber sees every
//! durable entry once: replayed (id <= watermark) or live (id > watermark), and never an
//! entry that was not yet durable.
//!
//! Ordering contract: `publish` is called in entry-id order per room (the replication
//! layer's commit pipeline guarantees it), so live timeline events arrive in id order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use parley_proto::v1::Event;
use tokio::sync::broadcast;

use crate::ids::{MessageId, RoomId};

/// Events a room channel carries.
#[derive(Debug, Clone)]
pub enum HubEvent {
    /// A durable timeline entry (message, edit, delete, reaction), resumable by id.
    Timeline { id: MessageId, event: Arc<Event> },
    /// Membership, presence, typing, read markers: live only.
    Live(Arc<Event>),
}

/// Per-room channel capacity. A subscriber that falls further behind gets `Lagged` and
/// catches up from the index.
const CHANNEL_CAPACITY: usize = 4096;

struct RoomChannel {
    tx: broadcast::Sender<HubEvent>,
    durable: MessageId,
}

/// The fan-out hub of one node. Cheap to clone.
#[derive(Clone, Default)]
pub struct Hub {
    rooms: Arc<Mutex<HashMap<RoomId, RoomChannel>>>,
}

const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Hub>();
};

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a room with the watermark read from disk before any write to it on this
    /// node. A room registered already keeps its (newer) watermark.
    pub fn register(&self, room: &RoomId, durable: MessageId) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.entry(room.clone()).or_insert_with(|| RoomChannel {
            tx: broadcast::channel(CHANNEL_CAPACITY).0,
            durable,
        });
    }

    pub fn is_registered(&self, room: &RoomId) -> bool {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.contains_key(room)
    }

    /// A receiver for the room's events and the watermark at the same instant: every
    /// timeline entry with id <= watermark is in the index; every later one will arrive
    /// on the receiver. `None` if the room was never registered.
    pub fn subscribe(&self, room: &RoomId) -> Option<(broadcast::Receiver<HubEvent>, MessageId)> {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.get(room).map(|c| (c.tx.subscribe(), c.durable))
    }

    /// The room's current watermark.
    pub fn watermark(&self, room: &RoomId) -> Option<MessageId> {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.get(room).map(|c| c.durable)
    }

    /// Publishes durable timeline entries of one room, in id order, and advances its watermark.
    pub fn publish_timeline(&self, room: &RoomId, entries: Vec<(MessageId, Arc<Event>)>) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = rooms.get_mut(room) else { return };
        for (id, event) in entries {
            if id > c.durable {
                c.durable = id;
            }
            // No receivers is fine.
            let _ = c.tx.send(HubEvent::Timeline { id, event });
        }
    }

    /// Publishes a live-only event to a room's subscribers.
    pub fn publish_live(&self, room: &RoomId, event: Arc<Event>) {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = rooms.get(room) {
            let _ = c.tx.send(HubEvent::Live(event));
        }
    }

    /// Drops a deleted room's channel: its subscribers see the stream end.
    pub fn remove(&self, room: &RoomId) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.remove(room);
    }

    /// Subscribers across rooms, for metrics.
    pub fn subscriber_count(&self) -> usize {
        let rooms = self.rooms.lock().unwrap_or_else(|p| p.into_inner());
        rooms.values().map(|c| c.tx.receiver_count()).sum()
    }
}

/// How far before a cursor's position a resume looks (by the ids' HLC time) for
/// entries that reached a node late and sort before the position.
pub const RESUME_WINDOW_MS: u64 = 60_000;

/// The resume window in force: [`RESUME_WINDOW_MS`] unless a test shortened it for this
/// process (every node of a cluster must use the same).
static RESUME_WINDOW: AtomicU64 = AtomicU64::new(RESUME_WINDOW_MS);

/// The resume window in milliseconds.
pub fn resume_window_ms() -> u64 {
    RESUME_WINDOW.load(Ordering::Relaxed)
}

/// Tests: sets this process's resume window (0 keeps the default).
pub fn set_resume_window_ms(ms: u64) {
    if ms > 0 {
        RESUME_WINDOW.store(ms, Ordering::Relaxed);
    }
}

/// The exclusive lower end of the resume window before `at`.
pub fn window_floor(at: MessageId) -> MessageId {
    MessageId::floor_of_ms(at.physical_ms().saturating_sub(resume_window_ms()))
}

/// An order-independent digest of a set of entry ids: how many, and the XOR of a
/// 64-bit mix of each. Two nodes holding the same entries in a window agree on it;
/// adding and removing an id are the same operation on `hash`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowDigest {
    pub count: u32,
    pub hash: u64,
}

fn mix(id: MessageId) -> u64 {
    let b = id.to_bytes();
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&b[..8]);
    lo.copy_from_slice(&b[8..]);
    // splitmix64 finaliser over both halves.
    let mut z =
        u64::from_be_bytes(hi) ^ u64::from_be_bytes(lo).rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl WindowDigest {
    pub fn add(&mut self, id: MessageId) {
        self.count = self.count.wrapping_add(1);
        self.hash ^= mix(id);
    }

    pub fn remove(&mut self, id: MessageId) {
        self.count = self.count.wrapping_sub(1);
        self.hash ^= mix(id);
    }
}

/// Where a subscriber is in one room: the newest entry id it was sent, and (when the
/// stream could track it) the digest of every id it was sent in the window
/// `(window_floor(id), id]`. On resume a node whose own entries in that window have
/// the same digest resumes exactly after `id`; otherwise it replays the window too
/// (entries the old node lacked), and the client drops ids it already showed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Position {
    pub id: MessageId,
    pub window: Option<WindowDigest>,
}

/// A resume cursor: the position of a subscriber in each room.
/// Text form: `v1:` then `room=32hex` or `room=32hex.count.16hex` pairs joined by `,`
/// (empty map: `v1:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(pub std::collections::BTreeMap<RoomId, Position>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed cursor: {0}")]
pub struct CursorError(pub String);

impl Cursor {
    pub fn encode(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(r, p)| match p.window {
                Some(w) => format!("{r}={}.{}.{:016x}", p.id, w.count, w.hash),
                None => format!("{r}={}", p.id),
            })
            .collect();
        format!("v1:{}", parts.join(","))
    }

    pub fn decode(s: &str) -> Result<Self, CursorError> {
        let body = s
            .strip_prefix("v1:")
            .ok_or_else(|| CursorError("expected a v1: cursor from a Parley event".into()))?;
        let mut map = std::collections::BTreeMap::new();
        if body.is_empty() {
            return Ok(Self(map));
        }
        if body.len() > 64 * 1024 {
            return Err(CursorError("too long".into()));
        }
        for part in body.split(',') {
            let (r, pos) = part
                .split_once('=')
                .ok_or_else(|| CursorError(format!("expected room=id, got {part:?}")))?;
            let room = RoomId::parse(r).map_err(|e| CursorError(e.to_string()))?;
            let mut fields = pos.split('.');
            let id: MessageId = fields
                .next()
                .unwrap_or_default()
                .parse()
                .map_err(|e: crate::ids::IdError| CursorError(e.to_string()))?;
            let window = match (fields.next(), fields.next(), fields.next()) {
                (None, _, _) => None,
                (Some(c), Some(h), None) => {
                    let count = c
                        .parse::<u32>()
                        .map_err(|_| CursorError(format!("bad window count {c:?}")))?;
                    if h.len() != 16 {
                        return Err(CursorError(format!("bad window digest {h:?}")));
                    }
                    let hash = u64::from_str_radix(h, 16)
                        .map_err(|_| CursorError(format!("bad window digest {h:?}")))?;
                    Some(WindowDigest { count, hash })
                }
                _ => {
                    return Err(CursorError(format!(
                        "expected id[.count.digest], got {pos:?}"
                    )))
                }
            };
            map.insert(room, Position { id, window });
        }
        Ok(Self(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn room(n: u64) -> RoomId {
        RoomId::parse(&format!("rm_{n:016x}")).unwrap()
    }

    #[test]
    fn subscribe_returns_watermark_and_later_events() {
        let hub = Hub::new();
        let r = room(1);
        assert!(hub.subscribe(&r).is_none());
        hub.register(&r, MessageId(5));
        hub.register(&r, MessageId(1)); // does not move the watermark back
        let (mut rx, wm) = hub.subscribe(&r).unwrap();
        assert_eq!(wm, MessageId(5));
        hub.publish_timeline(&r, vec![(MessageId(6), Arc::new(Event::default()))]);
        assert_eq!(hub.watermark(&r), Some(MessageId(6)));
        match rx.try_recv().unwrap() {
            HubEvent::Timeline { id, .. } => assert_eq!(id, MessageId(6)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn cursor_roundtrip() {
        let mut c = Cursor::default();
        c.0.insert(
            room(1),
            Position {
                id: MessageId(42),
                window: None,
            },
        );
        let w = WindowDigest {
            count: 7,
            hash: 0xdead_beef_0000_0001,
        };
        c.0.insert(
            room(2),
            Position {
                id: MessageId(u128::MAX),
                window: Some(w),
            },
        );
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        let e = c.encode();
        assert!(Cursor::decode(&e.replace(".7.", ".x.")).is_err());
        assert!(Cursor::decode(&format!("{e}.1")).is_err());
        assert_eq!(Cursor::decode("v1:").unwrap(), Cursor::default());
        assert!(Cursor::decode("garbage").is_err());
        assert!(Cursor::decode("v1:rm_0000000000000001").is_err());
    }

    #[test]
    fn window_digest_is_order_independent_and_removable() {
        let ids: Vec<MessageId> = (1..50u128).map(|i| MessageId(i * 7919)).collect();
        let mut a = WindowDigest::default();
        let mut b = WindowDigest::default();
        for id in &ids {
            a.add(*id);
        }
        for id in ids.iter().rev() {
            b.add(*id);
        }
        assert_eq!(a, b);
        let mut c = a;
        c.add(MessageId(1));
        assert_ne!(a, c);
        c.remove(MessageId(1));
        assert_eq!(a, c);
        let mut d = a;
        d.remove(ids[3]);
        d.add(MessageId(3));
        assert_ne!(a, d, "same count, other member");
    }

    proptest! {
        #[test]
        fn cursor_decode_never_panics(s in ".*") {
            let _ = Cursor::decode(&s);
        }
    }
}
