//! Shared test harness: starts the service on a free port against its own fresh database on the
//! shared PostgreSQL cluster and its own fresh topics on the shared broker, both started by
//! `scripts/test.sh` (`THERMOSTAT_TEST_PG_URL`, `THERMOSTAT_TEST_BROKERS`).
#![allow(dead_code)]

pub mod chaos;
pub mod kafka;
pub mod security;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use thermostat::config::ServeConfig;
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::setpoint_service_client::SetpointServiceClient;
use thermostat::stream::ControlHandle;
use thermostat::Application;

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test.sh, which starts the servers")
    })
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A unique lowercase name, for databases and topics.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// Creates a fresh database on the cluster at `admin_url`; returns its URL.
pub async fn create_database(admin_url: &str) -> String {
    let name = unique_name("t");
    let mut conn = PgConnection::connect(admin_url)
        .await
        .expect("connect admin");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create database");
    let (base, _) = admin_url.rsplit_once('/').expect("url has a database");
    format!("{base}/{name}")
}

pub fn serve_config(database_url: String, topics: &kafka::Topics) -> ServeConfig {
    let mut config = ServeConfig::from_defaults().expect("default configuration");
    config.database.database_url = database_url;
    config.database.database_max_connections = 10;
    config.database.database_acquire_timeout = Duration::from_secs(2);
    config.kafka.kafka_brokers = kafka::brokers();
    config.kafka.sensor_topic = topics.sensors.clone();
    config.kafka.command_topic = topics.commands.clone();
    config.kafka.dead_letter_topic = topics.dead_letters.clone();
    config.kafka.consumer_group = topics.group.clone();
    config.control.stale_check_interval = Duration::from_millis(200);
    config.grpc_addr = "127.0.0.1:0".parse().expect("addr");
    config.admin_addr = "127.0.0.1:0".parse().expect("addr");
    config.health_addr = "127.0.0.1:0".parse().expect("addr");
    // These tests are about everything but security (tests/security_*.rs); they call as the
    // anonymous admin that AUTH_DISABLED makes of every caller.
    config.auth.auth_disabled = true;
    // Some tests write, read and subscribe in bursts; the limits themselves are tested in
    // tests/security_limits.rs and tests/security_tenancy.rs.
    config.limits.write_rate_limit = 100_000;
    config.limits.write_burst = 100_000;
    config.limits.read_rate_limit = 100_000;
    config.limits.read_burst = 100_000;
    config.limits.subscribe_rate_limit = 100_000;
    config.limits.subscribe_burst = 100_000;
    config.health_check_interval = Duration::from_millis(200);
    config.shutdown_timeout = Duration::from_secs(5);
    config
}

/// A running service and what a test needs to talk to it.
pub struct TestApp {
    pub addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub database_url: String,
    pub config: ServeConfig,
    pub control: ControlHandle,
    pub store: thermostat::store::Store,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), thermostat::StartupError>>,
}

impl TestApp {
    /// Starts the service against a fresh database and fresh topics.
    pub async fn spawn() -> Self {
        Self::spawn_with(Self::fresh_config().await).await
    }

    /// A configuration with a fresh database and fresh topics (2 sensor partitions).
    pub async fn fresh_config() -> ServeConfig {
        let database_url = create_database(&env("THERMOSTAT_TEST_PG_URL")).await;
        serve_config(database_url, &kafka::Topics::create(2).await)
    }

    pub async fn spawn_with(config: ServeConfig) -> Self {
        let database_url = config.database.database_url.clone();
        let app = Application::build(config.clone()).await.expect("build app");
        let addr = app.local_addr();
        let health_addr = app.health_addr();
        let control = app.control().clone();
        let store = app.store().clone();
        let admin = app.admin_addr().expect("admin address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        Self {
            addr,
            health_addr,
            database_url,
            config,
            control,
            store,
            admin,
            shutdown,
            task,
        }
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn setpoints(&self) -> SetpointServiceClient<Channel> {
        SetpointServiceClient::new(self.channel().await)
    }

    pub async fn heaters(
        &self,
    ) -> thermostat::proto::v1::heater_control_service_client::HeaterControlServiceClient<Channel>
    {
        thermostat::proto::v1::heater_control_service_client::HeaterControlServiceClient::new(
            self.channel().await,
        )
    }

    /// Gives `sensor` a wide band around `desired` ([`wide_band`]), then subscribes to every
    /// heater command.
    pub async fn band_and_subscribe(
        &self,
        sensor: &str,
        desired: f64,
    ) -> tonic::Streaming<pb::HeaterCommandEvent> {
        self.setpoints()
            .await
            .put_setpoint(put(wide_band(sensor, desired), None))
            .await
            .expect("put");
        self.heaters()
            .await
            .subscribe_heater_commands(pb::SubscribeHeaterCommandsRequest::default())
            .await
            .expect("subscribe")
            .into_inner()
    }

    /// Simulates a crash: the service stops at once, without committing or flushing.
    pub async fn crash(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }

    pub async fn db(&self) -> PgConnection {
        PgConnection::connect(&self.database_url)
            .await
            .expect("connect test database")
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        (&mut self.task)
            .await
            .expect("app task panicked")
            .expect("app stopped with an error");
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A setpoint message for Put.
pub fn setpoint(sensor: &str, building: &str, desired: f64) -> pb::Setpoint {
    pb::Setpoint {
        sensor_id: sensor.into(),
        building_id: building.into(),
        desired_celsius: desired,
        up_delta_celsius: 0.5,
        down_delta_celsius: 0.5,
        ..Default::default()
    }
}

/// A setpoint of `desired` ± 1 °C in building "hq", for the control-loop tests.
pub fn wide_band(sensor: &str, desired: f64) -> pb::Setpoint {
    pb::Setpoint {
        up_delta_celsius: 1.0,
        down_delta_celsius: 1.0,
        ..setpoint(sensor, "hq", desired)
    }
}

pub fn put(setpoint: pb::Setpoint, expected_revision: Option<i64>) -> pb::PutSetpointRequest {
    pb::PutSetpointRequest {
        request_id: Default::default(),
        setpoint: Some(setpoint),
        expected_revision,
    }
}

/// Starts the service with `config` and gives `sensor` a setpoint of 20 °C in building "b";
/// returns the service and the client that wrote it.
pub async fn spawn_with_setpoint(
    config: ServeConfig,
    sensor: &str,
) -> (TestApp, SetpointServiceClient<Channel>) {
    let app = TestApp::spawn_with(config).await;
    let mut client = app.setpoints().await;
    client
        .put_setpoint(put(setpoint(sensor, "b", 20.0), None))
        .await
        .expect("the first Put");
    (app, client)
}

/// A private PostgreSQL cluster, for tests that stop and restart the database.
pub struct PgCluster {
    dir: tempfile::TempDir,
    pub admin_url: String,
}

impl PgCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin_url = pg_script("start", dir.path());
        Self { dir, admin_url }
    }

    pub fn stop(&self) {
        pg_script("stop", self.dir.path());
    }

    /// Starts again on the same port with the same data.
    pub fn restart(&self) {
        pg_script("start", self.dir.path());
    }

    /// Switches TLS on with `server`'s certificate and key (a reload, no restart).
    pub async fn enable_tls(&self, server: &security::Pem) {
        use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
        // The server reads them as the cluster's owner (`postgres` when the tests run as
        // root), and refuses a key that others may read.
        let owner = std::fs::metadata(self.dir.path().join("data")).expect("data directory");
        let mut paths = Vec::new();
        for (name, contents) in [("server.crt", &server.cert), ("server.key", &server.key)] {
            let path = security::write(self.dir.path(), name, contents);
            chown(&path, Some(owner.uid()), Some(owner.gid())).expect("chown");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            paths.push(path);
        }
        let mut admin = PgConnection::connect(&self.admin_url)
            .await
            .expect("connect admin");
        for statement in [
            format!("ALTER SYSTEM SET ssl_cert_file = '{}'", paths[0].display()),
            format!("ALTER SYSTEM SET ssl_key_file = '{}'", paths[1].display()),
            "ALTER SYSTEM SET ssl = on".to_owned(),
            "SELECT pg_reload_conf()".to_owned(),
        ] {
            sqlx::query(&statement)
                .execute(&mut admin)
                .await
                .expect(&statement);
        }
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        pg_script("stop", self.dir.path());
    }
}

fn pg_script(action: &str, dir: &Path) -> String {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/pg.sh"))
        .arg(action)
        .arg(dir)
        .output()
        .expect("run scripts/pg.sh");
    assert!(
        out.status.success(),
        "scripts/pg.sh {action} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A subscription from a client that does not read (until a test does), with a tiny HTTP/2
/// window: the server cannot hand it more than a few events, so it falls behind the shared
/// buffer.
pub async fn stalled_subscription(
    addr: &str,
    request: impl tonic::IntoRequest<thermostat::proto::v1::SubscribeHeaterCommandsRequest>,
) -> tonic::Streaming<thermostat::proto::v1::HeaterCommandEvent> {
    use thermostat::proto::v1 as pb;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .initial_stream_window_size(Some(1024))
        .initial_connection_window_size(Some(1024))
        .connect()
        .await
        .expect("connect");
    pb::heater_control_service_client::HeaterControlServiceClient::new(channel)
        .subscribe_heater_commands(request)
        .await
        .expect("subscribe")
        .into_inner()
}

/// How many last commands the loop knows, counted over every part of its snapshot.
pub async fn snapshot_len(app: &TestApp) -> usize {
    let (mut count, mut from) = (0, Some(Default::default()));
    while let Some(start) = from {
        let Some(part) = app.control.snapshot(Default::default(), start).await else {
            return 0;
        };
        count += part.events.len();
        from = part.next;
    }
    count
}

/// Runs the real grpcurl binary, as an operator would. It blocks, so tests calling it use the
/// multi-threaded runtime to keep the server running meanwhile.
pub fn grpcurl(args: &[&str]) -> String {
    let out = grpcurl_output(args);
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs grpcurl and returns whatever it did, for calls that are expected to fail.
pub fn grpcurl_output(args: &[&str]) -> std::process::Output {
    let bin = std::env::var("THERMOSTAT_TEST_GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    Command::new(&bin).args(args).output().expect("run grpcurl")
}

/// A plain HTTP/1.1 GET; returns (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_owned())
}

/// The value of the Prometheus sample whose line starts with `series` (name and labels as
/// rendered), or 0 when absent.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Whether the server closes `socket` within `deadline`, whatever it sent before.
pub async fn closed_within(socket: &mut tokio::net::TcpStream, deadline: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    let closed = async {
        while let Ok(read) = socket.read(&mut buf).await {
            if read == 0 {
                return;
            }
        }
    };
    tokio::time::timeout(deadline, closed).await.is_ok()
}

/// Whether the server has not closed `socket` (yet).
pub fn still_open(socket: &tokio::net::TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match socket.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) => return e.kind() == std::io::ErrorKind::WouldBlock,
        }
    }
}

/// Polls `check` every 50 ms until it returns true or `timeout` passes.
/// Whether the health service at `endpoint` (`http://host:port`) answers SERVING for `service`
/// (`""`: the whole server) within a second.
pub async fn serving(endpoint: &str, service: &str) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    let Ok(channel) = tonic::transport::Channel::from_shared(endpoint.to_owned())
        .expect("uri")
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
    else {
        return false;
    };
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await;
    status.is_ok_and(|s| s.into_inner().status == ServingStatus::Serving as i32)
}

pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP proxy that can stop passing bytes without closing anything: what a client sees of a
/// peer that vanished without a reset (a failover, a lost host).
pub struct StallingProxy {
    pub addr: SocketAddr,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: JoinHandle<()>,
}

impl StallingProxy {
    pub async fn start(target: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let stalled = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stalled.clone();
        let task = tokio::spawn(async move {
            let mut pipes = tokio::task::JoinSet::new();
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let (from_client, to_client) = inbound.into_split();
                let (from_server, to_server) = outbound.into_split();
                for (mut from, mut to) in [(from_client, to_server), (from_server, to_client)] {
                    let stalled = flag.clone();
                    pipes.spawn(async move {
                        let mut buffer = vec![0u8; 16 * 1024];
                        loop {
                            let Ok(n) = from.read(&mut buffer).await else {
                                return;
                            };
                            // Bytes read while stalled are held until it is over.
                            while stalled.load(Ordering::SeqCst) {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if n == 0 || to.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self {
            addr,
            stalled,
            task,
        }
    }

    /// Stops (`true`) or resumes passing bytes.
    pub fn stall(&self, stalled: bool) {
        self.stalled
            .store(stalled, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        // The pipes live in the task's JoinSet and end with it.
        self.task.abort();
    }
}

/// The next event of a subscription, within 20 s.
pub async fn next_event(
    stream: &mut tonic::Streaming<pb::HeaterCommandEvent>,
) -> pb::HeaterCommandEvent {
    tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("no event within 20 s")
        .expect("stream error")
        .expect("stream ended")
}
