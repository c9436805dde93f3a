//! PostgreSQL storage: the connection pool, migrations and every SQL statement the service
//! issues. Knows nothing of gRPC; returns domain types and [`crate::Error`].

mod setpoints;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Connection;

use crate::config::DatabaseConfig;
use crate::error::Result;

pub use setpoints::{HistoryEntry, PutOutcome, SetpointVersion, PUT_SQL};

/// A pooled connection idle this long is pinged before it is handed out.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Creates the pool without connecting: the service starts (and reports NOT_SERVING) even
    /// while the database is down, and connects when it comes back.
    pub fn connect_lazy(config: &DatabaseConfig) -> Result<Self, sqlx::Error> {
        let options: PgConnectOptions = config.database_url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(config.database_max_connections)
            .acquire_timeout(config.database_acquire_timeout)
            // sqlx pings a connection before every use by default: a second round trip per
            // statement, which made a Put cost the database twice pgbench's (benchmark 3). A
            // connection is checked only after a pause long enough for the database to have gone
            // away meanwhile; a busy one fails its statement, and the caller its call, instead.
            .test_before_acquire(false)
            .before_acquire(|connection, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        connection.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options.application_name("thermostat"));
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations. Safe to run concurrently from several replicas: sqlx takes an
    /// advisory lock.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.pool).await
    }

    /// A cheap round trip, for health checks; bounded by `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let query = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(tokio::time::timeout(timeout, query).await, Ok(Ok(_)))
    }
}
