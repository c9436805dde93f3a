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
    /// What the sensor's schedule holds now; written by the service, at each transition.
    Schedule = 2,
    /// An operator's manual change, usually with an expiry.
    Override = 3,
    /// Freeze or overheat protection.
    Safety = 4,
}

impl Level {
    pub fn from_number(number: i32) -> Option<Self> {
        match number {
            1 => Some(Level::Default),
            2 => Some(Level::Schedule),
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
            Level::Schedule => "SCHEDULE",
            Level::Override => "OVERRIDE",
            Level::Safety => "SAFETY",
        }
    }

    /// A level WriteSetpointLevel and RelinquishSetpointLevel take: DEFAULT goes through Put
    /// and Delete.
    pub fn parse_above_default(number: i32) -> Result<Self, ValidationError> {
        match Self::from_number(number) {
            Some(level) if level > Level::Schedule => Ok(level),
            Some(Level::Schedule) => Err(ValidationError::new(
                "level",
                "SETPOINT_LEVEL_SCHEDULE is written by the building's schedule (PutSchedule)",
            )),
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
            Level::Default | Level::Schedule | Level::Override => Action::Write,
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

/// An expiry given at `now` as a time or as a duration from `now` (not both).
pub fn expiry_of(
    expire_time: Option<DateTime<Utc>>,
    duration: Option<TimeDelta>,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, ValidationError> {
    match (expire_time, duration) {
        (Some(_), Some(_)) => Err(ValidationError::new(
            "duration",
            "give expire_time or duration, not both",
        )),
        (None, Some(d)) if d <= TimeDelta::zero() => {
            Err(ValidationError::new("duration", "must be positive"))
        }
        (None, Some(d)) if d > MAX_EXPIRY_AHEAD => {
            Err(ValidationError::new("duration", "must be at most 366 days"))
        }
        (None, Some(d)) => Ok(Some(now + d)),
        (at, None) => expiry(at, now),
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

/// A level above SCHEDULE as it stands, for a preview.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub level: Level,
    pub values: LevelValues,
    pub expire_time: Option<DateTime<Utc>>,
}

/// What the schedule holds from `at` on (`None`: nothing), tagged with how to name it.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled<T> {
    pub at: DateTime<Utc>,
    pub values: Option<LevelValues>,
    pub tag: T,
}

/// A stretch of one effective setpoint, from `start` to the next segment's.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment<T> {
    pub start: DateTime<Utc>,
    pub level: Level,
    pub values: LevelValues,
    /// The schedule's tag, for a SCHEDULE segment.
    pub tag: Option<T>,
}

/// The effective setpoint from `from` until `until`, as the levels stand: the highest level
/// held and not expired, else what the schedule holds (its changes in order, the first at or
/// before `from`), else DEFAULT. The same rule as `winning_level`, over time.
pub fn preview<T: Clone + PartialEq>(
    from: DateTime<Utc>,
    until: DateTime<Utc>,
    held: &[Held],
    schedule: &[Scheduled<T>],
    default: LevelValues,
) -> Vec<Segment<T>> {
    let mut instants: Vec<DateTime<Utc>> = held
        .iter()
        .filter_map(|h| h.expire_time)
        .chain(schedule.iter().map(|s| s.at))
        .filter(|at| *at > from && *at < until)
        .collect();
    instants.push(from);
    instants.sort_unstable();
    instants.dedup();
    let mut out: Vec<Segment<T>> = Vec::new();
    for at in instants {
        let top = held
            .iter()
            .filter(|h| h.expire_time.is_none_or(|e| e > at))
            .max_by_key(|h| h.level);
        let scheduled = schedule
            .iter()
            .take_while(|s| s.at <= at)
            .last()
            .and_then(|s| Some((s.values?, s.tag.clone())));
        let segment = match (top, scheduled) {
            (Some(h), _) => Segment {
                start: at,
                level: h.level,
                values: h.values,
                tag: None,
            },
            (None, Some((values, tag))) => Segment {
                start: at,
                level: Level::Schedule,
                values,
                tag: Some(tag),
            },
            (None, None) => Segment {
                start: at,
                level: Level::Default,
                values: default,
                tag: None,
            },
        };
        let same = out.last().is_some_and(|last| {
            (last.level, last.values, &last.tag) == (segment.level, segment.values, &segment.tag)
        });
        if !same {
            out.push(segment);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_order_by_priority_and_only_overrides_and_safety_are_written_directly() {
        assert!(Level::Default < Level::Override && Level::Override < Level::Safety);
        for level in [
            Level::Default,
            Level::Schedule,
            Level::Override,
            Level::Safety,
        ] {
            assert_eq!(Level::from_number(i32::from(level.number())), Some(level));
        }
        assert!(Level::parse_above_default(1).is_err());
        assert!(Level::parse_above_default(0).is_err());
        assert!(
            Level::parse_above_default(2).is_err(),
            "the schedule writes SCHEDULE"
        );
        assert_eq!(Level::parse_above_default(3), Ok(Level::Override));
        assert_eq!(Level::Override.action(), Action::Write);
        assert_eq!(Level::Safety.action(), Action::WriteSafety);
    }

    #[test]
    fn a_preview_shows_an_override_expiring_into_the_schedule_and_the_schedule_ending() {
        let t = |h: i64| DateTime::from_timestamp(1_800_000_000 + h * 3600, 0).unwrap();
        let v = |d: f64| LevelValues::new(d, 0.5, 0.5).unwrap();
        let held = [
            Held {
                level: Level::Override,
                values: v(23.0),
                expire_time: Some(t(2)),
            },
            Held {
                level: Level::Safety,
                values: v(5.0),
                expire_time: Some(t(1)),
            },
        ];
        let schedule = [
            Scheduled {
                at: t(-5),
                values: Some(v(21.0)),
                tag: "comfort",
            },
            Scheduled {
                at: t(4),
                values: None,
                tag: "",
            },
            Scheduled {
                at: t(30),
                values: Some(v(21.0)),
                tag: "comfort",
            },
        ];
        let segments = preview(t(0), t(24), &held, &schedule, v(18.0));
        let seen: Vec<_> = segments
            .iter()
            .map(|s| (s.start, s.level, s.values.desired.value()))
            .collect();
        assert_eq!(
            seen,
            [
                (t(0), Level::Safety, 5.0),
                (t(1), Level::Override, 23.0),
                (t(2), Level::Schedule, 21.0),
                (t(4), Level::Default, 18.0),
            ]
        );
        assert_eq!(segments[2].tag, Some("comfort"));
    }

    #[test]
    fn an_expiry_is_a_time_or_a_duration_not_both() {
        let now = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let hour = TimeDelta::hours(1);
        assert_eq!(expiry_of(None, Some(hour), now), Ok(Some(now + hour)));
        assert_eq!(expiry_of(Some(now + hour), None, now), Ok(Some(now + hour)));
        assert_eq!(expiry_of(None, None, now), Ok(None));
        assert!(expiry_of(Some(now + hour), Some(hour), now).is_err());
        assert!(expiry_of(None, Some(TimeDelta::zero()), now).is_err());
        assert!(expiry_of(None, Some(TimeDelta::days(400)), now).is_err());
        // Past what a time can hold: refused, not taken for "no expiry".
        assert!(expiry_of(None, Some(TimeDelta::seconds(9_000_000_000_000)), now).is_err());
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
