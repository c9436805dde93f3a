//! The fault suite (issue 21): two real `thermostat serve` processes in one consumer group on
//! the shared Tansu and PostgreSQL, keyed readings whose correct command stream is known in
//! advance, faults injected with signals, then a checker over the whole command topic.
//! Scenarios run one at a time: the machine has two cores and the staleness ones are timed.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use tokio_util::sync::CancellationToken;

use common::chaos::{
    self, check, cold, disagreements, transitions, Cluster, Expected, Load, Report, Rng,
};
use common::kafka::Sensors;
use common::{put, setpoint};
use thermostat::proto::v1 as pb;
use thermostat::proto::v1::{CommandReason, HeaterCommand};

/// Held by each scenario: one at a time (an async mutex: held across awaits, and not poisoned
/// by a failed scenario).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the cluster to go idle, checks the whole command topic and every live replica
/// against `expected`, and prints the scenario's one line.
async fn verify(
    name: &str,
    cluster: &Cluster,
    expected: &BTreeMap<String, Expected>,
    readings: usize,
) -> Report {
    cluster.wait_idle(Duration::from_secs(60)).await;
    let events = cluster.read_commands().await;
    let mut report = check(&events, expected);
    report.tally.readings = readings;
    let checked: BTreeMap<_, _> = report
        .last
        .iter()
        .filter(|(sensor, _)| expected.contains_key(*sensor))
        .map(|(sensor, last)| (sensor.clone(), *last))
        .collect();
    let (count, problems) = disagreements(cluster, &checked).await;
    report.tally.disagreements = count;
    report.problems.extend(problems);
    println!("chaos {name}: {}", report.tally);
    report
}

/// Fails unless the stream was right: no conflict, gap, mismatch, missing command,
/// disagreement or SENSOR_STALE command (no sensor here is silent for STALE_AFTER while it
/// could owe one). Duplicates are allowed.
fn assert_correct(name: &str, report: &Report) {
    let t = &report.tally;
    let wrong = t.conflicts + t.gaps + t.mismatches + t.missing + t.disagreements + t.stale;
    let why = match t.stale {
        0 => String::new(),
        n => format!(" ({n} SENSOR_STALE commands for sensors that never stopped reporting)"),
    };
    let problems: Vec<&str> = report
        .problems
        .iter()
        .take(30)
        .map(|p| p.as_str())
        .collect();
    assert!(
        wrong == 0,
        "chaos {name} FAILED{why}: {t}\nfirst problems:\n  {}",
        problems.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_rounds() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(2, &[]).await;
    // 40 sensors, 5 readings a second each: 200/s for 25 s.
    let load = Load::new("kill", 40, 125, Duration::from_millis(200));
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    let (producing, started) = (load.spawn(&cluster.topics.sensors), Instant::now());
    let mut rng = Rng::from_env();
    for round in 0..3 {
        let replica = &mut cluster.replicas[round % 2];
        tokio::time::sleep(rng.between(Duration::from_secs(2), Duration::from_secs(7))).await;
        replica.kill9();
        let killed = Instant::now();
        replica.restart();
        replica.wait_ready().await;
        println!(
            "chaos sigkill_rounds: round {round}: SIGKILL {} at {:.1} s of the load, ready {:.1} s later",
            replica.name,
            (killed - started).as_secs_f64(),
            killed.elapsed().as_secs_f64()
        );
    }
    producing.await.expect("load");
    println!(
        "chaos sigkill_rounds: the load took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let report = verify(
        "sigkill_rounds",
        &cluster,
        &load.expected(),
        load.readings(),
    )
    .await;
    assert_correct("sigkill_rounds", &report);
}

/// Flips the setpoints of `ids` between 15 and 25 °C, one Put every 150 ms through whichever
/// replica answers, until `stop`; returns how many Puts succeeded.
async fn change_setpoints(
    mut clients: Vec<pb::setpoint_service_client::SetpointServiceClient<tonic::transport::Channel>>,
    ids: Vec<String>,
    stop: CancellationToken,
) -> usize {
    let mut done = 0;
    for n in 0.. {
        if stop.is_cancelled() {
            break;
        }
        let id = &ids[n % ids.len()];
        let desired = if (n / ids.len()).is_multiple_of(2) {
            15.0
        } else {
            25.0
        };
        let replicas = clients.len();
        for i in 0..replicas {
            let client = &mut clients[(n + i) % replicas];
            if client
                .put_setpoint(put(setpoint(id, "hq", desired), None))
                .await
                .is_ok()
            {
                done += 1;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    done
}

/// What the churned sensors' heaters must end with, from their stored setpoints (a Put that
/// failed may still have been written): they read 20 °C, so ON at 25 °C and OFF at 15 °C.
async fn churned_expectations(cluster: &Cluster, ids: &[String]) -> BTreeMap<String, Expected> {
    let mut client = cluster.replicas[0].setpoints();
    let mut expected = BTreeMap::new();
    for id in ids {
        let stored = client
            .get_setpoint(pb::GetSetpointRequest {
                sensor_id: id.clone(),
            })
            .await
            .expect("get setpoint")
            .into_inner();
        let command = if stored.desired_celsius > 20.0 {
            HeaterCommand::On
        } else {
            HeaterCommand::Off
        };
        expected.insert(id.clone(), Expected::Last(command));
    }
    expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_with_setpoint_changes() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "rolling_restart_with_setpoint_changes";
    let mut cluster = Cluster::start(2, &[]).await;
    let load = Load::new("roll", 40, 125, Duration::from_millis(200));
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    // Other sensors, at a steady 20 °C, whose setpoints keep changing: ON at first.
    let churned: Vec<String> = (0..10).map(|i| format!("churn-{i:02}")).collect();
    cluster.put_setpoints(&churned, 25.0).await;
    let sensors = Sensors::new(&cluster.topics.sensors);
    for id in &churned {
        sensors.reading(id, 20.0, Utc::now()).await;
    }
    let stop = CancellationToken::new();
    let clients = cluster.replicas.iter().map(|r| r.setpoints()).collect();
    let changing = tokio::spawn(change_setpoints(clients, churned.clone(), stop.clone()));
    let (producing, started) = (load.spawn(&cluster.topics.sensors), Instant::now());
    let mut rng = Rng::from_env();
    for replica in &mut cluster.replicas {
        tokio::time::sleep(rng.between(Duration::from_secs(3), Duration::from_secs(9))).await;
        let at = started.elapsed().as_secs_f64();
        let status = replica.sigterm(Duration::from_secs(15)).await;
        println!(
            "chaos {name}: SIGTERM {} at {at:.1} s of the load: {status}",
            replica.name
        );
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM",
            replica.name
        );
        replica.restart();
        replica.wait_ready().await;
    }
    producing.await.expect("load");
    println!(
        "chaos {name}: the load took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    stop.cancel();
    let changes = changing.await.expect("setpoint changes");
    println!("chaos {name}: {changes} setpoint changes");
    let mut expected = load.expected();
    expected.extend(churned_expectations(&cluster, &churned).await);
    let readings = load.readings() + churned.len();
    let report = verify(name, &cluster, &expected, readings).await;
    assert_correct(name, &report);
}

/// Defect 3 of issue 21: a replica paused for longer than STALE_AFTER must not take the
/// readings waiting for it in the topic for silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_longer_than_stale_after() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "sigstop_longer_than_stale_after";
    let settings = [("STALE_AFTER", "4s"), ("STALE_CHECK_INTERVAL", "200ms")];
    let cluster = Cluster::start(2, &settings).await;
    // 12 sensors, one reading every 500 ms each for 18 s: they never stop reporting.
    let load = Load::new("pause", 12, 36, Duration::from_millis(500));
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    let producing = load.spawn(&cluster.topics.sensors);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let paused = &cluster.replicas[0];
    paused.sigstop();
    println!("chaos {name}: SIGSTOP {} for 8 s", paused.name);
    tokio::time::sleep(Duration::from_secs(8)).await;
    paused.sigcont();
    producing.await.expect("load");
    let report = verify(name, &cluster, &load.expected(), load.readings()).await;
    assert_correct(name, &report);
}

/// Defect 3 of issue 21: a gateway whose clock is a minute slow, reporting every 500 ms, is not
/// silent: its heater gets one ON, and only the last (hot) reading turns it OFF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_gateway_clock() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "slow_gateway_clock";
    let settings = [("STALE_AFTER", "4s"), ("STALE_CHECK_INTERVAL", "200ms")];
    let cluster = Cluster::start(2, &settings).await;
    let load = Load {
        skew: -TimeDelta::seconds(60),
        celsius: cold,
        ..Load::new("slow-clock", 1, 20, Duration::from_millis(500))
    };
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    load.spawn(&cluster.topics.sensors).await.expect("load");
    let report = verify(name, &cluster, &load.expected(), load.readings()).await;
    assert_correct(name, &report);
}

/// A process stopped with SIGSTOP until this is dropped, whatever happens meanwhile: a broker
/// left stopped would hang the rest of the suite.
struct Paused(String);

impl Paused {
    fn start(pid: &str) -> Self {
        signal("-STOP", pid);
        Self(pid.to_owned())
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        signal("-CONT", &self.0);
    }
}

fn signal(signal: &str, pid: &str) {
    let sent = std::process::Command::new("kill")
        .args([signal, pid])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill {signal} {pid}");
}

/// The shared broker stops answering for 10 s under load (SIGSTOP: connections stay open,
/// nothing moves) and comes back: nothing is lost, repeated differently or decided twice.
/// Scenarios run one at a time and no other test binary runs meanwhile, so pausing the broker
/// of the whole suite touches only this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_paused_under_load() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "broker_paused_under_load";
    let broker = common::env("THERMOSTAT_TEST_BROKER_PID");
    // Shorter than the pause: a broker that does not answer is no silence of the sensors.
    let settings = [("STALE_AFTER", "4s"), ("STALE_CHECK_INTERVAL", "200ms")];
    let cluster = Cluster::start(2, &settings).await;
    let load = Load::new("broker", 40, 100, Duration::from_millis(200));
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    let (producing, started) = (load.spawn(&cluster.topics.sensors), Instant::now());
    let mut rng = Rng::from_env();
    tokio::time::sleep(rng.between(Duration::from_secs(3), Duration::from_secs(8))).await;
    let at = started.elapsed().as_secs_f64();
    let paused = Paused::start(&broker);
    tokio::time::sleep(Duration::from_secs(10)).await;
    drop(paused);
    println!("chaos {name}: broker paused for 10 s at {at:.1} s of the load");
    producing.await.expect("load");
    let report = verify(name, &cluster, &load.expected(), load.readings()).await;
    assert_correct(name, &report);
}

/// Defect 2 of issue 21: a replica joins under load and takes partitions over. The old owners
/// stop deciding for them, and have their commands acknowledged, before it starts: no two
/// commands share a sequence, none is missing or repeated with another meaning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_under_load() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "scale_out_under_load";
    let mut cluster = Cluster::start(2, &[]).await;
    let load = Load::new("scale", 40, 100, Duration::from_millis(200));
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    let (producing, started) = (load.spawn(&cluster.topics.sensors), Instant::now());
    let mut rng = Rng::from_env();
    tokio::time::sleep(rng.between(Duration::from_secs(3), Duration::from_secs(8))).await;
    let at = started.elapsed().as_secs_f64();
    let joined = cluster.add_replica().await.name.clone();
    cluster.wait_settled().await;
    println!("chaos {name}: {joined} joined at {at:.1} s of the load");
    producing.await.expect("load");
    let report = verify(name, &cluster, &load.expected(), load.readings()).await;
    assert_correct(name, &report);
}

/// Defect 4 of issue 21: commands owed to setpoint changes, with every replica SIGKILLed 20 ms
/// after the last change, all arrive after the restart without a new reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owed_commands_survive_a_sigkill() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "owed_commands_survive_a_sigkill";
    // Commands wait a second in the producer, as behind a slow broker: the last ones are lost
    // (a batch is sent when full, so it must be able to hold more than one).
    let settings = [
        ("KAFKA_LINGER", "1s"),
        ("KAFKA_BATCH_NUM_MESSAGES", "10000"),
    ];
    let mut cluster = Cluster::start(2, &settings).await;
    // 200 sensors at 20 °C, in their band: no command, and their readings committed.
    let ids: Vec<String> = (0..200).map(|i| format!("owed-{i:03}")).collect();
    cluster.put_setpoints(&ids, chaos::DESIRED).await;
    let sensors = Sensors::new(&cluster.topics.sensors);
    for id in &ids {
        sensors.reading(id, 20.0, Utc::now()).await;
    }
    cluster.wait_idle(Duration::from_secs(60)).await;
    // 1,000 changes, five per sensor, all sensors at once, ending too warm for 20 °C (ON) or
    // too cold (OFF): many commands are still on their way when the replicas die.
    let mut changing = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let (mut client, id) = (cluster.replicas[i % 2].setpoints(), id.clone());
        changing.spawn(async move {
            for round in 0..5 {
                let desired = if (i + round) % 2 == 0 { 25.0 } else { 15.0 };
                client
                    .put_setpoint(put(setpoint(&id, chaos::BUILDING, desired), None))
                    .await
                    .expect("put setpoint");
            }
        });
    }
    changing.join_all().await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    for replica in &mut cluster.replicas {
        replica.kill9();
    }
    // The last change of sensor i is round 4: warm when i is even.
    let expected: BTreeMap<String, Expected> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let command = if i % 2 == 0 {
                HeaterCommand::On
            } else {
                HeaterCommand::Off
            };
            (id.clone(), Expected::Last(command))
        })
        .collect();
    let before = cluster.read_commands().await.len();
    println!("chaos {name}: SIGKILL 20 ms after 1000 setpoint changes, {before} commands by then");
    for replica in &mut cluster.replicas {
        replica.restart();
        replica.wait_ready().await;
    }
    // Nothing new comes: what is owed is decided once the partitions are taken back.
    cluster.wait_settled().await;
    let report = verify(name, &cluster, &expected, ids.len()).await;
    assert_correct(name, &report);
}

/// The checker itself: it must see each kind of wrong stream.
#[test]
fn the_checker_counts_conflicts_gaps_mismatches_missing_and_duplicates() {
    use HeaterCommand::{Off, On};
    let event = |sensor: &str, sequence: u64, command: HeaterCommand| pb::HeaterCommandEvent {
        sensor_id: sensor.into(),
        sequence,
        command: command as i32,
        reason: match command {
            On => CommandReason::TooCold,
            _ => CommandReason::TooHot,
        } as i32,
        ..Default::default()
    };
    let four = transitions([10.0, 30.0, 20.0, 10.0, 30.0]);
    let reasons = [CommandReason::TooCold, CommandReason::TooHot];
    assert_eq!(
        four,
        [
            (On, reasons[0]),
            (Off, reasons[1]),
            (On, reasons[0]),
            (Off, reasons[1])
        ]
    );
    let expected: BTreeMap<String, Expected> = ["right", "conflict", "gap", "mismatch", "short"]
        .into_iter()
        .map(|s| (s.to_owned(), Expected::Stream(four.clone())))
        .chain([("last".to_owned(), Expected::Last(On))])
        .collect();
    let events = vec![
        // Right, with a duplicate of sequence 2.
        event("right", 1, On),
        event("right", 2, Off),
        event("right", 2, Off),
        event("right", 3, On),
        event("right", 4, Off),
        // Sequence 2 twice, differently.
        event("conflict", 1, On),
        event("conflict", 2, Off),
        event("conflict", 2, On),
        event("conflict", 3, On),
        event("conflict", 4, Off),
        // Sequence 3 never came.
        event("gap", 1, On),
        event("gap", 2, Off),
        event("gap", 4, Off),
        // The third command is wrong.
        event("mismatch", 1, On),
        event("mismatch", 2, Off),
        event("mismatch", 3, Off),
        event("mismatch", 4, Off),
        // Only two of four.
        event("short", 1, On),
        event("short", 2, Off),
        // Ends OFF instead of ON, and repeats OFF.
        event("last", 1, On),
        event("last", 2, Off),
        event("last", 3, Off),
    ];
    let report = check(&events, &expected);
    let t = &report.tally;
    assert_eq!(
        (
            t.commands,
            t.duplicates,
            t.conflicts,
            t.gaps,
            t.mismatches,
            t.missing
        ),
        (events.len(), 1, 1, 1, 1 + 2, 2),
        "{t}\n{:#?}",
        report.problems
    );
    assert_eq!(report.last["right"], (4, Off));

    // The right command for the wrong reason: the fail-safe's OFF where a reading's was due.
    let mut stale = events[..5].to_vec();
    stale[4].reason = CommandReason::SensorStale as i32;
    let report = check(&stale, &expected);
    assert_eq!((report.tally.stale, report.tally.mismatches), (1, 1));
    // Sensors nothing is expected of are checked for conflicts and gaps only.
    let report = check(&events[..5], &BTreeMap::new());
    assert_eq!(report.tally.duplicates, 1);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
