//! `testnet demo`: a narrated end-to-end run anyone can watch.
//!
//! A fresh 3-node cluster (temp dir, free ports); alice, bob and carol each talk to
//! their own node through the real gRPC API; carol watches a live stream on node 3
//! while alice and bob chat; node 1 is killed with `kill -9` and the others keep
//! chatting; node 1 restarts from its data and catches up. Every step is checked and
//! a PASS/FAIL line per check ends the run (exit non-zero on any FAIL). Every node is
//! stopped by PID at the end, also on failure or Ctrl-C.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures::StreamExt;
use parley_node::ids::PartitionId;
use parley_proto::v1::chat_client::ChatClient;
use parley_proto::v1::{
    event, Consistency, CreateUserRequest, GetRoomRequest, HistoryRequest, ListMembersRequest,
    Message, SendMessageRequest,
};
use tokio::sync::mpsc;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use crate::bench::setup::{self, authed, User};
use crate::cluster::{self, Layout, Running};
use crate::nodes;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// The `parley` binary (default: beside this executable).
    #[arg(long, value_name = "PATH")]
    parley: Option<PathBuf>,
    /// Keep the cluster's data directory and logs (printed at the end).
    #[arg(long)]
    keep: bool,
}

/// The checks, in order; the summary prints `PASS  <check>` or `FAIL  <check>: why`.
pub const CHECKS: [&str; 8] = [
    "cluster formed: 3 nodes, every Raft group led",
    "alice, bob and carol created on nodes 1, 2 and 3",
    "room demo created by alice; bob and carol joined (3 members)",
    "carol's stream on node 3 showed all 10 messages",
    "bob and carol kept chatting via nodes 2 and 3 after kill -9 of node 1",
    "carol's stream showed all 15 messages, none twice",
    "node 1 restarted on the same ports and data dir and serves",
    "node 1's history has all 15 messages, in node 2's order",
];

const ROOM: &str = "demo";
const RPC_TIMEOUT: Duration = Duration::from_secs(2);
const SEND_BUDGET: Duration = Duration::from_secs(30);
const DELIVERY_WAIT: Duration = Duration::from_secs(20);
const CATCH_UP: Duration = Duration::from_secs(30);

const ALICE_BOB: [(&str, &str); 10] = [
    ("alice", "hi everyone, alice here on node 1"),
    ("bob", "hey alice, bob here on node 2"),
    ("alice", "carol, are you watching from node 3?"),
    ("bob", "she is subscribed there; every line reaches her"),
    ("alice", "three nodes, one room, write quorum 2"),
    (
        "bob",
        "so each message sits on two nodes before we get the ack",
    ),
    (
        "alice",
        "which means one node can die without losing anything",
    ),
    ("bob", "let's try that in a minute"),
    ("alice", "ok, last one from me for now"),
    ("bob", "and the tenth message, from bob"),
];

const AFTER_KILL: [(&str, &str); 5] = [
    ("bob", "node 1 just died; bob still here on node 2"),
    ("carol", "carol on node 3: still chatting"),
    ("bob", "alice's node is gone, the room is not"),
    ("carol", "when node 1 comes back it should catch up"),
    ("bob", "fifteen messages in total; let's check"),
];

/// PASS/FAIL per check, in [`CHECKS`] order (`None`: not reached).
struct Checks(Vec<Option<Result<String, String>>>);

impl Checks {
    fn new() -> Self {
        Checks(vec![None; CHECKS.len()])
    }

    fn set(&mut self, i: usize, r: Result<String, String>) {
        match &r {
            Ok(d) => println!("   ok: {d}"),
            Err(e) => println!("   FAILED: {e}"),
        }
        self.0[i] = Some(r);
    }

    fn all_passed(&self) -> bool {
        self.0.iter().all(|c| matches!(c, Some(Ok(_))))
    }

    fn summary(&self) -> String {
        let mut s = String::new();
        for (name, r) in CHECKS.iter().zip(&self.0) {
            match r {
                Some(Ok(_)) => s.push_str(&format!("PASS  {name}\n")),
                Some(Err(e)) => s.push_str(&format!("FAIL  {name}: {e}\n")),
                None => s.push_str(&format!("FAIL  {name}: not reached\n")),
            }
        }
        let passed = self.0.iter().filter(|c| matches!(c, Some(Ok(_)))).count();
        s.push_str(&format!(
            "RESULT demo {}: {passed}/{} checks passed\n",
            if self.all_passed() { "PASS" } else { "FAIL" },
            CHECKS.len()
        ));
        s
    }
}

fn step(n: usize, text: &str) {
    println!();
    println!("{n}. {text}");
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    let parley = nodes::find_parley(args.parley.as_deref())?;
    let tmp = tempfile::Builder::new().prefix("parley-demo-").tempdir()?;
    let layout = Layout::plan(tmp.path(), &parley, 3, 0, &[])?;
    let mut checks = Checks::new();

    println!("Parley demo: a 3-node cluster, three users, one room, one node killed.");
    println!("data and logs: {}", tmp.path().display());
    step(
        1,
        "Start 3 nodes on free ports and wait until the cluster is formed (every Raft group has a leader).",
    );
    for n in &layout.nodes {
        println!("   node {}: gRPC {}", n.id, n.grpc);
    }
    let t0 = Instant::now();
    let started = tokio::select! {
        r = Running::start(layout, Duration::from_secs(90)) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    let mut running = match started {
        Ok(r) => r,
        Err(e) => {
            // Running::start's children were dropped, which kills them.
            checks.set(0, Err(format!("{e:#}")));
            return finish(&checks, tmp, args.keep);
        }
    };
    let outcome = tokio::select! {
        r = demo(&mut running, &mut checks, t0) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    if let Err(e) = &outcome {
        println!("   stopped early: {e:#}");
    }
    // Node 1's kill -9 is not listed: kill9 reaps it and drops its handle.
    let died = running.exited();
    println!();
    println!("Stopping every node (by PID).");
    running.stop_all().await;
    for (id, status) in died {
        println!("   note: node {id} had exited on its own: {status}");
    }
    finish(&checks, tmp, args.keep)
}

fn finish(checks: &Checks, tmp: tempfile::TempDir, keep: bool) -> Result<ExitCode> {
    println!();
    print!("{}", checks.summary());
    let ok = checks.all_passed();
    if keep || !ok {
        let kept = tmp.keep();
        println!(
            "cluster data and logs kept in {} (node<i>/, node<i>.log, testnet.json)",
            kept.display()
        );
    } else {
        println!("cluster data removed (pass --keep to keep it)");
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn demo(running: &mut Running, checks: &mut Checks, t0: Instant) -> Result<()> {
    let addrs = running.layout.grpc_addrs();
    let st = cluster::wait_healthy(&addrs, 3, Duration::from_secs(10)).await;
    let st = match st {
        Ok(st) => st,
        Err(e) => {
            checks.set(0, Err(format!("{e:#}")));
            bail!("the cluster did not form");
        }
    };
    let pids: Vec<String> = running
        .layout
        .nodes
        .iter()
        .map(|n| format!("node {} pid {}", n.id, n.pid.unwrap_or(0)))
        .collect();
    checks.set(
        0,
        Ok(format!(
            "formed in {:.1}s ({}); {} groups (meta + {} partitions), each with a leader",
            t0.elapsed().as_secs_f64(),
            pids.join(", "),
            st.groups.len(),
            st.partitions
        )),
    );

    // 2. Users, each on their own node.
    step(
        2,
        "alice connects to node 1, bob to node 2, carol to node 3; each creates a user there.",
    );
    let mut clients = Vec::new();
    for a in &addrs {
        clients.push(setup::connect(*a, Some(RPC_TIMEOUT)).await?);
    }
    let mut users = Vec::new();
    for (i, name) in ["alice", "bob", "carol"].iter().enumerate() {
        match create_user(&clients[i], name, i).await {
            Ok(u) => {
                println!("   {name} created on node {} ({})", i + 1, addrs[i]);
                users.push(u);
            }
            Err(e) => {
                checks.set(1, Err(format!("{e:#}")));
                bail!("creating users failed");
            }
        }
    }
    let (alice, bob, carol) = match users.as_slice() {
        [a, b, c] => (a.clone(), b.clone(), c.clone()),
        _ => bail!("expected three users"),
    };
    checks.set(1, Ok("each has a bearer token from its own node".into()));

    // 3. The room.
    step(
        3,
        "alice creates room \"demo\" (default write quorum 2) on node 1; bob joins via node 2, carol via node 3.",
    );
    let room = room_setup(&clients, &alice, &bob, &carol, &st).await;
    let (room_id, group) = match room {
        Ok((id, group, detail)) => {
            checks.set(2, Ok(detail));
            (id, group)
        }
        Err(e) => {
            checks.set(2, Err(format!("{e:#}")));
            bail!("setting up the room failed");
        }
    };

    // 4. Carol watches; alice and bob chat.
    step(
        4,
        "carol subscribes on node 3; alice sends 5 messages via node 1 and bob 5 via node 2.",
    );
    let stream = setup::subscribe(addrs[2], &carol, &room_id).await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let watcher = tokio::spawn(watch(stream, tx));
    let mut seen: Vec<Message> = Vec::new();
    let mut sent: Vec<String> = Vec::new();
    let by_name = |n: &str| -> (usize, &User) {
        match n {
            "alice" => (0, &alice),
            "bob" => (1, &bob),
            _ => (2, &carol),
        }
    };
    for (k, (who, text)) in ALICE_BOB.iter().enumerate() {
        let (i, user) = by_name(who);
        let key = format!("demo-{k}");
        let s = send_retrying(&clients[i], user, &room_id, text, &key, SEND_BUDGET)
            .await
            .with_context(|| format!("{who} sending via node {}", i + 1))?;
        sent.push(s.id);
        // Let carol's lines interleave with the sends, as in a real chat.
        drain_for(&mut rx, &mut seen, Duration::from_millis(150)).await;
    }
    let r = await_delivered(&mut rx, &mut seen, &sent, DELIVERY_WAIT).await;
    checks.set(3, r.map(|()| "10 of 10 sent messages arrived".to_string()));

    // 5. kill -9 node 1.
    let (leader, term) = cluster::leader_of(&addrs, group).await;
    let pid1 = running.layout.node(1)?.pid.unwrap_or(0);
    step(
        5,
        &format!("kill -9 node 1 (pid {pid1}, alice's node); bob and carol keep chatting via nodes 2 and 3."),
    );
    running.kill9(1).await?;
    let killed = Instant::now();
    if leader == 1 {
        println!(
            "   node 1 was the Raft leader of room demo's partition (group {}, term {term}): \
             the partition must elect a new leader before the next send",
            cluster::group_name(group)
        );
    } else {
        println!(
            "   node 1 was killed; room demo's partition ({}) is led by node {leader}, so it keeps its leader",
            cluster::group_name(group)
        );
    }
    let mut after: Vec<String> = Vec::new();
    let mut failure = None;
    for (k, (who, text)) in AFTER_KILL.iter().enumerate() {
        let (i, user) = by_name(who);
        let key = format!("demo-after-{k}");
        match send_retrying(&clients[i], user, &room_id, text, &key, SEND_BUDGET).await {
            Ok(s) => {
                if k == 0 {
                    println!(
                        "   first send after the kill went through {:.2}s after the kill ({} failed attempt{} before it)",
                        killed.elapsed().as_secs_f64(),
                        s.failed,
                        if s.failed == 1 { "" } else { "s" }
                    );
                }
                after.push(s.id);
            }
            Err(e) => {
                failure = Some(format!("{who} via node {}: {e:#}", i + 1));
                break;
            }
        }
        drain_for(&mut rx, &mut seen, Duration::from_millis(150)).await;
    }
    match failure {
        None => checks.set(4, Ok("5 of 5 sends acknowledged with node 1 down".into())),
        Some(f) => {
            checks.set(4, Err(f));
            watcher.abort();
            bail!("chatting without node 1 failed");
        }
    }
    sent.extend(after);
    let r = await_delivered(&mut rx, &mut seen, &sent, DELIVERY_WAIT)
        .await
        .and_then(|()| {
            let mut ids = HashSet::new();
            let dup: Vec<&str> = seen
                .iter()
                .filter(|m| !ids.insert(m.id.as_str()))
                .map(|m| m.id.as_str())
                .collect();
            if dup.is_empty() && ids.len() == sent.len() {
                Ok(())
            } else {
                Err(format!(
                    "{} distinct messages for {} sent, duplicates: [{}]",
                    ids.len(),
                    sent.len(),
                    dup.join(",")
                ))
            }
        });
    checks.set(5, r.map(|()| "15 of 15, each once".to_string()));
    watcher.abort();

    // 6. Restart node 1 and read its history.
    step(
        6,
        "restart node 1 on the same ports and data dir; read room demo's history on node 1 and compare with node 2.",
    );
    let r0 = Instant::now();
    match running.restart(1, Duration::from_secs(60)).await {
        Ok(()) => {
            let pid = running.layout.node(1)?.pid.unwrap_or(0);
            checks.set(
                6,
                Ok(format!(
                    "node 1 serves again on {} (pid {pid}) after {:.1}s",
                    addrs[0],
                    r0.elapsed().as_secs_f64()
                )),
            );
        }
        Err(e) => {
            checks.set(6, Err(format!("{e:#}")));
            bail!("restarting node 1 failed");
        }
    }
    let r = catch_up(&addrs, &alice, &bob, &room_id, &sent).await;
    checks.set(
        7,
        r.map(|secs| {
            format!("node 1 and node 2 both list the same 15 ids in the same order ({secs:.1}s after the restart)")
        }),
    );
    Ok(())
}

async fn create_user(client: &ChatClient<Channel>, name: &str, target: usize) -> Result<User> {
    let token = setup::retry(&format!("create user {name}"), |_| {
        let mut c = client.clone();
        let req = CreateUserRequest {
            name: name.to_string(),
        };
        async move { c.create_user(req).await.map(|r| r.into_inner().token) }
    })
    .await?;
    let auth = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| anyhow!("user {name}: token is not a valid header value"))?;
    Ok(User {
        name: name.to_string(),
        auth,
        target,
    })
}

/// Creates the room, joins bob and carol, checks the member list (strong read on
/// node 3). Returns (room id, its partition's Raft group, a detail line).
async fn room_setup(
    clients: &[ChatClient<Channel>],
    alice: &User,
    bob: &User,
    carol: &User,
    st: &parley_proto::v1::ClusterStatusResponse,
) -> Result<(String, u32, String)> {
    let hidden = indicatif::ProgressBar::hidden();
    let ids = setup::create_rooms(&clients[0], alice, &[ROOM.to_string()], 0, 1, &hidden).await?;
    let room_id = ids
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no room id"))?;
    let mut c = clients[0].clone();
    let room = c
        .get_room(authed(
            GetRoomRequest {
                room: room_id.clone(),
                consistency: Consistency::Strong as i32,
            },
            &alice.auth,
        ))
        .await
        .map_err(|s| anyhow!("get room: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let quorum = if room.write_quorum == 0 {
        "cluster default, 2".to_string()
    } else {
        room.write_quorum.to_string()
    };
    let partition = PartitionId::of_room_name(ROOM, st.partitions.max(1)).0;
    let group = partition + 1;
    println!("   room demo is {room_id} (write quorum: {quorum}; partition p{partition})");
    setup::join_all(
        clients,
        vec![
            (bob.clone(), room_id.clone()),
            (carol.clone(), room_id.clone()),
        ],
        2,
        &hidden,
    )
    .await?;
    println!("   bob joined via node 2, carol via node 3");
    let mut c = clients[2].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    let members = loop {
        let r = c
            .list_members(authed(
                ListMembersRequest {
                    room: room_id.clone(),
                    consistency: Consistency::Strong as i32,
                },
                &carol.auth,
            ))
            .await;
        let last = match r {
            Ok(m) => {
                let mut names: Vec<String> =
                    m.into_inner().members.into_iter().map(|m| m.user).collect();
                names.sort();
                if names == ["alice", "bob", "carol"] {
                    break names;
                }
                format!("members {names:?}")
            }
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        if Instant::now() >= deadline {
            bail!("node 3 never listed alice, bob and carol as members: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    Ok((
        room_id,
        group,
        format!("node 3 lists members {}", members.join(", ")),
    ))
}

/// Carol's stream: prints each message as it arrives and passes it on.
async fn watch(
    mut stream: tonic::Streaming<parley_proto::v1::Event>,
    tx: mpsc::UnboundedSender<Message>,
) {
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(ev) => {
                if let Some(event::Kind::Message(m)) = ev.kind {
                    println!("   [node 3] {}: {}", m.sender, m.text);
                    if tx.send(m).is_err() {
                        return;
                    }
                }
            }
            Err(s) => {
                println!(
                    "   [node 3] carol's stream ended: {:?}: {}",
                    s.code(),
                    s.message()
                );
                return;
            }
        }
    }
}

/// Moves what the stream delivered within `for_` into `seen`.
async fn drain_for(
    rx: &mut mpsc::UnboundedReceiver<Message>,
    seen: &mut Vec<Message>,
    for_: Duration,
) {
    let until = tokio::time::Instant::now() + for_;
    while let Ok(Some(m)) = tokio::time::timeout_at(until, rx.recv()).await {
        seen.push(m);
    }
}

/// Waits (bounded) until every id in `want` is in `seen`.
async fn await_delivered(
    rx: &mut mpsc::UnboundedReceiver<Message>,
    seen: &mut Vec<Message>,
    want: &[String],
    within: Duration,
) -> Result<(), String> {
    let until = tokio::time::Instant::now() + within;
    loop {
        let have: HashSet<&str> = seen.iter().map(|m| m.id.as_str()).collect();
        let missing = want.iter().filter(|id| !have.contains(id.as_str())).count();
        if missing == 0 {
            return Ok(());
        }
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(m)) => seen.push(m),
            Ok(None) => {
                return Err(format!(
                    "the stream ended with {missing} of {} messages missing",
                    want.len()
                ))
            }
            Err(_) => {
                return Err(format!(
                    "{missing} of {} messages did not arrive within {within:?}",
                    want.len()
                ))
            }
        }
    }
}

struct Sent {
    id: String,
    failed: u32,
}

/// Sends `text` as `user`, retrying (same idempotency key, so never twice) every
/// 100 ms until it is acknowledged or `within` is spent.
async fn send_retrying(
    client: &ChatClient<Channel>,
    user: &User,
    room: &str,
    text: &str,
    key: &str,
    within: Duration,
) -> Result<Sent> {
    let deadline = Instant::now() + within;
    let mut failed = 0u32;
    loop {
        let mut c = client.clone();
        let req = authed(
            SendMessageRequest {
                room: room.to_string(),
                text: text.as_bytes().to_vec(),
                client_msg_id: key.to_string(),
                after: String::new(),
            },
            &user.auth,
        );
        let last = match tokio::time::timeout(RPC_TIMEOUT, c.send_message(req)).await {
            Ok(Ok(r)) => {
                return Ok(Sent {
                    id: r.into_inner().id,
                    failed,
                })
            }
            Ok(Err(s)) => format!("{:?}: {}", s.code(), s.message()),
            Err(_) => format!("no answer within {RPC_TIMEOUT:?}"),
        };
        failed += 1;
        if Instant::now() >= deadline {
            bail!("not acknowledged within {within:?} ({failed} attempts; last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads history on node 1 (as alice) and node 2 (as bob) until both list exactly the
/// sent ids and agree on the order (bounded by [`CATCH_UP`]). Returns seconds taken.
async fn catch_up(
    addrs: &[std::net::SocketAddr],
    alice: &User,
    bob: &User,
    room: &str,
    sent: &[String],
) -> Result<f64, String> {
    let t0 = Instant::now();
    let deadline = t0 + CATCH_UP;
    let want: HashSet<&str> = sent.iter().map(String::as_str).collect();
    let mut last = String::from("not read yet");
    let mut printed = false;
    while Instant::now() < deadline {
        let one = history(addrs[0], alice, room).await;
        let two = history(addrs[1], bob, room).await;
        match (one, two) {
            (Ok(h1), Ok(h2)) => {
                let ids1: Vec<&str> = h1.iter().map(|m| m.id.as_str()).collect();
                let ids2: Vec<&str> = h2.iter().map(|m| m.id.as_str()).collect();
                let set1: HashSet<&str> = ids1.iter().copied().collect();
                if ids1.len() == sent.len() && set1 == want && ids1 == ids2 {
                    println!(
                        "   history on node 1 ({} messages, oldest first):",
                        h1.len()
                    );
                    for m in &h1 {
                        println!("   [node 1] {}: {}", m.sender, m.text);
                    }
                    return Ok(t0.elapsed().as_secs_f64());
                }
                last = format!(
                    "node 1 has {} messages ({} of ours), node 2 has {}; same order: {}",
                    ids1.len(),
                    set1.intersection(&want).count(),
                    ids2.len(),
                    ids1 == ids2
                );
                if !printed {
                    println!("   waiting for node 1 to catch up: {last}");
                    printed = true;
                }
            }
            (Err(e), _) => last = format!("node 1: {e}"),
            (_, Err(e)) => last = format!("node 2: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("not within {CATCH_UP:?}: {last}"))
}

/// Up to 100 messages of `room` from the node at `addr` (a fresh connection).
async fn history(
    addr: std::net::SocketAddr,
    user: &User,
    room: &str,
) -> Result<Vec<Message>, String> {
    let mut c = cluster::status_client(addr, RPC_TIMEOUT).map_err(|e| format!("{e:#}"))?;
    let req = authed(
        HistoryRequest {
            room: room.to_string(),
            limit: 100,
            ..Default::default()
        },
        &user.auth,
    );
    match tokio::time::timeout(RPC_TIMEOUT + Duration::from_millis(200), c.history(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner().messages),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {RPC_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lists_every_check() {
        let mut c = Checks::new();
        assert!(!c.all_passed());
        for i in 0..CHECKS.len() {
            c.0[i] = Some(Ok(String::new()));
        }
        assert!(c.all_passed());
        let s = c.summary();
        for name in CHECKS {
            assert!(s.contains(&format!("PASS  {name}\n")), "{s}");
        }
        assert!(s.contains("RESULT demo PASS: 8/8"));
        c.0[7] = None;
        assert!(c.summary().contains("FAIL  node 1's history"));
        assert!(c.summary().contains("RESULT demo FAIL: 7/8"));
    }

    #[test]
    fn conversation_counts() {
        assert_eq!(ALICE_BOB.iter().filter(|(w, _)| *w == "alice").count(), 5);
        assert_eq!(ALICE_BOB.iter().filter(|(w, _)| *w == "bob").count(), 5);
        assert!(AFTER_KILL.iter().all(|(w, _)| *w != "alice"));
    }
}
