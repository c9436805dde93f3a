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

    /// The request is valid but the state it needs is not there (a preset a schedule names).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),

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

    /// Too many calls of one kind (`limit`: writes, reads or subscribes) from one identity;
    /// `retry_after` is when the next one would pass.
    #[error("rate limit on {limit} exceeded, retry in {retry_after:?}")]
    RateLimited {
        limit: &'static str,
        retry_after: std::time::Duration,
    },

    /// Too many reads running at once for one identity.
    #[error("at most {limit} concurrent reads per identity")]
    TooManyReads { limit: usize },

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
            // Classes 08 (connection exception), 53 (insufficient resources: disk full, out of
            // memory, too many connections) and 57 (operator intervention: the backend was
            // terminated, the server is shutting down), and read_only_sql_transaction (a
            // failover left the connection on a standby): the next attempt, or the next
            // connection, may succeed.
            sqlx::Error::Database(db)
                if db.code().is_some_and(|code| {
                    ["08", "53", "57"]
                        .iter()
                        .any(|class| code.starts_with(class))
                        || code == "25006"
                }) =>
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

/// An error with its causes, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use super::*;

    /// A database error with only a SQLSTATE, as PostgreSQL reports it.
    #[derive(Debug, thiserror::Error)]
    #[error("sqlstate {0}")]
    struct State(&'static str);

    impl sqlx::error::DatabaseError for State {
        fn message(&self) -> &str {
            self.0
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    #[test]
    fn database_failures_that_may_pass_are_unavailable_and_the_rest_internal() {
        let mapped = |code| Error::from(sqlx::Error::Database(Box::new(State(code))));
        for code in [
            "55P03", // lock_not_available
            "40P01", // deadlock_detected
            "08006", // connection_failure
            "53100", // disk_full
            "53200", // out_of_memory
            "53300", // too_many_connections
            "57P01", // admin_shutdown
            "25006", // read_only_sql_transaction
        ] {
            assert!(matches!(mapped(code), Error::Unavailable(_)), "{code}");
        }
        assert!(matches!(mapped("23514"), Error::Invalid(_)));
        for code in ["22021", "42P01", "25001"] {
            assert!(matches!(mapped(code), Error::Internal(_)), "{code}");
        }
    }
}
