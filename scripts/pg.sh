#!/usr/bin/env bash
# Throwaway PostgreSQL clusters for tests and local runs.
#
#   scripts/pg.sh start DIR [PORT]  -> prints postgres://postgres@127.0.0.1:PORT/postgres
#   scripts/pg.sh stop DIR
#
# Layout: DIR/data (cluster), DIR/log (server log), DIR/port, and the unix
# socket in DIR. Only the URL goes to stdout; everything else to stderr.
set -euo pipefail

die() { echo "pg.sh: $*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Run a postgres binary; as root it must run as the `postgres` OS user
# (initdb and postgres refuse to run as root).
as_pg() {
  if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

ensure_binaries() {
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && return 0
  local sudo=()
  [[ $EUID -eq 0 ]] || sudo=(sudo)
  # Parallel callers (e.g. tests) must not run apt concurrently.
  (
    flock 9
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && exit 0
    echo "pg.sh: installing postgresql via apt" >&2
    "${sudo[@]}" apt-get update >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y postgresql >&2
  ) 9>/tmp/thermostat-pg-install.lock
}

pg_bin() {
  # Newest major version wins (sort -V handles 9.6 < 15 < 16).
  local initdb
  initdb=$(printf '%s\n' /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)
  dirname "$initdb"
}

# As root, DIR must belong to `postgres`, and every ancestor must be
# traversable by it (tempfile/mktemp dirs are 0700 root).
fix_perms() {
  [[ $EUID -eq 0 ]] || return 0
  [[ $(stat -c %U "$DIR") == postgres ]] || chown -R postgres: "$DIR"
  chmod 700 "$DIR"
  local d
  d=$(dirname "$DIR")
  while [[ $d != / ]]; do
    [[ $(stat -c %A "$d") == *x ]] || chmod o+x "$d"
    d=$(dirname "$d")
  done
}

start() {
  local port=${1:-}
  ensure_binaries
  local bin
  bin=$(pg_bin)
  mkdir -p "$DIR"
  fix_perms

  if [[ ! -f $DIR/data/PG_VERSION ]]; then
    echo "pg.sh: initdb $DIR/data" >&2
    as_pg "$bin/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 --locale=C --no-sync >/dev/null
    # Settings for a fast, disposable cluster. The port is passed per start.
    cat >>"$DIR/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
fsync = off
full_page_writes = off
synchronous_commit = off
max_connections = 500
EOF
  fi

  if as_pg "$bin/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
    local running
    running=$(cat "$DIR/port")
    [[ -z $port || $port == "$running" ]] || die "$DIR already running on port $running"
    echo "postgres://postgres@127.0.0.1:$running/postgres"
    return 0
  fi

  # Auto-picked ports can be raced by other processes: retry with a new one.
  local fixed=1 try
  [[ -n $port ]] || { [[ -f $DIR/port ]] && port=$(cat "$DIR/port"); }
  [[ -n $port ]] || { fixed=0; port=$(free_port); }
  for try in 1 2 3; do
    if as_pg "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w -t 60 \
      -o "-p $port" start >&2; then
      echo "$port" >"$DIR/port"
      echo "postgres://postgres@127.0.0.1:$port/postgres"
      return 0
    fi
    [[ $fixed -eq 0 && $try -lt 3 ]] || break
    port=$(free_port)
  done
  tail -n 20 "$DIR/log" >&2 || true
  die "failed to start cluster in $DIR"
}

stop() {
  [[ -f $DIR/data/postmaster.pid ]] || return 0
  local bin
  bin=$(pg_bin)
  # pg_ctl also fails on a stale pid file; only an error if still running.
  if ! as_pg "$bin/pg_ctl" -D "$DIR/data" -m fast -w -t 60 stop >&2; then
    if as_pg "$bin/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
      die "failed to stop cluster in $DIR"
    fi
  fi
}

[[ $# -ge 2 ]] || die "usage: $0 start DIR [PORT] | stop DIR"
cmd=$1
DIR=$(realpath -m "$2")
shift 2
# postgres processes must not inherit an unreadable cwd (e.g. /root).
cd /
case $cmd in
  start) start "$@" ;;
  stop) stop ;;
  *) die "unknown command $cmd" ;;
esac
