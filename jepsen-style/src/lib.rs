//! Parley's fault-injection harness: hosts in network namespaces, nemeses,
//! workloads through the real client API, and checkers over the recorded history.

pub mod checker;
pub mod history;
