//! The API's error type and its one mapping to gRPC statuses. Every client-facing
//! failure goes through `From<ApiError> for Status`; internal details (storage errors,
//! Raft internals) are logged here and replaced by a generic text.

use tonic::{Code, Status};

use crate::consensus::state::CommandError;
use crate::consensus::ConsensusError;
use crate::delivery::CursorError;
use crate::ids::IdError;
use crate::replication::TimelineError;
use crate::store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The answer of the node a request was forwarded to, passed through unchanged.
    #[error("{}", .0.message())]
    Relayed(Box<Status>),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Unauthenticated(m) => Status::new(Code::Unauthenticated, m),
            ApiError::NotFound(m) => Status::new(Code::NotFound, m),
            ApiError::PermissionDenied(m) => Status::new(Code::PermissionDenied, m),
            ApiError::AlreadyExists(m) => Status::new(Code::AlreadyExists, m),
            ApiError::Invalid(m) => Status::new(Code::InvalidArgument, m),
            ApiError::Precondition(m) => Status::new(Code::FailedPrecondition, m),
            ApiError::Unavailable(m) => Status::new(Code::Unavailable, m),
            ApiError::Timeout(m) => Status::new(Code::DeadlineExceeded, m),
            ApiError::Relayed(s) => *s,
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "internal error answered to a client");
                Status::new(Code::Internal, "internal error; see the node's log")
            }
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        let text = e.to_string();
        match e {
            CommandError::NotFound { .. } => ApiError::NotFound(text),
            CommandError::AlreadyExists { .. } => ApiError::AlreadyExists(text),
            CommandError::NotMember { .. }
            | CommandError::NotAdmin { .. }
            | CommandError::Banned { .. } => ApiError::PermissionDenied(text),
            CommandError::Precondition { .. } => ApiError::Precondition(text),
            CommandError::Invalid { .. } => ApiError::Invalid(text),
        }
    }
}

impl From<ConsensusError> for ApiError {
    fn from(e: ConsensusError) -> Self {
        match e {
            ConsensusError::Unavailable { reason } => ApiError::Unavailable(reason),
            ConsensusError::Timeout => ApiError::Timeout(
                "the change was proposed but not confirmed in time; it may still apply".into(),
            ),
            ConsensusError::Storage(m) => ApiError::Internal(format!("raft storage: {m}")),
            ConsensusError::Fatal(m) => ApiError::Unavailable(format!("raft group stopped: {m}")),
        }
    }
}

impl From<TimelineError> for ApiError {
    fn from(e: TimelineError) -> Self {
        match e {
            TimelineError::NotFound { what } => ApiError::NotFound(format!("{what} not found")),
            TimelineError::PermissionDenied { reason } => ApiError::PermissionDenied(reason),
            TimelineError::Precondition { reason } => ApiError::Precondition(reason),
            TimelineError::Invalid { reason } => ApiError::Invalid(reason),
            TimelineError::Storage(s) => s.into(),
            q @ TimelineError::Quorum { .. } => ApiError::Timeout(q.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Closed => ApiError::Unavailable("the node is shutting down".into()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<IdError> for ApiError {
    fn from(e: IdError) -> Self {
        ApiError::Invalid(e.to_string())
    }
}

impl From<CursorError> for ApiError {
    fn from(e: CursorError) -> Self {
        ApiError::Invalid(e.to_string())
    }
}
