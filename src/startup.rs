//! Wires configuration, storage and the gRPC server into a running [`Application`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tower_http::trace::TraceLayer;

use crate::api::{self, health, SetpointApi};
use crate::config::ServeConfig;
use crate::proto::v1::setpoint_service_server::SetpointServiceServer;
use crate::store::Store;

/// HTTP/2 keepalive: detects vanished clients (and their streams) within about 30 s.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid DATABASE_URL")]
    DatabaseUrl(#[source] sqlx::Error),
    #[error("applying database migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("binding the gRPC address {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("building the reflection service")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server failed")]
    Serve(#[from] tonic::transport::Error),
    #[error("background task {0} stopped unexpectedly")]
    TaskDied(&'static str),
}

/// The service, built and bound but not yet serving.
pub struct Application {
    config: ServeConfig,
    store: Store,
    incoming: TcpIncoming,
    local_addr: SocketAddr,
}

impl Application {
    /// Connects to the database, applies migrations and binds the gRPC port.
    pub async fn build(config: ServeConfig) -> Result<Self, StartupError> {
        let store = Store::connect_lazy(&config.database).map_err(StartupError::DatabaseUrl)?;
        store.migrate().await?;
        let bind_error = |source| StartupError::Bind {
            addr: config.grpc_addr,
            source,
        };
        let incoming = TcpIncoming::bind(config.grpc_addr).map_err(bind_error)?;
        let local_addr = incoming.local_addr().map_err(bind_error)?;
        Ok(Self {
            config,
            store,
            incoming,
            local_addr,
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled, then stops gracefully: health turns NOT_SERVING,
    /// no new connections are accepted, and in-flight calls get `SHUTDOWN_TIMEOUT` to finish.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartupError> {
        let Self {
            config,
            store,
            incoming,
            local_addr,
        } = self;
        let (reporter, health_service) = tonic_health::server::health_reporter();
        // Not ready until the first database probe succeeds.
        health::set_all(&reporter, ServingStatus::NotServing).await;
        let (reflection_v1, reflection_v1alpha) = api::reflection_services()?;

        let mut tasks = JoinSet::new();
        tasks.spawn(health::monitor_database(
            reporter.clone(),
            store.clone(),
            config.health_check_interval,
            shutdown.clone(),
        ));

        let stop_accepting = {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                health::set_all(&reporter, ServingStatus::NotServing).await;
            }
        };
        let server = Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(TraceLayer::new_for_grpc())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(SetpointServiceServer::new(SetpointApi::new(store)))
            .serve_with_incoming_shutdown(incoming, stop_accepting);
        tracing::info!(addr = %local_addr, "serving gRPC");

        let mut server = std::pin::pin!(server);
        tokio::select! {
            result = &mut server => {
                // The server stopped on its own: an error, since only `shutdown` should stop it.
                result?;
                return Err(StartupError::TaskDied("gRPC server"));
            }
            Some(_) = tasks.join_next() => {
                shutdown.cancel();
                return Err(StartupError::TaskDied("health monitor"));
            }
            _ = shutdown.cancelled() => {}
        }
        tracing::info!(budget = ?config.shutdown_timeout, "shutting down");
        match tokio::time::timeout(config.shutdown_timeout, server).await {
            Ok(result) => result?,
            Err(_) => tracing::warn!("in-flight calls did not finish within the shutdown budget"),
        }
        while tasks.join_next().await.is_some() {}
        tracing::info!("stopped");
        Ok(())
    }
}
