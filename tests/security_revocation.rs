//! Credentials that stop holding while in use: a revoked static token or an expired JWT ends a
//! subscription, even in the middle of its snapshot, and leaves the others open.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::eventually;
use common::kafka::{write_command, written_command, Sensors, Topics};
use common::security::{self as creds, authorized, keys, secure_app, static_entries, StaticEntry};
use serde_json::json;
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::heater_control_service_client::HeaterControlServiceClient;
use tokio_stream::StreamExt;
use tonic::Code;

/// Revokes one static token of [`common::security::STATIC`] by rewriting the file without it.
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
    a_revoked_credential_ends_a_snapshot_of(5000).await;
}

/// Issue 23 (8): the events of a part already taken from the engine were all sent after a
/// revocation; a snapshot of one part now ends within it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_credential_ends_a_subscription_within_one_part_of_its_snapshot() {
    a_revoked_credential_ends_a_snapshot_of(1000).await;
}

async fn a_revoked_credential_ends_a_snapshot_of(heaters: usize) {
    let (dir, app) = secure_app(|_, _| {}).await;
    let command_topic = Sensors::new(&Topics::of(&app.config).commands);
    futures::future::join_all((0..heaters).map(|n| {
        write_command(
            &command_topic,
            written_command(&format!("north/h-{n}"), "north", 1, pb::HeaterCommand::On),
        )
    }))
    .await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            common::snapshot_len(&app).await == heaters
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
        received < heaters,
        "ended within the snapshot, after {received} of {heaters} events"
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
