//! The control rule and the per-sensor state it needs. Pure: time comes in as an argument.
//!
//! The rule is the reference's (Flink `TemperatureControlProcessor`): above
//! `desired + up_delta` the heater goes OFF, below `desired - down_delta` it goes ON, in between
//! nothing changes, and a command is only emitted when it differs from the last one. On top of
//! that, [`SensorControl`] adds what the reference lacks: stale and reordered readings are
//! ignored, a setpoint change re-evaluates the latest reading, deleting a setpoint releases the
//! heater, and a sensor that goes quiet gets OFF once.

use std::ops::RangeInclusive;

use chrono::{DateTime, TimeDelta, Utc};

use super::levels::LevelValues;
use super::protection::{Gate, LastSent, Limit, Protection, Switched};
use super::{BuildingId, Celsius, Setpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaterCommand {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandReason {
    TooCold,
    TooHot,
    SetpointDeleted,
    SensorStale,
    /// Too cold while the last OFF's minimum off time held: sent when it ended.
    DeferredTooCold,
    /// Too hot while the last ON's minimum on time held: sent when it ended.
    DeferredTooHot,
    /// ON for the maximum run time: OFF for the cooldown.
    MaxRunTime,
    /// Taken out of service while ON: OFF, released.
    OutOfService,
    /// The last command, sent again after the keep-alive interval.
    KeepAlive,
}

/// One measurement of one sensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub temperature: Celsius,
    /// The sensor's own stamp: orders its readings, whatever its clock's error.
    pub time: DateTime<Utc>,
    /// When the service received it, by the service's clock: how fresh it is.
    pub received: DateTime<Utc>,
}

/// The thresholds of a setpoint: all the rule needs, kept per sensor instead of the whole
/// setpoint (whose ids would be a second copy of the map key and the building).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Band {
    /// `desired - down_delta`: below it, ON.
    lower: f64,
    /// `desired + up_delta`: above it, OFF.
    upper: f64,
}

impl Band {
    /// The band of thresholds taken from another band (`lower()`, `upper()`): for storage that
    /// keeps the two numbers apart from the type.
    pub(crate) fn from_thresholds(lower: f64, upper: f64) -> Self {
        Self { lower, upper }
    }

    pub fn lower(self) -> f64 {
        self.lower
    }

    pub fn upper(self) -> f64 {
        self.upper
    }
}

/// Which field of `setpoint` puts its band out of reach of the readings in `accepted` (which
/// alone are not dead-lettered): the band must lie strictly inside for readings to switch the
/// heater both ways. `desired_celsius` if it is outside itself, else the delta reaching past.
pub fn out_of_reach(setpoint: &Setpoint, accepted: &RangeInclusive<f64>) -> Option<&'static str> {
    values_out_of_reach(&setpoint.values(), accepted)
}

/// [`out_of_reach`] for a priority level's values.
pub fn values_out_of_reach(
    values: &LevelValues,
    accepted: &RangeInclusive<f64>,
) -> Option<&'static str> {
    let (min, max) = (*accepted.start(), *accepted.end());
    let desired = values.desired.value();
    let band = Band {
        lower: desired - values.down_delta.value(),
        upper: desired + values.up_delta.value(),
    };
    if !(min < desired && desired < max) {
        Some("desired_celsius")
    } else if band.upper >= max {
        Some("up_delta_celsius")
    } else if band.lower <= min {
        Some("down_delta_celsius")
    } else {
        None
    }
}

impl From<&Setpoint> for Band {
    fn from(setpoint: &Setpoint) -> Self {
        let desired = setpoint.desired().value();
        Self {
            lower: desired - setpoint.down_delta().value(),
            upper: desired + setpoint.up_delta().value(),
        }
    }
}

/// The reference rule alone: what the heater should do for `temperature`, or `None` inside the
/// dead band.
pub fn rule(band: Band, temperature: Celsius) -> Option<(HeaterCommand, CommandReason)> {
    let t = temperature.value();
    if t > band.upper {
        Some((HeaterCommand::Off, CommandReason::TooHot))
    } else if t < band.lower {
        Some((HeaterCommand::On, CommandReason::TooCold))
    } else {
        None
    }
}

/// The last command decided for a sensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastCommand {
    pub command: HeaterCommand,
    /// Grows by one with every command for the sensor.
    pub sequence: u64,
}

/// A command to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub command: HeaterCommand,
    pub reason: CommandReason,
    pub sequence: u64,
    pub building_id: BuildingId,
    pub setpoint_revision: i64,
    /// The reading the decision was made on (the last one seen, for deletion and staleness).
    pub reading: Option<Reading>,
    /// The limit that held it back, forced it or repeated it.
    pub limit: Option<Limit>,
    /// For a repeat: when the heater was switched to this command (else: now).
    pub switched_at: Option<DateTime<Utc>>,
}

/// What happened to a reading.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadingOutcome {
    /// Older than the newest reading already applied: ignored, so it can never flip a heater.
    OutOfOrder,
    /// Applied; maybe with a command to send.
    Applied(Option<Decision>),
}

/// Everything the loop keeps about one sensor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SensorControl {
    parts: ControlParts,
    /// A first command (no last command known) gets the sequence above this.
    sequence_floor: u64,
    /// The heater's limits, when the last command was decided, and whether the SAFETY level
    /// decides (it cuts holds short): given by the engine, not stored with the parts.
    protection: Protection,
    last_sent: Option<LastSent>,
    safety: bool,
    /// Out of service, and whether its heater is to be released: no command but the
    /// releasing OFF.
    out_of_service: Option<bool>,
    /// The heater reports another state than commanded: keep-alive does not fight it.
    not_following: bool,
    /// Set when a switch the rule wants waits for a hold to end: then.
    deferred: Option<DateTime<Utc>>,
}

/// The state of a [`SensorControl`], taken apart for storage that packs it tighter than this
/// struct (the engine keeps a million of them). Putting the same parts back gives the same
/// behaviour.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControlParts {
    /// The current setpoint's band; `None` when the sensor is not controlled.
    pub band: Option<Band>,
    /// The highest setpoint revision applied, deletions included. Never goes backwards.
    pub revision: i64,
    pub last_reading: Option<Reading>,
    pub last_command: Option<LastCommand>,
    /// The building of the latest setpoint or observed command, kept after a deletion so the
    /// releasing command can name it.
    pub building_id: Option<BuildingId>,
    /// When the current setpoint was first applied: the staleness clock of a sensor that never
    /// sent a reading. Only read while `last_reading` is `None`, so storage may keep one of the
    /// two times.
    pub controlled_since: Option<DateTime<Utc>>,
}

impl From<ControlParts> for SensorControl {
    fn from(parts: ControlParts) -> Self {
        Self {
            parts,
            ..Self::default()
        }
    }
}

impl From<SensorControl> for ControlParts {
    fn from(control: SensorControl) -> Self {
        control.parts
    }
}

impl SensorControl {
    /// Numbers a first command above `floor` instead of from 1: a sensor whose earlier commands
    /// are unknown (a lost topic) must not get a sequence it had before.
    pub fn numbering_above(mut self, floor: u64) -> Self {
        self.sequence_floor = floor;
        self
    }

    /// Holds switches to `protection`, counting from `last_sent`: when the last command
    /// switched the heater and was last sent (unknown: no hold, no repeat). `safety` (the
    /// SAFETY level decides) cuts holds short.
    pub fn protected(
        mut self,
        protection: Protection,
        last_sent: Option<LastSent>,
        safety: bool,
    ) -> Self {
        self.protection = protection;
        self.last_sent = last_sent;
        self.safety = safety;
        self
    }

    /// Out of service (`Some`), and whether its heater is to be released: nothing is sent
    /// for it but [`Self::release`]'s OFF.
    pub fn out_of_service(mut self, out: Option<bool>) -> Self {
        self.out_of_service = out;
        self
    }

    /// The heater does not follow its command (a manual change at the device, say): its
    /// command is not repeated; the next switch the rule wants is sent as usual.
    pub fn not_following(mut self, not_following: bool) -> Self {
        self.not_following = not_following;
        self
    }

    /// Out of service with its heater to be released: OFF for a heater left ON (whatever its
    /// hold: an operator asked). Also what [`Self::reevaluate`] decides then, so a replica
    /// that takes the sensor over releases a heater the last owner could not.
    pub fn release(&mut self) -> Option<Decision> {
        if self.out_of_service != Some(true)
            || self.parts.last_command?.command != HeaterCommand::On
        {
            return None;
        }
        let building = self.parts.building_id.clone()?;
        self.emit(
            HeaterCommand::Off,
            CommandReason::OutOfService,
            building,
            self.parts.revision,
        )
    }

    /// The next instant at which [`Self::on_wake`] may have something to do: a deferred
    /// switch, the end of a maximum run, a keep-alive repeat.
    pub fn next_wake(&self) -> Option<DateTime<Utc>> {
        // Out of service nothing is sent, not even a maximum run's OFF; a repeat needs a
        // controlled heater that follows its command.
        if self.out_of_service.is_some() {
            return None;
        }
        let last = self.last_switch()?;
        [
            self.deferred,
            self.protection.run_ends(&last),
            self.repeat_due(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// When the keep-alive next repeats the last command: for a controlled heater in service
    /// that follows it ([`Protection::next_repeat`]).
    fn repeat_due(&self) -> Option<DateTime<Utc>> {
        self.parts.band?;
        if self.out_of_service.is_some() || self.not_following {
            return None;
        }
        self.protection
            .next_repeat(&self.last_switch()?, self.last_sent?.sent_at)
    }

    /// When a switch the rule wanted at the last decision may happen, if a hold kept it back:
    /// the engine wakes the sensor then ([`Self::on_wake`]).
    pub fn deferred(&self) -> Option<DateTime<Utc>> {
        self.deferred
    }

    /// Decides again when something may be due, without a new reading: a heater ON for its
    /// maximum run time is switched OFF (and its cooldown held); a switch held back by a hold
    /// that has ended is sent if still wanted, with its deferred reason.
    pub fn on_wake(&mut self, now: DateTime<Utc>, stale_after: TimeDelta) -> Option<Decision> {
        if let Some(forced) = self.end_of_run(now) {
            return Some(forced);
        }
        let held_by = self
            .last_switch()
            .map(|last| Protection::holding_limit(&last));
        let Some(mut decision) = self.reevaluate(now, stale_after) else {
            return self.repeat(now);
        };
        decision.reason = match decision.reason {
            CommandReason::TooCold => CommandReason::DeferredTooCold,
            CommandReason::TooHot => CommandReason::DeferredTooHot,
            other => other,
        };
        if matches!(
            decision.reason,
            CommandReason::DeferredTooCold | CommandReason::DeferredTooHot
        ) {
            decision.limit = held_by;
        }
        Some(decision)
    }

    /// The keep-alive: the last command again, with the next sequence, once it is due
    /// ([`Self::repeat_due`]).
    fn repeat(&mut self, now: DateTime<Utc>) -> Option<Decision> {
        if self.repeat_due()? > now {
            return None;
        }
        let last = self.parts.last_command?;
        let sent = self.last_sent?;
        let building_id = self.parts.building_id.clone()?;
        let sequence = last.sequence + 1;
        self.parts.last_command = Some(LastCommand {
            command: last.command,
            sequence,
        });
        self.last_sent = Some(LastSent {
            sent_at: now,
            ..sent
        });
        Some(Decision {
            command: last.command,
            reason: CommandReason::KeepAlive,
            sequence,
            building_id,
            setpoint_revision: self.parts.revision,
            reading: self.parts.last_reading,
            limit: Some(Limit::KeepAlive),
            switched_at: Some(sent.switched_at),
        })
    }

    /// The OFF of a heater ON for its maximum run time, if it is; the ON the rule may want next
    /// waits for the cooldown.
    fn end_of_run(&mut self, now: DateTime<Utc>) -> Option<Decision> {
        let last = self.last_switch()?;
        if self.protection.run_ends(&last)? > now {
            return None;
        }
        let building = self.parts.building_id.clone()?;
        let mut decision = self.emit(
            HeaterCommand::Off,
            CommandReason::MaxRunTime,
            building,
            self.parts.revision,
        )?;
        decision.limit = Some(Limit::MaxRunTime);
        let off = Switched {
            command: HeaterCommand::Off,
            at: now,
            forced_off: true,
        };
        self.deferred = Some(self.protection.hold_until(&off));
        Some(decision)
    }

    /// The last command as far as its hold goes, when it is known when it was decided.
    fn last_switch(&self) -> Option<Switched> {
        let last = self.parts.last_command?;
        let sent = self.last_sent?;
        Some(Switched {
            command: last.command,
            at: sent.switched_at,
            forced_off: sent.forced_off && last.command == HeaterCommand::Off,
        })
    }

    /// The band of the current setpoint; `None` when the sensor is not controlled.
    pub fn band(&self) -> Option<Band> {
        self.parts.band
    }

    pub fn revision(&self) -> i64 {
        self.parts.revision
    }

    /// The building of the latest setpoint or observed command.
    pub fn building_id(&self) -> Option<&BuildingId> {
        self.parts.building_id.as_ref()
    }

    pub fn last_reading(&self) -> Option<Reading> {
        self.parts.last_reading
    }

    pub fn last_command(&self) -> Option<LastCommand> {
        self.parts.last_command
    }

    /// Applies a reading and decides.
    pub fn on_reading(&mut self, reading: Reading) -> ReadingOutcome {
        if self
            .parts
            .last_reading
            .is_some_and(|last| reading.time < last.time)
        {
            return ReadingOutcome::OutOfOrder;
        }
        self.parts.last_reading = Some(reading);
        ReadingOutcome::Applied(self.evaluate(reading, reading.received))
    }

    /// Takes in a reading decided on before (read again after a crash or a takeover, up to
    /// where the last owner got): it becomes the latest reading if it is newer, and decides
    /// nothing, since what it decided is on the command topic. The latest reading is what a
    /// setpoint change acts on, and the last owner may have died before it could.
    pub fn recall(&mut self, reading: Reading) {
        if self
            .parts
            .last_reading
            .is_none_or(|last| reading.time > last.time)
        {
            self.parts.last_reading = Some(reading);
        }
    }

    /// Applies setpoint `revision` (`None`: deleted) and decides at once (see [`reevaluate`]).
    /// Revisions not newer than the one applied are ignored.
    ///
    /// [`reevaluate`]: Self::reevaluate
    pub fn on_setpoint(
        &mut self,
        revision: i64,
        setpoint: Option<Setpoint>,
        now: DateTime<Utc>,
        stale_after: TimeDelta,
    ) -> Option<Decision> {
        if self.apply_setpoint(revision, setpoint, now) {
            self.reevaluate(now, stale_after)
        } else {
            None
        }
    }

    /// Records setpoint `revision` without deciding anything: for sensors another replica
    /// controls. Returns whether it was newer than the one applied.
    pub fn apply_setpoint(
        &mut self,
        revision: i64,
        setpoint: Option<Setpoint>,
        now: DateTime<Utc>,
    ) -> bool {
        if revision <= self.parts.revision {
            return false;
        }
        self.parts.revision = revision;
        match setpoint {
            Some(setpoint) => {
                if self.parts.band.is_none() {
                    self.parts.controlled_since = Some(now);
                }
                self.parts.band = Some(Band::from(&setpoint));
                self.parts.building_id = Some(setpoint.building_id);
            }
            None => {
                self.parts.band = None;
                self.parts.controlled_since = None;
            }
        }
        true
    }

    /// Decides on the current setpoint without a new reading: the latest reading is evaluated
    /// if it was received within `stale_after`, and a heater left ON without a setpoint is
    /// released.
    pub fn reevaluate(&mut self, now: DateTime<Utc>, stale_after: TimeDelta) -> Option<Decision> {
        if self.out_of_service.is_some() {
            return self.release();
        }
        if self.parts.band.is_some() {
            let fresh = self
                .parts
                .last_reading
                .filter(|r| now.signed_duration_since(r.received) <= stale_after)?;
            return self.evaluate(fresh, now);
        }
        if self.parts.last_command?.command != HeaterCommand::On {
            return None;
        }
        let building = self.parts.building_id.clone()?;
        self.emit(
            HeaterCommand::Off,
            CommandReason::SetpointDeleted,
            building,
            self.parts.revision,
        )
    }

    /// The fail-safe: a controlled sensor from which nothing was received for `stale_after`
    /// gets OFF, once. Silence counts, by the service's clock, from the later of the last
    /// reading and `watched_since` (a start, a rebalance, a stall: readings went elsewhere or
    /// waited) up to `heard_until`, when the partition was last read to its end (lag).
    pub fn on_tick(
        &mut self,
        heard_until: DateTime<Utc>,
        stale_after: TimeDelta,
        watched_since: DateTime<Utc>,
    ) -> Option<Decision> {
        self.parts.band?;
        let since = self
            .parts
            .last_reading
            .map(|r| r.received)
            .or(self.parts.controlled_since)?
            .max(watched_since);
        if heard_until.signed_duration_since(since) <= stale_after {
            return None;
        }
        // Set together with the band, so present whenever the sensor is controlled.
        let building = self.parts.building_id.clone()?;
        self.emit(
            HeaterCommand::Off,
            CommandReason::SensorStale,
            building,
            self.parts.revision,
        )
    }

    /// Takes in a command decided elsewhere (read back from the command topic: by this replica
    /// before a restart, or by another replica). Newer sequences win; the reading behind it
    /// counts as the latest reading if it is newer than ours.
    pub fn observe(
        &mut self,
        command: LastCommand,
        building_id: BuildingId,
        reading: Option<Reading>,
    ) {
        if self.parts.building_id.is_none() {
            self.parts.building_id = Some(building_id);
        }
        if self
            .parts
            .last_command
            .is_none_or(|last| command.sequence > last.sequence)
        {
            self.parts.last_command = Some(command);
        }
        if let Some(reading) = reading {
            if self
                .parts
                .last_reading
                .is_none_or(|last| reading.time > last.time)
            {
                self.parts.last_reading = Some(reading);
            }
        }
    }

    /// The rule, held back by the last command's hold (minimum on or off time) at `now`.
    fn evaluate(&mut self, reading: Reading, now: DateTime<Utc>) -> Option<Decision> {
        let (command, reason) = rule(self.parts.band?, reading.temperature)?;
        let building = self.parts.building_id.clone()?;
        let last = self.last_switch();
        if let Gate::After(until) = self
            .protection
            .gate(command, last.as_ref(), now, self.safety)
        {
            self.deferred = Some(until);
            return None;
        }
        self.emit(command, reason, building, self.parts.revision)
    }

    /// De-duplication: a command equal to the last one is not emitted.
    fn emit(
        &mut self,
        command: HeaterCommand,
        reason: CommandReason,
        building_id: BuildingId,
        setpoint_revision: i64,
    ) -> Option<Decision> {
        if self
            .parts
            .last_command
            .is_some_and(|last| last.command == command)
            || (self.out_of_service.is_some() && reason != CommandReason::OutOfService)
        {
            return None;
        }
        let sequence = self
            .parts
            .last_command
            .map_or(self.sequence_floor + 1, |last| last.sequence + 1);
        self.parts.last_command = Some(LastCommand { command, sequence });
        Some(Decision {
            command,
            reason,
            sequence,
            building_id,
            setpoint_revision,
            reading: self.parts.last_reading,
            limit: None,
            switched_at: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SensorId;
    use proptest::prelude::*;
    use HeaterCommand::{Off, On};

    fn band(desired: f64, up: f64, down: f64) -> Setpoint {
        Setpoint::new(
            SensorId::parse("s").unwrap(),
            BuildingId::parse("b").unwrap(),
            desired,
            up,
            down,
        )
        .unwrap()
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap()
    }

    /// A reading stamped and received at `seconds`.
    fn reading(temperature: f64, seconds: i64) -> Reading {
        Reading {
            temperature: Celsius::new(temperature).unwrap(),
            time: at(seconds),
            received: at(seconds),
        }
    }

    const STALE: TimeDelta = TimeDelta::minutes(5);

    fn controlled(desired: f64, up: f64, down: f64) -> SensorControl {
        let mut s = SensorControl::default();
        assert_eq!(
            s.on_setpoint(1, Some(band(desired, up, down)), at(0), STALE),
            None
        );
        s
    }

    fn command_of(outcome: ReadingOutcome) -> Option<HeaterCommand> {
        match outcome {
            ReadingOutcome::Applied(d) => d.map(|d| d.command),
            ReadingOutcome::OutOfOrder => panic!("unexpected out-of-order"),
        }
    }

    /// The last command, switched and sent at `at`.
    fn sent(at: DateTime<Utc>, forced_off: bool) -> Option<LastSent> {
        Some(LastSent {
            switched_at: at,
            sent_at: at,
            forced_off,
        })
    }

    /// The state as the engine hands it over after a command decided at `seconds`.
    fn held(control: SensorControl, min_on: i64, min_off: i64, seconds: i64) -> SensorControl {
        let protection = Protection {
            min_on: TimeDelta::seconds(min_on),
            min_off: TimeDelta::seconds(min_off),
            ..Protection::default()
        };
        control.protected(protection, sent(at(seconds), false), false)
    }

    #[test]
    fn a_switch_inside_a_minimum_time_waits_for_its_end_and_goes_if_still_wanted() {
        let mut s = controlled(20.0, 0.5, 0.5);
        assert_eq!(command_of(s.on_reading(reading(19.0, 10))), Some(On));
        // Too hot 20 s later, inside a 300 s minimum on time: held back, not dropped.
        let mut s = held(s, 300, 0, 10);
        assert_eq!(command_of(s.on_reading(reading(21.0, 30))), None);
        assert_eq!(s.deferred(), Some(at(310)));
        // Its end: still too hot, so OFF, with its own reason.
        let mut woken = held(s.clone(), 300, 0, 10);
        let off = woken
            .on_wake(at(310), STALE)
            .expect("OFF at the hold's end");
        assert_eq!(
            (off.command, off.reason),
            (Off, CommandReason::DeferredTooHot)
        );
        // Back inside the band by then: nothing is sent.
        let mut cooled = held(s.clone(), 300, 0, 10);
        assert_eq!(command_of(cooled.on_reading(reading(20.2, 200))), None);
        assert_eq!(cooled.on_wake(at(310), STALE), None);
        // The fail-safe does not wait for a hold.
        let mut silent = held(s.clone(), 3600, 0, 10);
        let stale = silent
            .on_tick(at(30 + 301), STALE, at(0))
            .expect("stale OFF");
        assert_eq!(
            (stale.command, stale.reason),
            (Off, CommandReason::SensorStale)
        );
        // Nor does the SAFETY level.
        let mut safety = s.protected(
            Protection {
                min_on: TimeDelta::seconds(300),
                ..Protection::default()
            },
            sent(at(10), false),
            true,
        );
        assert_eq!(command_of(safety.on_reading(reading(21.5, 40))), Some(Off));
    }

    #[test]
    fn a_heater_on_for_its_maximum_run_goes_off_for_the_cooldown_then_on_if_still_cold() {
        let protection = Protection {
            max_run: Some(TimeDelta::seconds(3600)),
            cooldown: TimeDelta::seconds(600),
            ..Protection::default()
        };
        let mut s = controlled(20.0, 0.5, 0.5);
        assert_eq!(command_of(s.on_reading(reading(18.0, 0))), Some(On));
        let mut s = s.protected(protection, sent(at(0), false), false);
        // Still cold an hour later: nothing before the hour, OFF at it.
        assert_eq!(command_of(s.on_reading(reading(19.0, 3000))), None);
        assert_eq!(s.on_wake(at(3599), STALE), None);
        let mut s = s.protected(protection, sent(at(0), false), false);
        let off = s.on_wake(at(3600), STALE).expect("the end of the run");
        assert_eq!((off.command, off.reason), (Off, CommandReason::MaxRunTime));
        assert_eq!(s.deferred(), Some(at(4200)), "woken at the cooldown's end");
        // Cold during the cooldown: held back; after it: ON, deferred.
        let mut s = s.protected(protection, sent(at(3600), true), false);
        assert_eq!(command_of(s.on_reading(reading(19.0, 4000))), None);
        assert_eq!(s.deferred(), Some(at(4200)));
        let mut s = s.protected(protection, sent(at(3600), true), false);
        let on = s.on_wake(at(4200), STALE).expect("ON after the cooldown");
        assert_eq!(
            (on.command, on.reason),
            (On, CommandReason::DeferredTooCold)
        );
    }

    #[test]
    fn a_setpoint_change_inside_a_hold_is_deferred_too() {
        let mut s = controlled(20.0, 0.5, 0.5);
        assert_eq!(command_of(s.on_reading(reading(19.0, 0))), Some(On));
        // Lowered below the room's 19 °C 60 s later, inside a 300 s minimum on time.
        let mut s = held(s, 300, 0, 0);
        assert_eq!(
            s.on_setpoint(2, Some(band(17.0, 0.5, 0.5)), at(60), STALE),
            None
        );
        assert_eq!(s.deferred(), Some(at(300)));
        let mut s = held(s, 300, 0, 0);
        let off = s.on_wake(at(300), STALE).expect("OFF at the hold's end");
        assert_eq!(
            (off.command, off.reason, off.setpoint_revision),
            (Off, CommandReason::DeferredTooHot, 2)
        );
    }

    #[test]
    fn a_deferred_or_forced_command_names_the_limit_that_shaped_it() {
        let mut s = controlled(20.0, 0.5, 0.5);
        assert_eq!(command_of(s.on_reading(reading(19.0, 0))), Some(On));
        let mut s = held(s, 300, 0, 0);
        assert_eq!(command_of(s.on_reading(reading(21.0, 30))), None);
        let mut s = held(s, 300, 0, 0);
        let off = s.on_wake(at(300), STALE).unwrap();
        assert_eq!(off.limit, Some(Limit::MinOnTime));
        let mut s = held(s, 0, 600, 300);
        assert_eq!(command_of(s.on_reading(reading(19.0, 850))), None);
        let mut s = held(s, 0, 600, 300);
        let on = s.on_wake(at(900), STALE).unwrap();
        assert_eq!(
            (on.reason, on.limit),
            (CommandReason::DeferredTooCold, Some(Limit::MinOffTime))
        );
        // A switch no hold kept back names none.
        let mut s = held(s, 0, 0, 900);
        let plain = match s.on_reading(reading(21.0, 950)) {
            ReadingOutcome::Applied(d) => d.unwrap(),
            ReadingOutcome::OutOfOrder => unreachable!(),
        };
        assert_eq!(plain.limit, None);
    }

    #[test]
    fn keep_alive_repeats_the_command_with_the_next_sequence_and_holds_count_from_the_switch() {
        let protection = Protection {
            min_on: TimeDelta::seconds(600),
            keep_alive: Some(TimeDelta::seconds(120)),
            ..Protection::default()
        };
        let mut s = controlled(20.0, 0.5, 0.5);
        assert_eq!(command_of(s.on_reading(reading(19.0, 0))), Some(On));
        let first = s.last_command().unwrap().sequence;
        let mut s = s.protected(protection, sent(at(0), false), false);
        assert_eq!(s.next_wake(), Some(at(120)));
        assert_eq!(s.on_wake(at(119), STALE), None, "not due yet");
        let again = s.on_wake(at(120), STALE).expect("repeated");
        assert_eq!(
            (again.command, again.reason, again.limit),
            (On, CommandReason::KeepAlive, Some(Limit::KeepAlive))
        );
        assert_eq!(again.sequence, first + 1);
        assert_eq!(again.switched_at, Some(at(0)));
        // The repeat does not restart the minimum on time: it counts from the switch.
        let repeated = LastSent {
            switched_at: at(0),
            sent_at: at(120),
            forced_off: false,
        };
        let mut s = s.protected(protection, Some(repeated), false);
        assert_eq!(s.next_wake(), Some(at(240)));
        assert_eq!(command_of(s.on_reading(reading(21.0, 500))), None);
        assert_eq!(s.deferred(), Some(at(600)));
        // Out of service, or not following (a manual change): no repeat.
        let mut out = s.clone().out_of_service(Some(false));
        assert_eq!(out.on_wake(at(240), STALE), None);
        let mut manual = s.clone().not_following(true);
        assert_eq!(manual.on_wake(at(240), STALE), None);
        assert_eq!(
            manual.next_wake(),
            Some(at(600)),
            "only the deferred switch is due"
        );
        // Without a setpoint: no repeat either (the heater was released).
        let mut released = s.clone();
        released.apply_setpoint(9, None, at(200));
        let mut released = released.protected(protection, Some(repeated), false);
        let off = released.on_wake(at(240), STALE).unwrap();
        assert_eq!(off.reason, CommandReason::SetpointDeleted);
    }

    #[test]
    fn out_of_service_sends_nothing_but_the_release_and_tracks_readings() {
        let mut s = controlled(20.0, 0.5, 0.5);
        assert_eq!(command_of(s.on_reading(reading(19.0, 0))), Some(On));
        let on = s.last_command().unwrap();
        let mut kept = s.clone().out_of_service(Some(false));
        assert_eq!(kept.release(), None, "left as it is");
        assert_eq!(kept.reevaluate(at(1), STALE), None);
        // A replica taking the sensor over releases it too.
        let mut taken = s.clone().out_of_service(Some(true));
        assert_eq!(
            taken.reevaluate(at(1), STALE).map(|d| d.reason),
            Some(CommandReason::OutOfService)
        );
        let mut s = held(s, 3600, 0, 0).out_of_service(Some(true));
        let off = s.release().expect("released at once");
        assert_eq!(
            (off.command, off.reason),
            (Off, CommandReason::OutOfService)
        );
        assert_eq!(off.sequence, on.sequence + 1);
        assert_eq!(s.release(), None, "already OFF");
        assert_eq!(s.next_wake(), None, "nothing is due out of service");
        // Readings are tracked, nothing is decided, the fail-safe is quiet.
        assert_eq!(command_of(s.on_reading(reading(18.0, 60))), None);
        assert_eq!(s.last_reading().unwrap().temperature.value(), 18.0);
        assert_eq!(s.on_tick(at(3600), STALE, at(0)), None);
        // Back in service: decided at once on the latest reading.
        let mut back = s.out_of_service(None);
        let d = back.reevaluate(at(61), STALE).expect("ON again");
        assert_eq!((d.command, d.reason), (On, CommandReason::TooCold));
    }

    #[test]
    fn a_band_within_reach_lies_strictly_inside_the_accepted_readings() {
        // desired 20, up 1, down 2: OFF above 21, ON below 18.
        let s = band(20.0, 1.0, 2.0);
        assert_eq!(out_of_reach(&s, &(-100.0..=150.0)), None);
        assert_eq!(out_of_reach(&s, &(17.9..=21.1)), None);
        // A reading at a threshold does not cross it (strict comparisons).
        assert_eq!(out_of_reach(&s, &(18.0..=21.1)), Some("down_delta_celsius"));
        assert_eq!(out_of_reach(&s, &(17.9..=21.0)), Some("up_delta_celsius"));
        assert_eq!(out_of_reach(&s, &(0.0..=20.5)), Some("up_delta_celsius"));
        assert_eq!(out_of_reach(&s, &(19.0..=40.0)), Some("down_delta_celsius"));
        assert_eq!(out_of_reach(&s, &(0.0..=20.0)), Some("desired_celsius"));
        assert_eq!(out_of_reach(&s, &(25.0..=40.0)), Some("desired_celsius"));
    }

    proptest! {
        /// Within reach exactly when the rule, at the two ends of the range, turns the heater
        /// OFF at the warmer and ON at the colder (the rule is monotonic in the temperature).
        #[test]
        fn within_reach_means_the_rule_switches_at_both_ends(
            desired in -50.0..=100.0f64,
            up in 0.0..=20.0f64,
            down in 0.0..=20.0f64,
            min in -120.0..=60.0f64,
            width in 0.0..=200.0f64,
        ) {
            let s = band(desired, up, down);
            let max = min + width;
            let command = |t| rule(Band::from(&s), Celsius::new(t).unwrap()).map(|(c, _)| c);
            prop_assert_eq!(
                out_of_reach(&s, &(min..=max)).is_none(),
                command(max) == Some(Off) && command(min) == Some(On)
            );
        }
    }

    /// The reference's behaviour, reading by reading: (temperature, expected emission).
    #[test]
    fn follows_the_reference_rule_with_dead_band_and_deduplication() {
        // desired 20, up 1, down 2: OFF above 21, ON below 18, nothing in [18, 21].
        let cases: &[(f64, Option<HeaterCommand>)] = &[
            (20.0, None),      // dead band, no previous command: nothing
            (21.0, None),      // boundary is inside the band (strict >)
            (18.0, None),      // boundary is inside the band (strict <)
            (17.9, Some(On)),  // too cold
            (17.0, None),      // still too cold: same command, not repeated
            (19.0, None),      // dead band: nothing, heater stays ON
            (21.1, Some(Off)), // too hot
            (25.0, None),      // still too hot: not repeated
            (20.0, None),      // dead band
            (10.0, Some(On)),
            (30.0, Some(Off)),
        ];
        let mut s = controlled(20.0, 1.0, 2.0);
        for (i, (t, expected)) in cases.iter().enumerate() {
            let got = command_of(s.on_reading(reading(*t, i as i64)));
            assert_eq!(got, *expected, "reading {t}");
        }
    }

    #[test]
    fn first_command_is_emitted_even_when_it_is_off() {
        let mut s = controlled(20.0, 1.0, 1.0);
        let ReadingOutcome::Applied(Some(d)) = s.on_reading(reading(25.0, 1)) else {
            panic!("expected a decision")
        };
        assert_eq!(
            (d.command, d.reason, d.sequence),
            (Off, CommandReason::TooHot, 1)
        );
        assert_eq!(d.setpoint_revision, 1);
        assert_eq!(d.building_id.as_str(), "b");
    }

    #[test]
    fn no_setpoint_no_control() {
        let mut s = SensorControl::default();
        for (i, t) in [-40.0, 0.0, 99.0].into_iter().enumerate() {
            assert_eq!(command_of(s.on_reading(reading(t, i as i64))), None);
        }
        assert_eq!(s.on_tick(at(100_000), STALE, at(0)), None);
        assert_eq!(s.last_reading(), Some(reading(99.0, 2)));
    }

    #[test]
    fn a_stale_reading_never_flips_the_heater() {
        let mut s = controlled(20.0, 1.0, 1.0);
        assert_eq!(command_of(s.on_reading(reading(15.0, 10))), Some(On));
        // An older, hot reading arrives late: ignored.
        assert_eq!(s.on_reading(reading(30.0, 9)), ReadingOutcome::OutOfOrder);
        assert_eq!(s.last_command().unwrap().command, On);
        // Same timestamp is not older: applied.
        assert_eq!(command_of(s.on_reading(reading(30.0, 10))), Some(Off));
    }

    #[test]
    fn setpoint_change_re_evaluates_the_fresh_reading_at_once() {
        let mut s = controlled(20.0, 1.0, 1.0);
        assert_eq!(command_of(s.on_reading(reading(20.0, 10))), None);
        // Raising the setpoint makes 20 too cold: ON without a new reading.
        let d = s
            .on_setpoint(2, Some(band(23.0, 1.0, 1.0)), at(20), STALE)
            .unwrap();
        assert_eq!(
            (d.command, d.reason, d.setpoint_revision),
            (On, CommandReason::TooCold, 2)
        );
        assert_eq!(d.reading, Some(reading(20.0, 10)));
        // Older revisions arriving late are ignored.
        assert_eq!(
            s.on_setpoint(1, Some(band(10.0, 1.0, 1.0)), at(21), STALE),
            None
        );
        assert_eq!(s.band().unwrap().upper(), 24.0);
        assert_eq!(s.band().unwrap().lower(), 22.0);
    }

    #[test]
    fn setpoint_change_does_not_act_on_a_stale_reading() {
        let mut s = controlled(20.0, 1.0, 1.0);
        s.on_reading(reading(20.0, 0));
        assert_eq!(
            s.on_setpoint(2, Some(band(30.0, 1.0, 1.0)), at(301), STALE),
            None
        );
    }

    #[test]
    fn deleting_the_setpoint_releases_a_heater_that_is_on() {
        let mut s = controlled(20.0, 1.0, 1.0);
        assert_eq!(command_of(s.on_reading(reading(10.0, 1))), Some(On));
        let d = s.on_setpoint(2, None, at(2), STALE).unwrap();
        assert_eq!(
            (d.command, d.reason, d.sequence),
            (Off, CommandReason::SetpointDeleted, 2)
        );
        assert_eq!(d.building_id.as_str(), "b");
        // Uncontrolled now: readings decide nothing.
        assert_eq!(command_of(s.on_reading(reading(0.0, 3))), None);
        // A heater that was OFF is not told again.
        let mut s = controlled(20.0, 1.0, 1.0);
        s.on_reading(reading(30.0, 1));
        assert_eq!(s.on_setpoint(2, None, at(2), STALE), None);
        // Deleting an unknown setpoint does nothing.
        assert_eq!(
            SensorControl::default().on_setpoint(5, None, at(2), STALE),
            None
        );
    }

    #[test]
    fn a_quiet_sensor_gets_off_once() {
        let mut s = controlled(20.0, 1.0, 1.0);
        s.on_reading(reading(10.0, 0));
        assert_eq!(
            s.on_tick(at(300), STALE, at(0)),
            None,
            "exactly STALE_AFTER is not stale yet"
        );
        let d = s.on_tick(at(301), STALE, at(0)).unwrap();
        assert_eq!((d.command, d.reason), (Off, CommandReason::SensorStale));
        assert_eq!(s.on_tick(at(400), STALE, at(0)), None, "only once");
        // The sensor comes back cold: ON again.
        assert_eq!(command_of(s.on_reading(reading(10.0, 401))), Some(On));
    }

    #[test]
    fn a_controlled_sensor_that_never_reported_goes_stale_from_when_control_began() {
        let mut s = controlled(20.0, 1.0, 1.0);
        assert_eq!(s.on_tick(at(300), STALE, at(0)), None);
        assert_eq!(
            s.on_tick(at(301), STALE, at(0)).map(|d| d.command),
            Some(Off)
        );
    }

    #[test]
    fn a_sensor_whose_clock_is_wrong_is_judged_by_when_its_readings_arrive() {
        // Stamped six minutes (more than STALE_AFTER) before they arrive, every 2 s: never
        // stale, and a setpoint change still acts on the latest reading.
        for skew in [-360, 360] {
            let mut s = controlled(20.0, 1.0, 1.0);
            let mut commands = Vec::new();
            for t in (1000..1100).step_by(2) {
                let r = Reading {
                    received: at(t),
                    time: at(t + skew),
                    ..reading(18.0, t)
                };
                commands.extend(command_of(s.on_reading(r)));
                commands.extend(s.on_tick(at(t + 1), STALE, at(0)).map(|d| d.command));
            }
            assert_eq!(commands, [On], "clock off by {skew} s");
            let d = s.on_setpoint(2, Some(band(15.0, 1.0, 1.0)), at(1100), STALE);
            assert_eq!(d.map(|d| d.command), Some(Off), "clock off by {skew} s");
        }
    }

    #[test]
    fn silence_counts_only_up_to_where_the_partition_was_read_to_its_end() {
        let mut s = controlled(20.0, 1.0, 1.0);
        s.on_reading(reading(18.0, 0));
        // The consumer lags: by the clock the sensor is silent, but its partition was last
        // read to the end at 200, and what came after may be its readings.
        assert_eq!(s.on_tick(at(200), STALE, at(0)), None);
        assert_eq!(s.on_tick(at(300), STALE, at(0)), None);
        assert!(s.on_tick(at(301), STALE, at(0)).is_some());
    }

    #[test]
    fn a_recalled_reading_decides_nothing_but_a_setpoint_change_acts_on_it() {
        let mut s = controlled(20.0, 1.0, 1.0);
        assert_eq!(command_of(s.on_reading(reading(10.0, 10))), Some(On));
        s.recall(reading(30.0, 5));
        assert_eq!(s.last_reading(), Some(reading(10.0, 10)), "older: ignored");
        s.recall(reading(20.5, 20));
        assert_eq!(s.last_command().map(|c| c.command), Some(On));
        // Desired 18 ± 1: 20.5 is too hot.
        let d = s.on_setpoint(2, Some(band(18.0, 1.0, 1.0)), at(21), STALE);
        assert_eq!(
            d.map(|d| (d.command, d.reason)),
            Some((Off, CommandReason::TooHot))
        );
    }

    #[test]
    fn a_sensor_taken_over_goes_stale_only_after_being_watched_for_stale_after() {
        // Heated since a command at 0; its readings since stayed in the band and went to the
        // previous owner. Taken over at 1000, with only the command's reading known.
        let mut s = controlled(20.0, 1.0, 1.0);
        s.observe(
            LastCommand {
                command: On,
                sequence: 1,
            },
            s.parts.building_id.clone().unwrap(),
            Some(reading(18.0, 0)),
        );
        assert_eq!(
            s.on_tick(at(1000), STALE, at(1000)),
            None,
            "not at takeover"
        );
        assert_eq!(s.on_tick(at(1300), STALE, at(1000)), None);
        // Silent since the takeover: the fail-safe, STALE_AFTER after it.
        let d = s.on_tick(at(1301), STALE, at(1000)).unwrap();
        assert_eq!((d.command, d.reason), (Off, CommandReason::SensorStale));
        // A reading after the takeover counts as before.
        let mut s = controlled(20.0, 1.0, 1.0);
        s.on_reading(reading(20.0, 1100));
        assert_eq!(s.on_tick(at(1400), STALE, at(1000)), None);
        assert!(s.on_tick(at(1401), STALE, at(1000)).is_some());
    }

    #[test]
    fn observed_commands_continue_the_sequence_and_are_not_repeated() {
        let mut s = controlled(20.0, 1.0, 1.0);
        let b = BuildingId::parse("b").unwrap();
        s.observe(
            LastCommand {
                command: On,
                sequence: 7,
            },
            b.clone(),
            Some(reading(10.0, 5)),
        );
        // Older observation does not roll back.
        s.observe(
            LastCommand {
                command: Off,
                sequence: 3,
            },
            b,
            Some(reading(30.0, 1)),
        );
        assert_eq!(
            s.last_command(),
            Some(LastCommand {
                command: On,
                sequence: 7
            })
        );
        assert_eq!(s.last_reading(), Some(reading(10.0, 5)));
        // The same state again: nothing. A change: sequence 8.
        assert_eq!(command_of(s.on_reading(reading(10.0, 6))), None);
        let ReadingOutcome::Applied(Some(d)) = s.on_reading(reading(30.0, 7)) else {
            panic!()
        };
        assert_eq!((d.command, d.sequence), (Off, 8));
    }

    #[test]
    fn an_observed_heater_left_on_without_a_setpoint_is_released_on_reevaluation() {
        let mut s = SensorControl::default();
        let b = BuildingId::parse("b7").unwrap();
        s.observe(
            LastCommand {
                command: On,
                sequence: 3,
            },
            b,
            None,
        );
        let d = s.reevaluate(at(0), STALE).unwrap();
        assert_eq!(
            (d.command, d.reason, d.sequence),
            (Off, CommandReason::SetpointDeleted, 4)
        );
        assert_eq!(d.building_id.as_str(), "b7");
        assert_eq!(s.reevaluate(at(1), STALE), None);
    }

    #[test]
    fn apply_setpoint_tracks_without_deciding() {
        let mut s = SensorControl::default();
        s.on_reading(reading(10.0, 0));
        assert!(s.apply_setpoint(1, Some(band(20.0, 1.0, 1.0)), at(1)));
        assert_eq!(s.last_command(), None);
        assert!(
            !s.apply_setpoint(1, None, at(2)),
            "same revision again is ignored"
        );
        assert_eq!(s.reevaluate(at(2), STALE).map(|d| d.command), Some(On));
    }

    #[derive(Debug, Clone)]
    enum Event {
        Reading(f64, i64),
        Setpoint(Option<(f64, f64, f64)>),
        Tick(i64),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => (-60.0..110.0f64, 0i64..2000).prop_map(|(t, s)| Event::Reading(t, s)),
            1 => proptest::option::of((-50.0..100.0f64, 0.0..20.0f64, 0.0..20.0f64))
                .prop_map(Event::Setpoint),
            1 => (0i64..3000).prop_map(Event::Tick),
        ]
    }

    /// A line-by-line port of the reference's `processElement1`, as a test oracle:
    /// 1 = OFF, 0 = ON, -1 = nothing; emit when the action differs from the previous one.
    fn reference(desired: f64, up: f64, down: f64, temperatures: &[f64]) -> Vec<HeaterCommand> {
        let mut previous = -1;
        let mut out = Vec::new();
        for &t in temperatures {
            let action = if t > desired + up {
                1
            } else if t < desired - down {
                0
            } else {
                -1
            };
            if action >= 0 && previous != action {
                previous = action;
                out.push(if action == 1 { Off } else { On });
            }
        }
        out
    }

    proptest! {
        /// Driven as the engine drives it (readings, and wakes at `next_wake`), under random
        /// limits: no switch falls inside the hold of the switch before it or before its
        /// maximum run ends, unless a fail-safe or release asked; a switch held back is sent
        /// when the hold ends if the rule still wants it; a repeat comes only once its
        /// interval has passed and never changes the command.
        #[test]
        fn no_command_breaks_a_limit_and_a_deferred_one_goes_at_the_hold_end(
            min_on in 0i64..600,
            min_off in 0i64..600,
            cooldown in 0i64..900,
            max_run in proptest::option::of(300i64..3000),
            keep_alive in proptest::option::of(60i64..600),
            steps in proptest::collection::vec((0i64..240, 17.0f64..23.0), 1..80),
        ) {
            let p = Protection {
                min_on: TimeDelta::seconds(min_on),
                min_off: TimeDelta::seconds(min_off),
                cooldown: TimeDelta::seconds(cooldown),
                max_run: max_run.map(TimeDelta::seconds),
                keep_alive: keep_alive.map(TimeDelta::seconds),
            };
            let mut s = controlled(20.0, 0.5, 0.5);
            let mut sent: Option<LastSent> = None;
            let mut last: Option<HeaterCommand> = None;
            let mut now = at(0);
            // Checks one decision made at `when` and records it as sent.
            let check = |d: &Decision, when: DateTime<Utc>, sent: &mut Option<LastSent>, last: &mut Option<HeaterCommand>| -> Result<(), TestCaseError> {
                let prev = sent.map(|l| Switched {
                    command: last.unwrap(),
                    at: l.switched_at,
                    forced_off: l.forced_off,
                });
                if d.reason == CommandReason::KeepAlive {
                    prop_assert_eq!(Some(d.command), *last);
                    prop_assert!(p.repeat_at(sent.unwrap().sent_at).is_some_and(|due| when >= due));
                    *sent = sent.map(|l| LastSent { sent_at: when, ..l });
                    return Ok(());
                }
                prop_assert_ne!(Some(d.command), *last, "only switches and repeats are sent");
                if let Some(prev) = prev {
                    let safety = matches!(d.reason, CommandReason::SensorStale | CommandReason::SetpointDeleted | CommandReason::OutOfService);
                    if d.reason == CommandReason::MaxRunTime {
                        prop_assert!(p.run_ends(&prev).is_some_and(|end| when >= end));
                    } else if !safety {
                        prop_assert!(when >= p.hold_until(&prev), "{:?} at {} inside the hold of {:?}", d.reason, when, prev);
                    }
                }
                *sent = Some(LastSent { switched_at: when, sent_at: when, forced_off: d.reason == CommandReason::MaxRunTime });
                *last = Some(d.command);
                Ok(())
            };
            for (gap, temperature) in steps {
                let next = now + TimeDelta::seconds(gap);
                // What is due before the next reading, in order, as the engine wakes it.
                loop {
                    s = s.protected(p, sent, false);
                    let Some(due) = s.next_wake().filter(|due| *due <= next) else { break };
                    let wanted = s.last_reading().and_then(|r| {
                        let fresh = due.signed_duration_since(r.received) <= STALE;
                        rule(s.band().unwrap(), r.temperature).filter(|_| fresh)
                    });
                    let deferred = s.deferred();
                    match s.on_wake(due.max(now), STALE) {
                        Some(d) => check(&d, due.max(now), &mut sent, &mut last)?,
                        None => {
                            // A switch held back until now is not lost.
                            if let (Some(until), Some((command, _))) = (deferred, wanted) {
                                prop_assert!(!(until == due && Some(command) != last), "deferred switch dropped at {}", due);
                            }
                            break;
                        }
                    }
                }
                now = next;
                s = s.protected(p, sent, false);
                if let ReadingOutcome::Applied(Some(d)) = s.on_reading(reading(temperature, (now - at(0)).num_seconds())) {
                    check(&d, now, &mut sent, &mut last)?;
                }
            }
        }
    }

    proptest! {
        /// With in-order readings and one setpoint, the loop emits exactly what the reference
        /// Flink job emits.
        #[test]
        fn matches_the_reference_job(
            desired in -50.0..100.0f64,
            up in 0.0..20.0f64,
            down in 0.0..20.0f64,
            temperatures in proptest::collection::vec(-60.0..110.0f64, 0..100),
        ) {
            let mut s = controlled(desired, up, down);
            let ours: Vec<_> = temperatures
                .iter()
                .enumerate()
                .filter_map(|(i, t)| command_of(s.on_reading(reading(*t, i as i64))))
                .collect();
            prop_assert_eq!(ours, reference(desired, up, down, &temperatures));
        }

        /// Whatever happens, a command is never emitted twice in a row for a sensor, sequences
        /// count up by one from above the floor, and every ON/OFF matches the rule (its reading beyond the band of
        /// the setpoint in force, whose revision it carries) or a fail-safe.
        #[test]
        fn commands_alternate_and_sequences_count_up(
            events in proptest::collection::vec(event(), 1..200),
            floor in prop_oneof![Just(0u64), 0..u64::MAX / 2],
        ) {
            let mut s = SensorControl::default().numbering_above(floor);
            let mut revision = 0;
            // The setpoint in force, as (desired, up, down), kept by the test itself.
            let mut current: Option<(f64, f64, f64)> = None;
            let mut emitted: Vec<Decision> = Vec::new();
            for e in events {
                let decision = match e {
                    Event::Reading(t, secs) => match s.on_reading(reading(t, secs)) {
                        ReadingOutcome::Applied(d) => d,
                        ReadingOutcome::OutOfOrder => None,
                    },
                    Event::Setpoint(values) => {
                        revision += 1;
                        current = values;
                        let sp = values.map(|(d, u, w)| band(d, u, w));
                        s.on_setpoint(revision, sp, at(1000), STALE)
                    }
                    Event::Tick(secs) => s.on_tick(at(secs), STALE, at(0)),
                };
                if let Some(d) = decision {
                    let celsius = d.reading.map(|r| r.temperature.value());
                    match d.reason {
                        CommandReason::TooCold => {
                            prop_assert_eq!(d.command, On);
                            let ((desired, _, down), t) = (current.unwrap(), celsius.unwrap());
                            prop_assert!(t < desired - down, "ON at {} in {:?}", t, current);
                        }
                        CommandReason::TooHot => {
                            prop_assert_eq!(d.command, Off);
                            let ((desired, up, _), t) = (current.unwrap(), celsius.unwrap());
                            prop_assert!(t > desired + up, "OFF at {} in {:?}", t, current);
                        }
                        _ => prop_assert_eq!(d.command, Off),
                    }
                    prop_assert_eq!(d.setpoint_revision, revision);
                    emitted.push(d);
                }
            }
            for pair in emitted.windows(2) {
                prop_assert_ne!(pair[0].command, pair[1].command);
                prop_assert_eq!(pair[1].sequence, pair[0].sequence + 1);
            }
            if let Some(first) = emitted.first() {
                prop_assert_eq!(first.sequence, floor + 1);
            }
        }
    }
}
