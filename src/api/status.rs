//! The one place that decides which gRPC status each [`Error`] becomes.

use std::sync::LazyLock;
use std::time::Duration;

use tonic::{Code, Status};

use crate::error::Error;
use crate::stream::feed::FeedEnd;
use crate::telemetry::LogSampler;

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Invalid(e) => Status::invalid_argument(e.to_string()),
            Error::NotFound { .. } => Status::not_found(err.to_string()),
            Error::RevisionMismatch { .. } => Status::aborted(err.to_string()),
            Error::Unavailable(ref source) => {
                tracing::warn!(error = %source, "database unavailable");
                Status::new(Code::Unavailable, "database unavailable, retry later")
            }
            Error::Unauthenticated(ref detail) => {
                // Anyone who can reach the port can fail to authenticate, so the log must not be
                // theirs to fill; thermostat_auth_failures_total counts every one.
                static LINES: LazyLock<LogSampler> =
                    LazyLock::new(|| LogSampler::every(Duration::from_secs(1)));
                if let Some(suppressed) = LINES.admit() {
                    tracing::info!(reason = %detail, suppressed, "unauthenticated call");
                }
                Status::unauthenticated("missing or invalid credentials")
            }
            Error::PermissionDenied(_) => Status::permission_denied(err.to_string()),
            Error::RateLimited { .. }
            | Error::TooManyStreams { .. }
            | Error::TooManyReads { .. } => Status::resource_exhausted(err.to_string()),
            Error::ShuttingDown => Status::unavailable("server shutting down, retry"),
            // The detail goes to the log, never to the caller: it may contain SQL or internals.
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

impl From<FeedEnd> for Status {
    fn from(end: FeedEnd) -> Self {
        match end {
            FeedEnd::Stopping => Status::unavailable("server shutting down; subscribe again"),
            FeedEnd::FellBehind { missed } => Status::resource_exhausted(format!(
                "subscriber fell behind by {missed} commands; subscribe again with send_initial_state"
            )),
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
                    retry_after: std::time::Duration::from_millis(100),
                },
                Code::ResourceExhausted,
            ),
            (Error::TooManyStreams { limit: 1 }, Code::ResourceExhausted),
            (Error::TooManyReads { limit: 1 }, Code::ResourceExhausted),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
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
