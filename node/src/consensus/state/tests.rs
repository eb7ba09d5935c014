//! Tests of `apply`: every command's success path and refusals, then a property test over
//! random command sequences that checks the state machine's invariants after every step.

use proptest::prelude::*;

use super::*;

fn u(name: &str) -> UserId {
    UserId::parse(name).expect("valid user name")
}

fn rid(n: u64) -> RoomId {
    RoomId::parse(&format!("rm_{n:016x}")).expect("valid room id")
}

/// Applies a command that must succeed.
fn ok(state: &mut State, cmd: Command) -> Applied {
    let shown = format!("{cmd:?}");
    match apply(state, cmd) {
        Ok(a) => a,
        Err(e) => panic!("{shown} was refused: {e:?}"),
    }
}

/// Applies a command that must be refused, and checks that it changed nothing.
fn refused(state: &mut State, cmd: Command) -> CommandError {
    let before = state.clone();
    let shown = format!("{cmd:?}");
    match apply(state, cmd) {
        Ok(a) => panic!("{shown} succeeded: {a:?}"),
        Err(e) => {
            assert_eq!(
                *state, before,
                "{shown} was refused ({e:?}) but changed the state"
            );
            e
        }
    }
}

/// Applies a command that must succeed without changing anything.
fn no_op(state: &mut State, cmd: Command) -> Applied {
    let before = state.clone();
    let a = ok(state, cmd);
    assert_eq!(*state, before, "a no-op changed the state");
    a
}

fn membership(room: &RoomId, user: &str, changed: bool) -> Applied {
    Applied::Membership {
        room: room.clone(),
        user: u(user),
        changed,
    }
}

fn create_room(id: &RoomId, name: &str, creator: &str) -> Command {
    Command::CreateRoom {
        id: id.clone(),
        name: name.into(),
        creator: u(creator),
        write_quorum: None,
        at: 1,
    }
}

fn join(room: &RoomId, user: &str) -> Command {
    Command::Join {
        room: room.clone(),
        user: u(user),
        at: 2,
    }
}

fn leave(room: &RoomId, user: &str) -> Command {
    Command::Leave {
        room: room.clone(),
        user: u(user),
    }
}

fn invite(room: &RoomId, by: &str, user: &str) -> Command {
    Command::Invite {
        room: room.clone(),
        by: u(by),
        user: u(user),
        at: 3,
    }
}

fn kick(room: &RoomId, by: &str, user: &str) -> Command {
    Command::Kick {
        room: room.clone(),
        by: u(by),
        user: u(user),
    }
}

fn ban(room: &RoomId, by: &str, user: &str) -> Command {
    Command::Ban {
        room: room.clone(),
        by: u(by),
        user: u(user),
        at: 4,
    }
}

fn unban(room: &RoomId, by: &str, user: &str) -> Command {
    Command::Unban {
        room: room.clone(),
        by: u(by),
        user: u(user),
    }
}

fn set_role(room: &RoomId, by: &str, user: &str, role: Role) -> Command {
    Command::SetRole {
        room: room.clone(),
        by: u(by),
        user: u(user),
        role,
    }
}

fn delete_room(room: &RoomId, by: &str) -> Command {
    Command::DeleteRoom {
        room: room.clone(),
        by: u(by),
    }
}

fn ensure_direct(a: &str, b: &str) -> Command {
    Command::EnsureDirect {
        id: RoomId::direct(&u(a), &u(b)),
        a: u(a),
        b: u(b),
        at: 5,
    }
}

/// Room `general` (id 1) created by alice (admin), joined by bob and carol (members).
fn general() -> (State, RoomId) {
    let mut s = State::default();
    let id = rid(1);
    ok(&mut s, create_room(&id, "general", "alice"));
    ok(&mut s, join(&id, "bob"));
    ok(&mut s, join(&id, "carol"));
    (s, id)
}

fn role_of(s: &State, room: &RoomId, user: &str) -> Option<Role> {
    s.member(room, &u(user)).map(|m| m.role)
}

// ---- users ----

#[test]
fn create_user_records_it_and_refuses_a_taken_name() {
    let mut s = State::default();
    let cmd = Command::CreateUser {
        name: u("alice"),
        token_hash: [7; 32],
        at: 10,
    };
    assert_eq!(ok(&mut s, cmd.clone()), Applied::UserCreated);
    assert_eq!(
        s.users.get(&u("alice")),
        Some(&UserRecord {
            name: u("alice"),
            token_hash: [7; 32],
            created_at: 10
        })
    );
    let again = Command::CreateUser {
        name: u("alice"),
        token_hash: [8; 32],
        at: 11,
    };
    assert!(matches!(
        refused(&mut s, again),
        CommandError::AlreadyExists { .. }
    ));
    assert_eq!(s.users[&u("alice")].token_hash, [7; 32]);
}

#[test]
fn delete_user_removes_it_and_refuses_an_unknown_user() {
    let mut s = State::default();
    ok(
        &mut s,
        Command::CreateUser {
            name: u("alice"),
            token_hash: [1; 32],
            at: 1,
        },
    );
    ok(
        &mut s,
        Command::CreateUser {
            name: u("bob"),
            token_hash: [2; 32],
            at: 1,
        },
    );
    assert_eq!(
        ok(&mut s, Command::DeleteUser { name: u("alice") }),
        Applied::UserDeleted
    );
    assert!(!s.users.contains_key(&u("alice")));
    assert!(s.users.contains_key(&u("bob")));
    let e = refused(&mut s, Command::DeleteUser { name: u("alice") });
    assert!(matches!(e, CommandError::NotFound { .. }));
    // The name is free again.
    ok(
        &mut s,
        Command::CreateUser {
            name: u("alice"),
            token_hash: [3; 32],
            at: 2,
        },
    );
}

// ---- group rooms ----

#[test]
fn create_room_makes_the_creator_its_admin_and_reserves_the_name() {
    let mut s = State::default();
    let id = rid(1);
    let cmd = Command::CreateRoom {
        id: id.clone(),
        name: "general".into(),
        creator: u("alice"),
        write_quorum: Some(2),
        at: 42,
    };
    let expected = RoomRecord {
        id: id.clone(),
        name: "general".into(),
        kind: RoomKind::Group,
        creator: u("alice"),
        created_at: 42,
        settings: RoomSettings {
            write_quorum: Some(2),
            mega_threshold: DEFAULT_MEGA_THRESHOLD,
        },
    };
    assert_eq!(ok(&mut s, cmd), Applied::RoomCreated(expected.clone()));
    assert_eq!(s.room(&id), Some(&expected));
    assert_eq!(s.room_by_name("general"), Some(&expected));
    assert_eq!(
        s.member(&id, &u("alice")),
        Some(&MemberRecord {
            role: Role::Admin,
            joined_at: 42,
            muted: false
        })
    );
    assert_eq!(s.member_count(&id), 1);
}

#[test]
fn room_names_and_ids_are_unique() {
    let (mut s, id) = general();
    let e = refused(&mut s, create_room(&rid(2), "general", "bob"));
    assert!(matches!(e, CommandError::AlreadyExists { .. }), "{e:?}");
    let e = refused(&mut s, create_room(&id, "random", "bob"));
    assert!(matches!(e, CommandError::AlreadyExists { .. }), "{e:?}");
    ok(&mut s, create_room(&rid(2), "random", "bob"));
    assert_eq!(s.room_by_name("random").map(|r| r.id.clone()), Some(rid(2)));
    assert_eq!(s.room_by_name("general").map(|r| r.id.clone()), Some(id));
}

#[test]
fn create_room_refuses_invalid_input() {
    let mut s = State::default();
    for name in [
        "",
        "General",
        "-dash",
        "has space",
        "rm_0123456789abcdef",
        &"a".repeat(65),
    ] {
        let e = refused(&mut s, create_room(&rid(1), name, "alice"));
        assert!(matches!(e, CommandError::Invalid { .. }), "{name:?}: {e:?}");
    }
    let dm = RoomId::direct(&u("alice"), &u("bob"));
    let e = refused(&mut s, create_room(&dm, "general", "alice"));
    assert!(matches!(e, CommandError::Invalid { .. }), "{e:?}");
    for q in [0, 6, 255] {
        let cmd = Command::CreateRoom {
            id: rid(1),
            name: "general".into(),
            creator: u("alice"),
            write_quorum: Some(q),
            at: 1,
        };
        assert!(
            matches!(refused(&mut s, cmd), CommandError::Invalid { .. }),
            "quorum {q}"
        );
    }
    for (n, q) in [(1, 1), (2, 5)] {
        let cmd = Command::CreateRoom {
            id: rid(n),
            name: format!("room-{q}"),
            creator: u("alice"),
            write_quorum: Some(q),
            at: 1,
        };
        ok(&mut s, cmd);
    }
}

#[test]
fn only_admins_delete_a_group_room() {
    let (mut s, id) = general();
    let e = refused(&mut s, delete_room(&rid(9), "alice"));
    assert!(matches!(e, CommandError::NotFound { .. }), "{e:?}");
    let e = refused(&mut s, delete_room(&id, "bob"));
    assert!(matches!(e, CommandError::NotAdmin { .. }), "{e:?}");
    let e = refused(&mut s, delete_room(&id, "dave"));
    assert!(matches!(e, CommandError::NotMember { .. }), "{e:?}");
    ok(&mut s, set_role(&id, "alice", "bob", Role::Admin));
    assert_eq!(
        ok(&mut s, delete_room(&id, "bob")),
        Applied::RoomDeleted { room: id.clone() }
    );
    assert!(s.room(&id).is_none());
}

#[test]
fn delete_room_removes_members_bans_and_the_name() {
    let (mut s, id) = general();
    ok(&mut s, ban(&id, "alice", "mallory"));
    ok(&mut s, create_room(&rid(2), "random", "alice"));
    ok(&mut s, delete_room(&id, "alice"));
    assert!(s.room(&id).is_none());
    assert!(s.room_by_name("general").is_none());
    assert!(!s.room_names.contains_key("general"));
    assert!(!s.members.contains_key(&id));
    assert!(!s.bans.contains_key(&id));
    assert_eq!(s.member_count(&id), 0);
    // Other rooms are untouched.
    assert!(s.room_by_name("random").is_some());
    // Commands on the deleted room fail with NotFound.
    assert!(matches!(
        refused(&mut s, join(&id, "bob")),
        CommandError::NotFound { .. }
    ));
    assert!(matches!(
        refused(&mut s, delete_room(&id, "alice")),
        CommandError::NotFound { .. }
    ));
    // The name can be reused, by a new room with a fresh membership and no bans.
    let id2 = rid(3);
    ok(&mut s, create_room(&id2, "general", "carol"));
    assert_eq!(
        s.room_by_name("general").map(|r| r.id.clone()),
        Some(id2.clone())
    );
    assert_eq!(s.member_count(&id2), 1);
    assert_eq!(role_of(&s, &id2, "carol"), Some(Role::Admin));
    ok(&mut s, join(&id2, "mallory"));
    // Even the old id can be reused.
    ok(&mut s, create_room(&id, "general-2", "bob"));
    assert!(!s.is_banned(&id, &u("mallory")));
    assert_eq!(s.member_count(&id), 1);
}

// ---- direct rooms ----

#[test]
fn ensure_direct_creates_the_room_of_two_members_once() {
    let mut s = State::default();
    let id = RoomId::direct(&u("bob"), &u("alice"));
    let Applied::DirectReady {
        room,
        created: true,
    } = ok(&mut s, ensure_direct("bob", "alice"))
    else {
        panic!("expected a created direct room")
    };
    assert_eq!(room.id, id);
    assert_eq!(room.kind, RoomKind::Direct);
    assert_eq!(room.name, "@alice+bob");
    assert_eq!(room.creator, u("bob"));
    assert_eq!(s.room(&id), Some(&room));
    assert_eq!(s.member_count(&id), 2);
    assert_eq!(role_of(&s, &id, "alice"), Some(Role::Member));
    assert_eq!(role_of(&s, &id, "bob"), Some(Role::Member));
    // Direct rooms reserve no group name.
    assert!(s.room_names.is_empty());

    // Idempotent, from either side, whatever the time.
    for (a, b) in [("bob", "alice"), ("alice", "bob")] {
        let again = no_op(&mut s, ensure_direct(a, b));
        assert_eq!(
            again,
            Applied::DirectReady {
                room: room.clone(),
                created: false
            }
        );
    }
}

#[test]
fn ensure_direct_refuses_an_id_that_is_not_the_pair() {
    let mut s = State::default();
    let other = RoomId::direct(&u("alice"), &u("carol"));
    for id in [rid(1), other] {
        let cmd = Command::EnsureDirect {
            id,
            a: u("alice"),
            b: u("bob"),
            at: 1,
        };
        assert!(matches!(refused(&mut s, cmd), CommandError::Invalid { .. }));
    }
}

#[test]
fn direct_room_membership_is_fixed() {
    let mut s = State::default();
    ok(&mut s, ensure_direct("alice", "bob"));
    let id = RoomId::direct(&u("alice"), &u("bob"));
    let precondition = |e: CommandError| matches!(e, CommandError::Precondition { .. });
    assert!(precondition(refused(&mut s, join(&id, "carol"))));
    assert!(precondition(refused(&mut s, invite(&id, "alice", "carol"))));
    assert!(precondition(refused(&mut s, kick(&id, "alice", "bob"))));
    assert!(precondition(refused(&mut s, ban(&id, "alice", "bob"))));
    assert!(precondition(refused(&mut s, ban(&id, "alice", "carol"))));
    assert!(precondition(refused(&mut s, unban(&id, "alice", "carol"))));
    assert!(precondition(refused(
        &mut s,
        set_role(&id, "alice", "bob", Role::Admin)
    )));
    assert!(precondition(refused(
        &mut s,
        set_role(&id, "alice", "alice", Role::Admin)
    )));
    assert!(precondition(refused(&mut s, leave(&id, "alice"))));
    assert!(matches!(
        refused(&mut s, leave(&id, "carol")),
        CommandError::NotMember { .. }
    ));
    // A member "joining" again is a no-op, not a refusal.
    assert_eq!(
        no_op(&mut s, join(&id, "bob")),
        membership(&id, "bob", false)
    );
    assert_eq!(s.member_count(&id), 2);
}

#[test]
fn a_member_deletes_a_direct_room_and_it_can_be_made_again() {
    let mut s = State::default();
    ok(&mut s, ensure_direct("alice", "bob"));
    let id = RoomId::direct(&u("alice"), &u("bob"));
    let e = refused(&mut s, delete_room(&id, "carol"));
    assert!(matches!(e, CommandError::NotMember { .. }), "{e:?}");
    ok(&mut s, delete_room(&id, "bob"));
    assert!(s.room(&id).is_none());
    assert!(!s.members.contains_key(&id));
    let again = ok(&mut s, ensure_direct("alice", "bob"));
    assert!(matches!(again, Applied::DirectReady { created: true, .. }));
    assert_eq!(s.member_count(&id), 2);
}

// ---- join and leave ----

#[test]
fn join_adds_a_plain_member_once() {
    let mut s = State::default();
    let id = rid(1);
    ok(&mut s, create_room(&id, "general", "alice"));
    assert_eq!(ok(&mut s, join(&id, "bob")), membership(&id, "bob", true));
    assert_eq!(
        s.member(&id, &u("bob")),
        Some(&MemberRecord {
            role: Role::Member,
            joined_at: 2,
            muted: false
        })
    );
    let twice = Command::Join {
        room: id.clone(),
        user: u("bob"),
        at: 99,
    };
    assert_eq!(no_op(&mut s, twice), membership(&id, "bob", false));
    assert_eq!(
        no_op(&mut s, join(&id, "alice")),
        membership(&id, "alice", false)
    );
    assert_eq!(role_of(&s, &id, "alice"), Some(Role::Admin));
    let e = refused(&mut s, join(&rid(2), "bob"));
    assert!(matches!(e, CommandError::NotFound { .. }), "{e:?}");
}

#[test]
fn leave_removes_the_member() {
    let (mut s, id) = general();
    assert_eq!(ok(&mut s, leave(&id, "bob")), membership(&id, "bob", true));
    assert!(s.member(&id, &u("bob")).is_none());
    assert!(matches!(
        refused(&mut s, leave(&id, "bob")),
        CommandError::NotMember { .. }
    ));
    assert!(matches!(
        refused(&mut s, leave(&rid(2), "bob")),
        CommandError::NotFound { .. }
    ));
    // Leaving is not a ban: bob may come back.
    ok(&mut s, join(&id, "bob"));
}

#[test]
fn the_last_admin_may_not_leave_while_others_remain() {
    let (mut s, id) = general();
    let e = refused(&mut s, leave(&id, "alice"));
    assert!(matches!(e, CommandError::Precondition { .. }), "{e:?}");
    // With a second admin, alice may go; bob is then the last admin.
    ok(&mut s, set_role(&id, "alice", "bob", Role::Admin));
    ok(&mut s, leave(&id, "alice"));
    assert!(matches!(
        refused(&mut s, leave(&id, "bob")),
        CommandError::Precondition { .. }
    ));
    // Alone, the last admin may leave.
    ok(&mut s, kick(&id, "bob", "carol"));
    ok(&mut s, leave(&id, "bob"));
    assert_eq!(s.member_count(&id), 0);
    assert!(s.room(&id).is_some(), "an empty group room still exists");
}

#[test]
fn whoever_joins_an_empty_group_room_becomes_its_admin() {
    let mut s = State::default();
    let id = rid(1);
    ok(&mut s, create_room(&id, "general", "alice"));
    ok(&mut s, ban(&id, "alice", "mallory"));
    ok(&mut s, leave(&id, "alice"));
    // Bans outlive the members: a banned user cannot take the room over.
    assert!(matches!(
        refused(&mut s, join(&id, "mallory")),
        CommandError::Banned { .. }
    ));
    ok(&mut s, join(&id, "bob"));
    assert_eq!(role_of(&s, &id, "bob"), Some(Role::Admin));
    ok(&mut s, join(&id, "carol"));
    assert_eq!(role_of(&s, &id, "carol"), Some(Role::Member));
    ok(&mut s, kick(&id, "bob", "carol"));
}

// ---- invite ----

#[test]
fn any_member_invites_into_a_group_room() {
    let (mut s, id) = general();
    assert_eq!(
        ok(&mut s, invite(&id, "bob", "dave")),
        membership(&id, "dave", true)
    );
    assert_eq!(
        s.member(&id, &u("dave")),
        Some(&MemberRecord {
            role: Role::Member,
            joined_at: 3,
            muted: false
        })
    );
    assert_eq!(
        no_op(&mut s, invite(&id, "carol", "dave")),
        membership(&id, "dave", false)
    );
    assert_eq!(
        no_op(&mut s, invite(&id, "alice", "alice")),
        membership(&id, "alice", false)
    );
    let e = refused(&mut s, invite(&id, "erin", "frank"));
    assert!(matches!(e, CommandError::NotMember { .. }), "{e:?}");
    let e = refused(&mut s, invite(&rid(2), "alice", "frank"));
    assert!(matches!(e, CommandError::NotFound { .. }), "{e:?}");
}

// ---- kick ----

#[test]
fn only_admins_kick_and_never_themselves() {
    let (mut s, id) = general();
    assert!(matches!(
        refused(&mut s, kick(&id, "bob", "carol")),
        CommandError::NotAdmin { .. }
    ));
    assert!(matches!(
        refused(&mut s, kick(&id, "dave", "carol")),
        CommandError::NotMember { .. }
    ));
    assert!(matches!(
        refused(&mut s, kick(&id, "alice", "alice")),
        CommandError::Invalid { .. }
    ));
    assert!(matches!(
        refused(&mut s, kick(&id, "alice", "dave")),
        CommandError::NotMember { .. }
    ));
    assert!(matches!(
        refused(&mut s, kick(&rid(2), "alice", "bob")),
        CommandError::NotFound { .. }
    ));
    assert_eq!(
        ok(&mut s, kick(&id, "alice", "carol")),
        membership(&id, "carol", true)
    );
    assert!(s.member(&id, &u("carol")).is_none());
    // A kick is not a ban.
    assert!(!s.is_banned(&id, &u("carol")));
    ok(&mut s, join(&id, "carol"));
    // An admin may kick another admin; the kicker stays admin.
    ok(&mut s, set_role(&id, "alice", "bob", Role::Admin));
    ok(&mut s, kick(&id, "bob", "alice"));
    assert_eq!(role_of(&s, &id, "bob"), Some(Role::Admin));
}

// ---- ban and unban ----

#[test]
fn ban_removes_the_member_and_blocks_joining_and_invites() {
    let (mut s, id) = general();
    assert_eq!(
        ok(&mut s, ban(&id, "alice", "bob")),
        membership(&id, "bob", true)
    );
    assert!(s.member(&id, &u("bob")).is_none());
    assert!(s.is_banned(&id, &u("bob")));
    assert_eq!(
        s.bans[&id][&u("bob")],
        BanRecord {
            by: u("alice"),
            at: 4
        }
    );
    assert!(matches!(
        refused(&mut s, join(&id, "bob")),
        CommandError::Banned { .. }
    ));
    assert!(matches!(
        refused(&mut s, invite(&id, "carol", "bob")),
        CommandError::Banned { .. }
    ));
    assert!(matches!(
        refused(&mut s, invite(&id, "alice", "bob")),
        CommandError::Banned { .. }
    ));
}

#[test]
fn a_non_member_may_be_banned_ahead_and_banning_twice_is_a_no_op() {
    let (mut s, id) = general();
    assert_eq!(
        ok(&mut s, ban(&id, "alice", "mallory")),
        membership(&id, "mallory", true)
    );
    assert!(s.is_banned(&id, &u("mallory")));
    assert!(matches!(
        refused(&mut s, join(&id, "mallory")),
        CommandError::Banned { .. }
    ));
    ok(&mut s, set_role(&id, "alice", "bob", Role::Admin));
    let again = Command::Ban {
        room: id.clone(),
        by: u("bob"),
        user: u("mallory"),
        at: 50,
    };
    assert_eq!(no_op(&mut s, again), membership(&id, "mallory", false));
    assert_eq!(
        s.bans[&id][&u("mallory")],
        BanRecord {
            by: u("alice"),
            at: 4
        }
    );
}

#[test]
fn only_admins_ban_and_never_themselves() {
    let (mut s, id) = general();
    assert!(matches!(
        refused(&mut s, ban(&id, "bob", "carol")),
        CommandError::NotAdmin { .. }
    ));
    assert!(matches!(
        refused(&mut s, ban(&id, "dave", "carol")),
        CommandError::NotMember { .. }
    ));
    assert!(matches!(
        refused(&mut s, ban(&id, "alice", "alice")),
        CommandError::Invalid { .. }
    ));
    assert!(matches!(
        refused(&mut s, ban(&rid(2), "alice", "bob")),
        CommandError::NotFound { .. }
    ));
    // A banned admin loses the room; the banning admin stays.
    ok(&mut s, set_role(&id, "alice", "bob", Role::Admin));
    ok(&mut s, ban(&id, "bob", "alice"));
    assert!(s.member(&id, &u("alice")).is_none());
    assert_eq!(role_of(&s, &id, "bob"), Some(Role::Admin));
}

#[test]
fn only_admins_unban_and_unban_allows_joining() {
    let (mut s, id) = general();
    ok(&mut s, ban(&id, "alice", "mallory"));
    assert!(matches!(
        refused(&mut s, unban(&id, "bob", "mallory")),
        CommandError::NotAdmin { .. }
    ));
    assert!(matches!(
        refused(&mut s, unban(&id, "dave", "mallory")),
        CommandError::NotMember { .. }
    ));
    assert!(matches!(
        refused(&mut s, unban(&id, "alice", "carol")),
        CommandError::NotFound { .. }
    ));
    assert!(matches!(
        refused(&mut s, unban(&rid(2), "alice", "mallory")),
        CommandError::NotFound { .. }
    ));
    assert_eq!(
        ok(&mut s, unban(&id, "alice", "mallory")),
        membership(&id, "mallory", true)
    );
    assert!(!s.is_banned(&id, &u("mallory")));
    assert!(matches!(
        refused(&mut s, unban(&id, "alice", "mallory")),
        CommandError::NotFound { .. }
    ));
    ok(&mut s, join(&id, "mallory"));
    assert_eq!(role_of(&s, &id, "mallory"), Some(Role::Member));
}

// ---- roles ----

#[test]
fn only_admins_set_roles() {
    let (mut s, id) = general();
    let e = refused(&mut s, set_role(&id, "bob", "carol", Role::Admin));
    assert!(matches!(e, CommandError::NotAdmin { .. }), "{e:?}");
    let e = refused(&mut s, set_role(&id, "bob", "bob", Role::Admin));
    assert!(matches!(e, CommandError::NotAdmin { .. }), "{e:?}");
    let e = refused(&mut s, set_role(&id, "dave", "carol", Role::Admin));
    assert!(matches!(e, CommandError::NotMember { .. }), "{e:?}");
    let e = refused(&mut s, set_role(&id, "alice", "dave", Role::Admin));
    assert!(matches!(e, CommandError::NotMember { .. }), "{e:?}");
    let e = refused(&mut s, set_role(&rid(2), "alice", "bob", Role::Admin));
    assert!(matches!(e, CommandError::NotFound { .. }), "{e:?}");

    assert_eq!(
        ok(&mut s, set_role(&id, "alice", "bob", Role::Admin)),
        membership(&id, "bob", true)
    );
    assert_eq!(role_of(&s, &id, "bob"), Some(Role::Admin));
    let same = set_role(&id, "alice", "bob", Role::Admin);
    assert_eq!(no_op(&mut s, same), membership(&id, "bob", false));
    // The new admin has an admin's powers, including over the old one.
    ok(&mut s, set_role(&id, "bob", "alice", Role::Member));
    assert_eq!(role_of(&s, &id, "alice"), Some(Role::Member));
    assert!(matches!(
        refused(&mut s, kick(&id, "alice", "carol")),
        CommandError::NotAdmin { .. }
    ));
}

#[test]
fn the_last_admin_may_not_demote_themself() {
    let (mut s, id) = general();
    let e = refused(&mut s, set_role(&id, "alice", "alice", Role::Member));
    assert!(matches!(e, CommandError::Precondition { .. }), "{e:?}");
    ok(&mut s, set_role(&id, "alice", "carol", Role::Admin));
    ok(&mut s, set_role(&id, "alice", "alice", Role::Member));
    assert_eq!(role_of(&s, &id, "alice"), Some(Role::Member));
    let e = refused(&mut s, set_role(&id, "carol", "carol", Role::Member));
    assert!(matches!(e, CommandError::Precondition { .. }), "{e:?}");

    // Alone in the room, the rule still holds: a room with members keeps an admin.
    let mut s = State::default();
    ok(&mut s, create_room(&id, "solo", "alice"));
    let e = refused(&mut s, set_role(&id, "alice", "alice", Role::Member));
    assert!(matches!(e, CommandError::Precondition { .. }), "{e:?}");
}

// ---- mega-groups ----

#[test]
fn members_joining_a_mega_group_start_muted() {
    let mut s = State::default();
    let id = rid(1);
    ok(&mut s, create_room(&id, "big", "alice"));
    s.rooms.get_mut(&id).expect("room").settings.mega_threshold = 3;
    ok(&mut s, join(&id, "bob"));
    ok(&mut s, invite(&id, "bob", "carol"));
    for name in ["alice", "bob", "carol"] {
        assert_eq!(
            s.member(&id, &u(name)).map(|m| m.muted),
            Some(false),
            "{name}"
        );
    }
    // Three members: the room is a mega-group now, by join or by invite.
    ok(&mut s, join(&id, "dave"));
    ok(&mut s, invite(&id, "alice", "erin"));
    for name in ["dave", "erin"] {
        assert_eq!(
            s.member(&id, &u(name)).map(|m| m.muted),
            Some(true),
            "{name}"
        );
    }
    // Below the threshold again, joiners are not muted; the muted stay muted.
    ok(&mut s, leave(&id, "dave"));
    ok(&mut s, leave(&id, "erin"));
    ok(&mut s, leave(&id, "carol"));
    ok(&mut s, join(&id, "frank"));
    assert_eq!(s.member(&id, &u("frank")).map(|m| m.muted), Some(false));
    ok(&mut s, join(&id, "grace"));
    assert_eq!(s.member(&id, &u("grace")).map(|m| m.muted), Some(true));
}

#[test]
fn the_default_threshold_leaves_ordinary_rooms_unmuted() {
    let (mut s, id) = general();
    for i in 0..50 {
        ok(&mut s, join(&id, &format!("user{i}")));
    }
    assert!(s.members[&id].values().all(|m| !m.muted));
}

// ---- the property test ----

const USERS: [&str; 4] = ["ann", "ben", "cat", "dan"];
const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

fn any_user() -> impl Strategy<Value = UserId> {
    (0..USERS.len()).prop_map(|i| u(USERS[i]))
}

/// The users of the two direct rooms in play.
const PAIRS: [(&str, &str); 2] = [("ann", "ben"), ("cat", "ben")];

/// Three group rooms (ids 0 to 2) and the two direct rooms of `PAIRS`.
fn any_room() -> impl Strategy<Value = RoomId> {
    prop_oneof![
        4 => (0..3u64).prop_map(rid),
        1 => (0..PAIRS.len()).prop_map(|i| RoomId::direct(&u(PAIRS[i].0), &u(PAIRS[i].1))),
    ]
}

/// Mostly room `i` gets name `i`, so most creates succeed; sometimes another name, so
/// names and ids also collide.
fn any_create_room() -> impl Strategy<Value = Command> {
    (
        0..3u64,
        prop::option::weighted(0.25, 0..NAMES.len()),
        any_user(),
        prop::option::weighted(0.3, 0..7u8),
        0..100u64,
    )
        .prop_map(
            |(i, other_name, creator, write_quorum, at)| Command::CreateRoom {
                id: rid(i),
                name: NAMES[other_name.unwrap_or(i as usize)].into(),
                creator,
                write_quorum,
                at,
            },
        )
}

/// Mostly a pair in play, with its own id; sometimes any pair (even a user with itself),
/// sometimes with another pair's id, which must be refused.
fn any_ensure_direct() -> impl Strategy<Value = Command> {
    let pair = prop_oneof![
        3 => (0..PAIRS.len()).prop_map(|i| (u(PAIRS[i].0), u(PAIRS[i].1))),
        1 => (any_user(), any_user()),
    ];
    (pair, prop::bool::weighted(0.8), 0..100u64).prop_map(|((a, b), right_id, at)| {
        let id = if right_id {
            RoomId::direct(&a, &b)
        } else {
            RoomId::direct(&a, &u("zed"))
        };
        Command::EnsureDirect { id, a, b, at }
    })
}

fn any_role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Member), Just(Role::Admin)]
}

fn any_command() -> impl Strategy<Value = Command> {
    let at = 0..100u64;
    prop_oneof![
        1 => (any_user(), any::<u8>(), at.clone())
            .prop_map(|(name, h, at)| Command::CreateUser { name, token_hash: [h; 32], at }),
        1 => any_user().prop_map(|name| Command::DeleteUser { name }),
        6 => any_create_room(),
        2 => any_ensure_direct(),
        1 => (any_room(), any_user()).prop_map(|(room, by)| Command::DeleteRoom { room, by }),
        8 => (any_room(), any_user(), at.clone()).prop_map(|(room, user, at)| Command::Join { room, user, at }),
        3 => (any_room(), any_user()).prop_map(|(room, user)| Command::Leave { room, user }),
        3 => (any_room(), any_user(), any_user(), at.clone())
            .prop_map(|(room, by, user, at)| Command::Invite { room, by, user, at }),
        3 => (any_room(), any_user(), any_user()).prop_map(|(room, by, user)| Command::Kick { room, by, user }),
        4 => (any_room(), any_user(), any_user(), at)
            .prop_map(|(room, by, user, at)| Command::Ban { room, by, user, at }),
        3 => (any_room(), any_user(), any_user()).prop_map(|(room, by, user)| Command::Unban { room, by, user }),
        4 => (any_room(), any_user(), any_user(), any_role())
            .prop_map(|(room, by, user, role)| Command::SetRole { room, by, user, role }),
    ]
}

/// The invariants that hold after every command, whatever the history.
fn check_invariants(s: &State) -> Result<(), TestCaseError> {
    for (id, room) in &s.rooms {
        prop_assert_eq!(&room.id, id);
        let members = s.members.get(id);
        match room.kind {
            RoomKind::Group => {
                // (5) every group room's name is reserved for it.
                prop_assert_eq!(s.room_names.get(&room.name), Some(id), "name of {}", id);
                // (3) a group room with members has an admin.
                if let Some(ms) = members.filter(|ms| !ms.is_empty()) {
                    prop_assert!(
                        ms.values().any(|m| m.role == Role::Admin),
                        "{} has no admin",
                        id
                    );
                }
            }
            RoomKind::Direct => {
                // Fixed membership: exactly the pair the id was made from, no admin, no bans.
                let ms = members
                    .map(|ms| ms.keys().cloned().collect::<Vec<_>>())
                    .unwrap_or_default();
                prop_assert!(
                    !ms.is_empty() && ms.len() <= 2,
                    "{} has members {:?}",
                    id,
                    ms
                );
                let pair = RoomId::direct(&ms[0], ms.last().unwrap_or(&ms[0]));
                prop_assert_eq!(&pair, id, "members {:?}", ms);
                prop_assert!(members.is_some_and(|m| m.values().all(|m| m.role == Role::Member)));
                prop_assert!(s.bans.get(id).into_iter().all(|b| b.is_empty()));
            }
        }
    }
    // (5) every reserved name points to a group room of that name.
    for (name, id) in &s.room_names {
        let Some(room) = s.rooms.get(id) else {
            return Err(TestCaseError::fail(format!(
                "name {name} points to missing room {id}"
            )));
        };
        prop_assert_eq!(room.kind, RoomKind::Group);
        prop_assert_eq!(&room.name, name);
    }
    // Membership and bans of deleted rooms are gone.
    for id in s.members.keys().chain(s.bans.keys()) {
        prop_assert!(s.rooms.contains_key(id), "leftovers of deleted room {}", id);
    }
    // (4) nobody is both a member and banned.
    for (id, bans) in &s.bans {
        for user in bans.keys() {
            prop_assert!(
                s.member(id, user).is_none(),
                "{} is a member of {} and banned",
                user,
                id
            );
        }
    }
    Ok(())
}

fn is_no_op(a: &Applied) -> bool {
    matches!(
        a,
        Applied::DirectReady { created: false, .. } | Applied::Membership { changed: false, .. }
    )
}

/// Who acts or is acted on. Users drawn blindly are rarely admins of the room at hand, so
/// a step may instead pick, from the state it is applied to, a member, an admin or a
/// banned user of the room. The picked command is what gets recorded and replayed.
#[derive(Debug, Clone, Copy)]
enum Who {
    AsGenerated,
    Member(usize),
    Admin(usize),
    Banned(usize),
}

fn any_who() -> impl Strategy<Value = Who> {
    prop_oneof![
        3 => Just(Who::AsGenerated),
        2 => any::<usize>().prop_map(Who::Member),
        2 => any::<usize>().prop_map(Who::Admin),
        1 => any::<usize>().prop_map(Who::Banned),
    ]
}

fn pick(s: &State, room: &RoomId, who: Who, generated: UserId) -> UserId {
    let nth =
        |users: Vec<&UserId>, i: usize| users.get(i % users.len().max(1)).map(|u| (*u).clone());
    let members = || s.members.get(room).into_iter().flatten();
    let picked = match who {
        Who::AsGenerated => None,
        Who::Member(i) => nth(members().map(|(u, _)| u).collect(), i),
        Who::Admin(i) => nth(
            members()
                .filter(|(_, m)| m.role == Role::Admin)
                .map(|(u, _)| u)
                .collect(),
            i,
        ),
        Who::Banned(i) => nth(
            s.bans
                .get(room)
                .into_iter()
                .flat_map(|b| b.keys())
                .collect(),
            i,
        ),
    };
    picked.unwrap_or(generated)
}

/// The command of a step, with its actor (`by`) and target (`user`) picked against `s`.
fn resolve(s: &State, cmd: Command, by_who: Who, user_who: Who) -> Command {
    let by = |room: &RoomId, by: UserId| pick(s, room, by_who, by);
    let user = |room: &RoomId, user: UserId| pick(s, room, user_who, user);
    match cmd {
        Command::DeleteRoom { room, by: b } => Command::DeleteRoom {
            by: by(&room, b),
            room,
        },
        Command::Join { room, user: t, at } => Command::Join {
            user: user(&room, t),
            room,
            at,
        },
        Command::Leave { room, user: t } => Command::Leave {
            user: user(&room, t),
            room,
        },
        Command::Invite {
            room,
            by: b,
            user: t,
            at,
        } => Command::Invite {
            by: by(&room, b),
            user: user(&room, t),
            room,
            at,
        },
        Command::Kick {
            room,
            by: b,
            user: t,
        } => Command::Kick {
            by: by(&room, b),
            user: user(&room, t),
            room,
        },
        Command::Ban {
            room,
            by: b,
            user: t,
            at,
        } => Command::Ban {
            by: by(&room, b),
            user: user(&room, t),
            room,
            at,
        },
        Command::Unban {
            room,
            by: b,
            user: t,
        } => Command::Unban {
            by: by(&room, b),
            user: user(&room, t),
            room,
        },
        Command::SetRole {
            room,
            by: b,
            user: t,
            role,
        } => Command::SetRole {
            by: by(&room, b),
            user: user(&room, t),
            room,
            role,
        },
        other => other,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn invariants_hold_over_random_histories(
        steps in prop::collection::vec((any_command(), any_who(), any_who()), 1..120),
    ) {
        let mut s = State::default();
        let mut history = Vec::with_capacity(steps.len());
        let mut outcomes = Vec::with_capacity(steps.len());
        for (cmd, by, user) in steps {
            let cmd = resolve(&s, cmd, by, user);
            let before = s.clone();
            let out = apply(&mut s, cmd.clone());
            match &out {
                // (1) a refused command leaves the state exactly as it was.
                Err(e) => prop_assert_eq!(&s, &before, "{:?} refused ({:?}) but changed the state", cmd, e),
                // A success that reports "nothing changed" changed nothing.
                Ok(a) if is_no_op(a) => prop_assert_eq!(&s, &before, "{:?} was a no-op but changed the state", cmd),
                Ok(_) => {}
            }
            check_invariants(&s)?;
            history.push(cmd);
            outcomes.push(out);
        }
        // (2) deterministic: the same history gives the same outcomes and the same state.
        let mut replay = State::default();
        let replayed: Vec<Outcome> = history.into_iter().map(|c| apply(&mut replay, c)).collect();
        prop_assert_eq!(replayed, outcomes);
        prop_assert_eq!(replay, s);
    }
}
