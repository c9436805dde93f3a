//! What a run writes above the DEFAULT level at its start (presets, the whole-building schedule,
//! one room's OVERRIDE), and the kinds a change of a room's deciding level is told apart by (a
//! schedule's transition, an override's expiry or its early end), with their log and check.

use chrono::{DateTime, Datelike, NaiveDateTime, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;

use super::{authorized, own_values, BuildingConfig, Room, SimError, Summary};
use thermostat::domain::levels::Level;
use thermostat::domain::schedule::{format_clock, parse_zone, DAY_MINUTES};
use thermostat::proto::timestamp;
use thermostat::proto::v1 as pb;

/// What a change of a room's effective setpoint was, as the simulator saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The SCHEDULE level began, ended or changed its values.
    ScheduleTransition,
    /// The OVERRIDE level ended at or after its expiry time.
    OverrideExpired,
    /// The OVERRIDE level ended before its expiry: relinquished or deleted.
    OverrideEnded,
    /// Anything else: a DEFAULT change, a new OVERRIDE or SAFETY.
    Changed,
}

/// A change of a room's effective setpoint (its band or the level that decides), observed when
/// the simulator read the room's priority array.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LevelChange {
    /// Index into [`Summary::rooms`].
    pub room: usize,
    pub simulated_minutes: f64,
    /// The wall clock when it was observed.
    pub observed_at: DateTime<Utc>,
    pub kind: ChangeKind,
    pub from: pb::SetpointLevel,
    pub to: pb::SetpointLevel,
    /// The band from then on.
    pub band: (f64, f64),
}

/// What the run wrote above the DEFAULT level at its start, by the wall clock.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The schedule's transitions as planned: `comfort` from, `eco` from, nothing from.
    pub schedule: Option<[DateTime<Utc>; 3]>,
    /// The overridden room (index into [`Summary::rooms`]) and when its override expires.
    pub overridden: Option<(usize, DateTime<Utc>)>,
}

impl BuildingConfig {
    /// Whether the run writes the presets and the schedule (with SIM_API_ADDR).
    pub fn schedules(&self) -> bool {
        !self.schedule_period.is_zero()
    }

    /// The room the run overrides, if it does (with SIM_API_ADDR): room 02, as room 00 is the
    /// one `SIM_CHANGE_AFTER` changes and room 01 the one the demo's examples change.
    pub fn overridden_room(&self) -> Option<usize> {
        (!self.override_for.is_zero() && self.rooms > 0)
            .then(|| OVERRIDDEN_ROOM.min(self.rooms - 1))
    }

    /// The schedule's transitions for a run started at `now`: `comfort` from the first whole
    /// minute after `SIM_SCHEDULE_AFTER`, `eco` one period later, nothing one more period later.
    pub fn schedule_times(&self, now: DateTime<Utc>) -> Option<[DateTime<Utc>; 3]> {
        let period =
            TimeDelta::minutes(self.schedule_period.as_nanos().div_ceil(60_000_000_000) as i64);
        if period.is_zero() {
            return None;
        }
        let after = now + TimeDelta::from_std(self.schedule_after).ok()?;
        let minute = DateTime::from_timestamp(after.timestamp().div_euclid(60) * 60, 0)?;
        let comfort = minute + TimeDelta::minutes(1);
        Some([comfort, comfort + period, comfort + period * 2])
    }
}

/// The schedule the simulator writes for its building (the whole building).
pub const SCHEDULE_ID: &str = "demo";
/// The presets it writes: `comfort` above SIM_DESIRED_CELSIUS, `eco` below it.
pub const COMFORT: &str = "comfort";
pub const ECO: &str = "eco";
const COMFORT_ABOVE: f64 = 1.0;
const ECO_BELOW: f64 = 3.0;
/// The override is this far above SIM_DESIRED_CELSIUS: apart from every other band of a run.
const OVERRIDE_ABOVE: f64 = 3.0;
const OVERRIDDEN_ROOM: usize = 2;

/// A level's name without its prefix, as logs and the plot show it.
pub fn level_name(level: pb::SetpointLevel) -> &'static str {
    Level::from_number(level as i32).map_or("none", Level::name)
}

/// The weekly periods that hold `windows` (from, until, preset) in `zone`: split at local
/// midnight, on the weekday of their local date. Each day's periods come in order and without
/// overlap: a window across the hour that clocks repeat in autumn could overlap itself (or end
/// before it starts), and is then left out rather than refused by the service.
pub fn local_periods(
    zone: Tz,
    windows: &[(DateTime<Utc>, DateTime<Utc>, &str)],
) -> Vec<pb::SchedulePeriod> {
    let minutes = |t: NaiveDateTime| (t.hour() * 60 + t.minute()) as u16;
    let mut days: std::collections::BTreeMap<chrono::NaiveDate, Vec<(u16, u16, &str)>> =
        Default::default();
    for &(from, until, preset) in windows {
        let (from, until) = (
            from.with_timezone(&zone).naive_local(),
            until.with_timezone(&zone).naive_local(),
        );
        let mut date = from.date();
        while date <= until.date() {
            let start = if date == from.date() {
                minutes(from)
            } else {
                0
            };
            let end = if date == until.date() {
                minutes(until)
            } else {
                DAY_MINUTES
            };
            if start < end {
                days.entry(date).or_default().push((start, end, preset));
            }
            let Some(next) = date.succ_opt() else { break };
            date = next;
        }
    }
    let mut periods = Vec::new();
    for (date, mut day) in days {
        day.sort_by_key(|&(start, end, _)| (start, end));
        let mut end_of_last = 0;
        for (start, end, preset) in day {
            if start < end_of_last {
                continue;
            }
            end_of_last = end;
            periods.push(pb::SchedulePeriod {
                days: vec![date.weekday().number_from_monday() as i32],
                start_time: format_clock(start),
                end_time: format_clock(end),
                value: Some(pb::schedule_period::Value::Preset(preset.to_owned())),
            });
        }
    }
    periods
}

/// The presets and the whole-building schedule (see [`BuildingConfig::schedule_times`]); the
/// planned transitions, if any.
pub(super) async fn write_schedule(
    config: &BuildingConfig,
    schedules: &mut pb::schedule_service_client::ScheduleServiceClient<tonic::transport::Channel>,
    now: DateTime<Utc>,
) -> Result<Option<[DateTime<Utc>; 3]>, SimError> {
    let Some(times) = config.schedule_times(now) else {
        return Ok(None);
    };
    let zone = parse_zone(&config.schedule_zone)
        .map_err(|_| SimError::Invalid("SIM_SCHEDULE_ZONE".into()))?;
    for (name, desired) in [
        (COMFORT, config.desired_celsius + COMFORT_ABOVE),
        (ECO, config.desired_celsius - ECO_BELOW),
    ] {
        let preset = pb::Preset {
            building_id: config.building_id.clone(),
            name: name.into(),
            values: Some(own_values(config, desired)),
            reason: "simulated building".into(),
            ..Default::default()
        };
        let request = pb::PutPresetRequest {
            preset: Some(preset),
            expected_revision: None,
        };
        schedules.put_preset(authorized(config, request)?).await?;
    }
    let [comfort, eco, end] = times;
    let schedule = pb::Schedule {
        building_id: config.building_id.clone(),
        schedule_id: SCHEDULE_ID.into(),
        time_zone: config.schedule_zone.clone(),
        weekly: local_periods(zone, &[(comfort, eco, COMFORT), (eco, end, ECO)]),
        reason: "simulated building: comfort, then eco, soon after the start".into(),
        ..Default::default()
    };
    let request = pb::PutScheduleRequest {
        schedule: Some(schedule),
        expected_revision: None,
    };
    schedules.put_schedule(authorized(config, request)?).await?;
    let clock = |t: DateTime<Utc>| t.with_timezone(&zone).format("%H:%M").to_string();
    tracing::info!(
        schedule = SCHEDULE_ID,
        zone = %zone,
        comfort_from = %clock(comfort),
        eco_from = %clock(eco),
        until = %clock(end),
        "schedule written: the whole building holds comfort, then eco, then its DEFAULT again"
    );
    Ok(Some(times))
}

/// The OVERRIDE of [`BuildingConfig::overridden_room`], expiring `SIM_OVERRIDE_FOR` from now;
/// that room and when it expires, if there is one.
pub(super) async fn write_override(
    config: &BuildingConfig,
    api: &mut pb::setpoint_service_client::SetpointServiceClient<tonic::transport::Channel>,
) -> Result<Option<(usize, DateTime<Utc>)>, SimError> {
    let Some(room) = config.overridden_room() else {
        return Ok(None);
    };
    let until = Utc::now()
        + TimeDelta::from_std(config.override_for)
            .map_err(|_| SimError::Invalid("SIM_OVERRIDE_FOR".into()))?;
    let values = own_values(config, config.desired_celsius + OVERRIDE_ABOVE);
    let request = pb::WriteSetpointLevelRequest {
        sensor_id: config.sensor(room),
        level: pb::SetpointLevel::Override.into(),
        desired_celsius: values.desired_celsius,
        up_delta_celsius: values.up_delta_celsius,
        down_delta_celsius: values.down_delta_celsius,
        expire_time: Some(timestamp(until)),
        reason: "simulated building: held warmer for a while".into(),
        ..Default::default()
    };
    let request = authorized(config, request)?;
    api.write_setpoint_level(request).await?;
    tracing::info!(
        sensor = %config.sensor(room),
        desired = values.desired_celsius,
        until = %until.format("%H:%M:%S UTC"),
        "override written: it expires by itself"
    );
    Ok(Some((room, until)))
}

/// Warns when what the run planned to happen by now was not seen: the service did not apply
/// it, or the simulator could not read it.
pub(super) fn check_plan(summary: &Summary, now: DateTime<Utc>) {
    // Time for the service to apply it and for a poll to see it.
    let settled = now - TimeDelta::seconds(5);
    let seen = |kind| summary.level_changes.iter().any(|c| c.kind == kind);
    if let Some([first, ..]) = summary.plan.schedule {
        if first < settled && !seen(ChangeKind::ScheduleTransition) {
            tracing::warn!(at = %first, "the schedule's first transition was not seen");
        }
    }
    if let Some((room, until)) = summary.plan.overridden {
        let ended = summary
            .level_changes
            .iter()
            .any(|c| c.room == room && c.from == pb::SetpointLevel::Override);
        if until < settled && !ended {
            tracing::warn!(sensor = %summary.rooms[room], at = %until, "the override's expiry was not seen");
        }
    }
}

/// One line per kind of change and outcome: a schedule's transition changes every room at
/// once.
pub(super) fn log_changes(rooms: &[Room], changes: &[LevelChange]) {
    let mut groups: Vec<(&LevelChange, Vec<&str>)> = Vec::new();
    for change in changes {
        let sensor = rooms[change.room].sensor.as_str();
        let same = |g: &LevelChange| {
            (g.kind, g.from, g.to, g.band) == (change.kind, change.from, change.to, change.band)
        };
        match groups.iter_mut().find(|(g, _)| same(g)) {
            Some((_, sensors)) => sensors.push(sensor),
            None => groups.push((change, vec![sensor])),
        }
    }
    for (change, sensors) in groups {
        let mut shown = sensors[..sensors.len().min(3)].join(", ");
        if sensors.len() > 3 {
            shown.push_str(", …");
        }
        let what = match change.kind {
            ChangeKind::ScheduleTransition => "schedule transition",
            ChangeKind::OverrideExpired => "override expired",
            ChangeKind::OverrideEnded => "override ended before its expiry",
            ChangeKind::Changed => "effective setpoint changed",
        };
        tracing::info!(
            rooms = sensors.len(),
            sensors = %shown,
            from = %level_name(change.from),
            to = %level_name(change.to),
            band = %format!("{:.1} to {:.1} °C", change.band.0, change.band.1),
            "{what}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{at, building};
    use super::*;

    #[test]
    fn the_schedule_starts_at_a_whole_minute_after_the_delay_and_holds_two_periods() {
        let config = building(&[]).unwrap();
        let [comfort, eco, end] = config.schedule_times(at("2026-03-02T10:00:20.5Z")).unwrap();
        assert_eq!(comfort, at("2026-03-02T10:02:00Z"));
        assert_eq!(eco, at("2026-03-02T10:04:00Z"));
        assert_eq!(end, at("2026-03-02T10:06:00Z"));
        // A period is whole minutes, rounded up; none without one.
        let short = building(&["--schedule-after", "0s", "--schedule-period", "61s"]).unwrap();
        let [comfort, eco, _] = short.schedule_times(at("2026-03-02T10:00:00Z")).unwrap();
        assert_eq!(
            (comfort, eco),
            (at("2026-03-02T10:01:00Z"), at("2026-03-02T10:03:00Z"))
        );
        let off = building(&["--schedule-period", "0s"]).unwrap();
        assert!(!off.schedules() && off.schedule_times(Utc::now()).is_none());
        // The override: room 02, or the last room of a smaller building; none when off.
        assert_eq!(config.overridden_room(), Some(2));
        assert_eq!(
            building(&["--rooms", "2"]).unwrap().overridden_room(),
            Some(1)
        );
        assert_eq!(
            building(&["--override-for", "0s"])
                .unwrap()
                .overridden_room(),
            None
        );
    }

    #[test]
    fn the_schedule_s_periods_hold_what_was_planned_in_its_zone_whenever_the_run_starts() {
        use thermostat::domain::schedule::{LocalName, Period, PeriodValue, Schedule};
        let config = building(&["--schedule-after", "0s", "--schedule-period", "90m"]).unwrap();
        // An ordinary morning, across local midnight, into the spring gap and across the
        // autumn repeat (Europe/Berlin, 2026), and a zone half an hour off UTC.
        for (zone, start) in [
            ("Europe/Berlin", "2026-03-02T08:00:20Z"),
            ("Europe/Berlin", "2026-03-01T22:10:00Z"),
            ("Europe/Berlin", "2026-03-29T00:20:00Z"),
            ("Europe/Berlin", "2026-10-25T00:20:00Z"),
            ("Asia/Kolkata", "2026-03-02T18:00:00Z"),
        ] {
            let zone: Tz = zone.parse().unwrap();
            let times = config.schedule_times(at(start)).unwrap();
            let [comfort, eco, end] = times;
            let periods = local_periods(zone, &[(comfort, eco, COMFORT), (eco, end, ECO)]);
            let mut week: [Vec<Period>; 7] = Default::default();
            for p in &periods {
                let Some(pb::schedule_period::Value::Preset(name)) = &p.value else {
                    panic!("{p:?}");
                };
                let value = PeriodValue::Preset(LocalName::parse("preset", name).unwrap());
                let period = Period::parse(&p.start_time, &p.end_time, value).unwrap();
                week[p.days[0] as usize - 1].push(period);
            }
            let schedule = Schedule::new(zone, week, Vec::new()).expect(start);
            let holds = |t: DateTime<Utc>| match schedule.value_at(t) {
                Some(PeriodValue::Preset(name)) => name.as_str().to_owned(),
                other => format!("{other:?}"),
            };
            let second = TimeDelta::seconds(1);
            if start.starts_with("2026-10-25") {
                // Local times repeat: what the service reads is at least a valid schedule that
                // begins on time.
                assert_eq!(holds(comfort), COMFORT, "{start}");
                continue;
            }
            assert_eq!(holds(comfort - second), "None", "{start}");
            assert_eq!(holds(comfort), COMFORT, "{start}");
            assert_eq!(holds(eco - second), COMFORT, "{start}");
            assert_eq!(holds(eco), ECO, "{start}");
            assert_eq!(holds(end - second), ECO, "{start}");
            assert_eq!(holds(end), "None", "{start}");
        }
    }
}
