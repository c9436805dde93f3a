//! Conversions between protobuf messages and domain types: validation happens here, once.

use crate::domain::{BuildingId, Reason, SensorId, Setpoint, StoredSetpoint, ValidationError};
use crate::proto::timestamp;
use crate::proto::v1 as pb;

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
