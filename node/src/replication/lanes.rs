//! Push lanes: one queue and one task per peer that carries the pushes of many rooms in
//! one `PushBatch` call.
//!
//! Under load a node's commit pipeline flushes many rooms at once, and each room's
//! pusher then pushes its change to each peer. Sent one call per room, every change
//! pays for an HTTP/2 stream, its headers and a task on both sides, and pushes were
//! most of a node's calls (BENCHMARKS §3). A lane keeps one call in flight to its
//! peer: pushes queued meanwhile leave together in the next call, so the number of
//! calls follows the network's round trips, not the number of rooms.
//!
//! To stay correct:
//! - A lane sends pushes in the order they were queued and has one call in flight, so a
//!   room's changes reach the peer in the order its pusher sent them.
//! - Every queued push is answered exactly once: with its own outcome, or with the
//!   call's error for every push of a failed call. A push whose caller stopped waiting
//!   (its quorum deadline passed) is dropped unsent; anti-entropy brings the change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parley_proto::v1::{PushChangesReply, PushChangesRequest};
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};

/// Most pushes in one call.
const MAX_PUSHES: usize = 256;
/// Most bytes of changes in one call (a single larger push still goes, alone).
const MAX_BYTES: usize = 1024 * 1024;
/// How long one call may take before its pushes fail as timed out.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// What a lane sends a batch with.
#[tonic::async_trait]
pub trait BatchTransport: Send + Sync + 'static {
    /// Sends `pushes` to `node` in one call: one outcome per push in the same order, or
    /// why the call failed as a whole.
    async fn push_batch(
        &self,
        node: u64,
        pushes: Vec<PushChangesRequest>,
        timeout: Duration,
    ) -> Result<Vec<Result<PushChangesReply, String>>, String>;
}

type Queued = (
    PushChangesRequest,
    oneshot::Sender<Result<PushChangesReply, String>>,
);

/// The lanes of one node, started on first use; they end when this is dropped.
pub struct PushLanes<T: BatchTransport> {
    transport: Arc<T>,
    lanes: Mutex<HashMap<u64, mpsc::UnboundedSender<Queued>>>,
}

impl<T: BatchTransport> PushLanes<T> {
    pub fn new(transport: T) -> Self {
        Self {
            transport: Arc::new(transport),
            lanes: Mutex::new(HashMap::new()),
        }
    }

    /// What the lanes send with.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    fn start_lane(&self, node: u64) -> mpsc::UnboundedSender<Queued> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_lane(self.transport.clone(), node, rx));
        tx
    }

    /// Queues `req` on `node`'s lane and waits for its outcome.
    pub async fn push(
        &self,
        node: u64,
        req: PushChangesRequest,
    ) -> Result<PushChangesReply, String> {
        let (tx, rx) = oneshot::channel();
        {
            let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            let lane = lanes.entry(node).or_insert_with(|| self.start_lane(node));
            if let Err(mpsc::error::SendError(queued)) = lane.send((req, tx)) {
                // The lane's task is gone (its runtime is shutting down): start afresh.
                *lane = self.start_lane(node);
                let _ = lane.send(queued);
            }
        }
        rx.await
            .map_err(|_| format!("the push lane to node {node} stopped"))?
    }
}

/// Sends `node`'s queued pushes, as many as are waiting (within the limits) per call.
async fn run_lane<T: BatchTransport>(
    transport: Arc<T>,
    node: u64,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) {
    while let Some(first) = rx.recv().await {
        let mut bytes = first.0.encoded_len();
        let mut batch = vec![first];
        while batch.len() < MAX_PUSHES && bytes < MAX_BYTES {
            match rx.try_recv() {
                Ok(q) => {
                    bytes += q.0.encoded_len();
                    batch.push(q);
                }
                Err(_) => break,
            }
        }
        batch.retain(|(_, tx)| !tx.is_closed());
        if batch.is_empty() {
            continue;
        }
        let (pushes, answers): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let n = pushes.len();
        let outcomes = match transport.push_batch(node, pushes, CALL_TIMEOUT).await {
            Ok(outcomes) if outcomes.len() == n => Ok(outcomes),
            Ok(outcomes) => Err(format!(
                "node {node} answered {} of {n} pushes",
                outcomes.len()
            )),
            Err(e) => Err(e),
        };
        match outcomes {
            Ok(outcomes) => {
                for (tx, outcome) in answers.into_iter().zip(outcomes) {
                    let _ = tx.send(outcome);
                }
            }
            Err(e) => {
                for tx in answers {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::Notify;

    /// Records every call; holds the first call until released, so that pushes queue.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<(u64, Vec<String>)>>,
        hold_first: Option<Arc<Notify>>,
        fail: bool,
        short: bool,
    }

    #[tonic::async_trait]
    impl BatchTransport for Recorder {
        async fn push_batch(
            &self,
            node: u64,
            pushes: Vec<PushChangesRequest>,
            _timeout: Duration,
        ) -> Result<Vec<Result<PushChangesReply, String>>, String> {
            let first = {
                let mut calls = self.calls.lock().unwrap();
                calls.push((node, pushes.iter().map(|p| p.room_id.clone()).collect()));
                calls.len() == 1
            };
            if first {
                if let Some(n) = &self.hold_first {
                    n.notified().await;
                }
            }
            if self.fail {
                return Err("connection refused".into());
            }
            let mut out: Vec<_> = pushes
                .iter()
                .map(|p| {
                    Ok(PushChangesReply {
                        durable: true,
                        rejected: format!("{}@{node}", p.room_id),
                    })
                })
                .collect();
            if self.short {
                out.pop();
            }
            Ok(out)
        }
    }

    fn req(room: &str) -> PushChangesRequest {
        PushChangesRequest {
            room_id: room.into(),
            ..Default::default()
        }
    }

    /// Waits (bounded) until `rec` has seen `n` calls.
    async fn calls_reach(rec: &Recorder, n: usize) {
        for _ in 0..500 {
            if rec.calls.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("never saw {n} calls: {:?}", rec.calls.lock().unwrap());
    }

    type Lanes = Arc<PushLanes<Recorder>>;
    type Answer = tokio::task::JoinHandle<Result<PushChangesReply, String>>;

    /// Lanes whose first call (a push to node 2 in `room`) is in flight and held until
    /// `hold` is notified, so that later pushes queue behind it.
    async fn held_lane(room: &str) -> (Lanes, Arc<Notify>, Answer) {
        let hold = Arc::new(Notify::new());
        let lanes = Arc::new(PushLanes::new(Recorder {
            hold_first: Some(hold.clone()),
            ..Default::default()
        }));
        let first = tokio::spawn({
            let l = lanes.clone();
            let room = room.to_string();
            async move { l.push(2, req(&room)).await }
        });
        calls_reach(&lanes.transport, 1).await;
        (lanes, hold, first)
    }

    #[tokio::test]
    async fn pushes_queued_behind_a_call_leave_together_in_order() {
        let (lanes, hold, first) = held_lane("r0").await;
        // The first call is in flight: these queue and must share the next call.
        let rest: Vec<_> = (1..=5)
            .map(|i| {
                let l = lanes.clone();
                let room = format!("r{i}");
                tokio::spawn(async move { l.push(2, req(&room)).await })
            })
            .collect();
        // Let every push reach the queue before the first call returns.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        hold.notify_one();
        assert_eq!(first.await.unwrap().unwrap().rejected, "r0@2");
        for (i, h) in rest.into_iter().enumerate() {
            let r = h.await.unwrap().unwrap();
            assert_eq!(
                r.rejected,
                format!("r{}@2", i + 1),
                "each push gets its own outcome"
            );
        }
        let calls = lanes.transport.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert_eq!(calls[0], (2, vec!["r0".to_string()]));
        let rooms: Vec<String> = (1..=5).map(|i| format!("r{i}")).collect();
        assert_eq!(calls[1], (2, rooms));
    }

    #[tokio::test]
    async fn each_peer_has_its_own_lane() {
        let lanes = PushLanes::new(Recorder::default());
        assert_eq!(lanes.push(2, req("a")).await.unwrap().rejected, "a@2");
        assert_eq!(lanes.push(3, req("b")).await.unwrap().rejected, "b@3");
        let calls = lanes.transport.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec![(2, vec!["a".to_string()]), (3, vec!["b".to_string()])]
        );
    }

    #[tokio::test]
    async fn a_failed_call_fails_every_push_in_it() {
        let lanes = PushLanes::new(Recorder {
            fail: true,
            ..Default::default()
        });
        let (a, b) = tokio::join!(lanes.push(2, req("a")), lanes.push(2, req("b")));
        assert_eq!(a.unwrap_err(), "connection refused");
        assert_eq!(b.unwrap_err(), "connection refused");
    }

    #[tokio::test]
    async fn a_short_answer_fails_the_batch_instead_of_misattributing() {
        let lanes = PushLanes::new(Recorder {
            short: true,
            ..Default::default()
        });
        let (a, b) = tokio::join!(lanes.push(2, req("a")), lanes.push(2, req("b")));
        let (a, b) = (a.unwrap_err(), b.unwrap_err());
        assert!(a.contains("answered 1 of 2"), "{a}");
        assert_eq!(a, b);
    }

    #[tokio::test]
    async fn a_push_nobody_waits_for_is_not_sent() {
        let (lanes, hold, first) = held_lane("kept").await;
        // Queued behind the held call, then abandoned (as a quorum timeout does).
        let gave_up = tokio::time::timeout(Duration::from_millis(20), lanes.push(2, req("gone")));
        assert!(gave_up.await.is_err());
        let later = tokio::spawn({
            let l = lanes.clone();
            async move { l.push(2, req("later")).await }
        });
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        hold.notify_one();
        first.await.unwrap().unwrap();
        assert_eq!(later.await.unwrap().unwrap().rejected, "later@2");
        let calls = lanes.transport.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec![
                (2, vec!["kept".to_string()]),
                (2, vec!["later".to_string()])
            ]
        );
    }
}
