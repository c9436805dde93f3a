#!/usr/bin/env bash
# scripts/debian-tools.sh COMMAND PACKAGE...: installs PACKAGEs from Debian's archive (without
# recommends) unless COMMAND is already on PATH, and prints COMMAND's path. For the tools some
# tests run: promtool (`prometheus`), stunnel (`stunnel4`). Locks as codegen-tools.sh does.
set -euo pipefail

command=${1:?usage: debian-tools.sh COMMAND PACKAGE...}
shift
(($#)) || { echo "usage: debian-tools.sh COMMAND PACKAGE..." >&2; exit 2; }

if ! command -v "$command" >/dev/null; then
  sudo=()
  [[ $EUID -eq 0 ]] || sudo=(sudo)
  # Parallel callers must not run apt concurrently (the same lock as codegen-tools.sh).
  (
    flock 9
    command -v "$command" >/dev/null && exit 0
    echo "debian-tools.sh: installing $* via apt (for $command)" >&2
    "${sudo[@]}" apt-get update >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "$@" >&2
  ) 9>/tmp/thermostat-codegen-install.lock
fi
command -v "$command"
