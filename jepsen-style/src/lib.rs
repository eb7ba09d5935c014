//! Parley's fault-injection harness: hosts in network namespaces, nemeses,
//! workloads through the real client API, and checkers over the recorded history.

pub mod checker;
pub mod history;
pub mod matrix;
pub mod nemesis;
pub mod net;
pub mod nodes;
pub mod recorder;
pub mod report;
pub mod run;
pub mod workload;
