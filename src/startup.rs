//! Wires configuration, storage and the gRPC server into a running [`Application`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;
use tower::layer::util::{Identity, Stack};
use tower_http::classify::{GrpcCode, GrpcErrorsAsFailures, SharedClassifier};
use tower_http::trace::TraceLayer;

use crate::api::metrics_layer::GrpcMetricsLayer;
use crate::api::{self, health, HeaterApi, Limits, LoopRules, ScheduleApi, SetpointApi};
use crate::config::{LimitsConfig, ServeConfig};
use crate::error::error_chain;
use crate::listener::{ConnectionLimits, Listener, OpenCallsLayer};
use crate::proto::v1::heater_control_service_server::HeaterControlServiceServer;
use crate::proto::v1::schedule_service_server::ScheduleServiceServer;
use crate::proto::v1::setpoint_service_server::SetpointServiceServer;
use crate::security::watch::{LoadError, Reloadable};
use crate::security::{self, Authenticator};
use crate::store::Store;
use crate::stream::stats::LoopStats;
use crate::stream::{self, ControlHandle, StreamError};

/// Largest total size of one call's metadata (headers): room for a large JWT, no more.
const MAX_HEADER_LIST_SIZE: u32 = 32 * 1024;

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
    #[error("authentication")]
    Auth(#[from] security::SetupError),
    #[error("TLS configuration")]
    Tls(#[source] LoadError),
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
    listener: Listener,
    local_addr: SocketAddr,
    health_listener: Listener,
    health_addr: SocketAddr,
    admin: Listener,
    auth: Authenticator,
    tls: Option<Arc<Reloadable<security::tls::TlsServer>>>,
    control: ControlHandle,
    /// The application services (behind authentication), health and reflection.
    api: Routes,
    /// Health alone, for the plaintext probe port.
    health: Routes,
    reporter: HealthReporter,
    tasks: JoinSet<Result<(), StreamError>>,
    /// Stops every task; cancelled when the caller's shutdown token is.
    stop: CancellationToken,
}

impl Application {
    /// [`Self::build`], given up when `shutdown` comes first (`None`): a start can be long (the
    /// command topic read from the beginning, a broker or database that does not answer), and
    /// a SIGTERM meanwhile must stop the process then, not once the start has ended. What was
    /// started is dropped with the future, as in a crash before the first decision could be
    /// committed.
    pub async fn build_until(
        config: ServeConfig,
        shutdown: &CancellationToken,
    ) -> Result<Option<Self>, StartupError> {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => {
                tracing::info!("stopped while starting");
                Ok(None)
            }
            app = Self::build(config) => app.map(Some),
        }
    }

    /// Connects to the database, applies migrations, binds the gRPC port and starts the control
    /// loop (which first recovers the last commands and loads the setpoint cache).
    pub async fn build(config: ServeConfig) -> Result<Self, StartupError> {
        let stop = CancellationToken::new();
        // The recorder before anything counts: the control loop registers its metrics once,
        // when it starts.
        crate::telemetry::metrics();
        // Credentials first: a misconfigured security setup should fail in a second, not after
        // the migrations and the command-topic replay.
        let tls = security::tls::load(&config.tls).map_err(StartupError::Tls)?;
        let auth = Authenticator::load(&config.auth, &config.tls, tls.clone(), &stop)?;
        if let Some(tls) = &tls {
            Arc::clone(tls).watch(config.auth.credentials_reload_interval, stop.clone());
        }
        let store = Store::connect_lazy(&config.database).map_err(StartupError::DatabaseUrl)?;
        store.migrate().await?;
        let mut tasks = JoinSet::new();
        let started = stream::start(
            &config.kafka,
            &config.control,
            store.clone(),
            &mut tasks,
            config.auth.credentials_reload_interval,
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
        let limits = &config.limits;
        let (listener, local_addr) = bind(
            config.grpc_addr,
            "grpc",
            grpc_limits(limits, limits.max_connections),
        )?;
        let (health_listener, health_addr) = bind(
            config.health_addr,
            "health",
            grpc_limits(limits, limits.health_max_connections),
        )?;
        // HTTP/1: hyper's header timeout stands for the preface's, and no call lives long.
        let admin_limits = ConnectionLimits {
            max_connections: limits.admin_max_connections as usize,
            tcp_keepalive: limits.tcp_keepalive,
            preface_timeout: None,
            lifetime: None,
            idle_timeout: None,
        };
        let (admin, _) = bind(config.admin_addr, "admin", admin_limits)?;
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let api = api_routes(&config, &store, &control, &auth, &stop)?
            .add_service(health_service.clone());
        Ok(Self {
            health: Routes::new(health_service),
            api,
            reporter,
            config,
            store,
            listener,
            local_addr,
            health_listener,
            health_addr,
            admin,
            auth,
            tls,
            control,
            tasks,
            stop,
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound plaintext health-check address.
    pub fn health_addr(&self) -> SocketAddr {
        self.health_addr
    }

    /// The bound admin HTTP address (`/metrics`).
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    /// The database side: setpoints and the Put queue.
    pub fn store(&self) -> &Store {
        &self.store
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
            listener,
            local_addr,
            health_listener,
            health_addr,
            admin,
            auth,
            tls,
            control,
            api,
            health,
            reporter,
            mut tasks,
            stop,
        } = self;
        // Not ready until the first database probe succeeds.
        health::set_all(&reporter, ServingStatus::NotServing).await;
        reporter
            .set_service_status(health::LIVENESS, ServingStatus::Serving)
            .await;
        spawn_upkeep(
            &mut tasks, &reporter, store, &control, admin, &config, &stop,
        );
        announce_security(&auth, tls.is_some(), &config);
        let stop_accepting = {
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                health::set_all(&reporter, ServingStatus::NotServing).await;
            }
        };
        let server = serve_api(&config, api, listener, tls, &stop, stop_accepting);
        tracing::info!(addr = %local_addr, "serving gRPC");
        spawn_health_port(&mut tasks, &config.limits, health, health_listener, &stop);
        tracing::info!(addr = %health_addr, "serving gRPC health");

        let mut server = std::pin::pin!(server);
        let failure = tokio::select! {
            result = &mut server => Some(match result {
                Err(e) => StartupError::Serve(e),
                Ok(()) => StartupError::TaskDied("gRPC server"),
            }),
            Some(ended) = tasks.join_next() => Some(match ended {
                Ok(Err(e)) => StartupError::Stream(e),
                _ => StartupError::TaskDied("a background task (control loop or health server)"),
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
        shut_down(config.shutdown_timeout, tasks, control, server).await
    }
}

/// Serves the API port, plaintext or TLS, until `stop_accepting`: gRPC, and gRPC-Web (HTTP/1.1
/// too) for browsers, with CORS for the origins allowed.
fn serve_api(
    config: &ServeConfig,
    api: Routes,
    listener: Listener,
    tls: Option<Arc<Reloadable<security::tls::TlsServer>>>,
    stop: &CancellationToken,
    stop_accepting: impl std::future::Future<Output = ()> + Send + 'static,
) -> ServerFuture {
    let router = server_builder(&config.limits)
        .accept_http1(true)
        .layer(tower::util::option_layer(grpc_web_cors(
            &config.limits.grpc_web_allowed_origins,
        )))
        .layer(tonic_web::GrpcWebLayer::new())
        .layer(TraceLayer::new(caller_errors_are_not_failures()).make_span_with(rpc_span))
        .layer(GrpcMetricsLayer)
        .add_routes(api);
    match tls {
        Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
            security::tls::incoming(
                listener,
                tls,
                config.tls.tls_handshake_timeout,
                stop.clone(),
            ),
            stop_accepting,
        )),
        None => {
            Box::pin(router.serve_with_incoming_shutdown(listener.into_stream(), stop_accepting))
        }
    }
}

/// The gRPC server's future, whichever transport it serves.
type ServerFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>> + Send>,
>;

/// The services of the API port: setpoints and heater control behind authentication, and
/// reflection. Health and reflection need no token: health says only SERVING or not, and
/// reflection describes the public API schema, which is in this repository. Both still go
/// through TLS when it is on.
fn api_routes(
    config: &ServeConfig,
    store: &Store,
    control: &ControlHandle,
    auth: &Authenticator,
    stop: &CancellationToken,
) -> Result<Routes, StartupError> {
    let limits = Limits::new(&config.limits);
    let max_message = config.limits.max_message_size;
    let setpoints = SetpointServiceServer::new(SetpointApi::new(
        store.clone(),
        limits.clone(),
        config.kafka.reading_range_celsius,
        &config.limits,
    ))
    .max_decoding_message_size(max_message)
    // A batch's answer holds every setpoint it updated: up to gRPC's usual 4 MiB a client
    // accepts. Pages of lists are cut to `max_message` by the handlers themselves.
    .max_encoding_message_size(max_message.max(BATCH_RESPONSE_SIZE));
    let schedules = ScheduleServiceServer::new(ScheduleApi::new(
        store.clone(),
        limits.clone(),
        &config.limits,
    ))
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let heater = HeaterControlServiceServer::new(HeaterApi::new(
        control.clone(),
        store.clone(),
        limits,
        LoopRules {
            readings: config.kafka.reading_range_celsius,
            protection: config.control.protection(),
        },
        auth.clone(),
        config.auth.credentials_reload_interval,
        stop.clone(),
    ))
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let (reflection_v1, reflection_v1alpha) = api::reflection_services()?;
    Ok(Routes::new(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(setpoints, auth.clone()))
        .add_service(InterceptedService::new(schedules, auth.clone()))
        .add_service(InterceptedService::new(heater, auth.clone())))
}

/// The tasks that run beside the servers: the health monitor, the admin HTTP port and the
/// metrics' upkeep.
fn spawn_upkeep(
    tasks: &mut JoinSet<Result<(), StreamError>>,
    reporter: &HealthReporter,
    store: Store,
    control: &ControlHandle,
    admin: Listener,
    config: &ServeConfig,
    stop: &CancellationToken,
) {
    let (reporter, control, interval) = (
        reporter.clone(),
        control.clone(),
        config.health_check_interval,
    );
    let (monitor_stop, monitored) = (stop.clone(), store.clone());
    tasks.spawn(async move {
        health::monitor(reporter, monitored, control, interval, monitor_stop).await;
        Ok(())
    });
    let (admin_stop, header_timeout) = (stop.clone(), config.limits.connection_preface_timeout);
    tasks.spawn(async move {
        crate::admin_port::serve(admin, header_timeout, admin_stop).await;
        Ok(())
    });
    let upkeep_stop = stop.clone();
    tasks.spawn(async move {
        crate::telemetry::upkeep(upkeep_stop).await;
        Ok(())
    });
    let (levels_stop, every, levels_store) = (
        stop.clone(),
        config.control.level_expiry_interval,
        store.clone(),
    );
    tasks.spawn(async move {
        keep_levels(levels_store, every, levels_stop).await;
        Ok(())
    });
    let (sweep_stop, sweep, sweep_store) = (
        stop.clone(),
        config.control.schedule_sweep_interval,
        store.clone(),
    );
    // Apart: a long sweep must not hold up expiries and due transitions.
    tasks.spawn(async move {
        sweep_schedules(sweep_store, sweep, sweep_stop).await;
        Ok(())
    });
    let (forget_stop, window) = (stop.clone(), config.limits.request_id_window);
    tasks.spawn(async move {
        forget_request_ids(store, window, forget_stop).await;
        Ok(())
    });
}

/// Every `every`, relinquishes expired levels of the sensors' priority arrays and brings the
/// SCHEDULE levels of buildings with a transition due up to date. Every replica does: each
/// change is recorded once, by whichever comes first, and the other replicas learn the new
/// effective setpoint from its notification.
async fn keep_levels(store: Store, every: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {
                counted("expiry", store.expire_levels().await.map(|n| n as usize));
                counted_pass(store.run_due_schedules().await);
            }
        }
    }
}

/// Every `every` (and first as the replica starts), brings the SCHEDULE levels of every
/// scheduled building up to date: sensors created or moved since, transitions missed while
/// no replica ran.
async fn sweep_schedules(store: Store, every: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => counted_pass(store.run_all_schedules().await),
        }
    }
}

/// Logs and counts what a pass of the levels' upkeep did.
fn counted(kind: &'static str, outcome: Result<usize, crate::error::Error>) {
    match outcome {
        Ok(0) => {}
        Ok(changed) => {
            metrics::counter!(crate::telemetry::LEVEL_CHANGES, "kind" => kind)
                .increment(changed as u64);
            tracing::info!(changed, kind, "setpoint levels changed by the upkeep");
        }
        Err(e) => {
            metrics::counter!(crate::telemetry::LEVEL_UPKEEP_FAILURES, "kind" => kind).increment(1);
            tracing::warn!(error = %error_chain(&e), kind, "setpoint levels' upkeep failed");
        }
    }
}

/// [`counted`] for a pass over scheduled buildings, each of which may fail on its own.
fn counted_pass(outcome: Result<crate::store::SchedulePass, crate::error::Error>) {
    match outcome {
        Ok(pass) => {
            counted("schedule", Ok(pass.changed));
            for (building, e) in pass.failures {
                tracing::warn!(building, "in the building's schedule pass");
                counted("schedule", Err(e));
            }
        }
        Err(e) => counted("schedule", Err(e)),
    }
}

/// Forgets the request ids of writes older than `window`, every minute (every replica does;
/// the statement is idempotent).
async fn forget_request_ids(store: Store, window: Duration, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {
                if let Err(e) = store.forget_writes(window).await {
                    tracing::warn!(error = %error_chain(&e), "forgetting old request ids");
                }
            }
        }
    }
}

/// Plaintext and health-only, for Kubernetes probes, which can neither do TLS with our
/// certificates nor present a token.
fn spawn_health_port(
    tasks: &mut JoinSet<Result<(), StreamError>>,
    limits: &LimitsConfig,
    health: Routes,
    listener: Listener,
    stop: &CancellationToken,
) {
    let stop = stop.clone();
    let server = server_builder(limits)
        .add_routes(health)
        .serve_with_incoming_shutdown(
            listener.into_stream(),
            async move { stop.cancelled().await },
        );
    tasks.spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %error_chain(&e), "health server failed");
        }
        Ok(())
    });
}

/// The ordered shutdown within `budget`: the control loop first (it stops consuming, waits for
/// outstanding commands to be acknowledged and commits their offsets; it does not depend on
/// clients), then the producer's flush, then the server's last connections.
async fn shut_down(
    budget: std::time::Duration,
    mut tasks: JoinSet<Result<(), StreamError>>,
    control: ControlHandle,
    server: std::pin::Pin<&mut ServerFuture>,
) -> Result<(), StartupError> {
    tracing::info!(?budget, "shutting down");
    let deadline = tokio::time::Instant::now() + budget;
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
        dead_lettered = stats.dead_lettered(),
        commands = stats.commands(),
        "stopped"
    );
    Ok(())
}

/// CORS for gRPC-Web calls from pages of `origins`; none: browsers call from the same origin
/// only.
fn grpc_web_cors(
    origins: &[tonic::codegen::http::HeaderValue],
) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let headers = [
        "authorization",
        "content-type",
        "grpc-timeout",
        "x-grpc-web",
        "x-user-agent",
    ];
    let exposed = ["grpc-status", "grpc-message", "grpc-status-details-bin"];
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins.iter().cloned()))
            .allow_methods([tonic::codegen::http::Method::POST])
            .allow_headers(headers.map(tonic::codegen::http::HeaderName::from_static))
            .expose_headers(exposed.map(tonic::codegen::http::HeaderName::from_static))
            .max_age(Duration::from_secs(24 * 60 * 60)),
    )
}

/// The largest answer of SetpointService: gRPC clients accept 4 MiB by default.
const BATCH_RESPONSE_SIZE: usize = 4 << 20;

/// A gRPC server with the connection limits of `limits`, for the API and the health port alike;
/// its calls are counted on their connections, which close when idle.
fn server_builder(limits: &LimitsConfig) -> Server<Stack<OpenCallsLayer, Identity>> {
    Server::builder()
        .http2_keepalive_interval(Some(limits.http2_keepalive_interval))
        .http2_keepalive_timeout(Some(limits.http2_keepalive_timeout))
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_connection_age(limits.max_connection_age)
        .timeout(limits.request_timeout)
        .layer(OpenCallsLayer)
}

/// The bounds of a gRPC port's connections. tonic sends GOAWAY at `MAX_CONNECTION_AGE`; its own
/// grace option would replace that GOAWAY by a plain cut, so the cut after the grace is ours.
fn grpc_limits(limits: &LimitsConfig, max_connections: u32) -> ConnectionLimits {
    ConnectionLimits {
        max_connections: max_connections as usize,
        tcp_keepalive: limits.tcp_keepalive,
        preface_timeout: Some(limits.connection_preface_timeout),
        lifetime: Some(
            limits
                .max_connection_age
                .saturating_add(limits.max_connection_age_grace),
        ),
        idle_timeout: Some(limits.connection_idle_timeout),
    }
}

fn bind(
    addr: SocketAddr,
    name: &'static str,
    limits: ConnectionLimits,
) -> Result<(Listener, SocketAddr), StartupError> {
    let bind_error = |source| StartupError::Bind { addr, source };
    let listener = Listener::bind(addr, name, limits).map_err(bind_error)?;
    let local_addr = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local_addr))
}

/// Says at start how callers are authenticated; loudly when they are not.
fn announce_security(auth: &Authenticator, tls: bool, config: &ServeConfig) {
    if auth.is_disabled() {
        tracing::error!(
            "AUTHENTICATION IS DISABLED (AUTH_DISABLED=true): every caller may read and change \
             every building's setpoints. Never run this way outside local development."
        );
    } else {
        tracing::info!(
            jwks = ?config.auth.auth_jwks_file,
            static_identities = ?config.auth.auth_static_file,
            "callers must authenticate"
        );
    }
    if tls {
        tracing::info!(client_ca = ?config.tls.tls_client_ca_file, client_auth = ?config.tls.tls_client_auth, "TLS on the gRPC port");
    } else {
        tracing::warn!(
            "the gRPC port is PLAINTEXT (no TLS_CERT_FILE/TLS_KEY_FILE): tokens and setpoints \
             cross the network in the clear; for local development only"
        );
    }
}

/// Which answers the trace layer logs as failures (at ERROR): server-side faults only. A bad
/// request or a refused token is the caller's business and an attacker could otherwise fill the
/// error log at will; those calls are still counted by code in the RPC metrics.
fn caller_errors_are_not_failures() -> SharedClassifier<GrpcErrorsAsFailures> {
    let classifier = [
        GrpcCode::InvalidArgument,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::Unauthenticated,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Cancelled,
    ]
    .into_iter()
    .fold(
        GrpcErrorsAsFailures::new(),
        GrpcErrorsAsFailures::with_success,
    );
    SharedClassifier::new(classifier)
}

/// The span of one RPC: its method and a request id (the caller's `x-request-id` if it sent
/// one, else a fresh random one), so every log line of a call can be found together. With
/// traces on, it continues the caller's `traceparent`.
fn rpc_span<B>(request: &tonic::codegen::http::Request<B>) -> tracing::Span {
    use tracing::field::Empty;
    let request_id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 64)
        .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_owned);
    let path = request.uri().path();
    let span = tracing::info_span!(
        "rpc",
        method = %path,
        request_id = %request_id,
        otel.name = Empty,
        otel.kind = Empty,
        rpc.system = Empty,
    );
    // Recorded only for traces, so log lines do not repeat them. Named by a served method (or
    // `other`), never by a caller's made-up path.
    if crate::traces::enabled() {
        span.record("otel.name", crate::api::metrics_layer::method_label(path));
        span.record("otel.kind", "server");
        span.record("rpc.system", "grpc");
        let headers = request.headers();
        crate::traces::continue_from(&span, |key| headers.get(key)?.to_str().ok());
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SchedulePass;

    /// The upkeep's passes as `/metrics` shows them, from a recorder of the test's own.
    #[test]
    fn an_upkeep_pass_counts_the_levels_it_changed_and_each_building_that_failed() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let failed = |building: &str| {
            let e = crate::error::Error::FailedPrecondition(format!("{building}'s preset"));
            (building.to_owned(), e)
        };
        metrics::with_local_recorder(&recorder, || {
            counted("expiry", Ok(0));
            counted("expiry", Ok(3));
            counted_pass(Ok(SchedulePass {
                changed: 2,
                failures: vec![failed("north"), failed("south")],
            }));
            counted_pass(Ok(SchedulePass {
                changed: 1,
                failures: vec![],
            }));
            counted_pass(Err(crate::error::Error::FailedPrecondition("down".into())));
        });
        let text = handle.render();
        for line in [
            r#"thermostat_level_changes_total{kind="expiry"} 3"#,
            r#"thermostat_level_changes_total{kind="schedule"} 3"#,
            r#"thermostat_level_upkeep_failures_total{kind="schedule"} 3"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} not in\n{text}");
        }
        assert!(!text.contains(r#"failures_total{kind="expiry"}"#), "{text}");
    }
}
