//! Rooms: create (group and direct) and delete.

use std::collections::BTreeMap;

use super::{
    Applied, CommandError, MemberRecord, Outcome, Role, RoomKind, RoomRecord, RoomSettings, State,
    DEFAULT_MEGA_THRESHOLD,
};
use crate::ids::{validate_room_name, RoomId, UserId};

pub(super) fn create(
    state: &mut State,
    id: RoomId,
    name: String,
    creator: UserId,
    write_quorum: Option<u8>,
    at: u64,
) -> Outcome {
    validate_room_name(&name).map_err(|e| CommandError::Invalid {
        reason: e.to_string(),
    })?;
    if id.is_direct() {
        return Err(CommandError::Invalid {
            reason: "a group room needs an rm_ id".into(),
        });
    }
    if let Some(q) = write_quorum {
        if q == 0 || q > 5 {
            return Err(CommandError::Invalid {
                reason: "write quorum must be 1 to 5".into(),
            });
        }
    }
    if state.room_names.contains_key(&name) {
        return Err(CommandError::AlreadyExists {
            what: format!("room {name}"),
        });
    }
    if state.rooms.contains_key(&id) {
        return Err(CommandError::AlreadyExists {
            what: format!("room id {id}"),
        });
    }
    let room = RoomRecord {
        id: id.clone(),
        name: name.clone(),
        kind: RoomKind::Group,
        creator: creator.clone(),
        created_at: at,
        settings: RoomSettings {
            write_quorum,
            mega_threshold: DEFAULT_MEGA_THRESHOLD,
        },
    };
    state.rooms.insert(id.clone(), room.clone());
    state.room_names.insert(name, id.clone());
    let mut members = BTreeMap::new();
    members.insert(
        creator,
        MemberRecord {
            role: Role::Admin,
            joined_at: at,
            muted: false,
        },
    );
    state.members.insert(id, members);
    Ok(Applied::RoomCreated(room))
}

pub(super) fn ensure_direct(
    state: &mut State,
    id: RoomId,
    a: UserId,
    b: UserId,
    at: u64,
) -> Outcome {
    if !id.is_direct() || id != RoomId::direct(&a, &b) {
        return Err(CommandError::Invalid {
            reason: "not the direct room of these users".into(),
        });
    }
    if let Some(room) = state.rooms.get(&id) {
        return Ok(Applied::DirectReady {
            room: room.clone(),
            created: false,
        });
    }
    let (lo, hi) = if a <= b { (&a, &b) } else { (&b, &a) };
    let room = RoomRecord {
        id: id.clone(),
        name: format!("@{lo}+{hi}"),
        kind: RoomKind::Direct,
        creator: a.clone(),
        created_at: at,
        settings: RoomSettings {
            write_quorum: None,
            mega_threshold: DEFAULT_MEGA_THRESHOLD,
        },
    };
    state.rooms.insert(id.clone(), room.clone());
    let mut members = BTreeMap::new();
    for u in [a, b] {
        members.insert(
            u,
            MemberRecord {
                role: Role::Member,
                joined_at: at,
                muted: false,
            },
        );
    }
    state.members.insert(id, members);
    Ok(Applied::DirectReady {
        room,
        created: true,
    })
}

pub(super) fn delete(state: &mut State, room: RoomId, by: UserId) -> Outcome {
    let rec = state
        .rooms
        .get(&room)
        .ok_or_else(|| CommandError::NotFound {
            what: format!("room {room}"),
        })?;
    match state.member(&room, &by) {
        Some(m) if m.role == Role::Admin => {}
        Some(_) if rec.kind == RoomKind::Direct => {}
        Some(_) => {
            return Err(CommandError::NotAdmin {
                room: rec.name.clone(),
                user: by.to_string(),
            })
        }
        None => {
            return Err(CommandError::NotMember {
                room: rec.name.clone(),
                user: by.to_string(),
            })
        }
    }
    let name = rec.name.clone();
    state.rooms.remove(&room);
    if state.room_names.get(&name) == Some(&room) {
        state.room_names.remove(&name);
    }
    state.members.remove(&room);
    state.bans.remove(&room);
    Ok(Applied::RoomDeleted { room })
}
