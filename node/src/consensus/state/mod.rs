//! The pure partition state machine: `apply(&mut State, Command) -> Outcome`.
//!
//! It holds, for the rooms and users hashed to one partition: users (name, token hash),
//! rooms (id, name, creator, created_at, kind, settings), room-name reservations,
//! members (role, joined_at, muted) and bans. Commands are the only way to change it.
//!
//! To stay correct: `apply` is deterministic. It reads no clock, no randomness, no I/O;
//! every time and id it needs is inside the command (the proposer chose them). A command
//! that fails leaves the state exactly as it was (check everything, then mutate). It is
//! tested without a network.
//!
//! Handlers are split by area: `users.rs`, `rooms.rs`, `membership.rs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{RoomId, UserId};

mod membership;
mod nodes;
mod rooms;
#[cfg(test)]
mod tests;
mod users;

/// Above this many members a room is a mega-group: receipts off, new members muted.
pub const DEFAULT_MEGA_THRESHOLD: u32 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Member,
    Admin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoomKind {
    Group,
    Direct,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    pub name: UserId,
    /// SHA-256 of the token's secret part.
    pub token_hash: [u8; 32],
    pub created_at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RoomSettings {
    /// Write quorum for messages; `None` = the cluster default.
    pub write_quorum: Option<u8>,
    /// Member count at which the room becomes a mega-group.
    pub mega_threshold: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRecord {
    pub id: RoomId,
    /// Group rooms: the unique name. Direct rooms: `@a+b`.
    pub name: String,
    pub kind: RoomKind,
    pub creator: UserId,
    pub created_at: u64,
    pub settings: RoomSettings,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub role: Role,
    pub joined_at: u64,
    /// New members of a mega-group start muted.
    pub muted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BanRecord {
    pub by: UserId,
    pub at: u64,
}

/// A node of the cluster as the meta group registers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: u64,
    pub grpc: String,
    /// Empty when the node serves no HTTP.
    pub http: String,
    pub p2p: Vec<String>,
    pub registered_at: u64,
}

/// Everything one partition knows. `BTreeMap`s so snapshots are deterministic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct State {
    pub users: BTreeMap<UserId, UserRecord>,
    pub rooms: BTreeMap<RoomId, RoomRecord>,
    /// Group room name -> id. A name is reserved in the partition of the room's id, which
    /// the proposer picks to equal the partition of the name.
    pub room_names: BTreeMap<String, RoomId>,
    pub members: BTreeMap<RoomId, BTreeMap<UserId, MemberRecord>>,
    pub bans: BTreeMap<RoomId, BTreeMap<UserId, BanRecord>>,
    /// The node registry; used by the meta group only.
    pub nodes: BTreeMap<u64, NodeInfo>,
}

/// A change to a partition. `at` is the proposer's wall-clock ms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Fails with `AlreadyExists` if the name is taken.
    CreateUser {
        name: UserId,
        token_hash: [u8; 32],
        at: u64,
    },
    DeleteUser {
        name: UserId,
    },
    /// A group room; the creator becomes its first member, as admin.
    CreateRoom {
        id: RoomId,
        name: String,
        creator: UserId,
        write_quorum: Option<u8>,
        at: u64,
    },
    /// The direct room of two users; succeeds (changing nothing) if it exists already.
    EnsureDirect {
        id: RoomId,
        a: UserId,
        b: UserId,
        at: u64,
    },
    /// Group rooms: admins only. Direct rooms (which have no admins): either member.
    DeleteRoom {
        room: RoomId,
        by: UserId,
    },
    /// Group rooms only; fails if banned. Joining twice is a no-op success.
    Join {
        room: RoomId,
        user: UserId,
        at: u64,
    },
    /// The last admin of a room with other members may not leave.
    Leave {
        room: RoomId,
        user: UserId,
    },
    /// Any member may invite into a group room; fails if the target is banned.
    Invite {
        room: RoomId,
        by: UserId,
        user: UserId,
        at: u64,
    },
    /// Admins only; not oneself.
    Kick {
        room: RoomId,
        by: UserId,
        user: UserId,
    },
    /// Admins only; not oneself. Removes membership and blocks joining.
    Ban {
        room: RoomId,
        by: UserId,
        user: UserId,
        at: u64,
    },
    Unban {
        room: RoomId,
        by: UserId,
        user: UserId,
    },
    /// Admins only. The last admin may not demote themself.
    SetRole {
        room: RoomId,
        by: UserId,
        user: UserId,
        role: Role,
    },
    /// Meta group: records (or updates the addresses of) a node of the cluster.
    RegisterNode {
        info: NodeInfo,
    },
}

/// What a successful command did, for the caller and for the event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Applied {
    UserCreated,
    UserDeleted,
    RoomCreated(RoomRecord),
    /// `created` is false when the direct room existed already.
    DirectReady {
        room: RoomRecord,
        created: bool,
    },
    RoomDeleted {
        room: RoomId,
    },
    /// `changed` is false for a no-op (already a member, already banned, ...).
    Membership {
        room: RoomId,
        user: UserId,
        changed: bool,
    },
    /// `new` is false when the node was registered already (its addresses may have changed).
    NodeRegistered {
        node: u64,
        new: bool,
    },
}

/// Why a command was refused. The state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    #[error("{user} is not a member of {room}")]
    NotMember { room: String, user: String },
    #[error("{user} is not an admin of {room}")]
    NotAdmin { room: String, user: String },
    #[error("{user} is banned from {room}")]
    Banned { room: String, user: String },
    #[error("{reason}")]
    Precondition { reason: String },
    #[error("{reason}")]
    Invalid { reason: String },
}

pub type Outcome = Result<Applied, CommandError>;

/// Applies one command. Pure and deterministic (see the module doc).
pub fn apply(state: &mut State, cmd: Command) -> Outcome {
    match cmd {
        Command::CreateUser {
            name,
            token_hash,
            at,
        } => users::create(state, name, token_hash, at),
        Command::DeleteUser { name } => users::delete(state, name),
        Command::CreateRoom {
            id,
            name,
            creator,
            write_quorum,
            at,
        } => rooms::create(state, id, name, creator, write_quorum, at),
        Command::EnsureDirect { id, a, b, at } => rooms::ensure_direct(state, id, a, b, at),
        Command::DeleteRoom { room, by } => rooms::delete(state, room, by),
        Command::Join { room, user, at } => membership::join(state, room, user, at),
        Command::Leave { room, user } => membership::leave(state, room, user),
        Command::Invite { room, by, user, at } => membership::invite(state, room, by, user, at),
        Command::Kick { room, by, user } => membership::kick(state, room, by, user),
        Command::Ban { room, by, user, at } => membership::ban(state, room, by, user, at),
        Command::Unban { room, by, user } => membership::unban(state, room, by, user),
        Command::SetRole {
            room,
            by,
            user,
            role,
        } => membership::set_role(state, room, by, user, role),
        Command::RegisterNode { info } => nodes::register(state, info),
    }
}

impl State {
    pub fn room(&self, id: &RoomId) -> Option<&RoomRecord> {
        self.rooms.get(id)
    }

    pub fn room_by_name(&self, name: &str) -> Option<&RoomRecord> {
        self.room_names.get(name).and_then(|id| self.rooms.get(id))
    }

    pub fn member(&self, room: &RoomId, user: &UserId) -> Option<&MemberRecord> {
        self.members.get(room).and_then(|m| m.get(user))
    }

    pub fn is_banned(&self, room: &RoomId, user: &UserId) -> bool {
        self.bans.get(room).is_some_and(|b| b.contains_key(user))
    }

    pub fn member_count(&self, room: &RoomId) -> usize {
        self.members.get(room).map_or(0, |m| m.len())
    }
}
