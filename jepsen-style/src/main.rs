//! `jepsen`: Parley's fault-injection harness.
//!
//! Not built yet: the harness (network namespaces, nemeses, workloads, history
//! checkers) is the subject of its own issue and depends on multi-node replication.
//! Until then this binary says so and exits non-zero, so nothing mistakes it for a pass.

fn main() {
    eprintln!(
        "jepsen: the fault-injection harness is not implemented yet (see the jepsen-style issue)"
    );
    std::process::exit(2);
}
