//! Admission of sends: how many this node writes at once.
//!
//! A node whose clients keep more sends in flight than it can write does not get
//! faster; it gets later. Every admitted send is a task holding a room lock, a place in
//! the commit round, a push to the replicas and a waiter on the flush, and the runtime
//! runs Raft's heartbeats among them: with thousands in progress the heartbeats come
//! late, the home's lease lapses, and sends are refused for that instead (BENCHMARKS §3,
//! 128 in flight per sender). So a node writes at most `limit` sends at once. A send
//! past the limit waits, costing nothing but its place in line, until one finishes;
//! if none finishes within the wait ([`ADMIT_WAIT`] unless configured) it is refused
//! `UNAVAILABLE`, nothing written, which a client may retry. Sends wait in arrival
//! order.
//!
//! The gate is where the write is made (the room's home, or the receiving node of a
//! W=1 room whose home is unreachable), after routing: a node that only forwards holds
//! no place, so a home is never kept waiting by the sends it forwards elsewhere.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ApiError, ApiResult};

/// Sends a node writes at once by default.
pub const DEFAULT_LIMIT: usize = 512;

/// Longest a send waits for its place before it is refused, by default.
pub const ADMIT_WAIT: Duration = Duration::from_secs(3);

pub struct Admission {
    places: Arc<Semaphore>,
    limit: usize,
    wait: Duration,
    /// Sends that had to wait for a place, and sends refused after waiting.
    pub waited: AtomicU64,
    pub refused: AtomicU64,
}

/// A send's place; given back when dropped.
pub struct Place(#[allow(dead_code)] OwnedSemaphorePermit);

impl Admission {
    pub fn new(limit: usize, wait: Duration) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            places: Arc::new(Semaphore::new(limit)),
            limit,
            wait,
            waited: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Sends being written now.
    pub fn in_progress(&self) -> usize {
        self.limit - self.places.available_permits()
    }

    /// Waits (at most the configured wait) for a place to write one send.
    pub async fn admit(&self) -> ApiResult<Place> {
        let wait = self.wait;
        if let Ok(p) = self.places.clone().try_acquire_owned() {
            return Ok(Place(p));
        }
        self.waited.fetch_add(1, Relaxed);
        match tokio::time::timeout(wait, self.places.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(Place(p)),
            // The semaphore is never closed; a closed one would mean the node is going.
            Ok(Err(_)) => Err(ApiError::Unavailable(
                "this node is shutting down; nothing was written".into(),
            )),
            Err(_) => {
                self.refused.fetch_add(1, Relaxed);
                Err(ApiError::Unavailable(format!(
                    "this node is busy: {} sends in progress and none finished within {wait:?}; nothing was written, try again",
                    self.limit
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sends_past_the_limit_wait_in_order_and_are_refused_after_the_wait() {
        let a = Arc::new(Admission::new(2, ADMIT_WAIT));
        let first = a.admit().await.ok();
        let second = a.admit().await.ok();
        assert!(first.is_some() && second.is_some());
        assert_eq!(a.in_progress(), 2);

        // A third waits for a place; it gets the first one given back.
        let third = {
            let a = a.clone();
            tokio::spawn(async move { a.admit().await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!third.is_finished());
        drop(first);
        let third = third.await.ok().and_then(|r| r.ok());
        assert!(third.is_some());
        assert_eq!(a.in_progress(), 2);

        // With every place held to the end, a send is refused once the wait is over,
        // and the refusal says nothing was written.
        let t = tokio::time::Instant::now();
        let refused = a.admit().await;
        assert!(t.elapsed() >= ADMIT_WAIT);
        match refused {
            Err(ApiError::Unavailable(m)) => assert!(m.contains("nothing was written"), "{m}"),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        assert_eq!(a.waited.load(Relaxed), 2);
        assert_eq!(a.refused.load(Relaxed), 1);
        drop((second, third));
        assert_eq!(a.in_progress(), 0);
    }
}
