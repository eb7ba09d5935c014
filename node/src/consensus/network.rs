//! Raft RPCs between nodes over the `Cluster` gRPC service (`cluster.proto`).
//!
//! Client side: [`NetworkFactory`] makes one [`Network`] per (group, target) pair; each call
//! sends `RaftRequest { group, payload = codec::encode(openraft request) }` and reads back
//! `RaftReply { ok | err }`. Server side: [`ClusterRaftService`] decodes the request and
//! hands it to the group's `Raft`.
//!
//! To stay correct: transport failures (cannot connect, connection reset, deadline) map to
//! `RPCError::Unreachable`/`RPCError::Network`, so openraft backs off and retries; an error
//! the peer's Raft returned maps to `RPCError::RemoteError`, unchanged. The server never
//! panics on a malformed payload: it answers `INVALID_ARGUMENT`.

// openraft's `StorageError` and tonic's `Status` are large by design and fixed by the traits
// implemented here; boxing them in private helpers would only add conversions.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use parley_proto::v1::cluster_server::Cluster;
use parley_proto::v1::{
    BarrierReply, BarrierRequest, ForwardReply, ForwardRequest, GossipReply, GossipRequest,
    HelloReply, HelloRequest, PushBatchReply, PushBatchRequest, PushChangesReply,
    PushChangesRequest, PushOutcome, RaftReply, RaftRequest, SyncReply, SyncRequest,
    TakeLeadershipReply, TakeLeadershipRequest,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::{Request, Response, Status};

use super::codec;
use super::groups::{ConsensusError, Groups};
use super::peers::Peers;
use super::typ::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    Node, NodeId, RaftError, RpcError, TypeConfig, VoteRequest, VoteResponse,
};
use crate::ids::GroupId;

/// The longest an append or vote RPC may take.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest a snapshot transfer may take.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the clients one group's Raft uses to reach its peers, over the node's shared
/// [`Peers`] channels.
#[derive(Clone)]
pub struct NetworkFactory {
    group: GroupId,
    peers: Peers,
}

impl NetworkFactory {
    pub fn new(group: GroupId, peers: Peers) -> Self {
        Self { group, peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Network;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Network {
        Network {
            group: self.group,
            target,
            addr: node.addr.clone(),
            peers: self.peers.clone(),
        }
    }
}

/// A client for one peer of one group. Holds no connection of its own: each call takes
/// the peer's shared channel (and is refused at once if a fault blocks the link).
pub struct Network {
    group: GroupId,
    target: NodeId,
    addr: String,
    peers: Peers,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl Network {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcError<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let mut client = self
            .peers
            .client(self.target, &self.addr)
            .map_err(|e| RpcError::Unreachable(Unreachable::new(&TransportError(e.to_string()))))?;
        let mut request = Request::new(RaftRequest {
            group: self.group.0,
            payload: codec::encode(req),
        });
        request.set_timeout(match rpc {
            Rpc::Snapshot => option.hard_ttl().max(SNAPSHOT_TIMEOUT),
            Rpc::Append | Rpc::Vote => option.hard_ttl().min(RPC_TIMEOUT),
        });
        let reply = match rpc {
            Rpc::Append => client.raft_append(request).await,
            Rpc::Vote => client.raft_vote(request).await,
            Rpc::Snapshot => client.raft_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => {
                self.peers.mark_ok(self.target);
                r.into_inner()
            }
            Err(status) => {
                let err = TransportError(format!(
                    "node {} group {}: {status}",
                    self.target, self.group
                ));
                return Err(match status.code() {
                    tonic::Code::Unavailable => RpcError::Unreachable(Unreachable::new(&err)),
                    _ => RpcError::Network(NetworkError::new(&err)),
                });
            }
        };
        let bad = |what: &str, e: codec::CodecError| {
            RpcError::Network(NetworkError::new(&TransportError(format!(
                "node {} sent a malformed {what}: {e}",
                self.target
            ))))
        };
        if !reply.err.is_empty() {
            let e: E = codec::decode(&reply.err).map_err(|e| bad("error", e))?;
            return Err(RpcError::RemoteError(RemoteError::new(self.target, e)));
        }
        codec::decode(&reply.ok).map_err(|e| bad("reply", e))
    }
}

impl RaftNetwork<TypeConfig> for Network {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse, RpcError<RaftError>> {
        self.call(Rpc::Append, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse, RpcError<RaftError<InstallSnapshotError>>> {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest,
        option: RPCOption,
    ) -> Result<VoteResponse, RpcError<RaftError>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}

/// The `Cluster` gRPC service: Raft RPCs dispatched to the local groups, and `Hello`.
/// Replication calls (`PushChanges`, `SyncRoom`, `Gossip`) go to the plugged-in
/// [`ReplicationHandler`].
#[derive(Clone)]
pub struct ClusterRaftService {
    groups: Groups,
    cluster: String,
    http_addr: Option<SocketAddr>,
    replication: Option<Arc<dyn ReplicationHandler>>,
}

/// The replication side of the node-to-node service (timeline pushes, anti-entropy,
/// gossip). The consensus layer only carries these calls; `node.rs` plugs the handler in,
/// so this module stays free of timelines and presence.
#[tonic::async_trait]
pub trait ReplicationHandler: Send + Sync + 'static {
    async fn push_changes(&self, req: PushChangesRequest) -> Result<PushChangesReply, Status>;

    /// Several pushes at once, each handled as by [`Self::push_changes`]: the pushes of
    /// one room one after another in the order given (a later change may depend on an
    /// earlier one), different rooms concurrently, so their flushes share a group commit.
    async fn push_batch(&self, pushes: Vec<PushChangesRequest>) -> Vec<PushOutcome> {
        let n = pushes.len();
        let mut by_room: Vec<(String, Vec<(usize, PushChangesRequest)>)> = Vec::new();
        for (i, p) in pushes.into_iter().enumerate() {
            match by_room.iter_mut().find(|(room, _)| *room == p.room_id) {
                Some((_, list)) => list.push((i, p)),
                None => by_room.push((p.room_id.clone(), vec![(i, p)])),
            }
        }
        let rooms = by_room.into_iter().map(|(_, list)| async move {
            let mut out = Vec::with_capacity(list.len());
            for (i, p) in list {
                let outcome = match self.push_changes(p).await {
                    Ok(reply) => PushOutcome {
                        reply: Some(reply),
                        error: String::new(),
                    },
                    Err(status) => PushOutcome {
                        reply: None,
                        error: status.message().to_string(),
                    },
                };
                out.push((i, outcome));
            }
            out
        });
        let mut outcomes = vec![PushOutcome::default(); n];
        for (i, o) in futures::future::join_all(rooms).await.into_iter().flatten() {
            outcomes[i] = o;
        }
        outcomes
    }

    async fn sync_room(&self, req: SyncRequest) -> Result<SyncReply, Status>;
    async fn gossip(&self, req: GossipRequest) -> Result<GossipReply, Status>;
}

impl ClusterRaftService {
    pub fn new(groups: Groups, cluster: impl Into<String>, http_addr: Option<SocketAddr>) -> Self {
        Self {
            groups,
            cluster: cluster.into(),
            http_addr,
            replication: None,
        }
    }

    #[allow(clippy::result_large_err)]
    fn replication(&self) -> Result<Arc<dyn ReplicationHandler>, Status> {
        self.replication.clone().ok_or_else(|| {
            Status::unavailable("this node does not serve replication yet (starting up)")
        })
    }

    /// Serves `PushChanges`, `SyncRoom` and `Gossip` through `handler`.
    pub fn with_replication(mut self, handler: Arc<dyn ReplicationHandler>) -> Self {
        self.replication = Some(handler);
        self
    }

    fn reply<T: Serialize, E: Serialize>(result: Result<T, E>) -> Response<RaftReply> {
        Response::new(match result {
            Ok(v) => RaftReply {
                ok: codec::encode(&v),
                err: Vec::new(),
            },
            Err(e) => RaftReply {
                ok: Vec::new(),
                err: codec::encode(&e),
            },
        })
    }

    fn raft(&self, req: &RaftRequest) -> Result<super::typ::Raft, Status> {
        self.groups.raft(GroupId(req.group)).ok_or_else(|| {
            Status::not_found(format!("group {} is not hosted on this node", req.group))
        })
    }
}

#[tonic::async_trait]
impl Cluster for ClusterRaftService {
    async fn raft_append(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let raft = self.raft(&req)?;
        let body: AppendEntriesRequest = decode_payload(&req)?;
        Ok(Self::reply(raft.append_entries(body).await))
    }

    async fn raft_vote(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let raft = self.raft(&req)?;
        let body: VoteRequest = decode_payload(&req)?;
        Ok(Self::reply(raft.vote(body).await))
    }

    async fn raft_snapshot(
        &self,
        request: Request<RaftRequest>,
    ) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let raft = self.raft(&req)?;
        let body: InstallSnapshotRequest = decode_payload(&req)?;
        Ok(Self::reply(raft.install_snapshot(body).await))
    }

    async fn push_changes(
        &self,
        req: Request<PushChangesRequest>,
    ) -> Result<Response<PushChangesReply>, Status> {
        let h = self.replication()?;
        h.push_changes(req.into_inner()).await.map(Response::new)
    }

    async fn push_batch(
        &self,
        req: Request<PushBatchRequest>,
    ) -> Result<Response<PushBatchReply>, Status> {
        let h = self.replication()?;
        let outcomes = h.push_batch(req.into_inner().pushes).await;
        Ok(Response::new(PushBatchReply { outcomes }))
    }

    async fn sync_room(&self, req: Request<SyncRequest>) -> Result<Response<SyncReply>, Status> {
        let h = self.replication()?;
        h.sync_room(req.into_inner()).await.map(Response::new)
    }

    async fn gossip(&self, req: Request<GossipRequest>) -> Result<Response<GossipReply>, Status> {
        let h = self.replication()?;
        h.gossip(req.into_inner()).await.map(Response::new)
    }

    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardReply>, Status> {
        let req = request.into_inner();
        let group = GroupId(req.group);
        let cmd = codec::decode(&req.payload)
            .map_err(|e| Status::invalid_argument(format!("malformed command: {e}")))?;
        let res = self
            .groups
            .write_group(group, cmd, req.hops, budget(req.budget_ms))
            .await;
        let (ok, err) = encode_result(res);
        Ok(Response::new(ForwardReply { ok, err }))
    }

    async fn linearizable_barrier(
        &self,
        request: Request<BarrierRequest>,
    ) -> Result<Response<BarrierReply>, Status> {
        let req = request.into_inner();
        let p = GroupId(req.group)
            .partition()
            .ok_or_else(|| Status::invalid_argument("only partition groups take reads"))?;
        let res = self
            .groups
            .barrier_routed(p, req.hops, budget(req.budget_ms))
            .await;
        let (ok, err) = encode_result(res);
        Ok(Response::new(BarrierReply { ok, err }))
    }

    async fn take_leadership(
        &self,
        request: Request<TakeLeadershipRequest>,
    ) -> Result<Response<TakeLeadershipReply>, Status> {
        self.groups
            .take_leadership(request.get_ref())
            .await
            .map(|()| Response::new(TakeLeadershipReply {}))
            .map_err(Status::failed_precondition)
    }

    async fn hello(&self, _: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        Ok(Response::new(HelloReply {
            cluster: self.cluster.clone(),
            node_id: self.groups.node_id().0,
            grpc_addr: self.groups.grpc_addr().to_string(),
            http_addr: self.http_addr.map(|a| a.to_string()).unwrap_or_default(),
            plan: codec::encode(self.groups.plan()),
        }))
    }
}

/// Asks the node at `addr` who it is over a one-off connection (not the shared peer
/// channels: the caller may not know the node yet). `None` if it does not answer within
/// the timeouts or belongs to another cluster.
pub async fn hello(
    addr: &str,
    cluster: &str,
    connect_timeout: Duration,
    timeout: Duration,
) -> Option<HelloReply> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .ok()?
        .connect_timeout(connect_timeout)
        .timeout(timeout);
    let mut client =
        parley_proto::v1::cluster_client::ClusterClient::new(endpoint.connect().await.ok()?);
    let req = HelloRequest {
        cluster: cluster.to_string(),
        node_id: 0,
    };
    let reply = client.hello(req).await.ok()?.into_inner();
    (reply.cluster == cluster).then_some(reply)
}

/// A forwarded request's time budget; 0 (an old or careless sender) means the default.
fn budget(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn encode_result<T: Serialize>(res: Result<T, ConsensusError>) -> (Vec<u8>, Vec<u8>) {
    match res {
        Ok(v) => (codec::encode(&v), Vec::new()),
        Err(e) => (Vec::new(), codec::encode(&e)),
    }
}

fn decode_payload<T: DeserializeOwned>(req: &RaftRequest) -> Result<T, Status> {
    codec::decode(&req.payload)
        .map_err(|e| Status::invalid_argument(format!("malformed raft payload: {e}")))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::consensus::groups::Tuning;
    use crate::ids::NodeId as PNodeId;
    use parley_proto::v1::cluster_client::ClusterClient;
    use parley_proto::v1::cluster_server::ClusterServer;
    use std::time::Duration;

    fn option() -> RPCOption {
        RPCOption::new(Duration::from_secs(2))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raft_rpcs_travel_over_grpc() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let db = crate::store::Db::temporary().unwrap();
        let (tx, _rx) = tokio::sync::broadcast::channel(4);
        let groups = Groups::open_with(&db, PNodeId(1), addr, 1, tx, Tuning::default())
            .await
            .unwrap();
        let svc = ClusterRaftService::new(groups.clone(), "test", None);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ClusterServer::new(svc))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stop_rx.await;
                    },
                ),
        );

        let node = Node::new(addr.to_string());
        let mut net = NetworkFactory::new(GroupId(1), Peers::new(2))
            .new_client(1, &node)
            .await;
        // A stale candidate (term 0) asks node 1 for its vote: the peer answers, refusing.
        let resp = net
            .vote(VoteRequest::new(openraft::Vote::new(0, 2), None), option())
            .await
            .unwrap();
        assert!(!resp.vote_granted);
        assert_eq!(resp.vote.leader_id().voted_for(), Some(1));

        // A group the node does not host is a transport-level error, not a panic.
        let mut other = NetworkFactory::new(GroupId(9), Peers::new(2))
            .new_client(1, &node)
            .await;
        let err = other
            .vote(VoteRequest::new(openraft::Vote::new(0, 2), None), option())
            .await
            .unwrap_err();
        assert!(matches!(err, RpcError::Network(_)), "{err:?}");

        // Garbage payloads are refused with INVALID_ARGUMENT.
        let mut raw = ClusterClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let status = raw
            .raft_append(RaftRequest {
                group: 1,
                payload: vec![1, 255, 255],
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let hello = raw
            .hello(HelloRequest {
                cluster: "test".into(),
                node_id: 2,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((hello.cluster.as_str(), hello.node_id), ("test", 1));

        let _ = stop_tx.send(());
        server.await.unwrap().unwrap();
        groups.shutdown().await;

        // Nobody listens any more: the peer is unreachable.
        let mut gone = NetworkFactory::new(GroupId(1), Peers::new(2))
            .new_client(1, &node)
            .await;
        let err = gone
            .vote(VoteRequest::new(openraft::Vote::new(0, 2), None), option())
            .await
            .unwrap_err();
        assert!(matches!(err, RpcError::Unreachable(_)), "{err:?}");
    }

    /// Logs when each push starts and ends; room "a"'s first push waits until room "b"
    /// was handled, which only a batch that runs rooms concurrently lets happen.
    struct Ordered {
        log: std::sync::Mutex<Vec<String>>,
        b_done: tokio::sync::Notify,
    }

    #[tonic::async_trait]
    impl ReplicationHandler for Ordered {
        async fn push_changes(&self, req: PushChangesRequest) -> Result<PushChangesReply, Status> {
            let name = format!("{}{}", req.room_id, req.chunk);
            self.log.lock().unwrap().push(format!("start {name}"));
            if name == "a0" {
                self.b_done.notified().await;
            }
            self.log.lock().unwrap().push(format!("end {name}"));
            if name == "b0" {
                self.b_done.notify_one();
            }
            if name == "b1" {
                return Err(Status::failed_precondition("stale home"));
            }
            Ok(PushChangesReply {
                durable: true,
                rejected: name,
            })
        }
        async fn sync_room(&self, _: SyncRequest) -> Result<SyncReply, Status> {
            Err(Status::unimplemented("not here"))
        }
        async fn gossip(&self, _: GossipRequest) -> Result<GossipReply, Status> {
            Err(Status::unimplemented("not here"))
        }
    }

    #[tokio::test]
    async fn a_push_batch_keeps_each_rooms_order_and_answers_in_request_order() {
        let h = Ordered {
            log: std::sync::Mutex::new(Vec::new()),
            b_done: tokio::sync::Notify::new(),
        };
        let push = |room: &str, chunk: u32| PushChangesRequest {
            room_id: room.into(),
            chunk,
            ..Default::default()
        };
        let batch = vec![push("a", 0), push("b", 0), push("a", 1), push("b", 1)];
        let outcomes = tokio::time::timeout(Duration::from_secs(10), h.push_batch(batch))
            .await
            .expect("rooms of one batch must not wait for each other");
        let answered: Vec<(String, String)> = outcomes
            .into_iter()
            .map(|o| (o.reply.map(|r| r.rejected).unwrap_or_default(), o.error))
            .collect();
        assert_eq!(
            answered,
            vec![
                ("a0".to_string(), String::new()),
                ("b0".to_string(), String::new()),
                ("a1".to_string(), String::new()),
                (String::new(), "stale home".to_string()),
            ]
        );
        let log = h.log.lock().unwrap().clone();
        let at = |e: &str| log.iter().position(|l| l == e).unwrap();
        assert!(at("end a0") < at("start a1"), "{log:?}");
        assert!(at("end b0") < at("start b1"), "{log:?}");
    }
}
