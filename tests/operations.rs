//! What operators rely on: health that tells the truth, reflection for grpcurl, clean shutdown.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{create_database, eventually, grpcurl, put, security, setpoint, PgCluster, TestApp};
use sqlx::Connection as _;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

async fn health(app: &TestApp, service: &str) -> Option<ServingStatus> {
    let mut client = HealthClient::new(app.channel().await);
    let response = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

/// Waits up to 15 s for each name's health to be as `expected`; otherwise the statuses last
/// seen.
async fn reaches(
    app: &TestApp,
    expected: &[(&str, ServingStatus)],
) -> Result<(), Vec<Option<ServingStatus>>> {
    let now = || async {
        let mut statuses = Vec::new();
        for (name, _) in expected {
            statuses.push(health(app, name).await);
        }
        statuses
    };
    let wanted: Vec<_> = expected.iter().map(|(_, status)| Some(*status)).collect();
    if eventually(Duration::from_secs(15), || async { now().await == wanted }).await {
        Ok(())
    } else {
        Err(now().await)
    }
}

async fn becomes(app: &TestApp, status: ServingStatus) -> bool {
    reaches(
        app,
        &[
            ("", status),
            ("thermostat.v1.SetpointService", status),
            ("thermostat.v1.HeaterControlService", status),
        ],
    )
    .await
    .is_ok()
}

#[tokio::test]
async fn health_is_not_serving_while_the_database_is_down() {
    let cluster = PgCluster::start();
    let mut config = TestApp::fresh_config().await;
    config.database.database_url = create_database(&cluster.admin_url).await;
    let app = TestApp::spawn_with(config).await;
    assert!(
        becomes(&app, ServingStatus::Serving).await,
        "never became SERVING"
    );
    // The Put writer now holds a connection, which the restart below ends.
    let mut client = app.setpoints().await;
    client
        .put_setpoint(put(setpoint("before", "b", 20.0), None))
        .await
        .unwrap();

    cluster.stop();
    assert!(
        becomes(&app, ServingStatus::NotServing).await,
        "still SERVING with the database down"
    );
    // Calls fail with UNAVAILABLE rather than hanging.
    let err = client
        .get_setpoint(thermostat::proto::v1::GetSetpointRequest {
            sensor_id: "s".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let err = client
        .put_setpoint(put(setpoint("down", "b", 20.0), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    cluster.restart();
    assert!(
        becomes(&app, ServingStatus::Serving).await,
        "did not recover after the database came back"
    );
    // Writes recover too, on a new connection.
    let written = client
        .put_setpoint(put(setpoint("after", "b", 20.0), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(written.revision, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heater_control_is_not_serving_while_the_broker_is_down() {
    let mut config = TestApp::fresh_config().await;
    let mock = common::kafka::on_mock_cluster(&mut config);
    let app = TestApp::spawn_with(config).await;
    use ServingStatus::{NotServing, Serving};
    let with_heaters = |heaters| {
        [
            ("", Serving),
            ("thermostat.v1.SetpointService", Serving),
            ("thermostat.v1.HeaterControlService", heaters),
        ]
    };
    reaches(&app, &with_heaters(Serving))
        .await
        .expect("never SERVING");

    mock.broker_down(1).expect("broker down");
    // The setpoint API, and readiness (""), do not depend on the broker.
    reaches(&app, &with_heaters(NotServing))
        .await
        .expect("with the broker down");

    mock.broker_up(1).expect("broker up");
    reaches(&app, &with_heaters(Serving))
        .await
        .expect("after the broker came back");
    app.stop().await;
}

#[tokio::test]
async fn shutdown_reports_not_serving_and_exits_cleanly() {
    let app = TestApp::spawn().await;
    assert!(becomes(&app, ServingStatus::Serving).await);
    let mut watch = HealthClient::new(app.channel().await)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    app.shutdown.cancel();
    // Watchers learn NOT_SERVING before the server goes away.
    let next = tokio::time::timeout(Duration::from_secs(5), watch.message()).await;
    let status = next
        .expect("no health update on shutdown")
        .unwrap()
        .unwrap()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_puts_and_gets_through_reflection() {
    let app = TestApp::spawn().await;
    let addr = app.addr.to_string();
    let services = grpcurl(&["-plaintext", &addr, "list"]);
    for service in [
        "thermostat.v1.SetpointService",
        "thermostat.v1.HeaterControlService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} missing from {services}"
        );
    }
    let described = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "thermostat.v1.SetpointService",
    ]);
    assert!(described.contains("rpc PutSetpoint"), "{described}");
    let message = grpcurl(&["-plaintext", &addr, "describe", "thermostat.v1.Setpoint"]);
    assert!(message.contains("desired_celsius"), "{message}");

    let put = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"setpoint": {"sensorId": "lobby-1", "buildingId": "hq", "desiredCelsius": 21, "upDeltaCelsius": 0.5, "downDeltaCelsius": 1}}"#,
        &addr,
        "thermostat.v1.SetpointService/PutSetpoint",
    ]);
    let put: serde_json::Value = serde_json::from_str(&put).expect("JSON from grpcurl");
    assert_eq!(put["revision"], "1");
    let got = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"sensorId": "lobby-1"}"#,
        &addr,
        "thermostat.v1.SetpointService/GetSetpoint",
    ]);
    let got: serde_json::Value = serde_json::from_str(&got).expect("JSON from grpcurl");
    assert_eq!(got["desiredCelsius"], 21.0);
    assert_eq!(got["downDeltaCelsius"], 1.0);
    assert_eq!(got["buildingId"], "hq");

    // An override as the README writes it: levels by name, the expiry in RFC 3339.
    let expire = (chrono::Utc::now() + chrono::TimeDelta::minutes(10)).format("%FT%TZ");
    let written = grpcurl(&[
        "-plaintext",
        "-d",
        &format!(
            r#"{{"sensorId": "lobby-1", "level": "SETPOINT_LEVEL_OVERRIDE", "desiredCelsius": 23, "upDeltaCelsius": 0.5, "downDeltaCelsius": 0.5, "expireTime": "{expire}", "reason": "meeting"}}"#
        ),
        &addr,
        "thermostat.v1.SetpointService/WriteSetpointLevel",
    ]);
    let written: serde_json::Value = serde_json::from_str(&written).expect("JSON from grpcurl");
    assert_eq!(
        written["effectiveLevel"], "SETPOINT_LEVEL_OVERRIDE",
        "{written}"
    );
    assert_eq!(written["effectiveUntil"], expire.to_string(), "{written}");
    let relinquished = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"sensorId": "lobby-1", "level": "SETPOINT_LEVEL_OVERRIDE", "reason": "meeting over"}"#,
        &addr,
        "thermostat.v1.SetpointService/RelinquishSetpointLevel",
    ]);
    let relinquished: serde_json::Value =
        serde_json::from_str(&relinquished).expect("JSON from grpcurl");
    assert_eq!(
        relinquished["effectiveLevel"], "SETPOINT_LEVEL_DEFAULT",
        "{relinquished}"
    );
    assert_eq!(relinquished["revision"], "3");

    // A bad request's details, decoded through reflection: which field, and why.
    let refused = common::grpcurl_output(&[
        "-plaintext",
        "-d",
        r#"{"setpoint": {"sensorId": "lobby-1", "buildingId": "hq", "desiredCelsius": 900}}"#,
        &addr,
        "thermostat.v1.SetpointService/PutSetpoint",
    ]);
    let printed = String::from_utf8_lossy(&refused.stderr).into_owned()
        + &String::from_utf8_lossy(&refused.stdout);
    for expected in [
        "InvalidArgument",
        "type.googleapis.com/google.rpc.ErrorInfo",
        "\"reason\":\"INVALID_FIELD\"",
        "type.googleapis.com/google.rpc.BadRequest",
        "\"field\":\"setpoint.desired_celsius\"",
    ] {
        assert!(printed.contains(expected), "{expected} not in {printed}");
    }

    // As docs/operations.md writes them: the whole server, and the service that needs the broker.
    for request in ["{}", r#"{"service": "thermostat.v1.HeaterControlService"}"#] {
        let health = grpcurl(&[
            "-plaintext",
            "-d",
            request,
            &addr,
            "grpc.health.v1.Health/Check",
        ]);
        let health: serde_json::Value = serde_json::from_str(&health).expect("JSON from grpcurl");
        assert_eq!(health["status"], "SERVING", "{request}");
    }
}

/// Runs the `thermostat` binary with the Kafka settings of `topics`.
fn thermostat(topics: &common::kafka::Topics, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_thermostat"))
        .args(args)
        .env("KAFKA_BROKERS", common::kafka::brokers())
        .env("SENSOR_TOPIC", &topics.sensors)
        .env("COMMAND_TOPIC", &topics.commands)
        .env("DEAD_LETTER_TOPIC", &topics.dead_letters)
        .env("TOPIC_PARTITIONS", topics.partitions.to_string())
        .output()
        .expect("run thermostat")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_create_topics_and_send_readings_by_hand() {
    let topics = common::kafka::Topics {
        sensors: common::unique_name("sensors"),
        commands: common::unique_name("commands"),
        dead_letters: common::unique_name("dlq"),
        group: common::unique_name("group"),
        partitions: 2,
    };
    let created = thermostat(&topics, &["create-topics"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    // Idempotent.
    assert!(thermostat(&topics, &["create-topics"]).status.success());

    let database_url = create_database(&common::env("THERMOSTAT_TEST_PG_URL")).await;
    let app = TestApp::spawn_with(common::serve_config(database_url, &topics)).await;
    let commands = common::kafka::Commands::new(&topics);
    app.setpoints()
        .await
        .put_setpoint(common::put(common::setpoint("room-1", "hq", 21.0), None))
        .await
        .unwrap();
    let sent = thermostat(&topics, &["send-reading", "room-1", "-3.5"]);
    assert!(
        sent.status.success(),
        "{}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let on = commands.expect().await;
    assert_eq!(on.command(), thermostat::proto::v1::HeaterCommand::On);
    assert_eq!(on.temperature_celsius, Some(-3.5));

    let bad = thermostat(&topics, &["send-reading", "bad id", "20"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sensor_id"));
}

#[tokio::test]
async fn the_database_url_can_come_from_a_mounted_file() {
    let mut config = TestApp::fresh_config().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("DATABASE_URL");
    // As a Secret mounts it: the URL, maybe with a newline; DATABASE_URL leads nowhere.
    std::fs::write(&file, format!("{}\n", config.database.database_url)).unwrap();
    config.database.database_url = "postgres://nobody@127.0.0.1:1/nowhere".into();
    config.database.database_url_file = Some(file.clone());
    let (_app, _client) = common::spawn_with_setpoint(config.clone(), "s").await;

    // A file that is not there: the start fails, naming the option and the file.
    config.database.database_url_file = Some(dir.path().join("absent"));
    let refused = thermostat::Application::build(config)
        .await
        .err()
        .expect("started without its database URL");
    let chain = thermostat::error::error_chain(&refused);
    assert!(
        chain.contains("DATABASE_URL_FILE") && chain.contains("absent"),
        "{chain}"
    );
}

#[tokio::test]
async fn the_database_connection_can_be_tls_with_a_verified_server() {
    let cluster = PgCluster::start();
    let ca = security::Ca::new("database CA");
    cluster.enable_tls(&ca.server()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = security::write(dir.path(), "ca.pem", &ca.pem());
    let database_url = create_database(&cluster.admin_url).await;
    let verified = |root: &std::path::Path| {
        format!(
            "{database_url}?sslmode=verify-full&sslrootcert={}",
            root.display()
        )
    };

    // A server certificate that does not chain to the given root: the start fails.
    let stranger = security::write(dir.path(), "other.pem", &security::Ca::new("other").pem());
    let mut config = TestApp::fresh_config().await;
    config.database.database_url = verified(&stranger);
    let refused = thermostat::Application::build(config.clone())
        .await
        .err()
        .expect("connected to a server it could not verify");
    let chain = thermostat::error::error_chain(&refused);
    assert!(chain.to_lowercase().contains("certificate"), "{chain}");

    // The right root: the service runs, and its connections are TLS.
    config.database.database_url = verified(&ca_file);
    let (_app, _client) = common::spawn_with_setpoint(config, "s").await;
    let mut admin = sqlx::PgConnection::connect(&cluster.admin_url)
        .await
        .unwrap();
    let name = database_url.rsplit('/').next().unwrap();
    let (tls, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
         FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.datname = $1",
    )
    .bind(name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        tls > 0 && plain == 0,
        "{tls} TLS and {plain} plain connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_topic_that_can_lose_last_commands_is_refused_unless_allowed() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let mut config = TestApp::fresh_config().await;
    // A command topic made by hand with the broker's defaults: delete after 7 days.
    let plain = common::unique_name("commands-plain");
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::kafka::brokers())
        .create()
        .expect("admin client");
    let created = admin
        .create_topics(
            &[NewTopic::new(&plain, 2, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    assert!(created[0].is_ok(), "{created:?}");
    config.kafka.command_topic = plain;

    let refused = thermostat::startup::Application::build(config.clone())
        .await
        .err()
        .map(|e| thermostat::error::error_chain(&e))
        .expect("the start is refused");
    for expected in [
        "cleanup.policy",
        "last command",
        "ALLOW_COMMAND_TOPIC_DELETION",
    ] {
        assert!(
            refused.contains(expected),
            "{expected:?} not in {refused:?}"
        );
    }

    config.kafka.allow_command_topic_deletion = true;
    let app = TestApp::spawn_with(config).await;
    app.stop().await;
}

/// Issue 24: browsers call the API with gRPC-Web (the generated TypeScript client's scenario
/// does, over HTTP/1.1); pages of the origins GRPC_WEB_ALLOWED_ORIGINS lists pass CORS, others
/// do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_answers_cors_for_the_allowed_origins_only() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = TestApp::fresh_config().await;
    config.limits.grpc_web_allowed_origins = vec!["https://dash.example".parse().unwrap()];
    let app = TestApp::spawn_with(config).await;
    let preflight = |origin: &'static str| {
        let addr = app.addr;
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "OPTIONS /thermostat.v1.SetpointService/GetSetpoint HTTP/1.1\r\nHost: test\r\n\
                 Origin: {origin}\r\nAccess-Control-Request-Method: POST\r\n\
                 Access-Control-Request-Headers: content-type,x-grpc-web,authorization\r\n\
                 Connection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut response = String::new();
            stream.read_to_string(&mut response).await.unwrap();
            response.to_ascii_lowercase()
        }
    };
    let allowed = preflight("https://dash.example").await;
    assert!(
        allowed.contains("access-control-allow-origin: https://dash.example"),
        "{allowed}"
    );
    assert!(allowed.contains("authorization"), "{allowed}");
    let other = preflight("https://elsewhere.example").await;
    assert!(!other.contains("access-control-allow-origin"), "{other}");
}
