//! The versioned binary encoding of everything consensus writes to disk or sends to a
//! peer: Raft log entries, votes, snapshots and openraft's RPC payloads.
//!
//! Format: one version byte ([`VERSION`]), then the bincode 1 encoding of the value.
//!
//! To stay correct: never change what version 1 means. A new layout gets a new version
//! byte and `decode` keeps reading the old ones, because logs and snapshots written by an
//! older binary are read back after an upgrade. `decode` never panics on any input.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The encoding version this binary writes.
pub const VERSION: u8 = 1;

/// Upper bound on a single decoded value, so a corrupt length prefix cannot make bincode
/// allocate without limit.
const MAX_DECODED_BYTES: u64 = 1 << 30;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("empty input: expected a version byte")]
    Empty,
    #[error("unknown encoding version {0} (this build reads version {VERSION})")]
    UnknownVersion(u8),
    #[error("malformed body: {0}")]
    Body(String),
}

fn options() -> impl bincode::Options {
    use bincode::Options;
    // The same layout as `bincode::serialize` (fixed-width ints, little endian), plus a limit.
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_DECODED_BYTES)
}

/// Encodes `value` as version byte + bincode.
///
/// Serializing the consensus types into a `Vec` cannot fail (no I/O, no size limit is hit
/// by values this node builds), so an error here would be a bug in a `Serialize` impl; it
/// is logged and yields just the version byte, which `decode` then rejects.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    use bincode::Options;
    let mut out = vec![VERSION];
    if let Err(e) = options().serialize_into(&mut out, value) {
        tracing::error!(error = %e, "codec: serialize failed");
        out.truncate(1);
    }
    out
}

/// Decodes bytes written by [`encode`] (of any version this build knows).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    use bincode::Options;
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    match version {
        VERSION => options()
            .deserialize(body)
            .map_err(|e| CodecError::Body(e.to_string())),
        other => Err(CodecError::UnknownVersion(other)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::consensus::state::Command;
    use crate::consensus::typ::{Entry, LogId, Vote};
    use crate::ids::{RoomId, UserId};
    use proptest::prelude::*;

    #[test]
    fn roundtrip_and_errors() {
        let cmd = Command::Join {
            room: RoomId::parse("rm_0123456789abcdef").unwrap(),
            user: UserId::parse("alice").unwrap(),
            at: 42,
        };
        let bytes = encode(&cmd);
        assert_eq!(bytes[0], VERSION);
        assert_eq!(decode::<Command>(&bytes).unwrap(), cmd);

        let vote = Vote::new(3, 7);
        assert_eq!(decode::<Vote>(&encode(&vote)).unwrap(), vote);
        let entry = Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(2, 1), 9),
            payload: openraft::EntryPayload::Normal(cmd),
        };
        let back: Entry = decode(&encode(&entry)).unwrap();
        assert_eq!(back.log_id, entry.log_id);

        assert_eq!(decode::<Command>(&[]), Err(CodecError::Empty));
        let mut wrong = bytes.clone();
        wrong[0] = 2;
        assert_eq!(
            decode::<Command>(&wrong),
            Err(CodecError::UnknownVersion(2))
        );
        assert!(matches!(
            decode::<Command>(&bytes[..bytes.len() - 1]),
            Err(CodecError::Body(_))
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let r = decode::<Entry>(&bytes);
            if bytes.is_empty() {
                prop_assert_eq!(r.err(), Some(CodecError::Empty));
            }
            let _ = decode::<Command>(&bytes);
            let _ = decode::<Vote>(&bytes);
            let _ = decode::<crate::consensus::state::State>(&bytes);
        }

        #[test]
        fn huge_length_prefix_is_an_error(len in any::<u64>()) {
            let mut bytes = vec![VERSION];
            bytes.extend_from_slice(&len.to_le_bytes());
            // A string claiming `len` bytes with none following must fail, not allocate `len`.
            prop_assert!(decode::<String>(&bytes).is_err() || len == 0);
        }
    }
}
