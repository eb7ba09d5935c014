//! Membership and roles: join, leave, invite, kick, ban, unban, set role.

use super::{
    Applied, BanRecord, CommandError, MemberRecord, Outcome, Role, RoomKind, RoomRecord, State,
};
use crate::ids::{RoomId, UserId};

fn room<'a>(state: &'a State, id: &RoomId) -> Result<&'a RoomRecord, CommandError> {
    state.rooms.get(id).ok_or_else(|| CommandError::NotFound {
        what: format!("room {id}"),
    })
}

fn require_group(rec: &RoomRecord) -> Result<(), CommandError> {
    if rec.kind == RoomKind::Direct {
        return Err(CommandError::Precondition {
            reason: format!("{} is a direct room: its membership is fixed", rec.name),
        });
    }
    Ok(())
}

fn require_admin(state: &State, rec: &RoomRecord, by: &UserId) -> Result<(), CommandError> {
    match state.member(&rec.id, by) {
        Some(m) if m.role == Role::Admin => Ok(()),
        Some(_) => Err(CommandError::NotAdmin {
            room: rec.name.clone(),
            user: by.to_string(),
        }),
        None => Err(CommandError::NotMember {
            room: rec.name.clone(),
            user: by.to_string(),
        }),
    }
}

fn not_self(by: &UserId, user: &UserId, what: &str) -> Result<(), CommandError> {
    if by == user {
        return Err(CommandError::Invalid {
            reason: format!("you cannot {what} yourself"),
        });
    }
    Ok(())
}

fn admin_count(state: &State, room: &RoomId) -> usize {
    state
        .members
        .get(room)
        .map_or(0, |m| m.values().filter(|r| r.role == Role::Admin).count())
}

/// A joiner's record. A room that already holds `mega_threshold` members is a mega-group,
/// whose new members start muted. A group room left empty by its last member has no admin,
/// so whoever joins it next becomes its admin: a room with members always has one.
fn new_member(state: &State, rec: &RoomRecord, at: u64) -> MemberRecord {
    let count = state.member_count(&rec.id);
    let role = if count == 0 {
        Role::Admin
    } else {
        Role::Member
    };
    let muted = count as u64 >= u64::from(rec.settings.mega_threshold);
    MemberRecord {
        role,
        joined_at: at,
        muted,
    }
}

fn changed(room: RoomId, user: UserId, changed: bool) -> Outcome {
    Ok(Applied::Membership {
        room,
        user,
        changed,
    })
}

pub(super) fn join(state: &mut State, room_id: RoomId, user: UserId, at: u64) -> Outcome {
    let rec = room(state, &room_id)?;
    if state.member(&room_id, &user).is_some() {
        return changed(room_id, user, false);
    }
    require_group(rec)?;
    if state.is_banned(&room_id, &user) {
        return Err(CommandError::Banned {
            room: rec.name.clone(),
            user: user.to_string(),
        });
    }
    let m = new_member(state, rec, at);
    state
        .members
        .entry(room_id.clone())
        .or_default()
        .insert(user.clone(), m);
    changed(room_id, user, true)
}

pub(super) fn leave(state: &mut State, room_id: RoomId, user: UserId) -> Outcome {
    let rec = room(state, &room_id)?;
    let Some(m) = state.member(&room_id, &user) else {
        return Err(CommandError::NotMember {
            room: rec.name.clone(),
            user: user.to_string(),
        });
    };
    // A direct room's membership is fixed: `EnsureDirect` would not bring a leaver back.
    require_group(rec)?;
    if m.role == Role::Admin
        && admin_count(state, &room_id) == 1
        && state.member_count(&room_id) > 1
    {
        return Err(CommandError::Precondition {
            reason: format!(
                "{user} is the last admin of {}: make someone else admin first",
                rec.name
            ),
        });
    }
    if let Some(ms) = state.members.get_mut(&room_id) {
        ms.remove(&user);
    }
    changed(room_id, user, true)
}

pub(super) fn invite(
    state: &mut State,
    room_id: RoomId,
    by: UserId,
    user: UserId,
    at: u64,
) -> Outcome {
    let rec = room(state, &room_id)?;
    require_group(rec)?;
    if state.member(&room_id, &by).is_none() {
        return Err(CommandError::NotMember {
            room: rec.name.clone(),
            user: by.to_string(),
        });
    }
    if state.is_banned(&room_id, &user) {
        return Err(CommandError::Banned {
            room: rec.name.clone(),
            user: user.to_string(),
        });
    }
    if state.member(&room_id, &user).is_some() {
        return changed(room_id, user, false);
    }
    let m = new_member(state, rec, at);
    state
        .members
        .entry(room_id.clone())
        .or_default()
        .insert(user.clone(), m);
    changed(room_id, user, true)
}

pub(super) fn kick(state: &mut State, room_id: RoomId, by: UserId, user: UserId) -> Outcome {
    let rec = room(state, &room_id)?;
    require_group(rec)?;
    require_admin(state, rec, &by)?;
    not_self(&by, &user, "kick")?;
    if state.member(&room_id, &user).is_none() {
        return Err(CommandError::NotMember {
            room: rec.name.clone(),
            user: user.to_string(),
        });
    }
    if let Some(ms) = state.members.get_mut(&room_id) {
        ms.remove(&user);
    }
    changed(room_id, user, true)
}

pub(super) fn ban(
    state: &mut State,
    room_id: RoomId,
    by: UserId,
    user: UserId,
    at: u64,
) -> Outcome {
    let rec = room(state, &room_id)?;
    require_group(rec)?;
    require_admin(state, rec, &by)?;
    not_self(&by, &user, "ban")?;
    let was_member = state.member(&room_id, &user).is_some();
    let was_banned = state.is_banned(&room_id, &user);
    if let Some(ms) = state.members.get_mut(&room_id) {
        ms.remove(&user);
    }
    // Banning twice is a no-op: the first ban's record (who, when) stays.
    state
        .bans
        .entry(room_id.clone())
        .or_default()
        .entry(user.clone())
        .or_insert(BanRecord { by, at });
    changed(room_id, user, was_member || !was_banned)
}

pub(super) fn unban(state: &mut State, room_id: RoomId, by: UserId, user: UserId) -> Outcome {
    let rec = room(state, &room_id)?;
    require_group(rec)?;
    require_admin(state, rec, &by)?;
    if !state.is_banned(&room_id, &user) {
        return Err(CommandError::NotFound {
            what: format!("ban of {user} in {}", rec.name),
        });
    }
    if let Some(b) = state.bans.get_mut(&room_id) {
        b.remove(&user);
    }
    changed(room_id, user, true)
}

pub(super) fn set_role(
    state: &mut State,
    room_id: RoomId,
    by: UserId,
    user: UserId,
    role: Role,
) -> Outcome {
    let rec = room(state, &room_id)?;
    require_group(rec)?;
    require_admin(state, rec, &by)?;
    let Some(cur) = state.member(&room_id, &user) else {
        return Err(CommandError::NotMember {
            room: rec.name.clone(),
            user: user.to_string(),
        });
    };
    if cur.role == role {
        return changed(room_id, user, false);
    }
    if cur.role == Role::Admin && role == Role::Member && admin_count(state, &room_id) == 1 {
        return Err(CommandError::Precondition {
            reason: format!("{user} is the last admin of {}", rec.name),
        });
    }
    if let Some(m) = state
        .members
        .get_mut(&room_id)
        .and_then(|ms| ms.get_mut(&user))
    {
        m.role = role;
    }
    changed(room_id, user, true)
}
