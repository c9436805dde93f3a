#!/usr/bin/env bash
# The benchmarks: scripts/bench.sh
#
# Starts a throwaway PostgreSQL and Tansu (like scripts/test.sh), then runs the criterion
# benchmark of the decision function and the service benchmarks, which print markdown tables
# with their same-run baselines. Results are recorded by hand in BENCHMARKS.md.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# shellcheck source=scripts/throwaway.sh
source scripts/throwaway.sh

scripts/tansu.sh ensure >/dev/null
THERMOSTAT_BENCH_PG_URL=$(scripts/pg.sh start "$tmp/pg")
THERMOSTAT_BENCH_BROKERS=$(scripts/tansu.sh start "$tmp/tansu")
export THERMOSTAT_BENCH_PG_URL THERMOSTAT_BENCH_BROKERS

cargo bench --locked --bench decision -- --warm-up-time 1 --measurement-time 3
cargo bench --locked --bench service
