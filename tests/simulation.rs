//! The simulated building run against the real service: every heater command it obeys follows
//! the rule for the level and revision it was decided with, rooms end inside their setpoint
//! band, and setpoint changes (the simulator's own, and an operator's made with the API during
//! the run) move their rooms to the new band and show in the bands the simulator records. The
//! demo's building follows its schedule and an override that expires during the run, the
//! simulator sees both happen on time, the plot marks the deciding level, and the commands the
//! demo prints work as written. Its heaters are held for the demo's minimum on and off times:
//! switches are deferred, never sent inside a hold, and marked in the plot. They report their
//! state: the service sees every heater that obeys follow its command, and flags the one that
//! sticks.

mod common;
// The simulator and the demo belong to the binary, not to the service's library: compiled in
// here too.
#[allow(dead_code)]
#[path = "../src/demo.rs"]
mod demo;
#[allow(dead_code)]
#[path = "../src/sim/mod.rs"]
mod sim;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::security::{authorized, secure_app};
use common::TestApp;
use sim::{BuildingConfig, ChangeKind, SimConfig, Summary};
use thermostat::config::ControlConfig;
use thermostat::proto::from_timestamp;
use thermostat::proto::v1 as pb;
use tokio_util::sync::CancellationToken;

type L = pb::SetpointLevel;

/// The operator's change of room 01, mid-run: an asymmetric band, so that a controller that
/// swapped the deltas, or used one for both, is caught.
const OPERATOR_DESIRED: f64 = 22.0;
const OPERATOR_UP: f64 = 0.3;
const OPERATOR_DOWN: f64 = 1.0;

/// Each revision's band, from the service's history of `sensor`: the values of the level that
/// revision wrote.
async fn bands_by_revision(
    app: &TestApp,
    sensor: &str,
    token: Option<&str>,
) -> HashMap<i64, (f64, f64)> {
    let request = pb::ListSetpointHistoryRequest {
        sensor_id: sensor.into(),
        page_size: 1000,
        page_token: String::new(),
    };
    let history = app
        .setpoints()
        .await
        .list_setpoint_history(authorized(request, token))
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

/// A quarter of a simulated minute per tick of [`building`]: at most 0.15 °C a tick, so the few
/// ticks a command takes to come back move a room little past its band's edge.
const TIME_SCALE: f64 = 150.0;
/// The tick of [`building`].
const READING_INTERVAL: Duration = Duration::from_millis(100);

/// A building of 4 rooms at 21 ± 0.5 °C run fast against `app`, without the schedule, the
/// override and the stuck heater (each test turns on what it is about).
fn building(app: &TestApp, id: &str, plot: &std::path::Path) -> BuildingConfig {
    BuildingConfig {
        rooms: 4,
        building_id: id.into(),
        reading_interval: READING_INTERVAL,
        time_scale: TIME_SCALE,
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
        change_after: None,
        change_by: 3.0,
        plot: Some(plot.to_owned()),
        plot_rooms: 2,
        schedule_zone: "Europe/Berlin".into(),
        schedule_after: Duration::ZERO,
        schedule_period: Duration::ZERO,
        override_for: Duration::ZERO,
        stuck_after: Duration::ZERO,
    }
}

/// The rule, for every command obeyed: ON only below desired - down, OFF only above
/// desired + up, of the level that decided, as written at the revision the command names; a
/// switch a hold deferred too, on the reading it was decided on when the hold ended.
async fn assert_commands_follow_the_rule(app: &TestApp, summary: &Summary, token: Option<&str>) {
    let mut bands = Vec::new();
    for room in &summary.rooms {
        bands.push(bands_by_revision(app, room, token).await);
    }
    for c in &summary.commands {
        let (low, high) = bands[c.room][&c.level_revision];
        match (c.heater_on, c.reason) {
            (true, pb::CommandReason::TooCold | pb::CommandReason::DeferredTooCold) => {
                assert!(c.celsius.is_some_and(|t| t < low), "{c:?} against {low}")
            }
            (false, pb::CommandReason::TooHot | pb::CommandReason::DeferredTooHot) => {
                assert!(c.celsius.is_some_and(|t| t > high), "{c:?} against {high}")
            }
            _ => panic!("no other command in this run: {c:?}"),
        }
    }
}

/// Where the rooms end: inside the band, give or take `tolerance` (what the room moves during
/// the few ticks a command takes to arrive, and during a hold), and still cycling; all but the
/// room whose heater stuck.
fn assert_rooms_end_in_their_bands(summary: &Summary, tolerance: f64) {
    let stuck = summary.stuck.map(|s| s.room);
    let rooms = summary.rooms.iter().zip(&summary.samples).enumerate();
    for (_, (room, samples)) in rooms.filter(|(i, _)| Some(*i) != stuck) {
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
}

/// The holds, for every switch obeyed: none came sooner after the heater's previous command
/// than that command's hold (`MIN_ON_TIME` after an ON, `MIN_OFF_TIME` after an OFF, the
/// cooldown after a maximum run's OFF), by the times the service decided them, but for safety's
/// (a stale sensor, a deleted setpoint, the SAFETY level), which does not wait. A deferred
/// switch was sent when its hold ended, not at some later reading. How many were deferred.
fn assert_holds_kept(summary: &Summary, control: &ControlConfig) -> usize {
    // Sent at the end of the hold: the service wakes the sensor then, on its latest reading.
    let late = TimeDelta::seconds(2);
    let span = |d: Duration| TimeDelta::from_std(d).unwrap();
    let mut deferred = 0;
    for room in 0..summary.rooms.len() {
        let commands: Vec<_> = summary.commands.iter().filter(|c| c.room == room).collect();
        for pair in commands.windows(2) {
            let (last, next) = (pair[0], pair[1]);
            assert_ne!(last.heater_on, next.heater_on, "only switches: {pair:?}");
            let safety = matches!(
                next.reason,
                pb::CommandReason::SensorStale | pb::CommandReason::SetpointDeleted
            ) || next.setpoint_level == L::Safety;
            let hold = match (last.heater_on, last.reason) {
                (true, _) => span(control.min_on_time),
                (false, pb::CommandReason::MaxRunTime) => {
                    span(control.run_cooldown.max(control.min_off_time))
                }
                (false, _) => span(control.min_off_time),
            };
            let ends = last.decided_at.expect("decided at") + hold;
            let at = next.decided_at.expect("decided at");
            assert!(
                safety || at >= ends,
                "switched {} inside the hold that ended at {ends}: {pair:?}",
                at - last.decided_at.unwrap()
            );
            if next.deferred() {
                deferred += 1;
                assert!(at - ends < late, "deferred until {ends}: {pair:?}");
            }
        }
    }
    deferred
}

/// The plot, kept where THERMOSTAT_KEEP_PLOT says (with the test's name in it) to look at.
fn read_plot(path: &std::path::Path, test: &str) -> String {
    let svg = std::fs::read_to_string(path).unwrap();
    // To look at them: THERMOSTAT_KEEP_PLOT=/tmp/plot.svg scripts/test.sh --test simulation
    // keeps /tmp/plot-bands.svg and /tmp/plot-schedule.svg.
    if let Ok(keep) = std::env::var("THERMOSTAT_KEEP_PLOT") {
        let keep = std::path::Path::new(&keep);
        let stem = keep.file_stem().unwrap_or_default().to_string_lossy();
        std::fs::write(keep.with_file_name(format!("{stem}-{test}.svg")), &svg).unwrap();
    }
    svg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_holds_the_simulated_rooms_in_their_bands() {
    let app = TestApp::spawn().await;
    let plot = tempfile::Builder::new().suffix(".svg").tempfile().unwrap();
    let config = SimConfig {
        kafka: app.config.kafka.clone(),
        building: BuildingConfig {
            change_after: Some(Duration::from_secs(10)),
            ..building(&app, "simtest", plot.path())
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

    assert!(
        summary.commands.len() >= 16,
        "{} commands",
        summary.commands.len()
    );
    // Only DEFAULT decides in this run: the revision a command names is its level's.
    for c in &summary.commands {
        assert_eq!(
            (c.setpoint_level, c.level_revision),
            (L::Default, c.setpoint_revision),
            "{c:?}"
        );
    }
    assert_commands_follow_the_rule(&app, &summary, None).await;
    assert_rooms_end_in_their_bands(&summary, 0.5);
    // Without holds nothing waits.
    assert_eq!(summary.deferred(), 0);
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

    let svg = read_plot(plot.path(), "bands");
    assert!(svg.contains("<svg") && svg.contains("simtest/room-01") && svg.contains("<polyline"));
    app.stop().await;
}

/// An operator of every building (tests/common/security.rs).
const TOKEN: &str = "t-operator-all";

fn time(t: &Option<prost_types::Timestamp>) -> DateTime<Utc> {
    t.as_ref().and_then(from_timestamp).expect("a time")
}

/// The demo's building schedule, as the simulator wrote it, once it has.
async fn demo_schedule(app: &TestApp, building: &str) -> pb::Schedule {
    let mut client = pb::schedule_service_client::ScheduleServiceClient::new(app.channel().await);
    for _ in 0..100 {
        let request = pb::GetScheduleRequest {
            building_id: building.into(),
            schedule_id: sim::SCHEDULE_ID.into(),
        };
        match client.get_schedule(authorized(request, Some(TOKEN))).await {
            Ok(schedule) => return schedule.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(status) => panic!("{status}"),
        }
    }
    panic!("the simulator wrote no schedule");
}

/// Runs every grpcurl line of the demo's examples but the endless subscription, in order, as
/// written; their answers.
fn run_examples(examples: &str) -> Vec<(String, serde_json::Value)> {
    let grpcurl = common::env("THERMOSTAT_TEST_GRPCURL");
    let mut answers = Vec::new();
    for command in examples
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("grpcurl ") && !l.contains("SubscribeHeaterCommands"))
    {
        let ran = std::process::Command::new("bash")
            .args([
                "-c",
                &format!("grpcurl() {{ \"$GRPCURL\" \"$@\"; }}; {command}"),
            ])
            .env("GRPCURL", &grpcurl)
            .output()
            .expect("bash");
        let out = String::from_utf8_lossy(&ran.stdout).into_owned();
        assert!(
            ran.status.success(),
            "{command}\n{out}{}",
            String::from_utf8_lossy(&ran.stderr)
        );
        let method = command.rsplit('/').next().unwrap_or_default().to_owned();
        // `list` answers names, one a line; the calls answer JSON.
        answers.push((method, serde_json::from_str(&out).unwrap_or_default()));
    }
    answers
}

/// `sensor`'s heater status, as the service answers GetSensorState.
async fn heater_status(app: &TestApp, sensor: &str) -> pb::HeaterStatus {
    let request = pb::GetSensorStateRequest {
        sensor_id: sensor.into(),
    };
    app.heaters()
        .await
        .get_sensor_state(authorized(request, Some(TOKEN)))
        .await
        .expect("sensor state")
        .into_inner()
        .heater_status
        .unwrap_or_else(|| panic!("{sensor}: no heater status"))
}

/// Every heater of `building` but the stuck one reports what it was last commanded, and the
/// service never flagged it: asked again while a switch is on its way (to the heater, and back
/// as its report).
async fn assert_heaters_follow(app: &TestApp, building: &BuildingConfig) {
    let stuck = building.stuck_room(true).expect("a stuck heater");
    for sensor in (0..building.rooms)
        .filter(|i| *i != stuck)
        .map(|i| building.sensor(i))
    {
        let mut status = heater_status(app, &sensor).await;
        for _ in 0..50 {
            if status.reported == status.commanded {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            status = heater_status(app, &sensor).await;
        }
        assert_ne!(
            status.commanded(),
            pb::HeaterCommand::Unspecified,
            "{status:?}"
        );
        assert_eq!(status.reported, status.commanded, "{status:?}");
        assert!(status.following, "{status:?}");
        assert_eq!(status.since, None, "never flagged: {status:?}");
    }
}

/// The heater that stuck: OFF from then on, last commanded ON, and flagged by the service;
/// its sensor. Reports were sent at the first tick and after each command taken.
async fn assert_stuck_heater_flagged(app: &TestApp, summary: &Summary) -> String {
    let stuck = summary.stuck.expect("a heater stuck");
    let stuck_sensor = &summary.rooms[stuck.room];
    // (A sample is the state over the tick that ends at its minute.)
    let after: Vec<_> = summary.samples[stuck.room]
        .iter()
        .filter(|s| s.simulated_minutes > stuck.simulated_minutes)
        .collect();
    assert!(
        after.len() > 100 && after.iter().all(|s| !s.heater_on),
        "{stuck:?}"
    );
    let last = summary.commands.iter().rfind(|c| c.room == stuck.room);
    assert!(last.is_some_and(|c| c.heater_on), "{last:?}");
    let status = heater_status(app, stuck_sensor).await;
    assert_eq!(
        (status.commanded(), status.reported(), status.following),
        (pb::HeaterCommand::On, pb::HeaterCommand::Off, false),
        "{status:?}"
    );
    assert!(status.since.is_some(), "{status:?}");
    let rooms = summary.rooms.len() as u64;
    assert!(
        summary.reports_sent >= rooms + summary.commands_applied,
        "{} reports",
        summary.reports_sent
    );
    stuck_sensor.clone()
}

/// The answers of the demo's heater examples: the stuck heater flagged, room 01's following,
/// the dry run (while comfort decides) and the demo's holds among the limits.
fn assert_heater_examples(
    answers: &[(String, serde_json::Value)],
    examples: &str,
    stuck_sensor: &str,
    control: &ControlConfig,
) {
    let answer = |method: &str, sensor: Option<&str>| -> &serde_json::Value {
        &answers
            .iter()
            .find(|(m, a)| m == method && sensor.is_none_or(|s| a["sensorId"] == s))
            .unwrap_or_else(|| panic!("no {method} of {sensor:?} among:\n{examples}"))
            .1
    };
    let flagged = &answer("GetSensorState", Some(stuck_sensor))["heaterStatus"];
    assert_eq!(flagged["following"], false, "{flagged}");
    assert_eq!(flagged["commanded"], "HEATER_COMMAND_ON", "{flagged}");
    assert_eq!(flagged["reported"], "HEATER_COMMAND_OFF", "{flagged}");
    // Followed: the same state, unless a switch is in flight (commanded after the last report).
    let followed = &answer("GetSensorState", Some("simsched/room-01"))["heaterStatus"];
    assert_eq!(followed["following"], true, "{followed}");
    let at = |key: &str| {
        let text = followed[key]
            .as_str()
            .unwrap_or_else(|| panic!("{key}: {followed}"));
        DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{key}: {e}"))
    };
    assert!(
        followed["reported"] == followed["commanded"] || at("commandedAt") > at("reportedAt"),
        "{followed}"
    );
    // 19.5 °C is below comfort's band.
    let dry = answer("DryRun", None);
    assert_eq!(dry["command"], "HEATER_COMMAND_ON", "{dry}");
    assert_eq!(dry["lowerCelsius"], 21.5, "{dry}");
    let settings = answer("GetHeaterSettings", None);
    let seconds = |d: &serde_json::Value| {
        d.as_str()
            .and_then(|d| d.strip_suffix('s'))
            .and_then(|d| d.parse::<f64>().ok())
    };
    assert_eq!(
        seconds(&settings["effectiveLimits"]["minOnTime"]),
        Some(control.min_on_time.as_secs_f64()),
        "the demo's hold: {settings}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_building_follows_its_schedule_and_an_override_that_expires() {
    // The demo's heaters: its minimum on and off times, and its report timeout, at this
    // building's time scale; a report topic of the test's own.
    let reports = common::kafka::create_topic("reports", 2).await;
    let (_dir, app) = secure_app(|config, _| {
        demo::HeaterHolds::default()
            .apply(&mut config.control, TIME_SCALE)
            .unwrap();
        config.kafka.heater_report_topic = reports;
        config.control.report_timeout = demo::report_timeout(TIME_SCALE, READING_INTERVAL);
    })
    .await;
    let control = app.config.control.clone();
    assert!(!control.min_on_time.is_zero() && !control.min_off_time.is_zero());
    let plot = tempfile::Builder::new().suffix(".svg").tempfile().unwrap();
    let override_for = Duration::from_secs(8);
    let config = SimConfig {
        kafka: app.config.kafka.clone(),
        building: BuildingConfig {
            api_token: Some(TOKEN.into()),
            plot_rooms: 3,
            // Stopped by the test once the schedule has begun; this is only a bound.
            duration: Some(Duration::from_secs(150)),
            // Its first transition at the first whole minute at least 5 s after the start, its
            // periods a minute each: the least a schedule's minutes allow.
            schedule_after: Duration::from_secs(5),
            schedule_period: Duration::from_secs(60),
            override_for,
            // Early enough that it is flagged long before the end.
            stuck_after: Duration::from_secs(3),
            ..building(&app, "simsched", plot.path())
        },
    };
    let stop = CancellationToken::new();
    let run = tokio::spawn(sim::run(config.clone(), stop.clone()));

    // The schedule, in the building's zone, with its first transition (to comfort) ahead.
    let schedule = demo_schedule(&app, "simsched").await;
    assert_eq!(schedule.time_zone, "Europe/Berlin");
    assert!(schedule.sensor_ids.is_empty(), "the whole building");
    let presets: Vec<_> = schedule
        .weekly
        .iter()
        .filter_map(|p| match &p.value {
            Some(pb::schedule_period::Value::Preset(name)) => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert!(
        presets.contains(&sim::COMFORT) && presets.contains(&sim::ECO),
        "{presets:?}"
    );
    let next = schedule.next_transition.expect("a transition ahead");
    assert_eq!(next.preset, sim::COMFORT);
    let begins = time(&next.time);
    let ahead = begins - Utc::now();
    assert!(
        ahead > TimeDelta::zero() && ahead <= TimeDelta::seconds(66),
        "the first transition within a minute: {ahead}"
    );
    // Time enough for the rooms to settle in comfort's band; it holds for a minute.
    let settled = begins + TimeDelta::seconds(20) - Utc::now();
    tokio::time::sleep(settled.to_std().unwrap()).await;
    // While the heaters still run: those that obey follow their commands, by the service.
    assert_heaters_follow(&app, &config.building).await;
    stop.cancel();
    let summary = run.await.unwrap().expect("simulation");

    // What the run planned: the transitions the service reported, the override of room 02.
    let [comfort, eco, end] = summary.plan.schedule.expect("a schedule");
    assert_eq!(comfort, begins);
    assert_eq!(
        (eco - comfort, end - eco),
        (TimeDelta::minutes(1), TimeDelta::minutes(1))
    );
    let (overridden, until) = summary.plan.overridden.expect("an override");
    assert_eq!(summary.rooms[overridden], "simsched/room-02");

    // Within a poll or two of the service applying them, the simulator saw the transition in
    // every room the override did not hide, and the override's expiry.
    let soon = |observed: DateTime<Utc>, at: DateTime<Utc>| {
        observed >= at && observed - at < TimeDelta::seconds(5)
    };
    let changes = &summary.level_changes;
    for room in [0, 1, 3] {
        let seen = changes
            .iter()
            .find(|c| c.room == room && c.kind == ChangeKind::ScheduleTransition)
            .unwrap_or_else(|| panic!("room {room}: no transition in {changes:?}"));
        assert_eq!(
            (seen.from, seen.to, seen.band),
            (L::Default, L::Schedule, (21.5, 22.5))
        );
        assert!(
            soon(seen.observed_at, comfort),
            "{seen:?} against {comfort}"
        );
        // Its band and level as plotted: DEFAULT's, then comfort's.
        let samples = &summary.samples[room];
        let (first, last) = (samples[0], samples[samples.len() - 1]);
        assert_eq!((first.level, first.band), (L::Default, (20.5, 21.5)));
        assert_eq!((last.level, last.band), (L::Schedule, (21.5, 22.5)));
    }
    let expired = changes
        .iter()
        .find(|c| c.room == overridden && c.kind == ChangeKind::OverrideExpired)
        .unwrap_or_else(|| panic!("no expiry in {changes:?}"));
    assert!(
        soon(expired.observed_at, until),
        "{expired:?} against {until}"
    );
    // Into whatever decided beneath it then: DEFAULT before the schedule began, else comfort.
    let beneath = if expired.observed_at < comfort {
        L::Default
    } else {
        L::Schedule
    };
    assert_eq!(
        (expired.from, expired.to),
        (L::Override, beneath),
        "{expired:?}"
    );
    let levels: Vec<L> = summary.samples[overridden]
        .iter()
        .map(|s| s.level)
        .collect();
    let held = levels.iter().take_while(|l| **l == L::Override).count();
    assert!(held > 0, "room 02 starts overridden: {:?}", &levels[..5]);
    assert_eq!(summary.samples[overridden][0].band, (23.5, 24.5));
    assert!(
        levels[held..].iter().all(|l| *l != L::Override),
        "the override does not come back"
    );
    assert_eq!(levels.last(), Some(&L::Schedule));

    // The loop decided on every level that won, by the rule of the band it held.
    for level in [L::Override, L::Schedule] {
        assert!(
            summary.commands.iter().any(|c| c.setpoint_level == level),
            "no command decided by {level:?}"
        );
    }
    assert_commands_follow_the_rule(&app, &summary, Some(TOKEN)).await;
    // A hold lets a room pass its band's edge too: cooling from comfort's top (22.5 °C) at up to
    // 0.35 °C a simulated minute, a room is 1.4 °C lower after 4 minutes, 0.4 °C below its band.
    assert_rooms_end_in_their_bands(&summary, 0.9);
    // Holds longer than a room takes to cross its band: switches were deferred, none sent
    // inside a hold.
    let deferred = assert_holds_kept(&summary, &control);
    assert!(deferred > 0, "no switch deferred: {:?}", summary.commands);
    assert_eq!(summary.deferred(), deferred);

    let stuck_sensor = assert_stuck_heater_flagged(&app, &summary).await;

    // The plot: the three rooms, the strip's legend, and the held switches' (plot.rs draws a
    // triangle of this color for each deferred switch of a plotted room, and one in the
    // legend of each room's panel).
    let svg = read_plot(plot.path(), "schedule");
    assert!(svg.contains("simsched/room-02") && svg.contains("deciding level"));
    for level in ["DEFAULT", "SCHEDULE", "OVERRIDE", "SAFETY"] {
        assert!(svg.contains(level), "{level}");
    }
    assert!(
        svg.contains("heater switch") && svg.contains("deferred") && svg.contains("max run time")
    );
    let plotted = summary
        .commands
        .iter()
        .filter(|c| c.room < config.building.plot_rooms && c.deferred())
        .count();
    assert_eq!(svg.matches("#007878").count(), 3 + plotted);

    // The demo's commands, as printed for this building (they run while comfort holds).
    let examples = demo::examples(app.addr, None, &config, Some(TOKEN));
    let answers = run_examples(&examples);
    let answer = |method: &str| -> &serde_json::Value {
        &answers
            .iter()
            .find(|(m, _)| m == method)
            .unwrap_or_else(|| panic!("{method} is not among the examples:\n{examples}"))
            .1
    };
    assert_heater_examples(&answers, &examples, &stuck_sensor, &control);
    let printed = answer("GetSchedule");
    assert_eq!(printed["scheduleId"], sim::SCHEDULE_ID, "{printed}");
    assert_eq!(printed["timeZone"], "Europe/Berlin", "{printed}");
    let preview = answer("PreviewSetpoint");
    assert!(
        preview["segments"].as_array().is_some_and(|s| s.len() >= 3),
        "comfort, eco, then DEFAULT within the hour: {preview}"
    );
    let levels = answer("GetSetpointLevels");
    assert_eq!(levels["sensorId"], "simsched/room-02", "{levels}");
    assert_eq!(
        levels["effectiveLevel"], "SETPOINT_LEVEL_SCHEDULE",
        "{levels}"
    );
    assert_eq!(levels["scheduleId"], sim::SCHEDULE_ID, "{levels}");
    let held = answer("WriteSetpointLevel");
    assert_eq!(held["effectiveLevel"], "SETPOINT_LEVEL_OVERRIDE", "{held}");
    let released = answer("RelinquishSetpointLevel");
    assert_eq!(
        released["effectiveLevel"], "SETPOINT_LEVEL_SCHEDULE",
        "{released}"
    );
    app.stop().await;
}
