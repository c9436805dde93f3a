#!/usr/bin/env bash
# Tansu, a Kafka-protocol broker, for tests and local runs.
#
#   scripts/tansu.sh ensure                    -> prints the tansu binary path
#   scripts/tansu.sh path                      -> the same, but fails instead of installing
#   scripts/tansu.sh start DIR [STORAGE_URL]   -> prints 127.0.0.1:PORT
#   scripts/tansu.sh stop DIR
#
# DIR holds log, pid and port. Only the result goes to stdout.
#
# Tansu 0.6.0 CLI (`tansu` == `tansu broker`); every flag also reads an env
# var of the same name in upper case, so flags are always passed explicitly:
#   --cluster-id ID                 (CLUSTER_ID, default tansu_cluster)
#   --listener-url tcp://H:P        (LISTENER_URL, default tcp://0.0.0.0:9092)
#   --advertised-listener-url URL   (ADVERTISED_LISTENER_URL, sent in metadata)
#   --storage-engine URL            (STORAGE_ENGINE, default memory://tansu/;
#                                    memory:// needs the `dynostore` feature,
#                                    postgres:// needs `postgres` and a database
#                                    with Tansu's schema already applied: the
#                                    crate does not create it)
#   --schema-registry URL           optional; not needed
# It calls dotenv(), so it runs with cwd=DIR to not pick up a project .env.
# Logging is tracing's EnvFilter (RUST_LOG); TANSU_RUST_LOG sets it here.
set -euo pipefail

TANSU_VERSION=0.6.0

die() { echo "tansu.sh: $*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

tansu_bin() {
  if command -v tansu >/dev/null; then command -v tansu
  elif [[ -x $HOME/.cargo/bin/tansu ]]; then echo "$HOME/.cargo/bin/tansu"
  else return 1
  fi
}

ensure() {
  tansu_bin && return 0
  # Serialise parallel callers; the build takes 15-30 min on 2 cores.
  (
    flock 9
    tansu_bin >/dev/null && exit 0
    echo "tansu.sh: cargo install tansu $TANSU_VERSION (slow)" >&2
    cargo install tansu --locked --version "$TANSU_VERSION" \
      --features dynostore,postgres >&2
  ) 9>/tmp/thermostat-tansu-install.lock
  tansu_bin || die "tansu not found after install"
}

# Succeeds once the broker answers a Kafka Metadata v0 request (all topics)
# and advertises 127.0.0.1:PORT as its only broker. Plain sockets: no client
# library needed.
kafka_ready() {
  python3 - "$1" <<'EOF' 2>/dev/null
import socket, struct, sys
port = int(sys.argv[1])
client = b"tansu.sh"
# api_key=3 (Metadata), api_version=0, correlation_id=7, client_id, topics=[]
body = struct.pack(">hhih", 3, 0, 7, len(client)) + client + struct.pack(">i", 0)
with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
    s.settimeout(2)
    s.sendall(struct.pack(">i", len(body)) + body)
    buf = b""
    while len(buf) < 4 or len(buf) < 4 + struct.unpack(">i", buf[:4])[0]:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(1)
        buf += chunk
data = buf[4:]
corr, nbrokers, _node, hlen = struct.unpack(">iiih", data[:14])
host = data[14:14 + hlen].decode()
(bport,) = struct.unpack(">i", data[14 + hlen:18 + hlen])
sys.exit(0 if (corr, nbrokers, host, bport) == (7, 1, "127.0.0.1", port) else 1)
EOF
}

# Running and not a zombie (a dead child stays a zombie until we exit).
alive() {
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) && [[ -n $state && $state != Z ]]
}
is_tansu() { alive "$1" && [[ $(cat "/proc/$1/comm" 2>/dev/null) == tansu ]]; }

start() {
  local storage=${1:-memory://tansu/} bin port pid try
  bin=$(ensure)
  mkdir -p "$DIR"
  if [[ -f $DIR/pid ]] && is_tansu "$(cat "$DIR/pid")"; then
    die "already running in $DIR (pid $(cat "$DIR/pid"))"
  fi
  # An auto-picked port can be raced by another process: retry with a new one.
  for try in 1 2 3; do
    port=$(free_port)
    echo "tansu.sh: starting on 127.0.0.1:$port (try $try), log $DIR/log" >&2
    # setsid: a Ctrl-C in the caller's terminal must not kill it before the
    # caller's cleanup does. No inherited stdio: callers reading our stdout to
    # EOF (e.g. Rust tests) would otherwise hang.
    (cd "$DIR" && RUST_LOG=${TANSU_RUST_LOG:-warn} exec setsid "$bin" broker \
      --cluster-id thermostat \
      --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine "$storage") </dev/null >>"$DIR/log" 2>&1 &
    pid=$!
    echo "$pid" >"$DIR/pid"
    for _ in $(seq 300); do
      if kafka_ready "$port"; then
        echo "$port" >"$DIR/port"
        echo "127.0.0.1:$port"
        return 0
      fi
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      kill -KILL "$pid"
      die "not ready after 30s, see $DIR/log"
    fi
  done
  tail -n 20 "$DIR/log" >&2 || true
  die "failed to start, see $DIR/log"
}

stop() {
  [[ -f $DIR/pid ]] || return 0
  local pid
  pid=$(cat "$DIR/pid")
  if is_tansu "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      is_tansu "$pid" || break
      sleep 0.1
    done
    if is_tansu "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$DIR/pid"
}

cmd=${1:-}
case $cmd in
  ensure) ensure ;;
  # The installed binary's path; fails (installing nothing) when there is none.
  path) tansu_bin ;;
  start | stop)
    [[ $# -ge 2 ]] || die "usage: $0 $cmd DIR"
    DIR=$(realpath -m "$2")
    shift 2
    "$cmd" "$@"
    ;;
  *) die "usage: $0 ensure | path | start DIR [STORAGE_URL] | stop DIR" ;;
esac
