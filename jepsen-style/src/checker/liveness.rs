//! `liveness`: every `liveness` op must complete `ok` with `elapsed_ms` within its
//! bound ("over bound" otherwise); a `fail`, `info` or missing completion is "not
//! live". The bound is the op's `bound_ms`; for `what = "converged"` it is tightened to
//! `Config::convergence_bound_ms` when that is set (non-zero). For `what = "leaders"`
//! the figures also give the time in election timeouts. No liveness op at all is
//! valid, with the note "not measured".

use serde_json::json;

use super::{calls, verdict, Anomaly, Config, Verdict};
use crate::history::{Event, Op};

const NAME: &str = "liveness";

pub fn check(history: &[Event], cfg: &Config) -> Verdict {
    let cs = calls(history);
    let mut anomalies = Vec::new();
    let mut figures = Vec::new();
    for c in &cs {
        let Op::Liveness { what, bound_ms, .. } = &c.inv.op else {
            continue;
        };
        let mut bound = *bound_ms;
        if what == "converged" && cfg.convergence_bound_ms > 0 {
            bound = bound.min(cfg.convergence_bound_ms);
        }
        let elapsed = match c.op() {
            Op::Liveness { elapsed_ms, .. } if c.is_ok() => *elapsed_ms,
            _ => None,
        };
        figures.push(json!({
            "what": what,
            "elapsed_ms": elapsed,
            "bound_ms": bound,
            "election_timeouts": (what == "leaders" && cfg.election_timeout_ms > 0)
                .then(|| elapsed.map(|e| e as f64 / cfg.election_timeout_ms as f64)),
        }));
        match elapsed {
            Some(e) if e <= bound => {}
            Some(e) => anomalies.push(Anomaly::new(
                "over bound",
                format!("{what} took {e} ms, bound {bound} ms"),
                c.events(),
            )),
            None => anomalies.push(Anomaly::new(
                "not live",
                format!(
                    "{what} was not measured within its bound ({})",
                    c.done
                        .and_then(|d| d.error.clone())
                        .unwrap_or_else(|| "no result".into())
                ),
                c.events(),
            )),
        }
    }
    let summary = if figures.is_empty() {
        "not measured".to_string()
    } else {
        format!("{} measurements; {} failed", figures.len(), anomalies.len())
    };
    verdict(NAME, summary, anomalies, json!({ "measurements": figures }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::testkit::H;
    use super::*;

    fn live(what: &str, elapsed: Option<u64>, bound: u64) -> Op {
        Op::Liveness {
            what: what.into(),
            elapsed_ms: elapsed,
            bound_ms: bound,
        }
    }

    #[test]
    fn no_measurement_is_valid_but_says_so() {
        let v = check(&H::new().events, &Config::default());
        assert!(v.valid);
        assert_eq!(v.summary, "not measured");
    }

    #[test]
    fn within_bounds_passes() {
        let mut h = H::new();
        h.call(
            9,
            "",
            live("leaders", None, 5_000),
            live("leaders", Some(1_200), 5_000),
        );
        h.call(
            9,
            "",
            live("converged", None, 60_000),
            live("converged", Some(9_000), 60_000),
        );
        let v = check(&h.events, &Config::default());
        assert!(v.valid, "{v:?}");
        assert_eq!(v.stats["measurements"][0]["election_timeouts"], 2.0);
    }

    #[test]
    fn catches_over_bound_and_not_live() {
        let mut h = H::new();
        h.call(
            9,
            "",
            live("leaders", None, 1_000),
            live("leaders", Some(1_500), 1_000),
        );
        // Tightened by the configured convergence bound (30 s).
        h.call(
            9,
            "",
            live("converged", None, 60_000),
            live("converged", Some(40_000), 60_000),
        );
        h.invoke(9, "", live("converged", None, 60_000));
        h.fail(9, "", live("converged", None, 60_000), "DEADLINE_EXCEEDED");
        let v = check(&h.events, &Config::default());
        assert!(!v.valid);
        let kinds: Vec<_> = v.anomalies.iter().map(|a| a.kind.as_str()).collect();
        assert_eq!(kinds, ["over bound", "over bound", "not live"]);
    }
}
