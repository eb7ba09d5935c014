//! The live views: `tail` (print subscription events) and `chat` (history, live
//! events and sending what is typed). Both show each message once, deduplicated by id,
//! since a subscription delivers at least once.

use std::collections::{HashMap, HashSet};

use parley_proto::v1::{
    event, Event, GetRoomRequest, HistoryRequest, ListRoomsRequest, SendMessageRequest,
    SubscribeRequest,
};
use tokio::sync::mpsc;
use tonic::Streaming;

use super::client::{rq, Client};
use super::commands::{random_client_id, Ctx};
use super::output as fmt;

/// Subscribed-to notice on stderr: tells a person (and a test) that events from now on
/// will be shown. Stdout stays events only.
fn notice(s: &str) {
    eprintln!("parley: {s}");
}

async fn subscribe(
    c: &mut Client,
    rooms: Vec<String>,
    cursor: String,
) -> anyhow::Result<Streaming<Event>> {
    Ok(c.subscribe(SubscribeRequest { rooms, cursor })
        .await?
        .into_inner())
}

/// Room id -> name for the rooms the caller can see (best effort: only used for display).
async fn room_names(c: &mut Client) -> HashMap<String, String> {
    match c
        .list_rooms(rq(ListRoomsRequest {
            joined_only: true,
            consistency: 0,
        }))
        .await
    {
        Ok(r) => r
            .into_inner()
            .rooms
            .into_iter()
            .map(|r| (r.id, r.name))
            .collect(),
        Err(_) => HashMap::new(),
    }
}

/// Remembers message ids already shown. Bounded: ids are time-ordered, so once the set
/// is large the oldest half is forgotten (a redelivery that old is not expected).
struct Seen {
    ids: HashSet<String>,
    order: std::collections::VecDeque<String>,
}

impl Seen {
    const CAP: usize = 100_000;

    fn new() -> Self {
        Self {
            ids: HashSet::new(),
            order: std::collections::VecDeque::new(),
        }
    }

    /// True the first time `id` is offered.
    fn first(&mut self, id: &str) -> bool {
        if !self.ids.insert(id.to_owned()) {
            return false;
        }
        self.order.push_back(id.to_owned());
        while self.order.len() > Self::CAP {
            if let Some(old) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }
}

/// `tail ROOM...`: prints events until Ctrl-C, the stream ends, or `count` messages.
pub async fn tail(
    ctx: &Ctx,
    rooms: Vec<String>,
    cursor: Option<String>,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let mut c = ctx.client().await?;
    let names = if ctx.out.json {
        HashMap::new()
    } else {
        room_names(&mut c).await
    };
    // With one room the room is obvious; otherwise each line names it.
    let show_room = rooms.len() != 1;
    let label = |id: &str| -> Option<String> {
        show_room.then(|| names.get(id).cloned().unwrap_or_else(|| id.to_owned()))
    };
    let what = if rooms.is_empty() {
        "all joined rooms".to_owned()
    } else {
        rooms.join(", ")
    };
    let mut stream = subscribe(&mut c, rooms, cursor.unwrap_or_default()).await?;
    notice(&format!("subscribed to {what} (Ctrl-C to stop)"));

    let mut seen = Seen::new();
    let mut messages = 0u64;
    if count == Some(0) {
        return Ok(());
    }
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let ev = tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            ev = stream.message() => ev?,
        };
        let Some(ev) = ev else {
            return Err(tonic::Status::unavailable("the node ended the subscription").into());
        };
        if let Some(event::Kind::Message(m)) = &ev.kind {
            if !seen.first(&m.id) {
                continue;
            }
        }
        print_event(ctx, &ev, &label)?;
        if matches!(ev.kind, Some(event::Kind::Message(_))) {
            messages += 1;
            if count.is_some_and(|n| messages >= n) {
                return Ok(());
            }
        }
    }
}

fn print_event(
    ctx: &Ctx,
    ev: &Event,
    label: &dyn Fn(&str) -> Option<String>,
) -> std::io::Result<()> {
    if ctx.out.json {
        if let Some(v) = fmt::event_json(ev) {
            ctx.out.value(&v)?;
        }
    } else if let Some(line) = fmt::event_human(ev, label) {
        ctx.out.line(&line)?;
    }
    Ok(())
}

/// Lines typed on stdin, read on a plain thread: tokio's stdin cannot be cancelled and
/// would hold the process open after `/quit`.
fn stdin_lines() -> mpsc::Receiver<std::io::Result<String>> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `chat ROOM`: the last `last` messages, then live events; each stdin line is sent.
/// `/quit` or end of input leaves.
pub async fn chat(ctx: &Ctx, room: String, last: u32) -> anyhow::Result<()> {
    let mut c = ctx.client().await?;
    let info = c
        .get_room(rq(GetRoomRequest {
            room: room.clone(),
            consistency: 0,
        }))
        .await?
        .into_inner();
    // Subscribe before reading history so nothing falls between the two; the overlap
    // is removed by id.
    let mut stream = subscribe(&mut c, vec![info.id.clone()], String::new()).await?;
    let hist = c
        .history(rq(HistoryRequest {
            room: info.id.clone(),
            limit: last,
            ..Default::default()
        }))
        .await?
        .into_inner();
    let mut seen = Seen::new();
    // The newest message seen, passed as `after` so our next message sorts after it.
    let mut newest = String::new();
    for m in &hist.messages {
        seen.first(&m.id);
        newest = newest.max(m.id.clone());
        if ctx.out.json {
            ctx.out.value(&fmt::message_json(m))?;
        } else {
            ctx.out.line(&fmt::message_human(m, None))?;
        }
    }
    notice(&format!(
        "chatting in #{} — type a message and press Enter; /quit to leave",
        info.name
    ));

    let no_label = |_: &str| -> Option<String> { None };
    let mut input = stdin_lines();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            ev = stream.message() => {
                let Some(ev) = ev? else {
                    return Err(tonic::Status::unavailable("the node ended the subscription").into());
                };
                if let Some(event::Kind::Message(m)) = &ev.kind {
                    if !seen.first(&m.id) {
                        continue;
                    }
                    newest = newest.max(m.id.clone());
                }
                print_event(ctx, &ev, &no_label)?;
            }
            line = input.recv() => {
                let Some(line) = line else { return Ok(()) };
                let line = line?;
                let text = line.trim_end_matches(['\r', '\n']);
                match text.trim() {
                    "" => continue,
                    "/quit" | "/exit" => return Ok(()),
                    "/help" => {
                        notice("type a message and press Enter; /quit leaves; start a line with // to send one beginning with /");
                        continue;
                    }
                    t if t.starts_with('/') && !t.starts_with("//") => {
                        notice(&format!("unknown command {t} (try /help)"));
                        continue;
                    }
                    _ => {}
                }
                let text = text.strip_prefix('/').filter(|t| t.starts_with('/')).unwrap_or(text);
                let resp = c
                    .send_message(rq(SendMessageRequest {
                        room: info.id.clone(),
                        text: text.as_bytes().to_vec(),
                        client_msg_id: random_client_id(),
                        after: newest.clone(),
                    }))
                    .await;
                match resp {
                    Ok(r) => newest = newest.max(r.into_inner().id),
                    // A refused message (too long, no longer a member...) is reported and
                    // the chat goes on; a lost node ends it.
                    Err(s) if s.code() == tonic::Code::Unavailable && std::error::Error::source(&s).is_some() => {
                        return Err(s.into())
                    }
                    Err(s) => eprintln!("parley: {}: {}", super::code_name(s.code()), s.message()),
                }
            }
        }
    }
}
