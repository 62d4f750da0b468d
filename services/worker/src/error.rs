//! The worker's errors, by the gRPC status they map to. Domain code returns
//! these; only `grpc` turns them into `tonic::Status`.

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl WorkerError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> WorkerError {
        WorkerError::InvalidArgument {
            field,
            message: message.into(),
        }
    }
}

impl From<cowsnap_store::Error> for WorkerError {
    fn from(e: cowsnap_store::Error) -> WorkerError {
        use cowsnap_store::Error as E;
        match e {
            E::Merging(..) => WorkerError::FailedPrecondition(e.to_string()),
            E::SnapshotInvalid { .. } => WorkerError::FailedPrecondition(e.to_string()),
            E::Shutdown { .. } => WorkerError::Unavailable(e.to_string()),
            other => WorkerError::Internal(anyhow::Error::new(other)),
        }
    }
}

impl From<std::io::Error> for WorkerError {
    fn from(e: std::io::Error) -> WorkerError {
        WorkerError::Internal(e.into())
    }
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
