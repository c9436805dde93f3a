//! Who may do what: the authorization matrix over roles × buildings × every RPC, writes that
//! record who made them and never cross into another building, and live commands that reach
//! only the subscribers of their building.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;
use common::kafka::{Sensors, Topics};
use common::security::{authorized, code, put_as, secure_app, STATIC};
use common::{eventually, put, setpoint, TestApp};
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::heater_control_service_client::HeaterControlServiceClient;
use thermostat::proto::v1::setpoint_service_client::SetpointServiceClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Code, Request};

/// The revisions of `sensor`'s history that the holder of `token` sees, and who made them.
async fn history_as(
    client: &mut SetpointServiceClient<Channel>,
    token: &str,
    sensor: &str,
) -> Vec<(i64, String)> {
    let request = pb::ListSetpointHistoryRequest {
        sensor_id: sensor.into(),
        ..Default::default()
    };
    let history = client
        .list_setpoint_history(authorized(request, Some(token)))
        .await;
    history
        .expect("history")
        .into_inner()
        .entries
        .into_iter()
        .map(|e| (e.revision, e.changed_by))
        .collect()
}

/// Every RPC of the API, as the matrix calls them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rpc {
    Get,
    List,
    ListBuilding,
    History,
    State,
    Subscribe,
    Put,
    Delete,
}

const RPCS: [Rpc; 8] = [
    Rpc::Get,
    Rpc::List,
    Rpc::ListBuilding,
    Rpc::History,
    Rpc::State,
    Rpc::Subscribe,
    Rpc::Put,
    Rpc::Delete,
];

/// What a call returned: its code and, for List and Subscribe, the sensors it showed.
#[derive(Debug)]
struct Outcome {
    code: Code,
    sensors: BTreeSet<String>,
}

/// Calls `rpc` about `sensor` (of `building`) with `token`. Put writes the stored values again
/// (so an allowed Put changes nothing) and Delete names a wrong revision (so an allowed Delete
/// is ABORTED instead of deleting): the matrix can then run every case against one state.
async fn call(
    channel: &Channel,
    token: Option<&str>,
    rpc: Rpc,
    sensor: &str,
    building: &str,
) -> Outcome {
    let mut setpoints = SetpointServiceClient::new(channel.clone());
    let mut heaters = HeaterControlServiceClient::new(channel.clone());
    let id = || pb::GetSetpointRequest {
        sensor_id: sensor.into(),
    };
    let none = BTreeSet::new();
    match rpc {
        Rpc::Get => Outcome {
            code: code(&setpoints.get_setpoint(authorized(id(), token)).await),
            sensors: none,
        },
        Rpc::List | Rpc::ListBuilding => {
            let request = pb::ListSetpointsRequest {
                building_id: if rpc == Rpc::ListBuilding {
                    building.into()
                } else {
                    String::new()
                },
                ..Default::default()
            };
            match setpoints.list_setpoints(authorized(request, token)).await {
                Ok(list) => Outcome {
                    code: Code::Ok,
                    sensors: list
                        .into_inner()
                        .setpoints
                        .into_iter()
                        .map(|s| s.sensor_id)
                        .collect(),
                },
                Err(status) => Outcome {
                    code: status.code(),
                    sensors: none,
                },
            }
        }
        Rpc::History => {
            let request = pb::ListSetpointHistoryRequest {
                sensor_id: sensor.into(),
                ..Default::default()
            };
            Outcome {
                code: code(
                    &setpoints
                        .list_setpoint_history(authorized(request, token))
                        .await,
                ),
                sensors: none,
            }
        }
        Rpc::State => {
            let request = pb::GetSensorStateRequest {
                sensor_id: sensor.into(),
            };
            Outcome {
                code: code(&heaters.get_sensor_state(authorized(request, token)).await),
                sensors: none,
            }
        }
        Rpc::Subscribe => {
            let request = pb::SubscribeHeaterCommandsRequest {
                send_initial_state: true,
                ..Default::default()
            };
            match heaters
                .subscribe_heater_commands(authorized(request, token))
                .await
            {
                Ok(stream) => Outcome {
                    code: Code::Ok,
                    sensors: snapshot(stream.into_inner()).await,
                },
                Err(status) => Outcome {
                    code: status.code(),
                    sensors: none,
                },
            }
        }
        Rpc::Put => {
            let request = put(setpoint(sensor, building, 20.0), None);
            Outcome {
                code: code(&setpoints.put_setpoint(authorized(request, token)).await),
                sensors: none,
            }
        }
        Rpc::Delete => {
            let request = pb::DeleteSetpointRequest {
                sensor_id: sensor.into(),
                expected_revision: Some(999),
                ..Default::default()
            };
            Outcome {
                code: code(&setpoints.delete_setpoint(authorized(request, token)).await),
                sensors: none,
            }
        }
    }
}

/// The sensors of the initial-state events a subscription sends, until it goes quiet; the
/// stream must still be open then (an empty set from a stream that failed proves nothing).
async fn snapshot(mut stream: tonic::Streaming<pb::HeaterCommandEvent>) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(700), stream.next()).await {
            Ok(Some(Ok(event))) => {
                assert!(
                    event.snapshot,
                    "only the snapshot is expected here: {event:?}"
                );
                seen.insert(event.sensor_id);
            }
            Err(_quiet) => return seen,
            Ok(Some(Err(status))) => panic!("the subscription failed: {status:?}"),
            Ok(None) => panic!("the subscription ended"),
        }
    }
}

/// The answer the rules in docs/security.md promise, derived independently of the service's code.
fn expected(
    role: &str,
    buildings: &[&str],
    rpc: Rpc,
    building: &str,
    all: &BTreeSet<(String, String)>,
) -> (Code, BTreeSet<String>) {
    let sees = |b: &str| buildings.contains(&"*") || buildings.contains(&b);
    let writer = role == "operator" || role == "admin";
    let visible = |only: Option<&str>| {
        all.iter()
            .filter(|(_, b)| sees(b) && only.is_none_or(|o| o == b))
            .map(|(s, _)| s.clone())
            .collect()
    };
    let none = BTreeSet::new();
    match rpc {
        Rpc::List => (Code::Ok, visible(None)),
        Rpc::ListBuilding => (Code::Ok, visible(Some(building))),
        Rpc::Subscribe => (Code::Ok, visible(None)),
        Rpc::Get | Rpc::History | Rpc::State if sees(building) => (Code::Ok, none),
        Rpc::Get | Rpc::History | Rpc::State => (Code::NotFound, none),
        Rpc::Put | Rpc::Delete if !writer => (Code::PermissionDenied, none),
        // Put names the building: refusing it reveals nothing the caller did not say.
        Rpc::Put if sees(building) => (Code::Ok, none),
        Rpc::Put => (Code::PermissionDenied, none),
        Rpc::Delete if sees(building) => (Code::Aborted, none),
        Rpc::Delete => (Code::NotFound, none),
    }
}

/// Two buildings, one sensor each, both with a setpoint and a heater command.
const SENSORS: [(&str, &str); 2] = [("north/room-1", "north"), ("south/room-1", "south")];

async fn two_buildings(app: &TestApp) {
    let channel = app.channel().await;
    let mut admin = SetpointServiceClient::new(channel.clone());
    for (sensor, building) in SENSORS {
        admin
            .put_setpoint(authorized(
                put(setpoint(sensor, building, 20.0), None),
                Some("t-admin-all"),
            ))
            .await
            .expect("admin puts");
    }
    let sensors = Sensors::new(&Topics::of(&app.config).sensors);
    for (sensor, _) in SENSORS {
        sensors.reading(sensor, 10.0, Utc::now()).await;
    }
    let commanded = eventually(Duration::from_secs(20), || async {
        let mut heaters = HeaterControlServiceClient::new(channel.clone());
        let mut all = true;
        for (sensor, _) in SENSORS {
            let request = pb::GetSensorStateRequest {
                sensor_id: sensor.into(),
            };
            let state = heaters
                .get_sensor_state(authorized(request, Some("t-admin-all")))
                .await;
            all &= state.is_ok_and(|s| s.into_inner().last_command.is_some());
        }
        all
    })
    .await;
    assert!(commanded, "both heaters got a command");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_and_building_gets_exactly_what_the_rules_allow_on_every_rpc() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    two_buildings(&app).await;
    let channel = app.channel().await;
    let all: BTreeSet<(String, String)> = SENSORS
        .iter()
        .map(|(s, b)| ((*s).to_owned(), (*b).to_owned()))
        .collect();

    for (token, subject, role, buildings) in STATIC {
        for rpc in RPCS {
            for (sensor, building) in SENSORS {
                let got = call(&channel, Some(token), rpc, sensor, building).await;
                let (code, sensors) = expected(role, buildings, rpc, building, &all);
                assert_eq!(
                    (got.code, &got.sensors),
                    (code, &sensors),
                    "{subject} ({role} of {buildings:?}) {rpc:?} on {sensor}"
                );
            }
        }
    }

    // No credentials, or bad ones: UNAUTHENTICATED everywhere, before anything else.
    for token in [None, Some("not-a-known-token"), Some("a.b.c")] {
        for rpc in RPCS {
            let got = call(&channel, token, rpc, SENSORS[0].0, SENSORS[0].1).await;
            assert_eq!(got.code, Code::Unauthenticated, "{token:?} {rpc:?}");
        }
    }
    let mut raw = SetpointServiceClient::new(channel.clone());
    let mut basic = Request::new(pb::GetSetpointRequest {
        sensor_id: SENSORS[0].0.into(),
    });
    basic
        .metadata_mut()
        .insert("authorization", "Basic dDp0".parse().unwrap());
    assert_eq!(code(&raw.get_setpoint(basic).await), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_record_the_identity_and_never_cross_into_another_building() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    two_buildings(&app).await;
    let mut client = app.setpoints().await;

    // A real change by the north operator is recorded under its name.
    let changed = put_as(
        &mut client,
        "t-operator-north",
        "north/room-1",
        "north",
        23.0,
    )
    .await
    .expect("operator of north changes north");
    assert_eq!(changed.updated_by, "operator-north");
    assert_eq!(
        history_as(&mut client, "t-viewer-north", "north/room-1").await,
        vec![
            (2, "operator-north".to_owned()),
            (1, "admin-all".to_owned())
        ]
    );

    // Claiming the south sensor for north, with or without its revision: refused, with the
    // answer a south id that does not exist gets, and nothing changes.
    let attempt = |sensor: &'static str, expected_revision: Option<i64>| {
        let mut client = client.clone();
        async move {
            let request = put(setpoint(sensor, "north", 30.0), expected_revision);
            client
                .put_setpoint(authorized(request, Some("t-operator-north")))
                .await
                .unwrap_err()
        }
    };
    for expected_revision in [None, Some(0), Some(1), Some(7)] {
        let foreign = attempt("south/room-1", expected_revision).await;
        let missing = attempt("south/never-made", expected_revision).await;
        assert_eq!(
            (
                foreign.code(),
                foreign.message().replace("south/room-1", "ID")
            ),
            (
                missing.code(),
                missing.message().replace("south/never-made", "ID")
            ),
            "{expected_revision:?}"
        );
        assert_eq!(foreign.code(), Code::PermissionDenied, "{foreign:?}");
    }
    let mut db = app.db().await;
    let (building, revision, updated_by): (String, i64, String) = sqlx::query_as(
        "SELECT building_id, revision, updated_by FROM setpoints WHERE sensor_id = 'south/room-1'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(
        (building.as_str(), revision, updated_by.as_str()),
        ("south", 1, "admin-all")
    );
    let south_history: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM setpoint_history WHERE sensor_id = 'south/room-1'",
    )
    .fetch_one(&mut db)
    .await
    .unwrap();
    assert_eq!(south_history, 1);

    // Moving a sensor needs both buildings; an operator of all may.
    let moved = put_as(&mut client, "t-operator-all", "south/room-1", "north", 21.0)
        .await
        .expect("operator of all moves it");
    assert_eq!((moved.building_id.as_str(), moved.revision), ("north", 2));
    // The north viewer now sees the sensor, but only the part of its history in north.
    assert_eq!(
        history_as(&mut client, "t-viewer-north", "south/room-1").await,
        vec![(2, "operator-all".to_owned())]
    );
    // Its last command was sent while it was in south: not north's to see.
    let state = HeaterControlServiceClient::new(app.channel().await)
        .get_sensor_state(authorized(
            pb::GetSensorStateRequest {
                sensor_id: "south/room-1".into(),
            },
            Some("t-viewer-north"),
        ))
        .await
        .expect("now a north sensor")
        .into_inner();
    assert!(
        state
            .last_command
            .as_ref()
            .is_none_or(|c| c.building_id == "north"),
        "{state:?}"
    );
}

/// Issue 23 (1): sensor ids are global, so the first Put used to own one. A building's operator
/// now binds only ids named under its building; others only a caller of every building binds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_building_takes_blocks_reads_or_drives_a_sensor_of_another() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    let mut client = app.setpoints().await;

    // North squats on south's future sensor, and on an id named under no building.
    for sensor in ["south/room-7", "room-9"] {
        let squat = put_as(&mut client, "t-operator-north", sensor, "north", 30.0).await;
        assert_eq!(code(&squat), Code::PermissionDenied, "{sensor}: {squat:?}");
    }
    let mut db = app.db().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM setpoints")
        .fetch_one(&mut db)
        .await
        .unwrap();
    assert_eq!(rows, 0, "a refused Put wrote a row");

    // South is not blocked: its operator creates its sensor, which drives south's heater.
    let south = put_as(
        &mut client,
        "t-operator-south",
        "south/room-7",
        "south",
        21.0,
    )
    .await
    .expect("south creates its own sensor");
    assert_eq!((south.building_id.as_str(), south.revision), ("south", 1));
    Sensors::new(&Topics::of(&app.config).sensors)
        .reading("south/room-7", 10.0, Utc::now())
        .await;
    let heaters = HeaterControlServiceClient::new(app.channel().await);
    let state_as = |token: &'static str| {
        let mut heaters = heaters.clone();
        async move {
            let request = pb::GetSensorStateRequest {
                sensor_id: "south/room-7".into(),
            };
            heaters
                .get_sensor_state(authorized(request, Some(token)))
                .await
        }
    };
    let commanded = eventually(Duration::from_secs(20), || async {
        state_as("t-operator-south").await.is_ok_and(|s| {
            s.into_inner()
                .last_command
                .is_some_and(|c| c.building_id == "south")
        })
    })
    .await;
    assert!(commanded, "south's reading drives south's heater");
    // North reads nothing of it, and cannot change or delete it.
    assert_eq!(code(&state_as("t-operator-north").await), Code::NotFound);
    let change = put_as(
        &mut client,
        "t-operator-north",
        "south/room-7",
        "north",
        30.0,
    )
    .await;
    assert_eq!(code(&change), Code::PermissionDenied);
    let delete = client
        .delete_setpoint(authorized(
            pb::DeleteSetpointRequest {
                sensor_id: "south/room-7".into(),
                ..Default::default()
            },
            Some("t-operator-north"),
        ))
        .await;
    assert_eq!(code(&delete), Code::NotFound);

    // An id named under no building is bound by a caller of every building; the building's
    // operator then keeps it.
    put_as(&mut client, "t-admin-all", "room-9", "north", 20.0)
        .await
        .expect("an admin of all binds room-9 to north");
    let kept = put_as(&mut client, "t-operator-north", "room-9", "north", 22.0)
        .await
        .expect("north changes its bound sensor");
    assert_eq!(kept.revision, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_moved_and_deleted_belongs_to_the_building_that_deleted_it() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    let mut client = SetpointServiceClient::new(app.channel().await);
    let heaters = HeaterControlServiceClient::new(app.channel().await);
    let sensor = "north/room-9";
    let state_as = |token: &'static str| {
        let mut heaters = heaters.clone();
        async move {
            let request = pb::GetSensorStateRequest {
                sensor_id: sensor.into(),
            };
            heaters
                .get_sensor_state(authorized(request, Some(token)))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    // In north, its heater told OFF (too hot).
    put_as(&mut client, "t-admin-all", sensor, "north", 20.0)
        .await
        .unwrap();
    Sensors::new(&Topics::of(&app.config).sensors)
        .reading(sensor, 30.0, Utc::now())
        .await;
    let told_off = eventually(Duration::from_secs(20), || async {
        state_as("t-admin-all")
            .await
            .is_ok_and(|s| s.last_command.is_some_and(|c| c.building_id == "north"))
    })
    .await;
    assert!(told_off, "the heater got its command in north");
    // Moved to south and deleted there; the heater was OFF, so no command follows.
    put_as(&mut client, "t-operator-all", sensor, "south", 20.0)
        .await
        .unwrap();
    let request = pb::DeleteSetpointRequest {
        sensor_id: sensor.into(),
        ..Default::default()
    };
    client
        .delete_setpoint(authorized(request, Some("t-operator-all")))
        .await
        .unwrap();

    // South's now, with its readings: north, which sent its last command, sees none of it.
    let north = state_as("t-viewer-north").await.unwrap_err();
    assert_eq!(north.code(), Code::NotFound);
    let everything = state_as("t-viewer-all").await.unwrap();
    assert!(everything.setpoint.is_none() && everything.last_reading.is_some());
}

/// The next OFF command. The ON commands `two_buildings` caused may reach a new subscriber
/// after it subscribed (the command-topic reader waits up to 100 ms per fetch on Tansu); this
/// test's own readings cause OFF. With `building`, every event the stream brings, those passed
/// over included, must be of that building.
async fn next_off(
    stream: &mut tonic::Streaming<pb::HeaterCommandEvent>,
    building: Option<&str>,
) -> pb::HeaterCommandEvent {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("event");
        if let Some(building) = building {
            assert_eq!(event.building_id, building, "{event:?}");
        }
        if event.command == pb::HeaterCommand::Off as i32 {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_commands_of_other_buildings_never_reach_a_subscriber() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    two_buildings(&app).await;
    let channel = app.channel().await;
    let subscribe = |token: &'static str| {
        let channel = channel.clone();
        async move {
            HeaterControlServiceClient::new(channel)
                .subscribe_heater_commands(authorized(
                    pb::SubscribeHeaterCommandsRequest::default(),
                    Some(token),
                ))
                .await
                .expect("subscribe")
                .into_inner()
        }
    };
    let mut north = subscribe("t-viewer-north").await;
    let mut everything = subscribe("t-viewer-all").await;
    // A filter naming the other building does not widen the scope: it just matches nothing.
    let mut north_asking_south = HeaterControlServiceClient::new(channel.clone())
        .subscribe_heater_commands(authorized(
            pb::SubscribeHeaterCommandsRequest {
                building_id: "south".into(),
                ..Default::default()
            },
            Some("t-viewer-north"),
        ))
        .await
        .expect("subscribe")
        .into_inner();

    let sensors = Sensors::new(&Topics::of(&app.config).sensors);
    // South flips first; once the all-seeing subscriber has it, it is in every subscriber's
    // queue, ahead of the north flip that follows.
    sensors.reading("south/room-1", 30.0, Utc::now()).await;
    assert_eq!(
        next_off(&mut everything, None).await.sensor_id,
        "south/room-1"
    );
    sensors.reading("north/room-1", 30.0, Utc::now()).await;
    assert_eq!(
        next_off(&mut everything, None).await.sensor_id,
        "north/room-1"
    );
    assert_eq!(
        next_off(&mut north, Some("north")).await.sensor_id,
        "north/room-1",
        "south was filtered out"
    );
    let leaked = tokio::time::timeout(Duration::from_millis(500), north_asking_south.next()).await;
    assert!(
        leaked.is_err(),
        "nothing for north asking for south: {leaked:?}"
    );
}
