//! `markers`: read markers are a grow-only CRDT per (room, user). Over the ok
//! `mark_read` ops of one (room, user):
//! - "went backwards": op `b` was invoked after op `a` completed, yet `b`'s returned
//!   marker is below `a`'s;
//! - "below request": an op's returned marker is below the id it asked for.
//!
//! Ids are compared as the node writes them (fixed-width hex, so text order is id
//! order; case is ignored). An ok op without a returned marker is counted, not judged.

use std::collections::BTreeMap;

use serde_json::json;

use super::{calls, verdict, Anomaly, Call, Config, Verdict};
use crate::history::{Event, Op};

const NAME: &str = "markers";

/// An ok `mark_read` with its returned marker.
struct Mark<'a> {
    call: Call<'a>,
    asked: String,
    got: String,
}

pub fn check(history: &[Event], _cfg: &Config) -> Verdict {
    let cs = calls(history);
    let mut by_key: BTreeMap<(&str, &str), Vec<Mark<'_>>> = BTreeMap::new();
    let mut without_marker = 0usize;
    for c in cs.iter().filter(|c| c.is_ok()) {
        if let Op::MarkRead {
            room,
            user,
            id,
            marker,
        } = c.op()
        {
            match marker {
                Some(m) => by_key.entry((room, user)).or_default().push(Mark {
                    call: *c,
                    asked: id.to_ascii_lowercase(),
                    got: m.to_ascii_lowercase(),
                }),
                None => without_marker += 1,
            }
        }
    }

    let mut anomalies = Vec::new();
    let (mut backwards, mut below, mut ops) = (0usize, 0usize, 0usize);
    for ((room, user), list) in &mut by_key {
        ops += list.len();
        for Mark {
            call: c,
            asked,
            got,
        } in list.iter()
        {
            if got < asked {
                below += 1;
                anomalies.push(Anomaly::new(
                    "below request",
                    format!("{user} in {room} marked {asked} but got marker {got}"),
                    c.events(),
                ));
            }
        }
        // Sweep in completion order, keeping the highest marker completed so far; each
        // op is compared with everything that completed before its invoke.
        let mut by_done: Vec<usize> = (0..list.len()).collect();
        by_done.sort_by_key(|&i| list[i].call.done_index());
        let mut by_inv: Vec<usize> = (0..list.len()).collect();
        by_inv.sort_by_key(|&i| list[i].call.inv_index());
        let mut best: Option<usize> = None;
        let mut next_done = 0usize;
        for &b in &by_inv {
            let inv = list[b].call.inv_index();
            while let Some(&a) = by_done.get(next_done) {
                if list[a].call.done_index() >= inv {
                    break;
                }
                if best.is_none_or(|x| list[a].got > list[x].got) {
                    best = Some(a);
                }
                next_done += 1;
            }
            if let Some(a) = best {
                if list[b].got < list[a].got {
                    backwards += 1;
                    let mut events = list[a].call.events();
                    events.extend(list[b].call.events());
                    anomalies.push(Anomaly::new(
                        "went backwards",
                        format!(
                            "{user} in {room}: marker {} after an earlier {}",
                            list[b].got, list[a].got
                        ),
                        events,
                    ));
                }
            }
        }
    }
    let summary = format!(
        "{} (room, user) pairs, {ops} acked marks; backwards {backwards}, below request {below}",
        by_key.len()
    );
    let stats = json!({
        "pairs": by_key.len(),
        "marks": ops,
        "went_backwards": backwards,
        "below_request": below,
        "without_marker": without_marker,
    });
    verdict(NAME, summary, anomalies, stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::testkit::H;
    use super::*;

    fn mark(id: &str, marker: Option<&str>) -> Op {
        Op::MarkRead {
            room: "r".into(),
            user: "u1".into(),
            id: id.into(),
            marker: marker.map(str::to_string),
        }
    }

    #[test]
    fn monotonic_markers_pass_even_when_concurrent_ones_cross() {
        let mut h = H::new();
        h.call(1, "n1", mark("05", None), mark("05", Some("05")));
        // Two concurrent marks may return in either order.
        h.invoke(1, "n1", mark("09", None));
        h.invoke(2, "n2", mark("07", None));
        h.ok(1, "n1", mark("09", Some("09")));
        h.ok(2, "n2", mark("07", Some("07")));
        h.call(2, "n2", mark("03", None), mark("03", Some("09")));
        let v = check(&h.events, &Config::default());
        assert!(v.valid, "{v:?}");
    }

    #[test]
    fn catches_a_marker_going_backwards_and_one_below_its_request() {
        let mut h = H::new();
        let a = h.call(1, "n1", mark("09", None), mark("09", Some("09")));
        let b = h.call(2, "n2", mark("03", None), mark("03", Some("05")));
        h.call(2, "n2", mark("0a", None), mark("0a", Some("09")));
        let v = check(&h.events, &Config::default());
        assert!(!v.valid);
        let kinds: Vec<_> = v.anomalies.iter().map(|a| a.kind.as_str()).collect();
        assert_eq!(kinds, ["below request", "went backwards"], "{v:?}");
        assert!(v.anomalies[1].events.contains(&a) && v.anomalies[1].events.contains(&b));
    }
}
