//! Limits: writes and subscriptions are limited per identity, a client's deadline ends its
//! call at the deadline, each port caps its connections and closes silent ones, and a
//! connection lives no longer than its maximum age and grace, nor idle longer than its idle
//! timeout.

mod common;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::security::{self as creds, authorized, code, keys, put_as, secure_app};
use common::{closed_within, eventually, http_get, put, setpoint, still_open};
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::heater_control_service_client::HeaterControlServiceClient;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_subscriptions_are_limited_per_identity() {
    let (_dir, app) = secure_app(|config, _| {
        config.limits.write_rate_limit = 2;
        config.limits.write_burst = 3;
        config.limits.max_subscriptions_per_identity = 2;
    })
    .await;
    let mut client = app.setpoints().await;
    let writer = client.clone();
    let write = |token: &'static str, desired: f64| {
        let mut client = writer.clone();
        async move {
            client
                .put_setpoint(authorized(
                    put(setpoint("north/room-1", "north", desired), None),
                    Some(token),
                ))
                .await
        }
    };
    // Four at once, so that no slot refills between them (one every 500 ms): three within the
    // burst, one refused, whichever arrives last.
    let attempts =
        futures::future::join_all((0..4).map(|i| write("t-operator-north", 20.0 + f64::from(i))))
            .await;
    let refused: Vec<(usize, &tonic::Status)> = attempts
        .iter()
        .enumerate()
        .filter_map(|(i, attempt)| Some((i, attempt.as_ref().err()?)))
        .collect();
    assert_eq!(refused.len(), 1, "three within the burst: {attempts:?}");
    let (refused_at, refused) = refused[0];
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(
        refused.message().contains("rate limit on writes"),
        "{}",
        refused.message()
    );
    // Refused writes change nothing; other identities have their own budget; reads are free.
    let stored = client
        .get_setpoint(authorized(
            pb::GetSetpointRequest {
                sensor_id: "north/room-1".into(),
            },
            Some("t-viewer-north"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.revision, 3);
    assert_ne!(stored.desired_celsius, 20.0 + refused_at as f64);
    write("t-operator-all", 24.0)
        .await
        .expect("another identity");
    for _ in 0..20 {
        client
            .get_setpoint(authorized(
                pb::GetSetpointRequest {
                    sensor_id: "north/room-1".into(),
                },
                Some("t-operator-north"),
            ))
            .await
            .expect("reads are not rate limited");
    }
    // The budget refills at the configured rate.
    tokio::time::sleep(Duration::from_millis(600)).await;
    write("t-operator-north", 25.0).await.expect("refilled");

    let mut heaters = app.heaters().await;
    let subscribe = |heaters: &mut HeaterControlServiceClient<Channel>| {
        let mut heaters = heaters.clone();
        async move {
            heaters
                .subscribe_heater_commands(authorized(
                    pb::SubscribeHeaterCommandsRequest::default(),
                    Some("t-viewer-north"),
                ))
                .await
        }
    };
    let first = subscribe(&mut heaters).await.expect("1");
    let _second = subscribe(&mut heaters).await.expect("2");
    let third = subscribe(&mut heaters).await.unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted);
    drop(first);
    let freed = eventually(Duration::from_secs(5), || async {
        subscribe(&mut heaters.clone()).await.is_ok()
    })
    .await;
    assert!(freed, "a closed subscription frees its slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_named_like_a_static_identity_does_not_share_its_limits() {
    let (_dir, app) = secure_app(|config, _| {
        config.limits.write_rate_limit = 1;
        config.limits.write_burst = 2;
        config.limits.max_subscriptions_per_identity = 1;
    })
    .await;
    let (rsa, _) = keys();
    // Anyone the identity provider names `operator-north` / `viewer-north`, as the static
    // tokens t-operator-north and t-viewer-north are named.
    let operator = rsa.sign(&creds::claims("operator-north", "operator", &["north"]));
    let viewer = rsa.sign(&creds::claims("viewer-north", "viewer", &["north"]));
    let mut client = app.setpoints().await;
    for desired in [20.0, 21.0] {
        put_as(&mut client, &operator, "north/room-1", "north", desired)
            .await
            .expect("within the burst");
    }
    let exhausted = put_as(&mut client, &operator, "north/room-1", "north", 22.0).await;
    assert_eq!(code(&exhausted), Code::ResourceExhausted);
    put_as(
        &mut client,
        "t-operator-north",
        "north/room-1",
        "north",
        23.0,
    )
    .await
    .expect("the static token has its own budget");

    let heaters = app.heaters().await;
    let subscribe = |token: String| {
        let mut heaters = heaters.clone();
        async move {
            let request = authorized(pb::SubscribeHeaterCommandsRequest::default(), Some(&token));
            heaters.subscribe_heater_commands(request).await
        }
    };
    let _jwt = subscribe(viewer).await.expect("the JWT's subscription");
    let _static = subscribe("t-viewer-north".into())
        .await
        .expect("the static token's own subscription");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_deadline_ends_the_call_at_the_deadline() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    let mut client = app.setpoints().await;
    put_as(&mut client, "t-admin-all", "north/room-1", "north", 20.0)
        .await
        .unwrap();
    // Hold the row lock so that the next Put waits in the database.
    let mut db = app.db().await;
    sqlx::query("BEGIN").execute(&mut db).await.unwrap();
    sqlx::query("SELECT 1 FROM setpoints WHERE sensor_id = 'north/room-1' FOR UPDATE")
        .execute(&mut db)
        .await
        .unwrap();
    let mut request = authorized(
        put(setpoint("north/room-1", "north", 21.0), None),
        Some("t-admin-all"),
    );
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let status = client.put_setpoint(request).await.unwrap_err();
    let took = started.elapsed();
    sqlx::query("ROLLBACK").execute(&mut db).await.unwrap();
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
}

/// `cap` silent connections to `addr` hold every slot: one more is closed at once, while they
/// stay open until the preface (or header) timeout closes them too.
async fn cap_holds_and_silent_connections_close(port: &str, addr: SocketAddr, cap: usize) {
    let mut silent = Vec::new();
    for _ in 0..cap {
        silent.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // Accepted in order, so the slots are the earlier sockets'.
    let mut extra = TcpStream::connect(addr).await.expect("connect");
    assert!(
        closed_within(&mut extra, Duration::from_secs(10)).await,
        "{port}: a connection beyond the cap is closed"
    );
    assert!(
        silent.iter().all(still_open),
        "{port}: the connections within the cap stay until their timeout"
    );
    for socket in &mut silent {
        assert!(
            closed_within(socket, Duration::from_secs(20)).await,
            "{port}: a silent connection is closed after the preface timeout"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_port_caps_its_connections_and_closes_silent_ones() {
    const CAP: u32 = 4;
    let (_dir, app) = secure_app(|config, _| {
        config.limits.max_connections = CAP;
        config.limits.health_max_connections = CAP;
        config.limits.admin_max_connections = CAP;
        // Long enough for the extra connection to be refused while the others still wait.
        config.limits.connection_preface_timeout = Duration::from_secs(5);
    })
    .await;
    futures::future::join_all([
        cap_holds_and_silent_connections_close("gRPC", app.addr, CAP as usize),
        cap_holds_and_silent_connections_close("health", app.health_addr, CAP as usize),
        cap_holds_and_silent_connections_close("admin", app.admin, CAP as usize),
    ])
    .await;

    // Their slots are free again: every port serves.
    let health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", app.health_addr))
            .unwrap()
            .connect()
            .await
            .expect("health port"),
    )
    .check(tonic_health::pb::HealthCheckRequest::default())
    .await;
    assert!(health.is_ok(), "{health:?}");
    assert_eq!(http_get(app.admin, "/livez").await.0, 200);
    let mut client = app.setpoints().await;
    let got = client
        .get_setpoint(authorized(
            pb::GetSetpointRequest {
                sensor_id: "north/room-1".into(),
            },
            Some("t-viewer-north"),
        ))
        .await;
    assert_eq!(code(&got), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_at_its_maximum_age_and_grace_and_the_client_reconnects() {
    let (_dir, app) = secure_app(|config, _| {
        config.limits.max_connection_age = Duration::from_secs(1);
        config.limits.max_connection_age_grace = Duration::from_secs(1);
    })
    .await;
    let mut heaters = app.heaters().await;
    // A subscription never ends by itself: only the cut after the grace ends it.
    let mut stream = north_viewer_subscription(&mut heaters).await;
    let ended = tokio::time::timeout(Duration::from_secs(20), stream.next()).await;
    // A transport error: the connection is cut, so no status comes from the server.
    assert!(
        matches!(ended, Ok(Some(Err(_)))),
        "the stream ends with an error at the connection's end: {ended:?}"
    );
    // The same client goes on, on a new connection (a call sent while the channel still held
    // the cut one fails at once, as tonic does not retry it itself).
    let resubscribed = eventually(Duration::from_secs(10), || {
        let mut heaters = heaters.clone();
        async move {
            let request = authorized(
                pb::SubscribeHeaterCommandsRequest::default(),
                Some("t-viewer-north"),
            );
            heaters.subscribe_heater_commands(request).await.is_ok()
        }
    })
    .await;
    assert!(resubscribed, "the client reconnects");
}

/// A subscription of north's viewer, which sees nothing in these tests.
async fn north_viewer_subscription(
    heaters: &mut HeaterControlServiceClient<Channel>,
) -> tonic::Streaming<pb::HeaterCommandEvent> {
    heaters
        .subscribe_heater_commands(authorized(
            pb::SubscribeHeaterCommandsRequest::default(),
            Some("t-viewer-north"),
        ))
        .await
        .expect("subscribes")
        .into_inner()
}

/// A TCP stream to the server that records when the server closes it.
struct Watched {
    io: TcpStream,
    closed: Arc<AtomicBool>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let ended = match &polled {
            Poll::Ready(Ok(())) => buf.filled().len() == before,
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        };
        if ended {
            self.closed.store(true, Ordering::SeqCst);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A channel over one connection to `addr`, and whether the server has closed it.
async fn watched_channel(addr: SocketAddr) -> (Channel, Arc<AtomicBool>) {
    let closed = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&closed);
    let connector = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let closed = Arc::clone(&flag);
        async move {
            let io = TcpStream::connect(addr).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(Watched { io, closed }))
        }
    });
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("connects");
    (channel, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_without_a_call_closes_after_its_idle_timeout_and_an_open_stream_keeps_it() {
    const IDLE: Duration = Duration::from_secs(1);
    let (_dir, app) = secure_app(|config, _| {
        config.limits.connection_idle_timeout = IDLE;
    })
    .await;
    // An HTTP/2 client that sends its preface and settings, then nothing, on either gRPC port.
    // It does not answer the server's keepalive pings either, which would close it after 30 s.
    const PREFACE_AND_EMPTY_SETTINGS: &[u8] =
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    for (port, addr) in [("gRPC", app.addr), ("health", app.health_addr)] {
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        silent
            .write_all(PREFACE_AND_EMPTY_SETTINGS)
            .await
            .expect("hello");
        assert!(
            closed_within(&mut silent, Duration::from_secs(10)).await,
            "{port}: a connection without a call is closed after the idle timeout"
        );
    }

    let (channel, closed) = watched_channel(app.addr).await;
    let mut heaters = HeaterControlServiceClient::new(channel);
    let mut stream = north_viewer_subscription(&mut heaters).await;
    let quiet = tokio::time::timeout(3 * IDLE, stream.next()).await;
    assert!(
        quiet.is_err(),
        "an open subscription keeps its connection: {quiet:?}"
    );
    assert!(!closed.load(Ordering::SeqCst));

    // The idle clock starts when the last call ends.
    drop(stream);
    tokio::time::sleep(IDLE / 2).await;
    assert!(
        !closed.load(Ordering::SeqCst),
        "closed before the idle timeout"
    );
    let cut = eventually(Duration::from_secs(10), || {
        let closed = Arc::clone(&closed);
        async move { closed.load(Ordering::SeqCst) }
    })
    .await;
    assert!(cut, "closed once idle for the timeout");
}
