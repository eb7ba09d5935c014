//! Read markers: per (room, user) the id of the last message read. Merge = max, so a
//! marker never goes backwards, whatever order updates arrive in. Nodes exchange them by
//! gossip (`replication::gossip`): [`Markers::merge`] applies a batch, [`Markers::scan`]
//! walks the tree in bounded pages for anti-entropy.

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

/// Room ids have a fixed length, so a key splits into (room, user) without a separator.
const ROOM_ID_LEN: usize = 19;

fn split_key(k: &[u8]) -> Option<(RoomId, UserId)> {
    let room = std::str::from_utf8(k.get(..ROOM_ID_LEN)?).ok()?;
    let user = std::str::from_utf8(k.get(ROOM_ID_LEN..)?).ok()?;
    Some((RoomId::parse(room).ok()?, UserId::parse(user).ok()?))
}

/// One read marker: (room, user) -> last message read.
pub type Marker = (RoomId, UserId, MessageId);

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

    /// Merges a batch (max per marker) with one flush; returns the markers that moved
    /// forward, at their new value. Durable before it returns.
    pub async fn merge(&self, batch: &[Marker]) -> Result<Vec<Marker>, StoreError> {
        let mut moved = Vec::new();
        {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            for (room, user, id) in batch {
                let cur = self.get(room, user)?;
                if cur < Some(*id) {
                    self.tree.insert(key(room, user), id.to_bytes())?;
                    moved.push((room.clone(), user.clone(), *id));
                }
            }
        }
        if !moved.is_empty() {
            self.db.flush().await?;
        }
        Ok(moved)
    }

    /// Up to `limit` markers with keys after `after` (`None` = from the start), in key
    /// order, and the cursor to continue from (`None` once the end is reached). Entries
    /// that do not decode are skipped.
    pub fn scan(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<(Vec<Marker>, Option<Vec<u8>>), StoreError> {
        use std::ops::Bound;
        let lo = match after {
            Some(k) => Bound::Excluded(k.to_vec()),
            None => Bound::Unbounded,
        };
        let kvs = self
            .tree
            .range::<Vec<u8>, _>((lo, Bound::Unbounded), limit.max(1))?;
        let next = if kvs.len() >= limit.max(1) {
            kvs.last().map(|(k, _)| k.clone())
        } else {
            None
        };
        let out = kvs
            .iter()
            .filter_map(|(k, v)| {
                let (room, user) = split_key(k)?;
                Some((room, user, MessageId::from_bytes(v).ok()?))
            })
            .collect();
        Ok((out, next))
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

    #[tokio::test]
    async fn merge_keeps_the_max_and_scan_pages_through_all() {
        let db = Db::temporary().unwrap();
        let m = Markers::open(&db).unwrap();
        let r = RoomId::parse("rm_0000000000000001").unwrap();
        let users: Vec<UserId> = (0..5)
            .map(|i| UserId::parse(&format!("u{i}")).unwrap())
            .collect();
        m.mark(&r, &users[0], MessageId(10)).await.unwrap();
        let moved = m
            .merge(&[
                (r.clone(), users[0].clone(), MessageId(3)),
                (r.clone(), users[1].clone(), MessageId(4)),
                (r.clone(), users[0].clone(), MessageId(12)),
            ])
            .await
            .unwrap();
        assert_eq!(
            moved,
            vec![
                (r.clone(), users[1].clone(), MessageId(4)),
                (r.clone(), users[0].clone(), MessageId(12)),
            ]
        );
        assert_eq!(m.get(&r, &users[0]).unwrap(), Some(MessageId(12)));
        for u in &users[2..] {
            m.mark(&r, u, MessageId(1)).await.unwrap();
        }
        let mut seen = Vec::new();
        let mut cursor: Option<Vec<u8>> = None;
        for _ in 0..10 {
            let (page, next) = m.scan(cursor.as_deref(), 2).unwrap();
            assert!(page.len() <= 2);
            seen.extend(page.into_iter().map(|(_, u, _)| u));
            match next {
                Some(n) => cursor = Some(n),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(seen, users);
    }
}
