//! SIGTERM to the real binary under load, with subscribers that read and subscribers that never
//! do: it must exit 0 within its budget, having delivered every command it decided and
//! committed the offsets of every reading it handled.

mod common;

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use common::kafka::{brokers, Commands, Sensors, Topics};
use common::{eventually, put, setpoint, TestApp};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use thermostat::proto::v1 as pb;
use tokio_stream::StreamExt;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Sends SIGTERM to `child` and waits for it to exit, at most `limit` (then kills it and fails):
/// its exit status and how long it took.
async fn sigterm(child: &mut Child, limit: Duration) -> (ExitStatus, Duration) {
    let signalled = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return (status, signalled.elapsed());
        }
        if signalled.elapsed() > limit {
            let _ = child.kill();
            panic!("still running {limit:?} after SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the offsets the group committed on `topic`.
fn committed(group: &str, topic: &str, partitions: i32) -> i64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let offsets = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    offsets
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_cleanly_within_budget_and_loses_nothing() {
    let config = TestApp::fresh_config().await;
    let topics = Topics::of(&config);
    let grpc = format!("127.0.0.1:{}", free_port());
    let health = format!("127.0.0.1:{}", free_port());
    let log = tempfile::NamedTempFile::new().expect("log file");
    let budget = Duration::from_secs(4);
    let mut child = Command::new(env!("CARGO_BIN_EXE_thermostat"))
        .arg("serve")
        .env("DATABASE_URL", &config.database.database_url)
        .env("KAFKA_BROKERS", brokers())
        .env("SENSOR_TOPIC", &topics.sensors)
        .env("COMMAND_TOPIC", &topics.commands)
        .env("DEAD_LETTER_TOPIC", &topics.dead_letters)
        .env("CONSUMER_GROUP", &topics.group)
        .env("GRPC_ADDR", &grpc)
        .env("HEALTH_ADDR", &health)
        // This test is about stopping; authentication is tested in tests/security_*.rs.
        .env("AUTH_DISABLED", "true")
        .env("ADMIN_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("SHUTDOWN_TIMEOUT", "4s")
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log.reopen().expect("log file"))
        .spawn()
        .expect("start thermostat");

    let endpoint = format!("http://{grpc}");
    // Readiness as the kubelet asks for it: on the plaintext health port.
    let health_endpoint = format!("http://{health}");
    let ready = eventually(Duration::from_secs(30), || {
        common::serving(&health_endpoint, "")
    })
    .await;
    assert!(ready, "the service never became ready");
    let channel = tonic::transport::Channel::from_shared(endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let ids: Vec<String> = (0..10).map(|i| format!("load-{i}")).collect();
    let mut setpoints = pb::setpoint_service_client::SetpointServiceClient::new(channel.clone());
    for id in &ids {
        setpoints
            .put_setpoint(put(setpoint(id, "hq", 20.0), None))
            .await
            .unwrap();
    }

    // Two subscribers that read, two that never do.
    let mut readers = Vec::new();
    for _ in 0..2 {
        let mut stream =
            pb::heater_control_service_client::HeaterControlServiceClient::new(channel.clone())
                .subscribe_heater_commands(pb::SubscribeHeaterCommandsRequest::default())
                .await
                .unwrap()
                .into_inner();
        readers.push(tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                if let Err(status) = item {
                    return Some(status.code());
                }
            }
            None
        }));
    }
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(
            common::stalled_subscription(&grpc, pb::SubscribeHeaterCommandsRequest::default())
                .await,
        );
    }

    // Load: readings that flip the heaters, until well after SIGTERM.
    let sensors = Sensors::new(&topics.sensors);
    let load = {
        let ids = ids.clone();
        tokio::spawn(async move {
            let t0 = Utc::now();
            for i in 0..400i64 {
                let id = &ids[(i as usize) % ids.len()];
                let celsius = if (i / ids.len() as i64) % 2 == 0 {
                    10.0
                } else {
                    30.0
                };
                sensors
                    .reading(id, celsius, t0 + chrono::TimeDelta::milliseconds(i))
                    .await;
                if i % 50 == 0 {
                    sensors.raw(Some(id), b"garbage").await;
                }
            }
        })
    };
    let commands = Commands::new(&topics);
    for _ in 0..30 {
        commands.expect().await;
    }

    let (status, took) = sigterm(&mut child, budget + Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < budget + Duration::from_secs(2),
        "took {took:?} for a {budget:?} budget"
    );
    drop(stalled);

    for reader in readers {
        let ended = tokio::time::timeout(Duration::from_secs(5), reader).await;
        let code = ended.expect("stream still open").expect("reader task");
        assert_eq!(
            code,
            Some(tonic::Code::Unavailable),
            "streams end with UNAVAILABLE"
        );
    }

    let log = std::fs::read_to_string(log.path()).expect("read log");
    let stopped: serde_json::Value = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "stopped" && v.get("commands").is_some())
        .unwrap_or_else(|| panic!("no final log line in:\n{log}"));
    // JSON logs carry the sensor id and the RPC's request id as fields.
    let written = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "setpoint written")
        .unwrap_or_else(|| panic!("no 'setpoint written' line in:\n{log}"));
    assert!(
        written["sensor_id"]
            .as_str()
            .is_some_and(|s| s.starts_with("load-")),
        "{written}"
    );
    assert!(
        written["span"]["request_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{written}"
    );
    assert!(
        !log.lines().any(|l| l.contains("\"level\":\"INFO\"")
            && l.contains("reading")
            && l.contains("temperature")),
        "per-reading info logs"
    );

    let decided = stopped["commands"].as_u64().unwrap();
    let handled =
        stopped["readings"].as_u64().unwrap() + stopped["dead_lettered"].as_u64().unwrap();
    assert!(decided >= 30 && handled > 30, "{stopped}");

    // Every decided command reached the topic (one more drain catches stragglers of the load,
    // which the stopped service cannot have produced).
    let rest = commands.drain(Duration::from_secs(2)).await;
    assert_eq!(
        30 + rest.len() as u64,
        decided,
        "decided and delivered commands differ"
    );
    // Every handled reading is committed, and nothing beyond.
    assert_eq!(
        committed(&topics.group, &topics.sensors, topics.partitions),
        handled as i64
    );
    load.abort();
}

#[tokio::test]
async fn sigterm_during_a_start_that_cannot_finish_exits_at_once() {
    let config = TestApp::fresh_config().await;
    let topics = Topics::of(&config);
    // A "broker" that accepts connections and never answers: the start waits on it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let silent_addr = silent.local_addr().expect("addr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_thermostat"))
        .arg("serve")
        .env("DATABASE_URL", &config.database.database_url)
        .env("KAFKA_BROKERS", silent_addr.to_string())
        .env("SENSOR_TOPIC", &topics.sensors)
        .env("COMMAND_TOPIC", &topics.commands)
        .env("DEAD_LETTER_TOPIC", &topics.dead_letters)
        .env("CONSUMER_GROUP", &topics.group)
        .env("GRPC_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("HEALTH_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("ADMIN_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("AUTH_DISABLED", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start thermostat");
    // Past the migrations, into the wait for the broker: it has connected to the silent one.
    silent.set_nonblocking(true).expect("nonblocking");
    let silent = tokio::net::TcpListener::from_std(silent).expect("listener");
    let Ok(connected) = tokio::time::timeout(Duration::from_secs(60), silent.accept()).await else {
        let _ = child.kill();
        panic!("the service never connected to the broker");
    };
    let connected = connected.expect("accept");
    assert!(child.try_wait().unwrap().is_none(), "still starting");
    // Before the fix the start's own 10 s wait ran out first, and the exit code was 1.
    let (status, took) = sigterm(&mut child, Duration::from_secs(8)).await;
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    drop((connected, silent));
}
