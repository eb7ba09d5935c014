//! The CLI contract of DESIGN §6, driven through the real binary against a real node:
//! every command in human and `--json` form, the environment variables, exit codes,
//! and the refusals (each followed by a check that nothing changed).

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use parley_node::ids::{RoomId, UserId};
use parley_proto::v1 as pb;
use serde_json::Value;
use tonic::Code;

use crate::support::{self, history, members, os, user, Node};

fn texts(msgs: &[Value]) -> Vec<String> {
    msgs.iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn is_message_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn room_names(node: &Node, token: &str) -> Vec<String> {
    let mut v: Vec<String> = node
        .cli(Some(token), &["--json", "room", "list"])
        .json()
        .iter()
        .map(|r| r["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn help_documents_exit_codes_and_usage_errors_exit_2() {
    let mut cmd = std::process::Command::new(support::BIN);
    cmd.arg("--help");
    let out = support::run(cmd, "--help");
    let help = out.ok();
    for needle in [
        "Exit codes",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "INVALID_ARGUMENT",
        "serve",
        "chat",
    ] {
        assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
    }
    let mut cmd = std::process::Command::new(support::BIN);
    cmd.args(["room", "role", "general", "bob", "owner"]);
    let out = support::run(cmd, "room role general bob owner");
    assert_eq!(out.code, 2, "usage error exit code; stderr: {}", out.stderr);
    let mut cmd = std::process::Command::new(support::BIN);
    cmd.args(["history", "general", "--since", "last tuesday"]);
    assert_eq!(support::run(cmd, "history --since").code, 2);
}

#[test]
fn unreachable_node_is_named_and_exits_3() {
    // Port 1 on loopback: nothing listens there.
    let mut cmd = std::process::Command::new(support::BIN);
    cmd.env_remove("PARLEY_NODE")
        .args(["--node", "127.0.0.1:1", "--token", "x", "room", "list"]);
    let out = support::run(cmd, "--node 127.0.0.1:1 room list");
    let msg = out.fails("UNAVAILABLE", 3);
    assert!(
        msg.contains("127.0.0.1:1"),
        "message should name the address: {msg}"
    );
}

#[test]
fn users_rooms_membership_and_roles() {
    let node = Node::start();
    let alice = user(&node, "alice");
    let bob = node.cli(None, &["--json", "user", "create", "bob"]).json1();
    assert_eq!(bob["user"], "bob");
    let bob = bob["token"].as_str().expect("token string").to_owned();
    assert!(!bob.is_empty() && bob != alice);
    let carol = user(&node, "carol");

    // whoami, by flag and by environment.
    assert_eq!(node.cli(Some(&alice), &["whoami"]).ok(), "alice");
    assert_eq!(
        node.cli(Some(&bob), &["--json", "whoami"]).json1()["user"],
        "bob"
    );
    let mut cmd = std::process::Command::new(support::BIN);
    cmd.env("PARLEY_NODE", node.addr())
        .env("PARLEY_TOKEN", &carol)
        .arg("whoami");
    assert_eq!(support::run(cmd, "whoami (env)").ok(), "carol");
    // A flag beats the environment.
    let mut cmd = std::process::Command::new(support::BIN);
    cmd.env("PARLEY_NODE", node.addr())
        .env("PARLEY_TOKEN", &carol)
        .args(["--token", &alice, "whoami"]);
    assert_eq!(support::run(cmd, "whoami (env + flag)").ok(), "alice");

    // cluster status: health, then nodes and groups as the node sees them.
    let st = node.cli(None, &["cluster", "status"]).ok().to_owned();
    assert!(st.contains(&node.addr()) && st.contains("SERVING"), "{st}");
    let lines = node.cli(None, &["--json", "cluster", "status"]).json();
    assert_eq!(lines[0]["health"], "SERVING");
    assert_eq!(lines[0]["partitions"], 16);
    let nodes: Vec<_> = lines
        .iter()
        .filter(|l| l.get("node_id").is_some())
        .collect();
    assert_eq!(nodes.len(), 1, "{lines:?}");
    assert_eq!(nodes[0]["alive"], true);
    let groups: Vec<_> = lines.iter().filter(|l| l.get("group").is_some()).collect();
    assert_eq!(
        groups.len(),
        17,
        "the meta group and 16 partitions: {lines:?}"
    );
    assert!(
        groups
            .iter()
            .all(|g| g["leader"] == nodes[0]["node_id"] && g["local"] == true),
        "{groups:?}"
    );
    // Registration in the meta group happens just after the node starts serving.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let lines = node.cli(None, &["--json", "cluster", "status"]).json();
        if lines.iter().any(|l| l["registered"] == true) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node never registered: {lines:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // room create (human prints the id; --json the room).
    let general = node
        .cli(Some(&alice), &["room", "create", "general"])
        .ok()
        .to_owned();
    assert!(RoomId::looks_like_id(&general), "room id: {general:?}");
    let random = node
        .cli(
            Some(&alice),
            &["--json", "room", "create", "random", "--write-quorum", "1"],
        )
        .json1();
    assert_eq!(random["name"], "random");
    assert_eq!(random["members"], 1);
    assert_eq!(random["write_quorum"], 1);
    let random_id = random["id"].as_str().expect("id").to_owned();

    // room list / show, human and JSON, by name and by id.
    let list = node.cli(Some(&alice), &["room", "list"]).ok().to_owned();
    assert!(
        list.contains("general") && list.contains(&general) && list.contains("random"),
        "{list}"
    );
    let rooms = node.cli(Some(&bob), &["--json", "room", "list"]).json();
    assert_eq!(rooms.len(), 2, "{rooms:?}");
    for r in &rooms {
        assert!(
            r["id"].is_string() && r["name"].is_string() && r["members"].is_u64(),
            "{r}"
        );
    }
    let show = node
        .cli(Some(&alice), &["room", "show", "general"])
        .ok()
        .to_owned();
    assert!(
        show.contains("general") && show.contains(&general) && show.contains("alice"),
        "{show}"
    );
    let shown = node
        .cli(Some(&alice), &["--json", "room", "show", &general])
        .json1();
    assert_eq!(
        (shown["name"].as_str(), shown["members"].as_u64()),
        (Some("general"), Some(1))
    );
    let strong = node
        .cli(
            Some(&alice),
            &["--json", "room", "show", "general", "--strong"],
        )
        .json1();
    assert_eq!(strong["id"], general.as_str());

    // join (human and JSON), members.
    let joined = node
        .cli(Some(&bob), &["room", "join", "general"])
        .ok()
        .to_owned();
    assert!(joined.contains("general"), "{joined}");
    assert_eq!(
        node.cli(Some(&alice), &["--json", "room", "show", "general"])
            .json1()["members"],
        2
    );
    assert_eq!(
        members(&node, &alice, "general"),
        vec![
            ("alice".into(), "admin".into()),
            ("bob".into(), "member".into())
        ]
    );
    let human = node
        .cli(Some(&bob), &["room", "members", "general"])
        .ok()
        .to_owned();
    assert!(
        human.contains("alice") && human.contains("admin") && human.contains("bob"),
        "{human}"
    );

    // role: bob becomes admin, then member again.
    node.cli(Some(&alice), &["room", "role", "general", "bob", "admin"])
        .ok();
    assert!(members(&node, &alice, "general").contains(&("bob".into(), "admin".into())));
    let out = node
        .cli(
            Some(&alice),
            &["--json", "room", "role", "general", "bob", "member"],
        )
        .json1();
    assert_eq!(out["role"], "member");
    assert!(members(&node, &alice, "general").contains(&("bob".into(), "member".into())));

    // invite, kick.
    node.cli(Some(&alice), &["room", "invite", "general", "carol"])
        .ok();
    assert!(members(&node, &alice, "general")
        .iter()
        .any(|(u, _)| u == "carol"));
    node.cli(Some(&alice), &["room", "kick", "general", "carol"])
        .ok();
    assert!(!members(&node, &alice, "general")
        .iter()
        .any(|(u, _)| u == "carol"));
    node.cli(Some(&carol), &["history", "general"])
        .fails("PERMISSION_DENIED", 5);

    // ban: out, listed as banned, cannot join or send; unban lets them back.
    node.cli(Some(&alice), &["send", "general", "before the ban"])
        .ok();
    node.cli(Some(&alice), &["room", "ban", "general", "bob"])
        .ok();
    assert_eq!(
        members(&node, &alice, "general"),
        vec![("alice".into(), "admin".into())]
    );
    let listed = node
        .cli(Some(&alice), &["--json", "room", "members", "general"])
        .json();
    assert!(
        listed
            .iter()
            .any(|m| m["user"] == "bob" && m["banned"] == true),
        "{listed:?}"
    );
    node.cli(Some(&bob), &["room", "join", "general"])
        .fails("PERMISSION_DENIED", 5);
    node.cli(Some(&bob), &["send", "general", "let me in"])
        .fails("PERMISSION_DENIED", 5);
    assert_eq!(
        members(&node, &alice, "general"),
        vec![("alice".into(), "admin".into())]
    );
    assert_eq!(
        texts(&history(&node, &alice, "general")),
        vec!["before the ban"]
    );
    node.cli(Some(&alice), &["room", "unban", "general", "bob"])
        .ok();
    node.cli(Some(&bob), &["room", "join", "general"]).ok();
    assert!(members(&node, &alice, "general")
        .iter()
        .any(|(u, _)| u == "bob"));

    // leave.
    let left = node
        .cli(Some(&bob), &["--json", "room", "leave", "general"])
        .json1();
    assert_eq!(left["room"], "general");
    assert!(!members(&node, &alice, "general")
        .iter()
        .any(|(u, _)| u == "bob"));
    assert!(node
        .cli(Some(&bob), &["--json", "room", "list", "--joined"])
        .json()
        .is_empty());

    // delete.
    node.cli(Some(&alice), &["room", "delete", &random_id]).ok();
    node.cli(Some(&alice), &["room", "show", "random"])
        .fails("NOT_FOUND", 4);
    assert_eq!(room_names(&node, &alice), vec!["general"]);
}

#[test]
fn messages_history_receipts_presence_and_dm() {
    let node = Node::start();
    let alice = user(&node, "alice");
    let bob = user(&node, "bob");
    let room = node
        .cli(Some(&alice), &["room", "create", "general"])
        .ok()
        .to_owned();
    node.cli(Some(&bob), &["room", "join", "general"]).ok();

    let id1 = node
        .cli(Some(&alice), &["send", "general", "hello"])
        .ok()
        .to_owned();
    assert!(is_message_id(&id1), "message id: {id1:?}");
    let sent = node
        .cli(Some(&bob), &["--json", "send", &room, "hi alice"])
        .json1();
    let id2 = sent["id"].as_str().expect("id").to_owned();
    assert!(id2 > id1, "ids sort in timeline order: {id1} {id2}");
    assert_eq!(sent["duplicate"], false);
    // Text that looks like a flag is text.
    let id3 = node
        .cli(Some(&alice), &["send", "general", "-v --json"])
        .ok()
        .to_owned();

    // Human history: one readable line per message, oldest first.
    let human = node
        .cli(Some(&bob), &["history", "general"])
        .ok()
        .to_owned();
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 3, "{human}");
    assert!(
        lines[0].starts_with('[') && lines[0].ends_with("] alice: hello"),
        "{human}"
    );
    assert!(lines[1].ends_with("] bob: hi alice"), "{human}");
    assert!(lines[2].ends_with("] alice: -v --json"), "{human}");

    // JSON history: the contract fields.
    let msgs = history(&node, &bob, "general");
    assert_eq!(texts(&msgs), vec!["hello", "hi alice", "-v --json"]);
    let m = &msgs[0];
    assert_eq!(
        (m["id"].as_str(), m["room"].as_str(), m["sender"].as_str()),
        (Some(&*id1), Some(&*room), Some("alice"))
    );
    let at = m["sent_at"].as_str().expect("sent_at string");
    assert!(
        chrono::DateTime::parse_from_rfc3339(at).is_ok(),
        "sent_at {at:?}"
    );

    // Paging.
    let last = node
        .cli(
            Some(&bob),
            &["--json", "history", "general", "--limit", "1"],
        )
        .json();
    assert_eq!(texts(&last), vec!["-v --json"]);
    let after = node
        .cli(
            Some(&bob),
            &["--json", "history", "general", "--after", &id1],
        )
        .json();
    assert_eq!(texts(&after), vec!["hi alice", "-v --json"]);
    let before = node
        .cli(
            Some(&bob),
            &["--json", "history", "general", "--before", &id3],
        )
        .json();
    assert_eq!(texts(&before), vec!["hello", "hi alice"]);
    let since_all = node
        .cli(
            Some(&bob),
            &[
                "--json",
                "history",
                "general",
                "--since",
                "2000-01-01T00:00:00Z",
            ],
        )
        .json();
    assert_eq!(since_all.len(), 3);
    let since_none = node
        .cli(
            Some(&bob),
            &[
                "--json",
                "history",
                "general",
                "--since",
                "2999-01-01T00:00:00Z",
            ],
        )
        .json();
    assert!(since_none.is_empty(), "{since_none:?}");

    // Idempotent retry with --client-id.
    let a = node
        .cli(
            Some(&alice),
            &["send", "general", "once", "--client-id", "k-1"],
        )
        .ok()
        .to_owned();
    let b = node
        .cli(
            Some(&alice),
            &["--json", "send", "general", "once", "--client-id", "k-1"],
        )
        .json1();
    assert_eq!(b["id"].as_str(), Some(&*a));
    assert_eq!(b["duplicate"], true);
    assert_eq!(history(&node, &alice, "general").len(), 4);

    // Read markers and receipts.
    assert_eq!(node.cli(Some(&bob), &["read", "general", &id2]).ok(), id2);
    let receipts = node
        .cli(Some(&alice), &["receipts", "general", &id1])
        .ok()
        .to_owned();
    assert!(receipts.lines().any(|l| l == "bob"), "{receipts}");
    let r = node
        .cli(Some(&alice), &["--json", "receipts", "general", &id2])
        .json1();
    assert!(
        r["read_by"]
            .as_array()
            .is_some_and(|a| a.iter().any(|u| u == "bob")),
        "{r}"
    );
    // Markers never go backwards.
    let back = node
        .cli(Some(&bob), &["--json", "read", "general", &id1])
        .json1();
    assert_eq!(back["message_id"].as_str(), Some(&*id2));
    let r = node
        .cli(Some(&alice), &["--json", "receipts", "general", &id3])
        .json1();
    assert!(
        !r["read_by"]
            .as_array()
            .is_some_and(|a| a.iter().any(|u| u == "bob")),
        "{r}"
    );

    // Presence.
    let set = node
        .cli(Some(&alice), &["presence", "set", "away"])
        .ok()
        .to_owned();
    assert!(set.contains("away"), "{set}");
    assert_eq!(
        node.cli(Some(&bob), &["--json", "presence", "set", "busy"])
            .json1()["state"],
        "busy"
    );
    let shown = node
        .cli(Some(&bob), &["--json", "presence", "show", "general"])
        .json();
    let state = |u: &str| {
        shown
            .iter()
            .find(|p| p["user"] == u)
            .map(|p| p["state"].clone())
    };
    assert_eq!(state("alice"), Some(Value::from("away")), "{shown:?}");
    assert_eq!(state("bob"), Some(Value::from("busy")), "{shown:?}");
    let human = node
        .cli(Some(&alice), &["presence", "show", "general"])
        .ok()
        .to_owned();
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("alice") && l.contains("away")),
        "{human}"
    );

    // Direct messages land in the pair's direct room, visible to both.
    let dm = node
        .cli(Some(&alice), &["dm", "bob", "psst"])
        .ok()
        .to_owned();
    assert!(is_message_id(&dm), "{dm:?}");
    let dm_json = node
        .cli(Some(&bob), &["--json", "dm", "alice", "yes?"])
        .json1();
    assert!(dm_json["id"].is_string());
    let dm_room = RoomId::direct(
        &UserId::parse("alice").expect("name"),
        &UserId::parse("bob").expect("name"),
    );
    let dms = history(&node, &bob, dm_room.as_str());
    assert_eq!(texts(&dms), vec!["psst", "yes?"]);
    assert_eq!(dms[0]["sender"], "alice");
}

#[test]
fn refusals_have_stable_codes_and_change_nothing() {
    let node = Node::start();
    let alice = user(&node, "alice");
    let bob = user(&node, "bob");
    let carol = user(&node, "carol");
    node.cli(Some(&alice), &["room", "create", "general"]).ok();
    node.cli(Some(&bob), &["room", "join", "general"]).ok();
    let first = node
        .cli(Some(&alice), &["send", "general", "first"])
        .ok()
        .to_owned();
    let before_members = members(&node, &alice, "general");
    let before_rooms = room_names(&node, &alice);
    let unchanged = |what: &str| {
        assert_eq!(
            texts(&history(&node, &alice, "general")),
            vec!["first"],
            "history changed after {what}"
        );
        assert_eq!(
            members(&node, &alice, "general"),
            before_members,
            "members changed after {what}"
        );
        assert_eq!(
            room_names(&node, &alice),
            before_rooms,
            "rooms changed after {what}"
        );
    };

    // Unknown room.
    node.cli(Some(&alice), &["send", "nope", "hi"])
        .fails("NOT_FOUND", 4);
    node.cli(Some(&alice), &["history", "nope"])
        .fails("NOT_FOUND", 4);
    node.cli(Some(&alice), &["room", "show", "rm_0000000000000000"])
        .fails("NOT_FOUND", 4);
    node.cli(Some(&alice), &["room", "join", "nope"])
        .fails("NOT_FOUND", 4);
    node.cli(Some(&alice), &["--json", "room", "members", "nope"])
        .fails("NOT_FOUND", 4);
    unchanged("unknown room");

    // Unknown user.
    node.cli(Some(&alice), &["room", "invite", "general", "ghost"])
        .fails("NOT_FOUND", 4);
    node.cli(Some(&alice), &["dm", "ghost", "boo"])
        .fails("NOT_FOUND", 4);
    node.cli(Some(&alice), &["room", "role", "general", "ghost", "admin"])
        .fails("NOT_FOUND", 4);
    unchanged("unknown user");

    // Not a member.
    node.cli(Some(&carol), &["send", "general", "hi"])
        .fails("PERMISSION_DENIED", 5);
    node.cli(Some(&carol), &["history", "general"])
        .fails("PERMISSION_DENIED", 5);
    node.cli(Some(&carol), &["read", "general", &first])
        .fails("PERMISSION_DENIED", 5);
    unchanged("non-member");

    // Not an admin.
    node.cli(Some(&bob), &["room", "kick", "general", "alice"])
        .fails("PERMISSION_DENIED", 5);
    node.cli(Some(&bob), &["room", "ban", "general", "alice"])
        .fails("PERMISSION_DENIED", 5);
    node.cli(Some(&bob), &["room", "role", "general", "bob", "admin"])
        .fails("PERMISSION_DENIED", 5);
    node.cli(Some(&bob), &["room", "delete", "general"])
        .fails("PERMISSION_DENIED", 5);
    unchanged("non-admin moderation");

    // Banned.
    node.cli(Some(&alice), &["room", "ban", "general", "carol"])
        .ok();
    node.cli(Some(&carol), &["room", "join", "general"])
        .fails("PERMISSION_DENIED", 5);
    node.cli(Some(&carol), &["send", "general", "hi"])
        .fails("PERMISSION_DENIED", 5);
    node.cli(Some(&alice), &["room", "invite", "general", "carol"])
        .fails("PERMISSION_DENIED", 5);
    unchanged("banned user");

    // Names taken.
    node.cli(Some(&bob), &["room", "create", "general"])
        .fails("ALREADY_EXISTS", 6);
    node.cli(None, &["user", "create", "alice"])
        .fails("ALREADY_EXISTS", 6);
    assert_eq!(
        node.cli(Some(&alice), &["whoami"]).ok(),
        "alice",
        "the old token still works"
    );
    unchanged("taken names");

    // Invalid names.
    for bad in ["General", "has space", "-dash", &"r".repeat(65), ""] {
        node.cli(Some(&alice), &["room", "create", "--", bad])
            .fails("INVALID_ARGUMENT", 6);
    }
    for bad in ["Alice", "a.b", "_x", &"u".repeat(33), ""] {
        node.cli(None, &["user", "create", "--", bad])
            .fails("INVALID_ARGUMENT", 6);
    }
    node.cli(None, &["user", "create", "Alice"])
        .fails("INVALID_ARGUMENT", 6);
    unchanged("invalid names");

    // Text: empty, over 64 KiB, not UTF-8 (given on the command line as raw bytes).
    node.cli(Some(&alice), &["send", "general", ""])
        .fails("INVALID_ARGUMENT", 6);
    let big = "x".repeat(64 * 1024 + 1);
    node.cli(Some(&alice), &["send", "general", &big])
        .fails("INVALID_ARGUMENT", 6);
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStringExt;
        let bytes = std::ffi::OsString::from_vec(vec![b'h', b'i', 0xff, 0xfe]);
        node.cli_os(Some(&alice), &[os("send"), os("general"), bytes])
            .fails("INVALID_ARGUMENT", 6);
    }
    unchanged("bad text");
    // Exactly 64 KiB is allowed.
    let max = "y".repeat(64 * 1024);
    node.cli(Some(&alice), &["send", "general", &max]).ok();
    let msgs = history(&node, &alice, "general");
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[1]["text"].as_str().map(str::len), Some(64 * 1024));
    let big_id = msgs[1]["id"].as_str().expect("id").to_owned();
    let unchanged2 = |what: &str| {
        assert_eq!(
            history(&node, &alice, "general").len(),
            2,
            "history changed after {what}"
        );
        assert_eq!(
            members(&node, &alice, "general"),
            before_members,
            "members changed after {what}"
        );
    };

    // Tokens: unknown, malformed, missing.
    node.cli(Some("not-a-token"), &["whoami"])
        .fails("UNAUTHENTICATED", 5);
    node.cli(Some("not-a-token"), &["send", "general", "sneaky"])
        .fails("UNAUTHENTICATED", 5);
    node.cli(Some(&format!("{alice}x")), &["room", "join", "general"])
        .fails("UNAUTHENTICATED", 5);
    node.cli(None, &["room", "list"])
        .fails("UNAUTHENTICATED", 5);
    node.cli(None, &["send", "general", "anonymous"])
        .fails("UNAUTHENTICATED", 5);
    unchanged2("bad tokens");

    // Message ids.
    node.cli(Some(&alice), &["read", "general", "xyz"])
        .fails("INVALID_ARGUMENT", 6);
    node.cli(Some(&alice), &["receipts", "general", "XYZ"])
        .fails("INVALID_ARGUMENT", 6);
    node.cli(Some(&alice), &["history", "general", "--after", "123"])
        .fails("INVALID_ARGUMENT", 6);
    node.cli(Some(&alice), &["send", "general", "hm", "--after", "nope"])
        .fails("INVALID_ARGUMENT", 6);
    node.cli(Some(&alice), &["read", "general", &"f".repeat(32)])
        .fails("NOT_FOUND", 4);
    unchanged2("bad message ids");
    assert_eq!(
        node.cli(Some(&alice), &["--json", "read", "general", &big_id])
            .json1()["message_id"]
            .as_str(),
        Some(&*big_id)
    );

    // Cursors: malformed, and well-formed but unknown.
    node.cli(Some(&alice), &["tail", "general", "--cursor", "bogus"])
        .fails("INVALID_ARGUMENT", 6);
    let room_id = node
        .cli(Some(&alice), &["--json", "room", "show", "general"])
        .json1()["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let ahead = format!("v1:{room_id}={}", "f".repeat(32));
    node.cli(Some(&alice), &["tail", "general", "--cursor", &ahead])
        .fails("NOT_FOUND", 4);
}

#[test]
fn non_utf8_text_over_grpc_is_refused() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let node = Node::start();
    let alice = user(&node, "alice");
    node.cli(Some(&alice), &["room", "create", "bytes"]).ok();
    rt.block_on(async {
        let mut c = node.client(Some(&alice)).await;
        for bad in [
            vec![0xff, 0xfe],
            vec![b'o', b'k', 0xc3],
            vec![0xed, 0xa0, 0x80],
        ] {
            let err = c
                .send_message(pb::SendMessageRequest {
                    room: "bytes".into(),
                    text: bad.clone(),
                    client_msg_id: format!("bad-{bad:?}"),
                    after: String::new(),
                })
                .await
                .expect_err("non-UTF-8 text must be refused");
            assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
        }
        let h = c
            .history(pb::HistoryRequest {
                room: "bytes".into(),
                ..Default::default()
            })
            .await
            .expect("history")
            .into_inner();
        assert!(
            h.messages.is_empty(),
            "a refused send wrote something: {:?}",
            h.messages
        );
        let ok = c
            .send_message(pb::SendMessageRequest {
                room: "bytes".into(),
                text: "héllo ✓".as_bytes().to_vec(),
                client_msg_id: "good".into(),
                after: String::new(),
            })
            .await
            .expect("valid UTF-8 is accepted")
            .into_inner();
        let h = c
            .history(pb::HistoryRequest {
                room: "bytes".into(),
                ..Default::default()
            })
            .await
            .expect("history")
            .into_inner();
        assert_eq!(h.messages.len(), 1);
        assert_eq!(
            (h.messages[0].id.as_str(), h.messages[0].text.as_str()),
            (ok.id.as_str(), "héllo ✓")
        );
    });
}

#[test]
fn tail_prints_messages_sent_by_others() {
    let node = Node::start();
    let alice = user(&node, "alice");
    let bob = user(&node, "bob");
    let room = node
        .cli(Some(&alice), &["room", "create", "general"])
        .ok()
        .to_owned();
    node.cli(Some(&bob), &["room", "join", "general"]).ok();
    node.cli(Some(&alice), &["send", "general", "old news"])
        .ok();

    // JSON tail of one room, exits after 3 messages.
    let mut child = node
        .command(Some(&alice))
        .args(["--json", "tail", "general", "--count", "3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tail");
    let stdout = support::lines(child.stdout.take().expect("stdout"));
    let stderr = support::lines(child.stderr.take().expect("stderr"));
    support::wait_for_line(&stderr, "subscribed", Duration::from_secs(20));
    let sent: Vec<String> = (1..=3)
        .map(|i| {
            node.cli(Some(&bob), &["send", "general", &format!("live {i}")])
                .ok()
                .to_owned()
        })
        .collect();
    let status = support::wait_exit(&mut child, Duration::from_secs(20), "parley tail --count 3");
    assert!(status.success(), "tail exit: {status}");
    let lines: Vec<Value> = stdout
        .try_iter()
        .map(|l| {
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("tail printed non-JSON {l:?}: {e}"))
        })
        .collect();
    let msgs: Vec<&Value> = lines.iter().filter(|v| v["event"] == "message").collect();
    assert_eq!(msgs.len(), 3, "{lines:?}");
    for (m, (i, id)) in msgs.iter().zip(sent.iter().enumerate()) {
        assert_eq!(m["id"].as_str(), Some(id.as_str()));
        assert_eq!(m["text"], format!("live {}", i + 1));
        assert_eq!(
            (m["sender"].as_str(), m["room"].as_str()),
            (Some("bob"), Some(room.as_str()))
        );
        assert!(m["cursor"].is_string(), "{m}");
    }

    // Resume from the first live message's cursor: the next two arrive again, and a
    // human tail shows them as chat lines.
    let cursor = msgs[0]["cursor"].as_str().expect("cursor").to_owned();
    let out = node.cli(
        Some(&alice),
        &["tail", "general", "--cursor", &cursor, "--count", "2"],
    );
    let lines: Vec<&str> = out.ok().lines().collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].ends_with("] bob: live 2") && lines[1].ends_with("] bob: live 3"),
        "{lines:?}"
    );
}

#[test]
fn chat_sends_typed_lines_and_quits() {
    let node = Node::start();
    let alice = user(&node, "alice");
    let bob = user(&node, "bob");
    node.cli(Some(&alice), &["room", "create", "general"]).ok();
    node.cli(Some(&bob), &["room", "join", "general"]).ok();
    node.cli(Some(&bob), &["send", "general", "welcome"]).ok();

    let mut child = node
        .command(Some(&alice))
        .args(["chat", "general"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat");
    let stdout = support::lines(child.stdout.take().expect("stdout"));
    let _stderr = support::lines(child.stderr.take().expect("stderr"));
    // The recent history is shown first.
    support::wait_for_line(&stdout, "bob: welcome", Duration::from_secs(20));
    {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"first line\nsecond line\n/quit\n")
            .expect("write to chat");
        // Dropping stdin closes it; /quit comes first.
    }
    let status = support::wait_exit(&mut child, Duration::from_secs(20), "parley chat");
    assert!(status.success(), "chat exit: {status}");
    let msgs = history(&node, &bob, "general");
    assert_eq!(texts(&msgs), vec!["welcome", "first line", "second line"]);
    assert!(msgs[1..].iter().all(|m| m["sender"] == "alice"), "{msgs:?}");

    // End of input also leaves (after sending what was typed).
    let mut child = node
        .command(Some(&bob))
        .args(["chat", "general"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chat");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"bye\n").expect("write to chat");
    }
    let status = support::wait_exit(&mut child, Duration::from_secs(20), "parley chat (EOF)");
    assert!(status.success(), "chat exit: {status}");
    assert_eq!(
        texts(&history(&node, &alice, "general"))
            .last()
            .map(String::as_str),
        Some("bye")
    );
}
