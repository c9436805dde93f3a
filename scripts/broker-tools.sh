#!/usr/bin/env bash
# scripts/broker-tools.sh: installs stunnel (Debian's `stunnel4`), the TLS terminator the Kafka
# security tests put in front of Tansu (whose own TLS listener cannot be turned on in 0.6), and
# prints its path. Locks as codegen-tools.sh does.
set -euo pipefail

have_tools() { command -v stunnel >/dev/null; }

if ! have_tools; then
  sudo=()
  [[ $EUID -eq 0 ]] || sudo=(sudo)
  # Parallel callers must not run apt concurrently (the same lock as codegen-tools.sh).
  (
    flock 9
    have_tools && exit 0
    echo "broker-tools.sh: installing stunnel4 via apt" >&2
    "${sudo[@]}" apt-get update >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends stunnel4 >&2
  ) 9>/tmp/thermostat-codegen-install.lock
fi
command -v stunnel
