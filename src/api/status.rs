//! The one place that decides which gRPC status each [`Error`] becomes.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::Error;
use crate::stream::feed::FeedEnd;
use crate::telemetry::LogSampler;

/// The `domain` of every `google.rpc.ErrorInfo` this service sends (AIP-193).
pub const ERROR_DOMAIN: &str = "thermostat";

/// After how long a caller may retry a call refused for a passing reason (the database or the
/// server away, a concurrency limit), when nothing says more precisely.
const RETRY_SOON: Duration = Duration::from_secs(1);

/// A status with the AIP-193 details every error carries: an `ErrorInfo` (a stable `reason`
/// a client can switch on, and `metadata`), then whatever else `details` adds.
fn status(
    code: Code,
    message: impl Into<String>,
    reason: &str,
    metadata: &[(&str, String)],
    details: impl FnOnce(&mut ErrorDetails),
) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let mut all = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    details(&mut all);
    Status::with_error_details(code, message, all)
}

fn retry_after(delay: Duration) -> impl FnOnce(&mut ErrorDetails) {
    move |d| {
        d.set_retry_info(Some(delay));
    }
}

fn nothing(_: &mut ErrorDetails) {}

impl From<Error> for Status {
    // One arm per error, as a table: splitting it would scatter the one mapping there is.
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::Invalid(e) => {
                let metadata = [("field", e.field.clone())];
                let message = e.to_string();
                status(
                    Code::InvalidArgument,
                    message,
                    "INVALID_FIELD",
                    &metadata,
                    |d| {
                        d.add_bad_request_violation(e.field, e.message);
                    },
                )
            }
            Error::NotFound { kind, id } => {
                let metadata = [("kind", kind.to_owned()), ("id", id.clone())];
                status(Code::NotFound, message, "NOT_FOUND", &metadata, |d| {
                    d.set_resource_info(kind, id, "", "");
                })
            }
            Error::RevisionMismatch { expected, actual } => {
                let metadata = [
                    ("expected_revision", expected.to_string()),
                    ("current_revision", actual.to_string()),
                ];
                status(
                    Code::Aborted,
                    message,
                    "REVISION_MISMATCH",
                    &metadata,
                    nothing,
                )
            }
            Error::FailedPrecondition(ref detail) => {
                let detail = detail.clone();
                status(
                    Code::FailedPrecondition,
                    message,
                    "FAILED_PRECONDITION",
                    &[],
                    |d| {
                        d.add_precondition_failure_violation("STATE", "", detail);
                    },
                )
            }
            Error::Unavailable(ref source) => {
                tracing::warn!(error = %source, "database unavailable");
                status(
                    Code::Unavailable,
                    "database unavailable, retry later",
                    "DATABASE_UNAVAILABLE",
                    &[],
                    retry_after(RETRY_SOON),
                )
            }
            Error::Unauthenticated(ref detail) => {
                // Anyone who can reach the port can fail to authenticate, so the log must not be
                // theirs to fill; thermostat_auth_failures_total counts every one.
                static LINES: LazyLock<LogSampler> =
                    LazyLock::new(|| LogSampler::every(Duration::from_secs(1)));
                if let Some(suppressed) = LINES.admit() {
                    tracing::info!(reason = %detail, suppressed, "unauthenticated call");
                }
                status(
                    Code::Unauthenticated,
                    "missing or invalid credentials",
                    "UNAUTHENTICATED",
                    &[],
                    nothing,
                )
            }
            Error::PermissionDenied(_) => status(
                Code::PermissionDenied,
                message,
                "PERMISSION_DENIED",
                &[],
                nothing,
            ),
            Error::RateLimited {
                limit,
                retry_after: delay,
            } => status(
                Code::ResourceExhausted,
                message,
                "RATE_LIMITED",
                &[("limit", limit.to_owned())],
                retry_after(delay),
            ),
            Error::TooManyStreams { limit } => status(
                Code::ResourceExhausted,
                message,
                "TOO_MANY_SUBSCRIPTIONS",
                &[("limit", limit.to_string())],
                retry_after(RETRY_SOON),
            ),
            Error::TooManyReads { limit } => status(
                Code::ResourceExhausted,
                message,
                "TOO_MANY_READS",
                &[("limit", limit.to_string())],
                retry_after(RETRY_SOON),
            ),
            Error::ShuttingDown => status(
                Code::Unavailable,
                "server shutting down, retry",
                "SHUTTING_DOWN",
                &[],
                retry_after(Duration::ZERO),
            ),
            // The detail goes to the log, never to the caller: it may contain SQL or internals.
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                status(Code::Internal, "internal error", "INTERNAL", &[], nothing)
            }
        }
    }
}

impl From<FeedEnd> for Status {
    fn from(end: FeedEnd) -> Self {
        match end {
            FeedEnd::Stopping => status(
                Code::Unavailable,
                "server shutting down; subscribe again",
                "SHUTTING_DOWN",
                &[],
                retry_after(Duration::ZERO),
            ),
            FeedEnd::FellBehind { missed } => status(
                Code::ResourceExhausted,
                format!(
                    "subscriber fell behind by {missed} commands; subscribe again with send_initial_state"
                ),
                "SUBSCRIBER_FELL_BEHIND",
                &[("missed", missed.to_string())],
                nothing,
            ),
            FeedEnd::Refused(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ValidationError;

    #[test]
    fn every_error_maps_to_its_code() {
        let cases = [
            (
                Error::Invalid(ValidationError::new("f", "bad")),
                Code::InvalidArgument,
            ),
            (
                Error::NotFound {
                    kind: "setpoint",
                    id: "x".into(),
                },
                Code::NotFound,
            ),
            (
                Error::RevisionMismatch {
                    expected: 1,
                    actual: 2,
                },
                Code::Aborted,
            ),
            (
                Error::Unavailable(sqlx::Error::PoolTimedOut),
                Code::Unavailable,
            ),
            (Error::Internal("SELECT secret".into()), Code::Internal),
            (Error::ShuttingDown, Code::Unavailable),
            (
                Error::Unauthenticated("expired".into()),
                Code::Unauthenticated,
            ),
            (
                Error::PermissionDenied("viewer".into()),
                Code::PermissionDenied,
            ),
            (
                Error::RateLimited {
                    limit: "writes",
                    retry_after: std::time::Duration::from_millis(100),
                },
                Code::ResourceExhausted,
            ),
            (Error::TooManyStreams { limit: 1 }, Code::ResourceExhausted),
            (Error::TooManyReads { limit: 1 }, Code::ResourceExhausted),
        ];
        for (err, code) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            let details = status.get_error_details();
            let info = details.error_info().expect("every error has an ErrorInfo");
            assert_eq!(info.domain, ERROR_DOMAIN);
            assert!(
                !info.reason.is_empty()
                    && info
                        .reason
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c == '_'),
                "{}",
                info.reason
            );
            // Codes a client retries say when.
            if matches!(code, Code::ResourceExhausted | Code::Unavailable) {
                assert!(details.retry_info().is_some(), "{code:?}");
            }
        }
    }

    #[test]
    fn errors_carry_the_details_a_client_acts_on() {
        let invalid = Status::from(Error::Invalid(
            ValidationError::new("desired_celsius", "must be finite").within("setpoint"),
        ))
        .get_error_details();
        let violations = &invalid
            .bad_request()
            .expect("a BadRequest")
            .field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "setpoint.desired_celsius");
        assert_eq!(violations[0].description, "must be finite");

        let aborted = Status::from(Error::RevisionMismatch {
            expected: 3,
            actual: 5,
        })
        .get_error_details();
        let info = aborted.error_info().expect("an ErrorInfo");
        assert_eq!(info.reason, "REVISION_MISMATCH");
        assert_eq!(info.metadata["current_revision"], "5");
        assert_eq!(info.metadata["expected_revision"], "3");

        let limited = Status::from(Error::RateLimited {
            limit: "subscribes",
            retry_after: Duration::from_millis(1500),
        });
        assert!(limited.message().contains("subscribes"), "{limited:?}");
        let limited = limited.get_error_details();
        let retry = limited.retry_info().expect("a RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(1500)));
        let info = limited.error_info().expect("an ErrorInfo");
        assert_eq!(info.metadata["limit"], "subscribes");
    }

    #[test]
    fn invalid_argument_names_the_field_and_internal_hides_details() {
        let status = Status::from(Error::Invalid(ValidationError::new(
            "setpoint.sensor_id",
            "empty",
        )));
        assert!(status.message().contains("setpoint.sensor_id"));
        let status = Status::from(Error::Internal("SELECT secret".into()));
        assert!(!status.message().contains("secret"));
        // Why a token failed is logged, not told: "expired" vs "bad signature" helps attackers.
        let status = Status::from(Error::Unauthenticated(
            "signature invalid for kid k1".into(),
        ));
        assert!(!status.message().contains("k1"));
    }
}
