//! Where the engine's decisions go: command records to the command topic, each sequence
//! reserved first, and the acknowledgements the readings task waits for before it stores a
//! reading's offset.

use prost::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio::sync::mpsc;

use super::sequences::Sequences;
use super::{enqueue, StreamError};
use crate::proto::v1 as pb;

/// Where a sensor record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// Header on command records naming the sensor-topic partition the deciding replica consumed
/// the sensor from, so whichever replica owns that partition later knows the sensor is its own
/// (for the staleness fail-safe) even before the sensor's next reading.
pub const READING_PARTITION_HEADER: &str = "thermostat-reading-partition";

/// A [`READING_PARTITION_HEADER`]'s value: `p/n`, partition `p` of a sensor topic of `n`
/// partitions (just `p` in records written before the count was added). Once partitions are
/// added, sensor keys map to other partitions: a partition of another count names no owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadingPartition {
    pub partition: i32,
    pub of: Option<i32>,
}

impl ReadingPartition {
    pub fn parse(value: &str) -> Option<Self> {
        let (partition, of) = match value.split_once('/') {
            Some((p, n)) => (p, Some(n.parse().ok()?)),
            None => (value, None),
        };
        Some(Self {
            partition: partition.parse().ok()?,
            of,
        })
    }

    pub(super) fn value(self) -> String {
        match self.of {
            Some(n) => format!("{}/{n}", self.partition),
            None => self.partition.to_string(),
        }
    }
}

/// Where commands go: the producer, the command topic, and the sequences reserved for them.
pub struct CommandOut {
    pub producer: FutureProducer,
    pub topic: String,
    pub sequences: Sequences,
}

impl CommandOut {
    /// Produces `event`, once its sequence is reserved, with the partition its reading came
    /// from and its `traceparent`, if any, as headers. Any error stops the loop: after a
    /// restart the decision is taken again.
    pub async fn produce(
        &mut self,
        event: &pb::HeaterCommandEvent,
        reading_partition: Option<ReadingPartition>,
    ) -> Result<DeliveryFuture, StreamError> {
        self.sequences.cover(event.sequence).await?;
        let payload = event.encode_to_vec();
        let partition = reading_partition.map(ReadingPartition::value);
        let mut headers = None;
        if let Some(p) = &partition {
            headers = Some(OwnedHeaders::new().insert(Header {
                key: READING_PARTITION_HEADER,
                value: Some(p.as_str()),
            }));
        }
        if !event.trace_parent.is_empty() {
            headers = Some(headers.unwrap_or_default().insert(Header {
                key: crate::traces::TRACEPARENT,
                value: Some(event.trace_parent.as_str()),
            }));
        }
        let mut record = FutureRecord::to(&self.topic)
            .key(event.sensor_id.as_str())
            .payload(&payload);
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        enqueue(&self.producer, record).await
    }

    /// A sensor without a known last command numbers its first command above this.
    pub fn sequence_floor(&self) -> u64 {
        self.sequences.floor()
    }

    /// See [`Sequences::raise_floor`].
    pub async fn raise_sequence_floor(&mut self) -> Result<(), StreamError> {
        self.sequences.raise_floor().await
    }
}

/// A delivery to wait for before an offset (if any) may be stored.
pub struct Ack {
    pub position: Option<Position>,
    pub delivery: Option<DeliveryFuture>,
}

/// Acknowledgements of the input being applied, sent to the readings task together once it
/// is.
pub struct Acks {
    to_readings: mpsc::UnboundedSender<Vec<Ack>>,
    pending: Vec<Ack>,
}

impl Acks {
    pub fn new(to_readings: mpsc::UnboundedSender<Vec<Ack>>) -> Self {
        Self {
            to_readings,
            pending: Vec::new(),
        }
    }

    pub fn push(&mut self, position: Option<Position>, delivery: Option<DeliveryFuture>) {
        self.pending.push(Ack { position, delivery });
    }

    pub fn flush(&mut self) -> Result<(), StreamError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.to_readings
            .send(std::mem::take(&mut self.pending))
            .map_err(|_| StreamError::Stopped("readings task"))
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pending.len()
    }
}
