//! The engine's side of commanded against reported: the last report of every heater that
//! reports (few, next to the sensors: a map, not a slot field), which of them do not follow
//! their command, and the status events subscribers are sent when that changes.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};
use tokio::sync::broadcast;

use super::cache::SensorIndex;
use super::codec::command_to_proto;
use crate::domain::control::HeaterCommand;
use crate::domain::feedback::{following, Reported};
use crate::proto::timestamp;
use crate::proto::v1 as pb;

/// A heater's last command, as the comparison needs it.
#[derive(Debug, Clone, Copy)]
pub struct Commanded {
    pub command: HeaterCommand,
    pub sequence: u64,
    pub switched_at: DateTime<Utc>,
}

pub struct Feedback {
    timeout: TimeDelta,
    reported: HashMap<SensorIndex, Reported>,
    /// Heaters that do not follow their command.
    not_following: HashSet<SensorIndex>,
    /// When a heater's `following` last changed.
    since: HashMap<SensorIndex, DateTime<Utc>>,
    statuses: broadcast::Sender<pb::HeaterStatus>,
}

impl Feedback {
    pub fn new(timeout: TimeDelta, statuses: broadcast::Sender<pb::HeaterStatus>) -> Self {
        Self {
            timeout,
            reported: HashMap::new(),
            not_following: HashSet::new(),
            since: HashMap::new(),
            statuses,
        }
    }

    /// Keeps `report` if it is not older than the one kept.
    pub fn report(&mut self, i: SensorIndex, report: Reported) {
        if report.supersedes(self.reported.get(&i)) {
            self.reported.insert(i, report);
        }
    }

    pub fn reporting(&self) -> impl Iterator<Item = SensorIndex> + '_ {
        self.reported.keys().copied()
    }

    pub fn is_following(&self, i: SensorIndex) -> bool {
        !self.not_following.contains(&i)
    }

    pub fn not_following_count(&self) -> usize {
        self.not_following.len()
    }

    /// Judges heater `i` against `commanded` at `now`; `true` when whether it follows changed.
    pub fn judge(&mut self, i: SensorIndex, commanded: &Commanded, now: DateTime<Utc>) -> bool {
        let Some(reported) = self.reported.get(&i) else {
            return false;
        };
        let follows = following(
            commanded.command,
            commanded.switched_at,
            reported,
            now,
            self.timeout,
        );
        if follows == self.is_following(i) {
            return false;
        }
        if follows {
            self.not_following.remove(&i);
        } else {
            self.not_following.insert(i);
        }
        self.since.insert(i, now);
        true
    }

    /// Heater `i`'s status, if it reports.
    pub fn status(
        &self,
        i: SensorIndex,
        sensor_id: &str,
        building_id: &str,
        commanded: Option<&Commanded>,
    ) -> Option<pb::HeaterStatus> {
        let reported = self.reported.get(&i)?;
        Some(pb::HeaterStatus {
            sensor_id: sensor_id.to_owned(),
            building_id: building_id.to_owned(),
            commanded: commanded.map_or(0, |c| command_to_proto(c.command) as i32),
            commanded_sequence: commanded.map_or(0, |c| c.sequence),
            commanded_at: commanded.map(|c| timestamp(c.switched_at)),
            reported: command_to_proto(reported.state) as i32,
            reported_at: Some(timestamp(reported.at)),
            following: self.is_following(i),
            since: self.since.get(&i).copied().map(timestamp),
        })
    }

    /// Sends `status` to live watches.
    pub fn publish(&self, status: pb::HeaterStatus) {
        // No watcher is not an error.
        let _ = self.statuses.send(status);
    }
}
