//! Bytes on Kafka to domain values and back. Every way a sensor record can be bad has a
//! [`DeadLetter`] reason, which goes into the dead-letter record's header.

use chrono::{DateTime, TimeDelta, Utc};
use prost::Message;
use serde::Deserialize;

use crate::config::{CelsiusRange, SensorFormat};
use crate::domain::control::{CommandReason, Decision, HeaterCommand, LastCommand, Reading};
use crate::domain::feedback::Reported;
use crate::domain::levels::Level;
use crate::domain::protection::Limit;
use crate::domain::{Celsius, SensorId};
use crate::proto::timestamp;
use crate::proto::v1 as pb;

/// Why a sensor record was dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeadLetter {
    #[error("undecodable: {0}")]
    Undecodable(String),
    #[error("invalid sensor_id: {0}")]
    InvalidSensorId(String),
    #[error("record key {key:?} differs from sensor_id {sensor_id:?}")]
    KeyMismatch { key: String, sensor_id: String },
    #[error("record has no key: it must be the sensor_id, which picks the partition and so the replica that controls the sensor")]
    MissingKey,
    #[error("temperature_celsius is not a finite number")]
    NonFiniteTemperature,
    #[error("temperature_celsius {0}")]
    ImplausibleTemperature(String),
    #[error("reading has no temperature_celsius")]
    MissingTemperature,
    #[error("reading has no reading_time and the record no timestamp")]
    MissingTime,
    #[error("reading_time {0} is in the future")]
    FutureTime(DateTime<Utc>),
    #[error("heater report has no state (ON or OFF)")]
    MissingState,
}

impl DeadLetter {
    /// Every [`DeadLetter::code`], in the order of [`DeadLetter::kind`].
    pub const KINDS: [&'static str; 10] = [
        "undecodable",
        "invalid_sensor_id",
        "key_mismatch",
        "missing_key",
        "non_finite_temperature",
        "implausible_temperature",
        "missing_temperature",
        "missing_time",
        "future_time",
        "missing_state",
    ];

    /// The reason's place in [`DeadLetter::KINDS`].
    pub fn kind(&self) -> usize {
        match self {
            DeadLetter::Undecodable(_) => 0,
            DeadLetter::InvalidSensorId(_) => 1,
            DeadLetter::KeyMismatch { .. } => 2,
            DeadLetter::MissingKey => 3,
            DeadLetter::NonFiniteTemperature => 4,
            DeadLetter::ImplausibleTemperature(_) => 5,
            DeadLetter::MissingTemperature => 6,
            DeadLetter::MissingTime => 7,
            DeadLetter::FutureTime(_) => 8,
            DeadLetter::MissingState => 9,
        }
    }

    /// A stable, low-cardinality code: the header value and the metric label.
    pub fn code(&self) -> &'static str {
        Self::KINDS[self.kind()]
    }
}

#[derive(Deserialize)]
struct JsonReading {
    sensor_id: String,
    temperature_celsius: Option<f64>,
    reading_time: Option<String>,
}

#[derive(Deserialize)]
struct JsonReport {
    sensor_id: String,
    state: Option<String>,
    report_time: Option<String>,
}

/// The record's sensor, which its key must name. A keyless record lands on any partition: the
/// replica that owns it would decide for a sensor another replica controls.
fn keyed_sensor(sensor_id: String, key: Option<&[u8]>) -> Result<SensorId, DeadLetter> {
    let sensor = SensorId::parse(sensor_id).map_err(|e| DeadLetter::InvalidSensorId(e.message))?;
    let key = key.ok_or(DeadLetter::MissingKey)?;
    if key != sensor.as_str().as_bytes() {
        return Err(DeadLetter::KeyMismatch {
            key: String::from_utf8_lossy(key).into_owned(),
            sensor_id: sensor.to_string(),
        });
    }
    Ok(sensor)
}

/// A JSON record's RFC 3339 `field`.
fn json_time(field: &str, time: Option<String>) -> Result<Option<DateTime<Utc>>, DeadLetter> {
    time.map(|t| {
        DateTime::parse_from_rfc3339(&t)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| DeadLetter::Undecodable(format!("{field}: {e}")))
    })
    .transpose()
}

/// Decodes and validates one heater report: as a reading (`decode_reading`), with a state for
/// a temperature. JSON states are `ON`/`OFF` or the proto names.
pub fn decode_report(
    format: SensorFormat,
    max_ahead: TimeDelta,
    key: Option<&[u8]>,
    payload: &[u8],
    record_time: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(SensorId, Reported), DeadLetter> {
    let (sensor_id, state, time) = match format {
        SensorFormat::Protobuf => {
            let r = pb::HeaterReport::decode(payload)
                .map_err(|e| DeadLetter::Undecodable(e.to_string()))?;
            let state = match r.state() {
                pb::HeaterCommand::On => Some(HeaterCommand::On),
                pb::HeaterCommand::Off => Some(HeaterCommand::Off),
                pb::HeaterCommand::Unspecified => None,
            };
            let time = r
                .report_time
                .map(|t| {
                    crate::proto::from_timestamp(&t)
                        .ok_or_else(|| DeadLetter::Undecodable("report_time out of range".into()))
                })
                .transpose()?;
            (r.sensor_id, state, time)
        }
        SensorFormat::Json => {
            let r: JsonReport = serde_json::from_slice(payload)
                .map_err(|e| DeadLetter::Undecodable(e.to_string()))?;
            let state = match r.state.as_deref() {
                None => None,
                Some("ON" | "HEATER_COMMAND_ON") => Some(HeaterCommand::On),
                Some("OFF" | "HEATER_COMMAND_OFF") => Some(HeaterCommand::Off),
                Some(other) => {
                    return Err(DeadLetter::Undecodable(format!(
                        "state {other:?}: must be ON or OFF"
                    )))
                }
            };
            let time = json_time("report_time", r.report_time)?;
            (r.sensor_id, state, time)
        }
    };
    let sensor = keyed_sensor(sensor_id, key)?;
    let state = state.ok_or(DeadLetter::MissingState)?;
    let at = time.or(record_time).ok_or(DeadLetter::MissingTime)?;
    if now
        .checked_add_signed(max_ahead)
        .is_some_and(|bound| at > bound)
    {
        return Err(DeadLetter::FutureTime(at));
    }
    Ok((sensor, Reported { state, at }))
}

/// Decodes and validates one sensor record. `record_time` (the Kafka timestamp) stands in for a
/// missing `reading_time`; a reading from the future is one more than `max_ahead` past the
/// later of `now` (also its `received`) and `appended`, the broker's stamp, so a replica whose
/// clock is slow still takes fresh readings.
#[allow(clippy::too_many_arguments)]
pub fn decode_reading(
    format: SensorFormat,
    plausible: CelsiusRange,
    max_ahead: TimeDelta,
    key: Option<&[u8]>,
    payload: &[u8],
    record_time: Option<DateTime<Utc>>,
    appended: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(SensorId, Reading), DeadLetter> {
    let (sensor_id, temperature, time) = match format {
        SensorFormat::Protobuf => {
            let r = pb::SensorReading::decode(payload)
                .map_err(|e| DeadLetter::Undecodable(e.to_string()))?;
            let time = r
                .reading_time
                .map(|t| {
                    u32::try_from(t.nanos)
                        .ok()
                        .and_then(|nanos| DateTime::from_timestamp(t.seconds, nanos))
                        .ok_or_else(|| DeadLetter::Undecodable("reading_time out of range".into()))
                })
                .transpose()?;
            (r.sensor_id, r.temperature_celsius, time)
        }
        SensorFormat::Json => {
            let r: JsonReading = serde_json::from_slice(payload)
                .map_err(|e| DeadLetter::Undecodable(e.to_string()))?;
            let time = json_time("reading_time", r.reading_time)?;
            (r.sensor_id, r.temperature_celsius, time)
        }
    };
    let sensor = keyed_sensor(sensor_id, key)?;
    let temperature = temperature.ok_or(DeadLetter::MissingTemperature)?;
    let temperature = Celsius::new(temperature).ok_or(DeadLetter::NonFiniteTemperature)?;
    if !plausible.contains(temperature.value()) {
        return Err(DeadLetter::ImplausibleTemperature(format!(
            "{} is outside READING_RANGE_CELSIUS {plausible}",
            temperature.value()
        )));
    }
    let time = time.or(record_time).ok_or(DeadLetter::MissingTime)?;
    if !storable(time) {
        return Err(DeadLetter::Undecodable("reading_time out of range".into()));
    }
    // Checked: a broker's stamp near the end of time must not overflow.
    let bound = appended
        .map_or(now, |t| t.max(now))
        .checked_add_signed(max_ahead);
    if bound.is_some_and(|bound| time > bound) {
        return Err(DeadLetter::FutureTime(time));
    }
    Ok((
        sensor,
        Reading {
            temperature,
            time,
            received: now,
        },
    ))
}

/// Whether the engine can keep `time`: it stores reading times as nanoseconds since the epoch
/// in an `i64` (years 1677 to 2262) to keep a million sensors small.
pub fn storable(time: DateTime<Utc>) -> bool {
    time.timestamp_nanos_opt().is_some()
}

pub fn command_to_proto(command: HeaterCommand) -> pb::HeaterCommand {
    match command {
        HeaterCommand::On => pb::HeaterCommand::On,
        HeaterCommand::Off => pb::HeaterCommand::Off,
    }
}

pub fn reason_to_proto(reason: CommandReason) -> pb::CommandReason {
    match reason {
        CommandReason::TooCold => pb::CommandReason::TooCold,
        CommandReason::TooHot => pb::CommandReason::TooHot,
        CommandReason::SetpointDeleted => pb::CommandReason::SetpointDeleted,
        CommandReason::SensorStale => pb::CommandReason::SensorStale,
        CommandReason::DeferredTooCold => pb::CommandReason::DeferredTooCold,
        CommandReason::DeferredTooHot => pb::CommandReason::DeferredTooHot,
        CommandReason::MaxRunTime => pb::CommandReason::MaxRunTime,
        CommandReason::OutOfService => pb::CommandReason::OutOfService,
        CommandReason::KeepAlive => pb::CommandReason::KeepAlive,
    }
}

pub fn limit_to_proto(limit: Limit) -> pb::HeaterLimit {
    match limit {
        Limit::MinOnTime => pb::HeaterLimit::MinOnTime,
        Limit::MinOffTime => pb::HeaterLimit::MinOffTime,
        Limit::MaxRunTime => pb::HeaterLimit::MaxRunTime,
        Limit::RunCooldown => pb::HeaterLimit::RunCooldown,
        Limit::KeepAlive => pb::HeaterLimit::KeepAlive,
    }
}

/// The event announcing `decision` for `sensor_id`, decided on the setpoint of `level`, written
/// at `level_revision`.
pub fn command_event(
    sensor_id: &str,
    decision: &Decision,
    (level, level_revision): (Level, i64),
    decided_at: DateTime<Utc>,
) -> pb::HeaterCommandEvent {
    pb::HeaterCommandEvent {
        sensor_id: sensor_id.to_owned(),
        building_id: decision.building_id.to_string(),
        command: command_to_proto(decision.command).into(),
        reason: reason_to_proto(decision.reason).into(),
        setpoint_revision: decision.setpoint_revision,
        temperature_celsius: decision.reading.map(|r| r.temperature.value()),
        reading_time: decision.reading.map(|r| timestamp(r.time)),
        decided_at: Some(timestamp(decided_at)),
        sequence: decision.sequence,
        snapshot: false,
        setpoint_level: i32::from(level.number()),
        level_revision,
        limit: decision.limit.map_or(0, |l| limit_to_proto(l) as i32),
        switched_at: Some(timestamp(decision.switched_at.unwrap_or(decided_at))),
        trace_parent: String::new(),
    }
}

/// Highest sequence taken from the command topic. A sensor's next command is its last one's
/// sequence plus one, so a record claiming `u64::MAX` (never written by thermostat: one
/// command a nanosecond would take 292 years to reach `i64::MAX`) would make it wrap to 0, and
/// every later command of the sensor would look older than what consumers already have.
pub const MAX_SEQUENCE: u64 = i64::MAX as u64;

/// What the loop needs from a command event read back from the topic; `None` for an event that
/// is not a valid command (never written by thermostat). A reading time the engine cannot
/// store (never written by thermostat either) counts as no reading. The reading counts as
/// received when the command was decided.
pub fn observed_command(
    event: &pb::HeaterCommandEvent,
) -> Option<(SensorId, LastCommand, Option<Reading>)> {
    if event.sequence > MAX_SEQUENCE {
        return None;
    }
    let sensor = SensorId::parse(event.sensor_id.as_str()).ok()?;
    let command = match event.command() {
        pb::HeaterCommand::On => HeaterCommand::On,
        pb::HeaterCommand::Off => HeaterCommand::Off,
        pb::HeaterCommand::Unspecified => return None,
    };
    let to_time = |t: &prost_types::Timestamp| {
        DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?).filter(|t| storable(*t))
    };
    let reading = event.reading_time.as_ref().and_then(|t| {
        let time = to_time(t)?;
        Some(Reading {
            temperature: Celsius::new(event.temperature_celsius?)?,
            time,
            received: event.decided_at.as_ref().and_then(to_time).unwrap_or(time),
        })
    });
    Some((
        sensor,
        LastCommand {
            command,
            sequence: event.sequence,
        },
        reading,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const AHEAD: TimeDelta = TimeDelta::seconds(30);

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn heater_reports_decode_from_either_format_and_bad_ones_name_their_reason() {
        let report = |state: pb::HeaterCommand, time: Option<DateTime<Utc>>| {
            pb::HeaterReport {
                sensor_id: "h1".into(),
                state: state.into(),
                report_time: time.map(timestamp),
            }
            .encode_to_vec()
        };
        let decode = |format, key: Option<&str>, payload: &[u8]| {
            decode_report(
                format,
                AHEAD,
                key.map(str::as_bytes),
                payload,
                Some(now()),
                now(),
            )
        };
        let (id, r) = decode(
            SensorFormat::Protobuf,
            Some("h1"),
            &report(pb::HeaterCommand::On, None),
        )
        .unwrap();
        assert_eq!(
            (id.as_str(), r.state, r.at),
            ("h1", HeaterCommand::On, now())
        );
        let json = br#"{"sensor_id": "h1", "state": "OFF", "report_time": "2027-01-15T08:00:00Z"}"#;
        let (_, r) = decode(SensorFormat::Json, Some("h1"), json).unwrap();
        assert_eq!(r.state, HeaterCommand::Off);
        let reason = |format, key, payload: &[u8]| decode(format, key, payload).unwrap_err().code();
        assert_eq!(
            reason(
                SensorFormat::Protobuf,
                Some("h1"),
                &report(pb::HeaterCommand::Unspecified, None)
            ),
            "missing_state"
        );
        assert_eq!(
            reason(
                SensorFormat::Json,
                Some("h1"),
                br#"{"sensor_id": "h1", "state": "DIM"}"#
            ),
            "undecodable"
        );
        assert_eq!(
            reason(
                SensorFormat::Protobuf,
                Some("h2"),
                &report(pb::HeaterCommand::On, None)
            ),
            "key_mismatch"
        );
        assert_eq!(
            reason(
                SensorFormat::Protobuf,
                None,
                &report(pb::HeaterCommand::On, None)
            ),
            "missing_key"
        );
        let ahead = now() + TimeDelta::minutes(5);
        assert_eq!(
            reason(
                SensorFormat::Protobuf,
                Some("h1"),
                &report(pb::HeaterCommand::On, Some(ahead))
            ),
            "future_time"
        );
    }

    fn proto(sensor: &str, t: f64, time: Option<DateTime<Utc>>) -> Vec<u8> {
        proto_without(sensor, Some(t), time)
    }

    fn proto_without(sensor: &str, t: Option<f64>, time: Option<DateTime<Utc>>) -> Vec<u8> {
        pb::SensorReading {
            sensor_id: sensor.into(),
            temperature_celsius: t,
            reading_time: time.map(timestamp),
        }
        .encode_to_vec()
    }

    #[test]
    fn the_plausible_range_includes_its_edges_and_nothing_beyond() {
        let range = CelsiusRange {
            min: -10.0,
            max: 40.0,
        };
        for (celsius, accepted) in [(-10.0, true), (40.0, true), (-10.01, false), (40.01, false)] {
            let decoded = decode_reading(
                SensorFormat::Protobuf,
                range,
                AHEAD,
                Some(b"s1"),
                &proto("s1", celsius, Some(now())),
                None,
                None,
                now(),
            );
            match decoded {
                Ok((_, r)) => {
                    assert!(accepted, "{celsius} was accepted");
                    assert_eq!(r.temperature.value(), celsius);
                }
                Err(e) => {
                    assert!(!accepted, "{celsius} was refused: {e}");
                    assert_eq!(e.to_string(), format!("temperature_celsius {celsius} is outside READING_RANGE_CELSIUS -10..40"));
                }
            }
        }
    }

    #[test]
    fn decodes_protobuf_and_json() {
        let (id, r) = decode_reading(
            SensorFormat::Protobuf,
            CelsiusRange::PLAUSIBLE,
            AHEAD,
            Some(b"s1"),
            &proto("s1", 20.5, Some(now())),
            None,
            None,
            now(),
        )
        .unwrap();
        assert_eq!(
            (id.as_str(), r.temperature.value(), r.time),
            ("s1", 20.5, now())
        );
        // 0 °C is a reading, not a missing one.
        let (_, r) = decode_reading(
            SensorFormat::Protobuf,
            CelsiusRange::PLAUSIBLE,
            AHEAD,
            Some(b"s1"),
            &proto("s1", 0.0, Some(now())),
            None,
            None,
            now(),
        )
        .unwrap();
        assert_eq!(r.temperature.value(), 0.0);
        let json = br#"{"sensor_id":"s1","temperature_celsius":21.5,"reading_time":"2027-01-15T08:00:00Z"}"#;
        let (_, r) = decode_reading(
            SensorFormat::Json,
            CelsiusRange::PLAUSIBLE,
            AHEAD,
            Some(b"s1"),
            json,
            None,
            None,
            now(),
        )
        .unwrap();
        assert_eq!(r.time.to_rfc3339(), "2027-01-15T08:00:00+00:00");
    }

    #[test]
    fn a_reading_from_the_future_is_judged_by_the_later_of_the_broker_and_our_clock() {
        let decode = |time, record_time, appended| {
            decode_reading(
                SensorFormat::Protobuf,
                CelsiusRange::PLAUSIBLE,
                AHEAD,
                Some(b"s1"),
                &proto("s1", 20.0, Some(time)),
                record_time,
                appended,
                now(),
            )
        };
        let ahead = now() + TimeDelta::hours(1);
        // Our clock an hour slow: the broker's stamp says the reading is not early.
        let (_, r) = decode(ahead, Some(ahead), Some(ahead)).unwrap();
        assert_eq!((r.time, r.received), (ahead, now()));
        // A stamp earlier than our clock does not narrow the bound.
        let early = Some(now() - TimeDelta::hours(1));
        assert!(decode(now() + AHEAD, early, early).is_ok());
        // A second more than the tolerance is from the future.
        let beyond = now() + AHEAD + TimeDelta::seconds(1);
        assert_eq!(
            decode(beyond, early, early).unwrap_err().code(),
            "future_time"
        );
        // The producer's own stamp (CreateTime) widens nothing: its clock may be as wrong.
        for appended in [None, Some(now())] {
            let err = decode(ahead, Some(ahead), appended).unwrap_err();
            assert_eq!(err.code(), "future_time");
        }
        // A broker stamp at the end of time is no overflow.
        assert!(decode(ahead, None, Some(DateTime::<Utc>::MAX_UTC)).is_ok());
    }

    #[test]
    fn a_reading_without_a_key_is_refused() {
        let payload = proto("s1", 20.0, Some(now()));
        let decode = |key| {
            decode_reading(
                SensorFormat::Protobuf,
                CelsiusRange::PLAUSIBLE,
                AHEAD,
                key,
                &payload,
                None,
                None,
                now(),
            )
        };
        assert_eq!(decode(None).unwrap_err().code(), "missing_key");
        assert_eq!(decode(Some(b"s2")).unwrap_err().code(), "key_mismatch");
        assert!(decode(Some(b"s1")).is_ok());
    }

    #[test]
    fn falls_back_to_the_record_timestamp() {
        let (_, r) = decode_reading(
            SensorFormat::Protobuf,
            CelsiusRange::PLAUSIBLE,
            AHEAD,
            Some(b"s1"),
            &proto("s1", 20.0, None),
            Some(now()),
            None,
            now(),
        )
        .unwrap();
        assert_eq!(r.time, now());
        let err = decode_reading(
            SensorFormat::Protobuf,
            CelsiusRange::PLAUSIBLE,
            AHEAD,
            Some(b"s1"),
            &proto("s1", 20.0, None),
            None,
            None,
            now(),
        );
        assert_eq!(err.unwrap_err(), DeadLetter::MissingTime);
    }

    #[test]
    fn every_kind_of_bad_record_has_its_reason() {
        let t = Some(now());
        type Case<'a> = (SensorFormat, Option<&'a [u8]>, Vec<u8>, &'a str);
        let cases: Vec<Case<'_>> = vec![
            (
                SensorFormat::Protobuf,
                None,
                vec![0xff, 0xff, 0xff],
                "undecodable",
            ),
            (
                SensorFormat::Json,
                None,
                b"{not json".to_vec(),
                "undecodable",
            ),
            (
                SensorFormat::Json,
                None,
                br#"{"sensor_id":"s","temperature_celsius":"hot"}"#.to_vec(),
                "undecodable",
            ),
            (
                SensorFormat::Json,
                None,
                br#"{"sensor_id":"s","temperature_celsius":1,"reading_time":"yesterday"}"#.to_vec(),
                "undecodable",
            ),
            (
                SensorFormat::Protobuf,
                None,
                proto("bad id", 20.0, t),
                "invalid_sensor_id",
            ),
            (
                SensorFormat::Protobuf,
                None,
                proto("", 20.0, t),
                "invalid_sensor_id",
            ),
            (
                SensorFormat::Protobuf,
                Some(b"other"),
                proto("s1", 20.0, t),
                "key_mismatch",
            ),
            (
                SensorFormat::Protobuf,
                None,
                proto("s1", f64::NAN, t),
                "non_finite_temperature",
            ),
            (
                SensorFormat::Protobuf,
                None,
                proto("s1", -127.0, t),
                "implausible_temperature",
            ),
            (
                SensorFormat::Json,
                None,
                br#"{"sensor_id":"s1","temperature_celsius":327.67,"reading_time":"2027-01-15T08:00:00Z"}"#.to_vec(),
                "implausible_temperature",
            ),
            (
                SensorFormat::Protobuf,
                None,
                proto("s1", f64::INFINITY, t),
                "non_finite_temperature",
            ),
            (
                SensorFormat::Protobuf,
                None,
                proto_without("s1", None, t),
                "missing_temperature",
            ),
            (
                SensorFormat::Json,
                None,
                br#"{"sensor_id":"s1","reading_time":"2027-01-15T08:00:00Z"}"#.to_vec(),
                "missing_temperature",
            ),
            (
                SensorFormat::Protobuf,
                None,
                proto("s1", 20.0, Some(now() + TimeDelta::hours(1))),
                "future_time",
            ),
            (
                SensorFormat::Protobuf,
                None,
                proto("s1", 20.0, DateTime::from_timestamp(-10_000_000_000, 0)),
                "undecodable",
            ),
        ];
        for (format, key, payload, code) in cases {
            let err = decode_reading(
                format,
                CelsiusRange::PLAUSIBLE,
                AHEAD,
                key.or(Some(b"s1")),
                &payload,
                None,
                None,
                now(),
            )
            .unwrap_err();
            assert_eq!(err.code(), code, "{err}");
        }
    }

    #[test]
    fn command_events_round_trip_to_observations() {
        let decision = Decision {
            command: HeaterCommand::On,
            reason: CommandReason::TooCold,
            sequence: 4,
            building_id: crate::domain::BuildingId::parse("b").unwrap(),
            setpoint_revision: 2,
            reading: Some(Reading {
                temperature: Celsius::new(17.0).unwrap(),
                time: now() - TimeDelta::minutes(6),
                received: now(),
            }),
            limit: Some(Limit::MinOffTime),
            switched_at: None,
        };
        let sensor = SensorId::parse("s1").unwrap();
        // Decided when received: read back, the reading counts as received then.
        let event = command_event(sensor.as_str(), &decision, (Level::Default, 2), now());
        assert_eq!(event.command(), pb::HeaterCommand::On);
        assert_eq!(event.reason(), pb::CommandReason::TooCold);
        assert_eq!(event.limit(), pb::HeaterLimit::MinOffTime);
        assert_eq!(
            event.switched_at, event.decided_at,
            "a switch: switched when decided"
        );
        let (id, last, reading) = observed_command(&event).unwrap();
        assert_eq!(
            (id, last.command, last.sequence),
            (sensor, HeaterCommand::On, 4)
        );
        assert_eq!(reading, decision.reading);

        // A sequence the next command could not follow is not a command of ours.
        let at = |sequence| {
            observed_command(&pb::HeaterCommandEvent {
                sequence,
                ..event.clone()
            })
        };
        assert_eq!(
            at(MAX_SEQUENCE).map(|(_, last, _)| last.sequence),
            Some(MAX_SEQUENCE)
        );
        assert!(at(MAX_SEQUENCE + 1).is_none());
        assert!(at(u64::MAX).is_none());
    }
}
