//! A sensor partition held by a group member that consumes nothing shows in every replica's
//! group lag. Alone in its test binary because `thermostat_group_lag_records` is one gauge per
//! process, which every service started in the same binary writes for its own topic.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::kafka::{Sensors, Topics};
use common::{eventually, TestApp};
use rdkafka::consumer::{BaseConsumer, Consumer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_partition_held_by_a_member_that_never_commits_shows_in_the_group_lag() {
    let config = TestApp::fresh_config().await; // two sensor partitions
    let topics = Topics::of(&config);
    // A member of the group that takes a partition, reads it and never commits: what a member
    // that died without leaving looks like from the group's offsets.
    let stuck: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", common::kafka::brokers())
        .set("group.id", &topics.group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .expect("consumer");
    stuck.subscribe(&[&topics.sensors]).expect("subscribe");
    let done = Arc::new(AtomicBool::new(false));
    // The stuck member's partitions as of its last poll, read when the lags are.
    let held = Arc::new(Mutex::new(Vec::<i32>::new()));
    let polling = {
        let (done, held) = (done.clone(), held.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let _ = stuck.poll(Duration::from_millis(100));
                let now = stuck.assignment().expect("assignment");
                *held.lock().unwrap() = now.elements().iter().map(|e| e.partition()).collect();
            }
            // Dropped, it would leave the group, which Tansu 0.6 never lets it finish.
            std::mem::forget(stuck);
        })
    };
    let app = TestApp::spawn_with(config).await;
    let shared = eventually(Duration::from_secs(60), || async {
        app.control.stats().assigned_partitions() == 1
    })
    .await;
    assert!(
        shared,
        "the service and the stuck member share the partitions"
    );

    let sensors = Sensors::new(&topics.sensors);
    for i in 0..20 {
        sensors
            .reading(&format!("lag-{i}"), 20.0, chrono::Utc::now())
            .await;
    }
    let lags = || async {
        let (_, metrics) = common::http_get(app.admin, "/metrics").await;
        let lag = |p: i32| {
            let series = format!("thermostat_group_lag_records{{partition=\"{p}\"}}");
            common::sample(&metrics, &series)
        };
        ([lag(0), lag(1)], held.lock().unwrap().clone())
    };
    // The stuck member's partition falls behind; the service's is committed to its end. Which
    // is which is read with each sample: a sample taken while the readings were still being
    // sent, before the service's commit, shows the service's partition behind instead.
    let behind_only_where_stuck = |(seen, held): &([f64; 2], Vec<i32>)| match held.as_slice() {
        [p] => seen[*p as usize] > 0.0 && seen[1 - *p as usize] == 0.0,
        _ => false,
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut seen = lags().await;
    while !behind_only_where_stuck(&seen) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        seen = lags().await;
    }
    done.store(true, Ordering::Relaxed);
    polling.join().expect("stuck member");
    assert!(
        behind_only_where_stuck(&seen),
        "group lag by partition and the stuck member's partitions: {seen:?}"
    );
    app.stop().await;
}
