//! The sensor topic: consumes readings as a member of the consumer group, decodes them, sends
//! bad ones to the dead-letter topic, hands good ones to the engine, and stores each offset only
//! after every command decided up to it is acknowledged by the broker (at-least-once).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::Message;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::codec::{decode_reading, storable, DeadLetter};
use super::commands::Follower;
use super::engine::{Input, Record, Records};
use super::handoff::RebalanceWatch;
use super::output::{Ack, Position};
use super::stats::LoopStats;
use super::{enqueue, header, StreamError};
use crate::config::KafkaConfig;
use crate::domain::control::Reading;
use crate::domain::SensorId;

/// Header of a dead-letter record: the reason code, e.g. `non_finite_temperature`.
pub const DEAD_LETTER_REASON_HEADER: &str = "thermostat-dead-letter-reason";
/// Header of a dead-letter record: the human-readable detail.
pub const DEAD_LETTER_DETAIL_HEADER: &str = "thermostat-dead-letter-detail";
/// Header of a dead-letter record whose key or payload was cut ([`DeadLetterLimits`]): the
/// original sizes, `key=<bytes> payload=<bytes>`.
pub const DEAD_LETTER_TRUNCATED_HEADER: &str = "thermostat-dead-letter-truncated";

/// The most a dead letter keeps of a record's key and payload, and of its detail (which may quote
/// the key). Whole, a record near the broker's size limit with a mismatched key made a dead
/// letter over librdkafka's `message.max.bytes` (1 MB); producing it failed, which stops the
/// service, and the record was there again at every start. A reading is some 50 bytes, a valid
/// key at most 128: what is cut is never a reading.
pub struct DeadLetterLimits;

impl DeadLetterLimits {
    pub const KEY: usize = 1024;
    pub const PAYLOAD: usize = 64 * 1024;
    pub const DETAIL: usize = 1024;
}

/// At most this many readings wait for their commands' acknowledgement; beyond that, consuming
/// pauses. Bounds memory when the broker is slow to acknowledge.
const MAX_IN_FLIGHT: usize = 100_000;
/// At most this many records are handed to the engine in one batch: those the consumer already
/// holds when the first arrives.
const BATCH: usize = 256;
/// At most this many records wait in the engine's queue; beyond that, consuming pauses (the
/// engine is the bottleneck: back-pressure).
const QUEUED_RECORDS: usize = 8192;
/// Tries of the commit at shutdown (each waits for the broker's answer).
const FINAL_COMMIT_ATTEMPTS: u32 = 3;
/// How often released offsets are handed to librdkafka, which commits them every
/// `auto.commit.interval.ms` (5 s): storing each reading's offset as it was released cost a
/// topic-handle lookup per reading for nothing.
const STORE_INTERVAL: Duration = Duration::from_millis(50);

pub type ReadingsConsumer = StreamConsumer<RebalanceWatch>;

/// Per partition being recalled, the offset where deciding starts again (see `handoff`).
type Recalls = HashMap<i32, i64>;

/// How often a replica waiting to catch up with the command topic after a rebalance says so,
/// and starts the wait anew (from the topic's ends then).
const CATCH_UP_WARNING: Duration = Duration::from_secs(10);

/// The wait for the command topic after a rebalance; gives the partitions assigned.
type CatchUp = std::pin::Pin<Box<dyn std::future::Future<Output = Vec<i32>> + Send>>;

/// What `forward` took from the consumer after a rebalance, to hand on after the assignment.
enum Held {
    Message(OwnedMessage),
    End(i32),
}

enum Forwarded {
    Done,
    EngineStopped,
    /// The group rebalanced; with what came first after it.
    Rebalanced(Option<Held>),
}

/// The record's Kafka timestamp, whoever set it.
fn record_time(message: &impl Message) -> Option<DateTime<Utc>> {
    message
        .timestamp()
        .to_millis()
        .and_then(DateTime::from_timestamp_millis)
}

/// When the broker appended the record, if its topic stamps records so (`LogAppendTime`); a
/// `CreateTime` is the producer's clock, which may be as wrong as the reading's own.
fn appended(message: &impl Message) -> Option<DateTime<Utc>> {
    match message.timestamp() {
        rdkafka::Timestamp::LogAppendTime(millis) => DateTime::from_timestamp_millis(millis),
        _ => None,
    }
}

/// The partition was read to its end: the fail-safe may count its silence, and a recall that
/// reached it is over.
fn end_of(partition: i32, recalls: &mut Recalls, records: &mut Vec<Record>) {
    if recalls.remove(&partition).is_some() {
        records.push(Record::RecallDone { partition });
    }
    records.push(Record::End { partition });
}

/// Reads the command topic up to its end, however long that takes: a partition without a
/// leader holds the new assignment back (reported by `LoopStats::catching_up` and health),
/// but never what this replica still has to acknowledge.
async fn catch_up(follower: Follower, stats: Arc<LoopStats>, partitions: Vec<i32>) -> Vec<i32> {
    let started = std::time::Instant::now();
    loop {
        match tokio::time::timeout(CATCH_UP_WARNING, follower.caught_up()).await {
            Ok(Ok(())) => break,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read the command topic's ends: retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(_) => tracing::warn!(
                waited = ?started.elapsed(),
                "still reading the command topic before deciding for new partitions"
            ),
        }
        stats.catching_up.store(true, Ordering::Relaxed);
    }
    stats.catching_up.store(false, Ordering::Relaxed);
    partitions
}

pub struct Readings {
    pub consumer: Arc<ReadingsConsumer>,
    pub producer: FutureProducer,
    pub config: KafkaConfig,
    pub engine: mpsc::Sender<Input>,
    pub acks: mpsc::UnboundedReceiver<Vec<Ack>>,
    pub follower: Follower,
    pub stats: Arc<LoopStats>,
}

impl Readings {
    /// Consumes until `shutdown`, then waits for every outstanding acknowledgement, stores the
    /// offsets and commits them.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), StreamError> {
        self.consumer
            .subscribe(&[self.config.sensor_topic.as_str()])
            .map_err(StreamError::Consumer)?;
        let mut acks = AckQueue::default();
        let queued = Arc::new(Semaphore::new(QUEUED_RECORDS));
        let mut store = tokio::time::interval(STORE_INTERVAL);
        store.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen_generation = 0;
        let mut stopping = false;
        let mut acks_open = true;
        // After a rebalance: the wait for the command topic, and the record that came first.
        let mut catching_up: Option<CatchUp> = None;
        let mut held: Option<Held> = None;
        let mut recalls = Recalls::new();
        while !(stopping && !acks_open && acks.waiting.is_empty()) {
            let listening =
                !stopping && catching_up.is_none() && acks.waiting.len() < MAX_IN_FLIGHT;
            self.stats.listening(listening);
            tokio::select! {
                biased;
                batch = self.acks.recv(), if acks_open => match batch {
                    Some(batch) => {
                        for Ack { position, delivery } in batch {
                            acks.push(position, delivery);
                        }
                    }
                    None => acks_open = false,
                },
                delivered = oldest_delivery(&mut acks.waiting), if !acks.waiting.is_empty() => {
                    delivered?;
                    acks.delivered();
                }
                _ = shutdown.cancelled(), if !stopping => stopping = true,
                _ = self.consumer.context().changed.notified(), if !stopping => {
                    if let Some(wait) = self.rebalanced(&mut seen_generation, &mut recalls)? {
                        catching_up = Some(wait);
                    }
                }
                partitions = async { catching_up.as_mut()?.await.into() }, if catching_up.is_some() => {
                    catching_up = None;
                    if let Some(partitions) = partitions {
                        let first = held.take();
                        if !self.assign(partitions, seen_generation, first, &mut recalls, &queued).await? {
                            stopping = true;
                        }
                    }
                }
                _ = store.tick() => acks.store(&self.consumer, &self.config.sensor_topic),
                message = self.consumer.recv(), if listening => {
                    self.stats.listening(false);
                    match self.forward(message, &queued, seen_generation, &mut recalls).await? {
                        Forwarded::Done => {}
                        // The engine stopped (shutdown): stop consuming, drain what is in flight.
                        Forwarded::EngineStopped => stopping = true,
                        Forwarded::Rebalanced(first) => {
                            held = first;
                            catching_up = self.rebalanced(&mut seen_generation, &mut recalls)?;
                        }
                    }
                }
            }
        }
        acks.store(&self.consumer, &self.config.sensor_topic);
        self.final_commit();
        Ok(())
    }

    /// A failed final commit means the next owner handles these readings again (their commands
    /// carry the same sequence, so subscribers drop them): a transient failure is retried a few
    /// times rather than given up on the first.
    fn final_commit(&self) {
        for attempt in 1..=FINAL_COMMIT_ATTEMPTS {
            match self.consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => {
                    tracing::info!("sensor offsets committed");
                    break;
                }
                // Nothing stored since the last commit.
                Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => break,
                Err(e) => tracing::warn!(error = %e, attempt, "final offset commit failed"),
            }
        }
    }

    /// Hands the engine `first` and the records the consumer already holds behind it (up to
    /// `BATCH`) in one batch, up to a rebalance: the record after it is handed back.
    async fn forward(
        &self,
        first: KafkaResult<BorrowedMessage<'_>>,
        queued: &Arc<Semaphore>,
        seen_generation: u64,
        recalls: &mut Recalls,
    ) -> Result<Forwarded, StreamError> {
        let mut records = Vec::with_capacity(BATCH);
        let mut more = self.consumer.stream();
        let mut next = Some(first);
        while let Some(message) = next.take() {
            if self.consumer.context().generation.load(Ordering::SeqCst) != seen_generation {
                // What was consumed before the rebalance goes to the engine before the new
                // assignment does; what comes after waits for it.
                if !self.send(records, queued).await {
                    return Ok(Forwarded::EngineStopped);
                }
                return Ok(Forwarded::Rebalanced(match message {
                    Ok(message) => Some(Held::Message(message.detach())),
                    Err(KafkaError::PartitionEOF(partition)) => Some(Held::End(partition)),
                    Err(_) => None,
                }));
            }
            match message {
                Ok(message) => self.take(&message, recalls, &mut records).await?,
                Err(KafkaError::PartitionEOF(partition)) => {
                    end_of(partition, recalls, &mut records)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sensor topic consumer error");
                    break;
                }
            }
            if records.len() < BATCH {
                // Only what is already there: never waits.
                next = more.next().now_or_never().flatten();
            }
        }
        Ok(if self.send(records, queued).await {
            Forwarded::Done
        } else {
            Forwarded::EngineStopped
        })
    }

    /// False when the engine has stopped.
    async fn send(&self, records: Vec<Record>, queued: &Arc<Semaphore>) -> bool {
        if records.is_empty() {
            return true;
        }
        let Ok(queue_permits) = queued
            .clone()
            .acquire_many_owned(records.len() as u32)
            .await
        else {
            return false;
        };
        let batch = Input::Records(Records {
            records,
            queue_permits,
        });
        self.engine.send(batch).await.is_ok()
    }

    /// After a rebalance: the wait for the command topic to be read up to its end before the
    /// newly assigned partitions are decided for (the previous owner's last commands must be
    /// known, or a command could be lost or repeated). `None` when nothing changed.
    fn rebalanced(
        &self,
        seen_generation: &mut u64,
        recalls: &mut Recalls,
    ) -> Result<Option<CatchUp>, StreamError> {
        let generation = self.consumer.context().generation.load(Ordering::SeqCst);
        if generation == *seen_generation {
            return Ok(None);
        }
        *seen_generation = generation;
        *recalls = self.consumer.context().take_recalls();
        let last_error = self.consumer.context().last_error.lock().ok();
        if let Some(e) = last_error.and_then(|mut e| e.take()) {
            tracing::warn!(error = %e, "rebalance error");
        }
        let assignment = self.consumer.assignment().map_err(StreamError::Consumer)?;
        let partitions: Vec<i32> = assignment
            .elements_for_topic(&self.config.sensor_topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        if partitions.is_empty() {
            return Ok(Some(Box::pin(async { Vec::new() })));
        }
        let (follower, stats) = (self.follower.clone(), self.stats.clone());
        Ok(Some(Box::pin(catch_up(follower, stats, partitions))))
    }

    /// Hands the engine its new partitions, then the record that came first for them. False
    /// when the engine has stopped.
    async fn assign(
        &self,
        partitions: Vec<i32>,
        generation: u64,
        first: Option<Held>,
        recalls: &mut Recalls,
        queued: &Arc<Semaphore>,
    ) -> Result<bool, StreamError> {
        let recalling: Vec<i32> = recalls.keys().copied().collect();
        tracing::info!(?partitions, ?recalling, "sensor partitions assigned");
        let assignment = Input::Assignment {
            partitions,
            recalling,
            generation,
            topic_partitions: self.consumer.context().topic_partitions(),
        };
        if self.engine.send(assignment).await.is_err() {
            return Ok(false);
        }
        let mut records = Vec::new();
        match first {
            Some(Held::Message(message)) => self.take(&message, recalls, &mut records).await?,
            Some(Held::End(partition)) => end_of(partition, recalls, &mut records),
            None => {}
        }
        Ok(self.send(records, queued).await)
    }

    /// Adds what `message` is for the engine to `records`: a reading to recall while its
    /// partition is recalled (a bad record then was dead-lettered already), else a record to
    /// decide on, after the end of the recall.
    async fn take(
        &self,
        message: &impl Message,
        recalls: &mut Recalls,
        records: &mut Vec<Record>,
    ) -> Result<(), StreamError> {
        let partition = message.partition();
        if let Some(&until) = recalls.get(&partition) {
            if message.offset() < until {
                records.extend(self.recalled(message));
                return Ok(());
            }
            recalls.remove(&partition);
            records.push(Record::RecallDone { partition });
        }
        records.push(self.record(message).await?);
        Ok(())
    }

    /// A reading decided on before, as it was received then (its record's time, at the latest
    /// now); `None` for a record that is no reading.
    fn recalled(&self, message: &impl Message) -> Option<Record> {
        let now = Utc::now();
        let (sensor, mut reading) = self.decode(message, now).ok()?;
        reading.received = record_time(message)
            .filter(|t| storable(*t))
            .map_or(now, |t| t.min(now));
        Some(Record::Recalled {
            sensor,
            reading,
            partition: message.partition(),
        })
    }

    fn decode(
        &self,
        message: &impl Message,
        now: DateTime<Utc>,
    ) -> Result<(SensorId, Reading), DeadLetter> {
        decode_reading(
            self.config.sensor_format,
            self.config.reading_range_celsius,
            TimeDelta::from_std(self.config.reading_max_ahead).unwrap_or(TimeDelta::MAX),
            message.key(),
            message.payload().unwrap_or_default(),
            record_time(message),
            appended(message),
            now,
        )
    }

    /// Turns a record into the engine's input; bad records are dead-lettered.
    async fn record(&self, message: &impl Message) -> Result<Record, StreamError> {
        let received = std::time::Instant::now();
        let position = Position {
            partition: message.partition(),
            offset: message.offset(),
        };
        match self.decode(message, Utc::now()) {
            Ok((sensor, reading)) => Ok(Record::Reading {
                sensor,
                reading,
                position,
                received,
                trace: crate::traces::enabled()
                    .then(|| crate::traces::remote_parent(|key| header(message, key)))
                    .flatten(),
            }),
            Err(reason) => {
                self.stats.dead_lettered_for(&reason);
                tracing::debug!(reason = reason.code(), detail = %reason, ?position, "dead-lettering");
                let delivery = self.dead_letter(message, &reason).await?;
                Ok(Record::Skip { position, delivery })
            }
        }
    }

    async fn dead_letter(
        &self,
        message: &impl Message,
        reason: &DeadLetter,
    ) -> Result<rdkafka::producer::DeliveryFuture, StreamError> {
        dead_letter(
            &self.producer,
            &self.config.dead_letter_topic,
            message,
            reason,
        )
        .await
    }
}

/// Moves `message` to `topic` (the dead-letter topic) with `reason` in its headers.
pub(super) async fn dead_letter(
    producer: &FutureProducer,
    topic: &str,
    message: &impl Message,
    reason: &DeadLetter,
) -> Result<rdkafka::producer::DeliveryFuture, StreamError> {
    let detail = reason.to_string();
    let source = format!("{}/{}", message.partition(), message.offset());
    let kept = Kept::of(message.key(), message.payload());
    let mut headers = OwnedHeaders::new()
        .insert(Header {
            key: DEAD_LETTER_REASON_HEADER,
            value: Some(reason.code()),
        })
        .insert(Header {
            key: DEAD_LETTER_DETAIL_HEADER,
            value: Some(cut_str(&detail, DeadLetterLimits::DETAIL)),
        })
        .insert(Header {
            key: "thermostat-source-partition-offset",
            value: Some(source.as_str()),
        })
        .insert(Header {
            key: "thermostat-source-topic",
            value: Some(message.topic()),
        });
    if let Some(sizes) = &kept.truncated {
        headers = headers.insert(Header {
            key: DEAD_LETTER_TRUNCATED_HEADER,
            value: Some(sizes.as_str()),
        });
    }
    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
    if let Some(key) = kept.key {
        record = record.key(key);
    }
    if let Some(payload) = kept.payload {
        record = record.payload(payload);
    }
    enqueue(producer, record).await
}

/// What a dead letter keeps of a record's key and payload.
#[derive(Debug, PartialEq)]
struct Kept<'a> {
    key: Option<&'a [u8]>,
    payload: Option<&'a [u8]>,
    /// The [`DEAD_LETTER_TRUNCATED_HEADER`] value when anything was cut.
    truncated: Option<String>,
}

impl<'a> Kept<'a> {
    fn of(key: Option<&'a [u8]>, payload: Option<&'a [u8]>) -> Self {
        let cut = |bytes: Option<&'a [u8]>, max: usize| bytes.map(|b| &b[..b.len().min(max)]);
        let len = |bytes: Option<&[u8]>| bytes.map_or(0, <[u8]>::len);
        let kept = Self {
            key: cut(key, DeadLetterLimits::KEY),
            payload: cut(payload, DeadLetterLimits::PAYLOAD),
            truncated: None,
        };
        let truncated = (len(kept.key) < len(key) || len(kept.payload) < len(payload))
            .then(|| format!("key={} payload={}", len(key), len(payload)));
        Self { truncated, ..kept }
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut_str(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The engine's acknowledgements, in the order it decided, and the offsets they release: an
/// offset is stored only once every command decided before it is acknowledged, so only the
/// oldest delivery is awaited. Generic over the delivery, to test the order without a broker.
struct AckQueue<D> {
    /// Positions with the delivery to wait for before each; starts with one that has a
    /// delivery (or is empty).
    waiting: VecDeque<(Option<Position>, Option<D>)>,
    /// The newest released offset per partition, not yet stored.
    released: Vec<Position>,
}

impl<D> Default for AckQueue<D> {
    fn default() -> Self {
        Self {
            waiting: VecDeque::new(),
            released: Vec::new(),
        }
    }
}

impl<D> AckQueue<D> {
    fn push(&mut self, position: Option<Position>, delivery: Option<D>) {
        if self.waiting.is_empty() && delivery.is_none() {
            self.release(position);
        } else {
            self.waiting.push_back((position, delivery));
        }
    }

    /// The oldest delivery is acknowledged: releases it and what waited only on it.
    fn delivered(&mut self) {
        if let Some((position, _)) = self.waiting.pop_front() {
            self.release(position);
        }
        while self.waiting.front().is_some_and(|(_, d)| d.is_none()) {
            if let Some((position, _)) = self.waiting.pop_front() {
                self.release(position);
            }
        }
    }

    fn release(&mut self, position: Option<Position>) {
        let Some(position) = position else { return };
        match self
            .released
            .iter_mut()
            .find(|p| p.partition == position.partition)
        {
            Some(p) => p.offset = p.offset.max(position.offset),
            None => self.released.push(position),
        }
    }

    /// Hands the released offsets to the consumer, to be committed in the background.
    fn store(&mut self, consumer: &ReadingsConsumer, topic: &str) {
        for position in self.released.drain(..) {
            // Fails for a partition revoked meanwhile: its new owner reads the records again;
            // if it decides the same commands, they carry the same sequences.
            if let Err(e) = consumer.store_offset(topic, position.partition, position.offset) {
                tracing::debug!(error = %e, ?position, "offset not stored");
            }
        }
    }
}

/// Waits for the oldest outstanding delivery (`waiting` starts with one when not empty).
async fn oldest_delivery(
    waiting: &mut VecDeque<(Option<Position>, Option<DeliveryFuture>)>,
) -> Result<(), StreamError> {
    let Some(delivery) = waiting.front_mut().and_then(|(_, d)| d.as_mut()) else {
        return Ok(());
    };
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(StreamError::Produce(e)),
        Err(_) => Err(StreamError::Stopped("producer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_keeps_a_small_record_whole_and_cuts_a_large_one() {
        let (key, payload) = (b"s1".as_slice(), [7u8; 50]);
        assert_eq!(
            Kept::of(Some(key), Some(&payload)),
            Kept {
                key: Some(key),
                payload: Some(&payload),
                truncated: None
            }
        );
        assert_eq!(Kept::of(None, None).truncated, None);

        let (key, payload) = (vec![b'k'; 600_000], vec![1u8; 100_000]);
        let kept = Kept::of(Some(&key), Some(&payload));
        assert_eq!(kept.key.map(<[u8]>::len), Some(DeadLetterLimits::KEY));
        assert_eq!(
            kept.payload.map(<[u8]>::len),
            Some(DeadLetterLimits::PAYLOAD)
        );
        assert_eq!(kept.truncated.as_deref(), Some("key=600000 payload=100000"));
        // Either one alone is cut too, and reported with both sizes.
        let kept = Kept::of(Some(b"k"), Some(&payload));
        assert_eq!(kept.key, Some(b"k".as_slice()));
        assert_eq!(kept.truncated.as_deref(), Some("key=1 payload=100000"));
    }

    #[test]
    fn a_detail_is_cut_at_a_character_boundary() {
        assert_eq!(cut_str("short", 1024), "short");
        assert_eq!(cut_str("abcdef", 3), "abc");
        // "é" is two bytes: cutting inside it keeps the character out.
        assert_eq!(cut_str("aéb", 2), "a");
        assert_eq!(cut_str("aéb", 3), "aé");
    }

    fn at(offset: i64) -> Option<Position> {
        Some(Position {
            partition: 0,
            offset,
        })
    }

    fn released(queue: &AckQueue<u32>) -> Vec<(i32, i64)> {
        queue
            .released
            .iter()
            .map(|p| (p.partition, p.offset))
            .collect()
    }

    #[test]
    fn a_reading_without_a_command_is_released_at_once() {
        let mut queue = AckQueue::<u32>::default();
        queue.push(at(1), None);
        queue.push(at(2), None);
        assert_eq!(released(&queue), [(0, 2)]);
        assert!(queue.waiting.is_empty());
    }

    #[test]
    fn nothing_behind_an_unacknowledged_command_is_released() {
        let mut queue = AckQueue::<u32>::default();
        queue.push(at(1), None);
        queue.push(at(2), Some(2));
        queue.push(at(3), None);
        queue.push(None, Some(99)); // a setpoint's command: no offset of its own
        queue.push(at(4), None);
        assert_eq!(released(&queue), [(0, 1)]);
        queue.delivered();
        // 2 and 3 are free; 4 still waits behind the setpoint's command.
        assert_eq!(released(&queue), [(0, 3)]);
        assert_eq!(queue.waiting.len(), 2);
        queue.delivered();
        assert_eq!(released(&queue), [(0, 4)]);
        assert!(queue.waiting.is_empty());
    }

    #[test]
    fn partitions_are_released_separately_and_never_backwards() {
        let mut queue = AckQueue::<u32>::default();
        let on = |partition, offset| Some(Position { partition, offset });
        queue.push(on(0, 10), None);
        queue.push(on(1, 5), None);
        queue.push(on(0, 7), None); // older record of partition 0, e.g. after a rebalance
        assert_eq!(released(&queue), [(0, 10), (1, 5)]);
    }
}
