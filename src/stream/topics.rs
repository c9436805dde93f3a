//! Operator tools on the broker: creating the topics, checking that the command topic keeps
//! every sensor's last command, and producing a reading by hand (encoded as a gateway writes
//! readings and heater reports, which the simulator does too).

use std::time::Duration;

use chrono::{DateTime, Utc};
use prost::Message;
use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigResource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::types::RDKafkaErrorCode;

use super::{client_config, enqueue, producer, StreamError};
use crate::config::{KafkaConfig, SensorFormat};
use crate::domain::SensorId;
use crate::proto::timestamp;
use crate::proto::v1 as pb;

/// Creates the sensor, command and dead-letter topics (and the heater report topic, if one is
/// set); existing ones are left as they are.
/// Returns the names of the topics created.
pub async fn create_topics(
    kafka: &KafkaConfig,
    partitions: i32,
    replication: i32,
) -> Result<Vec<String>, StreamError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka)?
        .create()
        .map_err(StreamError::Config)?;
    let mut topics = vec![
        &kafka.sensor_topic,
        &kafka.command_topic,
        &kafka.dead_letter_topic,
    ];
    if !kafka.heater_report_topic.is_empty() {
        topics.push(&kafka.heater_report_topic);
    }
    // A majority of the replicas must have a command before it counts as written.
    let min_insync = (replication / 2 + 1).to_string();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            let topic = NewTopic::new(t, partitions, TopicReplication::Fixed(replication));
            if *t != &kafka.command_topic {
                return topic;
            }
            // Compacted: a sensor's last command is never deleted by age (see
            // `command_retention_risk`).
            let topic = topic.set("cleanup.policy", "compact");
            if replication > 1 {
                topic.set("min.insync.replicas", &min_insync)
            } else {
                topic
            }
        })
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

/// Why a command topic with these settings can lose a sensor's last command, if it can: its
/// sequence would then start again at 1 after a restart, below what consumers already have, and
/// they would ignore the heater. Safe is `cleanup.policy=compact` alone, or no limit on
/// retention; an unreported setting counts as Apache Kafka's default (delete, 7 days).
pub fn command_retention_risk(
    policy: Option<&str>,
    retention_ms: Option<&str>,
    retention_bytes: Option<&str>,
) -> Option<String> {
    let policy = policy.unwrap_or("delete");
    let compact_only = policy.split(',').all(|p| p.trim() == "compact");
    let retention_ms = retention_ms.unwrap_or("604800000");
    let unlimited = retention_ms.trim() == "-1" && retention_bytes.is_none_or(|b| b.trim() == "-1");
    (!compact_only && !unlimited).then(|| {
        format!(
            "cleanup.policy={policy} with retention.ms={retention_ms} retention.bytes={} deletes old records, a sensor's last command among them",
            retention_bytes.unwrap_or("-1")
        )
    })
}

/// Refuses a command topic that can delete a sensor's last command ([`command_retention_risk`]),
/// or whose settings the broker does not report.
pub async fn check_command_retention(kafka: &KafkaConfig) -> Result<(), StreamError> {
    let admin: AdminClient<DefaultClientContext> = client_config(kafka)?
        .create()
        .map_err(StreamError::Config)?;
    let topic = kafka.command_topic.as_str();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let unsafe_topic = |reason: String| StreamError::CommandRetention {
        topic: topic.to_owned(),
        reason,
    };
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &options)
        .await
        .map_err(|e| unsafe_topic(format!("its settings could not be read: {e}")))?;
    let config: ConfigResource = described
        .into_iter()
        .next()
        .ok_or_else(|| unsafe_topic("the broker did not describe it".into()))?
        .map_err(|code| unsafe_topic(format!("its settings could not be read: {code}")))?;
    let value = |name| config.get(name).and_then(|e| e.value.as_deref());
    match command_retention_risk(
        value("cleanup.policy"),
        value("retention.ms"),
        value("retention.bytes"),
    ) {
        Some(reason) => Err(unsafe_topic(reason)),
        None => Ok(()),
    }
}

/// A reading as a gateway writes it to the sensor topic, in `format`.
pub fn reading_payload(
    format: SensorFormat,
    sensor: &str,
    celsius: f64,
    time: DateTime<Utc>,
) -> Vec<u8> {
    match format {
        SensorFormat::Protobuf => pb::SensorReading {
            sensor_id: sensor.to_owned(),
            temperature_celsius: Some(celsius),
            reading_time: Some(timestamp(time)),
        }
        .encode_to_vec(),
        SensorFormat::Json => serde_json::json!({
            "sensor_id": sensor,
            "temperature_celsius": celsius,
            "reading_time": time.to_rfc3339(),
        })
        .to_string()
        .into_bytes(),
    }
}

/// A heater's report of its actual state (ON if `on`) as a gateway writes it to the heater
/// report topic, in `format`.
pub fn report_payload(
    format: SensorFormat,
    sensor: &str,
    on: bool,
    time: DateTime<Utc>,
) -> Vec<u8> {
    let state = if on {
        pb::HeaterCommand::On
    } else {
        pb::HeaterCommand::Off
    };
    match format {
        SensorFormat::Protobuf => pb::HeaterReport {
            sensor_id: sensor.to_owned(),
            state: state.into(),
            report_time: Some(timestamp(time)),
        }
        .encode_to_vec(),
        SensorFormat::Json => serde_json::json!({
            "sensor_id": sensor,
            "state": if on { "ON" } else { "OFF" },
            "report_time": time.to_rfc3339(),
        })
        .to_string()
        .into_bytes(),
    }
}

/// Produces one reading to the sensor topic in the configured format, as a gateway would.
pub async fn send_reading(
    kafka: &KafkaConfig,
    sensor: &SensorId,
    celsius: f64,
    time: DateTime<Utc>,
    traceparent: Option<&str>,
) -> Result<(), StreamError> {
    let payload = reading_payload(kafka.sensor_format, sensor.as_str(), celsius, time);
    let producer = producer(kafka)?;
    let mut record = FutureRecord::to(&kafka.sensor_topic)
        .key(sensor.as_str())
        .payload(&payload);
    if let Some(value) = traceparent {
        record = record.headers(OwnedHeaders::new().insert(Header {
            key: crate::traces::TRACEPARENT,
            value: Some(value),
        }));
    }
    let delivery = enqueue(&producer, record).await?;
    match tokio::time::timeout(Duration::from_secs(30), delivery).await {
        Ok(Ok(Ok(_))) => Ok(()),
        Ok(Ok(Err((e, _)))) => Err(StreamError::Produce(e)),
        Ok(Err(_)) | Err(_) => Err(StreamError::Stopped("producer")),
    }
}

#[cfg(test)]
mod tests {
    use super::command_retention_risk as risk;
    use super::{reading_payload, report_payload, SensorFormat};
    use crate::config::CelsiusRange;
    use crate::domain::control::HeaterCommand;
    use crate::stream::codec::{decode_reading, decode_report};
    use chrono::{DateTime, TimeDelta};

    #[test]
    fn what_a_gateway_writes_in_either_format_the_service_reads_back() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let key = Some("b/room-03".as_bytes());
        for format in [SensorFormat::Protobuf, SensorFormat::Json] {
            for on in [true, false] {
                let payload = report_payload(format, "b/room-03", on, at);
                let (sensor, report) =
                    decode_report(format, TimeDelta::zero(), key, &payload, None, at)
                        .unwrap_or_else(|e| panic!("{format:?}: {e}"));
                let state = if on {
                    HeaterCommand::On
                } else {
                    HeaterCommand::Off
                };
                assert_eq!(
                    (sensor.as_str(), report.state, report.at),
                    ("b/room-03", state, at)
                );
            }
            let payload = reading_payload(format, "b/room-03", 20.25, at);
            let decoded = decode_reading(
                format,
                CelsiusRange::PLAUSIBLE,
                TimeDelta::zero(),
                key,
                &payload,
                None,
                None,
                at,
            );
            let (sensor, reading) = decoded.unwrap_or_else(|e| panic!("{format:?}: {e}"));
            assert_eq!(sensor.as_str(), "b/room-03");
            assert_eq!((reading.temperature.value(), reading.time), (20.25, at));
        }
    }

    #[test]
    fn only_a_topic_that_keeps_every_last_record_is_safe() {
        for (policy, ms, bytes) in [
            (Some("compact"), None, None),
            (Some("compact"), Some("1000"), Some("1000")),
            (Some("delete"), Some("-1"), Some("-1")),
            (Some("compact,delete"), Some("-1"), None),
            (None, Some("-1"), None),
        ] {
            assert_eq!(risk(policy, ms, bytes), None, "{policy:?} {ms:?} {bytes:?}");
        }
        for (policy, ms, bytes) in [
            // What Tansu and brokers that report no defaults describe: Kafka's defaults.
            (None, None, None),
            (Some("delete"), None, None),
            (Some("delete"), Some("604800000"), Some("-1")),
            (Some("compact,delete"), Some("604800000"), None),
            (Some("delete"), Some("-1"), Some("1073741824")),
        ] {
            let reason = risk(policy, ms, bytes).expect("unsafe");
            assert!(reason.contains("last command"), "{reason}");
        }
    }
}
