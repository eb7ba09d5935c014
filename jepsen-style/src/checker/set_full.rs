//! `set_full`: messages as a set. Every send acked `ok` must be in every final read
//! of its room, with the acked id ("lost", naming the node, otherwise). A message
//! whose text was never sent is "unexpected"; one whose send definitely did not happen
//! (`fail`) is "failed send appeared"; the same text or id twice in one read is a
//! "duplicate". Sends that ended `info` may or may not appear: the count that did is
//! a figure.
//!
//! Figures, not anomalies (reads during the run are local and may be stale):
//! - stale reads: an ok `read` that misses a message of its room acked before the read
//!   was invoked;
//! - stable latency: per acked message, from its ack to the completion of the first
//!   `read` (during the run) that completed after the ack and contained it. It is an
//!   upper bound on how long the message took to become visible.
//!
//! Valid iff nothing is lost, unexpected, failed-yet-present or duplicated, and every
//! room that had sends has at least one final read ("nothing to check" otherwise).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::json;

use super::{calls, quantile, verdict, Anomaly, Call, Config, Outcome, Verdict};
use crate::history::{Event, Msg, Op};

const NAME: &str = "set_full";

/// A send as the history recorded it.
struct Send<'a> {
    call: Call<'a>,
    room: &'a str,
    /// The acked id, on ok.
    id: Option<&'a str>,
}

/// An ok read (during the run, or final) of a whole room.
pub(crate) struct Read<'a> {
    pub call: Call<'a>,
    pub room: &'a str,
    pub messages: &'a [Msg],
}

/// Ok `final_read`s, by room, in history order.
pub(crate) fn final_reads<'a>(cs: &[Call<'a>]) -> BTreeMap<String, Vec<Read<'a>>> {
    let mut out: BTreeMap<String, Vec<Read<'_>>> = BTreeMap::new();
    for c in cs.iter().filter(|c| c.is_ok()) {
        if let Op::FinalRead {
            room,
            messages: Some(m),
        } = c.op()
        {
            out.entry(room.clone()).or_default().push(Read {
                call: *c,
                room,
                messages: m,
            });
        }
    }
    out
}

pub fn check(history: &[Event], _cfg: &Config) -> Verdict {
    let cs = calls(history);
    let mut sends: BTreeMap<&str, Send<'_>> = BTreeMap::new();
    let mut reads: Vec<Read<'_>> = Vec::new();
    let mut anomalies = Vec::new();
    for c in &cs {
        match c.op() {
            Op::Send { room, text, id, .. } => {
                sends.insert(
                    text,
                    Send {
                        call: *c,
                        room,
                        id: if c.is_ok() { id.as_deref() } else { None },
                    },
                );
            }
            Op::Read {
                room,
                messages: Some(m),
            } if c.is_ok() => reads.push(Read {
                call: *c,
                room,
                messages: m,
            }),
            _ => {}
        }
    }
    let finals = final_reads(&cs);
    let rooms_with_sends: BTreeSet<&str> = sends.values().map(|s| s.room).collect();

    // Nothing to check.
    if finals.is_empty() {
        anomalies.push(Anomaly::new(
            "nothing to check",
            "the history has no ok final_read".into(),
            vec![],
        ));
    }
    for room in &rooms_with_sends {
        if !finals.contains_key(*room) && !finals.is_empty() {
            anomalies.push(Anomaly::new(
                "nothing to check",
                format!("room {room} had sends but no ok final_read"),
                vec![],
            ));
        }
    }

    // Lost: acked, missing (or with another id) in some final read of its room.
    let mut lost = 0usize;
    for (text, s) in &sends {
        let Some(id) = s.id else { continue };
        for fr in finals.get(s.room).map_or(&[][..], |v| v.as_slice()) {
            let found = fr.messages.iter().find(|m| m.text == *text);
            let why = match found {
                None => format!("missing on {}", fr.call.node()),
                Some(m) if m.id != id => {
                    format!("on {} with id {} instead of {id}", fr.call.node(), m.id)
                }
                Some(_) => continue,
            };
            lost += 1;
            let mut events = s.call.events();
            events.extend(fr.call.events());
            anomalies.push(Anomaly::new(
                "lost",
                format!("{text} acked as {id} in {}: {why}", s.room),
                events,
            ));
        }
    }

    // Unexpected, failed-yet-present and duplicates, over every read.
    let mut unexpected: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut failed_present: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut duplicates = 0usize;
    let all_reads = reads.iter().chain(finals.values().flatten());
    for r in all_reads {
        let mut texts = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for m in r.messages {
            match sends.get(m.text.as_str()) {
                None => unexpected
                    .entry(&m.text)
                    .or_default()
                    .push(r.call.inv_index()),
                Some(s) if !s.call.outcome().may_have_happened() => failed_present
                    .entry(&m.text)
                    .or_default()
                    .push(r.call.inv_index()),
                Some(_) => {}
            }
            let dup_text = !texts.insert(m.text.as_str());
            let dup_id = !ids.insert(m.id.as_str());
            if dup_text || dup_id {
                duplicates += 1;
                anomalies.push(Anomaly::new(
                    "duplicate",
                    format!(
                        "{} (id {}) twice in one {} of {} from {}",
                        m.text,
                        m.id,
                        r.call.op().name(),
                        r.room,
                        r.call.node()
                    ),
                    r.call.events(),
                ));
            }
        }
    }
    for (text, events) in &unexpected {
        anomalies.push(Anomaly::new(
            "unexpected",
            format!("{text} was read but never sent"),
            events.clone(),
        ));
    }
    for (text, events) in &failed_present {
        let mut ev = sends.get(text).map(|s| s.call.events()).unwrap_or_default();
        ev.extend(events);
        anomalies.push(Anomaly::new(
            "failed send appeared",
            format!("{text} was read although its send definitely failed"),
            ev,
        ));
    }

    // Indeterminate sends that appeared in the final reads.
    let final_texts: BTreeSet<&str> = finals
        .values()
        .flatten()
        .flat_map(|r| r.messages.iter().map(|m| m.text.as_str()))
        .collect();
    let info_sends = sends
        .values()
        .filter(|s| s.call.outcome() == Outcome::Unknown)
        .count();
    let info_appeared = sends
        .iter()
        .filter(|(t, s)| s.call.outcome() == Outcome::Unknown && final_texts.contains(*t))
        .count();

    // Stale reads and stable latency.
    let acked: Vec<(&str, &Send<'_>)> = sends
        .iter()
        .filter(|(_, s)| s.id.is_some())
        .map(|(t, s)| (*t, s))
        .collect();
    let mut stale_reads = 0usize;
    let mut stale_misses = 0usize;
    for r in &reads {
        let have: BTreeSet<&str> = r.messages.iter().map(|m| m.text.as_str()).collect();
        let missed = acked
            .iter()
            .filter(|(t, s)| {
                s.room == r.room && s.call.done_index() < r.call.inv_index() && !have.contains(t)
            })
            .count();
        if missed > 0 {
            stale_reads += 1;
            stale_misses += missed;
        }
    }
    // Stable latency: the first read completing after the ack that contains the
    // message. One pass over the reads in completion order (reads can hold whole rooms).
    let acked_by_text: HashMap<&str, &Send<'_>> = acked.iter().map(|(t, s)| (*t, *s)).collect();
    let mut by_done: Vec<&Read<'_>> = reads.iter().collect();
    by_done.sort_by_key(|r| r.call.done_index());
    let mut first_seen: HashMap<&str, u64> = HashMap::new();
    for r in &by_done {
        for m in r.messages.iter() {
            if first_seen.contains_key(m.text.as_str()) {
                continue;
            }
            if let Some(s) = acked_by_text.get(m.text.as_str()) {
                if s.room == r.room && r.call.done_index() > s.call.done_index() {
                    first_seen.insert(m.text.as_str(), r.call.done_time());
                }
            }
        }
    }
    let mut latencies: Vec<u64> = Vec::new();
    let mut never_read = 0usize;
    for (text, s) in &acked {
        let ack = s.call.done_time();
        match first_seen.get(text) {
            Some(t) => latencies.push(t.saturating_sub(ack) / 1_000_000),
            None => never_read += 1,
        }
    }
    latencies.sort_unstable();

    let summary = format!(
        "{} sends ({} acked, {} indeterminate of which {} appeared), {} rooms, {} final reads; \
         lost {lost}, unexpected {}, duplicates {duplicates}, failed-yet-present {}; stale reads {stale_reads}",
        sends.len(),
        acked.len(),
        info_sends,
        info_appeared,
        rooms_with_sends.len(),
        finals.values().map(Vec::len).sum::<usize>(),
        unexpected.len(),
        failed_present.len(),
    );
    let stats = json!({
        "sends": sends.len(),
        "acked": acked.len(),
        "indeterminate": info_sends,
        "indeterminate_appeared": info_appeared,
        "final_reads": finals.values().map(Vec::len).sum::<usize>(),
        "reads": reads.len(),
        "lost": lost,
        "unexpected": unexpected.len(),
        "duplicates": duplicates,
        "failed_send_appeared": failed_present.len(),
        "stale_reads": stale_reads,
        "stale_misses": stale_misses,
        "stable_latency_ms": {
            "count": latencies.len(),
            "p50": quantile(&latencies, 0.5),
            "p99": quantile(&latencies, 0.99),
            "max": latencies.last(),
            "never_read_during_run": never_read,
        },
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

    /// Two acked sends, a read in between, two agreeing final reads.
    fn good() -> H {
        let mut h = H::new();
        h.sent(1, "n1", "r0", "u1", "r0-p1-1", "01");
        h.read_ok(3, "n2", "r0", vec![]);
        h.sent(2, "n2", "r0", "u2", "r0-p2-1", "02");
        h.read_ok(
            3,
            "n2",
            "r0",
            vec![H::msg("01", "u1", "r0-p1-1"), H::msg("02", "u2", "r0-p2-1")],
        );
        let all = vec![H::msg("01", "u1", "r0-p1-1"), H::msg("02", "u2", "r0-p2-1")];
        h.final_read(9, "n1", "r0", all.clone());
        h.final_read(9, "n2", "r0", all);
        h
    }

    #[test]
    fn a_good_history_passes_and_counts_a_stale_read() {
        let v = run(&good());
        assert!(v.valid, "{v:?}");
        // The first read came after the first ack and missed it.
        assert_eq!(v.stats["stale_reads"], 1);
        assert_eq!(v.stats["stable_latency_ms"]["count"], 2);
        assert!(v.stats["stable_latency_ms"]["p50"].as_u64().is_some());
    }

    #[test]
    fn catches_a_lost_write_and_names_the_node() {
        let mut h = H::new();
        h.sent(1, "n1", "r0", "u1", "r0-p1-1", "01");
        h.final_read(9, "n1", "r0", vec![H::msg("01", "u1", "r0-p1-1")]);
        h.final_read(9, "n3", "r0", vec![]);
        let v = run(&h);
        assert!(!v.valid);
        assert_eq!(v.anomalies.len(), 1, "{v:?}");
        assert_eq!(v.anomalies[0].kind, "lost");
        assert!(v.anomalies[0].detail.contains("n3"), "{v:?}");
    }

    #[test]
    fn a_wrong_id_counts_as_lost() {
        let mut h = H::new();
        h.sent(1, "n1", "r0", "u1", "r0-p1-1", "01");
        h.final_read(9, "n1", "r0", vec![H::msg("05", "u1", "r0-p1-1")]);
        let v = run(&h);
        assert!(!v.valid);
        assert_eq!(v.anomalies[0].kind, "lost");
    }

    #[test]
    fn catches_unexpected_and_duplicates() {
        let mut h = H::new();
        h.sent(1, "n1", "r0", "u1", "r0-p1-1", "01");
        h.read_ok(2, "n1", "r0", vec![H::msg("07", "u9", "ghost")]);
        let m = H::msg("01", "u1", "r0-p1-1");
        h.final_read(9, "n1", "r0", vec![m.clone(), m]);
        let v = run(&h);
        assert!(!v.valid);
        let kinds: BTreeSet<_> = v.anomalies.iter().map(|a| a.kind.as_str()).collect();
        assert_eq!(kinds, BTreeSet::from(["unexpected", "duplicate"]), "{v:?}");
    }

    #[test]
    fn indeterminate_sends_may_appear_but_failed_ones_may_not() {
        let mut h = H::new();
        h.invoke(1, "n1", H::send("r0", "u1", "r0-p1-1", None));
        h.info(
            1,
            "n1",
            H::send("r0", "u1", "r0-p1-1", None),
            "DEADLINE_EXCEEDED",
        );
        h.invoke(2, "n1", H::send("r0", "u2", "r0-p2-1", None));
        h.info(2, "n1", H::send("r0", "u2", "r0-p2-1", None), "TRANSPORT");
        h.final_read(9, "n1", "r0", vec![H::msg("01", "u1", "r0-p1-1")]);
        let v = run(&h);
        assert!(v.valid, "{v:?}");
        assert_eq!(v.stats["indeterminate"], 2);
        assert_eq!(v.stats["indeterminate_appeared"], 1);

        h.invoke(3, "n1", H::send("r0", "u3", "r0-p3-1", None));
        h.fail(3, "n1", H::send("r0", "u3", "r0-p3-1", None), "UNAVAILABLE");
        h.final_read(
            9,
            "n2",
            "r0",
            vec![H::msg("01", "u1", "r0-p1-1"), H::msg("03", "u3", "r0-p3-1")],
        );
        let v = run(&h);
        assert!(!v.valid);
        assert!(
            v.anomalies.iter().any(|a| a.kind == "failed send appeared"),
            "{v:?}"
        );
    }

    #[test]
    fn no_final_read_is_nothing_to_check() {
        let mut h = H::new();
        h.sent(1, "n1", "r0", "u1", "r0-p1-1", "01");
        let v = run(&h);
        assert!(!v.valid);
        assert_eq!(v.anomalies[0].kind, "nothing to check");

        let mut h = good();
        h.sent(1, "n1", "r1", "u1", "r1-p1-1", "01");
        let v = run(&h);
        assert!(!v.valid);
        assert!(v.anomalies[0].detail.contains("r1"), "{v:?}");
    }
}
