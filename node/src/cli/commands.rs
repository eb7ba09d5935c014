//! One function per command of DESIGN §6: build the request, call the node, print.

use anyhow::Context as _;
use parley_proto::v1::{
    Consistency, CreateRoomRequest, CreateUserRequest, DeleteRoomRequest, GetPresenceRequest,
    GetReceiptsRequest, GetRoomRequest, HistoryRequest, JoinRoomRequest, LeaveRoomRequest,
    ListMembersRequest, ListRoomsRequest, MarkReadRequest, ModerateAction, ModerateRequest,
    PresenceState, Role, SendDirectRequest, SendMessageRequest, SetPresenceRequest, WhoAmIRequest,
};
use serde_json::json;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::args::{Cli, ClusterCmd, Command, PresenceArg, PresenceCmd, RoleArg, RoomCmd, UserCmd};
use super::client::{self, rq, Client};
use super::output::{self as fmt, Out};
use super::{live, serve};

/// What every client command needs.
pub struct Ctx {
    pub node: String,
    pub token: Option<String>,
    pub out: Out,
}

impl Ctx {
    pub async fn client(&self) -> anyhow::Result<Client> {
        client::connect(&self.node, self.token.as_deref()).await
    }
}

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let ctx = Ctx {
        node: cli.node,
        token: cli.token,
        out: Out { json: cli.json },
    };
    match cli.command {
        Command::Serve(args) => serve::serve(args).await,
        Command::User(UserCmd::Create { name }) => user_create(&ctx, name).await,
        Command::Room(cmd) => room(&ctx, cmd).await,
        Command::Send {
            room,
            text,
            client_id,
            after,
        } => {
            let mut c = ctx.client().await?;
            let resp = c
                .send_message(rq(SendMessageRequest {
                    room: room.clone(),
                    text: os_bytes(text),
                    client_msg_id: client_id.unwrap_or_else(random_client_id),
                    after: after.unwrap_or_default(),
                }))
                .await?
                .into_inner();
            ctx.out.either(
                &resp.id,
                json!({"id": resp.id, "room": room, "duplicate": resp.duplicate, "sent_at": fmt::rfc3339(resp.sent_at)}),
            )?;
            Ok(())
        }
        Command::History {
            room,
            limit,
            before,
            after,
            since,
        } => {
            let mut c = ctx.client().await?;
            let resp = c
                .history(rq(HistoryRequest {
                    room,
                    limit: limit.unwrap_or(0),
                    before: before.unwrap_or_default(),
                    after: after.unwrap_or_default(),
                    since: since.unwrap_or(0),
                }))
                .await?
                .into_inner();
            for m in &resp.messages {
                if ctx.out.json {
                    ctx.out.value(&fmt::message_json(m))?;
                } else {
                    ctx.out.line(&fmt::message_human(m, None))?;
                }
            }
            Ok(())
        }
        Command::Tail {
            rooms,
            cursor,
            count,
        } => live::tail(&ctx, rooms, cursor, count).await,
        Command::Dm {
            user,
            text,
            client_id,
        } => {
            let mut c = ctx.client().await?;
            let resp = c
                .send_direct(rq(SendDirectRequest {
                    user: user.clone(),
                    text: os_bytes(text),
                    client_msg_id: client_id.unwrap_or_else(random_client_id),
                }))
                .await?
                .into_inner();
            ctx.out.either(
                &resp.id,
                json!({"id": resp.id, "to": user, "duplicate": resp.duplicate, "sent_at": fmt::rfc3339(resp.sent_at)}),
            )?;
            Ok(())
        }
        Command::Presence(PresenceCmd::Set { state }) => {
            let mut c = ctx.client().await?;
            let ps = match state {
                PresenceArg::Online => PresenceState::PresenceOnline,
                PresenceArg::Away => PresenceState::PresenceAway,
                PresenceArg::Busy => PresenceState::PresenceBusy,
            };
            c.set_presence(rq(SetPresenceRequest { state: ps as i32 }))
                .await?;
            let name = fmt::presence_name(ps as i32);
            ctx.out
                .either(&format!("presence: {name}"), json!({"state": name}))?;
            Ok(())
        }
        Command::Presence(PresenceCmd::Show { room }) => {
            let mut c = ctx.client().await?;
            let resp = c
                .get_presence(rq(GetPresenceRequest { room }))
                .await?
                .into_inner();
            for p in &resp.users {
                ctx.out
                    .either(&fmt::presence_line(p), fmt::presence_json(p))?;
            }
            Ok(())
        }
        Command::Read { room, message_id } => {
            let mut c = ctx.client().await?;
            let resp = c
                .mark_read(rq(MarkReadRequest {
                    room: room.clone(),
                    message_id,
                }))
                .await?
                .into_inner();
            ctx.out.either(
                &resp.message_id,
                json!({"room": room, "message_id": resp.message_id}),
            )?;
            Ok(())
        }
        Command::Receipts { room, message_id } => {
            let mut c = ctx.client().await?;
            let resp = c
                .get_receipts(rq(GetReceiptsRequest {
                    room: room.clone(),
                    message_id: message_id.clone(),
                }))
                .await?
                .into_inner();
            if ctx.out.json {
                ctx.out.value(
                    &json!({"room": room, "message_id": message_id, "read_by": resp.read_by}),
                )?;
            } else {
                for u in &resp.read_by {
                    ctx.out.line(u)?;
                }
            }
            Ok(())
        }
        Command::Chat { room, last } => live::chat(&ctx, room, last).await,
        Command::Whoami => {
            let mut c = ctx.client().await?;
            let u = c.who_am_i(rq(WhoAmIRequest {})).await?.into_inner();
            ctx.out.either(
                &u.name,
                json!({"user": u.name, "created_at": fmt::rfc3339(u.created_at)}),
            )?;
            Ok(())
        }
        Command::Cluster(ClusterCmd::Status) => cluster_status(&ctx).await,
    }
}

async fn user_create(ctx: &Ctx, name: String) -> anyhow::Result<()> {
    let mut c = ctx.client().await?;
    let resp = c
        .create_user(rq(CreateUserRequest { name }))
        .await?
        .into_inner();
    let user = resp.user.map(|u| u.name).unwrap_or_default();
    ctx.out
        .either(&resp.token, json!({"user": user, "token": resp.token}))?;
    Ok(())
}

fn consistency(strong: bool) -> i32 {
    if strong {
        Consistency::Strong as i32
    } else {
        Consistency::Local as i32
    }
}

async fn room(ctx: &Ctx, cmd: RoomCmd) -> anyhow::Result<()> {
    let out = ctx.out;
    let mut c = ctx.client().await?;
    match cmd {
        RoomCmd::Create { name, write_quorum } => {
            let r = c
                .create_room(rq(CreateRoomRequest {
                    name,
                    write_quorum: write_quorum.unwrap_or(0),
                }))
                .await?
                .into_inner();
            out.either(&r.id, fmt::room_json(&r))?;
        }
        RoomCmd::List { joined, strong } => {
            let resp = c
                .list_rooms(rq(ListRoomsRequest {
                    joined_only: joined,
                    consistency: consistency(strong),
                }))
                .await?
                .into_inner();
            for r in &resp.rooms {
                out.either(&fmt::room_line(r), fmt::room_json(r))?;
            }
        }
        RoomCmd::Show { room, strong } => {
            let r = c
                .get_room(rq(GetRoomRequest {
                    room,
                    consistency: consistency(strong),
                }))
                .await?
                .into_inner();
            out.either(&fmt::room_block(&r), fmt::room_json(&r))?;
        }
        RoomCmd::Delete { room } => {
            c.delete_room(rq(DeleteRoomRequest { room: room.clone() }))
                .await?;
            out.either(
                &format!("deleted {room}"),
                json!({"room": room, "deleted": true}),
            )?;
        }
        RoomCmd::Join { room } => {
            let r = c
                .join_room(rq(JoinRoomRequest { room }))
                .await?
                .into_inner();
            out.either(&format!("joined {} ({})", r.name, r.id), fmt::room_json(&r))?;
        }
        RoomCmd::Leave { room } => {
            c.leave_room(rq(LeaveRoomRequest { room: room.clone() }))
                .await?;
            out.either(&format!("left {room}"), json!({"room": room, "left": true}))?;
        }
        RoomCmd::Members { room, strong } => {
            let resp = c
                .list_members(rq(ListMembersRequest {
                    room: room.clone(),
                    consistency: consistency(strong),
                }))
                .await?
                .into_inner();
            for m in &resp.members {
                out.either(&fmt::member_line(m), fmt::member_json(&room, m))?;
            }
            for b in &resp.banned {
                out.either(
                    &format!("{b}  banned"),
                    json!({"room": room, "user": b, "role": null, "banned": true}),
                )?;
            }
        }
        RoomCmd::Role { room, user, role } => {
            let r = match role {
                RoleArg::Admin => Role::Admin,
                RoleArg::Member => Role::Member,
            };
            moderate(&mut c, out, room, user, ModerateAction::ModerateSetRole, r).await?;
        }
        RoomCmd::Kick { room, user } => {
            moderate(
                &mut c,
                out,
                room,
                user,
                ModerateAction::ModerateKick,
                Role::Member,
            )
            .await?
        }
        RoomCmd::Ban { room, user } => {
            moderate(
                &mut c,
                out,
                room,
                user,
                ModerateAction::ModerateBan,
                Role::Member,
            )
            .await?
        }
        RoomCmd::Unban { room, user } => {
            moderate(
                &mut c,
                out,
                room,
                user,
                ModerateAction::ModerateUnban,
                Role::Member,
            )
            .await?
        }
        RoomCmd::Invite { room, user } => {
            moderate(
                &mut c,
                out,
                room,
                user,
                ModerateAction::ModerateInvite,
                Role::Member,
            )
            .await?
        }
    }
    Ok(())
}

async fn moderate(
    c: &mut Client,
    out: Out,
    room: String,
    user: String,
    action: ModerateAction,
    role: Role,
) -> anyhow::Result<()> {
    c.moderate(rq(ModerateRequest {
        room: room.clone(),
        action: action as i32,
        user: user.clone(),
        role: role as i32,
    }))
    .await?;
    let (human, verb) = match action {
        ModerateAction::ModerateInvite => (format!("invited {user} to {room}"), "invite"),
        ModerateAction::ModerateKick => (format!("kicked {user} from {room}"), "kick"),
        ModerateAction::ModerateBan => (format!("banned {user} from {room}"), "ban"),
        ModerateAction::ModerateUnban => (format!("unbanned {user} in {room}"), "unban"),
        ModerateAction::ModerateSetRole => (
            format!("{user} is now {} in {room}", fmt::role_name(role as i32)),
            "role",
        ),
        ModerateAction::ModerateUnspecified => (String::new(), "unspecified"),
    };
    let mut v = json!({"room": room, "user": user, "action": verb, "ok": true});
    if action == ModerateAction::ModerateSetRole {
        v["role"] = json!(fmt::role_name(role as i32));
    }
    out.either(&human, v)?;
    Ok(())
}

/// `cluster status`: the node's health, then the cluster as it sees it: nodes with
/// liveness, and each group's voters, leader, term and applied index.
async fn cluster_status(ctx: &Ctx) -> anyhow::Result<()> {
    let ch = client::channel(&ctx.node).await?;
    let resp = HealthClient::new(ch)
        .check(rq(HealthCheckRequest {
            service: String::new(),
        }))
        .await
        .context("health check")?
        .into_inner();
    let health = match ServingStatus::try_from(resp.status) {
        Ok(ServingStatus::Serving) => "SERVING",
        Ok(ServingStatus::NotServing) => "NOT_SERVING",
        Ok(ServingStatus::ServiceUnknown) => "SERVICE_UNKNOWN",
        _ => "UNKNOWN",
    };
    if health != "SERVING" {
        return Err(
            tonic::Status::unavailable(format!("the node at {} is {health}", ctx.node)).into(),
        );
    }
    let st = ctx
        .client()
        .await?
        .cluster_status(rq(parley_proto::v1::ClusterStatusRequest {}))
        .await?
        .into_inner();
    let yes = |b: bool| if b { "yes" } else { "no" };
    let group_name = |g: u32| {
        if g == 0 {
            "meta".to_string()
        } else {
            format!("p{}", g - 1)
        }
    };
    let join = |v: &[u64]| {
        v.iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    if ctx.out.json {
        ctx.out.value(
            &json!({"cluster": st.cluster, "node": st.node_id, "address": ctx.node,
            "health": health, "partitions": st.partitions}),
        )?;
        for n in &st.nodes {
            ctx.out.value(
                &json!({"node_id": n.node_id, "grpc": n.grpc_addr, "http": n.http_addr,
                "p2p": n.p2p, "alive": n.alive, "registered": n.registered}),
            )?;
        }
        for g in &st.groups {
            ctx.out.value(&json!({"group": group_name(g.group), "voters": g.voters,
                "leader": (g.leader != 0).then_some(g.leader), "term": g.term,
                "applied_index": g.applied_index, "last_log_index": g.last_log_index, "local": g.local,
                "preferred_leader": (g.preferred_leader != 0).then_some(g.preferred_leader)}))?;
        }
        return Ok(());
    }
    ctx.out.line(&format!(
        "cluster {} seen from node {} ({}, {health}); {} partitions",
        st.cluster, st.node_id, ctx.node, st.partitions
    ))?;
    ctx.out.line(&format!(
        "{:<12} {:<22} {:<22} {:<6} {}",
        "NODE", "GRPC", "HTTP", "ALIVE", "REGISTERED"
    ))?;
    for n in &st.nodes {
        ctx.out.line(&format!(
            "{:<12} {:<22} {:<22} {:<6} {}",
            n.node_id,
            n.grpc_addr,
            n.http_addr,
            yes(n.alive),
            yes(n.registered)
        ))?;
    }
    ctx.out.line(&format!(
        "{:<6} {:<36} {:<12} {:<10} {:<6} {:<8} {}",
        "GROUP", "VOTERS", "LEADER", "PREFERRED", "TERM", "APPLIED", "LOCAL"
    ))?;
    let node_or_dash = |n: u64| {
        if n == 0 {
            "-".to_string()
        } else {
            n.to_string()
        }
    };
    for g in &st.groups {
        ctx.out.line(&format!(
            "{:<6} {:<36} {:<12} {:<10} {:<6} {:<8} {}",
            group_name(g.group),
            join(&g.voters),
            node_or_dash(g.leader),
            node_or_dash(g.preferred_leader),
            g.term,
            g.applied_index,
            yes(g.local)
        ))?;
    }
    Ok(())
}

/// Command-line text as bytes, exactly as given (it may not be UTF-8; the node decides).
fn os_bytes(s: std::ffi::OsString) -> Vec<u8> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        s.into_vec()
    }
    #[cfg(not(unix))]
    {
        s.to_string_lossy().into_owned().into_bytes()
    }
}

/// A fresh idempotency key for one send.
pub fn random_client_id() -> String {
    format!("cli-{:032x}", rand::random::<u128>())
}
