//! Conversions between protobuf messages and domain types: validation happens here, once.

use chrono::{DateTime, Utc};

use crate::domain::{BuildingId, Reason, SensorId, Setpoint, StoredSetpoint, ValidationError};
use crate::proto::v1 as pb;

/// A protobuf timestamp of `time`. chrono writes a leap second (a JSON reading at `23:59:60`, a
/// protobuf one with `nanos` from 1e9 on a :59 second) as nanoseconds past 1e9, which a
/// protobuf timestamp does not allow and strict clients refuse: it becomes the last nanosecond
/// of the second before.
pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    const LAST_NANO: u32 = 999_999_999;
    prost_types::Timestamp {
        seconds: time.timestamp(),
        // At most LAST_NANO, so it fits.
        nanos: time.timestamp_subsec_nanos().min(LAST_NANO) as i32,
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leap_second_becomes_the_last_nanosecond_before_it() {
        let plain = DateTime::from_timestamp(1_800_000_000, 5).unwrap();
        assert_eq!(
            timestamp(plain),
            prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 5
            }
        );
        let leap = DateTime::parse_from_rfc3339("2016-12-31T23:59:60.5Z")
            .unwrap()
            .with_timezone(&Utc);
        let t = timestamp(leap);
        assert_eq!((t.seconds % 60, t.nanos), (59, 999_999_999));
    }
}
