//! Who may do what: the authorization matrix over roles × buildings × every RPC, JWT and static
//! token negatives, TLS and mTLS, per-identity limits, deadlines, and bad input that must never
//! reach the database. Keys and certificates are generated here, per run.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::kafka::{write_command, written_command, Sensors, Topics};
use common::security::{self as creds, Ca, SigningKey, StaticEntry};
use common::{eventually, grpcurl, put, setpoint, TestApp};
use serde_json::json;
use thermostat::config::{ClientAuth, ServeConfig};
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::heater_control_service_client::HeaterControlServiceClient;
use thermostat::proto::v1::setpoint_service_client::SetpointServiceClient;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request};

/// The signing keys, made once per test binary: RSA key generation is the slow part.
fn keys() -> &'static (SigningKey, SigningKey) {
    static KEYS: OnceLock<(SigningKey, SigningKey)> = OnceLock::new();
    KEYS.get_or_init(|| (SigningKey::rsa("rsa-1"), SigningKey::ec("ec-1")))
}

/// The static tokens of the matrix: (token, subject, role, buildings).
const STATIC: &[(&str, &str, &str, &[&str])] = &[
    ("t-viewer-north", "viewer-north", "viewer", &["north"]),
    ("t-operator-north", "operator-north", "operator", &["north"]),
    ("t-admin-north", "admin-north", "admin", &["north"]),
    ("t-viewer-all", "viewer-all", "viewer", &["*"]),
    ("t-operator-all", "operator-all", "operator", &["*"]),
    ("t-admin-all", "admin-all", "admin", &["*"]),
    ("t-operator-none", "operator-none", "operator", &[]),
];

fn static_entries() -> Vec<StaticEntry<'static>> {
    STATIC
        .iter()
        .map(|(token, subject, role, buildings)| StaticEntry::Token {
            token,
            subject,
            role,
            buildings,
        })
        .collect()
}

/// A service with authentication on: the JWKS of [`keys`], the static tokens of [`STATIC`],
/// plus whatever `tweak` changes. Credential files live in the returned directory.
async fn secure_app(tweak: impl FnOnce(&mut ServeConfig, &Path)) -> (tempfile::TempDir, TestApp) {
    let tempdir = tempfile::tempdir().expect("tempdir");
    let dir = tempdir.path();
    let (rsa, ec) = keys();
    let mut config = TestApp::fresh_config().await;
    config.auth.auth_disabled = false;
    config.auth.auth_jwks_file = Some(creds::write(dir, "jwks.json", &creds::jwks(&[rsa, ec])));
    config.auth.auth_jwt_issuer = Some(creds::ISSUER.into());
    config.auth.auth_jwt_audience = Some(creds::AUDIENCE.into());
    config.auth.auth_static_file = Some(creds::write(
        dir,
        "identities.json",
        &creds::static_file(&static_entries()),
    ));
    config.auth.credentials_reload_interval = Duration::from_millis(100);
    tweak(&mut config, dir);
    (tempdir, TestApp::spawn_with(config).await)
}

fn authorized<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header value"),
        );
    }
    request
}

/// A Put of a setpoint with the usual deltas, as the holder of `token`.
async fn put_as(
    client: &mut SetpointServiceClient<Channel>,
    token: &str,
    sensor: &str,
    building: &str,
    desired: f64,
) -> Result<pb::Setpoint, tonic::Status> {
    let request = authorized(put(setpoint(sensor, building, desired), None), Some(token));
    client
        .put_setpoint(request)
        .await
        .map(tonic::Response::into_inner)
}

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

fn code<T>(result: &Result<T, tonic::Status>) -> Code {
    result
        .as_ref()
        .map_or_else(tonic::Status::code, |_| Code::Ok)
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

    // Claiming the south sensor for north, with or without its revision: as if it did not
    // exist, and nothing changes.
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
    for expected_revision in [None, Some(0)] {
        let status = attempt("south/room-1", expected_revision).await;
        assert_eq!(
            status.code(),
            Code::NotFound,
            "{expected_revision:?}: {status:?}"
        );
    }
    // A conditional write gets exactly the answer a sensor that does not exist gets.
    for expected_revision in [Some(1), Some(7)] {
        let foreign = attempt("south/room-1", expected_revision).await;
        let missing = attempt("north/never-created", expected_revision).await;
        assert_eq!(
            (foreign.code(), foreign.message()),
            (missing.code(), missing.message()),
            "{expected_revision:?}"
        );
        assert_eq!(foreign.code(), Code::Aborted);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_verified_and_every_kind_of_bad_token_is_refused() {
    let (dir, app) = secure_app(|_, _| {}).await;
    let mut client = app.setpoints().await;
    put_as(&mut client, "t-admin-all", "north/room-1", "north", 20.0)
        .await
        .unwrap();
    let (rsa, ec) = keys();
    let reader = client.clone();
    let get = |token: String| {
        let mut client = reader.clone();
        async move {
            let request = authorized(
                pb::GetSetpointRequest {
                    sensor_id: "north/room-1".into(),
                },
                Some(&token),
            );
            code(&client.get_setpoint(request).await)
        }
    };
    let good = creds::claims("jwt-user", "viewer", &["north"]);
    let with = |field: &str, value: serde_json::Value| {
        let mut claims = good.clone();
        claims[field] = value;
        claims
    };
    let without = |field: &str| {
        let mut claims = good.clone();
        claims.as_object_mut().unwrap().remove(field);
        claims
    };
    let now = creds::now();
    let other_rsa = SigningKey::rsa("rsa-1"); // same kid, different key
    let mut no_kid = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    no_kid.kid = None;

    let cases: Vec<(&str, String, Code)> = vec![
        ("RS256", rsa.sign(&good), Code::Ok),
        ("ES256", ec.sign(&good), Code::Ok),
        (
            "expired within the leeway",
            rsa.sign(&with("exp", json!(now - 10))),
            Code::Ok,
        ),
        (
            "expired",
            rsa.sign(&with("exp", json!(now - 120))),
            Code::Unauthenticated,
        ),
        (
            "not yet valid",
            rsa.sign(&with("nbf", json!(now + 120))),
            Code::Unauthenticated,
        ),
        (
            "exp as a string",
            rsa.sign(&with("exp", json!((now - 120).to_string()))),
            Code::Unauthenticated,
        ),
        (
            "nbf as a string",
            rsa.sign(&with("nbf", json!((now + 120).to_string()))),
            Code::Unauthenticated,
        ),
        ("no exp", rsa.sign(&without("exp")), Code::Unauthenticated),
        ("no sub", rsa.sign(&without("sub")), Code::Unauthenticated),
        (
            "wrong issuer",
            rsa.sign(&with("iss", json!("https://evil.test"))),
            Code::Unauthenticated,
        ),
        (
            "wrong audience",
            rsa.sign(&with("aud", json!("other-service"))),
            Code::Unauthenticated,
        ),
        (
            "unknown role",
            rsa.sign(&with("role", json!("root"))),
            Code::Unauthenticated,
        ),
        (
            "bad building",
            rsa.sign(&with("buildings", json!(["a b"]))),
            Code::Unauthenticated,
        ),
        (
            "wrong key, right kid",
            other_rsa.sign(&good),
            Code::Unauthenticated,
        ),
        (
            "unknown kid",
            SigningKey::ec("ec-9").sign(&good),
            Code::Unauthenticated,
        ),
        (
            "no kid with two keys",
            jsonwebtoken::encode(&no_kid, &good, &rsa.encoding).unwrap(),
            Code::Unauthenticated,
        ),
        ("alg none", creds::unsigned(&good), Code::Unauthenticated),
        (
            "HS256 with the public key",
            creds::hmac_with_public_key(rsa, &good),
            Code::Unauthenticated,
        ),
        (
            "HS256 with the EC public key",
            creds::hmac_with_public_key(ec, &good),
            Code::Unauthenticated,
        ),
        (
            "tampered payload",
            creds::tampered(&rsa.sign(&good), &with("buildings", json!(["*"]))),
            Code::Unauthenticated,
        ),
        (
            "truncated",
            rsa.sign(&good).rsplit_once('.').unwrap().0.to_owned(),
            Code::Unauthenticated,
        ),
    ];
    for (what, token, expected) in cases {
        assert_eq!(get(token).await, expected, "{what}");
    }
    // The claims decide the scope: the same valid token for another building sees nothing.
    let south = rsa.sign(&creds::claims("jwt-user", "admin", &["south"]));
    assert_eq!(get(south).await, Code::NotFound);
    // And the role: a JWT viewer may not write.
    let request = authorized(
        put(setpoint("north/room-1", "north", 25.0), None),
        Some(&rsa.sign(&good)),
    );
    assert_eq!(
        code(&client.put_setpoint(request).await),
        Code::PermissionDenied
    );

    // A key added to the JWKS file is used without a restart.
    let rotated = SigningKey::ec("ec-2");
    let token = rotated.sign(&good);
    assert_eq!(get(token.clone()).await, Code::Unauthenticated);
    creds::write(dir.path(), "jwks.json", &creds::jwks(&[rsa, ec, &rotated]));
    let reloaded = eventually(Duration::from_secs(10), || {
        let attempt = get(token.clone());
        async move { attempt.await == Code::Ok }
    })
    .await;
    assert!(reloaded, "the new key was picked up");
    // A broken JWKS file keeps the last good keys, and says so in /metrics until mended.
    let stale = |value: f64| {
        let admin = app.admin;
        async move {
            let (_, metrics) = common::http_get(admin, "/metrics").await;
            common::sample(&metrics, r#"thermostat_credentials_stale{what="JWKS"}"#) == value
        }
    };
    assert!(stale(0.0).await);
    creds::write(dir.path(), "jwks.json", "{ not json");
    assert!(eventually(Duration::from_secs(10), || stale(1.0)).await);
    assert_eq!(get(token).await, Code::Ok);
    creds::write(dir.path(), "jwks.json", &creds::jwks(&[rsa, ec, &rotated]));
    assert!(eventually(Duration::from_secs(10), || stale(0.0)).await);
}

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
    config.tls.tls_client_auth = mode;
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
        refused.message().contains("rate limit"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_works_with_a_token_and_reflection_needs_none() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    let addr = app.addr.to_string();
    let services = grpcurl(&["-plaintext", &addr, "list"]);
    assert!(
        services.contains("thermostat.v1.SetpointService"),
        "{services}"
    );
    let put = grpcurl(&[
        "-plaintext",
        "-H",
        "authorization: Bearer t-operator-north",
        "-d",
        r#"{"setpoint": {"sensorId": "north/room-1", "buildingId": "north", "desiredCelsius": 21, "upDeltaCelsius": 0.5, "downDeltaCelsius": 0.5}}"#,
        &addr,
        "thermostat.v1.SetpointService/PutSetpoint",
    ]);
    let put: serde_json::Value = serde_json::from_str(&put).expect("JSON");
    assert_eq!(put["updatedBy"], "operator-north");
    // Without the token grpcurl exits non-zero with Unauthenticated.
    let out = common::grpcurl_output(&[
        "-plaintext",
        "-d",
        r#"{"sensorId": "north/room-1"}"#,
        &addr,
        "thermostat.v1.SetpointService/GetSetpoint",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"),
        "{out:?}"
    );
}

/// Why the service refused to start on `config` (it must refuse).
async fn refusal(config: thermostat::config::ServeConfig) -> String {
    let err = thermostat::Application::build(config)
        .await
        .err()
        .expect("refused");
    thermostat::error::error_chain(&err)
}

#[tokio::test]
async fn the_service_refuses_to_start_without_credentials_or_with_contradictory_ones() {
    let mut config = TestApp::fresh_config().await;
    config.auth.auth_disabled = false;
    let why = refusal(config.clone()).await;
    assert!(why.contains("no authentication configured"), "{why}");
    config.auth.auth_disabled = true;
    config.auth.auth_static_file = Some("/nonexistent".into());
    let why = refusal(config.clone()).await;
    assert!(why.contains("cannot be combined"), "{why}");
    config.auth.auth_disabled = false;
    let why = refusal(config).await;
    assert!(why.contains("/nonexistent"), "{why}");
}

/// One way to make a Put invalid; the field the error must name.
#[derive(Debug, Clone)]
enum Bad {
    SensorId(String),
    BuildingId(String),
    Desired(f64),
    UpDelta(f64),
    DownDelta(f64),
    Reason(String),
    ExpectedRevision(i64),
    /// Larger than MAX_MESSAGE_SIZE: refused before it is even decoded.
    Oversized(usize),
}

fn bad_input() -> impl proptest::strategy::Strategy<Value = Bad> {
    use proptest::prelude::*;
    let bad_id = prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9]{129,400}",
        "[a-z]{0,8}[ #*?\\\\\"'\\n\\t\\x00é€😀][a-z]{0,8}",
        Just("x".repeat(20_000)),
    ];
    let bad_desired = prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(f64::MAX),
        Just(f64::MIN),
        100.000_001f64..1e300,
        -1e300f64..-50.000_001,
    ];
    let bad_delta = || {
        prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            -1e300f64..-0.000_001,
            20.000_001f64..1e300,
        ]
    };
    prop_oneof![
        bad_id.clone().prop_map(Bad::SensorId),
        bad_id.prop_map(Bad::BuildingId),
        bad_desired.prop_map(Bad::Desired),
        bad_delta().prop_map(Bad::UpDelta),
        bad_delta().prop_map(Bad::DownDelta),
        prop_oneof!["[a-z]{257,3000}", "[a-z]{0,8}\\x00[a-z]{0,8}"].prop_map(Bad::Reason),
        (i64::MIN..0).prop_map(Bad::ExpectedRevision),
        (65 * 1024..1024 * 1024usize).prop_map(Bad::Oversized),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_bad_input_changes_the_database() {
    use proptest::strategy::{Strategy, ValueTree};
    let (_dir, app) = secure_app(|config, _| {
        config.limits.write_rate_limit = 100_000;
        config.limits.write_burst = 100_000;
    })
    .await;
    let mut client = app.setpoints().await;
    let token = Some("t-admin-all");
    client
        .put_setpoint(authorized(
            put(setpoint("north/room-1", "north", 20.0), None),
            token,
        ))
        .await
        .unwrap();
    let mut db = app.db().await;
    let dump = "SELECT coalesce(string_agg(t::text, '|' ORDER BY t::text), '') FROM \
                (SELECT * FROM setpoints UNION ALL SELECT sensor_id, building_id, desired_celsius, \
                 up_delta_celsius, down_delta_celsius, revision, change_time, changed_by, reason, \
                 deleted FROM setpoint_history) t";
    let before: String = sqlx::query_scalar(dump).fetch_one(&mut db).await.unwrap();

    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = bad_input();
    let cases = 400;
    for _ in 0..cases {
        let bad = strategy.new_tree(&mut runner).unwrap().current();
        // A valid request for the existing sensor with one field spoiled: it would change the
        // row if the spoiled field got through.
        let mut sp = setpoint("north/room-1", "north", 25.0);
        let mut expected_revision = None;
        let field = match &bad {
            Bad::SensorId(v) => {
                sp.sensor_id = v.clone();
                "setpoint.sensor_id"
            }
            Bad::BuildingId(v) => {
                sp.building_id = v.clone();
                "setpoint.building_id"
            }
            Bad::Desired(v) => {
                sp.desired_celsius = *v;
                "setpoint.desired_celsius"
            }
            Bad::UpDelta(v) => {
                sp.up_delta_celsius = *v;
                "setpoint.up_delta_celsius"
            }
            Bad::DownDelta(v) => {
                sp.down_delta_celsius = *v;
                "setpoint.down_delta_celsius"
            }
            Bad::Reason(v) => {
                sp.reason = v.clone();
                "setpoint.reason"
            }
            Bad::ExpectedRevision(v) => {
                expected_revision = Some(*v);
                "expected_revision"
            }
            Bad::Oversized(n) => {
                sp.reason = "r".repeat(*n);
                ""
            }
        };
        let status = client
            .put_setpoint(authorized(put(sp, expected_revision), token))
            .await
            .expect_err("a bad Put is refused");
        if let Bad::Oversized(_) = bad {
            assert!(
                matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
                "{status:?}"
            );
        } else {
            assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}: {status:?}");
            assert!(
                status.message().contains(field),
                "{bad:?}: {}",
                status.message()
            );
        }
        // Bad ids on the other RPCs too.
        if let Bad::SensorId(id) = &bad {
            let get = pb::GetSetpointRequest {
                sensor_id: id.clone(),
            };
            let deleted = pb::DeleteSetpointRequest {
                sensor_id: id.clone(),
                ..Default::default()
            };
            let got = client
                .get_setpoint(authorized(get, token))
                .await
                .unwrap_err();
            let del = client
                .delete_setpoint(authorized(deleted, token))
                .await
                .unwrap_err();
            for status in [got, del] {
                assert!(
                    matches!(status.code(), Code::InvalidArgument | Code::OutOfRange),
                    "{status:?}"
                );
            }
        }
    }
    let after: String = sqlx::query_scalar(dump).fetch_one(&mut db).await.unwrap();
    assert_eq!(before, after, "the database changed");
    // And the service still works.
    client
        .put_setpoint(authorized(
            put(setpoint("north/room-1", "north", 22.0), None),
            token,
        ))
        .await
        .expect("a good Put after the bad ones");
}

/// Revokes one static token of [`STATIC`] by rewriting the file without it.
fn revoke(dir: &Path, revoked: &str) {
    let remaining: Vec<_> = static_entries()
        .into_iter()
        .filter(|e| !matches!(e, StaticEntry::Token { token, .. } if *token == revoked))
        .collect();
    creds::write(dir, "identities.json", &creds::static_file(&remaining));
}

async fn next_or_status(
    stream: &mut tonic::Streaming<pb::HeaterCommandEvent>,
) -> Result<pb::HeaterCommandEvent, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event or the end within 10 s")
        .expect("the stream ended without a status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_credential_ends_a_subscription_in_the_middle_of_its_snapshot() {
    // Several parts of the snapshot (1024 heaters each).
    const HEATERS: usize = 5000;
    let (dir, app) = secure_app(|_, _| {}).await;
    let command_topic = Sensors::new(&Topics::of(&app.config).commands);
    futures::future::join_all((0..HEATERS).map(|n| {
        write_command(
            &command_topic,
            written_command(&format!("north/h-{n}"), "north", 1, pb::HeaterCommand::On),
        )
    }))
    .await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            common::snapshot_len(&app).await == HEATERS
        })
        .await,
        "the loop read every command"
    );
    let request = authorized(
        pb::SubscribeHeaterCommandsRequest {
            send_initial_state: true,
            ..Default::default()
        },
        Some("t-viewer-north"),
    );
    let mut stream = common::stalled_subscription(&app.addr.to_string(), request).await;
    let mut received = 0;
    for _ in 0..10 {
        next_or_status(&mut stream).await.expect("a snapshot event");
        received += 1;
    }

    revoke(dir.path(), "t-viewer-north");
    // A slow reader: the whole snapshot would take some 5 s; the credentials are checked again
    // every 100 ms (the reload interval).
    let status = loop {
        tokio::time::sleep(Duration::from_millis(1)).await;
        match next_or_status(&mut stream).await {
            Ok(event) => {
                assert!(event.snapshot, "{event:?}");
                received += 1;
            }
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        received < HEATERS,
        "ended within the snapshot, after {received} of {HEATERS} events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_ends_when_its_credentials_expire_or_are_revoked() {
    let (dir, app) = secure_app(|config, _| {
        config.auth.auth_jwt_leeway = Duration::ZERO;
    })
    .await;
    let channel = app.channel().await;
    let subscribe = |token: String| {
        let channel = channel.clone();
        async move {
            let request = authorized(pb::SubscribeHeaterCommandsRequest::default(), Some(&token));
            HeaterControlServiceClient::new(channel)
                .subscribe_heater_commands(request)
                .await
                .expect("subscribe")
                .into_inner()
        }
    };
    let ended = |mut stream: tonic::Streaming<pb::HeaterCommandEvent>| async move {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Err(status))) => status.code(),
            other => panic!("expected the stream to end with an error, got {other:?}"),
        }
    };
    let (rsa, _) = keys();
    let mut short = creds::claims("short-lived", "viewer", &["*"]);
    short["exp"] = json!(creds::now() + 2);
    let expiring = subscribe(rsa.sign(&short)).await;
    let revoked = subscribe("t-viewer-north".to_owned()).await;
    let kept = subscribe("t-viewer-all".to_owned()).await;

    revoke(dir.path(), "t-viewer-north");
    let started = Instant::now();
    assert_eq!(ended(revoked).await, Code::Unauthenticated);
    assert_eq!(ended(expiring).await, Code::Unauthenticated);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // A subscriber whose credentials still hold stays subscribed.
    let mut kept = kept;
    let still = tokio::time::timeout(Duration::from_millis(500), kept.next()).await;
    assert!(still.is_err(), "still open and quiet: {still:?}");
}
