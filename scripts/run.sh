#!/usr/bin/env bash
# The main job: build thermostat, give it a throwaway PostgreSQL database and a
# broker (Tansu if installed, else an embedded mock), and run `thermostat demo`:
# the service on $GRPC_ADDR as the thermostat of a simulated building, with a
# plot of the rooms in target/thermostat-demo.svg. Ctrl-C stops everything.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# Loopback only: a demo has no business on the network (the service's defaults are 0.0.0.0).
export GRPC_ADDR=${GRPC_ADDR:-127.0.0.1:50051}
export HEALTH_ADDR=${HEALTH_ADDR:-127.0.0.1:50052}
export ADMIN_ADDR=${ADMIN_ADDR:-127.0.0.1:9090}
bin=$root/target/release/thermostat
# shellcheck source=scripts/throwaway.sh
source scripts/throwaway.sh

build() {
  cargo build --release
}

start_postgres() {
  local admin_url
  admin_url=$(scripts/pg.sh start "$tmp/pg")
  psql "$admin_url" -q -v ON_ERROR_STOP=1 -c 'CREATE DATABASE thermostat'
  export DATABASE_URL=${admin_url%/postgres}/thermostat
}

# Tansu when it is installed (scripts/tansu.sh ensure installs it: ~20 min once); otherwise the
# demo embeds librdkafka's mock cluster, so a newcomer is running in minutes.
start_broker() {
  if bin_tansu=$(scripts/tansu.sh path 2>/dev/null); then
    echo "run.sh: broker: Tansu ($bin_tansu)" >&2
    KAFKA_BROKERS=$(scripts/tansu.sh start "$tmp/tansu")
    export KAFKA_BROKERS
  else
    echo "run.sh: Tansu not installed (scripts/tansu.sh ensure installs it); using the embedded mock broker" >&2
    export DEMO_EMBEDDED_BROKER=true
  fi
}

demo() {
  export SIM_PLOT=${SIM_PLOT:-$root/target/thermostat-demo.svg}
  export SIM_CHANGE_AFTER=${SIM_CHANGE_AFTER:-2m}
  # Not exec'd: cleanup must run after it exits. In the background, because bash runs a trap
  # only once its foreground child has exited, so a SIGTERM to this script would not reach the
  # demo; Ctrl-C and SIGTERM are passed on to it as SIGTERM (a graceful stop, plot written).
  "$bin" demo &
  demo_pid=$!
  signalled=0
  trap 'signalled=130; kill -TERM "$demo_pid" 2>/dev/null || true' INT
  trap 'signalled=143; kill -TERM "$demo_pid" 2>/dev/null || true' TERM
  local rc=0
  # A trapped signal ends a wait early: wait again until the demo has stopped.
  while kill -0 "$demo_pid" 2>/dev/null; do
    wait "$demo_pid" || rc=$?
  done
  if ((signalled)); then rc=$signalled; fi
  return "$rc"
}

build
start_postgres
start_broker
demo
