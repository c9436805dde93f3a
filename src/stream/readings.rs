//! The sensor topic: consumes readings as a member of the consumer group, decodes them, sends
//! bad ones to the dead-letter topic, hands good ones to the engine, and stores each offset only
//! after every command decided up to it is acknowledged by the broker (at-least-once).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use futures::stream::{FuturesOrdered, StreamExt};
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Message};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::codec::{decode_reading, DeadLetter};
use super::commands::Follower;
use super::engine::{Ack, Input, LoopStats, Position};
use super::{enqueue, StreamError};
use crate::config::KafkaConfig;
use crate::telemetry;

/// Header of a dead-letter record: the reason code, e.g. `non_finite_temperature`.
pub const DEAD_LETTER_REASON_HEADER: &str = "thermostat-dead-letter-reason";
/// Header of a dead-letter record: the human-readable detail.
pub const DEAD_LETTER_DETAIL_HEADER: &str = "thermostat-dead-letter-detail";

/// At most this many readings wait for their commands' acknowledgement; beyond that, consuming
/// pauses. Bounds memory when the broker is slow to acknowledge.
const MAX_IN_FLIGHT: usize = 100_000;
/// Tries of the commit at shutdown (each waits for the broker's answer).
const FINAL_COMMIT_ATTEMPTS: u32 = 3;

/// Notices rebalances. The callback runs inside librdkafka's poll, where nothing may be awaited,
/// so it only counts and wakes the readings loop, which reacts before its next record.
#[derive(Default)]
pub struct RebalanceWatch {
    generation: AtomicU64,
    changed: Notify,
    last_error: Mutex<Option<String>>,
}

impl ClientContext for RebalanceWatch {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for topic in statistics.topics.values() {
            for (partition, p) in &topic.partitions {
                // librdkafka reports -1 for partitions it does not consume (and the internal
                // partition -1).
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!(telemetry::CONSUMER_LAG, "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for RebalanceWatch {
    fn post_rebalance(
        &self,
        _consumer: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &Rebalance<'_>,
    ) {
        if let Rebalance::Error(e) = rebalance {
            if let Ok(mut last) = self.last_error.lock() {
                *last = Some(e.to_string());
            }
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_one();
    }
}

pub type ReadingsConsumer = StreamConsumer<RebalanceWatch>;

pub struct Readings {
    pub consumer: ReadingsConsumer,
    pub producer: FutureProducer,
    pub config: KafkaConfig,
    pub engine: mpsc::Sender<Input>,
    pub acks: mpsc::UnboundedReceiver<Ack>,
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
        let mut in_flight = FuturesOrdered::new();
        let mut seen_generation = 0;
        let mut stopping = false;
        let mut acks_open = true;
        while !(stopping && !acks_open && in_flight.is_empty()) {
            tokio::select! {
                biased;
                ack = self.acks.recv(), if acks_open => match ack {
                    Some(Ack { position, delivery }) => in_flight.push_back(async move {
                        let result = match delivery {
                            Some(delivery) => match delivery.await {
                                Ok(Ok(_)) => Ok(()),
                                Ok(Err((e, _))) => Err(StreamError::Produce(e)),
                                Err(_) => Err(StreamError::Stopped("producer")),
                            },
                            None => Ok(()),
                        };
                        result.map(|()| position)
                    }),
                    None => acks_open = false,
                },
                Some(done) = in_flight.next() => {
                    if let Some(position) = done? {
                        let topic = &self.config.sensor_topic;
                        // Fails for a partition revoked meanwhile: its new owner reads the record
                        // again; if it decides the same command, that carries the same sequence.
                        if let Err(e) = self.consumer.store_offset(topic, position.partition, position.offset) {
                            tracing::debug!(error = %e, ?position, "offset not stored");
                        }
                    }
                }
                _ = shutdown.cancelled(), if !stopping => stopping = true,
                _ = self.consumer.context().changed.notified(), if !stopping => {
                    self.check_rebalance(&mut seen_generation).await?;
                }
                message = self.consumer.recv(), if !stopping && in_flight.len() < MAX_IN_FLIGHT => {
                    let message = match message {
                        Ok(message) => message,
                        Err(e) => {
                            tracing::warn!(error = %e, "sensor topic consumer error");
                            continue;
                        }
                    };
                    self.check_rebalance(&mut seen_generation).await?;
                    let input = self.input(&message).await?;
                    if self.engine.send(input).await.is_err() {
                        // The engine stopped (shutdown): stop consuming, drain what is in flight.
                        stopping = true;
                    }
                }
            }
        }
        // A failed final commit means the next owner handles these readings again (their
        // commands carry the same sequence, so subscribers drop them): retry a transient
        // failure a few times rather than give up on the first.
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
        Ok(())
    }

    async fn check_rebalance(&self, seen_generation: &mut u64) -> Result<(), StreamError> {
        let generation = self.consumer.context().generation.load(Ordering::SeqCst);
        if generation == *seen_generation {
            return Ok(());
        }
        *seen_generation = generation;
        self.on_rebalance().await
    }

    /// After a rebalance, catches up with the command topic before deciding anything for newly
    /// assigned partitions: the previous owner's last commands must be known, or a command
    /// could be lost or repeated.
    async fn on_rebalance(&self) -> Result<(), StreamError> {
        if let Some(e) = self
            .consumer
            .context()
            .last_error
            .lock()
            .ok()
            .and_then(|mut e| e.take())
        {
            tracing::warn!(error = %e, "rebalance error");
        }
        let assignment = self.consumer.assignment().map_err(StreamError::Consumer)?;
        let partitions: Vec<i32> = assignment
            .elements_for_topic(&self.config.sensor_topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        self.follower.caught_up().await?;
        tracing::info!(?partitions, "sensor partitions assigned");
        self.engine
            .send(Input::Assignment(partitions))
            .await
            .map_err(|_| StreamError::Stopped("engine"))
    }

    /// Turns a record into the engine's input; bad records are dead-lettered.
    async fn input(&self, message: &BorrowedMessage<'_>) -> Result<Input, StreamError> {
        let received = std::time::Instant::now();
        let position = Position {
            partition: message.partition(),
            offset: message.offset(),
        };
        let record_time = message
            .timestamp()
            .to_millis()
            .and_then(DateTime::from_timestamp_millis);
        let decoded = decode_reading(
            self.config.sensor_format,
            message.key(),
            message.payload().unwrap_or_default(),
            record_time,
            Utc::now(),
        );
        match decoded {
            Ok((sensor, reading)) => Ok(Input::Reading {
                sensor,
                reading,
                position,
                received,
            }),
            Err(reason) => {
                LoopStats::bump(&self.stats.dead_lettered);
                metrics::counter!(telemetry::DEAD_LETTERS, "reason" => reason.code()).increment(1);
                tracing::debug!(reason = reason.code(), detail = %reason, ?position, "dead-lettering");
                let delivery = self.dead_letter(message, &reason).await?;
                Ok(Input::Skip { position, delivery })
            }
        }
    }

    async fn dead_letter(
        &self,
        message: &BorrowedMessage<'_>,
        reason: &DeadLetter,
    ) -> Result<rdkafka::producer::DeliveryFuture, StreamError> {
        let detail = reason.to_string();
        let source = format!("{}/{}", message.partition(), message.offset());
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: DEAD_LETTER_REASON_HEADER,
                value: Some(reason.code()),
            })
            .insert(Header {
                key: DEAD_LETTER_DETAIL_HEADER,
                value: Some(detail.as_str()),
            })
            .insert(Header {
                key: "thermostat-source-partition-offset",
                value: Some(source.as_str()),
            });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.config.dead_letter_topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        enqueue(&self.producer, record).await
    }
}
