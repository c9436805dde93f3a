#!/usr/bin/env bash
# scripts/monitoring-tools.sh: installs promtool (Debian's `prometheus` package) for checking and
# unit-testing deploy/monitoring/ rules, and prints its path. Locks as codegen-tools.sh does.
set -euo pipefail

have_tools() { command -v promtool >/dev/null; }

if ! have_tools; then
  sudo=()
  [[ $EUID -eq 0 ]] || sudo=(sudo)
  # Parallel callers must not run apt concurrently (the same lock as codegen-tools.sh).
  (
    flock 9
    have_tools && exit 0
    echo "monitoring-tools.sh: installing prometheus (for promtool) via apt" >&2
    "${sudo[@]}" apt-get update >&2
    # --no-install-recommends: promtool only, no node exporter pulled in.
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends prometheus >&2
  ) 9>/tmp/thermostat-codegen-install.lock
fi
command -v promtool
