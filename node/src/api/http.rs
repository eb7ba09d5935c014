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
    out
}
