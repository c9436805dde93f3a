//! Presets and weekly schedules of a building, and the SCHEDULE level they write into each
//! sensor's priority array. Every change of a building's schedules, presets or SCHEDULE levels
//! runs under one lock per building (a transaction-scoped advisory lock), then brings the
//! building's SCHEDULE levels to what its schedules hold at that instant: a schedule change
//! takes effect in the same transaction, and a transition once, whichever replica reaches it.

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Postgres, Transaction};

use super::Store;
use crate::domain::levels::LevelValues;
use crate::domain::schedule::{
    format_clock, parse_zone, DateException, LocalName, Period, PeriodValue, Schedule,
};
use crate::domain::{BuildingId, Reason, SensorId, ValidationError};
use crate::error::{Error, Result};

/// Who transitions are recorded as, in the history.
pub const SCHEDULE_ACTOR: &str = "system";
/// The most schedules one building has: each pass reads them all.
pub const MAX_SCHEDULES: usize = 100;
/// With no transition ahead, a schedule is looked at again after this long anyway.
const IDLE_RECHECK: TimeDelta = TimeDelta::days(1);

/// A preset of a building.
#[derive(Debug, Clone, PartialEq)]
pub struct PresetRecord {
    pub building_id: String,
    pub name: LocalName,
    pub values: LevelValues,
    pub revision: i64,
    pub update_time: DateTime<Utc>,
    pub updated_by: String,
    pub reason: String,
    pub deleted: bool,
}

/// A schedule of a building.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRecord {
    pub building_id: String,
    pub schedule_id: LocalName,
    /// Empty: every sensor of the building that no other schedule names.
    pub sensor_ids: Vec<String>,
    pub schedule: Schedule,
    pub revision: i64,
    pub update_time: DateTime<Utc>,
    pub updated_by: String,
    pub reason: String,
    pub deleted: bool,
}

/// A schedule to store.
pub struct ScheduleWrite<'a> {
    pub building_id: &'a BuildingId,
    pub schedule_id: &'a LocalName,
    pub sensor_ids: &'a [SensorId],
    pub schedule: &'a Schedule,
    pub expected_revision: Option<i64>,
    pub actor: &'a str,
    pub reason: &'a Reason,
}

/// The schedule that covers a sensor now, with the building's presets.
pub struct SensorSchedule {
    pub record: ScheduleRecord,
    pub presets: HashMap<LocalName, LevelValues>,
}

impl Store {
    /// Creates or replaces a preset; the building's SCHEDULE levels follow in the same
    /// transaction. A put that changes nothing returns the stored preset.
    pub async fn put_preset(
        &self,
        building: &BuildingId,
        name: &LocalName,
        values: LevelValues,
        expected_revision: Option<i64>,
        actor: &str,
        reason: &Reason,
    ) -> Result<PresetRecord> {
        let mut tx = self.pool().begin().await?;
        lock_building(&mut tx, building.as_str()).await?;
        let stored = preset_row(&mut tx, building.as_str(), name, true).await?;
        check_revision(
            expected_revision,
            stored
                .as_ref()
                .filter(|p| !p.deleted)
                .map_or(0, |p| p.revision),
        )?;
        if let Some(same) = stored.filter(|p| !p.deleted && p.values == values) {
            return Ok(same);
        }
        sqlx::query(
            "INSERT INTO presets AS p (building_id, name, desired_celsius, up_delta_celsius, \
                 down_delta_celsius, revision, update_time, updated_by, reason) \
             VALUES ($1, $2, $3, $4, $5, 1, now(), $6, $7) \
             ON CONFLICT (building_id, name) DO UPDATE SET \
                 desired_celsius = excluded.desired_celsius, \
                 up_delta_celsius = excluded.up_delta_celsius, \
                 down_delta_celsius = excluded.down_delta_celsius, revision = p.revision + 1, \
                 update_time = excluded.update_time, updated_by = excluded.updated_by, \
                 reason = excluded.reason, deleted = false",
        )
        .bind(building.as_str())
        .bind(name.as_str())
        .bind(values.desired.value())
        .bind(values.up_delta.value())
        .bind(values.down_delta.value())
        .bind(actor)
        .bind(reason.as_str())
        .execute(&mut *tx)
        .await?;
        reconcile(&mut tx, building.as_str()).await?;
        let stored = preset_row(&mut tx, building.as_str(), name, false)
            .await?
            .ok_or_else(|| Error::Internal("a preset just written is gone".into()))?;
        tx.commit().await?;
        Ok(stored)
    }

    /// Deletes a preset no live schedule of the building uses (else FAILED_PRECONDITION).
    pub async fn delete_preset(
        &self,
        building: &BuildingId,
        name: &LocalName,
        expected_revision: Option<i64>,
        actor: &str,
        reason: &Reason,
    ) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        lock_building(&mut tx, building.as_str()).await?;
        let stored = preset_row(&mut tx, building.as_str(), name, true)
            .await?
            .filter(|p| !p.deleted)
            .ok_or_else(|| preset_not_found(building.as_str(), name))?;
        check_revision(expected_revision, stored.revision)?;
        let users: Vec<String> = live_schedules(&mut tx, building.as_str())
            .await?
            .into_iter()
            .filter(|s| s.schedule.presets().any(|p| p == name))
            .map(|s| s.schedule_id.as_str().to_owned())
            .collect();
        if !users.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "preset {:?} is used by schedule(s) {}; change them first",
                name.as_str(),
                users.join(", ")
            )));
        }
        sqlx::query(
            "UPDATE presets SET revision = revision + 1, deleted = true, update_time = now(), \
                 updated_by = $3, reason = $4 \
             WHERE building_id = $1 AND name = $2",
        )
        .bind(building.as_str())
        .bind(name.as_str())
        .bind(actor)
        .bind(reason.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// A live preset, or NOT_FOUND.
    pub async fn preset(&self, building: &BuildingId, name: &LocalName) -> Result<PresetRecord> {
        let _turn = self.read_turn().await?;
        let mut conn = self.pool().acquire().await?;
        preset_row(&mut conn, building.as_str(), name, false)
            .await?
            .filter(|p| !p.deleted)
            .ok_or_else(|| preset_not_found(building.as_str(), name))
    }

    /// The building's live presets, by name.
    pub async fn presets(&self, building: &BuildingId) -> Result<Vec<PresetRecord>> {
        let _turn = self.read_turn().await?;
        let rows: Vec<PresetRow> = sqlx::query_as(&format!(
            "{PRESET_COLUMNS} FROM presets WHERE building_id = $1 AND NOT deleted \
             ORDER BY name COLLATE \"C\""
        ))
        .bind(building.as_str())
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(PresetRow::into_record).collect()
    }

    /// Every revision of a preset, newest first, at most `limit` below `before`.
    pub async fn preset_history(
        &self,
        building: &BuildingId,
        name: &LocalName,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<PresetRecord>> {
        let _turn = self.read_turn().await?;
        let rows: Vec<PresetRow> = sqlx::query_as(&format!(
            "{PRESET_COLUMNS} FROM preset_history WHERE building_id = $1 AND name = $2 \
               AND ($3::bigint IS NULL OR revision < $3) ORDER BY revision DESC LIMIT $4"
        ))
        .bind(building.as_str())
        .bind(name.as_str())
        .bind(before)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        if rows.is_empty() && before.is_none() {
            return Err(preset_not_found(building.as_str(), name));
        }
        rows.into_iter().map(PresetRow::into_record).collect()
    }

    /// Creates or replaces a schedule; its sensors' SCHEDULE levels follow in the same
    /// transaction. FAILED_PRECONDITION when it names a preset the building lacks, names a
    /// sensor another schedule names, or is a second schedule for the whole building.
    pub async fn put_schedule(&self, write: ScheduleWrite<'_>) -> Result<ScheduleRecord> {
        let building = write.building_id.as_str();
        let mut tx = self.pool().begin().await?;
        lock_building(&mut tx, building).await?;
        let others: Vec<ScheduleRecord> = live_schedules(&mut tx, building)
            .await?
            .into_iter()
            .filter(|s| &s.schedule_id != write.schedule_id)
            .collect();
        let stored = schedule_row(&mut tx, building, write.schedule_id).await?;
        check_revision(
            write.expected_revision,
            stored
                .as_ref()
                .filter(|s| !s.deleted)
                .map_or(0, |s| s.revision),
        )?;
        let sensor_ids: Vec<String> = write.sensor_ids.iter().map(|s| s.to_string()).collect();
        if let Some(same) = stored
            .filter(|s| !s.deleted && &s.schedule == write.schedule && s.sensor_ids == sensor_ids)
        {
            return Ok(same);
        }
        check_fits(&others, &sensor_ids)?;
        if others.len() >= MAX_SCHEDULES {
            return Err(Error::FailedPrecondition(format!(
                "building {building:?} has {MAX_SCHEDULES} schedules, the most it may have"
            )));
        }
        let presets = presets_of(&mut tx, building).await?;
        let missing: Vec<&str> = write
            .schedule
            .presets()
            .filter(|p| !presets.contains_key(*p))
            .map(LocalName::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "building {building:?} has no preset {}; put it first",
                missing.join(", ")
            )));
        }
        let body = serde_json::to_value(Body::from(write.schedule))
            .map_err(|e| Error::Internal(format!("schedule body: {e}")))?;
        sqlx::query(
            "INSERT INTO schedules AS s (building_id, schedule_id, sensor_ids, time_zone, body, \
                 revision, update_time, updated_by, reason) \
             VALUES ($1, $2, $3, $4, $5, 1, now(), $6, $7) \
             ON CONFLICT (building_id, schedule_id) DO UPDATE SET \
                 sensor_ids = excluded.sensor_ids, time_zone = excluded.time_zone, \
                 body = excluded.body, revision = s.revision + 1, \
                 update_time = excluded.update_time, updated_by = excluded.updated_by, \
                 reason = excluded.reason, deleted = false",
        )
        .bind(building)
        .bind(write.schedule_id.as_str())
        .bind(&sensor_ids)
        .bind(write.schedule.zone.name())
        .bind(body)
        .bind(write.actor)
        .bind(write.reason.as_str())
        .execute(&mut *tx)
        .await?;
        reconcile(&mut tx, building).await?;
        let stored = schedule_row(&mut tx, building, write.schedule_id)
            .await?
            .ok_or_else(|| Error::Internal("a schedule just written is gone".into()))?;
        tx.commit().await?;
        Ok(stored)
    }

    /// Deletes a schedule; its sensors' SCHEDULE levels go (or follow the building's schedule)
    /// in the same transaction.
    pub async fn delete_schedule(
        &self,
        building: &BuildingId,
        schedule_id: &LocalName,
        expected_revision: Option<i64>,
        actor: &str,
        reason: &Reason,
    ) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        lock_building(&mut tx, building.as_str()).await?;
        let stored = schedule_row(&mut tx, building.as_str(), schedule_id)
            .await?
            .filter(|s| !s.deleted)
            .ok_or_else(|| schedule_not_found(building.as_str(), schedule_id))?;
        check_revision(expected_revision, stored.revision)?;
        sqlx::query(
            "UPDATE schedules SET revision = revision + 1, deleted = true, update_time = now(), \
                 updated_by = $3, reason = $4, next_check = NULL \
             WHERE building_id = $1 AND schedule_id = $2",
        )
        .bind(building.as_str())
        .bind(schedule_id.as_str())
        .bind(actor)
        .bind(reason.as_str())
        .execute(&mut *tx)
        .await?;
        reconcile(&mut tx, building.as_str()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A live schedule, or NOT_FOUND.
    pub async fn schedule(
        &self,
        building: &BuildingId,
        schedule_id: &LocalName,
    ) -> Result<ScheduleRecord> {
        let _turn = self.read_turn().await?;
        let mut conn = self.pool().acquire().await?;
        schedule_row(&mut conn, building.as_str(), schedule_id)
            .await?
            .filter(|s| !s.deleted)
            .ok_or_else(|| schedule_not_found(building.as_str(), schedule_id))
    }

    /// The building's live schedules by id, at most `limit` after `after`.
    pub async fn schedules(
        &self,
        building: &BuildingId,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<ScheduleRecord>> {
        let _turn = self.read_turn().await?;
        let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
            "{SCHEDULE_COLUMNS} FROM schedules \
             WHERE building_id = $1 AND NOT deleted \
               AND ($2::text IS NULL OR schedule_id COLLATE \"C\" > $2) \
             ORDER BY schedule_id COLLATE \"C\" LIMIT $3"
        ))
        .bind(building.as_str())
        .bind(after)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter().map(ScheduleRow::into_record).collect()
    }

    /// Every revision of a schedule, newest first, at most `limit` below `before`.
    pub async fn schedule_history(
        &self,
        building: &BuildingId,
        schedule_id: &LocalName,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<ScheduleRecord>> {
        let _turn = self.read_turn().await?;
        let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
            "{SCHEDULE_COLUMNS} FROM schedule_history \
             WHERE building_id = $1 AND schedule_id = $2 \
               AND ($3::bigint IS NULL OR revision < $3) ORDER BY revision DESC LIMIT $4"
        ))
        .bind(building.as_str())
        .bind(schedule_id.as_str())
        .bind(before)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        if rows.is_empty() && before.is_none() {
            return Err(schedule_not_found(building.as_str(), schedule_id));
        }
        rows.into_iter().map(ScheduleRow::into_record).collect()
    }

    /// The live schedule that covers a sensor of `building`, if any, with the presets.
    pub async fn sensor_schedule(
        &self,
        building: &str,
        sensor_id: &SensorId,
    ) -> Result<Option<SensorSchedule>> {
        let _turn = self.read_turn().await?;
        let mut tx = self.pool().begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let schedules = live_schedules(&mut tx, building).await?;
        let Some(record) = Covering::new(&schedules).of(sensor_id.as_str()).cloned() else {
            return Ok(None);
        };
        let presets = presets_of(&mut tx, building).await?;
        tx.commit().await?;
        Ok(Some(SensorSchedule { record, presets }))
    }

    /// Brings the SCHEDULE levels of every building with a transition due up to date. Any
    /// replica may run it at any time: each change happens once.
    pub async fn run_due_schedules(&self) -> Result<SchedulePass> {
        let due: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT building_id FROM schedules \
             WHERE NOT deleted AND next_check <= clock_timestamp()",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(self.reconcile_buildings(due).await)
    }

    /// As [`Store::run_due_schedules`], for every building with a schedule: picks up sensors
    /// created or moved since the last transition.
    pub async fn run_all_schedules(&self) -> Result<SchedulePass> {
        let all: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT building_id FROM schedules WHERE NOT deleted")
                .fetch_all(self.pool())
                .await?;
        Ok(self.reconcile_buildings(all).await)
    }

    /// Each building in its own transaction; one that fails (a sensor row locked for long)
    /// does not hold up the others. A building whose lock another transaction holds is left
    /// to it: that one brings the levels up to date as well.
    async fn reconcile_buildings(&self, buildings: Vec<String>) -> SchedulePass {
        let mut pass = SchedulePass::default();
        for building in buildings {
            let outcome = async {
                let mut tx = self.pool().begin().await?;
                let locked: bool = sqlx::query_scalar(&format!("SELECT pg_try_{BUILDING_LOCK}"))
                    .bind(&building)
                    .fetch_one(&mut *tx)
                    .await?;
                if !locked {
                    return Ok(0);
                }
                let changed = reconcile(&mut tx, &building).await?;
                tx.commit().await?;
                Ok::<_, Error>(changed)
            };
            match outcome.await {
                Ok(changed) => pass.changed += changed,
                Err(e) => pass.failures.push((building, e)),
            }
        }
        pass
    }
}

/// What one pass over scheduled buildings did.
#[derive(Debug, Default)]
pub struct SchedulePass {
    /// SCHEDULE levels written or emptied.
    pub changed: usize,
    /// The buildings that failed, and why; the next pass tries them again.
    pub failures: Vec<(String, Error)>,
}

/// The building's lock, as `pg_{BUILDING_LOCK}` or `pg_try_{BUILDING_LOCK}`.
const BUILDING_LOCK: &str =
    "advisory_xact_lock(hashtextextended('thermostat.schedules/' || $1, 0))";

/// Serialises every change of a building's schedules, presets and SCHEDULE levels. Taken
/// before any row lock, and the Put writers never take it: no lock cycle.
async fn lock_building(tx: &mut Transaction<'_, Postgres>, building: &str) -> Result<()> {
    sqlx::query(&format!("SELECT pg_{BUILDING_LOCK}"))
        .bind(building)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A sensor's SCHEDULE level as stored, and what its building's schedules hold for it.
#[derive(sqlx::FromRow)]
struct Target {
    sensor_id: String,
    revision: i64,
    building_id: String,
    live: bool,
    desired_celsius: Option<f64>,
    up_delta_celsius: Option<f64>,
    down_delta_celsius: Option<f64>,
    schedule_building: Option<String>,
    schedule_id: Option<String>,
}

/// The change a sensor's SCHEDULE level needs.
struct Step {
    sensor_id: String,
    revision: i64,
    building_id: String,
    /// `None`: relinquish.
    write: Option<LevelValues>,
    reason: String,
    schedule_id: String,
}

/// What a schedule holds now, and how its history entries say so.
struct Holding {
    values: Option<LevelValues>,
    reason: String,
}

/// Brings every SCHEDULE level the building's schedules decide to what they hold now, each
/// change with a revision and a history row by [`SCHEDULE_ACTOR`], and sets each schedule's
/// next check. Runs under the building's lock; returns how many levels changed.
async fn reconcile(tx: &mut Transaction<'_, Postgres>, building: &str) -> Result<usize> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&mut **tx)
        .await?;
    let schedules = live_schedules(tx, building).await?;
    let presets = presets_of(tx, building).await?;
    let mut holding = HashMap::new();
    for record in &schedules {
        let (now_holding, next) = hold(building, record, &presets, now);
        holding.insert(record.schedule_id.as_str(), now_holding);
        // Kept when it is still ahead and not later than needed: an early check only finds
        // nothing to do.
        sqlx::query(
            "UPDATE schedules SET next_check = $3 \
             WHERE building_id = $1 AND schedule_id = $2 \
               AND (next_check IS NULL OR next_check <= $4 OR next_check > $3)",
        )
        .bind(building)
        .bind(record.schedule_id.as_str())
        .bind(next)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    let covering = Covering::new(&schedules);
    // Read without locks first: most passes change nothing, and then lock nothing.
    let wanted: Vec<String> = targets(tx, building, None)
        .await?
        .into_iter()
        .filter_map(|target| step(building, target, &covering, &holding))
        .map(|step| step.sensor_id)
        .collect();
    if wanted.is_empty() {
        return Ok(0);
    }
    // Locked in byte order, as the Put writers lock them, then read again: a level or a
    // building another writer changed meanwhile is what counts.
    sqlx::query(
        "SELECT 1 FROM setpoints WHERE sensor_id = ANY($1) \
         ORDER BY sensor_id COLLATE \"C\" FOR UPDATE",
    )
    .bind(&wanted)
    .fetch_all(&mut **tx)
    .await?;
    let steps: Vec<Step> = targets(tx, building, Some(&wanted))
        .await?
        .into_iter()
        .filter_map(|target| step(building, target, &covering, &holding))
        .collect();
    apply(tx, building, &steps).await?;
    Ok(steps.len())
}

/// The building's sensors and those holding a SCHEDULE level from it (of `only`, if given),
/// with that level as stored.
async fn targets(
    tx: &mut Transaction<'_, Postgres>,
    building: &str,
    only: Option<&[String]>,
) -> Result<Vec<Target>> {
    // A UNION rather than an OR, so that each side uses its index.
    Ok(sqlx::query_as(
        "SELECT s.sensor_id, s.revision, s.building_id, NOT s.deleted AS live, \
                l.desired_celsius, l.up_delta_celsius, l.down_delta_celsius, \
                l.schedule_building, l.schedule_id \
         FROM setpoints s \
         LEFT JOIN setpoint_levels l ON l.sensor_id = s.sensor_id AND l.level = 2 \
         WHERE s.sensor_id IN (SELECT sensor_id FROM setpoints \
                               WHERE building_id = $1 AND NOT deleted \
                               UNION \
                               SELECT sensor_id FROM setpoint_levels \
                               WHERE level = 2 AND schedule_building = $1) \
           AND ($2::text[] IS NULL OR s.sensor_id = ANY($2))",
    )
    .bind(building)
    .bind(only)
    .fetch_all(&mut **tx)
    .await?)
}

/// What a schedule holds at `now`, and when to look at it next (at its next transition, and
/// within a day anyway).
fn hold(
    building: &str,
    record: &ScheduleRecord,
    presets: &HashMap<LocalName, LevelValues>,
    now: DateTime<Utc>,
) -> (Holding, DateTime<Utc>) {
    let value = record.schedule.value_at(now);
    let next = record.schedule.next_change(now).map(|c| c.at);
    let reason = format!(
        "schedule {} (revision {}): {}{}",
        record.schedule_id.as_str(),
        record.revision,
        value.map_or_else(|| "no period".to_owned(), PeriodValue::describe),
        next.map_or_else(String::new, |at| format!(" until {}", at.format("%FT%TZ")))
    );
    let values = value.and_then(|v| v.resolve(presets));
    if value.is_some() && values.is_none() {
        // PutSchedule and DeletePreset keep this from happening, under the same lock.
        tracing::error!(
            building,
            schedule = record.schedule_id.as_str(),
            "a preset it names is gone"
        );
    }
    let recheck = now + IDLE_RECHECK;
    (
        Holding { values, reason },
        next.map_or(recheck, |at| at.min(recheck)),
    )
}

/// The change one sensor's SCHEDULE level needs, if any: what the schedule covering it holds
/// (nothing for a sensor gone from the building) against what it stores.
fn step(
    building: &str,
    target: Target,
    covering: &Covering<'_>,
    holding: &HashMap<&str, Holding>,
) -> Option<Step> {
    let here = target.live && target.building_id == building;
    let covering = here
        .then(|| covering.of(&target.sensor_id))
        .flatten()
        .map(|record| {
            (
                record.schedule_id.as_str(),
                &holding[record.schedule_id.as_str()],
            )
        });
    let stored = match (
        target.desired_celsius,
        target.up_delta_celsius,
        target.down_delta_celsius,
        target.schedule_id.as_deref(),
    ) {
        (Some(d), Some(u), Some(w), Some(id))
            if target.schedule_building.as_deref() == Some(building) =>
        {
            Some((id, (d, u, w)))
        }
        _ => None,
    };
    let (schedule_id, write, reason) = match (covering, stored) {
        (
            Some((
                id,
                Holding {
                    values: Some(values),
                    ..
                },
            )),
            Some((stored_id, stored)),
        ) if stored_id == id && stored == triple(values) => return None,
        (
            Some((
                id,
                Holding {
                    values: Some(values),
                    reason,
                },
            )),
            _,
        ) => (id.to_owned(), Some(*values), reason.clone()),
        (
            Some((
                id,
                Holding {
                    values: None,
                    reason,
                },
            )),
            Some(_),
        ) => (id.to_owned(), None, reason.clone()),
        (None, Some((stored_id, _))) => (
            stored_id.to_owned(),
            None,
            format!("schedule {stored_id} no longer covers the sensor"),
        ),
        // Nothing wanted, and nothing of this building's stored.
        (_, None) => return None,
    };
    Some(Step {
        schedule_id,
        revision: target.revision + 1,
        sensor_id: target.sensor_id,
        building_id: target.building_id,
        write,
        reason,
    })
}

fn triple(values: &LevelValues) -> (f64, f64, f64) {
    (
        values.desired.value(),
        values.up_delta.value(),
        values.down_delta.value(),
    )
}

/// Writes the steps: levels, history rows, then the revisions (whose notifications carry the
/// new effective setpoints), each as one statement.
async fn apply(tx: &mut Transaction<'_, Postgres>, building: &str, steps: &[Step]) -> Result<()> {
    if steps.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&Step) -> Option<f64>| steps.iter().map(f).collect::<Vec<_>>();
    let sensors: Vec<&str> = steps.iter().map(|s| s.sensor_id.as_str()).collect();
    let revisions: Vec<i64> = steps.iter().map(|s| s.revision).collect();
    let buildings: Vec<&str> = steps.iter().map(|s| s.building_id.as_str()).collect();
    let reasons: Vec<&str> = steps.iter().map(|s| s.reason.as_str()).collect();
    let schedule_ids: Vec<&str> = steps.iter().map(|s| s.schedule_id.as_str()).collect();
    let desired = column(|s| s.write.map(|w| w.desired.value()));
    let up = column(|s| s.write.map(|w| w.up_delta.value()));
    let down = column(|s| s.write.map(|w| w.down_delta.value()));
    sqlx::query(
        "DELETE FROM setpoint_levels l USING unnest($1::text[], $2::float8[]) AS t(sensor_id, d) \
         WHERE l.sensor_id = t.sensor_id AND l.level = 2 AND t.d IS NULL",
    )
    .bind(&sensors)
    .bind(&desired)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO setpoint_levels AS l (sensor_id, level, desired_celsius, up_delta_celsius, \
             down_delta_celsius, revision, update_time, updated_by, reason, schedule_building, \
             schedule_id) \
         SELECT t.sensor_id, 2, t.d, t.u, t.w, t.revision, now(), $7, t.reason, $8, t.schedule_id \
         FROM unnest($1::text[], $2::float8[], $3::float8[], $4::float8[], $5::bigint[], \
                     $6::text[], $9::text[]) AS t(sensor_id, d, u, w, revision, reason, schedule_id) \
         WHERE t.d IS NOT NULL \
         ON CONFLICT (sensor_id, level) DO UPDATE SET \
             desired_celsius = excluded.desired_celsius, \
             up_delta_celsius = excluded.up_delta_celsius, \
             down_delta_celsius = excluded.down_delta_celsius, revision = excluded.revision, \
             update_time = excluded.update_time, updated_by = excluded.updated_by, \
             reason = excluded.reason, schedule_building = excluded.schedule_building, \
             schedule_id = excluded.schedule_id",
    )
    .bind(&sensors)
    .bind(&desired)
    .bind(&up)
    .bind(&down)
    .bind(&revisions)
    .bind(&reasons)
    .bind(SCHEDULE_ACTOR)
    .bind(building)
    .bind(&schedule_ids)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO setpoint_history (sensor_id, revision, building_id, desired_celsius, \
             up_delta_celsius, down_delta_celsius, deleted, change_time, changed_by, reason, \
             level, schedule_id) \
         SELECT t.sensor_id, t.revision, t.building_id, t.d, t.u, t.w, t.d IS NULL, now(), $8, \
                t.reason, 2, t.schedule_id \
         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::float8[], $5::float8[], \
                     $6::float8[], $7::text[], $9::text[]) \
              AS t(sensor_id, revision, building_id, d, u, w, reason, schedule_id)",
    )
    .bind(&sensors)
    .bind(&revisions)
    .bind(&buildings)
    .bind(&desired)
    .bind(&up)
    .bind(&down)
    .bind(&reasons)
    .bind(SCHEDULE_ACTOR)
    .bind(&schedule_ids)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE setpoints s SET revision = t.revision \
         FROM unnest($1::text[], $2::bigint[]) AS t(sensor_id, revision) \
         WHERE s.sensor_id = t.sensor_id",
    )
    .bind(&sensors)
    .bind(&revisions)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Which schedule covers a sensor: the group naming it, else the building's.
struct Covering<'a> {
    groups: HashMap<&'a str, &'a ScheduleRecord>,
    whole: Option<&'a ScheduleRecord>,
}

impl<'a> Covering<'a> {
    fn new(schedules: &'a [ScheduleRecord]) -> Self {
        Self {
            groups: schedules
                .iter()
                .flat_map(|s| s.sensor_ids.iter().map(move |id| (id.as_str(), s)))
                .collect(),
            whole: schedules.iter().find(|s| s.sensor_ids.is_empty()),
        }
    }

    fn of(&self, sensor_id: &str) -> Option<&'a ScheduleRecord> {
        self.groups.get(sensor_id).copied().or(self.whole)
    }
}

/// A new schedule's sensors against the building's other schedules.
fn check_fits(others: &[ScheduleRecord], sensor_ids: &[String]) -> Result<()> {
    if sensor_ids.is_empty() {
        if let Some(whole) = others.iter().find(|s| s.sensor_ids.is_empty()) {
            return Err(Error::FailedPrecondition(format!(
                "schedule {} already covers the whole building; name sensor_ids for a group",
                whole.schedule_id.as_str()
            )));
        }
    }
    for other in others {
        if let Some(shared) = sensor_ids.iter().find(|id| other.sensor_ids.contains(id)) {
            return Err(Error::FailedPrecondition(format!(
                "sensor {shared} is already in schedule {}",
                other.schedule_id.as_str()
            )));
        }
    }
    Ok(())
}

fn check_revision(expected: Option<i64>, actual: i64) -> Result<()> {
    match expected {
        Some(expected) if expected != actual => Err(Error::RevisionMismatch { expected, actual }),
        _ => Ok(()),
    }
}

const PRESET_COLUMNS: &str = "SELECT building_id, name, desired_celsius, up_delta_celsius, \
     down_delta_celsius, revision, update_time, updated_by, reason, deleted";

#[derive(sqlx::FromRow)]
struct PresetRow {
    building_id: String,
    name: String,
    desired_celsius: f64,
    up_delta_celsius: f64,
    down_delta_celsius: f64,
    revision: i64,
    update_time: DateTime<Utc>,
    updated_by: String,
    reason: String,
    deleted: bool,
}

impl PresetRow {
    fn into_record(self) -> Result<PresetRecord> {
        Ok(PresetRecord {
            name: LocalName::parse("name", &self.name).map_err(stored)?,
            values: LevelValues::new(
                self.desired_celsius,
                self.up_delta_celsius,
                self.down_delta_celsius,
            )
            .map_err(stored)?,
            building_id: self.building_id,
            revision: self.revision,
            update_time: self.update_time,
            updated_by: self.updated_by,
            reason: self.reason,
            deleted: self.deleted,
        })
    }
}

async fn preset_row(
    conn: &mut PgConnection,
    building: &str,
    name: &LocalName,
    for_update: bool,
) -> Result<Option<PresetRecord>> {
    let row: Option<PresetRow> = sqlx::query_as(&format!(
        "{PRESET_COLUMNS} FROM presets WHERE building_id = $1 AND name = $2{}",
        if for_update { " FOR UPDATE" } else { "" }
    ))
    .bind(building)
    .bind(name.as_str())
    .fetch_optional(conn)
    .await?;
    row.map(PresetRow::into_record).transpose()
}

async fn presets_of(
    conn: &mut PgConnection,
    building: &str,
) -> Result<HashMap<LocalName, LevelValues>> {
    let rows: Vec<PresetRow> = sqlx::query_as(&format!(
        "{PRESET_COLUMNS} FROM presets WHERE building_id = $1 AND NOT deleted"
    ))
    .bind(building)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|row| row.into_record().map(|p| (p.name, p.values)))
        .collect()
}

const SCHEDULE_COLUMNS: &str = "SELECT building_id, schedule_id, sensor_ids, time_zone, body, \
     revision, update_time, updated_by, reason, deleted";

#[derive(sqlx::FromRow)]
struct ScheduleRow {
    building_id: String,
    schedule_id: String,
    sensor_ids: Vec<String>,
    time_zone: String,
    body: serde_json::Value,
    revision: i64,
    update_time: DateTime<Utc>,
    updated_by: String,
    reason: String,
    deleted: bool,
}

impl ScheduleRow {
    fn into_record(self) -> Result<ScheduleRecord> {
        let body: Body = serde_json::from_value(self.body)
            .map_err(|e| Error::Internal(format!("stored schedule body: {e}")))?;
        let zone = parse_zone(&self.time_zone).map_err(stored)?;
        Ok(ScheduleRecord {
            schedule_id: LocalName::parse("schedule_id", &self.schedule_id).map_err(stored)?,
            schedule: body.into_schedule(zone).map_err(stored)?,
            building_id: self.building_id,
            sensor_ids: self.sensor_ids,
            revision: self.revision,
            update_time: self.update_time,
            updated_by: self.updated_by,
            reason: self.reason,
            deleted: self.deleted,
        })
    }
}

async fn schedule_row(
    conn: &mut PgConnection,
    building: &str,
    schedule_id: &LocalName,
) -> Result<Option<ScheduleRecord>> {
    let row: Option<ScheduleRow> = sqlx::query_as(&format!(
        "{SCHEDULE_COLUMNS} FROM schedules WHERE building_id = $1 AND schedule_id = $2"
    ))
    .bind(building)
    .bind(schedule_id.as_str())
    .fetch_optional(conn)
    .await?;
    row.map(ScheduleRow::into_record).transpose()
}

async fn live_schedules(conn: &mut PgConnection, building: &str) -> Result<Vec<ScheduleRecord>> {
    let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
        "{SCHEDULE_COLUMNS} FROM schedules WHERE building_id = $1 AND NOT deleted \
         ORDER BY schedule_id COLLATE \"C\""
    ))
    .bind(building)
    .fetch_all(conn)
    .await?;
    rows.into_iter().map(ScheduleRow::into_record).collect()
}

/// A stored value the database's checks or the service's own writes should have kept valid.
fn stored(e: ValidationError) -> Error {
    Error::Internal(format!("stored {e}"))
}

fn preset_not_found(building: &str, name: &LocalName) -> Error {
    Error::NotFound {
        kind: "preset",
        id: format!("{building}/{}", name.as_str()),
    }
}

fn schedule_not_found(building: &str, schedule_id: &LocalName) -> Error {
    Error::NotFound {
        kind: "schedule",
        id: format!("{building}/{}", schedule_id.as_str()),
    }
}

/// A schedule's periods and exceptions as the `body` column keeps them; read back through the
/// domain's checks, as a request is.
#[derive(Serialize, Deserialize)]
struct Body {
    week: [Vec<PeriodDoc>; 7],
    exceptions: Vec<ExceptionDoc>,
}

#[derive(Serialize, Deserialize)]
struct PeriodDoc {
    start: String,
    end: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    preset: Option<String>,
    /// Desired, up delta, down delta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    values: Option<[f64; 3]>,
}

#[derive(Serialize, Deserialize)]
struct ExceptionDoc {
    first: NaiveDate,
    last: NaiveDate,
    description: String,
    periods: Vec<PeriodDoc>,
}

impl From<&Period> for PeriodDoc {
    fn from(period: &Period) -> Self {
        let (preset, values) = match &period.value {
            PeriodValue::Preset(name) => (Some(name.as_str().to_owned()), None),
            PeriodValue::Values(v) => (None, Some(triple(v).into())),
        };
        Self {
            start: format_clock(period.start),
            end: format_clock(period.end),
            preset,
            values,
        }
    }
}

impl PeriodDoc {
    fn into_period(self) -> std::result::Result<Period, ValidationError> {
        let value = match (self.preset, self.values) {
            (Some(name), None) => PeriodValue::Preset(LocalName::parse("preset", &name)?),
            (None, Some([d, u, w])) => PeriodValue::Values(LevelValues::new(d, u, w)?),
            _ => return Err(ValidationError::new("period", "needs a preset or values")),
        };
        Period::parse(&self.start, &self.end, value)
    }
}

impl From<&Schedule> for Body {
    fn from(schedule: &Schedule) -> Self {
        let periods = |list: &[Period]| list.iter().map(PeriodDoc::from).collect();
        Self {
            week: std::array::from_fn(|day| periods(&schedule.week[day])),
            exceptions: schedule
                .exceptions
                .iter()
                .map(|e| ExceptionDoc {
                    first: e.first,
                    last: e.last,
                    description: e.description.clone(),
                    periods: periods(&e.periods),
                })
                .collect(),
        }
    }
}

impl Body {
    fn into_schedule(self, zone: chrono_tz::Tz) -> std::result::Result<Schedule, ValidationError> {
        let periods = |list: Vec<PeriodDoc>| {
            list.into_iter()
                .map(PeriodDoc::into_period)
                .collect::<std::result::Result<Vec<_>, _>>()
        };
        let mut week: [Vec<Period>; 7] = Default::default();
        for (day, list) in self.week.into_iter().enumerate() {
            week[day] = periods(list)?;
        }
        let exceptions = self
            .exceptions
            .into_iter()
            .map(|e| {
                Ok(DateException {
                    first: e.first,
                    last: e.last,
                    description: e.description,
                    periods: periods(e.periods)?,
                })
            })
            .collect::<std::result::Result<Vec<_>, ValidationError>>()?;
        Schedule::new(zone, week, exceptions)
    }
}
