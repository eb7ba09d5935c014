//! Typed identifiers. Owns the textual and binary forms of every id and their
//! validation; never touches storage or the network.
//!
//! - [`UserId`]: a user's name, which is unique and immutable (`[a-z0-9][a-z0-9_-]{0,31}`).
//! - [`RoomId`]: `rm_` + 16 hex digits for group rooms, `dm_` + 16 hex digits for direct rooms.
//!   Group room names (`[a-z0-9][a-z0-9-]{0,63}`) can never look like an id.
//! - [`NodeId`], [`PartitionId`], [`GroupId`]: small integers.
//! - [`MessageId`]: 128 bits that sort in timeline order, shown as 32 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why a string is not a valid id or name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind}: {reason}")]
pub struct IdError {
    pub kind: &'static str,
    pub reason: String,
}

fn id_err(kind: &'static str, reason: impl Into<String>) -> IdError {
    IdError {
        kind,
        reason: reason.into(),
    }
}

/// A user, identified by the user's unique name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UserId(String);

impl UserId {
    /// Validates a user name: 1-32 of `a-z 0-9 - _`, starting with a letter or digit.
    pub fn parse(name: &str) -> Result<Self, IdError> {
        if name.is_empty() || name.len() > 32 {
            return Err(id_err("user name", "must be 1 to 32 characters"));
        }
        let first_ok =
            name.as_bytes()[0].is_ascii_lowercase() || name.as_bytes()[0].is_ascii_digit();
        let all_ok = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !first_ok || !all_ok {
            return Err(id_err(
                "user name",
                "use lowercase letters, digits, '-' and '_', starting with a letter or digit",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A room. Group rooms: `rm_<16 hex>`; direct rooms: `dm_<16 hex>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RoomId(String);

impl RoomId {
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let ok = s.len() == 19
            && (s.starts_with("rm_") || s.starts_with("dm_"))
            && s[3..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(id_err(
                "room id",
                "expected rm_ or dm_ followed by 16 hex digits",
            ))
        }
    }

    /// Whether `s` has the shape of a room id (as opposed to a room name).
    pub fn looks_like_id(s: &str) -> bool {
        Self::parse(s).is_ok()
    }

    /// A fresh random group room id that lands in `partition` out of `partitions`, so a
    /// room and the reservation of its name live in the same Raft group.
    pub fn random_in_partition(partition: PartitionId, partitions: u32) -> Self {
        // Each try lands in the wanted partition with probability 1/P; 64*P tries
        // fail with probability (1-1/P)^(64P) < e^-64.
        let mut last = None;
        for _ in 0..(64 * partitions.max(1)) {
            let id = Self(format!("rm_{:016x}", rand::random::<u64>()));
            if PartitionId::of_room(&id, partitions) == partition {
                return id;
            }
            last = Some(id);
        }
        // Unreachable in practice; returning a wrong-partition id is still safe because
        // the state machine checks the partition, it would only fail the create.
        last.unwrap_or_else(|| Self(format!("rm_{:016x}", 0)))
    }

    /// The direct room of two users: the same id whoever starts it.
    pub fn direct(a: &UserId, b: &UserId) -> Self {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let mut h = Sha256::new();
        h.update(b"parley-dm\0");
        h.update(lo.as_str().as_bytes());
        h.update(b"\0");
        h.update(hi.as_str().as_bytes());
        let d = h.finalize();
        Self(format!("dm_{}", hex::encode(&d[..8])))
    }

    pub fn is_direct(&self) -> bool {
        self.0.starts_with("dm_")
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates a group room name: 1-64 of `a-z 0-9 -`, starting with a letter or digit.
pub fn validate_room_name(name: &str) -> Result<(), IdError> {
    if name.is_empty() || name.len() > 64 {
        return Err(id_err("room name", "must be 1 to 64 characters"));
    }
    let first_ok = name.as_bytes()[0].is_ascii_lowercase() || name.as_bytes()[0].is_ascii_digit();
    let all_ok = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !first_ok || !all_ok {
        return Err(id_err(
            "room name",
            "use lowercase letters, digits and '-', starting with a letter or digit",
        ));
    }
    Ok(())
}

/// A node of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One of the P partitions fixed at cluster genesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PartitionId(pub u32);

impl PartitionId {
    fn of_bytes(domain: &[u8], key: &[u8], partitions: u32) -> Self {
        let mut h = Sha256::new();
        h.update(domain);
        h.update(key);
        let d = h.finalize();
        let v = u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        Self((v % u64::from(partitions.max(1))) as u32)
    }

    /// `partition(room) = hash(room_id) mod P`.
    pub fn of_room(room: &RoomId, partitions: u32) -> Self {
        Self::of_bytes(b"room\0", room.as_str().as_bytes(), partitions)
    }

    /// The partition holding a user's record.
    pub fn of_user(user: &UserId, partitions: u32) -> Self {
        Self::of_bytes(b"user\0", user.as_str().as_bytes(), partitions)
    }

    /// The partition holding the reservation of a room name.
    pub fn of_room_name(name: &str, partitions: u32) -> Self {
        Self::of_bytes(b"room-name\0", name.as_bytes(), partitions)
    }

    /// The Raft group of this partition (group 0 is the meta group).
    pub fn group(self) -> GroupId {
        GroupId(self.0 + 1)
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A Raft group: 0 is the meta group, `p + 1` is partition `p`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId(pub u32);

impl GroupId {
    pub fn partition(self) -> Option<PartitionId> {
        self.0.checked_sub(1).map(PartitionId)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A timeline entry id: physical ms (48 bits), logical counter (16), origin node (32),
/// sequence (32). Its numeric order is its hex order is timeline order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct MessageId(pub u128);

impl MessageId {
    pub const MIN: MessageId = MessageId(0);

    pub fn new(physical_ms: u64, logical: u16, node: u32, seq: u32) -> Self {
        let p = u128::from(physical_ms & 0xFFFF_FFFF_FFFF);
        Self((p << 80) | (u128::from(logical) << 64) | (u128::from(node) << 32) | u128::from(seq))
    }

    /// The smallest id at physical time `ms`: every entry sent at or after `ms` is >= it.
    pub fn floor_of_ms(ms: u64) -> Self {
        Self::new(ms, 0, 0, 0)
    }

    pub fn physical_ms(self) -> u64 {
        (self.0 >> 80) as u64
    }

    pub fn logical(self) -> u16 {
        (self.0 >> 64) as u16
    }

    pub fn node(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, IdError> {
        let arr: [u8; 16] = b
            .try_into()
            .map_err(|_| id_err("message id", format!("expected 16 bytes, got {}", b.len())))?;
        Ok(Self(u128::from_be_bytes(arr)))
    }

    /// This id as the key of its entry in a timeline chunk: `-` and the 32 hex digits of
    /// the id's bitwise complement, so that keys sort newest first. automerge merges a
    /// pushed change by walking the chunk's map in key order up to the new key; with the
    /// newest key first that walk ends at once instead of crossing the whole chunk.
    pub fn chunk_key(self) -> String {
        format!("{CHUNK_KEY_NEWEST_FIRST}{:032x}", !self.0)
    }

    /// The id whose entry a chunk has under `key`: either form [`Self::chunk_key`]
    /// writes, or the plain id (32 hex digits) that builds before it wrote.
    pub fn from_chunk_key(key: &str) -> Result<Self, IdError> {
        match key.strip_prefix(CHUNK_KEY_NEWEST_FIRST) {
            Some(complement) => complement.parse::<MessageId>().map(|c| Self(!c.0)),
            None => key.parse(),
        }
    }
}

/// Marks a chunk key written newest first (see [`MessageId::chunk_key`]); it sorts
/// before every hex digit, so such keys come before the older plain ones too.
const CHUNK_KEY_NEWEST_FIRST: char = '-';

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl FromStr for MessageId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() != 32
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(id_err("message id", "expected 32 lowercase hex digits"));
        }
        u128::from_str_radix(s, 16)
            .map(Self)
            .map_err(|e| id_err("message id", e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_and_ids_never_collide() {
        assert!(validate_room_name("general").is_ok());
        assert!(validate_room_name("rm_0123456789abcdef").is_err());
        assert!(RoomId::parse("rm_0123456789abcdef").is_ok());
        assert!(RoomId::parse("general").is_err());
        assert!(UserId::parse("Alice").is_err());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse(&"a".repeat(33)).is_err());
        assert!(UserId::parse("bob_2").is_ok());
    }

    #[test]
    fn random_room_lands_in_partition() {
        for p in 0..16 {
            let id = RoomId::random_in_partition(PartitionId(p), 16);
            assert_eq!(PartitionId::of_room(&id, 16), PartitionId(p));
        }
    }

    #[test]
    fn direct_room_is_symmetric() {
        let a = UserId::parse("alice").unwrap();
        let b = UserId::parse("bob").unwrap();
        assert_eq!(RoomId::direct(&a, &b), RoomId::direct(&b, &a));
        assert!(RoomId::direct(&a, &b).is_direct());
        assert_ne!(RoomId::direct(&a, &b), RoomId::direct(&a, &a));
    }

    proptest! {
        #[test]
        fn message_id_text_roundtrip_and_order(a in any::<u128>(), b in any::<u128>()) {
            let (x, y) = (MessageId(a), MessageId(b));
            prop_assert_eq!(x.to_string().parse::<MessageId>().unwrap(), x);
            prop_assert_eq!(MessageId::from_chunk_key(&x.chunk_key()).unwrap(), x);
            prop_assert_eq!(MessageId::from_chunk_key(&x.to_string()).unwrap(), x);
            prop_assert_eq!(x.cmp(&y), y.chunk_key().cmp(&x.chunk_key()));
            prop_assert!(x.chunk_key() < y.to_string());
            prop_assert_eq!(x.cmp(&y), x.to_string().cmp(&y.to_string()));
        }

        #[test]
        fn parsers_reject_garbage_without_panicking(s in ".*", bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = s.parse::<MessageId>();
            let _ = MessageId::from_chunk_key(&s);
            let _ = RoomId::parse(&s);
            let _ = UserId::parse(&s);
            let _ = validate_room_name(&s);
            let r = MessageId::from_bytes(&bytes);
            prop_assert_eq!(r.is_ok(), bytes.len() == 16);
        }
    }
}
