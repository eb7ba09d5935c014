//! Bench setup over gRPC: users, rooms, memberships, subscriber streams.
//!
//! Every step is bounded: RPCs carry a deadline, retries of transient failures
//! (`UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`) stop after
//! [`RETRY_BUDGET`], and steps run with a bounded number of concurrent calls.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use futures::{StreamExt, TryStreamExt};
use parley_proto::v1::chat_client::ChatClient;
use parley_proto::v1::{
    CreateRoomRequest, CreateUserRequest, GetRoomRequest, JoinRoomRequest, SubscribeRequest,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// How long one setup step may keep retrying transient failures.
pub const RETRY_BUDGET: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A bench user: its name, bearer header and the node it talks to.
#[derive(Clone)]
pub struct User {
    pub name: String,
    pub auth: MetadataValue<Ascii>,
    pub target: usize,
}

/// Wraps a message in a request carrying the user's bearer token.
pub fn authed<T>(msg: T, auth: &MetadataValue<Ascii>) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert("authorization", auth.clone());
    req
}

/// One HTTP/2 connection to `addr`. Unary channels get a per-call deadline; stream
/// channels must not (it would cut the subscription).
pub async fn connect(
    addr: SocketAddr,
    rpc_timeout: Option<Duration>,
) -> Result<ChatClient<Channel>> {
    let mut ep = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    if let Some(t) = rpc_timeout {
        ep = ep.timeout(t);
    }
    let mut last = None;
    for _ in 0..3 {
        match ep.connect().await {
            Ok(ch) => {
                return Ok(ChatClient::new(ch)
                    .max_decoding_message_size(16 << 20)
                    .max_encoding_message_size(16 << 20))
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    Err(anyhow!(
        "connecting to {addr}: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
    )
}

/// Calls `f(attempt)` until it succeeds, fails for good, or [`RETRY_BUDGET`] is spent.
pub async fn retry<T, F, Fut>(what: &str, mut f: F) -> Result<T>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + RETRY_BUDGET;
    let mut backoff = Duration::from_millis(50);
    for attempt in 0..1000u32 {
        match f(attempt).await {
            Ok(v) => return Ok(v),
            Err(s) if transient(s.code()) && Instant::now() + backoff < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(s) => return Err(anyhow!("{what}: {:?}: {}", s.code(), s.message())),
        }
    }
    Err(anyhow!("{what}: gave up after 1000 attempts"))
}

/// Creates users `"{prefix}{i}"` for `i in 0..n`, user `i` on target `target_of(i)`.
pub async fn create_users(
    clients: &[ChatClient<Channel>],
    prefix: &str,
    n: usize,
    target_of: impl Fn(usize) -> usize,
    concurrency: usize,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<User>> {
    let jobs = (0..n).map(|i| {
        let target = target_of(i) % clients.len();
        let client = clients[target].clone();
        let base = format!("{prefix}{i}");
        async move {
            let user = retry(&format!("create user {base}"), |attempt| {
                let mut c = client.clone();
                // A retry after DEADLINE_EXCEEDED may find the first try's user, whose
                // token we never saw: retry under a new name.
                let name = if attempt == 0 {
                    base.clone()
                } else {
                    format!("{base}r{attempt}")
                };
                async move {
                    let resp = c
                        .create_user(CreateUserRequest { name: name.clone() })
                        .await?;
                    Ok((name, resp.into_inner().token))
                }
            })
            .await?;
            let auth = MetadataValue::try_from(format!("Bearer {}", user.1))
                .map_err(|_| anyhow!("user {}: token is not a valid header value", user.0))?;
            progress.inc(1);
            Ok::<_, anyhow::Error>(User {
                name: user.0,
                auth,
                target,
            })
        }
    });
    futures::stream::iter(jobs)
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

/// Creates the rooms (as `admin`), returns their ids in order.
pub async fn create_rooms(
    client: &ChatClient<Channel>,
    admin: &User,
    names: &[String],
    write_quorum: u32,
    concurrency: usize,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<String>> {
    let jobs = names.iter().map(|name| {
        let client = client.clone();
        async move {
            let id = retry(&format!("create room {name}"), |attempt| {
                let mut c = client.clone();
                let name = name.clone();
                async move {
                    let created = c
                        .create_room(authed(
                            CreateRoomRequest {
                                name: name.clone(),
                                write_quorum,
                            },
                            &admin.auth,
                        ))
                        .await;
                    match created {
                        Ok(r) => Ok(r.into_inner().id),
                        // Our own earlier attempt got through after all.
                        Err(s) if attempt > 0 && s.code() == Code::AlreadyExists => {
                            let got = c
                                .get_room(authed(
                                    GetRoomRequest {
                                        room: name,
                                        consistency: 0,
                                    },
                                    &admin.auth,
                                ))
                                .await?;
                            Ok(got.into_inner().id)
                        }
                        Err(s) => Err(s),
                    }
                }
            })
            .await?;
            progress.inc(1);
            Ok::<_, anyhow::Error>(id)
        }
    });
    futures::stream::iter(jobs)
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}

/// Joins each `(user, room id)` pair; already being a member is fine.
pub async fn join_all(
    clients: &[ChatClient<Channel>],
    pairs: Vec<(User, String)>,
    concurrency: usize,
    progress: &indicatif::ProgressBar,
) -> Result<()> {
    let jobs = pairs.into_iter().map(|(user, room)| {
        let client = clients[user.target % clients.len()].clone();
        async move {
            retry(&format!("{} join {room}", user.name), |_| {
                let mut c = client.clone();
                let req = authed(JoinRoomRequest { room: room.clone() }, &user.auth);
                async move {
                    match c.join_room(req).await {
                        Ok(_) => Ok(()),
                        Err(s) if s.code() == Code::AlreadyExists => Ok(()),
                        Err(s) => Err(s),
                    }
                }
            })
            .await?;
            progress.inc(1);
            Ok::<_, anyhow::Error>(())
        }
    });
    futures::stream::iter(jobs)
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Opens a Subscribe stream for one room on its own connection.
pub async fn subscribe(
    addr: SocketAddr,
    user: &User,
    room_id: &str,
) -> Result<tonic::Streaming<parley_proto::v1::Event>> {
    let client = connect(addr, None).await?;
    let stream = retry(&format!("{} subscribe {room_id}", user.name), |_| {
        let mut c = client.clone();
        let req = authed(
            SubscribeRequest {
                rooms: vec![room_id.to_string()],
                cursor: String::new(),
            },
            &user.auth,
        );
        async move {
            match tokio::time::timeout(Duration::from_secs(10), c.subscribe(req)).await {
                Ok(r) => r.map(|s| s.into_inner()),
                Err(_) => Err(Status::deadline_exceeded("no response headers within 10s")),
            }
        }
    })
    .await
    .with_context(|| format!("subscriber {} on {addr}", user.name))?;
    Ok(stream)
}
