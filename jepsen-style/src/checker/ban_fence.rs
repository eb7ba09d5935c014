//! `ban_fence`: once a ban (or kick) of a user is acked, that user's sends to the
//! room must be refused and must never show up.
//!
//! For each (room, user), a *fence* opens when a `ban` of the user completes `ok` and
//! lasts until the first `unban` of the user in the room that may have taken effect
//! after the ban (ok or indeterminate, completed after the ban's ok) is invoked — from
//! the ban's ok on if that unban was already running. A `kick` fence lasts likewise
//! until the user's next `join` that may have taken effect. A `send` of the user to
//! the room that lies wholly inside a fence (invoked after it opened, and answered
//! before it closed; one never answered counts as running until the end) is:
//! - "accepted after ban" / "accepted after kick" if it completed `ok`;
//! - "appeared after ban" / "appeared after kick" (whatever its completion) if its text
//!   is in any final read.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::set_full::final_reads;
use super::{calls, verdict, Anomaly, Call, Config, Verdict};
use crate::history::{Event, Op, Type};

const NAME: &str = "ban_fence";

/// A fence: sends of `user` to `room` invoked strictly between `from` and `until`
/// (history indexes) are refused.
struct Fence<'a> {
    why: &'static str,
    call: Call<'a>,
    from: u64,
    until: u64,
}

/// Where a fence opened at `from` ends: the invoke of the first lifting call that may
/// have taken effect after `from`, clamped to `from`.
fn fence_end(from: u64, lifts: &[Call<'_>]) -> u64 {
    lifts
        .iter()
        .filter(|c| c.outcome().may_have_happened() && c.done_index() > from)
        .map(|c| c.inv_index().max(from))
        .min()
        .unwrap_or(u64::MAX)
}

pub fn check(history: &[Event], _cfg: &Config) -> Verdict {
    let cs = calls(history);
    type Key<'a> = (&'a str, &'a str);
    let mut bans: BTreeMap<Key<'_>, Vec<Call<'_>>> = BTreeMap::new();
    let mut kicks: BTreeMap<Key<'_>, Vec<Call<'_>>> = BTreeMap::new();
    let mut unbans: BTreeMap<Key<'_>, Vec<Call<'_>>> = BTreeMap::new();
    let mut joins: BTreeMap<Key<'_>, Vec<Call<'_>>> = BTreeMap::new();
    let mut sends: BTreeMap<Key<'_>, Vec<(Call<'_>, &str)>> = BTreeMap::new();
    for c in &cs {
        match &c.inv.op {
            Op::Ban { room, user } if c.is_ok() => bans.entry((room, user)).or_default().push(*c),
            Op::Kick { room, user } if c.is_ok() => kicks.entry((room, user)).or_default().push(*c),
            Op::Unban { room, user } => unbans.entry((room, user)).or_default().push(*c),
            Op::Join { room, user } => joins.entry((room, user)).or_default().push(*c),
            Op::Send {
                room, user, text, ..
            } => sends.entry((room, user)).or_default().push((*c, text)),
            _ => {}
        }
    }
    let final_texts: BTreeSet<&str> = final_reads(&cs)
        .values()
        .flatten()
        .flat_map(|r| r.messages.iter().map(|m| m.text.as_str()))
        .collect();

    // A ban is lifted by an unban, a kick by the user's next join.
    let mut fences: BTreeMap<Key<'_>, Vec<Fence<'_>>> = BTreeMap::new();
    for (why, opened, lifted) in [("ban", &bans, &unbans), ("kick", &kicks, &joins)] {
        for (key, list) in opened {
            let lifts = lifted.get(key).map_or(&[][..], |v| v.as_slice());
            for call in list {
                let from = call.done_index();
                fences.entry(*key).or_default().push(Fence {
                    why,
                    call: *call,
                    from,
                    until: fence_end(from, lifts),
                });
            }
        }
    }

    let mut anomalies = Vec::new();
    let (mut accepted, mut appeared, mut fenced_sends) = (0usize, 0usize, 0usize);
    for ((room, user), fs) in &fences {
        for (s, text) in sends.get(&(*room, *user)).map_or(&[][..], |v| v.as_slice()) {
            let at = s.inv_index();
            // When the send can have taken effect at the latest: by its completion if
            // the node answered (ok, a refusal, or DEADLINE_EXCEEDED: written before the
            // answer); at any later time if the answer never came.
            let latest = match s.done {
                Some(d)
                    if d.kind != Type::Info || d.error.as_deref() == Some("DEADLINE_EXCEEDED") =>
                {
                    d.index
                }
                _ => u64::MAX,
            };
            // Fenced only if it lies wholly inside a fence: a send still running when
            // the unban (re-join) began may have taken effect after it.
            let Some(f) = fs
                .iter()
                .find(|f| f.from < at && (f.until == u64::MAX || latest < f.until))
            else {
                continue;
            };
            fenced_sends += 1;
            let mut events = f.call.events();
            events.extend(s.events());
            if s.is_ok() {
                accepted += 1;
                anomalies.push(Anomaly::new(
                    &format!("accepted after {}", f.why),
                    format!(
                        "{user}'s send {text} to {room} was acked after the {} was",
                        f.why
                    ),
                    events.clone(),
                ));
            }
            if final_texts.contains(text) {
                appeared += 1;
                anomalies.push(Anomaly::new(
                    &format!("appeared after {}", f.why),
                    format!("{user}'s send {text} to {room}, invoked after the {} was acked, is in a final read", f.why),
                    events,
                ));
            }
        }
    }
    let summary = format!(
        "{} bans, {} kicks acked; {fenced_sends} sends inside fences; accepted {accepted}, appeared {appeared}",
        bans.values().map(Vec::len).sum::<usize>(),
        kicks.values().map(Vec::len).sum::<usize>(),
    );
    let stats = json!({
        "bans": bans.values().map(Vec::len).sum::<usize>(),
        "kicks": kicks.values().map(Vec::len).sum::<usize>(),
        "fenced_sends": fenced_sends,
        "accepted_after_fence": accepted,
        "appeared_after_fence": appeared,
    });
    verdict(NAME, summary, anomalies, stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::testkit::H;
    use super::*;

    fn run(h: &H) -> Verdict {
        check(&h.events, &Config::default())
    }

    #[test]
    fn refused_sends_after_a_ban_and_sends_after_an_unban_pass() {
        let mut h = H::new();
        h.sent(1, "n1", "r", "u1", "before", "01");
        h.call(9, "n1", H::ban("r", "u1"), H::ban("r", "u1"));
        h.invoke(1, "n2", H::send("r", "u1", "during", None));
        h.fail(
            1,
            "n2",
            H::send("r", "u1", "during", None),
            "PERMISSION_DENIED",
        );
        h.call(9, "n1", H::unban("r", "u1"), H::unban("r", "u1"));
        h.call(1, "n1", H::join("r", "u1"), H::join("r", "u1"));
        h.sent(1, "n1", "r", "u1", "after", "02");
        h.final_read(
            8,
            "n1",
            "r",
            vec![H::msg("01", "u1", "before"), H::msg("02", "u1", "after")],
        );
        let v = run(&h);
        assert!(v.valid, "{v:?}");
        assert_eq!(v.stats["fenced_sends"], 1);
    }

    #[test]
    fn catches_a_send_accepted_and_shown_after_a_ban() {
        let mut h = H::new();
        let ban = h.call(9, "n1", H::ban("r", "u1"), H::ban("r", "u1"));
        let send = h.sent(1, "n2", "r", "u1", "sneaky", "03");
        h.final_read(8, "n1", "r", vec![H::msg("03", "u1", "sneaky")]);
        let v = run(&h);
        assert!(!v.valid);
        let kinds: Vec<_> = v.anomalies.iter().map(|a| a.kind.as_str()).collect();
        assert_eq!(kinds, ["accepted after ban", "appeared after ban"]);
        assert!(v.anomalies[0].events.contains(&ban) && v.anomalies[0].events.contains(&send));
    }

    #[test]
    fn catches_an_indeterminate_send_that_appeared_after_a_kick() {
        let mut h = H::new();
        h.call(9, "n1", H::kick("r", "u1"), H::kick("r", "u1"));
        h.invoke(1, "n2", H::send("r", "u1", "late", None));
        h.info(
            1,
            "n2",
            H::send("r", "u1", "late", None),
            "DEADLINE_EXCEEDED",
        );
        h.final_read(8, "n1", "r", vec![H::msg("03", "u1", "late")]);
        let v = run(&h);
        assert!(!v.valid);
        assert_eq!(v.anomalies.len(), 1);
        assert_eq!(v.anomalies[0].kind, "appeared after kick");
    }

    #[test]
    fn a_send_still_running_when_the_user_rejoins_may_appear() {
        // Seen in a run: kick acked; the user's send starts; the re-join starts and
        // completes while the send runs; the send times out and shows up. It may have
        // been applied after the join: no anomaly. The same send answered before the
        // re-join began is one.
        let mut h = H::new();
        h.call(9, "n1", H::kick("r", "u1"), H::kick("r", "u1"));
        h.invoke(1, "n2", H::send("r", "u1", "late", None));
        h.call(9, "n1", H::join("r", "u1"), H::join("r", "u1"));
        h.info(
            1,
            "n2",
            H::send("r", "u1", "late", None),
            "DEADLINE_EXCEEDED",
        );
        h.final_read(8, "n1", "r", vec![H::msg("03", "u1", "late")]);
        assert!(run(&h).valid);

        let mut h = H::new();
        h.call(9, "n1", H::kick("r", "u1"), H::kick("r", "u1"));
        h.invoke(1, "n2", H::send("r", "u1", "late", None));
        h.info(
            1,
            "n2",
            H::send("r", "u1", "late", None),
            "DEADLINE_EXCEEDED",
        );
        h.call(9, "n1", H::join("r", "u1"), H::join("r", "u1"));
        h.final_read(8, "n1", "r", vec![H::msg("03", "u1", "late")]);
        let v = run(&h);
        assert!(!v.valid);
        assert_eq!(v.anomalies[0].kind, "appeared after kick");
    }

    #[test]
    fn a_concurrent_unban_lifts_the_fence() {
        let mut h = H::new();
        h.invoke(7, "n1", H::unban("r", "u1"));
        h.call(9, "n1", H::ban("r", "u1"), H::ban("r", "u1"));
        h.ok(7, "n1", H::unban("r", "u1"));
        h.sent(1, "n2", "r", "u1", "ok-now", "03");
        h.final_read(8, "n1", "r", vec![H::msg("03", "u1", "ok-now")]);
        let v = run(&h);
        assert!(v.valid, "{v:?}");
    }
}
