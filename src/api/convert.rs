//! Conversions between protobuf messages and domain types: validation happens here, once.

use crate::domain::{BuildingId, Reason, SensorId, Setpoint, StoredSetpoint, ValidationError};
use crate::proto::timestamp;
use crate::proto::v1 as pb;
use crate::store::Levels;

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
pub fn levels_to_proto(levels: &Levels) -> pb::SetpointLevels {
    pb::SetpointLevels {
        sensor_id: levels.sensor_id.clone(),
        building_id: levels.building_id.clone(),
        revision: levels.revision,
        levels: levels
            .entries
            .iter()
            .map(|e| pb::SetpointLevelEntry {
                level: i32::from(e.level.number()),
                desired_celsius: e.desired_celsius,
                up_delta_celsius: e.up_delta_celsius,
                down_delta_celsius: e.down_delta_celsius,
                expire_time: e.expire_time.map(timestamp),
                revision: e.revision,
                update_time: Some(timestamp(e.update_time)),
                updated_by: e.updated_by.clone(),
                reason: e.reason.clone(),
            })
            .collect(),
        effective_level: i32::from(levels.effective.number()),
        effective_until: levels.effective_until.map(timestamp),
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
