#!/usr/bin/env bash
# scripts/codegen-tools.sh: installs, from Debian's packages, the code generators the tests run
# on proto/ as client developers would (protoc, its well-known types and protoc-gen-go), and
# prints the protoc path. The service's own build needs none of them (protox).
set -euo pipefail

have_tools() {
  command -v protoc >/dev/null && command -v protoc-gen-go >/dev/null &&
    [[ -f /usr/include/google/protobuf/timestamp.proto ]]
}

if ! have_tools; then
  sudo=()
  [[ $EUID -eq 0 ]] || sudo=(sudo)
  # Parallel callers must not run apt concurrently.
  (
    flock 9
    have_tools && exit 0
    echo "codegen-tools.sh: installing protobuf-compiler, libprotobuf-dev and protoc-gen-go via apt" >&2
    "${sudo[@]}" apt-get update >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y protobuf-compiler libprotobuf-dev protoc-gen-go >&2
  ) 9>/tmp/thermostat-codegen-install.lock
fi
command -v protoc
