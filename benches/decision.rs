//! The pure decision function (issue: benchmark 6): nanoseconds per reading with 10k and 1M
//! sensors cached, at a 1% and a 100% command-change rate, next to a same-run baseline that
//! only looks the sensor up in the same map (the cost of the join without the rule).
//!
//! Run: `cargo bench --bench decision`.

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

/// The temperature of reading `i`: with `change_every` = 1 every reading flips the heater; with
/// 100, one in a hundred does and the rest stay in the dead band.
fn temperature(i: u64, change_every: u64) -> Celsius {
    let value = if !i.is_multiple_of(change_every) {
        20.0
    } else if (i / change_every).is_multiple_of(2) {
        10.0
    } else {
        30.0
    };
    Celsius::new(value).expect("finite")
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
        for (label, change_every) in [("decide_1pct_change", 100u64), ("decide_100pct_change", 1)] {
            let mut i = 0u64;
            group.bench_with_input(BenchmarkId::new(label, n), &n, |b, _| {
                b.iter(|| {
                    i += 1;
                    // Each sensor sees every n-th reading, so per sensor the pattern repeats
                    // with period change_every * n; time only moves forward.
                    let round = i / n as u64;
                    let id = &ids[(i as usize) % n];
                    let reading = Reading {
                        temperature: temperature(round, change_every),
                        time: DateTime::<Utc>::UNIX_EPOCH + TimeDelta::seconds(i as i64),
                    };
                    let outcome = map.get_mut(id).map(|c| c.on_reading(reading));
                    black_box(matches!(outcome, Some(ReadingOutcome::Applied(Some(_)))))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
