//! The real `testnet demo` with the real `parley` binary: exit 0 and a PASS line for
//! every check.
//!
//! Like [`super::cluster`], it needs `parley` beside the `testnet` binary (`cargo test
//! --workspace` builds it); without it the test says so and passes without running.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TESTNET: &str = env!("CARGO_BIN_EXE_testnet");

/// The checks `testnet demo` prints, in order (testnet/src/demo.rs `CHECKS`).
const CHECKS: [&str; 8] = [
    "cluster formed: 3 nodes, every Raft group led",
    "alice, bob and carol created on nodes 1, 2 and 3",
    "room demo created by alice; bob and carol joined (3 members)",
    "carol's stream on node 3 showed all 10 messages",
    "bob and carol kept chatting via nodes 2 and 3 after kill -9 of node 1",
    "carol's stream showed all 15 messages, none twice",
    "node 1 restarted on the same ports and data dir and serves",
    "node 1's history has all 15 messages, in node 2's order",
];

fn drain<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        let _ = tx.send(String::from_utf8_lossy(&v).into_owned());
    });
    rx
}

#[test]
fn demo_passes_every_check() {
    let parley = Path::new(TESTNET).with_file_name("parley");
    if !parley.is_file() {
        eprintln!(
            "SKIPPED: no `parley` beside {TESTNET}; build it first (cargo build -p parley-node), \
             or run `cargo test --workspace`"
        );
        return;
    }
    let mut child = Command::new(TESTNET)
        .arg("demo")
        .arg("--parley")
        .arg(&parley)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());
    // The demo bounds each of its own waits; this is a backstop. On timeout it gets
    // SIGINT first, so that it stops its nodes by PID, and SIGKILL only after that.
    let within = Duration::from_secs(240);
    let deadline = Instant::now() + within;
    let mut interrupted = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if !interrupted && Instant::now() > deadline {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(child.id().to_string())
                .status();
            interrupted = true;
        }
        if Instant::now() > deadline + Duration::from_secs(20) {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_default();
    let stderr = err
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_default();
    println!("{stdout}"); // shown with --nocapture
    assert!(
        !interrupted,
        "`testnet demo` did not finish within {within:?}\n{stdout}\n{stderr}"
    );
    assert!(
        status.success(),
        "demo failed ({status})\n{stdout}\n{stderr}"
    );
    for name in CHECKS {
        assert!(
            stdout.lines().any(|l| l == format!("PASS  {name}")),
            "no PASS line for {name:?}\n{stdout}\n{stderr}"
        );
    }
    assert!(!stdout.lines().any(|l| l.starts_with("FAIL")), "{stdout}");
    assert!(
        stdout.contains("RESULT demo PASS: 8/8 checks passed"),
        "{stdout}"
    );
    assert!(stdout.contains("[node 3] alice: "), "{stdout}");
    assert!(stdout.contains("kill -9 node 1 (pid "), "{stdout}");
    assert!(stdout.contains("Stopping every node (by PID)."), "{stdout}");
}
