//! What openraft logs at ERROR that is not an error here.
//!
//! A leader confirms its leadership (our lease renewal, [`super::Groups::renew_lease`],
//! and strong reads) by a heartbeat round; openraft logs **each** peer that did not answer
//! that round in time as `ERROR … timeout while confirming leadership for read request`.
//! A slow or dead peer is what a quorum exists for: our callers retry the round and log
//! what matters ("lease ran out", "no quorum") themselves. Under load, or with one node
//! down, those lines came by the thousand a minute (BENCHMARKS §3) and buried real errors.
//!
//! [`QuietLeadershipChecks`] is a tracing layer that drops exactly those events and
//! counts them instead ([`leadership_checks_missed`], the metric
//! `parley_raft_leadership_checks_missed_total`). Every other openraft event passes.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// The message of the event this layer drops (openraft 0.9, `core/raft_core.rs`).
pub const LEADERSHIP_CHECK_MISS: &str = "timeout while confirming leadership for read request";

static MISSED: AtomicU64 = AtomicU64::new(0);

/// Leadership-check heartbeats a peer did not answer, as openraft reported them, since
/// this process started (counted only where [`QuietLeadershipChecks`] is installed).
pub fn leadership_checks_missed() -> u64 {
    MISSED.load(Ordering::Relaxed)
}

/// Drops openraft's ERROR per unanswered leadership-check heartbeat and counts it.
#[derive(Debug, Default, Clone, Copy)]
pub struct QuietLeadershipChecks;

impl<S: Subscriber> Layer<S> for QuietLeadershipChecks {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() != Level::ERROR || !meta.target().starts_with("openraft") {
            return true;
        }
        let mut message = MessageIs {
            want: LEADERSHIP_CHECK_MISS,
            found: false,
        };
        event.record(&mut message);
        if message.found {
            MISSED.fetch_add(1, Ordering::Relaxed);
        }
        !message.found
    }
}

/// Whether an event's `message` field is `want`.
struct MessageIs {
    want: &'static str,
    found: bool,
}

impl Visit for MessageIs {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.found = value == self.want;
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.found = format!("{value:?}") == self.want;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn only_the_leadership_check_miss_is_dropped_and_it_is_counted() {
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::registry()
            .with(QuietLeadershipChecks)
            .with(tracing_subscriber::fmt::layer().with_writer(move || sink.clone()));
        let before = leadership_checks_missed();
        tracing::subscriber::with_default(subscriber, || {
            // As openraft emits it: its own `target` field beside the log target.
            tracing::error!(target: "openraft::core::raft_core", target = "2", error = "timeout",
                "timeout while confirming leadership for read request");
            tracing::error!(target: "openraft::core::raft_core", "fail to join task: boom");
            tracing::warn!(target: "openraft::core::raft_core",
                "timeout while confirming leadership for read request");
            tracing::error!(target: "parley_node::consensus",
                "timeout while confirming leadership for read request");
        });
        let logged = String::from_utf8_lossy(&out.0.lock().unwrap()).to_string();
        // The one event dropped; an openraft ERROR with another message, the same message
        // at another level, and the same text from another target all pass.
        assert_eq!(logged.lines().count(), 3, "{logged}");
        assert!(logged.contains("fail to join task: boom"), "{logged}");
        assert!(
            !logged
                .lines()
                .any(|l| l.contains("ERROR") && l.contains("openraft") && l.contains("confirming")),
            "{logged}"
        );
        // Other tests may run the layer at the same time: at least this one is counted.
        assert!(leadership_checks_missed() > before);
    }
}
