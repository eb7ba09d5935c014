//! Parley's wire contract.
//!
//! - [`v1`] (`parley.v1`): the client API (`Chat`) and the node-to-node protocol (`Cluster`).
//! - [`FILE_DESCRIPTOR_SET`]: the compiled descriptors, served through gRPC reflection so
//!   off-the-shelf tools (grpcurl, grpcui) can call a node without the `.proto` files.

/// `parley.v1`: generated messages, clients and servers.
pub mod v1 {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("parley.v1");
}

/// Encoded `FileDescriptorSet` of every `parley.v1` file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/parley_descriptor.bin"));
