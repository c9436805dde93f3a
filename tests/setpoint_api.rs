//! The setpoint API end to end: a real service on a random port, a real fresh database.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use std::collections::BTreeSet;
use std::time::Duration;

use common::{put, setpoint, TestApp};
use thermostat::proto::v1 as pb;
use tonic::Code;

#[tokio::test]
async fn put_creates_revision_one_and_get_returns_it() {
    let app = TestApp::spawn().await;
    let mut client = app.setpoints().await;
    let mut sp = setpoint("room-1", "hq", 21.5);
    sp.reason = "initial commissioning".into();

    let created = client
        .put_setpoint(put(sp.clone(), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.revision, 1);
    assert_eq!(created.updated_by, "anonymous");
    assert_eq!(created.reason, "initial commissioning");
    assert!(created.update_time.is_some());
    assert_eq!(
        (created.desired_celsius, created.up_delta_celsius),
        (21.5, 0.5)
    );

    let got = client
        .get_setpoint(pb::GetSetpointRequest {
            sensor_id: "room-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, created);
}

#[tokio::test]
async fn changing_put_bumps_revision_and_identical_put_changes_nothing() {
    let app = TestApp::spawn().await;
    let mut client = app.setpoints().await;
    client
        .put_setpoint(put(setpoint("s", "b", 20.0), None))
        .await
        .unwrap();
    let second = client
        .put_setpoint(put(setpoint("s", "b", 22.0), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.revision, 2);

    // A retry of the same Put (even with another reason) is a no-op.
    let mut retry = setpoint("s", "b", 22.0);
    retry.reason = "retry".into();
    let again = client
        .put_setpoint(put(retry, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, second);
    let history = history(&mut client, "s").await;
    assert_eq!(
        history.iter().map(|e| e.revision).collect::<Vec<_>>(),
        vec![2, 1]
    );

    // Moving a sensor to another building is a change.
    let moved = client
        .put_setpoint(put(setpoint("s", "b2", 22.0), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((moved.revision, moved.building_id.as_str()), (3, "b2"));
}

#[tokio::test]
async fn expected_revision_guards_every_write() {
    let app = TestApp::spawn().await;
    let mut client = app.setpoints().await;

    // 0 = must not exist yet; a non-zero revision for a missing sensor is stale.
    let err = client
        .put_setpoint(put(setpoint("s", "b", 20.0), Some(3)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    let created = client
        .put_setpoint(put(setpoint("s", "b", 20.0), Some(0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.revision, 1);
    let err = client
        .put_setpoint(put(setpoint("s", "b", 21.0), Some(0)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);

    let updated = client
        .put_setpoint(put(setpoint("s", "b", 21.0), Some(1)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.revision, 2);
    let err = client
        .put_setpoint(put(setpoint("s", "b", 25.0), Some(1)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(
        err.message().contains("2"),
        "message names the stored revision: {}",
        err.message()
    );

    // Nothing changed by the rejected writes.
    let got = get(&mut client, "s").await.unwrap();
    assert_eq!((got.revision, got.desired_celsius), (2, 21.0));

    let err = client
        .delete_setpoint(pb::DeleteSetpointRequest {
            request_id: Default::default(),
            sensor_id: "s".into(),
            expected_revision: Some(1),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(get(&mut client, "s").await.is_ok());
}

#[tokio::test]
async fn invalid_puts_name_the_field_and_store_nothing() {
    let app = TestApp::spawn().await;
    let mut client = app.setpoints().await;
    let base = setpoint("ok", "b", 20.0);
    type Edit = fn(&mut pb::Setpoint);
    let cases: Vec<(&str, Edit)> = vec![
        ("setpoint.sensor_id", |s| s.sensor_id = String::new()),
        ("setpoint.sensor_id", |s| s.sensor_id = "has space".into()),
        ("setpoint.sensor_id", |s| s.sensor_id = "x".repeat(129)),
        ("setpoint.building_id", |s| s.building_id = String::new()),
        ("setpoint.building_id", |s| s.building_id = "b;drop".into()),
        ("setpoint.desired_celsius", |s| s.desired_celsius = f64::NAN),
        ("setpoint.desired_celsius", |s| {
            s.desired_celsius = f64::INFINITY
        }),
        ("setpoint.desired_celsius", |s| s.desired_celsius = -50.5),
        ("setpoint.desired_celsius", |s| s.desired_celsius = 100.5),
        ("setpoint.up_delta_celsius", |s| s.up_delta_celsius = -1.0),
        ("setpoint.up_delta_celsius", |s| {
            s.up_delta_celsius = f64::NEG_INFINITY
        }),
        ("setpoint.up_delta_celsius", |s| s.up_delta_celsius = 20.01),
        ("setpoint.down_delta_celsius", |s| {
            s.down_delta_celsius = f64::NAN
        }),
        ("setpoint.down_delta_celsius", |s| {
            s.down_delta_celsius = 21.0
        }),
        ("setpoint.reason", |s| s.reason = "r".repeat(257)),
        ("setpoint.reason", |s| s.reason = "nul \0 inside".into()),
    ];
    for (field, edit) in cases {
        let mut sp = base.clone();
        edit(&mut sp);
        let err = client
            .put_setpoint(put(sp.clone(), None))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(field),
            "{field} not named in {:?}",
            err.message()
        );
    }
    let err = client
        .put_setpoint(pb::PutSetpointRequest {
            request_id: Default::default(),
            setpoint: None,
            expected_revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("setpoint"));
    let err = client.put_setpoint(put(base, Some(-1))).await.unwrap_err();
    assert!(err.message().contains("expected_revision"), "{err:?}");

    let listed = list(&mut client, "", 1000, "").await.unwrap();
    assert!(
        listed.setpoints.is_empty(),
        "a rejected Put stored {listed:?}"
    );
}

/// A service whose sensor "s" has a setpoint in building "b", and a client of it.
async fn with_setpoint_s() -> (
    TestApp,
    pb::setpoint_service_client::SetpointServiceClient<tonic::transport::Channel>,
) {
    common::spawn_with_setpoint(TestApp::fresh_config().await, "s").await
}

#[tokio::test]
async fn database_check_constraints_back_up_validation() {
    let (app, mut client) = with_setpoint_s().await;
    let mut db = app.db().await;
    for bad in ["'NaN'::float8", "'Infinity'::float8", "101", "-51"] {
        let result = sqlx::query(&format!("UPDATE setpoints SET desired_celsius = {bad}"))
            .execute(&mut db)
            .await;
        assert!(result.is_err(), "{bad} accepted by the database");
    }
    let result = sqlx::query("UPDATE setpoints SET up_delta_celsius = 'NaN'")
        .execute(&mut db)
        .await;
    assert!(result.is_err());

    // A Put the database refuses (here a trigger standing in for a constraint the API does not
    // check) is answered with the database's reason, as bad input, not as an internal error.
    for statement in [
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         RAISE EXCEPTION 'refused' USING ERRCODE = 'check_violation', \
         CONSTRAINT = 'desired_celsius'; END $$",
        "CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON setpoints FOR EACH ROW \
         WHEN (NEW.sensor_id = 'refused') EXECUTE FUNCTION refuse()",
    ] {
        sqlx::query(statement).execute(&mut db).await.unwrap();
    }
    let err = client
        .put_setpoint(put(setpoint("refused", "b", 20.0), None))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("desired_celsius"), "{err:?}");
}

#[tokio::test]
async fn a_band_reaching_past_the_accepted_readings_is_refused() {
    // An operator narrowed the readings the loop accepts to 0..40 °C.
    let mut config = TestApp::fresh_config().await;
    config.kafka.reading_range_celsius = thermostat::config::CelsiusRange {
        min: 0.0,
        max: 40.0,
    };
    let app = TestApp::spawn_with(config).await;
    let mut client = app.setpoints().await;
    // 39.5 ± 0.5: OFF needs a reading above 40, which would be dead-lettered; likewise ON
    // below 0 for 0.5 ± 0.5. The error names the field that takes the band out of reach.
    for (desired, field) in [
        (39.5, "setpoint.up_delta_celsius"),
        (0.5, "setpoint.down_delta_celsius"),
        (45.0, "setpoint.desired_celsius"),
    ] {
        let err = client
            .put_setpoint(put(setpoint("edge", "b", desired), None))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{desired}: {err:?}");
        assert!(
            err.message().contains(field) && err.message().contains("READING_RANGE_CELSIUS 0..40"),
            "{desired}: {err:?}"
        );
    }
    assert_eq!(
        get(&mut client, "edge").await.unwrap_err().code(),
        Code::NotFound
    );
    // Just inside, both ways.
    for desired in [39.4, 0.6] {
        client
            .put_setpoint(put(setpoint("edge", "b", desired), None))
            .await
            .unwrap_or_else(|e| panic!("{desired}: {e:?}"));
    }
}

#[tokio::test]
async fn get_and_delete_of_a_missing_sensor_are_not_found() {
    let app = TestApp::spawn().await;
    let mut client = app.setpoints().await;
    assert_eq!(
        get(&mut client, "nope").await.unwrap_err().code(),
        Code::NotFound
    );
    let err = client
        .delete_setpoint(pb::DeleteSetpointRequest {
            sensor_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .list_setpoint_history(pb::ListSetpointHistoryRequest {
            sensor_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = get(&mut client, "bad id!").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("sensor_id"));
}

#[tokio::test]
async fn list_pages_through_everything_in_order_and_filters_by_building() {
    let app = TestApp::spawn().await;
    let mut client = app.setpoints().await;
    for i in 0..25 {
        let building = if i % 3 == 0 { "east" } else { "west" };
        client
            .put_setpoint(put(
                setpoint(&format!("sensor-{i:02}"), building, 20.0),
                None,
            ))
            .await
            .unwrap();
    }
    // A deleted setpoint is not listed.
    client
        .delete_setpoint(pb::DeleteSetpointRequest {
            sensor_id: "sensor-24".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(&mut client, "", 10, &token).await.unwrap();
        assert!(page.setpoints.len() <= 10);
        seen.extend(page.setpoints.into_iter().map(|s| s.sensor_id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<String> = (0..24).map(|i| format!("sensor-{i:02}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(pages, 3);

    let east = list(&mut client, "east", 0, "").await.unwrap();
    let east_ids: BTreeSet<_> = east.setpoints.iter().map(|s| s.sensor_id.clone()).collect();
    let expected_east: BTreeSet<_> = (0..24)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("sensor-{i:02}"))
        .collect();
    assert_eq!(east_ids, expected_east);
    assert!(east.next_page_token.is_empty());

    // A token only works with the filter it was issued for.
    let first = list(&mut client, "west", 2, "").await.unwrap();
    let err = list(&mut client, "east", 2, &first.next_page_token)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("page_token"));
    let err = list(&mut client, "", -5, "").await.unwrap_err();
    assert!(err.message().contains("page_size"));
    let err = list(&mut client, "", 5, "garbage!").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A made-up token whose position PostgreSQL cannot compare (text cannot hold a NUL).
    let forged = URL_SAFE_NO_PAD.encode("setpoints:\nsensor-00\0");
    let err = list(&mut client, "", 5, &forged).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("page_token"));
}

#[tokio::test]
async fn history_records_create_update_delete_and_recreate_newest_first() {
    let app = TestApp::spawn().await;
    let mut client = app.setpoints().await;
    let mut sp = setpoint("s", "b", 20.0);
    sp.reason = "create".into();
    client.put_setpoint(put(sp.clone(), None)).await.unwrap();
    sp.desired_celsius = 22.0;
    sp.reason = "warmer".into();
    client.put_setpoint(put(sp.clone(), None)).await.unwrap();
    client
        .delete_setpoint(pb::DeleteSetpointRequest {
            request_id: Default::default(),
            sensor_id: "s".into(),
            expected_revision: Some(2),
            reason: "room closed".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        get(&mut client, "s").await.unwrap_err().code(),
        Code::NotFound
    );
    // Re-creating continues the revision sequence; "must not exist" holds for a deleted one.
    sp.reason = "reopened".into();
    let recreated = client
        .put_setpoint(put(sp.clone(), Some(0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recreated.revision, 4);

    let entries = history(&mut client, "s").await;
    let summary: Vec<_> = entries
        .iter()
        .map(|e| {
            (
                e.revision,
                e.deleted,
                e.reason.as_str(),
                e.setpoint.as_ref().map(|s| s.desired_celsius),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (4, false, "reopened", Some(22.0)),
            (3, true, "room closed", None),
            (2, false, "warmer", Some(22.0)),
            (1, false, "create", Some(20.0)),
        ]
    );
    assert!(entries
        .iter()
        .all(|e| e.changed_by == "anonymous" && e.change_time.is_some()));

    // Paged one at a time, the same entries come back.
    let mut token = String::new();
    let mut revisions = Vec::new();
    loop {
        let page = client
            .list_setpoint_history(pb::ListSetpointHistoryRequest {
                sensor_id: "s".into(),
                page_size: 1,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        revisions.extend(page.entries.iter().map(|e| e.revision));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(revisions, vec![4, 3, 2, 1]);
}

#[tokio::test]
async fn racing_writers_lose_no_update_and_leave_no_history_gap() {
    let app = TestApp::spawn().await;
    let mut client = app.setpoints().await;
    client
        .put_setpoint(put(setpoint("hot", "b", 0.0), None))
        .await
        .unwrap();

    // Unconditional writers: every Put with a new value must produce exactly one revision.
    let writers = 16;
    let per_writer = 10;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let mut client = app.setpoints().await;
        tasks.spawn(async move {
            let mut ok = 0;
            for i in 0..per_writer {
                let desired = f64::from(w * per_writer + i + 1) / 10.0;
                if client
                    .put_setpoint(put(setpoint("hot", "b", desired), None))
                    .await
                    .is_ok()
                {
                    ok += 1;
                }
            }
            ok
        });
    }
    let mut successes = 1; // the create
    while let Some(ok) = tasks.join_next().await {
        successes += ok.unwrap();
    }
    assert_eq!(successes, 1 + writers * per_writer);
    let stored = get(&mut client, "hot").await.unwrap();
    assert_eq!(stored.revision, i64::from(successes));
    let revisions: Vec<i64> = history(&mut client, "hot")
        .await
        .iter()
        .map(|e| e.revision)
        .collect();
    assert_eq!(
        revisions,
        (1..=i64::from(successes)).rev().collect::<Vec<_>>()
    );

    // Conditional writers racing on the same expected revision: exactly one wins.
    let current = stored.revision;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..12 {
        let mut client = app.setpoints().await;
        tasks.spawn(async move {
            client
                .put_setpoint(put(
                    setpoint("hot", "b", 50.0 + f64::from(w)),
                    Some(current),
                ))
                .await
                .map_err(|s| s.code())
        });
    }
    let mut wins = 0;
    while let Some(result) = tasks.join_next().await {
        match result.unwrap() {
            Ok(_) => wins += 1,
            Err(code) => assert_eq!(code, Code::Aborted),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(get(&mut client, "hot").await.unwrap().revision, current + 1);
}

async fn get(
    client: &mut pb::setpoint_service_client::SetpointServiceClient<tonic::transport::Channel>,
    sensor: &str,
) -> Result<pb::Setpoint, tonic::Status> {
    client
        .get_setpoint(pb::GetSetpointRequest {
            sensor_id: sensor.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn list(
    client: &mut pb::setpoint_service_client::SetpointServiceClient<tonic::transport::Channel>,
    building: &str,
    page_size: i32,
    token: &str,
) -> Result<pb::ListSetpointsResponse, tonic::Status> {
    client
        .list_setpoints(pb::ListSetpointsRequest {
            building_id: building.into(),
            page_size,
            page_token: token.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn history(
    client: &mut pb::setpoint_service_client::SetpointServiceClient<tonic::transport::Channel>,
    sensor: &str,
) -> Vec<pb::SetpointHistoryEntry> {
    client
        .list_setpoint_history(pb::ListSetpointHistoryRequest {
            sensor_id: sensor.into(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// Replicas apply the version a change notification carries (stream::setpoint_sync), so it must
/// be the stored one to the last bit, whoever wrote it and however their session prints floats.
#[tokio::test]
async fn change_notifications_carry_the_stored_version_exactly() {
    use sqlx::postgres::PgListener;
    use thermostat::domain::{BuildingId, SensorId, Setpoint};
    use thermostat::store::SetpointVersion;
    use thermostat::stream::setpoint_sync::CHANNEL;

    let app = TestApp::spawn().await;
    let mut listener = PgListener::connect(&app.database_url).await.unwrap();
    listener.listen(CHANNEL).await.unwrap();
    let mut next = async || {
        let notification =
            tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
                .await
                .expect("a notification within 10 s")
                .unwrap();
        SetpointVersion::from_notification(notification.payload()).unwrap()
    };
    // Needs 17 significant digits: PostgreSQL's text for it at extra_float_digits = 0 has 15.
    let desired = 21.123_456_789_012_34_f64;
    let mut client = app.setpoints().await;
    let mut sp = setpoint("room-n", "hq", desired);
    sp.up_delta_celsius = 0.1 + 0.2;
    client.put_setpoint(put(sp, None)).await.unwrap();
    let expected = |revision, desired: f64| SetpointVersion {
        sensor_id: SensorId::parse("room-n").unwrap(),
        revision,
        setpoint: Some(
            Setpoint::new(
                SensorId::parse("room-n").unwrap(),
                BuildingId::parse("hq").unwrap(),
                desired,
                0.1 + 0.2,
                0.5,
            )
            .unwrap(),
        ),
        level: thermostat::domain::levels::Level::Default,
        level_revision: revision,
    };
    assert_eq!(next().await, expected(1, desired));

    // A write by SQL from a session that prints floats with 15 digits.
    let mut db = app.db().await;
    sqlx::query("SET extra_float_digits = 0")
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("UPDATE setpoints SET desired_celsius = $1, revision = revision + 1")
        .bind(-desired)
        .execute(&mut db)
        .await
        .unwrap();
    assert_eq!(next().await, expected(2, -desired));

    client
        .delete_setpoint(pb::DeleteSetpointRequest {
            sensor_id: "room-n".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let deleted = next().await;
    assert_eq!((deleted.revision, deleted.setpoint), (3, None));
}

/// Puts that arrive while the writer is busy are written together in one statement (they share
/// its transaction's `update_time`), and each still gets its own outcome: created, updated,
/// unchanged, ABORTED on a stale revision, several Puts to one sensor all applied in turn. A
/// statement error caused by one Put does not fail the others written with it.
#[tokio::test]
async fn concurrent_puts_share_a_statement_and_keep_their_own_outcomes() {
    let mut config = TestApp::fresh_config().await;
    config.database.database_put_writers = 1;
    let app = TestApp::spawn_with(config).await;
    let mut client = app.setpoints().await;
    for sensor in ["gate", "c-0", "c-1", "c-2", "c-3", "same", "dup"] {
        client
            .put_setpoint(put(setpoint(sensor, "b", 20.0), None))
            .await
            .unwrap();
    }
    let mut db = app.db().await;
    let watch = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    // Holds the only writer: its statement for "gate" waits on the row lock taken here, and the
    // wave sent after it queues behind it. Returns the gate's Put, still running.
    #[allow(clippy::async_yields_async)]
    let gated = async |db: &mut sqlx::PgConnection, client: &Client, desired: f64| {
        lock_row(db, "gate").await;
        let mut client = client.clone();
        let gate = tokio::spawn(async move {
            client
                .put_setpoint(put(setpoint("gate", "b", desired), None))
                .await
        });
        until_a_statement_waits(&watch).await;
        gate
    };
    let base = client.clone();
    let wave = move |requests: Vec<pb::PutSetpointRequest>| {
        let mut tasks = Vec::new();
        for request in requests {
            let mut client = base.clone();
            tasks.push(tokio::spawn(async move {
                client.put_setpoint(request).await.map(|r| r.into_inner())
            }));
        }
        tasks
    };
    let gate = gated(&mut db, &client, 21.0).await;
    let mut requests: Vec<_> = (0..20)
        .map(|i| put(setpoint(&format!("new-{i}"), "b", 21.0), None))
        .collect();
    requests.push(put(setpoint("c-0", "b", 22.0), Some(1)));
    requests.push(put(setpoint("c-1", "b", 22.0), Some(1)));
    requests.push(put(setpoint("c-2", "b", 22.0), Some(7)));
    requests.push(put(setpoint("c-3", "b", 22.0), Some(0)));
    requests.push(put(setpoint("nowhere", "b", 22.0), Some(5)));
    requests.push(put(setpoint("same", "b", 20.0), None));
    for desired in [23.0, 24.0, 25.0] {
        requests.push(put(setpoint("dup", "b", desired), None));
    }
    let (gate, outcomes) = release(&app.store, &mut db, gate, wave(requests)).await;
    gate.unwrap();

    let written = |i: usize| outcomes[i].as_ref().expect("written").clone();
    let coalesced: BTreeSet<_> = (0..22)
        .map(|i| format!("{:?}", written(i).update_time))
        .collect();
    assert_eq!(
        coalesced.len(),
        1,
        "one statement for the wave: {coalesced:?}"
    );
    for i in 0..20 {
        assert_eq!((written(i).revision, written(i).desired_celsius), (1, 21.0));
    }
    assert_eq!((written(20).revision, written(21).revision), (2, 2));
    let code = |i: usize| outcomes[i].as_ref().map(|_| ()).map_err(|s| s.code());
    assert_eq!(code(22), Err(Code::Aborted));
    assert!(outcomes[22].as_ref().unwrap_err().message().contains('1'));
    assert_eq!(code(23), Err(Code::Aborted));
    assert_eq!(code(24), Err(Code::Aborted));
    assert_eq!(
        (written(25).revision, written(25).desired_celsius),
        (1, 20.0)
    );
    let mut dup_revisions: Vec<i64> = (26..29).map(|i| written(i).revision).collect();
    dup_revisions.sort_unstable();
    assert_eq!(dup_revisions, vec![2, 3, 4]);
    assert_eq!(
        history(&mut client, "dup")
            .await
            .iter()
            .map(|e| e.revision)
            .collect::<Vec<_>>(),
        vec![4, 3, 2, 1]
    );
    for sensor in ["c-2", "c-3"] {
        assert_eq!(get(&mut client, sensor).await.unwrap().revision, 1);
    }
    assert_eq!(
        get(&mut client, "nowhere").await.unwrap_err().code(),
        Code::NotFound
    );

    // One Put the database rejects, in a wave with others.
    sqlx::query(
        "CREATE FUNCTION reject_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'poisoned'; END $$",
    )
    .execute(&mut db)
    .await
    .unwrap();
    sqlx::query(
        "CREATE TRIGGER reject_poison BEFORE INSERT OR UPDATE ON setpoints FOR EACH ROW \
         WHEN (NEW.sensor_id = 'poison') EXECUTE FUNCTION reject_poison()",
    )
    .execute(&mut db)
    .await
    .unwrap();
    let gate = gated(&mut db, &client, 22.0).await;
    let mut requests = vec![put(setpoint("poison", "b", 21.0), None)];
    requests.extend((0..10).map(|i| put(setpoint(&format!("new-{i}"), "b", 19.0), None)));
    let (gate, outcomes) = release(&app.store, &mut db, gate, wave(requests)).await;
    gate.unwrap();
    assert_eq!(outcomes[0].as_ref().unwrap_err().code(), Code::Internal);
    for outcome in &outcomes[1..] {
        let stored = outcome.as_ref().expect("written despite the poisoned Put");
        assert_eq!((stored.revision, stored.desired_celsius), (2, 19.0));
    }
    assert_eq!(
        get(&mut client, "poison").await.unwrap_err().code(),
        Code::NotFound
    );

    // A row lock held for longer than DATABASE_ACQUIRE_TIMEOUT fails that Put with UNAVAILABLE
    // and does not hold up the Puts queued behind it any longer.
    let gate = gated(&mut db, &client, 23.0).await;
    let behind = wave(vec![put(setpoint("new-0", "b", 18.0), None)]);
    assert_eq!(gate.await.unwrap().unwrap_err().code(), Code::Unavailable);
    for task in behind {
        assert_eq!(task.await.unwrap().expect("written").revision, 3);
    }
    sqlx::query("ROLLBACK").execute(&mut db).await.unwrap();
}

type Client = pb::setpoint_service_client::SetpointServiceClient<tonic::transport::Channel>;

/// Puts written in one statement are each checked against their own caller's buildings.
#[tokio::test]
async fn puts_written_together_are_each_checked_against_their_own_scope() {
    use std::collections::BTreeSet;
    use thermostat::domain::{BuildingId, Reason, Scope, SensorId, Setpoint};
    use thermostat::store::{PutOutcome, Store};
    use thermostat::Error;

    let mut config = TestApp::fresh_config().await;
    config.database.database_put_writers = 1;
    let app = TestApp::spawn_with(config.clone()).await;
    let store = Store::connect_lazy(&config.database).unwrap();
    let value = |sensor: &str, building: &str, desired: f64| {
        Setpoint::new(
            SensorId::parse(sensor).unwrap(),
            BuildingId::parse(building).unwrap(),
            desired,
            0.5,
            0.5,
        )
        .unwrap()
    };
    let scope = |buildings: &[&str]| {
        Scope::Buildings(
            buildings
                .iter()
                .map(|b| BuildingId::parse(*b).unwrap())
                .collect::<BTreeSet<_>>(),
        )
    };
    let put = |setpoint: Setpoint, scope: Scope| {
        let store = store.clone();
        tokio::spawn(async move {
            let reason = Reason::parse("").unwrap();
            store
                .put_setpoint(&setpoint, None, "test", &reason, &scope, None)
                .await
        })
    };
    for sensor in [
        "gate",
        "north/s-1",
        "south/s-2",
        "north/s-3",
        "south/s-4",
        "south/s-5",
    ] {
        put(value(sensor, "south", 20.0), Scope::All)
            .await
            .unwrap()
            .unwrap();
    }

    let mut db = app.db().await;
    let watch = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    lock_row(&mut db, "gate").await;
    let gate = put(value("gate", "south", 21.0), Scope::All);
    until_a_statement_waits(&watch).await;
    let queued = vec![
        // Bound to another building: as if it did not exist. (Named under the caller's, so the
        // binding rule lets the statement try; the scope check under the row lock refuses.)
        put(value("north/s-1", "north", 22.0), scope(&["north"])),
        put(value("south/s-2", "south", 22.0), scope(&["south"])),
        put(
            value("north/s-3", "north", 22.0),
            scope(&["north", "south"]),
        ),
        put(value("south/s-4", "south", 22.0), Scope::All),
        put(value("south/s-5", "south", 22.0), scope(&[])),
    ];
    let (gate, outcomes) = release(&store, &mut db, gate, queued).await;
    gate.unwrap();

    let written = |i: usize| match &outcomes[i] {
        Ok(PutOutcome::Written(stored)) => stored.clone(),
        other => panic!("Put {i} not written: {other:?}"),
    };
    assert!(
        matches!(outcomes[0], Err(Error::NotFound { .. })),
        "{:?}",
        outcomes[0]
    );
    assert!(
        matches!(outcomes[4], Err(Error::NotFound { .. })),
        "{:?}",
        outcomes[4]
    );
    let times: BTreeSet<_> = [1, 2, 3].map(|i| written(i).update_time).into();
    assert_eq!(times.len(), 1, "one statement: {times:?}");
    assert_eq!(written(2).setpoint.building_id.as_str(), "north");
    let unchanged: Vec<(String, i64)> = sqlx::query_as(
        "SELECT building_id, revision FROM setpoints WHERE sensor_id IN ('north/s-1', 'south/s-5') \
         ORDER BY sensor_id",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(unchanged, vec![("south".into(), 1), ("south".into(), 1)]);
}

#[tokio::test]
async fn a_put_writer_whose_connection_was_terminated_reconnects() {
    let app = TestApp::spawn().await;
    let mut client = app.setpoints().await;
    client
        .put_setpoint(put(setpoint("before", "b", 20.0), None))
        .await
        .unwrap();
    // The writer keeps its connection between statements: end it from the server's side, as an
    // operator's pg_terminate_backend or a failover would, and wait until it is gone.
    let mut db = app.db().await;
    let mut terminate_writer = async || {
        let terminated: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
               AND query LIKE '%unnest(%'",
        )
        .fetch_all(&mut db)
        .await
        .unwrap();
        assert_eq!(terminated, [true], "the writer's connection, terminated");
    };
    terminate_writer().await;

    // The next Put may find the connection dead (unless the writer pinged it first, after an
    // idle second): that Put fails as retryable, never as an internal error.
    match client
        .put_setpoint(put(setpoint("during", "b", 20.0), None))
        .await
    {
        Ok(_) => {}
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
    }
    // The dead connection is not kept: the writer reconnects.
    for sensor in ["after-1", "after-2"] {
        let written = client
            .put_setpoint(put(setpoint(sensor, "b", 20.0), None))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(written.revision, 1);
    }

    // A connection idle for more than a second is pinged before use, so a Put after a pause
    // does not find out the hard way.
    terminate_writer().await;
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let written = client
        .put_setpoint(put(setpoint("after-a-pause", "b", 20.0), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(written.revision, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_delete_of_a_row_locked_too_long_is_unavailable_not_stuck() {
    let (app, mut client) = with_setpoint_s().await;
    let mut db = app.db().await;
    lock_row(&mut db, "s").await;
    // The test service's DATABASE_ACQUIRE_TIMEOUT is 2 s; without a bound the Delete waited
    // for the lock as long as the transaction stayed open.
    let delete = || pb::DeleteSetpointRequest {
        sensor_id: "s".into(),
        ..Default::default()
    };
    let deleted = tokio::time::timeout(Duration::from_secs(10), client.delete_setpoint(delete()))
        .await
        .expect("a Delete that returns while the row stays locked");
    assert_eq!(deleted.unwrap_err().code(), Code::Unavailable);
    sqlx::query("ROLLBACK").execute(&mut db).await.unwrap();
    // And once the lock is gone it goes through.
    client.delete_setpoint(delete()).await.unwrap();
    assert_eq!(
        get(&mut client, "s").await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn a_put_whose_caller_gave_up_before_its_turn_is_not_written() {
    let mut config = TestApp::fresh_config().await;
    config.database.database_put_writers = 1;
    let (app, mut client) = common::spawn_with_setpoint(config, "gate").await;
    let mut db = app.db().await;
    let watch = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    // The only writer waits on the gate's row; a Put queues behind it, and its caller's
    // deadline passes while it waits.
    lock_row(&mut db, "gate").await;
    let mut gate_client = client.clone();
    let gate = tokio::spawn(async move {
        gate_client
            .put_setpoint(put(setpoint("gate", "b", 21.0), None))
            .await
    });
    until_a_statement_waits(&watch).await;
    let mut late = tonic::Request::new(put(setpoint("late", "b", 21.0), None));
    late.set_timeout(Duration::from_millis(300));
    // The server's deadline or the client's own timeout, whichever fires first.
    let late = client.put_setpoint(late).await.unwrap_err();
    assert!(
        matches!(late.code(), Code::DeadlineExceeded | Code::Cancelled),
        "deadline passed: {late:?}"
    );
    // The abandoned Put is still queued: the writer finds its caller gone when it gets to it.
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            app.store.puts_waiting() == 1
        })
        .await
    );
    sqlx::query("COMMIT").execute(&mut db).await.unwrap();
    gate.await.unwrap().unwrap();
    // A Put after it is written (the writer has been past it), the abandoned one is not.
    client
        .put_setpoint(put(setpoint("after", "b", 20.0), None))
        .await
        .unwrap();
    assert_eq!(
        get(&mut client, "late").await.unwrap_err().code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn a_put_to_a_database_that_stopped_answering_is_unavailable_in_bounded_time() {
    let mut config = TestApp::fresh_config().await;
    let url = config.database.database_url.clone();
    let host_port = url
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .expect("host:port in the test URL")
        .to_owned();
    let proxy = common::StallingProxy::start(host_port.parse().unwrap()).await;
    config.database.database_url = url.replace(&host_port, &proxy.addr.to_string());
    let (_app, mut client) = common::spawn_with_setpoint(config, "s").await;

    // The database stops answering, its connections stay open. The test service's
    // DATABASE_ACQUIRE_TIMEOUT is 2 s, its REQUEST_TIMEOUT 30 s.
    proxy.stall(true);
    let started = std::time::Instant::now();
    let stalled = tokio::time::timeout(
        Duration::from_secs(15),
        client.put_setpoint(put(setpoint("s", "b", 21.0), None)),
    )
    .await
    .expect("a Put that returns while the database does not answer");
    assert_eq!(stalled.unwrap_err().code(), Code::Unavailable);
    assert!(started.elapsed() < Duration::from_secs(10));

    // Answering again: the next Put goes through on a fresh connection.
    proxy.stall(false);
    let written = common::eventually(Duration::from_secs(20), || {
        let mut client = client.clone();
        async move {
            client
                .put_setpoint(put(setpoint("s", "b", 22.0), None))
                .await
                .is_ok()
        }
    })
    .await;
    assert!(written, "Puts work again once the database answers");
}

/// Locks `sensor`'s row in a transaction on `db` (left open), so that a write to it waits.
async fn lock_row(db: &mut sqlx::PgConnection, sensor: &str) {
    sqlx::query("BEGIN").execute(&mut *db).await.unwrap();
    sqlx::query("SELECT 1 FROM setpoints WHERE sensor_id = $1 FOR UPDATE")
        .bind(sensor)
        .execute(&mut *db)
        .await
        .unwrap();
}

/// Waits until the `queued` Puts are all in `store`'s Put queue behind `gate`, commits `db`'s
/// transaction to release the gate's row, and returns the outcome of the gate and those of
/// `queued`, in order.
async fn release<G, T>(
    store: &thermostat::store::Store,
    db: &mut sqlx::PgConnection,
    gate: tokio::task::JoinHandle<G>,
    queued: Vec<tokio::task::JoinHandle<T>>,
) -> (G, Vec<T>) {
    assert!(
        common::eventually(Duration::from_secs(10), || async {
            store.puts_waiting() == queued.len()
        })
        .await,
        "{} of {} Puts queued",
        store.puts_waiting(),
        queued.len()
    );
    sqlx::query("COMMIT").execute(&mut *db).await.unwrap();
    let gate = gate.await.unwrap();
    let mut outcomes = Vec::new();
    for task in queued {
        outcomes.push(task.await.unwrap());
    }
    (gate, outcomes)
}

/// Returns once a statement on this database waits on a lock.
async fn until_a_statement_waits(watch: &sqlx::PgPool) {
    let waiting = common::eventually(std::time::Duration::from_secs(10), async || {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(watch)
        .await
        .unwrap();
        waiting == 1
    })
    .await;
    assert!(waiting, "a writer waits on the lock");
}

#[tokio::test]
async fn setpoint_rows_are_not_deleted_by_sql_but_by_the_api() {
    let (app, mut client) = with_setpoint_s().await;
    // A row removed by SQL would go unnoticed by the replicas, and its sensor could not be
    // created again (revision 1 is in the history).
    let mut db = app.db().await;
    for statement in [
        "DELETE FROM setpoints WHERE sensor_id = 's'",
        "TRUNCATE setpoints",
    ] {
        let err = sqlx::query(statement).execute(&mut db).await.unwrap_err();
        assert!(
            err.to_string().contains("DeleteSetpoint"),
            "{statement}: {err}"
        );
    }
    // The API's deletion (a tombstone) and a new Put go on as before.
    client
        .delete_setpoint(pb::DeleteSetpointRequest {
            request_id: Default::default(),
            sensor_id: "s".into(),
            expected_revision: None,
            reason: String::new(),
        })
        .await
        .unwrap();
    let again = client
        .put_setpoint(put(setpoint("s", "b", 21.0), None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.revision, 3);
}

#[tokio::test]
async fn a_put_answered_unavailable_is_never_written_afterwards() {
    let (app, mut client) = common::spawn_with_setpoint(TestApp::fresh_config().await, "s").await;
    let mut db = app.db().await;
    // Every write of a setpoint now takes longer than the service waits for its answer (4 s:
    // twice the test's DATABASE_ACQUIRE_TIMEOUT).
    for statement in [
        "CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(7); RETURN NEW; END $$",
        "CREATE TRIGGER slow_write BEFORE INSERT OR UPDATE ON setpoints \
         FOR EACH ROW EXECUTE FUNCTION slow_write()",
    ] {
        sqlx::query(statement).execute(&mut db).await.unwrap();
    }
    let timed_out = client
        .put_setpoint(put(setpoint("s", "b", 25.0), None))
        .await;
    assert_eq!(timed_out.unwrap_err().code(), Code::Unavailable);
    // Waits for the statement to end, one way or the other.
    sqlx::query("DROP TRIGGER slow_write ON setpoints")
        .execute(&mut db)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored = get(&mut client, "s").await.unwrap();
    assert_eq!(
        (stored.desired_celsius, stored.revision),
        (20.0, 1),
        "the Put answered UNAVAILABLE was written"
    );
}

/// Issue 24: pages were cut by row count only, so a page of the documented maximum of 1000
/// passed `MAX_MESSAGE_SIZE` (64 KiB) and the call failed with OUT_OF_RANGE. Rows of the
/// longest ids and reasons, written straight to the tables.
#[tokio::test]
async fn the_largest_pages_of_the_longest_rows_fit_the_message_limit() {
    let app = TestApp::spawn().await;
    let mut db = app.db().await;
    let reason = "r".repeat(256);
    // Ids of 128 characters, named under a building of 64.
    let building = "b".repeat(64);
    sqlx::query(
        "INSERT INTO setpoints (sensor_id, building_id, desired_celsius, up_delta_celsius, \
                                down_delta_celsius, revision, update_time, updated_by, reason) \
         SELECT $1 || '/' || lpad(n::text, 63, '0'), $1, 21.5, 0.5, 0.5, 1, now(), $2, $3 \
         FROM generate_series(1, 1000) AS n",
    )
    .bind(&building)
    .bind("u".repeat(128))
    .bind(&reason)
    .execute(&mut db)
    .await
    .unwrap();
    let sensor = format!("{building}/{}", "0".repeat(63));
    sqlx::query(
        "INSERT INTO setpoint_history (sensor_id, revision, building_id, desired_celsius, \
                                       up_delta_celsius, down_delta_celsius, deleted, \
                                       change_time, changed_by, reason) \
         SELECT $1, n, $2, 21.5, 0.5, 0.5, false, now(), $3, $4 \
         FROM generate_series(1, 1000) AS n",
    )
    .bind(&sensor)
    .bind(&building)
    .bind("u".repeat(128))
    .bind(&reason)
    .execute(&mut db)
    .await
    .unwrap();

    let mut client = app.setpoints().await;
    let (mut listed, mut pages, mut token) = (BTreeSet::new(), 0, String::new());
    loop {
        let page = list(&mut client, &building, 1000, &token)
            .await
            .expect("a page of the largest size fits");
        assert!(!page.setpoints.is_empty());
        pages += 1;
        listed.extend(page.setpoints.into_iter().map(|s| s.sensor_id));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!((listed.len(), pages > 1), (1000, true), "{pages} pages");

    let (mut revisions, mut token) = (Vec::new(), String::new());
    loop {
        let page = client
            .list_setpoint_history(pb::ListSetpointHistoryRequest {
                sensor_id: sensor.clone(),
                page_size: 1000,
                page_token: token,
            })
            .await
            .expect("a history page of the largest size fits")
            .into_inner();
        revisions.extend(page.entries.iter().map(|e| e.revision));
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(revisions, (1..=1000).rev().collect::<Vec<i64>>());
}

/// Issue 24 (AIP-134): an update changes the fields its mask names and no other, with the
/// errors a client acts on in their details.
#[tokio::test]
async fn an_update_changes_only_the_fields_its_mask_names() {
    use tonic_types::StatusExt;
    let app = TestApp::spawn().await;
    let mut client = app.setpoints().await;
    let mut wide = setpoint("u-1", "b", 20.0);
    wide.up_delta_celsius = 1.5;
    client.put_setpoint(put(wide, None)).await.unwrap();
    let update = |fields: &[&str], desired: f64, expected: Option<i64>| pb::UpdateSetpointRequest {
        request_id: Default::default(),
        setpoint: Some(pb::Setpoint {
            sensor_id: "u-1".into(),
            desired_celsius: desired,
            reason: "warmer".into(),
            // Zero in the request: not named, so not applied.
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: fields.iter().map(|f| (*f).to_owned()).collect(),
        }),
        expected_revision: expected,
    };

    let updated = client
        .update_setpoint(update(&["desired_celsius"], 22.0, None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            updated.revision,
            updated.desired_celsius,
            updated.up_delta_celsius,
            updated.down_delta_celsius,
            updated.building_id.as_str(),
            updated.reason.as_str(),
        ),
        (2, 22.0, 1.5, 0.5, "b", "")
    );
    let with_reason = client
        .update_setpoint(update(&["desired_celsius", "reason"], 23.0, Some(2)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (with_reason.revision, with_reason.reason.as_str()),
        (3, "warmer")
    );

    // A stale revision: ABORTED, with the current one in the details.
    let stale = client
        .update_setpoint(update(&["desired_celsius"], 19.0, Some(2)))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    let details = stale.get_error_details();
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(
        (
            info.reason.as_str(),
            info.metadata["current_revision"].as_str()
        ),
        ("REVISION_MISMATCH", "3")
    );

    // Bad masks and values name their field.
    for (fields, desired, field) in [
        (&["revision"][..], 20.0, "update_mask"),
        (&[][..], 20.0, "update_mask"),
        (&["desired_celsius"][..], 900.0, "setpoint.desired_celsius"),
    ] {
        let refused = client
            .update_setpoint(update(fields, desired, None))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{fields:?}");
        let details = refused.get_error_details();
        let violations = &details.bad_request().expect("BadRequest").field_violations;
        assert_eq!(violations[0].field, field, "{fields:?}");
    }
    let mut missing = update(&["desired_celsius"], 20.0, None);
    missing.setpoint.as_mut().unwrap().sensor_id = "nowhere".into();
    let missing = client.update_setpoint(missing).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Nothing refused was written.
    let stored = get(&mut client, "u-1").await.unwrap();
    assert_eq!((stored.revision, stored.desired_celsius), (3, 23.0));
}

/// Issue 24 (AIP-155): a write retried with its request id, on any replica, gets its first
/// outcome and writes nothing again, also when the retries race each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_write_with_its_request_id_is_answered_once_on_every_replica() {
    let config = TestApp::fresh_config().await;
    let (first, second) = (
        TestApp::spawn_with(config.clone()).await,
        TestApp::spawn_with(config).await,
    );
    let (mut a, mut b) = (first.setpoints().await, second.setpoints().await);
    let with_id = |desired: f64, expected: Option<i64>, id: &str| pb::PutSetpointRequest {
        request_id: id.into(),
        ..put(setpoint("r-1", "b", desired), expected)
    };

    let created = a
        .put_setpoint(with_id(21.0, None, "put-1"))
        .await
        .unwrap()
        .into_inner();
    // Someone else changes it; then the first Put is retried on the other replica.
    a.put_setpoint(put(setpoint("r-1", "b", 25.0), None))
        .await
        .unwrap();
    let retried = b
        .put_setpoint(with_id(21.0, None, "put-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried, created, "the first outcome, not a new write");
    let stored = get(&mut b, "r-1").await.unwrap();
    assert_eq!((stored.revision, stored.desired_celsius), (2, 25.0));

    // The same id for another request: refused, naming the field.
    let reused = b
        .put_setpoint(with_id(22.0, None, "put-1"))
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument);
    assert!(reused.message().contains("request_id"), "{reused:?}");
    let bad = b
        .put_setpoint(with_id(22.0, None, "not an id!"))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // Ten copies of one conditional Put race on both replicas: one writes, every copy gets
    // its outcome (not ABORTED), and the history has one entry more.
    let racing: Vec<_> = (0..10)
        .map(|n| {
            let mut client = if n % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                client
                    .put_setpoint(with_id(23.0, Some(2), "put-2"))
                    .await
                    .map(tonic::Response::into_inner)
            })
        })
        .collect();
    let mut outcomes = BTreeSet::new();
    for task in racing {
        let outcome = task.await.unwrap().expect("each copy gets the outcome");
        outcomes.insert((outcome.revision, format!("{:?}", outcome.update_time)));
    }
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(outcomes.first().unwrap().0, 3);
    assert_eq!(history(&mut a, "r-1").await.len(), 3);

    // A deletion retried is done, not NOT_FOUND.
    let delete = || pb::DeleteSetpointRequest {
        sensor_id: "r-1".into(),
        request_id: "delete-1".into(),
        ..Default::default()
    };
    a.delete_setpoint(delete()).await.unwrap();
    b.delete_setpoint(delete())
        .await
        .expect("the retried deletion");
    assert_eq!(history(&mut a, "r-1").await.len(), 4);
}

/// Issue 24 (AIP-234): a batch of updates across a building, each applied or refused on its
/// own, in request order, taking one write per 100 updates from the rate limit.
#[tokio::test]
async fn a_batch_updates_each_sensor_on_its_own_and_reports_each_outcome() {
    use prost::Message;
    use tonic_types::StatusExt;
    let mut config = TestApp::fresh_config().await;
    config.limits.write_rate_limit = 1;
    config.limits.write_burst = 8;
    let app = TestApp::spawn_with(config).await;
    let mut db = app.db().await;
    sqlx::query(
        "INSERT INTO setpoints (sensor_id, building_id, desired_celsius, up_delta_celsius, \
                                down_delta_celsius, revision, update_time, updated_by, reason) \
         SELECT 'hq/room-' || lpad(n::text, 3, '0'), 'hq', 20, 0.5, 0.5, 1, now(), 'seed', '' \
         FROM generate_series(1, 500) AS n",
    )
    .execute(&mut db)
    .await
    .unwrap();
    let update = |sensor: String, desired: f64| pb::UpdateSetpointRequest {
        setpoint: Some(pb::Setpoint {
            sensor_id: sensor,
            desired_celsius: desired,
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["desired_celsius".into()],
        }),
        ..Default::default()
    };
    // The schedule's morning change for the whole building, one room twice, and two bad ones.
    let mut requests: Vec<_> = (1..=500)
        .map(|n| update(format!("hq/room-{n:03}"), 21.0))
        .collect();
    requests.push(update("hq/room-001".into(), 22.0));
    requests.push(update("hq/nowhere".into(), 21.0));
    requests.push(update("hq/room-002".into(), 900.0));
    let mut client = app.setpoints().await;
    let results = client
        .batch_update_setpoints(pb::BatchUpdateSetpointsRequest { requests })
        .await
        .expect("one call, five writes of the burst of 8")
        .into_inner()
        .results;
    assert_eq!(results.len(), 503);
    use pb::batch_update_setpoint_result::Result as Outcome;
    for (i, result) in results[..500].iter().enumerate() {
        match &result.result {
            Some(Outcome::Setpoint(s)) => {
                assert_eq!(s.sensor_id, format!("hq/room-{:03}", i + 1));
                assert_eq!((s.revision, s.desired_celsius), (2, 21.0));
            }
            other => panic!("{i}: {other:?}"),
        }
    }
    match &results[500].result {
        Some(Outcome::Setpoint(s)) => assert_eq!((s.revision, s.desired_celsius), (3, 22.0)),
        other => panic!("the second update of room-001: {other:?}"),
    }
    let error = |i: usize| match &results[i].result {
        Some(Outcome::Error(status)) => status.clone(),
        other => panic!("{i}: {other:?}"),
    };
    assert_eq!(error(501).code, Code::NotFound as i32);
    let refused = error(502);
    assert_eq!(refused.code, Code::InvalidArgument as i32);
    // The same details as UpdateSetpoint's, read as a client library reads a status.
    let details = tonic::Status::with_details(
        Code::InvalidArgument,
        refused.message.clone(),
        refused.encode_to_vec().into(),
    )
    .get_error_details();
    assert_eq!(details.error_info().unwrap().reason, "INVALID_FIELD");
    let violations = &details.bad_request().unwrap().field_violations;
    assert_eq!(violations[0].field, "setpoint.desired_celsius");
    let stored = get(&mut client, "hq/room-002").await.unwrap();
    assert_eq!((stored.revision, stored.desired_celsius), (2, 21.0));

    // Over the write budget: refused as a whole, nothing applied.
    let again = client
        .batch_update_setpoints(pb::BatchUpdateSetpointsRequest {
            requests: (1..=500)
                .map(|n| update(format!("hq/room-{n:03}"), 19.0))
                .collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::ResourceExhausted);
    assert_eq!(get(&mut client, "hq/room-003").await.unwrap().revision, 2);
}
