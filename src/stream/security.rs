//! TLS and SASL to the brokers: KAFKA_SECURITY_PROTOCOL and its files turned into librdkafka
//! settings, the same for every client (serve, create-topics, send-reading, the simulator).
//! The SASL password comes from a file only, read as each client is made.

use rdkafka::ClientConfig;

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
    let password = readable("KAFKA_SASL_PASSWORD_FILE", password_file)?;
    // A mounted Secret often ends with a newline that is not part of the password.
    let password = password.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(StreamError::Setting(format!(
            "KAFKA_SASL_PASSWORD_FILE {} is empty",
            password_file.display()
        )));
    }
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
        .set("sasl.password", password);
    Ok(())
}

/// The file's contents; the error names the option and the file, never what it holds.
fn readable(option: &str, path: &std::path::Path) -> Result<String, StreamError> {
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
