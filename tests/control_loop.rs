//! The control loop end to end: readings produced with a Kafka client, commands observed on the
//! command topic and on gRPC subscriptions, against a real broker and database.

mod common;

use rdkafka::Message as _;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use common::kafka::{
    by_sensor, header, write_command, written_command, Commands, Sensors, TopicReader, Topics,
};
use common::{next_event, put, setpoint, TestApp};
use thermostat::config::{SensorFormat, ServeConfig};
use thermostat::proto::v1 as pb;
use thermostat::stream::feed::{LiveEvent, SnapshotCoverage};
use thermostat::stream::stats::LoopStats;
use tokio_stream::StreamExt;

const QUIET: Duration = Duration::from_millis(1500);

/// A service on `config`, a reader of its command topic and a writer of its readings.
async fn looped(config: ServeConfig) -> (TestApp, Commands, Sensors) {
    let app = TestApp::spawn_with(config).await;
    let topics = Topics::of(&app.config);
    let commands = Commands::new(&topics);
    let sensors = Sensors::new(&topics.sensors);
    (app, commands, sensors)
}

/// `looped`, with sensor `s` in its band (20 ± 1) after a reading of 20, which made no command.
async fn settled(config: ServeConfig) -> (TestApp, Commands, Sensors) {
    let (app, commands, sensors) = looped(config).await;
    put_band(&app, "s", 20.0).await;
    sensors.reading("s", 20.0, Utc::now()).await;
    assert!(
        commands.drain(QUIET).await.is_empty(),
        "20 is inside the band"
    );
    (app, commands, sensors)
}

/// The ON that `change_unannounced` owes `s` once a full read of the setpoints finds it.
async fn expect_found(commands: &Commands, how: &str) {
    let on = commands.expect().await;
    assert_eq!(
        (cmd(&on), on.setpoint_revision),
        ((H::On, R::TooCold), 2),
        "{how} found revision 2"
    );
}

/// A fresh configuration without the periodic full resync, so that within a test only
/// notifications (or a resync they force) carry setpoint changes to the engine.
async fn without_periodic_resync() -> ServeConfig {
    let mut config = TestApp::fresh_config().await;
    config.control.setpoint_resync_interval = Duration::from_secs(3600);
    config
}

async fn put_band(app: &TestApp, sensor: &str, desired: f64) -> pb::Setpoint {
    app.setpoints()
        .await
        .put_setpoint(put(common::wide_band(sensor, desired), None))
        .await
        .expect("put")
        .into_inner()
}

async fn subscribe(
    app: &TestApp,
    request: pb::SubscribeHeaterCommandsRequest,
) -> tonic::Streaming<pb::HeaterCommandEvent> {
    app.heaters()
        .await
        .subscribe_heater_commands(request)
        .await
        .expect("subscribe")
        .into_inner()
}

fn cmd(e: &pb::HeaterCommandEvent) -> (pb::HeaterCommand, pb::CommandReason) {
    (e.command(), e.reason())
}

use pb::CommandReason as R;
use pb::HeaterCommand as H;

#[tokio::test]
async fn readings_drive_commands_to_the_topic_and_to_subscribers() {
    let app = TestApp::spawn().await;
    let topics = Topics::of(&app.config);
    let commands = Commands::new(&topics);
    let sp = put_band(&app, "room-1", 20.0).await;
    let mut live = subscribe(
        &app,
        pb::SubscribeHeaterCommandsRequest {
            sensor_ids: vec!["room-1".into()],
            ..Default::default()
        },
    )
    .await;
    let sensors = Sensors::new(&topics.sensors);
    let t0 = Utc::now();

    // No setpoint, no control.
    sensors.reading("uncontrolled", 5.0, t0).await;
    sensors.reading("room-1", 15.0, t0).await;
    let on = commands.expect().await;
    assert_eq!(
        (on.sensor_id.as_str(), cmd(&on)),
        ("room-1", (H::On, R::TooCold))
    );
    assert_eq!(
        (on.building_id.as_str(), on.sequence, on.setpoint_revision),
        ("hq", 1, sp.revision)
    );
    assert_eq!(on.temperature_celsius, Some(15.0));
    assert!(on.decided_at.is_some() && on.reading_time.is_some());
    let streamed = next_event(&mut live).await;
    assert_eq!(
        streamed, on,
        "the subscriber gets exactly what the topic has"
    );

    // Still cold and then in the dead band: nothing new.
    sensors
        .reading("room-1", 14.0, t0 + TimeDelta::seconds(1))
        .await;
    sensors
        .reading("room-1", 20.0, t0 + TimeDelta::seconds(2))
        .await;
    sensors
        .reading("room-1", 25.0, t0 + TimeDelta::seconds(3))
        .await;
    let off = commands.expect().await;
    assert_eq!(
        (cmd(&off), off.sequence, off.temperature_celsius),
        ((H::Off, R::TooHot), 2, Some(25.0))
    );
    assert_eq!(next_event(&mut live).await, off);
    assert!(
        commands.drain(QUIET).await.is_empty(),
        "a command was repeated"
    );

    // GetSensorState reports all three parts.
    let state = app
        .heaters()
        .await
        .get_sensor_state(pb::GetSensorStateRequest {
            sensor_id: "room-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state.setpoint.unwrap().desired_celsius, 20.0);
    assert_eq!(state.last_reading.unwrap().temperature_celsius, Some(25.0));
    assert_eq!(state.last_command.unwrap().sequence, 2);
    let err = app
        .heaters()
        .await
        .get_sensor_state(pb::GetSensorStateRequest {
            sensor_id: "never-seen".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn setpoint_changes_act_at_once_and_deletion_releases_the_heater() {
    let (app, commands, sensors) = settled(TestApp::fresh_config().await).await;

    // Raising the setpoint makes the last reading too cold: ON without a new reading.
    let raised = put_band(&app, "s", 23.0).await;
    let on = commands.expect().await;
    assert_eq!(
        (cmd(&on), on.setpoint_revision),
        ((H::On, R::TooCold), raised.revision)
    );

    let mut client = app.setpoints().await;
    client
        .delete_setpoint(pb::DeleteSetpointRequest {
            sensor_id: "s".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let off = commands.expect().await;
    assert_eq!((cmd(&off), off.sequence), ((H::Off, R::SetpointDeleted), 2));
    // Uncontrolled now.
    sensors.reading("s", 0.0, Utc::now()).await;
    assert!(commands.drain(QUIET).await.is_empty());
}

/// Writes that arrive together each reach the engine in their own notification
/// (stream::setpoint_sync): none may be lost on the way, and the engine must end at each
/// sensor's newest revision.
#[tokio::test]
async fn a_burst_of_setpoint_writes_reaches_the_engine_at_each_sensors_last_revision() {
    const SENSORS: usize = 40;
    let config = without_periodic_resync().await;
    let (app, commands, sensors) = looped(config).await;
    let names: Vec<String> = (0..SENSORS).map(|i| format!("burst-{i}")).collect();
    for name in &names {
        put_band(&app, name, 21.0).await;
        sensors.reading(name, 21.0, Utc::now()).await;
    }
    assert!(
        commands.drain(QUIET).await.is_empty(),
        "21 is inside every band"
    );

    // Every sensor at once: four moves that keep 21 inside the band, then one that does not.
    let writes = names.iter().cloned().map(|name| {
        let app = &app;
        async move {
            for desired in [21.5, 20.5, 21.8, 20.2] {
                put_band(app, &name, desired).await;
            }
            (name.clone(), put_band(app, &name, 25.0).await.revision)
        }
    });
    let last_revisions: std::collections::HashMap<String, i64> = futures::future::join_all(writes)
        .await
        .into_iter()
        .collect();

    let events = commands.drain(QUIET).await;
    let got = by_sensor(&events);
    for (name, revision) in &last_revisions {
        let theirs: Vec<_> = got
            .get(name)
            .map(|events| {
                events
                    .iter()
                    .map(|e| (cmd(e), e.setpoint_revision))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(
            theirs,
            [((H::On, R::TooCold), *revision)],
            "{name}: one ON, decided on the last revision"
        );
    }
    assert_eq!(got.len(), SENSORS, "no command for another sensor");
}

/// A notification the listener cannot read means it no longer knows what changed: it reads
/// every setpoint again, once for a whole burst of them.
#[tokio::test]
async fn unreadable_notifications_cause_one_full_resync_that_finds_what_changed() {
    // Only the forced resync can find the change below.
    let (app, commands, _sensors) = settled(without_periodic_resync().await).await;

    // A change no notification tells of: 20 is now too cold.
    let mut db = app.db().await;
    change_unannounced(&mut db).await;
    assert!(commands.drain(QUIET).await.is_empty(), "nobody was told");

    let resyncs = || LoopStats::get(&app.control.stats().resyncs);
    let before = resyncs();
    // In one statement: sent one by one, a slow run could spread the burst past the resync
    // that the first one schedules (1 s later) and count two.
    sqlx::query(
        "SELECT pg_notify('thermostat_setpoints', 'not a version ' || i) \
         FROM generate_series(1, 20) AS i",
    )
    .execute(&mut db)
    .await
    .unwrap();
    expect_found(&commands, "the resync").await;
    assert!(commands.drain(QUIET).await.is_empty());
    assert_eq!(resyncs() - before, 1, "one resync for the burst");
}

#[tokio::test]
async fn setpoints_stored_before_the_range_was_narrowed_are_counted_at_each_full_read() {
    let mut config = TestApp::fresh_config().await;
    let app = TestApp::spawn_with(config.clone()).await;
    let mut client = app.setpoints().await;
    for (sensor, desired) in [("warm", 39.5), ("mild", 21.0)] {
        client
            .put_setpoint(put(setpoint(sensor, "b", desired), None))
            .await
            .unwrap();
    }
    assert_eq!(LoopStats::get(&app.control.stats().out_of_reach), 0);
    app.stop().await;

    // An operator narrows the accepted readings to 0..40: "warm" (39.5 ± 0.5) can no longer
    // be turned OFF by any reading the loop accepts.
    config.kafka.reading_range_celsius = thermostat::config::CelsiusRange {
        min: 0.0,
        max: 40.0,
    };
    let app = TestApp::spawn_with(config).await;
    assert_eq!(LoopStats::get(&app.control.stats().out_of_reach), 1);
    app.stop().await;
}

/// `s`'s setpoint raised to 25 by SQL with the notification trigger off: nothing tells the
/// service; only a full read of the setpoints can find it.
async fn change_unannounced(db: &mut sqlx::PgConnection) {
    for sql in [
        "ALTER TABLE setpoints DISABLE TRIGGER setpoints_notify",
        "UPDATE setpoints SET desired_celsius = 25, revision = revision + 1",
        "ALTER TABLE setpoints ENABLE TRIGGER setpoints_notify",
    ] {
        sqlx::query(sql).execute(&mut *db).await.unwrap();
    }
}

/// The safety net: a change no notification told of is found by the periodic full read.
#[tokio::test]
async fn the_periodic_resync_finds_a_change_nobody_announced() {
    let mut config = TestApp::fresh_config().await;
    config.control.setpoint_resync_interval = Duration::from_secs(1);
    let (app, commands, _sensors) = settled(config).await;
    change_unannounced(&mut app.db().await).await;
    expect_found(&commands, "a periodic resync").await;
}

/// Notifications sent while the listener is away are lost: when it reconnects it reads every
/// setpoint again. Its connection is killed as a failover or an operator would kill it.
#[tokio::test]
async fn a_listener_that_lost_its_connection_reads_everything_again_when_back() {
    // Only the reconnection's full read can find the change below.
    let (app, commands, _sensors) = settled(without_periodic_resync().await).await;

    // Made first, invisible (no notification): only a full read after reconnecting finds it,
    // whenever that read happens.
    let mut db = app.db().await;
    change_unannounced(&mut db).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(killed, [true], "one listener, terminated");
    expect_found(&commands, "the read after reconnecting").await;
    // Reconnected, it hears notifications again.
    put_band(&app, "s", 5.0).await;
    let off = commands.expect().await;
    assert_eq!((cmd(&off), off.setpoint_revision), ((H::Off, R::TooHot), 3));
}

#[tokio::test]
async fn a_quiet_sensor_gets_off_once_and_late_readings_are_ignored() {
    let mut config = TestApp::fresh_config().await;
    config.control.stale_after = Duration::from_secs(2);
    let (app, commands, sensors) = looped(config).await;
    put_band(&app, "s", 20.0).await;

    let t0 = Utc::now();
    sensors.reading("s", 10.0, t0).await;
    assert_eq!(cmd(&commands.expect().await), (H::On, R::TooCold));
    // An older, hot reading arrives late: ignored, the heater stays ON.
    sensors.reading("s", 30.0, t0 - TimeDelta::seconds(1)).await;
    let stale = commands.expect().await;
    assert_eq!(
        cmd(&stale),
        (H::Off, R::SensorStale),
        "expected the fail-safe, not {stale:?}"
    );
    assert!(
        Utc::now() - t0 >= TimeDelta::seconds(2),
        "fail-safe fired before STALE_AFTER"
    );
    assert_eq!(LoopStats::get(&app.control.stats().out_of_order), 1);
    assert!(
        commands.drain(Duration::from_secs(3)).await.is_empty(),
        "OFF is sent once"
    );
}

#[tokio::test]
async fn readings_of_unknown_sensors_stop_growing_the_cache_at_its_limit() {
    let mut config = TestApp::fresh_config().await;
    config.control.sensor_cache_limit = 2;
    let (app, commands, sensors) = settled(config).await;
    let state = |sensor: &'static str| {
        let app = &app;
        async move {
            app.heaters()
                .await
                .get_sensor_state(pb::GetSensorStateRequest {
                    sensor_id: sensor.into(),
                })
                .await
        }
    };
    // `s` is cached; the first unknown sensor fills the cache, the second is not remembered.
    sensors.reading("junk-1", 10.0, Utc::now()).await;
    sensors.reading("junk-2", 10.0, Utc::now()).await;
    let read = common::eventually(Duration::from_secs(20), || async {
        LoopStats::get(&app.control.stats().readings) >= 3
    })
    .await;
    assert!(read, "the readings were not consumed");
    let remembered = state("junk-1")
        .await
        .expect("junk-1 is cached")
        .into_inner();
    assert_eq!(
        remembered.last_reading.unwrap().temperature_celsius,
        Some(10.0)
    );
    assert_eq!(
        state("junk-2").await.unwrap_err().code(),
        tonic::Code::NotFound
    );
    assert!(
        commands.drain(QUIET).await.is_empty(),
        "no setpoint, no command"
    );

    // A cached sensor is controlled as before, and a setpoint is cached beyond the limit.
    sensors.reading("s", 10.0, Utc::now()).await;
    assert_eq!(cmd(&commands.expect().await), (H::On, R::TooCold));
    put_band(&app, "junk-2", 20.0).await;
    sensors.reading("junk-2", 10.0, Utc::now()).await;
    let on = commands.expect().await;
    assert_eq!(
        (on.sensor_id.as_str(), cmd(&on)),
        ("junk-2", (H::On, R::TooCold))
    );
}

#[tokio::test]
async fn a_restart_is_not_taken_for_silence_by_the_fail_safe() {
    let mut config = TestApp::fresh_config().await;
    config.control.stale_after = Duration::from_secs(2);
    let topics = Topics::of(&config);
    let sensors = Sensors::new(&topics.sensors);
    let commands = Commands::new(&topics);
    let app = TestApp::spawn_with(config.clone()).await;
    put_band(&app, "s", 20.0).await;
    sensors.reading("s", 10.0, Utc::now()).await;
    assert_eq!(cmd(&commands.expect().await), (H::On, R::TooCold));
    // Then in the band, for longer than STALE_AFTER: no command, and after a clean stop these
    // readings are behind the committed offset. The restarted service knows only the ON's.
    for _ in 0..7 {
        sensors.reading("s", 20.0, Utc::now()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(commands.drain(Duration::from_millis(300)).await.is_empty());
    app.stop().await;
    let restarted = TestApp::spawn_with(config).await;
    let assigned = common::eventually(Duration::from_secs(30), || async {
        restarted.control.stats().assigned_partitions() > 0
    })
    .await;
    assert!(assigned, "the restarted service owns the partition");
    let taken_over = Utc::now();

    // Readings of the sensor went elsewhere until now: not silence.
    let early = commands.drain(Duration::from_secs(1)).await;
    assert!(early.is_empty(), "fail-safe at takeover: {early:?}");
    // Silent from the takeover on: the fail-safe, STALE_AFTER later.
    let stale = commands.expect().await;
    assert_eq!(cmd(&stale), (H::Off, R::SensorStale));
    assert!(Utc::now() - taken_over >= TimeDelta::seconds(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_setpoint_change_acts_on_a_reading_received_before_it() {
    let config = TestApp::fresh_config().await;
    let topics = Topics::of(&config);
    let (sensors, commands) = (Sensors::new(&topics.sensors), Commands::new(&topics));
    let app = TestApp::spawn_with(config.clone()).await;
    put_band(&app, "s", 20.0).await;
    // In the band: nothing to decide, and after a clean stop behind the committed offset. No
    // command carries it, so only the sensor topic still knows it.
    sensors.reading("s", 20.5, Utc::now()).await;
    let consumed = common::eventually(Duration::from_secs(20), || async {
        LoopStats::get(&app.control.stats().readings) == 1
    })
    .await;
    assert!(consumed, "the reading was consumed");
    app.stop().await;

    let restarted = TestApp::spawn_with(config).await;
    let assigned = common::eventually(Duration::from_secs(30), || async {
        restarted.control.stats().assigned_partitions() > 0
    })
    .await;
    assert!(assigned, "the restarted service owns the partitions");
    // 20.5 °C against 23 ± 1: too cold, at once, without a new reading.
    put_band(&restarted, "s", 23.0).await;
    let on = commands.next(Duration::from_secs(10)).await;
    let on = on.expect("the setpoint change acted on the reading from before the restart");
    assert_eq!(cmd(&on), (H::On, R::TooCold));
    assert_eq!(on.temperature_celsius, Some(20.5));
}

/// A service with sensor "s" held at 20 ± 0.5 °C, readers of its command and dead-letter topics,
/// and a writer to its sensor topic.
async fn with_dead_letters() -> (TestApp, Commands, TopicReader, Sensors) {
    let app = TestApp::spawn().await;
    let topics = Topics::of(&app.config);
    let commands = Commands::new(&topics);
    let dead = TopicReader::new(&topics.dead_letters, 1);
    let sensors = Sensors::new(&topics.sensors);
    put_band(&app, "s", 20.0).await;
    (app, commands, dead, sensors)
}

/// A protobuf reading of sensor "s" taken at `time`, encoded.
fn reading_of_s(celsius: Option<f64>, time: chrono::DateTime<Utc>) -> Vec<u8> {
    prost::Message::encode_to_vec(&pb::SensorReading {
        sensor_id: "s".into(),
        temperature_celsius: celsius,
        reading_time: Some(thermostat::proto::timestamp(time)),
    })
}

#[tokio::test]
async fn bad_records_go_to_the_dead_letter_topic_and_the_loop_goes_on() {
    let (app, commands, dead, sensors) = with_dead_letters().await;

    let now = Utc::now();
    sensors.raw(Some("s"), &[0xff, 0xfe, 0x01]).await;
    sensors
        .raw(Some("s"), &reading_of_s(Some(f64::NAN), now))
        .await;
    // Without a temperature, not a reading of 0 °C (which would turn the heater on).
    sensors.raw(Some("s"), &reading_of_s(None, now)).await;
    // A failing sensor's -127 °C, which would turn the heater on.
    sensors.reading("s", -127.0, now).await;
    sensors.reading("bad id!", 10.0, now).await;
    sensors.reading("s", 10.0, now + TimeDelta::hours(2)).await;
    // Keyless: it could land on a partition another replica owns, and be decided there too.
    sensors.raw(None, &reading_of_s(Some(30.0), now)).await;
    sensors.reading("s", 10.0, now).await;

    assert_eq!(
        cmd(&commands.expect().await),
        (H::On, R::TooCold),
        "the loop went on"
    );
    let mut reasons = Vec::new();
    for _ in 0..7 {
        let record = dead
            .next(Duration::from_secs(20))
            .await
            .expect("a dead letter");
        reasons.push(header(&record, "thermostat-dead-letter-reason").expect("reason header"));
        assert!(header(&record, "thermostat-dead-letter-detail").is_some());
    }
    // Records of different partitions may be dead-lettered in any order.
    reasons.sort();
    assert_eq!(
        reasons,
        [
            "future_time",
            "implausible_temperature",
            "invalid_sensor_id",
            "missing_key",
            "missing_temperature",
            "non_finite_temperature",
            "undecodable"
        ]
    );
    assert_eq!(app.control.stats().dead_lettered(), 7);
}

#[tokio::test]
async fn a_record_too_large_to_dead_letter_whole_is_cut_and_the_loop_goes_on() {
    let (_app, commands, dead, sensors) = with_dead_letters().await;

    // A 600 kB key that is not the reading's sensor: quoted in the detail, the key and the
    // detail alone were over librdkafka's 1 MB record limit.
    let now = Utc::now();
    let payload = reading_of_s(Some(10.0), now);
    let key = "k".repeat(600_000);
    sensors.raw(Some(&key), &payload).await;
    sensors.reading("s", 10.0, now).await;

    assert_eq!(
        cmd(&commands.expect().await),
        (H::On, R::TooCold),
        "the loop went on"
    );
    let record = dead
        .next(Duration::from_secs(20))
        .await
        .expect("a dead letter");
    let text = |name| header(&record, name).unwrap_or_else(|| panic!("{name} header"));
    assert_eq!(text("thermostat-dead-letter-reason"), "key_mismatch");
    assert_eq!(
        text("thermostat-dead-letter-truncated"),
        format!("key=600000 payload={}", payload.len())
    );
    assert!(text("thermostat-dead-letter-detail").len() <= 1024);
    assert_eq!(record.key().map(<[u8]>::len), Some(1024));
    assert_eq!(record.payload(), Some(payload.as_slice()));
}

#[tokio::test]
async fn json_readings_are_accepted_when_configured() {
    let mut config = TestApp::fresh_config().await;
    config.kafka.sensor_format = SensorFormat::Json;
    let (app, commands, sensors) = looped(config).await;
    put_band(&app, "gw-7", 20.0).await;
    let json = format!(
        r#"{{"sensor_id":"gw-7","temperature_celsius":25.5,"reading_time":"{}"}}"#,
        Utc::now().to_rfc3339()
    );
    sensors.raw(Some("gw-7"), json.as_bytes()).await;
    let off = commands.expect().await;
    assert_eq!(
        (off.sensor_id.as_str(), cmd(&off)),
        ("gw-7", (H::Off, R::TooHot))
    );
}

#[tokio::test]
async fn subscribers_get_the_current_state_first_and_can_filter_by_building() {
    let (app, commands, sensors) = looped(TestApp::fresh_config().await).await;
    let mut early = app.control.subscribe();
    let mut client = app.setpoints().await;
    for (sensor, building) in [("a1", "alpha"), ("a2", "alpha"), ("b1", "beta")] {
        client
            .put_setpoint(put(setpoint(sensor, building, 20.0), None))
            .await
            .unwrap();
        sensors.reading(sensor, 10.0, Utc::now()).await;
    }
    for _ in 0..3 {
        commands.expect().await;
    }
    // Wait until the loop has read its own commands back: they are broadcast then (a
    // snapshot already has them once decided, so it cannot tell).
    for _ in 0..3 {
        next_live(&mut early).await;
    }
    drop(early);

    let mut alpha = subscribe(
        &app,
        pb::SubscribeHeaterCommandsRequest {
            building_id: "alpha".into(),
            send_initial_state: true,
            ..Default::default()
        },
    )
    .await;
    let mut initial = [next_event(&mut alpha).await, next_event(&mut alpha).await];
    initial.sort_by(|x, y| x.sensor_id.cmp(&y.sensor_id));
    assert!(initial.iter().all(|e| e.snapshot && e.command() == H::On));
    assert_eq!(initial[0].sensor_id, "a1");
    assert_eq!(initial[1].sensor_id, "a2");

    // Live: a beta command is filtered out, the alpha one arrives, not marked snapshot.
    let mut feed = app.control.subscribe();
    sensors.reading("b1", 30.0, Utc::now()).await;
    sensors.reading("a2", 30.0, Utc::now()).await;
    let live = next_event(&mut alpha).await;
    assert_eq!(
        (live.sensor_id.as_str(), live.command(), live.snapshot),
        ("a2", H::Off, false)
    );
    // b1's OFF was broadcast too (perhaps after a2's, the two being on different partitions):
    // once the feed every subscription reads has had both, nothing more reaches alpha.
    let mut broadcast: Vec<String> = Vec::new();
    while broadcast.len() < 2 {
        broadcast.push(next_live(&mut feed).await.event.sensor_id.clone());
    }
    broadcast.sort();
    assert_eq!(broadcast, ["a2", "b1"]);
    assert!(
        tokio::time::timeout(QUIET, alpha.next()).await.is_err(),
        "nothing but alpha's heaters"
    );

    let err = app
        .heaters()
        .await
        .subscribe_heater_commands(pb::SubscribeHeaterCommandsRequest {
            sensor_ids: vec!["bad id".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("sensor_ids"));
}

#[tokio::test]
async fn a_snapshot_of_more_heaters_than_one_part_is_sent_whole_before_live_commands() {
    // More than the engine hands out in one part (1024).
    const HEATERS: usize = 1100;
    let (app, _commands, sensors) = looped(TestApp::fresh_config().await).await;
    let mut client = app.setpoints().await;
    let ids: Vec<String> = (0..HEATERS).map(|n| format!("many-{n}")).collect();
    for id in &ids {
        client
            .put_setpoint(put(setpoint(id, "hq", 20.0), None))
            .await
            .unwrap();
    }
    futures::future::join_all(ids.iter().map(|id| sensors.reading(id, 10.0, Utc::now()))).await;
    assert!(
        common::eventually(Duration::from_secs(30), || async {
            common::snapshot_len(&app).await == HEATERS
        })
        .await,
        "the loop read back every command"
    );

    let mut stream = subscribe(
        &app,
        pb::SubscribeHeaterCommandsRequest {
            send_initial_state: true,
            ..Default::default()
        },
    )
    .await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..HEATERS {
        let event = next_event(&mut stream).await;
        assert!(event.snapshot && event.command() == H::On, "{event:?}");
        seen.insert(event.sensor_id);
    }
    assert_eq!(seen.len(), HEATERS, "each heater once");

    sensors.reading("many-0", 30.0, Utc::now()).await;
    let live = next_event(&mut stream).await;
    assert_eq!(
        (live.sensor_id.as_str(), live.command(), live.snapshot),
        ("many-0", H::Off, false)
    );
}

#[tokio::test]
async fn a_command_on_the_topic_again_or_out_of_order_reaches_subscribers_once() {
    let (app, _commands, _sensors) = looped(TestApp::fresh_config().await).await;
    let command_topic = Sensors::new(&Topics::of(&app.config).commands);
    let mut stream = subscribe(&app, pb::SubscribeHeaterCommandsRequest::default()).await;
    // As after a producer's retry or a rebalance: sequence 1 twice, 1 again after 2.
    for (sequence, command) in [(1, H::On), (1, H::On), (2, H::Off), (1, H::On), (3, H::On)] {
        write_command(
            &command_topic,
            written_command("again-1", "hq", sequence, command),
        )
        .await;
    }
    let received: Vec<(u64, H)> = [
        next_event(&mut stream).await,
        next_event(&mut stream).await,
        next_event(&mut stream).await,
    ]
    .iter()
    .map(|e| (e.sequence, e.command()))
    .collect();
    assert_eq!(received, [(1, H::On), (2, H::Off), (3, H::On)]);
    let more = tokio::time::timeout(QUIET, stream.next()).await;
    assert!(more.is_err(), "nothing more: {more:?}");
}

async fn next_live(live: &mut tokio::sync::broadcast::Receiver<LiveEvent>) -> LiveEvent {
    tokio::time::timeout(Duration::from_secs(20), live.recv())
        .await
        .expect("a live event within 20 s")
        .expect("live feed open")
}

#[tokio::test]
async fn a_snapshot_covers_exactly_the_live_events_applied_before_it() {
    let (app, _commands, _sensors) = looped(TestApp::fresh_config().await).await;
    let command_topic = Sensors::new(&Topics::of(&app.config).commands);
    // What a subscription does: subscribe to the live feed, then take the snapshot.
    let mut live = app.control.subscribe();
    write_command(&command_topic, written_command("cover-1", "hq", 1, H::On)).await;
    let before = next_live(&mut live).await;
    let part = app
        .control
        .snapshot(Default::default(), Default::default())
        .await
        .expect("snapshot");
    assert_eq!(part.events.len(), 1, "the event is in the snapshot");
    write_command(&command_topic, written_command("cover-1", "hq", 2, H::Off)).await;
    let after = next_live(&mut live).await;
    assert_eq!((before.event.sequence, after.event.sequence), (1, 2));

    let mut sent = SnapshotCoverage::default();
    sent.add(&part);
    assert!(sent.covers(&before), "sent in the snapshot: not again");
    assert!(!sent.covers(&after), "newer than the snapshot: sent");
}

#[tokio::test]
async fn a_subscriber_that_does_not_read_is_dropped_without_slowing_the_loop() {
    let mut config = TestApp::fresh_config().await;
    config.control.subscriber_buffer = 4;
    let (app, commands, sensors) = looped(config).await;
    put_band(&app, "s", 20.0).await;
    let mut stalled = common::stalled_subscription(
        &app.addr.to_string(),
        pb::SubscribeHeaterCommandsRequest::default(),
    )
    .await;
    // Ten times the buffer: the stalled stream's 1 KiB window and the buffer hold far fewer.
    const COMMANDS: u64 = 40;
    let mut live = app.control.subscribe();

    let t0 = Utc::now();
    for i in 0..COMMANDS as i64 {
        let t = if i % 2 == 0 { 10.0 } else { 30.0 };
        sensors
            .reading("s", t, t0 + TimeDelta::milliseconds(i))
            .await;
    }
    // The loop produced every command regardless of the stalled subscriber.
    for _ in 0..COMMANDS {
        commands.expect().await;
    }
    // Once the last one is broadcast (read back by the follower), the stalled subscriber's place
    // in the feed has been overrun; reading now, its stream ends with RESOURCE_EXHAUSTED after
    // what was buffered. This receiver may fall behind as well: it only needs the last event.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match live.recv().await {
                Ok(e) if e.event.sequence == COMMANDS => break,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("live feed: {e}"),
            }
        }
    })
    .await
    .expect("the last command broadcast");
    let mut status = None;
    while let Some(item) = tokio::time::timeout(Duration::from_secs(10), stalled.next())
        .await
        .expect("stream neither delivered nor ended")
    {
        if let Err(s) = item {
            status = Some(s);
            break;
        }
    }
    assert_eq!(
        status.expect("stream ended with an error").code(),
        tonic::Code::ResourceExhausted
    );
}

#[tokio::test]
async fn a_subscriber_behind_after_a_large_snapshot_is_caught_up_not_dropped() {
    // Several parts, and more than the server can hand a client that does not read.
    const HEATERS: usize = 5000;
    let mut config = TestApp::fresh_config().await;
    config.control.subscriber_buffer = 4;
    let (app, _commands, _sensors) = looped(config).await;
    let command_topic = Sensors::new(&Topics::of(&app.config).commands);
    let ids: Vec<String> = (0..HEATERS).map(|n| format!("behind-{n}")).collect();
    futures::future::join_all(
        ids.iter()
            .map(|id| write_command(&command_topic, written_command(id, "hq", 1, H::On))),
    )
    .await;
    assert!(
        common::eventually(Duration::from_secs(30), || async {
            common::snapshot_len(&app).await == HEATERS
        })
        .await,
        "the loop read every command"
    );
    // Heaters of the first part, which the subscription takes before it returns, and of parts
    // after the second, which it takes only as the client reads: for a client that reads
    // nothing the server encodes at most two chunks of about 32 KB ahead (tonic yields a chunk
    // at 32 KB; hyper sends one and holds the next), under 1000 events of some 70 B, and
    // taking the second part needs all 1024 of the first.
    let first = app
        .control
        .snapshot(Default::default(), Default::default())
        .await
        .expect("snapshot");
    let second = app
        .control
        .snapshot(Default::default(), first.next.clone().expect("more parts"))
        .await
        .expect("snapshot");
    let in_first: Vec<String> = first.events[..20]
        .iter()
        .map(|e| e.sensor_id.clone())
        .collect();
    let in_later: Vec<String> = ids
        .iter()
        .filter(|id| {
            !first
                .events
                .iter()
                .chain(&second.events)
                .any(|e| &e.sensor_id == *id)
        })
        .take(20)
        .cloned()
        .collect();

    let mut stream = common::stalled_subscription(
        &app.addr.to_string(),
        pb::SubscribeHeaterCommandsRequest {
            send_initial_state: true,
            ..Default::default()
        },
    )
    .await;
    // While it is in its snapshot, far more commands than its buffer of 4.
    let changed: Vec<&String> = in_first.iter().chain(&in_later).collect();
    futures::future::join_all(
        changed
            .iter()
            .map(|id| write_command(&command_topic, written_command(id, "hq", 2, H::Off))),
    )
    .await;
    assert!(
        common::eventually(Duration::from_secs(30), || async {
            let mut applied = 0;
            for id in &changed {
                let sensor = thermostat::domain::SensorId::parse(id.as_str()).unwrap();
                let view = app.control.sensor(sensor).await.unwrap_or_default();
                applied += usize::from(view.last_command.is_some_and(|c| c.sequence == 2));
            }
            applied == changed.len()
        })
        .await,
        "the loop read every change"
    );

    // Every heater once in the snapshot, then the changes the snapshot did not have (those of
    // the first part) in the catch-up, marked as state, not as live commands.
    let mut sent: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let complete = |sent: &std::collections::HashMap<String, Vec<u64>>| {
        sent.len() == HEATERS && changed.iter().all(|id| sent[*id].last() == Some(&2))
    };
    while !complete(&sent) {
        let event = next_event(&mut stream).await;
        assert!(event.snapshot, "{event:?}");
        sent.entry(event.sensor_id)
            .or_default()
            .push(event.sequence);
    }
    for id in &in_first {
        assert_eq!(sent[id], [1, 2], "{id}: snapshot, then catch-up");
    }
    for id in &in_later {
        assert_eq!(sent[id], [2], "{id}: its part was taken after the change");
    }
    let twice = sent.values().filter(|s| s.len() > 1).count();
    assert_eq!(twice, in_first.len(), "no other heater again");

    // And live from there.
    write_command(&command_topic, written_command(&ids[0], "hq", 3, H::On)).await;
    let live = next_event(&mut stream).await;
    assert_eq!(
        (live.sensor_id.as_str(), live.sequence, live.snapshot),
        (ids[0].as_str(), 3, false)
    );
}

#[tokio::test]
async fn a_crash_and_restart_neither_loses_nor_repeats_commands() {
    let config = TestApp::fresh_config().await;
    let topics = Topics::of(&config);
    let sensors = Sensors::new(&topics.sensors);
    let commands = Commands::new(&topics);
    let app = TestApp::spawn_with(config.clone()).await;
    let ids: Vec<String> = (0..6).map(|i| format!("room-{i}")).collect();
    for id in &ids {
        put_band(&app, id, 20.0).await;
    }
    // Phase 1: every room cold, then each room's heater ON.
    let t0 = Utc::now();
    for id in &ids {
        sensors.reading(id, 10.0, t0).await;
    }
    for _ in &ids {
        commands.expect().await;
    }
    // Crash mid-stream: readings keep coming while the service is down, some repeating the
    // state (must not repeat a command), some changing it (must not be lost).
    let produce_more = async {
        for (i, id) in ids.iter().enumerate() {
            let t = if i % 2 == 0 { 10.0 } else { 30.0 };
            sensors.reading(id, t, t0 + TimeDelta::seconds(1)).await;
        }
    };
    app.crash().await;
    produce_more.await;
    let restarted = TestApp::spawn_with(config).await;
    holds_both_partitions(&restarted).await;
    for (i, id) in ids.iter().enumerate() {
        let t = if i % 2 == 0 { 10.0 } else { 30.0 };
        sensors.reading(id, t, t0 + TimeDelta::seconds(2)).await;
    }
    let events = commands.drain(Duration::from_secs(4)).await;
    let per_sensor = by_sensor(&events);
    for (i, id) in ids.iter().enumerate() {
        let history = per_sensor.get(id).cloned().unwrap_or_default();
        // Consumers drop re-deliveries by sequence; what remains must alternate and be complete.
        let mut seen = std::collections::BTreeMap::new();
        for e in &history {
            if let Some(previous) = seen.insert(e.sequence, e.command()) {
                assert_eq!(
                    previous,
                    e.command(),
                    "{id}: two different commands with one sequence"
                );
            }
        }
        let commands: Vec<_> = seen.values().copied().collect();
        let expected = if i % 2 == 0 { vec![] } else { vec![H::Off] };
        assert_eq!(commands, expected, "{id}: after the restart, {history:?}");
    }
    assert_eq!(
        restarted.control.stats().commands(),
        3,
        "the restarted service decided exactly the three changes"
    );
}

/// Waits until `app`, the only replica, holds both sensor partitions: a restarted replica
/// decides nothing before it joins the group, and the tests' time windows start after that.
async fn holds_both_partitions(app: &TestApp) {
    let joined = common::eventually(Duration::from_secs(30), || async {
        app.control.stats().assigned_partitions() == 2
    })
    .await;
    assert!(joined, "the restarted service holds both sensor partitions");
}

/// Two replicas of one service, each owning one of the two sensor partitions, and sensors
/// `s0`..`s9` with a setpoint of 20 ± 1 °C.
async fn two_replicas() -> (TestApp, TestApp, Sensors, Commands, Vec<String>) {
    let config = TestApp::fresh_config().await;
    let topics = Topics::of(&config);
    let first = TestApp::spawn_with(config.clone()).await;
    let second = TestApp::spawn_with(config).await;
    let sensors = Sensors::new(&topics.sensors);
    let commands = Commands::new(&topics);
    let ids: Vec<String> = (0..10).map(|i| format!("s{i}")).collect();
    for id in &ids {
        put_band(&first, id, 20.0).await;
    }
    // Both replicas own partitions before the readings flow.
    assert!(
        common::eventually(Duration::from_secs(30), || async {
            first.control.stats().assigned_partitions() == 1
                && second.control.stats().assigned_partitions() == 1
        })
        .await,
        "the group did not spread the partitions over both replicas"
    );
    (first, second, sensors, commands, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_readings_and_both_stream_every_command() {
    let (first, second, sensors, commands, ids) = two_replicas().await;
    let mut streams = vec![
        subscribe(&first, Default::default()).await,
        subscribe(&second, Default::default()).await,
    ];

    let t0 = Utc::now();
    for id in &ids {
        sensors.reading(id, 10.0, t0).await;
    }
    let mut on = Vec::new();
    for _ in &ids {
        on.push(commands.expect().await);
    }
    assert!(
        commands.drain(QUIET).await.is_empty(),
        "a reading was handled twice"
    );
    let readings = LoopStats::get(&first.control.stats().readings)
        + LoopStats::get(&second.control.stats().readings);
    assert_eq!(
        readings,
        ids.len() as u64,
        "every reading handled exactly once"
    );
    assert!(LoopStats::get(&first.control.stats().readings) > 0);
    assert!(LoopStats::get(&second.control.stats().readings) > 0);

    for stream in &mut streams {
        let mut got = Vec::new();
        for _ in &ids {
            got.push(next_event(stream).await.sensor_id);
        }
        got.sort();
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(
            got, expected,
            "a subscriber missed commands of the other replica"
        );
    }
}

/// A rolling update's step: of two replicas one stops, and the other takes its partition over.
/// It knows the last command of every heater the stopped one drove, so it repeats none, and it
/// carries each sensor's sequence on.
#[tokio::test]
async fn a_replica_that_takes_a_partition_over_neither_repeats_nor_renumbers_commands() {
    let (first, second, sensors, commands, ids) = two_replicas().await;
    let t0 = Utc::now();
    for id in &ids {
        sensors.reading(id, 10.0, t0).await;
    }
    for _ in &ids {
        assert_eq!(cmd(&commands.expect().await), (H::On, R::TooCold));
    }
    assert!(
        LoopStats::get(&first.control.stats().readings) > 0,
        "the first replica drove some heaters"
    );

    first.stop().await;
    assert!(
        common::eventually(Duration::from_secs(60), || async {
            second.control.stats().assigned_partitions() == 2
        })
        .await,
        "the survivor took both partitions"
    );
    // Still cold: every heater is already ON, whichever replica turned it on.
    for id in &ids {
        sensors.reading(id, 9.0, t0 + TimeDelta::seconds(1)).await;
    }
    assert!(
        commands.drain(QUIET).await.is_empty(),
        "a command was repeated"
    );
    // Hot: one OFF each, numbered after the ON.
    for id in &ids {
        sensors.reading(id, 30.0, t0 + TimeDelta::seconds(2)).await;
    }
    let mut off = Vec::new();
    for _ in &ids {
        let event = commands.expect().await;
        assert_eq!(
            (cmd(&event), event.sequence),
            ((H::Off, R::TooHot), 2),
            "{event:?}"
        );
        off.push(event.sensor_id);
    }
    off.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(off, expected);
    assert!(commands.drain(QUIET).await.is_empty());
}

/// Issue 24: a watch says when its snapshot is complete (also in a quiet building), and a
/// client that reconnects with `resume_from` gets only the heaters that changed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_marks_its_snapshot_complete_and_resumes_with_what_changed() {
    use pb::watch_heater_commands_response::Kind;
    let app = TestApp::spawn().await;
    let topic = Sensors::new(&Topics::of(&app.config).commands);
    let mut old = written_command("w/a", "w", 1, H::On);
    old.decided_at = Some(thermostat::proto::timestamp(
        Utc::now() - TimeDelta::minutes(10),
    ));
    write_command(&topic, old).await;
    write_command(&topic, written_command("w/b", "w", 1, H::On)).await;
    let heaters = app.heaters().await;
    let last_sequence = |sensor: &'static str| {
        let mut heaters = heaters.clone();
        async move {
            let request = pb::GetSensorStateRequest {
                sensor_id: sensor.into(),
            };
            heaters
                .get_sensor_state(request)
                .await
                .ok()
                .and_then(|s| s.into_inner().last_command)
                .map(|c| c.sequence)
        }
    };
    assert!(
        common::eventually(Duration::from_secs(20), || async {
            last_sequence("w/a").await == Some(1) && last_sequence("w/b").await == Some(1)
        })
        .await
    );
    let watch = |building: &str, resume_from: Option<prost_types::Timestamp>| {
        let mut heaters = heaters.clone();
        let request = pb::WatchHeaterCommandsRequest {
            building_id: building.into(),
            resume_from,
            ..Default::default()
        };
        async move {
            heaters
                .watch_heater_commands(request)
                .await
                .unwrap()
                .into_inner()
        }
    };
    async fn next(stream: &mut tonic::Streaming<pb::WatchHeaterCommandsResponse>) -> Kind {
        let item = tokio::time::timeout(Duration::from_secs(10), stream.message());
        item.await
            .expect("an item in time")
            .unwrap()
            .unwrap()
            .kind
            .unwrap()
    }
    // Until its snapshot is complete: the events, and the marker.
    async fn snapshot(
        stream: &mut tonic::Streaming<pb::WatchHeaterCommandsResponse>,
    ) -> (Vec<(String, u64)>, pb::SnapshotComplete) {
        let mut events = Vec::new();
        loop {
            let item = tokio::time::timeout(Duration::from_secs(10), stream.message())
                .await
                .expect("an item in time")
                .unwrap()
                .unwrap();
            match item.kind.unwrap() {
                Kind::Event(e) => {
                    assert!(e.snapshot, "{e:?}");
                    events.push((e.sensor_id, e.sequence));
                }
                Kind::SnapshotComplete(done) => {
                    events.sort();
                    return (events, done);
                }
                Kind::HeaterStatus(s) => panic!("no heater reports here: {s:?}"),
            }
        }
    }

    // A quiet building: complete at once, nothing before.
    let mut quiet = watch("empty", None).await;
    assert!(matches!(next(&mut quiet).await, Kind::SnapshotComplete(_)));
    let mut first = watch("w", None).await;
    let (events, done) = snapshot(&mut first).await;
    assert_eq!(events, [("w/a".into(), 1), ("w/b".into(), 1)]);
    assert!(!done.resumed);
    drop(first);

    // While the client is away, b changes; it resumes from the marker it got.
    write_command(&topic, written_command("w/b", "w", 2, H::Off)).await;
    assert!(
        common::eventually(Duration::from_secs(20), || async {
            last_sequence("w/b").await == Some(2)
        })
        .await
    );
    let mut resumed = watch("w", done.as_of).await;
    let (events, done) = snapshot(&mut resumed).await;
    assert_eq!(events, [("w/b".into(), 2)], "only what changed");
    assert!(done.resumed);
    // Then live.
    write_command(&topic, written_command("w/a", "w", 2, H::Off)).await;
    match next(&mut resumed).await {
        Kind::Event(e) => assert_eq!(
            (e.sensor_id.as_str(), e.sequence, e.snapshot),
            ("w/a", 2, false)
        ),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_sensor_that_never_reports_is_sent_off_without_a_temperature() {
    let mut config = TestApp::fresh_config().await;
    config.control.stale_after = Duration::from_secs(2);
    let commands = Commands::new(&Topics::of(&config));
    let app = TestApp::spawn_with(config).await;
    put_band(&app, "quiet", 20.0).await;
    // Controlled from its setpoint on, silent for STALE_AFTER: the fail-safe, with no reading
    // behind it (absent, where it used to be 0 °C).
    let stale = commands.expect().await;
    assert_eq!(cmd(&stale), (H::Off, R::SensorStale));
    assert_eq!(stale.temperature_celsius, None);
    assert_eq!(stale.reading_time, None);
    let state = app
        .heaters()
        .await
        .get_sensor_state(pb::GetSensorStateRequest {
            sensor_id: "quiet".into(),
        })
        .await
        .expect("state")
        .into_inner();
    let last = state.last_command.expect("the last command");
    assert_eq!(
        (last.sequence, last.temperature_celsius),
        (stale.sequence, None)
    );
}

type Heaters =
    pb::heater_control_service_client::HeaterControlServiceClient<tonic::transport::Channel>;

async fn state_of(heaters: &mut Heaters, sensor: &str) -> pb::SensorState {
    let request = pb::GetSensorStateRequest {
        sensor_id: sensor.into(),
    };
    heaters
        .get_sensor_state(request)
        .await
        .expect("state")
        .into_inner()
}

/// What the loop would decide for `sensor` at `celsius` now.
async fn dry_run_now(heaters: &mut Heaters, sensor: &str, celsius: f64) -> pb::DryRunResponse {
    let request = pb::DryRunRequest {
        sensor_id: sensor.into(),
        temperature_celsius: celsius,
        time: None,
    };
    heaters
        .dry_run(request)
        .await
        .expect("dry run")
        .into_inner()
}

fn time_of(t: Option<prost_types::Timestamp>) -> Option<chrono::DateTime<Utc>> {
    t.as_ref().and_then(thermostat::proto::from_timestamp)
}

fn decided_at(e: &pb::HeaterCommandEvent) -> chrono::DateTime<Utc> {
    thermostat::proto::from_timestamp(e.decided_at.as_ref().expect("decided_at")).expect("a time")
}

/// Issue 26: a switch inside the minimum on time is deferred, not dropped, and sent when the
/// time is up without another reading; the hold counts from the last command's own time, so a
/// restart in the middle of it keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_inside_the_minimum_on_time_is_sent_when_it_ends_across_a_restart() {
    const MIN_ON: i64 = 15;
    let mut config = TestApp::fresh_config().await;
    config.control.min_on_time = Duration::from_secs(MIN_ON as u64);
    let (app, commands, sensors) = looped(config.clone()).await;
    put_band(&app, "boiler", 20.0).await;
    sensors.reading("boiler", 18.0, Utc::now()).await;
    let on = commands.expect().await;
    assert_eq!(
        cmd(&on),
        (pb::HeaterCommand::On, pb::CommandReason::TooCold)
    );
    let hold_ends = decided_at(&on) + TimeDelta::seconds(MIN_ON);
    app.stop().await;

    let app = TestApp::spawn_with(config).await;
    holds_both_partitions(&app).await;
    // Too hot now, while the hold lasts: nothing until it ends.
    sensors.reading("boiler", 23.0, Utc::now()).await;
    assert!(
        Utc::now() + TimeDelta::seconds(3) < hold_ends,
        "the restart took the whole hold: nothing left to check"
    );
    // The state and a dry run say so.
    let mut heaters = app.heaters().await;
    let state = state_of(&mut heaters, "boiler").await;
    assert_eq!(time_of(state.hold_until), Some(hold_ends));
    let dry = dry_run_now(&mut heaters, "boiler", 23.0).await;
    assert_eq!(
        (dry.command(), dry.would_send, time_of(dry.deferred_until)),
        (pb::HeaterCommand::Off, true, Some(hold_ends))
    );
    assert_eq!(dry.limit(), pb::HeaterLimit::MinOnTime);
    let early = (hold_ends - Utc::now() - TimeDelta::seconds(1))
        .to_std()
        .unwrap_or_default();
    assert_eq!(commands.next(early).await, None, "no OFF inside the hold");
    let off = commands
        .next(Duration::from_secs(10))
        .await
        .expect("the OFF at the hold's end");
    assert_eq!(
        cmd(&off),
        (pb::HeaterCommand::Off, pb::CommandReason::DeferredTooHot)
    );
    let at = decided_at(&off);
    assert!(at >= hold_ends, "not inside the hold: {at} < {hold_ends}");
    assert!(
        at - hold_ends < TimeDelta::seconds(3),
        "at its end, without another reading: {at} against {hold_ends}"
    );
    app.stop().await;
}

/// Issue 26: a heater ON for the maximum run time goes OFF for the cooldown, then ON again if
/// the room is still cold, without another reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heater_on_for_its_maximum_run_time_rests_for_the_cooldown() {
    let mut config = TestApp::fresh_config().await;
    config.control.max_run_time = Duration::from_secs(4);
    config.control.run_cooldown = Duration::from_secs(4);
    let (app, commands, sensors) = looped(config).await;
    put_band(&app, "boiler", 20.0).await;
    sensors.reading("boiler", 18.0, Utc::now()).await;
    let on = commands.expect().await;
    assert_eq!(
        cmd(&on),
        (pb::HeaterCommand::On, pb::CommandReason::TooCold)
    );
    // The state and a dry run name the run's end; after it, the cooldown holds an ON back.
    let mut heaters = app.heaters().await;
    let run_ends = Some(decided_at(&on) + TimeDelta::seconds(4));
    let state = state_of(&mut heaters, "boiler").await;
    let during = dry_run_now(&mut heaters, "boiler", 18.0).await;
    assert_eq!(
        (time_of(state.run_ends), time_of(during.run_ends)),
        (run_ends, run_ends)
    );
    let off = commands.expect().await;
    assert_eq!(
        cmd(&off),
        (pb::HeaterCommand::Off, pb::CommandReason::MaxRunTime)
    );
    let resting = dry_run_now(&mut heaters, "boiler", 18.0).await;
    assert_eq!(
        (
            resting.would_send,
            resting.limit(),
            time_of(resting.deferred_until)
        ),
        (
            true,
            pb::HeaterLimit::RunCooldown,
            Some(decided_at(&off) + TimeDelta::seconds(4))
        )
    );
    let ran = decided_at(&off) - decided_at(&on);
    assert!(
        ran >= TimeDelta::seconds(4) && ran < TimeDelta::seconds(6),
        "ran {ran}"
    );
    let again = commands.expect().await;
    assert_eq!(
        cmd(&again),
        (pb::HeaterCommand::On, pb::CommandReason::DeferredTooCold)
    );
    let rested = decided_at(&again) - decided_at(&off);
    assert!(
        rested >= TimeDelta::seconds(4) && rested < TimeDelta::seconds(6),
        "rested {rested}"
    );
    app.stop().await;
}

fn limits(min_on: u64, keep_alive: Option<u64>) -> pb::HeaterLimits {
    let secs = |s: u64| prost_types::Duration {
        seconds: s as i64,
        nanos: 0,
    };
    pb::HeaterLimits {
        min_on_time: Some(secs(min_on)),
        keep_alive: keep_alive.map(secs),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_repeats_the_command_and_holds_count_from_the_switch_across_a_restart() {
    const MIN_ON: i64 = 20;
    let config = TestApp::fresh_config().await;
    let (app, commands, sensors) = looped(config.clone()).await;
    put_band(&app, "boiler", 20.0).await;
    let mut heaters = app.heaters().await;
    // The building's minimum on time, and the boiler's own keep-alive over it.
    heaters
        .put_heater_limits(pb::PutHeaterLimitsRequest {
            building_id: "hq".into(),
            sensor_id: String::new(),
            limits: Some(limits(MIN_ON as u64, None)),
        })
        .await
        .expect("building limits");
    let boiler = heaters
        .put_heater_limits(pb::PutHeaterLimitsRequest {
            building_id: "hq".into(),
            sensor_id: "boiler".into(),
            limits: Some(pb::HeaterLimits {
                keep_alive: Some(prost_types::Duration {
                    seconds: 4,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        })
        .await
        .expect("sensor limits")
        .into_inner();
    let effective = boiler.effective_limits.unwrap();
    assert_eq!(
        (
            effective.min_on_time.unwrap().seconds,
            effective.keep_alive.unwrap().seconds,
            effective.min_off_time.unwrap().seconds
        ),
        (MIN_ON, 4, 0),
        "the sensor's over the building's over the service's"
    );
    assert_eq!(boiler.limits.unwrap().min_on_time, None, "inherited");
    // Applied by the loop on a NOTIFY: give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sensors.reading("boiler", 18.0, Utc::now()).await;
    let on = commands.expect().await;
    assert_eq!(cmd(&on), (H::On, R::TooCold));
    assert_eq!(on.switched_at, on.decided_at);
    let again = commands.expect().await;
    assert_eq!(
        (cmd(&again), again.limit()),
        ((H::On, R::KeepAlive), pb::HeaterLimit::KeepAlive)
    );
    assert_eq!(again.sequence, on.sequence + 1, "a repeat is a new command");
    assert_eq!(again.switched_at, on.decided_at);
    let every = decided_at(&again) - decided_at(&on);
    assert!(
        every >= TimeDelta::seconds(4) && every < TimeDelta::seconds(6),
        "{every}"
    );
    app.stop().await;

    let app = TestApp::spawn_with(config).await;
    holds_both_partitions(&app).await;
    let hold_ends = decided_at(&on) + TimeDelta::seconds(MIN_ON);
    sensors.reading("boiler", 23.0, Utc::now()).await;
    assert!(
        Utc::now() + TimeDelta::seconds(2) < hold_ends,
        "the restart took the whole hold: nothing left to check"
    );
    // Repeats go on; the OFF comes when the hold from the switch ends, not from a repeat.
    let mut off = None;
    let give_up = hold_ends + TimeDelta::seconds(10);
    while Utc::now() < give_up {
        let Some(event) = commands.next(Duration::from_secs(5)).await else {
            break;
        };
        if event.command() == H::Off {
            off = Some(event);
            break;
        }
        assert_eq!(cmd(&event), (H::On, R::KeepAlive));
    }
    let off = off.expect("the OFF at the hold's end");
    assert_eq!(
        (cmd(&off), off.limit()),
        ((H::Off, R::DeferredTooHot), pb::HeaterLimit::MinOnTime)
    );
    let at = decided_at(&off);
    assert!(
        at >= hold_ends && at - hold_ends < TimeDelta::seconds(3),
        "{at} against the hold's end {hold_ends}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_service_releases_the_heater_sends_nothing_and_decides_again_when_back() {
    let (app, commands, sensors) = looped(TestApp::fresh_config().await).await;
    for sensor in ["room-1", "room-2"] {
        put_band(&app, sensor, 20.0).await;
        sensors.reading(sensor, 18.0, Utc::now()).await;
    }
    let mut on = commands.expect().await.sequence;
    on = on.max(commands.expect().await.sequence);
    assert!(on > 0);
    let mut heaters = app.heaters().await;
    let out = |sensor: &str, out: bool, keep: bool| pb::SetOutOfServiceRequest {
        building_id: "hq".into(),
        sensor_id: sensor.into(),
        out_of_service: out,
        reason: if out {
            "valve replaced".into()
        } else {
            String::new()
        },
        keep_heater_state: keep,
    };
    // Refused: no reason; a sensor without a setpoint in the building; another building.
    let status = heaters
        .set_out_of_service(pb::SetOutOfServiceRequest {
            reason: String::new(),
            ..out("room-1", true, false)
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = heaters
        .set_out_of_service(out("nowhere", true, false))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let status = heaters
        .put_heater_limits(pb::PutHeaterLimitsRequest {
            building_id: "hq".into(),
            sensor_id: String::new(),
            limits: Some(limits(8 * 24 * 3600, None)),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("limits.min_on_time"),
        "{status:?}"
    );

    // room-2 alone, its heater left as it is: nothing sent.
    let settings = heaters
        .set_out_of_service(out("room-2", true, true))
        .await
        .expect("out")
        .into_inner();
    let reported = settings.out_of_service.expect("out of service");
    assert_eq!(
        (
            reported.reason.as_str(),
            reported.keep_heater_state,
            reported.building_wide
        ),
        ("valve replaced", true, false)
    );
    // The whole building: room-1's heater is released at once; room-2's is kept ON.
    heaters
        .set_out_of_service(out("", true, false))
        .await
        .expect("building out");
    let released = commands.expect().await;
    assert_eq!(
        (released.sensor_id.as_str(), cmd(&released)),
        ("room-1", (H::Off, R::OutOfService))
    );
    // Readings are tracked, nothing is decided.
    sensors.reading("room-1", 17.0, Utc::now()).await;
    sensors.reading("room-2", 25.0, Utc::now()).await;
    assert!(commands.drain(QUIET).await.is_empty(), "out of service");
    let state = state_of(&mut heaters, "room-1").await;
    let why = state.out_of_service.expect("out of service, visible");
    assert!(why.building_wide);
    assert_eq!(state.last_reading.unwrap().temperature_celsius, Some(17.0));
    let dry = dry_run_now(&mut heaters, "room-1", 17.0).await;
    assert_eq!(
        (dry.command(), dry.would_send, dry.out_of_service),
        (H::On, false, true)
    );

    // Back: the building first (room-2 still out on its own), then room-2.
    heaters
        .set_out_of_service(out("", false, false))
        .await
        .expect("building back");
    let back = commands.expect().await;
    assert_eq!(
        (back.sensor_id.as_str(), cmd(&back)),
        ("room-1", (H::On, R::TooCold)),
        "decided at once on its latest reading"
    );
    assert!(
        commands.drain(QUIET).await.is_empty(),
        "room-2 is still out"
    );
    heaters
        .set_out_of_service(out("room-2", false, false))
        .await
        .expect("room-2 back");
    let back = commands.expect().await;
    assert_eq!(
        (back.sensor_id.as_str(), cmd(&back)),
        ("room-2", (H::Off, R::TooHot))
    );
    let settings = heaters
        .get_heater_settings(pb::GetHeaterSettingsRequest {
            building_id: "hq".into(),
            sensor_id: "room-2".into(),
        })
        .await
        .expect("settings")
        .into_inner();
    assert_eq!(settings.out_of_service, None);
    assert!(settings.revision >= 2);
    app.stop().await;
}

/// A heater report as a gateway writes it.
fn report(sensor: &str, on: bool) -> Vec<u8> {
    prost::Message::encode_to_vec(&pb::HeaterReport {
        sensor_id: sensor.into(),
        state: if on { H::On } else { H::Off }.into(),
        report_time: Some(thermostat::proto::timestamp(Utc::now())),
    })
}

/// The next heater status a watch streams, skipping commands.
async fn next_status(
    watch: &mut tonic::Streaming<pb::WatchHeaterCommandsResponse>,
) -> pb::HeaterStatus {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(15), watch.message())
            .await
            .expect("a heater status in time")
            .expect("watch")
            .expect("open");
        if let Some(pb::watch_heater_commands_response::Kind::HeaterStatus(status)) = item.kind {
            return status;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heater_that_does_not_follow_its_command_is_flagged_and_not_fought() {
    let mut config = TestApp::fresh_config().await;
    let reports_topic = common::kafka::create_topic("reports", 2).await;
    config.kafka.heater_report_topic = reports_topic.clone();
    config.control.report_timeout = Duration::from_secs(2);
    config.control.keep_alive = Duration::from_secs(2);
    let (app, commands, sensors) = looped(config).await;
    let reports = Sensors::new(&reports_topic);
    put_band(&app, "h1", 20.0).await;
    let mut heaters = app.heaters().await;
    let mut watch = heaters
        .watch_heater_commands(pb::WatchHeaterCommandsRequest {
            building_id: "hq".into(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    sensors.reading("h1", 18.0, Utc::now()).await;
    let on = commands.expect().await;
    assert_eq!(cmd(&on), (H::On, R::TooCold));
    // Never reported yet: no status, and no verdict.
    reports.raw(Some("h1"), &report("h1", true)).await;
    let repeat = commands.expect().await;
    assert_eq!(
        cmd(&repeat),
        (H::On, R::KeepAlive),
        "keep-alive runs while it follows"
    );
    let state = |heaters: &mut pb::heater_control_service_client::HeaterControlServiceClient<_>| {
        let mut heaters = heaters.clone();
        async move {
            heaters
                .get_sensor_state(pb::GetSensorStateRequest {
                    sensor_id: "h1".into(),
                })
                .await
                .expect("state")
                .into_inner()
                .heater_status
                .expect("a heater that reports has a status")
        }
    };
    let status = state(&mut heaters).await;
    assert_eq!(
        (status.commanded(), status.reported(), status.following),
        (H::On, H::On, true)
    );

    // Switched OFF by hand at the device: flagged once the command is older than the timeout.
    reports.raw(Some("h1"), &report("h1", false)).await;
    let flagged = next_status(&mut watch).await;
    assert_eq!(
        (
            flagged.sensor_id.as_str(),
            flagged.reported(),
            flagged.following
        ),
        ("h1", H::Off, false)
    );
    assert_eq!(flagged.commanded_sequence, repeat.sequence);
    // Not fought: no repeat while it does not follow.
    let during = commands.drain(Duration::from_secs(5)).await;
    assert!(
        during.is_empty(),
        "the loop fought a manual change: {during:?}"
    );
    assert!(!state(&mut heaters).await.following);
    let flagged_metrics = || async {
        let (_, metrics) = common::http_get(app.admin, "/metrics").await;
        [
            "thermostat_heaters_not_following",
            "thermostat_heaters_stopped_following_total",
        ]
        .map(|series| common::sample(&metrics, series))
    };
    assert_eq!(flagged_metrics().await, [1.0, 1.0]);

    // A bad report is dead-lettered with its reason; a good one that follows clears the flag.
    let stateless = prost::Message::encode_to_vec(&pb::HeaterReport {
        sensor_id: "h1".into(),
        ..Default::default()
    });
    reports.raw(Some("h1"), &stateless).await;
    let dead = TopicReader::new(&Topics::of(&app.config).dead_letters, 1);
    let letter = dead
        .next(Duration::from_secs(15))
        .await
        .expect("a dead letter");
    assert_eq!(
        header(&letter, "thermostat-dead-letter-reason").as_deref(),
        Some("missing_state")
    );
    assert_eq!(
        header(&letter, "thermostat-source-topic").as_deref(),
        Some(reports_topic.as_str())
    );
    reports.raw(Some("h1"), &report("h1", true)).await;
    let back = next_status(&mut watch).await;
    assert!(back.following);
    assert_eq!(
        flagged_metrics().await,
        [0.0, 1.0],
        "the flag cleared, counted once"
    );
    let repeat = commands.expect().await;
    assert_eq!(
        cmd(&repeat),
        (H::On, R::KeepAlive),
        "repeats again once it follows"
    );
    app.stop().await;
}
