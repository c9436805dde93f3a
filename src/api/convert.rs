//! Conversions between protobuf messages and domain types: validation happens here, once.

use std::collections::HashMap;

use chrono::NaiveDate;

use crate::domain::levels::{LevelValues, Segment};
use crate::domain::schedule::{
    self, Change, DateException, LocalName, Period, PeriodValue, Schedule,
};
use crate::domain::{BuildingId, Reason, SensorId, Setpoint, StoredSetpoint, ValidationError};
use crate::proto::timestamp;
use crate::proto::v1 as pb;
use crate::store::{LevelEntry, Levels, PresetRecord, ScheduleRecord};

/// The setpoint and reason of a Put, with errors naming `setpoint.<field>`.
pub fn setpoint_from_proto(
    setpoint: Option<pb::Setpoint>,
) -> Result<(Setpoint, Reason), ValidationError> {
    let p = setpoint.ok_or_else(|| ValidationError::new("setpoint", "is required"))?;
    let parsed = (|| {
        let setpoint = Setpoint::new(
            SensorId::parse(p.sensor_id)?,
            BuildingId::parse(p.building_id)?,
            p.desired_celsius,
            p.up_delta_celsius,
            p.down_delta_celsius,
        )?;
        Ok((setpoint, Reason::parse(p.reason)?))
    })();
    parsed.map_err(|e: ValidationError| e.within("setpoint"))
}

pub fn setpoint_values(setpoint: &Setpoint) -> pb::Setpoint {
    pb::Setpoint {
        sensor_id: setpoint.sensor_id.to_string(),
        building_id: setpoint.building_id.to_string(),
        desired_celsius: setpoint.desired().value(),
        up_delta_celsius: setpoint.up_delta().value(),
        down_delta_celsius: setpoint.down_delta().value(),
        ..Default::default()
    }
}

pub fn setpoint_to_proto(stored: &StoredSetpoint) -> pb::Setpoint {
    pb::Setpoint {
        revision: stored.revision,
        update_time: Some(timestamp(stored.update_time)),
        updated_by: stored.updated_by.clone(),
        reason: stored.reason.clone(),
        ..setpoint_values(&stored.setpoint)
    }
}

/// `expected_revision` must not be negative; 0 means "must not exist".
pub fn expected_revision(value: Option<i64>) -> Result<Option<i64>, ValidationError> {
    match value {
        Some(v) if v < 0 => Err(ValidationError::new(
            "expected_revision",
            "must not be negative",
        )),
        other => Ok(other),
    }
}

/// A priority array, as the API answers it.
pub fn levels_to_proto(
    levels: &Levels,
    schedule_id: String,
    next_transition: Option<pb::ScheduleTransition>,
) -> pb::SetpointLevels {
    pb::SetpointLevels {
        sensor_id: levels.sensor_id.clone(),
        building_id: levels.building_id.clone(),
        revision: levels.revision,
        levels: levels.entries.iter().map(level_entry_to_proto).collect(),
        effective_level: i32::from(levels.effective.number()),
        effective_until: levels.effective_until.map(timestamp),
        next_transition,
        schedule_id,
    }
}

/// One level of a priority array.
pub fn level_entry_to_proto(e: &LevelEntry) -> pb::SetpointLevelEntry {
    pb::SetpointLevelEntry {
        level: i32::from(e.level.number()),
        desired_celsius: e.desired_celsius,
        up_delta_celsius: e.up_delta_celsius,
        down_delta_celsius: e.down_delta_celsius,
        expire_time: e.expire_time.map(timestamp),
        revision: e.revision,
        update_time: Some(timestamp(e.update_time)),
        updated_by: e.updated_by.clone(),
        reason: e.reason.clone(),
        schedule_id: e.schedule_id.clone().unwrap_or_default(),
    }
}

/// A stretch of one effective setpoint, tagged with its schedule and preset.
pub fn segment_to_proto(s: Segment<(String, String)>) -> pb::PreviewSegment {
    let (schedule_id, preset) = s.tag.unwrap_or_default();
    pb::PreviewSegment {
        start_time: Some(timestamp(s.start)),
        level: i32::from(s.level.number()),
        values: Some(values_to_proto(&s.values)),
        schedule_id,
        preset,
    }
}

/// The deciding level of a priority array, as a setpoint with the sensor's revision.
pub fn effective_to_proto(levels: &Levels) -> Option<pb::Setpoint> {
    let entry = levels
        .entries
        .iter()
        .find(|e| e.level == levels.effective)?;
    Some(pb::Setpoint {
        sensor_id: levels.sensor_id.clone(),
        building_id: levels.building_id.clone(),
        desired_celsius: entry.desired_celsius,
        up_delta_celsius: entry.up_delta_celsius,
        down_delta_celsius: entry.down_delta_celsius,
        revision: levels.revision,
        update_time: Some(timestamp(entry.update_time)),
        updated_by: entry.updated_by.clone(),
        reason: entry.reason.clone(),
    })
}

/// A band's values, with errors naming `<field>.<value>`.
pub fn values_from_proto(
    field: &str,
    values: Option<&pb::SetpointValues>,
) -> Result<LevelValues, ValidationError> {
    let v = values.ok_or_else(|| ValidationError::new(field, "is required"))?;
    LevelValues::new(v.desired_celsius, v.up_delta_celsius, v.down_delta_celsius)
        .map_err(|e| e.within(field))
}

pub fn values_to_proto(values: &LevelValues) -> pb::SetpointValues {
    pb::SetpointValues {
        desired_celsius: values.desired.value(),
        up_delta_celsius: values.up_delta.value(),
        down_delta_celsius: values.down_delta.value(),
    }
}

/// A schedule of a request, checked as a whole; errors name `schedule.<field>`.
pub fn schedule_from_proto(
    p: &pb::Schedule,
) -> Result<(BuildingId, LocalName, Vec<SensorId>, Schedule), ValidationError> {
    let parsed = (|| {
        let building = BuildingId::parse(p.building_id.clone())?;
        let id = LocalName::parse("schedule_id", &p.schedule_id)?;
        if p.sensor_ids.len() > MAX_SCHEDULE_SENSORS {
            return Err(ValidationError::new(
                "sensor_ids",
                format!("at most {MAX_SCHEDULE_SENSORS}"),
            ));
        }
        let mut sensors = p
            .sensor_ids
            .iter()
            .map(|s| SensorId::parse(s.clone()).map_err(|e| e.within("sensor_ids")))
            .collect::<Result<Vec<_>, _>>()?;
        sensors.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        sensors.dedup();
        let zone = schedule::parse_zone(&p.time_zone)?;
        let mut week: [Vec<Period>; 7] = Default::default();
        for (i, period) in p.weekly.iter().enumerate() {
            let field = format!("weekly[{i}]");
            if period.days.is_empty() {
                return Err(ValidationError::new(
                    format!("{field}.days"),
                    "names no day",
                ));
            }
            let parsed = period_from_proto(period).map_err(|e| e.within(&field))?;
            for day in &period.days {
                let day = match pb::Weekday::try_from(*day) {
                    Ok(pb::Weekday::Unspecified) | Err(_) => {
                        return Err(ValidationError::new(
                            format!("{field}.days"),
                            "must be WEEKDAY_MONDAY to WEEKDAY_SUNDAY",
                        ))
                    }
                    Ok(day) => day as usize - 1,
                };
                week[day].push(parsed.clone());
            }
        }
        for day in &mut week {
            day.sort_by_key(|p| p.start);
        }
        let exceptions = p
            .exceptions
            .iter()
            .enumerate()
            .map(|(i, e)| {
                exception_from_proto(e).map_err(|err| err.within(&format!("exceptions[{i}]")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let schedule = Schedule::new(zone, week, exceptions)?;
        Ok((building, id, sensors, schedule))
    })();
    parsed.map_err(|e: ValidationError| e.within("schedule"))
}

/// The most sensors one schedule names.
pub const MAX_SCHEDULE_SENSORS: usize = 1000;

fn period_from_proto(p: &pb::SchedulePeriod) -> Result<Period, ValidationError> {
    use pb::schedule_period::Value;
    let value = match &p.value {
        Some(Value::Preset(name)) => PeriodValue::Preset(LocalName::parse("preset", name)?),
        Some(Value::Values(values)) => {
            PeriodValue::Values(values_from_proto("values", Some(values))?)
        }
        None => {
            return Err(ValidationError::new(
                "preset",
                "a period needs a preset or values",
            ))
        }
    };
    Period::parse(&p.start_time, &p.end_time, value)
}

fn exception_from_proto(e: &pb::ScheduleException) -> Result<DateException, ValidationError> {
    let date = |field: &str, s: &str| {
        NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .map_err(|_| ValidationError::new(field, "must be a date as YYYY-MM-DD"))
    };
    let first = date("start_date", &e.start_date)?;
    let last = if e.end_date.is_empty() {
        first
    } else {
        date("end_date", &e.end_date)?
    };
    let mut periods = e
        .periods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if !p.days.is_empty() {
                return Err(ValidationError::new(
                    format!("periods[{i}].days"),
                    "an exception's periods have no days",
                ));
            }
            period_from_proto(p).map_err(|err| err.within(&format!("periods[{i}]")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    periods.sort_by_key(|p| p.start);
    Ok(DateException {
        first,
        last,
        description: e.description.clone(),
        periods,
    })
}

fn period_to_proto(period: &Period, days: Vec<i32>) -> pb::SchedulePeriod {
    use pb::schedule_period::Value;
    pb::SchedulePeriod {
        days,
        start_time: schedule::format_clock(period.start),
        end_time: schedule::format_clock(period.end),
        value: Some(match &period.value {
            PeriodValue::Preset(name) => Value::Preset(name.as_str().to_owned()),
            PeriodValue::Values(v) => Value::Values(values_to_proto(v)),
        }),
    }
}

/// A stored schedule; periods the same on several days are one period with those days.
pub fn schedule_to_proto(
    record: &ScheduleRecord,
    next: Option<pb::ScheduleTransition>,
) -> pb::Schedule {
    let mut weekly: Vec<pb::SchedulePeriod> = Vec::new();
    for (day, periods) in record.schedule.week.iter().enumerate() {
        for period in periods {
            let number = day as i32 + 1;
            let same = weekly
                .iter_mut()
                .find(|p| period_to_proto(period, p.days.clone()) == **p);
            match same {
                Some(p) => p.days.push(number),
                None => weekly.push(period_to_proto(period, vec![number])),
            }
        }
    }
    pb::Schedule {
        building_id: record.building_id.clone(),
        schedule_id: record.schedule_id.as_str().to_owned(),
        sensor_ids: record.sensor_ids.clone(),
        time_zone: record.schedule.zone.name().to_owned(),
        weekly,
        exceptions: record
            .schedule
            .exceptions
            .iter()
            .map(|e| pb::ScheduleException {
                start_date: e.first.format("%Y-%m-%d").to_string(),
                end_date: e.last.format("%Y-%m-%d").to_string(),
                description: e.description.clone(),
                periods: e
                    .periods
                    .iter()
                    .map(|p| period_to_proto(p, vec![]))
                    .collect(),
            })
            .collect(),
        revision: record.revision,
        update_time: Some(timestamp(record.update_time)),
        updated_by: record.updated_by.clone(),
        reason: record.reason.clone(),
        next_transition: next,
    }
}

/// A schedule's next change, as the API shows it.
pub fn transition_to_proto(
    schedule_id: &str,
    change: &Change<'_>,
    presets: &HashMap<LocalName, LevelValues>,
) -> pb::ScheduleTransition {
    pb::ScheduleTransition {
        time: Some(timestamp(change.at)),
        schedule_id: schedule_id.to_owned(),
        preset: match change.value {
            Some(PeriodValue::Preset(name)) => name.as_str().to_owned(),
            _ => String::new(),
        },
        values: change
            .value
            .and_then(|v| v.resolve(presets))
            .map(|v| values_to_proto(&v)),
    }
}

pub fn preset_to_proto(record: &PresetRecord) -> pb::Preset {
    pb::Preset {
        building_id: record.building_id.clone(),
        name: record.name.as_str().to_owned(),
        values: Some(values_to_proto(&record.values)),
        revision: record.revision,
        update_time: Some(timestamp(record.update_time)),
        updated_by: record.updated_by.clone(),
        reason: record.reason.clone(),
    }
}
