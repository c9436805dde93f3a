//! The control loop on Kafka: sensor readings in, heater commands out, joined with the
//! setpoints cached from PostgreSQL.
//!
//! Tasks: `readings` (consumer group on the sensor topic, dead letters, offsets), `engine`
//! (all per-sensor state and decisions), `commands` (reads the command topic back: recovery and
//! the feed of subscribers) and `setpoint_sync` (LISTEN/NOTIFY and resyncs). Domain rules live in
//! `domain::control`; this module only moves data.

mod cache;
pub mod codec;
pub mod commands;
pub mod engine;
pub mod feed;
mod feedback;
mod group_lag;
mod handoff;
pub mod output;
mod partitioner;
mod probe;
pub mod readings;
mod reports;
pub mod security;
mod sequences;
pub mod setpoint_sync;
pub mod stats;
pub mod topics;

use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{ControlConfig, KafkaConfig};
use crate::domain::SensorId;
use crate::store::Store;
use engine::{Engine, Input, Query, SensorView};
use feed::{Caller, Filter, LiveEvent, SnapshotCursor, SnapshotPart, Start, Subscription};
use stats::LoopStats;

/// Inputs waiting for the engine. Full means the engine is the bottleneck: producers of input
/// (the consumers) wait, which is the back-pressure we want.
const ENGINE_QUEUE: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("Kafka consumer")]
    Consumer(#[source] KafkaError),
    #[error("Kafka producer")]
    Produce(#[source] KafkaError),
    #[error("Kafka client configuration")]
    Config(#[source] KafkaError),
    #[error("no Kafka broker answered at start{}", if heard.is_empty() { String::new() } else { format!(" (librdkafka: {heard})") })]
    Unreachable {
        #[source]
        source: KafkaError,
        /// What librdkafka reported about the connections meanwhile.
        heard: String,
    },
    #[error("topic {0:?} does not exist (topics are not created automatically)")]
    MissingTopic(String),
    #[error("creating topic {topic:?}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("command topic {topic:?} can lose a heater's last command ({reason}): create it with cleanup.policy=compact (thermostat create-topics does), or set ALLOW_COMMAND_TOPIC_DELETION=true to accept that risk")]
    CommandRetention { topic: String, reason: String },
    #[error("database")]
    Store(#[source] crate::Error),
    #[error("the setpoint listener's connection was lost")]
    ListenerLost,
    #[error("{0} stopped")]
    Stopped(&'static str),
    #[error("{0}")]
    Setting(String),
    #[error("the sensor cache cannot index more than {0} sensors")]
    CacheFull(usize),
}

/// The value of `message`'s header `key`, if it is text.
fn header<'a>(message: &'a impl rdkafka::Message, key: &str) -> Option<&'a str> {
    use rdkafka::message::Headers as _;
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| std::str::from_utf8(h.value?).ok())
}

/// Hands a record to the producer, waiting while its queue is full (back-pressure).
pub async fn enqueue<K, P>(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, K, P>,
) -> Result<DeliveryFuture, StreamError>
where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err((e, _)) => return Err(StreamError::Produce(e)),
        }
    }
}

fn client_config(kafka: &KafkaConfig) -> Result<ClientConfig, StreamError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &kafka.kafka_brokers)
        .set("client.id", "thermostat")
        // Tansu and small brokers: detect a lost broker quickly.
        .set("socket.keepalive.enable", "true")
        .set("socket.nagle.disable", "true");
    security::apply(kafka, &mut config)?;
    Ok(config)
}

/// The settings of every consumer of the service (public so benchmarks' baselines use the same).
pub fn consumer_config(kafka: &KafkaConfig, group: &str) -> Result<ClientConfig, StreamError> {
    let mut config = client_config(kafka)?;
    config
        .set("group.id", group)
        .set("fetch.wait.max.ms", millis(kafka.kafka_fetch_wait_max))
        .set("fetch.min.bytes", "1")
        // Prefetched records waiting in librdkafka, per consumer: 16 MB instead of the default
        // 64 MB bounds the service's memory behind a large backlog (issue 4's memory goal is
        // stated with the queues bounded); still ~100k readings of read-ahead.
        .set("queued.max.messages.kbytes", "16384")
        .set("auto.offset.reset", "earliest");
    Ok(config)
}

/// A third of the session timeout (Kafka's rule of thumb), at most librdkafka's default 3 s.
fn heartbeat_interval(kafka: &KafkaConfig) -> Duration {
    (kafka.kafka_session_timeout / 3).min(Duration::from_secs(3))
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

/// Records the producer holds before `enqueue` waits (librdkafka's default is 100 000).
const PRODUCER_QUEUE: u32 = 16_384;
/// Bytes the producer holds before `enqueue` waits (librdkafka's default is 1 GiB): 16 384 dead
/// letters of 64 KiB would be as much, against a pod limit of 512 MiB.
pub const PRODUCER_QUEUE_KBYTES: u32 = 32 * 1024;

/// The producer for commands and dead letters: `acks=all`, idempotent unless turned off (a
/// retry neither repeats, reorders nor skips), at most 5 requests in flight (librdkafka's
/// million let a slow broker pile up a buffer per record), and a bounded queue.
pub fn producer(kafka: &KafkaConfig) -> Result<FutureProducer, StreamError> {
    client_config(kafka)?
        .set("acks", "all")
        .set("enable.idempotence", kafka.kafka_idempotence.to_string())
        .set("max.in.flight.requests.per.connection", "5")
        .set("queue.buffering.max.messages", PRODUCER_QUEUE.to_string())
        .set(
            "queue.buffering.max.kbytes",
            PRODUCER_QUEUE_KBYTES.to_string(),
        )
        .set("linger.ms", millis(kafka.kafka_linger))
        .set("message.timeout.ms", millis(kafka.kafka_message_timeout))
        .set(
            "batch.num.messages",
            kafka.kafka_batch_num_messages.to_string(),
        )
        .create()
        .map_err(StreamError::Config)
}

/// What the API needs of a running loop.
#[derive(Clone)]
pub struct ControlHandle {
    engine: mpsc::Sender<Input>,
    live: broadcast::Sender<LiveEvent>,
    /// Heaters that stopped or started again following their command.
    statuses: broadcast::Sender<crate::proto::v1::HeaterStatus>,
    stats: Arc<LoopStats>,
    producer: FutureProducer,
    follower: commands::Follower,
}

impl ControlHandle {
    async fn ask<T>(&self, query: impl FnOnce(oneshot::Sender<T>) -> Query) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.engine.send(Input::Query(query(tx))).await.ok()?;
        rx.await.ok()
    }

    /// What the engine knows of `sensor`; `None` when the loop is stopping.
    pub async fn sensor(&self, sensor: SensorId) -> Option<SensorView> {
        self.ask(|reply| Query::Sensor { sensor, reply }).await
    }

    /// The last command of every heater matching `filter`, a part at a time: from the default
    /// cursor, then from each part's `next`.
    pub async fn snapshot(&self, filter: Filter, from: SnapshotCursor) -> Option<SnapshotPart> {
        self.ask(|reply| Query::Snapshot {
            filter,
            from,
            reply,
        })
        .await
    }

    /// Every command read from the command topic from now on that is news for its sensor
    /// (see [`LiveEvent`]).
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.live.subscribe()
    }

    /// Every change of a heater's following its command from now on.
    pub fn statuses(&self) -> broadcast::Receiver<crate::proto::v1::HeaterStatus> {
        self.statuses.subscribe()
    }

    /// A subscriber's stream of the heaters `filter` picks, starting as `start` says; `None`
    /// when the loop is stopping.
    pub async fn open_feed(
        &self,
        filter: Filter,
        start: Start,
        caller: Caller,
        shutdown: CancellationToken,
    ) -> Option<Subscription> {
        Subscription::open(self.clone(), filter, start, caller, shutdown).await
    }

    pub fn stats(&self) -> &LoopStats {
        &self.stats
    }

    /// Whether a broker describes the command topic, with a leader for every partition, within
    /// `timeout`. Without that no command goes out or is read back, so no heater is controlled.
    /// The staleness fail-safe holds while it does not (see `Engine::check_staleness`).
    pub async fn broker_reachable(&self, timeout: Duration) -> bool {
        let asked = chrono::Utc::now();
        let reachable = self.follower.topic_led(timeout).await;
        self.stats.broker_answered(reachable, asked);
        reachable
    }

    /// Whether partitions newly assigned to this replica have waited for seconds for the command
    /// topic to be read to its end: they are not decided for meanwhile.
    pub fn catching_up(&self) -> bool {
        self.stats
            .catching_up
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sensor partitions with records behind and no committed progress for a minute: no replica
    /// consumes them.
    pub fn stalled_partitions(&self) -> u64 {
        self.stats
            .stalled_partitions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Delivers whatever the producer still holds; blocking, bounded by `timeout`.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "producer flush incomplete");
        }
    }
}

/// Checks the topics, recovers state from the command topic, loads the setpoint cache, and
/// starts every task in `tasks`. Returns once the loop is ready to decide.
pub async fn start(
    kafka: &KafkaConfig,
    control: &ControlConfig,
    store: Store,
    tasks: &mut JoinSet<Result<(), StreamError>>,
    credentials_reload: Duration,
    shutdown: CancellationToken,
) -> Result<ControlHandle, StreamError> {
    let mut sasl = security::SaslClients::default();
    let producer = producer(kafka)?;
    sasl.track(Arc::new(producer.clone()));
    let readings_consumer = Arc::new(readings_consumer(kafka, control)?);
    sasl.track(readings_consumer.clone());
    let sensor_partitions = check_broker(kafka).await?;

    let stats = Arc::new(LoopStats::default());
    crate::telemetry::export_counts(&stats);
    let (engine_tx, engine_rx) = mpsc::channel(ENGINE_QUEUE);
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    // The channel's capacity is how far a subscriber may fall behind before it is caught up
    // or dropped (api::heater).
    let (live, _) = broadcast::channel(control.subscriber_buffer.max(1));
    let out = output::CommandOut {
        producer: producer.clone(),
        topic: kafka.command_topic.clone(),
        sequences: sequences::Sequences::new(store.clone()),
    };
    let engine = Engine::new(
        out,
        sensor_partitions,
        acks_tx,
        control.stale_after,
        control.sensor_cache_limit,
        stats.clone(),
        live.clone(),
    )
    .with_partitioner(control.sensor_partitioner)
    .with_protection(control.protection());
    let (statuses, _) = broadcast::channel(control.subscriber_buffer.max(1));
    let reports = !kafka.heater_report_topic.is_empty();
    let engine = with_feedback(engine, reports, control, &statuses);
    let (revokes_tx, revokes_rx) = mpsc::unbounded_channel();
    readings_consumer.context().arm(handoff::Handoff {
        revokes: revokes_tx,
        producer: producer.clone(),
        topic: kafka.sensor_topic.clone(),
        recall_window: control.stale_after,
    });
    tasks.spawn(engine.run(
        engine_rx,
        revokes_rx,
        control.stale_check_interval,
        heartbeat_interval(kafka) * 2,
        shutdown.clone(),
    ));
    let follower_consumer = Arc::new(follower_consumer(kafka)?);
    sasl.track(follower_consumer.clone());
    let (follower, follower_task) = commands::follower(
        follower_consumer,
        kafka.command_topic.clone(),
        engine_tx.clone(),
    );
    tasks.spawn(follower_task.run(shutdown.clone()));
    let sync = setpoint_sync::Sync {
        store,
        engine: engine_tx.clone(),
        stats: stats.clone(),
        reading_range: kafka.reading_range_celsius,
        resync_interval: control.setpoint_resync_interval,
        protection: control.protection(),
    };
    recover(&follower, sync, &engine_tx, tasks, &shutdown).await?;
    release_freed_memory();

    let readings = readings::Readings {
        consumer: readings_consumer,
        producer: producer.clone(),
        config: kafka.clone(),
        engine: engine_tx.clone(),
        acks: acks_rx,
        follower: follower.clone(),
        stats: stats.clone(),
    };
    tasks.spawn(readings.run(shutdown.clone()));
    if reports {
        let reports = reports::Reports::new(kafka, &producer, &engine_tx, &stats)?;
        sasl.track(reports.consumer());
        tasks.spawn(reports.run(shutdown.clone()));
    }
    group_lag::start(kafka, stats.clone(), tasks, &mut sasl, shutdown.clone())?;
    if let Some(watch) = security::watch_password(kafka, sasl, credentials_reload, shutdown) {
        tasks.spawn(watch);
    }
    Ok(ControlHandle {
        engine: engine_tx,
        live,
        statuses,
        stats,
        producer,
        follower,
    })
}

/// Fails unless the three topics exist and the command topic keeps every sensor's last
/// command (or the operator accepted the risk); returns the sensor topic's partition count.
async fn check_broker(kafka: &KafkaConfig) -> Result<i32, StreamError> {
    let mut topics = vec![
        &kafka.sensor_topic,
        &kafka.command_topic,
        &kafka.dead_letter_topic,
    ];
    if !kafka.heater_report_topic.is_empty() {
        topics.push(&kafka.heater_report_topic);
    }
    let partitions = check_topics(kafka, &topics).await?;
    if kafka.allow_command_topic_deletion {
        tracing::warn!(topic = %kafka.command_topic, "the command topic's retention is not checked (ALLOW_COMMAND_TOPIC_DELETION)");
    } else {
        topics::check_command_retention(kafka).await?;
    }
    Ok(partitions[0])
}

/// Returns to the system the memory freed so far: the replay of the command topic decoded
/// every sensor's last command once, and glibc keeps what it freed resident, spread over its
/// threads' arenas, until asked.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; no memory of ours changes.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Brings the engine up to date before readings are consumed. Order matters: last commands
/// first, then setpoints, so that re-evaluating a setpoint knows what each heater was last
/// told.
async fn recover(
    follower: &commands::Follower,
    sync: setpoint_sync::Sync,
    engine: &mpsc::Sender<Input>,
    tasks: &mut JoinSet<Result<(), StreamError>>,
    shutdown: &CancellationToken,
) -> Result<(), StreamError> {
    follower.caught_up().await?;
    let (loaded_tx, loaded) = oneshot::channel();
    tasks.spawn(sync.run(loaded_tx, shutdown.clone()));
    loaded
        .await
        .map_err(|_| StreamError::Stopped("setpoint sync"))?;
    // Every setpoint is queued for the engine; the barrier returns once it applied them.
    let (done, applied) = oneshot::channel();
    engine
        .send(Input::Barrier(done))
        .await
        .map_err(|_| StreamError::Stopped("engine"))?;
    applied.await.map_err(|_| StreamError::Stopped("engine"))
}

/// The consumer group's member on the sensor topic.
fn readings_consumer(
    kafka: &KafkaConfig,
    control: &ControlConfig,
) -> Result<readings::ReadingsConsumer, StreamError> {
    if kafka.kafka_session_timeout <= control.stale_check_interval + Duration::from_secs(1) {
        return Err(StreamError::Setting(
            "KAFKA_SESSION_TIMEOUT must exceed STALE_CHECK_INTERVAL + 1 s: a replica paused for the session timeout must notice its stall".into(),
        ));
    }
    let mut config = consumer_config(kafka, &kafka.consumer_group)?;
    config
        // Offsets are stored by hand once a reading's commands are acknowledged, and committed
        // in the background from what was stored.
        .set("enable.auto.offset.store", "false")
        .set("enable.auto.commit", "true")
        // Feeds the consumer-lag gauge.
        .set("statistics.interval.ms", "5000")
        // Tells the engine when a partition was read to its end: only then can a sensor's
        // silence be told from readings that wait in the topic (consumer lag).
        .set("enable.partition.eof", "true")
        .set("session.timeout.ms", millis(kafka.kafka_session_timeout))
        .set("heartbeat.interval.ms", millis(heartbeat_interval(kafka)));
    if let Some(instance) = &kafka.kafka_group_instance_id {
        config.set("group.instance.id", instance);
    }
    config
        .create_with_context(handoff::RebalanceWatch::default())
        .map_err(StreamError::Config)
}

/// `engine`, comparing heaters' reports with their commands if they `report`.
fn with_feedback(
    engine: Engine,
    report: bool,
    control: &ControlConfig,
    statuses: &broadcast::Sender<crate::proto::v1::HeaterStatus>,
) -> Engine {
    if !report {
        return engine;
    }
    let timeout =
        chrono::TimeDelta::from_std(control.report_timeout).unwrap_or(chrono::TimeDelta::MAX);
    engine.with_feedback(feedback::Feedback::new(timeout, statuses.clone()))
}

/// The reader of the heater report topic: like the command topic's, from the beginning.
pub(crate) fn report_consumer(kafka: &KafkaConfig) -> Result<StreamConsumer, StreamError> {
    consumer_config(kafka, &format!("{}-report-reader", kafka.consumer_group))?
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "4096")
        .create()
        .map_err(StreamError::Config)
}

/// The reader of the command topic. It never commits: it always reads from the beginning.
fn follower_consumer(kafka: &KafkaConfig) -> Result<StreamConsumer, StreamError> {
    consumer_config(kafka, &format!("{}-command-follower", kafka.consumer_group))?
        .set("enable.auto.commit", "false")
        // Read-ahead of 4 MB (~30k commands) instead of the readings' 16 MB: librdkafka's
        // freed fetch buffers stay resident in its thread's malloc arena (BENCHMARKS.md).
        .set("queued.max.messages.kbytes", "4096")
        .set(
            "fetch.wait.max.ms",
            millis(kafka.kafka_follower_fetch_wait_max),
        )
        .create()
        .map_err(StreamError::Config)
}

/// Fails with [`StreamError::MissingTopic`] unless every topic exists: topics are not created
/// automatically, and a missing one is an operator's mistake to report at start. Returns their
/// partition counts.
async fn check_topics(kafka: &KafkaConfig, topics: &[&String]) -> Result<Vec<i32>, StreamError> {
    let metadata = probe::metadata(kafka).await?;
    let count = |topic: &String| {
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic.as_str())?;
        let n = t.partitions().len() as i32;
        (t.error().is_none() && n > 0).then_some(n)
    };
    topics
        .iter()
        .map(|topic| count(topic).ok_or_else(|| StreamError::MissingTopic((*topic).clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ServeConfig;

    #[test]
    fn the_producer_holds_a_bounded_number_of_bytes_not_only_of_records() {
        let mut kafka = ServeConfig::from_defaults().unwrap().kafka;
        kafka.kafka_brokers = "127.0.0.1:9".into(); // nothing is ever delivered
        let producer = producer(&kafka).unwrap();
        let letter = vec![7u8; 64 * 1024];
        let mut held = 0usize;
        loop {
            let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to("t").payload(&letter);
            match producer.send_result(record) {
                Ok(_) => held += letter.len(),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => break,
                Err((e, _)) => panic!("{e}"),
            }
            assert!(held <= 64 << 20, "{held} bytes held and still taking more");
        }
        assert!(
            held >= (PRODUCER_QUEUE_KBYTES as usize) << 9,
            "only {held} bytes held"
        );
    }
}
