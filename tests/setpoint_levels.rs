//! Priority levels (issue 25): an OVERRIDE decides over the DEFAULT at once, expires by itself
//! and turns the heater back without a reading, once across replicas, and survives a restart;
//! SAFETY is for administrators. Against the real database and broker.

mod common;

use std::time::Duration;

use chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use common::kafka::{Commands, Sensors, Topics};
use common::security::{authorized, code, put_as, secure_app};
use common::{put, setpoint, TestApp};
use thermostat::proto::timestamp;
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::setpoint_service_client::SetpointServiceClient;
use tonic::transport::Channel;
use tonic::Code;

type H = pb::HeaterCommand;
type L = pb::SetpointLevel;

/// A band of 18 ± 0.5 °C at the DEFAULT level.
async fn default_of_18(app: &TestApp, sensor: &str) {
    let mut band = setpoint(sensor, "hq", 18.0);
    band.up_delta_celsius = 0.5;
    band.down_delta_celsius = 0.5;
    app.setpoints()
        .await
        .put_setpoint(put(band, None))
        .await
        .expect("put");
}

fn override_of(
    sensor: &str,
    desired: f64,
    expire: Option<DateTime<Utc>>,
) -> pb::WriteSetpointLevelRequest {
    pb::WriteSetpointLevelRequest {
        sensor_id: sensor.into(),
        level: L::Override.into(),
        desired_celsius: desired,
        up_delta_celsius: 0.5,
        down_delta_celsius: 0.5,
        expire_time: expire.map(timestamp),
        reason: "meeting in room 204".into(),
        ..Default::default()
    }
}

fn levels_of(sensor: &str) -> pb::GetSetpointLevelsRequest {
    pb::GetSetpointLevelsRequest {
        sensor_id: sensor.into(),
    }
}

fn decided(event: &pb::HeaterCommandEvent) -> (H, L, i64) {
    (
        event.command(),
        event.setpoint_level(),
        event.level_revision,
    )
}

fn at(t: &prost_types::Timestamp) -> DateTime<Utc> {
    thermostat::proto::from_timestamp(t).expect("a time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_override_decides_at_once_and_its_expiry_turns_the_heater_back_without_a_reading() {
    let config = TestApp::fresh_config().await;
    let topics = Topics::of(&config);
    let (sensors, commands) = (Sensors::new(&topics.sensors), Commands::new(&topics));
    let app = TestApp::spawn_with(config).await;
    default_of_18(&app, "room-204").await;
    sensors.reading("room-204", 20.0, Utc::now()).await;
    assert_eq!(decided(&commands.expect().await), (H::Off, L::Default, 1));

    // Hold 23 °C for 4 s: ON at once, on the reading already there. (Times are stored to the
    // microsecond.)
    let expire = (Utc::now() + TimeDelta::seconds(4)).trunc_subsecs(3);
    let mut client = app.setpoints().await;
    let levels = client
        .write_setpoint_level(override_of("room-204", 23.0, Some(expire)))
        .await
        .expect("override")
        .into_inner();
    assert_eq!(levels.revision, 2);
    assert_eq!(levels.effective_level(), L::Override);
    let written: Vec<L> = levels.levels.iter().map(|l| l.level()).collect();
    assert_eq!(written, [L::Override, L::Default], "highest first");
    assert_eq!(levels.effective_until.as_ref().map(at), Some(expire));
    assert_eq!(decided(&commands.expect().await), (H::On, L::Override, 2));
    let state = app
        .heaters()
        .await
        .get_sensor_state(pb::GetSensorStateRequest {
            sensor_id: "room-204".into(),
        })
        .await
        .expect("state")
        .into_inner();
    assert_eq!(state.setpoint_level(), L::Override);
    assert_eq!(
        state.effective_setpoint.map(|s| s.desired_celsius),
        Some(23.0)
    );
    assert_eq!(
        state.setpoint.map(|s| s.desired_celsius),
        Some(18.0),
        "the DEFAULT level"
    );

    // No reading from now on: the expiry alone turns it back to the DEFAULT level's OFF.
    let off = commands.expect().await;
    assert_eq!(decided(&off), (H::Off, L::Default, 1));
    let decided_at = at(off.decided_at.as_ref().expect("decided_at"));
    assert!(
        decided_at >= expire,
        "not before the expiry: {decided_at} < {expire}"
    );
    assert!(
        decided_at - expire < TimeDelta::seconds(5),
        "at the expiry, not at some later reading: {decided_at} against {expire}"
    );

    // Recorded as the system's, with the level it emptied.
    let history = client
        .list_setpoint_history(pb::ListSetpointHistoryRequest {
            sensor_id: "room-204".into(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner()
        .entries;
    let newest = &history[0];
    assert_eq!(
        (
            newest.revision,
            newest.deleted,
            newest.level(),
            newest.changed_by.as_str(),
            newest.reason.as_str()
        ),
        (3, true, L::Override, "system", "expired")
    );
    assert_eq!(history[1].level(), L::Override);
    assert_eq!(history[1].expire_time.as_ref().map(at), Some(expire));
    let now = client
        .get_setpoint_levels(levels_of("room-204"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (now.revision, now.effective_level(), now.levels.len()),
        (3, L::Default, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_record_one_expiry() {
    let config = TestApp::fresh_config().await;
    let first = TestApp::spawn_with(config.clone()).await;
    let second = TestApp::spawn_with(config).await;
    let mut client = first.setpoints().await;
    let expire = Utc::now() + TimeDelta::seconds(2);
    for sensor in ["room-1", "room-2", "room-3"] {
        default_of_18(&first, sensor).await;
        client
            .write_setpoint_level(override_of(sensor, 23.0, Some(expire)))
            .await
            .expect("expiring override");
    }
    // Both replicas run the upkeep every second, each in its own transactions.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let expiries: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sensor_id, count(*) FROM setpoint_history WHERE changed_by = 'system' \
         GROUP BY sensor_id ORDER BY sensor_id",
    )
    .fetch_all(&mut first.db().await)
    .await
    .unwrap();
    let once: Vec<(String, i64)> = ["room-1", "room-2", "room-3"]
        .map(|s| (s.to_owned(), 1))
        .into();
    assert_eq!(expiries, once, "one expiry each, however many replicas");
    second.stop().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_an_override() {
    let config = TestApp::fresh_config().await;
    let topics = Topics::of(&config);
    let (sensors, commands) = (Sensors::new(&topics.sensors), Commands::new(&topics));
    let app = TestApp::spawn_with(config.clone()).await;
    default_of_18(&app, "room-2").await;
    app.setpoints()
        .await
        .write_setpoint_level(override_of("room-2", 22.0, None))
        .await
        .expect("lasting override");
    app.stop().await;

    // The override is stored, and the restarted loop decides on it.
    let restarted = TestApp::spawn_with(config).await;
    let levels = restarted
        .setpoints()
        .await
        .get_setpoint_levels(levels_of("room-2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(levels.effective_level(), L::Override);
    sensors.reading("room-2", 20.0, Utc::now()).await;
    assert_eq!(decided(&commands.expect().await), (H::On, L::Override, 2));
}

async fn write_as(
    client: &mut SetpointServiceClient<Channel>,
    token: &str,
    request: pb::WriteSetpointLevelRequest,
) -> Result<pb::SetpointLevels, tonic::Status> {
    client
        .write_setpoint_level(authorized(request, Some(token)))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_are_checked_and_safety_is_for_administrators() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    let mut client = app.setpoints().await;
    put_as(
        &mut client,
        "t-operator-north",
        "north/room-1",
        "north",
        20.0,
    )
    .await
    .expect("put");
    let sensor = "north/room-1";
    let safety = pb::WriteSetpointLevelRequest {
        level: L::Safety.into(),
        ..override_of(sensor, 12.0, None)
    };
    let refused = write_as(&mut client, "t-operator-north", safety.clone()).await;
    assert_eq!(code(&refused), Code::PermissionDenied);
    let written = write_as(&mut client, "t-admin-north", safety)
        .await
        .expect("admin");
    assert_eq!(written.effective_level(), L::Safety);

    // An override below it is written, but SAFETY still decides.
    let under = write_as(
        &mut client,
        "t-operator-north",
        override_of(sensor, 23.0, None),
    )
    .await
    .expect("override");
    assert_eq!((under.effective_level(), under.revision), (L::Safety, 3));
    let viewer = write_as(
        &mut client,
        "t-viewer-north",
        override_of(sensor, 23.0, None),
    )
    .await;
    assert_eq!(code(&viewer), Code::PermissionDenied);
    let other = write_as(
        &mut client,
        "t-operator-south",
        override_of(sensor, 23.0, None),
    )
    .await;
    assert_eq!(
        code(&other),
        Code::NotFound,
        "another building's sensor is not there"
    );

    for (bad, expected) in [
        (
            override_of(sensor, 23.0, Some(Utc::now() - TimeDelta::seconds(1))),
            Code::InvalidArgument,
        ),
        (
            override_of(sensor, 23.0, Some(Utc::now() + TimeDelta::days(400))),
            Code::InvalidArgument,
        ),
        (override_of(sensor, 900.0, None), Code::InvalidArgument),
        (
            pb::WriteSetpointLevelRequest {
                level: L::Default.into(),
                ..override_of(sensor, 23.0, None)
            },
            Code::InvalidArgument,
        ),
        (
            pb::WriteSetpointLevelRequest {
                expected_revision: Some(1),
                ..override_of(sensor, 23.0, None)
            },
            Code::Aborted,
        ),
        (override_of("north/room-9", 23.0, None), Code::NotFound),
    ] {
        let got = write_as(&mut client, "t-operator-north", bad.clone()).await;
        assert_eq!(code(&got), expected, "{bad:?}: {got:?}");
    }

    // Deleting the setpoint would drop SAFETY with it: for administrators only.
    let deleter = client.clone();
    let delete = |token: &'static str| {
        let mut client = deleter.clone();
        async move {
            client
                .delete_setpoint(authorized(
                    pb::DeleteSetpointRequest {
                        sensor_id: sensor.into(),
                        ..Default::default()
                    },
                    Some(token),
                ))
                .await
        }
    };
    assert_eq!(
        code(&delete("t-operator-north").await),
        Code::PermissionDenied
    );

    // Relinquishing SAFETY lets the override decide; an empty level is NOT_FOUND.
    let relinquish = |level: L, token: &'static str| {
        let mut client = client.clone();
        async move {
            client
                .relinquish_setpoint_level(authorized(
                    pb::RelinquishSetpointLevelRequest {
                        sensor_id: sensor.into(),
                        level: level.into(),
                        reason: "thawed".into(),
                        ..Default::default()
                    },
                    Some(token),
                ))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    assert_eq!(
        code(&relinquish(L::Safety, "t-operator-north").await),
        Code::PermissionDenied
    );
    let after = relinquish(L::Safety, "t-admin-north")
        .await
        .expect("relinquished");
    assert_eq!((after.effective_level(), after.revision), (L::Override, 4));
    assert_eq!(
        code(&relinquish(L::Safety, "t-admin-north").await),
        Code::NotFound
    );

    // A retry of a write whose expiry has passed since is answered, not refused.
    let retried = pb::WriteSetpointLevelRequest {
        request_id: "hold-1".into(),
        ..override_of(
            sensor,
            22.0,
            Some(Utc::now() + TimeDelta::milliseconds(1500)),
        )
    };
    write_as(&mut client, "t-operator-north", retried.clone())
        .await
        .expect("first attempt");
    tokio::time::sleep(Duration::from_secs(2)).await;
    write_as(&mut client, "t-operator-north", retried)
        .await
        .expect("the retry is answered");

    // Deleting the setpoint deletes its levels: created again, it starts from DEFAULT alone.
    delete("t-operator-north").await.expect("deleted");
    put_as(&mut client, "t-operator-north", sensor, "north", 20.0)
        .await
        .expect("put again");
    let fresh = client
        .get_setpoint_levels(authorized(levels_of(sensor), Some("t-viewer-north")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (fresh.effective_level(), fresh.levels.len()),
        (L::Default, 1)
    );
}

/// The rule itself, `winning_level(sensor, at)` in the database, at chosen times: the highest
/// level present whose expiry is after `at`; none (DEFAULT decides) when all have expired. An
/// expiry is the first instant the level no longer counts.
#[tokio::test]
async fn the_highest_level_not_expired_at_a_time_wins() {
    let app = TestApp::spawn().await;
    default_of_18(&app, "s").await;
    // A day ahead: the upkeep leaves them alone during the test.
    let t0 = (Utc::now() + TimeDelta::days(1)).trunc_subsecs(0);
    let mut db = app.db().await;
    for (level, expire) in [
        (4i16, Some(t0 + TimeDelta::seconds(5))),
        (3, Some(t0 + TimeDelta::seconds(10))),
    ] {
        sqlx::query(
            "INSERT INTO setpoint_levels (sensor_id, level, desired_celsius, up_delta_celsius, \
                 down_delta_celsius, expire_time, revision, update_time, updated_by) \
             VALUES ('s', $1, 20, 1, 1, $2, 1, now(), 'test')",
        )
        .bind(level)
        .bind(expire)
        .execute(&mut db)
        .await
        .unwrap();
    }
    let winner_at = |at: DateTime<Utc>| {
        let url = app.database_url.clone();
        async move {
            let mut db = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                .await
                .unwrap();
            sqlx::query_scalar::<_, i16>("SELECT level FROM winning_level('s', $1)")
                .bind(at)
                .fetch_optional(&mut db)
                .await
                .unwrap()
        }
    };
    for (at, expected) in [
        (t0, Some(4)),
        (
            t0 + TimeDelta::seconds(5) - TimeDelta::microseconds(1),
            Some(4),
        ),
        (t0 + TimeDelta::seconds(5), Some(3)),
        (
            t0 + TimeDelta::seconds(10) - TimeDelta::microseconds(1),
            Some(3),
        ),
        (t0 + TimeDelta::seconds(10), None),
        (t0 + TimeDelta::seconds(1000), None),
    ] {
        assert_eq!(winner_at(at).await, expected, "at {at}");
    }
    // A level without an expiry counts for ever.
    sqlx::query("UPDATE setpoint_levels SET expire_time = NULL WHERE level = 3")
        .execute(&mut db)
        .await
        .unwrap();
    assert_eq!(winner_at(t0 + TimeDelta::seconds(1000)).await, Some(3));
}
