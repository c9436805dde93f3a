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

/// Gives `load`'s sensors their setpoints, starts it, and returns it with how many seconds into
/// it the fault comes, a seeded random 3 to 8 (`CHAOS_SEED`).
async fn load_until_fault(cluster: &Cluster, load: &Load) -> (tokio::task::JoinHandle<()>, f64) {
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    let (producing, started) = (load.spawn(&cluster.topics.sensors), Instant::now());
    let mut rng = Rng::from_env();
    tokio::time::sleep(rng.between(Duration::from_secs(3), Duration::from_secs(8))).await;
    (producing, started.elapsed().as_secs_f64())
}

/// Waits for `load` to be produced, then checks the cluster against what it must give. (Locals
/// drop in reverse order: a scenario's cluster stops before the mock broker it runs on.)
async fn load_done_and_correct(
    name: &str,
    cluster: &Cluster,
    load: &Load,
    producing: tokio::task::JoinHandle<()>,
) {
    producing.await.expect("load");
    let report = verify(name, cluster, &load.expected(), load.readings()).await;
    assert_correct(name, &report);
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
        let unbacked = cluster.committed_without_command(&load.expected()).await;
        assert!(
            unbacked.is_empty(),
            "chaos sigkill_rounds: committed offsets passed readings whose commands are missing: {unbacked:?}"
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
    let churned = cluster.steady_sensors("churn", 10, 25.0).await;
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
    load_done_and_correct(name, &cluster, &load, producing).await;
}

/// Defect 2 of issue 21, the zombie: a replica SIGSTOPped under load for longer than the group's
/// session timeout, so that the group hands its partitions to the other replica, then SIGCONTed
/// while setpoints change. Once it runs again it must not decide for those partitions (on the
/// changes it finds waiting, with the commands it knew before the pause) before librdkafka tells
/// it they are gone. On librdkafka's mock cluster: Tansu 0.6 gives an expired member's
/// partitions to nobody, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_past_the_session_timeout() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "sigstop_past_the_session_timeout";
    let broker = chaos::MockBroker::start();
    let settings = [chaos::ON_MOCK, ("KAFKA_SESSION_TIMEOUT", "6s")];
    let cluster = Cluster::start_on(broker.topics(), 2, &settings).await;
    let load = Load::new("zombie", 40, 125, Duration::from_millis(200));
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    // Sensors at a steady 20 °C whose setpoints flip through the other replica meanwhile.
    let churned = cluster.steady_sensors("churn", 40, 25.0).await;
    let stop = CancellationToken::new();
    let clients = vec![cluster.replicas[1].setpoints()];
    let changing = tokio::spawn(change_setpoints(clients, churned.clone(), stop.clone()));
    let (producing, started) = (load.spawn(&cluster.topics.sensors), Instant::now());
    let mut rng = Rng::from_env();
    tokio::time::sleep(rng.between(Duration::from_secs(3), Duration::from_secs(8))).await;
    let at = started.elapsed().as_secs_f64();
    let paused = &cluster.replicas[0];
    paused.sigstop();
    tokio::time::sleep(Duration::from_secs(12)).await;
    paused.sigcont();
    println!(
        "chaos {name}: SIGSTOP {} for 12 s at {at:.1} s of the load",
        paused.name
    );
    producing.await.expect("load");
    stop.cancel();
    let changes = changing.await.expect("setpoint changes");
    println!("chaos {name}: {changes} setpoint changes");
    let mut expected = load.expected();
    expected.extend(churned_expectations(&cluster, &churned).await);
    let readings = load.readings() + churned.len();
    let report = verify(name, &cluster, &expected, readings).await;
    assert_correct(name, &report);
}

/// Defect 5 of issue 21: 375 MiB of 64 KiB bad records flood the sensor topic, fetched faster
/// than their dead letters can be produced (the service writes one record per produce request
/// on Tansu). The producer holds at most 32 MiB, so the replica's memory stays bounded, and the
/// readings among the bad records are still decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_flood() {
    const FLOOD: usize = 6000;
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "dead_letter_flood";
    let cluster = Cluster::start(1, &[]).await;
    let load = Load::new("flood", 20, 50, Duration::from_millis(200));
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    let base = cluster.replicas[0].rss_bytes().expect("rss");
    let producing = load.spawn(&cluster.topics.sensors);
    let sensors = Sensors::new(&cluster.topics.sensors);
    // Not readings: each is dead-lettered whole.
    let flooding = sensors.flood("flood-bad", &[0xff; 64 * 1024], FLOOD);
    let mut peak = base;
    let watching = async {
        loop {
            peak = peak.max(cluster.replicas[0].rss_bytes().unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = async { tokio::join!(flooding, producing) } => {}
        _ = watching => unreachable!(),
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        peak = peak.max(cluster.replicas[0].rss_bytes().unwrap_or(0));
        let topic = cluster.topics.dead_letters.clone();
        let arrived = tokio::task::spawn_blocking(move || chaos::watermark_total_of(&topic, 1))
            .await
            .expect("watermarks");
        if arrived >= FLOOD as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{arrived} of {FLOOD} dead letters arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "chaos {name}: 375 MiB of dead letters; RSS {:.0} MiB at the start, peak {:.0} MiB",
        mib(base),
        mib(peak)
    );
    let report = verify(name, &cluster, &load.expected(), load.readings()).await;
    assert_correct(name, &report);
    // 32 MiB of produce queue and 16 MiB of prefetch above the start, with room for the
    // allocator (71 MiB above it with 250 MiB of flood; 124 MiB without the byte bound).
    assert!(
        peak < base + (96 << 20),
        "peak RSS {:.0} MiB, {:.0} MiB above the start",
        mib(peak),
        mib(peak - base)
    );
}

/// Defect 5 of issue 21: a replica takes over partitions while a command partition has no
/// reachable leader (librdkafka's mock cluster: the partition's broker is down; a partition set
/// leaderless crashes the mock). Its wait for the command topic is bounded and visible:
/// `thermostat.v1.HeaterControlService` reports NOT_SERVING while it lasts; the replica keeps
/// running, and once the leader is back everything owed is decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_partition_without_leader_during_a_takeover() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "command_partition_without_leader_during_a_takeover";
    let broker = chaos::MockBroker::with_brokers(2);
    let topics = broker.topics();
    broker
        .0
        .partition_leader(&topics.commands, 0, Some(2))
        .expect("leader");
    // A static member's partitions move once its session times out.
    let settings = [chaos::ON_MOCK, ("KAFKA_SESSION_TIMEOUT", "6s")];
    let mut cluster = Cluster::start_on(topics, 2, &settings).await;
    let load = Load::new("leaderless", 20, 100, Duration::from_millis(200));
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    let producing = load.spawn(&cluster.topics.sensors);
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.0.broker_down(2).expect("broker 2 down");
    let status = cluster.replicas[1].sigterm(Duration::from_secs(30)).await;
    assert!(status.success(), "replica-1 exited with {status}");
    let service = "thermostat.v1.HeaterControlService";
    let survivor = &cluster.replicas[0];
    let reported = common::eventually(Duration::from_secs(30), || async {
        !survivor.serves(service).await
    })
    .await;
    broker.0.broker_up(2).expect("broker 2 up");
    println!("chaos {name}: command partition 0 unreachable during the takeover; NOT_SERVING reported: {reported}");
    assert!(
        reported,
        "{service} never reported NOT_SERVING while the wait lasted"
    );
    assert!(survivor.is_up(), "the replica stopped");
    let back = common::eventually(Duration::from_secs(30), || survivor.serves(service)).await;
    assert!(
        back,
        "{service} not SERVING again once the leader came back"
    );
    load_done_and_correct(name, &cluster, &load, producing).await;
}

/// The broker goes away under load and comes back 3 s later with what it had acknowledged:
/// librdkafka's mock cluster cuts every connection and refuses new ones meanwhile. (A real
/// broker process killed and restarted needs durable storage; Tansu 0.6's PostgreSQL storage
/// needs PostgreSQL 16, and this machine's is 15.) Replicas and gateways reconnect, and nothing
/// is lost, repeated differently or decided twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_and_back_under_load() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "broker_down_and_back_under_load";
    let broker = chaos::MockBroker::start();
    let cluster = Cluster::start_on(broker.topics(), 2, &[chaos::ON_MOCK]).await;
    let load = Load::new("down", 40, 100, Duration::from_millis(200));
    let (producing, at) = load_until_fault(&cluster, &load).await;
    broker.0.broker_down(1).expect("broker down");
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.0.broker_up(1).expect("broker up");
    println!("chaos {name}: broker down for 3 s at {at:.1} s of the load");
    load_done_and_correct(name, &cluster, &load, producing).await;
}

/// Defect 3 of issue 21: consumer lag longer than `STALE_AFTER`. Every replica is stopped under
/// load for more than twice `STALE_AFTER`; once back, the readings that waited in the topic are
/// no silence: no SENSOR_STALE command, and every command the rule gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_longer_than_stale_after() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "lag_longer_than_stale_after";
    let settings = [("STALE_AFTER", "3s"), ("STALE_CHECK_INTERVAL", "200ms")];
    let mut cluster = Cluster::start(2, &settings).await;
    let load = Load::new("lag", 20, 75, Duration::from_millis(200));
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    let producing = load.spawn(&cluster.topics.sensors);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for replica in &mut cluster.replicas {
        let status = replica.sigterm(Duration::from_secs(15)).await;
        assert!(status.success(), "{} exited with {status}", replica.name);
    }
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_secs(7)).await;
    for replica in &mut cluster.replicas {
        replica.restart();
    }
    for replica in &mut cluster.replicas {
        replica.wait_ready().await;
    }
    let lag = stopped.elapsed().as_secs_f64();
    println!("chaos {name}: every replica down for {lag:.1} s under load (STALE_AFTER 3 s)");
    load_done_and_correct(name, &cluster, &load, producing).await;
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
    let (producing, at) = load_until_fault(&cluster, &load).await;
    let paused = Paused::start(&broker);
    tokio::time::sleep(Duration::from_secs(10)).await;
    drop(paused);
    println!("chaos {name}: broker paused for 10 s at {at:.1} s of the load");
    load_done_and_correct(name, &cluster, &load, producing).await;
}

/// The shared broker SIGSTOPped for 8 s, longer than the producer's message timeout (4 s here),
/// with setpoint changes right after the pause began: the commands they owe time out, so the
/// replicas stop with an error, and are restarted as Kubernetes would. After the restarts every
/// command is there, none conflicting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_paused_past_the_message_timeout() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "broker_paused_past_the_message_timeout";
    let broker = common::env("THERMOSTAT_TEST_BROKER_PID");
    let settings = [("KAFKA_MESSAGE_TIMEOUT", "4s")];
    let mut cluster = Cluster::start(2, &settings).await;
    let load = Load::new("timeout", 40, 100, Duration::from_millis(200));
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    // Sensors at a steady 20 °C, ON at 25 °C: changed to 15 °C during the pause, they owe OFF.
    let changed = cluster.steady_sensors("owing", 10, 25.0).await;
    let producing = load.spawn(&cluster.topics.sensors);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let paused = Paused::start(&broker);
    for (i, id) in changed.iter().enumerate() {
        let mut client = cluster.replicas[i % 2].setpoints();
        let change = put(setpoint(id, chaos::BUILDING, 15.0), None);
        client.put_setpoint(change).await.expect("put setpoint");
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    drop(paused);
    // A replica whose commands timed out stops: restart it, as Kubernetes would.
    let mut restarts = 0;
    let watch_until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < watch_until {
        for replica in &mut cluster.replicas {
            if replica.exited() {
                restarts += 1;
                replica.restart();
                replica.wait_ready().await;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    producing.await.expect("load");
    println!("chaos {name}: broker paused 8 s past a 4 s message timeout; {restarts} restarts");
    assert!(restarts > 0, "no replica stopped: no command timed out");
    let mut expected = load.expected();
    expected.extend(
        changed
            .iter()
            .map(|id| (id.clone(), Expected::Last(HeaterCommand::Off))),
    );
    let readings = load.readings() + changed.len();
    let report = verify(name, &cluster, &expected, readings).await;
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
    let (producing, at) = load_until_fault(&cluster, &load).await;
    let joined = cluster.add_replica().await.name.clone();
    cluster.wait_settled().await;
    println!("chaos {name}: {joined} joined at {at:.1} s of the load");
    load_done_and_correct(name, &cluster, &load, producing).await;
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
    let ids = cluster.steady_sensors("owed", 200, chaos::DESIRED).await;
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

/// What happens to the replicas in the middle of the heaters' holds.
enum HoldFault {
    /// Every replica SIGKILLed, then started again.
    KillAll,
    /// A third replica joins: partitions, and their sensors' holds, move to it.
    ScaleOut,
}

/// Issue 26 through the real binary: heaters switched ON with a minimum on time, `fault` in the
/// middle of the hold, and readings that want them OFF meanwhile. The replicas deciding after
/// it hold each OFF until the hold, which counts from the ON's own time, ends, then send it
/// without another reading.
async fn holds_across(name: &str, fault: HoldFault, sensors: usize) {
    const MIN_ON: i64 = 20;
    let min_on = format!("{MIN_ON}s");
    let mut cluster = Cluster::start(2, &[("MIN_ON_TIME", &min_on)]).await;
    let ids: Vec<String> = (0..sensors).map(|i| format!("held-{i:02}")).collect();
    cluster.put_setpoints(&ids, chaos::DESIRED).await;
    let topic = Sensors::new(&cluster.topics.sensors);
    for id in &ids {
        topic.reading(id, chaos::DESIRED - 2.0, Utc::now()).await;
    }
    let ons = loop {
        let events = cluster.read_commands().await;
        if events.len() >= ids.len() {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let hold_ends: BTreeMap<String, chrono::DateTime<Utc>> = ons
        .iter()
        .map(|on| {
            assert_eq!(
                (on.command(), on.reason()),
                (HeaterCommand::On, CommandReason::TooCold)
            );
            (
                on.sensor_id.clone(),
                decided_at(on) + TimeDelta::seconds(MIN_ON),
            )
        })
        .collect();
    match fault {
        HoldFault::KillAll => {
            for replica in &mut cluster.replicas {
                replica.kill9();
            }
            for id in &ids {
                topic.reading(id, chaos::DESIRED + 2.0, Utc::now()).await;
            }
            for replica in &mut cluster.replicas {
                replica.restart();
                replica.wait_ready().await;
            }
        }
        HoldFault::ScaleOut => {
            cluster.add_replica().await;
            cluster.wait_settled().await;
            for id in &ids {
                topic.reading(id, chaos::DESIRED + 2.0, Utc::now()).await;
            }
        }
    }
    let first_end = *hold_ends.values().min().expect("sensors");
    let back = Utc::now();
    assert!(
        back + TimeDelta::seconds(3) < first_end,
        "chaos {name}: the fault took the whole hold: nothing left to check"
    );
    let last_end = *hold_ends.values().max().expect("sensors");
    tokio::time::sleep(
        (last_end - Utc::now() + TimeDelta::seconds(5))
            .to_std()
            .unwrap(),
    )
    .await;
    let mut late = TimeDelta::zero();
    let written = cluster.read_commands().await;
    for id in &ids {
        let mut events: Vec<_> = written.iter().collect();
        events.retain(|e| &e.sensor_id == id && e.command() == HeaterCommand::Off);
        events.dedup_by_key(|e| e.sequence);
        let [off] = events.as_slice() else {
            panic!("chaos {name}: {id}: one OFF: {events:?}");
        };
        assert_eq!(
            off.reason(),
            CommandReason::DeferredTooHot,
            "chaos {name}: {id}"
        );
        let (at, end) = (decided_at(off), hold_ends[id]);
        assert!(
            at >= end && at - end < TimeDelta::seconds(3),
            "chaos {name}: {id}: the OFF at the hold's end, not inside it: {at} against {end}"
        );
        late = late.max(at - end);
    }
    println!(
        "chaos {name}: back {:.1} s before the first hold's end; every OFF at most {} ms after its hold's end",
        (first_end - back).as_seconds_f64(),
        late.num_milliseconds()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_inside_a_minimum_on_time() {
    let _serial = ONE_AT_A_TIME.lock().await;
    holds_across("sigkill_inside_a_minimum_on_time", HoldFault::KillAll, 1).await;
}

/// The holds of the sensors whose partitions move to a new replica are kept there (24 sensors
/// over 4 partitions: the odds that none is on a partition that moves are about 0.1%).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_out_inside_a_minimum_on_time() {
    let _serial = ONE_AT_A_TIME.lock().await;
    holds_across(
        "scale_out_inside_a_minimum_on_time",
        HoldFault::ScaleOut,
        24,
    )
    .await;
}

fn decided_at(e: &pb::HeaterCommandEvent) -> chrono::DateTime<Utc> {
    thermostat::proto::from_timestamp(e.decided_at.as_ref().expect("decided_at")).expect("a time")
}

/// Defect 1 of issue 21: the command topic loses every record (deleted and created again while
/// the replica is down). After the restart each sensor's commands still carry sequences above
/// every one it had, although the replica cannot read them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_topic_lost() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "command_topic_lost";
    let mut cluster = Cluster::start(1, &[]).await;
    let load = Load::new("lost", 20, 6, Duration::from_millis(100));
    cluster.put_setpoints(&load.ids, chaos::DESIRED).await;
    load.spawn(&cluster.topics.sensors).await.expect("load");
    let before = verify(name, &cluster, &load.expected(), load.readings()).await;
    assert_correct(name, &before);

    cluster.replicas[0].sigterm(Duration::from_secs(30)).await;
    common::kafka::recreate_topic(&cluster.topics.commands, cluster.topics.partitions).await;
    cluster.replicas[0].restart();
    cluster.replicas[0].wait_ready().await;
    cluster.wait_settled().await;
    // The restarted replica owes each sensor the OFF of its last (hot) reading, then decides
    // on new readings; it knows none of the earlier commands.
    load.spawn(&cluster.topics.sensors).await.expect("load");
    let ended: BTreeMap<String, Expected> = (load.ids.iter())
        .map(|id| (id.clone(), Expected::Last(HeaterCommand::Off)))
        .collect();
    let after = verify(name, &cluster, &ended, load.readings()).await;
    assert_correct(name, &after);
    let events = cluster.read_commands().await;
    let reused: Vec<String> = events
        .iter()
        .filter(|e| e.sequence <= before.last[&e.sensor_id].0)
        .map(|e| format!("{}: sequence {} again", e.sensor_id, e.sequence))
        .collect();
    assert!(
        reused.is_empty(),
        "chaos {name}: sequences issued again after the topic was lost: {reused:?}"
    );
}

/// Per sensor the last acknowledged revision and desired temperature; Puts acknowledged, failed.
type PutOutcomes = (BTreeMap<String, (i64, f64)>, usize, usize);

/// Puts to `ids` until `stop`, one sensor at a time each, through every replica in turn;
/// returns each sensor's last acknowledged revision and desired temperature, and how many Puts
/// were acknowledged and failed.
fn spawn_puts(
    cluster: &Cluster,
    ids: &[String],
    stop: CancellationToken,
) -> tokio::task::JoinHandle<PutOutcomes> {
    let clients: Vec<_> = cluster.live().map(|r| r.setpoints()).collect();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let (mut clients, id, stop) = (clients.clone(), id.clone(), stop.clone());
        tasks.spawn(async move {
            let (mut last, mut acked, mut failed) = (None, 0, 0);
            for round in 0.. {
                if stop.is_cancelled() {
                    break;
                }
                let desired = 15.0 + ((i + round) % 10) as f64;
                let n = clients.len();
                let client = &mut clients[round % n];
                match client
                    .put_setpoint(put(setpoint(&id, chaos::BUILDING, desired), None))
                    .await
                {
                    Ok(stored) => {
                        acked += 1;
                        last = Some((stored.into_inner().revision, desired));
                    }
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (id, last, acked, failed)
        });
    }
    tokio::spawn(async move {
        let (mut last, mut acked, mut failed) = (BTreeMap::new(), 0, 0);
        for (id, l, a, f) in tasks.join_all().await {
            if let Some(l) = l {
                last.insert(id, l);
            }
            (acked, failed) = (acked + a, failed + f);
        }
        (last, acked, failed)
    })
}

/// Each sensor's setpoint revision and desired temperature as the database holds them.
async fn stored_setpoints(database_url: &str) -> BTreeMap<String, (i64, f64)> {
    use sqlx::{Connection, Row};
    let mut db = sqlx::PgConnection::connect(database_url)
        .await
        .expect("connect");
    sqlx::query("SELECT sensor_id, revision, desired_celsius FROM setpoints")
        .fetch_all(&mut db)
        .await
        .expect("setpoints")
        .into_iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect()
}

/// Sensors whose setpoint revision some live replica does not report as `stored` within
/// `timeout`.
async fn unsynced(
    cluster: &Cluster,
    stored: &BTreeMap<String, (i64, f64)>,
    timeout: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut behind = Vec::new();
        for replica in cluster.live() {
            let mut heaters = replica.heaters();
            for (id, &(revision, _)) in stored {
                let state = heaters.get_sensor_state(chaos::state_request(id)).await;
                let cached = state
                    .ok()
                    .and_then(|s| s.into_inner().setpoint)
                    .map(|s| s.revision);
                if cached != Some(revision) {
                    behind.push(format!(
                        "{}: {id} at {cached:?}, not {revision}",
                        replica.name
                    ));
                }
            }
        }
        if behind.is_empty() || Instant::now() > deadline {
            return behind;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Defect 6 of issue 21 and the database's faults: PostgreSQL restarted while Puts run, then
/// every replica's LISTEN connection cut, with the full re-read an hour away. No acknowledged
/// Put is lost, and every replica matches the database within seconds of each fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_puts() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let name = "postgres_restarted_under_puts";
    let pg_dir = common::env("THERMOSTAT_TEST_PG_DIR");
    let cluster = Cluster::start(2, &[("SETPOINT_RESYNC_INTERVAL", "1h")]).await;
    let ids: Vec<String> = (0..20).map(|i| format!("pg-{i:02}")).collect();
    cluster.put_setpoints(&ids, chaos::DESIRED).await;
    let stop = CancellationToken::new();
    let puts = spawn_puts(&cluster, &ids, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pg = |action: &str| {
        let status = std::process::Command::new("scripts/pg.sh")
            .args([action, pg_dir.as_str()])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("scripts/pg.sh");
        assert!(status.success(), "scripts/pg.sh {action} failed");
    };
    pg("stop");
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg("start");
    // Every replica's listener, once two are seen listening on two samples 0.5 s apart (a
    // listener being replaced can show for a moment beside its successor). Bounded: a replica
    // that never listens again fails the count below.
    let cut: i64 = {
        use sqlx::Connection;
        let mut db = sqlx::PgConnection::connect(cluster.database_url())
            .await
            .expect("connect");
        let listeners = "FROM pg_stat_activity \
                         WHERE datname = current_database() AND query ILIKE 'LISTEN%'";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut steady = 0;
        while steady < 2 && tokio::time::Instant::now() < deadline {
            let listening: i64 = sqlx::query_scalar(&format!("SELECT count(*) {listeners}"))
                .fetch_one(&mut db)
                .await
                .expect("count listeners");
            steady = if listening == 2 { steady + 1 } else { 0 };
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        sqlx::query_scalar(&format!(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) {listeners}) cut"
        ))
        .fetch_one(&mut db)
        .await
        .expect("terminate listeners")
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.cancel();
    let (acked, ok, failed) = puts.await.expect("puts");
    let stored = stored_setpoints(cluster.database_url()).await;
    let lost: Vec<String> = acked
        .iter()
        .filter(|(id, &(revision, desired))| {
            stored
                .get(*id)
                .is_none_or(|&(r, d)| r < revision || (r == revision && d != desired))
        })
        .map(|(id, acked)| format!("{id}: acknowledged {acked:?}, stored {:?}", stored.get(id)))
        .collect();
    let behind = unsynced(&cluster, &stored, Duration::from_secs(10)).await;
    println!(
        "chaos {name}: puts acknowledged={ok} failed={failed} listeners cut={cut} \
         lost={} replicas behind the database={}",
        lost.len(),
        behind.len()
    );
    assert!(
        failed > 0,
        "the restart failed no Put: it did not happen while they ran"
    );
    assert_eq!(cut, 2, "one listener per replica");
    assert!(lost.is_empty(), "acknowledged Puts lost: {lost:?}");
    assert!(
        behind.is_empty(),
        "replicas behind the database after 10 s: {behind:?}"
    );
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
    let streams = [
        "right",
        "floored",
        "conflict",
        "gap",
        "mismatch",
        "short",
        "first-lost",
    ];
    let expected: BTreeMap<String, Expected> = streams
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
        // Right, numbered above a sequence floor.
        event("floored", 1001, On),
        event("floored", 1002, Off),
        event("floored", 1003, On),
        event("floored", 1004, Off),
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
        // Above a floor, and the first command never came: every position is off by one.
        event("first-lost", 1002, Off),
        event("first-lost", 1003, On),
        event("first-lost", 1004, Off),
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
        (events.len(), 1, 1, 1, 1 + 2 + 3, 2 + 1),
        "{t}\n{:#?}",
        report.problems
    );
    assert_eq!(report.last["right"], (4, Off));
    assert_eq!(report.last["floored"], (1004, Off));

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
