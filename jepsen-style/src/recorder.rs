//! The recorder: every process appends its events here, stamped with the time since
//! the run started, into `history.jsonl` (flushed as it goes, so a crashed run still
//! leaves its history) and into memory for the checkers.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::history::{Event, Op, Type, Writer, NEMESIS};
use parley_proto::code_name;

/// A shared, cloneable handle.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
    start: Instant,
}

struct Inner {
    writer: Writer<BufWriter<File>>,
    events: Vec<Event>,
    /// First write error, reported at the end (the run goes on).
    error: Option<String>,
}

impl Recorder {
    pub fn create(path: &Path) -> anyhow::Result<Recorder> {
        let file = File::create(path)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
        Ok(Recorder {
            inner: Arc::new(Mutex::new(Inner {
                writer: Writer::new(BufWriter::new(file)),
                events: Vec::new(),
                error: None,
            })),
            start: Instant::now(),
        })
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// Nanoseconds since the run started.
    pub fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn push(&self, process: u64, node: &str, kind: Type, op: Op, error: Option<String>) {
        let time = self.now();
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let event = Event {
            index: g.events.len() as u64,
            time,
            process,
            node: node.to_string(),
            kind,
            op,
            error,
        };
        if let Err(e) = g.writer.append(event.clone()) {
            g.error.get_or_insert_with(|| e.to_string());
        }
        g.events.push(event);
    }

    pub fn invoke(&self, process: u64, node: &str, op: Op) {
        self.push(process, node, Type::Invoke, op, None);
    }

    pub fn ok(&self, process: u64, node: &str, op: Op) {
        self.push(process, node, Type::Ok, op, None);
    }

    /// A completion that is not `ok`: `fail` or `info` as [`classify`] decided.
    pub fn failed(&self, process: u64, node: &str, op: Op, kind: Type, error: String) {
        self.push(process, node, kind, op, Some(error));
    }

    pub fn nemesis(&self, kind: Type, op: Op) {
        self.push(NEMESIS, "", kind, op, None);
    }

    /// Flushes the file; returns the events and the first write error, if any.
    pub fn finish(&self) -> (Vec<Event>, Option<String>) {
        let mut g = match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Err(e) = g.writer.flush() {
            g.error.get_or_insert_with(|| e.to_string());
        }
        (g.events.clone(), g.error.clone())
    }

    /// Whether process `p`'s last event was a `fail` or `info` other than a refusal
    /// by the node (used to back off while a node is down).
    pub fn last_failed(&self, p: u64) -> bool {
        let g = match self.inner.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        g.events
            .iter()
            .rev()
            .take(512)
            .find(|e| e.process == p)
            .is_some_and(|e| {
                matches!(
                    e.error.as_deref(),
                    Some("CONNECT" | "TRANSPORT" | "UNAVAILABLE" | "DEADLINE_EXCEEDED")
                )
            })
    }

    pub fn snapshot(&self) -> Vec<Event> {
        match self.inner.lock() {
            Ok(g) => g.events.clone(),
            Err(p) => p.into_inner().events.clone(),
        }
    }
}

/// How a gRPC error completes an operation: `fail` when the status says the
/// operation definitely did not happen (or happened as a refusal), `info` when it
/// may have happened (DEADLINE_EXCEEDED: written but not confirmed; a transport
/// error or a local timeout: the request may have arrived).
pub fn classify(status: &tonic::Status) -> (Type, String) {
    use tonic::Code;
    if refused(status) {
        // The connection was never made, so the request was never sent.
        return (Type::Fail, "CONNECT".to_string());
    }
    let kind = match status.code() {
        Code::DeadlineExceeded
        | Code::Unknown
        | Code::Internal
        | Code::Cancelled
        | Code::Aborted
        | Code::DataLoss => Type::Info,
        // UNAVAILABLE from the node means nothing was written; but tonic also reports
        // a broken connection as UNAVAILABLE ("transport error"), and then the request
        // may have been received: only the node's own refusals are definite.
        Code::Unavailable if is_transport(status) => Type::Info,
        _ => Type::Fail,
    };
    let name = if kind == Type::Info && is_transport(status) {
        "TRANSPORT".to_string()
    } else {
        code_name(status.code()).to_string()
    };
    (kind, name)
}

/// Whether the error chain says the TCP connection could not be made.
fn refused(status: &tonic::Status) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    // Bounded: error chains are short; stop after 16 links anyway.
    for _ in 0..16 {
        let Some(e) = cur else { break };
        let text = e.to_string().to_ascii_lowercase();
        if text.contains("connection refused") || text.contains("tcp connect error") {
            return true;
        }
        cur = e.source();
    }
    false
}

fn is_transport(status: &tonic::Status) -> bool {
    // Statuses the node sends carry its own message; tonic's transport failures say
    // "transport error", "connection" or "h2 protocol error" and carry a source.
    let m = status.message().to_ascii_lowercase();
    std::error::Error::source(status).is_some()
        || m.contains("transport error")
        || m.contains("connection")
        || m.contains("h2 protocol")
        || m.contains("broken pipe")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn node_refusals_are_definite_and_timeouts_are_not() {
        let (k, n) = classify(&tonic::Status::unavailable("no quorum for partition 3"));
        assert_eq!((k, n.as_str()), (Type::Fail, "UNAVAILABLE"));
        let (k, n) = classify(&tonic::Status::permission_denied("banned"));
        assert_eq!((k, n.as_str()), (Type::Fail, "PERMISSION_DENIED"));
        let (k, n) = classify(&tonic::Status::deadline_exceeded("not confirmed"));
        assert_eq!((k, n.as_str()), (Type::Info, "DEADLINE_EXCEEDED"));
        let (k, n) = classify(&tonic::Status::unavailable("transport error"));
        assert_eq!((k, n.as_str()), (Type::Info, "TRANSPORT"));
    }

    #[test]
    fn events_are_numbered_and_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        let r = Recorder::create(&path).unwrap();
        let op = Op::SetPresence { user: "u1".into() };
        r.invoke(1, "n1", op.clone());
        r.ok(1, "n1", op);
        let (events, err) = r.finish();
        assert!(err.is_none());
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].index, 1);
        let back = crate::history::read(&path).unwrap();
        assert_eq!(back, events);
    }
}
