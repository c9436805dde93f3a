#!/usr/bin/env bash
# The main job: build thermostat, give it a throwaway PostgreSQL database,
# migrate, and serve gRPC on $GRPC_ADDR until Ctrl-C. Everything started here
# is stopped on exit.
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

migrate() {
  "$bin" migrate
}

print_examples() {
  cat <<EOF

thermostat serving gRPC on $GRPC_ADDR (database $DATABASE_URL). Try:

  grpcurl -plaintext $GRPC_ADDR list

EOF
}

serve() {
  # Not exec'd: cleanup must run after it exits.
  "$bin" serve
}

build
start_postgres
migrate
print_examples
serve
