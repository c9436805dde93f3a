//! The simulated building run against the real service: every heater command it obeys follows
//! the rule for the setpoint revision it was decided with, rooms end inside their setpoint band,
//! and setpoint changes (the simulator's own, and an operator's made with the API during the
//! run) move their rooms to the new band and show in the bands the simulator records.

mod common;
// The simulator belongs to the binary, not to the service's library: compiled in here too.
#[allow(dead_code)]
#[path = "../src/sim/mod.rs"]
mod sim;

use std::collections::HashMap;
use std::time::Duration;

use common::TestApp;
use sim::{BuildingConfig, SimConfig};
use thermostat::proto::v1 as pb;
use tokio_util::sync::CancellationToken;

/// The operator's change of room 01, mid-run: an asymmetric band, so that a controller that
/// swapped the deltas, or used one for both, is caught.
const OPERATOR_DESIRED: f64 = 22.0;
const OPERATOR_UP: f64 = 0.3;
const OPERATOR_DOWN: f64 = 1.0;

/// Each revision's band, from the service's history of `sensor`.
async fn bands_by_revision(app: &TestApp, sensor: &str) -> HashMap<i64, (f64, f64)> {
    let history = app
        .setpoints()
        .await
        .list_setpoint_history(pb::ListSetpointHistoryRequest {
            sensor_id: sensor.into(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .expect("history")
        .into_inner();
    assert!(history.next_page_token.is_empty());
    history
        .entries
        .iter()
        .filter_map(|entry| Some((entry.revision, sim::band_of(entry.setpoint.as_ref()?))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_holds_the_simulated_rooms_in_their_bands() {
    let app = TestApp::spawn().await;
    let plot = tempfile::Builder::new().suffix(".svg").tempfile().unwrap();
    let config = SimConfig {
        kafka: app.config.kafka.clone(),
        building: BuildingConfig {
            rooms: 4,
            building_id: "simtest".into(),
            reading_interval: Duration::from_millis(100),
            // A quarter of a simulated minute per tick: at most 0.15 °C a tick, so the few
            // ticks a command takes to come back move a room little past its band's edge.
            time_scale: 150.0,
            duration: Some(Duration::from_secs(30)),
            seed: 7,
            noise_celsius: 0.05,
            outside_celsius: 5.0,
            heating_per_minute: 0.6,
            loss_per_minute: 0.02,
            api_addr: Some(app.addr.to_string()),
            api_token: None,
            desired_celsius: 21.0,
            delta_celsius: 0.5,
            change_after: Some(Duration::from_secs(10)),
            change_by: 3.0,
            plot: Some(plot.path().to_owned()),
            plot_rooms: 2,
        },
    };
    let run = tokio::spawn(sim::run(config, CancellationToken::new()));

    // The operator's change, once the rooms have settled in their first band.
    tokio::time::sleep(Duration::from_secs(8)).await;
    app.setpoints()
        .await
        .put_setpoint(pb::PutSetpointRequest {
            request_id: Default::default(),
            setpoint: Some(pb::Setpoint {
                sensor_id: "simtest/room-01".into(),
                building_id: "simtest".into(),
                desired_celsius: OPERATOR_DESIRED,
                up_delta_celsius: OPERATOR_UP,
                down_delta_celsius: OPERATOR_DOWN,
                reason: "operator".into(),
                ..Default::default()
            }),
            expected_revision: None,
        })
        .await
        .expect("operator's change");
    let summary = run.await.unwrap().expect("simulation");
    let change = summary.change_at_minutes.expect("setpoint changed");

    // The rule, for every command obeyed: ON only below desired - down, OFF only above
    // desired + up, of the setpoint revision the command names.
    assert!(
        summary.commands.len() >= 16,
        "{} commands",
        summary.commands.len()
    );
    let mut bands = Vec::new();
    for room in &summary.rooms {
        bands.push(bands_by_revision(&app, room).await);
    }
    for c in &summary.commands {
        let (low, high) = bands[c.room][&c.setpoint_revision];
        match (c.heater_on, c.reason) {
            (true, pb::CommandReason::TooCold) => {
                assert!(c.celsius.is_some_and(|t| t < low), "{c:?} against {low}")
            }
            (false, pb::CommandReason::TooHot) => {
                assert!(c.celsius.is_some_and(|t| t > high), "{c:?} against {high}")
            }
            _ => panic!("no other command in this run: {c:?}"),
        }
    }

    // Where the rooms end: inside the band, give or take what the room moves during the few
    // ticks a command takes to arrive, and still cycling.
    let tolerance = 0.5;
    for (room, samples) in summary.rooms.iter().zip(&summary.samples) {
        assert!(samples.len() >= 200, "{room}: {} samples", samples.len());
        let last = &samples[samples.len() - 60..];
        for s in last {
            assert!(
                s.celsius >= s.band.0 - tolerance && s.celsius <= s.band.1 + tolerance,
                "{room} at {:.1} min: {:.2} °C outside {:?}",
                s.simulated_minutes,
                s.celsius,
                s.band
            );
        }
        assert!(
            last.iter().any(|s| s.heater_on) && last.iter().any(|s| !s.heater_on),
            "{room} is not cycling"
        );
    }
    // The simulator's own change of room 00: below its new band before, in it at the end.
    let first = &summary.samples[0];
    assert!(
        first
            .iter()
            .filter(|s| s.simulated_minutes < change && s.simulated_minutes > change - 5.0)
            .all(|s| s.celsius < 22.5),
        "room 00 before the change"
    );
    assert_eq!(first.last().unwrap().band, (23.5, 24.5));
    // The operator's change of room 01: the band the simulator read back from the service.
    let second = summary.samples[1].last().unwrap();
    assert_eq!(
        second.band,
        (
            OPERATOR_DESIRED - OPERATOR_DOWN,
            OPERATOR_DESIRED + OPERATOR_UP
        )
    );

    let svg = std::fs::read_to_string(plot.path()).unwrap();
    // To look at it: THERMOSTAT_KEEP_PLOT=/tmp/plot.svg scripts/test.sh --test simulation
    if let Ok(keep) = std::env::var("THERMOSTAT_KEEP_PLOT") {
        std::fs::write(keep, &svg).unwrap();
    }
    assert!(svg.contains("<svg") && svg.contains("simtest/room-01") && svg.contains("<polyline"));
    app.stop().await;
}
