//! Heater settings: limits and out of service, per building and per sensor in it. One upsert
//! per change; the table is small (a building's row, and rows for the sensors an operator
//! singled out), so the loop reads it whole.

use chrono::{DateTime, TimeDelta, Utc};

use super::Store;
use crate::domain::equipment::{HeaterSettings, Limits, OutOfService, Settings};
use crate::domain::protection::Protection;
use crate::domain::{BuildingId, Reason, SensorId};
use crate::error::{Error, Result};

/// The NOTIFY channel of the `heater_settings_notify` trigger (see migrations).
pub const SETTINGS_CHANNEL: &str = "thermostat_heater_settings";

/// At most this many rows are read into the loop: far more than operators single out.
const MAX_ROWS: i64 = 100_000;

const COLUMNS: &str = "building_id, sensor_id, min_on_ms, min_off_ms, max_run_ms, \
     run_cooldown_ms, keep_alive_ms, out_of_service_since, out_of_service_reason, \
     out_of_service_by, keep_heater_state, revision, update_time, updated_by";

/// A sensor named by a row must have a live setpoint in the row's building.
const IN_BUILDING: &str = "$2 = '' OR EXISTS (SELECT 1 FROM setpoints s \
     WHERE s.sensor_id = $2 AND s.building_id = $1 AND NOT s.deleted)";

/// One row: what is set for a building (`sensor` `None`) or a sensor in it.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingsRecord {
    pub building: BuildingId,
    pub sensor: Option<SensorId>,
    pub settings: Settings,
    pub revision: i64,
    pub update_time: DateTime<Utc>,
    pub updated_by: String,
}

#[derive(sqlx::FromRow)]
struct Row {
    building_id: String,
    sensor_id: String,
    min_on_ms: Option<i64>,
    min_off_ms: Option<i64>,
    max_run_ms: Option<i64>,
    run_cooldown_ms: Option<i64>,
    keep_alive_ms: Option<i64>,
    out_of_service_since: Option<DateTime<Utc>>,
    out_of_service_reason: String,
    out_of_service_by: String,
    keep_heater_state: bool,
    revision: i64,
    update_time: DateTime<Utc>,
    updated_by: String,
}

impl Row {
    fn into_record(self) -> Result<SettingsRecord> {
        let span = |ms: Option<i64>| ms.map(TimeDelta::milliseconds);
        let sensor = (!self.sensor_id.is_empty())
            .then(|| SensorId::parse(self.sensor_id))
            .transpose()?;
        let out_of_service = self.out_of_service_since.map(|since| OutOfService {
            reason: self.out_of_service_reason,
            since,
            by: self.out_of_service_by,
            release: !self.keep_heater_state,
            building_wide: sensor.is_none(),
        });
        Ok(SettingsRecord {
            building: BuildingId::parse(self.building_id)?,
            sensor,
            settings: Settings {
                limits: Limits {
                    min_on: span(self.min_on_ms),
                    min_off: span(self.min_off_ms),
                    max_run: span(self.max_run_ms),
                    cooldown: span(self.run_cooldown_ms),
                    keep_alive: span(self.keep_alive_ms),
                },
                out_of_service,
            },
            revision: self.revision,
            update_time: self.update_time,
            updated_by: self.updated_by,
        })
    }
}

fn sensor_key(sensor: Option<&SensorId>) -> &str {
    sensor.map_or("", SensorId::as_str)
}

/// The row a change must find, else NOT_FOUND: a sensor without a live setpoint in `building`.
fn written(
    row: Option<Row>,
    building: &BuildingId,
    sensor: Option<&SensorId>,
) -> Result<SettingsRecord> {
    row.ok_or_else(|| Error::NotFound {
        kind: "setpoint",
        id: format!("{}/{}", building.as_str(), sensor_key(sensor)),
    })?
    .into_record()
}

impl Store {
    /// Every row, over the service's limits: what the loop applies.
    pub async fn heater_settings_table(&self, service: Protection) -> Result<HeaterSettings> {
        let sql = format!(
            "SELECT {COLUMNS} FROM heater_settings ORDER BY building_id, sensor_id LIMIT $1"
        );
        let rows: Vec<Row> = sqlx::query_as(&sql)
            .bind(MAX_ROWS)
            .fetch_all(self.pool())
            .await?;
        let mut table = HeaterSettings::new(service);
        for row in rows {
            let record = row.into_record()?;
            table.set(record.building, record.sensor, record.settings);
        }
        Ok(table)
    }

    /// The rows of `building` and of `sensor` in it, if set.
    pub async fn heater_settings(
        &self,
        building: &BuildingId,
        sensor: Option<&SensorId>,
    ) -> Result<(Option<SettingsRecord>, Option<SettingsRecord>)> {
        let _turn = self.read_turn().await?;
        let sql = format!(
            "SELECT {COLUMNS} FROM heater_settings WHERE building_id = $1 AND sensor_id IN ('', $2)"
        );
        let rows: Vec<Row> = sqlx::query_as(&sql)
            .bind(building.as_str())
            .bind(sensor_key(sensor))
            .fetch_all(self.pool())
            .await?;
        let (mut of_building, mut own) = (None, None);
        for row in rows {
            let record = row.into_record()?;
            match record.sensor {
                None => of_building = Some(record),
                Some(_) => own = Some(record),
            }
        }
        Ok((of_building, own))
    }

    /// Replaces the limits set for `building`, or for `sensor` in it.
    pub async fn put_heater_limits(
        &self,
        building: &BuildingId,
        sensor: Option<&SensorId>,
        limits: &Limits,
        by: &str,
    ) -> Result<SettingsRecord> {
        let ms = |span: Option<TimeDelta>| span.map(|s| s.num_milliseconds());
        let sql = format!(
            "INSERT INTO heater_settings AS h (building_id, sensor_id, min_on_ms, min_off_ms, \
               max_run_ms, run_cooldown_ms, keep_alive_ms, revision, update_time, updated_by) \
             SELECT $1, $2, $3, $4, $5, $6, $7, 1, now(), $8 WHERE {IN_BUILDING} \
             ON CONFLICT (building_id, sensor_id) DO UPDATE SET \
               min_on_ms = EXCLUDED.min_on_ms, min_off_ms = EXCLUDED.min_off_ms, \
               max_run_ms = EXCLUDED.max_run_ms, run_cooldown_ms = EXCLUDED.run_cooldown_ms, \
               keep_alive_ms = EXCLUDED.keep_alive_ms, revision = h.revision + 1, \
               update_time = now(), updated_by = EXCLUDED.updated_by \
             RETURNING {COLUMNS}"
        );
        let row: Option<Row> = sqlx::query_as(&sql)
            .bind(building.as_str())
            .bind(sensor_key(sensor))
            .bind(ms(limits.min_on))
            .bind(ms(limits.min_off))
            .bind(ms(limits.max_run))
            .bind(ms(limits.cooldown))
            .bind(ms(limits.keep_alive))
            .bind(by)
            .fetch_optional(self.pool())
            .await?;
        written(row, building, sensor)
    }

    /// Takes `building`, or `sensor` in it, out of service (`out`: why, and whether a heater
    /// left ON stays ON), or puts it back (`None`). Already out: the first `since` is kept.
    pub async fn set_out_of_service(
        &self,
        building: &BuildingId,
        sensor: Option<&SensorId>,
        out: Option<(&Reason, bool)>,
        by: &str,
    ) -> Result<SettingsRecord> {
        let sql = format!(
            "INSERT INTO heater_settings AS h (building_id, sensor_id, out_of_service_since, \
               out_of_service_reason, out_of_service_by, keep_heater_state, revision, \
               update_time, updated_by) \
             SELECT $1, $2, CASE WHEN $3 THEN now() END, $4, CASE WHEN $3 THEN $6 ELSE '' END, \
               $5, 1, now(), $6 WHERE {IN_BUILDING} \
             ON CONFLICT (building_id, sensor_id) DO UPDATE SET \
               out_of_service_since = CASE WHEN $3 \
                 THEN coalesce(h.out_of_service_since, EXCLUDED.out_of_service_since) END, \
               out_of_service_reason = EXCLUDED.out_of_service_reason, \
               out_of_service_by = EXCLUDED.out_of_service_by, \
               keep_heater_state = EXCLUDED.keep_heater_state, revision = h.revision + 1, \
               update_time = now(), updated_by = EXCLUDED.updated_by \
             RETURNING {COLUMNS}"
        );
        let row: Option<Row> = sqlx::query_as(&sql)
            .bind(building.as_str())
            .bind(sensor_key(sensor))
            .bind(out.is_some())
            .bind(out.map_or("", |(reason, _)| reason.as_str()))
            .bind(out.is_some_and(|(_, keep)| keep))
            .bind(by)
            .fetch_optional(self.pool())
            .await?;
        written(row, building, sensor)
    }
}
