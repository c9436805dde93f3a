# Sourced by run.sh, test.sh and bench.sh (not run): creates "$tmp" for the throwaway servers
# of scripts/pg.sh and scripts/tansu.sh, and stops them and removes it on any exit, keeping the
# exit status (130 on Ctrl-C, 143 on SIGTERM).
# shellcheck shell=bash
tmp=$(mktemp -d -t thermostat.XXXXXX)
cleanup() {
  local rc=$?
  trap - EXIT
  scripts/tansu.sh stop "$tmp/tansu" || true
  scripts/pg.sh stop "$tmp/pg" || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
