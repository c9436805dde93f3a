//! PostgreSQL storage: the connection pool, migrations and every SQL statement the service
//! issues. Knows nothing of gRPC; returns domain types and [`crate::Error`].

mod heater_settings;
mod levels;
mod put_queue;
mod requests;
mod schedules;
mod sequences;
mod setpoints;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Connection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::DatabaseConfig;
use crate::error::Result;

pub use heater_settings::{SettingsRecord, SETTINGS_CHANNEL};
pub use levels::{LevelEntry, LevelWrite, Levels, EXPIRY_ACTOR};
pub use requests::{RecordedWrite, WriteRequest};
pub use schedules::{
    PresetRecord, SchedulePass, ScheduleRecord, ScheduleWrite, SensorSchedule, SCHEDULE_ACTOR,
};
pub use setpoints::{HistoryEntry, PutOutcome, SetpointVersion, PUT_SQL};

/// A pooled connection idle this long is pinged before it is handed out.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    puts: put_queue::PutQueue,
    /// Turns for API reads: fewer than the pool's connections, so that reads never take those
    /// writes, the control loop and health checks need.
    reads: Arc<Semaphore>,
    read_wait: Duration,
}

/// The settings both pools share.
fn pool_options(config: &DatabaseConfig) -> PgPoolOptions {
    PgPoolOptions::new()
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
}

impl Store {
    /// Creates the pool without connecting: the service starts (and reports NOT_SERVING) even
    /// while the database is down, and connects when it comes back. Starts the Put writers, so
    /// it must be called within a Tokio runtime.
    pub fn connect_lazy(config: &DatabaseConfig) -> Result<Self, sqlx::Error> {
        let max_reads = config
            .database_max_reads
            .unwrap_or(config.database_max_connections * 3 / 4)
            .max(1);
        if max_reads >= config.database_max_connections {
            return Err(sqlx::Error::Configuration(
                "DATABASE_MAX_READS must be below DATABASE_MAX_CONNECTIONS: the rest are for writes, the control loop and health checks".into(),
            ));
        }
        let url = config
            .url()
            .map_err(|e| sqlx::Error::Configuration(e.into()))?;
        let options: PgConnectOptions = url.parse()?;
        // Every connection bounds its wait for a lock: a row locked by a forgotten transaction
        // must fail a Delete (or a Put, below) with UNAVAILABLE, not hold its connection for
        // good (a request's timeout drops the call, not the statement).
        let lock_timeout = config.database_acquire_timeout.as_millis().to_string();
        let options = options
            .application_name("thermostat")
            .options([("lock_timeout", lock_timeout.as_str())]);
        let pool = pool_options(config)
            .max_connections(config.database_max_connections)
            .connect_lazy_with(options.clone());
        // The Put writers' own connections: the Put statement's generic plan always (planning
        // anew costs more than it saves, BENCHMARKS.md), and a statement timeout below the wait
        // for the answer, so a Put answered UNAVAILABLE is never written after a later one.
        let answer_within = config.database_acquire_timeout * 2;
        let statement_timeout = (config.database_acquire_timeout * 3 / 2)
            .as_millis()
            .to_string();
        let writer_pool = pool_options(config)
            .max_connections(config.database_put_writers)
            .connect_lazy_with(options.options([
                ("plan_cache_mode", "force_generic_plan"),
                ("statement_timeout", statement_timeout.as_str()),
            ]));
        // Twice the lock timeout: a healthy statement waits for a lock at most once that long.
        let puts = put_queue::PutQueue::start(
            writer_pool,
            config.database_put_writers as usize,
            answer_within,
        );
        Ok(Self {
            pool,
            puts,
            reads: Arc::new(Semaphore::new(max_reads as usize)),
            read_wait: config.database_acquire_timeout,
        })
    }

    /// A turn for one API read; UNAVAILABLE when none is free within the acquire timeout.
    async fn read_turn(&self) -> Result<OwnedSemaphorePermit> {
        match tokio::time::timeout(self.read_wait, self.reads.clone().acquire_owned()).await {
            Ok(Ok(turn)) => Ok(turn),
            Ok(Err(_)) => Err(crate::Error::ShuttingDown),
            Err(_) => Err(crate::Error::Unavailable(sqlx::Error::PoolTimedOut)),
        }
    }

    /// Puts queued for a writer and not yet taken by one (a backlog means the database is
    /// slower than the Puts arrive, or a writer waits on a lock).
    pub fn puts_waiting(&self) -> usize {
        self.puts.waiting()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations. Safe to run concurrently from several replicas: sqlx takes an
    /// advisory lock, which a replica waits for as long as another one's migrations take, so
    /// not within the pool's lock timeout.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        let mut connection = self.pool.acquire().await?;
        // Changed for this connection only, which is then closed rather than handed back.
        connection.close_on_drop();
        sqlx::query("SET lock_timeout = 0")
            .execute(&mut *connection)
            .await?;
        MIGRATOR.run(&mut *connection).await
    }

    /// A cheap round trip, for health checks; bounded by `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let query = sqlx::query("SELECT 1").execute(&self.pool);
        matches!(tokio::time::timeout(timeout, query).await, Ok(Ok(_)))
    }
}
