//! The load phase: subscriber tasks that time deliveries, sender tasks that send and
//! time acks (closed or open loop), the live counters the progress bar reads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use hdrhistogram::Histogram;
use parley_proto::v1::chat_client::ChatClient;
use parley_proto::v1::{event, Event, SendMessageRequest};
use tokio::sync::watch;
use tonic::transport::Channel;

use super::payload::Stamp;
use super::schedule::{room_of, Pace};
use super::setup::{authed, User};
use super::stats::{new_hist, record, Collector, SubscriberLog, Timeline};

/// Microseconds since the bench clock's origin (taken before setup).
#[derive(Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    pub fn now_us(&self) -> u64 {
        self.us_at(Instant::now())
    }

    pub fn us_at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_micros() as u64
    }
}

/// Counters read live by the progress display and the drain loop.
#[derive(Default)]
pub struct Live {
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    /// First copies only (a duplicate is not progress).
    pub delivered: AtomicU64,
    pub last_ack_us: AtomicU64,
    pub last_delivery_us: AtomicU64,
}

/// Shared by all subscriber tasks: the collector (behind a mutex, fed in batches) and
/// the load start, which timeline seconds count from.
pub struct Shared {
    pub clock: Clock,
    pub live: Live,
    pub collector: Mutex<Collector>,
    pub load_start_us: AtomicU64,
}

impl Shared {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            live: Live::default(),
            collector: Mutex::new(Collector::default()),
            load_start_us: AtomicU64::new(0),
        }
    }

    fn flush(&self, batch: &mut Vec<(u64, u64)>) {
        if batch.is_empty() {
            return;
        }
        let origin = self.load_start_us.load(Ordering::Relaxed);
        for (sent, recv) in batch.iter_mut() {
            *sent = sent.saturating_sub(origin);
            *recv = recv.saturating_sub(origin);
        }
        if let Ok(mut c) = self.collector.lock() {
            c.record_deliveries(batch);
        }
        batch.clear();
    }
}

const FLUSH_EVERY: usize = 512;
const FLUSH_AFTER_US: u64 = 250_000;

/// Reads one subscription until `stop` flips or the stream ends.
pub async fn subscriber(
    room: usize,
    mut stream: tonic::Streaming<Event>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> SubscriberLog {
    let mut log = SubscriberLog::new(room);
    let mut batch = Vec::with_capacity(FLUSH_EVERY);
    let mut last_flush = shared.clock.now_us();
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.changed() => break,
            next = stream.message() => next,
        };
        match next {
            Ok(Some(Event {
                kind: Some(event::Kind::Message(m)),
                ..
            })) => {
                let now = shared.clock.now_us();
                match Stamp::decode(&m.text) {
                    Some(stamp) => {
                        if log.observe(stamp.key()) {
                            batch.push((stamp.sent_us, now));
                            shared.live.delivered.fetch_add(1, Ordering::Relaxed);
                            shared
                                .live
                                .last_delivery_us
                                .fetch_max(now, Ordering::Relaxed);
                        }
                    }
                    None => log.foreign += 1,
                }
                if batch.len() >= FLUSH_EVERY || now.saturating_sub(last_flush) > FLUSH_AFTER_US {
                    shared.flush(&mut batch);
                    last_flush = now;
                }
            }
            Ok(Some(_)) => {} // membership, presence, typing: not part of the bench
            Ok(None) => {
                log.error = Some("stream ended by the server".into());
                break;
            }
            Err(s) => {
                log.error = Some(format!("{:?}: {}", s.code(), s.message()));
                break;
            }
        }
    }
    shared.flush(&mut batch);
    log
}

/// What one sender needs.
pub struct SenderPlan {
    pub index: usize,
    /// One connection per target; this sender sends through `index % clients.len()`.
    pub clients: Vec<ChatClient<Channel>>,
    pub user: User,
    pub room_ids: Arc<Vec<String>>,
    pub rooms_per_sender: usize,
    pub size: usize,
    pub inflight: usize,
    /// Messages this sender sends at most (`u64::MAX` when bounded by time only).
    pub quota: u64,
    /// No send starts at or after this instant (duration bound, or the safety bound).
    pub stop_sending: Instant,
    pub pace: Option<Pace>,
    pub load_start: Instant,
    pub rpc_timeout: Duration,
    pub run_id: String,
}

/// What one sender did.
pub struct SenderLog {
    pub ack: Histogram<u64>,
    /// `(stamp key, room index)` of every acked send.
    pub acked: Vec<(u64, u32)>,
    pub errors: BTreeMap<String, u64>,
    /// The first message the nodes gave with each error code.
    pub error_samples: BTreeMap<String, String>,
    /// Due but never sent because the safety bound came first.
    pub unsent: u64,
    pub timeline: Timeline,
}

/// How a closed-loop sender backs off after a refusal (`UNAVAILABLE`: the node is busy
/// or the room's partition has no leader right now; nothing was written). A client that
/// sends the next message at once only adds to the load that got it refused. The pause
/// doubles with each refusal in a row, from [`Backoff::FIRST`] up to [`Backoff::MAX`],
/// and a success ends it. Open-loop runs keep their schedule and do not back off.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    until: Option<Instant>,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_millis(640);

    pub fn new() -> Self {
        Self {
            next: Self::FIRST,
            until: None,
        }
    }

    /// A send failed with `code` at `now`: refusals start (or lengthen) a pause.
    pub fn failed(&mut self, code: &str, now: Instant) {
        if code != "Unavailable" {
            return;
        }
        let until = now + self.next;
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
        self.next = (self.next * 2).min(Self::MAX);
    }

    /// A send succeeded: the next one need not wait.
    pub fn succeeded(&mut self) {
        self.next = Self::FIRST;
        self.until = None;
    }

    /// Until when the next send waits, if it does at `now`.
    pub fn pause_at(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|u| *u > now)
    }
}

/// The next send of `pending` to finish, if one does before `until`; `None` when `until`
/// comes first, or when nothing is pending (after sleeping until `until`).
async fn next_before<F: std::future::Future<Output = SendOutcome>>(
    pending: &mut FuturesUnordered<F>,
    until: Instant,
) -> Option<SendOutcome> {
    let until = tokio::time::Instant::from_std(until);
    if pending.is_empty() {
        tokio::time::sleep_until(until).await;
        return None;
    }
    tokio::select! {
        biased;
        Some(done) = pending.next() => Some(done),
        _ = tokio::time::sleep_until(until) => None,
    }
}

/// Stamp key, room, send time, and the error code and message if it failed.
type SendOutcome = (u64, u32, u64, Result<(), (String, String)>);

pub async fn sender(plan: SenderPlan, shared: Arc<Shared>) -> SenderLog {
    let clock = shared.clock;
    let origin = clock.us_at(plan.load_start);
    let mut log = SenderLog {
        ack: new_hist(),
        acked: Vec::new(),
        errors: BTreeMap::new(),
        error_samples: BTreeMap::new(),
        unsent: 0,
        timeline: Timeline::default(),
    };
    let mut pending = FuturesUnordered::new();
    let mut backoff = Backoff::new();
    let on_done =
        |log: &mut SenderLog, backoff: &mut Backoff, (key, room, due_us, res): SendOutcome| {
            let now = clock.now_us();
            match res {
                Ok(()) => {
                    backoff.succeeded();
                    record(&mut log.ack, now.saturating_sub(due_us));
                    log.acked.push((key, room));
                    log.timeline.add_acked(now.saturating_sub(origin));
                    shared.live.acked.fetch_add(1, Ordering::Relaxed);
                    shared.live.last_ack_us.fetch_max(now, Ordering::Relaxed);
                }
                Err((code, message)) => {
                    backoff.failed(&code, Instant::now());
                    log.error_samples.entry(code.clone()).or_insert(message);
                    *log.errors.entry(code).or_default() += 1;
                    log.timeline.add_error(now.saturating_sub(origin));
                    shared.live.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
    let mut j: u64 = 0;
    while j < plan.quota {
        let due = match plan.pace {
            Some(p) => {
                let due = plan.load_start + p.due(j);
                // Collect acks while waiting for this message's slot.
                while let Some(done) = next_before(&mut pending, due).await {
                    on_done(&mut log, &mut backoff, done);
                }
                due
            }
            None => {
                // Collect acks while backing off; a success ends the pause early.
                while let Some(until) = backoff.pause_at(Instant::now()) {
                    if let Some(done) = next_before(&mut pending, until).await {
                        on_done(&mut log, &mut backoff, done);
                    }
                }
                Instant::now()
            }
        };
        while pending.len() >= plan.inflight.max(1) {
            match pending.next().await {
                Some(done) => on_done(&mut log, &mut backoff, done),
                None => break,
            }
        }
        if Instant::now() >= plan.stop_sending {
            if plan.quota != u64::MAX {
                log.unsent = plan.quota - j;
            }
            break;
        }
        let room = room_of(plan.index, j, plan.room_ids.len(), plan.rooms_per_sender);
        let stamp = Stamp {
            sent_us: clock.us_at(due),
            sender: plan.index as u32,
            seq: j as u32,
        };
        let req = authed(
            SendMessageRequest {
                room: plan.room_ids[room].clone(),
                text: stamp.encode(plan.size).into_bytes(),
                client_msg_id: format!("{}-{}-{}", plan.run_id, plan.index, j),
                after: String::new(),
            },
            &plan.user.auth,
        );
        let mut c = plan.clients[plan.index % plan.clients.len()].clone();
        let limit = plan.rpc_timeout + Duration::from_secs(1);
        pending.push(async move {
            let res = match tokio::time::timeout(limit, c.send_message(req)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(s)) => Err((format!("{:?}", s.code()), s.message().to_owned())),
                Err(_) => Err((
                    "ClientTimeout".to_string(),
                    format!("no answer within {limit:?}"),
                )),
            };
            (stamp.key(), room as u32, stamp.sent_us, res)
        });
        j += 1;
    }
    // Every call in flight has its own deadline, so this ends.
    while let Some(done) = pending.next().await {
        on_done(&mut log, &mut backoff, done);
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_double_the_pause_up_to_its_cap_and_a_success_ends_it() {
        let t0 = Instant::now();
        let mut b = Backoff::new();
        assert_eq!(b.pause_at(t0), None);
        // Timeouts and other failures may have written: no pause for them.
        b.failed("DeadlineExceeded", t0);
        assert_eq!(b.pause_at(t0), None);
        b.failed("Unavailable", t0);
        assert_eq!(b.pause_at(t0), Some(t0 + Backoff::FIRST));
        b.failed("Unavailable", t0);
        assert_eq!(b.pause_at(t0), Some(t0 + Backoff::FIRST * 2));
        for _ in 0..20 {
            b.failed("Unavailable", t0);
        }
        assert_eq!(b.pause_at(t0), Some(t0 + Backoff::MAX));
        // A pause over is no pause, and a success restarts from the first step.
        assert_eq!(b.pause_at(t0 + Backoff::MAX), None);
        b.succeeded();
        assert_eq!(b.pause_at(t0), None);
        b.failed("Unavailable", t0);
        assert_eq!(b.pause_at(t0), Some(t0 + Backoff::FIRST));
    }

    #[test]
    fn an_earlier_refusal_answered_late_does_not_shorten_a_pause() {
        let t0 = Instant::now();
        let mut c = Backoff::new();
        c.failed("Unavailable", t0 + Duration::from_secs(1));
        c.failed("Unavailable", t0);
        assert_eq!(
            c.pause_at(t0),
            Some(t0 + Duration::from_secs(1) + Backoff::FIRST)
        );
    }
}
