#!/usr/bin/env bash
# The benchmarks: scripts/bench.sh
#
# Starts a throwaway PostgreSQL and Tansu (like scripts/test.sh), then runs the criterion
# benchmark of the decision function and the service benchmarks, which print markdown tables
# with their same-run baselines. Results are recorded by hand in BENCHMARKS.md.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

tmp=$(mktemp -d -t thermostat-bench.XXXXXX)
cleanup() {
  local rc=$?
  trap - EXIT
  scripts/tansu.sh stop "$tmp/tansu" || true
  scripts/pg.sh stop "$tmp/pg" || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

scripts/tansu.sh ensure >/dev/null
THERMOSTAT_BENCH_PG_URL=$(scripts/pg.sh start "$tmp/pg")
THERMOSTAT_BENCH_BROKERS=$(scripts/tansu.sh start "$tmp/tansu")
export THERMOSTAT_BENCH_PG_URL THERMOSTAT_BENCH_BROKERS

cargo bench --locked --bench decision -- --warm-up-time 1 --measurement-time 3
cargo bench --locked --bench service
