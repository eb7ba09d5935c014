//! User records: create and delete.

use super::{Applied, CommandError, Outcome, State, UserRecord};
use crate::ids::UserId;

pub(super) fn create(state: &mut State, name: UserId, token_hash: [u8; 32], at: u64) -> Outcome {
    if state.users.contains_key(&name) {
        return Err(CommandError::AlreadyExists {
            what: format!("user {name}"),
        });
    }
    state.users.insert(
        name.clone(),
        UserRecord {
            name,
            token_hash,
            created_at: at,
        },
    );
    Ok(Applied::UserCreated)
}

pub(super) fn delete(state: &mut State, name: UserId) -> Outcome {
    if state.users.remove(&name).is_none() {
        return Err(CommandError::NotFound {
            what: format!("user {name}"),
        });
    }
    Ok(Applied::UserDeleted)
}
