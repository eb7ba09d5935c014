//! What openraft logs at ERROR that is not an error here, and how often.
//!
//! openraft logs every failed RPC to a peer, several lines each: a heartbeat a slow
//! follower did not answer in time is `WARN error replication to target=…`, `ERROR
//! RPCError`, `WARN heartbeat error` and `WARN update progress error`, and while the peer
//! stays unreachable each RPC not sent is `WARN … backoff mode: drain events without
//! processing them`; a vote request a
//! down peer did not answer is `ERROR while requesting vote`; and each peer that missed a
//! heartbeat of a leadership check (our lease renewal, [`super::Groups::renew_lease`],
//! and strong reads) is `ERROR timeout while confirming leadership for read request`.
//! A slow or dead peer is what a quorum is for, and our callers retry and log what
//! matters ("lease ran out", "no quorum") themselves. With a node down, or under load,
//! those lines came by the thousand a minute (BENCHMARKS §3, FAULTS) and buried the rest.
//!
//! [`QuietRaftPeerFailures`] is a tracing layer that lets through at most one line of
//! each of those kinds per [`QUIET_WINDOW`] and drops the others, so the log still says
//! that a peer is failing. It counts the leadership-check misses
//! ([`leadership_checks_missed`], metric `parley_raft_leadership_checks_missed_total`)
//! and the failed RPCs (`RPCError` and vote requests: [`peer_rpcs_failed`], metric
//! `parley_raft_peer_rpcs_failed_total`), logged or not. Every other event passes,
//! among them the same messages at other levels (a storage error on replication is
//! logged at ERROR under the same text as the WARN above, and passes).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// At most one line of each kind per this long.
pub const QUIET_WINDOW: Duration = Duration::from_secs(10);

static LEADERSHIP_CHECKS_MISSED: AtomicU64 = AtomicU64::new(0);
static PEER_RPCS_FAILED: AtomicU64 = AtomicU64::new(0);

/// One kind of line quieted: openraft's level and message for it, and the counter its
/// events add to, if any.
struct Kind {
    level: Level,
    message: Match,
    counter: Option<&'static AtomicU64>,
}

/// The kinds quieted (openraft 0.9).
static KINDS: [Kind; 7] = [
    Kind {
        level: Level::ERROR,
        message: Match::Is("timeout while confirming leadership for read request"),
        counter: Some(&LEADERSHIP_CHECKS_MISSED),
    },
    Kind {
        level: Level::ERROR,
        message: Match::Is("RPCError"),
        counter: Some(&PEER_RPCS_FAILED),
    },
    Kind {
        level: Level::ERROR,
        message: Match::Is("while requesting vote"),
        counter: Some(&PEER_RPCS_FAILED),
    },
    Kind {
        level: Level::WARN,
        message: Match::Starts("error replication to target="),
        counter: None,
    },
    Kind {
        level: Level::WARN,
        message: Match::Starts("heartbeat error: "),
        counter: None,
    },
    Kind {
        level: Level::WARN,
        message: Match::Is("update progress error"),
        counter: None,
    },
    Kind {
        level: Level::WARN,
        message: Match::Ends(" backoff mode: drain events without processing them"),
        counter: None,
    },
];

/// How a message is recognized: whole, or by the part of it that does not name the peer.
#[derive(Clone, Copy)]
enum Match {
    Is(&'static str),
    Starts(&'static str),
    Ends(&'static str),
}

impl Match {
    fn matches(self, message: &str) -> bool {
        match self {
            Match::Is(m) => message == m,
            Match::Starts(m) => message.starts_with(m),
            Match::Ends(m) => message.ends_with(m),
        }
    }
}

/// Leadership-check heartbeats a peer did not answer, as openraft reported them, since
/// this process started (counted only where [`QuietRaftPeerFailures`] is installed).
pub fn leadership_checks_missed() -> u64 {
    LEADERSHIP_CHECKS_MISSED.load(Ordering::Relaxed)
}

/// Raft RPCs to peers that failed (replication and heartbeats, vote requests), as
/// openraft reported them, since this process started (where the layer is installed).
pub fn peer_rpcs_failed() -> u64 {
    PEER_RPCS_FAILED.load(Ordering::Relaxed)
}

/// Lets one openraft line per kind of peer failure through per [`QUIET_WINDOW`].
#[derive(Debug, Clone)]
pub struct QuietRaftPeerFailures {
    origin: Instant,
    /// Per kind: milliseconds after `origin` at which the last line went through, plus one
    /// (0: none yet).
    last: Arc<[AtomicU64; KINDS.len()]>,
}

impl Default for QuietRaftPeerFailures {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            last: Arc::new(std::array::from_fn(|_| AtomicU64::new(0))),
        }
    }
}

impl QuietRaftPeerFailures {
    /// Whether a line of kind `k` goes through now; at most one per window does.
    fn admit(&self, k: usize) -> bool {
        let now = self.origin.elapsed().as_millis() as u64 + 1;
        let window = QUIET_WINDOW.as_millis() as u64;
        let slot = &self.last[k];
        let last = slot.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= window)
            && slot
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

impl<S: Subscriber> Layer<S> for QuietRaftPeerFailures {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        let level = *meta.level();
        if level > Level::WARN || !meta.target().starts_with("openraft") {
            return true;
        }
        let mut message = Message(String::new());
        event.record(&mut message);
        let Some(k) = KINDS
            .iter()
            .position(|k| k.level == level && k.message.matches(&message.0))
        else {
            return true;
        };
        if let Some(counter) = KINDS[k].counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.admit(k)
    }
}

/// An event's `message` field.
struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::test_log::Captured;

    #[test]
    fn one_line_per_kind_of_peer_failure_goes_through_and_all_are_counted() {
        let out = Captured::default();
        let sink = out.clone();
        let quiet = QuietRaftPeerFailures::default();
        let subscriber = tracing_subscriber::registry().with(quiet.clone()).with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || sink.clone()),
        );
        let (checks, rpcs) = (leadership_checks_missed(), peer_rpcs_failed());
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..5 {
                // As openraft emits them, with their own `target` fields beside the log
                // target.
                tracing::error!(target: "openraft::core::raft_core", target = "2", error = "timeout",
                    "timeout while confirming leadership for read request");
                tracing::error!(target: "openraft::replication", err = "timeout", "RPCError");
                tracing::error!(target: "openraft::core::raft_core", error = "down", target = "3",
                    "while requesting vote");
                tracing::warn!(target: "openraft::replication", error = "timeout",
                    "error replication to target={}", 2);
                tracing::warn!(target: "openraft::engine::handler::replication_handler",
                    "heartbeat error: {}, no update to inflight data", "timeout");
                tracing::warn!(target: "openraft::engine::handler::replication_handler",
                    request_id = "HeartBeat", "update progress error");
                tracing::warn!(target: "openraft::replication",
                    "{} backoff mode: drain events without processing them",
                    "openraft::replication::ReplicationCore<_, _, _>::backoff_drain_events");
            }
            // Not quieted: another openraft ERROR, a storage error under the replication
            // text at ERROR, the same text at another level, the same text elsewhere.
            tracing::error!(target: "openraft::core::raft_core", "fail to join task: boom");
            tracing::error!(target: "openraft::replication", error = "disk",
                "error replication to target={}", 2);
            tracing::info!(target: "openraft::replication", "RPCError");
            tracing::error!(target: "parley_node::consensus", "RPCError");
        });
        let logged = out.text();
        let count = |needle: &str| logged.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(count("confirming leadership"), 1, "{logged}");
        assert_eq!(count("while requesting vote"), 1, "{logged}");
        assert_eq!(count("heartbeat error"), 1, "{logged}");
        assert_eq!(count("update progress error"), 1, "{logged}");
        assert_eq!(count("backoff mode"), 1, "{logged}");
        assert_eq!(
            count("WARN openraft::replication: error replication"),
            1,
            "{logged}"
        );
        assert_eq!(
            count("ERROR openraft::replication: error replication"),
            1,
            "{logged}"
        );
        assert_eq!(count("RPCError"), 3, "{logged}");
        assert_eq!(count("fail to join task: boom"), 1, "{logged}");
        assert_eq!(logged.lines().count(), 11, "{logged}");
        // Counted whether logged or not; other tests may add to the counters meanwhile.
        assert!(leadership_checks_missed() >= checks + 5);
        assert!(peer_rpcs_failed() >= rpcs + 10);
    }

    #[test]
    fn a_kind_goes_through_again_once_its_window_has_passed() {
        let kind = |m: &str| KINDS.iter().position(|k| k.message.matches(m)).unwrap();
        let (rpc_error, vote_request) = (kind("RPCError"), kind("while requesting vote"));
        // A layer made three windows ago (on the monotonic clock).
        let quiet = QuietRaftPeerFailures {
            origin: Instant::now().checked_sub(QUIET_WINDOW * 3).unwrap(),
            ..Default::default()
        };
        assert!(quiet.admit(rpc_error));
        assert!(!quiet.admit(rpc_error));
        assert!(quiet.admit(vote_request));
        // As if the last RPCError line went through when the layer was made.
        quiet.last[rpc_error].store(1, Ordering::Relaxed);
        assert!(quiet.admit(rpc_error));
        assert!(!quiet.admit(rpc_error));
        assert!(!quiet.admit(vote_request));
    }
}
