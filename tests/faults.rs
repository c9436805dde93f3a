//! Faults the real broker of the suite cannot be made to show, injected with librdkafka's mock
//! cluster (PostgreSQL stays real): a command the broker refuses stops the service loudly,
//! nothing past its reading is committed, and after a restart the reading is decided again.

mod common;

use std::time::Duration;

use chrono::Utc;
use prost::Message as _;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Message, Offset, TopicPartitionList};

use common::{put, TestApp};
use thermostat::config::KafkaConfig;
use thermostat::proto::timestamp;
use thermostat::proto::v1 as pb;

/// The consumer group's committed offset on the sensor topic's only partition, if any.
fn committed(kafka: &KafkaConfig) -> Option<i64> {
    let consumer: BaseConsumer = thermostat::stream::consumer_config(kafka, &kafka.consumer_group)
        .expect("settings")
        .create()
        .expect("consumer");
    let mut partitions = TopicPartitionList::new();
    partitions.add_partition(&kafka.sensor_topic, 0);
    let offsets = consumer
        .committed_offsets(partitions, Duration::from_secs(10))
        .expect("committed offsets");
    match offsets.elements()[0].offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_broker_refuses_stops_the_service_and_is_decided_again_after_a_restart() {
    let mut config = TestApp::fresh_config().await;
    let mock = common::kafka::on_mock_cluster(&mut config);
    // The stopped run's partition moves on once its session times out: 10 s rather than the
    // default 45 s, so that a loaded machine still sees the command well within the wait.
    config.kafka.kafka_session_timeout = Duration::from_secs(10);
    let kafka = config.kafka.clone();

    // The setpoint, written by a first run that sees no reading.
    let app = TestApp::spawn_with(config.clone()).await;
    app.setpoints()
        .await
        .put_setpoint(put(common::wide_band("s", 20.0), None))
        .await
        .expect("put");
    app.stop().await;

    // A cold reading on the topic; from now on the broker refuses every produce request.
    let payload = pb::SensorReading {
        sensor_id: "s".into(),
        temperature_celsius: Some(10.0),
        reading_time: Some(timestamp(Utc::now())),
    }
    .encode_to_vec();
    thermostat::stream::producer(&kafka)
        .expect("producer")
        .send(
            FutureRecord::to(&kafka.sensor_topic)
                .key("s")
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .expect("reading written");
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 64],
    );

    let mut app = TestApp::spawn_with(config.clone()).await;
    let ended = tokio::time::timeout(Duration::from_secs(60), &mut app.task)
        .await
        .expect("the service stops by itself")
        .expect("no panic");
    let why = thermostat::error::error_chain(&ended.expect_err("stopped with an error"));
    assert!(why.contains("Authorization"), "{why}");
    assert_eq!(
        committed(&kafka),
        None,
        "nothing committed past the reading"
    );

    // The broker takes writes again: a restart decides the same reading again.
    mock.clear_request_errors(RDKafkaApiKey::Produce);
    let app = TestApp::spawn_with(config).await;
    let commands: StreamConsumer = thermostat::stream::consumer_config(&kafka, "fault-reader")
        .expect("settings")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(&kafka.command_topic, 0, Offset::Beginning)
        .expect("partition");
    commands.assign(&assignment).expect("assign");
    // The group hands the stopped member's partition on once its session times out (10 s,
    // above; the mock broker does not act on its leaving sooner).
    let record = tokio::time::timeout(Duration::from_secs(90), commands.recv())
        .await
        .expect("a command after the restart")
        .expect("consume");
    let event = pb::HeaterCommandEvent::decode(record.payload().expect("payload")).expect("event");
    assert_eq!(
        (event.sensor_id.as_str(), event.command(), event.reason()),
        ("s", pb::HeaterCommand::On, pb::CommandReason::TooCold)
    );
    // The first run reserved sequence 1 (and more) before it failed to write it; the topic
    // knows no command of the sensor, so the restart starts above that reservation.
    assert!(event.sequence > 1, "sequence {} again", event.sequence);
    app.stop().await;
}
