//! `delivery`: what each subscriber received, per room it subscribed to.
//!
//! A subscriber's deliveries for a room are split into *sessions*: each `subscribe`
//! invoke (of that subscriber and room) starts one, and a delivery belongs to the
//! latest session started before it. The room's final timeline is the union (by id)
//! of its ok final reads. Anomalies:
//! - "lost": a message of the final timeline after the first session's cursor that was
//!   never delivered. A first session without a cursor starts where its node is when
//!   the subscription opens (DESIGN §3: a new stream starts now), so it owes the
//!   messages whose send was invoked after the `subscribe` returned; one sent while
//!   the `subscribe` was in flight may or may not be included;
//! - "duplicated": an id delivered twice in one session;
//! - "unexpected": a delivered id that is not in the final timeline, or whose sender or
//!   text differ from it.
//!
//! Delivery is at-least-once across reconnects (DESIGN §3: shown once, dedup by id):
//! a resume whose window digest does not match the node replays the window before
//! the cursor, so an id delivered in an earlier session and again after a resume is
//! counted ("redelivered after resume"), not reported. A live stream forwards an
//! entry that reached its node late (sorting before ids it already sent) when it
//! arrives: counted as "late (out of id order)", not reported; the lost check is what
//! proves such entries are not skipped. Rooms with no final read are not
//! judged for lost/unexpected (counted as "rooms without final read").
//!
//! Cursors: the node's text form `v1:room=id,...` (the entry for this room, or the
//! only entry), or a bare id. A cursor this checker cannot read is treated as "from
//! the start" for the lost check and as no bound for the order check.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::set_full::final_reads;
use super::{calls, verdict, Anomaly, Config, Verdict};
use crate::history::{Event, Msg, Op};

const NAME: &str = "delivery";

/// The id a cursor resumes after, for `room`.
pub(crate) fn cursor_id(cursor: &str, room: &str) -> Option<String> {
    let Some(body) = cursor.strip_prefix("v1:") else {
        let c = cursor.trim();
        return (!c.is_empty() && c.chars().all(|ch| ch.is_ascii_hexdigit()))
            .then(|| c.to_ascii_lowercase());
    };
    let entries: Vec<(&str, &str)> = body.split(',').filter_map(|p| p.split_once('=')).collect();
    let pick = entries
        .iter()
        .find(|(r, _)| *r == room)
        .or(if entries.len() == 1 {
            entries.first()
        } else {
            None
        });
    // `id` or `id.count.digest` (the resume-window digest).
    pick.map(|(_, pos)| {
        pos.split('.')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    })
}

#[derive(Default)]
struct Session {
    /// `None`: from the start (or unreadable).
    cursor: Option<String>,
    has_cursor: bool,
    /// (id, msg, event index), in delivery order.
    got: Vec<(String, Msg, u64)>,
    start: u64,
    /// Index of the `subscribe` completion (`u64::MAX` if none).
    opened: u64,
}

pub fn check(history: &[Event], _cfg: &Config) -> Verdict {
    let cs = calls(history);
    // (subscriber, room) -> sessions in order.
    let mut subs: BTreeMap<(String, String), Vec<Session>> = BTreeMap::new();
    let mut orphan_deliveries = 0usize;
    for c in &cs {
        match &c.inv.op {
            Op::Subscribe {
                room,
                subscriber,
                cursor,
            } => subs
                .entry((subscriber.clone(), room.clone()))
                .or_default()
                .push(Session {
                    cursor: cursor.as_deref().and_then(|k| cursor_id(k, room)),
                    has_cursor: cursor.is_some(),
                    got: Vec::new(),
                    start: c.inv_index(),
                    opened: c.done_index(),
                }),
            Op::Deliver {
                room,
                subscriber,
                msg,
            } => {
                let key = (subscriber.clone(), room.clone());
                match subs.get_mut(&key).and_then(|v| v.last_mut()) {
                    Some(s) => {
                        s.got
                            .push((msg.id.to_ascii_lowercase(), msg.clone(), c.inv_index()))
                    }
                    None => {
                        // A delivery before any subscribe: judge it in a session from the start.
                        orphan_deliveries += 1;
                        subs.entry(key).or_default().push(Session {
                            got: vec![(msg.id.to_ascii_lowercase(), msg.clone(), c.inv_index())],
                            start: c.inv_index(),
                            opened: c.inv_index(),
                            ..Session::default()
                        });
                    }
                }
            }
            _ => {}
        }
    }

    // (room, text) -> index of the send's invoke (texts are unique per workload).
    let send_invoked: BTreeMap<(&str, &str), u64> = cs
        .iter()
        .filter_map(|c| match &c.inv.op {
            Op::Send { room, text, .. } => Some(((room.as_str(), text.as_str()), c.inv_index())),
            _ => None,
        })
        .collect();
    let finals = final_reads(&cs);
    let timelines: BTreeMap<&str, BTreeMap<String, &Msg>> = finals
        .iter()
        .map(|(room, reads)| {
            let union = reads
                .iter()
                .flat_map(|r| r.messages.iter())
                .map(|m| (m.id.to_ascii_lowercase(), m))
                .collect();
            (room.as_str(), union)
        })
        .collect();

    let mut anomalies = Vec::new();
    let (mut lost, mut dups, mut order, mut unexpected, mut redelivered) = (0, 0, 0, 0, 0);
    let mut deliveries = 0usize;
    let mut rooms_without_final: BTreeSet<&str> = BTreeSet::new();
    for ((sub, room), sessions) in &subs {
        let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
        for s in sessions {
            let mut in_session: BTreeSet<&str> = BTreeSet::new();
            let mut last: Option<&str> = None;
            for (id, _, ev) in &s.got {
                deliveries += 1;
                let earlier = seen.get(id.as_str()).copied();
                let at_or_below_cursor = s.cursor.as_deref().is_some_and(|c| id.as_str() <= c);
                if !in_session.insert(id) {
                    dups += 1;
                    anomalies.push(Anomaly::new(
                        "duplicated",
                        format!("{sub} got {id} of {room} twice in one subscription"),
                        vec![earlier.unwrap_or(*ev), *ev],
                    ));
                } else if earlier.is_some() {
                    redelivered += 1;
                } else if at_or_below_cursor || last.is_some_and(|l| id.as_str() < l) {
                    // A late entry (see the module doc): counted, not an anomaly.
                    order += 1;
                }
                last = Some(last.map_or(id.as_str(), |l| l.max(id.as_str())));
                seen.entry(id).or_insert(*ev);
            }
        }
        let Some(timeline) = timelines.get(room.as_str()) else {
            rooms_without_final.insert(room);
            continue;
        };
        for s in sessions {
            for (id, msg, ev) in &s.got {
                match timeline.get(id) {
                    Some(m) if m.sender == msg.sender && m.text == msg.text => {}
                    found => {
                        unexpected += 1;
                        let why = if found.is_some() {
                            "differs from the final timeline"
                        } else {
                            "is in no final read"
                        };
                        anomalies.push(Anomaly::new(
                            "unexpected",
                            format!("{sub} got {id} ({}) of {room}, which {why}", msg.text),
                            vec![*ev],
                        ));
                    }
                }
            }
        }
        let first = sessions.first();
        let from = first
            .filter(|s| s.has_cursor)
            .and_then(|s| s.cursor.clone());
        // A new stream owes what was sent after it opened.
        let opened = first.filter(|s| !s.has_cursor).map(|s| s.opened);
        for (id, m) in timeline {
            if from.as_deref().is_some_and(|f| id.as_str() <= f) || seen.contains_key(id.as_str()) {
                continue;
            }
            let sent_at = send_invoked.get(&(room.as_str(), m.text.as_str()));
            if opened.is_some_and(|o| sent_at.is_some_and(|at| *at < o)) {
                continue;
            }
            lost += 1;
            anomalies.push(Anomaly::new(
                "lost",
                format!("{sub} never got {id} ({}) of {room}", m.text),
                sessions.first().map(|s| vec![s.start]).unwrap_or_default(),
            ));
        }
    }

    let summary = format!(
        "{} subscriptions, {deliveries} deliveries; lost {lost}, duplicated {dups}, late (out of order) {order}, \
         unexpected {unexpected}; redelivered after resume {redelivered}",
        subs.len()
    );
    let stats = json!({
        "subscriber_rooms": subs.len(),
        "sessions": subs.values().map(Vec::len).sum::<usize>(),
        "deliveries": deliveries,
        "lost": lost,
        "duplicated": dups,
        "unexpected": unexpected,
        "redelivered_after_resume": redelivered,
        "late_out_of_order": order,
        "deliveries_before_subscribe": orphan_deliveries,
        "rooms_without_final_read": rooms_without_final.len(),
    });
    verdict(NAME, summary, anomalies, stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::testkit::H;
    use super::*;

    fn sub(h: &mut H, p: u64, room: &str, name: &str, cursor: Option<&str>) {
        let op = Op::Subscribe {
            room: room.into(),
            subscriber: name.into(),
            cursor: cursor.map(str::to_string),
        };
        h.call(p, "n1", op.clone(), op);
    }

    fn m(i: u32) -> Msg {
        H::msg(&format!("{i:032x}"), "u1", &format!("r0-p1-{i}"))
    }

    fn timeline(h: &mut H, n: u32) {
        let all: Vec<Msg> = (1..=n).map(m).collect();
        h.final_read(9, "n1", "r0", all.clone());
        h.final_read(9, "n2", "r0", all);
    }

    #[test]
    fn a_resumed_subscriber_that_got_everything_passes() {
        let mut h = H::new();
        sub(&mut h, 5, "r0", "s1", None);
        h.deliver(5, "r0", "s1", m(1));
        h.deliver(5, "r0", "s1", m(2));
        let cursor = format!("v1:rm_1={:032x}", 2);
        sub(&mut h, 5, "r0", "s1", Some(&cursor));
        h.deliver(5, "r0", "s1", m(3));
        timeline(&mut h, 3);
        let v = check(&h.events, &Config::default());
        assert!(v.valid, "{v:?}");
        assert_eq!(v.stats["deliveries"], 3);
    }

    #[test]
    fn redelivery_after_an_older_cursor_is_only_counted() {
        let mut h = H::new();
        sub(&mut h, 5, "r0", "s1", None);
        h.deliver(5, "r0", "s1", m(1));
        h.deliver(5, "r0", "s1", m(2));
        sub(&mut h, 5, "r0", "s1", Some(&format!("{:032x}", 1)));
        h.deliver(5, "r0", "s1", m(2));
        timeline(&mut h, 2);
        let v = check(&h.events, &Config::default());
        assert!(v.valid, "{v:?}");
        assert_eq!(v.stats["redelivered_after_resume"], 1);
    }

    #[test]
    fn catches_lost_duplicated_unexpected_and_order() {
        let mut h = H::new();
        sub(&mut h, 5, "r0", "s1", None);
        h.deliver(5, "r0", "s1", m(2));
        h.deliver(5, "r0", "s1", m(1)); // late: counted
        h.deliver(5, "r0", "s1", m(2)); // duplicated
        h.deliver(5, "r0", "s1", m(9)); // unexpected
        let cursor = format!("v1:rm_1={:032x}.2.00000000000000ff", 2);
        sub(&mut h, 5, "r0", "s1", Some(&cursor));
        h.deliver(5, "r0", "s1", m(1)); // redelivered by the resume window: counted
        timeline(&mut h, 3); // 3 lost
        let v = check(&h.events, &Config::default());
        assert!(!v.valid);
        let count = |k: &str| v.anomalies.iter().filter(|a| a.kind == k).count();
        assert_eq!(count("order"), 0, "{v:?}");
        assert_eq!(v.stats["late_out_of_order"], 1, "{v:?}");
        assert_eq!(v.stats["redelivered_after_resume"], 1, "{v:?}");
        assert_eq!(count("duplicated"), 1, "{v:?}");
        assert_eq!(count("unexpected"), 1, "{v:?}");
        assert_eq!(count("lost"), 1, "{v:?}");
        assert!(v
            .anomalies
            .iter()
            .any(|a| a.kind == "lost" && a.detail.contains("r0-p1-3")));
    }

    #[test]
    fn a_new_stream_owes_what_was_sent_after_it_opened() {
        let mut h = H::new();
        let op = Op::Subscribe {
            room: "r0".into(),
            subscriber: "s1".into(),
            cursor: None,
        };
        h.invoke(5, "n1", op.clone());
        // Sent while the subscribe was in flight: the stream may start after it.
        h.sent(1, "n1", "r0", "u1", "r0-p1-1", &format!("{:032x}", 1));
        h.ok(5, "n1", op);
        // Sent after it opened: owed.
        h.sent(1, "n1", "r0", "u1", "r0-p1-2", &format!("{:032x}", 2));
        h.sent(1, "n1", "r0", "u1", "r0-p1-3", &format!("{:032x}", 3));
        h.deliver(5, "r0", "s1", m(3));
        timeline(&mut h, 3);
        let v = check(&h.events, &Config::default());
        assert!(!v.valid);
        let lost: Vec<&str> = v
            .anomalies
            .iter()
            .filter(|a| a.kind == "lost")
            .map(|a| a.detail.as_str())
            .collect();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("r0-p1-2"), "{lost:?}");
    }

    #[test]
    fn a_first_cursor_bounds_what_is_expected() {
        let mut h = H::new();
        sub(&mut h, 5, "r0", "s1", Some(&format!("v1:rm_1={:032x}", 2)));
        h.deliver(5, "r0", "s1", m(3));
        timeline(&mut h, 3);
        let v = check(&h.events, &Config::default());
        assert!(v.valid, "{v:?}");
    }

    #[test]
    fn reads_cursors() {
        assert_eq!(cursor_id("v1:r0=AB,r1=cd", "r1"), Some("cd".into()));
        assert_eq!(cursor_id("v1:rm_9=ab", "r0"), Some("ab".into()));
        assert_eq!(cursor_id("v1:a=1,b=2", "r0"), None);
        assert_eq!(cursor_id("v1:", "r0"), None);
        assert_eq!(cursor_id("00ff", "r0"), Some("00ff".into()));
    }
}
