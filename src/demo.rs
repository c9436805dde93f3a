//! `thermostat demo`: the service and a simulated building in one process — the main job. The
//! broker is `KAFKA_BROKERS`, or with `--embedded-broker` librdkafka's in-process mock cluster,
//! so a newcomer without Tansu is running in minutes.

use rdkafka::mocking::MockCluster;
use tokio_util::sync::CancellationToken;

use crate::config::ServeConfig;
use crate::sim::{self, BuildingConfig, SimConfig};
use crate::startup::{error_chain, Application};
use crate::stream::admin::create_topics;

/// Partitions of the demo's topics.
const PARTITIONS: i32 = 3;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoConfig {
    #[command(flatten)]
    pub serve: ServeConfig,
    #[command(flatten)]
    pub building: BuildingConfig,
    /// Run an in-process mock Kafka cluster instead of connecting to KAFKA_BROKERS.
    #[arg(long, env = "DEMO_EMBEDDED_BROKER")]
    pub embedded_broker: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("embedded broker")]
    Broker(#[source] rdkafka::error::KafkaError),
    #[error("topics")]
    Topics(#[from] crate::stream::StreamError),
    #[error("service")]
    Service(#[from] crate::StartupError),
    #[error("simulator")]
    Simulator(#[from] sim::SimError),
}

/// Runs until `shutdown` (or the simulation's duration), then stops the service gracefully.
pub async fn run(mut config: DemoConfig, shutdown: CancellationToken) -> Result<(), DemoError> {
    // Kept alive until the end: dropping it stops the mock brokers.
    let _mock = if config.embedded_broker {
        let mock = MockCluster::new(1).map_err(DemoError::Broker)?;
        let kafka = &config.serve.kafka;
        for (topic, partitions) in [
            (&kafka.sensor_topic, PARTITIONS),
            (&kafka.command_topic, PARTITIONS),
            (&kafka.dead_letter_topic, 1),
        ] {
            mock.create_topic(topic, partitions, 1)
                .map_err(DemoError::Broker)?;
        }
        config.serve.kafka.kafka_brokers = mock.bootstrap_servers();
        tracing::info!(brokers = %config.serve.kafka.kafka_brokers, "embedded mock Kafka cluster");
        Some(mock)
    } else {
        create_topics(&config.serve.kafka, PARTITIONS, 1).await?;
        None
    };
    let kafka = config.serve.kafka.clone();
    let app = Application::build(config.serve).await?;
    let mut building = config.building;
    building.api_addr = Some(app.local_addr().to_string());
    print_examples(
        &app.local_addr().to_string(),
        &kafka.kafka_brokers,
        &building,
    );
    let service_stop = CancellationToken::new();
    let service = tokio::spawn(app.run_until_stopped(service_stop.clone()));

    let simulated = sim::run(SimConfig { kafka, building }, shutdown).await;
    service_stop.cancel();
    match service.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %error_chain(&e), "service stopped with an error"),
        Err(e) => tracing::error!(error = %e, "service task failed"),
    }
    let summary = simulated?;
    tracing::info!(
        readings = summary.readings_sent,
        commands = summary.commands_applied,
        "demo finished"
    );
    Ok(())
}

/// What to try while the demo runs, with the addresses of this run.
fn print_examples(grpc: &str, brokers: &str, building: &BuildingConfig) {
    let room = format!("{}/room-00", building.building_id);
    let plot = building.plot.as_ref().map_or_else(
        || "(no plot: set SIM_PLOT)".to_owned(),
        |p| p.display().to_string(),
    );
    println!(
        r#"
thermostat is the thermostat of a simulated building of {rooms} rooms ("{building_id}").
  gRPC:   {grpc}
  broker: {brokers}
  plot:   {plot} (rewritten every 30 s and at the end)

In another terminal:
  grpcurl -plaintext {grpc} list
  grpcurl -plaintext -d '{{"buildingId": "{building_id}"}}' {grpc} thermostat.v1.SetpointService/ListSetpoints
  grpcurl -plaintext -d '{{"sendInitialState": true, "buildingId": "{building_id}"}}' {grpc} thermostat.v1.HeaterControlService/SubscribeHeaterCommands
Change a setpoint and watch that room's heater react (and the plot):
  grpcurl -plaintext -d '{{"setpoint": {{"sensorId": "{room}", "buildingId": "{building_id}", "desiredCelsius": 24, "upDeltaCelsius": 0.5, "downDeltaCelsius": 0.5}}}}' {grpc} thermostat.v1.SetpointService/PutSetpoint
  grpcurl -plaintext -d '{{"sensorId": "{room}"}}' {grpc} thermostat.v1.HeaterControlService/GetSensorState
Send a reading by hand:
  KAFKA_BROKERS={brokers} target/release/thermostat send-reading {building_id}/room-01 15.0
Ctrl-C stops the demo and writes the plot.
"#,
        rooms = building.rooms,
        building_id = building.building_id,
    );
}
