//! The control service's errors, by the kind of failure (which the API maps
//! to gRPC status codes). Domain code returns these; only `api` turns them
//! into `tonic::Status`. Operations that fail record their error as a
//! [`Failure`] (kind, field, message) in the catalog.

/// What kind of failure, as recorded with a failed operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    Aborted,
    OutOfRange,
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::FailedPrecondition => "failed_precondition",
            ErrorKind::ResourceExhausted => "resource_exhausted",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Aborted => "aborted",
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::Internal => "internal",
        }
    }

    pub fn parse(s: &str) -> ErrorKind {
        match s {
            "not_found" => ErrorKind::NotFound,
            "already_exists" => ErrorKind::AlreadyExists,
            "invalid_argument" => ErrorKind::InvalidArgument,
            "failed_precondition" => ErrorKind::FailedPrecondition,
            "resource_exhausted" => ErrorKind::ResourceExhausted,
            "unavailable" => ErrorKind::Unavailable,
            "aborted" => ErrorKind::Aborted,
            "out_of_range" => ErrorKind::OutOfRange,
            _ => ErrorKind::Internal,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("invalid {field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// The catalog's file system is full: nothing that writes the catalog
    /// succeeds until it has room (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    CatalogFull(String),
    /// A worker did not answer (or not in time): the outcome of what was
    /// asked of it is unknown until it answers again.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Aborted(String),
    /// An offset past the end of a volume.
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl ControlError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ControlError {
        ControlError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            ControlError::NotFound(_) => ErrorKind::NotFound,
            ControlError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            ControlError::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            ControlError::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            ControlError::ResourceExhausted(_) | ControlError::CatalogFull(_) => {
                ErrorKind::ResourceExhausted
            }
            ControlError::Unavailable(_) => ErrorKind::Unavailable,
            ControlError::Aborted(_) => ErrorKind::Aborted,
            ControlError::OutOfRange(_) => ErrorKind::OutOfRange,
            ControlError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// The error as data, as a failed operation records it.
    pub fn failure(&self) -> Failure {
        match self {
            ControlError::InvalidArgument { field, message } => Failure {
                kind: ErrorKind::InvalidArgument,
                field: field.clone(),
                message: message.clone(),
            },
            e => Failure {
                kind: e.kind(),
                field: String::new(),
                message: e.to_string(),
            },
        }
    }
}

/// An error as data, as a failed operation records it: its kind, the
/// request field at fault (an invalid argument's; empty otherwise) and
/// what went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub kind: ErrorKind,
    pub field: String,
    pub message: String,
}

impl Failure {
    /// The error it records.
    pub fn error(&self) -> ControlError {
        let message = self.message.clone();
        match self.kind {
            ErrorKind::NotFound => ControlError::NotFound(message),
            ErrorKind::AlreadyExists => ControlError::AlreadyExists(message),
            ErrorKind::InvalidArgument => ControlError::InvalidArgument {
                field: if self.field.is_empty() {
                    "request".into()
                } else {
                    self.field.clone()
                },
                message,
            },
            ErrorKind::FailedPrecondition => ControlError::FailedPrecondition(message),
            ErrorKind::ResourceExhausted => ControlError::ResourceExhausted(message),
            ErrorKind::Unavailable => ControlError::Unavailable(message),
            ErrorKind::Aborted => ControlError::Aborted(message),
            ErrorKind::OutOfRange => ControlError::OutOfRange(message),
            ErrorKind::Internal => ControlError::Internal(anyhow::anyhow!(message)),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error().fmt(f)
    }
}

/// SQLite's primary result code for a full database or file system
/// (`SQLITE_FULL`; SQLite's unix VFS answers it for `ENOSPC` on a write).
const SQLITE_FULL: i32 = 13;

/// Whether the catalog failed for want of room on its file system.
fn disk_full(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.code()
                .and_then(|c| c.parse::<i32>().ok())
                .is_some_and(|c| c & 0xff == SQLITE_FULL)
                || db.message().contains("database or disk is full")
        }
        sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::StorageFull,
        _ => false,
    }
}

impl From<sqlx::Error> for ControlError {
    fn from(e: sqlx::Error) -> ControlError {
        if disk_full(&e) {
            let why = match &e {
                sqlx::Error::Database(db) => db.message().to_string(),
                e => e.to_string(),
            };
            return ControlError::CatalogFull(format!(
                "the catalog's file system is full ({why}): nothing can be recorded until it has room"
            ));
        }
        ControlError::Internal(anyhow::Error::new(e).context("catalog"))
    }
}

pub type Result<T, E = ControlError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_the_field_apart_from_the_message() {
        let e = ControlError::invalid("volume.size_bytes", "not a multiple of 512");
        let f = e.failure();
        assert_eq!(
            f,
            Failure {
                kind: ErrorKind::InvalidArgument,
                field: "volume.size_bytes".into(),
                message: "not a multiple of 512".into(),
            }
        );
        assert!(
            matches!(f.error(), ControlError::InvalidArgument { field, message }
            if field == "volume.size_bytes" && message == "not a multiple of 512")
        );
        assert_eq!(f.to_string(), e.to_string());
    }

    #[test]
    fn other_failures_keep_kind_and_message() {
        for e in [
            ControlError::NotFound("volumes/v not found".into()),
            ControlError::Aborted("the clone failed on its worker: boom".into()),
            ControlError::Internal(anyhow::anyhow!("disk on fire")),
        ] {
            let f = e.failure();
            assert_eq!((f.kind, f.field.as_str()), (e.kind(), ""));
            assert_eq!(f.error().kind(), e.kind());
            assert_eq!(f.to_string(), e.to_string());
        }
        // A record without a field (written before fields were kept).
        let f = Failure {
            kind: ErrorKind::InvalidArgument,
            field: String::new(),
            message: "bad".into(),
        };
        assert_eq!(f.to_string(), "invalid request: bad");
    }
}
