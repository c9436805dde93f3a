//! The `thermostat` binary: parses configuration and hands it to the library, or to the
//! simulated building and the demo, which are tools of the binary, not part of the service.

mod demo;
mod sim;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use thermostat::config::{
    CreateTopicsConfig, DatabaseConfig, LogConfig, SendReadingConfig, ServeConfig, TraceConfig,
};
use thermostat::domain::SensorId;
use thermostat::store::Store;
use thermostat::stream;
use thermostat::{telemetry, Application};

#[derive(Debug, Parser)]
#[command(
    name = "thermostat",
    version,
    about = "Keeps buildings at the temperature their operators ask for"
)]
struct Cli {
    #[command(flatten)]
    log: LogConfig,
    #[command(flatten)]
    traces: TraceConfig,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gRPC service (applies pending migrations first).
    Serve(ServeConfig),
    /// Apply pending database migrations and exit.
    Migrate(DatabaseConfig),
    /// Create the sensor, command and dead-letter topics (existing ones are kept).
    CreateTopics(CreateTopicsConfig),
    /// Produce one sensor reading to the sensor topic, as a building gateway would.
    SendReading(SendReadingConfig),
    /// Run a simulated building whose thermostat is the service.
    Simulate(sim::SimConfig),
    /// The service and a simulated building in one process (the main job).
    Demo(demo::DemoConfig),
}

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")?;
    let result = runtime.block_on(run());
    // A blocking Kafka call (metadata, watermarks: up to 10 s against a broker that does not
    // answer) can still be running when a start is given up on SIGTERM; the process exits
    // without waiting for it. Everything else has finished by now.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}

async fn run() -> anyhow::Result<()> {
    // As `Cli::parse`, keeping the matches: the demo asks which options were given.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)
        .map_err(|e| e.format(&mut Cli::command()))
        .unwrap_or_else(|e| e.exit());
    let telemetry = telemetry::init(&cli.log, &cli.traces)
        .map_err(|e| anyhow::anyhow!("logs and traces (RUST_LOG, LOG_FORMAT, OTEL_*): {e}"))?;
    let result = dispatch(cli.command, &matches).await;
    telemetry.shutdown().await;
    result
}

async fn dispatch(command: Command, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    match command {
        Command::Migrate(database) => {
            let store = Store::connect_lazy(&database).context("DATABASE_URL")?;
            store.migrate().await.context("applying migrations")?;
            tracing::info!("migrations applied");
        }
        Command::CreateTopics(c) => {
            let created = stream::topics::create_topics(&c.kafka, c.partitions, c.replication)
                .await
                .context("creating topics")?;
            tracing::info!(?created, "topics ready");
        }
        Command::SendReading(c) => {
            let sensor = SensorId::parse(c.sensor_id)?;
            let time = c.reading_time.unwrap_or_else(chrono::Utc::now);
            let traceparent = c.traceparent.as_deref();
            stream::topics::send_reading(
                &c.kafka,
                &sensor,
                c.temperature_celsius,
                time,
                traceparent,
            )
            .await
            .context("sending the reading")?;
            tracing::info!(%sensor, celsius = c.temperature_celsius, %time, "reading sent");
        }
        Command::Simulate(config) => {
            let summary = sim::run(config, shutdown).await?;
            tracing::info!(
                readings = summary.readings_sent,
                commands = summary.commands_applied,
                reports = summary.reports_sent,
                "simulation finished"
            );
        }
        Command::Demo(mut config) => {
            if let Some(given) = matches.subcommand_matches("demo") {
                config.given = demo::Given::of(given);
            }
            demo::run(config, shutdown).await?;
        }
        Command::Serve(config) => {
            if let Some(app) = Application::build_until(config, &shutdown).await? {
                app.run_until_stopped(shutdown).await?;
            }
        }
    }
    Ok(())
}

/// Cancels `token` on SIGINT or SIGTERM (Kubernetes sends SIGTERM).
async fn cancel_on_signal(token: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    tracing::info!("signal received");
    token.cancel();
}

#[cfg(test)]
mod tests {
    #[test]
    fn clap_definition_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
