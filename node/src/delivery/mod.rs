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

/// A resume cursor: the last timeline entry id a subscriber saw in each room.
/// Text form: `v1:` then `room=32hex` pairs joined by `,` (empty map: `v1:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(pub std::collections::BTreeMap<RoomId, MessageId>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed cursor: {0}")]
pub struct CursorError(pub String);

impl Cursor {
    pub fn encode(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|(r, id)| format!("{r}={id}")).collect();
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
            let (r, id) = part
                .split_once('=')
                .ok_or_else(|| CursorError(format!("expected room=id, got {part:?}")))?;
            let room = RoomId::parse(r).map_err(|e| CursorError(e.to_string()))?;
            let id: MessageId = id
                .parse()
                .map_err(|e: crate::ids::IdError| CursorError(e.to_string()))?;
            map.insert(room, id);
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
        c.0.insert(room(1), MessageId(42));
        c.0.insert(room(2), MessageId(u128::MAX));
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert_eq!(Cursor::decode("v1:").unwrap(), Cursor::default());
        assert!(Cursor::decode("garbage").is_err());
        assert!(Cursor::decode("v1:rm_0000000000000001").is_err());
    }

    proptest! {
        #[test]
        fn cursor_decode_never_panics(s in ".*") {
            let _ = Cursor::decode(&s);
        }
    }
}
