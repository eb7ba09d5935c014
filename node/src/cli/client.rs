//! Connecting to a node: the gRPC channel, the bearer-token interceptor, and the error
//! that names the address when a node cannot be reached. Also used by the integration
//! tests, so they speak to a node exactly as the CLI does.

use std::time::Duration;

use parley_proto::v1::chat_client::ChatClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

/// A `Chat` client that sends `authorization: Bearer <token>` on every call.
pub type Client = ChatClient<InterceptedService<Channel, Auth>>;

/// Replies may hold up to 1000 messages of up to 64 KiB each.
const MAX_DECODE: usize = 128 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The node did not answer at all (as opposed to answering with an error status).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach a node at {node}: {reason} (is `parley serve` running there?)")]
pub struct Unreachable {
    pub node: String,
    pub reason: String,
}

/// Adds the bearer token, if any, to each request.
#[derive(Debug, Clone, Default)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl Auth {
    /// `None` when the token cannot travel in a header (no real token is like that).
    pub fn new(token: Option<&str>) -> Option<Self> {
        match token {
            None => Some(Self(None)),
            Some(t) => format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .ok()
                .map(|v| Self(Some(v))),
        }
    }
}

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// `HOST:PORT` (or a full `http://` URL) to an endpoint.
pub fn endpoint(node: &str) -> Result<Endpoint, Unreachable> {
    let url = if node.starts_with("http://") || node.starts_with("https://") {
        node.to_owned()
    } else {
        format!("http://{node}")
    };
    Endpoint::from_shared(url)
        .map(|e| e.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true))
        .map_err(|e| Unreachable {
            node: node.to_owned(),
            reason: format!("not a valid address ({e})"),
        })
}

/// Opens a channel to `node`, failing fast with [`Unreachable`].
pub async fn channel(node: &str) -> Result<Channel, Unreachable> {
    let ep = endpoint(node)?;
    ep.connect().await.map_err(|e| Unreachable {
        node: node.to_owned(),
        reason: root_cause(&e),
    })
}

/// Connects a `Chat` client to `node` with `token`.
pub async fn connect(node: &str, token: Option<&str>) -> anyhow::Result<Client> {
    // Refused here as the node would refuse it.
    let auth = Auth::new(token)
        .ok_or_else(|| Status::unauthenticated("the token has characters a token never has"))?;
    let ch = channel(node).await?;
    Ok(ChatClient::with_interceptor(ch, auth).max_decoding_message_size(MAX_DECODE))
}

/// The innermost error message ("Connection refused (os error 111)"), which is the
/// one a person can act on.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// A unary request with a deadline, so a hung node cannot hang a script.
pub fn rq<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(Duration::from_secs(30));
    r
}
