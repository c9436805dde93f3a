//! Setpoint queries. Each change is one statement that updates `setpoints` and appends to
//! `setpoint_history` together, so no acknowledged change is ever missing from the history, and
//! row locks taken by `INSERT … ON CONFLICT` / `UPDATE` serialise racing writers to one sensor.

use chrono::{DateTime, Utc};
use futures::stream::{Stream, StreamExt};

use super::levels::stored_level;
use super::requests::WriteRequest;
use super::Store;
use crate::domain::levels::Level;
use crate::domain::{BuildingId, Reason, Scope, SensorId, Setpoint, StoredSetpoint};
use crate::error::{Error, Result};

/// How often a Put that lost a race (the row changed between its write and its re-read) is
/// retried before giving up. Losing twice in a row needs a sustained write storm on one sensor.
const PUT_ATTEMPTS: usize = 5;

/// The outcome of a successful Put.
#[derive(Debug, Clone, PartialEq)]
pub enum PutOutcome {
    /// A new revision was written.
    Written(StoredSetpoint),
    /// The stored setpoint already had these values; nothing was written.
    Unchanged(StoredSetpoint),
}

impl PutOutcome {
    pub fn into_stored(self) -> StoredSetpoint {
        match self {
            PutOutcome::Written(s) | PutOutcome::Unchanged(s) => s,
        }
    }
}

/// The current version of a sensor's setpoint, for the control loop's cache.
#[derive(Debug, Clone, PartialEq)]
pub struct SetpointVersion {
    pub sensor_id: SensorId,
    pub revision: i64,
    /// `None` when the latest revision is a deletion. The effective setpoint: the values of
    /// the deciding level of the sensor's priority array.
    pub setpoint: Option<Setpoint>,
    /// That level, and the revision at which it was written.
    pub level: Level,
    pub level_revision: i64,
}

/// One change in a sensor's history.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    pub revision: i64,
    /// The values after the change; `None` for a deletion.
    pub setpoint: Option<Setpoint>,
    pub change_time: DateTime<Utc>,
    pub changed_by: String,
    pub reason: String,
    /// The level of the priority array changed.
    pub level: Level,
    /// For a level written with an expiry, or expired: when.
    pub expire_time: Option<DateTime<Utc>>,
    /// For a SCHEDULE level: the schedule that wrote it.
    pub schedule_id: Option<String>,
}

/// A row of `setpoints`, live or tombstone.
#[derive(sqlx::FromRow)]
pub(super) struct SetpointRow {
    #[sqlx(flatten)]
    pub(super) version: VersionColumns,
    update_time: DateTime<Utc>,
    updated_by: String,
    reason: String,
}

impl SetpointRow {
    /// The revision as seen by `expected_revision`: 0 for a deleted setpoint.
    fn effective_revision(&self) -> i64 {
        if self.version.deleted {
            0
        } else {
            self.version.revision
        }
    }

    fn into_stored(self) -> Result<StoredSetpoint> {
        Ok(StoredSetpoint {
            setpoint: self.version.setpoint()?,
            revision: self.version.revision,
            update_time: self.update_time,
            updated_by: self.updated_by,
            reason: self.reason,
        })
    }
}

/// The columns of a `setpoints` row that make a [`SetpointVersion`], as a query reads them or as
/// the `setpoints_notify` trigger sends them (JSON, see migrations).
#[derive(sqlx::FromRow, serde::Deserialize)]
pub(super) struct VersionColumns {
    pub(super) sensor_id: String,
    building_id: String,
    desired_celsius: f64,
    up_delta_celsius: f64,
    down_delta_celsius: f64,
    revision: i64,
    deleted: bool,
    /// The level the values come from, in a notification or the loop's re-read; 0 (DEFAULT)
    /// where a query reads the row alone.
    #[sqlx(default)]
    #[serde(default)]
    level: i16,
    /// The revision at which that level was written; 0: `revision`.
    #[sqlx(default)]
    #[serde(default)]
    level_revision: i64,
}

impl VersionColumns {
    /// The values, whether or not the row is a tombstone.
    fn setpoint(&self) -> Result<Setpoint> {
        stored_setpoint(
            &self.sensor_id,
            &self.building_id,
            self.desired_celsius,
            self.up_delta_celsius,
            self.down_delta_celsius,
        )
    }

    fn into_version(self) -> Result<SetpointVersion> {
        let setpoint = (!self.deleted).then(|| self.setpoint()).transpose()?;
        let level = match self.level {
            0 => Level::Default,
            n => stored_level(n)?,
        };
        Ok(SetpointVersion {
            sensor_id: SensorId::parse(self.sensor_id)
                .map_err(|e| Error::Internal(format!("stored sensor id: {e}")))?,
            revision: self.revision,
            setpoint,
            level,
            level_revision: match self.level_revision {
                0 => self.revision,
                r => r,
            },
        })
    }
}

impl SetpointVersion {
    /// The version a notification on [`crate::stream::setpoint_sync::CHANNEL`] carries.
    pub fn from_notification(payload: &str) -> Result<Self> {
        serde_json::from_str::<VersionColumns>(payload)
            .map_err(|e| Error::Internal(format!("setpoint notification {payload:?}: {e}")))?
            .into_version()
    }
}

/// Rebuilds a domain setpoint from stored columns. The CHECK constraints make an invalid row
/// impossible; if one appears anyway it is reported as a server fault rather than served.
fn stored_setpoint(
    sensor_id: &str,
    building_id: &str,
    desired: f64,
    up: f64,
    down: f64,
) -> Result<Setpoint> {
    let invalid = |e| Error::Internal(format!("stored setpoint {sensor_id:?}: {e}"));
    Setpoint::new(
        SensorId::parse(sensor_id).map_err(invalid)?,
        BuildingId::parse(building_id).map_err(invalid)?,
        desired,
        up,
        down,
    )
    .map_err(invalid)
}

#[derive(sqlx::FromRow)]
pub(super) struct HistoryRow {
    sensor_id: String,
    revision: i64,
    building_id: String,
    desired_celsius: Option<f64>,
    up_delta_celsius: Option<f64>,
    down_delta_celsius: Option<f64>,
    change_time: DateTime<Utc>,
    changed_by: String,
    reason: String,
    level: i16,
    expire_time: Option<DateTime<Utc>>,
    schedule_id: Option<String>,
}

impl HistoryRow {
    pub(super) fn into_entry(self) -> Result<HistoryEntry> {
        let setpoint = match (
            self.desired_celsius,
            self.up_delta_celsius,
            self.down_delta_celsius,
        ) {
            (Some(desired), Some(up), Some(down)) => Some(stored_setpoint(
                &self.sensor_id,
                &self.building_id,
                desired,
                up,
                down,
            )?),
            _ => None,
        };
        Ok(HistoryEntry {
            revision: self.revision,
            setpoint,
            change_time: self.change_time,
            changed_by: self.changed_by,
            reason: self.reason,
            level: stored_level(self.level)?,
            expire_time: self.expire_time,
            schedule_id: self.schedule_id,
        })
    }
}

/// The columns of [`VersionColumns`].
macro_rules! version_columns {
    () => {
        "sensor_id, building_id, desired_celsius, up_delta_celsius, down_delta_celsius, \
         revision, deleted"
    };
}
const SETPOINT_COLUMNS: &str = concat!(version_columns!(), ", update_time, updated_by, reason");

/// One Put, owned, as the statement binds it.
#[derive(Debug)]
pub(super) struct PutRow {
    pub(super) setpoint: Setpoint,
    pub(super) expected_revision: Option<i64>,
    pub(super) actor: String,
    pub(super) reason: String,
    /// The caller's buildings joined by commas (building ids cannot contain one); `None`: all.
    pub(super) scope: Option<String>,
    /// Whether the caller may bind the sensor to the setpoint's building ([`Scope::may_bind`]);
    /// if not, only a sensor already in that building is written.
    pub(super) may_bind: bool,
    /// Recorded with the write, if the caller gave a request id.
    pub(super) request: Option<WriteRequest>,
}

impl PutRow {
    pub(super) fn new(
        setpoint: &Setpoint,
        expected_revision: Option<i64>,
        actor: &str,
        reason: &Reason,
        scope: &Scope,
        request: Option<&WriteRequest>,
    ) -> Self {
        Self {
            setpoint: setpoint.clone(),
            expected_revision,
            actor: actor.to_owned(),
            reason: reason.as_str().to_owned(),
            scope: scope.as_sql().map(|buildings| buildings.join(",")),
            may_bind: scope.may_bind(&setpoint.sensor_id, &setpoint.building_id),
            request: request.cloned(),
        }
    }

    pub(super) fn sensor_id(&self) -> &str {
        self.setpoint.sensor_id.as_str()
    }
}

/// The Puts that `put_queue` writes together (one array element each, no two of one sensor):
/// rows created or replaced and their history appended in one statement. On conflict the row is
/// locked and the expected revision and the caller's `scope` re-checked under the lock; a Put
/// that would change nothing writes nothing. Returns the rows written. Every access to `setpoints` is by key (the `ON CONFLICT` arbiter, a lateral `LIMIT 1`
/// lookup), so the generic plan kept per connection stays right as the table grows.
pub const PUT_SQL: &str = r#"
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[], $5::float8[],
                         $6::text[], $7::text[], $8::int8[], $9::text[], $10::bool[],
                         $11::text[], $12::text[], $13::text[])
        AS i(sensor_id, building_id, desired, up_delta, down_delta, actor, reason, expected,
             scope, may_bind, caller, request_id, request)
), up AS (
    INSERT INTO setpoints AS s (sensor_id, building_id, desired_celsius, up_delta_celsius,
                                down_delta_celsius, revision, update_time, updated_by, reason)
    SELECT i.sensor_id, i.building_id, i.desired, i.up_delta, i.down_delta, 1, now(), i.actor,
           i.reason
    FROM input i
    LEFT JOIN LATERAL (SELECT true AS found FROM setpoints WHERE sensor_id = i.sensor_id LIMIT 1)
        AS stored ON true
    WHERE (i.expected IS NULL OR i.expected = 0 OR stored.found) AND (i.may_bind OR stored.found)
    ON CONFLICT (sensor_id) DO UPDATE SET
        building_id = excluded.building_id,
        desired_celsius = excluded.desired_celsius,
        up_delta_celsius = excluded.up_delta_celsius,
        down_delta_celsius = excluded.down_delta_celsius,
        revision = s.revision + 1,
        update_time = now(),
        updated_by = excluded.updated_by,
        reason = excluded.reason,
        deleted = false
    WHERE EXISTS (
            SELECT 1 FROM input i
            WHERE i.sensor_id = excluded.sensor_id
              AND (i.expected IS NULL OR i.expected = CASE WHEN s.deleted THEN 0 ELSE s.revision END)
              AND (i.scope IS NULL OR s.building_id = ANY(string_to_array(i.scope, ',')))
              AND (i.may_bind OR s.building_id = excluded.building_id))
      AND (s.deleted OR (s.building_id, s.desired_celsius, s.up_delta_celsius, s.down_delta_celsius)
           IS DISTINCT FROM (excluded.building_id, excluded.desired_celsius,
                             excluded.up_delta_celsius, excluded.down_delta_celsius))
    RETURNING s.*
), history AS (
    INSERT INTO setpoint_history (sensor_id, revision, building_id, desired_celsius,
                                  up_delta_celsius, down_delta_celsius, deleted, change_time,
                                  changed_by, reason)
    SELECT sensor_id, revision, building_id, desired_celsius, up_delta_celsius,
           down_delta_celsius, false, update_time, updated_by, reason
    FROM up
), recorded AS (
    INSERT INTO write_requests (caller, request_id, request, sensor_id, revision)
    SELECT i.caller, i.request_id, i.request, up.sensor_id, up.revision
    FROM up JOIN input i ON i.sensor_id = up.sensor_id
    WHERE i.request_id IS NOT NULL
    ON CONFLICT DO NOTHING
)
SELECT sensor_id, building_id, desired_celsius, up_delta_celsius, down_delta_celsius,
       revision, update_time, updated_by, reason, deleted
FROM up
"#;

/// Marks a live setpoint deleted (a new revision) and records the deletion in the history.
const DELETE_SQL: &str = r#"
WITH del AS (
    UPDATE setpoints SET deleted = true, revision = revision + 1, update_time = now(),
                         updated_by = $2, reason = $3
    WHERE sensor_id = $1 AND NOT deleted AND ($4::int8 IS NULL OR revision = $4::int8)
      AND ($5::text[] IS NULL OR building_id = ANY($5::text[]))
      -- Deleting drops the levels too: a SAFETY level only by whoever may write it.
      AND ($9::bool OR NOT EXISTS (SELECT 1 FROM setpoint_levels l
                                   WHERE l.sensor_id = $1 AND l.level = 4))
    RETURNING *
), history AS (
    INSERT INTO setpoint_history (sensor_id, revision, building_id, deleted, change_time,
                                  changed_by, reason)
    SELECT sensor_id, revision, building_id, true, update_time, updated_by, reason FROM del
), recorded AS (
    INSERT INTO write_requests (caller, request_id, request, sensor_id, revision)
    SELECT $6::text, $7::text, $8::text, sensor_id, revision FROM del WHERE $7::text IS NOT NULL
    ON CONFLICT DO NOTHING
)
SELECT sensor_id, building_id, desired_celsius, up_delta_celsius, down_delta_celsius,
       revision, update_time, updated_by, reason, deleted
FROM del
"#;

impl Store {
    /// Creates or replaces `setpoint` on behalf of `actor`, who may see `scope`. The new
    /// building must be in `scope` (the caller checks); a sensor that exists in a building
    /// outside it is NOT_FOUND, as if it did not exist.
    #[tracing::instrument(skip_all, fields(sensor_id = %setpoint.sensor_id))]
    pub async fn put_setpoint(
        &self,
        setpoint: &Setpoint,
        expected_revision: Option<i64>,
        actor: &str,
        reason: &Reason,
        scope: &Scope,
        request: Option<&WriteRequest>,
    ) -> Result<PutOutcome> {
        for _ in 0..PUT_ATTEMPTS {
            let row = PutRow::new(setpoint, expected_revision, actor, reason, scope, request);
            let written = self.puts.put(row).await?;
            if let Some(row) = written {
                return Ok(PutOutcome::Written(row.into_stored()?));
            }
            // Nothing written: the row belongs to a building out of scope, the caller may not
            // bind the sensor to the building, the revision did not match, or the values are
            // unchanged.
            let current = self.setpoint_row(&setpoint.sensor_id).await?;
            let bound_here = current
                .as_ref()
                .is_some_and(|row| row.version.building_id == setpoint.building_id.as_str());
            if !bound_here && !scope.may_bind(&setpoint.sensor_id, &setpoint.building_id) {
                // The same answer whether the id is free or taken elsewhere.
                return Err(Error::PermissionDenied(format!(
                    "sensor_id {:?} is not named under building {:?} (\"{}/...\"): only a caller of every building (\"*\") binds it there",
                    setpoint.sensor_id.as_str(),
                    setpoint.building_id.as_str(),
                    setpoint.building_id.as_str(),
                )));
            }
            if current
                .as_ref()
                .is_some_and(|row| !scope.contains_str(&row.version.building_id))
            {
                // Answer as for a sensor that does not exist: a conditional write is a revision
                // mismatch against 0. An unconditional one would have created the sensor, so
                // its refusal does tell that the id is taken elsewhere (ids are global).
                return Err(match expected_revision {
                    Some(expected) if expected != 0 => Error::RevisionMismatch {
                        expected,
                        actual: 0,
                    },
                    _ => not_found(&setpoint.sensor_id),
                });
            }
            let actual = current.as_ref().map_or(0, SetpointRow::effective_revision);
            if let Some(expected) = expected_revision {
                if expected != actual {
                    return Err(Error::RevisionMismatch { expected, actual });
                }
            }
            if let Some(row) = current.filter(|row| !row.version.deleted) {
                let stored = row.into_stored()?;
                if stored.setpoint == *setpoint {
                    return Ok(PutOutcome::Unchanged(stored));
                }
            }
            // The row changed between the write and the read above: try again.
        }
        Err(Error::Internal(format!(
            "put of {} kept racing with other writers",
            setpoint.sensor_id
        )))
    }

    /// The live setpoint of `sensor_id`, if its building is in `scope`.
    pub async fn get_setpoint(
        &self,
        sensor_id: &SensorId,
        scope: &Scope,
    ) -> Result<StoredSetpoint> {
        let _turn = self.read_turn().await?;
        match self.setpoint_row(sensor_id).await? {
            Some(row) if !row.version.deleted && scope.contains_str(&row.version.building_id) => {
                row.into_stored()
            }
            _ => Err(not_found(sensor_id)),
        }
    }

    /// The building of `sensor_id`'s setpoint row, deleted or not (a tombstone keeps the
    /// building that deleted it), and the live setpoint if there is one; `None` without a row.
    /// Unscoped: the caller decides what that building lets it see.
    pub async fn sensor_setpoint(
        &self,
        sensor_id: &SensorId,
    ) -> Result<Option<(String, Option<StoredSetpoint>)>> {
        let _turn = self.read_turn().await?;
        let Some(row) = self.setpoint_row(sensor_id).await? else {
            return Ok(None);
        };
        let building = row.version.building_id.clone();
        let live = (!row.version.deleted)
            .then(|| row.into_stored())
            .transpose()?;
        Ok(Some((building, live)))
    }

    /// Up to `limit` live setpoints in `scope` with `sensor_id > after`, in sensor order.
    pub async fn list_setpoints(
        &self,
        building_id: Option<&BuildingId>,
        scope: &Scope,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<StoredSetpoint>> {
        let _turn = self.read_turn().await?;
        let sql = format!(
            "SELECT {SETPOINT_COLUMNS} FROM setpoints \
             WHERE NOT deleted AND ($1::text IS NULL OR building_id = $1) \
               AND ($4::text[] IS NULL OR building_id = ANY($4::text[])) \
               AND ($2::text IS NULL OR sensor_id > $2) \
             ORDER BY sensor_id LIMIT $3"
        );
        let rows: Vec<SetpointRow> = sqlx::query_as(&sql)
            .bind(building_id.map(BuildingId::as_str))
            .bind(after)
            .bind(limit)
            .bind(scope.as_sql())
            .fetch_all(self.pool())
            .await?;
        rows.into_iter().map(SetpointRow::into_stored).collect()
    }

    /// Deletes a live setpoint in `scope`, with its levels; returns the tombstone's revision.
    /// Without `may_drop_safety` a setpoint with a SAFETY level is refused.
    #[tracing::instrument(skip_all, fields(sensor_id = %sensor_id))]
    #[allow(clippy::too_many_arguments)]
    pub async fn delete_setpoint(
        &self,
        sensor_id: &SensorId,
        expected_revision: Option<i64>,
        actor: &str,
        reason: &Reason,
        scope: &Scope,
        request: Option<&WriteRequest>,
        may_drop_safety: bool,
    ) -> Result<i64> {
        let deleted: Option<SetpointRow> = sqlx::query_as(DELETE_SQL)
            .bind(sensor_id.as_str())
            .bind(actor)
            .bind(reason.as_str())
            .bind(expected_revision)
            .bind(scope.as_sql())
            .bind(request.map(|r| r.caller.as_str()))
            .bind(request.map(|r| r.id.as_str()))
            .bind(request.map(|r| r.request.as_str()))
            .bind(may_drop_safety)
            .fetch_optional(self.pool())
            .await?;
        if let Some(row) = deleted {
            return Ok(row.version.revision);
        }
        match self.setpoint_row(sensor_id).await? {
            Some(row)
                if !row.version.deleted
                    && scope.contains_str(&row.version.building_id)
                    && !may_drop_safety
                    && self.has_level(sensor_id, Level::Safety).await? =>
            {
                Err(Error::PermissionDenied(
                    "the sensor has a SAFETY level, which an administrator relinquishes first"
                        .into(),
                ))
            }
            Some(row) if !row.version.deleted && scope.contains_str(&row.version.building_id) => {
                Err(Error::RevisionMismatch {
                    expected: expected_revision.unwrap_or_default(),
                    actual: row.version.revision,
                })
            }
            _ => Err(not_found(sensor_id)),
        }
    }

    /// Up to `limit` history entries with `revision < before`, newest first, of the changes
    /// made while the sensor was in a building of `scope` (a sensor moved between buildings
    /// shows each side only its own part). NOT_FOUND when there is none.
    pub async fn setpoint_history(
        &self,
        sensor_id: &SensorId,
        scope: &Scope,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<HistoryEntry>> {
        let _turn = self.read_turn().await?;
        let rows: Vec<HistoryRow> = sqlx::query_as(
            "SELECT sensor_id, revision, building_id, desired_celsius, up_delta_celsius, \
                    down_delta_celsius, change_time, changed_by, reason, level, expire_time, \
                    schedule_id \
             FROM setpoint_history \
             WHERE sensor_id = $1 AND ($2::int8 IS NULL OR revision < $2) \
               AND ($4::text[] IS NULL OR building_id = ANY($4::text[])) \
             ORDER BY revision DESC LIMIT $3",
        )
        .bind(sensor_id.as_str())
        .bind(before)
        .bind(limit)
        .bind(scope.as_sql())
        .fetch_all(self.pool())
        .await?;
        if rows.is_empty() && before.is_none() {
            return Err(not_found(sensor_id));
        }
        rows.into_iter().map(HistoryRow::into_entry).collect()
    }

    /// Every sensor's current version, deletions included: the control loop's full resync.
    /// Row by row: a million rows are never in memory at once (the allocator would keep those
    /// pages after they are freed).
    pub fn setpoint_versions(&self) -> impl Stream<Item = Result<SetpointVersion>> + '_ {
        // Only what the cache needs: not the audit columns of a million rows.
        // The effective setpoint, as the notification carries it (migrations: winning_level).
        const SQL: &str = "SELECT s.sensor_id, s.building_id, \
                COALESCE(top.desired_celsius, s.desired_celsius) AS desired_celsius, \
                COALESCE(top.up_delta_celsius, s.up_delta_celsius) AS up_delta_celsius, \
                COALESCE(top.down_delta_celsius, s.down_delta_celsius) AS down_delta_celsius, \
                s.revision, s.deleted, COALESCE(top.level, 1::smallint) AS level, \
                COALESCE(top.revision, s.default_revision) AS level_revision \
            FROM setpoints s LEFT JOIN LATERAL winning_level(s.sensor_id, now()) top ON true";
        sqlx::query_as::<_, VersionColumns>(SQL)
            .fetch(self.pool())
            .map(|row| {
                row.map_err(Error::from)
                    .and_then(VersionColumns::into_version)
            })
    }

    async fn has_level(&self, sensor_id: &SensorId, level: Level) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM setpoint_levels WHERE sensor_id = $1 AND level = $2)",
        )
        .bind(sensor_id.as_str())
        .bind(level.number())
        .fetch_one(self.pool())
        .await?)
    }

    async fn setpoint_row(&self, sensor_id: &SensorId) -> Result<Option<SetpointRow>> {
        let sql = format!("SELECT {SETPOINT_COLUMNS} FROM setpoints WHERE sensor_id = $1");
        Ok(sqlx::query_as(&sql)
            .bind(sensor_id.as_str())
            .fetch_optional(self.pool())
            .await?)
    }
}

fn not_found(sensor_id: &SensorId) -> Error {
    Error::NotFound {
        kind: "setpoint",
        id: sensor_id.to_string(),
    }
}
