//! The engine's per-sensor state, packed: with a million sensors cached every byte per sensor
//! is a megabyte, and issue 4 asks for at most 100 B per sensor, index and id included.
//!
//! Layout: the sensor ids are concatenated in one string (`ids`); each sensor has a fixed-size
//! [`Slot`] in a vector, in the same order, holding its [`SensorControl`] packed into plain
//! numbers and flags (61 B); a hash table of slot numbers finds a sensor by id. Building ids are
//! interned (a few thousand at most, shared by their sensors). The last command event of a
//! sensor (for GetSensorState and subscribers' snapshots) is packed too, into a [`LastEvent`]
//! of 46 B in a second vector: a running building has one for nearly every sensor, and kept
//! whole (an `Arc` of the proto with its two id strings) it was 320 B each. Sensors are never
//! removed (a deleted setpoint still needs its tombstone revision), which is what lets a slot's
//! id end where the next slot's begins.
//!
//! The decision rule is not here: a slot is unpacked into a [`SensorControl`], the domain
//! decides, and the result is packed back, so the rule's tests cover what runs.

use std::collections::HashSet;
use std::hash::BuildHasher;

use chrono::{DateTime, Utc};
use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

use super::StreamError;
use crate::domain::control::{
    Band, ControlParts, HeaterCommand, LastCommand, Reading, SensorControl,
};
use crate::domain::levels::Level;
use crate::domain::protection::LastSent;
use crate::domain::{BuildingId, Celsius, SensorId};
use crate::proto::v1 as pb;

/// Which optional parts of a [`Slot`] are present.
mod flags {
    pub const BAND: u8 = 1;
    pub const READING: u8 = 1 << 1;
    /// `time` is `controlled_since` (only kept while there is no reading).
    pub const SINCE: u8 = 1 << 2;
    pub const COMMAND: u8 = 1 << 3;
    pub const COMMAND_ON: u8 = 1 << 4;
    pub const BUILDING: u8 = 1 << 5;
    pub const PARTITION: u8 = 1 << 6;
}

/// A revision or sequence that does not fit 32 bits: the value is in a side table. Both count
/// from 1 by one per sensor, so 32 bits last thousands of years; the side table keeps storage
/// exact for whatever the database or the command topic holds.
const WIDE: u32 = u32::MAX;

/// One sensor, 61 bytes. Packed (no padding): fields are only ever copied in and out, never
/// borrowed, so unaligned fields cost nothing on the platforms we run on.
#[derive(Clone, Copy)]
#[repr(C, packed)]
struct Slot {
    /// Where the sensor's id starts in `Cache::ids`; it ends where the next slot's begins.
    id_start: u32,
    building: u32,
    /// The sensor-topic partition the sensor's readings arrive on.
    partition: i32,
    flags: u8,
    /// The last reading's time, or `controlled_since` when there is none; nanoseconds since the
    /// epoch (`codec::storable` turns away readings outside that range).
    time: i64,
    /// When the last reading was received, nanoseconds since the epoch.
    received: i64,
    temperature: f64,
    lower: f64,
    upper: f64,
    /// The setpoint revision, or [`WIDE`].
    revision: u32,
    /// The last command's sequence, or [`WIDE`].
    sequence: u32,
}

/// What a [`LastEvent`] holds besides its numbers.
mod event_flags {
    pub const PRESENT: u8 = 1;
    pub const READING_TIME: u8 = 1 << 1;
    pub const DECIDED_AT: u8 = 1 << 2;
    /// Bits 3 and 4: the `HeaterCommand` proto number (0 to 2).
    pub const COMMAND_SHIFT: u8 = 3;
}

/// [`LastEvent::shaping`]: the `CommandReason` proto number in the low four bits (0 to 9),
/// the `HeaterLimit` one in the high four (0 to 5).
const LIMIT_SHIFT: u8 = 4;

/// A sensor's last command event, 46 bytes: every field of `pb::HeaterCommandEvent` but the
/// sensor id (the slot's) and `snapshot` (never set on a stored event), and the number the
/// engine gave it (a [`super::feed::LiveEvent`]'s). Times are nanoseconds since the epoch,
/// revision and sequence narrowed, as in [`Slot`]. Its own building and sequence rather than the
/// slot's: a sensor moved to another building keeps the command it was sent in the old one.
#[derive(Clone, Copy, Default)]
#[repr(C, packed)]
struct LastEvent {
    /// The setpoint revision, or [`WIDE`].
    revision: u32,
    /// The command's sequence, or [`WIDE`].
    sequence: u32,
    number: u64,
    /// NaN when absent (a temperature thermostat writes is finite).
    temperature: f64,
    reading_time: i64,
    decided_at: i64,
    building: u32,
    flags: u8,
    shaping: u8,
}

/// Index of a sensor in the cache.
pub type SensorIndex = u32;

/// How many sensors one call of [`Cache::last_events`] looks at, at most. Each part of a
/// snapshot is one turn of the engine: a sparse one (a small building, a catch-up after few
/// changes) would otherwise walk all of a million sensors while no reading is decided.
pub const SCAN_LIMIT: SensorIndex = 1 << 16;

#[derive(Default)]
pub struct Cache {
    ids: String,
    slots: Vec<Slot>,
    /// Slot numbers, hashed by sensor id. hashbrown's `HashTable` rather than a std map keyed by
    /// the id: the key would be a second copy of the id (24 B plus a heap allocation per sensor).
    index: HashTable<SensorIndex>,
    hasher: DefaultHashBuilder,
    buildings: Vec<BuildingId>,
    building_index: HashMap<BuildingId, u32>,
    /// By building, the sensors whose last command event is in it, ascending: a snapshot of one
    /// building walks its own sensors only. A sorted vector rather than a B-tree (about 5 B a
    /// sensor against 13): sensors get ascending indexes as they are first seen, so inserts
    /// are appends but for a sensor whose event moves to another building.
    by_building: Vec<Vec<SensorIndex>>,
    wide_revisions: HashMap<SensorIndex, i64>,
    wide_sequences: HashMap<SensorIndex, u64>,
    /// By sensor index; ends at the last sensor that has one.
    last_events: Vec<LastEvent>,
    wide_event_revisions: HashMap<SensorIndex, i64>,
    wide_event_sequences: HashMap<SensorIndex, u64>,
    /// The level of the priority array each sensor's setpoint comes from, and the revision it
    /// was written at, where that is not DEFAULT at the sensor's own revision: few sensors.
    levels: HashMap<SensorIndex, (Level, i64)>,
    /// The same for last command events (proto level numbers).
    event_levels: HashMap<SensorIndex, (i32, i64)>,
    /// A last command event's `switched_at` where it is not its `decided_at` (a keep-alive
    /// repeat), nanoseconds since the epoch: few sensors.
    event_switched: HashMap<SensorIndex, i64>,
}

impl Cache {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// The sensor's index, if it is cached.
    pub fn find(&self, sensor: &str) -> Option<SensorIndex> {
        let hash = self.hasher.hash_one(sensor);
        self.index
            .find(hash, |&i| id_of(&self.ids, &self.slots, i) == sensor)
            .copied()
    }

    /// The sensor's index, adding it if it is new.
    pub fn find_or_insert(&mut self, sensor: &SensorId) -> Result<SensorIndex, StreamError> {
        if let Some(i) = self.find(sensor.as_str()) {
            return Ok(i);
        }
        let full = || StreamError::CacheFull(self.slots.len());
        let i = SensorIndex::try_from(self.slots.len()).map_err(|_| full())?;
        let id_start = u32::try_from(self.ids.len()).map_err(|_| full())?;
        if u32::try_from(self.ids.len() + sensor.as_str().len()).is_err() {
            return Err(full());
        }
        self.ids.push_str(sensor.as_str());
        self.slots.push(Slot {
            id_start,
            building: 0,
            partition: 0,
            flags: 0,
            time: 0,
            received: 0,
            temperature: 0.0,
            lower: 0.0,
            upper: 0.0,
            revision: 0,
            sequence: 0,
        });
        let (ids, slots, hasher) = (&self.ids, &self.slots, &self.hasher);
        self.index
            .insert_unique(hasher.hash_one(sensor.as_str()), i, |&j| {
                hasher.hash_one(id_of(ids, slots, j))
            });
        Ok(i)
    }

    pub fn id(&self, i: SensorIndex) -> &str {
        id_of(&self.ids, &self.slots, i)
    }

    pub fn indexes(&self) -> impl Iterator<Item = SensorIndex> {
        // `find_or_insert` keeps the length within `SensorIndex`.
        0..self.slots.len() as SensorIndex
    }

    pub fn partition(&self, i: SensorIndex) -> Option<i32> {
        let slot = self.slots[i as usize];
        (slot.flags & flags::PARTITION != 0).then_some(slot.partition)
    }

    pub fn set_partition(&mut self, i: SensorIndex, partition: i32) {
        let slot = &mut self.slots[i as usize];
        slot.partition = partition;
        slot.flags |= flags::PARTITION;
    }

    /// Forgets every sensor's partition (the topic's partitions changed).
    pub fn forget_partitions(&mut self) {
        for slot in &mut self.slots {
            slot.flags &= !flags::PARTITION;
        }
    }

    /// Whether the fail-safe may turn sensor `i`'s heater OFF at a tick where nothing heard
    /// after `cutoff` counts: it is controlled, its heater is not OFF already, and nothing was
    /// heard from it after `cutoff` (its last reading's receipt, else when it became
    /// controlled). A filter ahead of `SensorControl::on_tick`, which decides, so that a round
    /// does not unpack every sensor.
    pub fn may_go_stale(&self, i: SensorIndex, cutoff: DateTime<Utc>) -> bool {
        let slot = self.slots[i as usize];
        let has = |flag| slot.flags & flag != 0;
        let heard = if has(flags::READING) {
            slot.received
        } else if has(flags::SINCE) {
            slot.time
        } else {
            return false;
        };
        let off = has(flags::COMMAND) && !has(flags::COMMAND_ON);
        has(flags::BAND) && !off && heard <= nanos(cutoff)
    }

    /// Whether re-evaluating sensor `i` may decide anything: `SensorControl::reevaluate`
    /// decides on a last reading or takes back a last command. A filter ahead of it, so that a
    /// rebalance does not unpack every sensor of a fresh start, which has neither.
    pub fn may_be_owed(&self, i: SensorIndex) -> bool {
        self.slots[i as usize].flags & (flags::READING | flags::COMMAND) != 0
    }

    pub fn is_controlled(&self, i: SensorIndex) -> bool {
        self.slots[i as usize].flags & flags::BAND != 0
    }

    /// The revision of the sensor's setpoint (0: none yet).
    pub fn revision(&self, i: SensorIndex) -> i64 {
        widen(self.slots[i as usize].revision, &self.wide_revisions, i)
    }

    /// The level the sensor's setpoint comes from, and the revision that level was written at.
    pub fn level(&self, i: SensorIndex) -> (Level, i64) {
        self.levels
            .get(&i)
            .copied()
            .unwrap_or_else(|| (Level::Default, self.revision(i)))
    }

    /// Records the level of the sensor's setpoint at `revision`.
    pub fn set_level(&mut self, i: SensorIndex, level: Level, level_revision: i64, revision: i64) {
        if (level, level_revision) == (Level::Default, revision) {
            self.levels.remove(&i);
        } else {
            self.levels.insert(i, (level, level_revision));
        }
    }

    /// The sensor's state, unpacked.
    pub fn control(&self, i: SensorIndex) -> SensorControl {
        let slot = self.slots[i as usize];
        let has = |flag| slot.flags & flag != 0;
        let time = DateTime::from_timestamp_nanos(slot.time);
        ControlParts {
            band: has(flags::BAND).then(|| Band::from_thresholds(slot.lower, slot.upper)),
            revision: widen(slot.revision, &self.wide_revisions, i),
            // Stored only from a `Celsius`, so always finite.
            last_reading: Celsius::new(slot.temperature)
                .filter(|_| has(flags::READING))
                .map(|temperature| Reading {
                    temperature,
                    time,
                    received: DateTime::from_timestamp_nanos(slot.received),
                }),
            last_command: has(flags::COMMAND).then(|| LastCommand {
                command: if has(flags::COMMAND_ON) {
                    HeaterCommand::On
                } else {
                    HeaterCommand::Off
                },
                sequence: widen(slot.sequence, &self.wide_sequences, i),
            }),
            building_id: has(flags::BUILDING)
                .then(|| self.buildings[slot.building as usize].clone()),
            controlled_since: has(flags::SINCE).then_some(time),
        }
        .into()
    }

    /// Stores the sensor's state back.
    pub fn set_control(&mut self, i: SensorIndex, control: SensorControl) {
        let parts = ControlParts::from(control);
        let old = self.slots[i as usize];
        let mut slot = Slot {
            flags: old.flags & flags::PARTITION,
            time: 0,
            received: 0,
            temperature: 0.0,
            lower: 0.0,
            upper: 0.0,
            sequence: 0,
            revision: narrow(parts.revision, &mut self.wide_revisions, i),
            building: 0,
            ..old
        };
        if let Some(band) = parts.band {
            slot.flags |= flags::BAND;
            (slot.lower, slot.upper) = (band.lower(), band.upper());
        }
        if let Some(reading) = parts.last_reading {
            slot.flags |= flags::READING;
            slot.temperature = reading.temperature.value();
            slot.time = nanos(reading.time);
            slot.received = nanos(reading.received);
        } else if let Some(since) = parts.controlled_since {
            slot.flags |= flags::SINCE;
            slot.time = nanos(since);
        }
        if let Some(last) = parts.last_command {
            slot.flags |= flags::COMMAND;
            if last.command == HeaterCommand::On {
                slot.flags |= flags::COMMAND_ON;
            }
            slot.sequence = narrow(last.sequence, &mut self.wide_sequences, i);
        } else {
            forget(&mut self.wide_sequences, i);
        }
        if let Some(building) = parts.building_id {
            slot.flags |= flags::BUILDING;
            // The slot's previous building is the common case: no lookup.
            slot.building = if old.flags & flags::BUILDING != 0
                && self.buildings[old.building as usize] == building
            {
                old.building
            } else {
                self.intern(&building)
            };
        }
        self.slots[i as usize] = slot;
    }

    /// The index of `building`, added if it is new. Buildings are few (they come from setpoints
    /// and command events, and a deployment has a bounded set), so none is ever removed.
    fn intern(&mut self, building: &BuildingId) -> u32 {
        if let Some(&b) = self.building_index.get(building) {
            return b;
        }
        let b = self.buildings.len() as u32;
        self.buildings.push(building.clone());
        self.by_building.push(Vec::new());
        self.building_index.insert(building.clone(), b);
        b
    }

    /// The sensor's last command event.
    pub fn last_event(&self, i: SensorIndex) -> Option<pb::HeaterCommandEvent> {
        let event = self.stored_event(i)?;
        let setpoint_revision = widen(event.revision, &self.wide_event_revisions, i);
        let (setpoint_level, level_revision) = self
            .event_levels
            .get(&i)
            .copied()
            .unwrap_or((pb::SetpointLevel::Default as i32, setpoint_revision));
        Some(pb::HeaterCommandEvent {
            sensor_id: self.id(i).to_owned(),
            building_id: self.buildings[event.building as usize].to_string(),
            command: i32::from((event.flags >> event_flags::COMMAND_SHIFT) & 0b11),
            reason: i32::from(event.shaping & 0b1111),
            limit: i32::from(event.shaping >> LIMIT_SHIFT),
            switched_at: self.switched_at(i, &event).map(from_nanos),
            setpoint_revision,
            temperature_celsius: Some(event.temperature).filter(|t| !t.is_nan()),
            reading_time: (event.flags & event_flags::READING_TIME != 0)
                .then(|| from_nanos(event.reading_time)),
            decided_at: (event.flags & event_flags::DECIDED_AT != 0)
                .then(|| from_nanos(event.decided_at)),
            sequence: widen(event.sequence, &self.wide_event_sequences, i),
            snapshot: false,
            setpoint_level,
            level_revision,
            // Not kept: the trace belongs to the live event only.
            trace_parent: String::new(),
        })
    }

    /// When the event switched its heater: `decided_at`, unless it repeats an earlier switch.
    fn switched_at(&self, i: SensorIndex, event: &LastEvent) -> Option<i64> {
        let decided = (event.flags & event_flags::DECIDED_AT != 0).then_some(event.decided_at);
        self.event_switched.get(&i).copied().or(decided)
    }

    /// When the sensor's last command switched its heater and was last sent, and whether it
    /// was the OFF of a maximum run, if the event kept is that command's: what its holds and
    /// keep-alive count from.
    pub fn last_switch(&self, i: SensorIndex) -> Option<LastSent> {
        let event = self.stored_event(i)?;
        let slot = self.slots[i as usize];
        let same = slot.flags & flags::COMMAND != 0
            && widen(slot.sequence, &self.wide_sequences, i)
                == widen(event.sequence, &self.wide_event_sequences, i);
        if !same || event.flags & event_flags::DECIDED_AT == 0 {
            return None;
        }
        let switched = self.switched_at(i, &event)?;
        Some(LastSent {
            switched_at: DateTime::from_timestamp_nanos(switched),
            sent_at: DateTime::from_timestamp_nanos(event.decided_at),
            forced_off: event.shaping & 0b1111 == pb::CommandReason::MaxRunTime as u8,
        })
    }

    /// The sequence of the sensor's last command event.
    pub fn last_event_sequence(&self, i: SensorIndex) -> Option<u64> {
        self.stored_event(i)
            .map(|event| widen(event.sequence, &self.wide_event_sequences, i))
    }

    /// Whether the sensor's last command event is `event`'s: the same sequence, decided at the
    /// same instant, the same command.
    pub fn last_event_is(&self, i: SensorIndex, event: &pb::HeaterCommandEvent) -> bool {
        let Some(stored) = self.stored_event(i) else {
            return false;
        };
        let decided_at = event.decided_at.as_ref().and_then(to_nanos);
        widen(stored.sequence, &self.wide_event_sequences, i) == event.sequence
            && (stored.flags & event_flags::DECIDED_AT != 0).then_some(stored.decided_at)
                == decided_at
            && i32::from(stored.flags >> event_flags::COMMAND_SHIFT & 0b11) == event.command
    }

    fn stored_event(&self, i: SensorIndex) -> Option<LastEvent> {
        let event = *self.last_events.get(i as usize)?;
        (event.flags & event_flags::PRESENT != 0).then_some(event)
    }

    /// Stores `event` (whose building is `building`) as the sensor's last command event, with
    /// the engine's `number` for it. What thermostat never writes is not kept exactly: a command
    /// or reason number the proto does not define is stored as unspecified, a time outside
    /// 1677-2262 or with nanoseconds out of range as absent.
    pub fn set_last_event(
        &mut self,
        i: SensorIndex,
        event: &pb::HeaterCommandEvent,
        building: &BuildingId,
        number: u64,
    ) {
        let command = pb::HeaterCommand::try_from(event.command).map_or(0, |c| c as u8);
        let reason = pb::CommandReason::try_from(event.reason).map_or(0, |r| r as u8);
        let limit = pb::HeaterLimit::try_from(event.limit).map_or(0, |l| l as u8);
        let mut flags = event_flags::PRESENT | command << event_flags::COMMAND_SHIFT;
        let mut time = |t: &Option<prost_types::Timestamp>, flag| {
            let nanos = t.as_ref().and_then(to_nanos);
            if nanos.is_some() {
                flags |= flag;
            }
            nanos.unwrap_or_default()
        };
        // An event of a version before levels (0, 0) was decided on the DEFAULT level.
        let level = (event.setpoint_level, event.level_revision);
        if level == (pb::SetpointLevel::Default as i32, event.setpoint_revision) || level == (0, 0)
        {
            self.event_levels.remove(&i);
        } else {
            self.event_levels.insert(i, level);
        }
        let reading_time = time(&event.reading_time, event_flags::READING_TIME);
        let decided_at = time(&event.decided_at, event_flags::DECIDED_AT);
        match event.switched_at.as_ref().and_then(to_nanos) {
            Some(switched) if switched != decided_at => {
                self.event_switched.insert(i, switched);
            }
            _ => {
                self.event_switched.remove(&i);
            }
        }
        let packed = LastEvent {
            revision: narrow(event.setpoint_revision, &mut self.wide_event_revisions, i),
            sequence: narrow(event.sequence, &mut self.wide_event_sequences, i),
            number,
            temperature: event.temperature_celsius.unwrap_or(f64::NAN),
            reading_time,
            decided_at,
            building: self.intern(building),
            flags,
            shaping: reason | limit << LIMIT_SHIFT,
        };
        match self.stored_event(i) {
            Some(old) if { old.building } == { packed.building } => {}
            old => {
                if let Some(old) = old {
                    let sensors = &mut self.by_building[{ old.building } as usize];
                    if let Ok(at) = sensors.binary_search(&i) {
                        sensors.remove(at);
                    }
                }
                let sensors = &mut self.by_building[{ packed.building } as usize];
                if let Err(at) = sensors.binary_search(&i) {
                    sensors.insert(at, i);
                }
            }
        }
        let i = i as usize;
        if self.last_events.len() <= i {
            // Room for every sensor cached so far in one allocation, rather than doubling from
            // small: glibc keeps the buffers a growing vector leaves behind resident when they
            // were below its mmap threshold (which large frees raise, up to 32 MB), 19 MB at
            // 1M sensors. Only reserved: pages cost memory once written.
            self.last_events
                .reserve(self.slots.len().saturating_sub(self.last_events.len()));
            self.last_events.resize(i + 1, LastEvent::default());
        }
        self.last_events[i] = packed;
    }

    /// From index `from` on, at most `limit` last command events of `sensors` (all when empty)
    /// in `buildings` (any when `None`) that `wanted(sensor, number)` keeps, in index order, and
    /// where the next part starts. Named buildings walk their own sensors, at most
    /// [`SCAN_LIMIT`] each (else the cache's): a part may be short, or empty.
    pub fn last_events(
        &self,
        sensors: &HashSet<SensorId>,
        buildings: Option<&[&BuildingId]>,
        wanted: impl Fn(SensorIndex, u64) -> bool,
        from: SensorIndex,
        limit: usize,
    ) -> Scan {
        // Buildings never seen have no events.
        let buildings: Option<Vec<u32>> = buildings.map(|named| {
            named
                .iter()
                .filter_map(|b| self.building_index.get(*b).copied())
                .collect()
        });
        let wanted = |i: SensorIndex| {
            self.stored_event(i).is_some_and(|e| {
                let building = e.building;
                buildings.as_ref().is_none_or(|b| b.contains(&building)) && wanted(i, e.number)
            })
        };
        let mut examined = 0u64;
        // One more than asked for: where the next part starts.
        let (mut indexes, scanned_to): (Vec<SensorIndex>, _) = if !sensors.is_empty() {
            let mut indexes: Vec<SensorIndex> = sensors
                .iter()
                .filter_map(|s| self.find(s.as_str()))
                .filter(|i| *i >= from)
                .inspect(|_| examined += 1)
                .filter(|&i| wanted(i))
                .collect();
            indexes.sort_unstable();
            indexes.truncate(limit + 1);
            (indexes, None)
        } else if let Some(buildings) = &buildings {
            let mut indexes = Vec::new();
            // The first sensor some building did not look at: below it, all were looked at.
            let mut stop: Option<SensorIndex> = None;
            for &b in buildings {
                let (mut looked, mut found) = (0, 0);
                let sensors = &self.by_building[b as usize];
                for &i in &sensors[sensors.partition_point(|&i| i < from)..] {
                    if looked == SCAN_LIMIT || found > limit {
                        stop = Some(stop.map_or(i, |s| s.min(i)));
                        break;
                    }
                    looked += 1;
                    if wanted(i) {
                        indexes.push(i);
                        found += 1;
                    }
                }
                examined += u64::from(looked);
            }
            indexes.sort_unstable();
            if let Some(stop) = stop {
                indexes.retain(|&i| i < stop);
            }
            indexes.truncate(limit + 1);
            (indexes, stop)
        } else {
            // `last_events` is no longer than `slots`, whose length fits a `SensorIndex`.
            let end = self.last_events.len() as SensorIndex;
            let to = from.saturating_add(SCAN_LIMIT).min(end);
            examined += u64::from(to.saturating_sub(from));
            let indexes = (from..to).filter(|&i| wanted(i)).take(limit + 1).collect();
            (indexes, (to < end).then_some(to))
        };
        let next = indexes.get(limit).copied().or(scanned_to);
        indexes.truncate(limit);
        let events = indexes
            .into_iter()
            .filter_map(|i| self.last_event(i))
            .collect();
        Scan {
            events,
            next,
            examined,
        }
    }
}

/// A part of the last command events ([`Cache::last_events`]).
#[derive(Debug, Default)]
pub struct Scan {
    pub events: Vec<pb::HeaterCommandEvent>,
    /// Where the next part starts; `None` after the last.
    pub next: Option<SensorIndex>,
    /// How many sensors were looked at.
    pub examined: u64,
}

/// A protobuf timestamp as nanoseconds since the epoch, if it is a valid one in range.
fn to_nanos(t: &prost_types::Timestamp) -> Option<i64> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    t.seconds
        .checked_mul(1_000_000_000)?
        .checked_add(i64::from(t.nanos))
}

fn from_nanos(nanos: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: nanos.div_euclid(1_000_000_000),
        // Less than 10^9.
        nanos: nanos.rem_euclid(1_000_000_000) as i32,
    }
}

/// `value` as stored in a slot: itself if it fits (recorded as not wide), else [`WIDE`] with
/// the value in `wide`.
fn narrow<T: Copy + Default + TryInto<u32>>(
    value: T,
    wide: &mut HashMap<SensorIndex, T>,
    i: SensorIndex,
) -> u32 {
    match value.try_into().ok().filter(|&v| v != WIDE) {
        Some(narrow) => {
            forget(wide, i);
            narrow
        }
        None => {
            wide.insert(i, value);
            WIDE
        }
    }
}

/// Drops the sensor's wide value, if any. Called for every reading: the side table is almost
/// always empty, and then not even the key is hashed.
fn forget<T>(wide: &mut HashMap<SensorIndex, T>, i: SensorIndex) {
    if !wide.is_empty() {
        wide.remove(&i);
    }
}

fn widen<T: Copy + Default + From<u32>>(
    stored: u32,
    wide: &HashMap<SensorIndex, T>,
    i: SensorIndex,
) -> T {
    if stored == WIDE {
        wide.get(&i).copied().unwrap_or_default()
    } else {
        T::from(stored)
    }
}

fn id_of<'a>(ids: &'a str, slots: &[Slot], i: SensorIndex) -> &'a str {
    let i = i as usize;
    let start = slots[i].id_start as usize;
    let end = slots
        .get(i + 1)
        .map_or(ids.len(), |next| next.id_start as usize);
    &ids[start..end]
}

/// `codec::storable` keeps readings outside the range out; `now` is inside it until 2262.
fn nanos(time: DateTime<Utc>) -> i64 {
    time.timestamp_nanos_opt().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Setpoint;

    fn id(s: &str) -> SensorId {
        SensorId::parse(s).unwrap()
    }

    /// The memory budget (benchmark 5: about 90 B a cached sensor, 160-170 B once commanded,
    /// measured before the receive time added 8 B) rests on these sizes: a field added without
    /// packing, or padding brought in by an aligned one, fails here rather than in a benchmark.
    #[test]
    fn a_slot_stays_within_61_bytes_and_a_last_event_within_46() {
        assert!(std::mem::size_of::<Slot>() <= 61);
        assert!(std::mem::size_of::<LastEvent>() <= 46);
    }

    #[test]
    fn finds_sensors_by_id_and_keeps_their_ids() {
        let mut cache = Cache::default();
        let names: Vec<String> = (0..1000).map(|n| format!("b/s-{n}")).collect();
        for name in &names {
            cache.find_or_insert(&id(name)).unwrap();
        }
        for (n, name) in names.iter().enumerate() {
            assert_eq!(cache.find(name), Some(n as u32));
            assert_eq!(cache.find_or_insert(&id(name)).unwrap(), n as u32);
            assert_eq!(cache.id(n as u32), name);
        }
        assert_eq!(cache.find("b/s-1000"), None);
        assert_eq!(cache.len(), 1000);
    }

    #[test]
    fn state_round_trips_through_a_slot() {
        let mut cache = Cache::default();
        let i = cache.find_or_insert(&id("s")).unwrap();
        assert_eq!(cache.control(i), SensorControl::default());
        let at = |s| DateTime::from_timestamp(1_800_000_000, s).unwrap();
        let reading = |t, n| Reading {
            temperature: Celsius::new(t).unwrap(),
            time: at(n),
            received: at(n / 2),
        };
        let setpoint = Setpoint::new(id("s"), BuildingId::parse("b").unwrap(), 20.1, 0.3, 0.7);
        let band = Band::from(&setpoint.unwrap());
        let cases = [
            ControlParts {
                band: Some(band),
                revision: 7,
                controlled_since: Some(at(1)),
                building_id: Some(BuildingId::parse("b").unwrap()),
                ..Default::default()
            },
            ControlParts {
                band: Some(band),
                revision: i64::MAX,
                last_reading: Some(reading(-3.25, 999_999_999)),
                last_command: Some(LastCommand {
                    command: HeaterCommand::On,
                    sequence: u64::MAX,
                }),
                building_id: Some(BuildingId::parse("other").unwrap()),
                controlled_since: None,
            },
            ControlParts {
                last_reading: Some(reading(0.1, 5)),
                last_command: Some(LastCommand {
                    command: HeaterCommand::Off,
                    sequence: 1,
                }),
                building_id: Some(BuildingId::parse("b").unwrap()),
                ..Default::default()
            },
        ];
        for parts in cases {
            cache.set_control(i, parts.clone().into());
            assert_eq!(ControlParts::from(cache.control(i)), parts);
        }
        assert_eq!(cache.buildings.len(), 2, "buildings are interned");
        assert!(
            cache.wide_revisions.is_empty() && cache.wide_sequences.is_empty(),
            "wide values leave the side tables once they are narrow again"
        );
        assert_eq!(cache.partition(i), None);
        cache.set_partition(i, 3);
        cache.set_control(i, SensorControl::default());
        assert_eq!(
            cache.partition(i),
            Some(3),
            "the partition is not part of the control"
        );
    }

    fn event(sensor: &str, building: &str, sequence: u64) -> pb::HeaterCommandEvent {
        pb::HeaterCommandEvent {
            sensor_id: sensor.into(),
            building_id: building.into(),
            command: pb::HeaterCommand::Off.into(),
            reason: pb::CommandReason::SetpointDeleted.into(),
            setpoint_revision: -7,
            temperature_celsius: Some(23.25),
            reading_time: Some(prost_types::Timestamp {
                seconds: -86_400,
                nanos: 999_999_999,
            }),
            decided_at: Some(prost_types::Timestamp {
                seconds: 1_800_000_000,
                nanos: 1,
            }),
            sequence,
            snapshot: false,
            setpoint_level: pb::SetpointLevel::Override.into(),
            level_revision: -8,
            trace_parent: String::new(),
            limit: pb::HeaterLimit::KeepAlive.into(),
            switched_at: Some(prost_types::Timestamp {
                seconds: 1_799_999_000,
                nanos: 5,
            }),
        }
    }

    fn building(s: &str) -> BuildingId {
        BuildingId::parse(s).unwrap()
    }

    #[test]
    fn last_events_round_trip_with_their_own_building() {
        let mut cache = Cache::default();
        let (a, b) = (
            cache.find_or_insert(&id("a/s")).unwrap(),
            cache.find_or_insert(&id("a/t")).unwrap(),
        );
        assert_eq!(cache.last_event(b), None);
        assert_eq!(cache.last_event_sequence(b), None);
        // The slot says building "a"; the event was sent while the sensor was in "old".
        let setpoint = Setpoint::new(id("a/t"), building("a"), 20.0, 0.5, 0.5).unwrap();
        let mut control = cache.control(b);
        control.apply_setpoint(1, Some(setpoint), DateTime::from_timestamp(1, 0).unwrap());
        cache.set_control(b, control);
        let sent = event("a/t", "old", u64::MAX);
        cache.set_last_event(b, &sent, &building("old"), 1);
        assert_eq!(cache.last_event(b), Some(sent));
        assert_eq!(cache.last_event_sequence(b), Some(u64::MAX));
        assert_eq!(
            cache.last_event(a),
            None,
            "an earlier sensor gains no event"
        );
        let replaced = pb::HeaterCommandEvent {
            command: pb::HeaterCommand::On.into(),
            reason: pb::CommandReason::TooCold.into(),
            reading_time: None,
            ..event("a/t", "a", 2)
        };
        cache.set_last_event(b, &replaced, &building("a"), 1);
        assert_eq!(cache.last_event(b), Some(replaced));
        assert!(
            cache.wide_event_sequences.is_empty(),
            "a narrow sequence forgets the wide one"
        );
        assert_eq!(
            cache.buildings.len(),
            2,
            "event buildings are interned with the slots'"
        );
    }

    #[test]
    fn what_thermostat_never_writes_is_stored_as_unspecified_or_absent() {
        let mut cache = Cache::default();
        let i = cache.find_or_insert(&id("s")).unwrap();
        let foreign = pb::HeaterCommandEvent {
            command: 3,
            reason: 99,
            // Nanoseconds out of range.
            reading_time: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 1_000_000_000,
            }),
            // After 2262.
            decided_at: Some(prost_types::Timestamp {
                seconds: i64::MAX / 1_000_000_000 + 1,
                nanos: 0,
            }),
            ..event("s", "b", 1)
        };
        cache.set_last_event(i, &foreign, &building("b"), 1);
        assert_eq!(
            cache.last_event(i),
            Some(pb::HeaterCommandEvent {
                command: 0,
                reason: 0,
                reading_time: None,
                decided_at: None,
                ..foreign
            })
        );
    }

    #[test]
    fn last_events_are_filtered_by_sensor_and_building() {
        let mut cache = Cache::default();
        for (sensor, b) in [("x/1", "x"), ("x/2", "x"), ("y/1", "y"), ("y/2", "")] {
            let i = cache.find_or_insert(&id(sensor)).unwrap();
            if !b.is_empty() {
                cache.set_last_event(i, &event(sensor, b, 1), &building(b), 1);
            }
        }
        let sensors = |ids: &[&str]| ids.iter().map(|s| id(s)).collect::<HashSet<_>>();
        let found = |Scan { events, next, .. }: Scan| {
            assert_eq!(next, None, "everything fits one part");
            let mut ids: Vec<String> = events.into_iter().map(|e| e.sensor_id).collect();
            ids.sort();
            ids
        };
        let all = |sensors: &HashSet<SensorId>, b: Option<&BuildingId>| {
            let named = b.map(|b| vec![b]);
            cache.last_events(sensors, named.as_deref(), |_, _| true, 0, 100)
        };
        assert_eq!(found(all(&sensors(&[]), None)), ["x/1", "x/2", "y/1"]);
        assert_eq!(
            found(all(&sensors(&[]), Some(&building("x")))),
            ["x/1", "x/2"]
        );
        assert_eq!(
            found(all(&sensors(&["x/2", "y/1", "y/2", "unknown"]), None)),
            ["x/2", "y/1"]
        );
        assert_eq!(
            found(all(&sensors(&["x/2", "y/1"]), Some(&building("y")))),
            ["y/1"]
        );
        assert!(found(all(&sensors(&[]), Some(&building("never-seen")))).is_empty());
    }

    #[test]
    fn last_events_are_filtered_by_the_number_they_were_kept_with() {
        let mut cache = Cache::default();
        for n in 0..6u64 {
            let sensor = format!("b/s-{n}");
            let i = cache.find_or_insert(&id(&sensor)).unwrap();
            cache.set_last_event(i, &event(&sensor, "b", 1), &building("b"), 10 * n);
        }
        // Kept again with another number: the later one counts.
        cache.set_last_event(1, &event("b/s-1", "b", 2), &building("b"), 99);
        let Scan { events, next, .. } = cache.last_events(
            &HashSet::new(),
            None,
            |i, number| number > 10 * u64::from(i) + 5 || i == 4,
            0,
            100,
        );
        assert_eq!(next, None);
        let ids: Vec<String> = events.into_iter().map(|e| e.sensor_id).collect();
        assert_eq!(ids, ["b/s-1", "b/s-4"]);
    }

    #[test]
    fn a_part_looks_at_no_more_sensors_than_the_scan_limit() {
        let mut cache = Cache::default();
        let total = 2 * SCAN_LIMIT + 10;
        for n in 0..total {
            cache.find_or_insert(&id(&format!("s-{n}"))).unwrap();
        }
        let with_events = [5, SCAN_LIMIT + 3, total - 1];
        for i in with_events {
            let sensor = cache.id(i).to_owned();
            cache.set_last_event(i, &event(&sensor, "b", 1), &building("b"), 1);
        }
        let (mut parts, mut from) = (Vec::new(), Some(0));
        while let Some(start) = from {
            let Scan { events, next, .. } =
                cache.last_events(&HashSet::new(), None, |_, _| true, start, 1024);
            assert!(next.is_none_or(|next| next - start <= SCAN_LIMIT));
            parts.push(events.into_iter().map(|e| e.sensor_id).collect::<Vec<_>>());
            from = next;
        }
        let expected: Vec<Vec<String>> =
            with_events.iter().map(|i| vec![format!("s-{i}")]).collect();
        assert_eq!(parts, expected, "one sensor in each scan");
    }

    #[test]
    fn named_buildings_come_in_parts_that_cover_each_of_their_sensors_once() {
        let mut cache = Cache::default();
        let names = ["b0", "b1", "b2"].map(building);
        for n in 0..30 {
            cache.find_or_insert(&id(&format!("s-{n}"))).unwrap();
        }
        // Events arrive in any order of the sensors' indexes.
        for n in (0..30).rev() {
            let sensor = format!("s-{n}");
            let b = &names[n % 3];
            cache.set_last_event(n as SensorIndex, &event(&sensor, b.as_str(), 1), b, 1);
        }
        // One moves from b1 into b0.
        cache.set_last_event(4, &event("s-4", "b0", 2), &names[0], 2);
        let expected: Vec<String> = (0..30)
            .filter(|n| n % 3 != 1 || *n == 4)
            .map(|n| format!("s-{n}"))
            .collect();
        for limit in 1..=8 {
            let (mut got, mut from) = (Vec::new(), Some(0));
            while let Some(start) = from {
                let part = cache.last_events(
                    &HashSet::new(),
                    Some(&[&names[0], &names[2]]),
                    |_, _| true,
                    start,
                    limit,
                );
                assert!(part.events.len() <= limit);
                // At most limit + 2 looked at in each of the two buildings, whatever the cache.
                assert!(part.examined <= 2 * (limit as u64 + 2), "{}", part.examined);
                got.extend(part.events.into_iter().map(|e| e.sensor_id));
                from = part.next;
            }
            assert_eq!(got, expected, "limit {limit}");
        }
    }

    #[test]
    fn a_small_building_is_answered_without_walking_a_large_one() {
        let mut cache = Cache::default();
        let (big, small) = (building("big"), building("small"));
        for n in 0..20_000 {
            let sensor = format!("big/{n}");
            let i = cache.find_or_insert(&id(&sensor)).unwrap();
            cache.set_last_event(i, &event(&sensor, "big", 1), &big, 1);
        }
        let i = cache.find_or_insert(&id("small/1")).unwrap();
        cache.set_last_event(i, &event("small/1", "small", 1), &small, 1);
        let scan = |named: &[&BuildingId]| {
            cache.last_events(&HashSet::new(), Some(named), |_, _| true, 0, 1024)
        };
        let part = scan(&[&small]);
        assert_eq!((part.events.len(), part.next, part.examined), (1, None, 1));
        let nowhere = scan(&[&building("empty")]);
        assert_eq!(
            (nowhere.events.len(), nowhere.next, nowhere.examined),
            (0, None, 0)
        );
        assert_eq!(scan(&[]).examined, 0);
    }

    #[test]
    fn last_events_come_in_parts_that_cover_each_sensor_once() {
        let mut cache = Cache::default();
        for n in 0..10 {
            let sensor = format!("b/s-{n}");
            let i = cache.find_or_insert(&id(&sensor)).unwrap();
            // Every third sensor has had no command.
            if n % 3 != 1 {
                cache.set_last_event(i, &event(&sensor, "b", 1), &building("b"), 1);
            }
        }
        let with_events: Vec<String> = (0..10)
            .filter(|n| n % 3 != 1)
            .map(|n| format!("b/s-{n}"))
            .collect();
        let everything = HashSet::new();
        let some: HashSet<SensorId> = ["b/s-9", "b/s-0", "b/s-5", "b/s-1"]
            .into_iter()
            .map(id)
            .collect();
        for (sensors, expected) in [
            (&everything, with_events.clone()),
            (&some, vec!["b/s-0".into(), "b/s-5".into(), "b/s-9".into()]),
        ] {
            for limit in 1..=8 {
                let (mut got, mut from) = (Vec::new(), Some(0));
                while let Some(start) = from {
                    let Scan { events, next, .. } =
                        cache.last_events(sensors, None, |_, _| true, start, limit);
                    assert!(events.len() <= limit);
                    assert!(
                        next.is_none() || events.len() == limit,
                        "only the last part is short"
                    );
                    got.extend(events.into_iter().map(|e| e.sensor_id));
                    from = next;
                }
                assert_eq!(got, expected, "limit {limit}");
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn every_event_thermostat_can_write_round_trips(
            command in 0..=2i32,
            reason in 0..=9i32,
            limit in 0..=5i32,
            switched in proptest::option::of((-9_223_372_035i64..=9_223_372_035, 0..1_000_000_000i32)),
            revision: i64,
            sequence: u64,
            temperature in proptest::option::of(proptest::num::f64::ANY),
            times in proptest::option::of((-9_223_372_035i64..=9_223_372_035, 0..1_000_000_000i32)),
            decided in (-9_223_372_035i64..=9_223_372_035, 0..1_000_000_000i32),
            level in proptest::sample::select(vec![1, 3, 4]),
            level_revision: i64,
        ) {
            let mut cache = Cache::default();
            let i = cache.find_or_insert(&id("b/s")).unwrap();
            let stamp = |(seconds, nanos)| prost_types::Timestamp { seconds, nanos };
            let sent = pb::HeaterCommandEvent {
                sensor_id: "b/s".into(),
                building_id: "b".into(),
                command,
                reason,
                setpoint_revision: revision,
                temperature_celsius: temperature,
                reading_time: times.map(stamp),
                decided_at: Some(stamp(decided)),
                sequence,
                snapshot: false,
                setpoint_level: level,
                level_revision,
                limit,
                switched_at: Some(stamp(switched.unwrap_or(decided))),
                trace_parent: String::new(),
            };
            cache.set_last_event(i, &sent, &building("b"), 1);
            let back = cache.last_event(i).unwrap();
            // Bit for bit; NaN (never written by thermostat) comes back absent.
            proptest::prop_assert_eq!(
                back.temperature_celsius.map(f64::to_bits),
                temperature.filter(|t| !t.is_nan()).map(f64::to_bits)
            );
            let temperature_celsius = back.temperature_celsius;
            proptest::prop_assert_eq!(
                back,
                pb::HeaterCommandEvent { temperature_celsius, ..sent }
            );
        }
    }

    /// `1_800_000_000 + s` seconds since the epoch.
    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    /// A cache of one sensor of building "b", controlled (20 °C ± 0.5) or not, with a reading
    /// `(at, °C)`, a last command (ON or OFF) and controlled since `since`, as given.
    fn cached(
        controlled: bool,
        reading: Option<(i64, f64)>,
        command: Option<bool>,
        since: Option<i64>,
    ) -> (Cache, SensorIndex) {
        let setpoint = Setpoint::new(id("s"), BuildingId::parse("b").unwrap(), 20.0, 0.5, 0.5);
        let parts = ControlParts {
            band: controlled.then(|| Band::from(&setpoint.unwrap())),
            revision: 1,
            last_reading: reading.map(|(r, celsius)| Reading {
                temperature: Celsius::new(celsius).unwrap(),
                time: at(r),
                received: at(r),
            }),
            last_command: command.map(|on| LastCommand {
                command: if on {
                    HeaterCommand::On
                } else {
                    HeaterCommand::Off
                },
                sequence: 1,
            }),
            building_id: Some(BuildingId::parse("b").unwrap()),
            controlled_since: since.map(at),
        };
        let mut cache = Cache::default();
        let i = cache.find_or_insert(&id("s")).unwrap();
        cache.set_control(i, parts.into());
        (cache, i)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// The filter ahead of the fail-safe passes over no sensor the fail-safe would turn OFF
        /// (times in whole seconds; silence heard until the round's own time half the time).
        #[test]
        fn a_sensor_the_fail_safe_would_turn_off_is_never_passed_over(
            controlled in proptest::bool::ANY,
            reading in proptest::option::of(0i64..200),
            since in proptest::option::of(0i64..200),
            command in proptest::option::of(proptest::bool::ANY),
            heard_until in proptest::prop_oneof![proptest::strategy::Just(200i64), 0i64..200],
            watched_since in 0i64..100,
            stale_after in 0i64..100,
        ) {
            let (cache, i) = cached(controlled, reading.map(|r| (r, 19.0)), command, since);
            let stale_after = chrono::TimeDelta::seconds(stale_after);
            // The round runs at `now`; silence is heard until then at the latest.
            let now = at(200);
            let decided = cache
                .control(i)
                .on_tick(at(heard_until), stale_after, at(watched_since));
            if decided.is_some() {
                proptest::prop_assert!(cache.may_go_stale(i, now - stale_after));
            }
        }

        /// The filter ahead of re-evaluation passes over no sensor it would decide for, in or
        /// out of service.
        #[test]
        fn a_sensor_reevaluation_would_decide_for_is_never_passed_over(
            controlled in proptest::bool::ANY,
            reading in proptest::option::of((0i64..200, 15.0f64..25.0)),
            command in proptest::option::of(proptest::bool::ANY),
            release in proptest::option::of(proptest::bool::ANY),
            stale_after in 0i64..100,
        ) {
            let since = (controlled && reading.is_none()).then_some(0);
            let (cache, i) = cached(controlled, reading, command, since);
            let decided = cache
                .control(i)
                .out_of_service(release)
                .reevaluate(at(200), chrono::TimeDelta::seconds(stale_after));
            if decided.is_some() {
                proptest::prop_assert!(cache.may_be_owed(i));
            }
        }
    }
}
