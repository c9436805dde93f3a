//! Service benchmarks against same-run baselines, printed as a markdown table:
//!
//! 3. PutSetpoint throughput and p99 at 8 and 32 concurrent clients against `pgbench -M
//!    prepared` with as many clients, one Put a transaction, on the same PostgreSQL with the same
//!    `synchronous_commit`: running the statement the service issues (`store::PUT_SQL`, one
//!    row), and the one-row statement the service issued before it wrote concurrent Puts
//!    together ([`ONE_ROW_PUT_SQL`]). The goal is judged against the first, as issue 4 words
//!    it; the ratio to the second is printed beside it. pgbench's connections have the
//!    service's writers' `plan_cache_mode`.
//! 5. Resident memory per cached sensor: the service's RSS with 1M setpoints cached minus its
//!    RSS with none, both started the same way in the same run; and again once every sensor
//!    also has a last command (read back from a command topic preloaded with one per sensor,
//!    as after a restart): the steady state of a building that has been running for a while.
//!
//! Repetitions of 3 alternate the service and pgbench, every other one in reverse order; the
//! table gives medians. Run with
//! `scripts/bench.sh` (it starts PostgreSQL and Tansu and sets the environment).

#[path = "common/mod.rs"]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{median_by, verdict, Names, Service};
use futures::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use prost::Message as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use thermostat::proto::v1 as pb;
use thermostat::Application;
use tokio_util::sync::CancellationToken;

const PUT_SECONDS: u64 = 5;
const PUT_REPS: usize = 3;
const SENSORS: u32 = 10_000;
/// Benchmark 5's cache sizes: the goals are at the last, the others show the growth.
const MEMORY_SENSORS: [u32; 3] = [10_000, 100_000, 1_000_000];

/// The statement the service issued for a Put before it wrote concurrent Puts together (commit
/// 7767bd1): one row, no arrays. pgbench runs it too, so that the baseline is one Put a
/// transaction in its cheapest form, not only in the array form the service now uses.
const ONE_ROW_PUT_SQL: &str = r#"
WITH up AS (
    INSERT INTO setpoints AS s (sensor_id, building_id, desired_celsius, up_delta_celsius,
                                down_delta_celsius, revision, update_time, updated_by, reason)
    SELECT $1, $2, $3, $4, $5, 1, now(), $6, $7
    WHERE $8::int8 IS NULL OR $8::int8 = 0
       OR EXISTS (SELECT 1 FROM setpoints WHERE sensor_id = $1)
    ON CONFLICT (sensor_id) DO UPDATE SET
        building_id = excluded.building_id,
        desired_celsius = excluded.desired_celsius,
        up_delta_celsius = excluded.up_delta_celsius,
        down_delta_celsius = excluded.down_delta_celsius,
        revision = s.revision + 1,
        update_time = now(),
        updated_by = excluded.updated_by,
        reason = excluded.reason,
        deleted = false
    WHERE ($8::int8 IS NULL OR $8::int8 = CASE WHEN s.deleted THEN 0 ELSE s.revision END)
      AND ($9::text[] IS NULL OR s.building_id = ANY($9::text[]))
      AND (s.deleted OR (s.building_id, s.desired_celsius, s.up_delta_celsius, s.down_delta_celsius)
           IS DISTINCT FROM (excluded.building_id, excluded.desired_celsius,
                             excluded.up_delta_celsius, excluded.down_delta_celsius))
    RETURNING s.*
), history AS (
    INSERT INTO setpoint_history (sensor_id, revision, building_id, desired_celsius,
                                  up_delta_celsius, down_delta_celsius, deleted, change_time,
                                  changed_by, reason)
    SELECT sensor_id, revision, building_id, desired_celsius, up_delta_celsius,
           down_delta_celsius, false, update_time, updated_by, reason
    FROM up
)
SELECT sensor_id, building_id, desired_celsius, up_delta_celsius, down_delta_celsius,
       revision, update_time, updated_by, reason, deleted
FROM up

"#;

struct Row {
    what: String,
    per_second: f64,
    p99_ms: f64,
    /// PostgreSQL's CPU time per Put, all its processes.
    postgres_us: f64,
    /// This process's CPU time per Put: the service and its gRPC clients (for pgbench's rows,
    /// the service's handling of the change notifications of pgbench's writes).
    process_us: f64,
    /// Mean Puts per statement (the service's, from its counters); NaN for pgbench.
    puts_per_statement: f64,
}

impl Row {
    fn new(what: String, histogram: &Histogram<u64>) -> Self {
        Self {
            what,
            per_second: histogram.len() as f64 / PUT_SECONDS as f64,
            p99_ms: histogram.value_at_quantile(0.99) as f64 / 1000.0,
            postgres_us: f64::NAN,
            process_us: f64::NAN,
            puts_per_statement: f64::NAN,
        }
    }

    /// Records PostgreSQL's and this process's CPU time since `before` ([`cpu_now`]).
    fn with_cpu(mut self, before: (f64, f64)) -> Self {
        let puts = self.per_second * PUT_SECONDS as f64;
        let (postgres, process) = cpu_now();
        self.postgres_us = (postgres - before.0) * 1e6 / puts;
        self.process_us = (process - before.1) * 1e6 / puts;
        self
    }
}

/// CPU seconds so far of PostgreSQL (all its processes) and of this process.
fn cpu_now() -> (f64, f64) {
    (
        common::postgres_cpu_seconds(),
        common::cpu_seconds(std::process::id()),
    )
}

/// Client threads, as `pgbench -j 2`.
const CLIENT_THREADS: u32 = 2;

/// `clients` concurrent gRPC clients putting changing setpoints for `PUT_SECONDS`. Like pgbench
/// (`-j 2`), the clients run on two threads of their own, each one event loop, not on the
/// server's runtime.
async fn grpc_puts(addr: std::net::SocketAddr, clients: u32) -> Row {
    let statements = || {
        use thermostat::telemetry::{SETPOINT_WRITES, SETPOINT_WRITE_STATEMENTS};
        [SETPOINT_WRITES, SETPOINT_WRITE_STATEMENTS].map(|name| {
            thermostat::telemetry::render_metrics()
                .lines()
                .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0)
        })
    };
    let before = statements();
    let deadline = Instant::now() + Duration::from_secs(PUT_SECONDS);
    let threads: Vec<_> = (0..CLIENT_THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("client runtime")
                    .block_on(put_clients(
                        addr,
                        (t..clients).step_by(CLIENT_THREADS as usize),
                        deadline,
                    ))
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    for thread in threads {
        let histogram = tokio::task::spawn_blocking(move || thread.join().expect("client thread"))
            .await
            .expect("join");
        all.add(histogram).expect("merge");
    }
    let after = statements();
    let mut row = Row::new(format!("PutSetpoint via gRPC, {clients} clients"), &all);
    row.puts_per_statement = (after[0] - before[0]) / (after[1] - before[1]);
    row
}

/// The clients numbered `clients`, each on its own connection, until `deadline`.
async fn put_clients(
    addr: std::net::SocketAddr,
    clients: impl Iterator<Item = u32>,
    deadline: Instant,
) -> Histogram<u64> {
    let mut tasks = tokio::task::JoinSet::new();
    for c in clients {
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
                    request_id: Default::default(),
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
    all
}

/// What pgbench runs for a Put.
#[derive(Clone, Copy)]
enum Statement {
    /// `store::PUT_SQL` with one row.
    Service,
    /// [`ONE_ROW_PUT_SQL`].
    OneRow,
}

/// pgbench running `statement`, one Put a transaction, on connections set up like the service's
/// Put writers.
fn pgbench_puts(database_url: &str, clients: u32, statement: Statement) -> Row {
    let dir = tempfile::tempdir().expect("tempdir");
    let (script, label) = put_script(statement);
    let script_path = dir.path().join("put.sql");
    std::fs::write(&script_path, script).expect("script");
    let out = Command::new("pgbench")
        .env("PGOPTIONS", "-c plan_cache_mode=force_generic_plan")
        .args(["-D", "building=bench", "-D", "actor=pgbench"])
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
    let histogram = pgbench_latencies(dir.path());
    Row::new(
        format!("pgbench -M prepared, {label}, {clients} clients"),
        &histogram,
    )
}

/// pgbench's script for `statement`, values bound as the unauthenticated service binds them,
/// and the statement's name. pgbench cannot bind an empty string or a NULL, so those (and
/// `may_bind`) are written into the statement.
fn put_script(statement: Statement) -> (String, &'static str) {
    let (sql, label) = match statement {
        Statement::Service => (
            thermostat::store::PUT_SQL
                .replace("$1::text[]", "ARRAY['bench-' || :s]")
                .replace("$2::text[]", "ARRAY[:building::text]")
                .replace("$3::float8[]", "ARRAY[:d::float8 / 10]")
                .replace("$4::float8[]", "ARRAY[:delta::float8]")
                .replace("$5::float8[]", "ARRAY[:delta::float8]")
                .replace("$6::text[]", "ARRAY[:actor::text]")
                .replace("$7::text[]", "ARRAY['']")
                .replace("$8::int8[]", "ARRAY[NULL::int8]")
                .replace("$9::text[]", "ARRAY[NULL::text]")
                .replace("$10::bool[]", "ARRAY[true]")
                .replace("$11::text[]", "ARRAY[NULL::text]")
                .replace("$12::text[]", "ARRAY[NULL::text]")
                .replace("$13::text[]", "ARRAY[NULL::text]"),
            "service's statement",
        ),
        Statement::OneRow => (
            ONE_ROW_PUT_SQL
                .replace("$1", "('bench-' || :s)")
                .replace("$2", ":building::text")
                .replace("$3", ":d::float8 / 10")
                .replace("$4", ":delta::float8")
                .replace("$5", ":delta::float8")
                .replace("$6", ":actor::text")
                .replace("$7", "''")
                .replace("$8::int8", "NULL::int8")
                .replace("$9::text[]", "NULL::text[]"),
            "one-row statement",
        ),
    };
    assert!(!sql.contains('$'), "every parameter replaced: {sql}");
    let script = format!(
        "\\set s random(0, {})\n\\set d random(0, 299)\n\\set delta 0.5\n{};\n",
        SENSORS - 1,
        sql.trim()
    );
    (script, label)
}

/// The latencies (µs) pgbench logged with `-l` into `dir`.
fn pgbench_latencies(dir: &std::path::Path) -> Histogram<u64> {
    let mut histogram = Histogram::<u64>::new(3).expect("histogram");
    for entry in std::fs::read_dir(dir).expect("dir") {
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
    histogram
}

/// Starts the release binary on `database_url`, waits until its cache is loaded (health
/// SERVING), with `last_command` until it knows that sensor's last command (the command topic
/// is read in order, so that is the last one preloaded), and a few seconds more. Returns its
/// RSS and how long it took to be ready.
async fn service_rss(
    database_url: &str,
    names: &Names,
    last_command: Option<String>,
) -> (u64, Duration) {
    let started = Instant::now();
    let service = Service::spawn(database_url, names);
    service.wait_serving().await;
    if let Some(sensor) = last_command {
        service.wait_for_last_command(&sensor).await;
    }
    let ready = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let bytes = common::rss(service.pid());
    service.stop();
    (bytes, ready)
}

#[tokio::main]
async fn main() {
    let rows = put_runs().await;
    report_puts(&rows);
    if common::runs("memory") {
        memory().await;
    }
}

/// One benchmark 3 client count's repetitions: ours, pgbench with the service's statement,
/// pgbench with the one-row statement.
type PutRows = (Vec<Row>, Vec<Row>, Vec<Row>);

/// Benchmark 3, PutSetpoint against pgbench: the repetitions at each client count.
async fn put_runs() -> Vec<PutRows> {
    let names = Names::new("benchput");
    common::create_topics(&names, 3).await;
    let put_db = common::fresh_database("bench_put").await;
    let app = Application::build(common::config(put_db.clone(), &names))
        .await
        .expect("service");
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    let served = tokio::spawn(app.run_until_stopped(stop.clone()));
    let mut rows = Vec::new();
    for clients in [8, 32].into_iter().filter(|_| common::runs("put")) {
        let (mut ours, mut service_sql, mut one_row_sql) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..PUT_REPS {
            // Every other repetition in reverse order: the table and its indexes grow through
            // the runs, and a fixed order would hand that drift to whichever runs last.
            let mut order = [None, Some(Statement::Service), Some(Statement::OneRow)];
            if rep % 2 == 1 {
                order.reverse();
            }
            for subject in order {
                let before = cpu_now();
                match subject {
                    None => ours.push(grpc_puts(addr, clients).await.with_cpu(before)),
                    Some(statement) => {
                        let url = put_db.clone();
                        let row = tokio::task::spawn_blocking(move || {
                            pgbench_puts(&url, clients, statement)
                        })
                        .await
                        .expect("pgbench")
                        .with_cpu(before);
                        match statement {
                            Statement::Service => service_sql.push(row),
                            Statement::OneRow => one_row_sql.push(row),
                        }
                    }
                }
            }
        }
        rows.push((ours, service_sql, one_row_sql));
    }
    stop.cancel();
    let _ = served.await;
    rows
}

/// Benchmark 3's table and summary lines.
fn report_puts(rows: &[PutRows]) {
    println!("\n### 3. PutSetpoint against pgbench, {PUT_SECONDS} s per run, {PUT_REPS} repetitions alternated\n");
    println!("| benchmark | per second (median) | p99 ms (median) | PostgreSQL CPU µs/Put (median) | service and clients CPU µs/Put (median) | Puts per statement (median) | pgbench with the service's statement: per second / p99 ms / PostgreSQL CPU µs/Put / service CPU µs/Put | pgbench with the one-row statement: per second / p99 ms / PostgreSQL CPU µs/Put / service CPU µs/Put | ratio to pgbench with the service's statement | goal | ratio to pgbench with the one-row statement | repetitions per second (ours / service's statement / one-row) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let per_second = |rows: &[Row]| median_by(rows, |r| r.per_second);
    let p99 = |rows: &[Row]| median_by(rows, |r| r.p99_ms);
    let postgres = |rows: &[Row]| median_by(rows, |r| r.postgres_us);
    let process = |rows: &[Row]| median_by(rows, |r| r.process_us);
    let cells = |rows: &[Row]| {
        format!(
            "{:.0} / {:.2} / {:.0} / {:.0}",
            per_second(rows),
            p99(rows),
            postgres(rows),
            process(rows)
        )
    };
    for (ours, service_sql, one_row_sql) in rows {
        // The goal is against "the exact statement the service issues" (issue 4); the one-row
        // statement the service issued before it wrote Puts together is shown beside it.
        let base = service_sql;
        let ratio = per_second(ours) / per_second(base);
        let one_row_ratio = per_second(ours) / per_second(one_row_sql);
        let reps: Vec<String> = (0..ours.len())
            .map(|i| {
                format!(
                    "{:.0} / {:.0} / {:.0}",
                    ours[i].per_second, service_sql[i].per_second, one_row_sql[i].per_second
                )
            })
            .collect();
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.0} | {:.1} | {} | {} | {:.2}x | >= 0.8x: {} | {:.2}x | {} |",
            ours[0].what,
            per_second(ours),
            p99(ours),
            postgres(ours),
            process(ours),
            median_by(ours, |r| r.puts_per_statement),
            cells(service_sql),
            cells(one_row_sql),
            ratio,
            verdict(ratio >= 0.8),
            one_row_ratio,
            reps.join(", ")
        );
        common::summary([
            "3",
            &format!(
                "PutSetpoint, {} (p99 {:.1} ms; pgbench {:.1} ms)",
                ours[0].what.rsplit(", ").next().unwrap_or_default(),
                p99(ours),
                p99(base)
            ),
            &format!("{:.0}/s", per_second(ours)),
            &format!(
                "{:.0}/s pgbench, {}",
                per_second(base),
                base[0].what.split(", ").nth(1).unwrap_or_default()
            ),
            &format!("{ratio:.2}x ({one_row_ratio:.2}x the one-row statement)"),
            &format!(">= 0.8x: {}", verdict(ratio >= 0.8)),
        ]);
    }
}

/// Benchmark 5, memory per cached sensor.
async fn memory() {
    let names = Names::new("benchmem");
    common::create_topics(&names, 3).await;
    let empty = common::fresh_database("bench_mem_empty").await;
    let (baseline, _) = service_rss(&empty, &names, None).await;
    println!("\n### 5. Memory\n");
    println!("| benchmark | RSS | baseline (same binary, 0 setpoints) | resident bytes per cached sensor | ready after start | goal |");
    println!("|---|---|---|---|---|---|");
    for sensors in MEMORY_SENSORS {
        let full = common::fresh_database(&format!("bench_mem_{sensors}")).await;
        common::seed_setpoints(&full, sensors).await;
        let loaded = service_rss(&full, &names, None).await;
        let commanded_names = Names::new(&format!("benchmemcmd{sensors}"));
        common::create_topics(&commanded_names, 1).await;
        let last = preload_commands(&commanded_names.commands, sensors).await;
        let commanded = service_rss(&full, &commanded_names, Some(last)).await;
        // The goals are set for 1M sensors; smaller caches show how the cost grows.
        let goals = sensors == 1_000_000;
        for (what, (rss, ready)) in [
            (format!("{sensors} setpoints cached"), loaded),
            (
                format!("{sensors} setpoints cached, each sensor with its last command"),
                commanded,
            ),
        ] {
            let per_sensor = rss.saturating_sub(baseline) as f64 / f64::from(sensors);
            let total_ok = rss as f64 <= 200e6;
            let per_sensor_ok = per_sensor <= 100.0;
            let goal_of = |goal: &str, ok: bool| {
                if goals {
                    format!("{goal}: {}", verdict(ok))
                } else {
                    "none: the growth".to_owned()
                }
            };
            let (total_goal, per_sensor_goal) = (
                goal_of("<= 200 MB", total_ok),
                goal_of("<= 100 B", per_sensor_ok),
            );
            let goal = if goals {
                format!("{total_goal}; {per_sensor_goal}")
            } else {
                String::new()
            };
            println!(
                "| {what} | {:.0} MB | {:.0} MB | {per_sensor:.0} B | {:.1} s | {goal} |",
                rss as f64 / 1e6,
                baseline as f64 / 1e6,
                ready.as_secs_f64(),
            );
            common::summary([
                "5",
                &format!("RSS, {what}"),
                &format!("{:.0} MB", rss as f64 / 1e6),
                &format!("{:.0} MB with none", baseline as f64 / 1e6),
                "",
                &total_goal,
            ]);
            common::summary([
                "5",
                &format!("resident bytes per cached sensor, {what}"),
                &format!("{per_sensor:.0} B"),
                "",
                "",
                &per_sensor_goal,
            ]);
        }
    }
}

/// Writes one command event for each sensor `1..=count` of `common::seed_setpoints` to
/// partition 0 of `topic`, as the service would have written them; returns the last sensor's
/// id.
async fn preload_commands(topic: &str, count: u32) -> String {
    // Batched, unlike the service's producer (`KafkaConfig::kafka_batch_num_messages`): only the
    // service's follower reads this topic, from its beginning, so every fetch starts at a batch.
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::brokers())
        .set("batch.num.messages", "10000")
        .set("linger.ms", "20")
        .create()
        .expect("producer");
    let mut pending = FuturesUnordered::new();
    let decided = prost_types::Timestamp {
        seconds: 1_800_000_000,
        nanos: 123_456_789,
    };
    let mut last = String::new();
    for i in 1..=count {
        last = common::sensor_id(i);
        let event = pb::HeaterCommandEvent {
            sensor_id: last.clone(),
            building_id: format!("building-{}", i / 1000),
            command: pb::HeaterCommand::On.into(),
            reason: pb::CommandReason::TooCold.into(),
            setpoint_revision: 1,
            // Distinct values, as real readings would be.
            temperature_celsius: Some(15.0 + f64::from(i % 1000) / 1000.0),
            reading_time: Some(prost_types::Timestamp {
                seconds: decided.seconds - 1,
                nanos: (i % 1_000_000_000) as i32,
            }),
            decided_at: Some(decided),
            sequence: 1,
            snapshot: false,
            setpoint_level: pb::SetpointLevel::Default.into(),
            level_revision: 1,
            limit: 0,
            switched_at: Some(decided),
            trace_parent: String::new(),
        };
        let payload = event.encode_to_vec();
        let headers = OwnedHeaders::new().insert(Header {
            key: thermostat::stream::output::READING_PARTITION_HEADER,
            value: Some("0"),
        });
        let record = FutureRecord::to(topic)
            .partition(0)
            .key(last.as_bytes())
            .payload(payload.as_slice())
            .headers(headers);
        common::send(&producer, record, &mut pending).await;
    }
    while let Some(done) = pending.next().await {
        done.expect("producer").expect("delivered");
    }
    last
}
