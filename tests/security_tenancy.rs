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
    // North's viewer subscribes with its initial state until refused, back to back: a second
    // of waiting would earn it another subscribe.
    let mut streams = Vec::new();
    let refused = loop {
        match heaters
            .subscribe_heater_commands(subscribe("t-viewer-north", ""))
            .await
        {
            Ok(stream) => streams.push(stream.into_inner()),
            Err(status) => break status,
        }
        assert!(streams.len() <= 8, "subscribes are not rate limited");
    };
    let opened = streams.len();
    // Nothing of north's: every stream stays silent.
    for stream in &mut streams {
        let first = tokio::time::timeout(Duration::from_millis(50), stream.message()).await;
        assert!(first.is_err(), "north got {first:?}");
    }
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("rate limit on subscribes"),
        "{refused:?}"
    );
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

/// Issue 23 (3): reads were unlimited and shared the pool with everything else, so one viewer
/// could hold every connection: other tenants' calls, the control loop's statements and the
/// health check's ping then failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_cannot_take_the_databases_connections_from_other_tenants() {
    let (_dir, app) = secure_app(|config, _| {
        config.database.database_max_connections = 6;
        config.database.database_max_reads = Some(4);
        config.database.database_acquire_timeout = Duration::from_secs(2);
        config.limits.max_reads_per_identity = 2;
    })
    .await;
    let mut admin = app.setpoints().await;
    for (sensor, building) in [("north/room-1", "north"), ("south/room-1", "south")] {
        common::security::put_as(&mut admin, "t-admin-all", sensor, building, 20.0)
            .await
            .expect("admin puts");
    }
    // Every read of the setpoints table waits behind a lock of ours, holding its connection.
    let mut db = app.db().await;
    sqlx::query("BEGIN").execute(&mut db).await.unwrap();
    sqlx::query("LOCK TABLE setpoints IN ACCESS EXCLUSIVE MODE")
        .execute(&mut db)
        .await
        .unwrap();
    let read = |token: &'static str, sensor: &'static str| {
        let mut client = admin.clone();
        tokio::spawn(async move {
            let request = pb::GetSetpointRequest {
                sensor_id: sensor.into(),
            };
            client.get_setpoint(authorized(request, Some(token))).await
        })
    };
    // North's viewer floods; so do three more identities.
    let north: Vec<_> = (0..20)
        .map(|_| read("t-viewer-north", "north/room-1"))
        .collect();
    let others: Vec<_> = [
        ("t-viewer-all", "south/room-1"),
        ("t-admin-north", "north/room-1"),
        ("t-operator-all", "south/room-1"),
    ]
    .into_iter()
    .flat_map(|(token, sensor)| (0..4).map(move |_| (token, sensor)))
    .map(|(token, sensor)| read(token, sensor))
    .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The connections beyond the reads' share stay free: the health check's ping answers.
    assert!(
        app.store.ping(Duration::from_secs(1)).await,
        "reads took every connection"
    );
    // North's reads beyond its share are refused while the lock holds; a read that reached the
    // service only after the COMMIT would pass. Bounded, so a missing limit fails below.
    let _ = eventually(Duration::from_secs(10), || async {
        north.iter().filter(|call| call.is_finished()).count() >= 18
    })
    .await;
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    let codes = |calls: Vec<tokio::task::JoinHandle<Result<_, tonic::Status>>>| async move {
        let mut codes = Vec::new();
        for call in calls {
            codes.push(common::security::code(&call.await.unwrap()));
        }
        codes
    };
    let north = codes(north).await;
    let refused = north
        .iter()
        .filter(|c| **c == Code::ResourceExhausted)
        .count();
    assert!(
        refused >= 18,
        "north ran more than 2 reads at once: {north:?}"
    );
    assert!(
        north
            .iter()
            .all(|c| [Code::Ok, Code::ResourceExhausted].contains(c)),
        "{north:?}"
    );
    // The others waited for a turn, at most the acquire timeout, and were answered.
    let others = codes(others).await;
    assert!(
        others
            .iter()
            .all(|c| [Code::Ok, Code::ResourceExhausted].contains(c)),
        "{others:?}"
    );
    assert!(others.contains(&Code::Ok), "{others:?}");
}

/// Issue 23 (9): a reading stamped minutes ahead was accepted, and every genuine reading of the
/// sensor after it was ignored as out of order until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reading_stamped_ahead_cannot_silence_a_sensor() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    let mut admin = app.setpoints().await;
    common::security::put_as(&mut admin, "t-admin-all", "north/room-1", "north", 20.0)
        .await
        .expect("admin puts");
    let topics = Topics::of(&app.config);
    let sensors = Sensors::new(&topics.sensors);
    let commands = common::kafka::Commands::new(&topics);
    // A forged reading four minutes ahead: hot, so the heater goes OFF.
    let now = chrono::Utc::now();
    sensors
        .reading("north/room-1", 30.0, now + chrono::TimeDelta::minutes(4))
        .await;
    // The genuine readings that follow: cold.
    sensors.reading("north/room-1", 10.0, now).await;
    let first = commands.expect().await;
    assert_eq!(
        first.command,
        pb::HeaterCommand::On as i32,
        "the forged reading decided: {first:?}"
    );
    let letters = common::kafka::TopicReader::new(&topics.dead_letters, 1)
        .read_all(Duration::from_secs(2))
        .await;
    let reasons: Vec<_> = letters
        .iter()
        .filter_map(|m| common::kafka::header(m, "thermostat-dead-letter-reason"))
        .collect();
    assert_eq!(reasons, ["future_time"]);
}
