//! A sensor's effective setpoint over time, from its levels as they stand and its schedule:
//! what PreviewSetpoint lists and what DryRun decides on.

use chrono::{DateTime, TimeDelta, Utc};

use crate::domain::levels::{self, Held, Level, LevelValues, Scheduled, Segment};
use crate::domain::schedule::PeriodValue;
use crate::domain::{Scope, SensorId};
use crate::error::{Error, Result};
use crate::store::{Levels, SensorSchedule, Store};

/// What a segment of the effective setpoint is tagged with: its schedule and preset (empty
/// when not the SCHEDULE level's, or a period of values).
pub type Source = (String, String);

/// The effective setpoint from `from` until `until`, segment by segment.
pub async fn effective_between(
    store: &Store,
    sensor: &SensorId,
    scope: &Scope,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Vec<Segment<Source>>> {
    let stored = store.levels(sensor, scope).await?;
    let covering = store.sensor_schedule(&stored.building_id, sensor).await?;
    let (held, default) = held_levels(&stored)?;
    let scheduled = covering
        .as_ref()
        .map(|s| scheduled(s, from, until))
        .unwrap_or_default();
    Ok(levels::preview(from, until, &held, &scheduled, default))
}

/// The effective setpoint at `at`.
pub async fn effective_at(
    store: &Store,
    sensor: &SensorId,
    scope: &Scope,
    at: DateTime<Utc>,
) -> Result<Segment<Source>> {
    effective_between(store, sensor, scope, at, at + TimeDelta::seconds(1))
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Internal("a preview without its first segment".into()))
}

/// A sensor's levels above SCHEDULE, and its DEFAULT level's values.
fn held_levels(stored: &Levels) -> Result<(Vec<Held>, LevelValues)> {
    let mut held = Vec::new();
    let mut default = None;
    for entry in &stored.entries {
        let values = LevelValues::new(
            entry.desired_celsius,
            entry.up_delta_celsius,
            entry.down_delta_celsius,
        )
        .map_err(|e| Error::Internal(format!("stored {e}")))?;
        match entry.level {
            Level::Default => default = Some(values),
            // The schedule's future comes from the schedule itself.
            Level::Schedule => {}
            level => held.push(Held {
                level,
                values,
                expire_time: entry.expire_time,
            }),
        }
    }
    let default = default.ok_or_else(|| Error::Internal("levels without DEFAULT".into()))?;
    Ok((held, default))
}

/// A schedule's changes over a preview, each tagged with the schedule and the preset.
fn scheduled(
    covering: &SensorSchedule,
    from: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Vec<Scheduled<(String, String)>> {
    let id = covering.record.schedule_id.as_str();
    covering
        .record
        .schedule
        .changes(from, until)
        .into_iter()
        .map(|c| Scheduled {
            at: c.at,
            values: c.value.and_then(|v| v.resolve(&covering.presets)),
            tag: (
                id.to_owned(),
                match c.value {
                    Some(PeriodValue::Preset(p)) => p.as_str().to_owned(),
                    _ => String::new(),
                },
            ),
        })
        .collect()
}
