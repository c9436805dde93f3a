//! What the control loop did and is doing: counts, flags and times its tasks share, read by
//! health, the tests, the stopped log line and, at each scrape, the metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use chrono::{DateTime, Utc};

use super::codec::DeadLetter;
use crate::domain::control::{CommandReason, HeaterCommand};
use crate::telemetry;

/// What the loop did and is doing, shared by its tasks. Each count is kept once, here; the
/// metrics are read from it at each scrape ([`telemetry::Counts`]).
#[derive(Debug, Default)]
pub struct LoopStats {
    pub readings: AtomicU64,
    pub out_of_order: AtomicU64,
    /// Readings of sensors the cache had no room for.
    pub untracked: AtomicU64,
    /// Sensors looked at to answer subscribers' snapshots.
    pub snapshot_examined: AtomicU64,
    /// By [`DeadLetter::KINDS`].
    dead_letters: [AtomicU64; DeadLetter::KINDS.len()],
    /// By command and reason, as [`COMMANDS`] and [`REASONS`] list them.
    commands: [[AtomicU64; REASONS.len()]; COMMANDS.len()],
    /// Sensor-topic partitions currently assigned to this replica.
    pub assigned: AtomicU64,
    /// Whether newly assigned partitions have waited longer than a few seconds for the command
    /// topic to be read (a partition of it without a leader, say): none of them is decided.
    pub catching_up: AtomicBool,
    /// Sensor partitions with records behind and no committed progress for a minute, group-wide
    /// (stream::group_lag).
    pub stalled_partitions: AtomicU64,
    /// Since when the readings task has not been waiting for records (none while it is).
    pub deaf_since: SharedTime,
    /// Since when the broker has not answered the health probe (none while it does).
    pub broker_down_since: SharedTime,
    /// How often the broker answered again after not answering.
    pub broker_returns: AtomicU64,
    /// Full reads of the setpoint table completed (stream::setpoint_sync).
    pub resyncs: AtomicU64,
    /// Setpoints, at the last full read, whose band no accepted reading could switch (stored
    /// before `READING_RANGE_CELSIUS` was narrowed: Puts of such bands are refused).
    pub out_of_reach: AtomicU64,
}

impl LoopStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn assigned_partitions(&self) -> u64 {
        Self::get(&self.assigned)
    }

    /// Whether the broker answered a probe sent at `asked`.
    pub(crate) fn broker_answered(&self, reachable: bool, asked: DateTime<Utc>) {
        if !reachable {
            self.broker_down_since.set_if_none(asked);
        } else if self.broker_down_since.clear() {
            self.broker_returns.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether the readings task is waiting for records now (`false`: busy or held back).
    pub(crate) fn listening(&self, listening: bool) {
        if listening {
            self.deaf_since.clear();
        } else {
            self.deaf_since.set_if_none(Utc::now());
        }
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dead_lettered_for(&self, reason: &DeadLetter) {
        Self::bump(&self.dead_letters[reason.kind()]);
    }

    /// Sensor records dead-lettered, for every reason.
    pub fn dead_lettered(&self) -> u64 {
        self.dead_letters.iter().map(Self::get).sum()
    }

    pub(crate) fn command(&self, command: HeaterCommand, reason: CommandReason) {
        Self::bump(&self.commands[command as usize][reason as usize]);
    }

    /// Commands decided, of every kind and reason.
    pub fn commands(&self) -> u64 {
        self.commands.iter().flatten().map(Self::get).sum()
    }
}

const COMMANDS: [(HeaterCommand, &str); 2] =
    [(HeaterCommand::On, "On"), (HeaterCommand::Off, "Off")];
const REASONS: [(CommandReason, &str); 9] = [
    (CommandReason::TooCold, "TooCold"),
    (CommandReason::TooHot, "TooHot"),
    (CommandReason::SetpointDeleted, "SetpointDeleted"),
    (CommandReason::SensorStale, "SensorStale"),
    (CommandReason::DeferredTooCold, "DeferredTooCold"),
    (CommandReason::DeferredTooHot, "DeferredTooHot"),
    (CommandReason::MaxRunTime, "MaxRunTime"),
    (CommandReason::OutOfService, "OutOfService"),
    (CommandReason::KeepAlive, "KeepAlive"),
];

impl telemetry::Counts for LoopStats {
    fn counts(&self, out: &mut Vec<telemetry::Count>) {
        for (name, counter) in [
            (telemetry::READINGS, &self.readings),
            (telemetry::READINGS_OUT_OF_ORDER, &self.out_of_order),
            (telemetry::READINGS_UNTRACKED, &self.untracked),
            (telemetry::SNAPSHOT_EXAMINED, &self.snapshot_examined),
        ] {
            out.push(telemetry::Count::new(name, Self::get(counter)));
        }
        // Labelled counters appear once they count, as when they were registered at first use.
        for (kind, counter) in DeadLetter::KINDS.iter().zip(&self.dead_letters) {
            let total = Self::get(counter);
            if total > 0 {
                out.push(
                    telemetry::Count::new(telemetry::DEAD_LETTERS, total).label("reason", kind),
                );
            }
        }
        for ((_, command), by_reason) in COMMANDS.iter().zip(&self.commands) {
            for ((_, reason), counter) in REASONS.iter().zip(by_reason) {
                let total = Self::get(counter);
                if total > 0 {
                    out.push(
                        telemetry::Count::new(telemetry::COMMANDS, total)
                            .label("command", command)
                            .label("reason", reason),
                    );
                }
            }
        }
    }
}

/// A time shared between tasks, or none: milliseconds since the epoch, 0 for none.
#[derive(Debug, Default)]
pub struct SharedTime(std::sync::atomic::AtomicI64);

impl SharedTime {
    pub fn get(&self) -> Option<DateTime<Utc>> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            millis => DateTime::from_timestamp_millis(millis),
        }
    }

    fn set_if_none(&self, time: DateTime<Utc>) {
        let millis = time.timestamp_millis().max(1);
        let _ = self
            .0
            .compare_exchange(0, millis, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Whether there was a time.
    fn clear(&self) -> bool {
        self.0.swap(0, Ordering::Relaxed) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry::{Count, Counts};

    #[test]
    fn labels_name_each_command_and_reason_at_its_place() {
        for (i, (command, name)) in COMMANDS.iter().enumerate() {
            assert_eq!(
                (*command as usize, format!("{command:?}")),
                (i, name.to_string())
            );
        }
        for (i, (reason, name)) in REASONS.iter().enumerate() {
            assert_eq!(
                (*reason as usize, format!("{reason:?}")),
                (i, name.to_string())
            );
        }
    }

    #[test]
    fn each_count_is_exported_once_under_its_labels() {
        let stats = LoopStats::default();
        stats.command(HeaterCommand::Off, CommandReason::SensorStale);
        stats.command(HeaterCommand::Off, CommandReason::SensorStale);
        stats.command(HeaterCommand::On, CommandReason::TooCold);
        stats.dead_lettered_for(&DeadLetter::MissingKey);
        LoopStats::bump(&stats.readings);
        let mut counts = Vec::new();
        stats.counts(&mut counts);
        counts.sort();
        let mut expected = vec![
            Count::new(telemetry::READINGS, 1),
            Count::new(telemetry::READINGS_OUT_OF_ORDER, 0),
            Count::new(telemetry::READINGS_UNTRACKED, 0),
            Count::new(telemetry::SNAPSHOT_EXAMINED, 0),
            Count::new(telemetry::DEAD_LETTERS, 1).label("reason", "missing_key"),
            Count::new(telemetry::COMMANDS, 2)
                .label("command", "Off")
                .label("reason", "SensorStale"),
            Count::new(telemetry::COMMANDS, 1)
                .label("command", "On")
                .label("reason", "TooCold"),
        ];
        expected.sort();
        assert_eq!(counts, expected);
        assert_eq!((stats.commands(), stats.dead_lettered()), (3, 1));
    }
}
