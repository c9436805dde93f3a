//! The fault suite's harness (tests/chaos.rs): replicas of the real binary as child processes
//! on the shared PostgreSQL and Tansu, a keyed load whose correct command stream is known in
//! advance, and a checker that holds the whole command topic against it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use thermostat::config::ServeConfig;
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::heater_control_service_client::HeaterControlServiceClient;
use thermostat::proto::v1::setpoint_service_client::SetpointServiceClient;
use thermostat::proto::v1::{CommandReason, HeaterCommand};

use super::kafka::{brokers, Commands, Sensors, Topics};
use super::{create_database, env, eventually, put, serve_config, setpoint};

/// Sensor-topic partitions (and command-topic ones) of every scenario.
pub const PARTITIONS: i32 = 4;
/// The band of the sensors whose readings are checked: 20 ± 0.5 °C (building "hq").
pub const DESIRED: f64 = 20.0;
pub const BUILDING: &str = "hq";
/// A debug binary reads the whole command topic back before it reports ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The release binary `scripts/test.sh` built like the image, else this build's own.
pub fn binary() -> PathBuf {
    match std::env::var_os("THERMOSTAT_RELEASE_BIN").map(PathBuf::from) {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from(env!("CARGO_BIN_EXE_thermostat")),
    }
}

/// A free loopback port below the kernel's ephemeral range (32768 on): a port picked there may
/// be taken, before the replica binds it or between its restarts, as the local port of any
/// outgoing connection (a CI run failed so). Handed out in turn from an offset of this process.
pub fn free_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static TURN: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let port = FIRST + (start + TURN.fetch_add(1, Ordering::Relaxed)) % SPAN;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().expect("bound");
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN)
}

/// One `thermostat serve` process, restartable with the same environment and ports. Dropping it
/// kills the process; during a panic it also prints the end of the process's log.
pub struct Replica {
    pub name: String,
    pub grpc: SocketAddr,
    pub health: SocketAddr,
    pub admin: SocketAddr,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Replica {
    /// Starts `thermostat serve` with `env`, its own ports, and static group membership under
    /// `name` (Tansu 0.6 can keep a killed dynamic member's partitions for good).
    pub fn start(name: &str, mut env: Vec<(String, String)>, log_dir: &Path) -> Self {
        let (grpc, health, admin) = (free_addr(), free_addr(), free_addr());
        for (key, value) in [
            ("GRPC_ADDR", grpc.to_string()),
            ("HEALTH_ADDR", health.to_string()),
            ("ADMIN_ADDR", admin.to_string()),
            ("KAFKA_GROUP_INSTANCE_ID", name.to_owned()),
        ] {
            env.push((key.into(), value));
        }
        let mut replica = Self {
            name: name.to_owned(),
            grpc,
            health,
            admin,
            env,
            log: log_dir.join(format!("{name}.log")),
            child: None,
            starts: 0,
        };
        replica.spawn();
        replica
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        writeln!(
            log,
            "--- chaos: start #{} of {} ---",
            self.starts, self.name
        )
        .expect("log");
        let child = Command::new(binary())
            .arg("serve")
            // Nothing of the test's own environment (a RUST_LOG, say) reaches the service.
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start thermostat");
        self.child = Some(child);
    }

    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// Whether the process was started and has exited on its own since.
    pub fn exited(&mut self) -> bool {
        let child = self.child.as_mut();
        child.is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("a running replica").id();
        let sent = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill -{signal} {pid}");
    }

    /// SIGKILL: no flush, no commit, no goodbye to the group.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn sigstop(&self) {
        self.signal("STOP");
    }

    pub fn sigcont(&self) {
        self.signal("CONT");
    }

    /// SIGTERM, then waits up to `limit` for the exit (kills it and panics after that).
    pub async fn sigterm(&mut self, limit: Duration) -> ExitStatus {
        self.signal("TERM");
        let signalled = Instant::now();
        let child = self.child.as_mut().expect("a running replica");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            if signalled.elapsed() > limit {
                self.kill9();
                panic!("{} still running {limit:?} after SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the process again with the same environment and ports (killing it first if it
    /// still runs).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Waits until the health port reports "" SERVING; panics with the log if the process
    /// exits or `READY_TIMEOUT` passes.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let endpoint = format!("http://{}", self.health);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok())
                .flatten()
            {
                panic!(
                    "{} exited ({status}) while starting:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            if serving(&endpoint).await {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} not ready after {READY_TIMEOUT:?}:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the health port reports `service` SERVING.
    pub async fn serves(&self, service: &str) -> bool {
        super::serving(&format!("http://{}", self.health), service).await
    }

    /// The process's resident memory, from `/proc`.
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    pub fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc))
            .expect("uri")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect_lazy()
    }

    pub fn heaters(&self) -> HeaterControlServiceClient<Channel> {
        HeaterControlServiceClient::new(self.channel())
    }

    pub fn setpoints(&self) -> SetpointServiceClient<Channel> {
        SetpointServiceClient::new(self.channel())
    }

    /// The log lines of the current (or last) run.
    pub fn current_log(&self) -> Vec<String> {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines
            .iter()
            .rposition(|l| l.starts_with("--- chaos: start"))
            .unwrap_or(0);
        lines[start..].iter().map(|l| l.to_string()).collect()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ({}), last 80 lines ---\n{}",
                self.name,
                self.log.display(),
                self.log_tail(80)
            );
        }
    }
}

async fn serving(endpoint: &str) -> bool {
    super::serving(endpoint, "").await
}

/// The environment of every replica of `config`, `settings` overriding the suite's defaults.
fn replica_env(config: &ServeConfig, settings: &[(&str, &str)]) -> Vec<(String, String)> {
    let kafka = &config.kafka;
    let mut env: BTreeMap<String, String> = [
        ("DATABASE_URL", config.database.database_url.as_str()),
        ("KAFKA_BROKERS", &kafka.kafka_brokers),
        ("SENSOR_TOPIC", &kafka.sensor_topic),
        ("COMMAND_TOPIC", &kafka.command_topic),
        ("DEAD_LETTER_TOPIC", &kafka.dead_letter_topic),
        ("CONSUMER_GROUP", &kafka.consumer_group),
        ("AUTH_DISABLED", "true"),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info"),
        ("SHUTDOWN_TIMEOUT", "5s"),
        ("HEALTH_CHECK_INTERVAL", "500ms"),
        ("WRITE_RATE_LIMIT", "100000"),
        ("WRITE_BURST", "100000"),
        // The checks read every sensor's state in a loop.
        ("READ_RATE_LIMIT", "100000"),
        ("READ_BURST", "100000"),
        // Only the staleness scenarios may see the fail-safe.
        ("STALE_AFTER", "10m"),
        ("STALE_CHECK_INTERVAL", "200ms"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (key, value) in settings {
        env.insert((*key).to_owned(), (*value).to_owned());
    }
    env.into_iter().collect()
}

/// Replicas in one consumer group on a fresh database and fresh topics.
pub struct Cluster {
    pub replicas: Vec<Replica>,
    pub topics: Topics,
    env: Vec<(String, String)>,
    logs: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Starts `replicas` processes, waits until each is ready and the group has handed out
    /// every sensor partition.
    pub async fn start(replicas: usize, settings: &[(&str, &str)]) -> Self {
        Self::start_on(Topics::create(PARTITIONS).await, replicas, settings).await
    }

    /// The same on `topics`, made beforehand (on a mock cluster, say).
    pub async fn start_on(topics: Topics, replicas: usize, settings: &[(&str, &str)]) -> Self {
        let database_url = create_database(&env("THERMOSTAT_TEST_PG_URL")).await;
        let env = replica_env(&serve_config(database_url, &topics), settings);
        let logs = tempfile::tempdir().expect("log directory");
        let replicas = (0..replicas)
            .map(|i| Replica::start(&format!("replica-{i}"), env.clone(), logs.path()))
            .collect();
        let mut cluster = Self {
            replicas,
            topics,
            env,
            logs: Some(logs),
        };
        for replica in &mut cluster.replicas {
            replica.wait_ready().await;
        }
        cluster.wait_settled().await;
        cluster
    }

    /// Starts one more replica in the group (a scale-out: partitions move to it).
    pub async fn add_replica(&mut self) -> &mut Replica {
        let name = format!("replica-{}", self.replicas.len());
        let logs = self.logs.as_ref().expect("log directory").path();
        self.replicas
            .push(Replica::start(&name, self.env.clone(), logs));
        let replica = self.replicas.last_mut().expect("just added");
        replica.wait_ready().await;
        replica
    }

    pub fn database_url(&self) -> &str {
        let url = self.env.iter().find(|(key, _)| key == "DATABASE_URL");
        &url.expect("DATABASE_URL").1
    }

    pub fn live(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(|r| r.is_up())
    }

    /// Waits until the live replicas' last assignments (their "sensor partitions assigned" log
    /// lines) share out every sensor partition exactly once, so that no rebalance is pending
    /// when the load starts.
    pub async fn wait_settled(&self) {
        let settled = eventually(Duration::from_secs(60), || async move {
            let mut owned = Vec::new();
            for replica in self.live() {
                match last_assignment(&replica.current_log()) {
                    Some(partitions) if !partitions.is_empty() => owned.extend(partitions),
                    // Fewer replicas than partitions: every one of them gets some.
                    _ => return false,
                }
            }
            owned.sort_unstable();
            owned == (0..PARTITIONS).collect::<Vec<_>>()
        })
        .await;
        assert!(
            settled,
            "the replicas' last 'sensor partitions assigned' log lines never shared out \
             partitions 0..{PARTITIONS} exactly once"
        );
    }

    /// Gives every sensor of `ids` the band `desired` ± 0.5 °C, and waits until every live
    /// replica's cache has it: a reading that came first would not be decided on.
    pub async fn put_setpoints(&self, ids: &[String], desired: f64) {
        let mut client = self.replicas[0].setpoints();
        for id in ids {
            client
                .put_setpoint(put(setpoint(id, BUILDING, desired), None))
                .await
                .expect("put setpoint");
        }
        for replica in self.live() {
            let cached = eventually(Duration::from_secs(20), || async move {
                let mut heaters = replica.heaters();
                for id in ids {
                    let state = heaters.get_sensor_state(state_request(id)).await;
                    if !state.is_ok_and(|s| s.into_inner().setpoint.is_some()) {
                        return false;
                    }
                }
                true
            })
            .await;
            assert!(cached, "{} never cached the setpoints", replica.name);
        }
    }

    /// `n` sensors named `prefix-NN` with the band `desired` ± 0.5 °C and one reading of 20 °C
    /// each, as sensors that keep reporting the same would be.
    pub async fn steady_sensors(&self, prefix: &str, n: usize, desired: f64) -> Vec<String> {
        let width = if n > 100 { 3 } else { 2 };
        let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:0width$}")).collect();
        self.put_setpoints(&ids, desired).await;
        let sensors = Sensors::new(&self.topics.sensors);
        for id in &ids {
            sensors.reading(id, 20.0, Utc::now()).await;
        }
        ids
    }

    /// Waits until the group has committed every reading on the topic (all handled, their
    /// commands acknowledged) and the command topic stopped growing.
    pub async fn wait_idle(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last_commands = -1;
        loop {
            let topics = self.topics.clone();
            let (behind, commands) = tokio::task::spawn_blocking(move || {
                let behind = uncommitted(&topics);
                (behind, watermark_total(&topics.commands))
            })
            .await
            .expect("offsets");
            if behind == 0 && commands == last_commands {
                return;
            }
            last_commands = commands;
            assert!(
                Instant::now() < deadline,
                "not idle after {timeout:?}: {behind} readings not committed"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Every record of the command topic, all partitions, from the beginning.
    pub async fn read_commands(&self) -> Vec<pb::HeaterCommandEvent> {
        let topic = self.topics.commands.clone();
        let total = tokio::task::spawn_blocking(move || watermark_total(&topic))
            .await
            .expect("watermarks") as usize;
        let reader = Commands::new(&self.topics);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut events = Vec::new();
        while events.len() < total && Instant::now() < deadline {
            events.extend(reader.drain(Duration::from_secs(2)).await);
        }
        assert!(
            events.len() >= total,
            "read {} of the command topic's {total} records",
            events.len()
        );
        events
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Kill first, then keep the logs of a failed run (or of any with CHAOS_KEEP_LOGS set).
        self.replicas.clear();
        if std::thread::panicking() || std::env::var_os("CHAOS_KEEP_LOGS").is_some() {
            if let Some(logs) = self.logs.take() {
                eprintln!("chaos: replica logs kept in {}", logs.keep().display());
            }
        }
    }
}

/// The partitions of the last "sensor partitions assigned" line of a JSON log, if any.
fn last_assignment(log: &[String]) -> Option<Vec<i32>> {
    let line = log.iter().rev().find_map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["message"] == "sensor partitions assigned").then_some(v)
    })?;
    let partitions = line["partitions"].as_str()?;
    Some(
        partitions
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect(),
    )
}

pub fn state_request(id: &str) -> pb::GetSensorStateRequest {
    pb::GetSensorStateRequest {
        sensor_id: id.to_owned(),
    }
}

fn admin_consumer(group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .create()
        .expect("consumer")
}

/// The group's committed offset of each sensor partition (blocking).
fn committed(topics: &Topics) -> BTreeMap<i32, i64> {
    let consumer = admin_consumer(&topics.group);
    let mut partitions = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        partitions.add_partition(&topics.sensors, p);
    }
    let committed = consumer
        .committed_offsets(partitions, Duration::from_secs(10))
        .expect("committed offsets");
    (committed.elements().iter())
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

impl Cluster {
    /// Readings below the group's committed offsets whose commands are not all on the command
    /// topic, one line per sensor of `expected` (sensors whose setpoint stays at `DESIRED`): an
    /// offset must be committed only once what its reading decided is acknowledged.
    pub async fn committed_without_command(
        &self,
        expected: &BTreeMap<String, Expected>,
    ) -> Vec<String> {
        use prost::Message as _;
        use rdkafka::Message as _;
        let topics = self.topics.clone();
        let committed = tokio::task::spawn_blocking(move || committed(&topics))
            .await
            .expect("committed offsets");
        // Read after the offsets: commands only grow.
        let commands = self.read_commands().await;
        let reader = super::kafka::TopicReader::new(&self.topics.sensors, PARTITIONS);
        // Per sensor, the committed readings' (offset, temperature, time).
        type Committed = Vec<(i64, f64, (i64, i32))>;
        let mut readings: BTreeMap<String, Committed> = BTreeMap::new();
        let time = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| (t.seconds, t.nanos));
        for m in reader.read_all(Duration::from_secs(2)).await {
            if committed
                .get(&m.partition())
                .is_none_or(|&c| m.offset() >= c)
            {
                continue;
            }
            let Ok(r) = pb::SensorReading::decode(m.payload().unwrap_or_default()) else {
                continue;
            };
            let (Some(celsius), Some(at)) = (r.temperature_celsius, time(&r.reading_time)) else {
                continue;
            };
            readings
                .entry(r.sensor_id)
                .or_default()
                .push((m.offset(), celsius, at));
        }
        let mut problems = Vec::new();
        for (sensor, readings) in &mut readings {
            if !matches!(expected.get(sensor), Some(Expected::Stream(_))) {
                continue;
            }
            readings.sort_by_key(|r| r.0);
            let owed = transitions(readings.iter().map(|r| r.1)).len();
            let last = readings.iter().map(|r| r.2).max();
            // Commands decided on those readings: on a reading no later than the last.
            let written: BTreeSet<u64> = (commands.iter())
                .filter(|e| e.sensor_id == *sensor && time(&e.reading_time) <= last)
                .map(|e| e.sequence)
                .collect();
            if written.len() < owed {
                problems.push(format!(
                    "{sensor}: {} readings committed owe {owed} commands, {} written",
                    readings.len(),
                    written.len()
                ));
            }
        }
        problems
    }
}

/// Readings on the sensor topic the group has not committed yet (blocking).
fn uncommitted(topics: &Topics) -> i64 {
    let done = committed(topics);
    let consumer = admin_consumer("chaos-watermarks");
    (0..PARTITIONS)
        .map(|p| {
            let (_, high) = consumer
                .fetch_watermarks(&topics.sensors, p, Duration::from_secs(10))
                .expect("watermarks");
            high - done.get(&p).copied().unwrap_or(0)
        })
        .sum()
}

/// Records on all partitions of `topic` (blocking).
fn watermark_total(topic: &str) -> i64 {
    watermark_total_of(topic, PARTITIONS)
}

/// Records on `topic`'s first `partitions` partitions (blocking).
pub fn watermark_total_of(topic: &str, partitions: i32) -> i64 {
    let consumer = admin_consumer("chaos-watermarks");
    (0..partitions)
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            high - low
        })
        .sum()
}

/// Keyed readings at a bounded rate: each sensor reports `per_sensor` times, every `every`,
/// with `celsius(i, k)` as the k-th temperature of the i-th sensor and its clock `skew` off ours.
/// The last reading is always hot: once the sensors fall silent, the fail-safe has no heater
/// to turn OFF, so a short STALE_AFTER adds nothing to the expected stream.
#[derive(Clone)]
pub struct Load {
    pub ids: Vec<String>,
    pub per_sensor: usize,
    pub every: Duration,
    pub skew: TimeDelta,
    pub celsius: fn(usize, usize) -> f64,
}

/// 10 °C, 30 °C, 10 °C, … (odd sensors start at 30 °C): every reading is a transition, and at
/// any moment about half the heaters are ON.
pub fn alternating(sensor: usize, k: usize) -> f64 {
    if (sensor + k).is_multiple_of(2) {
        10.0
    } else {
        30.0
    }
}

pub fn cold(_: usize, _: usize) -> f64 {
    10.0
}

impl Load {
    pub fn new(prefix: &str, sensors: usize, per_sensor: usize, every: Duration) -> Self {
        Self {
            ids: (0..sensors).map(|i| format!("{prefix}-{i:02}")).collect(),
            per_sensor,
            every,
            skew: TimeDelta::zero(),
            celsius: alternating,
        }
    }

    fn temperature(&self, sensor: usize, k: usize) -> f64 {
        if k + 1 == self.per_sensor {
            30.0
        } else {
            (self.celsius)(sensor, k)
        }
    }

    pub fn readings(&self) -> usize {
        self.ids.len() * self.per_sensor
    }

    /// What the rule gives for these readings, per sensor.
    pub fn expected(&self) -> BTreeMap<String, Expected> {
        (self.ids.iter().enumerate())
            .map(|(i, id)| {
                let stream = transitions((0..self.per_sensor).map(|k| self.temperature(i, k)));
                (id.clone(), Expected::Stream(stream))
            })
            .collect()
    }

    /// Produces in the background; each sensor's readings in order, one at a time, so they
    /// stay ordered in its partition, and with strictly increasing times.
    pub fn spawn(&self, topic: &str) -> JoinHandle<()> {
        let sensors = Arc::new(Sensors::new(topic));
        let mut tasks = JoinSet::new();
        for (i, id) in self.ids.iter().enumerate() {
            let (load, sensors, id) = (self.clone(), sensors.clone(), id.clone());
            // Staggered, so the rate is even rather than in bursts of one per sensor.
            let offset = self.every.mul_f64(i as f64 / self.ids.len() as f64);
            tasks.spawn(async move {
                tokio::time::sleep(offset).await;
                let mut ticks = tokio::time::interval(load.every);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut last: Option<DateTime<Utc>> = None;
                for k in 0..load.per_sensor {
                    ticks.tick().await;
                    let mut time = Utc::now() + load.skew;
                    if let Some(last) = last.filter(|l| time <= *l) {
                        time = last + TimeDelta::milliseconds(1);
                    }
                    last = Some(time);
                    sensors.reading(&id, load.temperature(i, k), time).await;
                }
            });
        }
        tokio::spawn(async move {
            while let Some(done) = tasks.join_next().await {
                done.expect("a sensor's producer");
            }
        })
    }
}

/// A command and why: what a reading must give.
pub type Transition = (HeaterCommand, CommandReason);

/// The commands the rule gives for a sensor's temperatures with the band `DESIRED` ± 0.5, from
/// no command: one per change of what the heater should do.
pub fn transitions(temperatures: impl IntoIterator<Item = f64>) -> Vec<Transition> {
    let mut out: Vec<Transition> = Vec::new();
    for celsius in temperatures {
        let wanted = if celsius < DESIRED - 0.5 {
            (HeaterCommand::On, CommandReason::TooCold)
        } else if celsius > DESIRED + 0.5 {
            (HeaterCommand::Off, CommandReason::TooHot)
        } else {
            continue;
        };
        if out.last().map(|last| last.0) != Some(wanted.0) {
            out.push(wanted);
        }
    }
    out
}

/// What a sensor's deduplicated command stream must be.
#[derive(Debug, Clone)]
pub enum Expected {
    /// Exactly these commands, with these reasons, in consecutive sequences (from 1, or from
    /// above the sequence floor when the sensor was first commanded after a reassignment).
    Stream(Vec<Transition>),
    /// Any alternating stream that ends with this command (setpoints changed at times the
    /// test does not control).
    Last(HeaterCommand),
}

/// The checker's counts. Duplicates are allowed; the rest must be 0.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub readings: usize,
    pub commands: usize,
    pub duplicates: usize,
    /// Two different commands with the same (sensor, sequence).
    pub conflicts: usize,
    /// Sequences missing between a sensor's lowest and highest one.
    pub gaps: usize,
    /// Commands that differ from the expected one at their sequence (or come beyond it).
    pub mismatches: usize,
    /// Expected commands beyond a sensor's highest sequence.
    pub missing: usize,
    /// Commands with reason SENSOR_STALE.
    pub stale: usize,
    /// Sensors whose last command a replica or a fresh subscriber reports otherwise.
    pub disagreements: usize,
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "readings={} commands={} duplicates={} conflicts={} gaps={} mismatches={} \
             missing={} stale={} disagreements={}",
            self.readings,
            self.commands,
            self.duplicates,
            self.conflicts,
            self.gaps,
            self.mismatches,
            self.missing,
            self.stale,
            self.disagreements
        )
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub tally: Tally,
    /// Per sensor, its highest sequence and that command.
    pub last: BTreeMap<String, (u64, HeaterCommand)>,
    /// What was wrong, one line each.
    pub problems: Vec<String>,
}

/// Checks a command topic's events (in topic order) against the expected streams: conflicts,
/// gaps and duplicates for every sensor, mismatches and missing commands for expected ones.
pub fn check(events: &[pb::HeaterCommandEvent], expected: &BTreeMap<String, Expected>) -> Report {
    let mut report = Report::default();
    report.tally.commands = events.len();
    // Per sensor, sequence → the first event's command and reason.
    let mut seen: BTreeMap<&str, BTreeMap<u64, Transition>> = BTreeMap::new();
    for e in events {
        let (sensor, sequence, command) = (&e.sensor_id, e.sequence, e.command());
        if e.reason() == CommandReason::SensorStale {
            report.tally.stale += 1;
            report
                .problems
                .push(format!("{sensor}: sequence {sequence} is SENSOR_STALE"));
        }
        let commands = seen.entry(sensor.as_str()).or_default();
        match commands.get(&sequence) {
            None => {
                commands.insert(sequence, (command, e.reason()));
            }
            Some((first, _)) if *first == command => report.tally.duplicates += 1,
            Some((first, _)) => {
                report.tally.conflicts += 1;
                report.problems.push(format!(
                    "{sensor}: sequence {sequence} is both {first:?} and {command:?}"
                ));
            }
        }
    }
    for (sensor, commands) in &seen {
        let (&top, &(command, _)) = commands.last_key_value().expect("one command at least");
        let first = *commands.keys().next().expect("one command at least");
        let gaps = (first..=top).filter(|s| !commands.contains_key(s)).count();
        if gaps > 0 {
            report.tally.gaps += gaps;
            report
                .problems
                .push(format!("{sensor}: {gaps} sequences missing below {top}"));
        }
        report.last.insert(sensor.to_string(), (top, command));
    }
    let none = BTreeMap::new();
    for (sensor, want) in expected {
        let got = seen.get(sensor.as_str()).unwrap_or(&none);
        judge(&mut report, sensor, got, want);
    }
    report
}

/// Mismatches and missing commands of one sensor (`got`: sequence → command, deduplicated).
fn judge(report: &mut Report, sensor: &str, got: &BTreeMap<u64, Transition>, want: &Expected) {
    let (tally, problems) = (&mut report.tally, &mut report.problems);
    match want {
        Expected::Stream(want) => {
            // A lost first command shows as a mismatch: commands alternate.
            let first = got.keys().next().copied().unwrap_or(1);
            for (&sequence, got) in got {
                let expected = want.get((sequence - first) as usize);
                if expected != Some(got) {
                    tally.mismatches += 1;
                    problems.push(format!(
                        "{sensor}: sequence {sequence} is {got:?}, expected {expected:?}"
                    ));
                }
            }
            let top = got.keys().last().copied().unwrap_or(0);
            let covered = (top + 1).saturating_sub(first) as usize;
            let missing = want.len().saturating_sub(covered);
            if missing > 0 {
                tally.missing += missing;
                problems.push(format!(
                    "{sensor}: {missing} of {} commands never came (last sequence {top})",
                    want.len()
                ));
            }
        }
        Expected::Last(want) => {
            let commands: Vec<HeaterCommand> = got.values().map(|(c, _)| *c).collect();
            let repeats = commands.windows(2).filter(|w| w[0] == w[1]).count();
            let wrong_end = commands.last().is_some_and(|last| last != want);
            tally.mismatches += repeats + usize::from(wrong_end);
            if repeats > 0 || wrong_end {
                problems.push(format!(
                    "{sensor}: {commands:?}, expected to end with {want:?}"
                ));
            }
            if commands.is_empty() {
                tally.missing += 1;
                problems.push(format!("{sensor}: no command, expected {want:?}"));
            }
        }
    }
}

/// Counts sensors whose last command (`last`) a live replica's GetSensorState or a fresh
/// `send_initial_state` subscriber on it reports otherwise; a replica's follower may trail the
/// topic by a moment, so each gets a few seconds to agree.
pub async fn disagreements(
    cluster: &Cluster,
    last: &BTreeMap<String, (u64, HeaterCommand)>,
) -> (usize, Vec<String>) {
    let mut problems = Vec::new();
    for replica in cluster.live() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let wrong = loop {
            let wrong = states_differing(replica, last).await;
            if wrong.is_empty() || Instant::now() > deadline {
                break wrong;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for sensor in wrong {
            problems.push(format!("{}: GetSensorState of {sensor}", replica.name));
        }
        for sensor in snapshot_differing(replica, last).await {
            problems.push(format!("{}: snapshot of {sensor}", replica.name));
        }
    }
    (problems.len(), problems)
}

async fn states_differing(
    replica: &Replica,
    last: &BTreeMap<String, (u64, HeaterCommand)>,
) -> Vec<String> {
    let mut heaters = replica.heaters();
    let mut wrong = Vec::new();
    for (sensor, &(sequence, command)) in last {
        let state = heaters.get_sensor_state(state_request(sensor)).await;
        let reported = state
            .ok()
            .and_then(|s| s.into_inner().last_command)
            .map(|c| (c.sequence, c.command()));
        if reported != Some((sequence, command)) {
            wrong.push(format!(
                "{sensor}: {reported:?} instead of {:?}",
                (sequence, command)
            ));
        }
    }
    wrong
}

/// Sensors whose snapshot event, from a fresh subscriber with `send_initial_state`, differs
/// from `last` (or never comes).
async fn snapshot_differing(
    replica: &Replica,
    last: &BTreeMap<String, (u64, HeaterCommand)>,
) -> Vec<String> {
    let request = pb::SubscribeHeaterCommandsRequest {
        sensor_ids: last.keys().cloned().collect(),
        send_initial_state: true,
        ..Default::default()
    };
    let mut snapshot = BTreeMap::new();
    match replica.heaters().subscribe_heater_commands(request).await {
        Ok(stream) => {
            let mut stream = stream.into_inner();
            while snapshot.len() < last.len() {
                let next = tokio::time::timeout(Duration::from_secs(5), stream.next()).await;
                let Ok(Some(Ok(event))) = next else { break };
                if event.snapshot {
                    snapshot.insert(event.sensor_id.clone(), (event.sequence, event.command()));
                }
            }
        }
        Err(status) => return vec![format!("subscription refused: {status}")],
    }
    let ids: BTreeSet<&String> = last.keys().collect();
    ids.into_iter()
        .filter(|id| snapshot.get(*id) != last.get(*id))
        .map(|id| format!("{id}: {:?} instead of {:?}", snapshot.get(id), last[id]))
        .collect()
}

/// A small seeded generator (xorshift64*): the scenarios' random points, replayable with
/// `CHAOS_SEED`.
pub struct Rng(u64);

impl Rng {
    pub fn from_env() -> Self {
        let seed = std::env::var("CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64);
        println!("chaos: CHAOS_SEED={seed}");
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A duration in `[low, high)`.
    pub fn between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = (high - low).as_millis() as u64;
        low + Duration::from_millis(self.next() % span.max(1))
    }
}

/// librdkafka's mock cluster of one broker, listening on a loopback port, in place of the
/// suite's Tansu while it lives: for faults Tansu 0.6 cannot take (a broker connection cut and
/// back with its data and groups, a member expired at its session timeout).
pub struct MockBroker(pub MockCluster<'static, DefaultProducerContext>);

impl MockBroker {
    pub fn start() -> Self {
        Self::with_brokers(1)
    }

    /// `brokers` brokers, ids 1 and up; topics are led by broker 1 unless moved.
    pub fn with_brokers(brokers: i32) -> Self {
        let mock = MockCluster::new(brokers).expect("mock cluster");
        super::kafka::use_brokers(Some(mock.bootstrap_servers()));
        Self(mock)
    }

    /// Fresh topics, led by broker 1 like their groups' coordinator.
    pub fn topics(&self) -> Topics {
        use rdkafka::mocking::MockCoordinator::Group;
        let topics = Topics::on_mock(&self.0, PARTITIONS);
        for group in [
            topics.group.clone(),
            format!("{}-command-follower", topics.group),
        ] {
            self.0.coordinator(Group(group), 1).expect("coordinator");
        }
        topics
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        super::kafka::use_brokers(None);
    }
}

/// What replicas on a mock cluster need: it describes no topic settings.
pub const ON_MOCK: (&str, &str) = ("ALLOW_COMMAND_TOPIC_DELETION", "true");
