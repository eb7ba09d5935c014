//! The Raft log of one group, kept in its own store tree (`raft-<group>`).
//!
//! Keys in the tree (shared with the group's [`super::state_machine`], which uses `s/`):
//! - `l` + index (big-endian u64): one encoded log entry, so entries sort by index;
//! - `m/vote`, `m/committed`, `m/purged`: the last saved vote, the last committed log id
//!   and the last purged log id.
//!
//! To stay correct:
//! - `save_vote` returns only after the vote is flushed to disk: a node that voted must
//!   never vote differently in the same term after a crash.
//! - `append` writes the entries, awaits [`Db::flush`] (one fsync shared with every other
//!   writer of the node) and only then reports `log_io_completed`; openraft counts an entry
//!   towards a quorum only once that callback fired.
//! - `truncate` and `purge` are flushed before they return, and `purge` records the purged
//!   log id before deleting entries, so [`LogState`] never reports a hole.
//! - On the group's leader, `save_committed` is flushed before it returns. openraft
//!   saves the commit index before it applies entries and answers their writers, and a
//!   leader that restarts in the same term (its vote committed) resumes leading at once
//!   and answers linearizable reads up to `max(its first entry of the term, the saved
//!   commit index)`. A saved index that lagged what was acknowledged would let such a
//!   read miss an acknowledged change until the next write committed (FAULTS.md,
//!   anomaly 6). A follower's commit index is not flushed on its own (losing it only
//!   delays re-applying on a restart, and a follower never resumes as leader); it rides
//!   along with the next flush, so heartbeats that move it do not wait for an fsync.
//! - Calls are serialized by openraft (one `&mut self` at a time); readers cloned through
//!   `get_log_reader` only read committed-or-appended entries.

// openraft's `StorageError` and tonic's `Status` are large by design and fixed by the traits
// implemented here; boxing them in private helpers would only add conversions.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError};

use super::codec;
use super::typ::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::store::{Batch, Db, Tree};

const LOG_PREFIX: u8 = b'l';
const KEY_VOTE: &[u8] = b"m/vote";
const KEY_COMMITTED: &[u8] = b"m/committed";
const KEY_PURGED: &[u8] = b"m/purged";

fn log_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LOG_PREFIX;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

/// The key just past every log entry.
const LOG_END: [u8; 1] = [LOG_PREFIX + 1];

/// The Raft log storage of one group. Cheap to clone; clones share the tree.
#[derive(Clone)]
pub struct LogStore {
    db: Db,
    tree: Tree,
    /// This node's id, to tell whether it leads the group (`None`: treated as leader).
    node: Option<u64>,
}

fn io_read(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn io_write(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    /// A log store over `tree` (normally `db.tree("raft-<group>")`) that does not know
    /// its node: it flushes every commit index it saves.
    pub fn new(db: Db, tree: Tree) -> Self {
        Self {
            db,
            tree,
            node: None,
        }
    }

    /// A log store of node `node`: it flushes the commit index only while `node` leads
    /// the group (its saved vote is committed and its own).
    pub fn of_node(db: Db, tree: Tree, node: u64) -> Self {
        Self {
            db,
            tree,
            node: Some(node),
        }
    }

    /// Whether this node leads the group by its saved vote (always, without a node id).
    fn leads(&self) -> Result<bool, StorageError> {
        let Some(me) = self.node else {
            return Ok(true);
        };
        let vote: Option<Vote> = self.read_meta(KEY_VOTE)?;
        Ok(vote.is_some_and(|v| v.is_committed() && v.leader_id().voted_for() == Some(me)))
    }

    /// True when nothing was ever written: no vote, no entry, nothing purged. Only such a
    /// group may be initialized.
    pub fn is_pristine(&self) -> Result<bool, StorageError> {
        let vote = self.tree.contains(KEY_VOTE).map_err(io_read)?;
        let purged = self.tree.contains(KEY_PURGED).map_err(io_read)?;
        let entry = self.tree.first_with_prefix([LOG_PREFIX]).map_err(io_read)?;
        Ok(!vote && !purged && entry.is_none())
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match self.tree.get(key).map_err(io_read)? {
            None => Ok(None),
            Some(bytes) => codec::decode(&bytes).map(Some).map_err(|e| {
                io_read(
                    self.tree
                        .corrupt(format!("{}: {e}", String::from_utf8_lossy(key))),
                )
            }),
        }
    }

    fn decode_entry(&self, key: &[u8], bytes: &[u8]) -> Result<Entry, StorageError> {
        codec::decode(bytes)
            .map_err(|e| io_read(self.tree.corrupt(format!("log entry {key:?}: {e}"))))
    }

    async fn flush(&self) -> Result<(), StorageError> {
        self.db.flush().await.map_err(io_write)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => Some(i),
            Bound::Excluded(&i) => i.checked_add(1),
            Bound::Unbounded => Some(0),
        };
        let Some(start) = start else {
            return Ok(Vec::new());
        };
        let end: Bound<Vec<u8>> = match range.end_bound() {
            Bound::Included(&i) => Bound::Included(log_key(i).to_vec()),
            Bound::Excluded(&i) => Bound::Excluded(log_key(i).to_vec()),
            Bound::Unbounded => Bound::Excluded(LOG_END.to_vec()),
        };
        let lo = log_key(start).to_vec();
        if let Bound::Included(hi) | Bound::Excluded(hi) = &end {
            if hi < &lo {
                return Ok(Vec::new());
            }
        }
        let kvs = self
            .tree
            .range::<Vec<u8>, _>((Bound::Included(lo), end), usize::MAX)
            .map_err(io_read)?;
        kvs.iter().map(|(k, v)| self.decode_entry(k, v)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(KEY_PURGED)?;
        let last = match self.tree.last_with_prefix([LOG_PREFIX]).map_err(io_read)? {
            Some((k, v)) => Some(self.decode_entry(&k, &v)?.log_id),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.tree
            .insert(KEY_VOTE, codec::encode(vote))
            .map_err(|e| StorageError::from(StorageIOError::write_vote(&e)))?;
        self.db
            .flush()
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_vote(&e)))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.read_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        match committed {
            Some(c) => self.tree.insert(KEY_COMMITTED, codec::encode(&c)),
            None => self.tree.remove(KEY_COMMITTED),
        }
        .map_err(io_write)?;
        if self.leads()? {
            self.flush().await?;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.read_meta(KEY_COMMITTED)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Batch::default();
        for entry in entries {
            batch.insert(log_key(entry.log_id.index), codec::encode(&entry));
        }
        self.tree.apply(batch).map_err(io_write)?;
        crate::crash_point!("raft-append-before-flush");
        match self.db.flush().await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(io_write(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.tree
            .remove_range(log_key(log_id.index).to_vec()..LOG_END.to_vec())
            .map_err(io_write)?;
        self.flush().await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.tree
            .insert(KEY_PURGED, codec::encode(&log_id))
            .map_err(io_write)?;
        self.tree
            .remove_range(log_key(0).to_vec()..=log_key(log_id.index).to_vec())
            .map_err(io_write)?;
        self.flush().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::consensus::state_machine::StateMachine;
    use crate::consensus::test_support::open_db;
    use crate::ids::GroupId;
    use openraft::testing::{StoreBuilder, Suite};

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, Db> for Builder {
        async fn build(&self) -> Result<(Db, LogStore, StateMachine), StorageError> {
            let db = Db::temporary().map_err(io_write)?;
            let tree = db.tree("raft-1").map_err(io_write)?;
            let (events, _) = tokio::sync::broadcast::channel(16);
            let sm = StateMachine::open(GroupId(1), db.clone(), tree.clone(), events)?;
            Ok((db.clone(), LogStore::new(db, tree), sm))
        }
    }

    #[test]
    fn openraft_storage_suite() -> Result<(), StorageError> {
        Suite::test_all(Builder)
    }

    #[tokio::test]
    async fn vote_and_log_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open_db(dir.path()).await;
            let mut ls = LogStore::new(db.clone(), db.tree("raft-1").unwrap());
            assert!(ls.is_pristine().unwrap());
            ls.save_vote(&Vote::new(4, 1)).await.unwrap();
            ls.purge(LogId::new(openraft::CommittedLeaderId::new(1, 1), 3))
                .await
                .unwrap();
        }
        let db = open_db(dir.path()).await;
        let mut ls = LogStore::new(db.clone(), db.tree("raft-1").unwrap());
        assert!(!ls.is_pristine().unwrap());
        assert_eq!(ls.read_vote().await.unwrap(), Some(Vote::new(4, 1)));
        let st = ls.get_log_state().await.unwrap();
        assert_eq!(st.last_log_id.map(|l| l.index), Some(3));
        assert_eq!(st.last_purged_log_id, st.last_log_id);
    }
}
