//! The levels above DEFAULT of each sensor's priority array (`setpoint_levels`): writing,
//! relinquishing, reading and expiring them. Each change locks the sensor's `setpoints` row
//! first (as Put and Delete do), raises its revision and appends its history row in one
//! transaction; the row's notification then carries the new effective setpoint.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, Transaction};

use super::{Store, WriteRequest};
use crate::domain::levels::{Level, LevelValues};
use crate::domain::{Reason, Scope, SensorId};
use crate::error::{Error, Result};

/// Who expiries are recorded as, in the history.
pub const EXPIRY_ACTOR: &str = "system";
/// How many expiries one upkeep statement takes at most.
const EXPIRY_BATCH: i64 = 100;

/// One level of a sensor's priority array.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LevelEntry {
    #[sqlx(try_from = "i16")]
    pub level: Level,
    pub desired_celsius: f64,
    pub up_delta_celsius: f64,
    pub down_delta_celsius: f64,
    pub expire_time: Option<DateTime<Utc>>,
    pub revision: i64,
    pub update_time: DateTime<Utc>,
    pub updated_by: String,
    pub reason: String,
    /// For the SCHEDULE level: the schedule that wrote it.
    pub schedule_id: Option<String>,
}

/// The DEFAULT level, as the `setpoints` row holds it.
#[derive(sqlx::FromRow)]
struct DefaultRow {
    building_id: String,
    sensor_revision: i64,
    #[sqlx(flatten)]
    entry: LevelEntry,
}

/// A sensor's whole priority array.
#[derive(Debug, Clone, PartialEq)]
pub struct Levels {
    pub sensor_id: String,
    pub building_id: String,
    pub revision: i64,
    /// Highest first; DEFAULT last.
    pub entries: Vec<LevelEntry>,
    /// The level that decides now.
    pub effective: Level,
    /// When the deciding level expires.
    pub effective_until: Option<DateTime<Utc>>,
}

/// A level to write.
pub struct LevelWrite<'a> {
    pub sensor_id: &'a SensorId,
    pub level: Level,
    pub values: LevelValues,
    pub expire_time: Option<DateTime<Utc>>,
    pub expected_revision: Option<i64>,
    pub actor: &'a str,
    pub reason: &'a Reason,
    pub scope: &'a Scope,
    pub request: Option<&'a WriteRequest>,
}

/// The sensor's `setpoints` row, locked: its building and revision.
struct Locked {
    building_id: String,
    revision: i64,
}

impl Store {
    /// Writes one level; returns the sensor's new revision.
    #[tracing::instrument(skip_all, fields(sensor_id = %write.sensor_id))]
    pub async fn write_level(&self, write: LevelWrite<'_>) -> Result<i64> {
        let mut tx = self.pool().begin().await?;
        let locked = lock(
            &mut tx,
            write.sensor_id,
            write.scope,
            write.expected_revision,
        )
        .await?;
        let revision = locked.revision + 1;
        sqlx::query(
            "INSERT INTO setpoint_levels AS l (sensor_id, level, desired_celsius, \
                 up_delta_celsius, down_delta_celsius, expire_time, revision, update_time, \
                 updated_by, reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, now(), $8, $9) \
             ON CONFLICT (sensor_id, level) DO UPDATE SET \
                 desired_celsius = excluded.desired_celsius, \
                 up_delta_celsius = excluded.up_delta_celsius, \
                 down_delta_celsius = excluded.down_delta_celsius, \
                 expire_time = excluded.expire_time, revision = excluded.revision, \
                 update_time = excluded.update_time, updated_by = excluded.updated_by, \
                 reason = excluded.reason",
        )
        .bind(write.sensor_id.as_str())
        .bind(write.level.number())
        .bind(write.values.desired.value())
        .bind(write.values.up_delta.value())
        .bind(write.values.down_delta.value())
        .bind(write.expire_time)
        .bind(revision)
        .bind(write.actor)
        .bind(write.reason.as_str())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO setpoint_history (sensor_id, revision, building_id, desired_celsius, \
                 up_delta_celsius, down_delta_celsius, deleted, change_time, changed_by, reason, \
                 level, expire_time) \
             VALUES ($1, $2, $3, $4, $5, $6, false, now(), $7, $8, $9, $10)",
        )
        .bind(write.sensor_id.as_str())
        .bind(revision)
        .bind(&locked.building_id)
        .bind(write.values.desired.value())
        .bind(write.values.up_delta.value())
        .bind(write.values.down_delta.value())
        .bind(write.actor)
        .bind(write.reason.as_str())
        .bind(write.level.number())
        .bind(write.expire_time)
        .execute(&mut *tx)
        .await?;
        record(&mut tx, write.request, write.sensor_id, revision).await?;
        bump(&mut tx, write.sensor_id, revision).await?;
        tx.commit().await?;
        Ok(revision)
    }

    /// Empties one level; returns the sensor's new revision. NOT_FOUND if it was empty.
    #[tracing::instrument(skip_all, fields(sensor_id = %sensor_id))]
    #[allow(clippy::too_many_arguments)]
    pub async fn relinquish_level(
        &self,
        sensor_id: &SensorId,
        level: Level,
        expected_revision: Option<i64>,
        actor: &str,
        reason: &Reason,
        scope: &Scope,
        request: Option<&WriteRequest>,
    ) -> Result<i64> {
        let mut tx = self.pool().begin().await?;
        let locked = lock(&mut tx, sensor_id, scope, expected_revision).await?;
        let gone = sqlx::query("DELETE FROM setpoint_levels WHERE sensor_id = $1 AND level = $2")
            .bind(sensor_id.as_str())
            .bind(level.number())
            .execute(&mut *tx)
            .await?;
        if gone.rows_affected() == 0 {
            return Err(Error::NotFound {
                kind: "setpoint level",
                id: format!("{sensor_id}/{}", level.name()),
            });
        }
        let revision = locked.revision + 1;
        bump(&mut tx, sensor_id, revision).await?;
        relinquished(
            &mut tx,
            sensor_id,
            revision,
            &locked.building_id,
            level,
            None,
            actor,
            reason.as_str(),
        )
        .await?;
        record(&mut tx, request, sensor_id, revision).await?;
        tx.commit().await?;
        Ok(revision)
    }

    /// The sensor's priority array as it is now, if it has a live setpoint in `scope`.
    pub async fn levels(&self, sensor_id: &SensorId, scope: &Scope) -> Result<Levels> {
        let _turn = self.read_turn().await?;
        let mut tx = self.pool().begin().await?;
        // One snapshot for the row, the levels and the winner.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        // The DEFAULT level is the `setpoints` row, which has the sensor's building and revision.
        let default: Option<DefaultRow> = sqlx::query_as(
            "SELECT building_id, revision AS sensor_revision, 1::smallint AS level, \
                    desired_celsius, up_delta_celsius, down_delta_celsius, \
                    NULL::timestamptz AS expire_time, default_revision AS revision, \
                    update_time, updated_by, reason, NULL::text AS schedule_id \
             FROM setpoints \
             WHERE sensor_id = $1 AND NOT deleted \
               AND ($2::text[] IS NULL OR building_id = ANY($2::text[]))",
        )
        .bind(sensor_id.as_str())
        .bind(scope.as_sql())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(default) = default else {
            return Err(not_found(sensor_id));
        };
        let mut entries: Vec<LevelEntry> = sqlx::query_as(
            "SELECT level, desired_celsius, up_delta_celsius, down_delta_celsius, expire_time, \
                    revision, update_time, updated_by, reason, schedule_id \
             FROM setpoint_levels WHERE sensor_id = $1 ORDER BY level DESC",
        )
        .bind(sensor_id.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let winner: Option<(i16, Option<DateTime<Utc>>)> =
            sqlx::query_as("SELECT level, expire_time FROM winning_level($1, now())")
                .bind(sensor_id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        tx.commit().await?;
        entries.push(default.entry);
        let (effective, effective_until) = match winner {
            Some((number, until)) => (stored_level(number)?, until),
            None => (Level::Default, None),
        };
        Ok(Levels {
            sensor_id: sensor_id.to_string(),
            building_id: default.building_id,
            revision: default.sensor_revision,
            entries,
            effective,
            effective_until,
        })
    }

    /// Relinquishes the levels whose expiry has passed, as [`EXPIRY_ACTOR`]; returns how many.
    /// Any replica may run it at any time: a level is relinquished once.
    pub async fn expire_levels(&self) -> Result<u64> {
        let mut expired = 0;
        loop {
            let mut tx = self.pool().begin().await?;
            // Sensors first, in byte order as the Put writers lock them: no deadlock with a
            // write of the same sensor or another replica's upkeep.
            let due: Vec<(String, i64, String)> = sqlx::query_as(
                "SELECT s.sensor_id, s.revision, s.building_id FROM setpoints s \
                 WHERE s.sensor_id IN (SELECT l.sensor_id FROM setpoint_levels l \
                                       JOIN setpoints p USING (sensor_id) \
                                       WHERE l.expire_time <= now() LIMIT $1) \
                 ORDER BY s.sensor_id COLLATE \"C\" FOR UPDATE OF s",
            )
            .bind(EXPIRY_BATCH)
            .fetch_all(&mut *tx)
            .await?;
            if due.is_empty() {
                return Ok(expired);
            }
            for (sensor, revision, building) in &due {
                let sensor = SensorId::parse(sensor.as_str())
                    .map_err(|e| Error::Internal(format!("stored sensor id: {e}")))?;
                // Locked now: what is still due is this replica's to relinquish, each level
                // with a revision of its own.
                let mut gone: Vec<(i16, Option<DateTime<Utc>>)> = sqlx::query_as(
                    "DELETE FROM setpoint_levels \
                     WHERE sensor_id = $1 AND expire_time <= now() \
                     RETURNING level, expire_time",
                )
                .bind(sensor.as_str())
                .fetch_all(&mut *tx)
                .await?;
                gone.sort_unstable();
                let mut next = *revision;
                for (number, at) in gone {
                    next += 1;
                    let level = stored_level(number)?;
                    relinquished(
                        &mut tx,
                        &sensor,
                        next,
                        building,
                        level,
                        at,
                        EXPIRY_ACTOR,
                        "expired",
                    )
                    .await?;
                    expired += 1;
                }
                if next != *revision {
                    bump(&mut tx, &sensor, next).await?;
                }
            }
            tx.commit().await?;
        }
    }
}

/// Locks the sensor's live row in `scope` and checks `expected_revision`.
async fn lock(
    tx: &mut Transaction<'_, Postgres>,
    sensor_id: &SensorId,
    scope: &Scope,
    expected_revision: Option<i64>,
) -> Result<Locked> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT building_id, revision FROM setpoints \
         WHERE sensor_id = $1 AND NOT deleted \
           AND ($2::text[] IS NULL OR building_id = ANY($2::text[])) \
         FOR UPDATE",
    )
    .bind(sensor_id.as_str())
    .bind(scope.as_sql())
    .fetch_optional(&mut **tx)
    .await?;
    let Some((building_id, revision)) = row else {
        return Err(not_found(sensor_id));
    };
    match expected_revision {
        Some(expected) if expected != revision => Err(Error::RevisionMismatch {
            expected,
            actual: revision,
        }),
        _ => Ok(Locked {
            building_id,
            revision,
        }),
    }
}

/// Raises the sensor's revision, which notifies the replicas of its effective setpoint: last in
/// a change, as the notification is made of what the levels hold when it runs.
async fn bump(tx: &mut PgConnection, sensor_id: &SensorId, revision: i64) -> Result<()> {
    sqlx::query("UPDATE setpoints SET revision = $2 WHERE sensor_id = $1")
        .bind(sensor_id.as_str())
        .bind(revision)
        .execute(tx)
        .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn relinquished(
    tx: &mut PgConnection,
    sensor_id: &SensorId,
    revision: i64,
    building_id: &str,
    level: Level,
    expire_time: Option<DateTime<Utc>>,
    actor: &str,
    reason: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO setpoint_history (sensor_id, revision, building_id, deleted, change_time, \
             changed_by, reason, level, expire_time) \
         VALUES ($1, $2, $3, true, now(), $4, $5, $6, $7)",
    )
    .bind(sensor_id.as_str())
    .bind(revision)
    .bind(building_id)
    .bind(actor)
    .bind(reason)
    .bind(level.number())
    .bind(expire_time)
    .execute(tx)
    .await?;
    Ok(())
}

async fn record(
    tx: &mut PgConnection,
    request: Option<&WriteRequest>,
    sensor_id: &SensorId,
    revision: i64,
) -> Result<()> {
    if let Some(request) = request {
        sqlx::query(
            "INSERT INTO write_requests (caller, request_id, request, sensor_id, revision) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(&request.caller)
        .bind(&request.id)
        .bind(&request.request)
        .bind(sensor_id.as_str())
        .bind(revision)
        .execute(tx)
        .await?;
    }
    Ok(())
}

/// A level number read from the database, which its CHECK keeps valid.
pub(super) fn stored_level(number: i16) -> Result<Level> {
    Level::try_from(number).map_err(|e| Error::Internal(format!("stored {e}")))
}

fn not_found(sensor_id: &SensorId) -> Error {
    Error::NotFound {
        kind: "setpoint",
        id: sensor_id.to_string(),
    }
}
