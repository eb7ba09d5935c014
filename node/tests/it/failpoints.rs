//! Crash points (feature `failpoints`): the node aborts at an exact place in its
//! durability path, is restarted on the same data, and must have kept everything it
//! acknowledged, exactly once, and serve again. Run with
//! `cargo test -p parley-node --features failpoints --test it failpoints`.
//!
//! - `raft-append-before-flush`: Raft entries written, not yet fsynced: the entry
//!   was never acked (the callback fires after the flush), every earlier one is kept.
//! - `timeline-before-flush`: a message batch applied, not yet fsynced: unacked sends
//!   may or may not survive, acked ones must.
//! - `timeline-compact-before-removing-changes`: the whole-chunk save written, the
//!   incremental changes not yet removed: both load, automerge drops the duplicates.
//! - `raft-snapshot-build`: a snapshot built but not stored: the node recovers from
//!   the log.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use parley_proto::v1 as pb;

use crate::support::{all_messages, Node};

/// Starts a node with the crash point `point` armed (`arm` in fail crate syntax); the
/// FAILPOINTS variable applies to this start only, so a restart runs without it.
fn crashed_node(extra: &[&str], point: &str, arm: &str) -> Node {
    let spec = format!("{point}={arm}");
    Node::start_with(extra, &[("FAILPOINTS", spec.as_str())])
}

async fn user_and_room(node: &Node, room: &str) -> (String, String) {
    let mut anon = node.client(None).await;
    let token = anon
        .create_user(pb::CreateUserRequest { name: "fp".into() })
        .await
        .expect("create user")
        .into_inner()
        .token;
    let mut c = node.client(Some(&token)).await;
    let id = c
        .create_room(pb::CreateRoomRequest {
            name: room.into(),
            write_quorum: 0,
        })
        .await
        .expect("create room")
        .into_inner()
        .id;
    (token, id)
}

/// Sends one message at a time until a send fails (the node aborted) or `max` sends;
/// returns what was acked (client_msg_id -> id) and whether the node died.
async fn send_until_crash(
    node: &mut Node,
    token: &str,
    room: &str,
    max: usize,
) -> (BTreeMap<String, String>, bool) {
    let mut c = node.client(Some(token)).await;
    let mut acked = BTreeMap::new();
    for i in 0..max {
        let cmid = format!("m{i}");
        match c
            .send_message(pb::SendMessageRequest {
                room: room.into(),
                text: format!("message {i}").into_bytes(),
                client_msg_id: cmid.clone(),
                after: String::new(),
            })
            .await
        {
            Ok(r) => {
                acked.insert(cmid, r.into_inner().id);
            }
            Err(_) => break,
        }
    }
    let died = wait_dead(node, Duration::from_secs(10));
    (acked, died)
}

/// Waits (bounded) until the node's process has exited.
fn wait_dead(node: &mut Node, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if node.exited().is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// After the restart: every acked message is there exactly once with its id, and
/// nothing appears that was never sent.
async fn assert_kept(
    node: &Node,
    token: &str,
    room: &str,
    acked: &BTreeMap<String, String>,
    sent: usize,
) {
    let mut c = node.client(Some(token)).await;
    let msgs = all_messages(&mut c, room)
        .await
        .expect("history after restart");
    let mut by_cmid: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in &msgs {
        by_cmid
            .entry(m.client_msg_id.clone())
            .or_default()
            .push(m.id.clone());
    }
    for (cmid, id) in acked {
        assert_eq!(
            by_cmid.get(cmid),
            Some(&vec![id.clone()]),
            "acked {cmid} lost or duplicated"
        );
    }
    for cmid in by_cmid.keys() {
        let n: usize = cmid.trim_start_matches('m').parse().expect("our cmid");
        assert!(n < sent, "{cmid} was never sent");
    }
    // And it takes writes again.
    c.send_message(pb::SendMessageRequest {
        room: room.into(),
        text: b"after the crash".to_vec(),
        client_msg_id: "after".into(),
        after: String::new(),
    })
    .await
    .expect("a send after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_between_timeline_write_and_flush_keeps_every_acked_message() {
    // The 40th flush of the commit pipeline aborts before its fsync.
    let mut node = tokio::task::block_in_place(|| {
        crashed_node(&[], "timeline-before-flush", "40*off->return")
    });
    let (token, room) = user_and_room(&node, "fp-flush").await;
    let (acked, died) = send_until_crash(&mut node, &token, &room, 500).await;
    assert!(died, "the crash point never fired:\n{}", node.logs());
    assert!(!acked.is_empty() && acked.len() < 500);
    tokio::task::block_in_place(|| node.restart());
    assert_kept(&node, &token, &room, &acked, acked.len() + 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_in_chunk_compaction_loses_and_duplicates_nothing() {
    let mut node = tokio::task::block_in_place(|| {
        crashed_node(
            &["--timeline-compact-every", "25"],
            "timeline-compact-before-removing-changes",
            "return",
        )
    });
    let (token, room) = user_and_room(&node, "fp-compact").await;
    let (acked, died) = send_until_crash(&mut node, &token, &room, 500).await;
    assert!(died, "the crash point never fired:\n{}", node.logs());
    tokio::task::block_in_place(|| node.restart());
    assert_kept(&node, &token, &room, &acked, acked.len() + 1).await;
}

/// Raft: creates rooms one at a time until one fails; returns the created names.
async fn create_rooms_until_crash(node: &mut Node, token: &str, max: usize) -> (Vec<String>, bool) {
    let mut c = node.client(Some(token)).await;
    let mut made = Vec::new();
    for i in 0..max {
        let name = format!("raft-{i}");
        match c
            .create_room(pb::CreateRoomRequest {
                name: name.clone(),
                write_quorum: 0,
            })
            .await
        {
            Ok(_) => made.push(name),
            Err(_) => break,
        }
    }
    let died = wait_dead(node, Duration::from_secs(10));
    (made, died)
}

async fn assert_rooms_kept(node: &Node, token: &str, made: &[String]) {
    let mut c = node.client(Some(token)).await;
    for name in made {
        let room = c
            .get_room(pb::GetRoomRequest {
                room: name.clone(),
                consistency: pb::Consistency::Strong as i32,
            })
            .await;
        assert!(room.is_ok(), "acked room {name} lost: {room:?}");
    }
    c.create_room(pb::CreateRoomRequest {
        name: "after-the-crash".into(),
        write_quorum: 0,
    })
    .await
    .expect("a Raft write after the restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_between_raft_append_and_flush_keeps_every_acked_entry() {
    // Genesis and the set-up append first; the 60th append aborts before its fsync.
    let mut node = tokio::task::block_in_place(|| {
        crashed_node(&[], "raft-append-before-flush", "60*off->return")
    });
    let (token, _) = user_and_room(&node, "fp-raft").await;
    let (made, died) = create_rooms_until_crash(&mut node, &token, 400).await;
    assert!(died, "the crash point never fired:\n{}", node.logs());
    tokio::task::block_in_place(|| node.restart());
    assert_rooms_kept(&node, &token, &made).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_while_building_a_snapshot_recovers_from_the_log() {
    let mut node = tokio::task::block_in_place(|| {
        crashed_node(
            &["--raft-snapshot-every", "30"],
            "raft-snapshot-build",
            "return",
        )
    });
    let (token, _) = user_and_room(&node, "fp-snap").await;
    let (made, died) = create_rooms_until_crash(&mut node, &token, 1000).await;
    assert!(died, "the crash point never fired:\n{}", node.logs());
    tokio::task::block_in_place(|| node.restart());
    assert_rooms_kept(&node, &token, &made).await;
}
