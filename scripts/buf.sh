#!/usr/bin/env bash
# scripts/buf.sh ARGS...: runs Buf (lint, breaking) on proto/ from the repository's root, with
# the buf binary of the npm package @bufbuild/buf, pinned, installed on first use into
# ~/.cache/thermostat-buf (THERMOSTAT_BUF_DIR overrides).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=1.75.0
dir=${THERMOSTAT_BUF_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/thermostat-buf}
buf=$dir/node_modules/.bin/buf

if [[ $("$buf" --version 2>/dev/null) != "$version" ]]; then
  (
    flock 9
    [[ $("$buf" --version 2>/dev/null) == "$version" ]] && exit 0
    echo "buf.sh: installing @bufbuild/buf@$version from npm into $dir" >&2
    mkdir -p "$dir"
    npm install --prefix "$dir" --silent --no-audit --no-fund "@bufbuild/buf@$version" >&2
  ) 9>/tmp/thermostat-buf-install.lock
fi
cd "$root"
exec "$buf" "$@"
