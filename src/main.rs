//! The `thermostat` binary: parses configuration and hands it to the library.

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use thermostat::config::{Cli, Command};
use thermostat::store::Store;
use thermostat::{telemetry, Application};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(&cli.log).map_err(|e| anyhow::anyhow!("RUST_LOG/LOG_FORMAT: {e}"))?;
    match cli.command {
        Command::Migrate(database) => {
            let store = Store::connect_lazy(&database).context("DATABASE_URL")?;
            store.migrate().await.context("applying migrations")?;
            tracing::info!("migrations applied");
        }
        Command::Serve(config) => {
            let app = Application::build(config).await?;
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            app.run_until_stopped(shutdown).await?;
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
