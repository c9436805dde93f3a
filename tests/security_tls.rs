//! TLS and mTLS: listed client certificates are identities and everything else is refused at
//! the handshake, certificates are reloaded without a restart, silent handshakes time out and
//! cannot lock clients out, a client certificate is checked again on every call (a rotated
//! client CA or an expiry reaches open connections), and health stays plaintext on its own port.

mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::security::{
    self as creds, authorized, code, secure_app, static_entries, Ca, StaticEntry,
};
use common::{eventually, grpcurl, put, setpoint, still_open, TestApp};
use thermostat::config::{ClientAuth, ServeConfig};
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::heater_control_service_client::HeaterControlServiceClient;
use thermostat::proto::v1::setpoint_service_client::SetpointServiceClient;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};

/// A TLS channel to `app` trusting `ca`, with an optional client certificate.
async fn tls_channel(
    app: &TestApp,
    ca: &Ca,
    client: Option<&creds::Pem>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(&client.cert, &client.key));
    }
    // Connect to the address the server is bound to; verify the name its certificate has.
    Channel::from_shared(format!("https://{}", app.addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

fn tls_config(config: &mut ServeConfig, dir: &Path, ca: &Ca, client_ca: &Ca, mode: ClientAuth) {
    let server = ca.server();
    config.tls.tls_cert_file = Some(creds::write(dir, "server.pem", &server.cert));
    config.tls.tls_key_file = Some(creds::write(dir, "server.key", &server.key));
    config.tls.tls_client_ca_file = Some(creds::write(dir, "client-ca.pem", &client_ca.pem()));
    config.tls.tls_client_auth = Some(mode);
    config.tls.tls_handshake_timeout = Duration::from_millis(500);
    let mut entries = static_entries();
    entries.push(StaticEntry::Certificate {
        subject: "CN=gateway-7",
        role: "viewer",
        buildings: &["north"],
    });
    config.auth.auth_static_file = Some(creds::write(
        dir,
        "identities.json",
        &creds::static_file(&entries),
    ));
}

async fn get_north(channel: &Channel, token: Option<&str>) -> Code {
    let request = authorized(
        pb::GetSetpointRequest {
            sensor_id: "north/room-1".into(),
        },
        token,
    );
    code(
        &SetpointServiceClient::new(channel.clone())
            .get_setpoint(request)
            .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_listed_certificates_and_refuses_everything_else() {
    let (server_ca, client_ca, other_ca) = (
        Ca::new("server CA"),
        Ca::new("client CA"),
        Ca::new("other CA"),
    );
    let (dir, app) = secure_app(|config, dir| {
        tls_config(config, dir, &server_ca, &client_ca, ClientAuth::Required);
    })
    .await;
    let gateway = client_ca.client("gateway-7");
    let channel = tls_channel(&app, &server_ca, Some(&gateway))
        .await
        .expect("mTLS connects");
    SetpointServiceClient::new(channel.clone())
        .put_setpoint(authorized(
            put(setpoint("north/room-1", "north", 20.0), None),
            Some("t-admin-all"),
        ))
        .await
        .expect("a token over mTLS");

    // The certificate is the identity: a viewer of north.
    assert_eq!(get_north(&channel, None).await, Code::Ok);
    let request = put(setpoint("north/room-1", "north", 25.0), None);
    assert_eq!(
        code(
            &SetpointServiceClient::new(channel.clone())
                .put_setpoint(Request::new(request))
                .await
        ),
        Code::PermissionDenied
    );
    // A token, when sent, decides: a bad one is refused even on a good certificate.
    assert_eq!(
        get_north(&channel, Some("nope")).await,
        Code::Unauthenticated
    );
    // A certificate from the right CA whose subject is not listed has no identity.
    let stranger = tls_channel(&app, &server_ca, Some(&client_ca.client("stranger")))
        .await
        .unwrap();
    assert_eq!(get_north(&stranger, None).await, Code::Unauthenticated);
    assert_eq!(get_north(&stranger, Some("t-viewer-north")).await, Code::Ok);

    // Refused at the handshake: no client certificate, one from another CA, plaintext, and a
    // client that does not trust the server's CA. Depending on when the TLS alert arrives the
    // client reports it at connect or at the call (with a code that varies with timing); what
    // matters is that the call failed in the client's transport, never reaching a handler.
    let transport_failure = |answer: Result<tonic::Response<pb::Setpoint>, tonic::Status>| {
        answer.is_err_and(|status| {
            std::error::Error::source(&status).is_some_and(|e| e.is::<tonic::transport::Error>())
        })
    };
    let get_north_raw = |channel: Channel| async move {
        let request = authorized(
            pb::GetSetpointRequest {
                sensor_id: "north/room-1".into(),
            },
            Some("t-admin-all"),
        );
        SetpointServiceClient::new(channel)
            .get_setpoint(request)
            .await
    };
    for (what, trusted, client) in [
        ("no certificate", &server_ca, None),
        ("another CA", &server_ca, Some(other_ca.client("gateway-7"))),
        (
            "untrusted server",
            &other_ca,
            Some(client_ca.client("gateway-7")),
        ),
    ] {
        let refused = match tls_channel(&app, trusted, client.as_ref()).await {
            Err(_) => true,
            Ok(channel) => transport_failure(get_north_raw(channel).await),
        };
        assert!(refused, "{what}");
    }
    let plaintext = get_north_raw(app.channel().await).await;
    assert!(transport_failure(plaintext), "plaintext");

    // docs/security.md's grpcurl calls with client certificates.
    let files = |name: &str, contents: &str| {
        creds::write(dir.path(), name, contents)
            .display()
            .to_string()
    };
    let (ca_file, cert_file, key_file) = (
        files("grpcurl-ca.pem", &server_ca.pem()),
        files("grpcurl-client.pem", &gateway.cert),
        files("grpcurl-client.key", &gateway.key),
    );
    let addr = app.addr.to_string();
    let tls_args = [
        "-cacert",
        &ca_file,
        "-cert",
        &cert_file,
        "-key",
        &key_file,
        "-servername",
        "localhost",
    ];
    let listed = grpcurl(&[&tls_args[..], &[addr.as_str(), "list"]].concat());
    assert!(listed.contains("thermostat.v1.SetpointService"), "{listed}");
    let got = grpcurl(
        &[
            &tls_args[..],
            &[
                "-d",
                r#"{"sensorId": "north/room-1"}"#,
                &addr,
                "thermostat.v1.SetpointService/GetSetpoint",
            ],
        ]
        .concat(),
    );
    assert!(got.contains("\"buildingId\": \"north\""), "{got}");

    // Health stays plaintext on its own port, with no credentials.
    let health = Channel::from_shared(format!("http://{}", app.health_addr))
        .unwrap()
        .connect()
        .await
        .expect("health port");
    let status = tonic_health::pb::health_client::HealthClient::new(health)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await;
    assert!(status.is_ok(), "{status:?}");
    // ... and serves nothing else.
    let health = Channel::from_shared(format!("http://{}", app.health_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(
        get_north(&health, Some("t-admin-all")).await,
        Code::Unimplemented
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificates_are_reloaded_and_silent_handshakes_time_out() {
    let (first_ca, second_ca) = (Ca::new("first CA"), Ca::new("second CA"));
    let (dir, app) = secure_app(|config, dir| {
        tls_config(config, dir, &first_ca, &first_ca, ClientAuth::Optional);
    })
    .await;
    // Optional client certificates: a token alone is enough.
    let channel = tls_channel(&app, &first_ca, None)
        .await
        .expect("TLS without a client certificate");
    assert_eq!(
        get_north(&channel, Some("t-viewer-north")).await,
        Code::NotFound
    );
    assert_eq!(get_north(&channel, None).await, Code::Unauthenticated);

    // Rotate to a certificate from another CA: new connections get it.
    let rotated = second_ca.server();
    creds::write(dir.path(), "server.pem", &rotated.cert);
    creds::write(dir.path(), "server.key", &rotated.key);
    let switched = eventually(Duration::from_secs(10), || async {
        match tls_channel(&app, &second_ca, None).await {
            Ok(channel) => get_north(&channel, Some("t-viewer-north")).await == Code::NotFound,
            Err(_) => false,
        }
    })
    .await;
    assert!(switched, "the rotated certificate is served");

    // A client that connects and says nothing is dropped after the handshake timeout.
    use tokio::io::AsyncReadExt;
    let mut silent = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "closed, not left open: {read:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// The TLS settings `thermostat serve` takes from these flags.
fn tls_flags(args: &[&str]) -> thermostat::config::TlsConfig {
    use clap::{Args, FromArgMatches};
    let command = thermostat::config::TlsConfig::augment_args(clap::Command::new("serve"));
    let matches = command
        .try_get_matches_from([&["serve"], args].concat())
        .expect("valid flags");
    thermostat::config::TlsConfig::from_arg_matches(&matches).expect("TLS settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_without_a_client_ca_refuse_to_start() {
    let ca = Ca::new("server CA");
    let server = ca.server();
    let dir = tempfile::tempdir().expect("tempdir");
    let cert = creds::write(dir.path(), "server.pem", &server.cert);
    let key = creds::write(dir.path(), "server.key", &server.key);
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let mut config = TestApp::fresh_config().await;
    config.auth.auth_disabled = false;
    config.auth.auth_static_file = Some(creds::write(
        dir.path(),
        "identities.json",
        &creds::static_file(&static_entries()),
    ));
    let tls = ["--tls-cert-file", cert, "--tls-key-file", key];

    config.tls = tls_flags(&[&tls[..], &["--tls-client-auth", "required"]].concat());
    let refused = thermostat::Application::build(config.clone())
        .await
        .err()
        .expect("refused: no client certificate would ever be asked for");
    let why = thermostat::error::error_chain(&refused);
    assert!(
        why.contains("TLS_CLIENT_AUTH") && why.contains("TLS_CLIENT_CA_FILE"),
        "{why}"
    );

    // Without TLS_CLIENT_AUTH, TLS without a client CA is TLS with tokens.
    config.tls = tls_flags(&tls);
    let app = TestApp::spawn_with(config).await;
    let channel = tls_channel(&app, &ca, None).await.expect("TLS connects");
    assert_eq!(
        get_north(&channel, Some("t-viewer-north")).await,
        Code::NotFound
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_served_while_1100_silent_sockets_sit_on_the_tls_port() {
    const SILENT: usize = 1100;
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
    let (_dir, app) = secure_app(|config, dir| {
        tls_config(config, dir, &server_ca, &client_ca, ClientAuth::Required);
        // Longer than the test: the silent sockets sit through it, none timed out.
        config.tls.tls_handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let mut silent = Vec::with_capacity(SILENT);
    for _ in 0..SILENT / 100 {
        let batch = (0..100).map(|_| tokio::net::TcpStream::connect(app.addr));
        for socket in futures::future::join_all(batch).await {
            silent.push(socket.expect("connect"));
        }
    }

    let gateway = client_ca.client("gateway-7");
    let served = tokio::time::timeout(Duration::from_secs(5), async {
        let channel = tls_channel(&app, &server_ca, Some(&gateway)).await?;
        Ok::<_, tonic::transport::Error>(get_north(&channel, None).await)
    })
    .await;
    assert!(
        matches!(served, Ok(Ok(Code::NotFound))),
        "connected and answered within 5 s: {served:?}"
    );
    let open = silent.iter().filter(|s| still_open(s)).count();
    assert_eq!(open, SILENT, "the flood was still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_ca_refuses_the_next_call_on_an_open_connection() {
    let (server_ca, old_ca, new_ca) = (
        Ca::new("server CA"),
        Ca::new("old client CA"),
        Ca::new("new client CA"),
    );
    let (dir, app) = secure_app(|config, dir| {
        tls_config(config, dir, &server_ca, &old_ca, ClientAuth::Required);
    })
    .await;
    let channel = tls_channel(&app, &server_ca, Some(&old_ca.client("gateway-7")))
        .await
        .expect("mTLS connects");
    assert_eq!(get_north(&channel, None).await, Code::NotFound);
    let mut subscription = HeaterControlServiceClient::new(channel.clone())
        .subscribe_heater_commands(Request::new(pb::SubscribeHeaterCommandsRequest::default()))
        .await
        .expect("subscribes")
        .into_inner();

    creds::write(dir.path(), "client-ca.pem", &new_ca.pem());
    let rotated = eventually(Duration::from_secs(10), || async {
        match tls_channel(&app, &server_ca, Some(&new_ca.client("gateway-7"))).await {
            Ok(channel) => get_north(&channel, None).await == Code::NotFound,
            Err(_) => false,
        }
    })
    .await;
    assert!(rotated, "the new client CA is in use");

    // The same connection, its handshake made with the old CA's certificate.
    assert_eq!(get_north(&channel, None).await, Code::Unauthenticated);
    assert_eq!(
        get_north(&channel, Some("t-viewer-north")).await,
        Code::Unauthenticated,
        "a token does not make up for a certificate that no longer verifies"
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("the subscription ends");
    assert!(
        matches!(&ended, Some(Err(status)) if status.code() == Code::Unauthenticated),
        "{ended:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_that_expires_during_a_connection_is_refused_on_the_next_call() {
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
    let (_dir, app) = secure_app(|config, dir| {
        tls_config(config, dir, &server_ca, &client_ca, ClientAuth::Required);
    })
    .await;
    // Time enough to connect and call while it is valid, even on a busy machine.
    let expires = SystemTime::now() + Duration::from_secs(5);
    let gateway = client_ca.client_until("gateway-7", expires);
    let channel = tls_channel(&app, &server_ca, Some(&gateway))
        .await
        .expect("valid at connect");
    assert_eq!(get_north(&channel, None).await, Code::NotFound);

    // Past its last valid second, on the same connection.
    let expired = expires + Duration::from_secs(2);
    tokio::time::sleep(
        expired
            .duration_since(SystemTime::now())
            .unwrap_or_default(),
    )
    .await;
    assert_eq!(get_north(&channel, None).await, Code::Unauthenticated);
}
