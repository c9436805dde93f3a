//! Tokens: JWTs verified against the JWKS (every kind of bad token refused, keys reloaded
//! without a restart), static tokens through grpcurl, and a service that refuses to start
//! without credentials or with contradictory ones.

mod common;

use std::time::Duration;

use common::security::{self as creds, authorized, code, keys, put_as, secure_app, SigningKey};
use common::{eventually, grpcurl, put, setpoint, TestApp};
use serde_json::json;
use thermostat::proto::v1 as pb;
use tonic::Code;

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
