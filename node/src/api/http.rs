//! The HTTP side of a node: `/healthz` (200 once serving) and `/metrics` (Prometheus
//! text). The JSON/WebSocket gateway for the web client is to come.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;

use super::Ctx;

pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> String {
    let m = &ctx.metrics;
    let flush = ctx.db.stats();
    let mut out = String::new();
    let mut line = |name: &str, help: &str, kind: &str, v: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    };
    line(
        "parley_messages_sent_total",
        "Messages acknowledged (durable).",
        "counter",
        m.messages_sent.load(Relaxed),
    );
    line(
        "parley_messages_duplicate_total",
        "Sends answered from an earlier client_msg_id.",
        "counter",
        m.messages_duplicate.load(Relaxed),
    );
    line(
        "parley_requests_failed_total",
        "Requests answered with an error status.",
        "counter",
        m.requests_failed.load(Relaxed),
    );
    line(
        "parley_raft_writes_total",
        "Raft commands proposed.",
        "counter",
        m.raft_writes.load(Relaxed),
    );
    line(
        "parley_subscriptions_opened_total",
        "Subscribe streams opened.",
        "counter",
        m.subscriptions_opened.load(Relaxed),
    );
    line(
        "parley_subscribers",
        "Live room subscriptions.",
        "gauge",
        ctx.hub.subscriber_count() as u64,
    );
    line(
        "parley_store_flushes_total",
        "fsyncs (group commits).",
        "counter",
        flush.flushes.load(Relaxed),
    );
    line(
        "parley_store_flush_waiters_total",
        "Writes made durable by group commits.",
        "counter",
        flush.waiters.load(Relaxed),
    );
    line(
        "parley_store_bytes",
        "Bytes on disk.",
        "gauge",
        ctx.db.size_on_disk(),
    );
    line(
        "parley_rooms_in_memory",
        "Rooms with an open chunk in memory.",
        "gauge",
        ctx.timelines.rooms_in_memory() as u64,
    );
    let led = ctx
        .placement
        .all()
        .filter(|p| ctx.groups.leader_of(*p) == Some(ctx.node.0))
        .count();
    line(
        "parley_partitions_led",
        "Partitions whose Raft group this node leads (the home of their rooms).",
        "gauge",
        led as u64,
    );
    line(
        "parley_raft_terms_total",
        "Sum of the current Raft terms of this node's groups: it grows by one per election.",
        "counter",
        ctx.groups.terms_sum(),
    );
    line(
        "parley_raft_leadership_checks_missed_total",
        "Heartbeats confirming this node's leadership that a peer did not answer in time \
         (openraft's ERROR line for them is logged at most once per 10 s).",
        "counter",
        crate::consensus::raft_log::leadership_checks_missed(),
    );
    line(
        "parley_raft_peer_rpcs_failed_total",
        "Raft RPCs to peers (replication, heartbeats, vote requests) that failed or timed out \
         (openraft's ERROR lines for them are logged at most once per 10 s per kind).",
        "counter",
        crate::consensus::raft_log::peer_rpcs_failed(),
    );
    let (done, failed) = ctx.groups.handovers();
    line(
        "parley_leader_handovers_total",
        "Partition leaderships this node handed over to their preferred node.",
        "counter",
        done,
    );
    line(
        "parley_leader_handovers_failed_total",
        "Handovers this node started that did not land (the group stayed or went elsewhere).",
        "counter",
        failed,
    );
    let a = &ctx.admission;
    line(
        "parley_sends_in_progress",
        "Sends this node is writing now (at most parley_sends_in_progress_limit).",
        "gauge",
        a.in_progress() as u64,
    );
    line(
        "parley_sends_in_progress_limit",
        "Sends this node writes at once (--max-sends-in-progress).",
        "gauge",
        a.limit() as u64,
    );
    line(
        "parley_sends_waited_total",
        "Sends that waited for a place to be written.",
        "counter",
        a.waited.load(Relaxed),
    );
    line(
        "parley_sends_refused_busy_total",
        "Sends refused because no place came free within the admission wait (nothing written).",
        "counter",
        a.refused.load(Relaxed),
    );
    let f = &ctx.forward_lanes.stats;
    line(
        "parley_sends_forwarded_total",
        "Sends this node forwarded to their room's home on a ForwardSends stream.",
        "counter",
        f.sent.load(Relaxed),
    );
    line(
        "parley_forward_messages_total",
        "Stream messages that carried them (several sends each under load).",
        "counter",
        f.messages.load(Relaxed),
    );
    line(
        "parley_forward_streams_opened_total",
        "ForwardSends streams this node opened (one per home; another after one breaks).",
        "counter",
        f.streams.load(Relaxed),
    );
    line(
        "parley_forwarded_sends_received_total",
        "Forwarded sends this node ran as the room's home.",
        "counter",
        f.received.load(Relaxed),
    );
    let r = ctx.timelines.stats();
    line(
        "parley_pushes_taken_total",
        "Pushes of this node's writes that a peer answered as durable.",
        "counter",
        r.pushes_taken.load(Relaxed),
    );
    line(
        "parley_pushes_not_taken_total",
        "Pushes a peer answered without taking them (refused, or waiting for earlier changes).",
        "counter",
        r.pushes_not_taken.load(Relaxed),
    );
    line(
        "parley_pushes_failed_total",
        "Pushes with no answer (call failed or timed out); anti-entropy brings them.",
        "counter",
        r.pushes_failed.load(Relaxed),
    );
    line(
        "parley_writes_short_of_quorum_total",
        "Writes answered DEADLINE_EXCEEDED: fewer than W durable copies in time.",
        "counter",
        r.writes_short_of_quorum.load(Relaxed),
    );
    line(
        "parley_pushes_received_taken_total",
        "Pushes from peers applied whole and durable.",
        "counter",
        m.pushes_received_taken.load(Relaxed),
    );
    line(
        "parley_pushes_received_waiting_total",
        "Pushes from peers applied and durable but waiting for earlier changes.",
        "counter",
        m.pushes_received_waiting.load(Relaxed),
    );
    line(
        "parley_pushes_received_refused_total",
        "Pushes from peers refused (fence, stale home, damaged change).",
        "counter",
        m.pushes_received_refused.load(Relaxed),
    );
    line(
        "parley_anti_entropy_exchanges_total",
        "Anti-entropy exchanges this node started that completed.",
        "counter",
        r.exchanges_completed.load(Relaxed),
    );
    line(
        "parley_anti_entropy_exchanges_failed_total",
        "Anti-entropy exchanges this node started that failed or timed out.",
        "counter",
        r.exchanges_failed.load(Relaxed),
    );
    line(
        "parley_anti_entropy_entries_gained_total",
        "Timeline entries this node gained through anti-entropy exchanges it started.",
        "counter",
        r.exchange_entries_gained.load(Relaxed),
    );
    line(
        "parley_anti_entropy_sealed_same_heads_total",
        "Anti-entropy exchanges this node started over a sealed chunk that ended at once: both sides held the same heads.",
        "counter",
        r.sealed_same_heads.load(Relaxed),
    );
    line(
        "parley_sealed_chunk_loads_total",
        "Sealed timeline chunks loaded whole from the store.",
        "counter",
        r.sealed_loads.load(Relaxed),
    );
    histogram(
        &mut out,
        "parley_write_ack_seconds",
        "Time from a send reaching its room's home until W replicas held it durably.",
        &r.write_ack.snapshot(),
    );
    histogram(
        &mut out,
        "parley_store_flush_seconds",
        "Group commits: sled writing out its log buffers and the fsync, per flush.",
        &ctx.db.stats().flush_seconds.snapshot(),
    );
    histogram(
        &mut out,
        "parley_send_seconds",
        "Acknowledged client SendMessage calls, handler entry to answer on the node called (auth, forward to the home, write).",
        &m.send_latency.snapshot(),
    );
    out
}

fn histogram(out: &mut String, name: &str, help: &str, h: &crate::stats::HistogramSnapshot) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
    for (bound, n) in &h.cumulative {
        let le = if bound.is_finite() {
            bound.to_string()
        } else {
            "+Inf".to_string()
        };
        out.push_str(&format!("{name}_bucket{{le=\"{le}\"}} {n}\n"));
    }
    out.push_str(&format!(
        "{name}_sum {}\n{name}_count {}\n",
        h.sum_seconds, h.count
    ));
}
