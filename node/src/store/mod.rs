//! Storage. The only module that names sled: every other layer sees [`Db`], [`Tree`] and
//! [`Batch`], so swapping the engine is a change to this one file. This module must not
//! know what it stores (no Raft, no automerge, no chat types).
//!
//! Durability: sled makes writes durable only on `flush`, by default every 500 ms. Callers
//! that acknowledge something (a Raft vote or log append, a message send) must await
//! [`Db::flush`] after their write; concurrent callers share one fsync (group commit).

use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

/// Storage failures. Callers map these to `UNAVAILABLE`/internal errors; they never
/// carry user data.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage i/o error: {0}")]
    Io(String),
    #[error("corrupt record in {tree}: {reason}")]
    Corrupt { tree: String, reason: String },
    #[error("storage is shutting down")]
    Closed,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

type Waiter = oneshot::Sender<Result<()>>;

/// An open database. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: sled::Db,
    flush_tx: mpsc::UnboundedSender<Waiter>,
    stats: Arc<FlushStats>,
}

/// Counters exported as metrics.
#[derive(Debug, Default)]
pub struct FlushStats {
    pub flushes: std::sync::atomic::AtomicU64,
    pub waiters: std::sync::atomic::AtomicU64,
    /// How long each flush took: sled writing out its log buffers and the fsync.
    pub flush_seconds: crate::stats::Histogram,
}

/// The default page cache of a store, in MiB (`parley serve --store-cache-mib`).
pub const DEFAULT_CACHE_MIB: u64 = 256;

impl Db {
    /// Opens (or creates) the database under `path` with the default page cache and
    /// starts its group-commit task. Must be called inside a tokio runtime.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_cache(path, DEFAULT_CACHE_MIB * 1024 * 1024)
    }

    /// [`Db::open`] with a page cache of `cache_bytes` (sled counts pages as encoded).
    pub fn open_with_cache(path: &Path, cache_bytes: u64) -> Result<Self> {
        let inner = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        Ok(Self::start(inner))
    }

    /// A throwaway database in a temporary location (tests).
    pub fn temporary() -> Result<Self> {
        let inner = sled::Config::new().temporary(true).open()?;
        Ok(Self::start(inner))
    }

    fn start(inner: sled::Db) -> Self {
        let (flush_tx, flush_rx) = mpsc::unbounded_channel();
        let stats = Arc::new(FlushStats::default());
        tokio::spawn(group_commit(inner.clone(), flush_rx, stats.clone()));
        Self {
            inner,
            flush_tx,
            stats,
        }
    }

    pub fn tree(&self, name: &str) -> Result<Tree> {
        Ok(Tree {
            inner: self.inner.open_tree(name)?,
            name: name.to_owned(),
        })
    }

    /// Makes every write that completed before this call durable. Concurrent callers are
    /// served by one fsync.
    pub async fn flush(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.flush_tx.send(tx).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Blocking flush, for shutdown paths outside the runtime.
    pub fn flush_blocking(&self) -> Result<()> {
        self.inner.flush()?;
        Ok(())
    }

    pub fn stats(&self) -> &FlushStats {
        &self.stats
    }

    /// Bytes on disk, for metrics.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.size_on_disk().unwrap_or(0)
    }
}

/// One task owns the fsync: it takes every waiter queued so far, flushes once, answers all.
/// A waiter that arrived during a flush is served by the next one, whose flush started
/// after its write.
async fn group_commit(
    db: sled::Db,
    mut rx: mpsc::UnboundedReceiver<Waiter>,
    stats: Arc<FlushStats>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let db2 = db.clone();
        let stats2 = stats.clone();
        let flush = move || {
            let t = std::time::Instant::now();
            let r = db2.flush();
            stats2.flush_seconds.observe(t.elapsed());
            r
        };
        let res = match tokio::task::spawn_blocking(flush).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StoreError::from(e)),
            Err(e) => Err(StoreError::Io(format!("flush task failed: {e}"))),
        };
        stats.flushes.fetch_add(1, Relaxed);
        stats.waiters.fetch_add(waiters.len() as u64, Relaxed);
        for w in waiters {
            let _ = w.send(res.clone());
        }
    }
}

/// A named keyspace. Keys sort bytewise.
#[derive(Clone)]
pub struct Tree {
    inner: sled::Tree,
    name: String,
}

/// Writes applied to one [`Tree`] atomically.
#[derive(Default)]
pub struct Batch(sled::Batch);

impl Batch {
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.0.insert(key.as_ref(), value.as_ref());
    }

    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.0.remove(key.as_ref());
    }
}

/// A key/value pair read from a tree.
pub type Kv = (Vec<u8>, Vec<u8>);

impl Tree {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        Ok(self.inner.get(key)?.map(|v| v.to_vec()))
    }

    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        self.inner.insert(key.as_ref(), value.as_ref())?;
        Ok(())
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<()> {
        self.inner.remove(key.as_ref())?;
        Ok(())
    }

    pub fn contains(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.inner.contains_key(key)?)
    }

    pub fn apply(&self, batch: Batch) -> Result<()> {
        self.inner.apply_batch(batch.0)?;
        Ok(())
    }

    /// Pairs with keys in `range`, ascending, at most `limit`.
    pub fn range<K, R>(&self, range: R, limit: usize) -> Result<Vec<Kv>>
    where
        K: AsRef<[u8]>,
        R: RangeBounds<K>,
    {
        self.range_map(range, false, limit, |k, v| {
            Ok(Some((k.to_vec(), v.to_vec())))
        })
    }

    /// Pairs with keys in `range`, descending, at most `limit`.
    pub fn range_rev<K, R>(&self, range: R, limit: usize) -> Result<Vec<Kv>>
    where
        K: AsRef<[u8]>,
        R: RangeBounds<K>,
    {
        self.range_map(range, true, limit, |k, v| {
            Ok(Some((k.to_vec(), v.to_vec())))
        })
    }

    /// Walks the pairs with keys in `range` (descending if `rev`), passing each to `f`,
    /// and returns the first `limit` values `f` kept (`Some`). Stops at `f`'s first error.
    pub fn range_map<K, R, T>(
        &self,
        range: R,
        rev: bool,
        limit: usize,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<Option<T>>,
    ) -> Result<Vec<T>>
    where
        K: AsRef<[u8]>,
        R: RangeBounds<K>,
    {
        let mut out = Vec::new();
        let mut iter = self.inner.range(range);
        while out.len() < limit {
            let next = if rev { iter.next_back() } else { iter.next() };
            let Some(kv) = next else { break };
            let (k, v) = kv?;
            if let Some(t) = f(&k, &v)? {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Every pair whose key starts with `prefix`, ascending.
    pub fn scan_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<Vec<Kv>> {
        let mut out = Vec::new();
        for kv in self.inner.scan_prefix(prefix) {
            let (k, v) = kv?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Removes every key in `range`; returns how many.
    pub fn remove_range<K, R>(&self, range: R) -> Result<usize>
    where
        K: AsRef<[u8]>,
        R: RangeBounds<K>,
    {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in self.inner.range(range).keys() {
            batch.remove(k?);
            n += 1;
        }
        self.inner.apply_batch(batch)?;
        Ok(n)
    }

    /// The pair with the greatest key that starts with `prefix`.
    pub fn last_with_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<Option<Kv>> {
        match self.inner.scan_prefix(prefix).next_back() {
            Some(kv) => {
                let (k, v) = kv?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    /// The pair with the smallest key that starts with `prefix`.
    pub fn first_with_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<Option<Kv>> {
        match self.inner.scan_prefix(prefix).next() {
            Some(kv) => {
                let (k, v) = kv?;
                Ok(Some((k.to_vec(), v.to_vec())))
            }
            None => Ok(None),
        }
    }

    pub fn corrupt(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            tree: self.name.clone(),
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batch_range_and_group_flush() -> Result<()> {
        let db = Db::temporary()?;
        let t = db.tree("t")?;
        let mut b = Batch::default();
        for i in 0u8..10 {
            b.insert([1, i], [i]);
        }
        b.insert([2, 0], [9]);
        t.apply(b)?;
        let futs: Vec<_> = (0..32).map(|_| db.flush()).collect();
        for r in futures::future::join_all(futs).await {
            r?;
        }
        assert!(
            db.stats()
                .flushes
                .load(std::sync::atomic::Ordering::Relaxed)
                <= 32
        );
        assert_eq!(t.scan_prefix([1])?.len(), 10);
        assert_eq!(t.range([1u8, 3]..[1u8, 6], 100)?.len(), 3);
        assert_eq!(t.range_rev([1u8, 0]..[2u8, 0], 2)?[0].0, vec![1, 9]);
        assert_eq!(t.last_with_prefix([1])?.map(|kv| kv.1), Some(vec![9]));
        // Odd values only, newest first, two of them; an error from `f` stops the walk.
        let odd = t.range_map([1u8, 0]..[2u8, 0], true, 2, |_, v| {
            Ok((v[0] % 2 == 1).then_some(v[0]))
        })?;
        assert_eq!(odd, vec![9, 7]);
        let failed = t.range_map([1u8, 0]..[2u8, 0], false, 10, |_, v| match v[0] {
            3 => Err(t.corrupt("three")),
            n => Ok(Some(n)),
        });
        assert!(matches!(failed, Err(StoreError::Corrupt { .. })));
        assert_eq!(t.remove_range([1u8, 0]..[1u8, 5])?, 5);
        assert_eq!(t.scan_prefix([1])?.len(), 5);
        Ok(())
    }
}
