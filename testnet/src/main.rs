//! `testnet`: local Parley nodes and the load generator.
//!
//! - [`up`]: start local `parley serve` processes, print their addresses, stay in the
//!   foreground until Ctrl-C.
//! - [`bench`]: the group-chat load benchmark (acked sends, subscriber fan-out,
//!   latency histograms, lost and duplicate deliveries, node CPU and memory).
//! - [`nodes`]: starting, watching and stopping `parley` child processes by PID, and
//!   reading their CPU time and peak memory from `/proc`.
//! - [`duration`]: `30s` / `500ms` / `2m` command-line durations.

mod bench;
mod duration;
mod nodes;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "testnet",
    version,
    about = "Local Parley nodes and the load benchmark"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start local nodes and stay in the foreground until Ctrl-C.
    ///
    /// For now each node is an independent single-node cluster; clustering them
    /// (discovery, --join) arrives in a later issue.
    Up(up::UpArgs),
    /// Group-chat load benchmark against fresh or running nodes.
    Bench(Box<bench::BenchArgs>),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Bench(args) => bench::run(*args).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("testnet: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
