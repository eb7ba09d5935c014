//! Bearer tokens. A token is `<user name>.<64 hex digits of secret>`; the partition of
//! the user stores only SHA-256 of the secret. The name in the token says which
//! partition to ask, so checking a token is one local read.

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;

use super::error::{ApiError, ApiResult};
use super::Ctx;
use crate::ids::UserId;

/// A new token for `user` and the hash to store.
pub fn new_token(user: &UserId) -> (String, [u8; 32]) {
    let secret: [u8; 32] = rand::random();
    let hex = hex::encode(secret);
    (format!("{user}.{hex}"), hash_secret(&hex))
}

fn hash_secret(secret_hex: &str) -> [u8; 32] {
    Sha256::digest(secret_hex.as_bytes()).into()
}

/// Constant-time comparison, so response timing does not leak how much of a hash matched.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Splits a token into its user and secret; `None` if malformed.
pub fn parse_token(token: &str) -> Option<(UserId, &str)> {
    let (name, secret) = token.rsplit_once('.')?;
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some((UserId::parse(name).ok()?, secret))
}

/// The user a request's `authorization: Bearer <token>` belongs to.
pub async fn authenticate(ctx: &Ctx, md: &MetadataMap) -> ApiResult<UserId> {
    let raw = md.get("authorization").ok_or_else(|| {
        ApiError::Unauthenticated("missing token: pass `authorization: Bearer <token>`".into())
    })?;
    let raw = raw
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("malformed authorization header".into()))?;
    let token = raw.strip_prefix("Bearer ").unwrap_or(raw).trim();
    let (user, secret) =
        parse_token(token).ok_or_else(|| ApiError::Unauthenticated("malformed token".into()))?;
    let p = ctx.placement.of_user(&user);
    if !ctx.groups.is_local(p) {
        let hosts: Vec<String> = ctx.groups.plan().members.values().cloned().collect();
        return Err(ApiError::Unavailable(format!(
            "this node joined after the cluster formed and holds no replicas yet; connect to one of {}",
            hosts.join(", ")
        )));
    }
    let hash = hash_secret(secret);
    let check =
        |s: &crate::consensus::state::State| s.users.get(&user).map(|u| same(&u.token_hash, &hash));
    let mut known = ctx.groups.read(p, check);
    if known.is_none() {
        // Created through another node a moment ago? Ask the leader before saying no.
        known = ctx.groups.read_strong(p, check).await?;
    }
    if known == Some(true) {
        Ok(user)
    } else {
        Err(ApiError::Unauthenticated("unknown token".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn token_roundtrip() {
        let u = UserId::parse("alice").unwrap();
        let (t, h) = new_token(&u);
        let (u2, secret) = parse_token(&t).unwrap();
        assert_eq!(u2, u);
        assert!(same(&hash_secret(secret), &h));
        assert!(parse_token("alice").is_none());
        assert!(parse_token("alice.zz").is_none());
        assert!(parse_token(&format!("Alice.{}", "0".repeat(64))).is_none());
    }

    proptest! {
        #[test]
        fn parse_token_never_panics(s in ".*") {
            let _ = parse_token(&s);
        }
    }
}
