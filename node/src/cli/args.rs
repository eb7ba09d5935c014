//! The command line of DESIGN §6, as clap derive types. Nothing here does I/O.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const AFTER_HELP: &str = "\
ROOM is a room id (rm_...) or a room name; USER is a user name.
--node and --token also come from PARLEY_NODE and PARLEY_TOKEN.

Exit codes:
  0  success
  1  other error
  2  usage error (bad flags or arguments)
  3  node unreachable, or UNAVAILABLE / DEADLINE_EXCEEDED (quorum not reached)
  4  NOT_FOUND (room, user, message or cursor)
  5  PERMISSION_DENIED or UNAUTHENTICATED
  6  INVALID_ARGUMENT, ALREADY_EXISTS or FAILED_PRECONDITION
On failure one line goes to stderr: `parley: <CODE>: <message>`.";

/// Parley: a replicated group-chat node (`parley serve`) and its client.
#[derive(Debug, Parser)]
#[command(name = "parley", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// gRPC address of the node to talk to.
    #[arg(
        long,
        global = true,
        env = "PARLEY_NODE",
        default_value = "127.0.0.1:7100",
        value_name = "HOST:PORT"
    )]
    pub node: String,

    /// Bearer token (from `parley user create`).
    #[arg(
        long,
        global = true,
        env = "PARLEY_TOKEN",
        hide_env_values = true,
        value_name = "T"
    )]
    pub token: Option<String>,

    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node.
    Serve(ServeArgs),
    /// Users.
    #[command(subcommand)]
    User(UserCmd),
    /// Rooms, membership and roles.
    #[command(subcommand)]
    Room(RoomCmd),
    /// Send a message to a room; prints the message id.
    Send {
        room: String,
        /// The message (sent as given, byte for byte).
        #[arg(allow_hyphen_values = true)]
        text: OsString,
        /// Idempotency key: a retry with the same key never creates a second message.
        #[arg(long, value_name = "ID")]
        client_id: Option<String>,
        /// Id of the last message you saw; the new message sorts after it.
        #[arg(long, value_name = "MESSAGE_ID")]
        after: Option<String>,
    },
    /// Show a room's messages, oldest first.
    History {
        room: String,
        /// At most this many messages (server default 50, at most 1000).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// Only messages before this message id.
        #[arg(long, value_name = "ID")]
        before: Option<String>,
        /// Only messages after this message id.
        #[arg(long, value_name = "ID")]
        after: Option<String>,
        /// Only messages sent at or after this time (RFC 3339, e.g. 2026-11-23T14:00:00Z).
        #[arg(long, value_name = "RFC3339", value_parser = parse_rfc3339_ms)]
        since: Option<i64>,
    },
    /// Print live events of rooms (all joined rooms if none given) until interrupted.
    Tail {
        rooms: Vec<String>,
        /// Resume after this cursor (from an earlier event).
        #[arg(long, value_name = "C")]
        cursor: Option<String>,
        /// Exit after this many message events.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// Send a direct message to a user; prints the message id.
    Dm {
        user: String,
        #[arg(allow_hyphen_values = true)]
        text: OsString,
        #[arg(long, value_name = "ID")]
        client_id: Option<String>,
    },
    /// Presence.
    #[command(subcommand)]
    Presence(PresenceCmd),
    /// Move your read marker in a room up to a message.
    Read { room: String, message_id: String },
    /// Who has read a message.
    Receipts { room: String, message_id: String },
    /// Interactive chat: recent messages, live events, and each line you type is sent.
    Chat {
        room: String,
        /// Messages of history shown first.
        #[arg(long, default_value_t = 20, value_name = "N")]
        last: u32,
    },
    /// Show who the token belongs to.
    Whoami,
    /// The cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Create a user; prints its token (shown once).
    Create { name: String },
}

#[derive(Debug, Subcommand)]
pub enum RoomCmd {
    /// Create a room; prints its id.
    Create {
        name: String,
        /// Replicas that must persist a message before it is acked (default: the cluster's).
        #[arg(long, value_name = "N")]
        write_quorum: Option<u32>,
    },
    /// List rooms.
    List {
        /// Only rooms you are a member of.
        #[arg(long)]
        joined: bool,
        /// Linearizable read through the Raft leader.
        #[arg(long)]
        strong: bool,
    },
    /// Show a room.
    Show {
        room: String,
        #[arg(long)]
        strong: bool,
    },
    /// Delete a room (admins only).
    Delete { room: String },
    /// Join a room.
    Join { room: String },
    /// Leave a room.
    Leave { room: String },
    /// List a room's members and banned users.
    Members {
        room: String,
        #[arg(long)]
        strong: bool,
    },
    /// Set a member's role (admins only).
    Role {
        room: String,
        user: String,
        role: RoleArg,
    },
    /// Remove a member (admins only).
    Kick { room: String, user: String },
    /// Remove a member and keep them out (admins only).
    Ban { room: String, user: String },
    /// Lift a ban (admins only).
    Unban { room: String, user: String },
    /// Add a user to a room.
    Invite { room: String, user: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleArg {
    Admin,
    Member,
}

#[derive(Debug, Subcommand)]
pub enum PresenceCmd {
    /// Set your presence.
    Set { state: PresenceArg },
    /// Presence of a room's members.
    Show { room: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PresenceArg {
    Online,
    Away,
    Busy,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Whether the node answers and is serving.
    Status,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where the node keeps its data (created if missing).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// gRPC listen address (client API and node-to-node); port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:7100", value_name = "HOST:PORT")]
    pub listen: SocketAddr,
    /// HTTP/JSON + WebSocket gateway address.
    #[arg(long, value_name = "HOST:PORT")]
    pub http: Option<SocketAddr>,
    /// libp2p listen multiaddr, e.g. /ip4/127.0.0.1/tcp/7200.
    #[arg(long, value_name = "MULTIADDR")]
    pub p2p: Option<String>,
    /// A node to join (p2p multiaddr, with or without /p2p/PEER_ID); repeatable.
    #[arg(long, value_name = "MULTIADDR")]
    pub join: Vec<String>,
    /// A fresh cluster waits for this many nodes before forming.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub bootstrap_expect: usize,
    /// Fixed node id (otherwise kept in the data dir, random on first start).
    #[arg(long, value_name = "N")]
    pub node_id: Option<u64>,
    /// Partitions at cluster genesis.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub partitions: u32,
    /// Default write quorum for messages.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub write_quorum: u8,
    /// Presence turns offline after this many seconds without a heartbeat.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub presence_ttl: u64,
    /// Test only: shift this node's wall clock.
    #[arg(long, default_value_t = 0, hide = true, allow_hyphen_values = true)]
    pub clock_offset_ms: i64,
    /// Cluster name: nodes of different clusters on one network never mix.
    #[arg(long, default_value = "parley", value_name = "NAME")]
    pub cluster: String,
    /// Tuning/tests: Raft snapshot after this many applied entries (0 = default 10000).
    #[arg(long, default_value_t = 0, hide = true)]
    pub raft_snapshot_every: u64,
    /// Tuning/tests: compact a room's open chunk after this many changes (0 = default 2000).
    #[arg(long, default_value_t = 0, hide = true)]
    pub timeline_compact_every: usize,
    /// Tuning: seal a room's open chunk once it holds this many entries (0 = default 1000).
    /// A chunk's document is walked whole when a peer's change is merged into it, so
    /// smaller chunks keep merges cheap; every node of a cluster should use the same.
    #[arg(long, default_value_t = 0, hide = true, env = "PARLEY_CHUNK_ENTRIES")]
    pub timeline_chunk_entries: usize,
    /// Tuning: microseconds a busy commit round waits for more writes before its flush
    /// (default 0 = never). Only rounds after one of four or more writes wait, so a lone
    /// write is flushed at once. Trades latency for CPU per message (BENCHMARKS.md).
    #[arg(
        long,
        hide = true,
        env = "PARLEY_COMMIT_LINGER_US",
        value_name = "MICROS"
    )]
    pub timeline_commit_linger_us: Option<u64>,
    /// Sends this node writes at once (as a room's home); more wait, in order, for up
    /// to 3 s and are then refused UNAVAILABLE with nothing written. Keeps an
    /// overloaded node's queues, and so its heartbeats and leases, in bounds.
    #[arg(
        long,
        default_value_t = crate::api::admission::DEFAULT_LIMIT as u32,
        env = "PARLEY_MAX_SENDS_IN_PROGRESS",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub max_sends_in_progress: u32,
    /// Memory for each of the node's two stores' page caches (messages; Raft), in MiB.
    /// The cache fills as history grows and then stays about this size; resident memory
    /// is well above it (the cache counts encoded pages). Lower it to bound memory at
    /// the cost of reading older history and idempotency keys from disk.
    #[arg(
        long,
        default_value_t = crate::store::DEFAULT_CACHE_MIB,
        env = "PARLEY_STORE_CACHE_MIB",
        value_name = "MIB",
        value_parser = clap::value_parser!(u64).range(8..=1_048_576)
    )]
    pub store_cache_mib: u64,
    /// Tests: how long a send waits for a place before it is refused, in milliseconds
    /// (0 = default 3000).
    #[arg(long, default_value_t = 0, hide = true)]
    pub admission_wait_ms: u64,
    /// Tests: the delivery resume window in milliseconds (0 = default 60000); every node
    /// of a cluster must use the same.
    #[arg(long, default_value_t = 0, hide = true)]
    pub resume_window_ms: u64,
    /// Do not hand partition leaderships over to their preferred nodes. By default a
    /// node that leads more than its share of partitions passes the extra ones on, so
    /// that every node is the home of about as many rooms.
    #[arg(long)]
    pub no_leader_balance: bool,
    /// How long a fresh node waits for its peers (--bootstrap-expect) before giving up.
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub genesis_timeout: u64,
}

/// `--since`: an RFC 3339 time to Unix milliseconds.
fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("expected an RFC 3339 time like 2026-11-23T14:00:00Z ({e})"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_contract_examples() {
        let cli = Cli::try_parse_from(["parley", "--json", "send", "general", "-hi"]).unwrap();
        assert!(cli.json);
        assert!(
            matches!(cli.command, Command::Send { ref room, ref text, .. } if room == "general" && text == "-hi")
        );
        let cli =
            Cli::try_parse_from(["parley", "room", "role", "general", "bob", "admin"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Room(RoomCmd::Role {
                role: RoleArg::Admin,
                ..
            })
        ));
        assert!(
            Cli::try_parse_from(["parley", "room", "role", "general", "bob", "owner"]).is_err()
        );
        let cli = Cli::try_parse_from([
            "parley",
            "serve",
            "--data-dir",
            "/tmp/x",
            "--listen",
            "127.0.0.1:0",
            "--p2p",
            "/ip4/127.0.0.1/tcp/0",
            "--join",
            "/ip4/1.2.3.4/tcp/1",
            "--join",
            "/ip4/1.2.3.5/tcp/1",
            "--clock-offset-ms",
            "-250",
        ])
        .unwrap();
        match cli.command {
            Command::Serve(s) => {
                assert_eq!(s.join.len(), 2);
                assert_eq!(s.clock_offset_ms, -250);
                assert_eq!(s.partitions, 16);
            }
            other => panic!("parsed as {other:?}"),
        }
    }

    /// The store cache: 256 MiB unless set, reaches the node's config, and a value
    /// below 8 MiB is refused with the flag named.
    #[test]
    fn store_cache_flag_defaults_reaches_the_config_and_refuses_too_small() {
        let serve = |extra: &[&str]| {
            let mut argv = vec!["parley", "serve", "--data-dir", "/tmp/x"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
        };
        let cfg = |cli: Cli| match cli.command {
            Command::Serve(s) => s.to_config(),
            other => panic!("parsed as {other:?}"),
        };
        // Not asserted through the environment: PARLEY_STORE_CACHE_MIB may be set.
        if std::env::var_os("PARLEY_STORE_CACHE_MIB").is_none() {
            assert_eq!(cfg(serve(&[]).unwrap()).store_cache_mib, 256);
        }
        let c = cfg(serve(&["--store-cache-mib", "32"]).unwrap());
        assert_eq!(c.store_cache_mib, 32);
        let err = serve(&["--store-cache-mib", "4"]).unwrap_err().to_string();
        assert!(err.contains("--store-cache-mib"), "{err}");
    }

    #[test]
    fn since_takes_rfc3339() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01Z"), Ok(1000));
        assert!(parse_rfc3339_ms("yesterday").is_err());
    }
}
