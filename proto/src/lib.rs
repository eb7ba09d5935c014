//! Parley's wire contract.
//!
//! - [`v1`] (`parley.v1`): the client API (`Chat`) and the node-to-node protocol (`Cluster`).
//! - [`FILE_DESCRIPTOR_SET`]: the compiled descriptors, served through gRPC reflection so
//!   off-the-shelf tools (grpcurl, grpcui) can call a node without the `.proto` files.
//! - [`code_name`]: the status codes' canonical names, as the CLI prints them and the
//!   fault harness records them.

/// `parley.v1`: generated messages, clients and servers.
pub mod v1 {
    #![allow(clippy::all, missing_docs, rust_2018_idioms)]
    tonic::include_proto!("parley.v1");
}

/// Encoded `FileDescriptorSet` of every `parley.v1` file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/parley_descriptor.bin"));

/// The canonical name of a gRPC status code (`NOT_FOUND`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
