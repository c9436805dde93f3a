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

    /// No credentials, or credentials that do not verify. The detail is for the log only: it
    /// must not help an attacker tell a wrong key from an expired token.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),

    /// The caller is known but its role does not allow the call.
    #[error("permission denied: {0}")]
    PermissionDenied(String),

    /// Too many writes from one identity; `retry_after` is when the next one would pass.
    #[error("write rate limit exceeded, retry in {retry_after:?}")]
    RateLimited { retry_after: std::time::Duration },

    /// Too many open subscription streams for one identity.
    #[error("at most {limit} concurrent subscriptions per identity")]
    TooManyStreams { limit: usize },

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
            // lock_not_available (the Put writers' lock_timeout) and deadlock_detected: another
            // transaction holds the row; retrying later may succeed.
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("55P03" | "40P01")) =>
            {
                Error::Unavailable(err)
            }
            // Classes 08 (connection exception) and 57 (operator intervention: the backend was
            // terminated, the server is shutting down): the next connection may succeed.
            sqlx::Error::Database(db)
                if db
                    .code()
                    .is_some_and(|code| code.starts_with("08") || code.starts_with("57")) =>
            {
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

impl Error {
    /// The same failure, for another caller of a statement that failed for several (the Puts
    /// written together, see `store::put_queue`): `sqlx::Error` cannot be cloned.
    pub(crate) fn for_another_caller(&self) -> Error {
        match self {
            Error::Unavailable(source) => Error::Unavailable(match source {
                sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
                sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
                other => sqlx::Error::Io(std::io::Error::other(other.to_string())),
            }),
            other => Error::Internal(other.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
