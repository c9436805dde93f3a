//! TLS and SASL to the brokers: KAFKA_SECURITY_PROTOCOL and its files turned into librdkafka
//! settings, the same for every client (serve, create-topics, send-reading, the simulator).
//! The SASL password comes from a file only, read as each client is made and, while the
//! service runs, again whenever it changes.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::producer::{FutureProducer, Producer};
use rdkafka::types::RDKafka;
use rdkafka::{ClientConfig, ClientContext};
use tokio_util::sync::CancellationToken;

use super::StreamError;
use crate::config::{KafkaConfig, KafkaSaslMechanism, KafkaSecurityProtocol};

/// Adds `kafka`'s security settings to `config`; refuses settings that contradict each other.
pub fn apply(kafka: &KafkaConfig, config: &mut ClientConfig) -> Result<(), StreamError> {
    use KafkaSecurityProtocol::*;
    let protocol = kafka.kafka_security_protocol;
    let (tls, sasl) = match protocol {
        Plaintext => (false, false),
        Ssl => (true, false),
        SaslPlaintext => (false, true),
        SaslSsl => (true, true),
    };
    config.set("security.protocol", name(protocol));
    let tls_files = [
        (
            "KAFKA_SSL_CA_FILE",
            "ssl.ca.location",
            &kafka.kafka_ssl_ca_file,
        ),
        (
            "KAFKA_SSL_CERT_FILE",
            "ssl.certificate.location",
            &kafka.kafka_ssl_cert_file,
        ),
        (
            "KAFKA_SSL_KEY_FILE",
            "ssl.key.location",
            &kafka.kafka_ssl_key_file,
        ),
    ];
    for (option, setting, file) in tls_files {
        match (file, tls) {
            (Some(path), true) => {
                readable(option, path)?;
                config.set(setting, path.to_string_lossy());
            }
            (Some(_), false) => return Err(unused(option, protocol)),
            (None, _) => {}
        }
    }
    if !sasl {
        if kafka.kafka_sasl_username.is_some() {
            return Err(unused("KAFKA_SASL_USERNAME", protocol));
        }
        if kafka.kafka_sasl_password_file.is_some() {
            return Err(unused("KAFKA_SASL_PASSWORD_FILE", protocol));
        }
        return Ok(());
    }
    let (Some(username), Some(password_file)) =
        (&kafka.kafka_sasl_username, &kafka.kafka_sasl_password_file)
    else {
        return Err(StreamError::Setting(format!(
            "KAFKA_SECURITY_PROTOCOL={} needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD_FILE",
            name(protocol)
        )));
    };
    let password = password(password_file)?;
    config
        .set(
            "sasl.mechanism",
            match kafka.kafka_sasl_mechanism {
                KafkaSaslMechanism::Plain => "PLAIN",
                KafkaSaslMechanism::ScramSha256 => "SCRAM-SHA-256",
                KafkaSaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            },
        )
        .set("sasl.username", username)
        .set("sasl.password", &password);
    Ok(())
}

/// A Kafka client whose SASL credentials can be replaced while it runs.
pub trait SaslClient: Send + Sync {
    fn native(&self) -> *mut RDKafka;
}

impl<C: ClientContext + 'static> SaslClient for FutureProducer<C> {
    fn native(&self) -> *mut RDKafka {
        Producer::client(self).native_ptr()
    }
}

impl<C: ConsumerContext + 'static> SaslClient for StreamConsumer<C> {
    fn native(&self) -> *mut RDKafka {
        Consumer::client(self).native_ptr()
    }
}

impl<C: ConsumerContext + 'static> SaslClient for BaseConsumer<C> {
    fn native(&self) -> *mut RDKafka {
        Consumer::client(self).native_ptr()
    }
}

/// The service's Kafka clients, for a rotated SASL password.
#[derive(Default)]
pub struct SaslClients(Vec<Arc<dyn SaslClient>>);

impl SaslClients {
    pub fn track(&mut self, client: Arc<dyn SaslClient>) {
        self.0.push(client);
    }
}

/// With SASL: a task re-reading `KAFKA_SASL_PASSWORD_FILE` every `every` until `shutdown`,
/// handing a changed password to every client (librdkafka uses it from each connection's next
/// authentication).
pub fn watch_password(
    kafka: &KafkaConfig,
    clients: SaslClients,
    every: Duration,
    shutdown: CancellationToken,
) -> Option<impl std::future::Future<Output = Result<(), StreamError>> + Send + 'static> {
    let username = kafka.kafka_sasl_username.clone()?;
    let file = kafka.kafka_sasl_password_file.clone()?;
    Some(watch(username, file, clients, every, shutdown))
}

async fn watch(
    username: String,
    file: PathBuf,
    clients: SaslClients,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<(), StreamError> {
    let mut applied = password(&file).ok();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
        match password(&file) {
            Ok(new) if applied.as_ref() != Some(&new) => {
                set_credentials(&clients, &username, &new);
                applied = Some(new);
            }
            Ok(_) => {}
            // Kept: a Secret being replaced can be missing or empty for a moment.
            Err(e) => {
                tracing::warn!(error = %e, "the SASL password file cannot be read; the last password stays in use")
            }
        }
    }
}

fn set_credentials(clients: &SaslClients, username: &str, password: &str) {
    let (Ok(username), Ok(password)) = (CString::new(username), CString::new(password)) else {
        tracing::warn!("the new SASL password holds a NUL byte: not applied");
        return;
    };
    for client in &clients.0 {
        // SAFETY: `client` is alive (we hold it), and librdkafka copies both strings. The error
        // it may return is ours to read and destroy.
        let error = unsafe {
            bindings::rd_kafka_sasl_set_credentials(
                client.native(),
                username.as_ptr(),
                password.as_ptr(),
            )
        };
        if !error.is_null() {
            let reason = unsafe { CStr::from_ptr(bindings::rd_kafka_error_string(error)) }
                .to_string_lossy()
                .into_owned();
            unsafe { bindings::rd_kafka_error_destroy(error) };
            tracing::warn!(reason, "a Kafka client refused the new SASL password");
            return;
        }
    }
    tracing::info!(
        clients = clients.0.len(),
        "KAFKA_SASL_PASSWORD_FILE changed: new authentications use the new password"
    );
}

/// The password in `file`, without the newline a mounted Secret often ends with.
fn password(file: &Path) -> Result<String, StreamError> {
    let text = readable("KAFKA_SASL_PASSWORD_FILE", file)?;
    let password = text.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(StreamError::Setting(format!(
            "KAFKA_SASL_PASSWORD_FILE {} is empty",
            file.display()
        )));
    }
    Ok(password.to_owned())
}

/// The file's contents; the error names the option and the file, never what it holds.
fn readable(option: &str, path: &Path) -> Result<String, StreamError> {
    std::fs::read_to_string(path)
        .map_err(|e| StreamError::Setting(format!("{option} {}: {e}", path.display())))
}

fn unused(option: &str, protocol: KafkaSecurityProtocol) -> StreamError {
    StreamError::Setting(format!(
        "{option} is set, but KAFKA_SECURITY_PROTOCOL={} does not use it",
        name(protocol)
    ))
}

/// The protocol's name, as the option and librdkafka spell it.
fn name(protocol: KafkaSecurityProtocol) -> &'static str {
    match protocol {
        KafkaSecurityProtocol::Plaintext => "plaintext",
        KafkaSecurityProtocol::Ssl => "ssl",
        KafkaSecurityProtocol::SaslPlaintext => "sasl_plaintext",
        KafkaSecurityProtocol::SaslSsl => "sasl_ssl",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaConfig,
    }

    fn kafka(args: &[&str]) -> KafkaConfig {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .unwrap()
            .kafka
    }

    #[test]
    fn sasl_over_tls_takes_the_password_from_its_file_and_contradictions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret\n").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\n").unwrap();
        let (password, ca) = (password.to_str().unwrap(), ca.to_str().unwrap());
        let mut config = ClientConfig::new();
        apply(
            &kafka(&[
                "--kafka-security-protocol",
                "sasl_ssl",
                "--kafka-ssl-ca-file",
                ca,
                "--kafka-sasl-mechanism",
                "SCRAM-SHA-256",
                "--kafka-sasl-username",
                "thermostat",
                "--kafka-sasl-password-file",
                password,
            ]),
            &mut config,
        )
        .unwrap();
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("ssl.ca.location"), Some(ca));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-256"));
        assert_eq!(config.get("sasl.password"), Some("s3cret"), "no newline");

        let refused = |args: &[&str]| {
            apply(&kafka(args), &mut ClientConfig::new())
                .unwrap_err()
                .to_string()
        };
        let err = refused(&["--kafka-security-protocol", "sasl_ssl"]);
        assert!(err.contains("KAFKA_SASL_USERNAME"), "{err}");
        let err = refused(&["--kafka-ssl-ca-file", ca]);
        assert!(
            err.contains("KAFKA_SSL_CA_FILE") && err.contains("plaintext"),
            "{err}"
        );
        let err = refused(&[
            "--kafka-security-protocol",
            "sasl_plaintext",
            "--kafka-sasl-username",
            "u",
            "--kafka-sasl-password-file",
            "/nonexistent/password",
        ]);
        assert!(
            err.contains("KAFKA_SASL_PASSWORD_FILE /nonexistent/password"),
            "{err}"
        );
        let mut plain = ClientConfig::new();
        apply(&kafka(&[]), &mut plain).unwrap();
        assert_eq!(plain.get("security.protocol"), Some("plaintext"));
        assert_eq!(plain.get("sasl.password"), None);
    }
}
