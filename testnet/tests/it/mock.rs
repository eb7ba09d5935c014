//! An in-memory `parley.v1.Chat` server with just what the bench uses (users, rooms,
//! join, send, subscribe), so the bench is tested end to end without a real node.
//! It is not Parley: no persistence, no replication, fan-out over tokio broadcast.
#![allow(clippy::result_large_err)] // tonic::Status is large; it is what the trait returns

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use parley_proto::v1::chat_server::{Chat, ChatServer};
use parley_proto::v1::*;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

struct RoomState {
    name: String,
    members: HashSet<String>,
    tx: broadcast::Sender<Event>,
}

#[derive(Default)]
struct State {
    tokens: HashMap<String, String>,
    users: HashSet<String>,
    rooms: HashMap<String, RoomState>,
    by_name: HashMap<String, String>,
}

#[derive(Default, Clone)]
pub struct Mock {
    state: Arc<Mutex<State>>,
    seq: Arc<AtomicU64>,
}

/// Serves the mock on 127.0.0.1 (port chosen by the OS) until the runtime stops.
pub async fn serve() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ChatServer::new(Mock::default()))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

fn lock(m: &Mutex<State>) -> Result<std::sync::MutexGuard<'_, State>, Status> {
    m.lock().map_err(|_| Status::internal("poisoned"))
}

impl Mock {
    fn user<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing token"))?;
        lock(&self.state)?
            .tokens
            .get(token)
            .cloned()
            .ok_or_else(|| Status::unauthenticated("unknown token"))
    }

    fn room_id(state: &State, room: &str) -> Result<String, Status> {
        if state.rooms.contains_key(room) {
            return Ok(room.to_string());
        }
        state
            .by_name
            .get(room)
            .cloned()
            .ok_or_else(|| Status::not_found("no such room"))
    }

    fn room_msg(id: &str, r: &RoomState, user: &str) -> Room {
        Room {
            id: id.to_string(),
            name: r.name.clone(),
            member_count: r.members.len() as u32,
            joined: r.members.contains(user),
            ..Room::default()
        }
    }
}

fn unimpl<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not in the mock"))
}

#[tonic::async_trait]
impl Chat for Mock {
    async fn create_user(
        &self,
        request: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        let name = request.into_inner().name;
        let mut st = lock(&self.state)?;
        if !st.users.insert(name.clone()) {
            return Err(Status::already_exists("user name taken"));
        }
        let token = format!("tok{:016x}", rand::random::<u64>());
        st.tokens.insert(token.clone(), name.clone());
        Ok(Response::new(CreateUserResponse {
            user: Some(User {
                name,
                created_at: 0,
            }),
            token,
        }))
    }
    async fn who_am_i(&self, _: Request<WhoAmIRequest>) -> Result<Response<User>, Status> {
        unimpl()
    }
    async fn create_room(
        &self,
        request: Request<CreateRoomRequest>,
    ) -> Result<Response<Room>, Status> {
        let user = self.user(&request)?;
        let name = request.into_inner().name;
        let mut st = lock(&self.state)?;
        if st.by_name.contains_key(&name) {
            return Err(Status::already_exists("room name taken"));
        }
        let id = format!("rm_{:016x}", self.seq.fetch_add(1, Ordering::Relaxed));
        let (tx, _) = broadcast::channel(1 << 16);
        let r = RoomState {
            name: name.clone(),
            members: HashSet::from([user.clone()]),
            tx,
        };
        let msg = Self::room_msg(&id, &r, &user);
        st.rooms.insert(id.clone(), r);
        st.by_name.insert(name, id);
        Ok(Response::new(msg))
    }
    async fn list_rooms(
        &self,
        _: Request<ListRoomsRequest>,
    ) -> Result<Response<ListRoomsResponse>, Status> {
        unimpl()
    }
    async fn get_room(&self, request: Request<GetRoomRequest>) -> Result<Response<Room>, Status> {
        let user = self.user(&request)?;
        let st = lock(&self.state)?;
        let id = Self::room_id(&st, &request.get_ref().room)?;
        let r = st.rooms.get(&id).ok_or_else(|| Status::not_found("room"))?;
        Ok(Response::new(Self::room_msg(&id, r, &user)))
    }
    async fn delete_room(
        &self,
        _: Request<DeleteRoomRequest>,
    ) -> Result<Response<DeleteRoomResponse>, Status> {
        unimpl()
    }
    async fn join_room(&self, request: Request<JoinRoomRequest>) -> Result<Response<Room>, Status> {
        let user = self.user(&request)?;
        let mut st = lock(&self.state)?;
        let id = Self::room_id(&st, &request.get_ref().room)?;
        let r = st
            .rooms
            .get_mut(&id)
            .ok_or_else(|| Status::not_found("room"))?;
        r.members.insert(user.clone());
        Ok(Response::new(Self::room_msg(&id, r, &user)))
    }
    async fn leave_room(
        &self,
        _: Request<LeaveRoomRequest>,
    ) -> Result<Response<LeaveRoomResponse>, Status> {
        unimpl()
    }
    async fn list_members(
        &self,
        _: Request<ListMembersRequest>,
    ) -> Result<Response<ListMembersResponse>, Status> {
        unimpl()
    }
    async fn moderate(
        &self,
        _: Request<ModerateRequest>,
    ) -> Result<Response<ModerateResponse>, Status> {
        unimpl()
    }
    async fn send_message(
        &self,
        request: Request<SendMessageRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        let user = self.user(&request)?;
        let req = request.into_inner();
        let text = String::from_utf8(req.text)
            .map_err(|_| Status::invalid_argument("text is not UTF-8"))?;
        let st = lock(&self.state)?;
        let id = Self::room_id(&st, &req.room)?;
        let r = st.rooms.get(&id).ok_or_else(|| Status::not_found("room"))?;
        if !r.members.contains(&user) {
            return Err(Status::permission_denied("not a member"));
        }
        let msg_id = format!("{:032x}", self.seq.fetch_add(1, Ordering::Relaxed));
        let _ = r.tx.send(Event {
            cursor: msg_id.clone(),
            kind: Some(event::Kind::Message(Message {
                id: msg_id.clone(),
                room_id: id,
                sender: user,
                text,
                client_msg_id: req.client_msg_id,
                ..Message::default()
            })),
        });
        Ok(Response::new(SendMessageResponse {
            id: msg_id,
            duplicate: false,
            sent_at: 0,
        }))
    }
    async fn edit_message(
        &self,
        _: Request<EditMessageRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        unimpl()
    }
    async fn delete_message(
        &self,
        _: Request<DeleteMessageRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        unimpl()
    }
    async fn react(
        &self,
        _: Request<ReactRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        unimpl()
    }
    async fn send_direct(
        &self,
        _: Request<SendDirectRequest>,
    ) -> Result<Response<SendMessageResponse>, Status> {
        unimpl()
    }
    async fn history(
        &self,
        _: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        unimpl()
    }

    type SubscribeStream = ReceiverStream<Result<Event, Status>>;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let user = self.user(&request)?;
        let (out, rx) = mpsc::channel(1 << 12);
        let st = lock(&self.state)?;
        for room in &request.get_ref().rooms {
            let id = Self::room_id(&st, room)?;
            let r = st.rooms.get(&id).ok_or_else(|| Status::not_found("room"))?;
            if !r.members.contains(&user) {
                return Err(Status::permission_denied("not a member"));
            }
            let mut sub = r.tx.subscribe();
            let out = out.clone();
            tokio::spawn(async move {
                while let Ok(ev) = sub.recv().await {
                    if out.send(Ok(ev)).await.is_err() {
                        break;
                    }
                }
            });
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }
    async fn set_presence(
        &self,
        _: Request<SetPresenceRequest>,
    ) -> Result<Response<SetPresenceResponse>, Status> {
        unimpl()
    }
    async fn get_presence(
        &self,
        _: Request<GetPresenceRequest>,
    ) -> Result<Response<GetPresenceResponse>, Status> {
        unimpl()
    }
    async fn set_typing(
        &self,
        _: Request<SetTypingRequest>,
    ) -> Result<Response<SetTypingResponse>, Status> {
        unimpl()
    }
    async fn mark_read(
        &self,
        _: Request<MarkReadRequest>,
    ) -> Result<Response<MarkReadResponse>, Status> {
        unimpl()
    }
    async fn get_receipts(
        &self,
        _: Request<GetReceiptsRequest>,
    ) -> Result<Response<GetReceiptsResponse>, Status> {
        unimpl()
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        unimpl()
    }

    type ForwardSendsStream = ReceiverStream<Result<ForwardedAnswers, Status>>;

    async fn forward_sends(
        &self,
        _: Request<tonic::Streaming<ForwardedSends>>,
    ) -> Result<Response<Self::ForwardSendsStream>, Status> {
        unimpl()
    }
}
