//! The pure decision function (issue: benchmark 6): nanoseconds per reading with 10k and 1M
//! sensors cached, at a 1% and a 100% command-change rate, next to a same-run baseline that
//! only looks the sensor up in the same map (the cost of the join without the rule).
//!
//! Run: `cargo bench --bench decision`.
//!
//! One clock for every run over the same map: a reading older than the sensor's last is refused
//! as out of order, so a run that started its clock again after another would time refusals.
//! Before each timed run an untimed pass over the same map checks that the readings decide what
//! the label says (1% or 100% of them a command).

use std::cell::Cell;
use std::collections::HashMap;
use std::hint::black_box;

use chrono::{DateTime, TimeDelta, Utc};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use thermostat::domain::control::{Reading, ReadingOutcome, SensorControl};
use thermostat::domain::{BuildingId, Celsius, SensorId, Setpoint};

fn sensors(n: usize) -> (Vec<SensorId>, HashMap<SensorId, SensorControl>) {
    let building = BuildingId::parse("bench").expect("id");
    let start = DateTime::<Utc>::UNIX_EPOCH;
    let ids: Vec<SensorId> = (0..n)
        .map(|i| SensorId::parse(format!("bench/sensor-{i:07}")).expect("id"))
        .collect();
    let map = ids
        .iter()
        .map(|id| {
            let mut control = SensorControl::default();
            let setpoint = Setpoint::new(id.clone(), building.clone(), 20.0, 1.0, 1.0).expect("sp");
            control.apply_setpoint(1, Some(setpoint), start);
            (id.clone(), control)
        })
        .collect();
    (ids, map)
}

/// Reading `i` of a run over `n` sensors: sensor `i % n`, at time `i` seconds. Sensor `k` in
/// round `r = i / n` has phase `r + k`: one phase in `change_every` is a change (cold and hot in
/// turn, so the heater flips), the others are in the dead band. Every round thus changes one
/// sensor in `change_every`, spread over the round rather than a whole round of changes every
/// `change_every` rounds (which at 1M sensors and 1% left criterion's window without a change).
fn reading(i: u64, n: usize, change_every: u64) -> (usize, Reading) {
    let sensor = (i % n as u64) as usize;
    let phase = i / n as u64 + sensor as u64;
    let value = if !phase.is_multiple_of(change_every) {
        20.0
    } else if (phase / change_every).is_multiple_of(2) {
        10.0
    } else {
        30.0
    };
    let time = DateTime::<Utc>::UNIX_EPOCH + TimeDelta::seconds(i as i64);
    let reading = Reading {
        temperature: Celsius::new(value).expect("finite"),
        time,
        received: time,
    };
    (sensor, reading)
}

/// Decides reading `clock` (and moves the clock on); true if it made a command.
fn decide(
    clock: &Cell<u64>,
    ids: &[SensorId],
    map: &mut HashMap<SensorId, SensorControl>,
    change_every: u64,
) -> bool {
    let i = clock.get() + 1;
    clock.set(i);
    let (sensor, reading) = reading(i, ids.len(), change_every);
    let outcome = map.get_mut(&ids[sensor]).map(|c| c.on_reading(reading));
    matches!(outcome, Some(ReadingOutcome::Applied(Some(_))))
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("decision");
    group.throughput(Throughput::Elements(1));
    for n in [10_000usize, 1_000_000] {
        let (ids, mut map) = sensors(n);
        let mut i = 0u64;
        group.bench_with_input(BenchmarkId::new("baseline_lookup", n), &n, |b, _| {
            b.iter(|| {
                i += 1;
                let id = &ids[(i as usize) % n];
                black_box(map.get_mut(id).map(|c| c.revision()))
            })
        });
        let clock = Cell::new(0u64);
        for (label, change_every) in [("decide_1pct_change", 100u64), ("decide_100pct_change", 1)] {
            // Two rounds untimed: the first may find heaters already in the state a change
            // asks for (left by the run before); the second must decide the label's share.
            for _ in 0..n {
                decide(&clock, &ids, &mut map, change_every);
            }
            let commands = (0..n)
                .filter(|_| decide(&clock, &ids, &mut map, change_every))
                .count() as u64;
            let expected = n as u64 / change_every;
            assert!(
                commands.abs_diff(expected) <= 1,
                "{label} at {n}: {commands} commands in {n} readings, not {expected}"
            );
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| black_box(decide(&clock, &ids, &mut map, change_every)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
