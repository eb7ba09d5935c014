//! Operators: ClusterStatus, the cluster as the answering node sees it.

use std::time::Duration;

use parley_proto::v1 as pb;

use super::{ApiResult, Ctx};
use crate::consensus::cluster::META;

/// Whether a node answers a Hello within a short time.
async fn alive(cluster: &str, addr: &str) -> bool {
    let (connect, total) = (Duration::from_millis(300), Duration::from_millis(500));
    crate::consensus::network::hello(addr, cluster, connect, total)
        .await
        .is_some()
}

/// `ClusterStatus`: nodes (from the plan and the meta group's registry) with liveness,
/// and every group's voters, leader, term and this node's applied index.
pub(super) async fn status(ctx: &Ctx) -> ApiResult<pb::ClusterStatusResponse> {
    let plan = ctx.groups.plan().clone();
    let registry = ctx
        .groups
        .read_group(META, |s| s.nodes.clone())
        .unwrap_or_default();
    let mut ids: Vec<u64> = plan
        .members
        .keys()
        .chain(registry.keys())
        .copied()
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let checks = ids.iter().map(|id| {
        let grpc = registry
            .get(id)
            .map(|n| n.grpc.clone())
            .or_else(|| plan.members.get(id).cloned())
            .unwrap_or_default();
        let me = *id == ctx.node.0;
        let cluster = ctx.cluster.clone();
        async move { me || alive(&cluster, &grpc).await }
    });
    let alive = futures::future::join_all(checks).await;
    let nodes = ids
        .iter()
        .zip(alive)
        .map(|(id, alive)| {
            let reg = registry.get(id);
            pb::NodeStatus {
                node_id: *id,
                grpc_addr: reg
                    .map(|n| n.grpc.clone())
                    .or_else(|| plan.members.get(id).cloned())
                    .unwrap_or_default(),
                http_addr: reg.map(|n| n.http.clone()).unwrap_or_default(),
                p2p: reg.map(|n| n.p2p.clone()).unwrap_or_default(),
                alive,
                registered: reg.is_some(),
            }
        })
        .collect();
    let local: std::collections::HashMap<_, _> = ctx
        .groups
        .status()
        .into_iter()
        .map(|g| (g.group, g))
        .collect();
    let preferred = plan.preferred_leaders();
    let groups = plan
        .replicas
        .iter()
        .map(|(gid, voters)| {
            let st = local.get(gid);
            pb::GroupStatus {
                group: gid.0,
                voters: st.map_or_else(|| voters.iter().copied().collect(), |s| s.voters.clone()),
                leader: st.and_then(|s| s.leader).unwrap_or(0),
                term: st.map_or(0, |s| s.term),
                applied_index: st.and_then(|s| s.applied_index).unwrap_or(0),
                last_log_index: st.and_then(|s| s.last_log_index).unwrap_or(0),
                local: st.is_some(),
                preferred_leader: preferred.get(gid).copied().unwrap_or(0),
            }
        })
        .collect();
    Ok(pb::ClusterStatusResponse {
        node_id: ctx.node.0,
        cluster: ctx.cluster.clone(),
        partitions: plan.partitions,
        nodes,
        groups,
    })
}
