//! The levels of a sensor's priority array, who may write them, and their expiry. Which level
//! decides is written once, in the database (`winning_level`, migrations), where every write and
//! the control loop's re-read take it from.

use chrono::{DateTime, TimeDelta, Utc};

use super::setpoint::{Celsius, DELTA_RANGE, DESIRED_RANGE};
use super::{Action, ValidationError};

/// A level, lowest first; the numbers are the proto's and the database's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// What PutSetpoint writes: the `setpoints` row.
    Default = 1,
    /// An operator's manual change, usually with an expiry.
    Override = 3,
    /// Freeze or overheat protection.
    Safety = 4,
}

impl Level {
    pub fn from_number(number: i32) -> Option<Self> {
        match number {
            1 => Some(Level::Default),
            3 => Some(Level::Override),
            4 => Some(Level::Safety),
            _ => None,
        }
    }

    pub fn number(self) -> i16 {
        self as i16
    }

    /// Its name, as logs and errors give it.
    pub fn name(self) -> &'static str {
        match self {
            Level::Default => "DEFAULT",
            Level::Override => "OVERRIDE",
            Level::Safety => "SAFETY",
        }
    }

    /// A level WriteSetpointLevel and RelinquishSetpointLevel take: DEFAULT goes through Put
    /// and Delete.
    pub fn parse_above_default(number: i32) -> Result<Self, ValidationError> {
        match Self::from_number(number) {
            Some(level) if level > Level::Default => Ok(level),
            _ => Err(ValidationError::new(
                "level",
                "must be SETPOINT_LEVEL_OVERRIDE or SETPOINT_LEVEL_SAFETY",
            )),
        }
    }

    /// What writing or relinquishing it is, as far as permissions go: SAFETY is for
    /// administrators.
    pub fn action(self) -> Action {
        match self {
            Level::Default | Level::Override => Action::Write,
            Level::Safety => Action::WriteSafety,
        }
    }
}

/// A level as the database stores it (its CHECK allows no other number).
impl TryFrom<i16> for Level {
    type Error = ValidationError;

    fn try_from(number: i16) -> Result<Self, ValidationError> {
        Self::from_number(i32::from(number))
            .ok_or_else(|| ValidationError::new("level", format!("{number} is not a level")))
    }
}

/// How far ahead an expiry may lie: further is a mistake (milliseconds taken for seconds).
pub const MAX_EXPIRY_AHEAD: TimeDelta = TimeDelta::days(366);

/// A level's values: the band it holds the room in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelValues {
    pub desired: Celsius,
    pub up_delta: Celsius,
    pub down_delta: Celsius,
}

impl LevelValues {
    /// Checks every value; the error names the first field that is out of range.
    pub fn new(desired: f64, up_delta: f64, down_delta: f64) -> Result<Self, ValidationError> {
        Ok(Self {
            desired: Celsius::parse_in("desired_celsius", desired, DESIRED_RANGE)?,
            up_delta: Celsius::parse_in("up_delta_celsius", up_delta, DELTA_RANGE)?,
            down_delta: Celsius::parse_in("down_delta_celsius", down_delta, DELTA_RANGE)?,
        })
    }
}

/// An expiry given at `now`: after it, and at most [`MAX_EXPIRY_AHEAD`] later.
pub fn expiry(
    expire_time: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, ValidationError> {
    match expire_time {
        Some(at) if at <= now => Err(ValidationError::new("expire_time", "must be in the future")),
        Some(at) if at - now > MAX_EXPIRY_AHEAD => Err(ValidationError::new(
            "expire_time",
            "must be at most 366 days ahead",
        )),
        at => Ok(at),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_order_by_priority_and_only_overrides_and_safety_are_written_directly() {
        assert!(Level::Default < Level::Override && Level::Override < Level::Safety);
        for level in [Level::Default, Level::Override, Level::Safety] {
            assert_eq!(Level::from_number(i32::from(level.number())), Some(level));
        }
        assert!(Level::parse_above_default(1).is_err());
        assert!(Level::parse_above_default(0).is_err());
        assert!(
            Level::parse_above_default(2).is_err(),
            "2 is kept for schedules"
        );
        assert_eq!(Level::parse_above_default(3), Ok(Level::Override));
        assert_eq!(Level::Override.action(), Action::Write);
        assert_eq!(Level::Safety.action(), Action::WriteSafety);
    }

    #[test]
    fn an_expiry_lies_ahead_and_within_a_year() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        assert_eq!(expiry(None, now), Ok(None));
        assert!(expiry(Some(now), now).is_err());
        let soon = now + TimeDelta::seconds(1);
        assert_eq!(expiry(Some(soon), now), Ok(Some(soon)));
        assert!(expiry(Some(now + MAX_EXPIRY_AHEAD), now).is_ok());
        assert!(expiry(Some(now + MAX_EXPIRY_AHEAD + TimeDelta::seconds(1)), now).is_err());
    }
}
