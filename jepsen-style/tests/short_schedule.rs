//! The CI schedule: every nemesis once (8 s each, 4 s healthy between), on a real
//! 3-node cluster in network namespaces, then every checker. Fails on any anomaly
//! and on any harness error. Needs root (network namespaces); the result folder is
//! kept under target/jepsen-ci/ for inspection.
//!
//! `PARLEY_JEPSEN_SEED` picks another schedule; `PARLEY_JEPSEN_SKIP=1` skips this test
//! explicitly (it then prints that it did not run).

use std::path::PathBuf;
use std::process::Command;

fn parley_binary(jepsen: &std::path::Path) -> PathBuf {
    let dir = jepsen.parent().map(PathBuf::from).unwrap_or_default();
    let parley = dir.join("parley");
    if !parley.exists() {
        // `cargo test -p parley-jepsen` alone does not build the node binary.
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "parley-node", "--bin", "parley"])
            .status()
            .expect("running cargo build for the parley binary");
        assert!(status.success(), "building parley failed");
    }
    parley
}

#[test]
fn every_nemesis_once_finds_no_anomaly() {
    if std::env::var("PARLEY_JEPSEN_SKIP").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: PARLEY_JEPSEN_SKIP=1 (the fault-injection schedule did not run)");
        return;
    }
    let jepsen = PathBuf::from(env!("CARGO_BIN_EXE_jepsen"));
    let parley = parley_binary(&jepsen);
    let seed = std::env::var("PARLEY_JEPSEN_SEED").unwrap_or_else(|_| "1".into());
    let out = jepsen
        .parent()
        .and_then(|d| d.parent())
        .map(|t| t.join("jepsen-ci"))
        .expect("target dir")
        .join(format!(
            "seed{seed}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ));
    let output = Command::new(&jepsen)
        .args([
            "run",
            "--nemesis",
            "all",
            "--each-once",
            "--hold",
            "8s",
            "--quiet",
            "4s",
        ])
        .args(["--seed", &seed, "--quiet-progress", "--out"])
        .arg(&out)
        .arg("--parley")
        .arg(&parley)
        .output()
        .expect("running jepsen");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        !stderr.contains("needs root") || output.status.success(),
        "the harness needs root for network namespaces (or set PARLEY_JEPSEN_SKIP=1)"
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "jepsen found an anomaly or failed; results in {}",
        out.display()
    );
    assert!(stdout.contains("VALID: no anomaly found"), "{stdout}");
    // Every nemesis was applied.
    let history = std::fs::read_to_string(out.join("history.jsonl")).expect("history");
    for fault in [
        "partition-one",
        "partition-majority",
        "partition-bridge",
        "partition-leader",
        "drop-one-way",
        "kill-one",
        "kill-leader",
        "kill-majority",
        "kill-all",
        "pause-one",
        "pause-leader",
        "netem",
        "clock",
    ] {
        assert!(
            history.contains(&format!("\"fault\":\"{fault}\",\"start\":true")),
            "{fault} never ran"
        );
    }
    // Nothing left behind: no namespace of this run remains.
    let hosts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("hosts.json")).expect("hosts"))
            .expect("hosts.json");
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for ns in hosts["namespaces"].as_array().expect("namespaces") {
        let ns = ns.as_str().expect("name");
        assert!(!listed.contains(ns), "namespace {ns} left behind");
    }
}
