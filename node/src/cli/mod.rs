//! The `parley` command-line client and the `parley serve` entry point.
//!
//! Owns argument parsing ([`args`]), the connection to a node ([`client`]), the
//! commands of DESIGN §6 ([`commands`]), the live views `tail` and `chat`
//! ([`live`]), human and JSON output ([`output`]) and the mapping of errors to
//! exit codes (here). It talks to a node only through the public gRPC API
//! (`parley.v1.Chat` and the standard health service) and never reaches into
//! the node's layers; `serve` only builds a [`crate::node::Config`] and calls
//! [`crate::node::run`].
//!
//! Exit codes are part of the CLI contract (scripts branch on them):
//! 0 ok, 1 other error, 2 usage, 3 node unreachable or unavailable,
//! 4 not found, 5 permission denied or unauthenticated,
//! 6 invalid argument, already exists or failed precondition.

pub mod args;
pub mod client;
pub mod commands;
pub mod live;
pub mod output;
pub mod serve;

use std::process::ExitCode;

use clap::Parser;
pub use parley_proto::code_name;
use tonic::Code;

pub use args::Cli;
pub use client::Unreachable;

/// Exit codes, as documented in `parley --help`.
pub mod exit {
    pub const OK: u8 = 0;
    pub const GENERIC: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const UNAVAILABLE: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const DENIED: u8 = 5;
    pub const INVALID: u8 = 6;
}

/// Parses the command line, runs the command and turns its outcome into an exit code
/// (printing `parley: <CODE>: <message>` on stderr on failure).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // clap prints help/version on stdout (exit 0) and usage errors on stderr (exit 2).
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    // Crash points read FAILPOINTS once, for the whole process.
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("parley: UNKNOWN: cannot start the async runtime: {e}");
            return ExitCode::from(exit::GENERIC);
        }
    };
    let node = cli.node.clone();
    let result = runtime.block_on(commands::run(cli));
    // Don't wait for stray blocking work (e.g. a stdin reader) when leaving.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            let (code, name, message) = describe(&e, &node);
            if code != exit::OK {
                eprintln!("parley: {name}: {message}");
            }
            ExitCode::from(code)
        }
    }
}

/// Exit code, code name and one-line message for an error.
fn describe(e: &anyhow::Error, node: &str) -> (u8, &'static str, String) {
    for cause in e.chain() {
        if let Some(u) = cause.downcast_ref::<Unreachable>() {
            return (exit::UNAVAILABLE, "UNAVAILABLE", one_line(&u.to_string()));
        }
        if let Some(status) = cause.downcast_ref::<tonic::Status>() {
            let code = status.code();
            let mut message = status.message().to_owned();
            if message.is_empty() {
                message = code.description().to_owned();
            }
            // A transport failure mid-call (the node went away) carries a source error;
            // a quorum failure reported by the node does not.
            if code == Code::Unavailable && std::error::Error::source(status).is_some() {
                message = format!("lost the connection to the node at {node}: {message}");
            }
            return (exit_code(code), code_name(code), one_line(&message));
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::BrokenPipe {
                // `parley history ROOM | head`: the reader left; that is not a failure.
                return (exit::OK, "OK", String::new());
            }
        }
    }
    (exit::GENERIC, "UNKNOWN", one_line(&format!("{e:#}")))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The exit code for a gRPC status code.
pub fn exit_code(code: Code) -> u8 {
    match code {
        Code::Ok => exit::OK,
        Code::Unavailable | Code::DeadlineExceeded => exit::UNAVAILABLE,
        Code::NotFound => exit::NOT_FOUND,
        Code::PermissionDenied | Code::Unauthenticated => exit::DENIED,
        Code::InvalidArgument
        | Code::AlreadyExists
        | Code::FailedPrecondition
        | Code::OutOfRange => exit::INVALID,
        _ => exit::GENERIC,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_map_to_documented_exit_codes() {
        let e = anyhow::Error::new(tonic::Status::not_found("room \"x\" not found"));
        assert_eq!(
            describe(&e, "n:1"),
            (4, "NOT_FOUND", "room \"x\" not found".to_owned())
        );
        let e = anyhow::Error::new(tonic::Status::permission_denied("not a member"));
        assert_eq!(describe(&e, "n:1").0, exit::DENIED);
        let e = anyhow::Error::new(tonic::Status::unauthenticated(""));
        assert_eq!(describe(&e, "n:1").0, exit::DENIED);
        let e = anyhow::Error::new(tonic::Status::already_exists("taken\nline two"));
        assert_eq!(
            describe(&e, "n:1"),
            (6, "ALREADY_EXISTS", "taken line two".to_owned())
        );
        let e = anyhow::Error::new(tonic::Status::internal("boom"));
        assert_eq!(describe(&e, "n:1").0, exit::GENERIC);
    }

    #[test]
    fn unreachable_names_the_address() {
        let e = anyhow::Error::new(Unreachable {
            node: "127.0.0.1:9".into(),
            reason: "refused".into(),
        });
        let (code, name, msg) = describe(&e, "127.0.0.1:9");
        assert_eq!((code, name), (exit::UNAVAILABLE, "UNAVAILABLE"));
        assert!(msg.contains("127.0.0.1:9"), "{msg}");
    }

    #[test]
    fn broken_pipe_is_success() {
        let e = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert_eq!(describe(&e, "n").0, exit::OK);
    }
}
