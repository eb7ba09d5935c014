//! Human and `--json` renderings of API objects. `--json` is one JSON object per
//! line; times are RFC 3339 strings (UTC) there, and local `YYYY-MM-DD HH:MM:SS` in
//! human output.

use std::io::Write;

use chrono::{DateTime, Local, SecondsFormat, TimeZone, Utc};
use parley_proto::v1::{
    event, Event, Member, MembershipChange, MembershipEvent, Message, PresenceInfo, PresenceState,
    Role, Room, RoomKind,
};
use serde_json::{json, Value};

/// Where command results go: stdout, as text or JSON lines.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub json: bool,
}

impl Out {
    /// Writes one line to stdout (errors, e.g. a closed pipe, go to the caller).
    pub fn line(&self, s: &str) -> std::io::Result<()> {
        let mut o = std::io::stdout().lock();
        writeln!(o, "{s}")?;
        o.flush()
    }

    /// Writes one JSON object as one line.
    pub fn value(&self, v: &Value) -> std::io::Result<()> {
        self.line(&v.to_string())
    }

    /// `human` in text mode, `v` in JSON mode.
    pub fn either(&self, human: &str, v: Value) -> std::io::Result<()> {
        if self.json {
            self.value(&v)
        } else {
            self.line(human)
        }
    }
}

/// Unix ms to RFC 3339 (UTC, milliseconds).
pub fn rfc3339(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Millis, true),
        None => ms.to_string(),
    }
}

/// Unix ms to local `YYYY-MM-DD HH:MM:SS`.
pub fn local(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => DateTime::<Local>::from(t)
            .format("%Y-%m-%d %H:%M:%S")
            .to_string(),
        None => ms.to_string(),
    }
}

fn opt_time(ms: i64) -> Value {
    if ms == 0 {
        Value::Null
    } else {
        Value::String(rfc3339(ms))
    }
}

pub fn role_name(role: i32) -> &'static str {
    match Role::try_from(role) {
        Ok(Role::Admin) => "admin",
        _ => "member",
    }
}

pub fn presence_name(state: i32) -> &'static str {
    match PresenceState::try_from(state) {
        Ok(PresenceState::PresenceOnline) => "online",
        Ok(PresenceState::PresenceAway) => "away",
        Ok(PresenceState::PresenceBusy) => "busy",
        _ => "offline",
    }
}

fn kind_name(kind: i32) -> &'static str {
    match RoomKind::try_from(kind) {
        Ok(RoomKind::Direct) => "direct",
        _ => "group",
    }
}

pub fn message_json(m: &Message) -> Value {
    json!({
        "id": m.id,
        "room": m.room_id,
        "sender": m.sender,
        "text": m.text,
        "sent_at": rfc3339(m.sent_at),
        "client_msg_id": m.client_msg_id,
        "edited_at": opt_time(m.edited_at),
        "deleted": m.deleted,
        "reactions": m.reactions.iter().map(|r| json!({"emoji": r.emoji, "users": r.users})).collect::<Vec<_>>(),
    })
}

/// `[2026-11-23 14:00:01] alice: hello`, with `#room ` before the sender when given.
pub fn message_human(m: &Message, room: Option<&str>) -> String {
    let mut s = format!("[{}] ", local(m.sent_at));
    if let Some(r) = room {
        s.push('#');
        s.push_str(r);
        s.push(' ');
    }
    s.push_str(&m.sender);
    s.push_str(": ");
    if m.deleted {
        s.push_str("(deleted)");
    } else {
        s.push_str(&m.text);
        if m.edited_at != 0 {
            s.push_str(" (edited)");
        }
    }
    if !m.reactions.is_empty() {
        let r: Vec<String> = m
            .reactions
            .iter()
            .map(|r| format!("{} {}", r.emoji, r.users.len()))
            .collect();
        s.push_str(&format!("  [{}]", r.join(", ")));
    }
    s
}

pub fn room_json(r: &Room) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "members": r.member_count,
        "kind": kind_name(r.kind),
        "creator": r.creator,
        "created_at": rfc3339(r.created_at),
        "write_quorum": r.write_quorum,
        "joined": r.joined,
        "mega": r.mega,
    })
}

/// One line for `room list`.
pub fn room_line(r: &Room) -> String {
    let members = if r.member_count == 1 {
        "member"
    } else {
        "members"
    };
    format!(
        "{}  {}  {} {}{}",
        r.id,
        r.name,
        r.member_count,
        members,
        if r.joined { "  (joined)" } else { "" }
    )
}

/// The block for `room show`.
pub fn room_block(r: &Room) -> String {
    let quorum = if r.write_quorum == 0 {
        "cluster default".to_owned()
    } else {
        r.write_quorum.to_string()
    };
    let yes = |b: bool| if b { "yes" } else { "no" };
    [
        format!("id:           {}", r.id),
        format!("name:         {}", r.name),
        format!("kind:         {}", kind_name(r.kind)),
        format!("creator:      {}", r.creator),
        format!("created:      {}", local(r.created_at)),
        format!("members:      {}", r.member_count),
        format!("write quorum: {quorum}"),
        format!("joined:       {}", yes(r.joined)),
        format!("mega:         {}", yes(r.mega)),
    ]
    .join("\n")
}

pub fn member_json(room: &str, m: &Member) -> Value {
    json!({
        "room": room,
        "user": m.user,
        "role": role_name(m.role),
        "joined_at": rfc3339(m.joined_at),
        "muted": m.muted,
        "banned": false,
    })
}

pub fn member_line(m: &Member) -> String {
    format!(
        "{}  {}  joined {}{}",
        m.user,
        role_name(m.role),
        local(m.joined_at),
        if m.muted { "  (muted)" } else { "" }
    )
}

pub fn presence_json(p: &PresenceInfo) -> Value {
    json!({
        "user": p.user,
        "state": presence_name(p.state),
        "last_seen": opt_time(p.last_seen),
    })
}

pub fn presence_line(p: &PresenceInfo) -> String {
    let seen = if p.last_seen == 0 {
        "never".to_owned()
    } else {
        local(p.last_seen)
    };
    format!("{}  {}  last seen {}", p.user, presence_name(p.state), seen)
}

fn membership_verb(m: &MembershipEvent) -> String {
    let by = if m.by.is_empty() || m.by == m.user {
        String::new()
    } else {
        format!(" by {}", m.by)
    };
    let what = match MembershipChange::try_from(m.change) {
        Ok(MembershipChange::MembershipJoined) => "joined".to_owned(),
        Ok(MembershipChange::MembershipLeft) => "left".to_owned(),
        Ok(MembershipChange::MembershipInvited) => "was invited".to_owned(),
        Ok(MembershipChange::MembershipKicked) => "was kicked".to_owned(),
        Ok(MembershipChange::MembershipBanned) => "was banned".to_owned(),
        Ok(MembershipChange::MembershipUnbanned) => "was unbanned".to_owned(),
        Ok(MembershipChange::MembershipRoleChanged) => format!("is now {}", role_name(m.role)),
        Ok(MembershipChange::MembershipRoomDeleted) => return format!("the room was deleted{by}"),
        _ => "changed".to_owned(),
    };
    format!("{} {what}{by}", m.user)
}

fn membership_change_name(c: i32) -> &'static str {
    match MembershipChange::try_from(c) {
        Ok(MembershipChange::MembershipJoined) => "joined",
        Ok(MembershipChange::MembershipLeft) => "left",
        Ok(MembershipChange::MembershipInvited) => "invited",
        Ok(MembershipChange::MembershipKicked) => "kicked",
        Ok(MembershipChange::MembershipBanned) => "banned",
        Ok(MembershipChange::MembershipUnbanned) => "unbanned",
        Ok(MembershipChange::MembershipRoleChanged) => "role_changed",
        Ok(MembershipChange::MembershipRoomDeleted) => "room_deleted",
        _ => "unknown",
    }
}

/// A subscription event as one JSON object (`event` names its kind), or `None` for
/// an event with no kind (sent by a newer node).
pub fn event_json(e: &Event) -> Option<Value> {
    let mut v = match e.kind.as_ref()? {
        event::Kind::Message(m) => {
            let mut v = message_json(m);
            v["event"] = json!("message");
            v
        }
        event::Kind::Edited(x) => json!({
            "event": "edited", "room": x.room_id, "message_id": x.message_id, "text": x.text,
            "edited_at": rfc3339(x.edited_at), "editor": x.editor,
        }),
        event::Kind::Deleted(x) => json!({
            "event": "deleted", "room": x.room_id, "message_id": x.message_id, "deleted_by": x.deleted_by,
        }),
        event::Kind::Reaction(x) => json!({
            "event": "reaction", "room": x.room_id, "message_id": x.message_id, "user": x.user,
            "emoji": x.emoji, "removed": x.removed,
        }),
        event::Kind::Membership(x) => json!({
            "event": "membership", "room": x.room_id, "user": x.user,
            "change": membership_change_name(x.change), "by": x.by, "role": role_name(x.role),
        }),
        event::Kind::Presence(x) => {
            let mut v = presence_json(x);
            v["event"] = json!("presence");
            v
        }
        event::Kind::Typing(x) => json!({
            "event": "typing", "room": x.room_id, "user": x.user, "typing": x.typing,
        }),
        event::Kind::Read(x) => json!({
            "event": "read", "room": x.room_id, "user": x.user, "message_id": x.message_id,
        }),
    };
    if !e.cursor.is_empty() {
        v["cursor"] = json!(e.cursor);
    }
    Some(v)
}

/// A subscription event as one human line, or `None` when it is not worth a line
/// (typing stopped, an empty event). `room_name` maps a room id to what to show
/// after `#`; `None` from it hides the room (single-room views).
pub fn event_human(e: &Event, room_name: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let prefix = |room: &str| {
        room_name(room)
            .map(|n| format!("#{n} "))
            .unwrap_or_default()
    };
    let now = local(Utc::now().timestamp_millis());
    Some(match e.kind.as_ref()? {
        event::Kind::Message(m) => message_human(m, room_name(&m.room_id).as_deref()),
        event::Kind::Edited(x) => {
            format!(
                "[{}] {}* {} edited {}: {}",
                local(x.edited_at),
                prefix(&x.room_id),
                x.editor,
                x.message_id,
                x.text
            )
        }
        event::Kind::Deleted(x) => {
            format!(
                "[{now}] {}* {} deleted {}",
                prefix(&x.room_id),
                x.deleted_by,
                x.message_id
            )
        }
        event::Kind::Reaction(x) => {
            let verb = if x.removed { "took back" } else { "reacted" };
            format!(
                "[{now}] {}* {} {verb} {} on {}",
                prefix(&x.room_id),
                x.user,
                x.emoji,
                x.message_id
            )
        }
        event::Kind::Membership(x) => {
            format!("[{now}] {}* {}", prefix(&x.room_id), membership_verb(x))
        }
        event::Kind::Presence(x) => format!("[{now}] * {} is {}", x.user, presence_name(x.state)),
        event::Kind::Typing(x) if x.typing => {
            format!("[{now}] {}* {} is typing...", prefix(&x.room_id), x.user)
        }
        event::Kind::Typing(_) => return None,
        event::Kind::Read(x) => format!(
            "[{now}] {}* {} read up to {}",
            prefix(&x.room_id),
            x.user,
            x.message_id
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Message {
        Message {
            id: "0".repeat(32),
            room_id: "rm_0123456789abcdef".into(),
            sender: "alice".into(),
            text: "hello".into(),
            sent_at: 1_795_442_401_000,
            ..Default::default()
        }
    }

    #[test]
    fn message_json_has_the_contract_fields() {
        let v = message_json(&msg());
        for k in ["id", "room", "sender", "text", "sent_at"] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["sent_at"], "2026-11-23T14:00:01.000Z");
        assert_eq!(v["room"], "rm_0123456789abcdef");
    }

    #[test]
    fn human_message_reads_like_a_chat_line() {
        let s = message_human(&msg(), None);
        assert!(s.starts_with('[') && s.ends_with("] alice: hello"), "{s}");
        let s = message_human(&msg(), Some("general"));
        assert!(s.ends_with("] #general alice: hello"), "{s}");
    }

    #[test]
    fn room_json_counts_members() {
        let r = Room {
            id: "rm_1".into(),
            name: "general".into(),
            member_count: 3,
            ..Default::default()
        };
        let v = room_json(&r);
        assert_eq!(v["members"], 3);
        assert_eq!(v["name"], "general");
    }
}
