//! `presence`: presence must not outlive the node that carried it.
//!
//! For each kill of node N (nemesis `kill`, `start = true`, ok at T) until N's restart
//! (the invoke of the next `kill` with `start = false` naming N; the end of the history
//! if none): a user whose latest ok `set_presence` completed before T went through N,
//! and who has no `set_presence` through another node that completed after T (ok or
//! indeterminate) and was invoked before the read completed, must not be reported other
//! than "offline" by an ok `get_presence` invoked after T + ttl + grace and before the
//! restart — else "presence outlived its node". A user absent from the read's map
//! counts as offline.
//!
//! Figure only (gossip may lag): a user whose latest ok `set_presence` through a node
//! that stayed up completed within the TTL before a `get_presence` was invoked, yet is
//! reported "offline" ("offline while fresh").

use std::collections::BTreeMap;

use serde_json::json;

use super::{calls, verdict, Anomaly, Call, Config, Outcome, Verdict};
use crate::history::{Event, Op, Type};

const NAME: &str = "presence";
const MS: u64 = 1_000_000;

/// One kill of one node: down from `down` (history index of the kill's ok, and its
/// time) until `up` (history index of the restart's invoke).
struct Kill<'a> {
    node: &'a str,
    down_index: u64,
    down_time: u64,
    up_index: u64,
    events: Vec<u64>,
}

fn kills<'a>(cs: &[Call<'a>]) -> Vec<Kill<'a>> {
    let mut out: Vec<Kill<'_>> = Vec::new();
    for c in cs {
        let Op::Nemesis {
            fault,
            start,
            targets,
            ..
        } = &c.inv.op
        else {
            continue;
        };
        if fault != "kill" && !fault.starts_with("kill-") {
            continue;
        }
        if *start {
            let Some(done) = c.done.filter(|d| d.kind == Type::Ok) else {
                continue;
            };
            for t in targets {
                out.push(Kill {
                    node: t,
                    down_index: done.index,
                    down_time: done.time,
                    up_index: u64::MAX,
                    events: vec![done.index],
                });
            }
        } else {
            for t in targets {
                for k in out.iter_mut().filter(|k| {
                    k.node == t && k.up_index == u64::MAX && k.down_index < c.inv_index()
                }) {
                    k.up_index = c.inv_index();
                    k.events.push(c.inv_index());
                }
            }
        }
    }
    out
}

pub fn check(history: &[Event], cfg: &Config) -> Verdict {
    let cs = calls(history);
    let kills = kills(&cs);
    let mut sets: BTreeMap<&str, Vec<Call<'_>>> = BTreeMap::new();
    let mut gets: Vec<(Call<'_>, &BTreeMap<String, String>)> = Vec::new();
    for c in &cs {
        match c.op() {
            Op::SetPresence { user } => sets.entry(user).or_default().push(*c),
            Op::GetPresence {
                users: Some(users), ..
            } if c.is_ok() => gets.push((*c, users)),
            _ => {}
        }
    }
    let ttl = cfg.presence_ttl_ms * MS;
    let quiet = (cfg.presence_ttl_ms + cfg.presence_grace_ms) * MS;

    let mut anomalies = Vec::new();
    let mut judged_reads = 0usize;
    for k in &kills {
        // Users whose latest ok set_presence before the kill went through the node.
        let orphans: Vec<(&str, &Call<'_>)> = sets
            .iter()
            .filter_map(|(user, list)| {
                let last = list
                    .iter()
                    .filter(|c| c.is_ok() && c.done_index() < k.down_index)
                    .max_by_key(|c| c.done_index())?;
                (last.node() == k.node).then_some((*user, last))
            })
            .collect();
        if orphans.is_empty() {
            continue;
        }
        for (g, users) in &gets {
            let inv = g.inv;
            if inv.time < k.down_time.saturating_add(quiet) || inv.index >= k.up_index {
                continue;
            }
            judged_reads += 1;
            for (user, last) in &orphans {
                let elsewhere = sets.get(user).is_some_and(|list| {
                    list.iter().any(|c| {
                        c.outcome().may_have_happened()
                            && c.node() != k.node
                            && c.done_index() > k.down_index
                            && c.inv_index() < g.done_index()
                    })
                });
                if elsewhere {
                    continue;
                }
                match users.get(*user) {
                    Some(status) if status != "offline" => {
                        let mut events = k.events.clone();
                        events.extend(last.events());
                        events.extend(g.events());
                        anomalies.push(Anomaly::new(
                            "presence outlived its node",
                            format!(
                                "{user} (last seen through {}) is {status} {} ms after {} was killed",
                                k.node,
                                (inv.time - k.down_time) / MS,
                                k.node
                            ),
                            events,
                        ));
                    }
                    _ => {}
                }
            }
        }
    }

    // Figure: fresh heartbeats through a node that stayed up, reported offline.
    let stayed_up = |node: &str, from: u64, to: u64| {
        !kills
            .iter()
            .any(|k| k.node == node && k.down_index < to && k.up_index > from)
    };
    let mut offline_while_fresh = 0usize;
    for (g, users) in &gets {
        for (user, list) in &sets {
            let Some(last) = list
                .iter()
                .filter(|c| c.outcome() == Outcome::Ok && c.done_index() < g.inv_index())
                .max_by_key(|c| c.done_index())
            else {
                continue;
            };
            let fresh = g.inv.time.saturating_sub(last.done_time()) < ttl;
            if fresh
                && stayed_up(last.node(), last.done_index(), g.inv_index())
                && users.get(*user).is_some_and(|s| s == "offline")
            {
                offline_while_fresh += 1;
            }
        }
    }

    let summary = format!(
        "{} kills, {} presence reads ({judged_reads} judged after a kill); outlived {}; offline while fresh {offline_while_fresh}",
        kills.len(),
        gets.len(),
        anomalies.len()
    );
    let stats = json!({
        "kills": kills.len(),
        "reads": gets.len(),
        "judged_reads": judged_reads,
        "outlived": anomalies.len(),
        "offline_while_fresh": offline_while_fresh,
    });
    verdict(NAME, summary, anomalies, stats)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::testkit::H;
    use super::*;

    fn set(h: &mut H, p: u64, node: &str, user: &str) {
        let op = Op::SetPresence { user: user.into() };
        h.call(p, node, op.clone(), op);
    }

    fn get(h: &mut H, node: &str, users: &[(&str, &str)]) -> u64 {
        h.call(
            9,
            node,
            Op::GetPresence {
                room: "r".into(),
                users: None,
            },
            Op::GetPresence {
                room: "r".into(),
                users: Some(
                    users
                        .iter()
                        .map(|(u, s)| (u.to_string(), s.to_string()))
                        .collect(),
                ),
            },
        )
    }

    fn cfg() -> Config {
        Config {
            presence_ttl_ms: 1_000,
            presence_grace_ms: 500,
            ..Config::default()
        }
    }

    #[test]
    fn presence_that_expires_or_moved_passes() {
        let mut h = H::new();
        set(&mut h, 1, "n1", "u1");
        set(&mut h, 2, "n1", "u2");
        h.nemesis("kill", true, &["n1"]);
        set(&mut h, 2, "n2", "u2"); // u2 moved to n2
        get(&mut h, "n2", &[("u1", "online"), ("u2", "online")]); // too early to judge
        h.advance_ms(2_000);
        get(&mut h, "n2", &[("u1", "offline"), ("u2", "online")]);
        h.nemesis("kill", false, &["n1"]);
        let v = check(&h.events, &cfg());
        assert!(v.valid, "{v:?}");
        assert_eq!(v.stats["judged_reads"], 1);
    }

    #[test]
    fn catches_presence_outliving_its_node() {
        let mut h = H::new();
        set(&mut h, 1, "n1", "u1");
        h.nemesis("kill", true, &["n1"]);
        h.advance_ms(2_000);
        let g = get(&mut h, "n2", &[("u1", "online")]);
        h.nemesis("kill", false, &["n1"]);
        // After the restart nothing is judged.
        get(&mut h, "n2", &[("u1", "online")]);
        let v = check(&h.events, &cfg());
        assert!(!v.valid);
        assert_eq!(v.anomalies.len(), 1);
        assert_eq!(v.anomalies[0].kind, "presence outlived its node");
        assert!(v.anomalies[0].events.contains(&g));
    }

    #[test]
    fn counts_fresh_presence_reported_offline() {
        let mut h = H::new();
        set(&mut h, 1, "n2", "u1");
        get(&mut h, "n3", &[("u1", "offline")]);
        let v = check(&h.events, &cfg());
        assert!(v.valid, "{v:?}");
        assert_eq!(v.stats["offline_while_fresh"], 1);
    }
}
