//! The standard `grpc.health.v1.Health` service, driven by what the service can actually do:
//! SERVING only while the database answers.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::store::Store;

/// The names health is reported for: "" (the whole server) and each of our services.
pub const SERVICE_NAMES: &[&str] = &[
    "",
    "thermostat.v1.SetpointService",
    "thermostat.v1.HeaterControlService",
];

/// The name Kubernetes' liveness probe asks for: SERVING as long as the process serves gRPC,
/// whatever the state of PostgreSQL or Kafka (restarting would not fix them).
pub const LIVENESS: &str = "liveness";

/// Sets every name in [`SERVICE_NAMES`] to `status`.
pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICE_NAMES {
        reporter.set_service_status(*name, status).await;
    }
}

/// Probes the database every `interval` and reports the result, until `shutdown`; then reports
/// NOT_SERVING so that load balancers stop sending new calls before the server stops.
pub async fn monitor_database(
    reporter: HealthReporter,
    store: Store,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut last = None;
    loop {
        let status = if store.ping(interval.max(Duration::from_secs(1))).await {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        let pool = store.pool();
        let idle = pool.num_idle() as f64;
        metrics::gauge!(crate::telemetry::DB_POOL, "state" => "idle").set(idle);
        metrics::gauge!(crate::telemetry::DB_POOL, "state" => "in_use")
            .set(f64::from(pool.size()) - idle);
        metrics::gauge!(crate::telemetry::SETPOINT_WRITES_WAITING).set(store.puts_waiting() as f64);
        if last != Some(status) {
            tracing::info!(?status, "health changed");
            set_all(&reporter, status).await;
            last = Some(status);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
    }
    set_all(&reporter, ServingStatus::NotServing).await;
}
