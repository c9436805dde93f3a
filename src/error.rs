//! The service's error type. Every failure a caller can see is one of these variants; the
//! mapping to gRPC status codes lives in one place, `api::status`.

use crate::domain::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; names the field.
    #[error("invalid argument: {0}")]
    Invalid(#[from] ValidationError),

    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },

    /// Optimistic concurrency: the caller's `expected_revision` is stale. `actual` is 0 when the
    /// resource does not exist.
    #[error("revision mismatch: expected {expected}, stored revision is {actual}")]
    RevisionMismatch { expected: i64, actual: i64 },

    /// The database cannot be reached right now; retrying later may succeed.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),

    /// The service is stopping; the caller should retry on another replica.
    #[error("shutting down")]
    ShuttingDown,

    /// Anything else: a bug or an unexpected database failure. Logged, never shown in detail.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                Error::Unavailable(err)
            }
            // A CHECK constraint is the backstop behind the API's own validation: report it as
            // bad input rather than as a server fault.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23514") => {
                Error::Invalid(ValidationError::new(
                    db.constraint().unwrap_or("setpoint"),
                    "rejected by the database's range check",
                ))
            }
            _ => Error::Internal(format!("database: {err}")),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
