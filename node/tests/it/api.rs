//! In-process nodes (`node::run` on port 0) driven through the real gRPC API:
//! subscriptions, cursors, edits, reactions, presence, markers, fences, restarts.

use std::time::Duration;

use parley_node::node::{run, Bound, Config};
use parley_proto::v1 as pb;
use parley_proto::v1::chat_client::ChatClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// A node running inside the test process.
struct InProc {
    bound: Bound,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProc {
    async fn start(dir: &std::path::Path) -> Self {
        let mut cfg = Config::default_for(dir);
        cfg.presence_ttl = Duration::from_millis(600);
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(run(cfg, async move {
            let _ = rx.await;
        }));
        let file = dir.join("node.json");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let bound = loop {
            if let Ok(b) = std::fs::read(&file) {
                if let Ok(b) = serde_json::from_slice::<Bound>(&b) {
                    break b;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node did not start within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Self {
            bound,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let res = tokio::time::timeout(Duration::from_secs(20), &mut self.task).await;
        assert!(
            matches!(res, Ok(Ok(Ok(())))),
            "node did not stop cleanly: {res:?}"
        );
    }

    async fn client(&self) -> ChatClient<Channel> {
        ChatClient::connect(format!("http://{}", self.bound.grpc))
            .await
            .unwrap()
    }
}

/// A client acting as one user.
struct As {
    c: ChatClient<Channel>,
    token: String,
}

impl As {
    async fn new(node: &InProc, name: &str) -> Self {
        let mut c = node.client().await;
        let r = c
            .create_user(pb::CreateUserRequest { name: name.into() })
            .await
            .unwrap()
            .into_inner();
        Self { c, token: r.token }
    }

    fn req<T>(&self, body: T) -> Request<T> {
        let mut r = Request::new(body);
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.token).parse().unwrap(),
        );
        r
    }

    async fn send(
        &mut self,
        room: &str,
        text: &str,
    ) -> Result<pb::SendMessageResponse, tonic::Status> {
        let r = self.req(pb::SendMessageRequest {
            room: room.into(),
            text: text.as_bytes().to_vec(),
            ..Default::default()
        });
        self.c.send_message(r).await.map(|r| r.into_inner())
    }

    async fn history(&mut self, room: &str) -> Vec<pb::Message> {
        let r = self.req(pb::HistoryRequest {
            room: room.into(),
            limit: 1000,
            ..Default::default()
        });
        self.c.history(r).await.unwrap().into_inner().messages
    }

    async fn subscribe(&mut self, rooms: &[&str], cursor: &str) -> tonic::Streaming<pb::Event> {
        let r = self.req(pb::SubscribeRequest {
            rooms: rooms.iter().map(|s| s.to_string()).collect(),
            cursor: cursor.into(),
        });
        self.c.subscribe(r).await.unwrap().into_inner()
    }

    async fn moderate(
        &mut self,
        room: &str,
        action: pb::ModerateAction,
        user: &str,
    ) -> Result<(), tonic::Status> {
        let r = self.req(pb::ModerateRequest {
            room: room.into(),
            action: action as i32,
            user: user.into(),
            role: 0,
        });
        self.c.moderate(r).await.map(|_| ())
    }
}

/// Next event of a stream, bounded in time.
async fn next(s: &mut tonic::Streaming<pb::Event>) -> pb::Event {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await
        .expect("no event within 10 s")
        .expect("stream error")
        .expect("stream ended")
}

/// Next event that is a message, skipping live-only events.
async fn next_message(s: &mut tonic::Streaming<pb::Event>) -> (pb::Message, String) {
    for _ in 0..100 {
        let ev = next(s).await;
        if let Some(pb::event::Kind::Message(m)) = ev.kind {
            return (m, ev.cursor);
        }
    }
    panic!("no message among 100 events");
}

#[tokio::test]
async fn live_delivery_cursor_resume_and_timeline_events() {
    let dir = tempfile::tempdir().unwrap();
    let node = InProc::start(dir.path()).await;
    let mut alice = As::new(&node, "alice").await;
    let mut bob = As::new(&node, "bob").await;
    let room = alice
        .c
        .create_room(alice.req(pb::CreateRoomRequest {
            name: "general".into(),
            write_quorum: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(room.member_count, 1);
    bob.c
        .join_room(bob.req(pb::JoinRoomRequest {
            room: "general".into(),
        }))
        .await
        .unwrap();

    let mut sub = bob.subscribe(&["general"], "").await;
    let mut sent = Vec::new();
    for i in 0..20 {
        sent.push(
            alice
                .send("general", &format!("hello {i}"))
                .await
                .unwrap()
                .id,
        );
    }
    let mut got = Vec::new();
    let mut cursor_after_10 = String::new();
    for i in 0..20 {
        let (m, cursor) = next_message(&mut sub).await;
        got.push(m.id);
        if i == 9 {
            cursor_after_10 = cursor;
        }
    }
    assert_eq!(got, sent, "live delivery: every message once, in order");
    drop(sub);

    // Resume from the cursor taken after the 10th message: exactly the other 10, then live.
    let mut resumed = bob.subscribe(&[], &cursor_after_10).await;
    let mut again = Vec::new();
    for _ in 0..10 {
        again.push(next_message(&mut resumed).await.0.id);
    }
    assert_eq!(again, sent[10..].to_vec(), "resume: no gap, no duplicate");
    let extra = alice.send("general", "after resume").await.unwrap().id;
    assert_eq!(next_message(&mut resumed).await.0.id, extra);

    // Edits, reactions and deletes arrive as events and show in history.
    let first = sent[0].clone();
    alice
        .c
        .edit_message(alice.req(pb::EditMessageRequest {
            room: "general".into(),
            message_id: first.clone(),
            text: b"edited".to_vec(),
        }))
        .await
        .unwrap();
    let denied = bob
        .c
        .edit_message(bob.req(pb::EditMessageRequest {
            room: "general".into(),
            message_id: first.clone(),
            text: b"x".to_vec(),
        }))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    bob.c
        .react(bob.req(pb::ReactRequest {
            room: "general".into(),
            message_id: first.clone(),
            emoji: "+1".into(),
            remove: false,
        }))
        .await
        .unwrap();
    let kinds: Vec<_> = [next(&mut resumed).await, next(&mut resumed).await]
        .into_iter()
        .map(|e| match e.kind {
            Some(pb::event::Kind::Edited(_)) => "edited",
            Some(pb::event::Kind::Reaction(_)) => "reaction",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["edited", "reaction"]);
    let h = alice.history("general").await;
    assert_eq!(h.len(), 21);
    assert_eq!(h[0].text, "edited");
    assert_eq!(h[0].reactions[0].users, vec!["bob".to_string()]);
    alice
        .c
        .delete_message(alice.req(pb::DeleteMessageRequest {
            room: "general".into(),
            message_id: sent[1].clone(),
        }))
        .await
        .unwrap();
    assert!(alice.history("general").await[1].deleted);

    // An unknown cursor is refused with a clear code.
    let bad = bob
        .c
        .subscribe(bob.req(pb::SubscribeRequest {
            rooms: vec![],
            cursor: "nonsense".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let ahead = format!("v1:{}={}", room.id, "f".repeat(32));
    let bad = bob
        .c
        .subscribe(bob.req(pb::SubscribeRequest {
            rooms: vec![],
            cursor: ahead,
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::NotFound);
    node.stop().await;
}

#[tokio::test]
async fn ban_fences_sends_and_ends_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let node = InProc::start(dir.path()).await;
    let mut admin = As::new(&node, "admin").await;
    let mut troll = As::new(&node, "troll").await;
    admin
        .c
        .create_room(admin.req(pb::CreateRoomRequest {
            name: "fenced".into(),
            write_quorum: 0,
        }))
        .await
        .unwrap();
    troll
        .c
        .join_room(troll.req(pb::JoinRoomRequest {
            room: "fenced".into(),
        }))
        .await
        .unwrap();
    troll.send("fenced", "before").await.unwrap();
    let mut sub = troll.subscribe(&["fenced"], "").await;
    let denied = troll
        .moderate("fenced", pb::ModerateAction::ModerateBan, "admin")
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "a member cannot ban");
    admin
        .moderate("fenced", pb::ModerateAction::ModerateBan, "troll")
        .await
        .unwrap();
    let after = troll.send("fenced", "after the ban").await.unwrap_err();
    assert_eq!(after.code(), Code::PermissionDenied);
    let rejoin = troll
        .c
        .join_room(troll.req(pb::JoinRoomRequest {
            room: "fenced".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(rejoin.code(), Code::PermissionDenied);
    // The stream says the user was banned, then ends.
    let ev = next(&mut sub).await;
    match ev.kind {
        Some(pb::event::Kind::Membership(m)) => {
            assert_eq!(m.user, "troll");
            assert_eq!(m.change, pb::MembershipChange::MembershipBanned as i32);
        }
        other => panic!("expected the ban event, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(5), sub.message())
        .await
        .expect("stream did not end");
    assert!(
        matches!(end, Ok(None)),
        "stream should end after the ban, got {end:?}"
    );
    let texts: Vec<_> = admin
        .history("fenced")
        .await
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(texts, ["before"]);
    admin
        .moderate("fenced", pb::ModerateAction::ModerateUnban, "troll")
        .await
        .unwrap();
    troll
        .c
        .join_room(troll.req(pb::JoinRoomRequest {
            room: "fenced".into(),
        }))
        .await
        .unwrap();
    troll.send("fenced", "reformed").await.unwrap();
    node.stop().await;
}

#[tokio::test]
async fn presence_typing_markers_receipts_and_direct_messages() {
    let dir = tempfile::tempdir().unwrap();
    let node = InProc::start(dir.path()).await;
    let mut a = As::new(&node, "ann").await;
    let mut b = As::new(&node, "ben").await;
    a.c.create_room(a.req(pb::CreateRoomRequest {
        name: "ops".into(),
        write_quorum: 0,
    }))
    .await
    .unwrap();
    b.c.join_room(b.req(pb::JoinRoomRequest { room: "ops".into() }))
        .await
        .unwrap();
    let mut sub = a.subscribe(&["ops"], "").await;

    b.c.set_presence(b.req(pb::SetPresenceRequest {
        state: pb::PresenceState::PresenceBusy as i32,
    }))
    .await
    .unwrap();
    match next(&mut sub).await.kind {
        Some(pb::event::Kind::Presence(p)) => assert_eq!(
            (p.user.as_str(), p.state),
            ("ben", pb::PresenceState::PresenceBusy as i32)
        ),
        other => panic!("expected presence, got {other:?}"),
    }
    let shown =
        a.c.get_presence(a.req(pb::GetPresenceRequest { room: "ops".into() }))
            .await
            .unwrap()
            .into_inner();
    assert!(shown
        .users
        .iter()
        .any(|p| p.user == "ben" && p.state == pb::PresenceState::PresenceBusy as i32));
    // No heartbeat: ben goes offline after the TTL (600 ms here), announced to the room.
    match next(&mut sub).await.kind {
        Some(pb::event::Kind::Presence(p)) => assert_eq!(
            (p.user.as_str(), p.state),
            ("ben", pb::PresenceState::PresenceOffline as i32)
        ),
        other => panic!("expected offline presence, got {other:?}"),
    }

    b.c.set_typing(b.req(pb::SetTypingRequest {
        room: "ops".into(),
        typing: true,
    }))
    .await
    .unwrap();
    match next(&mut sub).await.kind {
        Some(pb::event::Kind::Typing(t)) => assert!(t.typing && t.user == "ben"),
        other => panic!("expected typing, got {other:?}"),
    }

    let m1 = a.send("ops", "one").await.unwrap().id;
    let m2 = a.send("ops", "two").await.unwrap().id;
    let r =
        b.c.mark_read(b.req(pb::MarkReadRequest {
            room: "ops".into(),
            message_id: m2.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.message_id, m2);
    let r =
        b.c.mark_read(b.req(pb::MarkReadRequest {
            room: "ops".into(),
            message_id: m1.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.message_id, m2, "a read marker never goes backwards");
    let receipts =
        a.c.get_receipts(a.req(pb::GetReceiptsRequest {
            room: "ops".into(),
            message_id: m1.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipts.read_by, vec!["ben".to_string()]);
    let unknown =
        b.c.mark_read(b.req(pb::MarkReadRequest {
            room: "ops".into(),
            message_id: "0".repeat(32),
        }))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    let dm =
        a.c.send_direct(a.req(pb::SendDirectRequest {
            user: "ben".into(),
            text: b"psst".to_vec(),
            client_msg_id: "d1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let rooms =
        b.c.list_rooms(b.req(pb::ListRoomsRequest {
            joined_only: true,
            consistency: 0,
        }))
        .await
        .unwrap()
        .into_inner()
        .rooms;
    let direct = rooms
        .iter()
        .find(|r| r.kind == pb::RoomKind::Direct as i32)
        .expect("direct room listed for ben");
    assert_eq!(direct.name, "@ann+ben");
    let h = b.history(&direct.id).await;
    assert_eq!(
        (h.len(), h[0].id.as_str(), h[0].text.as_str()),
        (1, dm.id.as_str(), "psst")
    );
    let again =
        a.c.send_direct(a.req(pb::SendDirectRequest {
            user: "ben".into(),
            text: b"psst".to_vec(),
            client_msg_id: "d1".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate && again.id == dm.id);
    let no_self =
        a.c.send_direct(a.req(pb::SendDirectRequest {
            user: "ann".into(),
            text: b"me".to_vec(),
            client_msg_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(no_self.code(), Code::InvalidArgument);
    node.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = InProc::start(dir.path()).await;
    let mut a = As::new(&node, "amy").await;
    a.c.create_room(a.req(pb::CreateRoomRequest {
        name: "plain".into(),
        write_quorum: 0,
    }))
    .await
    .unwrap();
    let bad_utf8 = a.req(pb::SendMessageRequest {
        room: "plain".into(),
        text: vec![0x66, 0xff, 0xfe],
        ..Default::default()
    });
    assert_eq!(
        a.c.send_message(bad_utf8).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let huge = "x".repeat(64 * 1024 + 1);
    assert_eq!(
        a.send("plain", &huge).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert!(
        a.send("plain", &"y".repeat(64 * 1024)).await.is_ok(),
        "exactly 64 KiB is allowed"
    );
    assert_eq!(
        a.send("plain", "  ").await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        a.send("nowhere", "hi").await.unwrap_err().code(),
        Code::NotFound
    );
    let bad_after = a.req(pb::SendMessageRequest {
        room: "plain".into(),
        text: b"x".to_vec(),
        after: "zz".into(),
        ..Default::default()
    });
    assert_eq!(
        a.c.send_message(bad_after).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    let dup =
        a.c.create_room(a.req(pb::CreateRoomRequest {
            name: "plain".into(),
            write_quorum: 0,
        }))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let mut anon = node.client().await;
    let no_token = anon
        .history(pb::HistoryRequest {
            room: "plain".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(no_token.code(), Code::Unauthenticated);
    let mut forged = As {
        c: node.client().await,
        token: format!("amy.{}", "0".repeat(64)),
    };
    assert_eq!(
        forged.send("plain", "hi").await.unwrap_err().code(),
        Code::Unauthenticated
    );
    let taken = anon
        .create_user(pb::CreateUserRequest { name: "amy".into() })
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::AlreadyExists);
    assert_eq!(
        a.history("plain").await.len(),
        1,
        "only the one valid send was written"
    );
    node.stop().await;
}

#[tokio::test]
async fn state_and_timelines_survive_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = InProc::start(dir.path()).await;
    let mut a = As::new(&node, "rita").await;
    let token = a.token.clone();
    a.c.create_room(a.req(pb::CreateRoomRequest {
        name: "durable".into(),
        write_quorum: 0,
    }))
    .await
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(a.send("durable", &format!("m{i}")).await.unwrap().id);
    }
    node.stop().await;

    let node = InProc::start(dir.path()).await;
    let mut a = As {
        c: node.client().await,
        token,
    };
    let h: Vec<_> = a
        .history("durable")
        .await
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(h, ids);
    let next_id = a.send("durable", "after restart").await.unwrap().id;
    assert!(next_id > *ids.last().unwrap());
    let members =
        a.c.list_members(a.req(pb::ListMembersRequest {
            room: "durable".into(),
            consistency: pb::Consistency::Strong as i32,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(members.members.len(), 1);
    assert_eq!(members.members[0].role, pb::Role::Admin as i32);
    node.stop().await;
}
