use std::ops::RangeInclusive;

use chrono::{DateTime, Utc};

use super::levels::LevelValues;
use super::{BuildingId, SensorId, ValidationError};

/// Allowed desired temperatures. The database repeats these as CHECK constraints.
pub const DESIRED_RANGE: RangeInclusive<f64> = -50.0..=100.0;
/// Allowed up and down deltas.
pub const DELTA_RANGE: RangeInclusive<f64> = 0.0..=20.0;
/// Longest reason accepted, in characters.
pub const MAX_REASON_CHARS: usize = 256;

/// A temperature in degrees Celsius; always finite.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Celsius(f64);

impl Celsius {
    /// `None` for NaN and the infinities.
    pub fn new(value: f64) -> Option<Self> {
        value.is_finite().then_some(Self(value))
    }

    /// A finite value inside `range`, or an error naming `field`.
    pub fn parse_in(
        field: &str,
        value: f64,
        range: RangeInclusive<f64>,
    ) -> Result<Self, ValidationError> {
        let celsius = Self::new(value)
            .ok_or_else(|| ValidationError::new(field, "must be a finite number"))?;
        if !range.contains(&value) {
            return Err(ValidationError::new(
                field,
                format!("must be between {} and {}", range.start(), range.end()),
            ));
        }
        Ok(celsius)
    }

    pub fn value(self) -> f64 {
        self.0
    }
}

/// Free text explaining a change; at most 256 characters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    pub fn parse(value: impl Into<String>) -> Result<Self, ValidationError> {
        let value = value.into();
        if value.chars().count() > MAX_REASON_CHARS {
            return Err(ValidationError::new(
                "reason",
                format!("must be at most {MAX_REASON_CHARS} characters"),
            ));
        }
        // PostgreSQL's text cannot hold it: the statement would fail as an internal error.
        if value.contains('\0') {
            return Err(ValidationError::new(
                "reason",
                "must not contain a NUL character",
            ));
        }
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated setpoint: the band a sensor's room is held in.
#[derive(Debug, Clone, PartialEq)]
pub struct Setpoint {
    pub sensor_id: SensorId,
    pub building_id: BuildingId,
    values: LevelValues,
}

impl Setpoint {
    /// Checks every value; the error names the first field that is out of range.
    pub fn new(
        sensor_id: SensorId,
        building_id: BuildingId,
        desired_celsius: f64,
        up_delta_celsius: f64,
        down_delta_celsius: f64,
    ) -> Result<Self, ValidationError> {
        Ok(Self {
            sensor_id,
            building_id,
            values: LevelValues::new(desired_celsius, up_delta_celsius, down_delta_celsius)?,
        })
    }

    /// Its band's values, as a priority level holds them too.
    pub fn values(&self) -> LevelValues {
        self.values
    }

    pub fn desired(&self) -> Celsius {
        self.values.desired
    }

    pub fn up_delta(&self) -> Celsius {
        self.values.up_delta
    }

    pub fn down_delta(&self) -> Celsius {
        self.values.down_delta
    }
}

/// A setpoint as stored, with the metadata the server assigns.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredSetpoint {
    pub setpoint: Setpoint,
    pub revision: i64,
    pub update_time: DateTime<Utc>,
    pub updated_by: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setpoint(desired: f64, up: f64, down: f64) -> Result<Setpoint, ValidationError> {
        Setpoint::new(
            SensorId::parse("s1").unwrap(),
            BuildingId::parse("b1").unwrap(),
            desired,
            up,
            down,
        )
    }

    #[test]
    fn accepts_the_edges_of_every_range() {
        assert!(setpoint(-50.0, 0.0, 0.0).is_ok());
        assert!(setpoint(100.0, 20.0, 20.0).is_ok());
    }

    #[test]
    fn rejects_out_of_range_and_non_finite_values_naming_the_field() {
        let cases = [
            (f64::NAN, 1.0, 1.0, "desired_celsius"),
            (f64::INFINITY, 1.0, 1.0, "desired_celsius"),
            (-50.001, 1.0, 1.0, "desired_celsius"),
            (100.001, 1.0, 1.0, "desired_celsius"),
            (20.0, -0.1, 1.0, "up_delta_celsius"),
            (20.0, 20.1, 1.0, "up_delta_celsius"),
            (20.0, f64::NEG_INFINITY, 1.0, "up_delta_celsius"),
            (20.0, 1.0, f64::NAN, "down_delta_celsius"),
            (20.0, 1.0, 21.0, "down_delta_celsius"),
        ];
        for (d, u, w, field) in cases {
            assert_eq!(setpoint(d, u, w).unwrap_err().field, field, "{d} {u} {w}");
        }
    }

    #[test]
    fn reason_is_limited_to_256_characters_not_bytes() {
        assert!(Reason::parse("é".repeat(256)).is_ok());
        assert_eq!(Reason::parse("x".repeat(257)).unwrap_err().field, "reason");
        assert_eq!(Reason::parse("a\0b").unwrap_err().field, "reason");
        assert!(Reason::parse("two\nlines\tand a tab").is_ok());
    }
}
