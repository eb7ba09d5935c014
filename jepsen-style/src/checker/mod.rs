//! Checkers over a recorded history. Each returns a [`Verdict`].
//!
//! | module | what it checks |
//! |---|---|
//! | [`set_full`] | every acked send is in every final read of its room; nothing unexpected or duplicated; stale reads and visibility latency as figures |
//! | [`delivery`] | every subscriber got every message of its rooms, once per subscription, in id order |
//! | [`order_and_agreement`] | all nodes' final timelines agree; each process's acked sends keep their order |
//! | [`membership`] | membership ops are linearizable per room (Wing–Gong–Lowe search over [`wgl`]) |
//! | [`ban_fence`] | no send of a banned (or kicked) user is accepted or shows up afterwards |
//! | [`markers`] | read markers never go backwards and never fall below the asked id |
//! | [`presence`] | presence set through a killed node expires; fresh presence is not "offline" |
//! | [`liveness`] | the post-heal liveness measurements stayed within their bounds |
//!
//! How outcomes are read (see [`Outcome`]): `ok` happened; `fail` with `UNAVAILABLE`
//! did not happen; `fail` with a code the node gives for a refusal (`PERMISSION_DENIED`,
//! `FAILED_PRECONDITION`, `NOT_FOUND`, `INVALID_ARGUMENT`, `ALREADY_EXISTS`,
//! `UNAUTHENTICATED`) happened as a refusal, changing nothing; `info`, and a `fail`
//! with any other code (`DEADLINE_EXCEEDED` means "proposed, not confirmed in time; it
//! may still apply"), or an invoke with no completion, is indeterminate.
//!
//! Real-time order is the history's order: operation `a` precedes `b` when `a`'s
//! completion has a smaller index than `b`'s invoke. Durations use `Event::time`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::history::{Event, Op, Type, NEMESIS};

pub mod ban_fence;
pub mod delivery;
pub mod liveness;
pub mod markers;
pub mod membership;
pub mod order_and_agreement;
pub mod presence;
pub mod set_full;
pub mod wgl;

#[cfg(test)]
pub(crate) mod testkit;

/// The result of one checker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub checker: &'static str,
    pub valid: bool,
    /// One line with the counts.
    pub summary: String,
    pub anomalies: Vec<Anomaly>,
    /// Counts and figures.
    pub stats: serde_json::Value,
}

/// One thing a checker found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anomaly {
    pub kind: String,
    pub detail: String,
    /// The offending history indexes.
    pub events: Vec<u64>,
}

impl Anomaly {
    pub fn new(kind: &str, detail: String, events: Vec<u64>) -> Self {
        Anomaly {
            kind: kind.to_string(),
            detail,
            events,
        }
    }
}

/// Bounds and timings the checkers need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// The nodes' Raft election timeout; [`liveness`] reports leader recovery in units of it.
    pub election_timeout_ms: u64,
    /// The nodes' presence TTL (the node's default is 30 s).
    pub presence_ttl_ms: u64,
    /// Slack on top of the TTL for gossip and clocks.
    pub presence_grace_ms: u64,
    /// Upper bound for a `liveness` op with `what = "converged"`; 0 = use only the
    /// op's own `bound_ms`.
    pub convergence_bound_ms: u64,
    /// Most search steps the [`membership`] checker spends on one room before it
    /// answers "undecided" (which is invalid, so nothing passes unchecked).
    pub membership_search_budget: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            election_timeout_ms: 600,
            presence_ttl_ms: 30_000,
            presence_grace_ms: 2_000,
            convergence_bound_ms: 30_000,
            membership_search_budget: 2_000_000,
        }
    }
}

/// Runs every checker.
pub fn check_all(history: &[Event], cfg: &Config) -> Vec<Verdict> {
    let checkers: [fn(&[Event], &Config) -> Verdict; 8] = [
        set_full::check,
        delivery::check,
        order_and_agreement::check,
        membership::check,
        ban_fence::check,
        markers::check,
        presence::check,
        liveness::check,
    ];
    checkers
        .iter()
        .map(|check| {
            let t = std::time::Instant::now();
            let mut v = check(history, cfg);
            if let serde_json::Value::Object(m) = &mut v.stats {
                m.insert(
                    "check_ms".into(),
                    serde_json::json!(t.elapsed().as_millis() as u64),
                );
            }
            v
        })
        .collect()
}

/// Most anomalies [`render_text`] lists per checker.
const RENDER_ANOMALIES: usize = 20;

/// A human report: one `VALID name: summary` / `INVALID name: summary` line per
/// checker, each followed by up to 20 of its anomalies with their event indexes.
pub fn render_text(verdicts: &[Verdict]) -> String {
    let mut out = String::new();
    for v in verdicts {
        let head = if v.valid { "VALID" } else { "INVALID" };
        out.push_str(&format!("{head} {}: {}\n", v.checker, v.summary));
        for a in v.anomalies.iter().take(RENDER_ANOMALIES) {
            out.push_str(&format!(
                "  - {}: {} (events {:?})\n",
                a.kind, a.detail, a.events
            ));
        }
        if v.anomalies.len() > RENDER_ANOMALIES {
            out.push_str(&format!(
                "  ... and {} more\n",
                v.anomalies.len() - RENDER_ANOMALIES
            ));
        }
    }
    out
}

/// What a completed (or never completed) operation tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `ok`: it happened.
    Ok,
    /// A definite refusal with this gRPC code: it was decided and changed nothing.
    Refused(String),
    /// `fail` with `UNAVAILABLE`: nothing happened.
    NotHappened,
    /// `info`, an unknown failure code, or no completion: it may or may not have happened.
    Unknown,
}

impl Outcome {
    /// True when the operation may have taken effect (ok or indeterminate).
    pub fn may_have_happened(&self) -> bool {
        matches!(self, Outcome::Ok | Outcome::Unknown)
    }
}

/// gRPC codes the node answers for a decided refusal (see the module doc).
const REFUSAL_CODES: [&str; 6] = [
    "PERMISSION_DENIED",
    "FAILED_PRECONDITION",
    "NOT_FOUND",
    "INVALID_ARGUMENT",
    "ALREADY_EXISTS",
    "UNAUTHENTICATED",
];

/// Classifies a completion event.
pub fn outcome_of(done: Option<&Event>) -> Outcome {
    let Some(e) = done else {
        return Outcome::Unknown;
    };
    match e.kind {
        Type::Ok => Outcome::Ok,
        Type::Info | Type::Invoke => Outcome::Unknown,
        Type::Fail => match e.error.as_deref() {
            // UNAVAILABLE: the node wrote nothing. CONNECT: the harness could not open
            // a connection, so the request was never sent.
            Some("UNAVAILABLE") | Some("CONNECT") => Outcome::NotHappened,
            Some(code) if REFUSAL_CODES.contains(&code) => Outcome::Refused(code.to_string()),
            _ => Outcome::Unknown,
        },
    }
}

/// One client operation: its invoke and its completion, paired by process.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The invoke; for a completion with no invoke (a delivery), the completion itself.
    pub inv: &'a Event,
    /// The completion; `None` when the history ended first.
    pub done: Option<&'a Event>,
}

impl<'a> Call<'a> {
    pub fn outcome(&self) -> Outcome {
        outcome_of(self.done)
    }

    /// The operation with its result fields when it completed `ok`, else as invoked.
    pub fn op(&self) -> &'a Op {
        match self.done {
            Some(d) if d.kind == Type::Ok => &d.op,
            _ => &self.inv.op,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.done.is_some_and(|d| d.kind == Type::Ok)
    }

    /// Index of the invoke.
    pub fn inv_index(&self) -> u64 {
        self.inv.index
    }

    /// Index of the completion, `u64::MAX` if none.
    pub fn done_index(&self) -> u64 {
        self.done.map_or(u64::MAX, |d| d.index)
    }

    /// Completion time, `u64::MAX` if none.
    pub fn done_time(&self) -> u64 {
        self.done.map_or(u64::MAX, |d| d.time)
    }

    /// The node of the completion (where the answer came from), else of the invoke.
    pub fn node(&self) -> &'a str {
        self.done
            .map_or(self.inv.node.as_str(), |d| d.node.as_str())
    }

    /// The indexes of the invoke and, if different, of the completion.
    pub fn events(&self) -> Vec<u64> {
        match self.done {
            Some(d) if d.index != self.inv.index => vec![self.inv.index, d.index],
            _ => vec![self.inv.index],
        }
    }
}

/// Pairs every invoke with the next completion of the same process, in history
/// order. A completion with no open invoke (deliveries) stands alone. Nemesis
/// events are paired the same way.
pub fn calls(history: &[Event]) -> Vec<Call<'_>> {
    let mut out: Vec<Call<'_>> = Vec::with_capacity(history.len() / 2 + 1);
    let mut open: BTreeMap<u64, usize> = BTreeMap::new();
    for e in history {
        if e.kind == Type::Invoke {
            // A second invoke without a completion leaves the first indeterminate.
            open.insert(e.process, out.len());
            out.push(Call { inv: e, done: None });
            continue;
        }
        let pairs = !matches!(e.op, Op::Deliver { .. })
            && open
                .get(&e.process)
                .is_some_and(|&i| out[i].inv.op.name() == e.op.name());
        match open.remove(&e.process) {
            Some(i) if pairs => out[i].done = Some(e),
            other => {
                // A delivery, or a completion of another operation: it stands alone and
                // any open invoke stays open.
                if let Some(i) = other {
                    open.insert(e.process, i);
                }
                out.push(Call {
                    inv: e,
                    done: Some(e),
                });
            }
        }
    }
    out.sort_by_key(|c| c.inv.index);
    out
}

/// True for events of the nemesis.
pub fn is_nemesis(e: &Event) -> bool {
    e.process == NEMESIS
}

/// The `q`-quantile (0.0..=1.0) of sorted values, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied()
}

/// A verdict from its anomalies: valid iff there are none.
pub(crate) fn verdict(
    checker: &'static str,
    summary: String,
    anomalies: Vec<Anomaly>,
    stats: serde_json::Value,
) -> Verdict {
    Verdict {
        checker,
        valid: anomalies.is_empty(),
        summary,
        anomalies,
        stats,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::testkit::H;
    use super::*;

    #[test]
    fn pairs_invokes_with_completions_by_process() {
        let mut h = H::new();
        let a = h.invoke(1, "n1", H::join("r", "u1"));
        let b = h.invoke(2, "n2", H::join("r", "u2"));
        h.ok(2, "n2", H::join("r", "u2"));
        h.info(1, "n1", H::join("r", "u1"), "DEADLINE_EXCEEDED");
        let cs = calls(&h.events);
        assert_eq!(cs.len(), 2);
        assert_eq!(cs[0].inv.index, a);
        assert_eq!(cs[0].outcome(), Outcome::Unknown);
        assert_eq!(cs[1].inv.index, b);
        assert_eq!(cs[1].outcome(), Outcome::Ok);
    }

    #[test]
    fn classifies_fail_codes() {
        let mut h = H::new();
        h.invoke(1, "n1", H::join("r", "u1"));
        h.fail(1, "n1", H::join("r", "u1"), "UNAVAILABLE");
        h.invoke(1, "n1", H::join("r", "u1"));
        h.fail(1, "n1", H::join("r", "u1"), "PERMISSION_DENIED");
        h.invoke(1, "n1", H::join("r", "u1"));
        h.fail(1, "n1", H::join("r", "u1"), "DEADLINE_EXCEEDED");
        let cs = calls(&h.events);
        assert_eq!(cs[0].outcome(), Outcome::NotHappened);
        assert_eq!(
            cs[1].outcome(),
            Outcome::Refused("PERMISSION_DENIED".into())
        );
        assert_eq!(cs[2].outcome(), Outcome::Unknown);
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let v = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
        assert_eq!(quantile(&v, 0.5), Some(5));
        assert_eq!(quantile(&v, 0.99), Some(10));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn render_lists_verdicts_and_caps_anomalies() {
        let many: Vec<Anomaly> = (0..25)
            .map(|i| Anomaly::new("lost", format!("m{i}"), vec![i]))
            .collect();
        let vs = vec![
            verdict("set_full", "ok".into(), vec![], serde_json::json!({})),
            verdict("delivery", "bad".into(), many, serde_json::json!({})),
        ];
        let text = render_text(&vs);
        assert!(
            text.starts_with("VALID set_full: ok\nINVALID delivery: bad\n"),
            "{text}"
        );
        assert!(text.contains("  - lost: m19 (events [19])"), "{text}");
        assert!(!text.contains("m20"), "{text}");
        assert!(text.contains("and 5 more"), "{text}");
    }

    #[test]
    fn check_all_runs_every_checker() {
        let h = H::new();
        let vs = check_all(&h.events, &Config::default());
        let names: Vec<_> = vs.iter().map(|v| v.checker).collect();
        assert_eq!(
            names,
            [
                "set_full",
                "delivery",
                "order_and_agreement",
                "membership",
                "ban_fence",
                "markers",
                "presence",
                "liveness"
            ]
        );
    }
}
