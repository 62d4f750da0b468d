//! The node plugin's errors, one variant per gRPC status the CSI spec asks
//! for; turned into a `tonic::Status` only at the service boundary.

use std::fmt;

#[derive(Debug)]
pub enum NodeError {
    /// Request field `field` (its CSI name) is missing or malformed, or a
    /// path is outside the kubelet dir.
    InvalidArgument { field: String, message: String },
    /// No such volume on this node (or no such path).
    NotFound(String),
    /// The call conflicts with what is already staged or published.
    AlreadyExists(String),
    /// The spec's FAILED_PRECONDITION (e.g. publish before stage).
    FailedPrecondition(String),
    /// A command or system call failed.
    Internal(String),
}

pub type Result<T> = std::result::Result<T, NodeError>;

impl NodeError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        NodeError::InvalidArgument {
            field: field.to_string(),
            message: message.into(),
        }
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        NodeError::Internal(msg.into())
    }
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeError::InvalidArgument { message: m, .. }
            | NodeError::NotFound(m)
            | NodeError::AlreadyExists(m)
            | NodeError::FailedPrecondition(m)
            | NodeError::Internal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for NodeError {}

impl From<NodeError> for tonic::Status {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::InvalidArgument { field, message } => {
                cowsnap_proto::bad_request::field_error(&field, message)
            }
            NodeError::NotFound(m) => tonic::Status::not_found(m),
            NodeError::AlreadyExists(m) => tonic::Status::already_exists(m),
            NodeError::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            NodeError::Internal(m) => tonic::Status::internal(m),
        }
    }
}
