//! The cluster's genesis plan: which nodes exist, at which gRPC addresses, and which of
//! them replicate each Raft group. Kept in the store (`cluster` tree) so that a restarted
//! node knows its groups without being told again.
//!
//! The meta group (group 0) is planned on every genesis node. For now it holds nothing but
//! its own membership: it runs the same [`super::typ::TypeConfig`] and no command is ever
//! proposed to it (the registry and the partition map it will hold come later).
//!
//! To stay correct: the plan is flushed to disk before any group is initialized from it,
//! so a node that crashes mid-genesis finds the same plan on restart and initializes its
//! remaining groups with the same memberships (openraft accepts the same `initialize` on
//! every member).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::codec;
use crate::ids::{GroupId, NodeId, PartitionId};
use crate::placement::Placement;
use crate::store::{Db, StoreError};

const TREE: &str = "cluster";
const KEY_PLAN: &[u8] = b"plan";

/// The meta group's id.
pub const META: GroupId = GroupId(0);

/// Who replicates what at cluster genesis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPlan {
    pub partitions: u32,
    /// Node id -> gRPC address (`host:port`).
    pub members: BTreeMap<u64, String>,
    /// Group -> its voters. Group 0 is the meta group; `p + 1` is partition `p`.
    pub replicas: BTreeMap<GroupId, BTreeSet<u64>>,
}

impl ClusterPlan {
    /// Places `partitions` partition groups on `rf` of `nodes` each (rendezvous hashing)
    /// and the meta group on all of them.
    pub fn genesis(nodes: &[(u64, SocketAddr)], partitions: u32, rf: usize) -> Self {
        let members: BTreeMap<u64, String> =
            nodes.iter().map(|(n, a)| (*n, a.to_string())).collect();
        let ids: Vec<NodeId> = members.keys().map(|n| NodeId(*n)).collect();
        let placement = Placement::new(partitions);
        let mut replicas = BTreeMap::new();
        replicas.insert(META, members.keys().copied().collect());
        for p in placement.all() {
            let set = placement
                .replicas(p, &ids, rf.max(1))
                .into_iter()
                .map(|n| n.0)
                .collect();
            replicas.insert(p.group(), set);
        }
        Self {
            partitions: placement.partitions,
            members,
            replicas,
        }
    }

    /// Every partition on `node` alone, and no meta group: the single-node layout of
    /// [`super::Groups::open`].
    pub fn single(node: u64, addr: SocketAddr, partitions: u32) -> Self {
        let members = BTreeMap::from([(node, addr.to_string())]);
        let replicas = (0..partitions)
            .map(|p| (PartitionId(p).group(), BTreeSet::from([node])))
            .collect();
        Self {
            partitions,
            members,
            replicas,
        }
    }

    /// The groups `node` is a voter of.
    pub fn groups_of(&self, node: u64) -> Vec<GroupId> {
        self.replicas
            .iter()
            .filter(|(_, set)| set.contains(&node))
            .map(|(g, _)| *g)
            .collect()
    }

    /// Which voter of each partition group should lead it when all are up: the leaders
    /// spread as evenly as the placement allows, the same on every node (a function of
    /// the plan alone). Groups are taken in order and each goes to its voter that was
    /// given the fewest so far; ties go to the voter after the group's index, so equal
    /// counts rotate. The meta group has none (it carries no writes).
    pub fn preferred_leaders(&self) -> BTreeMap<GroupId, u64> {
        let mut given: BTreeMap<u64, usize> = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (gid, voters) in &self.replicas {
            if gid.partition().is_none() || voters.is_empty() {
                continue;
            }
            let voters: Vec<u64> = voters.iter().copied().collect();
            let start = gid.0 as usize % voters.len();
            let pick = (0..voters.len())
                .map(|i| voters[(start + i) % voters.len()])
                .min_by_key(|v| given.get(v).copied().unwrap_or(0));
            if let Some(v) = pick {
                *given.entry(v).or_default() += 1;
                out.insert(*gid, v);
            }
        }
        out
    }

    /// The voters of `group` with their addresses, as openraft's initial membership.
    pub fn membership(&self, group: GroupId) -> BTreeMap<u64, openraft::BasicNode> {
        self.replicas
            .get(&group)
            .into_iter()
            .flatten()
            .filter_map(|n| {
                self.members
                    .get(n)
                    .map(|a| (*n, openraft::BasicNode::new(a.clone())))
            })
            .collect()
    }

    /// The stored plan, if this store was ever part of a cluster.
    pub fn load(db: &Db) -> Result<Option<Self>, StoreError> {
        let tree = db.tree(TREE)?;
        match tree.get(KEY_PLAN)? {
            None => Ok(None),
            Some(bytes) => codec::decode(&bytes)
                .map(Some)
                .map_err(|e| tree.corrupt(format!("cluster plan: {e}"))),
        }
    }

    /// Stores the plan durably (flushed before returning).
    pub async fn save(&self, db: &Db) -> Result<(), StoreError> {
        db.tree(TREE)?.insert(KEY_PLAN, codec::encode(self))?;
        db.flush().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test]
    async fn genesis_places_rf_replicas_and_roundtrips() {
        let nodes = [
            (1, addr(7001)),
            (2, addr(7002)),
            (3, addr(7003)),
            (4, addr(7004)),
        ];
        let plan = ClusterPlan::genesis(&nodes, 8, 3);
        assert_eq!(plan.partitions, 8);
        assert_eq!(plan.replicas.len(), 9);
        assert_eq!(plan.replicas[&META].len(), 4);
        for p in 0..8 {
            assert_eq!(plan.replicas[&PartitionId(p).group()].len(), 3);
        }
        // Every node is in the meta group; the partitions spread over all four nodes.
        let total: usize = (1..=4).map(|n| plan.groups_of(n).len()).sum();
        assert_eq!(total, 4 + 8 * 3);
        assert!((1..=4).all(|n| plan.groups_of(n).contains(&META)));
        assert_eq!(plan.membership(META)[&2].addr, "127.0.0.1:7002");

        // Every partition has a preferred leader among its voters, and they spread:
        // 8 partitions over 4 nodes is 2 each.
        let preferred = plan.preferred_leaders();
        assert_eq!(preferred.len(), 8);
        assert!(!preferred.contains_key(&META));
        for (g, n) in &preferred {
            assert!(plan.replicas[g].contains(n), "{g} prefers non-voter {n}");
        }
        for n in 1..=4 {
            assert_eq!(
                preferred.values().filter(|v| **v == n).count(),
                2,
                "node {n}"
            );
        }
        assert_eq!(preferred, plan.clone().preferred_leaders(), "deterministic");

        let db = Db::temporary().unwrap();
        assert_eq!(ClusterPlan::load(&db).unwrap(), None);
        plan.save(&db).await.unwrap();
        assert_eq!(ClusterPlan::load(&db).unwrap(), Some(plan));
    }

    #[test]
    fn preferred_leaders_of_three_nodes_split_sixteen_partitions_six_five_five() {
        let nodes = [(1, addr(7001)), (2, addr(7002)), (3, addr(7003))];
        let plan = ClusterPlan::genesis(&nodes, 16, 3);
        let preferred = plan.preferred_leaders();
        let mut counts: Vec<usize> = (1..=3)
            .map(|n| preferred.values().filter(|v| **v == n).count())
            .collect();
        counts.sort_unstable();
        assert_eq!(counts, vec![5, 5, 6]);
    }
}
