//! Leadership balancing. A partition's leader is its rooms' home: it makes every write
//! of those rooms (DESIGN §3), so a node that leads most partitions does most of the
//! cluster's work while the others idle. Elections pick whoever times out first, which
//! at genesis and after restarts is rarely an even split (a fresh three-node testnet
//! came up 0/6/10 of 16).
//!
//! Each partition has a preferred leader
//! ([`super::cluster::ClusterPlan::preferred_leaders`], the same on every node). A
//! leader that is not its group's preferred one and has led it for a while hands the
//! group over once the preferred node is reachable and holds its whole log:
//!
//! 1. it stops writing as the rooms' home ([`Groups::home_lease`] refuses while the
//!    group is yielding) and gives writes already under way a moment to finish;
//! 2. it asks the preferred node to stand for election at once (`TakeLeadership`);
//! 3. openraft grants that vote on the old leader once its own vote is older than the
//!    vote lease, and the old leader steps down; the other voters refuse (they still
//!    hear the old leader), so the two votes win only in groups of up to three voters,
//!    and larger groups are not balanced;
//! 4. it stops yielding when the group has another leader, or after `WAIT_WIN`.
//!
//! Writes that reach the old leader meanwhile wait for the handover
//! ([`Groups::settle`]) and then go to the new home: a balancing step costs the
//! partition's writers some latency, not errors. Raft proposals and barriers wait the
//! same way (`settled`), so the preferred node still holds the whole log when it
//! campaigns.
//!
//! To stay correct:
//! - The old home takes no fence stamp after it starts yielding, and only then asks the
//!   preferred node to campaign early: every stamp it handed out precedes the new term,
//!   as with a leader that lost its lease (see `api::fence`).
//! - The receiver campaigns only while it follows the caller in the term the caller
//!   names; a stale or repeated request changes nothing.
//! - Only a leader starts a handover and only towards the preferred node, which never
//!   hands its group on: no ping-pong. A failed attempt backs off (`RETRY`,
//!   `BACKOFF`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parley_proto::v1::TakeLeadershipRequest;
use tokio::sync::watch;

use super::groups::{Group, Groups};
use super::typ::Raft;
use crate::ids::{GroupId, PartitionId};

/// How often the balancer looks at the groups this node leads.
const EVERY: Duration = Duration::from_secs(1);
/// A leader keeps a group at least this long before handing it over: longer than
/// openraft's vote lease (the maximum election timeout), within which the old leader
/// would refuse to vote for the preferred node.
const SETTLED: Duration = Duration::from_secs(3);
/// Writes stamped before the handover began get this long to push their changes.
const DRAIN: Duration = Duration::from_millis(100);
/// How long the old leader waits for the group to change hands before it writes again.
pub(super) const WAIT_WIN: Duration = Duration::from_secs(2);
/// How long the `TakeLeadership` call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// After a handover that was not started (the preferred node fell behind while the
/// group drained), the group is left alone this long;
const RETRY: Duration = Duration::from_secs(5);
/// after one that was started and did not land, this long: a failed campaign cost the
/// group's writers up to [`WAIT_WIN`], so not every few seconds, but soon enough that a
/// node back from a restart gets its partitions within seconds, not minutes.
const BACKOFF: Duration = Duration::from_secs(10);

enum Outcome {
    /// The preferred node leads the group now.
    Moved,
    /// Nobody was asked: the group or the preferred node changed while it drained.
    NotStarted,
    /// The preferred node was asked and does not lead (yet).
    NotLanded,
}

/// Waits (at most [`WAIT_WIN`]) while this node hands group `g` over; at once otherwise.
/// Home writes wait here ([`Groups::settle`]), and so do Raft proposals and barriers on
/// the old leader: an entry appended there after the preferred node was found holding
/// the whole log would make that node's campaign fail (openraft refuses a vote to a
/// shorter log) while its higher term still deposes the leader, and the proposal could
/// hang until its timeout.
pub(super) async fn settled(g: &Group) {
    if g.yielding.borrow().is_none() {
        return;
    }
    let mut rx = g.yielding.subscribe();
    let _ = tokio::time::timeout(WAIT_WIN, rx.wait_for(Option::is_none)).await;
}

/// Counts of handovers this node started, for `/metrics`.
#[derive(Debug, Default)]
pub struct HandoverStats {
    pub done: AtomicU64,
    pub failed: AtomicU64,
}

impl Groups {
    /// If this node is handing partition `p` over, waits (at most `WAIT_WIN`) until it
    /// is done, so that a write routed afterwards finds the new home. Returns at once
    /// otherwise.
    pub async fn settle(&self, p: PartitionId) {
        if let Some(g) = self.group(p) {
            settled(g).await;
        }
    }

    /// Handover counts since start: (done, failed).
    pub fn handovers(&self) -> (u64, u64) {
        let s = &self.inner.handovers;
        (
            s.done.load(Ordering::Relaxed),
            s.failed.load(Ordering::Relaxed),
        )
    }

    /// Serves `TakeLeadership`: campaigns for `group` now, if this node follows `from`
    /// in `term` there. Why not, otherwise.
    pub async fn take_leadership(&self, req: &TakeLeadershipRequest) -> Result<(), String> {
        let gid = GroupId(req.group);
        let g = self
            .inner
            .groups
            .get(&gid)
            .ok_or_else(|| format!("group {gid} is not hosted on node {}", self.inner.node))?;
        let (term, leader) = {
            let m = g.raft.metrics();
            let m = m.borrow();
            (m.current_term, m.current_leader)
        };
        if term != req.term || leader != Some(req.from_node) {
            return Err(format!(
                "node {} follows {} in term {term} of group {gid}, not node {} in term {}",
                self.inner.node,
                leader.map_or_else(|| "no leader".to_owned(), |l| format!("node {l}")),
                req.from_node,
                req.term
            ));
        }
        tracing::info!(group = %gid, from = req.from_node, term, "standing for election at the leader's request");
        g.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| format!("cannot campaign: {e}"))
    }

    /// Hands every group this node leads but should not over to its preferred leader,
    /// one at a time, until `stop` turns true.
    pub async fn balance_leaders(self, mut stop: watch::Receiver<bool>) {
        let preferred = self.inner.plan.preferred_leaders();
        // When this node was first seen leading each group, by term.
        let mut since: BTreeMap<GroupId, (u64, Instant)> = BTreeMap::new();
        let mut backoff: BTreeMap<GroupId, Instant> = BTreeMap::new();
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            for (gid, to) in &preferred {
                if *stop.borrow() {
                    return;
                }
                let Some(g) = self.inner.groups.get(gid) else {
                    continue;
                };
                let Some(term) = self.leads(&g.raft) else {
                    since.remove(gid);
                    continue;
                };
                let first = since.entry(*gid).or_insert((term, Instant::now()));
                if first.0 != term {
                    *first = (term, Instant::now());
                }
                if *to == self.inner.node.0
                    || first.1.elapsed() < SETTLED
                    || backoff
                        .get(gid)
                        .is_some_and(|until| Instant::now() < *until)
                    || !self.ready_to_lead(&g.raft, *to)
                {
                    continue;
                }
                let stats = &self.inner.handovers;
                let wait = match self.hand_over(*gid, g, term, *to).await {
                    Outcome::Moved => {
                        stats.done.fetch_add(1, Ordering::Relaxed);
                        since.remove(gid);
                        continue;
                    }
                    Outcome::NotStarted => RETRY,
                    Outcome::NotLanded => {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        BACKOFF
                    }
                };
                backoff.insert(*gid, Instant::now() + wait);
            }
        }
    }

    /// This node's term of `raft`'s group, if it leads it.
    fn leads(&self, raft: &Raft) -> Option<u64> {
        let m = raft.metrics();
        let m = m.borrow();
        (m.current_leader == Some(self.inner.node.0)).then_some(m.current_term)
    }

    /// Whether `to` could win an election now: reachable, holding every entry this
    /// leader has (openraft refuses votes to a candidate with a shorter log), and in a
    /// group where its own vote and this leader's are a majority.
    fn ready_to_lead(&self, raft: &Raft, to: u64) -> bool {
        if !self.inner.peers.recently_reachable(to) {
            return false;
        }
        let m = raft.metrics();
        let m = m.borrow();
        if m.membership_config.membership().voter_ids().count() > 3 {
            return false;
        }
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&to).cloned().flatten())
            .map(|l| l.index);
        m.last_log_index.is_some() && matched == m.last_log_index
    }

    /// One handover of group `gid` (`g`, led by this node in `term`) to `to`.
    async fn hand_over(&self, gid: GroupId, g: &Group, term: u64, to: u64) -> Outcome {
        let me = self.inner.node.0;
        g.yielding.send_replace(Some(to));
        tokio::time::sleep(DRAIN).await;
        let asked = if self.leads(&g.raft) == Some(term) && self.ready_to_lead(&g.raft, to) {
            self.ask_to_lead(gid, term, to).await
        } else {
            Err("the group changed while it drained".to_owned())
        };
        let outcome = match asked {
            Ok(()) => {
                let mut rx = g.raft.metrics();
                // Stepping down leaves the group leaderless for a moment; wait for the next.
                let _ = tokio::time::timeout(
                    WAIT_WIN,
                    rx.wait_for(|m| m.current_leader.is_some_and(|l| l != me)),
                )
                .await;
                let leader = g.raft.metrics().borrow().current_leader;
                if leader == Some(to) {
                    tracing::info!(group = %gid, from = me, to, "leadership handed over");
                    Outcome::Moved
                } else {
                    tracing::info!(group = %gid, to, ?leader, "leadership handover did not land");
                    Outcome::NotLanded
                }
            }
            Err(why) => {
                tracing::debug!(group = %gid, to, reason = %why, "leadership handover not started");
                Outcome::NotStarted
            }
        };
        g.yielding.send_replace(None);
        outcome
    }

    async fn ask_to_lead(&self, gid: GroupId, term: u64, to: u64) -> Result<(), String> {
        let addr = self
            .addr_of(to)
            .ok_or_else(|| format!("node {to} has no known address"))?;
        let mut client = self
            .inner
            .peers
            .client(to, &addr)
            .map_err(|e| e.to_string())?;
        let mut req = tonic::Request::new(TakeLeadershipRequest {
            group: gid.0,
            from_node: self.inner.node.0,
            term,
        });
        req.set_timeout(CALL_TIMEOUT);
        client
            .take_leadership(req)
            .await
            .map(|_| ())
            .map_err(|s| format!("node {to}: {}", s.message()))
    }
}
