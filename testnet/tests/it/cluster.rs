//! The real `testnet up --nodes 3` with the real `parley` binary: readiness, status,
//! kill, start, down, and every PID gone at the end.
//!
//! `parley` must sit beside the `testnet` binary (`cargo test --workspace` builds every
//! binary first; `cargo test -p parley-testnet` alone does not build it, and then this
//! test says so and passes without running).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const TESTNET: &str = env!("CARGO_BIN_EXE_testnet");

fn parley() -> Option<PathBuf> {
    let p = Path::new(TESTNET).with_file_name("parley");
    p.is_file().then_some(p)
}

/// Runs `testnet ARGS...` to completion, bounded.
fn testnet(args: &[&str], within: Duration) -> Output {
    let mut child = Command::new(TESTNET)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`testnet {}` did not finish within {within:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.recv_timeout(Duration::from_secs(5)).unwrap_or_default(),
        stderr: err.recv_timeout(Duration::from_secs(5)).unwrap_or_default(),
    }
}

fn drain<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        let _ = tx.send(v);
    });
    rx
}

fn lines<R: Read + Send + 'static>(r: R, tag: &'static str) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            println!("[{tag}] {line}"); // shown with --nocapture
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (bounded) for a line containing `needle`, keeping every line read in `seen`.
fn wait_line(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>, needle: &str, within: Duration) {
    if seen.iter().any(|l| l.contains(needle)) {
        return;
    }
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.contains(needle);
                seen.push(l);
                if hit {
                    return;
                }
            }
            Err(_) => panic!("no line with {needle:?} within {within:?}; saw {seen:#?}"),
        }
    }
}

fn status_json(dir: &str) -> Value {
    let out = testnet(&["status", "--dir", dir, "--json"], Duration::from_secs(20));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "status --json is not JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Polls `testnet status --json` until `ok` holds (bounded).
fn wait_status(dir: &str, what: &str, within: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v = status_json(dir);
        if ok(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed {what} within {within:?}: {v:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn node(v: &Value, id: u64) -> &Value {
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap()
}

/// Not running: no /proc entry, or a zombie waiting for a reaper.
fn gone(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|s| s == "Z" || s == "X"),
    }
}

/// Stops whatever the test started if it fails halfway: the `up` child by its handle,
/// the nodes through `testnet down` (which goes by the saved PIDs).
struct Guard {
    up: Option<Child>,
    dir: String,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut up) = self.up.take() {
            if up.try_wait().ok().flatten().is_none() {
                let _ = up.kill();
                let _ = up.wait();
            }
            let _ = testnet(&["down", "--dir", &self.dir], Duration::from_secs(20));
        }
    }
}

#[test]
fn up_status_kill_start_down() {
    let t0 = Instant::now();
    let Some(parley) = parley() else {
        eprintln!(
            "SKIPPED: no `parley` beside {TESTNET}; build it first (cargo build -p parley-node), \
             or run `cargo test --workspace`"
        );
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tn").display().to_string();
    let mut up = Command::new(TESTNET)
        .args(["up", "--nodes", "3", "--base-port", "0", "--timeout", "60s"])
        .args(["--dir", &dir])
        .arg("--parley")
        .arg(&parley)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(up.stdout.take().unwrap(), "up");
    let err = lines(up.stderr.take().unwrap(), "up!");
    let mut guard = Guard {
        up: Some(up),
        dir: dir.clone(),
    };

    // Ready: the table, then the line to paste.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut printed = Vec::new();
    let export = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match out.recv_timeout(left) {
            Ok(l) if l.starts_with("export PARLEY_NODE=127.0.0.1:") => break l,
            Ok(l) => printed.push(l),
            Err(_) => panic!("`testnet up` not ready within 60s; printed {printed:?}"),
        }
    };
    assert!(printed[0].starts_with("node"), "{printed:?}");
    assert_eq!(
        printed.iter().filter(|l| l.contains(&dir)).count(),
        3,
        "one row per node: {printed:?}"
    );

    let v = wait_status(&dir, "a healthy cluster", Duration::from_secs(10), |v| {
        v["healthy"] == true
    });
    let first = node(&v, 1)["grpc"].as_str().unwrap().to_string();
    assert_eq!(export, format!("export PARLEY_NODE={first}"));
    assert_eq!(v["cluster_status"]["nodes"].as_array().unwrap().len(), 3);
    let mut pids: Vec<u64> = (1..=3)
        .map(|i| node(&v, i)["pid"].as_u64().unwrap())
        .collect();
    let text = testnet(&["status", "--dir", &dir], Duration::from_secs(20));
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).contains("healthy: every node runs"));

    // kill 2: status shows it down and the cluster unhealthy; `up` reports the exit.
    let k = testnet(&["kill", "2", "--dir", &dir], Duration::from_secs(10));
    assert!(k.status.success(), "{}", String::from_utf8_lossy(&k.stderr));
    let v = wait_status(&dir, "node 2 down", Duration::from_secs(10), |v| {
        node(v, 2)["running"] == false && node(v, 2)["reachable"] == false
    });
    assert_eq!(v["healthy"], false);
    assert_eq!(node(&v, 1)["running"], true);
    let down = testnet(&["status", "--dir", &dir], Duration::from_secs(20));
    assert!(
        !down.status.success(),
        "status exits non-zero while a node is down"
    );
    let mut said = Vec::new();
    wait_line(&err, &mut said, "exited: signal: 9", Duration::from_secs(5));
    assert!(
        said.iter().any(|l| l.starts_with("node 2 (pid")),
        "{said:#?}"
    );

    // start 2: same ports, back in the cluster; `up` notices.
    let s = testnet(&["start", "2", "--dir", &dir], Duration::from_secs(60));
    assert!(
        s.status.success(),
        "{}{}",
        String::from_utf8_lossy(&s.stdout),
        String::from_utf8_lossy(&s.stderr)
    );
    let v = wait_status(&dir, "node 2 back", Duration::from_secs(30), |v| {
        v["healthy"] == true
    });
    let new2 = node(&v, 2)["pid"].as_u64().unwrap();
    assert_ne!(new2, pids[1]);
    pids.push(new2);
    wait_line(
        &err,
        &mut said,
        "node 2 restarted by hand",
        Duration::from_secs(5),
    );

    // down: every node stops; `up` sees them go and exits by itself.
    let d = testnet(&["down", "--dir", &dir], Duration::from_secs(30));
    assert!(d.status.success(), "{}", String::from_utf8_lossy(&d.stdout));
    let mut up = guard.up.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let up_status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = up.kill();
            let _ = up.wait();
            panic!("`testnet up` did not exit after `testnet down`");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // It saw node 2 die unexpectedly, so it reports failure.
    assert!(!up_status.success());
    // The reader thread ends when `up`'s stderr closes (it has exited).
    while let Ok(l) = err.recv_timeout(Duration::from_secs(5)) {
        said.push(l);
    }
    let said = said.join("\n");
    assert!(said.contains("node 1 (pid"), "{said}");
    assert!(said.contains("stopped by `testnet down`"), "{said}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| !gone(*p)) {
        assert!(
            Instant::now() < deadline,
            "still running after down: {:?}",
            pids.iter().filter(|p| !gone(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = status_json(&dir);
    assert!((1..=3).all(|i| node(&after, i)["running"] == false));
    assert!(
        t0.elapsed() < Duration::from_secs(90),
        "took {:?}",
        t0.elapsed()
    );
}

/// `bench --compare A,B`: each build runs on a cluster of its own, started and
/// stopped for the run, the rounds alternate the order, and the tables name every
/// run and summarize each build. The two "builds" are the same binary under two names.
#[test]
fn compare_runs_each_build_on_a_fresh_cluster() {
    let Some(parley) = parley() else {
        eprintln!("SKIPPED: no `parley` beside {TESTNET}; run `cargo test --workspace`");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("old-parley"), tmp.path().join("new-parley"));
    std::os::unix::fs::symlink(&parley, &a).unwrap();
    std::os::unix::fs::symlink(&parley, &b).unwrap();
    let json = tmp.path().join("compare.json");
    let builds = format!("{},{}", a.display(), b.display());
    let json_arg = json.display().to_string();
    let out = testnet(
        &[
            "bench",
            "--compare",
            &builds,
            "--rounds",
            "2",
            "--senders",
            "4",
            "--rooms",
            "2",
            "--subscribers-per-room",
            "1",
            "--messages",
            "100",
            "--drain",
            "5s",
            "--json",
            &json_arg,
        ],
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("A: {}", a.display())), "{stdout}");
    for row in ["| 1 | A |", "| 2 | B |", "| 3 | B |", "| 4 | A |"] {
        assert!(stdout.contains(row), "no row {row}:\n{stdout}");
    }
    assert!(
        stdout.contains("| B | 2 |") && stdout.contains("acked/s "),
        "{stdout}"
    );

    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = r["runs"].as_array().unwrap();
    let order: Vec<u64> = runs.iter().map(|x| x["binary"].as_u64().unwrap()).collect();
    assert_eq!(order, [0, 1, 1, 0]);
    let mut pids = Vec::new();
    for run in runs {
        let rep = &run["report"];
        assert_eq!(rep["acked"], 100, "{run}");
        assert_eq!(rep["delivery_check"]["lost"], 0, "{run}");
        assert_eq!(run["node_died"], false);
        let nodes = rep["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3, "{run}");
        pids.extend(nodes.iter().map(|n| n["pid"].as_u64().unwrap()));
    }
    // A cluster of its own per run, every node stopped by the end.
    let distinct: std::collections::BTreeSet<_> = pids.iter().collect();
    assert_eq!(distinct.len(), 12, "{pids:?}");
    assert!(pids.iter().all(|p| gone(*p)), "{pids:?}");
    let summary = r["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 2);
    for s in summary {
        assert_eq!(s["runs"], 2);
        assert!(s["acked_per_s"]["median"].as_f64().unwrap() > 0.0, "{s}");
    }
}
