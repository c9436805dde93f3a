//! Service benchmarks against same-run baselines, printed as a markdown table:
//!
//! 3. PutSetpoint throughput and p99 at 8 and 32 concurrent clients against `pgbench -M
//!    prepared` running the statement the service issues (`store::PUT_SQL`), on the same
//!    PostgreSQL with the same `synchronous_commit`.
//! 5. Resident memory per cached sensor: the service's RSS with 1M setpoints cached minus its
//!    RSS with none, both started the same way in the same run.
//!
//! Run with `scripts/bench.sh` (it starts PostgreSQL and Tansu and sets the environment).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sqlx::{Connection, PgConnection};
use thermostat::config::ServeConfig;
use thermostat::proto::v1 as pb;
use thermostat::Application;
use tokio_util::sync::CancellationToken;

const PUT_SECONDS: u64 = 10;
const SENSORS: u32 = 10_000;
const MEMORY_SENSORS: u32 = 1_000_000;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} unset: run scripts/bench.sh"))
}

async fn fresh_database(name: &str) -> String {
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

fn config(database_url: String, prefix: &str) -> ServeConfig {
    let mut config = ServeConfig::from_defaults().expect("default configuration");
    config.database.database_url = database_url;
    config.database.database_max_connections = 32;
    config.kafka.kafka_brokers = env("THERMOSTAT_BENCH_BROKERS");
    config.kafka.sensor_topic = format!("{prefix}-sensors");
    config.kafka.command_topic = format!("{prefix}-commands");
    config.kafka.dead_letter_topic = format!("{prefix}-dlq");
    config.kafka.consumer_group = format!("{prefix}-group");
    config.grpc_addr = "127.0.0.1:0".parse().expect("addr");
    config.admin_addr = "127.0.0.1:0".parse().expect("addr");
    config
}

struct Row {
    what: String,
    per_second: f64,
    p99_ms: f64,
}

/// `clients` concurrent gRPC clients putting changing setpoints for `PUT_SECONDS`.
async fn grpc_puts(addr: std::net::SocketAddr, clients: u32) -> Row {
    let deadline = Instant::now() + Duration::from_secs(PUT_SECONDS);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        tasks.spawn(async move {
            let mut client = pb::setpoint_service_client::SetpointServiceClient::connect(format!(
                "http://{addr}"
            ))
            .await
            .expect("connect");
            let mut histogram = Histogram::<u64>::new(3).expect("histogram");
            let mut i = 0u32;
            while Instant::now() < deadline {
                i += 1;
                let request = pb::PutSetpointRequest {
                    setpoint: Some(pb::Setpoint {
                        sensor_id: format!("bench-{}", (c * 7919 + i * 104_729) % SENSORS),
                        building_id: "bench".into(),
                        desired_celsius: f64::from(i % 300) / 10.0,
                        up_delta_celsius: 0.5,
                        down_delta_celsius: 0.5,
                        ..Default::default()
                    }),
                    expected_revision: None,
                };
                let started = Instant::now();
                client.put_setpoint(request).await.expect("put");
                histogram
                    .record(started.elapsed().as_micros() as u64)
                    .expect("record");
            }
            histogram
        });
    }
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    while let Some(h) = tasks.join_next().await {
        all.add(h.expect("client")).expect("merge");
    }
    Row {
        what: format!("PutSetpoint via gRPC, {clients} clients"),
        per_second: all.len() as f64 / PUT_SECONDS as f64,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
    }
}

/// pgbench running the service's Put statement, parameters bound like the service binds them.
fn pgbench_puts(database_url: &str, clients: u32) -> Row {
    let dir = tempfile::tempdir().expect("tempdir");
    let sql = thermostat::store::PUT_SQL
        .replace("$1", "('bench-' || :s)")
        .replace("$2", "'bench'")
        .replace("$3", ":d::float8 / 10")
        .replace("$4", "0.5::float8")
        .replace("$5", "0.5::float8")
        .replace("$6", "'pgbench'")
        .replace("$7", "''")
        .replace("$8::int8", "NULL::int8");
    let script = format!(
        "\\set s random(0, {})\n\\set d random(0, 299)\n{};\n",
        SENSORS - 1,
        sql.trim()
    );
    let script_path = dir.path().join("put.sql");
    std::fs::write(&script_path, script).expect("script");
    let out = Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &clients.to_string(),
            "-j",
            "2",
        ])
        .args(["-T", &PUT_SECONDS.to_string(), "-l", "--log-prefix"])
        .arg(dir.path().join("log"))
        .arg("-f")
        .arg(&script_path)
        .arg(database_url)
        .stderr(Stdio::inherit())
        .output()
        .expect("run pgbench");
    assert!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut histogram = Histogram::<u64>::new(3).expect("histogram");
    for entry in std::fs::read_dir(dir.path()).expect("dir") {
        let path = entry.expect("entry").path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("log"))
        {
            continue;
        }
        for line in std::fs::read_to_string(path).expect("log").lines() {
            if let Some(us) = line.split(' ').nth(2).and_then(|v| v.parse::<u64>().ok()) {
                histogram.record(us).expect("record");
            }
        }
    }
    Row {
        what: format!("pgbench -M prepared, same statement, {clients} clients"),
        per_second: histogram.len() as f64 / PUT_SECONDS as f64,
        p99_ms: histogram.value_at_quantile(0.99) as f64 / 1000.0,
    }
}

/// Resident set size of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Starts the release binary on `database_url`, waits until its cache is loaded (the gRPC port
/// answers health SERVING) and a few seconds more, and returns its RSS.
async fn service_rss(database_url: &str, prefix: &str) -> u64 {
    let config = config(database_url.to_owned(), prefix);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thermostat"))
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BROKERS", &config.kafka.kafka_brokers)
        .env("SENSOR_TOPIC", &config.kafka.sensor_topic)
        .env("COMMAND_TOPIC", &config.kafka.command_topic)
        .env("DEAD_LETTER_TOPIC", &config.kafka.dead_letter_topic)
        .env("CONSUMER_GROUP", &config.kafka.consumer_group)
        .env("GRPC_ADDR", format!("127.0.0.1:{port}"))
        .env("ADMIN_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start thermostat");
    let endpoint = format!("http://127.0.0.1:{port}");
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
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bytes = rss(child.id());
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    bytes
}

async fn create_topics(prefix: &str) {
    let config = config(String::new(), prefix);
    thermostat::stream::admin::create_topics(&config.kafka, 3, 1)
        .await
        .expect("topics");
}

#[tokio::main]
async fn main() {
    let mut rows = Vec::new();

    // 3. PutSetpoint against pgbench.
    create_topics("benchput").await;
    let put_db = fresh_database("bench_put").await;
    let app = Application::build(config(put_db.clone(), "benchput"))
        .await
        .expect("service");
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    let served = tokio::spawn(app.run_until_stopped(stop.clone()));
    for clients in [8, 32] {
        let ours = grpc_puts(addr, clients).await;
        let baseline = tokio::task::spawn_blocking({
            let url = put_db.clone();
            move || pgbench_puts(&url, clients)
        })
        .await
        .expect("pgbench");
        rows.push((ours, baseline));
    }
    stop.cancel();
    let _ = served.await;

    println!("\n| benchmark | per second | p99 ms | baseline | baseline per second | baseline p99 ms | ratio (throughput) | goal |");
    println!("|---|---|---|---|---|---|---|---|");
    for (ours, base) in &rows {
        let ratio = ours.per_second / base.per_second;
        println!(
            "| {} | {:.0} | {:.2} | {} | {:.0} | {:.2} | {:.2}x | >= 0.8x: {} |",
            ours.what,
            ours.per_second,
            ours.p99_ms,
            base.what,
            base.per_second,
            base.p99_ms,
            ratio,
            if ratio >= 0.8 { "met" } else { "MISSED" }
        );
    }

    // 5. Memory per cached sensor.
    create_topics("benchmem").await;
    let empty = fresh_database("bench_mem_empty").await;
    let full = fresh_database("bench_mem_full").await;
    {
        let mut conn = PgConnection::connect(&full).await.expect("connect");
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
        .bind(MEMORY_SENSORS as i32)
        .execute(&mut conn)
        .await
        .expect("insert 1M setpoints");
    }
    let baseline = service_rss(&empty, "benchmem").await;
    let loaded = service_rss(&full, "benchmem").await;
    let per_sensor = loaded.saturating_sub(baseline) as f64 / f64::from(MEMORY_SENSORS);
    println!("\n| benchmark | value | baseline (same binary, 0 setpoints) | goal |");
    println!("|---|---|---|---|");
    println!(
        "| RSS with {MEMORY_SENSORS} setpoints cached | {:.0} MB | {:.0} MB | <= 200 MB: {} |",
        loaded as f64 / 1e6,
        baseline as f64 / 1e6,
        if loaded as f64 <= 200e6 {
            "met"
        } else {
            "MISSED"
        }
    );
    println!(
        "| resident bytes per cached sensor | {per_sensor:.0} B | | <= 100 B: {} |",
        if per_sensor <= 100.0 { "met" } else { "MISSED" }
    );
}
