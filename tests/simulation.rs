//! The simulated building run against the real service: rooms end inside their setpoint band,
//! and a setpoint change moves a room to its new band.

mod common;

use std::time::Duration;

use common::TestApp;
use thermostat::sim::{self, BuildingConfig, SimConfig};
use tokio_util::sync::CancellationToken;

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
            // One simulated minute per tick.
            time_scale: 600.0,
            duration: Some(Duration::from_secs(24)),
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
    let summary = sim::run(config, CancellationToken::new())
        .await
        .expect("simulation");
    assert!(summary.readings_sent > 400, "{}", summary.readings_sent);
    assert!(
        summary.commands_applied >= 8,
        "{}",
        summary.commands_applied
    );
    let change = summary.change_at_minutes.expect("setpoint changed");

    // One tick of heating or cooling (~0.3 °C) plus a tick of command latency may overshoot.
    let tolerance = 0.8;
    for (room, samples) in summary.rooms.iter().zip(&summary.samples) {
        let last = &samples[samples.len() - 40..];
        for s in last {
            assert!(
                s.celsius >= s.band.0 - tolerance && s.celsius <= s.band.1 + tolerance,
                "{room} at {:.0} min: {:.2} °C outside {:?}",
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
    // The changed room: in its old band before the change, in the new one at the end.
    let first = &summary.samples[0];
    let before: Vec<_> = first
        .iter()
        .filter(|s| s.simulated_minutes < change && s.simulated_minutes > change - 20.0)
        .collect();
    assert!(
        before.iter().all(|s| s.celsius < 22.5),
        "room 0 before the change: {before:?}"
    );
    let end = first.last().unwrap();
    assert_eq!(end.band, (23.5, 24.5));
    assert!(
        end.celsius > 23.5 - tolerance,
        "room 0 did not reach its new band: {end:?}"
    );

    let svg = std::fs::read_to_string(plot.path()).unwrap();
    // To look at it: THERMOSTAT_KEEP_PLOT=/tmp/plot.svg scripts/test.sh --test simulation
    if let Ok(keep) = std::env::var("THERMOSTAT_KEEP_PLOT") {
        std::fs::write(keep, &svg).unwrap();
    }
    assert!(svg.contains("<svg") && svg.contains("simtest/room-00") && svg.contains("<polyline"));
    app.stop().await;
}
