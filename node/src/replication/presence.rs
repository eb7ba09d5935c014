//! Presence and typing: ephemeral, in memory.
//!
//! Presence is a last-writer-wins register per user, ordered by the key
//! `(last_seen ms, origin node, offline)`: the later `SetPresence` wins, ties go to the
//! larger node id, and at an equal (last_seen, origin) an offline entry beats the same
//! entry online (so "expired" travels as a newer version of "online").
//!
//! Entries set on this node (`origin` = `None`) and entries merged from gossip
//! ([`Presence::merge_remote`]) live in one map. Either kind is offline once no heartbeat
//! arrived for the TTL: for a local entry the heartbeat is `SetPresence`; for a remote
//! one it is the receipt of its gossip (the origin re-gossips its live local users every
//! TTL/3, see `replication::gossip`). [`Presence::expire`] reports those transitions so
//! the API can announce them. Typing marks, local or gossiped, expire after 5 s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use parley_proto::v1 as pb;

use crate::ids::{NodeId, RoomId, UserId};

/// What a user shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Offline,
    Online,
    Away,
    Busy,
}

impl Status {
    pub fn to_pb(self) -> pb::PresenceState {
        match self {
            Status::Offline => pb::PresenceState::PresenceOffline,
            Status::Online => pb::PresenceState::PresenceOnline,
            Status::Away => pb::PresenceState::PresenceAway,
            Status::Busy => pb::PresenceState::PresenceBusy,
        }
    }

    /// The status of a wire `PresenceState`; `None` for an unknown value.
    pub fn from_pb(state: i32) -> Option<Self> {
        match pb::PresenceState::try_from(state).ok()? {
            pb::PresenceState::PresenceOffline => Some(Status::Offline),
            pb::PresenceState::PresenceOnline => Some(Status::Online),
            pb::PresenceState::PresenceAway => Some(Status::Away),
            pb::PresenceState::PresenceBusy => Some(Status::Busy),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    status: Status,
    heartbeat: Instant,
    last_seen_ms: u64,
    /// Where the user set it; `None` = on this node.
    origin: Option<NodeId>,
}

impl Entry {
    /// The last-writer-wins order; `me` stands in for a local entry's origin.
    fn key(&self, me: NodeId) -> (u64, u64, bool) {
        (
            self.last_seen_ms,
            self.origin.unwrap_or(me).0,
            self.status == Status::Offline,
        )
    }
}

/// A presence entry set on this node, as gossip sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPresence {
    pub user: UserId,
    /// The visible status: an entry whose TTL ran out goes out as offline.
    pub status: Status,
    pub last_seen_ms: u64,
}

/// Typing marks last this long without a refresh.
pub const TYPING_TTL: Duration = Duration::from_secs(5);

/// Presence registers and typing marks of this node's users. Cheap to clone.
#[derive(Clone)]
pub struct Presence {
    ttl: Duration,
    typing_ttl: Duration,
    users: Arc<Mutex<HashMap<UserId, Entry>>>,
    typing: Arc<Mutex<HashMap<(RoomId, UserId), Instant>>>,
}

impl Presence {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            typing_ttl: TYPING_TTL,
            users: Arc::default(),
            typing: Arc::default(),
        }
    }

    /// The same with a shorter typing TTL, for tests.
    #[cfg(test)]
    pub fn with_typing_ttl(mut self, typing_ttl: Duration) -> Self {
        self.typing_ttl = typing_ttl;
        self
    }

    /// Sets the user's status (a heartbeat) on this node. Returns whether the visible
    /// status changed and the entry's last-seen time: `now_ms`, or just past the entry
    /// it replaces if that one is not older (a clock behind another node's must not
    /// lose to the user's earlier presence there).
    pub fn set(&self, user: &UserId, status: Status, now_ms: u64) -> (bool, u64) {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let before = users.get(user).map(|e| self.visible(e));
        let last_seen_ms = match users.get(user) {
            Some(e) if e.last_seen_ms >= now_ms => e.last_seen_ms.saturating_add(1),
            _ => now_ms,
        };
        users.insert(
            user.clone(),
            Entry {
                status,
                heartbeat: Instant::now(),
                last_seen_ms,
                origin: None,
            },
        );
        (before != Some(status), last_seen_ms)
    }

    /// Merges a user's presence gossiped by `origin` (this node is `me`). A newer entry
    /// replaces ours; the same entry again is a heartbeat; an older one is ignored.
    /// Returns the new visible status and last-seen if the visible status changed.
    pub fn merge_remote(
        &self,
        user: &UserId,
        status: Status,
        last_seen_ms: u64,
        origin: NodeId,
        me: NodeId,
    ) -> Option<(Status, u64)> {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let incoming = Entry {
            status,
            heartbeat: Instant::now(),
            last_seen_ms,
            origin: Some(origin),
        };
        let before = match users.get_mut(user) {
            None => Status::Offline,
            Some(cur) => {
                let before = self.visible(cur);
                match incoming.key(me).cmp(&cur.key(me)) {
                    std::cmp::Ordering::Less => return None,
                    // The same version again: a heartbeat for a remote entry. A local
                    // entry echoed back (origin = me) keeps its own heartbeat.
                    std::cmp::Ordering::Equal => {
                        if cur.origin.is_some() {
                            cur.heartbeat = incoming.heartbeat;
                        }
                        let after = self.visible(cur);
                        return (after != before).then_some((after, cur.last_seen_ms));
                    }
                    std::cmp::Ordering::Greater => before,
                }
            }
        };
        users.insert(user.clone(), incoming);
        (status != before).then_some((status, last_seen_ms))
    }

    /// The entries set on this node and heartbeated within `within`, for gossip. An
    /// expired one is reported offline, so peers learn of it before their own TTL runs.
    pub fn local_entries(&self, within: Duration) -> Vec<LocalPresence> {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users
            .iter()
            .filter(|(_, e)| e.origin.is_none() && e.heartbeat.elapsed() <= within)
            .map(|(u, e)| LocalPresence {
                user: u.clone(),
                status: self.visible(e),
                last_seen_ms: e.last_seen_ms,
            })
            .collect()
    }

    /// One user's entry if it was set on this node.
    pub fn local_entry(&self, user: &UserId) -> Option<LocalPresence> {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users
            .get(user)
            .filter(|e| e.origin.is_none())
            .map(|e| LocalPresence {
                user: user.clone(),
                status: self.visible(e),
                last_seen_ms: e.last_seen_ms,
            })
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn visible(&self, e: &Entry) -> Status {
        if e.heartbeat.elapsed() > self.ttl {
            Status::Offline
        } else {
            e.status
        }
    }

    /// The user's visible status and last-seen time (ms; 0 = never seen).
    pub fn get(&self, user: &UserId) -> (Status, u64) {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        users
            .get(user)
            .map_or((Status::Offline, 0), |e| (self.visible(e), e.last_seen_ms))
    }

    /// Users whose TTL ran out since the last call: they are now offline.
    pub fn expire(&self) -> Vec<(UserId, u64)> {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for (u, e) in users.iter_mut() {
            if e.status != Status::Offline && e.heartbeat.elapsed() > self.ttl {
                e.status = Status::Offline;
                out.push((u.clone(), e.last_seen_ms));
            }
        }
        out
    }

    /// Marks or clears typing; returns true if the visible typing state changed.
    pub fn set_typing(&self, room: &RoomId, user: &UserId, typing: bool) -> bool {
        let mut t = self.typing.lock().unwrap_or_else(|p| p.into_inner());
        let k = (room.clone(), user.clone());
        if typing {
            t.insert(k, Instant::now()).is_none()
        } else {
            t.remove(&k).is_some()
        }
    }

    /// Typing marks older than [`TYPING_TTL`] (local or gossiped), removed.
    pub fn expire_typing(&self) -> Vec<(RoomId, UserId)> {
        let mut t = self.typing.lock().unwrap_or_else(|p| p.into_inner());
        let expired: Vec<_> = t
            .iter()
            .filter(|(_, at)| at.elapsed() > self.typing_ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &expired {
            t.remove(k);
        }
        expired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_expires_after_ttl() {
        let p = Presence::new(Duration::from_millis(30));
        let u = UserId::parse("alice").unwrap();
        assert_eq!(p.get(&u).0, Status::Offline);
        assert_eq!(p.set(&u, Status::Online, 1), (true, 1));
        assert_eq!(p.set(&u, Status::Online, 2), (false, 2));
        assert_eq!(p.get(&u), (Status::Online, 2));
        let deadline = Instant::now() + Duration::from_secs(5);
        while p.get(&u).0 != Status::Offline {
            assert!(Instant::now() < deadline, "presence never expired");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(p.expire(), vec![(u.clone(), 2)]);
        assert!(p.expire().is_empty());
    }

    #[test]
    fn typing_set_and_clear() {
        let p = Presence::new(Duration::from_secs(30));
        let r = RoomId::parse("rm_0000000000000001").unwrap();
        let u = UserId::parse("bob").unwrap();
        assert!(p.set_typing(&r, &u, true));
        assert!(!p.set_typing(&r, &u, true));
        assert!(p.set_typing(&r, &u, false));
        assert!(p.expire_typing().is_empty());
    }
}
