//! Workloads: logical client processes, each a sequential loop over the real gRPC
//! client API of one node, recording every operation.
//!
//! The set-up (users, rooms, memberships) runs before the faults start and is not
//! part of the checked history. Then these processes run at once, spread over the
//! nodes:
//! - writers (chat-set): unique messages into the chat rooms, each send's `after` =
//!   the sender's last acknowledged id there (per-sender order), and now and then a
//!   local read of a whole room;
//! - subscribers (delivery): one per chat room per node, resuming from their cursor
//!   after every disconnect, and now and then on purpose on another node;
//! - membership: per membership room an admin (kick, ban, unban, set role), a member
//!   process (join, leave) and a strong reader;
//! - fence: a user sending into the fence room while an admin bans, unbans and
//!   re-invites them;
//! - markers: read markers moved to ids seen acknowledged;
//! - presence: one user per node heartbeating through that node only, and a reader.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use parley_proto::v1::chat_client::ChatClient;
use parley_proto::v1::event::Kind as EventKind;
use parley_proto::v1::{
    Consistency, CreateRoomRequest, CreateUserRequest, GetPresenceRequest, HistoryRequest,
    JoinRoomRequest, LeaveRoomRequest, ListMembersRequest, MarkReadRequest, ModerateAction,
    ModerateRequest, PresenceState, Role, SendMessageRequest, SetPresenceRequest, SubscribeRequest,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic::Request;

use crate::history::{Members, Msg, Op, Type};
use crate::recorder::{classify, Recorder};

/// How the workload is shaped.
#[derive(Debug, Clone)]
pub struct Shape {
    pub chat_rooms: usize,
    pub writers: usize,
    pub membership_rooms: usize,
    /// Pause between a writer's operations.
    pub think: Duration,
    pub op_timeout: Duration,
}

impl Default for Shape {
    fn default() -> Self {
        Shape {
            chat_rooms: 3,
            writers: 6,
            membership_rooms: 2,
            think: Duration::from_millis(20),
            op_timeout: Duration::from_secs(7),
        }
    }
}

/// A node as the workload sees it.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub grpc: String,
}

/// Users, tokens and rooms made by the set-up.
#[derive(Debug, Clone, Default)]
pub struct World {
    pub tokens: BTreeMap<String, String>,
    /// Room name -> id.
    pub rooms: BTreeMap<String, String>,
    pub chat_rooms: Vec<String>,
    pub membership_rooms: Vec<String>,
    pub fence_room: String,
    pub presence_room: String,
    pub writers: Vec<String>,
    pub subscribers: Vec<String>,
    pub movers: Vec<String>,
    pub fenced: String,
    pub presence_users: Vec<String>,
}

pub const ADMIN: &str = "admin";

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

fn client(t: &Target, timeout: Duration) -> Result<ChatClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(t.grpc.clone())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect_lazy();
    Ok(ChatClient::new(ch))
}

/// Retries a set-up step (bounded) until the cluster takes it.
async fn retry<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut last = String::new();
    for _ in 0..60 {
        match f().await {
            Ok(v) => return Ok(v),
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                return Err(anyhow!("{what}: already exists ({})", s.message()))
            }
            Err(s) => last = format!("{:?}: {}", s.code(), s.message()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("{what} did not succeed within 30 s: {last}")
}

/// Creates users and rooms through the first node, and the memberships the run needs.
pub async fn setup(targets: &[Target], shape: &Shape) -> Result<World> {
    let t = targets.first().ok_or_else(|| anyhow!("no nodes"))?;
    let c = client(t, shape.op_timeout)?;
    let mut w = World {
        writers: (1..=shape.writers).map(|i| format!("w{i}")).collect(),
        subscribers: (1..=targets.len()).map(|i| format!("s{i}")).collect(),
        movers: (1..=3).map(|i| format!("v{i}")).collect(),
        fenced: "b1".into(),
        presence_users: (1..=targets.len()).map(|i| format!("pr{i}")).collect(),
        chat_rooms: (0..shape.chat_rooms).map(|i| format!("c{i}")).collect(),
        membership_rooms: (0..shape.membership_rooms)
            .map(|i| format!("m{i}"))
            .collect(),
        fence_room: "f0".into(),
        presence_room: "p0".into(),
        ..World::default()
    };
    let mut users = vec![ADMIN.to_string()];
    users.extend(w.writers.iter().cloned());
    users.extend(w.subscribers.iter().cloned());
    users.extend(w.movers.iter().cloned());
    users.push(w.fenced.clone());
    users.extend(w.presence_users.iter().cloned());
    for u in &users {
        let resp = retry(&format!("creating user {u}"), || {
            let mut c = c.clone();
            let name = u.clone();
            async move { c.create_user(CreateUserRequest { name }).await }
        })
        .await?;
        w.tokens.insert(u.clone(), resp.into_inner().token);
    }
    let admin = w.token(ADMIN)?;
    let mut rooms = w.chat_rooms.clone();
    rooms.extend(w.membership_rooms.iter().cloned());
    rooms.push(w.fence_room.clone());
    rooms.push(w.presence_room.clone());
    for r in &rooms {
        let room = retry(&format!("creating room {r}"), || {
            let mut c = c.clone();
            let req = authed(
                CreateRoomRequest {
                    name: r.clone(),
                    write_quorum: 0,
                },
                &admin,
            );
            async move { c.create_room(req).await }
        })
        .await?;
        w.rooms.insert(r.clone(), room.into_inner().id);
    }
    let mut joins: Vec<(String, String)> = Vec::new();
    for r in &w.chat_rooms {
        for u in w.writers.iter().chain(&w.subscribers) {
            joins.push((u.clone(), r.clone()));
        }
    }
    joins.push((w.fenced.clone(), w.fence_room.clone()));
    for u in &w.presence_users {
        joins.push((u.clone(), w.presence_room.clone()));
    }
    for (u, r) in joins {
        let token = w.token(&u)?;
        let id = w.room(&r)?;
        retry(&format!("{u} joining {r}"), || {
            let req = authed(JoinRoomRequest { room: id.clone() }, &token);
            let mut c = c.clone();
            async move { c.join_room(req).await }
        })
        .await?;
    }
    // Everyone answers on every node (a late node may still be catching up).
    for t in targets {
        let c2 = client(t, shape.op_timeout)?;
        let token = admin.clone();
        retry(&format!("reaching {}", t.name), || {
            let req = authed(
                ListMembersRequest {
                    room: rooms[0].clone(),
                    consistency: Consistency::Strong as i32,
                },
                &token,
            );
            let mut c2 = c2.clone();
            async move { c2.list_members(req).await }
        })
        .await?;
    }
    Ok(w)
}

impl World {
    pub fn token(&self, user: &str) -> Result<String> {
        self.tokens
            .get(user)
            .cloned()
            .ok_or_else(|| anyhow!("no token for {user}"))
    }

    pub fn room(&self, name: &str) -> Result<String> {
        self.rooms
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("no room {name}"))
    }

    /// Rooms whose timelines are checked at the end.
    pub fn timeline_rooms(&self) -> Vec<String> {
        let mut v = self.chat_rooms.clone();
        v.push(self.fence_room.clone());
        v
    }
}

/// Ids acknowledged per room, for the markers process.
pub type Acked = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

/// Everything a process needs.
#[derive(Clone)]
pub struct Ctx {
    pub rec: Recorder,
    pub targets: Vec<Target>,
    pub world: Arc<World>,
    pub shape: Shape,
    pub stop: watch::Receiver<bool>,
    pub acked: Acked,
}

impl Ctx {
    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    async fn pause(&mut self, d: Duration) {
        let _ = tokio::time::timeout(d, self.stop.changed()).await;
    }
}

fn msgs(list: Vec<parley_proto::v1::Message>) -> Vec<Msg> {
    list.into_iter()
        .map(|m| Msg {
            id: m.id,
            sender: m.sender,
            text: m.text,
        })
        .collect()
}

/// Reads a whole room (pages of 1000, at most 200 pages).
pub async fn read_all(
    c: &mut ChatClient<Channel>,
    token: &str,
    room_id: &str,
) -> Result<Vec<Msg>, tonic::Status> {
    let mut out = Vec::new();
    // From the very start: an empty `after` would select the newest page instead.
    let mut after = "0".repeat(32);
    for _ in 0..200 {
        let resp = c
            .history(authed(
                HistoryRequest {
                    room: room_id.to_string(),
                    limit: 1000,
                    before: String::new(),
                    after: after.clone(),
                    since: 0,
                },
                token,
            ))
            .await?
            .into_inner();
        let more = resp.more;
        let page = msgs(resp.messages);
        if let Some(last) = page.last() {
            after = last.id.clone();
        }
        let empty = page.is_empty();
        out.extend(page);
        if !more || empty {
            return Ok(out);
        }
    }
    Err(tonic::Status::out_of_range("room longer than 200 pages"))
}

/// Records `result` as the completion of `op_ok` / `op_invoked`.
fn complete<T>(
    rec: &Recorder,
    p: u64,
    node: &str,
    invoked: Op,
    result: Result<T, tonic::Status>,
    ok: impl FnOnce(T) -> Op,
) -> Option<()> {
    match result {
        Ok(v) => {
            rec.ok(p, node, ok(v));
            Some(())
        }
        Err(s) => {
            let (kind, name) = classify(&s);
            rec.failed(p, node, invoked, kind, name);
            None
        }
    }
}

/// Where a recorded send goes and as whom.
struct SendTo<'a> {
    room: &'a str,
    room_id: &'a str,
    user: &'a str,
    token: &'a str,
}

/// Sends the process's `n`th message (text `<room>-p<p>-<n>`, idempotency key
/// `p<p>-<n>`) and records it; returns the id when acknowledged.
async fn send_recorded(
    ctx: &Ctx,
    c: &mut ChatClient<Channel>,
    p: u64,
    node: &str,
    to: SendTo<'_>,
    n: u64,
    after: String,
) -> Option<String> {
    let text = format!("{}-p{p}-{n}", to.room);
    let op = |id: Option<String>| Op::Send {
        room: to.room.to_string(),
        user: to.user.to_string(),
        text: text.clone(),
        id,
    };
    ctx.rec.invoke(p, node, op(None));
    let r = c
        .send_message(authed(
            SendMessageRequest {
                room: to.room_id.to_string(),
                text: text.clone().into_bytes(),
                client_msg_id: format!("p{p}-{n}"),
                after,
            },
            to.token,
        ))
        .await
        .map(|r| r.into_inner().id);
    let id = r.as_ref().ok().cloned();
    complete(&ctx.rec, p, node, op(None), r, |id| op(Some(id)));
    id
}

/// A writer: sends unique texts round-robin over the chat rooms.
pub async fn writer(mut ctx: Ctx, p: u64, user: String, node: usize, seed: u64) -> Result<()> {
    let t = ctx.targets[node].clone();
    let mut c = client(&t, ctx.shape.op_timeout)?;
    let token = ctx.world.token(&user)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut n = 0u64;
    // Bounded: at most one operation per think time, until stopped.
    while !ctx.stopped() {
        let room = ctx.world.chat_rooms[rng.gen_range(0..ctx.world.chat_rooms.len())].clone();
        let room_id = ctx.world.room(&room)?;
        if rng.gen_ratio(1, 100) {
            let op = Op::Read {
                room: room.clone(),
                messages: None,
            };
            ctx.rec.invoke(p, &t.name, op.clone());
            let r = read_all(&mut c, &token, &room_id).await;
            complete(&ctx.rec, p, &t.name, op, r, |m| Op::Read {
                room: room.clone(),
                messages: Some(m),
            });
        } else {
            n += 1;
            let after = last.get(&room).cloned().unwrap_or_default();
            let target = SendTo {
                room: &room,
                room_id: &room_id,
                user: &user,
                token: &token,
            };
            if let Some(id) = send_recorded(&ctx, &mut c, p, &t.name, target, n, after).await {
                last.insert(room.clone(), id.clone());
                if let Ok(mut a) = ctx.acked.lock() {
                    let v = a.entry(room.clone()).or_default();
                    v.push(id);
                    if v.len() > 200 {
                        v.drain(..100);
                    }
                }
            }
        }
        let think = ctx.shape.think;
        ctx.pause(think).await;
        if ctx.rec.last_failed(p) {
            ctx.pause(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Deliveries per subscriber name: ids seen, for the end-of-run catch-up wait.
pub type Seen = Arc<Mutex<BTreeMap<String, BTreeSet<String>>>>;

/// A subscriber of one room: (re)subscribes from its cursor, records every message
/// event, and every 5-15 s reconnects on purpose to a random node.
#[allow(clippy::too_many_arguments)]
pub async fn subscriber(
    mut ctx: Ctx,
    p: u64,
    user: String,
    room: String,
    first_node: usize,
    seed: u64,
    seen: Seen,
    stop_subs: watch::Receiver<bool>,
) -> Result<()> {
    let token = ctx.world.token(&user)?;
    let room_id = ctx.world.room(&room)?;
    let name = format!("{user}@{room}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cursor: Option<String> = None;
    let mut node = first_node;
    // Bounded by the run: each round ends by a timer, an error or the stop signal.
    while !*stop_subs.borrow() {
        let t = ctx.targets[node].clone();
        // Streams have no overall deadline; only connecting and the first answer do.
        let ch = tonic::transport::Endpoint::from_shared(t.grpc.clone())?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        let mut c = ChatClient::new(ch);
        let op = Op::Subscribe {
            room: room.clone(),
            subscriber: name.clone(),
            cursor: cursor.clone(),
        };
        ctx.rec.invoke(p, &t.name, op.clone());
        let req = authed(
            SubscribeRequest {
                rooms: vec![room_id.clone()],
                cursor: cursor.clone().unwrap_or_default(),
            },
            &token,
        );
        let opened = tokio::time::timeout(ctx.shape.op_timeout, c.subscribe(req)).await;
        let mut stream = match opened {
            Ok(Ok(s)) => {
                ctx.rec.ok(p, &t.name, op);
                s.into_inner()
            }
            Ok(Err(s)) => {
                let (kind, code) = classify(&s);
                ctx.rec.failed(p, &t.name, op, kind, code);
                ctx.pause(Duration::from_millis(300)).await;
                node = rng.gen_range(0..ctx.targets.len());
                continue;
            }
            Err(_) => {
                ctx.rec
                    .failed(p, &t.name, op, Type::Info, "CLIENT_TIMEOUT".into());
                node = rng.gen_range(0..ctx.targets.len());
                continue;
            }
        };
        let hold = Duration::from_millis(rng.gen_range(5_000..15_000));
        let until = tokio::time::Instant::now() + hold;
        let mut stop = stop_subs.clone();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                _ = stop.changed() => break,
                item = stream.message() => match item {
                    Ok(Some(ev)) => {
                        if let Some(EventKind::Message(m)) = ev.kind {
                            if let Ok(mut s) = seen.lock() {
                                s.entry(name.clone()).or_default().insert(m.id.clone());
                            }
                            ctx.rec.ok(p, &t.name, Op::Deliver {
                                room: room.clone(),
                                subscriber: name.clone(),
                                msg: Msg { id: m.id, sender: m.sender, text: m.text },
                            });
                        }
                        if !ev.cursor.is_empty() {
                            cursor = Some(ev.cursor);
                        }
                    }
                    Ok(None) | Err(_) => {
                        ctx.pause(Duration::from_millis(200)).await;
                        break;
                    }
                }
            }
        }
        node = rng.gen_range(0..ctx.targets.len());
    }
    Ok(())
}

fn role_name(r: i32) -> String {
    if r == Role::Admin as i32 {
        "admin".into()
    } else {
        "member".into()
    }
}

/// Strong members read of `room`, recorded.
pub async fn members_read(
    ctx: &Ctx,
    c: &mut ChatClient<Channel>,
    p: u64,
    node: &str,
    room: &str,
    token: &str,
) -> Result<()> {
    let room_id = ctx.world.room(room)?;
    let op = Op::Members {
        room: room.to_string(),
        state: None,
    };
    ctx.rec.invoke(p, node, op.clone());
    let r = c
        .list_members(authed(
            ListMembersRequest {
                room: room_id,
                consistency: Consistency::Strong as i32,
            },
            token,
        ))
        .await
        .map(|r| r.into_inner());
    complete(&ctx.rec, p, node, op, r, |resp| Op::Members {
        room: room.to_string(),
        state: Some(Members {
            members: resp
                .members
                .into_iter()
                .map(|m| (m.user, role_name(m.role)))
                .collect(),
            banned: resp.banned.into_iter().collect(),
        }),
    });
    Ok(())
}

/// One moderation action by the admin, recorded as `op`.
async fn moderate(
    ctx: &Ctx,
    c: &mut ChatClient<Channel>,
    p: u64,
    node: &str,
    op: Op,
) -> Result<bool> {
    let admin = ctx.world.token(ADMIN)?;
    let (room, action, user, role) = match &op {
        Op::Kick { room, user } => (room, ModerateAction::ModerateKick, user, Role::Member),
        Op::Ban { room, user } => (room, ModerateAction::ModerateBan, user, Role::Member),
        Op::Unban { room, user } => (room, ModerateAction::ModerateUnban, user, Role::Member),
        Op::SetRole { room, user, role } => (
            room,
            ModerateAction::ModerateSetRole,
            user,
            if role == "admin" {
                Role::Admin
            } else {
                Role::Member
            },
        ),
        other => bail!("not a moderation: {other:?}"),
    };
    let room_id = ctx.world.room(room)?;
    ctx.rec.invoke(p, node, op.clone());
    let r = c
        .moderate(authed(
            ModerateRequest {
                room: room_id,
                action: action as i32,
                user: user.clone(),
                role: role as i32,
            },
            &admin,
        ))
        .await;
    Ok(complete(&ctx.rec, p, node, op.clone(), r, |_| op).is_some())
}

/// Join or leave by the user itself, recorded.
async fn join_or_leave(
    ctx: &Ctx,
    c: &mut ChatClient<Channel>,
    p: u64,
    node: &str,
    op: Op,
) -> Result<bool> {
    let (room, user, join) = match &op {
        Op::Join { room, user } => (room, user, true),
        Op::Leave { room, user } => (room, user, false),
        other => bail!("not a join/leave: {other:?}"),
    };
    let token = ctx.world.token(user)?;
    let room_id = ctx.world.room(room)?;
    ctx.rec.invoke(p, node, op.clone());
    let ok = if join {
        let r = c
            .join_room(authed(JoinRoomRequest { room: room_id }, &token))
            .await;
        complete(&ctx.rec, p, node, op.clone(), r, |_| op).is_some()
    } else {
        let r = c
            .leave_room(authed(LeaveRoomRequest { room: room_id }, &token))
            .await;
        complete(&ctx.rec, p, node, op.clone(), r, |_| op).is_some()
    };
    Ok(ok)
}

/// The membership processes of one room: `which` 0 = admin (kick, ban, unban, set
/// role), 1 = movers (join, leave), 2 = strong reader.
pub async fn membership(
    mut ctx: Ctx,
    p: u64,
    room: String,
    which: u8,
    node: usize,
    seed: u64,
) -> Result<()> {
    let t = ctx.targets[node].clone();
    let mut c = client(&t, ctx.shape.op_timeout)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let admin = ctx.world.token(ADMIN)?;
    while !ctx.stopped() {
        let user = ctx.world.movers[rng.gen_range(0..ctx.world.movers.len())].clone();
        match which {
            0 => {
                let op = match rng.gen_range(0..5) {
                    0 => Op::Kick {
                        room: room.clone(),
                        user,
                    },
                    1 => Op::Ban {
                        room: room.clone(),
                        user,
                    },
                    2 | 3 => Op::Unban {
                        room: room.clone(),
                        user,
                    },
                    _ => Op::SetRole {
                        room: room.clone(),
                        user,
                        role: if rng.gen_bool(0.5) { "admin" } else { "member" }.into(),
                    },
                };
                moderate(&ctx, &mut c, p, &t.name, op).await?;
            }
            1 => {
                let op = if rng.gen_bool(0.6) {
                    Op::Join {
                        room: room.clone(),
                        user,
                    }
                } else {
                    Op::Leave {
                        room: room.clone(),
                        user,
                    }
                };
                join_or_leave(&ctx, &mut c, p, &t.name, op).await?;
            }
            _ => members_read(&ctx, &mut c, p, &t.name, &room, &admin).await?,
        }
        let d = Duration::from_millis(rng.gen_range(50..300));
        ctx.pause(d).await;
    }
    Ok(())
}

/// The fenced user: sends into the fence room as fast as answers come.
pub async fn fenced_sender(mut ctx: Ctx, p: u64, node: usize) -> Result<()> {
    let t = ctx.targets[node].clone();
    let mut c = client(&t, ctx.shape.op_timeout)?;
    let user = ctx.world.fenced.clone();
    let token = ctx.world.token(&user)?;
    let room = ctx.world.fence_room.clone();
    let room_id = ctx.world.room(&room)?;
    let mut n = 0u64;
    while !ctx.stopped() {
        n += 1;
        let target = SendTo {
            room: &room,
            room_id: &room_id,
            user: &user,
            token: &token,
        };
        send_recorded(&ctx, &mut c, p, &t.name, target, n, String::new()).await;
        ctx.pause(Duration::from_millis(15)).await;
        if ctx.rec.last_failed(p) {
            ctx.pause(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// The fence admin: ban, wait, unban, re-join (as the user), wait; and kicks too.
pub async fn fence_admin(mut ctx: Ctx, p: u64, node: usize, seed: u64) -> Result<()> {
    let t = ctx.targets[node].clone();
    let mut c = client(&t, ctx.shape.op_timeout)?;
    let mut rng = StdRng::seed_from_u64(seed);
    let room = ctx.world.fence_room.clone();
    let user = ctx.world.fenced.clone();
    while !ctx.stopped() {
        let wait = Duration::from_millis(rng.gen_range(1_000..3_000));
        ctx.pause(wait).await;
        if ctx.stopped() {
            break;
        }
        let op = if rng.gen_bool(0.7) {
            Op::Ban {
                room: room.clone(),
                user: user.clone(),
            }
        } else {
            Op::Kick {
                room: room.clone(),
                user: user.clone(),
            }
        };
        let banned = matches!(op, Op::Ban { .. });
        moderate(&ctx, &mut c, p, &t.name, op).await?;
        ctx.pause(Duration::from_millis(rng.gen_range(1_000..3_000)))
            .await;
        if banned {
            moderate(
                &ctx,
                &mut c,
                p,
                &t.name,
                Op::Unban {
                    room: room.clone(),
                    user: user.clone(),
                },
            )
            .await?;
        }
        join_or_leave(
            &ctx,
            &mut c,
            p,
            &t.name,
            Op::Join {
                room: room.clone(),
                user: user.clone(),
            },
        )
        .await?;
    }
    Ok(())
}

/// Moves `user`'s read marker in the chat rooms to ids seen acknowledged.
pub async fn markers(mut ctx: Ctx, p: u64, user: String, node: usize, seed: u64) -> Result<()> {
    let t = ctx.targets[node].clone();
    let mut c = client(&t, ctx.shape.op_timeout)?;
    let token = ctx.world.token(&user)?;
    let mut rng = StdRng::seed_from_u64(seed);
    while !ctx.stopped() {
        let room = ctx.world.chat_rooms[rng.gen_range(0..ctx.world.chat_rooms.len())].clone();
        let pick = ctx.acked.lock().ok().and_then(|a| {
            let v = a.get(&room)?;
            if v.is_empty() {
                return None;
            }
            Some(v[rng.gen_range(0..v.len())].clone())
        });
        if let Some(id) = pick {
            let room_id = ctx.world.room(&room)?;
            let op = Op::MarkRead {
                room: room.clone(),
                user: user.clone(),
                id: id.clone(),
                marker: None,
            };
            ctx.rec.invoke(p, &t.name, op.clone());
            let r = c
                .mark_read(authed(
                    MarkReadRequest {
                        room: room_id,
                        message_id: id.clone(),
                    },
                    &token,
                ))
                .await
                .map(|r| r.into_inner());
            complete(&ctx.rec, p, &t.name, op, r, |resp| Op::MarkRead {
                room: room.clone(),
                user: user.clone(),
                id: id.clone(),
                marker: Some(resp.message_id),
            });
        }
        let d = Duration::from_millis(rng.gen_range(100..400));
        ctx.pause(d).await;
    }
    Ok(())
}

/// A presence user bound to one node: heartbeats through it every second.
pub async fn presence_user(mut ctx: Ctx, p: u64, user: String, node: usize) -> Result<()> {
    let t = ctx.targets[node].clone();
    let mut c = client(&t, Duration::from_secs(2))?;
    let token = ctx.world.token(&user)?;
    while !ctx.stopped() {
        let op = Op::SetPresence { user: user.clone() };
        ctx.rec.invoke(p, &t.name, op.clone());
        let r = c
            .set_presence(authed(
                SetPresenceRequest {
                    state: PresenceState::PresenceOnline as i32,
                },
                &token,
            ))
            .await;
        complete(&ctx.rec, p, &t.name, op.clone(), r, |_| op);
        ctx.pause(Duration::from_secs(1)).await;
    }
    Ok(())
}

fn presence_name(s: i32) -> String {
    match PresenceState::try_from(s) {
        Ok(PresenceState::PresenceOnline) => "online",
        Ok(PresenceState::PresenceAway) => "away",
        Ok(PresenceState::PresenceBusy) => "busy",
        _ => "offline",
    }
    .into()
}

/// Reads the presence room's presence through each node in turn.
pub async fn presence_reader(mut ctx: Ctx, p: u64) -> Result<()> {
    let token = ctx.world.token(ADMIN)?;
    let room = ctx.world.presence_room.clone();
    let room_id = ctx.world.room(&room)?;
    let mut clients = Vec::new();
    for t in &ctx.targets {
        clients.push((t.name.clone(), client(t, Duration::from_secs(2))?));
    }
    let mut i = 0usize;
    while !ctx.stopped() {
        let (name, c) = &mut clients[i % ctx.targets.len()];
        i += 1;
        let op = Op::GetPresence {
            room: room.clone(),
            users: None,
        };
        ctx.rec.invoke(p, name, op.clone());
        let r = c
            .get_presence(authed(
                GetPresenceRequest {
                    room: room_id.clone(),
                },
                &token,
            ))
            .await
            .map(|r| r.into_inner());
        complete(&ctx.rec, p, name, op, r, |resp| Op::GetPresence {
            room: room.clone(),
            users: Some(
                resp.users
                    .into_iter()
                    .map(|u| (u.user, presence_name(u.state)))
                    .collect(),
            ),
        });
        ctx.pause(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// Records one strong members read of every room whose membership is checked, before
/// anything changes them: the membership checker's starting state.
pub async fn initial_reads(ctx: &Ctx, p: u64) -> Result<()> {
    let t = ctx.targets[0].clone();
    let mut c = client(&t, ctx.shape.op_timeout)?;
    let admin = ctx.world.token(ADMIN)?;
    let mut rooms = ctx.world.membership_rooms.clone();
    rooms.push(ctx.world.fence_room.clone());
    for room in rooms {
        members_read(ctx, &mut c, p, &t.name, &room, &admin).await?;
    }
    Ok(())
}

/// Reads every timeline room from every node (not recorded): the convergence probe.
pub async fn probe(
    targets: &[Target],
    world: &World,
    timeout: Duration,
) -> Result<BTreeMap<(String, String), Vec<Msg>>> {
    let token = world.token(ADMIN)?;
    let mut out = BTreeMap::new();
    for t in targets {
        let mut c = client(t, timeout)?;
        for room in world.timeline_rooms() {
            let id = world.room(&room)?;
            let m = read_all(&mut c, &token, &id)
                .await
                .map_err(|s| anyhow!("{} {room}: {:?} {}", t.name, s.code(), s.message()))
                .context("convergence probe")?;
            out.insert((t.name.clone(), room), m);
        }
    }
    Ok(out)
}

/// The final reads, recorded: every timeline room from every node. Returns the
/// reads that succeeded, by (node, room).
pub async fn final_reads(
    rec: &Recorder,
    p: u64,
    targets: &[Target],
    world: &World,
    timeout: Duration,
) -> Result<BTreeMap<(String, String), Vec<Msg>>> {
    let token = world.token(ADMIN)?;
    let mut out = BTreeMap::new();
    for t in targets {
        let mut c = client(t, timeout)?;
        for room in world.timeline_rooms() {
            let id = world.room(&room)?;
            let op = Op::FinalRead {
                room: room.clone(),
                messages: None,
            };
            rec.invoke(p, &t.name, op.clone());
            let r = read_all(&mut c, &token, &id).await;
            if let Ok(m) = &r {
                out.insert((t.name.clone(), room.clone()), m.clone());
            }
            complete(rec, p, &t.name, op, r, |m| Op::FinalRead {
                room: room.clone(),
                messages: Some(m),
            });
        }
    }
    Ok(out)
}
