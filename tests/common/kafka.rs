//! Kafka helpers for tests: fresh topics on the shared broker, a reading producer, and readers
//! of the command and dead-letter topics.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};

use thermostat::proto::timestamp;
use thermostat::proto::v1 as pb;

use super::{env, unique_name};

/// A broker of one test's own in place of the suite's (see [`use_brokers`]).
static BROKERS: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

pub fn brokers() -> String {
    let own = BROKERS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    own.unwrap_or_else(|| env("THERMOSTAT_TEST_BROKERS"))
}

/// Points every helper of this test binary at `brokers` (`None`: the suite's broker again).
/// Only for tests that run alone in their binary, like the fault suite's scenarios.
pub fn use_brokers(brokers: Option<String>) {
    *BROKERS.lock().unwrap_or_else(|e| e.into_inner()) = brokers;
}

fn client_config() -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers());
    config
}

/// Fresh topics and a fresh consumer group for one test.
#[derive(Debug, Clone)]
pub struct Topics {
    pub sensors: String,
    pub commands: String,
    pub dead_letters: String,
    pub group: String,
    pub partitions: i32,
}

impl Topics {
    /// The topics a service configuration uses (as made by [`Topics::create`] with 2 partitions).
    pub fn of(config: &thermostat::config::ServeConfig) -> Self {
        Topics {
            sensors: config.kafka.sensor_topic.clone(),
            commands: config.kafka.command_topic.clone(),
            dead_letters: config.kafka.dead_letter_topic.clone(),
            group: config.kafka.consumer_group.clone(),
            partitions: 2,
        }
    }

    /// Fresh names with 2 partitions, for topics a test makes itself.
    pub fn named_for_test() -> Self {
        Self::named(2)
    }

    fn named(partitions: i32) -> Self {
        Topics {
            sensors: unique_name("sensors"),
            commands: unique_name("commands"),
            dead_letters: unique_name("dlq"),
            group: unique_name("group"),
            partitions,
        }
    }

    /// Fresh topics on a librdkafka mock cluster, which takes no CreateTopics request.
    pub fn on_mock(mock: &MockCluster<'static, DefaultProducerContext>, partitions: i32) -> Self {
        let topics = Self::named(partitions);
        for (topic, n) in [
            (&topics.sensors, partitions),
            (&topics.commands, partitions),
            (&topics.dead_letters, 1),
        ] {
            mock.create_topic(topic, n, 1).expect("topic");
        }
        topics
    }

    pub async fn create(partitions: i32) -> Self {
        let topics = Self::named(partitions);
        let admin: AdminClient<DefaultClientContext> =
            client_config().create().expect("admin client");
        let new = [
            NewTopic::new(&topics.sensors, partitions, TopicReplication::Fixed(1)),
            // As `thermostat create-topics` makes it: the service refuses any other.
            NewTopic::new(&topics.commands, partitions, TopicReplication::Fixed(1))
                .set("cleanup.policy", "compact"),
            NewTopic::new(&topics.dead_letters, 1, TopicReplication::Fixed(1)),
        ];
        for result in admin
            .create_topics(&new, &AdminOptions::new())
            .await
            .expect("create topics")
        {
            result.expect("topic created");
        }
        topics
    }
}

/// Creates a fresh, plain topic named `prefix`-something with `partitions`; returns its name.
pub async fn create_topic(prefix: &str, partitions: i32) -> String {
    let name = unique_name(prefix);
    let admin: AdminClient<DefaultClientContext> = client_config().create().expect("admin client");
    for result in admin
        .create_topics(
            &[NewTopic::new(&name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic")
    {
        result.expect("topic created");
    }
    name
}

/// Deletes `topic` with every record and creates it again, empty and compacted, as a lost
/// broker or an operator's mistake would leave it.
pub async fn recreate_topic(topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = client_config().create().expect("admin client");
    let options = AdminOptions::new();
    for result in admin
        .delete_topics(&[topic], &options)
        .await
        .expect("delete")
    {
        result.expect("topic deleted");
    }
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact");
    // The deletion may take a moment to complete.
    for _ in 0..50 {
        let created = admin.create_topics([&new], &options).await.expect("create");
        if created.iter().all(|r| r.is_ok()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("topic {topic} could not be created again");
}

/// Points `config` at a fresh librdkafka mock cluster of one broker (id 1) that holds its
/// topics, for tests that take the broker down or make it refuse requests.
pub fn on_mock_cluster(
    config: &mut thermostat::config::ServeConfig,
) -> MockCluster<'static, DefaultProducerContext> {
    let mock = MockCluster::new(1).expect("mock cluster");
    config.kafka.kafka_brokers = mock.bootstrap_servers();
    // The mock cluster does not describe topic settings (and keeps nothing past the process).
    config.kafka.allow_command_topic_deletion = true;
    for topic in [
        &config.kafka.sensor_topic,
        &config.kafka.command_topic,
        &config.kafka.dead_letter_topic,
    ] {
        mock.create_topic(topic, 1, 1).expect("topic");
    }
    mock
}

/// Produces sensor records like a building gateway.
pub struct Sensors {
    producer: FutureProducer,
    topic: String,
}

impl Sensors {
    pub fn new(topic: &str) -> Self {
        let producer = client_config()
            // Tansu 0.6 cannot resume inside a batch: one record per batch.
            .set("batch.num.messages", "1")
            .set("linger.ms", "0")
            .create()
            .expect("producer");
        Self {
            producer,
            topic: topic.to_owned(),
        }
    }

    pub async fn raw(&self, key: Option<&str>, payload: &[u8]) {
        let mut record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(&self.topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("reading delivered");
    }

    /// `count` records of `payload` under `key`, sent together, 16 to a batch (read from the
    /// start, Tansu serves them whole).
    pub async fn flood(&self, key: &str, payload: &[u8], count: usize) {
        let producer: FutureProducer = client_config()
            .set("batch.num.messages", "16")
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let mut deliveries = Vec::with_capacity(count);
        for _ in 0..count {
            let record: FutureRecord<'_, str, [u8]> =
                FutureRecord::to(&self.topic).key(key).payload(payload);
            deliveries.push(producer.send(record, Duration::from_secs(120)));
        }
        for delivered in futures::future::join_all(deliveries).await {
            delivered.expect("record delivered");
        }
    }

    pub async fn reading(&self, sensor: &str, celsius: f64, time: DateTime<Utc>) {
        let payload = pb::SensorReading {
            sensor_id: sensor.into(),
            temperature_celsius: Some(celsius),
            reading_time: Some(timestamp(time)),
        }
        .encode_to_vec();
        self.raw(Some(sensor), &payload).await;
    }
}

/// A command event as another replica would have written it to the command topic.
pub fn written_command(
    sensor: &str,
    building: &str,
    sequence: u64,
    command: pb::HeaterCommand,
) -> pb::HeaterCommandEvent {
    let time = timestamp(Utc::now());
    pb::HeaterCommandEvent {
        sensor_id: sensor.into(),
        building_id: building.into(),
        command: command as i32,
        reason: if command == pb::HeaterCommand::On {
            pb::CommandReason::TooCold
        } else {
            pb::CommandReason::TooHot
        } as i32,
        setpoint_revision: 1,
        temperature_celsius: Some(18.0),
        reading_time: Some(time),
        decided_at: Some(time),
        sequence,
        snapshot: false,
        setpoint_level: pb::SetpointLevel::Default.into(),
        level_revision: 1,
        limit: 0,
        switched_at: Some(time),
        trace_parent: String::new(),
    }
}

/// Writes `event` to `topic` (the command topic) keyed by its sensor, as the service does.
pub async fn write_command(topic: &Sensors, event: pb::HeaterCommandEvent) {
    topic
        .raw(Some(&event.sensor_id), &event.encode_to_vec())
        .await;
}

/// Reads a topic from the beginning of every partition, outside any consumer group.
pub struct TopicReader {
    consumer: StreamConsumer,
}

impl TopicReader {
    pub fn new(topic: &str, partitions: i32) -> Self {
        let consumer: StreamConsumer = client_config()
            .set("group.id", unique_name("reader"))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("consumer");
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&assignment).expect("assign");
        Self { consumer }
    }

    /// The next record, or `None` after `timeout` without one.
    pub async fn next(&self, timeout: Duration) -> Option<OwnedMessage> {
        match tokio::time::timeout(timeout, self.consumer.recv()).await {
            Ok(message) => Some(message.expect("consume").detach()),
            Err(_) => None,
        }
    }

    /// Every record that arrives until `quiet` passes without one.
    pub async fn drain(&self, quiet: Duration) -> Vec<OwnedMessage> {
        let mut out = Vec::new();
        while let Some(m) = self.next(quiet).await {
            out.push(m);
        }
        out
    }

    /// For a reader just made, of a topic known to hold records: the first may take up to 20 s
    /// (connecting and the first fetch, on a loaded machine), then every record until `quiet`
    /// passes without one.
    pub async fn read_all(&self, quiet: Duration) -> Vec<OwnedMessage> {
        let Some(first) = self.next(Duration::from_secs(20)).await else {
            return Vec::new();
        };
        let mut out = vec![first];
        out.extend(self.drain(quiet).await);
        out
    }
}

pub fn header(message: &OwnedMessage, key: &str) -> Option<String> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

pub fn decode_command(message: &OwnedMessage) -> pb::HeaterCommandEvent {
    pb::HeaterCommandEvent::decode(message.payload().expect("payload")).expect("command event")
}

/// Reads commands from the command topic.
pub struct Commands {
    reader: TopicReader,
}

impl Commands {
    pub fn new(topics: &Topics) -> Self {
        Self {
            reader: TopicReader::new(&topics.commands, topics.partitions),
        }
    }

    /// The next command, waiting up to `timeout`.
    pub async fn next(&self, timeout: Duration) -> Option<pb::HeaterCommandEvent> {
        self.reader.next(timeout).await.map(|m| decode_command(&m))
    }

    /// Waits for the next command; panics after 20 s.
    pub async fn expect(&self) -> pb::HeaterCommandEvent {
        self.next(Duration::from_secs(20))
            .await
            .expect("a heater command")
    }

    /// Every command until `quiet` passes without one.
    pub async fn drain(&self, quiet: Duration) -> Vec<pb::HeaterCommandEvent> {
        self.reader
            .drain(quiet)
            .await
            .iter()
            .map(decode_command)
            .collect()
    }
}

/// Per sensor, the commands in topic order.
pub fn by_sensor(
    events: &[pb::HeaterCommandEvent],
) -> HashMap<String, Vec<pb::HeaterCommandEvent>> {
    let mut map: HashMap<String, Vec<pb::HeaterCommandEvent>> = HashMap::new();
    for e in events {
        map.entry(e.sensor_id.clone()).or_default().push(e.clone());
    }
    map
}
