//! The handoff of sensor partitions between replicas, as librdkafka's rebalance callback sees it.
//! A replica that gives partitions up stops deciding for them, and has every command it decided
//! acknowledged, before librdkafka rejoins the group (the fence): the next owner then reads those
//! commands back before it decides, so no two commands share a sequence. A replica that takes
//! partitions over first recalls the readings their last owner decided on (up to where it
//! committed, within `STALE_AFTER`): a setpoint change acts on the latest one, even if the last
//! owner died before it could.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafkaRespErr as RespErr;
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, Notify};

use super::engine::Revoke;
use crate::telemetry;

/// How long a revocation waits for the engine to stop deciding, and then for the commands it
/// decided to be acknowledged, before the partitions are given up anyway.
const FENCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound of each broker request that plans a recall; without answers nothing is recalled.
const RECALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The most records recalled per partition (a broker that cannot find records by time, like
/// Tansu 0.6 which answers offset 0, would otherwise have the whole partition read again).
const RECALL_LIMIT: i64 = 100_000;

/// The readings consumer's context: it notices rebalances (the readings loop is woken and reacts
/// before its next record), and once armed with a [`Handoff`], fences and recalls.
#[derive(Default)]
pub struct RebalanceWatch {
    pub(super) generation: AtomicU64,
    pub(super) changed: Notify,
    pub(super) last_error: Mutex<Option<String>>,
    handoff: OnceLock<Handoff>,
    /// Per partition assigned last, the offset up to which readings are recalled, not decided.
    recalls: Mutex<HashMap<i32, i64>>,
    /// The sensor topic's partition count at the last assignment; 0 if unknown.
    topic_partitions: AtomicI32,
}

/// What the handoff needs: the engine's channel for revocations, the producer to flush, the
/// sensor topic, and how far back readings still count as fresh (`STALE_AFTER`).
pub struct Handoff {
    pub revokes: mpsc::UnboundedSender<Revoke>,
    pub producer: FutureProducer,
    pub topic: String,
    pub recall_window: Duration,
}

impl RebalanceWatch {
    /// Arms the fence and the recall.
    pub fn arm(&self, handoff: Handoff) {
        let _ = self.handoff.set(handoff);
    }

    /// The recalls planned at the last assignment, by partition: the offset where deciding
    /// starts again.
    pub fn take_recalls(&self) -> HashMap<i32, i64> {
        self.recalls
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    /// How many partitions the sensor topic had at the last assignment, if the broker said.
    pub fn topic_partitions(&self) -> Option<i32> {
        Some(self.topic_partitions.load(Ordering::SeqCst)).filter(|&n| n > 0)
    }

    fn note_error(&self, error: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error);
        }
    }
}

impl Handoff {
    fn revoke(&self, partitions: Vec<i32>, generation: u64) {
        let (done, stopped) = std::sync::mpsc::channel();
        let revoke = Revoke {
            partitions,
            done,
            generation,
        };
        if self.revokes.send(revoke).is_err() {
            return; // The engine has stopped: it decides nothing more.
        }
        // A current-thread runtime (some tests) runs the engine on this thread: it cannot wait,
        // and the engine stops deciding at its next input.
        let _ = off_the_runtime(|| {
            if stopped.recv_timeout(FENCE_TIMEOUT).is_err() {
                tracing::warn!("revoked partitions given up before the engine confirmed it stopped deciding for them");
            }
            if let Err(e) = self.producer.flush(Timeout::After(FENCE_TIMEOUT)) {
                tracing::warn!(error = %e, "revoked partitions given up with commands unacknowledged");
            }
        });
    }

    /// Starts each partition of `assignment` where its readings still count as fresh, if that
    /// is before its committed offset; returns those partitions with their committed offsets.
    fn plan_recall(
        &self,
        consumer: &BaseConsumer<RebalanceWatch>,
        assignment: &mut TopicPartitionList,
    ) -> KafkaResult<HashMap<i32, i64>> {
        let committed = consumer.committed_offsets(assignment.clone(), RECALL_TIMEOUT)?;
        let since = (Utc::now() - self.recall_window).timestamp_millis();
        let mut times = TopicPartitionList::new();
        for element in assignment.elements_for_topic(&self.topic) {
            times.add_partition_offset(&self.topic, element.partition(), Offset::Offset(since))?;
        }
        let starts = consumer.offsets_for_times(times, RECALL_TIMEOUT)?;
        let mut recalls = HashMap::new();
        for start in starts.elements_for_topic(&self.topic) {
            let p = start.partition();
            let until = committed.find_partition(&self.topic, p).map(|e| e.offset());
            if let (Offset::Offset(start), Some(Offset::Offset(until))) = (start.offset(), until) {
                let start = start.max(until - RECALL_LIMIT).max(0);
                if start < until {
                    assignment.set_partition_offset(&self.topic, p, Offset::Offset(start))?;
                    recalls.insert(p, until);
                }
            }
        }
        Ok(recalls)
    }

    /// Plans the recall (see [`Self::plan_recall`]) and counts the topic's partitions.
    fn on_assign(
        &self,
        consumer: &BaseConsumer<RebalanceWatch>,
        assignment: &mut TopicPartitionList,
    ) -> (KafkaResult<HashMap<i32, i64>>, i32) {
        let partitions = consumer
            .fetch_metadata(Some(&self.topic), RECALL_TIMEOUT)
            .map(|m| m.topics().iter().map(|t| t.partitions().len() as i32).sum())
            .unwrap_or(0);
        (self.plan_recall(consumer, assignment), partitions)
    }
}

/// Runs `f`, which blocks, without holding up the runtime's other tasks; `None` on a
/// current-thread runtime, where it cannot (those tasks would wait for it).
fn off_the_runtime<T>(f: impl FnOnce() -> T) -> Option<T> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => Some(tokio::task::block_in_place(f)),
        Ok(_) => None,
        Err(_) => Some(f()),
    }
}

impl ClientContext for RebalanceWatch {
    /// librdkafka reports reaching a partition's end here too (`enable.partition.eof`), which
    /// is no error: the readings loop takes it from the consumer.
    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode::PartitionEOF;
        match error {
            KafkaError::PartitionEOF(_) | KafkaError::Global(PartitionEOF) => {}
            error => tracing::error!(%error, reason, "librdkafka"),
        }
    }

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
    /// The eager protocol (librdkafka's default assignors; the service sets no other): every
    /// rebalance revokes the whole assignment, then assigns the new one.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RespErr,
        assignment: &mut TopicPartitionList,
    ) {
        let partitions = || {
            assignment
                .elements()
                .iter()
                .map(|e| e.partition())
                .collect()
        };
        let done = match err {
            RespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let (planned, partitions) = match self.handoff.get() {
                    Some(handoff) => off_the_runtime(|| handoff.on_assign(consumer, assignment))
                        .unwrap_or_else(|| handoff.on_assign(consumer, assignment)),
                    None => (Ok(HashMap::new()), 0),
                };
                self.topic_partitions.store(partitions, Ordering::SeqCst);
                let recalls = planned.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot recall the readings decided before this assignment");
                    HashMap::new()
                });
                if let Ok(mut r) = self.recalls.lock() {
                    *r = recalls;
                }
                consumer.assign(assignment)
            }
            RespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if let Some(handoff) = self.handoff.get() {
                    handoff.revoke(partitions(), self.generation.load(Ordering::SeqCst));
                }
                consumer.unassign()
            }
            other => {
                let code: rdkafka::types::RDKafkaErrorCode = other.into();
                self.note_error(format!("rebalance error: {code}"));
                let _ = consumer.unassign();
                Ok(())
            }
        };
        if let Err(e) = done {
            self.note_error(e.to_string());
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_one();
    }
}
