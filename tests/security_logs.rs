//! What the real binary logs about credentials, read from its JSON log: unauthenticated calls
//! at most once a second (the metric counts each), and every entry a reloaded credential file
//! had to skip, at error and with the file's path.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::kafka::{brokers, Topics};
use common::security::{self as creds, static_entries};
use common::{eventually, TestApp};
use serde_json::{json, Value};
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::setpoint_service_client::SetpointServiceClient;
use tonic::transport::Channel;
use tonic::Code;

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// `thermostat serve` with the static identities of the tests, logging JSON to a file; killed
/// when dropped.
struct Service {
    child: Child,
    log: tempfile::NamedTempFile,
    grpc: SocketAddr,
    admin: SocketAddr,
    identities: PathBuf,
    _dir: tempfile::TempDir,
}

impl Service {
    async fn start() -> Self {
        let config = TestApp::fresh_config().await;
        let topics = Topics::of(&config);
        let dir = tempfile::tempdir().expect("tempdir");
        let identities = creds::write(
            dir.path(),
            "identities.json",
            &creds::static_file(&static_entries()),
        );
        let (grpc, health, admin) = (free_addr(), free_addr(), free_addr());
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_thermostat"))
            .arg("serve")
            .env("DATABASE_URL", &config.database.database_url)
            .env("KAFKA_BROKERS", brokers())
            .env("SENSOR_TOPIC", &topics.sensors)
            .env("COMMAND_TOPIC", &topics.commands)
            .env("DEAD_LETTER_TOPIC", &topics.dead_letters)
            .env("CONSUMER_GROUP", &topics.group)
            .env("GRPC_ADDR", grpc.to_string())
            .env("HEALTH_ADDR", health.to_string())
            .env("ADMIN_ADDR", admin.to_string())
            .env("AUTH_STATIC_FILE", &identities)
            .env("CREDENTIALS_RELOAD_INTERVAL", "100ms")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log file"))
            .spawn()
            .expect("start thermostat");
        let service = Self {
            child,
            log,
            grpc,
            admin,
            identities,
            _dir: dir,
        };
        let endpoint = format!("http://{health}");
        let ready = eventually(Duration::from_secs(30), || common::serving(&endpoint, "")).await;
        assert!(ready, "never ready:\n{}", service.log_text());
        service
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).expect("read log")
    }

    /// The JSON log lines whose message is `message`.
    fn lines(&self, message: &str) -> Vec<Value> {
        self.log_text()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["message"] == message)
            .collect()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_calls_are_logged_at_most_once_a_second_and_all_counted() {
    const CALLS: usize = 300;
    let service = Service::start().await;
    let channel = Channel::from_shared(format!("http://{}", service.grpc))
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let get = || {
        let mut client = SetpointServiceClient::new(channel.clone());
        async move {
            let request = pb::GetSetpointRequest {
                sensor_id: "north/room-1".into(),
            };
            let code = client.get_setpoint(request).await.unwrap_err().code();
            assert_eq!(code, Code::Unauthenticated);
        }
    };
    let started = Instant::now();
    for _ in 0..CALLS {
        get().await;
    }
    // One more after a pause: its line tells how many were left out before it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    get().await;
    let seconds = started.elapsed().as_secs() as usize;

    let (_, metrics) = common::http_get(service.admin, "/metrics").await;
    let counted = common::sample(
        &metrics,
        r#"thermostat_auth_failures_total{code="unauthenticated"}"#,
    );
    assert_eq!(counted, (CALLS + 1) as f64, "every failure is counted");
    let lines = service.lines("unauthenticated call");
    assert!(
        !lines.is_empty() && lines.len() <= seconds + 2,
        "{} lines in {seconds} s",
        lines.len()
    );
    let logged = lines.len() as u64;
    let suppressed: u64 = lines.iter().filter_map(|l| l["suppressed"].as_u64()).sum();
    assert_eq!(
        logged + suppressed,
        CALLS as u64 + 1,
        "each call is a line or counted in one: {lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_credential_entry_is_logged_as_an_error_naming_the_file() {
    let service = Service::start().await;
    let mut identities: Value =
        serde_json::from_str(&creds::static_file(&static_entries())).expect("JSON");
    identities["tokens"]
        .as_array_mut()
        .expect("tokens")
        .push(json!({"sha256": "abc", "subject": "typo-entry", "role": "viewer", "buildings": []}));
    let path: &Path = &service.identities;
    creds::write(
        path.parent().expect("directory"),
        "identities.json",
        &identities.to_string(),
    );
    let file = path.display().to_string();
    let logged = eventually(Duration::from_secs(10), || async {
        service.log_text().lines().any(|line| {
            serde_json::from_str::<Value>(line).is_ok_and(|line| {
                line["level"] == "ERROR"
                    && line.to_string().contains(&file)
                    && line.to_string().contains("typo-entry")
            })
        })
    })
    .await;
    assert!(logged, "no error naming {file}:\n{}", service.log_text());
}
