//! End-to-end tests of the `testnet` binary: the bench against an in-memory mock of
//! the Chat API (here), and a real 3-node cluster through `up`/`status`/`kill`/
//! `start`/`down` ([`cluster`]), and the narrated `testnet demo` ([`demo`]).
#![allow(clippy::unwrap_used)]

mod cluster;
mod demo;
mod mock;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

/// Runs `testnet bench --target ADDR ARGS... --json OUT --plot OUT.svg`, bounded.
async fn bench(addr: std::net::SocketAddr, dir: &Path, extra: &[&str]) -> Value {
    let json = dir.join("bench.json");
    let svg = dir.join("bench.svg");
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_testnet"));
    cmd.arg("bench")
        .arg("--target")
        .arg(addr.to_string())
        .args(extra)
        .arg("--json")
        .arg(&json)
        .arg("--plot")
        .arg(&svg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("bench finished within 90s")
        .expect("bench ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed\n{stdout}\n{stderr}");
    println!("{stdout}"); // shown with --nocapture
    assert!(stdout.contains("RESULT acked_per_s="), "{stdout}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches(r#"class="series""#).count(), 2);
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_bench_counts_every_delivery() {
    let addr = mock::serve().await;
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        addr,
        dir.path(),
        &[
            "--rooms",
            "5",
            "--senders",
            "4",
            "--subscribers-per-room",
            "2",
            "--messages",
            "2000",
            "--inflight",
            "4",
            "--size",
            "64",
            "--drain",
            "3s",
        ],
    )
    .await;
    assert_eq!(r["acked"], 2000);
    assert_eq!(r["send_errors"], 0);
    let check = &r["delivery_check"];
    assert_eq!(check["expected"], 4000);
    assert_eq!(check["delivered"], 4000);
    assert_eq!(check["lost"], 0);
    assert_eq!(check["duplicates"], 0);
    assert_eq!(r["ack_latency"]["count"], 2000);
    assert_eq!(r["delivery_latency"]["count"], 4000);
    assert!(r["acked_per_s"].as_f64().unwrap() > 0.0);
    assert!(r["client"]["cpu_s"].as_f64().is_some());
    let per_second: u64 = r["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["acked"].as_u64().unwrap())
        .sum();
    assert_eq!(per_second, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_bench_keeps_the_rate() {
    let addr = mock::serve().await;
    let dir = tempfile::tempdir().unwrap();
    let r = bench(
        addr,
        dir.path(),
        &[
            "--rooms",
            "3",
            "--senders",
            "4",
            "--subscribers-per-room",
            "1",
            "--rate",
            "500",
            "--duration",
            "2s",
            "--drain",
            "2s",
        ],
    )
    .await;
    let acked = r["acked"].as_u64().unwrap();
    assert!((990..=1010).contains(&acked), "acked {acked}");
    assert_eq!(r["delivery_check"]["lost"], 0);
    assert_eq!(r["config"]["rate"], 500.0);
}

/// Runs `testnet bench --target ADDR ARGS... --json OUT` (no chart), bounded; returns
/// stdout and the JSON.
async fn bench_json(addr: std::net::SocketAddr, dir: &Path, extra: &[&str]) -> (String, Value) {
    let json = dir.join("bench.json");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_testnet"))
        .arg("bench")
        .arg("--target")
        .arg(addr.to_string())
        .args(extra)
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), out)
        .await
        .expect("bench finished within 90s")
        .expect("bench ran");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed\n{stdout}\n{stderr}");
    println!("{stdout}"); // shown with --nocapture
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (stdout, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_mode_connects_everyone_and_delivers_to_all() {
    let addr = mock::serve().await;
    let dir = tempfile::tempdir().unwrap();
    let (stdout, r) = bench_json(
        addr,
        dir.path(),
        &["--clients", "50", "--rooms", "5", "--probe-messages", "2"],
    )
    .await;
    assert!(
        stdout.contains("RESULT clients=50 connected=50"),
        "{stdout}"
    );
    assert_eq!(r["connected"], 50);
    assert_eq!(r["failed"], 0);
    assert_eq!(r["config"]["rooms"], 5);
    assert_eq!(r["probe_acked"], 10);
    // 2 probes x 5 rooms, each room with 10 clients.
    let check = &r["delivery_check"];
    assert_eq!(check["expected"], 100);
    assert_eq!(check["delivered"], 100);
    assert_eq!(check["lost"], 0);
    assert_eq!(r["connect_subscribe_latency"]["count"], 50);
    // No node PIDs with --target: no per-connection node memory, the client side only.
    assert!(r["node_kib_per_connection"].is_null());
    assert!(r["client_kib_per_connection"].as_f64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_runs_once_per_value_and_prints_a_table() {
    let addr = mock::serve().await;
    let dir = tempfile::tempdir().unwrap();
    let (stdout, r) = bench_json(
        addr,
        dir.path(),
        &[
            "--sweep-senders",
            "1,4",
            "--rooms",
            "3",
            "--subscribers-per-room",
            "1",
            "--messages",
            "200",
            "--drain",
            "2s",
        ],
    )
    .await;
    assert!(stdout.starts_with("| W | senders | acked/s"), "{stdout}");
    assert!(stdout.contains("| default | 1 |"), "{stdout}");
    assert!(stdout.contains("| default | 4 |"), "{stdout}");
    let points = r["points"].as_array().unwrap();
    assert_eq!(points.len(), 2);
    for (p, senders) in points.iter().zip([1, 4]) {
        assert_eq!(p["senders"], senders);
        assert_eq!(p["report"]["acked"], 200);
        assert_eq!(p["report"]["config"]["senders"], senders);
        assert_eq!(p["report"]["delivery_check"]["lost"], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_parley_binary_is_a_clear_error() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_testnet"))
        .args([
            "bench",
            "--parley",
            "/nonexistent/parley",
            "--messages",
            "1",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/parley"), "{stderr}");
}
