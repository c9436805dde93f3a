//! The engine: one task that owns the state of every sensor and applies, in order, everything
//! that changes it — readings, setpoint versions, commands read back from the command topic,
//! partition assignments, staleness ticks — and answers queries about it. Owning the map in one
//! task keeps the hot path free of locks.
//!
//! Decisions are produced to the command topic here; their delivery futures go, in input order,
//! to the readings task, which stores a reading's offset only once every command before it is
//! acknowledged. Readings come, and their acknowledgements go back, in batches: at 1% change
//! the hand-offs between the two tasks, one wake-up each way per reading, cost more than
//! deciding (BENCHMARKS.md, benchmark 1).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use rdkafka::producer::DeliveryFuture;
use tokio::sync::{broadcast, mpsc, oneshot, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::cache::{Cache, SensorIndex};
use super::codec::{command_event, observed_command};
use super::feed::{self, Filter, LiveEvent, Numbering, SnapshotCursor, SnapshotPart};
use super::feedback::{Commanded, Feedback};
use super::output::{Ack, Acks, CommandOut, Position, ReadingPartition};
use super::partitioner::partition_of;
use super::stats::LoopStats;
use super::StreamError;
use crate::config::SensorPartitioner;
use crate::domain::control::{CommandReason, Decision, Reading, ReadingOutcome, SensorControl};
use crate::domain::equipment::{HeaterSettings, Resolved};
use crate::domain::feedback::Reported;
use crate::domain::levels::Level;
use crate::domain::protection::{Protection, Switched};
use crate::domain::{BuildingId, SensorId};
use crate::proto::v1 as pb;
use crate::store::SetpointVersion;
use crate::{telemetry, traces};

/// A command read back from the command topic.
pub struct Observed {
    pub event: Arc<pb::HeaterCommandEvent>,
    pub reading_partition: Option<ReadingPartition>,
}

/// Everything the engine reacts to.
pub enum Input {
    /// Consecutive records of the sensor topic, in the order consumed.
    Records(Records),
    Setpoint(SetpointVersion),
    /// Every building's and sensor's heater settings, read again.
    Settings(Arc<HeaterSettings>),
    /// A heater's actual state, from the heater report topic.
    Report {
        sensor: SensorId,
        report: Reported,
    },
    /// Commands read back from the command topic, in the order read: those the consumer held
    /// together, one hand-off for them all.
    Observed(Vec<Observed>),
    /// The sensor-topic partitions this replica now consumes, and those of them whose readings
    /// decided on before are recalled first (re-evaluated at their `RecallDone`, not now).
    Assignment {
        partitions: Vec<i32>,
        recalling: Vec<i32>,
        /// The consumer's rebalance count it follows (see [`Revoke::generation`]).
        generation: u64,
        /// How many partitions the sensor topic has now, if the broker said.
        topic_partitions: Option<i32>,
    },
    Query(Query),
    /// Answered once every input sent before it has been applied.
    Barrier(oneshot::Sender<()>),
}

/// A batch of sensor-topic records.
pub struct Records {
    pub records: Vec<Record>,
    /// The batch's permits of the readings task's bound on records queued for the engine,
    /// given back when the batch has been applied.
    pub queue_permits: OwnedSemaphorePermit,
}

pub enum Record {
    Reading {
        sensor: SensorId,
        reading: Reading,
        position: Position,
        /// When the record was taken from the consumer, for the decision-latency metric.
        received: Instant,
        /// The remote span of the record's `traceparent`, when traces are on and it has one.
        trace: Option<opentelemetry::Context>,
    },
    /// A record that decided nothing by itself (dead-lettered): its offset may be stored once
    /// `delivery` (the dead-letter record) is acknowledged.
    Skip {
        position: Position,
        delivery: DeliveryFuture,
    },
    /// The consumer read `partition` to its end: nothing else waits there.
    End { partition: i32 },
    /// A reading decided on before, read again after a takeover (see `SensorControl::recall`).
    Recalled {
        sensor: SensorId,
        reading: Reading,
        partition: i32,
    },
    /// The readings decided on before are all recalled: what the partition's sensors owe is
    /// decided now.
    RecallDone { partition: i32 },
}

/// How this replica reads one of its sensor-topic partitions, for the staleness fail-safe.
#[derive(Debug, Clone, Copy)]
struct Watch {
    /// Silence counts from here: when the partition was taken, or the replica resumed after a
    /// stall (its readings waited meanwhile).
    since: DateTime<Utc>,
    /// When the partition was last read to its end; `None` before the first time.
    end_reached: Option<DateTime<Utc>>,
    /// Whether nothing was read from it since: silence then counts up to now.
    at_end: bool,
}

impl Watch {
    fn new(now: DateTime<Utc>) -> Self {
        Self {
            since: now,
            end_reached: None,
            at_end: false,
        }
    }

    /// Up to when silence on the partition is known: after it, readings may still wait there.
    fn heard_until(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.at_end {
            Some(now)
        } else {
            self.end_reached
        }
    }
}

/// Partitions the consumer gives up. Applied before any input still queued: the engine decides
/// nothing more for their sensors, then says so on `done`.
pub struct Revoke {
    pub partitions: Vec<i32>,
    pub done: std::sync::mpsc::Sender<()>,
    /// The consumer's rebalance count when revoked: assignments up to it are outdated.
    pub generation: u64,
}

/// Questions the API asks.
pub enum Query {
    Sensor {
        sensor: SensorId,
        reply: oneshot::Sender<SensorView>,
    },
    Snapshot {
        filter: Filter,
        from: SnapshotCursor,
        reply: oneshot::Sender<SnapshotPart>,
    },
    /// Whether this replica decides for the sensor partition `key` maps to (no key: the
    /// first partition's).
    Owns {
        key: Option<Vec<u8>>,
        reply: oneshot::Sender<bool>,
    },
}

/// What the engine knows of one sensor.
#[derive(Debug, Clone, Default)]
pub struct SensorView {
    pub last_reading: Option<Reading>,
    pub last_command: Option<pb::HeaterCommandEvent>,
    /// The heater's limits and out of service, as the engine applies them.
    pub settings: Resolved,
    /// Commanded next to reported, for a heater that reports.
    pub status: Option<pb::HeaterStatus>,
}

pub struct Engine {
    sensors: Cache,
    /// The cache's size below which a reading may add a sensor: see [`Engine::reading_slot`].
    cache_limit: usize,
    /// Whether the limit was logged as reached.
    cache_limit_logged: bool,
    /// Registered once: looking a metric up by name for every reading showed in profiles.
    decision_latency: metrics::Histogram,
    /// Sensor-topic partitions this replica consumes, with how far it read them (for the
    /// staleness fail-safe: see `SensorControl::on_tick`).
    assigned: HashMap<i32, Watch>,
    /// Assigned partitions whose readings are still being recalled: decided for at their end.
    recalling: HashSet<i32>,
    /// The generation of the last revocation: an assignment queued before it is outdated.
    revoked: u64,
    /// How many partitions the sensor topic has: sensors' partitions are of this count.
    topic_partitions: i32,
    /// Where a sensor that has not reported yet would: its partition until it reports.
    partitioner: SensorPartitioner,
    /// `LoopStats::broker_returns` at the last staleness check.
    broker_returns: u64,
    out: CommandOut,
    acks: Acks,
    stale_after: TimeDelta,
    stats: Arc<LoopStats>,
    feed: Numbering,
    /// The heaters' limits and out of service: the service's, buildings' and sensors'.
    settings: Arc<HeaterSettings>,
    /// Commanded against reported, when heaters report their state.
    feedback: Option<Feedback>,
    /// Whether the engine is deciding for sensors woken by `wakes`.
    waking: bool,
    /// Sensors with something due without a reading (a switch held back, the end of a
    /// maximum run, a keep-alive), by when.
    wakes: BTreeSet<(DateTime<Utc>, SensorIndex)>,
}

impl Engine {
    pub fn new(
        out: CommandOut,
        topic_partitions: i32,
        acks: mpsc::UnboundedSender<Vec<Ack>>,
        stale_after: Duration,
        cache_limit: usize,
        stats: Arc<LoopStats>,
        live: broadcast::Sender<LiveEvent>,
    ) -> Self {
        Self {
            sensors: Cache::default(),
            cache_limit,
            cache_limit_logged: false,
            decision_latency: metrics::histogram!(telemetry::DECISION_LATENCY),
            assigned: HashMap::new(),
            recalling: HashSet::new(),
            revoked: 0,
            topic_partitions,
            partitioner: SensorPartitioner::Consistent,
            broker_returns: 0,
            out,
            acks: Acks::new(acks),
            stale_after: TimeDelta::from_std(stale_after).unwrap_or(TimeDelta::MAX),
            stats,
            feed: Numbering::new(live),
            settings: Arc::default(),
            feedback: None,
            waking: false,
            wakes: BTreeSet::new(),
        }
    }

    /// Holds the heaters' switches to `protection`, until the buildings' and sensors' own
    /// settings arrive.
    pub fn with_protection(mut self, protection: Protection) -> Self {
        self.settings = Arc::new(HeaterSettings::new(protection));
        self
    }

    /// Compares the heaters' reported states with their commands.
    pub fn with_feedback(mut self, feedback: Feedback) -> Self {
        self.feedback = Some(feedback);
        self
    }

    /// Judges a sensor that has not reported yet by the partition `partitioner` puts its key in.
    pub fn with_partitioner(mut self, partitioner: SensorPartitioner) -> Self {
        self.partitioner = partitioner;
        self
    }

    /// Applies inputs until `shutdown`, checking staleness every `stale_check`. After a stall
    /// (the process was stopped, or too busy to turn) it takes no input for `after_stall`: if
    /// the group gave its partitions away meanwhile, librdkafka's next heartbeat learns it and
    /// the revocation comes first, before any decision for them.
    pub async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut revokes: mpsc::UnboundedReceiver<Revoke>,
        stale_check: Duration,
        after_stall: Duration,
        shutdown: CancellationToken,
    ) -> Result<(), StreamError> {
        let mut ticks = tokio::time::interval(stale_check);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stall = stale_check + Duration::from_secs(1);
        // When the loop last turned: a longer gap than any tick leaves is a stall.
        let mut turned = Instant::now();
        let mut held_until = Instant::now();
        loop {
            let held = Instant::now() < held_until;
            let wake = self
                .wakes
                .first()
                .map(|&(at, _)| Instant::now() + (at - Utc::now()).to_std().unwrap_or_default());
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                Some(revoke) = revokes.recv() => self.revoke(revoke),
                _ = tokio::time::sleep_until(wake.unwrap_or(held_until).into()),
                    if wake.is_some() && !held => self.wake().await?,
                _ = ticks.tick() => {
                    let stalled = turned.elapsed() > stall;
                    if stalled {
                        tracing::warn!(?after_stall, "the loop stalled: no decision until the group confirms this replica's partitions");
                        held_until = Instant::now() + after_stall;
                    }
                    if !held || stalled {
                        self.check_staleness(stalled).await?;
                    }
                }
                _ = tokio::time::sleep_until(held_until.into()), if held => {}
                input = inputs.recv(), if !held => match input {
                    Some(input) => self.apply(input).await?,
                    None => return Ok(()),
                },
            }
            turned = Instant::now();
            self.acks.flush()?;
        }
    }

    async fn apply(&mut self, input: Input) -> Result<(), StreamError> {
        match input {
            Input::Records(batch) => {
                for record in batch.records {
                    self.record(record).await?;
                }
                Ok(())
            }
            Input::Setpoint(version) => self.on_setpoint(version).await,
            Input::Settings(settings) => self.on_settings(settings).await,
            Input::Report { sensor, report } => self.on_report(&sensor, report),
            Input::Query(Query::Owns { key, reply }) => {
                let _ = reply.send(self.owns_key(key.as_deref()));
                Ok(())
            }
            Input::Observed(observed) => {
                for Observed {
                    event,
                    reading_partition,
                } in observed
                {
                    self.observe(&event, reading_partition)?;
                }
                Ok(())
            }
            // Queued before a revocation that overtook it: the partitions may be another's.
            Input::Assignment { generation, .. } if generation <= self.revoked => Ok(()),
            Input::Assignment {
                partitions,
                recalling,
                topic_partitions,
                ..
            } => {
                self.topic_partitions_now(topic_partitions);
                self.assign(partitions, recalling).await
            }
            Input::Query(Query::Sensor { sensor, reply }) => {
                let view = self
                    .sensors
                    .find(sensor.as_str())
                    .map(|i| {
                        let control = self.sensors.control(i);
                        SensorView {
                            last_reading: control.last_reading(),
                            last_command: self.sensors.last_event(i),
                            settings: self
                                .settings
                                .resolve(sensor.as_str(), control.building_id()),
                            status: self.status(i),
                        }
                    })
                    .unwrap_or_else(|| SensorView {
                        settings: self.settings.resolve(sensor.as_str(), None),
                        ..SensorView::default()
                    });
                let _ = reply.send(view);
                Ok(())
            }
            Input::Query(Query::Snapshot {
                filter,
                from,
                reply,
            }) => {
                let (part, examined) =
                    feed::answer(&self.sensors, &filter, from, self.feed.through());
                self.stats
                    .snapshot_examined
                    .fetch_add(examined, Ordering::Relaxed);
                let _ = reply.send(part);
                Ok(())
            }
            Input::Barrier(reply) => {
                let _ = reply.send(());
                Ok(())
            }
        }
    }

    /// A heater's report: kept, and the heater judged.
    fn on_report(&mut self, sensor: &SensorId, report: Reported) -> Result<(), StreamError> {
        if self.feedback.is_none() {
            return Ok(());
        }
        if let Some(i) = self.reading_slot(sensor)? {
            if let Some(feedback) = &mut self.feedback {
                feedback.report(i, report);
            }
            // A report from before the last switch says nothing of it (one replayed at start,
            // say): the staleness rounds judge the heater once the command is old enough.
            if self
                .commanded(i)
                .is_some_and(|c| report.at >= c.switched_at)
            {
                self.judge(i, Utc::now());
            }
        }
        Ok(())
    }

    /// Whether this replica decides for the sensor partition `key` maps to (no key: the
    /// first partition's).
    fn owns_key(&self, key: Option<&[u8]>) -> bool {
        let partition = match key {
            Some(key) => partition_of(self.partitioner, key, self.topic_partitions),
            None => Some(0),
        };
        partition.is_some_and(|p| self.decides_for(p))
    }

    /// A command read back from the command topic.
    fn observe(
        &mut self,
        event: &Arc<pb::HeaterCommandEvent>,
        reading_partition: Option<ReadingPartition>,
    ) -> Result<(), StreamError> {
        if self.own_read_back(event, reading_partition) {
            return Ok(());
        }
        let Some((sensor, last, reading)) = observed_command(event) else {
            return Ok(());
        };
        let Ok(building) = BuildingId::parse(event.building_id.as_str()) else {
            return Ok(());
        };
        let i = self.sensors.find_or_insert(&sensor)?;
        self.broadcast_if_news(i, event, &building);
        // Decided here before a restart, or by another replica: its run ends all the same.
        if let Some(at) = event
            .decided_at
            .as_ref()
            .and_then(crate::proto::from_timestamp)
        {
            let switched = event
                .switched_at
                .as_ref()
                .and_then(crate::proto::from_timestamp);
            let last = Switched {
                command: last.command,
                at: switched.unwrap_or(at),
                forced_off: event.reason() == pb::CommandReason::MaxRunTime,
            };
            self.wake_after(i, Some(&building), &last, at);
        }
        self.decide(i, |control| control.observe(last, building, reading));
        self.judge(i, Utc::now());
        self.set_reading_partition(i, reading_partition);
        Ok(())
    }

    /// One of this replica's decisions read back, still its sensor's last: the state already
    /// holds it (it was applied when decided), so it is only passed on to subscribers. False
    /// for anything else, which [`Self::observe`] applies.
    fn own_read_back(
        &mut self,
        event: &Arc<pb::HeaterCommandEvent>,
        reading_partition: Option<ReadingPartition>,
    ) -> bool {
        let Some(i) = self.sensors.find(&event.sensor_id) else {
            return false;
        };
        // The very event decided here: another writer's record with the same sequence (a
        // previous owner's retried write landing late) goes the whole way.
        let sequence = event.sequence;
        if !self.feed.awaits(i, sequence) || !self.sensors.last_event_is(i, event) {
            return false;
        }
        if let Some(number) = self.feed.read_back(i, sequence, Some(sequence)) {
            self.feed.publish(number, i, event.clone());
        }
        if self.feedback.is_some() {
            self.judge(i, Utc::now());
        }
        self.set_reading_partition(i, reading_partition);
        true
    }

    /// Sensor `i`'s readings come from `p`, as a command read back says; a partition of
    /// another partition count names no owner.
    fn set_reading_partition(&mut self, i: SensorIndex, p: Option<ReadingPartition>) {
        match p {
            Some(p) if p.of.is_none_or(|n| n == self.topic_partitions) => {
                self.sensors.set_partition(i, p.partition)
            }
            _ => {}
        }
    }

    /// Once the sensor topic has another number of partitions, no sensor's partition is known.
    fn topic_partitions_now(&mut self, partitions: Option<i32>) {
        let Some(n) = partitions.filter(|&n| n != self.topic_partitions) else {
            return;
        };
        tracing::info!(
            partitions = n,
            before = self.topic_partitions,
            "the sensor topic's partitions changed: each sensor's owner is known again from its next reading"
        );
        self.sensors.forget_partitions();
        self.topic_partitions = n;
    }

    async fn on_setpoint(&mut self, version: SetpointVersion) -> Result<(), StreamError> {
        let now = Utc::now();
        let i = self.sensors.find_or_insert(&version.sensor_id)?;
        let decides = self
            .sensors
            .partition(i)
            .is_some_and(|p| self.decides_for(p));
        let stale_after = self.stale_after;
        // The level is recorded before deciding: a SAFETY level just written cuts a hold short,
        // one just relinquished does not.
        if version.revision > self.sensors.revision(i) {
            let (level, level_revision) = (version.level, version.level_revision);
            self.sensors
                .set_level(i, level, level_revision, version.revision);
        }
        let decision = self.decide(i, |control| {
            let newer = control.apply_setpoint(version.revision, version.setpoint, now);
            // Sensors another replica owns are only tracked.
            (newer && decides)
                .then(|| control.reevaluate(now, stale_after))
                .flatten()
        });
        if let Some(decision) = decision {
            let delivery = self.send(i, &decision).await?;
            self.acks.push(None, Some(delivery));
        }
        Ok(())
    }

    /// New heater settings: a sensor out of service has its heater released (if asked), one
    /// put back is decided for at once, and every wake is placed by the new limits.
    async fn on_settings(&mut self, settings: Arc<HeaterSettings>) -> Result<(), StreamError> {
        if settings == self.settings {
            return Ok(());
        }
        let old = std::mem::replace(&mut self.settings, settings);
        let (now, stale_after) = (Utc::now(), self.stale_after);
        let mut decided = Vec::new();
        for i in self.sensors.indexes() {
            let control = self.sensors.control(i);
            let building = control.building_id();
            if building.is_none() {
                continue;
            }
            let id = self.sensors.id(i);
            let was_out = old.applying(id, building).1.is_some();
            let out = self.settings.applying(id, building).1.is_some();
            let owned = self.owner(i).is_some();
            let decision = self.decide(i, |control| match (was_out, out) {
                (_, true) if owned => control.release(),
                (true, false) if owned => control.reevaluate(now, stale_after),
                _ => None,
            });
            if let Some(decision) = decision {
                decided.push((i, decision));
            }
        }
        for (i, decision) in decided {
            let delivery = self.send(i, &decision).await?;
            self.acks.push(None, Some(delivery));
        }
        Ok(())
    }

    /// Whether this replica decides for partition `p` now: it consumes it, and the readings
    /// decided on before are recalled.
    fn decides_for(&self, p: i32) -> bool {
        self.assigned.contains_key(&p) && !self.recalling.contains(&p)
    }

    /// Re-evaluates the sensors of the partitions `which` picks: they may owe a command.
    async fn reevaluate_partitions(
        &mut self,
        which: impl Fn(i32) -> bool,
    ) -> Result<(), StreamError> {
        let (now, stale_after) = (Utc::now(), self.stale_after);
        self.decide_for_owned(Cache::may_be_owed, |p, control, _| {
            which(p)
                .then(|| control.reevaluate(now, stale_after))
                .flatten()
        })
        .await
    }

    async fn assign(
        &mut self,
        partitions: Vec<i32>,
        recalling: Vec<i32>,
    ) -> Result<(), StreamError> {
        // Partitions kept keep their watch; new ones are watched from now.
        let now = Utc::now();
        self.assigned = partitions
            .into_iter()
            .map(|p| {
                let watch = self.assigned.get(&p).copied();
                (p, watch.unwrap_or_else(|| Watch::new(now)))
            })
            .collect();
        self.stats
            .assigned
            .store(self.assigned.len() as u64, Ordering::Relaxed);
        self.out.raise_sequence_floor().await?;
        // Sensors that just became ours may owe a command (a setpoint changed or was deleted
        // while no replica owned them); those being recalled are decided once they are.
        self.recalling = recalling.into_iter().collect();
        let recalling = self.recalling.clone();
        self.reevaluate_partitions(|p| !recalling.contains(&p))
            .await
    }

    fn revoke(
        &mut self,
        Revoke {
            partitions,
            done,
            generation,
        }: Revoke,
    ) {
        for partition in &partitions {
            self.assigned.remove(partition);
            self.recalling.remove(partition);
        }
        self.revoked = self.revoked.max(generation);
        self.stats
            .assigned
            .store(self.assigned.len() as u64, Ordering::Relaxed);
        tracing::info!(?partitions, "sensor partitions revoked");
        let _ = done.send(());
    }

    async fn record(&mut self, record: Record) -> Result<(), StreamError> {
        match record {
            Record::Reading {
                sensor,
                reading,
                position,
                received,
                trace,
            } => {
                // Consumed before its partition was revoked: its next owner decides it. Its
                // offset is not stored, so it is not lost if the partition comes back.
                let Some(watch) = self.assigned.get_mut(&position.partition) else {
                    return Ok(());
                };
                watch.at_end = false;
                LoopStats::bump(&self.stats.readings);
                let Some(i) = self.reading_slot(&sensor)? else {
                    LoopStats::bump(&self.stats.untracked);
                    self.acks.push(Some(position), None);
                    return Ok(());
                };
                self.sensors.set_partition(i, position.partition);
                let span = trace.map(|parent| traces::decision_span(sensor.as_str(), parent));
                let decision = match self.decide(i, |control| control.on_reading(reading)) {
                    ReadingOutcome::Applied(decision) => decision,
                    ReadingOutcome::OutOfOrder => {
                        LoopStats::bump(&self.stats.out_of_order);
                        None
                    }
                };
                let delivery = match decision {
                    Some(decision) => Some(self.send_traced(i, &decision, span.as_ref()).await?),
                    None => None,
                };
                self.decision_latency
                    .record(received.elapsed().as_secs_f64());
                self.acks.push(Some(position), delivery);
            }
            // Its partition was revoked: the offset must not be stored (see readings above).
            Record::Skip { position, .. } if !self.assigned.contains_key(&position.partition) => {}
            Record::Skip { position, delivery } => self.acks.push(Some(position), Some(delivery)),
            Record::End { partition } => {
                if let Some(watch) = self.assigned.get_mut(&partition) {
                    watch.at_end = true;
                    watch.end_reached = Some(Utc::now());
                }
            }
            Record::Recalled {
                sensor,
                reading,
                partition,
            } => {
                if let Some(i) = self.reading_slot(&sensor)? {
                    self.sensors.set_partition(i, partition);
                    self.decide(i, |control| control.recall(reading));
                }
            }
            Record::RecallDone { partition } => {
                self.recalling.remove(&partition);
                self.reevaluate_partitions(|p| p == partition).await?;
            }
        }
        Ok(())
    }

    /// The cached sensor a reading is for; a new one only while the cache holds fewer than
    /// `cache_limit` (sensors are never removed, and readings of unknown ids would grow it
    /// without bound). Setpoints and commands are always cached; `None`: untracked.
    fn reading_slot(&mut self, sensor: &SensorId) -> Result<Option<SensorIndex>, StreamError> {
        if let Some(i) = self.sensors.find(sensor.as_str()) {
            return Ok(Some(i));
        }
        if self.sensors.len() < self.cache_limit {
            return self.sensors.find_or_insert(sensor).map(Some);
        }
        if !self.cache_limit_logged {
            self.cache_limit_logged = true;
            tracing::warn!(
                limit = self.cache_limit,
                "sensor cache full: readings of sensors not cached yet are not tracked until they have a setpoint (see SENSOR_CACHE_LIMIT)"
            );
        }
        Ok(None)
    }

    /// The fail-safe's round. After a stall (`stalled`: the process was stopped, or too busy to
    /// look for longer than a check's interval) silence counts anew: readings waited meanwhile.
    async fn check_staleness(&mut self, stalled: bool) -> Result<(), StreamError> {
        let setpoints = self
            .sensors
            .indexes()
            .filter(|&i| self.sensors.is_controlled(i))
            .count();
        metrics::gauge!(telemetry::CACHED_SENSORS).set(self.sensors.len() as f64);
        metrics::gauge!(telemetry::CACHED_SETPOINTS).set(setpoints as f64);
        let now = Utc::now();
        // Readings buffered by gateways while the broker was away arrive from now on.
        let returns = self.stats.broker_returns.load(Ordering::Relaxed);
        let stalled = stalled || std::mem::replace(&mut self.broker_returns, returns) != returns;
        if stalled {
            tracing::info!(
                "the loop stalled or the broker came back: sensor silence counts from now"
            );
            for watch in self.assigned.values_mut() {
                watch.since = now;
            }
        }
        // Readings wait unread while the readings task cannot take them (a full queue, a slow
        // broker) or the broker does not answer: partition ends are known only up to then.
        let listened = [
            self.stats.deaf_since.get(),
            self.stats.broker_down_since.get(),
        ]
        .into_iter()
        .flatten()
        .fold(now, DateTime::min);
        self.judge_all(now);
        let stale_after = self.stale_after;
        // Silence is heard until now at the latest: a sensor heard from since `cutoff` is not
        // stale, and most sensors are passed over without being unpacked.
        let cutoff = now
            .checked_sub_signed(stale_after)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        self.decide_for_owned(
            |sensors, i| sensors.may_go_stale(i, cutoff),
            |_, control, watch| {
                let heard_until = watch.heard_until(listened)?;
                control.on_tick(heard_until, stale_after, watch.since)
            },
        )
        .await
    }

    /// Keeps a command event read back from the command topic as the sensor's last if it is not
    /// older, and broadcasts it to subscribers if it is news (see [`Numbering::read_back`]).
    fn broadcast_if_news(
        &mut self,
        i: SensorIndex,
        event: &Arc<pb::HeaterCommandEvent>,
        building: &BuildingId,
    ) {
        let stored = self.sensors.last_event_sequence(i);
        let Some(number) = self.feed.read_back(i, event.sequence, stored) else {
            return;
        };
        if stored.is_none_or(|sequence| event.sequence >= sequence) {
            self.sensors.set_last_event(i, event, building, number);
        }
        self.feed.publish(number, i, event.clone());
    }

    /// Runs `f` on the sensor's state, unpacked, and stores the state back; what it leaves
    /// due (a switch held back, the end of a run, a keep-alive) is woken then.
    fn decide<T>(&mut self, i: SensorIndex, f: impl FnOnce(&mut SensorControl) -> T) -> T {
        let mut control = self
            .sensors
            .control(i)
            .numbering_above(self.out.sequence_floor());
        let applying = self.applying(i, control.building_id());
        if let Some((protection, release)) = applying {
            // The SAFETY level cuts holds short, as the fail-safes do.
            let safety = self.sensors.level(i).0 == Level::Safety;
            let follows = self.feedback.as_ref().is_none_or(|f| f.is_following(i));
            control = control
                .protected(protection, self.sensors.last_switch(i), safety)
                .out_of_service(release)
                .not_following(!follows);
        }
        let result = f(&mut control);
        if let Some(at) = applying.and_then(|_| control.next_wake()) {
            // A safety net: something said due that waking did not do would otherwise wake
            // the sensor again at once, for ever. The next input decides for it again.
            if !(self.waking && at <= Utc::now()) {
                self.wakes.insert((at, i));
            }
        }
        self.sensors.set_control(i, control);
        result
    }

    /// The limits of sensor `i` in `building`, and whether it is out of service (with its
    /// heater to be released); `None` when no limit is set anywhere and nothing is out of
    /// service: then there is nothing to look up, on every reading.
    fn applying(
        &self,
        i: SensorIndex,
        building: Option<&BuildingId>,
    ) -> Option<(Protection, Option<bool>)> {
        if self.settings.is_uniform() {
            let protection = self.settings.service();
            return (protection != Protection::default()).then_some((protection, None));
        }
        let (protection, out) = self.settings.applying(self.sensors.id(i), building);
        Some((protection, out.map(|out| out.release)))
    }

    /// Wakes sensor `i` when something is next due after `last`, last sent at `sent_at`.
    fn wake_after(
        &mut self,
        i: SensorIndex,
        building: Option<&BuildingId>,
        last: &Switched,
        sent_at: DateTime<Utc>,
    ) {
        let due = self
            .applying(i, building)
            .and_then(|(protection, _)| protection.next_deadline(last, sent_at, None));
        if let Some(at) = due {
            self.wakes.insert((at, i));
        }
    }

    /// Heater `i`'s last command, as the comparison with its reports needs it.
    fn commanded(&self, i: SensorIndex) -> Option<Commanded> {
        let last = self.sensors.control(i).last_command()?;
        Some(Commanded {
            command: last.command,
            sequence: last.sequence,
            switched_at: self.sensors.last_switch(i)?.switched_at,
        })
    }

    /// Heater `i`'s commanded and reported states, if it reports.
    fn status(&self, i: SensorIndex) -> Option<pb::HeaterStatus> {
        let feedback = self.feedback.as_ref()?;
        let building = self
            .sensors
            .last_event(i)
            .map(|e| e.building_id)
            .unwrap_or_default();
        feedback.status(i, self.sensors.id(i), &building, self.commanded(i).as_ref())
    }

    /// Judges whether heater `i` follows its command; a change goes to live watches.
    fn judge(&mut self, i: SensorIndex, now: DateTime<Utc>) {
        if self.feedback.is_none() {
            return;
        }
        let Some(commanded) = self.commanded(i) else {
            return;
        };
        let Some(feedback) = &mut self.feedback else {
            return;
        };
        if !feedback.judge(i, &commanded, now) {
            return;
        }
        let following = feedback.is_following(i);
        metrics::gauge!(telemetry::HEATERS_NOT_FOLLOWING)
            .set(feedback.not_following_count() as f64);
        if following {
            // Its keep-alive, held back meanwhile, is due again.
            self.decide(i, |_| ());
        } else {
            metrics::counter!(telemetry::HEATERS_NOT_FOLLOWING_TOTAL).increment(1);
            tracing::info!(
                sensor = self.sensors.id(i),
                "a heater reports another state than commanded"
            );
        }
        if let Some(status) = self.status(i) {
            if let Some(feedback) = &self.feedback {
                feedback.publish(status);
            }
        }
    }

    /// Judges every heater that reports: commands age past the report timeout.
    fn judge_all(&mut self, now: DateTime<Utc>) {
        let Some(feedback) = &self.feedback else {
            return;
        };
        let reporting: Vec<SensorIndex> = feedback.reporting().collect();
        metrics::gauge!(telemetry::HEATERS_NOT_FOLLOWING)
            .set(feedback.not_following_count() as f64);
        for i in reporting {
            self.judge(i, now);
        }
    }

    /// The partition this replica decides sensor `i` on, if it decides for it now.
    fn owner(&self, i: SensorIndex) -> Option<i32> {
        self.sensors.partition(i).filter(|&p| self.decides_for(p))
    }

    /// Decides again for the sensors whose hold or run has ended, if this replica decides for
    /// them.
    async fn wake(&mut self) -> Result<(), StreamError> {
        let now = Utc::now();
        let stale_after = self.stale_after;
        let later = self.wakes.split_off(&(now + TimeDelta::nanoseconds(1), 0));
        let due = std::mem::replace(&mut self.wakes, later);
        for (_, i) in due {
            if self.owner(i).is_none() {
                continue;
            }
            self.waking = true;
            let decision = self.decide(i, |control| control.on_wake(now, stale_after));
            self.waking = false;
            if let Some(decision) = decision {
                let delivery = self.send(i, &decision).await?;
                self.acks.push(None, Some(delivery));
            }
        }
        Ok(())
    }

    /// Runs `decide` on every sensor this replica owns that `worth` lets through, with its
    /// partition and that partition's watch, and sends what it decides.
    async fn decide_for_owned(
        &mut self,
        worth: impl Fn(&Cache, SensorIndex) -> bool,
        mut decide: impl FnMut(i32, &mut SensorControl, Watch) -> Option<Decision>,
    ) -> Result<(), StreamError> {
        let mut decided = Vec::new();
        for i in self.sensors.indexes() {
            if !worth(&self.sensors, i) {
                continue;
            }
            // Known from its readings, or, for a controlled sensor that has not reported (it
            // may go stale), where its readings will go.
            let partition = match self.sensors.partition(i) {
                None if self.sensors.is_controlled(i) => {
                    let key = self.sensors.id(i).as_bytes();
                    partition_of(self.partitioner, key, self.topic_partitions)
                }
                known => known,
            };
            let Some(partition) = partition else {
                continue;
            };
            if let Some(&watch) = self.assigned.get(&partition) {
                if let Some(decision) = self.decide(i, |control| decide(partition, control, watch))
                {
                    decided.push((i, decision));
                }
            }
        }
        for (i, decision) in decided {
            let delivery = self.send(i, &decision).await?;
            self.acks.push(None, Some(delivery));
        }
        Ok(())
    }

    /// Produces the command for `decision`. Any error stops the loop: a decision that cannot be
    /// sent must not be forgotten, and after a restart it is decided again.
    async fn send(
        &mut self,
        i: SensorIndex,
        decision: &Decision,
    ) -> Result<DeliveryFuture, StreamError> {
        self.send_traced(i, decision, None).await
    }

    /// `send`, recording the command on a traced reading's `span` and passing its context on.
    async fn send_traced(
        &mut self,
        i: SensorIndex,
        decision: &Decision,
        span: Option<&tracing::Span>,
    ) -> Result<DeliveryFuture, StreamError> {
        self.stats.command(decision.command, decision.reason);
        // Decided on the setpoint in force, whose level the cache keeps.
        let level = self.sensors.level(i);
        let now = Utc::now();
        let mut event = command_event(self.sensors.id(i), decision, level, now);
        if let Some(span) = span {
            let (command, reason) = (event.command(), event.reason());
            traces::decided(
                span,
                command.as_str_name(),
                reason.as_str_name(),
                event.sequence,
                event.setpoint_revision,
            );
            event.trace_parent = traces::traceparent(span).unwrap_or_default();
        }
        let last = Switched {
            command: decision.command,
            at: decision.switched_at.unwrap_or(now),
            forced_off: decision.reason == CommandReason::MaxRunTime,
        };
        self.wake_after(i, Some(&decision.building_id), &last, now);
        let number = self.feed.own(i, event.sequence);
        self.sensors
            .set_last_event(i, &event, &decision.building_id, number);
        self.judge(i, now);
        let partition = self.sensors.partition(i).map(|partition| ReadingPartition {
            partition,
            of: Some(self.topic_partitions),
        });
        self.out.produce(&event, partition).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::feed::SnapshotCoverage;
    use super::super::sequences::Sequences;
    use super::*;
    use crate::domain::{Celsius, Setpoint};
    use rdkafka::producer::FutureProducer;
    use rdkafka::ClientConfig;
    use tokio::sync::Semaphore;

    /// An engine whose producer has no broker: what it decides is queued, never delivered, and
    /// read back only when a test hands it in as `Input::Observed`.
    fn engine() -> (Engine, broadcast::Receiver<LiveEvent>) {
        engine_limited(usize::MAX)
    }

    /// The same, with `SENSOR_CACHE_LIMIT` at `cache_limit`.
    fn engine_limited(cache_limit: usize) -> (Engine, broadcast::Receiver<LiveEvent>) {
        engine_with(Duration::from_secs(3600), cache_limit)
    }

    fn engine_with(
        stale_after: Duration,
        cache_limit: usize,
    ) -> (Engine, broadcast::Receiver<LiveEvent>) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", "127.0.0.1:9")
            .create()
            .unwrap();
        let (acks, _) = mpsc::unbounded_channel();
        let (live, subscribed) = broadcast::channel(16);
        let out = CommandOut {
            producer,
            topic: "commands".into(),
            sequences: Sequences::unreserved(),
        };
        let mut engine = Engine::new(out, 1, acks, stale_after, cache_limit, Arc::default(), live);
        // The readings of these tests come from partition 0.
        engine.assigned.insert(0, Watch::new(Utc::now()));
        (engine, subscribed)
    }

    async fn snapshot(engine: &mut Engine) -> SnapshotPart {
        snapshot_from(engine, SnapshotCursor::default()).await
    }

    async fn snapshot_from(engine: &mut Engine, from: SnapshotCursor) -> SnapshotPart {
        let (reply, part) = oneshot::channel();
        engine
            .apply(Input::Query(Query::Snapshot {
                filter: Filter::default(),
                from,
                reply,
            }))
            .await
            .unwrap();
        part.await.unwrap()
    }

    fn observed(event: pb::HeaterCommandEvent) -> Input {
        Input::Observed(vec![Observed {
            event: Arc::new(event),
            reading_partition: ReadingPartition::parse("0/1"),
        }])
    }

    /// Revision 1 of a setpoint for `sensor`: 20 °C ± 0.5 in building `b`.
    fn setpoint(sensor: &SensorId) -> Input {
        let setpoint = Setpoint::new(
            sensor.clone(),
            BuildingId::parse("b").unwrap(),
            20.0,
            0.5,
            0.5,
        )
        .unwrap();
        Input::Setpoint(SetpointVersion {
            sensor_id: sensor.clone(),
            revision: 1,
            setpoint: Some(setpoint),
            level: crate::domain::levels::Level::Default,
            level_revision: 1,
        })
    }

    async fn view(engine: &mut Engine, sensor: &SensorId) -> SensorView {
        let (reply, view) = oneshot::channel();
        engine
            .apply(Input::Query(Query::Sensor {
                sensor: sensor.clone(),
                reply,
            }))
            .await
            .unwrap();
        view.await.unwrap()
    }

    /// A reading of `sensor` taken now, at `offset` of partition 0.
    async fn reading(sensor: &SensorId, celsius: f64, offset: i64) -> Input {
        let queue_permits = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        Input::Records(Records {
            records: vec![Record::Reading {
                sensor: sensor.clone(),
                reading: Reading {
                    temperature: Celsius::new(celsius).unwrap(),
                    time: Utc::now(),
                    received: Utc::now(),
                },
                position: Position {
                    partition: 0,
                    offset,
                },
                received: Instant::now(),
                trace: None,
            }],
            queue_permits,
        })
    }

    async fn end_of_partition_0() -> Input {
        let queue_permits = Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap();
        Input::Records(Records {
            records: vec![Record::End { partition: 0 }],
            queue_permits,
        })
    }

    /// The last command of sensor `s`.
    async fn last(engine: &mut Engine) -> Option<(pb::HeaterCommand, pb::CommandReason)> {
        let sensor = SensorId::parse("s").unwrap();
        let event = view(engine, &sensor).await.last_command?;
        Some((event.command(), event.reason()))
    }

    #[tokio::test]
    async fn a_revoked_partition_is_not_decided_for_until_it_comes_back() {
        let (mut engine, _live) = engine();
        let sensor = SensorId::parse("s").unwrap();
        engine.apply(setpoint(&sensor)).await.unwrap();
        let (done, stopped) = std::sync::mpsc::channel();
        engine.revoke(Revoke {
            partitions: vec![0],
            done,
            generation: 1,
        });
        assert!(stopped.try_recv().is_ok(), "the revocation is confirmed");
        engine.apply(reading(&sensor, 10.0, 0).await).await.unwrap();
        assert_eq!(last(&mut engine).await, None);
        assert!(engine.acks.is_empty(), "its offset is not stored");

        // An assignment queued before the revocation overtook it changes nothing; the next
        // one gives the partition back.
        for generation in [1, 2] {
            engine
                .apply(Input::Assignment {
                    partitions: vec![0],
                    recalling: vec![],
                    generation,
                    topic_partitions: Some(1),
                })
                .await
                .unwrap();
            engine.apply(reading(&sensor, 10.0, 0).await).await.unwrap();
            if generation == 1 {
                assert_eq!(last(&mut engine).await, None, "an outdated assignment");
            }
        }
        assert_eq!(
            last(&mut engine).await,
            Some((pb::HeaterCommand::On, pb::CommandReason::TooCold))
        );
    }

    #[test]
    fn a_reading_partition_header_names_the_partition_and_the_count() {
        let parse = ReadingPartition::parse;
        let p = |partition, of| Some(ReadingPartition { partition, of });
        assert_eq!(parse("3"), p(3, None), "as written before the count");
        assert_eq!(parse("3/6"), p(3, Some(6)));
        assert_eq!(parse("3/6").unwrap().value(), "3/6");
        assert_eq!((parse("x"), parse("3/"), parse("/6")), (None, None, None));
    }

    /// Once the sensor topic has more partitions, a sensor's readings go to another one, maybe
    /// another replica's: its old partition's owner must not fail it safe for the silence there.
    /// ("s" goes to partition 1 of 2 by CRC-32, not this engine's.)
    #[tokio::test]
    async fn a_sensor_is_nobodys_after_partitions_are_added_until_it_reports_again() {
        let stale_after = Duration::from_millis(50);
        let on = Some((pb::HeaterCommand::On, pb::CommandReason::TooCold));
        let stale = Some((pb::HeaterCommand::Off, pb::CommandReason::SensorStale));
        let sensor = SensorId::parse("s").unwrap();
        let (mut engine, _live) = engine_with(stale_after, usize::MAX);
        engine.apply(setpoint(&sensor)).await.unwrap();
        engine.apply(reading(&sensor, 10.0, 0).await).await.unwrap();
        let grown = Input::Assignment {
            partitions: vec![0],
            recalling: vec![],
            generation: 1,
            topic_partitions: Some(2),
        };
        engine.apply(grown).await.unwrap();
        // Its command read back, as written before the partitions were added: still nobody's.
        let mut event = view(&mut engine, &sensor).await.last_command.unwrap();
        event.snapshot = false;
        engine.apply(observed(event)).await.unwrap();
        engine.apply(end_of_partition_0().await).await.unwrap();
        tokio::time::sleep(stale_after * 2).await;
        engine.check_staleness(false).await.unwrap();
        assert_eq!(last(&mut engine).await, on);
        // It reports in a partition of ours again: ours, and silent from then.
        engine.apply(reading(&sensor, 10.0, 1).await).await.unwrap();
        engine.apply(end_of_partition_0().await).await.unwrap();
        tokio::time::sleep(stale_after * 2).await;
        engine.check_staleness(false).await.unwrap();
        assert_eq!(last(&mut engine).await, stale);
    }

    #[tokio::test]
    async fn silence_counts_only_while_the_partition_is_read_to_its_end_and_the_loop_runs() {
        let stale_after = Duration::from_millis(50);
        let on = Some((pb::HeaterCommand::On, pb::CommandReason::TooCold));
        let stale = Some((pb::HeaterCommand::Off, pb::CommandReason::SensorStale));
        let sensor = SensorId::parse("s").unwrap();
        let (mut engine, _live) = engine_with(stale_after, usize::MAX);
        engine.apply(setpoint(&sensor)).await.unwrap();
        engine.apply(reading(&sensor, 10.0, 0).await).await.unwrap();
        tokio::time::sleep(stale_after * 2).await;
        // Never read to its end: readings of the sensor may be waiting there.
        engine.check_staleness(false).await.unwrap();
        assert_eq!(last(&mut engine).await, on);
        // A fresh reading, the end, then the readings task cannot take records for a while:
        // they may wait unread.
        engine.apply(reading(&sensor, 10.0, 1).await).await.unwrap();
        engine.apply(end_of_partition_0().await).await.unwrap();
        engine.stats.listening(false);
        tokio::time::sleep(stale_after * 2).await;
        engine.check_staleness(false).await.unwrap();
        assert_eq!(last(&mut engine).await, on, "not listening");
        engine.stats.listening(true);
        engine.check_staleness(false).await.unwrap();
        assert_eq!(last(&mut engine).await, stale);

        // The broker does not answer: silence counts up to then; once it answers again,
        // anew from then.
        let (mut engine, _live) = engine_with(stale_after, usize::MAX);
        engine.apply(setpoint(&sensor)).await.unwrap();
        engine.apply(reading(&sensor, 10.0, 0).await).await.unwrap();
        engine.apply(end_of_partition_0().await).await.unwrap();
        engine.stats.broker_answered(false, Utc::now());
        tokio::time::sleep(stale_after * 2).await;
        engine.check_staleness(false).await.unwrap();
        assert_eq!(last(&mut engine).await, on, "the broker does not answer");
        engine.stats.broker_answered(true, Utc::now());
        engine.check_staleness(false).await.unwrap();
        assert_eq!(last(&mut engine).await, on, "it answers again");
        tokio::time::sleep(stale_after * 2).await;
        engine.check_staleness(false).await.unwrap();
        assert_eq!(last(&mut engine).await, stale);

        // Read to its end, then the loop stalls: silence counts anew from the stall.
        let (mut engine, _live) = engine_with(stale_after, usize::MAX);
        engine.apply(setpoint(&sensor)).await.unwrap();
        engine.apply(reading(&sensor, 10.0, 0).await).await.unwrap();
        engine.apply(end_of_partition_0().await).await.unwrap();
        tokio::time::sleep(stale_after * 2).await;
        engine.check_staleness(true).await.unwrap();
        assert_eq!(last(&mut engine).await, on);
        // A later record of the partition (another sensor's): read up to before it.
        let other = SensorId::parse("t").unwrap();
        engine.apply(reading(&other, 10.0, 1).await).await.unwrap();
        tokio::time::sleep(stale_after * 2).await;
        engine.check_staleness(false).await.unwrap();
        assert_eq!(last(&mut engine).await, on, "the partition lags");
        engine.apply(end_of_partition_0().await).await.unwrap();
        engine.check_staleness(false).await.unwrap();
        assert_eq!(last(&mut engine).await, stale);
    }

    #[tokio::test]
    async fn readings_add_sensors_up_to_the_cache_limit_and_setpoints_whatever_it_is() {
        let (mut engine, _live) = engine_limited(2);
        let controlled = SensorId::parse("s").unwrap();
        let (first, second) = (
            SensorId::parse("u1").unwrap(),
            SensorId::parse("u2").unwrap(),
        );
        engine.apply(setpoint(&controlled)).await.unwrap();
        engine.apply(reading(&first, 20.0, 0).await).await.unwrap();
        // The cache is full: the reading is acknowledged and forgotten.
        engine.apply(reading(&second, 10.0, 1).await).await.unwrap();
        assert!(view(&mut engine, &first).await.last_reading.is_some());
        assert!(view(&mut engine, &second).await.last_reading.is_none());
        assert_eq!(engine.sensors.len(), 2);
        assert_eq!(engine.acks.len(), 2, "every reading is acknowledged");

        // Cached sensors are decided as before; a setpoint goes beyond the limit, and from then
        // on its sensor's readings are decided too.
        engine
            .apply(reading(&controlled, 10.0, 2).await)
            .await
            .unwrap();
        engine.apply(setpoint(&second)).await.unwrap();
        engine.apply(reading(&second, 25.0, 3).await).await.unwrap();
        let commands: Vec<_> = snapshot(&mut engine)
            .await
            .events
            .into_iter()
            .map(|e| (e.command(), e.sensor_id))
            .collect();
        assert_eq!(
            commands,
            [
                (pb::HeaterCommand::On, "s".to_owned()),
                (pb::HeaterCommand::Off, "u2".to_owned())
            ]
        );
    }

    #[tokio::test]
    async fn an_own_decision_read_back_is_broadcast_once_with_the_number_it_got_when_decided() {
        let (mut engine, mut live) = engine();
        let sensor = SensorId::parse("s").unwrap();
        engine.apply(setpoint(&sensor)).await.unwrap();
        engine.apply(reading(&sensor, 10.0, 0).await).await.unwrap();

        // Decided (ON) and kept, not broadcast before it is read back; a snapshot has it.
        let part = snapshot(&mut engine).await;
        let [decided] = part.events.as_slice() else {
            panic!("one event: {:?}", part.events)
        };
        assert!(live.try_recv().is_err());

        // Read back, twice: broadcast once, covered by the snapshot taken in between.
        engine.apply(observed(decided.clone())).await.unwrap();
        engine.apply(observed(decided.clone())).await.unwrap();
        let own = live.try_recv().unwrap();
        assert_eq!(own.event.sequence, decided.sequence);
        assert!(
            live.try_recv().is_err(),
            "the same sequence again is not news"
        );
        let mut sent = SnapshotCoverage::default();
        sent.add(&part);
        assert!(sent.covers(&own));

        // Another replica's next command: news, after the snapshot.
        let newer = pb::HeaterCommandEvent {
            sequence: decided.sequence + 1,
            command: pb::HeaterCommand::Off as i32,
            ..decided.clone()
        };
        engine.apply(observed(newer)).await.unwrap();
        let other = live.try_recv().unwrap();
        assert!(other.number > own.number);
        assert!(!sent.covers(&other));
        // And an older one is not.
        engine.apply(observed(decided.clone())).await.unwrap();
        assert!(live.try_recv().is_err());

        // A decision of ours whose write lands after another replica's newer one (a retried
        // request) is superseded: never broadcast behind it.
        engine.apply(reading(&sensor, 10.0, 1).await).await.unwrap();
        let ours = snapshot(&mut engine).await.events[0].clone();
        assert_eq!((ours.sequence, ours.command()), (3, pb::HeaterCommand::On));
        let theirs = pb::HeaterCommandEvent {
            sequence: 4,
            command: pb::HeaterCommand::Off as i32,
            ..ours.clone()
        };
        engine.apply(observed(theirs)).await.unwrap();
        assert_eq!(live.try_recv().unwrap().event.sequence, 4);
        engine.apply(observed(ours)).await.unwrap();
        assert!(
            live.try_recv().is_err(),
            "sequence 3 after 4 is not passed on"
        );
    }

    #[tokio::test]
    async fn a_catch_up_has_only_the_heaters_whose_last_command_is_newer_than_what_was_sent() {
        let (mut engine, _live) = engine();
        let other = |sensor: &str, sequence: u64| pb::HeaterCommandEvent {
            sensor_id: sensor.into(),
            building_id: "b".into(),
            command: pb::HeaterCommand::On as i32,
            sequence,
            ..Default::default()
        };
        for sensor in ["a", "b", "c"] {
            engine.apply(observed(other(sensor, 1))).await.unwrap();
        }
        let mut sent = SnapshotCoverage::default();
        sent.add(&snapshot(&mut engine).await);
        let ids = |part: &SnapshotPart| {
            part.events
                .iter()
                .map(|e| (e.sensor_id.clone(), e.sequence))
                .collect::<Vec<_>>()
        };

        // After the snapshot: b changes, c comes again (not news), d is new.
        for (sensor, sequence) in [("b", 2), ("c", 1), ("d", 1)] {
            engine
                .apply(observed(other(sensor, sequence)))
                .await
                .unwrap();
        }
        let catch_up = snapshot_from(&mut engine, SnapshotCursor::catch_up(sent)).await;
        assert_eq!(ids(&catch_up), [("b".into(), 2), ("d".into(), 1)]);
        assert!(catch_up.next.is_none());

        // What a catch-up sent is covered in turn: the next one has only what changed since.
        let mut sent = SnapshotCoverage::default();
        sent.add(&catch_up);
        engine.apply(observed(other("a", 2))).await.unwrap();
        let again = snapshot_from(&mut engine, SnapshotCursor::catch_up(sent)).await;
        assert_eq!(ids(&again), [("a".into(), 2)]);
    }

    #[tokio::test]
    async fn a_safety_level_written_inside_a_hold_cuts_it_short_and_a_default_one_waits() {
        for (level, cut) in [(Level::Safety, true), (Level::Default, false)] {
            let (engine, _live) = engine();
            let mut engine = engine.with_protection(Protection {
                min_on: TimeDelta::hours(1),
                ..Protection::default()
            });
            let sensor = SensorId::parse("s").unwrap();
            engine.apply(setpoint(&sensor)).await.unwrap();
            engine.apply(reading(&sensor, 18.0, 0).await).await.unwrap();
            let on = Some((pb::HeaterCommand::On, pb::CommandReason::TooCold));
            assert_eq!(last(&mut engine).await, on);

            // Revision 2 wants the heater off at once: 10 °C against a reading of 18 °C.
            let Input::Setpoint(mut version) = setpoint(&sensor) else {
                unreachable!()
            };
            version.revision = 2;
            version.level = level;
            version.level_revision = 1;
            version.setpoint = Some(
                Setpoint::new(
                    sensor.clone(),
                    BuildingId::parse("b").unwrap(),
                    10.0,
                    0.5,
                    0.5,
                )
                .unwrap(),
            );
            engine.apply(Input::Setpoint(version)).await.unwrap();
            let off = Some((pb::HeaterCommand::Off, pb::CommandReason::TooHot));
            let expected = if cut { off } else { on };
            assert_eq!(last(&mut engine).await, expected, "{level:?}");
        }
    }
}
