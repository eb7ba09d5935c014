//! Consensus (being written by the consensus work): openraft groups per partition.
pub mod state;
