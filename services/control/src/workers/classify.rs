//! What a worker's answer means for the call that got it, in one place:
//! the call was done, the worker refused it (it answered, and did
//! nothing), or its outcome is unknown (no answer, or none in time: the
//! worker may or may not have acted).
//!
//! The channel's layer (`layer`) reports each outcome to the
//! worker's health by [`outcome`]; the client turns a status into the
//! control service's error by [`error`]; and operations keep an operation
//! pending, to be driven again, when [`unknown`] says so.

use cowsnap_proto::bad_request::field_violation;
use http::StatusCode;
use tonic::{Code, Status};

use crate::error::ControlError;

/// What became of a call to a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The worker answered with an error: it did not do it.
    Refused,
    /// Nobody knows whether the worker did it.
    Unknown,
}

/// The outcome of a call that ended with `code`.
pub fn outcome(code: Code) -> Outcome {
    match code {
        Code::Ok => Outcome::Done,
        // No connection, the deadline passed, the call was cut off, or an
        // answer that says nothing: the worker may have acted.
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            Outcome::Unknown
        }
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::FailedPrecondition
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss
        | Code::Unauthenticated => Outcome::Refused,
    }
}

/// The code of a response that carries no `grpc-status` at all, from its
/// HTTP status (gRPC's HTTP-to-gRPC status mapping, as tonic's client
/// applies it).
pub fn http_code(status: StatusCode) -> Code {
    match status {
        StatusCode::BAD_REQUEST => Code::Internal,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::Unimplemented,
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => Code::Unavailable,
        _ => Code::Unknown,
    }
}

/// A worker's status as the control service's error. An unknown outcome
/// is `Unavailable`, and only an unknown outcome is.
pub fn error(s: &Status, worker_id: &str, address: &str) -> ControlError {
    let msg = s.message().to_string();
    if outcome(s.code()) == Outcome::Unknown {
        return ControlError::Unavailable(format!(
            "worker workers/{worker_id} ({address}) does not answer: {msg}"
        ));
    }
    match s.code() {
        Code::NotFound => ControlError::NotFound(msg),
        Code::AlreadyExists => ControlError::AlreadyExists(msg),
        Code::InvalidArgument => match field_violation(s) {
            Some((field, description)) => ControlError::invalid(field, description),
            None => ControlError::invalid("request", msg),
        },
        Code::FailedPrecondition => ControlError::FailedPrecondition(msg),
        Code::ResourceExhausted => ControlError::ResourceExhausted(msg),
        code => {
            ControlError::Internal(anyhow::anyhow!("worker workers/{worker_id}: {code}: {msg}"))
        }
    }
}

/// Whether an error of a worker call leaves the call's outcome unknown.
pub fn unknown(e: &ControlError) -> bool {
    matches!(e, ControlError::Unavailable(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use cowsnap_proto::bad_request::invalid_argument;

    /// Every gRPC code: its outcome, and the kind of error the client
    /// makes of it.
    const TABLE: [(Code, Outcome, ErrorKind); 17] = [
        (Code::Ok, Outcome::Done, ErrorKind::Internal),
        (Code::Cancelled, Outcome::Unknown, ErrorKind::Unavailable),
        (Code::Unknown, Outcome::Unknown, ErrorKind::Unavailable),
        (
            Code::InvalidArgument,
            Outcome::Refused,
            ErrorKind::InvalidArgument,
        ),
        (
            Code::DeadlineExceeded,
            Outcome::Unknown,
            ErrorKind::Unavailable,
        ),
        (Code::NotFound, Outcome::Refused, ErrorKind::NotFound),
        (
            Code::AlreadyExists,
            Outcome::Refused,
            ErrorKind::AlreadyExists,
        ),
        (
            Code::PermissionDenied,
            Outcome::Refused,
            ErrorKind::Internal,
        ),
        (
            Code::ResourceExhausted,
            Outcome::Refused,
            ErrorKind::ResourceExhausted,
        ),
        (
            Code::FailedPrecondition,
            Outcome::Refused,
            ErrorKind::FailedPrecondition,
        ),
        (Code::Aborted, Outcome::Refused, ErrorKind::Internal),
        (Code::OutOfRange, Outcome::Refused, ErrorKind::Internal),
        (Code::Unimplemented, Outcome::Refused, ErrorKind::Internal),
        (Code::Internal, Outcome::Refused, ErrorKind::Internal),
        (Code::Unavailable, Outcome::Unknown, ErrorKind::Unavailable),
        (Code::DataLoss, Outcome::Refused, ErrorKind::Internal),
        (Code::Unauthenticated, Outcome::Refused, ErrorKind::Internal),
    ];

    #[test]
    fn every_code_has_one_outcome_and_error() {
        for (code, want, kind) in TABLE {
            assert_eq!(outcome(code), want, "{code:?}");
            let e = error(&Status::new(code, "boom"), "w1", "unix:/w.sock");
            assert_eq!(e.kind(), kind, "{code:?}: {e}");
            // Operations keep an operation pending exactly when the
            // outcome is unknown.
            assert_eq!(unknown(&e), want == Outcome::Unknown, "{code:?}: {e}");
        }
        // All 17 codes, each once.
        let mut codes: Vec<i32> = TABLE.iter().map(|(c, _, _)| *c as i32).collect();
        codes.sort_unstable();
        assert_eq!(codes, (0..17).collect::<Vec<_>>());
    }

    #[test]
    fn errors_say_which_worker_and_keep_the_field() {
        let e = error(
            &Status::unavailable("connection refused"),
            "w1",
            "unix:/w.sock",
        );
        assert_eq!(
            e.to_string(),
            "worker workers/w1 (unix:/w.sock) does not answer: connection refused"
        );
        let e = error(
            &invalid_argument("size_bytes", "not a multiple of 512"),
            "w1",
            "a:1",
        );
        assert!(
            matches!(&e, ControlError::InvalidArgument { field, message }
                if field == "size_bytes" && message == "not a multiple of 512"),
            "{e:?}"
        );
        // The field is read from the details, never from the message.
        let e = error(
            &Status::invalid_argument("invalid size_bytes: not a multiple of 512"),
            "w1",
            "a:1",
        );
        assert!(
            matches!(&e, ControlError::InvalidArgument { field, message }
                if field == "request" && message == "invalid size_bytes: not a multiple of 512"),
            "{e:?}"
        );
        let e = error(&Status::data_loss("torn"), "w1", "a:1");
        assert_eq!(
            e.to_string(),
            "worker workers/w1: Unrecoverable data loss or corruption: torn"
        );
    }

    #[test]
    fn responses_without_a_status_take_it_from_http() {
        for (http, code) in [
            (StatusCode::OK, Code::Unknown),
            (StatusCode::BAD_REQUEST, Code::Internal),
            (StatusCode::UNAUTHORIZED, Code::Unauthenticated),
            (StatusCode::FORBIDDEN, Code::PermissionDenied),
            (StatusCode::NOT_FOUND, Code::Unimplemented),
            (StatusCode::TOO_MANY_REQUESTS, Code::Unavailable),
            (StatusCode::BAD_GATEWAY, Code::Unavailable),
            (StatusCode::SERVICE_UNAVAILABLE, Code::Unavailable),
            (StatusCode::GATEWAY_TIMEOUT, Code::Unavailable),
            (StatusCode::INTERNAL_SERVER_ERROR, Code::Unknown),
        ] {
            assert_eq!(http_code(http), code, "{http}");
        }
    }
}
