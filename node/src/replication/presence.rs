//! Presence and typing: ephemeral, in memory.
//!
//! Presence is a last-writer-wins register per user. A user who stops heartbeating
//! (`set` is the heartbeat) is offline once the TTL passes; [`Presence::expire`] reports
//! those transitions so the API can announce them. Typing marks expire after 5 s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ids::{RoomId, UserId};

/// What a user shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Offline,
    Online,
    Away,
    Busy,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    status: Status,
    heartbeat: Instant,
    last_seen_ms: u64,
}

/// Typing marks last this long without a refresh.
pub const TYPING_TTL: Duration = Duration::from_secs(5);

/// Presence registers and typing marks of this node's users. Cheap to clone.
#[derive(Clone)]
pub struct Presence {
    ttl: Duration,
    users: Arc<Mutex<HashMap<UserId, Entry>>>,
    typing: Arc<Mutex<HashMap<(RoomId, UserId), Instant>>>,
}

impl Presence {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            users: Arc::default(),
            typing: Arc::default(),
        }
    }

    /// Sets the user's status (a heartbeat). Returns true if the visible status changed.
    pub fn set(&self, user: &UserId, status: Status, now_ms: u64) -> bool {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let before = users.get(user).map(|e| self.visible(e));
        users.insert(
            user.clone(),
            Entry {
                status,
                heartbeat: Instant::now(),
                last_seen_ms: now_ms,
            },
        );
        before != Some(status)
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

    /// Typing marks older than [`TYPING_TTL`], removed.
    pub fn expire_typing(&self) -> Vec<(RoomId, UserId)> {
        let mut t = self.typing.lock().unwrap_or_else(|p| p.into_inner());
        let expired: Vec<_> = t
            .iter()
            .filter(|(_, at)| at.elapsed() > TYPING_TTL)
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
        assert!(p.set(&u, Status::Online, 1));
        assert!(!p.set(&u, Status::Online, 2));
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
