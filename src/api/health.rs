//! The standard `grpc.health.v1.Health` service, driven by what the service can actually do:
//! SERVING only while the database answers, and for `HeaterControlService` only while the
//! broker does too and the replica is not held up reading the command topic after a rebalance.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::store::Store;
use crate::stream::ControlHandle;

/// The service that needs the broker as well as the database: subscriptions get their commands
/// from the command topic, and no heater is controlled while the broker cannot be reached
/// (`GetSensorState` still answers from the cache).
const HEATERS: &str = "thermostat.v1.HeaterControlService";

/// The names that follow the database alone: "" (the whole server, which Kubernetes'
/// readiness asks for: a replica that cannot reach the broker still serves the setpoint API,
/// and every replica would lose the broker at once) and the setpoint API.
const DATABASE_ONLY: &[&str] = &["", "thermostat.v1.SetpointService"];

/// The name Kubernetes' liveness probe asks for: SERVING as long as the process serves gRPC,
/// whatever the state of PostgreSQL or Kafka (restarting would not fix them).
pub const LIVENESS: &str = "liveness";

/// For operators, not probes: NOT_SERVING while a sensor partition has records behind and the
/// group has committed no progress on it for a minute, whichever replica should consume it.
pub const SENSOR_PARTITIONS: &str = "sensor-partitions";

/// Sets every name but [`LIVENESS`] to `status`.
pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for name in DATABASE_ONLY.iter().chain([&HEATERS, &SENSOR_PARTITIONS]) {
        reporter.set_service_status(*name, status).await;
    }
}

fn serving(up: bool) -> ServingStatus {
    if up {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    }
}

/// Probes the database and the broker every `interval` and reports the result, until
/// `shutdown`; then reports NOT_SERVING so that load balancers stop sending new calls before
/// the server stops.
pub async fn monitor(
    reporter: HealthReporter,
    store: Store,
    control: ControlHandle,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let timeout = interval.max(Duration::from_secs(1));
    let probe_broker = || {
        let control = control.clone();
        tokio::spawn(async move { control.broker_reachable(timeout).await })
    };
    // The broker is probed alongside, not in turn: a broker that does not answer must not
    // hold back the database's status. Its first answer is awaited, later ones are taken when
    // they come.
    let mut broker_probe = probe_broker();
    // The last answer; `None` until the first.
    let mut broker_answer = None;
    let mut last = None;
    loop {
        let database = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            up = store.ping(timeout) => up,
        };
        if broker_answer.is_none() || broker_probe.is_finished() {
            let reachable = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                reachable = &mut broker_probe => reachable.unwrap_or(false),
            };
            broker_answer = Some(reachable);
            broker_probe = probe_broker();
        }
        let broker = broker_answer.unwrap_or(false);
        // A replica that cannot read the command topic to its end decides for none of the
        // partitions it was given.
        let heaters = database && broker && !control.catching_up();
        let partitions = control.stalled_partitions() == 0;
        metrics::gauge!(crate::telemetry::BROKER_REACHABLE).set(f64::from(u8::from(broker)));
        let pool = store.pool();
        let idle = pool.num_idle() as f64;
        metrics::gauge!(crate::telemetry::DB_POOL, "state" => "idle").set(idle);
        metrics::gauge!(crate::telemetry::DB_POOL, "state" => "in_use")
            .set(f64::from(pool.size()) - idle);
        metrics::gauge!(crate::telemetry::SETPOINT_WRITES_WAITING).set(store.puts_waiting() as f64);
        // Once shutting down, NOT_SERVING (set by the server) must not be overwritten.
        if last != Some((database, heaters, partitions)) && !shutdown.is_cancelled() {
            tracing::info!(database, broker, heaters, partitions, "health changed");
            for name in DATABASE_ONLY {
                reporter.set_service_status(*name, serving(database)).await;
            }
            reporter.set_service_status(HEATERS, serving(heaters)).await;
            reporter
                .set_service_status(SENSOR_PARTITIONS, serving(partitions))
                .await;
            last = Some((database, heaters, partitions));
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    broker_probe.abort();
    set_all(&reporter, ServingStatus::NotServing).await;
}
