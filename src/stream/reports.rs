//! The heater report topic (HEATER_REPORT_TOPIC), read whole by every replica without a
//! consumer group, like the command topic: each one compares every heater's commanded state
//! with its reported one, so GetSensorState and watches on any replica show both. A bad record
//! is dead-lettered once, by the replica that decides for its key's sensor partition, and only
//! if it was appended after that replica started (older ones were when they arrived).

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::codec::decode_report;
use super::engine::{Input, Query};
use super::readings::dead_letter;
use super::stats::LoopStats;
use super::StreamError;
use crate::config::KafkaConfig;

pub struct Reports {
    consumer: Arc<StreamConsumer>,
    producer: FutureProducer,
    config: KafkaConfig,
    engine: mpsc::Sender<Input>,
    stats: Arc<LoopStats>,
}

impl Reports {
    pub fn new(
        kafka: &KafkaConfig,
        producer: &FutureProducer,
        engine: &mpsc::Sender<Input>,
        stats: &Arc<LoopStats>,
    ) -> Result<Self, StreamError> {
        Ok(Self {
            consumer: Arc::new(super::report_consumer(kafka)?),
            producer: producer.clone(),
            config: kafka.clone(),
            engine: engine.clone(),
            stats: stats.clone(),
        })
    }

    pub fn consumer(&self) -> Arc<StreamConsumer> {
        self.consumer.clone()
    }

    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StreamError> {
        let Reports {
            consumer,
            producer,
            config,
            engine,
            stats,
        } = self;
        let topic = config.heater_report_topic.clone();
        let partitions = super::commands::partition_ids(consumer.clone(), topic.clone()).await?;
        let mut assignment = TopicPartitionList::new();
        for p in partitions {
            assignment
                .add_partition_offset(&topic, p, Offset::Beginning)
                .map_err(StreamError::Consumer)?;
        }
        consumer
            .assign(&assignment)
            .map_err(StreamError::Consumer)?;
        let started = Utc::now();
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                message = consumer.recv() => message,
            };
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    tracing::warn!(error = %e, "reading heater reports");
                    continue;
                }
            };
            let now = Utc::now();
            let record_time = message
                .timestamp()
                .to_millis()
                .and_then(DateTime::from_timestamp_millis);
            let decoded = decode_report(
                config.sensor_format,
                chrono::TimeDelta::from_std(config.reading_max_ahead)
                    .unwrap_or(chrono::TimeDelta::MAX),
                message.key(),
                message.payload().unwrap_or_default(),
                record_time,
                now,
            );
            match decoded {
                Ok((sensor, report)) => engine
                    .send(Input::Report { sensor, report })
                    .await
                    .map_err(|_| StreamError::Stopped("engine"))?,
                Err(reason) => {
                    let fresh = record_time.is_none_or(|t| t >= started);
                    if fresh && owns(&engine, message.key()).await? {
                        stats.dead_lettered_for(&reason);
                        tracing::debug!(reason = reason.code(), detail = %reason, "dead-lettering a heater report");
                        let delivery =
                            dead_letter(&producer, &config.dead_letter_topic, &message, &reason)
                                .await?;
                        // Best effort: no offset waits on it, the topic is read whole.
                        tokio::spawn(async move {
                            if let Ok(Err((e, _))) = delivery.await {
                                tracing::warn!(error = %e, "a heater report's dead letter was not written");
                            }
                        });
                    }
                }
            }
        }
    }
}

/// Whether this replica decides for the sensor partition `key` maps to.
async fn owns(engine: &mpsc::Sender<Input>, key: Option<&[u8]>) -> Result<bool, StreamError> {
    let (reply, answer) = oneshot::channel();
    engine
        .send(Input::Query(Query::Owns {
            key: key.map(<[u8]>::to_vec),
            reply,
        }))
        .await
        .map_err(|_| StreamError::Stopped("engine"))?;
    answer.await.map_err(|_| StreamError::Stopped("engine"))
}
