//! What `/metrics` counts for readings, commands, dead letters and calls. Alone in its test
//! binary because the recorder is one per process: another service in the same binary would
//! add to the same series.

mod common;

use std::time::Duration;

use common::kafka::{Commands, Sensors, Topics};
use common::{eventually, http_get, sample, TestApp};

#[tokio::test]
async fn metrics_count_readings_commands_dead_letters_and_rpcs() {
    let app = TestApp::spawn().await;
    let topics = Topics::of(&app.config);
    let (status, before) = http_get(app.admin, "/metrics").await;
    assert_eq!(status, 200);
    let (status, _) = http_get(app.admin, "/nope").await;
    assert_eq!(status, 404);

    let mut client = app.setpoints().await;
    client
        .put_setpoint(common::put(common::setpoint("m1", "hq", 20.0), None))
        .await
        .unwrap();
    let _ = client
        .get_setpoint(thermostat::proto::v1::GetSetpointRequest {
            sensor_id: "absent".into(),
        })
        .await;
    // A made-up method (no credentials needed to call one): counted, under `other`.
    let mut grpc = tonic::client::Grpc::new(app.channel().await);
    grpc.ready().await.unwrap();
    let made_up = grpc
        .unary(
            tonic::Request::new(thermostat::proto::v1::GetSetpointRequest::default()),
            tonic::codegen::http::uri::PathAndQuery::from_static(
                "/thermostat.v1.SetpointService/MadeUp",
            ),
            tonic_prost::ProstCodec::<_, thermostat::proto::v1::Setpoint>::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(made_up.code(), tonic::Code::Unimplemented);
    let mut subscription = app
        .heaters()
        .await
        .subscribe_heater_commands(thermostat::proto::v1::SubscribeHeaterCommandsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let sensors = Sensors::new(&topics.sensors);
    let commands = Commands::new(&topics);
    sensors.reading("m1", 10.0, chrono::Utc::now()).await;
    sensors.raw(Some("m1"), b"\xff\xff").await;
    commands.expect().await;
    let delivered = tokio::time::timeout(Duration::from_secs(10), subscription.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(delivered.sensor_id, "m1");
    // One of each, counted once: this test's service is the only one writing the recorder.
    let counters = [
        "thermostat_readings_consumed_total",
        r#"thermostat_commands_emitted_total{command="On",reason="TooCold"}"#,
        r#"thermostat_dead_letters_total{reason="undecodable"}"#,
        "thermostat_subscriber_events_sent_total",
        r#"thermostat_grpc_requests_total{method="/thermostat.v1.SetpointService/PutSetpoint",code="Ok"}"#,
        r#"thermostat_grpc_requests_total{method="/thermostat.v1.SetpointService/GetSetpoint",code="NotFound"}"#,
        r#"thermostat_grpc_requests_total{method="other",code="Unimplemented"}"#,
    ];
    let present = [
        "thermostat_decision_latency_seconds_bucket",
        "thermostat_db_pool_connections",
        "thermostat_broker_reachable ",
        "thermostat_setpoint_writes_waiting ",
    ];
    let counted = eventually(Duration::from_secs(10), || async {
        let (_, now) = http_get(app.admin, "/metrics").await;
        counters
            .iter()
            .all(|c| sample(&now, c) == sample(&before, c) + 1.0)
            && present.iter().all(|p| now.contains(p))
    })
    .await;
    let (_, now) = http_get(app.admin, "/metrics").await;
    let moved: Vec<String> = counters
        .iter()
        .map(|c| format!("{c}: {} -> {}", sample(&before, c), sample(&now, c)))
        .collect();
    let missing: Vec<_> = present.iter().filter(|p| !now.contains(*p)).collect();
    assert!(
        counted,
        "not one more of each: {moved:#?}, not exported: {missing:?}"
    );
    assert!(!now.contains("MadeUp"), "a made-up path became a label");
}
