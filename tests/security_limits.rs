//! Limits: writes and subscriptions are limited per identity, and a client's deadline ends its
//! call at the deadline.

mod common;

use std::time::{Duration, Instant};

use common::security::{self as creds, authorized, code, keys, put_as, secure_app};
use common::{eventually, put, setpoint};
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::heater_control_service_client::HeaterControlServiceClient;
use tonic::transport::Channel;
use tonic::Code;

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
async fn a_jwt_named_like_a_static_identity_does_not_share_its_limits() {
    let (_dir, app) = secure_app(|config, _| {
        config.limits.write_rate_limit = 1;
        config.limits.write_burst = 2;
        config.limits.max_subscriptions_per_identity = 1;
    })
    .await;
    let (rsa, _) = keys();
    // Anyone the identity provider names `operator-north` / `viewer-north`, as the static
    // tokens t-operator-north and t-viewer-north are named.
    let operator = rsa.sign(&creds::claims("operator-north", "operator", &["north"]));
    let viewer = rsa.sign(&creds::claims("viewer-north", "viewer", &["north"]));
    let mut client = app.setpoints().await;
    for desired in [20.0, 21.0] {
        put_as(&mut client, &operator, "north/room-1", "north", desired)
            .await
            .expect("within the burst");
    }
    let exhausted = put_as(&mut client, &operator, "north/room-1", "north", 22.0).await;
    assert_eq!(code(&exhausted), Code::ResourceExhausted);
    put_as(
        &mut client,
        "t-operator-north",
        "north/room-1",
        "north",
        23.0,
    )
    .await
    .expect("the static token has its own budget");

    let heaters = app.heaters().await;
    let subscribe = |token: String| {
        let mut heaters = heaters.clone();
        async move {
            let request = authorized(pb::SubscribeHeaterCommandsRequest::default(), Some(&token));
            heaters.subscribe_heater_commands(request).await
        }
    };
    let _jwt = subscribe(viewer).await.expect("the JWT's subscription");
    let _static = subscribe("t-viewer-north".into())
        .await
        .expect("the static token's own subscription");
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
