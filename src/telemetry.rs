//! Logs, metrics and the wiring of traces. Logging: `tracing` with a text or JSON formatter and
//! an EnvFilter. Metrics: the `metrics` facade with a Prometheus recorder, served by `admin` on
//! `/metrics`. Every metric is named and described here, so call sites cannot misspell one.
//! Traces (`crate::traces`) are a second `tracing` layer with its own filter.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{fmt, EnvFilter, Layer as _};

use crate::config::{LogConfig, LogFormat, TraceConfig};

pub const READINGS: &str = "thermostat_readings_consumed_total";
pub const READINGS_OUT_OF_ORDER: &str = "thermostat_readings_out_of_order_total";
pub const READINGS_UNTRACKED: &str = "thermostat_readings_untracked_total";
pub const COMMANDS: &str = "thermostat_commands_emitted_total";
pub const DEAD_LETTERS: &str = "thermostat_dead_letters_total";
pub const DECISION_LATENCY: &str = "thermostat_decision_latency_seconds";
pub const CONSUMER_LAG: &str = "thermostat_consumer_lag_records";
pub const GROUP_LAG: &str = "thermostat_group_lag_records";
pub const CACHED_SENSORS: &str = "thermostat_cached_sensors";
pub const CACHED_SETPOINTS: &str = "thermostat_cached_setpoints";
pub const SETPOINTS_OUT_OF_REACH: &str = "thermostat_setpoints_out_of_reach";
pub const RESYNC_AGE: &str = "thermostat_setpoint_resync_age_seconds";
pub const SUBSCRIBERS: &str = "thermostat_subscribers";
pub const SUBSCRIBERS_BEHIND: &str = "thermostat_subscribers_fell_behind_total";
pub const SUBSCRIBER_EVENTS: &str = "thermostat_subscriber_events_sent_total";
pub const SNAPSHOT_EXAMINED: &str = "thermostat_snapshot_sensors_examined_total";
pub const RPCS: &str = "thermostat_grpc_requests_total";
pub const RPC_LATENCY: &str = "thermostat_grpc_request_duration_seconds";
pub const DB_POOL: &str = "thermostat_db_pool_connections";
pub const BROKER_REACHABLE: &str = "thermostat_broker_reachable";
pub const SETPOINT_WRITES: &str = "thermostat_setpoint_writes_total";
pub const SETPOINT_WRITE_STATEMENTS: &str = "thermostat_setpoint_write_statements_total";
pub const SETPOINT_WRITES_WAITING: &str = "thermostat_setpoint_writes_waiting";
pub const TLS_HANDSHAKE_FAILURES: &str = "thermostat_tls_handshake_failures_total";
pub const CONNECTIONS_REFUSED: &str = "thermostat_connections_refused_total";
pub const AUTH_FAILURES: &str = "thermostat_auth_failures_total";
pub const RATE_LIMITED: &str = "thermostat_rate_limited_total";
pub const CREDENTIALS_STALE: &str = "thermostat_credentials_stale";
pub const LEVEL_CHANGES: &str = "thermostat_level_changes_total";
pub const LEVEL_UPKEEP_FAILURES: &str = "thermostat_level_upkeep_failures_total";
pub const HEATERS_NOT_FOLLOWING: &str = "thermostat_heaters_not_following";
pub const HEATERS_NOT_FOLLOWING_TOTAL: &str = "thermostat_heaters_stopped_following_total";

/// Histogram buckets (seconds) for latencies from 10 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// What `init` installed that must be flushed before the process exits.
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still queued (the exporter waits for the collector, a few seconds at
    /// most).
    pub async fn shutdown(self) {
        if let Some(provider) = self.traces {
            let flushed = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(error = %e, "traces not all exported at exit");
            }
        }
    }
}

/// Installs the global subscriber: logs filtered by `RUST_LOG`, and traces, when on, of this
/// crate's spans at info level whatever `RUST_LOG` says. Call once, from `main`, in the runtime.
pub fn init(
    config: &LogConfig,
    traces: &TraceConfig,
) -> Result<Telemetry, Box<dyn std::error::Error + Send + Sync>> {
    let filter = EnvFilter::try_new(&config.log_filter)?;
    let logs = match config.log_format {
        LogFormat::Text => fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let provider = crate::traces::provider(traces)?;
    let spans = provider.as_ref().map(|provider| {
        crate::traces::layer(provider)
            .with_filter(Targets::new().with_target("thermostat", LevelFilter::INFO))
    });
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init()?;
    Ok(Telemetry { traces: provider })
}

/// The process-wide Prometheus recorder, installed on first use. A process has one recorder,
/// so several services in one process (tests) share their metrics.
pub fn metrics() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new();
        let builder = match builder.set_buckets(LATENCY_BUCKETS) {
            Ok(b) => b,
            Err(_) => PrometheusBuilder::new(),
        };
        let handle = match builder.install_recorder() {
            Ok(handle) => handle,
            // Another recorder is installed (embedding): ours is then not fed.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        };
        describe();
        handle
    })
}

/// One line per metric: a table, long because the metrics are many.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(READINGS, "Sensor readings decoded and applied");
    describe_gauge!(
        HEATERS_NOT_FOLLOWING,
        "Heaters reporting another state than commanded past REPORT_TIMEOUT (every replica counts all)"
    );
    describe_counter!(
        HEATERS_NOT_FOLLOWING_TOTAL,
        "Times a heater was found not following its command"
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "TLS handshakes that failed or timed out on the gRPC port"
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed as soon as accepted because their port was at its cap, by port"
    );
    describe_counter!(
        AUTH_FAILURES,
        "Calls refused as unauthenticated or not permitted, by code"
    );
    describe_counter!(
        RATE_LIMITED,
        "Calls refused by a per-identity limit, by limit"
    );
    describe_counter!(
        READINGS_OUT_OF_ORDER,
        "Readings ignored as older than the newest applied"
    );
    describe_counter!(
        READINGS_UNTRACKED,
        "Readings of sensors not cached, not remembered because the cache is at SENSOR_CACHE_LIMIT"
    );
    describe_counter!(COMMANDS, "Heater commands decided, by command and reason");
    describe_counter!(
        DEAD_LETTERS,
        "Sensor records moved to the dead-letter topic, by reason"
    );
    describe_histogram!(
        DECISION_LATENCY,
        Unit::Seconds,
        "From a reading's arrival to its decision"
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Records behind the end of each assigned sensor partition"
    );
    describe_gauge!(
        GROUP_LAG,
        "Records behind the consumer group's committed offset on each sensor partition, assigned to this replica or not"
    );
    describe_gauge!(CACHED_SENSORS, "Sensors the loop keeps state for");
    describe_gauge!(CACHED_SETPOINTS, "Setpoints in the cache");
    describe_gauge!(
        SETPOINTS_OUT_OF_REACH,
        "Setpoints, at the last full read, whose band lies outside READING_RANGE_CELSIUS"
    );
    describe_gauge!(
        RESYNC_AGE,
        Unit::Seconds,
        "Time since the last full setpoint resync"
    );
    describe_gauge!(SUBSCRIBERS, "Open SubscribeHeaterCommands streams");
    describe_counter!(
        SUBSCRIBER_EVENTS,
        "Command events handed to subscribers' streams, snapshots and catch-ups included"
    );
    describe_counter!(
        SNAPSHOT_EXAMINED,
        "Cached sensors looked at to answer subscribers' snapshots and catch-ups"
    );
    describe_counter!(
        SUBSCRIBERS_BEHIND,
        "Subscribers that fell more than SUBSCRIBER_BUFFER commands behind, by outcome"
    );
    describe_counter!(RPCS, "gRPC calls by method and status code");
    describe_histogram!(
        RPC_LATENCY,
        Unit::Seconds,
        "gRPC call duration until the response starts"
    );
    describe_gauge!(DB_POOL, "Database pool connections by state");
    describe_gauge!(
        BROKER_REACHABLE,
        "1 while a broker describes the command topic with a leader for every partition, at the last health check"
    );
    describe_gauge!(
        CREDENTIALS_STALE,
        "1 while a credential file (TLS certificate, JWKS, static identities) cannot be read or does not load, so the previous version is still in use"
    );
    describe_counter!(
        LEVEL_CHANGES,
        "Priority levels this replica changed on its own: expiries and schedule transitions, by kind"
    );
    describe_counter!(
        LEVEL_UPKEEP_FAILURES,
        "Passes of the expiry or schedule upkeep that failed (the next one tries again), by kind"
    );
    describe_counter!(SETPOINT_WRITES, "Puts sent to the database");
    describe_counter!(
        SETPOINT_WRITE_STATEMENTS,
        "Statements the Puts were written in (several Puts share one under load)"
    );
    describe_gauge!(
        SETPOINT_WRITES_WAITING,
        "Puts queued for a writer, at the last health check"
    );
}

/// Unix time of the last full setpoint resync; 0 before the first.
static LAST_RESYNC: AtomicI64 = AtomicI64::new(0);

pub fn record_resync() {
    LAST_RESYNC.store(chrono::Utc::now().timestamp(), Ordering::Relaxed);
}

/// Lets through at most one log line per period of a kind that callers cause at will (failed
/// authentication), and counts the ones it holds back so that the next line can say how many.
pub struct LogSampler {
    lines: governor::DefaultDirectRateLimiter,
    held_back: AtomicU64,
}

impl LogSampler {
    pub fn every(period: Duration) -> Self {
        let quota = governor::Quota::with_period(period)
            .unwrap_or_else(|| governor::Quota::per_second(std::num::NonZeroU32::MIN));
        Self {
            lines: governor::RateLimiter::direct(quota),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)`: log this one, and say that `n` were held back since the last; `None`: don't.
    pub fn admit(&self) -> Option<u64> {
        if self.lines.check().is_ok() {
            Some(self.held_back.swap(0, Ordering::Relaxed))
        } else {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// How often recorded histogram samples are folded into their buckets between scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets every few seconds until `stop`. The
/// recorder keeps each sample until upkeep runs, and without this task only a scrape runs it:
/// a service nobody scrapes grew by 8 bytes or more per reading (the decision-latency
/// histogram), without bound.
pub async fn upkeep(stop: CancellationToken) {
    let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => metrics().run_upkeep(),
        }
    }
}

/// Counts kept where they happen and read at each scrape, as a Prometheus collector is: a
/// count is kept once, and its owner can read its exact total (the stopped log line does).
pub trait Counts: Send + Sync {
    fn counts(&self, out: &mut Vec<Count>);
}

/// One counter's total, with its labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Count {
    name: &'static str,
    labels: Vec<(&'static str, &'static str)>,
    total: u64,
}

impl Count {
    pub fn new(name: &'static str, total: u64) -> Self {
        Self {
            name,
            labels: Vec::new(),
            total,
        }
    }

    pub fn label(mut self, key: &'static str, value: &'static str) -> Self {
        self.labels.push((key, value));
        self
    }
}

type Sources = Mutex<Vec<Arc<dyn Counts>>>;

fn sources() -> &'static Sources {
    static SOURCES: OnceLock<Sources> = OnceLock::new();
    SOURCES.get_or_init(Sources::default)
}

/// Exports `source`'s counts from now on. Several sources (services in one process: tests) add
/// up, and one that stopped stays counted, as a process-wide counter's increments would.
pub fn export_counts(source: &Arc<impl Counts + 'static>) {
    if let Ok(mut sources) = sources().lock() {
        sources.push(source.clone());
    }
}

/// Sets every exported counter to the sum of its sources' totals.
fn collect() {
    let mut counts = Vec::new();
    if let Ok(sources) = sources().lock() {
        for source in sources.iter() {
            source.counts(&mut counts);
        }
    }
    let mut totals: BTreeMap<_, u64> = BTreeMap::new();
    for Count {
        name,
        labels,
        total,
    } in counts
    {
        *totals.entry((name, labels)).or_default() += total;
    }
    for ((name, labels), total) in totals {
        let labels: Vec<metrics::Label> = labels
            .into_iter()
            .map(|(k, v)| metrics::Label::new(k, v))
            .collect();
        metrics::counter!(name, labels).absolute(total);
    }
}

/// The Prometheus text for a scrape.
pub fn render_metrics() -> String {
    let handle = metrics();
    collect();
    let last = LAST_RESYNC.load(Ordering::Relaxed);
    if last > 0 {
        let age = chrono::Utc::now().timestamp().saturating_sub(last);
        metrics::gauge!(RESYNC_AGE).set(age as f64);
    }
    handle.run_upkeep();
    handle.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_sampler_lets_one_line_through_per_period_and_counts_the_rest() {
        let sampler = LogSampler::every(Duration::from_millis(200));
        assert_eq!(sampler.admit(), Some(0));
        for _ in 0..99 {
            assert_eq!(sampler.admit(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(sampler.admit(), Some(99));
        assert_eq!(sampler.admit(), None);
    }
}
