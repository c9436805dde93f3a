#!/usr/bin/env bash
# clients/python/run.sh ADDRESS: generates the Python client from proto/ with grpcio-tools, as a
# building-management developer would, and runs scenario.py against the service at ADDRESS
# (host:port, plaintext). The pinned packages are installed from PyPI on first use into a
# virtualenv, by default ~/.cache/thermostat-clients-venv (THERMOSTAT_CLIENTS_VENV overrides).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${THERMOSTAT_CLIENTS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/thermostat-clients-venv}

if ! "$venv/bin/python" -c 'import grpc_tools, grpc_status' 2>/dev/null; then
  (
    flock 9
    "$venv/bin/python" -c 'import grpc_tools, grpc_status' 2>/dev/null && exit 0
    echo "clients/python/run.sh: installing $(tr '\n' ' ' < "$here/requirements.txt")into $venv" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt" >&2
  ) 9>/tmp/thermostat-clients-venv.lock
fi

gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
"$venv/bin/python" -m grpc_tools.protoc -I "$root/proto" --python_out="$gen" \
  --grpc_python_out="$gen" thermostat/v1/setpoint.proto thermostat/v1/control.proto thermostat/v1/schedule.proto
PYTHONPATH=$gen "$venv/bin/python" "$here/scenario.py" "$1"
