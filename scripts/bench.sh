#!/usr/bin/env bash
# The benchmarks: scripts/bench.sh
#
# Starts a throwaway PostgreSQL and Tansu (like scripts/test.sh), then runs the criterion
# benchmark of the decision function and the service and pipeline benchmarks, which print
# markdown tables with their same-run baselines, and ends with one summary table of every goal.
# Results are recorded by hand in BENCHMARKS.md.
#
# For a quick trial (never for the recorded run):
# THERMOSTAT_BENCH_ONLY=put|memory|100%|1%|'100% batched'|'1% batched'|latency|scaling runs one
# part;
# THERMOSTAT_BENCH_SENSORS, _DRAIN and _REPS shrink benchmark 1's cache, drains and
# repetitions (_DRAIN at most _SENSORS: every drained sensor needs a setpoint);
# THERMOSTAT_BENCH_LATENCY_RATE runs benchmark 2 at that many readings/s instead of the rate
# found with the relay; THERMOSTAT_BENCH_BROKER=tansu|mock runs benchmarks 1 and 2 on one
# broker only (by default on Tansu, then on librdkafka's mock cluster).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# shellcheck source=scripts/throwaway.sh
source scripts/throwaway.sh

scripts/tansu.sh ensure >/dev/null
THERMOSTAT_BENCH_PG_URL=$(scripts/pg.sh start "$tmp/pg")
THERMOSTAT_BENCH_BROKERS=$(scripts/tansu.sh start "$tmp/tansu")
# The broker's CPU time is recorded next to the service's and the baselines'.
THERMOSTAT_BENCH_BROKER_PID=$(cat "$tmp/tansu/pid")
# Each benchmark appends its rows of the summary table here.
THERMOSTAT_BENCH_SUMMARY="$tmp/summary.md"
export THERMOSTAT_BENCH_PG_URL THERMOSTAT_BENCH_BROKERS THERMOSTAT_BENCH_BROKER_PID THERMOSTAT_BENCH_SUMMARY
: >"$THERMOSTAT_BENCH_SUMMARY"

cargo bench --locked --bench decision -- --warm-up-time 1 --measurement-time 3
cargo bench --locked --bench service
cargo bench --locked --bench pipeline

echo
echo "## Summary (medians; every baseline measured in the same run)"
echo
echo "| # | measurement | thermostat | baseline | ratio | goal |"
echo "|---|---|---|---|---|---|"
cat "$THERMOSTAT_BENCH_SUMMARY"
