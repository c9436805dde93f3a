//! Wires configuration, storage and the gRPC server into a running [`Application`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tower_http::trace::TraceLayer;

use crate::api::metrics_layer::GrpcMetricsLayer;
use crate::api::{self, health, HeaterApi, SetpointApi};
use crate::config::ServeConfig;
use crate::proto::v1::heater_control_service_server::HeaterControlServiceServer;
use crate::proto::v1::setpoint_service_server::SetpointServiceServer;
use crate::store::Store;
use crate::stream::engine::LoopStats;
use crate::stream::{self, ControlHandle, StreamError};

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
    #[error("control loop")]
    Stream(#[from] StreamError),
    #[error("{0} stopped unexpectedly")]
    TaskDied(&'static str),
}

/// The service, built, bound and with its control loop running, but not yet serving gRPC.
pub struct Application {
    config: ServeConfig,
    store: Store,
    incoming: TcpIncoming,
    local_addr: SocketAddr,
    admin: tokio::net::TcpListener,
    control: ControlHandle,
    tasks: JoinSet<Result<(), StreamError>>,
    /// Stops every task; cancelled when the caller's shutdown token is.
    stop: CancellationToken,
}

impl Application {
    /// Connects to the database, applies migrations, binds the gRPC port and starts the control
    /// loop (which first recovers the last commands and loads the setpoint cache).
    pub async fn build(config: ServeConfig) -> Result<Self, StartupError> {
        let store = Store::connect_lazy(&config.database).map_err(StartupError::DatabaseUrl)?;
        store.migrate().await?;
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let started = stream::start(
            &config.kafka,
            &config.control,
            store.clone(),
            &mut tasks,
            stop.clone(),
        )
        .await;
        let control = match started {
            Ok(control) => control,
            Err(e) => {
                stop.cancel();
                return Err(e.into());
            }
        };
        let bind_error = |source| StartupError::Bind {
            addr: config.grpc_addr,
            source,
        };
        let incoming = TcpIncoming::bind(config.grpc_addr).map_err(bind_error)?;
        let local_addr = incoming.local_addr().map_err(bind_error)?;
        let admin = tokio::net::TcpListener::bind(config.admin_addr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: config.admin_addr,
                source,
            })?;
        // Install the recorder before anything counts.
        crate::telemetry::metrics();
        Ok(Self {
            config,
            store,
            incoming,
            local_addr,
            admin,
            control,
            tasks,
            stop,
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound admin HTTP address (`/metrics`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    /// Counters of the control loop.
    pub fn control(&self) -> &ControlHandle {
        &self.control
    }

    /// Serves until `shutdown` is cancelled, then stops within `SHUTDOWN_TIMEOUT`: health turns
    /// NOT_SERVING, no new connections are accepted, subscriber streams end with UNAVAILABLE,
    /// consuming stops, outstanding commands are acknowledged and their offsets committed, and
    /// the producer is flushed.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), StartupError> {
        let Self {
            config,
            store,
            incoming,
            local_addr,
            admin,
            control,
            mut tasks,
            stop,
        } = self;
        let (reporter, health_service) = tonic_health::server::health_reporter();
        // Not ready until the first database probe succeeds.
        health::set_all(&reporter, ServingStatus::NotServing).await;
        reporter
            .set_service_status(health::LIVENESS, ServingStatus::Serving)
            .await;
        let (reflection_v1, reflection_v1alpha) = api::reflection_services()?;

        {
            let (reporter, store, stop) = (reporter.clone(), store.clone(), stop.clone());
            let interval = config.health_check_interval;
            tasks.spawn(async move {
                health::monitor_database(reporter, store, interval, stop).await;
                Ok(())
            });
        }

        {
            let stop = stop.clone();
            tasks.spawn(async move {
                crate::admin::serve(admin, stop).await;
                Ok(())
            });
        }

        let stop_accepting = {
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                health::set_all(&reporter, ServingStatus::NotServing).await;
            }
        };
        let heater_api = HeaterApi::new(control.clone(), store.clone(), stop.clone());
        let server = Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .layer(TraceLayer::new_for_grpc().make_span_with(rpc_span))
            .layer(GrpcMetricsLayer)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(SetpointServiceServer::new(SetpointApi::new(store)))
            .add_service(HeaterControlServiceServer::new(heater_api))
            .serve_with_incoming_shutdown(incoming, stop_accepting);
        tracing::info!(addr = %local_addr, "serving gRPC");

        let mut server = std::pin::pin!(server);
        let failure = tokio::select! {
            result = &mut server => Some(match result {
                Err(e) => StartupError::Serve(e),
                Ok(()) => StartupError::TaskDied("gRPC server"),
            }),
            Some(ended) = tasks.join_next() => Some(match ended {
                Ok(Err(e)) => StartupError::Stream(e),
                _ => StartupError::TaskDied("control loop task"),
            }),
            _ = shutdown.cancelled() => None,
            _ = stop.cancelled() => None,
        };
        stop.cancel();
        if let Some(failure) = failure {
            // A half-alive process is worse than a restart: stop everything and report.
            tracing::error!(error = %error_chain(&failure), "stopping");
            tasks.shutdown().await;
            return Err(failure);
        }

        tracing::info!(budget = ?config.shutdown_timeout, "shutting down");
        let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
        // The loop first: it stops consuming, waits for outstanding commands to be acknowledged
        // and commits their offsets. It does not depend on clients, unlike the server below.
        let tasks_stopped = tokio::time::timeout_at(deadline, async {
            while let Some(ended) = tasks.join_next().await {
                if let Ok(Err(e)) = ended {
                    tracing::error!(error = %error_chain(&e), "task failed while stopping");
                }
            }
        })
        .await;
        if tasks_stopped.is_err() {
            tracing::warn!("the control loop did not stop within the shutdown budget");
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let flushing = control.clone();
        let _ = tokio::task::spawn_blocking(move || flushing.flush(remaining)).await;
        // Subscriber streams have been told UNAVAILABLE; a client that does not read never
        // receives it and keeps its connection open: give up on those at the deadline.
        match tokio::time::timeout_at(deadline, server).await {
            Ok(served) => served?,
            Err(_) => tracing::warn!("connections still open at the end of the shutdown budget"),
        }
        let stats = control.stats();
        tracing::info!(
            readings = LoopStats::get(&stats.readings),
            dead_lettered = LoopStats::get(&stats.dead_lettered),
            commands = LoopStats::get(&stats.commands),
            "stopped"
        );
        Ok(())
    }
}
/// The span of one RPC: its method and a request id (the caller's `x-request-id` if it sent
/// one, else a fresh random one), so every log line of a call can be found together.
fn rpc_span<B>(request: &tonic::codegen::http::Request<B>) -> tracing::Span {
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64)
        .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_owned);
    tracing::info_span!("rpc", method = %request.uri().path(), request_id = %request_id)
}

/// An error with its causes, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
