//! The consumer group's progress on every sensor partition, seen from any replica: records
//! behind (the partition's end against the group's committed offset) and partitions that fall
//! behind while nothing commits on them. librdkafka's own lag gauge lists only the partitions a
//! replica is assigned; a partition held by a member that died without leaving (Tansu 0.6 keeps
//! such members with dynamic membership) would otherwise show nowhere.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::security::SaslClients;
use super::stats::LoopStats;
use super::{consumer_config, StreamError};
use crate::config::KafkaConfig;
use crate::telemetry;

/// How often the group's offsets are read (as often as librdkafka's statistics).
const INTERVAL: Duration = Duration::from_secs(5);
/// A partition with records behind whose committed offset has not moved for this long is
/// stalled: no replica consumes it, or the one that should cannot commit.
pub const STALLED_AFTER: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A partition's progress as last seen.
struct Progress {
    committed: i64,
    since: Instant,
}

/// Starts reading the group's offsets in `tasks`, with a consumer of the group's id that never
/// subscribes: it reads offsets without joining the group.
pub fn start(
    kafka: &KafkaConfig,
    stats: Arc<LoopStats>,
    tasks: &mut JoinSet<Result<(), StreamError>>,
    sasl: &mut SaslClients,
    shutdown: CancellationToken,
) -> Result<(), StreamError> {
    let consumer: Arc<BaseConsumer> = Arc::new(
        consumer_config(kafka, &kafka.consumer_group)?
            .set("enable.auto.commit", "false")
            .create()
            .map_err(StreamError::Config)?,
    );
    sasl.track(consumer.clone());
    tasks.spawn(run(consumer, kafka.sensor_topic.clone(), stats, shutdown));
    Ok(())
}

/// Reads the group's offsets every `INTERVAL` until `shutdown`, setting
/// `thermostat_group_lag_records` and `LoopStats::stalled_partitions`.
async fn run(
    consumer: Arc<BaseConsumer>,
    topic: String,
    stats: Arc<LoopStats>,
    shutdown: CancellationToken,
) -> Result<(), StreamError> {
    let mut progress: HashMap<i32, Progress> = HashMap::new();
    loop {
        let (c, t) = (consumer.clone(), topic.clone());
        let read = tokio::task::spawn_blocking(move || lags(&c, &t));
        let lags = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            read = read => read.map_err(|_| StreamError::Stopped("group lag reader"))?,
        };
        match lags {
            Ok(lags) => {
                let stalled = stalled(&mut progress, &lags, Instant::now());
                stats.stalled_partitions.store(stalled, Ordering::Relaxed);
            }
            Err(e) => tracing::debug!(error = %e, "group offsets not read"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

/// Per partition: the group's committed offset (the partition's start when it has none) and
/// the records behind it. Blocking.
fn lags(consumer: &BaseConsumer, topic: &str) -> Result<Vec<(i32, i64, i64)>, StreamError> {
    // Serves the consumer's events (errors during a broker outage), which would pile up.
    let _ = consumer.poll(Duration::ZERO);
    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .map_err(StreamError::Consumer)?;
    let mut list = TopicPartitionList::new();
    for t in metadata.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            list.add_partition(topic, p.id());
        }
    }
    let committed = consumer
        .committed_offsets(list.clone(), REQUEST_TIMEOUT)
        .map_err(StreamError::Consumer)?;
    let mut lags = Vec::new();
    for element in list.elements() {
        let p = element.partition();
        let (low, high) = consumer
            .fetch_watermarks(topic, p, REQUEST_TIMEOUT)
            .map_err(StreamError::Consumer)?;
        let at = match committed.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => low,
        };
        let behind = (high - at).max(0);
        metrics::gauge!(telemetry::GROUP_LAG, "partition" => p.to_string()).set(behind as f64);
        lags.push((p, at, behind));
    }
    Ok(lags)
}

/// How many partitions have had records behind with no committed progress for
/// `STALLED_AFTER`; each is logged once when it becomes so.
fn stalled(progress: &mut HashMap<i32, Progress>, lags: &[(i32, i64, i64)], now: Instant) -> u64 {
    let mut count = 0;
    for &(partition, committed, behind) in lags {
        let seen = progress.entry(partition).or_insert(Progress {
            committed,
            since: now,
        });
        if seen.committed != committed || behind == 0 {
            *seen = Progress {
                committed,
                since: now,
            };
            continue;
        }
        let still = now.duration_since(seen.since);
        if still >= STALLED_AFTER {
            if still < STALLED_AFTER + INTERVAL {
                tracing::warn!(
                    partition,
                    behind,
                    "sensor partition has records behind and no progress for a minute: no replica consumes it"
                );
            }
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_is_stalled_after_a_minute_behind_without_progress() {
        let mut progress = HashMap::new();
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        // Partition 0 moves, 1 is behind and stuck, 2 is stuck but has nothing behind.
        assert_eq!(
            stalled(&mut progress, &[(0, 5, 3), (1, 7, 4), (2, 9, 0)], at(0)),
            0
        );
        assert_eq!(
            stalled(&mut progress, &[(0, 8, 3), (1, 7, 9), (2, 9, 0)], at(59)),
            0
        );
        assert_eq!(
            stalled(&mut progress, &[(0, 9, 3), (1, 7, 9), (2, 9, 0)], at(60)),
            1
        );
        // It commits again: no longer stalled, and the minute starts anew.
        assert_eq!(
            stalled(&mut progress, &[(0, 9, 0), (1, 8, 9), (2, 9, 0)], at(61)),
            0
        );
        assert_eq!(
            stalled(&mut progress, &[(0, 9, 0), (1, 8, 9), (2, 9, 0)], at(120)),
            0
        );
        assert_eq!(
            stalled(&mut progress, &[(0, 9, 0), (1, 8, 9), (2, 9, 0)], at(121)),
            1
        );
    }
}
