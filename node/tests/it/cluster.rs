//! Three real `parley serve` processes forming a cluster through discovery
//! (`--bootstrap-expect 3 --join …`): Raft-backed operations through any node, a partition
//! leader killed with `kill -9`, quorum loss, convergence after restarts, and partition
//! leaderships that spread back over the nodes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use parley_node::ids::{PartitionId, RoomId};
use serde_json::Value;

use crate::support::{self, Cluster, Node};

/// `cluster status --json` of one node: (nodes, groups).
fn status(node: &Node) -> (Vec<Value>, Vec<Value>) {
    let lines = node.cli(None, &["--json", "cluster", "status"]).json();
    let nodes = lines
        .iter()
        .filter(|l| l.get("node_id").is_some())
        .cloned()
        .collect();
    let groups = lines
        .iter()
        .filter(|l| l.get("group").is_some())
        .cloned()
        .collect();
    (nodes, groups)
}

/// The leader of `group` ("meta" or "pN") as `node` sees it.
fn leader_of(node: &Node, group: &str) -> Option<u64> {
    let (_, groups) = status(node);
    groups
        .iter()
        .find(|g| g["group"] == group)
        .and_then(|g| g["leader"].as_u64())
}

/// Polls `cond` every 100 ms until it holds or `within` passes; panics with `what`.
fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// Room names (sorted) and each room's members with roles, read linearizably on `node`.
fn view(node: &Node, token: &str) -> Vec<(String, Vec<(String, String)>)> {
    let rooms = node
        .cli(Some(token), &["--json", "room", "list", "--strong"])
        .json();
    let mut out: Vec<_> = rooms
        .iter()
        .map(|r| {
            let name = r["name"].as_str().unwrap_or_default().to_string();
            let ms = node
                .cli(
                    Some(token),
                    &["--json", "room", "members", &name, "--strong"],
                )
                .json();
            let mut members: Vec<_> = ms
                .iter()
                .map(|m| {
                    (
                        m["user"].as_str().unwrap_or_default().to_string(),
                        m["role"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect();
            members.sort();
            (name, members)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn three_processes_serve_any_room_and_survive_losing_nodes() {
    let mut c = Cluster::start(3);

    // Every node sees three live, registered nodes and a leader for every group.
    for node in &c.nodes {
        eventually(Duration::from_secs(30), "cluster formed", || {
            let (nodes, groups) = status(node);
            nodes.len() == 3
                && nodes
                    .iter()
                    .all(|n| n["alive"] == true && n["registered"] == true)
                && groups.len() == 17
                && groups.iter().all(|g| {
                    g["leader"].is_u64() && g["voters"].as_array().map_or(0, |v| v.len()) == 3
                })
        });
    }

    // Whoever the elections picked, the leaders handed the partitions over until each
    // node led its share (Cluster::start waits for that).
    assert!(support::leaders_balanced(&c.nodes[0]));
    let handovers: f64 = c
        .nodes
        .iter()
        .map(|n| support::metrics(n)["parley_leader_handovers_total"])
        .sum();
    eprintln!("balance: {handovers} handovers spread the leaderships");

    // Users and rooms created through different nodes, used through the others.
    let alice = support::user(&c.nodes[0], "alice");
    let bob = support::user(&c.nodes[1], "bob");
    let carol = support::user(&c.nodes[2], "carol");
    let mut partitions = BTreeSet::new();
    let names: Vec<String> = (0..9).map(|i| format!("room-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let id = c.nodes[i % 3]
            .cli(Some(&alice), &["room", "create", name])
            .ok()
            .to_string();
        let id = RoomId::parse(&id).expect("room id");
        partitions.insert(PartitionId::of_room(&id, 16));
        c.nodes[(i + 1) % 3]
            .cli(Some(&bob), &["room", "join", name])
            .ok();
        c.nodes[(i + 2) % 3]
            .cli(Some(&carol), &["room", "join", name])
            .ok();
    }
    assert!(
        partitions.len() >= 3,
        "rooms should spread over partitions: {partitions:?}"
    );
    c.nodes[2]
        .cli(Some(&alice), &["room", "role", "room-0", "bob", "admin"])
        .ok();
    c.nodes[1]
        .cli(Some(&bob), &["room", "kick", "room-0", "carol"])
        .ok();
    let refused = c.nodes[0]
        .cli(Some(&carol), &["room", "kick", "room-1", "bob"])
        .fails("PERMISSION_DENIED", 5);
    assert!(refused.contains("not an admin"), "{refused}");
    let first = view(&c.nodes[0], &alice);
    assert_eq!(first.len(), 9);
    for node in &c.nodes[1..] {
        assert_eq!(
            view(node, &alice),
            first,
            "every node has the same rooms, members and roles"
        );
    }

    // Kill -9 the leader of room-0's partition; a new leader takes over and writes go on.
    let room0 = c.nodes[0]
        .cli(Some(&alice), &["--json", "room", "show", "room-0"])
        .json1();
    let room0_id = RoomId::parse(room0["id"].as_str().unwrap_or_default()).expect("room id");
    let group = format!("p{}", PartitionId::of_room(&room0_id, 16).0);
    let old = leader_of(&c.nodes[0], &group).expect("room-0's partition has a leader");
    let victim = (old - 1) as usize;
    let survivor = (victim + 1) % 3;
    c.nodes[victim].kill9();
    let killed_at = Instant::now();
    eventually(
        Duration::from_secs(10),
        "a new leader after the kill",
        || leader_of(&c.nodes[survivor], &group).is_some_and(|l| l != old),
    );
    let new_leader_ms = killed_at.elapsed().as_millis();
    eventually(Duration::from_secs(10), "a write after the kill", || {
        c.nodes[survivor]
            .cli(Some(&carol), &["room", "join", "room-1"])
            .code
            == 0
    });
    let first_write_ms = killed_at.elapsed().as_millis();
    eprintln!("failover: leader of {group} (node {old}) killed; new leader seen after {new_leader_ms} ms, first write after {first_write_ms} ms (status polled every 100 ms)");

    // Two of three down: Raft writes fail fast with UNAVAILABLE, reads still answer.
    let second = (survivor + 1) % 3;
    assert_ne!(second, victim);
    c.nodes[second].kill9();
    let lonely = &c.nodes[survivor];
    // A write proposed before the survivor notices it lost its peers is indeterminate
    // (DEADLINE_EXCEEDED: it may still apply); once it has noticed, writes are refused
    // with UNAVAILABLE and nothing is proposed.
    let t = Instant::now();
    let mut refused = None;
    for attempt in 0..5 {
        let run = lonely.cli(
            Some(&alice),
            &["room", "create", &format!("while-down-{attempt}")],
        );
        assert_eq!(
            run.code, 3,
            "a write without quorum must fail: {}",
            run.stderr
        );
        if run.stderr.contains("UNAVAILABLE") {
            refused = Some(run.stderr.clone());
            break;
        }
        assert!(run.stderr.contains("DEADLINE_EXCEEDED"), "{}", run.stderr);
    }
    let refused_after = t.elapsed();
    let err = refused.expect("writes are refused with UNAVAILABLE once quorum loss is noticed");
    assert!(
        refused_after < Duration::from_secs(20),
        "refused only after {refused_after:?}"
    );
    assert!(
        err.contains("reachable") || err.contains("leader"),
        "clear reason: {err}"
    );
    eprintln!(
        "quorum loss: writes refused with UNAVAILABLE after {} ms: {}",
        refused_after.as_millis(),
        err.trim()
    );
    let rooms = lonely.cli(Some(&alice), &["--json", "room", "list"]).json();
    assert!(rooms.len() >= 9, "local reads still answer");
    assert_eq!(lonely.cli(Some(&alice), &["whoami"]).ok(), "alice");
    // A name this replica does not know cannot be confirmed absent without a quorum:
    // the answer is "unavailable", never a wrong "not found".
    lonely
        .cli(Some(&alice), &["room", "join", "never-created"])
        .fails("UNAVAILABLE", 3);
    lonely
        .cli(Some(&alice), &["dm", "nobody-here", "hello"])
        .fails("UNAVAILABLE", 3);

    // Both come back from their data dirs; writes work again and every node converges.
    c.restart(victim);
    c.restart(second);
    eventually(Duration::from_secs(30), "writes after the restarts", || {
        c.nodes[victim]
            .cli(Some(&alice), &["room", "create", "after-restart"])
            .code
            == 0
    });
    c.nodes[second]
        .cli(Some(&bob), &["room", "join", "after-restart"])
        .ok();
    let expected = view(&c.nodes[survivor], &alice);
    let names: Vec<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"after-restart")
            && names.iter().filter(|n| n.starts_with("room-")).count() == 9,
        "{names:?}"
    );
    for node in &c.nodes {
        eventually(Duration::from_secs(20), "every node converges", || {
            view(node, &alice) == expected
        });
    }
    // The restarted nodes get their partitions back.
    eventually(
        Duration::from_secs(40),
        "leaderships balanced after the restarts",
        || support::leaders_balanced(&c.nodes[survivor]),
    );

    // A fresh node joining the formed cluster is registered in the meta group; it holds
    // no replicas yet, so it answers clients with a clear UNAVAILABLE naming the others.
    let late = c.add_node();
    eventually(
        Duration::from_secs(30),
        "the late node is registered",
        || {
            let (nodes, _) = status(&c.nodes[0]);
            nodes.len() == 4
                && nodes
                    .iter()
                    .all(|n| n["registered"] == true && n["alive"] == true)
        },
    );
    let (_, groups) = status(&c.nodes[late]);
    assert!(
        groups.iter().all(|g| g["local"] == false),
        "a late joiner holds no replicas today"
    );
    let err = c.nodes[late]
        .cli(Some(&alice), &["room", "list"])
        .fails("UNAVAILABLE", 3);
    assert!(err.contains("joined after the cluster formed"), "{err}");
    // It still forwards Raft writes that need no local read.
    c.nodes[late].cli(None, &["user", "create", "dave"]).ok();
    c.nodes[0]
        .cli(None, &["user", "create", "dave"])
        .fails("ALREADY_EXISTS", 6);
    let _ = c.logs();
}

/// Members of `room` (user names) read linearizably on `node`, retrying (for up to 30 s)
/// while the restarted cluster cannot answer yet.
fn strong_members(node: &Node, token: &str, room: &str) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = node.cli(
            Some(token),
            &["--json", "room", "members", room, "--strong"],
        );
        if run.code == 0 {
            return run
                .json()
                .iter()
                .map(|m| m["user"].as_str().unwrap_or_default().to_string())
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "no strong read of {room} within 30 s: {}",
            run.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every node gets `kill -9` right after a membership change was acknowledged; once
/// they are back, a linearizable read must include the change. (The node that led the
/// room's partition comes back as its leader in the same term and answers reads up to
/// the commit index it saved, so that index must be on disk before the change is
/// acknowledged; FAULTS.md anomaly 6. Here the restarted leader usually re-commits its
/// log before the read arrives, so this run does not catch that window every time; the
/// fault runs with `kill-all` did.)
#[test]
fn a_membership_change_acknowledged_before_every_node_died_is_read_after_restart() {
    let mut c = Cluster::start(3);
    let alice = support::user(&c.nodes[0], "alice");
    let bob = support::user(&c.nodes[0], "bob");
    c.nodes[0]
        .cli(Some(&alice), &["room", "create", "club"])
        .ok();
    for cycle in 0..4 {
        let joining = cycle % 2 == 0;
        let verb = if joining { "join" } else { "leave" };
        c.nodes[cycle % 3]
            .cli(Some(&bob), &["room", verb, "club"])
            .ok();
        for n in c.nodes.iter_mut() {
            n.kill9();
        }
        for i in 0..c.nodes.len() {
            c.restart(i);
        }
        let members = strong_members(&c.nodes[(cycle + 1) % 3], &alice, "club");
        assert_eq!(
            members.contains("bob"),
            joining,
            "cycle {cycle}: bob's acknowledged {verb} is missing from a strong read after every node restarted: {members:?}"
        );
    }
}
