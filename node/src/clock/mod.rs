//! Hybrid logical clock. Owns the assignment of [`MessageId`]s: strictly increasing on
//! this node, never below an id the node has observed (so a sender's next message sorts
//! after the last one it saw, whichever node wrote that), and close to wall-clock time.
//! Never touches storage or the network.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::ids::MessageId;

/// Wall-clock milliseconds since the Unix epoch, shifted by a test-only offset.
pub fn now_ms(offset_ms: i64) -> u64 {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    (wall + offset_ms).max(0) as u64
}

#[derive(Debug, Default)]
struct Inner {
    physical: u64,
    logical: u16,
    seq: u32,
}

/// A hybrid logical clock for one node. Cheap to share (`Arc<Hlc>`).
#[derive(Debug)]
pub struct Hlc {
    node: u32,
    offset_ms: i64,
    inner: Mutex<Inner>,
}

impl Hlc {
    pub fn new(node: u32, offset_ms: i64) -> Self {
        Self {
            node,
            offset_ms,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Wall-clock ms as this node sees it.
    pub fn wall_ms(&self) -> u64 {
        now_ms(self.offset_ms)
    }

    /// The later of this node's wall clock and the newest id it issued or observed, in
    /// ms: "now" as the room's ids see it, without issuing an id.
    pub fn latest_ms(&self) -> u64 {
        let wall = self.wall_ms();
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        wall.max(g.physical)
    }

    /// A new id greater than every id this clock issued or observed, and greater than `after`.
    pub fn next(&self, after: Option<MessageId>) -> MessageId {
        let wall = self.wall_ms();
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = after {
            Self::observe_locked(&mut g, a);
        }
        if wall > g.physical {
            g.physical = wall;
            g.logical = 0;
        } else if g.logical == u16::MAX {
            // The logical counter is exhausted within one millisecond: borrow the next ms.
            g.physical += 1;
            g.logical = 0;
        } else {
            g.logical += 1;
        }
        g.seq = g.seq.wrapping_add(1);
        MessageId::new(g.physical, g.logical, self.node, g.seq)
    }

    /// Moves the clock past an id seen from elsewhere (a client's last-seen id, a peer's change).
    pub fn observe(&self, id: MessageId) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Self::observe_locked(&mut g, id);
    }

    fn observe_locked(g: &mut Inner, id: MessageId) {
        let (p, l) = (id.physical_ms(), id.logical());
        if (p, l) > (g.physical, g.logical) {
            g.physical = p;
            g.logical = l;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_strictly_increase_and_follow_observed() {
        let c = Hlc::new(7, 0);
        let mut last = c.next(None);
        for _ in 0..10_000 {
            let n = c.next(None);
            assert!(n > last);
            last = n;
        }
        let future = MessageId::new(c.wall_ms() + 60_000, 5, 1, 1);
        let n = c.next(Some(future));
        assert!(
            n > future,
            "next id must sort after the client's last-seen id"
        );
        assert_eq!(n.node(), 7);
    }

    #[test]
    fn skewed_clock_offsets_wall_time() {
        let c = Hlc::new(1, -3_600_000);
        let d = now_ms(0) - c.wall_ms();
        assert!((3_599_000..=3_601_000).contains(&d));
    }
}
