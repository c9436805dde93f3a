//! Operator tools on the broker: creating the topics, and producing a reading by hand.

use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;

use super::{client_config, enqueue, producer, StreamError};
use crate::api::convert::timestamp;
use crate::config::{KafkaConfig, SensorFormat};
use crate::domain::SensorId;
use crate::proto::v1 as pb;

/// Creates the sensor, command and dead-letter topics; existing ones are left as they are.
/// Returns the names of the topics created.
pub async fn create_topics(
    kafka: &KafkaConfig,
    partitions: i32,
    replication: i32,
) -> Result<Vec<String>, StreamError> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(kafka).create().map_err(StreamError::Config)?;
    let topics = [
        &kafka.sensor_topic,
        &kafka.command_topic,
        &kafka.dead_letter_topic,
    ];
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let results = admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .map_err(StreamError::Config)?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(StreamError::CreateTopic { topic, code });
            }
        }
    }
    Ok(created)
}

/// Produces one reading to the sensor topic in the configured format, as a gateway would.
pub async fn send_reading(
    kafka: &KafkaConfig,
    sensor: &SensorId,
    celsius: f64,
    time: DateTime<Utc>,
) -> Result<(), StreamError> {
    let payload = match kafka.sensor_format {
        SensorFormat::Protobuf => pb::SensorReading {
            sensor_id: sensor.to_string(),
            temperature_celsius: Some(celsius),
            reading_time: Some(timestamp(time)),
        }
        .encode_to_vec(),
        SensorFormat::Json => serde_json::json!({
            "sensor_id": sensor.as_str(),
            "temperature_celsius": celsius,
            "reading_time": time.to_rfc3339(),
        })
        .to_string()
        .into_bytes(),
    };
    let producer = producer(kafka)?;
    let record = FutureRecord::to(&kafka.sensor_topic)
        .key(sensor.as_str())
        .payload(&payload);
    let delivery = enqueue(&producer, record).await?;
    match tokio::time::timeout(Duration::from_secs(30), delivery).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err((e, _)))) => Err(StreamError::Produce(e)),
        Ok(Err(_)) | Err(_) => Err(StreamError::Stopped("producer")),
    }
}
