//! Forwarded sends: a `SendMessage` (or `SendDirect`) that reaches a node other than its
//! room's home travels to the home on one long-lived `ForwardSends` stream per home,
//! instead of as a unary call of its own.
//!
//! In a three-node cluster two of every three sends are forwarded. A unary call each
//! costs an HTTP/2 stream, its headers, a task and the service stack on both nodes
//! (BENCHMARKS §3). On the stream a send costs a few bytes of one message: the sends
//! queued while the lane was busy leave together, and the home answers each as soon as
//! it is done, in whatever order they finish, so a slow send holds up no other.
//!
//! The home runs each forwarded send exactly as the `SendMessage` call it stands for:
//! the client's token is checked, the route decided (a node that has just stopped
//! leading forwards once more), the fence and membership checked, and its error is the
//! one the call would have returned.
//!
//! To stay correct:
//! - Every queued send is answered exactly once, with the home's answer or with an error
//!   that says whether it may have been written. A send that never left this node (the
//!   stream could not be opened) fails UNAVAILABLE, nothing written. One that left and
//!   whose stream then broke fails UNAVAILABLE "transport error", which clients must read
//!   as an unknown outcome, as they do when a unary call's connection breaks.
//! - The caller's wait is bounded by the send's budget plus a margin, and the home stops
//!   working on the send when the budget is spent; a late answer finds nobody waiting.
//! - A home that does not know `ForwardSends` (an older version, during a rolling
//!   upgrade) answers UNIMPLEMENTED when the stream is opened; the send then goes as a
//!   unary call, as before.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use parley_proto::v1 as pb;
use parley_proto::v1::chat_client::ChatClient;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::route::{hops_after, mark_forwarded, FORWARD_TIMEOUT};
use super::{auth, messages, ApiError, ApiResult, Ctx, Metrics};

/// Most sends in one stream message, and most answers in one.
const MAX_PER_MESSAGE: usize = 256;
/// Most bytes of sends in one stream message (a send is at most 64 KiB of text, so one
/// always fits; the home decodes messages of up to 1 MiB).
const MAX_BYTES: usize = 512 * 1024;
/// How long opening a stream may take before the sends waiting for it fail.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// How much longer than the send's budget the caller waits for the home's answer (the
/// home gives up at the budget and says so; this covers the answer's way back).
const ANSWER_MARGIN: Duration = Duration::from_secs(1);
/// Sends whose callers have stopped waiting are forgotten when the table of unanswered
/// sends grows past this (the home answers every send within its budget, so the table
/// only grows on a stream whose home has stopped answering).
const PRUNE_AT: usize = 4096;

type Answer = Result<pb::SendMessageResponse, Status>;

struct Queued {
    send: pb::ForwardedSend,
    done: oneshot::Sender<Answer>,
}

/// One lane per home address, started on first use; a lane ends when this is dropped.
#[derive(Default)]
pub struct ForwardLanes {
    lanes: Mutex<HashMap<String, mpsc::UnboundedSender<Queued>>>,
    pub stats: Arc<ForwardStats>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct ForwardStats {
    /// Sends this node forwarded on a stream.
    pub sent: AtomicU64,
    /// Stream messages that carried them.
    pub messages: AtomicU64,
    /// Streams opened (one per home, and a new one after each break).
    pub streams: AtomicU64,
    /// Forwarded sends this node ran as the home.
    pub received: AtomicU64,
}

/// Sends `req`, which arrived here with metadata `md`, to the home at `addr` and returns
/// the home's answer (its error relayed as it is). UNIMPLEMENTED: the home is older and
/// has no `ForwardSends`; nothing was sent.
pub(super) async fn send(
    ctx: &Ctx,
    addr: &str,
    client: &ChatClient<Channel>,
    md: &MetadataMap,
    req: pb::SendMessageRequest,
) -> ApiResult<pb::SendMessageResponse> {
    let authorization = md
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let send = pb::ForwardedSend {
        seq: 0,
        authorization,
        hops: u32::from(hops_after(md)),
        budget_ms: FORWARD_TIMEOUT.as_millis() as u64,
        request: Some(req),
    };
    let (done, answer) = oneshot::channel();
    let queued = Queued { send, done };
    {
        let fl = &ctx.forward_lanes;
        let mut lanes = fl.lanes.lock().unwrap_or_else(|p| p.into_inner());
        let unsent = match lanes.get(addr) {
            Some(lane) => lane.send(queued).err().map(|e| e.0),
            None => Some(queued),
        };
        // No lane yet, or its task is gone (its runtime is shutting down): start one.
        if let Some(queued) = unsent {
            let lane = start_lane(addr, client.clone(), fl.stats.clone());
            let _ = lane.send(queued);
            lanes.insert(addr.to_owned(), lane);
        }
    }
    let answer = match tokio::time::timeout(FORWARD_TIMEOUT + ANSWER_MARGIN, answer).await {
        Ok(Ok(a)) => a,
        Ok(Err(_)) => Err(Status::unavailable(format!(
            "transport error: the forward lane to {addr} stopped; the message may have been written"
        ))),
        Err(_) => {
            return Err(ApiError::Timeout(format!(
                "the room's home ({addr}) did not answer within {:?}; the message may have been written",
                FORWARD_TIMEOUT + ANSWER_MARGIN
            )))
        }
    };
    answer.map_err(|s| ApiError::Relayed(Box::new(s)))
}

fn start_lane(
    addr: &str,
    client: ChatClient<Channel>,
    stats: Arc<ForwardStats>,
) -> mpsc::UnboundedSender<Queued> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run_lane(addr.to_owned(), client, rx, stats));
    tx
}

/// Why a stream stopped, for the sends it leaves unanswered.
enum Stop {
    /// The node is shutting down: nothing more will be queued.
    Closed,
    Broke(String),
}

/// Carries the sends queued for one home: opens a stream, sends what is queued, hands
/// out answers as they come, and opens a new stream after one breaks.
async fn run_lane(
    addr: String,
    client: ChatClient<Channel>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    stats: Arc<ForwardStats>,
) {
    let mut seq = 0u64;
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let (out, out_rx) = mpsc::unbounded_channel::<pb::ForwardedSends>();
        let mut c = client.clone();
        let opened = tokio::time::timeout(
            OPEN_TIMEOUT,
            c.forward_sends(UnboundedReceiverStream::new(out_rx)),
        )
        .await;
        let mut inbound = match opened {
            Ok(Ok(r)) => {
                Metrics::inc(&stats.streams);
                r.into_inner()
            }
            Ok(Err(s)) => {
                refuse_waiting(&addr, first, &mut rx, &s);
                continue;
            }
            Err(_) => {
                let s = Status::unavailable(format!("no answer within {OPEN_TIMEOUT:?}"));
                refuse_waiting(&addr, first, &mut rx, &s);
                continue;
            }
        };
        let mut pending: HashMap<u64, oneshot::Sender<Answer>> = HashMap::new();
        let mut next = Some(first);
        let stop = loop {
            let mut sends = Vec::new();
            let mut bytes = 0;
            while sends.len() < MAX_PER_MESSAGE && bytes < MAX_BYTES {
                let Some(q) = next.take().or_else(|| rx.try_recv().ok()) else {
                    break;
                };
                if q.done.is_closed() {
                    continue;
                }
                let len = q.send.encoded_len();
                if bytes > 0 && bytes + len > MAX_BYTES {
                    // Too big to join this message: first in the next one.
                    next = Some(q);
                    break;
                }
                bytes += len;
                seq += 1;
                pending.insert(seq, q.done);
                sends.push(pb::ForwardedSend { seq, ..q.send });
            }
            if !sends.is_empty() {
                let n = sends.len() as u64;
                if out.send(pb::ForwardedSends { sends }).is_err() {
                    break Stop::Broke("its request side closed".into());
                }
                stats.sent.fetch_add(n, Relaxed);
                Metrics::inc(&stats.messages);
            }
            if pending.len() > PRUNE_AT {
                pending.retain(|_, done| !done.is_closed());
            }
            if next.is_some() {
                // One send did not fit in the message just sent: it starts the next.
                continue;
            }
            tokio::select! {
                q = rx.recv() => match q {
                    Some(q) => next = Some(q),
                    None => break Stop::Closed,
                },
                m = inbound.message() => match m {
                    Ok(Some(answers)) => {
                        for a in answers.answers {
                            if let Some(done) = pending.remove(&a.seq) {
                                let _ = done.send(from_wire(a));
                            }
                        }
                    }
                    Ok(None) => break Stop::Broke("the home ended it".into()),
                    Err(s) => break Stop::Broke(s.message().to_owned()),
                },
            }
        };
        let (closed, why) = match stop {
            Stop::Closed => (true, "this node is shutting down".to_owned()),
            Stop::Broke(why) => (false, why),
        };
        for (_, done) in pending.drain() {
            let _ = done.send(Err(Status::unavailable(format!(
                "transport error: the forward stream to {addr} broke ({why}); the message may have been written"
            ))));
        }
        if closed {
            return;
        }
        // A send taken from the queue but not yet sent goes on the next stream.
        carried = next;
    }
}

/// Answers `first` and every send queued behind it: the stream to their home could not
/// be opened, so none of them left this node.
fn refuse_waiting(addr: &str, first: Queued, rx: &mut mpsc::UnboundedReceiver<Queued>, s: &Status) {
    let answer = || {
        if s.code() == Code::Unimplemented {
            Status::unimplemented(s.message().to_owned())
        } else {
            Status::unavailable(format!(
                "the room's home ({addr}) cannot be reached ({}); nothing was written",
                s.message()
            ))
        }
    };
    let _ = first.done.send(Err(answer()));
    while let Ok(q) = rx.try_recv() {
        let _ = q.done.send(Err(answer()));
    }
}

// tonic's Status is large, and it is what the relayed answer carries.
#[allow(clippy::result_large_err)]
fn from_wire(a: pb::ForwardedAnswer) -> Answer {
    match a.ok {
        Some(ok) => Ok(ok),
        None if a.code == 0 => Err(Status::internal(
            "the home answered a forwarded send with neither a result nor an error",
        )),
        None => Err(Status::new(Code::from_i32(a.code), a.message)),
    }
}

fn to_wire(seq: u64, r: ApiResult<pb::SendMessageResponse>) -> pb::ForwardedAnswer {
    match r {
        Ok(ok) => pb::ForwardedAnswer {
            seq,
            ok: Some(ok),
            code: 0,
            message: String::new(),
        },
        Err(e) => {
            let s = Status::from(e);
            pb::ForwardedAnswer {
                seq,
                ok: None,
                code: s.code() as i32,
                message: s.message().to_owned(),
            }
        }
    }
}

pub(super) type AnswerStream =
    Pin<Box<dyn Stream<Item = Result<pb::ForwardedAnswers, Status>> + Send + 'static>>;

/// The home's side of a `ForwardSends` stream: runs every send as it arrives, each on its
/// own task, and streams the answers back, those ready together in one message. Ends
/// when the forwarding node closes its side and every send has been answered.
pub(super) fn serve(
    ctx: Arc<Ctx>,
    mut inbound: tonic::Streaming<pb::ForwardedSends>,
) -> AnswerStream {
    let (tx, rx) = mpsc::unbounded_channel::<pb::ForwardedAnswer>();
    let mut stopping = ctx.stopping.clone();
    tokio::spawn(async move {
        // Ends with the stream (the forwarding node closed it, or its connection broke),
        // or when this node starts shutting down: then the sends already taken are
        // answered and the stream ends, and the forwarding node opens a new one, to
        // this node's successor or to nobody ("nothing was written").
        loop {
            let batch = tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(batch)) => batch,
                    _ => break,
                },
                _ = stopping.wait_for(|s| *s) => break,
            };
            for send in batch.sends {
                let (ctx, tx) = (ctx.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = tx.send(run(&ctx, send).await);
                });
            }
        }
    });
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        let first = rx.recv().await?;
        let mut answers = vec![first];
        while answers.len() < MAX_PER_MESSAGE {
            match rx.try_recv() {
                Ok(a) => answers.push(a),
                Err(_) => break,
            }
        }
        Some((Ok(pb::ForwardedAnswers { answers }), rx))
    }))
}

/// Runs one forwarded send within its budget.
async fn run(ctx: &Ctx, send: pb::ForwardedSend) -> pb::ForwardedAnswer {
    Metrics::inc(&ctx.forward_lanes.stats.received);
    let seq = send.seq;
    let budget = match send.budget_ms {
        0 => FORWARD_TIMEOUT,
        ms => Duration::from_millis(ms).min(FORWARD_TIMEOUT),
    };
    let r = match tokio::time::timeout(budget, run_send(ctx, send)).await {
        Ok(r) => r,
        Err(_) => Err(ApiError::Timeout(format!(
            "the room's home did not finish the send within {budget:?}; it may have been written"
        ))),
    };
    if r.is_err() {
        Metrics::inc(&ctx.metrics.requests_failed);
    }
    to_wire(seq, r)
}

async fn run_send(ctx: &Ctx, send: pb::ForwardedSend) -> ApiResult<pb::SendMessageResponse> {
    let mut md = MetadataMap::new();
    if !send.authorization.is_empty() {
        let v = MetadataValue::try_from(send.authorization.as_str())
            .map_err(|_| ApiError::Unauthenticated("malformed authorization header".into()))?;
        md.insert("authorization", v);
    }
    mark_forwarded(&mut md, send.hops);
    let user = auth::authenticate(ctx, &md).await?;
    let req = send
        .request
        .ok_or_else(|| ApiError::Invalid("a forwarded send without its request".into()))?;
    messages::send(ctx, &user, req, &md).await
}
