//! `order_and_agreement`:
//! - (a) all ok final reads of a room, from every node, are the same list of
//!   (id, sender, text) — else "diverged", compared with the room's first final read,
//!   with a short diff; a final read not in strictly increasing id order is "unsorted";
//! - (b) per-sender order: the acked sends of one process to one room, in invoke order
//!   (a process is sequential), have increasing ids and appear in that order in the
//!   final timeline (the room's first final read) — else "reorder". Sends missing from
//!   the timeline are `set_full`'s business and skipped here.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;

use super::set_full::{final_reads, Read};
use super::{calls, verdict, Anomaly, Config, Verdict};
use crate::history::{Event, Msg, Op};

const NAME: &str = "order_and_agreement";

/// An acked send, for the per-sender order.
struct Acked<'a> {
    text: &'a str,
    id: &'a str,
    events: Vec<u64>,
}

/// A one-line difference between two timelines.
fn diff(a: &[Msg], b: &[Msg]) -> String {
    let first = a.iter().zip(b.iter()).position(|(x, y)| x != y);
    let ids_a: BTreeSet<&str> = a.iter().map(|m| m.id.as_str()).collect();
    let ids_b: BTreeSet<&str> = b.iter().map(|m| m.id.as_str()).collect();
    let only_a: Vec<&str> = ids_a.difference(&ids_b).copied().collect();
    let only_b: Vec<&str> = ids_b.difference(&ids_a).copied().collect();
    let at = match first {
        Some(i) => format!("first difference at position {i}"),
        None => format!(
            "one is a prefix of the other (lengths {} and {})",
            a.len(),
            b.len()
        ),
    };
    let sample = |v: &[&str]| v.iter().take(3).copied().collect::<Vec<_>>().join(",");
    format!(
        "{at}; {} only in the first (e.g. {}), {} only in the second (e.g. {})",
        only_a.len(),
        sample(&only_a),
        only_b.len(),
        sample(&only_b)
    )
}

pub fn check(history: &[Event], _cfg: &Config) -> Verdict {
    let cs = calls(history);
    let finals = final_reads(&cs);
    let mut anomalies = Vec::new();
    let mut diverged = 0usize;
    let mut unsorted = 0usize;

    for (room, reads) in &finals {
        let Some(reference) = reads.first() else {
            continue;
        };
        for r in reads {
            if let Some(w) = r.messages.windows(2).find(|w| w[0].id >= w[1].id) {
                unsorted += 1;
                anomalies.push(Anomaly::new(
                    "unsorted",
                    format!(
                        "final read of {room} from {}: {} before {}",
                        r.call.node(),
                        w[0].id,
                        w[1].id
                    ),
                    r.call.events(),
                ));
            }
        }
        for r in reads.iter().skip(1) {
            if r.messages != reference.messages {
                diverged += 1;
                let mut events = reference.call.events();
                events.extend(r.call.events());
                anomalies.push(Anomaly::new(
                    "diverged",
                    format!(
                        "{room}: {} ({} msgs) vs {} ({} msgs): {}",
                        reference.call.node(),
                        reference.messages.len(),
                        r.call.node(),
                        r.messages.len(),
                        diff(reference.messages, r.messages)
                    ),
                    events,
                ));
            }
        }
    }

    // (b) per-sender order.
    let position: BTreeMap<&str, BTreeMap<&str, usize>> = finals
        .iter()
        .filter_map(|(room, reads)| reads.first().map(|r: &Read<'_>| (room.as_str(), r)))
        .map(|(room, r)| {
            let pos = r
                .messages
                .iter()
                .enumerate()
                .map(|(i, m)| (m.text.as_str(), i))
                .collect();
            (room, pos)
        })
        .collect();
    // (process, room) -> acked sends in invoke order.
    let mut by_sender: BTreeMap<(u64, &str), Vec<Acked<'_>>> = BTreeMap::new();
    for c in cs.iter().filter(|c| c.is_ok()) {
        if let Op::Send {
            room,
            text,
            id: Some(id),
            ..
        } = c.op()
        {
            by_sender
                .entry((c.inv.process, room.as_str()))
                .or_default()
                .push(Acked {
                    text,
                    id,
                    events: c.events(),
                });
        }
    }
    let mut reorders = 0usize;
    let mut checked = 0usize;
    for ((process, room), sends) in &by_sender {
        for w in sends.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            checked += 1;
            let pos = position.get(room);
            let pa = pos.and_then(|p| p.get(a.text));
            let pb = pos.and_then(|p| p.get(b.text));
            let id_bad = a.id >= b.id;
            let pos_bad = matches!((pa, pb), (Some(x), Some(y)) if x >= y);
            if id_bad || pos_bad {
                reorders += 1;
                let mut events = a.events.clone();
                events.extend(b.events.iter().copied());
                anomalies.push(Anomaly::new(
                    "reorder",
                    format!(
                        "process {process} sent {} (id {}) before {} (id {}) to {room}, \
                         but the later one is ordered first",
                        a.text, a.id, b.text, b.id
                    ),
                    events,
                ));
            }
        }
    }

    let summary = format!(
        "{} rooms, {} final reads; diverged {diverged}, unsorted {unsorted}; \
         {checked} consecutive send pairs, reordered {reorders}",
        finals.len(),
        finals.values().map(Vec::len).sum::<usize>()
    );
    let stats = json!({
        "rooms": finals.len(),
        "final_reads": finals.values().map(Vec::len).sum::<usize>(),
        "diverged": diverged,
        "unsorted": unsorted,
        "send_pairs": checked,
        "reordered": reorders,
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
    fn agreeing_ordered_timelines_pass() {
        let mut h = H::new();
        h.sent(1, "n1", "r0", "u1", "a", "01");
        h.sent(1, "n2", "r0", "u1", "b", "02");
        let all = vec![H::msg("01", "u1", "a"), H::msg("02", "u1", "b")];
        for n in ["n1", "n2", "n3"] {
            h.final_read(9, n, "r0", all.clone());
        }
        let v = run(&h);
        assert!(v.valid, "{v:?}");
        assert_eq!(v.stats["send_pairs"], 1);
    }

    #[test]
    fn catches_diverged_timelines() {
        let mut h = H::new();
        h.final_read(
            9,
            "n1",
            "r0",
            vec![H::msg("01", "u1", "a"), H::msg("02", "u1", "b")],
        );
        h.final_read(9, "n2", "r0", vec![H::msg("01", "u1", "a")]);
        let v = run(&h);
        assert!(!v.valid);
        assert_eq!(v.anomalies.len(), 1);
        assert_eq!(v.anomalies[0].kind, "diverged");
        assert!(
            v.anomalies[0]
                .detail
                .contains("1 only in the first (e.g. 02)"),
            "{v:?}"
        );
    }

    #[test]
    fn catches_a_per_sender_reorder() {
        let mut h = H::new();
        // Process 1 sent a then b, but b got the smaller id.
        h.sent(1, "n1", "r0", "u1", "a", "05");
        h.sent(1, "n2", "r0", "u1", "b", "03");
        let all = vec![H::msg("03", "u1", "b"), H::msg("05", "u1", "a")];
        h.final_read(9, "n1", "r0", all);
        let v = run(&h);
        assert!(!v.valid);
        assert_eq!(v.anomalies[0].kind, "reorder", "{v:?}");
    }

    #[test]
    fn catches_an_unsorted_final_read() {
        let mut h = H::new();
        h.final_read(
            9,
            "n1",
            "r0",
            vec![H::msg("02", "u1", "b"), H::msg("01", "u1", "a")],
        );
        let v = run(&h);
        assert!(!v.valid);
        assert_eq!(v.anomalies[0].kind, "unsorted");
    }
}
