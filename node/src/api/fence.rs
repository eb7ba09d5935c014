//! The fence (DESIGN §3): once a kick or ban is acknowledged, no later entry of that user
//! is accepted by any replica. It is checked twice:
//!
//! - where the write is made: the home takes its partition's Raft term under its lease
//!   (`stamp`) *before* it checks the author's membership, and the write carries it;
//! - where the write is acknowledged: a replica admits a pushed change only if its own
//!   term for the group is not newer than the stamp and every author of the change
//!   passes the membership check the home made ([`admit_push`]).
//!
//! To stay correct:
//! - The stamp is taken before the membership check, never after: a term learned later
//!   could be the newer leader's, and a replica of that term would admit a write made
//!   without seeing that leader's ban.
//! - A ban is committed on a majority in the term of the leader that acknowledged it;
//!   with three replicas, any other replica that acknowledges a push has that term or a
//!   newer one, so a push stamped by an older home is refused wherever it could count.
//! - The home writes only within its lease ([`crate::consensus::Groups::home_lease`]),
//!   shorter than the minimum election timeout, so a deposed home stops writing before
//!   a new leader can exist: its last writes are concurrent with any newer ban.
//!   Anti-entropy later spreads whatever a home made durable, including a write whose
//!   push was refused here; the lease is what keeps such writes from postdating a ban.
//! - Unfenced writes (`W = 1` on a node with no leader in reach, DESIGN §4) carry no
//!   term; replicas still check their authors.

use parley_proto::v1::PushChangesRequest;

use super::{ApiError, ApiResult, Ctx};
use crate::consensus::state::RoomRecord;
use crate::consensus::NoLease;
use crate::ids::{RoomId, UserId};
use crate::replication::Fence;

/// How long a write waits for its home to renew a lapsed lease (one heartbeat round).
const LEASE_RENEWAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long, while a quorum of the group answers calls, a write may wait in all.
const LEASE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);
/// At most this many waits (a first entry of the term, lease renewals) per write.
const RENEWALS: usize = 6;

/// Why a replica refuses a pushed change. Nothing of the change was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The writer's term is older than this replica's (answered FAILED_PRECONDITION).
    #[error("stale home: {0}")]
    StaleHome(String),
    /// An author may not write to the room (answered as a rejected push).
    #[error("{0}")]
    Author(String),
    /// The push does not describe the room it names (answered INVALID_ARGUMENT).
    #[error("{0}")]
    Invalid(String),
}

/// The fence for a write to `room` with write quorum `w` on this node: the room's group
/// and this node's term, while it is the room's home within its lease. Not the home (or
/// out of lease): `W = 1` writes go on unfenced (DESIGN §4); others are refused
/// UNAVAILABLE before anything is written, and a retry finds the current home.
pub(super) async fn stamp(ctx: &Ctx, room: &RoomRecord, w: u8) -> ApiResult<Option<Fence>> {
    let p = ctx.placement.of_room(&room.id);
    let mut lease = ctx.groups.home_lease(p);
    // A leader just elected (a handover among them) first commits an entry of its term,
    // then hears from a quorum. On a starved machine a renewal's round trip can itself
    // outlast the lease, so a few rounds are tried: within LEASE_RENEWAL, or
    // LEASE_PATIENCE while a quorum of the group still answers calls (slow, not gone);
    // then the answer stands.
    let started = std::time::Instant::now();
    for _ in 0..RENEWALS {
        let first_entry = match &lease {
            Err(NoLease::TermNotApplied { .. }) => true,
            Err(NoLease::Expired { .. }) => false,
            // In lease (the usual case), or a refusal no wait mends.
            _ => break,
        };
        let within = if ctx.groups.quorum_reachable(p) {
            LEASE_PATIENCE
        } else {
            LEASE_RENEWAL
        };
        let left = within.saturating_sub(started.elapsed());
        let waited = !left.is_zero()
            && if first_entry {
                ctx.groups.await_term_applied(p, left).await
            } else {
                ctx.groups.renew_lease(p, left).await
            };
        if !waited {
            break;
        }
        lease = ctx.groups.home_lease(p);
    }
    match lease {
        Ok(term) => Ok(Some(Fence {
            group: p.group().0,
            term,
        })),
        Err(_) if w <= 1 => Ok(None),
        Err(why) => {
            // Rare outside leader changes; counted in logs to tune the lease.
            tracing::info!(room = %room.id, reason = %why, "write refused outside the home lease");
            Err(ApiError::Unavailable(format!(
                "{} cannot be written here right now ({why}); nothing was written, try again",
                room.name
            )))
        }
    }
}

/// Whether this replica may apply and acknowledge a change pushed for `room`: the
/// writer's term is not older than this replica's for the room's group, and every author
/// passes [`Ctx::require_member`] (the check the home made: member, not banned; a "no"
/// from the local state is confirmed by a linearizable read, so a join this replica has
/// not applied yet does not refuse a good write).
pub async fn admit_push(ctx: &Ctx, room: &RoomId, req: &PushChangesRequest) -> Result<(), Refusal> {
    let group = ctx.placement.of_room(room).group();
    if let Some(term) = req.term {
        if req.group != group.0 {
            return Err(Refusal::Invalid(format!(
                "the push is fenced by group {} but {room} belongs to group {group}",
                req.group
            )));
        }
        if let Some(mine) = ctx.groups.current_term(group) {
            if mine > term {
                return Err(Refusal::StaleHome(format!(
                    "node {} wrote in term {term} of group {group}; this replica is in term {mine}",
                    req.from_node
                )));
            }
        }
    }
    if req.authors.is_empty() {
        return Ok(());
    }
    let record = ctx
        .resolve_room(&room.to_string(), false)
        .await
        .map_err(|e| Refusal::Author(e.to_string()))?;
    for a in &req.authors {
        let user = UserId::parse(a).map_err(|e| Refusal::Invalid(format!("author {a}: {e}")))?;
        ctx.require_member(&record, &user).await.map_err(|e| {
            Refusal::Author(format!("{user} may not write to {}: {e}", record.name))
        })?;
    }
    Ok(())
}
