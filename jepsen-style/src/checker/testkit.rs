//! A history builder for the checkers' tests: events get consecutive indexes and a
//! clock that advances 1 ms per event unless moved with [`H::advance_ms`].

use std::collections::{BTreeMap, BTreeSet};

use crate::history::{Event, Members, Msg, Op, Type, NEMESIS};

const MS: u64 = 1_000_000;

pub struct H {
    pub events: Vec<Event>,
    now: u64,
}

impl H {
    pub fn new() -> Self {
        H {
            events: Vec::new(),
            now: 0,
        }
    }

    pub fn advance_ms(&mut self, ms: u64) {
        self.now += ms * MS;
    }

    fn push(&mut self, process: u64, node: &str, kind: Type, op: Op, error: Option<&str>) -> u64 {
        let index = self.events.len() as u64;
        self.events.push(Event {
            index,
            time: self.now,
            process,
            node: node.to_string(),
            kind,
            op,
            error: error.map(str::to_string),
        });
        self.now += MS;
        index
    }

    pub fn invoke(&mut self, p: u64, node: &str, op: Op) -> u64 {
        self.push(p, node, Type::Invoke, op, None)
    }
    pub fn ok(&mut self, p: u64, node: &str, op: Op) -> u64 {
        self.push(p, node, Type::Ok, op, None)
    }
    pub fn fail(&mut self, p: u64, node: &str, op: Op, code: &str) -> u64 {
        self.push(p, node, Type::Fail, op, Some(code))
    }
    pub fn info(&mut self, p: u64, node: &str, op: Op, code: &str) -> u64 {
        self.push(p, node, Type::Info, op, Some(code))
    }

    /// Invoke then ok at once; returns the ok's index.
    pub fn call(&mut self, p: u64, node: &str, inv: Op, done: Op) -> u64 {
        self.invoke(p, node, inv);
        self.ok(p, node, done)
    }

    /// A send acked with `id`; returns the ok's index.
    pub fn sent(
        &mut self,
        p: u64,
        node: &str,
        room: &str,
        user: &str,
        text: &str,
        id: &str,
    ) -> u64 {
        self.call(
            p,
            node,
            H::send(room, user, text, None),
            H::send(room, user, text, Some(id)),
        )
    }

    pub fn read_ok(&mut self, p: u64, node: &str, room: &str, msgs: Vec<Msg>) -> u64 {
        self.call(p, node, H::read(room, None), H::read(room, Some(msgs)))
    }

    pub fn final_read(&mut self, p: u64, node: &str, room: &str, msgs: Vec<Msg>) -> u64 {
        self.call(
            p,
            node,
            Op::FinalRead {
                room: room.into(),
                messages: None,
            },
            Op::FinalRead {
                room: room.into(),
                messages: Some(msgs),
            },
        )
    }

    pub fn nemesis(&mut self, fault: &str, start: bool, targets: &[&str]) -> u64 {
        let op = Op::Nemesis {
            fault: fault.into(),
            start,
            targets: targets.iter().map(|t| t.to_string()).collect(),
            detail: None,
        };
        self.invoke(NEMESIS, "", op.clone());
        self.ok(NEMESIS, "", op)
    }

    pub fn deliver(&mut self, p: u64, room: &str, sub: &str, msg: Msg) -> u64 {
        self.ok(
            p,
            "n1",
            Op::Deliver {
                room: room.into(),
                subscriber: sub.into(),
                msg,
            },
        )
    }

    pub fn msg(id: &str, sender: &str, text: &str) -> Msg {
        Msg {
            id: id.into(),
            sender: sender.into(),
            text: text.into(),
        }
    }

    pub fn send(room: &str, user: &str, text: &str, id: Option<&str>) -> Op {
        Op::Send {
            room: room.into(),
            user: user.into(),
            text: text.into(),
            id: id.map(str::to_string),
        }
    }
    pub fn read(room: &str, msgs: Option<Vec<Msg>>) -> Op {
        Op::Read {
            room: room.into(),
            messages: msgs,
        }
    }
    pub fn join(room: &str, user: &str) -> Op {
        Op::Join {
            room: room.into(),
            user: user.into(),
        }
    }
    pub fn leave(room: &str, user: &str) -> Op {
        Op::Leave {
            room: room.into(),
            user: user.into(),
        }
    }
    pub fn kick(room: &str, user: &str) -> Op {
        Op::Kick {
            room: room.into(),
            user: user.into(),
        }
    }
    pub fn ban(room: &str, user: &str) -> Op {
        Op::Ban {
            room: room.into(),
            user: user.into(),
        }
    }
    pub fn unban(room: &str, user: &str) -> Op {
        Op::Unban {
            room: room.into(),
            user: user.into(),
        }
    }
    pub fn members(room: &str, state: Option<Members>) -> Op {
        Op::Members {
            room: room.into(),
            state,
        }
    }
    /// A `Members` value: `members` as (user, role), `banned` users.
    pub fn state(members: &[(&str, &str)], banned: &[&str]) -> Members {
        Members {
            members: members
                .iter()
                .map(|(u, r)| (u.to_string(), r.to_string()))
                .collect::<BTreeMap<_, _>>(),
            banned: banned
                .iter()
                .map(|u| u.to_string())
                .collect::<BTreeSet<_>>(),
        }
    }
}
