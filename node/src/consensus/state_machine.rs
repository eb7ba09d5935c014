//! The openraft state machine of one group: the pure [`state::State`] behind a lock, plus
//! what openraft needs around it (last applied log id, last membership, snapshots).
//!
//! The state lives in memory. It is made durable by snapshots, stored in the group's tree
//! under `s/snapshot`, and by the Raft log: on open, the stored snapshot is loaded and
//! openraft re-applies the log entries after it.
//!
//! To stay correct:
//! - `apply` is only called by openraft, in log order, one batch at a time; it changes the
//!   state only through [`state::apply`], so every replica computes the same state.
//! - A snapshot is flushed to disk before `build_snapshot`/`install_snapshot` return,
//!   because openraft purges the log entries it covers right after.
//! - Readers ([`StateMachine::state`]) take the read lock for the length of a closure; the
//!   write lock is held for one entry at a time, so reads never block for long.
//! - An [`AppliedEvent`] is sent for each successful command. It is at-least-once: after a
//!   restart the entries after the snapshot are applied (and announced) again.

// openraft's `StorageError` and tonic's `Status` are large by design and fixed by the traits
// implemented here; boxing them in private helpers would only add conversions.
#![allow(clippy::result_large_err)]

use std::io::Cursor;
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::codec;
use super::groups::AppliedEvent;
use super::state::{self, State};
use super::typ::{
    Entry, LogId, Reply, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::ids::GroupId;
use crate::store::{Db, Tree};

const KEY_SNAPSHOT: &[u8] = b"s/snapshot";

/// The snapshot payload that travels to other nodes (openraft's `SnapshotData`).
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    state: State,
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

/// The current snapshot as stored on disk: its metadata and the encoded [`SnapshotBody`].
#[derive(Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// What the state machine and its snapshot builders share.
struct Shared {
    group: GroupId,
    db: Db,
    tree: Tree,
    current: Mutex<Option<StoredSnapshot>>,
}

impl Shared {
    /// Stores `snap` as the current snapshot, durably.
    async fn persist(&self, snap: StoredSnapshot) -> Result<(), StorageError> {
        let sig = Some(snap.meta.signature());
        self.tree
            .insert(KEY_SNAPSHOT, codec::encode(&snap))
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(sig.clone(), &e)))?;
        self.db
            .flush()
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(sig, &e)))?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(snap);
        Ok(())
    }
}

/// The state machine of one group.
pub struct StateMachine {
    shared: Arc<Shared>,
    state: Arc<RwLock<State>>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    events: broadcast::Sender<AppliedEvent>,
    /// Distinguishes snapshots built at the same log id.
    snapshot_seq: u64,
}

impl StateMachine {
    /// Opens the state machine of `group` over its tree, starting from the stored snapshot
    /// if there is one.
    pub fn open(
        group: GroupId,
        db: Db,
        tree: Tree,
        events: broadcast::Sender<AppliedEvent>,
    ) -> Result<Self, StorageError> {
        let read_err = |e: &dyn std::error::Error| {
            StorageError::from(StorageIOError::read_snapshot(
                None,
                openraft::AnyError::error(e.to_string()),
            ))
        };
        let stored: Option<StoredSnapshot> =
            match tree.get(KEY_SNAPSHOT).map_err(|e| read_err(&e))? {
                None => None,
                Some(bytes) => Some(
                    codec::decode(&bytes).map_err(|e| read_err(&tree.corrupt(e.to_string())))?,
                ),
            };
        let (state, last_applied, membership) = match &stored {
            None => (State::default(), None, StoredMembership::default()),
            Some(s) => {
                let body: SnapshotBody =
                    codec::decode(&s.data).map_err(|e| read_err(&tree.corrupt(e.to_string())))?;
                (
                    body.state,
                    s.meta.last_log_id,
                    s.meta.last_membership.clone(),
                )
            }
        };
        Ok(Self {
            shared: Arc::new(Shared {
                group,
                db,
                tree,
                current: Mutex::new(stored),
            }),
            state: Arc::new(RwLock::new(state)),
            last_applied,
            membership,
            events,
            snapshot_seq: 0,
        })
    }

    /// The state, shared with readers. Lock it only for short, synchronous reads.
    pub fn state(&self) -> Arc<RwLock<State>> {
        self.state.clone()
    }
}

/// Builds a snapshot from a copy of the state taken when openraft asked for the builder,
/// so the copy matches `last_applied` exactly while the state machine moves on.
pub struct SnapshotBuilder {
    shared: Arc<Shared>,
    body: SnapshotBody,
    snapshot_id: String,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let meta = SnapshotMeta {
            last_log_id: self.body.last_applied,
            last_membership: self.body.membership.clone(),
            snapshot_id: self.snapshot_id.clone(),
        };
        let data = codec::encode(&self.body);
        crate::crash_point!("raft-snapshot-build");
        self.shared
            .persist(StoredSnapshot {
                meta: meta.clone(),
                data: data.clone(),
            })
            .await?;
        tracing::debug!(group = %self.shared.group, snapshot = %meta.snapshot_id, "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => replies.push(Reply::Internal),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    replies.push(Reply::Internal);
                }
                EntryPayload::Normal(command) => {
                    let outcome = {
                        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
                        state::apply(&mut st, command.clone())
                    };
                    if let Ok(applied) = &outcome {
                        // No receiver is fine: nobody is subscribed yet.
                        let _ = self.events.send(AppliedEvent {
                            group: self.shared.group,
                            command,
                            applied: applied.clone(),
                        });
                    }
                    replies.push(Reply::Command(outcome));
                }
            }
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_seq += 1;
        let state = self.state.read().unwrap_or_else(|p| p.into_inner()).clone();
        let snapshot_id = match self.last_applied {
            Some(l) => format!(
                "{}-{}-{}-{}",
                l.leader_id.term, l.leader_id.node_id, l.index, self.snapshot_seq
            ),
            None => format!("none-{}", self.snapshot_seq),
        };
        SnapshotBuilder {
            shared: self.shared.clone(),
            body: SnapshotBody {
                state,
                last_applied: self.last_applied,
                membership: self.membership.clone(),
            },
            snapshot_id,
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let body: SnapshotBody = codec::decode(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        crate::crash_point!("raft-snapshot-install-before-persist");
        self.shared
            .persist(StoredSnapshot {
                meta: meta.clone(),
                data,
            })
            .await?;
        crate::crash_point!("raft-snapshot-install-after-persist");
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = body.state;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let current = self
            .shared
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(current.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
