//! Read markers: per (room, user) the id of the last message read. Merge = max, so a
//! marker never goes backwards, whatever order updates arrive in.

use std::sync::{Arc, Mutex};

use crate::ids::{MessageId, RoomId, UserId};
use crate::store::{Db, StoreError, Tree};

/// Read markers of every room on this node. Cheap to clone.
#[derive(Clone)]
pub struct Markers {
    db: Db,
    tree: Tree,
    // Serializes read-modify-write of a marker.
    lock: Arc<Mutex<()>>,
}

fn key(room: &RoomId, user: &UserId) -> Vec<u8> {
    let mut k = room.as_str().as_bytes().to_vec();
    k.extend_from_slice(user.as_str().as_bytes());
    k
}

impl Markers {
    pub fn open(db: &Db) -> Result<Self, StoreError> {
        Ok(Self {
            db: db.clone(),
            tree: db.tree("markers")?,
            lock: Arc::new(Mutex::new(())),
        })
    }

    /// Moves the marker to `id` if that is later; returns the marker after the call.
    /// Durable before it returns.
    pub async fn mark(
        &self,
        room: &RoomId,
        user: &UserId,
        id: MessageId,
    ) -> Result<MessageId, StoreError> {
        let now = {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            let cur = self.get(room, user)?;
            let next = cur.map_or(id, |c| c.max(id));
            if Some(next) != cur {
                self.tree.insert(key(room, user), next.to_bytes())?;
            }
            next
        };
        self.db.flush().await?;
        Ok(now)
    }

    pub fn get(&self, room: &RoomId, user: &UserId) -> Result<Option<MessageId>, StoreError> {
        match self.tree.get(key(room, user))? {
            Some(v) => MessageId::from_bytes(&v)
                .map(Some)
                .map_err(|e| self.tree.corrupt(e.to_string())),
            None => Ok(None),
        }
    }

    /// Of `members`, those whose marker is at or after `id`.
    pub fn readers(
        &self,
        room: &RoomId,
        id: MessageId,
        members: &[UserId],
    ) -> Result<Vec<UserId>, StoreError> {
        let mut out = Vec::new();
        for u in members {
            if self.get(room, u)?.is_some_and(|m| m >= id) {
                out.push(u.clone());
            }
        }
        Ok(out)
    }

    /// Forgets a deleted room's markers.
    pub fn purge_room(&self, room: &RoomId) -> Result<(), StoreError> {
        let lo = room.as_str().as_bytes().to_vec();
        let mut hi = lo.clone();
        hi.push(0xff);
        self.tree.remove_range(lo..hi)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn markers_never_go_backwards() {
        let db = Db::temporary().unwrap();
        let m = Markers::open(&db).unwrap();
        let r = RoomId::parse("rm_0000000000000001").unwrap();
        let (a, b) = (
            UserId::parse("alice").unwrap(),
            UserId::parse("bob").unwrap(),
        );
        assert_eq!(m.mark(&r, &a, MessageId(10)).await.unwrap(), MessageId(10));
        assert_eq!(m.mark(&r, &a, MessageId(5)).await.unwrap(), MessageId(10));
        assert_eq!(m.mark(&r, &b, MessageId(7)).await.unwrap(), MessageId(7));
        assert_eq!(
            m.readers(&r, MessageId(8), &[a.clone(), b.clone()])
                .unwrap(),
            vec![a.clone()]
        );
        assert_eq!(
            m.readers(&r, MessageId(7), &[a.clone(), b.clone()])
                .unwrap()
                .len(),
            2
        );
    }
}
