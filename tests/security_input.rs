//! Bad input must never reach the database: generated invalid Puts (and bad ids on the other
//! RPCs) are refused with the offending field named, and the stored rows stay as they were.

mod common;

use common::security::{authorized, secure_app};
use common::{put, setpoint};
use thermostat::proto::v1 as pb;
use tonic::Code;

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
                (SELECT sensor_id, building_id, desired_celsius, up_delta_celsius, \
                 down_delta_celsius, revision, update_time, updated_by, reason, deleted \
                 FROM setpoints UNION ALL SELECT sensor_id, building_id, desired_celsius, \
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
