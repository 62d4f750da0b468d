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

    /// The message for a client (the control service, and through it API
    /// callers): no server paths. An internal error says its root cause
    /// (the store's without its device, an OS error's text), never the
    /// contexts naming files, which only the logs get (`Display`).
    pub fn client_message(&self) -> String {
        match self {
            WorkerError::Internal(e) => {
                let root = e.root_cause();
                match root.downcast_ref::<cowsnap_store::Error>() {
                    Some(se) => se.client_message(),
                    None => root.to_string(),
                }
            }
            other => other.to_string(),
        }
    }
}

impl From<cowsnap_store::Error> for WorkerError {
    fn from(e: cowsnap_store::Error) -> WorkerError {
        use cowsnap_store::Error as E;
        match e {
            E::Merging(..) => WorkerError::FailedPrecondition(e.client_message()),
            E::SnapshotInvalid { .. } => WorkerError::FailedPrecondition(e.client_message()),
            E::Shutdown { .. } => WorkerError::Unavailable(e.client_message()),
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
