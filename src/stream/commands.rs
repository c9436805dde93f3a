//! The command topic, read back by every replica from the beginning (no consumer group). It is
//! the durable record of the last command per sensor: after a restart or a rebalance the engine
//! learns from it what every heater was last told, and subscribers on any replica see commands
//! decided on every replica.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use prost::Message as _;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::engine::{Input, Observed};
use super::output::{ReadingPartition, READING_PARTITION_HEADER};
use super::{header, StreamError};
use crate::proto::v1 as pb;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many commands read back are handed to the engine at once.
const BATCH: usize = 256;

/// Next offset to read, per partition.
type Positions = HashMap<i32, i64>;

/// A handle to ask whether the follower has read everything written so far.
#[derive(Clone)]
pub struct Follower {
    consumer: Arc<StreamConsumer>,
    topic: String,
    positions: watch::Receiver<Positions>,
}

pub struct FollowerTask {
    consumer: Arc<StreamConsumer>,
    topic: String,
    positions: watch::Sender<Positions>,
    engine: mpsc::Sender<Input>,
}

pub fn follower(
    consumer: Arc<StreamConsumer>,
    topic: String,
    engine: mpsc::Sender<Input>,
) -> (Follower, FollowerTask) {
    let (tx, rx) = watch::channel(Positions::new());
    (
        Follower {
            consumer: consumer.clone(),
            topic: topic.clone(),
            positions: rx,
        },
        FollowerTask {
            consumer,
            topic,
            positions: tx,
            engine,
        },
    )
}

/// The partitions of `topic`, each with whether it has a leader (blocking: call from
/// `spawn_blocking`). Asked through a consumer, whose metadata requests never create a topic.
fn describe(
    consumer: &StreamConsumer,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<(i32, bool)>, StreamError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(StreamError::Consumer)?;
    let partitions: Vec<(i32, bool)> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| {
            t.partitions()
                .iter()
                .map(|p| (p.id(), p.error().is_none() && p.leader() >= 0))
        })
        .collect();
    if partitions.is_empty() {
        return Err(StreamError::MissingTopic(topic.to_owned()));
    }
    Ok(partitions)
}

/// The partitions of `topic` (blocking: call from `spawn_blocking`).
fn partitions(consumer: &StreamConsumer, topic: &str) -> Result<Vec<i32>, StreamError> {
    let described = describe(consumer, topic, METADATA_TIMEOUT)?;
    Ok(described.into_iter().map(|(id, _)| id).collect())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StreamError> + Send + 'static,
) -> Result<T, StreamError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| StreamError::Stopped("blocking Kafka call"))?
}

/// The partitions of `topic`.
pub async fn partition_ids(
    consumer: Arc<StreamConsumer>,
    topic: String,
) -> Result<Vec<i32>, StreamError> {
    blocking(move || partitions(&consumer, &topic)).await
}

impl Follower {
    /// Whether a broker describes the command topic, with a leader for every partition, within
    /// `timeout`: without that no command is written or read back.
    pub async fn topic_led(&self, timeout: Duration) -> bool {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        blocking(move || describe(&consumer, &topic, timeout))
            .await
            .is_ok_and(|partitions| partitions.iter().all(|(_, led)| *led))
    }

    /// Waits until every command written to the topic before this call has been read and
    /// handed to the engine.
    pub async fn caught_up(&self) -> Result<(), StreamError> {
        let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
        let ends = blocking(move || {
            partitions(&consumer, &topic)?
                .into_iter()
                .map(|p| {
                    let (low, high) = consumer
                        .fetch_watermarks(&topic, p, METADATA_TIMEOUT)
                        .map_err(StreamError::Consumer)?;
                    Ok((p, low, high))
                })
                .collect::<Result<Vec<_>, StreamError>>()
        })
        .await?;
        let mut positions = self.positions.clone();
        positions
            .wait_for(|read| {
                ends.iter().all(|(p, low, high)| {
                    high <= low || read.get(p).copied().unwrap_or(*low) >= *high
                })
            })
            .await
            .map_err(|_| StreamError::Stopped("command follower"))?;
        Ok(())
    }
}

impl FollowerTask {
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StreamError> {
        let partitions = partition_ids(self.consumer.clone(), self.topic.clone()).await?;
        let mut assignment = TopicPartitionList::new();
        for p in partitions {
            assignment
                .add_partition_offset(&self.topic, p, Offset::Beginning)
                .map_err(StreamError::Consumer)?;
        }
        self.consumer
            .assign(&assignment)
            .map_err(StreamError::Consumer)?;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                message = self.consumer.recv() => message,
            };
            // The records the consumer already holds behind the first go along with it, with
            // one position update for them all.
            let mut observed = Vec::new();
            let mut read = Vec::new();
            let mut more = self.consumer.stream();
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Ok(message) => {
                        read.push((message.partition(), message.offset() + 1));
                        observed.extend(observed_record(&message));
                    }
                    Err(e) => tracing::warn!(error = %e, "command topic consumer error"),
                }
                if observed.len() < BATCH {
                    next = more.next().now_or_never().flatten();
                }
            }
            drop(more);
            if !observed.is_empty() && self.engine.send(Input::Observed(observed)).await.is_err() {
                return Ok(());
            }
            if !read.is_empty() {
                self.positions
                    .send_modify(|positions| positions.extend(read));
            }
        }
    }
}

/// A record of the command topic, decoded; `None` (and a warning) when it is not a command.
fn observed_record(message: &BorrowedMessage<'_>) -> Option<Observed> {
    match pb::HeaterCommandEvent::decode(message.payload().unwrap_or_default()) {
        // The engine passes it on to subscribers if it is news.
        Ok(event) => Some(Observed {
            event: Arc::new(event),
            reading_partition: header(message, READING_PARTITION_HEADER)
                .and_then(ReadingPartition::parse),
        }),
        Err(e) => {
            let (partition, offset) = (message.partition(), message.offset());
            tracing::warn!(error = %e, partition, offset, "undecodable record on the command topic");
            None
        }
    }
}
