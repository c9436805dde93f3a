//! The first contact with the broker at start: a metadata request through a short-lived client
//! that keeps what librdkafka reported meanwhile, so that a start that cannot reach the broker
//! fails with the cause (refused connection, TLS verification, SASL authentication) in its
//! error, not only in log lines before it.

use std::sync::Mutex;
use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::DeliveryResult;
use rdkafka::metadata::Metadata;
use rdkafka::producer::{Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;

use super::{client_config, StreamError};
use crate::config::KafkaConfig;

/// How long the start waits for the broker's metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// The distinct reasons kept: the first ones name the cause, later ones repeat it.
const KEPT: usize = 4;

/// librdkafka's error callbacks, kept (distinct reasons) as well as logged.
#[derive(Default)]
struct Heard(Mutex<Vec<String>>);

impl ClientContext for Heard {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::error!(%error, reason, "librdkafka");
        // "1/1 brokers are down" follows every failed connection and names no cause.
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) {
            return;
        }
        // Repeats differ only in their "(after 3ms in state …)" tail.
        let reason = reason.split(" (after ").next().unwrap_or(reason);
        let mut heard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if heard.len() < KEPT && !heard.iter().any(|r| r == reason) {
            heard.push(reason.to_owned());
        }
    }
}

impl ProducerContext for Heard {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// The cluster's metadata (every topic); when no broker answers in time, an error that names
/// what librdkafka reported about the connections.
pub async fn metadata(kafka: &KafkaConfig) -> Result<Metadata, StreamError> {
    // A threaded producer: its thread polls, which is what delivers the error callbacks. A
    // request for every topic's metadata creates none.
    let client: ThreadedProducer<Heard> = client_config(kafka)?
        .create_with_context(Heard::default())
        .map_err(StreamError::Config)?;
    tokio::task::spawn_blocking(move || {
        client
            .client()
            .fetch_metadata(None, METADATA_TIMEOUT)
            .map_err(|source| {
                let heard = client.context().0.lock().unwrap_or_else(|e| e.into_inner());
                StreamError::Unreachable {
                    source,
                    heard: heard.join("; "),
                }
            })
    })
    .await
    .map_err(|_| StreamError::Stopped("metadata request"))?
}
