//! Weekly schedules with date exceptions, in a building's IANA time zone, and presets: what the
//! SCHEDULE level of a sensor holds at any instant, and when it next changes. Pure: every
//! function takes the instant it is asked about (tests inject it; the service asks the database).

use std::collections::HashMap;

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;

use super::levels::LevelValues;
use super::ValidationError;

/// Minutes in a day: a period may end at 24:00.
pub const DAY_MINUTES: u16 = 24 * 60;
/// At most this many periods in one day.
pub const MAX_PERIODS_PER_DAY: usize = 48;
/// At most this many date exceptions in one schedule.
pub const MAX_EXCEPTIONS: usize = 200;
/// An exception covers at most this many days.
pub const MAX_EXCEPTION_DAYS: i64 = 366;
/// How far ahead a next change is looked for (past it, "none").
pub const LOOKAHEAD: TimeDelta = TimeDelta::days(400);

/// A name within a building: a preset's (`comfort`, `eco`, `away`, …) or a schedule's; 1 to 64
/// of `a-z0-9_-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LocalName(String);

impl LocalName {
    pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
        let ok = (1..=64).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(ValidationError::new(
                field,
                "must be 1 to 64 characters of a-z, 0-9, _ and -",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a period holds the room at: a preset of the building, or values of its own.
#[derive(Debug, Clone, PartialEq)]
pub enum PeriodValue {
    Preset(LocalName),
    Values(LevelValues),
}

impl PeriodValue {
    /// The values it stands for, given the building's presets; `None` for a preset that is gone.
    pub fn resolve(&self, presets: &HashMap<LocalName, LevelValues>) -> Option<LevelValues> {
        match self {
            PeriodValue::Preset(name) => presets.get(name).copied(),
            PeriodValue::Values(values) => Some(*values),
        }
    }

    /// How history and logs name it.
    pub fn describe(&self) -> String {
        match self {
            PeriodValue::Preset(name) => format!("preset {}", name.as_str()),
            PeriodValue::Values(v) => format!(
                "{} °C (+{}/-{})",
                v.desired.value(),
                v.up_delta.value(),
                v.down_delta.value()
            ),
        }
    }
}

/// From `start` to `end` (minutes after local midnight, end exclusive) of a day.
#[derive(Debug, Clone, PartialEq)]
pub struct Period {
    pub start: u16,
    pub end: u16,
    pub value: PeriodValue,
}

impl Period {
    /// From "HH:MM" to "HH:MM" ("24:00" as an end); errors name the API's fields.
    pub fn parse(start: &str, end: &str, value: PeriodValue) -> Result<Self, ValidationError> {
        let start = parse_clock("start_time", start, false)?;
        let end = parse_clock("end_time", end, true)?;
        if end <= start {
            return Err(ValidationError::new("end_time", "must be after start_time"));
        }
        Ok(Self { start, end, value })
    }
}

/// "HH:MM" as minutes after midnight; "24:00" only when `end`.
pub fn parse_clock(field: &str, value: &str, end: bool) -> Result<u16, ValidationError> {
    let invalid = || ValidationError::new(field, "must be a time of day as HH:MM, 00:00 to 24:00");
    let (h, m) = value.split_once(':').ok_or_else(invalid)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(invalid());
    }
    let h: u16 = h.parse().map_err(|_| invalid())?;
    let m: u16 = m.parse().map_err(|_| invalid())?;
    let minutes = h * 60 + m;
    if m >= 60 || minutes > DAY_MINUTES || (minutes == DAY_MINUTES && !end) {
        return Err(invalid());
    }
    Ok(minutes)
}

/// Minutes after midnight as "HH:MM".
pub fn format_clock(minutes: u16) -> String {
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// Dates `first` to `last` (inclusive, local) that follow their own periods instead of the
/// week's: a holiday, a special event. No periods: the schedule holds nothing those days.
#[derive(Debug, Clone, PartialEq)]
pub struct DateException {
    pub first: NaiveDate,
    pub last: NaiveDate,
    pub description: String,
    pub periods: Vec<Period>,
}

/// A building's weekly schedule: periods per weekday (Monday first) and date exceptions, in
/// its time zone.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub zone: Tz,
    pub week: [Vec<Period>; 7],
    pub exceptions: Vec<DateException>,
}

/// A change of what a schedule holds: from `at` on, `value` (`None`: nothing).
#[derive(Debug, Clone, PartialEq)]
pub struct Change<'a> {
    pub at: DateTime<Utc>,
    pub value: Option<&'a PeriodValue>,
}

/// An IANA time zone name, as `Europe/Berlin`.
pub fn parse_zone(value: &str) -> Result<Tz, ValidationError> {
    value.parse::<Tz>().map_err(|_| {
        ValidationError::new(
            "time_zone",
            "must be an IANA time zone name, such as Europe/Berlin",
        )
    })
}

impl Schedule {
    /// Checks what a builder cannot: each day's periods in order without overlap, exceptions
    /// in order without overlap, and the limits. The errors name the field.
    pub fn new(
        zone: Tz,
        week: [Vec<Period>; 7],
        exceptions: Vec<DateException>,
    ) -> Result<Self, ValidationError> {
        const DAYS: [&str; 7] = [
            "Monday",
            "Tuesday",
            "Wednesday",
            "Thursday",
            "Friday",
            "Saturday",
            "Sunday",
        ];
        for (day, periods) in week.iter().enumerate() {
            check_periods(periods).map_err(|message| {
                ValidationError::new("weekly", format!("{}: {message}", DAYS[day]))
            })?;
        }
        if exceptions.len() > MAX_EXCEPTIONS {
            return Err(ValidationError::new(
                "exceptions",
                format!("at most {MAX_EXCEPTIONS}"),
            ));
        }
        for (i, exception) in exceptions.iter().enumerate() {
            let field = format!("exceptions[{i}]");
            if exception.last < exception.first {
                return Err(ValidationError::new(
                    format!("{field}.end_date"),
                    "must not be before start_date",
                ));
            }
            if (exception.last - exception.first).num_days() >= MAX_EXCEPTION_DAYS {
                return Err(ValidationError::new(
                    format!("{field}.end_date"),
                    format!("an exception covers at most {MAX_EXCEPTION_DAYS} days"),
                ));
            }
            if exception.description.chars().count() > 256 {
                return Err(ValidationError::new(
                    format!("{field}.description"),
                    "must be at most 256 characters",
                ));
            }
            check_periods(&exception.periods)
                .map_err(|message| ValidationError::new(format!("{field}.periods"), message))?;
            if i > 0 && exceptions[i - 1].last >= exception.first {
                return Err(ValidationError::new(
                    format!("{field}.start_date"),
                    "exceptions must be in date order and not overlap",
                ));
            }
        }
        Ok(Self {
            zone,
            week,
            exceptions,
        })
    }

    /// Every preset the schedule names.
    pub fn presets(&self) -> impl Iterator<Item = &LocalName> {
        self.week
            .iter()
            .flatten()
            .chain(self.exceptions.iter().flat_map(|e| &e.periods))
            .filter_map(|p| match &p.value {
                PeriodValue::Preset(name) => Some(name),
                PeriodValue::Values(_) => None,
            })
    }

    /// The periods of a local date: its exception's if one covers it, else its weekday's.
    pub fn periods_on(&self, date: NaiveDate) -> &[Period] {
        match self
            .exceptions
            .iter()
            .find(|e| e.first <= date && date <= e.last)
        {
            Some(exception) => &exception.periods,
            None => &self.week[date.weekday().num_days_from_monday() as usize],
        }
    }

    /// What the schedule holds at `at`.
    pub fn value_at(&self, at: DateTime<Utc>) -> Option<&PeriodValue> {
        let date = self.local_date(at);
        self.changes_between(date - TimeDelta::days(1), date + TimeDelta::days(1))
            .into_iter()
            .take_while(|c| c.at <= at)
            .last()
            .and_then(|c| c.value)
    }

    /// What it holds at `from`, then every change before `until`, in order; a change always
    /// holds something other than the one before it.
    pub fn changes(&self, from: DateTime<Utc>, until: DateTime<Utc>) -> Vec<Change<'_>> {
        let mut out = vec![Change {
            at: from,
            value: self.value_at(from),
        }];
        let (first, last) = (self.local_date(from), self.local_date(until));
        for change in self.changes_between(first, last + TimeDelta::days(1)) {
            if change.at > from && change.at < until && out.last().unwrap().value != change.value {
                out.push(change);
            }
        }
        out
    }

    /// The first change after `at`, within [`LOOKAHEAD`].
    pub fn next_change(&self, at: DateTime<Utc>) -> Option<Change<'_>> {
        let now = self.value_at(at);
        let mut from = at;
        // A week at a time: the week repeats, only exceptions can push a change further.
        while from < at + LOOKAHEAD {
            let until = (from + TimeDelta::days(8)).min(at + LOOKAHEAD);
            if let Some(change) = self
                .changes(from, until)
                .into_iter()
                .find(|c| c.at > at && c.value != now)
            {
                return Some(change);
            }
            from = until;
        }
        None
    }

    fn local_date(&self, at: DateTime<Utc>) -> NaiveDate {
        at.with_timezone(&self.zone).date_naive()
    }

    /// The step function of the local dates `first..=last` plus the day before: each period's
    /// start holds its value, each end nothing unless a period starts there.
    fn changes_between(&self, first: NaiveDate, last: NaiveDate) -> Vec<Change<'_>> {
        let mut steps: Vec<Change<'_>> = Vec::new();
        let mut date = first - TimeDelta::days(1);
        while date <= last {
            for period in self.periods_on(date) {
                let start = instant(self.zone, date, period.start);
                let end = instant(self.zone, date, period.end);
                if start >= end {
                    continue; // wholly inside a skipped hour
                }
                match steps.last_mut() {
                    Some(prev) if prev.at == start => prev.value = Some(&period.value),
                    _ => steps.push(Change {
                        at: start,
                        value: Some(&period.value),
                    }),
                }
                steps.push(Change {
                    at: end,
                    value: None,
                });
            }
            date += TimeDelta::days(1);
        }
        steps
    }
}

/// The instant a local time of day begins: the earliest instant at which the building's clock
/// shows it or later. A time skipped when clocks go forward begins when they jump; a time that
/// occurs twice when they go back begins at its first occurrence.
pub fn instant(zone: Tz, date: NaiveDate, minutes: u16) -> DateTime<Utc> {
    let local: NaiveDateTime =
        date.and_time(NaiveTime::MIN) + TimeDelta::minutes(i64::from(minutes));
    if let Some(at) = zone.from_local_datetime(&local).earliest() {
        return at.with_timezone(&Utc);
    }
    // In a gap: the first local minute after it is the instant of the jump. Gaps are at most a
    // day long (Samoa skipped 2011-12-30).
    let mut probe = local;
    for _ in 0..(2 * usize::from(DAY_MINUTES)) {
        probe += TimeDelta::minutes(1);
        if let Some(at) = zone.from_local_datetime(&probe).earliest() {
            return at.with_timezone(&Utc);
        }
    }
    Utc.from_utc_datetime(&local)
}

/// A day's periods in order, without overlap; the error says which.
fn check_periods(periods: &[Period]) -> Result<(), String> {
    if periods.len() > MAX_PERIODS_PER_DAY {
        return Err(format!("at most {MAX_PERIODS_PER_DAY} periods a day"));
    }
    for pair in periods.windows(2) {
        if pair[1].start < pair[0].end {
            return Err(format!(
                "periods {}-{} and {}-{} overlap (or are out of order)",
                format_clock(pair[0].start),
                format_clock(pair[0].end),
                format_clock(pair[1].start),
                format_clock(pair[1].end)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Timelike;
    use proptest::prelude::*;

    fn values(desired: f64) -> PeriodValue {
        PeriodValue::Values(LevelValues::new(desired, 0.5, 0.5).unwrap())
    }

    fn preset(name: &str) -> PeriodValue {
        PeriodValue::Preset(LocalName::parse("preset", name).unwrap())
    }

    fn period(start: &str, end: &str, value: PeriodValue) -> Period {
        Period::parse(start, end, value).unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn every_day(periods: Vec<Period>) -> [Vec<Period>; 7] {
        std::array::from_fn(|_| periods.clone())
    }

    fn office(zone: Tz) -> Schedule {
        let weekday = vec![
            period("07:00", "18:00", preset("comfort")),
            period("18:00", "22:00", preset("eco")),
        ];
        let mut week: [Vec<Period>; 7] = std::array::from_fn(|_| weekday.clone());
        week[5] = vec![];
        week[6] = vec![];
        Schedule::new(zone, week, vec![]).unwrap()
    }

    #[test]
    fn clock_times_parse_with_24_00_only_as_an_end() {
        assert_eq!(parse_clock("start", "07:30", false), Ok(450));
        assert_eq!(parse_clock("end", "24:00", true), Ok(1440));
        for bad in ["24:00", "7:30", "07:60", "25:00", "0730", "ab:cd", ""] {
            assert!(parse_clock("start", bad, false).is_err(), "{bad}");
        }
        assert!(Period::parse("08:00", "08:00", values(20.0)).is_err());
        assert_eq!(format_clock(1440), "24:00");
    }

    #[test]
    fn overlapping_periods_and_exceptions_are_refused_with_their_field() {
        let mut week: [Vec<Period>; 7] = Default::default();
        week[2] = vec![
            period("07:00", "12:00", values(20.0)),
            period("11:00", "13:00", values(21.0)),
        ];
        let err = Schedule::new(Tz::UTC, week, vec![]).unwrap_err();
        assert_eq!(err.field, "weekly");
        assert_eq!(
            err.message,
            "Wednesday: periods 07:00-12:00 and 11:00-13:00 overlap (or are out of order)"
        );
        let day = |d: u32| NaiveDate::from_ymd_opt(2026, 12, d).unwrap();
        let exception = |first, last| DateException {
            first,
            last,
            description: String::new(),
            periods: vec![],
        };
        let err = Schedule::new(
            Tz::UTC,
            Default::default(),
            vec![exception(day(24), day(26)), exception(day(26), day(27))],
        )
        .unwrap_err();
        assert_eq!(err.field, "exceptions[1].start_date");
        assert!(
            Schedule::new(Tz::UTC, Default::default(), vec![exception(day(2), day(1))]).is_err()
        );
        assert!(parse_zone("Europe/Berlin").is_ok());
        assert!(parse_zone("Mars/Olympus").is_err());
    }

    #[test]
    fn a_weekday_schedule_holds_its_periods_in_local_time() {
        let schedule = office(chrono_tz::Europe::Berlin);
        // Tuesday 2026-12-08, CET = UTC+1.
        assert_eq!(schedule.value_at(utc("2026-12-08T05:59:59Z")), None);
        assert_eq!(
            schedule.value_at(utc("2026-12-08T06:00:00Z")),
            Some(&preset("comfort"))
        );
        assert_eq!(
            schedule.value_at(utc("2026-12-08T17:00:00Z")),
            Some(&preset("eco"))
        );
        assert_eq!(schedule.value_at(utc("2026-12-08T21:00:00Z")), None);
        // Saturday: nothing.
        assert_eq!(schedule.value_at(utc("2026-12-12T10:00:00Z")), None);
        let next = schedule.next_change(utc("2026-12-11T22:00:00Z")).unwrap();
        assert_eq!(
            next.at,
            utc("2026-12-14T06:00:00Z"),
            "Friday night to Monday 07:00"
        );
        assert_eq!(next.value, Some(&preset("comfort")));
    }

    #[test]
    fn an_exception_replaces_its_dates_and_its_end_is_a_change() {
        let mut schedule = office(chrono_tz::Europe::Berlin);
        schedule.exceptions = vec![DateException {
            first: NaiveDate::from_ymd_opt(2026, 12, 24).unwrap(),
            last: NaiveDate::from_ymd_opt(2026, 12, 26).unwrap(),
            description: "Christmas".into(),
            periods: vec![period("00:00", "24:00", preset("away"))],
        }];
        assert_eq!(
            schedule.value_at(utc("2026-12-24T10:00:00Z")),
            Some(&preset("away"))
        );
        // The three days are one period: the next change is the end of the 26th.
        let next = schedule.next_change(utc("2026-12-24T10:00:00Z")).unwrap();
        assert_eq!(next.at, utc("2026-12-26T23:00:00Z"));
        assert_eq!(next.value, None, "the 27th is a Sunday");
        assert_eq!(
            schedule.value_at(utc("2026-12-23T10:00:00Z")),
            Some(&preset("comfort"))
        );
    }

    #[test]
    fn a_period_that_starts_in_the_skipped_hour_starts_when_the_clocks_jump() {
        // Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST at 01:00Z.
        let zone = chrono_tz::Europe::Berlin;
        let schedule = Schedule::new(
            zone,
            every_day(vec![period("02:30", "04:00", values(21.0))]),
            vec![],
        )
        .unwrap();
        let changes = schedule.changes(utc("2026-03-28T12:00:00Z"), utc("2026-03-29T12:00:00Z"));
        let at: Vec<_> = changes.iter().map(|c| c.at).collect();
        assert_eq!(
            at,
            [
                utc("2026-03-28T12:00:00Z"),
                utc("2026-03-29T01:00:00Z"),
                utc("2026-03-29T02:00:00Z")
            ],
            "from the jump to 04:00 CEST: one hour"
        );
        // A whole day is 23 hours long.
        assert_eq!(
            instant(
                zone,
                NaiveDate::from_ymd_opt(2026, 3, 29).unwrap(),
                DAY_MINUTES
            ) - instant(zone, NaiveDate::from_ymd_opt(2026, 3, 29).unwrap(), 0),
            TimeDelta::hours(23)
        );
    }

    #[test]
    fn a_period_over_the_repeated_hour_lasts_it_twice() {
        // New York, 2026-11-01: 02:00 EDT becomes 01:00 EST at 06:00Z; 01:00-01:59 occur twice.
        let zone = chrono_tz::America::New_York;
        let schedule = Schedule::new(
            zone,
            every_day(vec![period("01:00", "02:00", values(19.0))]),
            vec![],
        )
        .unwrap();
        let changes = schedule.changes(utc("2026-11-01T00:00:00Z"), utc("2026-11-02T00:00:00Z"));
        let at: Vec<_> = changes.iter().map(|c| c.at).collect();
        // 01:00 EDT is 05:00Z; 02:00 (only EST) is 07:00Z.
        assert_eq!(
            at,
            [
                utc("2026-11-01T00:00:00Z"),
                utc("2026-11-01T05:00:00Z"),
                utc("2026-11-01T07:00:00Z")
            ]
        );
        // The second 01:30 (EST, 06:30Z) is inside it.
        assert_eq!(
            schedule.value_at(utc("2026-11-01T06:30:00Z")),
            Some(&values(19.0))
        );
        // A whole day is 25 hours long; spring forward in New York is 23.
        let day = |m, d| NaiveDate::from_ymd_opt(2026, m, d).unwrap();
        assert_eq!(
            instant(zone, day(11, 1), DAY_MINUTES) - instant(zone, day(11, 1), 0),
            TimeDelta::hours(25)
        );
        assert_eq!(
            instant(zone, day(3, 8), DAY_MINUTES) - instant(zone, day(3, 8), 0),
            TimeDelta::hours(23)
        );
    }

    #[test]
    fn adjacent_periods_with_one_value_are_one_and_midnight_joins_days() {
        let schedule = Schedule::new(
            Tz::UTC,
            every_day(vec![
                period("00:00", "06:00", values(18.0)),
                period("06:00", "08:00", values(18.0)),
                period("22:00", "24:00", values(18.0)),
            ]),
            vec![],
        )
        .unwrap();
        let next = schedule.next_change(utc("2026-12-08T23:00:00Z")).unwrap();
        assert_eq!(next.at, utc("2026-12-09T08:00:00Z"));
        assert_eq!(next.value, None);
    }

    #[test]
    fn a_schedule_without_periods_never_changes_and_a_far_exception_is_found() {
        let empty = Schedule::new(Tz::UTC, Default::default(), vec![]).unwrap();
        assert_eq!(empty.next_change(utc("2026-12-08T00:00:00Z")), None);
        let far = Schedule::new(
            Tz::UTC,
            Default::default(),
            vec![DateException {
                first: NaiveDate::from_ymd_opt(2027, 6, 1).unwrap(),
                last: NaiveDate::from_ymd_opt(2027, 6, 1).unwrap(),
                description: String::new(),
                periods: vec![period("09:00", "10:00", values(22.0))],
            }],
        )
        .unwrap();
        let next = far.next_change(utc("2026-12-08T00:00:00Z")).unwrap();
        assert_eq!(next.at, utc("2027-06-01T09:00:00Z"));
    }

    /// Zones with daylight saving time both ways (Lord Howe moves by 30 minutes), and without.
    const ZONES: [Tz; 5] = [
        chrono_tz::Europe::Berlin,
        chrono_tz::America::New_York,
        chrono_tz::Australia::Lord_Howe,
        chrono_tz::America::Santiago,
        Tz::UTC,
    ];

    fn arb_period_list() -> impl Strategy<Value = Vec<Period>> {
        proptest::collection::btree_set(0u16..=48, 0..8).prop_flat_map(|marks| {
            let marks: Vec<u16> = marks.into_iter().map(|m| m * 30).collect();
            let n = marks.len() / 2;
            proptest::collection::vec(0u8..3, n).prop_map(move |kinds| {
                marks
                    .chunks_exact(2)
                    .zip(kinds)
                    .map(|(pair, kind)| Period {
                        start: pair[0],
                        end: pair[1],
                        value: match kind {
                            0 => preset("comfort"),
                            1 => preset("eco"),
                            _ => values(17.0),
                        },
                    })
                    .collect()
            })
        })
    }

    fn arb_schedule() -> impl Strategy<Value = Schedule> {
        (
            0..ZONES.len(),
            proptest::array::uniform7(arb_period_list()),
            proptest::option::of((0i64..400, 0i64..5, arb_period_list())),
        )
            .prop_map(|(zone, week, exception)| {
                let exceptions = exception
                    .map(|(offset, len, periods)| {
                        let first =
                            NaiveDate::from_ymd_opt(2026, 1, 1).unwrap() + TimeDelta::days(offset);
                        vec![DateException {
                            first,
                            last: first + TimeDelta::days(len),
                            description: String::new(),
                            periods,
                        }]
                    })
                    .unwrap_or_default();
                Schedule::new(ZONES[zone], week, exceptions).unwrap()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The next change says what the schedule holds from then on, nothing changes before
        /// it, and every instant's value is the one of a period that covers its local time.
        #[test]
        fn the_next_change_is_the_first_instant_the_value_differs(
            schedule in arb_schedule(),
            // 2026 through 2027: both DST transitions of every zone, twice.
            seconds in 1_767_225_600i64..1_830_297_600,
            probes in proptest::collection::vec(0.0f64..1.0, 8),
        ) {
            let at = DateTime::from_timestamp(seconds, 0).unwrap();
            let now = schedule.value_at(at);
            match schedule.next_change(at) {
                Some(next) => {
                    prop_assert!(next.at > at);
                    prop_assert_ne!(next.value, now);
                    prop_assert_eq!(schedule.value_at(next.at), next.value);
                    let span = (next.at - at).num_seconds();
                    for p in probes {
                        let between = at + TimeDelta::seconds((span as f64 * p) as i64);
                        if between < next.at {
                            prop_assert_eq!(schedule.value_at(between), now);
                        }
                    }
                }
                None => {
                    for p in probes {
                        let later = at + TimeDelta::seconds((p * 30.0 * 86_400.0) as i64);
                        prop_assert_eq!(schedule.value_at(later), now);
                    }
                }
            }
            // An instant outside any clock gap has a local time; the value is the period of
            // its date covering it, when that local time occurs once.
            let local = at.with_timezone(&schedule.zone).naive_local();
            let single = schedule.zone.from_local_datetime(&local).single().is_some();
            if single {
                let minute = (local.time().num_seconds_from_midnight() / 60) as u16;
                let covering = schedule
                    .periods_on(local.date())
                    .iter()
                    .find(|p| p.start <= minute && minute < p.end)
                    .map(|p| &p.value);
                // A period starting in a gap starts at the jump; one ending in it ends there.
                let near_gap = schedule.zone.from_local_datetime(
                    &(local - TimeDelta::hours(2))).single().is_none()
                    || schedule.zone.from_local_datetime(&(local - TimeDelta::hours(1))).single().is_none();
                if !near_gap {
                    prop_assert_eq!(now, covering);
                }
            }
        }
    }
}
