#!/usr/bin/env bash
# The main job: build thermostat, give it a throwaway PostgreSQL database and a
# Tansu broker (installed on first use), create the topics, and serve gRPC on
# $GRPC_ADDR until Ctrl-C. Everything started here is stopped on exit.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

export GRPC_ADDR=${GRPC_ADDR:-127.0.0.1:50051}
bin=$root/target/release/thermostat
tmp=$(mktemp -d -t thermostat-run.XXXXXX)
pids=() # background helpers to stop on exit

cleanup() {
  local rc=$?
  trap - EXIT
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  scripts/tansu.sh stop "$tmp/tansu" || true
  scripts/pg.sh stop "$tmp/pg" || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

build() {
  cargo build --release
}

start_postgres() {
  local admin_url
  admin_url=$(scripts/pg.sh start "$tmp/pg")
  psql "$admin_url" -q -v ON_ERROR_STOP=1 -c 'CREATE DATABASE thermostat'
  export DATABASE_URL=${admin_url%/postgres}/thermostat
}

start_broker() {
  scripts/tansu.sh ensure >/dev/null
  KAFKA_BROKERS=$(scripts/tansu.sh start "$tmp/tansu")
  export KAFKA_BROKERS
}

migrate() {
  "$bin" migrate
  "$bin" create-topics
}

print_examples() {
  cat <<EOF

thermostat serving gRPC on $GRPC_ADDR
  database: $DATABASE_URL
  broker:   $KAFKA_BROKERS

In another terminal (README.md explains each):

  grpcurl -plaintext $GRPC_ADDR list
  grpcurl -plaintext -d '{"setpoint": {"sensorId": "room-1", "buildingId": "hq", "desiredCelsius": 21, "upDeltaCelsius": 0.5, "downDeltaCelsius": 0.5}}' $GRPC_ADDR thermostat.v1.SetpointService/PutSetpoint
  grpcurl -plaintext -d '{"sendInitialState": true}' $GRPC_ADDR thermostat.v1.HeaterControlService/SubscribeHeaterCommands

and in a third, send readings and watch the heater react:

  KAFKA_BROKERS=$KAFKA_BROKERS $bin send-reading room-1 18.0
  KAFKA_BROKERS=$KAFKA_BROKERS $bin send-reading room-1 23.5

EOF
}

serve() {
  # Not exec'd: cleanup must run after it exits.
  "$bin" serve
}

build
start_postgres
start_broker
migrate
print_examples
serve
