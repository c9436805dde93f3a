//! Credential files that change: what the new file grants is what holds. Entries that do not
//! load are left out and reported, never replaced by what the file used to grant. Alone in its
//! test binary because it reads `thermostat_credentials_stale`, which is one per process.

mod common;

use std::time::Duration;

use common::security::{
    self as creds, authorized, code, keys, secure_app, static_entries, StaticEntry,
};
use common::{eventually, TestApp};
use serde_json::json;
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::setpoint_service_client::SetpointServiceClient;
use tonic::transport::Channel;
use tonic::Code;

/// An Ed25519 key (RFC 8037, appendix A.2): well formed, but not an algorithm this service uses.
fn ed25519(kid: &str) -> serde_json::Value {
    json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
           "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})
}

/// Whether `token` is let in (a Get of a missing sensor: NOT_FOUND once authenticated).
async fn accepted(client: &SetpointServiceClient<Channel>, token: &str) -> bool {
    let request = authorized(
        pb::GetSetpointRequest {
            sensor_id: "north/room-1".into(),
        },
        Some(token),
    );
    match code(&client.clone().get_setpoint(request).await) {
        Code::NotFound => true,
        Code::Unauthenticated => false,
        other => panic!("unexpected {other:?}"),
    }
}

async fn stale(app: &TestApp, what: &str) -> f64 {
    let (_, metrics) = common::http_get(app.admin, "/metrics").await;
    common::sample(
        &metrics,
        &format!(r#"thermostat_credentials_stale{{what="{what}"}}"#),
    )
}

/// Waits until the tokens in `yes` are accepted and those in `no` refused.
async fn holds(client: &SetpointServiceClient<Channel>, yes: &[&str], no: &[&str], what: &str) {
    let reached = eventually(Duration::from_secs(10), || async {
        for token in yes {
            if !accepted(client, token).await {
                return false;
            }
        }
        for token in no {
            if accepted(client, token).await {
                return false;
            }
        }
        true
    })
    .await;
    assert!(
        reached,
        "{what}: not all of the expected tokens accepted and refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_credential_file_grants_only_what_it_lists() {
    let (dir, app) = secure_app(|_, _| {}).await;
    let dir = dir.path();
    let client = app.setpoints().await;
    let (rsa, ec) = keys();
    let claims = creds::claims("jwt-user", "viewer", &["north"]);
    let (rsa_token, ec_token) = (rsa.sign(&claims), ec.sign(&claims));
    let (rsa_token, ec_token) = (rsa_token.as_str(), ec_token.as_str());
    let write_jwks = |keys: Vec<serde_json::Value>| {
        creds::write(dir, "jwks.json", &json!({ "keys": keys }).to_string());
    };
    holds(&client, &[rsa_token, ec_token], &[], "at start").await;

    // The RSA key replaced by a broken entry under its kid: the EC key is still used, the RSA
    // key is gone, and the file is reported stale until mended.
    let broken = json!({"kty": "RSA", "kid": rsa.kid, "n": "!!", "e": "AQAB"});
    write_jwks(vec![ec.jwk.clone(), broken]);
    holds(&client, &[ec_token], &[rsa_token], "broken entry").await;
    assert_eq!(stale(&app, "JWKS").await, 1.0);
    // Only a key of an algorithm not used here: no JWT is accepted.
    write_jwks(vec![ed25519(&ec.kid)]);
    holds(&client, &[], &[rsa_token, ec_token], "unsupported key").await;
    write_jwks(vec![rsa.jwk.clone(), ec.jwk.clone()]);
    holds(&client, &[rsa_token, ec_token], &[], "mended").await;
    assert_eq!(stale(&app, "JWKS").await, 0.0);
    // A file that is not JSON at all grants nothing either, and is reported until mended.
    creds::write(dir, "jwks.json", "{ not json");
    holds(&client, &[], &[rsa_token, ec_token], "not JSON").await;
    assert_eq!(stale(&app, "JWKS").await, 1.0);
    write_jwks(vec![rsa.jwk.clone(), ec.jwk.clone()]);
    holds(&client, &[rsa_token, ec_token], &[], "mended again").await;
    assert_eq!(stale(&app, "JWKS").await, 0.0);
    // An emptied key set revokes every key.
    write_jwks(vec![]);
    holds(&client, &[], &[rsa_token, ec_token], "emptied").await;

    // One edit of the static file revokes a token and adds an entry with a typo: the revocation
    // holds, the other tokens too, and the typo is reported.
    let remaining: Vec<_> = static_entries()
        .into_iter()
        .filter(|e| !matches!(e, StaticEntry::Token { token, .. } if *token == "t-operator-north"))
        .collect();
    let mut identities: serde_json::Value =
        serde_json::from_str(&creds::static_file(&remaining)).expect("JSON");
    identities["tokens"]
        .as_array_mut()
        .expect("tokens")
        .push(json!({"sha256": "abc", "subject": "typo", "role": "viewer", "buildings": []}));
    let identities = identities.to_string();
    creds::write(dir, "identities.json", &identities);
    holds(
        &client,
        &["t-viewer-north", "t-admin-all"],
        &["t-operator-north"],
        "revoked with a typo beside it",
    )
    .await;
    assert_eq!(stale(&app, "static identities").await, 1.0);
    // A file that is not JSON at all grants nothing.
    creds::write(dir, "identities.json", "{ not json");
    holds(&client, &[], &["t-viewer-north", "t-admin-all"], "not JSON").await;
    assert_eq!(stale(&app, "static identities").await, 1.0);
    creds::write(
        dir,
        "identities.json",
        &creds::static_file(&static_entries()),
    );
    holds(
        &client,
        &["t-viewer-north", "t-operator-north"],
        &[],
        "restored",
    )
    .await;
    assert_eq!(stale(&app, "static identities").await, 0.0);
}
