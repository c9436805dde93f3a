//! Weekly schedules and presets (issue 25): a schedule change takes effect at once, a
//! transition turns the heater on time without a reading and is recorded once across
//! replicas, a transition missed while the service was down is applied as it starts, the
//! calls are checked and authorized, and a dry run decides at a later time without a side
//! effect. Against the real database and broker.

mod common;

use std::time::Duration;

use chrono::{DateTime, Datelike, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;
use common::kafka::{Commands, Sensors, Topics};
use common::security::{authorized, code, put_as, secure_app};
use common::{put, setpoint, TestApp};
use thermostat::domain::schedule::{format_clock, instant};
use thermostat::proto::timestamp;
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::schedule_service_client::ScheduleServiceClient;
use tonic::transport::Channel;
use tonic::Code;

type H = pb::HeaterCommand;
type L = pb::SetpointLevel;

/// The schedules' time zone: one with daylight saving time, not the machine's.
const ZONE: Tz = chrono_tz::America::New_York;

async fn schedules(app: &TestApp) -> ScheduleServiceClient<Channel> {
    ScheduleServiceClient::new(app.channel().await)
}

/// A band of 18 ± 0.5 °C at the DEFAULT level.
async fn default_of_18(app: &TestApp, sensor: &str, building: &str) {
    let mut band = setpoint(sensor, building, 18.0);
    band.up_delta_celsius = 0.5;
    band.down_delta_celsius = 0.5;
    app.setpoints()
        .await
        .put_setpoint(put(band, None))
        .await
        .expect("put");
}

fn preset(building: &str, name: &str, desired: f64) -> pb::PutPresetRequest {
    pb::PutPresetRequest {
        preset: Some(pb::Preset {
            building_id: building.into(),
            name: name.into(),
            values: Some(pb::SetpointValues {
                desired_celsius: desired,
                up_delta_celsius: 0.5,
                down_delta_celsius: 0.5,
            }),
            ..Default::default()
        }),
        expected_revision: None,
    }
}

/// A period of today (local) from the current minute to the one `minutes` ahead (at most
/// midnight), holding `preset`; and when it ends.
fn until_soon(minutes: i64, preset: &str) -> (pb::SchedulePeriod, DateTime<Utc>) {
    let local = Utc::now().with_timezone(&ZONE);
    let start = (local.hour() * 60 + local.minute()) as u16;
    let end = (i64::from(start) + minutes).min(24 * 60) as u16;
    let day = local.weekday().number_from_monday() as i32;
    let period = pb::SchedulePeriod {
        days: vec![day],
        start_time: format_clock(start),
        end_time: format_clock(end),
        value: Some(pb::schedule_period::Value::Preset(preset.into())),
    };
    (period, instant(ZONE, local.date_naive(), end))
}

/// Waits until a minute has at least 20 s left, so that a period to the next minute is not
/// over before the test has looked at it.
async fn early_in_a_minute() {
    let second = Utc::now().with_timezone(&ZONE).second();
    if second > 40 {
        tokio::time::sleep(Duration::from_secs(u64::from(61 - second))).await;
    }
}

fn schedule(
    building: &str,
    id: &str,
    sensors: &[&str],
    weekly: Vec<pb::SchedulePeriod>,
) -> pb::PutScheduleRequest {
    pb::PutScheduleRequest {
        schedule: Some(pb::Schedule {
            building_id: building.into(),
            schedule_id: id.into(),
            sensor_ids: sensors.iter().map(|s| s.to_string()).collect(),
            time_zone: ZONE.name().into(),
            weekly,
            reason: "opening hours".into(),
            ..Default::default()
        }),
        expected_revision: None,
    }
}

fn decided(event: &pb::HeaterCommandEvent) -> (H, L) {
    (event.command(), event.setpoint_level())
}

fn at(t: &prost_types::Timestamp) -> DateTime<Utc> {
    thermostat::proto::from_timestamp(t).expect("a time")
}

async fn levels(app: &TestApp, sensor: &str) -> pb::SetpointLevels {
    app.setpoints()
        .await
        .get_setpoint_levels(pb::GetSetpointLevelsRequest {
            sensor_id: sensor.into(),
        })
        .await
        .expect("levels")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_decides_at_once_and_its_transition_turns_the_heater_without_a_reading() {
    let config = TestApp::fresh_config().await;
    let topics = Topics::of(&config);
    let (sensors, commands) = (Sensors::new(&topics.sensors), Commands::new(&topics));
    let app = TestApp::spawn_with(config).await;
    default_of_18(&app, "room-1", "hq").await;
    sensors.reading("room-1", 20.0, Utc::now()).await;
    assert_eq!(decided(&commands.expect().await), (H::Off, L::Default));

    let mut client = schedules(&app).await;
    client
        .put_preset(preset("hq", "comfort", 23.0))
        .await
        .expect("preset");
    early_in_a_minute().await;
    let (period, end) = until_soon(1, "comfort");
    let stored = client
        .put_schedule(schedule("hq", "office", &[], vec![period]))
        .await
        .expect("schedule")
        .into_inner();
    assert_eq!(stored.revision, 1);
    let next = stored.next_transition.expect("a next transition");
    assert_eq!(next.time.as_ref().map(at), Some(end));
    assert_eq!(next.values, None, "after the period, nothing");

    // At once, on the reading already there: comfort is 23 °C.
    let on = commands.expect().await;
    assert_eq!(decided(&on), (H::On, L::Schedule));
    let now = levels(&app, "room-1").await;
    assert_eq!(now.effective_level(), L::Schedule);
    assert_eq!(now.schedule_id, "office");
    assert_eq!(on.level_revision, now.levels[0].revision);
    assert_eq!(
        now.next_transition.and_then(|t| t.time).as_ref().map(at),
        Some(end)
    );

    // No reading from now on: the transition alone turns it back to DEFAULT's OFF, on time.
    let off = commands
        .next(Duration::from_secs(90))
        .await
        .expect("a command at the transition");
    assert_eq!(decided(&off), (H::Off, L::Default));
    let decided_at = at(off.decided_at.as_ref().expect("decided_at"));
    assert!(
        decided_at >= end,
        "not before the transition: {decided_at} < {end}"
    );
    assert!(
        decided_at - end < TimeDelta::seconds(3),
        "within a second or two of the transition: {decided_at} against {end}"
    );

    // The history says which level changed, by whom and why.
    let history = app
        .setpoints()
        .await
        .list_setpoint_history(pb::ListSetpointHistoryRequest {
            sensor_id: "room-1".into(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner()
        .entries;
    let seen: Vec<(i64, L, bool, &str, &str)> = history
        .iter()
        .map(|e| {
            (
                e.revision,
                e.level(),
                e.deleted,
                e.changed_by.as_str(),
                e.schedule_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (3, L::Schedule, true, "system", "office"),
            (2, L::Schedule, false, "system", "office"),
            (1, L::Default, false, "anonymous", ""),
        ]
    );
    assert!(
        history[1].reason.contains("preset comfort"),
        "{}",
        history[1].reason
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_record_one_transition_and_a_preset_change_applies_at_once() {
    let config = TestApp::fresh_config().await;
    let first = TestApp::spawn_with(config.clone()).await;
    let second = TestApp::spawn_with(config).await;
    let rooms = ["room-1", "room-2", "room-3"];
    for sensor in rooms {
        default_of_18(&first, sensor, "hq").await;
    }
    let mut client = schedules(&first).await;
    client
        .put_preset(preset("hq", "comfort", 23.0))
        .await
        .expect("preset");
    early_in_a_minute().await;
    let (period, end) = until_soon(1, "comfort");
    client
        .put_schedule(schedule("hq", "office", &[], vec![period]))
        .await
        .expect("schedule");
    // A preset's change reaches the levels in the same call.
    client
        .put_preset(preset("hq", "comfort", 22.0))
        .await
        .expect("preset change");
    let now = levels(&second, "room-2").await;
    assert_eq!(
        (now.effective_level(), now.levels[0].desired_celsius),
        (L::Schedule, 22.0)
    );

    // Both replicas run the transitions every second, each in its own transactions.
    let wait = (end - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(4);
    tokio::time::sleep(wait).await;
    let changes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT sensor_id, count(*) FROM setpoint_history WHERE level = 2 \
         GROUP BY sensor_id ORDER BY sensor_id",
    )
    .fetch_all(&mut first.db().await)
    .await
    .unwrap();
    let once: Vec<(String, i64)> = rooms.map(|s| (s.to_owned(), 3)).into();
    assert_eq!(
        changes, once,
        "written, changed with the preset, relinquished at the transition: once each"
    );
    assert_eq!(levels(&first, "room-3").await.effective_level(), L::Default);
    second.stop().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transition_missed_while_stopped_is_applied_as_the_service_starts() {
    let config = TestApp::fresh_config().await;
    let app = TestApp::spawn_with(config.clone()).await;
    default_of_18(&app, "room-1", "hq").await;
    let mut client = schedules(&app).await;
    client
        .put_preset(preset("hq", "comfort", 23.0))
        .await
        .expect("preset");
    early_in_a_minute().await;
    let (period, end) = until_soon(1, "comfort");
    client
        .put_schedule(schedule("hq", "office", &[], vec![period]))
        .await
        .expect("schedule");
    app.stop().await;
    let wait = (end - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(1);
    tokio::time::sleep(wait).await;

    let restarted = TestApp::spawn_with(config).await;
    let mut right = false;
    // The first pass runs as the service starts.
    for _ in 0..20 {
        if levels(&restarted, "room-1").await.effective_level() == L::Default {
            right = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        right,
        "the SCHEDULE level the missed transition ended is gone within 2 s"
    );
    restarted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_created_in_a_scheduled_building_follows_its_schedule_and_groups_take_their_own() {
    let mut config = TestApp::fresh_config().await;
    config.control.schedule_sweep_interval = Duration::from_secs(1);
    let app = TestApp::spawn_with(config).await;
    let mut client = schedules(&app).await;
    client
        .put_preset(preset("hq", "comfort", 23.0))
        .await
        .expect("preset");
    client
        .put_preset(preset("hq", "eco", 16.0))
        .await
        .expect("preset");
    let all_day = |name: &str| pb::SchedulePeriod {
        days: (1..=7).collect(),
        start_time: "00:00".into(),
        end_time: "24:00".into(),
        value: Some(pb::schedule_period::Value::Preset(name.into())),
    };
    client
        .put_schedule(schedule("hq", "office", &[], vec![all_day("comfort")]))
        .await
        .expect("building schedule");
    client
        .put_schedule(schedule(
            "hq",
            "storage",
            &["store-1"],
            vec![all_day("eco")],
        ))
        .await
        .expect("group schedule");
    default_of_18(&app, "room-1", "hq").await;
    default_of_18(&app, "store-1", "hq").await;
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            levels(&app, "room-1").await.effective_level() == L::Schedule
                && levels(&app, "store-1").await.effective_level() == L::Schedule
        })
        .await,
        "new sensors get their schedule's level within a sweep"
    );
    let store = levels(&app, "store-1").await;
    assert_eq!(
        (store.schedule_id.as_str(), store.levels[0].desired_celsius),
        ("storage", 16.0)
    );
    let room = levels(&app, "room-1").await;
    assert_eq!(
        (room.schedule_id.as_str(), room.levels[0].desired_celsius),
        ("office", 23.0)
    );

    // A sensor moved to another building leaves the old one's schedule in the same change,
    // and follows the new one's within a sweep.
    client
        .put_preset(preset("annex", "comfort", 20.0))
        .await
        .expect("annex preset");
    client
        .put_schedule(schedule("annex", "annex", &[], vec![all_day("comfort")]))
        .await
        .expect("annex schedule");
    let mut moving = setpoint("room-1", "annex", 18.0);
    moving.up_delta_celsius = 0.5;
    moving.down_delta_celsius = 0.5;
    app.setpoints()
        .await
        .put_setpoint(put(moving, None))
        .await
        .expect("move");
    let moved = levels(&app, "room-1").await;
    assert!(
        moved.levels.iter().all(|l| l.schedule_id != "office"),
        "the old building's schedule stays behind: {moved:?}"
    );
    assert!(
        common::eventually(Duration::from_secs(5), || async {
            let now = levels(&app, "room-1").await;
            now.effective_level() == L::Schedule && now.levels[0].schedule_id == "annex"
        })
        .await,
        "the new building's schedule within a sweep"
    );

    // Deleting the group's schedule hands its sensor to the building's, at once.
    client
        .delete_schedule(pb::DeleteScheduleRequest {
            building_id: "hq".into(),
            schedule_id: "storage".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    let store = levels(&app, "store-1").await;
    assert_eq!(
        (store.schedule_id.as_str(), store.levels[0].desired_celsius),
        ("office", 23.0)
    );
    let history = client
        .list_schedule_history(pb::ListScheduleHistoryRequest {
            building_id: "hq".into(),
            schedule_id: "storage".into(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner()
        .entries;
    let revisions: Vec<(i64, bool)> = history
        .iter()
        .map(|e| (e.schedule.as_ref().map_or(0, |s| s.revision), e.deleted))
        .collect();
    assert_eq!(revisions, [(2, true), (1, false)]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_shows_an_override_expiring_into_the_schedule() {
    let app = TestApp::spawn().await;
    default_of_18(&app, "room-1", "hq").await;
    let mut client = schedules(&app).await;
    client
        .put_preset(preset("hq", "comfort", 21.0))
        .await
        .expect("preset");
    let all_day = pb::SchedulePeriod {
        days: (1..=7).collect(),
        start_time: "00:00".into(),
        end_time: "24:00".into(),
        value: Some(pb::schedule_period::Value::Preset("comfort".into())),
    };
    client
        .put_schedule(schedule("hq", "office", &[], vec![all_day]))
        .await
        .expect("schedule");
    // An override for two hours, given as a duration; not with an expiry time as well.
    let hold = pb::WriteSetpointLevelRequest {
        sensor_id: "room-1".into(),
        level: L::Override.into(),
        desired_celsius: 24.0,
        up_delta_celsius: 0.5,
        down_delta_celsius: 0.5,
        duration: Some(prost_types::Duration {
            seconds: 7200,
            nanos: 0,
        }),
        ..Default::default()
    };
    let both = pb::WriteSetpointLevelRequest {
        expire_time: Some(timestamp(Utc::now() + TimeDelta::hours(1))),
        ..hold.clone()
    };
    let mut setpoints = app.setpoints().await;
    let refused = setpoints
        .write_setpoint_level(both)
        .await
        .expect_err("both");
    assert_eq!(refused.code(), Code::InvalidArgument);
    let before = Utc::now();
    let written = setpoints
        .write_setpoint_level(hold)
        .await
        .expect("override")
        .into_inner();
    let expire = written.effective_until.as_ref().map(at).expect("an expiry");
    assert!(
        expire >= before + TimeDelta::hours(2) && expire <= Utc::now() + TimeDelta::hours(2),
        "two hours from the write: {expire}"
    );
    let preview = client
        .preview_setpoint(pb::PreviewSetpointRequest {
            sensor_id: "room-1".into(),
            duration: None,
            start_time: None,
        })
        .await
        .expect("preview")
        .into_inner();
    let seen: Vec<(L, f64, &str)> = preview
        .segments
        .iter()
        .map(|s| {
            (
                s.level(),
                s.values.as_ref().map_or(f64::NAN, |v| v.desired_celsius),
                s.preset.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [(L::Override, 24.0, ""), (L::Schedule, 21.0, "comfort")]
    );
    let handover = preview.segments[1].start_time.as_ref().map(at).unwrap();
    assert!(
        (handover - expire).num_milliseconds().abs() < 1,
        "{handover} against {expire}"
    );
    let end = preview.end_time.as_ref().map(at).unwrap();
    assert!((end - Utc::now() - TimeDelta::days(7)).num_seconds().abs() < 60);
    // From a later start, for a day: the schedule alone.
    let later = client
        .preview_setpoint(pb::PreviewSetpointRequest {
            sensor_id: "room-1".into(),
            duration: Some(prost_types::Duration {
                seconds: 86_400,
                nanos: 0,
            }),
            start_time: Some(timestamp(expire + TimeDelta::hours(1))),
        })
        .await
        .expect("later preview")
        .into_inner();
    let levels_seen: Vec<L> = later.segments.iter().map(|s| s.level()).collect();
    assert_eq!(levels_seen, [L::Schedule]);
    app.stop().await;
}

async fn put_schedule_as(
    client: &mut ScheduleServiceClient<Channel>,
    token: &str,
    request: pb::PutScheduleRequest,
) -> Result<pb::Schedule, tonic::Status> {
    client
        .put_schedule(authorized(request, Some(token)))
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_are_checked_and_belong_to_their_building() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    let mut client = schedules(&app).await;
    let period = |preset: &str| pb::SchedulePeriod {
        days: vec![1, 2, 3, 4, 5],
        start_time: "07:00".into(),
        end_time: "18:00".into(),
        value: Some(pb::schedule_period::Value::Preset(preset.into())),
    };
    let office = schedule("north", "office", &[], vec![period("comfort")]);

    // A preset the building lacks.
    let refused = put_schedule_as(&mut client, "t-operator-north", office.clone()).await;
    assert_eq!(code(&refused), Code::FailedPrecondition);
    let put_preset = |token: &'static str, building: &str| {
        authorized(preset(building, "comfort", 22.0), Some(token))
    };
    assert_eq!(
        code(
            &client
                .put_preset(put_preset("t-operator-south", "north"))
                .await
        ),
        Code::PermissionDenied,
        "another building's operator"
    );
    assert_eq!(
        code(
            &client
                .put_preset(put_preset("t-viewer-north", "north"))
                .await
        ),
        Code::PermissionDenied,
        "a viewer"
    );
    client
        .put_preset(put_preset("t-operator-north", "north"))
        .await
        .expect("the building's operator");
    put_schedule_as(&mut client, "t-operator-north", office.clone())
        .await
        .expect("schedule");

    // What a schedule may not be, each with its field or its reason.
    let mut bad_zone = office.clone();
    bad_zone.schedule.as_mut().unwrap().time_zone = "Mars/Olympus".into();
    let mut overlapping = office.clone();
    overlapping
        .schedule
        .as_mut()
        .unwrap()
        .weekly
        .push(pb::SchedulePeriod {
            start_time: "17:00".into(),
            end_time: "19:00".into(),
            ..period("comfort")
        });
    let mut backwards = office.clone();
    backwards.schedule.as_mut().unwrap().weekly[0].end_time = "06:00".into();
    for (request, field) in [
        (bad_zone, "schedule.time_zone"),
        (
            overlapping,
            "schedule.weekly: Monday: periods 07:00-18:00 and 17:00-19:00 overlap",
        ),
        (backwards, "schedule.weekly[0].end_time"),
    ] {
        let status = put_schedule_as(&mut client, "t-operator-north", request)
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    }
    let second_for_the_building = schedule("north", "other", &[], vec![period("comfort")]);
    assert_eq!(
        code(&put_schedule_as(&mut client, "t-operator-north", second_for_the_building).await),
        Code::FailedPrecondition
    );
    // A preset in use stays.
    let deleted = client
        .delete_preset(authorized(
            pb::DeletePresetRequest {
                building_id: "north".into(),
                name: "comfort".into(),
                ..Default::default()
            },
            Some("t-operator-north"),
        ))
        .await;
    assert_eq!(code(&deleted), Code::FailedPrecondition);
    // Another building's reader sees nothing of it.
    let get = |token: &'static str| {
        authorized(
            pb::GetScheduleRequest {
                building_id: "north".into(),
                schedule_id: "office".into(),
            },
            Some(token),
        )
    };
    assert_eq!(
        code(&client.get_schedule(get("t-operator-south")).await),
        Code::NotFound
    );
    let seen = client
        .get_schedule(get("t-viewer-north"))
        .await
        .expect("viewer reads");
    assert_eq!(seen.into_inner().weekly[0].days, vec![1, 2, 3, 4, 5]);
    // The sensors of another building cannot be driven by it either.
    put_as(
        &mut app.setpoints().await,
        "t-operator-south",
        "south/room-1",
        "south",
        18.0,
    )
    .await
    .expect("south's sensor");
    let grabbing = schedule("north", "grab", &["south/room-1"], vec![period("comfort")]);
    put_schedule_as(&mut client, "t-operator-north", grabbing)
        .await
        .expect("a group may name any id");
    let south = app
        .setpoints()
        .await
        .get_setpoint_levels(authorized(
            pb::GetSetpointLevelsRequest {
                sensor_id: "south/room-1".into(),
            },
            Some("t-operator-south"),
        ))
        .await
        .expect("levels")
        .into_inner();
    assert_eq!(
        (south.levels.len(), south.schedule_id.as_str()),
        (1, ""),
        "only sensors of the schedule's own building follow it"
    );

    // Listed a page at a time; a schedule too large for a response is refused.
    let page = |token: String| {
        authorized(
            pb::ListSchedulesRequest {
                building_id: "north".into(),
                page_size: 1,
                page_token: token,
            },
            Some("t-viewer-north"),
        )
    };
    let first = client
        .list_schedules(page(String::new()))
        .await
        .expect("page")
        .into_inner();
    assert_eq!(first.schedules[0].schedule_id, "grab");
    let second = client
        .list_schedules(page(first.next_page_token))
        .await
        .expect("page")
        .into_inner();
    assert_eq!(second.schedules[0].schedule_id, "office");
    assert!(second.next_page_token.is_empty());
    let many: Vec<String> = (0..1000)
        .map(|i| format!("north/a-rather-long-sensor-name-{i:04}"))
        .collect();
    let ids: Vec<&str> = many.iter().map(String::as_str).collect();
    let huge = schedule("north", "huge", &ids, vec![period("comfort")]);
    let refused = put_schedule_as(&mut client, "t-operator-north", huge)
        .await
        .expect_err("too large");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("MAX_MESSAGE_SIZE"),
        "{}",
        refused.message()
    );
}

/// Runs the `count` grpcurl commands of the README's section `heading` against `app` as
/// written (as the operator of every building), and returns their answers.
fn run_readme_section(app: &TestApp, heading: &str, count: usize) -> Vec<String> {
    let readme = std::fs::read_to_string(common::repo_root().join("README.md")).expect("README");
    let section = readme.split(heading).nth(1).expect("the README's section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("its commands");
    let commands: Vec<String> = block
        .replace("\\\n", "")
        .lines()
        .filter(|l| l.starts_with("grpcurl "))
        .map(|l| l.replace("127.0.0.1:50051", &app.addr.to_string()))
        .collect();
    assert_eq!(
        commands.len(),
        count,
        "every call of the section: {commands:?}"
    );
    let grpcurl = common::env("THERMOSTAT_TEST_GRPCURL");
    let mut answers = Vec::new();
    for command in &commands {
        let ran = std::process::Command::new("bash")
            .args([
                "-c",
                &format!("grpcurl() {{ \"$GRPCURL\" \"$@\"; }}; {command}"),
            ])
            .env("GRPCURL", &grpcurl)
            .env("TOKEN", "t-operator-all")
            .output()
            .expect("bash");
        let out = String::from_utf8_lossy(&ran.stdout).into_owned();
        assert!(
            ran.status.success(),
            "{command}\n{out}{}",
            String::from_utf8_lossy(&ran.stderr)
        );
        answers.push(out);
    }
    answers
}

/// The README's schedule commands, run as written (with the address of this service and a
/// token of an operator of every building).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_schedule_commands_work_as_written() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    put_as(
        &mut app.setpoints().await,
        "t-operator-all",
        "room-1",
        "hq",
        20.0,
    )
    .await
    .expect("room-1");
    let answers = run_readme_section(&app, "### Schedules and presets", 14);
    let json = |i: usize| -> serde_json::Value {
        serde_json::from_str(&answers[i]).unwrap_or_else(|e| panic!("{e}: {}", answers[i]))
    };
    assert_eq!(json(2)["revision"], "1", "PutSchedule");
    assert_eq!(json(2)["weekly"].as_array().map(Vec::len), Some(2));
    assert_eq!(json(4)["schedules"][0]["scheduleId"], "office");
    assert_eq!(json(6)["presets"].as_array().map(Vec::len), Some(2));
    let levels = json(9);
    assert_eq!(levels["scheduleId"], "office", "{levels}");
    assert!(levels["nextTransition"]["time"].is_string(), "{levels}");
    let preview = json(10);
    assert!(
        preview["segments"].as_array().is_some_and(|s| s.len() >= 2),
        "a week of an office schedule changes: {preview}"
    );
    let dry = json(11);
    assert!(dry["upperCelsius"].as_f64().is_some(), "{dry}");
    assert!(dry["level"].is_string(), "{dry}");
    let gone = levels_after_delete(&app).await;
    assert_eq!(
        (gone.schedule_id.as_str(), gone.effective_level()),
        ("", L::Default)
    );
}

async fn levels_after_delete(app: &TestApp) -> pb::SetpointLevels {
    app.setpoints()
        .await
        .get_setpoint_levels(authorized(
            pb::GetSetpointLevelsRequest {
                sensor_id: "room-1".into(),
            },
            Some("t-operator-all"),
        ))
        .await
        .expect("levels")
        .into_inner()
}

fn dry_run(sensor: &str, celsius: f64, at: Option<DateTime<Utc>>) -> pb::DryRunRequest {
    pb::DryRunRequest {
        sensor_id: sensor.into(),
        temperature_celsius: celsius,
        time: at.map(timestamp),
    }
}

/// Issue 26's dry run: what the loop would decide at a temperature, now or later, as the
/// levels and the schedule stand, with no command sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_decides_now_and_later_and_the_state_says_why() {
    let config = TestApp::fresh_config().await;
    let topics = Topics::of(&config);
    let (sensors, commands) = (Sensors::new(&topics.sensors), Commands::new(&topics));
    let app = TestApp::spawn_with(config).await;
    default_of_18(&app, "room-1", "hq").await;
    sensors.reading("room-1", 20.0, Utc::now()).await;
    assert_eq!(decided(&commands.expect().await), (H::Off, L::Default));
    // Hold 23 °C for two hours: ON.
    app.setpoints()
        .await
        .write_setpoint_level(pb::WriteSetpointLevelRequest {
            sensor_id: "room-1".into(),
            level: L::Override.into(),
            desired_celsius: 23.0,
            up_delta_celsius: 0.5,
            down_delta_celsius: 0.5,
            duration: Some(prost_types::Duration {
                seconds: 7200,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("override");
    assert_eq!(decided(&commands.expect().await), (H::On, L::Override));

    let heaters = app.heaters().await;
    let ask = |request| {
        let mut heaters = heaters.clone();
        async move {
            heaters
                .dry_run(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    // Now, at 20 °C: ON under the override, already sent.
    let now = ask(dry_run("room-1", 20.0, None)).await.expect("dry run");
    assert_eq!(
        (now.command(), now.reason(), now.would_send, now.level()),
        (H::On, pb::CommandReason::TooCold, false, L::Override)
    );
    assert_eq!((now.lower_celsius, now.upper_celsius), (22.5, 23.5));
    // In three hours the override is gone: OFF on the DEFAULT band, which would be sent.
    let later = ask(dry_run(
        "room-1",
        20.0,
        Some(Utc::now() + TimeDelta::hours(3)),
    ))
    .await
    .expect("dry run");
    assert_eq!(
        (later.command(), later.would_send, later.level()),
        (H::Off, true, L::Default)
    );
    // Inside the band: nothing.
    let inside = ask(dry_run("room-1", 23.0, None)).await.expect("dry run");
    assert_eq!(
        (inside.command(), inside.would_send),
        (H::Unspecified, false)
    );
    // Not a temperature the loop takes; not a sensor with a setpoint.
    let bad = ask(dry_run("room-1", f64::NAN, None))
        .await
        .expect_err("NaN");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let unknown = ask(dry_run("room-9", 20.0, None))
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
    // Why the heater is ON: the reading's age, the level deciding and who wrote it, and what
    // changes next (the override's expiry, to DEFAULT).
    let state = app
        .heaters()
        .await
        .get_sensor_state(pb::GetSensorStateRequest {
            sensor_id: "room-1".into(),
        })
        .await
        .expect("state")
        .into_inner();
    let age = state.reading_age.expect("a reading's age");
    assert!((0..60).contains(&age.seconds), "{age:?}");
    let source = state.effective_source.expect("a source");
    assert_eq!(
        (source.level(), source.desired_celsius),
        (L::Override, 23.0)
    );
    let until = source.expire_time.as_ref().map(at).expect("an expiry");
    let next = state.next_change.expect("a next change");
    assert_eq!(next.level(), L::Default);
    assert_eq!(next.start_time.as_ref().map(at), Some(until));

    // No side effect: nothing was decided, nothing sent.
    assert_eq!(commands.next(Duration::from_secs(2)).await, None);
    drop(heaters);
    app.stop().await;
}

/// The README's heater limit, "why" and out-of-service commands, run as written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_heater_commands_work_as_written() {
    let (_dir, app) = secure_app(|_, _| {}).await;
    put_as(
        &mut app.setpoints().await,
        "t-operator-all",
        "room-1",
        "hq",
        20.0,
    )
    .await
    .expect("room-1");
    let answers = run_readme_section(&app, "### Protecting heaters, out of service", 6);
    let json = |i: usize| -> serde_json::Value {
        serde_json::from_str(&answers[i]).unwrap_or_else(|e| panic!("{e}: {}", answers[i]))
    };
    let settings = json(2);
    let effective = &settings["effectiveLimits"];
    assert_eq!(
        (
            effective["minOnTime"].as_str(),
            effective["keepAlive"].as_str(),
            effective["maxRunTime"].as_str()
        ),
        (Some("300s"), Some("900s"), Some("7200s")),
        "room-1's over hq's: {settings}"
    );
    assert_eq!(
        settings["limits"]["minOnTime"],
        serde_json::Value::Null,
        "inherited"
    );
    let state = json(3);
    assert_eq!(state["limits"]["minOffTime"], "180s", "{state}");
    assert_eq!(state["setpointLevel"], "SETPOINT_LEVEL_DEFAULT", "{state}");
    let out = json(4);
    assert_eq!(out["outOfService"]["reason"], "valve replaced", "{out}");
    assert_eq!(json(5)["outOfService"], serde_json::Value::Null);
}
