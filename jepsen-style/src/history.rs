//! The history of a run: one JSON object per line, in the order the harness saw
//! the events.
//!
//! Every client operation is an `invoke` followed by exactly one completion from
//! the same process: `ok` (it happened, with its result), `fail` (it definitely did
//! not happen, or happened with the definite error in `error`) or `info`
//! (indeterminate: a timeout or a lost connection; it may or may not have happened).
//! A process runs one operation at a time. Nemesis actions use process
//! [`NEMESIS`]; a fault's `invoke` is when the harness began to apply it and its
//! `ok` when it was in place.
//!
//! ```json
//! {"index":7,"time":1532000000,"process":3,"node":"n2","type":"invoke","f":"send","value":{"room":"r0","user":"u3","text":"r0-p3-17"}}
//! {"index":9,"time":1561000000,"process":3,"node":"n2","type":"ok","f":"send","value":{"room":"r0","user":"u3","text":"r0-p3-17","id":"0000019..."}}
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The process number of the nemesis.
pub const NEMESIS: u64 = u64::MAX;

/// What an event says about its operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Type {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One line of the history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the history, from 0, without gaps.
    pub index: u64,
    /// Nanoseconds since the run started (monotonic clock of the harness).
    pub time: u64,
    /// The client process (one logical client doing one operation at a time), or [`NEMESIS`].
    pub process: u64,
    /// The node the process talked to ("n1", "n2", ...); empty for the nemesis.
    pub node: String,
    #[serde(rename = "type")]
    pub kind: Type,
    #[serde(flatten)]
    pub op: Op,
    /// On `fail` and `info`: the gRPC code name ("UNAVAILABLE", "PERMISSION_DENIED",
    /// "DEADLINE_EXCEEDED", ...) or "TRANSPORT" when no status arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A message as a read or a delivery returned it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Msg {
    /// The `MessageId` (32 hex digits, sorts in timeline order).
    pub id: String,
    pub sender: String,
    /// Unique per send in a run: `<room>-p<process>-<n>`.
    pub text: String,
}

/// A room's membership as a strong read returned it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// user -> "admin" | "member"
    pub members: BTreeMap<String, String>,
    pub banned: BTreeSet<String>,
}

/// The operation of an event (`f`) and its value. Fields filled only on
/// completion are `Option`s, `None` on the invoke.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "f", content = "value", rename_all = "snake_case")]
pub enum Op {
    /// `SendMessage` by `user`; `id` on ok.
    Send {
        room: String,
        user: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// A local-consistency `History` read of the whole room during the run.
    Read {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        messages: Option<Vec<Msg>>,
    },
    /// The read of the whole room from one node (`Event::node`) after the final heal.
    FinalRead {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        messages: Option<Vec<Msg>>,
    },
    /// A subscriber (re)connects to a room, resuming after `cursor` (None = from
    /// the start of the room).
    Subscribe {
        room: String,
        subscriber: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cursor: Option<String>,
    },
    /// A subscriber received a message event (always type `ok`, no invoke).
    Deliver {
        room: String,
        subscriber: String,
        msg: Msg,
    },
    /// Membership and roles. `user` is the target; join/leave are made by the
    /// target itself, the others by the room's admin.
    Join {
        room: String,
        user: String,
    },
    Leave {
        room: String,
        user: String,
    },
    Kick {
        room: String,
        user: String,
    },
    Ban {
        room: String,
        user: String,
    },
    Unban {
        room: String,
        user: String,
    },
    SetRole {
        room: String,
        user: String,
        role: String,
    },
    /// A strong (linearizable) `ListMembers`.
    Members {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<Members>,
    },
    /// `MarkRead(room, id)` by `user`; `marker` is the marker the node returned.
    MarkRead {
        room: String,
        user: String,
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        marker: Option<String>,
    },
    /// `SetPresence(online)` by `user` through `Event::node` (also the heartbeat).
    SetPresence {
        user: String,
    },
    /// `GetPresence(room)`: user -> "online" | "away" | "busy" | "offline".
    GetPresence {
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        users: Option<BTreeMap<String, String>>,
    },
    /// A fault starts (`start = true`) or ends. `fault` is one of "partition",
    /// "kill", "pause", "netem", "clock", "heal"...; `targets` are node names,
    /// `detail` says e.g. which grouping or which delay.
    Nemesis {
        fault: String,
        start: bool,
        #[serde(default)]
        targets: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// After the final heal: how long until every partition had a leader
    /// (`what = "leaders"`) or every node returned the same final timelines
    /// (`what = "converged"`), against the bound the checker enforces.
    Liveness {
        what: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        elapsed_ms: Option<u64>,
        bound_ms: u64,
    },
}

impl Op {
    /// The operation's name as written in `f`.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Send { .. } => "send",
            Op::Read { .. } => "read",
            Op::FinalRead { .. } => "final_read",
            Op::Subscribe { .. } => "subscribe",
            Op::Deliver { .. } => "deliver",
            Op::Join { .. } => "join",
            Op::Leave { .. } => "leave",
            Op::Kick { .. } => "kick",
            Op::Ban { .. } => "ban",
            Op::Unban { .. } => "unban",
            Op::SetRole { .. } => "set_role",
            Op::Members { .. } => "members",
            Op::MarkRead { .. } => "mark_read",
            Op::SetPresence { .. } => "set_presence",
            Op::GetPresence { .. } => "get_presence",
            Op::Nemesis { .. } => "nemesis",
            Op::Liveness { .. } => "liveness",
        }
    }
}

/// Writes events as JSON lines, numbering them.
pub struct Writer<W: Write> {
    out: W,
    next: u64,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer { out, next: 0 }
    }

    /// Appends `event` with the next index and returns that index.
    pub fn append(&mut self, mut event: Event) -> std::io::Result<u64> {
        event.index = self.next;
        let line = serde_json::to_string(&event).map_err(std::io::Error::other)?;
        writeln!(self.out, "{line}")?;
        self.next += 1;
        Ok(event.index)
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Reads a history file; a malformed line is an error naming its line number.
pub fn read(path: &Path) -> anyhow::Result<Vec<Event>> {
    let file = std::fs::File::open(path)
        .map_err(|e| anyhow::anyhow!("cannot open history {}: {e}", path.display()))?;
    parse(std::io::BufReader::new(file))
}

/// Parses JSON lines; blank lines are skipped.
pub fn parse(input: impl BufRead) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::new();
    for (n, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Event = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("history line {}: {e}", n + 1))?;
        events.push(event);
    }
    Ok(events)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_json_lines() {
        let mut buf = Vec::new();
        let mut w = Writer::new(&mut buf);
        let send = Event {
            index: 0,
            time: 5,
            process: 3,
            node: "n2".into(),
            kind: Type::Ok,
            op: Op::Send {
                room: "r0".into(),
                user: "u3".into(),
                text: "r0-p3-1".into(),
                id: Some("00".repeat(16)),
            },
            error: None,
        };
        let nem = Event {
            index: 0,
            time: 9,
            process: NEMESIS,
            node: String::new(),
            kind: Type::Invoke,
            op: Op::Nemesis {
                fault: "kill".into(),
                start: true,
                targets: vec!["n1".into()],
                detail: None,
            },
            error: None,
        };
        w.append(send.clone()).unwrap();
        w.append(nem.clone()).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains(r#""type":"ok","f":"send""#), "{text}");
        let back = parse(text.as_bytes()).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0], send);
        assert_eq!(back[1], Event { index: 1, ..nem });
    }

    #[test]
    fn a_bad_line_is_an_error_with_its_number() {
        let err = parse("\n{\"index\":0}\n".as_bytes()).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
