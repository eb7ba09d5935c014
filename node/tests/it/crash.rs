//! kill -9 under load: every acknowledged message survives a crash exactly once, and
//! retrying the sends that were in flight (same `client_msg_id`) never duplicates.
//!
//! Each cycle: 8 concurrent senders on their own connections; once ~300 sends of the
//! cycle are acked the node gets SIGKILL while sends are still in flight; the node is
//! restarted on the same data dir; the in-flight sends are retried; the whole history
//! is checked against everything acked so far. Three cycles.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_node::cli::client::Client;
use parley_proto::v1 as pb;
use tonic::Code;

use crate::support::{all_messages, Node};

const WORKERS: usize = 8;
const ACKS_BEFORE_KILL: usize = 300;
const CYCLES: usize = 3;
/// Per worker per cycle: an upper bound, far above what a cycle needs.
const MAX_SENDS: usize = 5_000;

/// What one sender saw in one cycle.
#[derive(Default)]
struct Log {
    /// client_msg_id -> (message id, text)
    acked: Vec<(String, String, Vec<u8>)>,
    /// The send whose outcome is unknown (it failed because the node died).
    in_flight: Option<(String, Vec<u8>, tonic::Status)>,
    /// Failures seen before the kill: there should be none.
    early_failures: Vec<String>,
}

async fn sender(
    mut c: Client,
    room: String,
    cycle: usize,
    worker: usize,
    acks: Arc<AtomicUsize>,
    killed: Arc<AtomicBool>,
) -> Log {
    let mut log = Log::default();
    for seq in 0..MAX_SENDS {
        let cmid = format!("c{cycle}-w{worker}-{seq}");
        let text = format!("cycle {cycle} worker {worker} message {seq}").into_bytes();
        let res = c
            .send_message(pb::SendMessageRequest {
                room: room.clone(),
                text: text.clone(),
                client_msg_id: cmid.clone(),
                after: String::new(),
            })
            .await;
        match res {
            Ok(r) => {
                let r = r.into_inner();
                assert!(
                    !r.duplicate,
                    "{cmid} was sent once but reported as a duplicate"
                );
                log.acked.push((cmid, r.id, text));
                acks.fetch_add(1, Ordering::SeqCst);
            }
            Err(status) => {
                if !killed.load(Ordering::SeqCst) {
                    log.early_failures.push(format!("{cmid}: {status:?}"));
                }
                log.in_flight = Some((cmid, text, status));
                return log;
            }
        }
    }
    log
}

/// Sends with `cmid`, retrying (bounded) while the restarted node is not ready yet.
async fn retry(c: &mut Client, room: &str, cmid: &str, text: &[u8]) -> pb::SendMessageResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let res = c
            .send_message(pb::SendMessageRequest {
                room: room.to_owned(),
                text: text.to_vec(),
                client_msg_id: cmid.to_owned(),
                after: String::new(),
            })
            .await;
        match res {
            Ok(r) => return r.into_inner(),
            Err(s)
                if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("retry of {cmid} failed: {s:?}"),
        }
    }
}

/// Every message of the room, retrying (bounded) while the restarted node is not ready.
async fn fetch_all(c: &mut Client, room: &str, node: &Node) -> Vec<pb::Message> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match all_messages(c, room).await {
            Ok(m) => return m,
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("history after restart: {s:?}\n{}", node.logs()),
        }
    }
}

/// The whole history, checked: no duplicate ids or client ids, every acked message
/// present once with its text, and nothing that was never sent.
async fn check_history(
    c: &mut Client,
    room: &str,
    acked: &BTreeMap<String, (String, Vec<u8>)>,
    node: &Node,
) {
    let msgs = fetch_all(c, room, node).await;
    let mut ids = HashSet::new();
    let mut by_cmid: HashMap<&str, &pb::Message> = HashMap::new();
    for m in &msgs {
        assert!(
            ids.insert(m.id.as_str()),
            "message id {} appears twice in history",
            m.id
        );
        assert!(
            by_cmid.insert(m.client_msg_id.as_str(), m).is_none(),
            "client_msg_id {:?} appears twice in history",
            m.client_msg_id
        );
    }
    assert!(
        msgs.windows(2).all(|w| w[0].id < w[1].id),
        "history is not in id order"
    );
    for (cmid, (id, text)) in acked {
        let Some(m) = by_cmid.get(cmid.as_str()) else {
            panic!(
                "acked message {cmid} ({id}) is missing after restart ({} in history)",
                msgs.len()
            );
        };
        assert_eq!(&m.id, id, "{cmid} has another id in history");
        assert_eq!(
            m.text.as_bytes(),
            text.as_slice(),
            "{cmid} has another text in history"
        );
    }
    let unknown: Vec<&str> = by_cmid
        .keys()
        .filter(|k| !acked.contains_key(**k))
        .copied()
        .collect();
    assert!(
        unknown.is_empty(),
        "history holds messages nobody got an ack or retry for: {unknown:?}"
    );
    assert_eq!(msgs.len(), acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acked_messages_survive_kill9_exactly_once() {
    let mut node = tokio::task::block_in_place(Node::start);
    let mut anon = node.client(None).await;
    let token = anon
        .create_user(pb::CreateUserRequest {
            name: "crash".into(),
        })
        .await
        .expect("create user")
        .into_inner()
        .token;
    let mut c = node.client(Some(&token)).await;
    let room = c
        .create_room(pb::CreateRoomRequest {
            name: "crash-room".into(),
            write_quorum: 0,
        })
        .await
        .expect("create room")
        .into_inner()
        .id;

    // Everything acked so far: client_msg_id -> (message id, text).
    let mut acked: BTreeMap<String, (String, Vec<u8>)> = BTreeMap::new();
    for cycle in 0..CYCLES {
        let acks = Arc::new(AtomicUsize::new(0));
        let killed = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..WORKERS {
            let wc = node.client(Some(&token)).await;
            workers.push(tokio::spawn(sender(
                wc,
                room.clone(),
                cycle,
                w,
                acks.clone(),
                killed.clone(),
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while acks.load(Ordering::SeqCst) < ACKS_BEFORE_KILL {
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: only {} acks in 120 s\n{}",
                acks.load(Ordering::SeqCst),
                node.logs()
            );
            assert!(
                workers.iter().any(|w| !w.is_finished()),
                "cycle {cycle}: every sender stopped early"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        killed.store(true, Ordering::SeqCst);
        tokio::task::block_in_place(|| node.kill9());

        let mut in_flight = Vec::new();
        for (w, h) in workers.into_iter().enumerate() {
            let log = tokio::time::timeout(Duration::from_secs(60), h)
                .await
                .unwrap_or_else(|_| panic!("cycle {cycle}: sender {w} did not stop after the kill"))
                .expect("sender task");
            assert!(
                log.early_failures.is_empty(),
                "cycle {cycle}: sends failed before the kill: {:?}",
                log.early_failures
            );
            for (cmid, id, text) in log.acked {
                assert!(
                    acked.insert(cmid.clone(), (id, text)).is_none(),
                    "{cmid} acked twice"
                );
            }
            if let Some((cmid, text, status)) = log.in_flight {
                // A send cut off by the crash fails as a transport error, not a refusal.
                assert!(
                    matches!(
                        status.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
                    ),
                    "cycle {cycle}: {cmid} failed with {status:?}"
                );
                in_flight.push((cmid, text));
            }
        }
        assert!(
            acked.len() >= ACKS_BEFORE_KILL * (cycle + 1),
            "acked {} after cycle {cycle}",
            acked.len()
        );

        let old_pid = node.pid();
        tokio::task::block_in_place(|| node.restart());
        assert!(
            node.pid().is_some() && node.pid() != old_pid,
            "restart did not start a new process"
        );
        let mut c = node.client(Some(&token)).await;

        // Before any retry: every ack survived, nothing is doubled.
        // (Sends cut off by the crash may or may not be there.)
        let acked_only = acked.clone();
        let msgs = fetch_all(&mut c, &room, &node).await;
        let present: HashSet<&str> = msgs.iter().map(|m| m.client_msg_id.as_str()).collect();
        let missing: Vec<&String> = acked_only
            .keys()
            .filter(|k| !present.contains(k.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "cycle {cycle}: acked but lost in the crash: {missing:?}"
        );
        assert_eq!(
            present.len(),
            msgs.len(),
            "cycle {cycle}: a client_msg_id appears twice after the crash"
        );

        // Retry the in-flight sends with their own client_msg_id.
        let mut survived = 0;
        for (cmid, text) in &in_flight {
            let r = retry(&mut c, &room, cmid, text).await;
            let was_there = present.contains(cmid.as_str());
            // duplicate=true exactly when the cut-off send had been written.
            assert_eq!(
                r.duplicate, was_there,
                "retry of {cmid}: duplicate flag vs history"
            );
            survived += usize::from(was_there);
            acked.insert(cmid.clone(), (r.id, text.clone()));
        }
        eprintln!(
            "crash cycle {cycle}: {} acked in total, {} sends in flight at the kill ({survived} had been written)",
            acked_only.len(),
            in_flight.len()
        );
        // Retrying a few acked sends returns their first id, marked duplicate.
        for (cmid, (id, text)) in acked_only.iter().rev().take(5) {
            let r = retry(&mut c, &room, cmid, text).await;
            assert!(
                r.duplicate,
                "retry of acked {cmid} was not reported as a duplicate"
            );
            assert_eq!(&r.id, id, "retry of acked {cmid} returned another id");
        }
        // Retrying the in-flight ones again is now a duplicate too.
        for (cmid, text) in &in_flight {
            let r = retry(&mut c, &room, cmid, text).await;
            assert!(r.duplicate, "second retry of {cmid} was not a duplicate");
            assert_eq!(Some(&r.id), acked.get(cmid).map(|(id, _)| id));
        }
        check_history(&mut c, &room, &acked, &node).await;
    }
}
