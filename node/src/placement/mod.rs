//! Placement: which partition holds a room, a room name or a user, and which nodes
//! replicate a partition. Pure functions over ids; never touches storage or the network.
//!
//! Today every partition lives on this one node; rendezvous hashing over the cluster's
//! nodes arrives with the cluster (the partition's Raft membership stays the truth).

use crate::ids::{NodeId, PartitionId, RoomId, UserId};

/// The fixed partition count and the functions that map keys onto it.
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub partitions: u32,
}

impl Placement {
    pub fn new(partitions: u32) -> Self {
        Self {
            partitions: partitions.max(1),
        }
    }

    pub fn of_room(&self, room: &RoomId) -> PartitionId {
        PartitionId::of_room(room, self.partitions)
    }

    pub fn of_user(&self, user: &UserId) -> PartitionId {
        PartitionId::of_user(user, self.partitions)
    }

    pub fn of_room_name(&self, name: &str) -> PartitionId {
        PartitionId::of_room_name(name, self.partitions)
    }

    pub fn all(&self) -> impl Iterator<Item = PartitionId> {
        (0..self.partitions).map(PartitionId)
    }

    /// Rendezvous (highest random weight) choice of `rf` nodes for a partition.
    pub fn replicas(&self, partition: PartitionId, nodes: &[NodeId], rf: usize) -> Vec<NodeId> {
        let mut scored: Vec<(u64, NodeId)> = nodes
            .iter()
            .map(|n| (rendezvous_score(partition, *n), *n))
            .collect();
        scored.sort_by(|a, b| b.cmp(a));
        scored.into_iter().take(rf).map(|(_, n)| n).collect()
    }
}

fn rendezvous_score(p: PartitionId, n: NodeId) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(p.0.to_be_bytes());
    h.update(n.0.to_be_bytes());
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_moves_little_when_a_node_joins() {
        let pl = Placement::new(16);
        let three: Vec<NodeId> = (1..=3).map(NodeId).collect();
        let four: Vec<NodeId> = (1..=4).map(NodeId).collect();
        let mut moved = 0;
        for p in pl.all() {
            let a = pl.replicas(p, &three, 3);
            let b = pl.replicas(p, &four, 3);
            assert_eq!(a.len(), 3);
            moved += a.iter().filter(|n| !b.contains(n)).count();
        }
        // Each partition loses at most one replica to the new node.
        assert!(moved <= 16);
    }
}
