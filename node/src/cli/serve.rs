//! `parley serve`: flags -> [`Config`], logging to stderr, SIGINT/SIGTERM. The node
//! itself writes `<data-dir>/node.json` and prints the `parley: serving ...` line.

use std::time::Duration;

use anyhow::Context as _;

use super::args::ServeArgs;
use crate::node::{self, Config};

impl ServeArgs {
    pub fn to_config(&self) -> Config {
        let mut c = Config::default_for(self.data_dir.clone());
        c.listen = self.listen;
        c.http = self.http;
        c.p2p = self.p2p.clone();
        c.join = self.join.clone();
        c.bootstrap_expect = self.bootstrap_expect;
        c.node_id = self.node_id;
        c.partitions = self.partitions;
        c.write_quorum = self.write_quorum;
        c.presence_ttl = Duration::from_secs(self.presence_ttl);
        c.clock_offset_ms = self.clock_offset_ms;
        c.cluster = self.cluster.clone();
        c.genesis_timeout = Duration::from_secs(self.genesis_timeout);
        c.snapshot_every = self.raft_snapshot_every;
        c.compact_every = self.timeline_compact_every;
        c.chunk_entries = self.timeline_chunk_entries;
        c.commit_linger = self.timeline_commit_linger_us.map(Duration::from_micros);
        c.balance_leaders = !self.no_leader_balance;
        c.max_sends_in_progress = self.max_sends_in_progress as usize;
        c.store_cache_mib = self.store_cache_mib;
        if self.admission_wait_ms > 0 {
            c.admission_wait = Duration::from_millis(self.admission_wait_ms);
        }
        c
    }
}

/// Runs a node until SIGINT or SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing();
    let config = args.to_config();
    crate::delivery::set_resume_window_ms(args.resume_window_ms);
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create the data dir {}", config.data_dir.display()))?;
    node::run(config, shutdown_signal()).await
}

/// automerge instruments `load_changes` with an INFO span whose fields Debug-format the
/// document's whole change graph: with automerge at `info`, every applied push paid a
/// walk over its chunk's history, and throughput decayed as chunks grew (BENCHMARKS.md
/// §3). So automerge logs at WARN unless `RUST_LOG` names it.
const AUTOMERGE_LOG: &str = "automerge=warn";

/// The log filter for a `RUST_LOG` value (`None`: unset): `info` by default, automerge
/// held at WARN unless the value says otherwise.
fn log_filter(rust_log: Option<&str>) -> String {
    match rust_log {
        Some(spec) if spec.contains("automerge") => spec.to_string(),
        Some(spec) if !spec.trim().is_empty() => format!("{spec},{AUTOMERGE_LOG}"),
        _ => format!("info,{AUTOMERGE_LOG}"),
    }
}

fn init_tracing() {
    let spec = std::env::var("RUST_LOG").ok();
    let filter = tracing_subscriber::EnvFilter::try_new(log_filter(spec.as_deref()))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_filter(None)));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Colours only on a terminal, so log files stay plain text. `try_init` fails only
    // if a subscriber is already set, which then keeps logging. openraft's lines per
    // failed RPC to a peer: at most one of a kind per 10 s, all counted
    // (`consensus::raft_log`).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(crate::consensus::raft_log::QuietRaftPeerFailures::default())
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi),
        )
        .try_init();
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_filter_holds_automerge_at_warn_unless_told_otherwise() {
        assert_eq!(log_filter(None), "info,automerge=warn");
        assert_eq!(log_filter(Some("")), "info,automerge=warn");
        assert_eq!(log_filter(Some("debug")), "debug,automerge=warn");
        assert_eq!(
            log_filter(Some("info,automerge=trace")),
            "info,automerge=trace"
        );
        for spec in [None, Some("debug"), Some("info,openraft=warn")] {
            let f = log_filter(spec);
            assert!(
                tracing_subscriber::EnvFilter::try_new(&f).is_ok(),
                "{f} does not parse"
            );
        }
    }
}
