//! INVALID_ARGUMENT with the field at fault as data: a status that carries
//! a `google.rpc.BadRequest` field violation in its details (what grpcurl
//! prints and client libraries read), its message saying the same in
//! words. Every cowsnap server builds its INVALID_ARGUMENT here, and the
//! control service reads a worker's back with [`field_violation`], never
//! from the message.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::server::status_message;

/// An INVALID_ARGUMENT status: request field `field` is wrong because of
/// `description`. The message reads `invalid {field}: {description}`; the
/// details hold the two apart. Both are capped like every status message.
pub fn invalid_argument(field: &str, description: &str) -> Status {
    let description = status_message(description.to_string());
    Status::with_error_details(
        Code::InvalidArgument,
        status_message(format!("invalid {field}: {description}")),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// An INVALID_ARGUMENT status whose message, `message`, already names
/// request field `field` in words (as the CSI driver's do, in the CSI
/// spec's field names); the details carry a field violation for `field`
/// with the same words as its description.
pub fn field_error(field: &str, message: impl Into<String>) -> Status {
    let message = status_message(message.into());
    Status::with_error_details(
        Code::InvalidArgument,
        message.clone(),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

/// The field and description of the first field violation in `status`'s
/// details; `None` when it carries none.
pub fn field_violation(status: &Status) -> Option<(String, String)> {
    let v = status
        .get_details_bad_request()?
        .field_violations
        .into_iter()
        .next()?;
    Some((v.field, v.description))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_travels_in_the_details() {
        let s = invalid_argument("volume.size_bytes", "not a multiple of 512: 1000");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "invalid volume.size_bytes: not a multiple of 512: 1000"
        );
        assert_eq!(
            field_violation(&s),
            Some((
                "volume.size_bytes".to_string(),
                "not a multiple of 512: 1000".to_string()
            ))
        );
        // Through the wire form (the `grpc-status-details-bin` header).
        let wire = s.clone().into_http::<()>();
        let back = Status::from_header_map(wire.headers()).unwrap();
        assert_eq!(field_violation(&back), field_violation(&s));
    }

    #[test]
    fn a_field_error_keeps_its_message_and_carries_its_field() {
        let s = field_error(
            "volume_capabilities",
            "volume_capabilities: at least one is required",
        );
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "volume_capabilities: at least one is required");
        assert_eq!(
            field_violation(&s),
            Some((
                "volume_capabilities".to_string(),
                "volume_capabilities: at least one is required".to_string()
            ))
        );
    }

    #[test]
    fn a_status_without_details_has_no_field() {
        assert_eq!(
            field_violation(&Status::invalid_argument("invalid x: y")),
            None
        );
        assert_eq!(field_violation(&Status::not_found("gone")), None);
    }

    #[test]
    fn long_descriptions_are_capped_in_message_and_details() {
        let s = invalid_argument("filter", &"x".repeat(5000));
        assert!(s.message().len() <= crate::server::MAX_STATUS_MESSAGE);
        let (_, d) = field_violation(&s).unwrap();
        assert!(d.len() <= crate::server::MAX_STATUS_MESSAGE);
    }
}
