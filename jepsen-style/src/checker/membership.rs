//! `membership`: the membership operations of each room (join, leave, kick, ban,
//! unban, set_role, and strong `members` reads) must be linearizable against
//! [`RoomModel`], found with the [`super::wgl`] search.
//!
//! The model follows the node's state machine (`node/src/consensus/state/membership.rs`)
//! and its error mapping (`node/src/api/error.rs`):
//!
//! | op | refusal → gRPC code |
//! |---|---|
//! | join | banned → `PERMISSION_DENIED`; already a member → ok, no change; into an empty room → becomes admin |
//! | leave | not a member → `PERMISSION_DENIED`; last admin of a room with others → `FAILED_PRECONDITION` |
//! | kick | by a non-admin → `PERMISSION_DENIED`; oneself → `INVALID_ARGUMENT`; target not a member → `PERMISSION_DENIED` |
//! | ban | by a non-admin → `PERMISSION_DENIED`; oneself → `INVALID_ARGUMENT`; otherwise ok: removes membership, bans (twice = no-op) |
//! | unban | by a non-admin → `PERMISSION_DENIED`; not banned → `NOT_FOUND` |
//! | set_role | unknown role → `INVALID_ARGUMENT`; by a non-admin → `PERMISSION_DENIED`; target not a member → `PERMISSION_DENIED`; same role → ok, no change; demoting the last admin → `FAILED_PRECONDITION` |
//!
//! join/leave are made by the target user; kick/ban/unban/set_role by the room's
//! admin (its creator, whom the workload never targets).
//!
//! Initial state: the admin is the user with role "admin" in the first ok `members`
//! read that has one (if that read lists several admins, the one that is admin in
//! every ok read, else the first). If the room's first ok `members` read completed
//! before any change of the room was invoked, the room starts in exactly that state;
//! otherwise it starts with the admin as its only member and nothing banned. With no
//! read at all the room starts empty and the admin is unknown (moderation is then
//! assumed to come from an admin).
//!
//! Outcomes: `ok` → the model must return `Ok` (or, for `members`, the same
//! [`Members`]); a definite refusal → the model must refuse with that code; a refusal
//! with a code the model never gives for that op (e.g. `NOT_FOUND` for an unknown
//! room or user, checked before the state machine) is left out and counted;
//! `UNAVAILABLE` → left out; indeterminate → may take effect any time after its
//! invoke, or never. A failed or indeterminate `members` read constrains nothing and is
//! left out.
//!
//! A room whose search exceeds `Config::membership_search_budget` is reported
//! "undecided", which is invalid: nothing passes unchecked.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::wgl::{self, Answer, Entry, Model};
use super::{calls, Anomaly, Call, Config, Outcome, Verdict};
use crate::history::{Event, Members, Op};

const NAME: &str = "membership";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Member,
    Admin,
}

impl Role {
    /// "admin" / "member" (any case, with or without a `ROLE_` prefix).
    pub fn parse(s: &str) -> Option<Role> {
        let s = s.to_ascii_lowercase();
        match s.strip_prefix("role_").unwrap_or(&s) {
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }
}

/// A membership operation; `user` is the target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MOp {
    Join(String),
    Leave(String),
    Kick(String),
    Ban(String),
    Unban(String),
    /// The role as the history wrote it.
    SetRole(String, String),
    Read,
}

/// What a membership operation returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MRet {
    Ok,
    Err(&'static str),
    Members(Members),
}

const PERMISSION_DENIED: &str = "PERMISSION_DENIED";
const FAILED_PRECONDITION: &str = "FAILED_PRECONDITION";
const NOT_FOUND: &str = "NOT_FOUND";
const INVALID_ARGUMENT: &str = "INVALID_ARGUMENT";

impl MOp {
    /// The refusal codes the model can give for this op.
    pub fn codes(&self) -> &'static [&'static str] {
        match self {
            MOp::Join(_) => &[PERMISSION_DENIED],
            MOp::Leave(_) => &[PERMISSION_DENIED, FAILED_PRECONDITION],
            MOp::Kick(_) | MOp::Ban(_) => &[PERMISSION_DENIED, INVALID_ARGUMENT],
            MOp::Unban(_) => &[PERMISSION_DENIED, NOT_FOUND],
            MOp::SetRole(..) => &[PERMISSION_DENIED, INVALID_ARGUMENT, FAILED_PRECONDITION],
            MOp::Read => &[],
        }
    }
}

/// One room's membership as the node's state machine keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomModel {
    /// Who moderates; `None` = unknown (moderation assumed to come from an admin).
    pub admin: Option<String>,
    pub members: BTreeMap<String, Role>,
    pub banned: BTreeSet<String>,
}

impl RoomModel {
    /// A room whose only member is `admin`, or an empty room if `None`.
    pub fn new(admin: Option<String>) -> Self {
        let members = admin.iter().map(|a| (a.clone(), Role::Admin)).collect();
        RoomModel {
            admin,
            members,
            banned: BTreeSet::new(),
        }
    }

    fn admins(&self) -> usize {
        self.members.values().filter(|r| **r == Role::Admin).count()
    }

    /// `require_admin` for the moderator.
    fn moderator_ok(&self) -> Result<(), &'static str> {
        match &self.admin {
            None => Ok(()),
            Some(a) => match self.members.get(a) {
                Some(Role::Admin) => Ok(()),
                _ => Err(PERMISSION_DENIED),
            },
        }
    }

    fn is_moderator(&self, user: &str) -> bool {
        self.admin.as_deref() == Some(user)
    }

    pub fn to_members(&self) -> Members {
        Members {
            members: self
                .members
                .iter()
                .map(|(u, r)| (u.clone(), r.name().to_string()))
                .collect(),
            banned: self.banned.clone(),
        }
    }

    fn apply(&mut self, op: &MOp) -> Result<MRet, &'static str> {
        match op {
            MOp::Join(u) => {
                if self.members.contains_key(u) {
                    return Ok(MRet::Ok);
                }
                if self.banned.contains(u) {
                    return Err(PERMISSION_DENIED);
                }
                let role = if self.members.is_empty() {
                    Role::Admin
                } else {
                    Role::Member
                };
                self.members.insert(u.clone(), role);
            }
            MOp::Leave(u) => {
                let role = *self.members.get(u).ok_or(PERMISSION_DENIED)?;
                if role == Role::Admin && self.admins() == 1 && self.members.len() > 1 {
                    return Err(FAILED_PRECONDITION);
                }
                self.members.remove(u);
            }
            MOp::Kick(u) => {
                self.moderator_ok()?;
                if self.is_moderator(u) {
                    return Err(INVALID_ARGUMENT);
                }
                self.members.remove(u).ok_or(PERMISSION_DENIED)?;
            }
            MOp::Ban(u) => {
                self.moderator_ok()?;
                if self.is_moderator(u) {
                    return Err(INVALID_ARGUMENT);
                }
                self.members.remove(u);
                self.banned.insert(u.clone());
            }
            MOp::Unban(u) => {
                self.moderator_ok()?;
                if !self.banned.remove(u) {
                    return Err(NOT_FOUND);
                }
            }
            MOp::SetRole(u, role) => {
                let role = Role::parse(role).ok_or(INVALID_ARGUMENT)?;
                self.moderator_ok()?;
                let cur = *self.members.get(u).ok_or(PERMISSION_DENIED)?;
                if cur == role {
                    return Ok(MRet::Ok);
                }
                if cur == Role::Admin && self.admins() == 1 {
                    return Err(FAILED_PRECONDITION);
                }
                self.members.insert(u.clone(), role);
            }
            MOp::Read => return Ok(MRet::Members(self.to_members())),
        }
        Ok(MRet::Ok)
    }
}

impl Model for RoomModel {
    type Op = MOp;
    type Ret = MRet;
    fn step(&self, op: &MOp) -> (Self, MRet) {
        let mut next = self.clone();
        match next.apply(op) {
            Ok(r) => (next, r),
            // A refused command leaves the state exactly as it was.
            Err(code) => (self.clone(), MRet::Err(code)),
        }
    }
    fn read_only(op: &MOp, ret: &MRet) -> bool {
        *op == MOp::Read || matches!(ret, MRet::Err(_))
    }
}

/// The room and model op of a membership event.
fn membership_op(op: &Op) -> Option<(&str, MOp)> {
    Some(match op {
        Op::Join { room, user } => (room, MOp::Join(user.clone())),
        Op::Leave { room, user } => (room, MOp::Leave(user.clone())),
        Op::Kick { room, user } => (room, MOp::Kick(user.clone())),
        Op::Ban { room, user } => (room, MOp::Ban(user.clone())),
        Op::Unban { room, user } => (room, MOp::Unban(user.clone())),
        Op::SetRole { room, user, role } => (room, MOp::SetRole(user.clone(), role.clone())),
        Op::Members { room, .. } => (room, MOp::Read),
        _ => return None,
    })
}

/// The admin named by the room's ok `members` reads (see the module doc).
fn initial_admin(reads: &[&Members]) -> Option<String> {
    let admins = |m: &Members| -> BTreeSet<String> {
        m.members
            .iter()
            .filter(|(_, r)| Role::parse(r) == Some(Role::Admin))
            .map(|(u, _)| u.clone())
            .collect()
    };
    let first = reads.iter().map(|m| admins(m)).find(|a| !a.is_empty())?;
    let always = reads
        .iter()
        .map(|m| admins(m))
        .fold(first.clone(), |acc, a| {
            acc.intersection(&a).cloned().collect()
        });
    always
        .into_iter()
        .next()
        .or_else(|| first.into_iter().next())
}

/// The room's starting state: a strong read that completed before any change of the
/// room was invoked *is* the starting state (the harness takes one right after its
/// set-up); without one, the admin alone.
fn initial_state(r: &RoomOps<'_>, admin: Option<String>) -> RoomModel {
    let first_read = r
        .entries
        .iter()
        .filter(|e| e.op == MOp::Read)
        .filter_map(|e| match &e.ret {
            Some(MRet::Members(m)) => Some((e.complete, m)),
            _ => None,
        })
        .min_by_key(|(done, _)| *done);
    let first_change = r
        .entries
        .iter()
        .filter(|e| e.op != MOp::Read)
        .map(|e| e.invoke)
        .min()
        .unwrap_or(u64::MAX);
    match first_read {
        Some((done, m)) if done < first_change => {
            let members: BTreeMap<String, Role> = m
                .members
                .iter()
                .filter_map(|(u, role)| Role::parse(role).map(|r| (u.clone(), r)))
                .collect();
            if members.len() != m.members.len() {
                return RoomModel::new(admin);
            }
            RoomModel {
                admin,
                members,
                banned: m.banned.clone(),
            }
        }
        _ => RoomModel::new(admin),
    }
}

/// The WGL entries of one room, and the calls they came from.
struct RoomOps<'a> {
    entries: Vec<Entry<RoomModel>>,
    calls: Vec<Call<'a>>,
    reads: Vec<&'a Members>,
    left_out: usize,
    foreign_refusals: usize,
}

pub fn check(history: &[Event], cfg: &Config) -> Verdict {
    let cs = calls(history);
    let mut rooms: BTreeMap<&str, RoomOps<'_>> = BTreeMap::new();
    for c in &cs {
        let Some((room, mop)) = membership_op(&c.inv.op) else {
            continue;
        };
        let r = rooms.entry(room).or_insert_with(|| RoomOps {
            entries: Vec::new(),
            calls: Vec::new(),
            reads: Vec::new(),
            left_out: 0,
            foreign_refusals: 0,
        });
        let ret = match c.outcome() {
            Outcome::Ok => match c.op() {
                Op::Members { state: Some(m), .. } => {
                    r.reads.push(m);
                    Some(MRet::Members(m.clone()))
                }
                Op::Members { state: None, .. } => {
                    r.left_out += 1;
                    continue;
                }
                _ => Some(MRet::Ok),
            },
            Outcome::Refused(code) => match mop.codes().iter().find(|k| **k == code) {
                Some(k) => Some(MRet::Err(k)),
                None => {
                    r.foreign_refusals += 1;
                    continue;
                }
            },
            Outcome::NotHappened => {
                r.left_out += 1;
                continue;
            }
            Outcome::Unknown if mop == MOp::Read => {
                r.left_out += 1;
                continue;
            }
            Outcome::Unknown => None,
        };
        r.entries.push(Entry {
            op: mop,
            ret,
            invoke: c.inv_index(),
            complete: c.done_index(),
        });
        r.calls.push(*c);
    }

    let mut anomalies = Vec::new();
    let mut per_room = serde_json::Map::new();
    let (mut ops, mut undecided, mut nonlin, mut steps) = (0usize, 0usize, 0usize, 0u64);
    for (room, r) in &rooms {
        let init = initial_state(r, initial_admin(&r.reads));
        let found = wgl::search(&init, &r.entries, cfg.membership_search_budget);
        ops += r.entries.len();
        steps += found.steps;
        let describe = |stuck: &wgl::Stuck| -> (String, Vec<u64>) {
            let events = stuck
                .blocking
                .into_iter()
                .chain(stuck.candidates.iter().copied())
                .flat_map(|i| r.calls[i].events())
                .collect();
            let blocking = stuck.blocking.map_or("-".to_string(), |i| {
                let e = &r.entries[i];
                format!("{:?} returning {:?}", e.op, e.ret)
            });
            (
                format!(
                    "{room}: after {} of {} completed ops, no order fits {blocking}; model state {}",
                    stuck.linearized,
                    r.entries.iter().filter(|e| e.ret.is_some()).count(),
                    stuck.state
                ),
                events,
            )
        };
        let answer = match &found.answer {
            Answer::Linearizable(_) => "linearizable",
            Answer::NotLinearizable(stuck) => {
                nonlin += 1;
                let (detail, events) = describe(stuck);
                anomalies.push(Anomaly::new("nonlinearizable", detail, events));
                "not linearizable"
            }
            Answer::Undecided(stuck) => {
                undecided += 1;
                let (detail, events) = describe(stuck);
                anomalies.push(Anomaly::new(
                    "undecided",
                    format!(
                        "unknown — search budget exceeded ({} steps); deepest point: {detail}",
                        found.steps
                    ),
                    events,
                ));
                "undecided"
            }
        };
        per_room.insert(
            room.to_string(),
            json!({
                "ops": r.entries.len(),
                "indeterminate": r.entries.iter().filter(|e| e.ret.is_none()).count(),
                "left_out": r.left_out,
                "refusals_outside_model": r.foreign_refusals,
                "admin": init.admin,
                "answer": answer,
                "steps": found.steps,
                "configurations": found.configurations,
            }),
        );
    }
    let summary = format!(
        "{} rooms, {ops} ops; not linearizable {nonlin}, undecided {undecided}; {steps} search steps",
        rooms.len()
    );
    let stats = json!({
        "rooms": rooms.len(),
        "ops": ops,
        "not_linearizable": nonlin,
        "undecided": undecided,
        "steps": steps,
        "per_room": per_room,
    });
    super::verdict(NAME, summary, anomalies, stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::testkit::H;
    use super::super::wgl::tests::{both_verdicts, random_history, Ev};
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use stateright::semantics::SequentialSpec;

    fn run(h: &H) -> Verdict {
        check(&h.events, &Config::default())
    }

    fn read(h: &mut H, p: u64, members: &[(&str, &str)], banned: &[&str]) -> u64 {
        h.call(
            p,
            "n1",
            H::members("r", None),
            H::members("r", Some(H::state(members, banned))),
        )
    }

    #[test]
    fn a_sequential_history_with_refusals_passes() {
        let mut h = H::new();
        read(&mut h, 9, &[("adm", "admin")], &[]);
        h.call(1, "n1", H::join("r", "u1"), H::join("r", "u1"));
        h.call(1, "n1", H::join("r", "u1"), H::join("r", "u1")); // no-op
        h.call(9, "n2", H::ban("r", "u1"), H::ban("r", "u1"));
        h.invoke(1, "n1", H::join("r", "u1"));
        h.fail(1, "n1", H::join("r", "u1"), "PERMISSION_DENIED");
        h.invoke(9, "n1", H::unban("r", "u2"));
        h.fail(9, "n1", H::unban("r", "u2"), "NOT_FOUND");
        h.invoke(9, "n1", H::kick("r", "u2"));
        h.fail(9, "n1", H::kick("r", "u2"), "PERMISSION_DENIED");
        h.invoke(2, "n3", H::join("r", "u2"));
        h.fail(2, "n3", H::join("r", "u2"), "UNAVAILABLE");
        let role = Op::SetRole {
            room: "r".into(),
            user: "u3".into(),
            role: "admin".into(),
        };
        h.call(3, "n1", H::join("r", "u3"), H::join("r", "u3"));
        h.call(9, "n1", role.clone(), role);
        read(&mut h, 9, &[("adm", "admin"), ("u3", "admin")], &["u1"]);
        let v = run(&h);
        assert!(v.valid, "{v:?}");
        assert_eq!(v.stats["per_room"]["r"]["admin"], "adm");
    }

    #[test]
    fn concurrent_and_indeterminate_ops_pass() {
        let mut h = H::new();
        read(&mut h, 9, &[("adm", "admin")], &[]);
        h.invoke(1, "n1", H::join("r", "u1"));
        h.invoke(9, "n2", H::ban("r", "u1"));
        h.invoke(2, "n3", H::join("r", "u2"));
        // The ban went first, then the join was refused.
        h.fail(1, "n1", H::join("r", "u1"), "PERMISSION_DENIED");
        h.ok(9, "n2", H::ban("r", "u1"));
        h.info(2, "n3", H::join("r", "u2"), "DEADLINE_EXCEEDED");
        read(&mut h, 9, &[("adm", "admin")], &["u1"]);
        // The indeterminate join took effect late.
        read(&mut h, 9, &[("adm", "admin"), ("u2", "member")], &["u1"]);
        let v = run(&h);
        assert!(v.valid, "{v:?}");
    }

    #[test]
    fn catches_a_strong_read_missing_a_completed_ban() {
        let mut h = H::new();
        read(&mut h, 9, &[("adm", "admin")], &[]);
        h.call(1, "n1", H::join("r", "u1"), H::join("r", "u1"));
        let ban = h.call(9, "n2", H::ban("r", "u1"), H::ban("r", "u1"));
        let bad = read(&mut h, 9, &[("adm", "admin"), ("u1", "member")], &[]);
        let v = run(&h);
        assert!(!v.valid);
        assert_eq!(v.anomalies[0].kind, "nonlinearizable");
        assert!(v.anomalies[0].events.contains(&bad), "{v:?}");
        let _ = ban;
    }

    #[test]
    fn catches_a_join_succeeding_while_banned() {
        let mut h = H::new();
        read(&mut h, 9, &[("adm", "admin")], &[]);
        h.call(9, "n2", H::ban("r", "u1"), H::ban("r", "u1"));
        h.call(1, "n1", H::join("r", "u1"), H::join("r", "u1"));
        let v = run(&h);
        assert!(!v.valid);
        assert_eq!(v.anomalies[0].kind, "nonlinearizable");
    }

    #[test]
    fn a_first_read_before_any_change_is_the_starting_state() {
        // The room starts with u1 a member and u2 banned: kicking u1 is fine and
        // u2's join is refused.
        let mut h = H::new();
        read(&mut h, 9, &[("adm", "admin"), ("u1", "member")], &["u2"]);
        h.call(9, "n2", H::kick("r", "u1"), H::kick("r", "u1"));
        h.invoke(2, "n1", H::join("r", "u2"));
        h.fail(2, "n1", H::join("r", "u2"), "PERMISSION_DENIED");
        let v = run(&h);
        assert!(v.valid, "{v:?}");
        // Without that starting state the same kick could not have succeeded.
        let mut h = H::new();
        read(&mut h, 9, &[("adm", "admin")], &[]);
        h.call(9, "n2", H::kick("r", "u1"), H::kick("r", "u1"));
        assert!(!run(&h).valid);
    }

    #[test]
    fn refusals_outside_the_model_are_left_out() {
        let mut h = H::new();
        h.invoke(1, "n1", H::join("r", "u1"));
        h.fail(1, "n1", H::join("r", "u1"), "NOT_FOUND");
        let v = run(&h);
        assert!(v.valid, "{v:?}");
        assert_eq!(v.stats["per_room"]["r"]["refusals_outside_model"], 1);
    }

    #[test]
    fn a_budget_too_small_is_undecided_and_invalid() {
        let mut h = H::new();
        read(&mut h, 9, &[("adm", "admin")], &[]);
        for p in 1..=6 {
            h.invoke(p, "n1", H::join("r", &format!("u{p}")));
        }
        for p in 1..=6 {
            h.ok(p, "n1", H::join("r", &format!("u{p}")));
        }
        read(&mut h, 9, &[("adm", "admin")], &[]);
        let cfg = Config {
            membership_search_budget: 3,
            ..Config::default()
        };
        let v = check(&h.events, &cfg);
        assert!(!v.valid);
        assert_eq!(v.anomalies[0].kind, "undecided");
    }

    #[test]
    fn picks_the_admin_present_in_every_read() {
        let a = H::state(&[("a", "admin"), ("b", "admin")], &[]);
        let b = H::state(&[("b", "admin")], &[]);
        assert_eq!(initial_admin(&[&a, &b]), Some("b".into()));
        assert_eq!(initial_admin(&[]), None);
    }

    /// A generated history: 8 processes, ~2,000 ops on 6 users (joins, leaves, bans,
    /// unbans, strong reads), each taking effect at its completion; `info_p` of them end
    /// indeterminate, half of those having taken effect. Returns it and the final state.
    fn long_history(seed: u64, info_p: f64) -> (H, RoomModel) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut h = H::new();
        let mut real = RoomModel::new(Some("adm".into()));
        read(&mut h, 0, &[("adm", "admin")], &[]);
        let mut open: Vec<Option<(Op, MOp)>> = vec![None; 8];
        let mut n = 0;
        for _ in 0..20_000 {
            let p = rng.gen_range(0..8usize);
            let pid = p as u64 + 1;
            match open[p].take() {
                None if n >= 2_000 => {}
                None => {
                    let u = format!("u{}", rng.gen_range(0..6));
                    let (op, mop) = match rng.gen_range(0..5) {
                        0 => (H::join("r", &u), MOp::Join(u)),
                        1 => (H::leave("r", &u), MOp::Leave(u)),
                        2 => (H::ban("r", &u), MOp::Ban(u)),
                        3 => (H::unban("r", &u), MOp::Unban(u)),
                        _ => (H::members("r", None), MOp::Read),
                    };
                    h.invoke(pid, "n1", op.clone());
                    open[p] = Some((op, mop));
                    n += 1;
                }
                Some((op, mop)) if rng.gen_bool(info_p) => {
                    if rng.gen_bool(0.5) {
                        real = real.step(&mop).0;
                    }
                    h.info(pid, "n1", op, "DEADLINE_EXCEEDED");
                }
                Some((op, mop)) => match real.step(&mop) {
                    (next, MRet::Members(m)) => {
                        real = next;
                        h.ok(pid, "n1", H::members("r", Some(m)));
                    }
                    (next, MRet::Ok) => {
                        real = next;
                        h.ok(pid, "n1", op);
                    }
                    (_, MRet::Err(code)) => {
                        h.fail(pid, "n1", op, code);
                    }
                },
            }
        }
        (h, real)
    }

    #[test]
    fn long_concurrent_histories_are_decided_quickly() {
        for seed in [7, 8, 9] {
            let (h, _) = long_history(seed, 0.03);
            let v = run(&h);
            assert!(
                v.valid,
                "{}",
                super::super::render_text(std::slice::from_ref(&v))
            );
            assert!(v.stats["steps"].as_u64().unwrap() < 200_000, "{}", v.stats);
        }
    }

    #[test]
    fn a_wrong_final_read_in_a_long_history_is_caught() {
        let (mut h, real) = long_history(7, 0.03);
        // A member no operation ever added: nothing indeterminate can explain it.
        let mut wrong = real.to_members();
        wrong.members.insert("ghost".into(), "member".into());
        h.call(0, "n1", H::members("r", None), H::members("r", Some(wrong)));
        // Refuting needs the whole space behind the bad read; with ~60 indeterminate ops
        // that may exceed a small budget, which must still be invalid.
        let cfg = Config {
            membership_search_budget: 20_000,
            ..Config::default()
        };
        let v = check(&h.events, &cfg);
        assert!(!v.valid);
        assert!(
            ["nonlinearizable", "undecided"].contains(&v.anomalies[0].kind.as_str()),
            "{}",
            v.stats
        );
        // Without indeterminate ops it is refuted outright.
        let (mut h, real) = long_history(7, 0.0);
        let mut wrong = real.to_members();
        wrong.members.insert("ghost".into(), "member".into());
        h.call(0, "n1", H::members("r", None), H::members("r", Some(wrong)));
        let v = run(&h);
        assert_eq!(v.anomalies[0].kind, "nonlinearizable", "{}", v.stats);
    }

    /// The model as a stateright `SequentialSpec`, for the cross-check.
    #[derive(Clone)]
    struct Spec(RoomModel);
    impl SequentialSpec for Spec {
        type Op = MOp;
        type Ret = MRet;
        fn invoke(&mut self, op: &MOp) -> MRet {
            let (next, ret) = self.0.step(op);
            self.0 = next;
            ret
        }
    }

    #[test]
    fn agrees_with_stateright_on_random_membership_histories() {
        let mut rng = StdRng::seed_from_u64(0xba11);
        let users = ["u1", "u2"];
        let (mut yes, mut no) = (0, 0);
        for _ in 0..3000 {
            let procs = rng.gen_range(1..=3);
            let n = rng.gen_range(1..=8);
            let init = RoomModel::new(Some("adm".into()));
            let mut real = init.clone();
            let evs: Vec<Ev<MOp, MRet>> = random_history(
                &mut rng,
                &mut real,
                procs,
                n,
                &mut |r: &mut StdRng| {
                    let u = users[r.gen_range(0..users.len())].to_string();
                    match r.gen_range(0..7) {
                        0 => MOp::Join(u),
                        1 => MOp::Leave(u),
                        2 => MOp::Kick(u),
                        3 => MOp::Ban(u),
                        4 => MOp::Unban(u),
                        5 => MOp::SetRole(u, "admin".into()),
                        _ => MOp::Read,
                    }
                },
                &|s: &mut RoomModel, op: &MOp| {
                    let (next, ret) = s.step(op);
                    *s = next;
                    ret
                },
                &mut |r: &mut StdRng, ret: &MRet| match ret {
                    MRet::Ok => MRet::Err(PERMISSION_DENIED),
                    MRet::Err(_) => MRet::Ok,
                    MRet::Members(m) => {
                        let mut m = m.clone();
                        let u = users[r.gen_range(0..users.len())].to_string();
                        if !m.banned.remove(&u) {
                            m.banned.insert(u);
                        }
                        MRet::Members(m)
                    }
                },
            );
            let (ours, theirs) = both_verdicts(&init, Spec(init.clone()), &evs);
            assert_eq!(ours, theirs);
            if ours {
                yes += 1;
            } else {
                no += 1;
            }
        }
        assert!(yes > 300 && no > 300, "yes {yes}, no {no}");
    }
}
