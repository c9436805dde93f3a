//! The subscription feed: heater command events as subscribers receive them.
//!
//! The engine numbers every event it keeps as a sensor's last ([`Numbering`]), broadcasts those
//! that are news ([`LiveEvent`]) and answers snapshot parts from its cache ([`answer`]). A
//! [`Subscription`] is one client's stream: snapshot parts, then live events, caught up or
//! ended when it falls behind. The API opens one through `ControlHandle::open_feed`.

mod subscription;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio::sync::broadcast;

pub use subscription::{Caller, FeedEnd, Start, Subscription, Update};

use super::cache::{Cache, Scan, SensorIndex};
use crate::domain::{BuildingId, Scope, SensorId};
use crate::proto::v1 as pb;

/// Last command events are handed out at most this many at a time (and from at most
/// `cache::SCAN_LIMIT` sensors): a subscriber's snapshot of a million heaters is built part by
/// part as it is sent, not all at once (it would be some 200 MB, and the engine would stop
/// deciding while it built it).
const SNAPSHOT_PART: usize = 1024;

/// Which heaters a subscriber wants and may see: empty sets mean "all".
#[derive(Debug, Clone)]
pub struct Filter {
    pub sensors: HashSet<SensorId>,
    pub building: Option<BuildingId>,
    /// The caller's buildings: commands of others never match, whatever the rest says.
    pub scope: Scope,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            sensors: HashSet::new(),
            building: None,
            scope: Scope::All,
        }
    }
}

impl Filter {
    pub fn matches(&self, event: &pb::HeaterCommandEvent) -> bool {
        self.admits(&event.sensor_id, &event.building_id)
    }

    /// Whether the heater of `sensor`, in `building`, is one the subscriber wants and may see.
    pub fn admits(&self, sensor: &str, building: &str) -> bool {
        self.building
            .as_ref()
            .is_none_or(|b| b.as_str() == building)
            && (self.sensors.is_empty() || self.sensors.contains(sensor))
            && self.scope.contains_str(building)
    }

    /// The buildings whose heaters can match; `None`: any.
    fn buildings(&self) -> Option<Vec<&BuildingId>> {
        match (&self.building, &self.scope) {
            (Some(b), scope) => Some(if scope.contains(b) { vec![b] } else { vec![] }),
            (None, Scope::All) => None,
            (None, Scope::Buildings(set)) => Some(set.iter().collect()),
        }
    }
}

/// A command event that is news for its sensor, as subscribers receive it, numbered in the
/// order the engine kept it as the sensor's last (ours when decided, others' when read): a
/// snapshot part taken after the number reflects it ([`SnapshotCoverage`]). Repeats and older
/// events are never broadcast.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    pub number: u64,
    pub sensor: SensorIndex,
    pub event: Arc<pb::HeaterCommandEvent>,
}

/// Where a part of a snapshot starts; the default is the beginning of a whole snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotCursor {
    from: SensorIndex,
    /// For a catch-up: only heaters whose last event is newer than what these parts sent.
    newer_than: Option<Arc<SnapshotCoverage>>,
}

impl SnapshotCursor {
    /// The beginning of a catch-up: a snapshot of only the heaters whose last command is newer
    /// than what `sent` covers, for a subscriber that missed live events after it.
    pub fn catch_up(sent: SnapshotCoverage) -> Self {
        Self {
            from: 0,
            newer_than: Some(Arc::new(sent)),
        }
    }
}

/// Part of a snapshot: the last command events of matching heaters whose index in the cache is
/// from `from` up to where the next part starts (or on, for the last part), as they were after
/// the live event numbered `live_through`.
#[derive(Debug, Default)]
pub struct SnapshotPart {
    pub events: Vec<pb::HeaterCommandEvent>,
    /// Where the next part starts; `None` after the last.
    pub next: Option<SnapshotCursor>,
    from: SensorIndex,
    live_through: u64,
}

/// What the snapshot parts a subscription has sent cover: per part, where it starts and the
/// number of the last event it reflects. A live event is already covered when the part its
/// sensor falls in was taken after the event was numbered; otherwise it is newer than what was
/// sent. Parts cover consecutive ranges of sensor indexes from 0, the last one open-ended. 12
/// bytes per 1024 heaters sent: a subscription no longer keeps a map of every heater it sent.
#[derive(Debug, Default)]
pub struct SnapshotCoverage {
    parts: Vec<(SensorIndex, u64)>,
}

impl SnapshotCoverage {
    /// Records a part as sent; parts must be added in the order they were taken.
    pub fn add(&mut self, part: &SnapshotPart) {
        self.parts.push((part.from, part.live_through));
    }

    /// Whether a part already sent reflects `live` (or a newer event of its sensor).
    pub fn covers(&self, live: &LiveEvent) -> bool {
        self.covers_number(live.sensor, live.number)
    }

    /// Whether a part already sent reflects the sensor's event numbered `number`.
    fn covers_number(&self, sensor: SensorIndex, number: u64) -> bool {
        let after = self.parts.partition_point(|&(from, _)| from <= sensor);
        after > 0 && number <= self.parts[after - 1].1
    }
}

/// The part of a snapshot that starts at `from`, from the engine's cache as it is after the
/// live event numbered `live_through`; and how many sensors it looked at.
pub fn answer(
    cache: &Cache,
    filter: &Filter,
    SnapshotCursor { from, newer_than }: SnapshotCursor,
    live_through: u64,
) -> (SnapshotPart, u64) {
    let buildings = filter.buildings();
    let Scan {
        events,
        next,
        examined,
    } = cache.last_events(
        &filter.sensors,
        buildings.as_deref(),
        |i, number| {
            newer_than
                .as_ref()
                .is_none_or(|sent| !sent.covers_number(i, number))
        },
        from,
        SNAPSHOT_PART,
    );
    let part = SnapshotPart {
        events,
        next: next.map(|from| SnapshotCursor { from, newer_than }),
        from,
        live_through,
    };
    (part, examined)
}

/// The engine's side of the feed: numbers the events it keeps as sensors' last, and broadcasts
/// those that are news. What is broadcast for a sensor goes up in sequence.
pub struct Numbering {
    live: broadcast::Sender<LiveEvent>,
    /// The number of the last command event kept as a sensor's last.
    last: u64,
    /// The numbers of this replica's decisions not read back yet, by sensor and sequence: as
    /// many as are on their way to the topic and back. Ordered, to drop a sensor's older ones.
    awaiting_readback: BTreeMap<(SensorIndex, u64), u64>,
}

impl Numbering {
    pub fn new(live: broadcast::Sender<LiveEvent>) -> Self {
        Self {
            live,
            last: 0,
            awaiting_readback: BTreeMap::new(),
        }
    }

    /// The number of the last event kept: a snapshot part taken now reflects every event up to
    /// it.
    pub fn through(&self) -> u64 {
        self.last
    }

    /// Numbers one of this replica's decisions, kept as its sensor's last now: subscribers get
    /// it once it is read back from the topic, with this number.
    pub fn own(&mut self, sensor: SensorIndex, sequence: u64) -> u64 {
        self.last += 1;
        self.awaiting_readback.insert((sensor, sequence), self.last);
        self.last
    }

    /// Whether this replica's decision `sequence` for `sensor` is on its way back from the topic.
    pub fn awaits(&self, sensor: SensorIndex, sequence: u64) -> bool {
        self.awaiting_readback.contains_key(&(sensor, sequence))
    }

    /// The number of an event read back from the command topic if it is news: one of this
    /// replica's own decisions (the number it got when decided, so that a snapshot taken in
    /// between covers it), or newer than `kept`, the sequence of the sensor's last event.
    /// `None`: already passed on, or older than what was.
    pub fn read_back(
        &mut self,
        sensor: SensorIndex,
        sequence: u64,
        kept: Option<u64>,
    ) -> Option<u64> {
        let number = match self.awaiting_readback.remove(&(sensor, sequence)) {
            Some(number) => number,
            None if kept.is_none_or(|kept| sequence > kept) => {
                self.last += 1;
                self.last
            }
            None => return None,
        };
        // Decisions of ours for this sensor still awaited with a lower sequence would now come
        // out of order (a retried write that lands late): subscribers never get them.
        let superseded: Vec<_> = self
            .awaiting_readback
            .range((sensor, 0)..(sensor, sequence))
            .map(|(key, _)| *key)
            .collect();
        for key in superseded {
            self.awaiting_readback.remove(&key);
        }
        Some(number)
    }

    /// Broadcasts an event [`Numbering::read_back`] numbered.
    pub fn publish(&self, number: u64, sensor: SensorIndex, event: Arc<pb::HeaterCommandEvent>) {
        // No subscriber is not an error.
        let _ = self.live.send(LiveEvent {
            number,
            sensor,
            event,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(from: SensorIndex, live_through: u64) -> SnapshotPart {
        SnapshotPart {
            from,
            live_through,
            ..SnapshotPart::default()
        }
    }

    fn live(sensor: SensorIndex, number: u64) -> LiveEvent {
        LiveEvent {
            number,
            sensor,
            event: Arc::default(),
        }
    }
    #[test]
    fn a_filter_matches_its_sensors_in_its_building() {
        let event = |sensor: &str, building: &str| pb::HeaterCommandEvent {
            sensor_id: sensor.into(),
            building_id: building.into(),
            ..Default::default()
        };
        let filter = |sensors: &[String], building: Option<&str>| Filter {
            sensors: sensors
                .iter()
                .map(|id| SensorId::parse(id.as_str()).unwrap())
                .collect(),
            building: building.map(|b| BuildingId::parse(b).unwrap()),
            ..Filter::default()
        };
        let many: Vec<String> = (0..100).map(|n| format!("b/s-{n}")).collect();
        for (filter, sensor, building, matches) in [
            (filter(&[], None), "x", "y", true),
            (filter(&many, None), "b/s-57", "y", true),
            (filter(&many, None), "b/s-100", "b", false),
            (filter(&many, Some("b")), "b/s-0", "b", true),
            (filter(&many, Some("b")), "b/s-0", "c", false),
            (filter(&[], Some("b")), "any", "b", true),
            (filter(&[], Some("b")), "any", "bb", false),
        ] {
            assert_eq!(
                filter.matches(&event(sensor, building)),
                matches,
                "{sensor} in {building}"
            );
        }
    }

    #[test]
    fn nothing_is_covered_without_a_snapshot() {
        let sent = SnapshotCoverage::default();
        assert!(!sent.covers(&live(0, 1)));
        assert!(!sent.covers(&live(7, 1)));
    }

    #[test]
    fn a_live_event_is_covered_by_the_part_of_its_sensor_taken_after_it() {
        let mut sent = SnapshotCoverage::default();
        // Sensors 0..10 as of event 5, 10..20 as of 8, 20.. as of 12.
        for (from, through) in [(0, 5), (10, 8), (20, 12)] {
            sent.add(&part(from, through));
        }
        for (sensor, number, covered) in [
            (0, 5, true),
            (9, 5, true),
            (9, 6, false),
            (10, 8, true),
            (19, 8, true),
            (19, 9, false),
            (20, 12, true),
            // A sensor cached after the last part was taken: the last part is open-ended.
            (1_000_000, 12, true),
            (20, 1, true),
        ] {
            assert_eq!(
                sent.covers(&live(sensor, number)),
                covered,
                "sensor {sensor}, event {number}"
            );
        }
        assert!(!sent.covers(&live(0, 13)));
        // Numbered before the part was taken, broadcast after the newer ones (this replica's
        // own decision read back): still covered.
        assert!(sent.covers(&live(3, 2)));
    }
}
