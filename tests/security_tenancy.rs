//! Tenancy under a hostile tenant: one building's callers cannot make the service work for
//! every building, nor keep other tenants from their data.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::eventually;
use common::kafka::{write_command, written_command, Sensors, Topics};
use common::security::{authorized, secure_app};
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::heater_control_service_client::HeaterControlServiceClient;
use tonic::Code;

fn subscribe(token: &str, building: &str) -> tonic::Request<pb::SubscribeHeaterCommandsRequest> {
    authorized(
        pb::SubscribeHeaterCommandsRequest {
            building_id: building.into(),
            send_initial_state: true,
            ..Default::default()
        },
        Some(token),
    )
}

/// Issue 23 (2): snapshots were built over every building and scoped only when sent, so a
/// viewer of an empty building made the engine walk every heater with each subscribe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_costs_what_the_callers_buildings_hold_and_subscribes_are_limited() {
    let (_dir, app) = secure_app(|config, _| {
        config.limits.subscribe_rate_limit = 1;
        config.limits.subscribe_burst = 8;
    })
    .await;
    // South has 500 heaters with a last command; north has none.
    let commands = Sensors::new(&Topics::of(&app.config).commands);
    for n in 0..500 {
        let sensor = format!("south/room-{n}");
        write_command(
            &commands,
            written_command(&sensor, "south", 1, pb::HeaterCommand::On),
        )
        .await;
    }
    let mut heaters = HeaterControlServiceClient::new(app.channel().await);
    let cached = eventually(Duration::from_secs(20), || async {
        let Ok(stream) = heaters
            .clone()
            .subscribe_heater_commands(subscribe("t-viewer-all", ""))
            .await
        else {
            return false;
        };
        let mut stream = stream.into_inner();
        let mut snapshot = 0;
        while let Ok(Ok(Some(event))) =
            tokio::time::timeout(Duration::from_millis(500), stream.message()).await
        {
            snapshot += usize::from(event.snapshot);
        }
        snapshot == 500
    })
    .await;
    assert!(cached, "the engine never held south's 500 last commands");

    let examined = || {
        app.control
            .stats()
            .snapshot_examined
            .load(Ordering::Relaxed)
    };
    let before = examined();
    // North's viewer subscribes with its initial state until refused.
    let mut opened = 0;
    let refused = loop {
        match heaters
            .subscribe_heater_commands(subscribe("t-viewer-north", ""))
            .await
        {
            Ok(stream) => {
                opened += 1;
                let mut stream = stream.into_inner();
                // Nothing of north's: the stream stays silent.
                let first = tokio::time::timeout(Duration::from_millis(50), stream.message()).await;
                assert!(first.is_err(), "north got {first:?}");
            }
            Err(status) => break status,
        }
        assert!(opened <= 8, "subscribes are not rate limited");
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("rate limit"), "{refused:?}");
    assert_eq!(opened, 8, "the burst");
    assert_eq!(
        examined() - before,
        0,
        "north's snapshots looked at south's heaters"
    );
    // A viewer of south is answered from south's heaters only, once each.
    let before = examined();
    let mut stream = heaters
        .subscribe_heater_commands(subscribe("t-admin-all", "south"))
        .await
        .unwrap()
        .into_inner();
    let mut snapshot = 0;
    while snapshot < 500 {
        let event = stream.message().await.unwrap().unwrap();
        snapshot += usize::from(event.snapshot);
    }
    assert!(examined() - before <= 500 + 4, "{}", examined() - before);

    // A filter of more ids than any building needs is refused before any work.
    let many = pb::SubscribeHeaterCommandsRequest {
        sensor_ids: (0..1001).map(|n| format!("south/room-{n}")).collect(),
        ..Default::default()
    };
    let status = heaters
        .subscribe_heater_commands(authorized(many, Some("t-viewer-all")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("sensor_ids"), "{status:?}");
}
