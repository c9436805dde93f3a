//! Helpers shared by the service benchmarks: the throwaway servers' addresses (set by
//! `scripts/bench.sh`), fresh databases and topics, the release binary as a child process, and
//! what is measured of a process (CPU time, resident memory).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use sqlx::{Connection, PgConnection};
use thermostat::config::ServeConfig;
use thermostat::proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} unset: run scripts/bench.sh"))
}

/// Topics to make on the mock cluster, each with its partitions and whom to tell when made.
type TopicOrder = (String, i32, std::sync::mpsc::SyncSender<()>);

/// The mock cluster in use, while a [`MockBroker`] lives: its bootstrap servers, and the way to
/// the thread that owns it (librdkafka's handle may not move between threads).
static MOCK: std::sync::Mutex<Option<(String, std::sync::mpsc::Sender<TopicOrder>)>> =
    std::sync::Mutex::new(None);

/// The broker every client of the run talks to: `scripts/bench.sh`'s Tansu, or the mock cluster
/// while a [`MockBroker`] lives.
pub fn brokers() -> String {
    let mock = MOCK.lock().expect("mock cluster");
    match mock.as_ref() {
        Some((servers, _)) => servers.clone(),
        None => env("THERMOSTAT_BENCH_BROKERS"),
    }
}

pub fn on_mock() -> bool {
    MOCK.lock().expect("mock cluster").is_some()
}

/// librdkafka's mock cluster of one broker on a loopback port, in this process, while this
/// lives: a quiet broker for the ratios (Tansu's seconds of queueing and its drift as it fills
/// are noise there). Subjects and baselines still run in processes of their own; the broker's
/// CPU is this process's, so it is not reported.
pub struct MockBroker;

impl MockBroker {
    pub fn start() -> Self {
        let (orders, taken) = std::sync::mpsc::channel::<TopicOrder>();
        let (started, servers) = std::sync::mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
            started.send(mock.bootstrap_servers()).expect("bench");
            // Until the broker is dropped: then the cluster goes with this thread.
            for (topic, partitions, made) in taken {
                // Kept if it exists, as on Tansu.
                match mock.create_topic(&topic, partitions, 1) {
                    Ok(()) | Err(KafkaError::MockCluster(RDKafkaErrorCode::TopicAlreadyExists)) => {
                    }
                    Err(e) => panic!("topic {topic}: {e}"),
                }
                let _ = made.send(());
            }
        });
        let servers = servers.recv().expect("mock cluster started");
        *MOCK.lock().expect("mock cluster") = Some((servers, orders));
        Self
    }

    /// Makes `topic` on the mock cluster in use.
    fn create_topic(topic: &str, partitions: i32) {
        let (made, done) = std::sync::mpsc::sync_channel(1);
        let orders = MOCK.lock().expect("mock cluster").clone();
        let (_, orders) = orders.expect("a mock cluster in use");
        orders
            .send((topic.to_owned(), partitions, made))
            .expect("mock cluster thread");
        done.recv().expect("topic made");
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        MOCK.lock().expect("mock cluster").take();
    }
}

/// The broker's name in tables.
pub fn broker_name() -> &'static str {
    if on_mock() {
        "librdkafka's mock cluster"
    } else {
        "Tansu"
    }
}

pub async fn fresh_database(name: &str) -> String {
    let admin = env("THERMOSTAT_BENCH_PG_URL");
    let mut conn = PgConnection::connect(&admin).await.expect("connect");
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&mut conn)
        .await
        .expect("drop");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create");
    format!("{}/{name}", admin.rsplit_once('/').expect("url").0)
}

/// The id of the `i`th sensor of [`seed_setpoints`]: 1000 sensors per building.
pub fn sensor_id(i: u32) -> String {
    format!("building-{}/sensor-{i}", i / 1000)
}

/// Migrates the database and gives sensors `1..=count` (see [`sensor_id`]) the setpoint 21 °C
/// ± 0.5: below 20.5 the heater goes ON.
pub async fn seed_setpoints(database_url: &str, count: u32) {
    let mut conn = PgConnection::connect(database_url).await.expect("connect");
    thermostat::store::MIGRATOR
        .run(&mut conn)
        .await
        .expect("migrate");
    sqlx::query(
        "INSERT INTO setpoints (sensor_id, building_id, desired_celsius, up_delta_celsius, \
         down_delta_celsius, revision, update_time, updated_by) \
         SELECT 'building-' || (i / 1000) || '/sensor-' || i, 'building-' || (i / 1000), \
                21, 0.5, 0.5, 1, now(), 'bench' \
         FROM generate_series(1, $1) AS i",
    )
    .bind(count as i32)
    .execute(&mut conn)
    .await
    .expect("insert setpoints");
}

/// Topic and group names for one service (or baseline) run.
#[derive(Debug, Clone)]
pub struct Names {
    pub sensors: String,
    pub commands: String,
    pub dead_letters: String,
    pub group: String,
}

impl Names {
    /// Names unique to this bench process: a broker kept from an earlier run (a trial on a dev
    /// broker) must not hand it that run's records.
    pub fn new(prefix: &str) -> Self {
        static RUN: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
        let run = RUN.get_or_init(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or_default()
        });
        let prefix = format!("{prefix}-{run}");
        Self {
            sensors: format!("{prefix}-sensors"),
            commands: format!("{prefix}-commands"),
            dead_letters: format!("{prefix}-dlq"),
            group: format!("{prefix}-group"),
        }
    }
}

pub fn config(database_url: String, names: &Names) -> ServeConfig {
    let mut config = ServeConfig::from_defaults().expect("default configuration");
    config.database.database_url = database_url;
    config.database.database_max_connections = 32;
    config.kafka.kafka_brokers = brokers();
    config.kafka.sensor_topic = names.sensors.clone();
    config.kafka.command_topic = names.commands.clone();
    config.kafka.dead_letter_topic = names.dead_letters.clone();
    config.kafka.consumer_group = names.group.clone();
    config.grpc_addr = "127.0.0.1:0".parse().expect("addr");
    config.admin_addr = "127.0.0.1:0".parse().expect("addr");
    config.health_addr = "127.0.0.1:0".parse().expect("addr");
    // Measured without authentication and without the per-identity limits, which would
    // otherwise throttle the benchmarks' one identity.
    config.auth.auth_disabled = true;
    config.limits.write_rate_limit = u32::MAX;
    config.limits.write_burst = u32::MAX;
    config.limits.read_rate_limit = u32::MAX;
    config.limits.read_burst = u32::MAX;
    config.limits.subscribe_rate_limit = u32::MAX;
    config.limits.subscribe_burst = u32::MAX;
    config
}

/// Creates the sensor, command and dead-letter topics of `names` (kept if they exist).
pub async fn create_topics(names: &Names, partitions: i32) {
    // The mock cluster's topics are made through it (its admin API does not answer).
    if on_mock() {
        for topic in [&names.sensors, &names.commands, &names.dead_letters] {
            MockBroker::create_topic(topic, partitions);
        }
        return;
    }
    let config = config(String::new(), names);
    thermostat::stream::topics::create_topics(&config.kafka, partitions, 1)
        .await
        .expect("topics");
}

/// Hands a record to `producer`, awaiting outstanding deliveries while its queue is full.
pub async fn send(
    producer: &FutureProducer,
    mut record: FutureRecord<'_, [u8], [u8]>,
    pending: &mut FuturesUnordered<DeliveryFuture>,
) {
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return pending.push(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                if let Some(done) = pending.next().await {
                    done.expect("producer").expect("delivered");
                }
            }
            Err((e, _)) => panic!("produce: {e}"),
        }
    }
}

/// A port free now, for a child service to bind a few seconds later (after it has loaded its
/// cache). Below the kernel's ephemeral range: a port the kernel picks for `:0` can meanwhile go
/// to one of the many connections the bench and the service open (the ninth run lost its
/// latency benchmark to "Address already in use"); explicitly bound ports do not.
fn free_port() -> u16 {
    use std::hash::{BuildHasher, RandomState};
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, span) = (10_000, ephemeral_low.saturating_sub(10_000).max(1));
    let random = RandomState::new();
    (0u64..1000)
        .map(|n| low + (random.hash_one(n) % u64::from(span)) as u16)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// The release binary, `thermostat serve`, as a child process: its CPU time and memory are its
/// own, not the load generator's.
pub struct Service {
    child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Service {
    /// Starts the service; returns at once (see [`Service::wait_serving`]).
    pub fn spawn(database_url: &str, names: &Names) -> Self {
        Self::spawn_with(database_url, names, &[])
    }

    /// [`Service::spawn`], with more environment variables (configuration) for the service.
    pub fn spawn_with(database_url: &str, names: &Names, more: &[(&str, &str)]) -> Self {
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let health: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let child = Command::new(env!("CARGO_BIN_EXE_thermostat"))
            .arg("serve")
            .env("DATABASE_URL", database_url)
            .env("KAFKA_BROKERS", brokers())
            .env("SENSOR_TOPIC", &names.sensors)
            .env("COMMAND_TOPIC", &names.commands)
            .env("DEAD_LETTER_TOPIC", &names.dead_letters)
            .env("CONSUMER_GROUP", &names.group)
            .env("GRPC_ADDR", grpc.to_string())
            .env("ADMIN_ADDR", admin.to_string())
            .env("HEALTH_ADDR", health.to_string())
            .env("AUTH_DISABLED", "true")
            .env("MAX_SUBSCRIPTIONS_PER_IDENTITY", "100000")
            // Benchmark 4 opens 1000 subscriptions at once (the default allows 16, then 1/s).
            .env("SUBSCRIBE_RATE_LIMIT", "1000000")
            .env("SUBSCRIBE_BURST", "1000000")
            // Subscribers cut off at shutdown are logged by tower-http as errors: noise here.
            .env("RUST_LOG", "warn,tower_http=off")
            // The mock cluster describes no topic settings, which the start checks.
            .envs(on_mock().then_some(("ALLOW_COMMAND_TOPIC_DELETION", "true")))
            .envs(more.iter().copied())
            .spawn()
            .expect("start thermostat");
        Self { child, grpc, admin }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until health is SERVING: the setpoint cache is loaded and gRPC answers.
    pub async fn wait_serving(&self) {
        let endpoint = format!("http://{}", self.grpc);
        let started = Instant::now();
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "service never became ready"
            );
            if let Ok(channel) = tonic::transport::Channel::from_shared(endpoint.clone())
                .expect("uri")
                .connect()
                .await
            {
                let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
                if let Ok(r) = health
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                {
                    if r.into_inner().status == 1 {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Readings consumed so far (the `thermostat_readings_consumed_total` counter), `None`
    /// while the admin port does not answer yet.
    pub async fn readings(&self) -> Option<u64> {
        self.counter(thermostat::telemetry::READINGS).await
    }

    /// A counter without labels, scraped from the admin port; 0 before it first counts, `None`
    /// while the admin port does not answer.
    pub async fn counter(&self, name: &str) -> Option<u64> {
        // A connection accepted but never answered (the process stopping) must not stall the
        // poll loop.
        tokio::time::timeout(Duration::from_secs(2), self.scrape(name))
            .await
            .ok()
            .flatten()
    }

    async fn scrape(&self, name: &str) -> Option<u64> {
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        stream.read_to_string(&mut body).await.ok()?;
        if !body.starts_with("HTTP/1.") {
            return None;
        }
        let counter = body.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        Some(counter.unwrap_or(0.0) as u64)
    }

    /// Waits until the service knows `sensor`'s last command (GetSensorState).
    pub async fn wait_for_last_command(&self, sensor: &str) {
        let started = Instant::now();
        let mut client = pb::heater_control_service_client::HeaterControlServiceClient::connect(
            format!("http://{}", self.grpc),
        )
        .await
        .expect("connect");
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "the service never read {sensor}'s last command"
            );
            let state = client
                .get_sensor_state(pb::GetSensorStateRequest {
                    sensor_id: sensor.to_owned(),
                })
                .await
                .expect("GetSensorState")
                .into_inner();
            if state.last_command.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the service with SIGTERM, as Kubernetes would, and waits for it.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A bench that panics must not leave the service running (and holding its database).
impl Drop for Service {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// CPU time (user + system, all threads) process `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let [user, system, ..] = clock_ticks(&stat);
    (user + system) as f64 / 100.0
}

/// utime, stime, cutime and cstime of a `/proc/PID/stat` line (fields 14 to 17), in clock
/// ticks, which are 1/100 s on Linux (USER_HZ).
fn clock_ticks(stat: &str) -> [u64; 4] {
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    std::array::from_fn(|i| fields[11 + i].parse().expect("clock ticks"))
}

/// CPU seconds used by every `postgres` process on the machine (the bench's cluster is the only
/// one), counting exited backends too: the postmaster has reaped them into its children's time.
pub fn postgres_cpu_seconds() -> f64 {
    let ticks: u64 = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        // A backend may exit between the listing and this read: its time is then the
        // postmaster's.
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| clock_ticks(&stat).iter().sum::<u64>())
        .sum();
    ticks as f64 / 100.0
}

/// Whether a part of a benchmark runs: all by default; `THERMOSTAT_BENCH_ONLY` names one for a
/// quick trial (`put`, `memory`, `100%`, `1%`, `latency`).
pub fn runs(part: &str) -> bool {
    std::env::var("THERMOSTAT_BENCH_ONLY").map_or(true, |only| only == part)
}

/// CPU seconds the broker has used, when `scripts/bench.sh` names its process
/// (`THERMOSTAT_BENCH_BROKER_PID`); NaN otherwise.
pub fn broker_cpu_seconds() -> f64 {
    if on_mock() {
        return f64::NAN;
    }
    std::env::var("THERMOSTAT_BENCH_BROKER_PID")
        .ok()
        .and_then(|pid| pid.parse().ok())
        .map_or(f64::NAN, cpu_seconds)
}

/// Resident set size of process `pid`, in bytes.
pub fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS")
}

/// The most resident memory process `pid` has had, in bytes (`VmHWM`).
pub fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM")
}

/// A size field of `/proc/PID/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect(field)
        * 1024
}

/// The median of `f` over `items`.
pub fn median_by<T>(items: &[T], f: impl Fn(&T) -> f64) -> f64 {
    median(&items.iter().map(f).collect::<Vec<_>>())
}

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    assert!(n > 0, "median of nothing");
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// `value` against the goal `ok`: "met" or "**missed**", for the tables.
pub fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

/// Appends a row to the summary table `scripts/bench.sh` prints at the end (columns: #,
/// measurement, thermostat, baseline, ratio, goal).
pub fn summary(cells: [&str; 6]) {
    let Ok(path) = std::env::var("THERMOSTAT_BENCH_SUMMARY") else {
        return;
    };
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("summary file");
    writeln!(file, "| {} |", cells.join(" | ")).expect("summary row");
}
