//! Kafka over TLS, and SASL/SCRAM, against real parts: Tansu 0.6 behind Debian's stunnel for TLS
//! (Tansu 0.6 cannot turn TLS on for its own listener), and for SCRAM Tansu with
//! `--authentication`, its users kept in PostgreSQL (made through a second, loopback Tansu on
//! the same storage without authentication). The whole loop runs over TLS; over SCRAM only
//! create-topics and send-reading do: Tansu 0.6's postgres storage fails ListOffsets on
//! PostgreSQL 15 ("subquery in FROM must have an alias"), which every consumer needs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::chaos::free_addr;
use common::kafka::Topics;
use common::security::{write, Ca, Pem};
use common::{create_database, env, TestApp};
use sqlx::{Connection, PgConnection};
use thermostat::config::{KafkaSaslMechanism, KafkaSecurityProtocol};
use thermostat::proto::v1 as pb;

const USER: &str = "thermostat";
const PASSWORD: &str = "a-long-scram-password";

/// Tansu behind stunnel, and what it runs from; every process is stopped on drop.
struct SecureBroker {
    /// Where clients connect: TLS, then SASL if required.
    tls: String,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Drop for SecureBroker {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn tool(script: &str, args: &[&str]) -> PathBuf {
    let out = Command::new(common::repo_root().join("scripts").join(script))
        .args(args)
        .output()
        .expect(script);
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

async fn open(port: u16) {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing listens on {port}");
}

impl SecureBroker {
    /// With `scram`, Tansu keeps SCRAM users in PostgreSQL and requires them; without, it
    /// keeps everything in memory and takes anyone (TLS only).
    async fn start(ca: &Ca, scram: bool) -> Self {
        Self::start_with(ca.server(), None, scram).await
    }

    /// Behind stunnel presenting `server`; with `client_ca`, stunnel also requires a client
    /// certificate that chains to it (mutual TLS).
    async fn start_with(server: Pem, client_ca: Option<&Ca>, scram: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let tansu = tool("tansu.sh", &["path"]);
        let stunnel = tool("debian-tools.sh", &["stunnel", "stunnel4"]);
        let storage = if scram {
            // Tansu's own schema, which its postgres storage does not create.
            let storage = create_database(&env("THERMOSTAT_TEST_PG_URL")).await;
            let schema = std::fs::read_to_string(
                common::repo_root().join("tests/fixtures/tansu-0.6.0-schema.sql"),
            )
            .unwrap();
            let mut conn = PgConnection::connect(&storage).await.unwrap();
            sqlx::raw_sql(&schema).execute(&mut conn).await.unwrap();
            storage
        } else {
            "memory://tansu/".to_owned()
        };
        let [inner, plain, tls] = [(); 3].map(|_| free_addr().port());
        // The TLS side is reached as `localhost`, the name the test CA's server certificate
        // holds (as a DNS name: librdkafka verifies the broker's name).
        let broker = |port: u16, advertised: &str, auth: bool| {
            let mut command = Command::new(&tansu);
            command
                .current_dir(dir.path())
                .args(["broker", "--cluster-id", "secure"])
                .arg(format!("--listener-url=tcp://127.0.0.1:{port}"))
                .arg(format!("--advertised-listener-url=tcp://{advertised}"))
                .arg(format!("--storage-engine={storage}"))
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if auth {
                command.arg("--authentication");
            }
            command.spawn().expect("tansu")
        };
        let mut children = vec![broker(inner, &format!("localhost:{tls}"), scram)];
        if scram {
            children.push(broker(plain, &format!("127.0.0.1:{plain}"), false));
        }
        let mut conf = format!(
            "foreground = yes\npid =\n[kafka]\naccept = 127.0.0.1:{tls}\nconnect = 127.0.0.1:{inner}\ncert = {}\nkey = {}\n",
            write(dir.path(), "server.pem", &server.cert).display(),
            write(dir.path(), "server.key", &server.key).display(),
        );
        if let Some(client_ca) = client_ca {
            let file = write(dir.path(), "client-ca.pem", &client_ca.pem());
            conf += &format!(
                "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                file.display()
            );
        }
        let conf = write(dir.path(), "stunnel.conf", &conf);
        children.push(
            Command::new(stunnel)
                .arg(conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("stunnel"),
        );
        for port in [inner, tls] {
            open(port).await;
        }
        if !scram {
            return Self {
                tls: format!("localhost:{tls}"),
                dir,
                children,
            };
        }
        open(plain).await;
        let made = Command::new(&tansu)
            .args(["user", "create", "--mechanism", "scram512", USER, PASSWORD])
            .arg(format!("--broker=tcp://127.0.0.1:{plain}"))
            .current_dir(dir.path())
            .output()
            .expect("tansu user create");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        Self {
            tls: format!("localhost:{tls}"),
            dir,
            children,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs the `thermostat` binary with `kafka`'s settings in its environment.
fn thermostat(kafka: &thermostat::config::KafkaConfig, args: &[&str]) -> (bool, String) {
    let path = |p: &Option<PathBuf>| {
        p.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let out = Command::new(env!("CARGO_BIN_EXE_thermostat"))
        .args(args)
        .env("KAFKA_BROKERS", &kafka.kafka_brokers)
        .env("SENSOR_TOPIC", &kafka.sensor_topic)
        .env("COMMAND_TOPIC", &kafka.command_topic)
        .env("DEAD_LETTER_TOPIC", &kafka.dead_letter_topic)
        .env(
            "KAFKA_SECURITY_PROTOCOL",
            if kafka.kafka_sasl_username.is_some() {
                "sasl_ssl"
            } else {
                "ssl"
            },
        )
        .env("KAFKA_SSL_CA_FILE", path(&kafka.kafka_ssl_ca_file))
        .envs(
            [
                ("KAFKA_SSL_CERT_FILE", &kafka.kafka_ssl_cert_file),
                ("KAFKA_SSL_KEY_FILE", &kafka.kafka_ssl_key_file),
            ]
            .into_iter()
            .filter(|(_, file)| file.is_some())
            .map(|(key, file)| (key, path(file))),
        )
        .envs(
            kafka
                .kafka_sasl_username
                .iter()
                .map(|u| ("KAFKA_SASL_USERNAME", u.clone())),
        )
        .envs(
            kafka
                .kafka_sasl_password_file
                .iter()
                .map(|p| ("KAFKA_SASL_PASSWORD_FILE", p.display().to_string())),
        )
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run thermostat");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The error `thermostat serve` fails to start with against `kafka` (a fresh database), and
/// how long it took.
async fn start_error(kafka: &thermostat::config::KafkaConfig) -> (String, Duration) {
    let mut config = TestApp::fresh_config().await;
    config.kafka = kafka.clone();
    let started = std::time::Instant::now();
    match thermostat::Application::build(config).await {
        Ok(_) => panic!("the service started against a broker it should not reach"),
        Err(e) => (thermostat::error::error_chain(&e), started.elapsed()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_runs_over_tls_and_a_broker_it_cannot_verify_is_refused() {
    let ca = Ca::new("kafka CA");
    let broker = SecureBroker::start(&ca, false).await;
    let topics = Topics::named_for_test();
    let mut config = common::serve_config(
        create_database(&env("THERMOSTAT_TEST_PG_URL")).await,
        &topics,
    );
    config.kafka.kafka_brokers = broker.tls.clone();
    config.kafka.kafka_security_protocol = KafkaSecurityProtocol::Ssl;
    config.kafka.kafka_ssl_ca_file = Some(write(broker.path(), "ca.pem", &ca.pem()));
    // The topics, made over TLS as `thermostat create-topics` makes them.
    thermostat::stream::topics::create_topics(&config.kafka, 2, 1)
        .await
        .expect("topics over TLS");

    // Readings in and commands out, every byte over TLS.
    let app = TestApp::spawn_with(config.clone()).await;
    let mut live = app.band_and_subscribe("room-1", 20.0).await;
    let (sent, log) = thermostat(&config.kafka, &["send-reading", "room-1", "18"]);
    assert!(sent, "{log}");
    let on = common::next_event(&mut live).await;
    assert_eq!(
        (on.sensor_id.as_str(), on.command()),
        ("room-1", pb::HeaterCommand::On)
    );
    app.stop().await;

    // A CA the broker's certificate does not chain to: refused, and the log says why.
    let mut stranger = config.kafka.clone();
    stranger.kafka_ssl_ca_file = Some(write(
        broker.path(),
        "stranger.pem",
        &Ca::new("stranger").pem(),
    ));
    let (sent, log) = thermostat(&stranger, &["send-reading", "room-1", "18"]);
    assert!(!sent, "sent to a broker it could not verify");
    assert!(log.contains("certificate verify failed"), "{log}");
    // The service's start fails with the cause in its error, not only in the log.
    let (error, took) = start_error(&stranger).await;
    assert!(error.contains("certificate verify failed"), "{error}");
    assert!(took < Duration::from_secs(60), "{took:?}");
}

/// A SCRAM-SHA-512 broker behind TLS, the settings that reach it as `USER`, and its topics,
/// made over SASL by `thermostat create-topics`.
async fn scram_broker() -> (SecureBroker, Topics, thermostat::config::KafkaConfig) {
    let ca = Ca::new("kafka CA");
    let broker = SecureBroker::start(&ca, true).await;
    let topics = Topics::named_for_test();
    let mut kafka = common::serve_config(String::new(), &topics).kafka;
    kafka.kafka_brokers = broker.tls.clone();
    kafka.kafka_security_protocol = KafkaSecurityProtocol::SaslSsl;
    kafka.kafka_ssl_ca_file = Some(write(broker.path(), "ca.pem", &ca.pem()));
    kafka.kafka_sasl_mechanism = KafkaSaslMechanism::ScramSha512;
    kafka.kafka_sasl_username = Some(USER.into());
    kafka.kafka_sasl_password_file =
        Some(write(broker.path(), "password", &format!("{PASSWORD}\n")));
    let (made, log) = thermostat(&kafka, &["create-topics"]);
    assert!(made, "{log}");
    assert!(log.contains("topics ready"), "{log}");
    (broker, topics, kafka)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_over_tls_creates_topics_and_sends_readings_and_a_wrong_password_fails() {
    let (broker, _topics, mut kafka) = scram_broker().await;
    let (sent, log) = thermostat(&kafka, &["send-reading", "room-1", "18"]);
    assert!(sent, "{log}");
    assert!(log.contains("reading sent"), "{log}");

    kafka.kafka_sasl_password_file = Some(write(broker.path(), "wrong", "wrong\n"));
    let started = std::time::Instant::now();
    let (sent, log) = thermostat(&kafka, &["send-reading", "room-1", "18"]);
    assert!(!sent, "sent with a wrong password: {log}");
    assert!(log.contains("SASL authentication error"), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let (error, took) = start_error(&kafka).await;
    assert!(error.contains("SASL authentication error"), "{error}");
    assert!(took < Duration::from_secs(60), "{took:?}");
}

#[tokio::test]
async fn an_expired_broker_certificate_and_a_missing_client_certificate_are_refused() {
    let ca = Ca::new("kafka CA");
    let topics = Topics::named_for_test();
    let mut kafka = common::serve_config(String::new(), &topics).kafka;
    kafka.kafka_security_protocol = KafkaSecurityProtocol::Ssl;

    // The broker's certificate expired an hour ago: refused, the start says why (OpenSSL's
    // reason is the generic one; the same broker with a valid certificate is taken below).
    let expired = ca.server_until(std::time::SystemTime::now() - Duration::from_secs(3600));
    let broker = SecureBroker::start_with(expired, None, false).await;
    kafka.kafka_brokers = broker.tls.clone();
    kafka.kafka_ssl_ca_file = Some(write(broker.path(), "ca.pem", &ca.pem()));
    let (sent, log) = thermostat(&kafka, &["send-reading", "room-1", "18"]);
    assert!(!sent, "sent to a broker with an expired certificate");
    assert!(log.contains("certificate verify failed"), "{log}");
    let (error, _) = start_error(&kafka).await;
    assert!(error.contains("certificate verify failed"), "{error}");

    // Mutual TLS: the broker requires a client certificate from its own CA.
    let clients = Ca::new("kafka clients CA");
    let broker = SecureBroker::start_with(ca.server(), Some(&clients), false).await;
    kafka.kafka_brokers = broker.tls.clone();
    kafka.kafka_ssl_ca_file = Some(write(broker.path(), "ca.pem", &ca.pem()));
    let (error, _) = start_error(&kafka).await;
    assert!(error.contains("certificate required"), "{error}");
    let client = clients.client("thermostat");
    kafka.kafka_ssl_cert_file = Some(write(broker.path(), "client.pem", &client.cert));
    kafka.kafka_ssl_key_file = Some(write(broker.path(), "client.key", &client.key));
    let (made, log) = thermostat(&kafka, &["create-topics"]);
    assert!(made, "{log}");
    let (sent, log) = thermostat(&kafka, &["send-reading", "room-1", "18"]);
    assert!(sent, "{log}");
}

#[tokio::test]
async fn a_rotated_sasl_password_is_taken_without_a_restart() {
    use rdkafka::producer::FutureRecord;
    use std::sync::Arc;
    use thermostat::stream::security::{watch_password, SaslClients};

    let (broker, topics, kafka) = scram_broker().await;

    // A client made with a password the broker refuses, as after the Secret changed on the
    // broker's side first; the service's watcher over it.
    let file = write(broker.path(), "password", "stale\n");
    let producer = thermostat::stream::producer(&kafka).expect("producer");
    let mut clients = SaslClients::default();
    clients.track(Arc::new(producer.clone()));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let every = Duration::from_millis(200);
    tokio::spawn(watch_password(&kafka, clients, every, shutdown.clone()).expect("SASL"));
    let send = |n: u32| {
        let producer = producer.clone();
        let topic = topics.sensors.clone();
        async move {
            let payload = format!("{n}");
            let record = FutureRecord::to(&topic).key("room-1").payload(&payload);
            producer.send(record, Duration::from_secs(1)).await
        }
    };
    let stale = tokio::time::timeout(Duration::from_secs(8), send(1)).await;
    assert!(
        !matches!(stale, Ok(Ok(_))),
        "delivered with a password the broker refuses"
    );

    // The Secret's new value lands in the file: the next authentication uses it.
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let fresh = tokio::time::timeout(Duration::from_secs(60), send(2)).await;
    assert!(
        matches!(fresh, Ok(Ok(_))),
        "not delivered after the password file changed: {fresh:?}"
    );
    shutdown.cancel();
}
