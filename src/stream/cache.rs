//! The engine's per-sensor state, packed: with a million sensors cached every byte per sensor
//! is a megabyte, and issue 4 asks for at most 100 B per sensor, index and id included.
//!
//! Layout: the sensor ids are concatenated in one string (`ids`); each sensor has a fixed-size
//! [`Slot`] in a vector, in the same order, holding its [`SensorControl`] packed into plain
//! numbers and flags (53 B); a hash table of slot numbers finds a sensor by id. Building ids are
//! interned (a few thousand at most, shared by their sensors). The last command event of a
//! sensor is kept whole, in a side table, only for sensors that have one. Sensors are never
//! removed (a deleted setpoint still needs its tombstone revision), which is what lets a slot's
//! id end where the next slot's begins.
//!
//! The decision rule is not here: a slot is unpacked into a [`SensorControl`], the domain
//! decides, and the result is packed back, so the rule's tests cover what runs.

use std::hash::BuildHasher;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

use super::StreamError;
use crate::domain::control::{
    Band, ControlParts, HeaterCommand, LastCommand, Reading, SensorControl,
};
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

/// One sensor, 53 bytes. Packed (no padding): fields are only ever copied in and out, never
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
    temperature: f64,
    lower: f64,
    upper: f64,
    /// The setpoint revision, or [`WIDE`].
    revision: u32,
    /// The last command's sequence, or [`WIDE`].
    sequence: u32,
}

/// Index of a sensor in the cache.
pub type SensorIndex = u32;

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
    wide_revisions: HashMap<SensorIndex, i64>,
    wide_sequences: HashMap<SensorIndex, u64>,
    last_events: HashMap<SensorIndex, Arc<pb::HeaterCommandEvent>>,
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

    pub fn is_controlled(&self, i: SensorIndex) -> bool {
        self.slots[i as usize].flags & flags::BAND != 0
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
                .map(|temperature| Reading { temperature, time }),
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
            slot.building = self.intern(old, building);
        }
        self.slots[i as usize] = slot;
    }

    /// The index of `building`, reusing the slot's previous one when it is the same building
    /// (the common case: no lookup).
    fn intern(&mut self, old: Slot, building: BuildingId) -> u32 {
        if old.flags & flags::BUILDING != 0 && self.buildings[old.building as usize] == building {
            return old.building;
        }
        if let Some(&b) = self.building_index.get(&building) {
            return b;
        }
        // At most one building per sensor, and sensors are counted in a u32.
        let b = self.buildings.len() as u32;
        self.buildings.push(building.clone());
        self.building_index.insert(building, b);
        b
    }

    pub fn last_event(&self, i: SensorIndex) -> Option<&Arc<pb::HeaterCommandEvent>> {
        self.last_events.get(&i)
    }

    pub fn set_last_event(&mut self, i: SensorIndex, event: Arc<pb::HeaterCommandEvent>) {
        self.last_events.insert(i, event);
    }

    pub fn last_events(&self) -> impl Iterator<Item = &Arc<pb::HeaterCommandEvent>> {
        self.last_events.values()
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

    #[test]
    fn a_slot_is_53_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 53);
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
}
