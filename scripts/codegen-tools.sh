#!/usr/bin/env bash
# scripts/codegen-tools.sh: installs, from Debian's packages, the code generators the tests run
# on proto/ as client developers would (protoc, its well-known types, protoc-gen-go and
# protoc-gen-go-grpc) and what the Go client builds with (Go, grpc-go, genproto, protobuf-go:
# the Go module proxy is out of reach), and prints the protoc path. The service's own build
# needs none of them (protox).
set -euo pipefail

have_tools() {
  command -v protoc >/dev/null && command -v protoc-gen-go >/dev/null &&
    command -v protoc-gen-go-grpc >/dev/null && command -v go >/dev/null &&
    [[ -f /usr/include/google/protobuf/timestamp.proto ]] &&
    [[ -d /usr/share/gocode/src/google.golang.org/grpc ]] &&
    [[ -d /usr/share/gocode/src/google.golang.org/genproto/googleapis/rpc/errdetails ]] &&
    [[ -d /usr/share/gocode/src/google.golang.org/protobuf/types/known/fieldmaskpb ]] &&
    [[ -f /usr/share/gocode/src/github.com/golang/protobuf/proto/registry.go ]]
}

if ! have_tools; then
  sudo=()
  [[ $EUID -eq 0 ]] || sudo=(sudo)
  # Parallel callers must not run apt concurrently.
  (
    flock 9
    have_tools && exit 0
    # grpc-go's codec needs golang/protobuf 1.4 or later (over protobuf-go) to marshal what
    # protoc-gen-go generates; Debian's grpc-go takes 1.3 unless 1.5 is asked for.
    packages=(protobuf-compiler libprotobuf-dev protoc-gen-go protoc-gen-go-grpc golang-go
      golang-google-grpc-dev golang-google-genproto-dev golang-google-protobuf-dev
      golang-github-golang-protobuf-1-5-dev)
    echo "codegen-tools.sh: installing ${packages[*]} via apt" >&2
    "${sudo[@]}" apt-get update >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y "${packages[@]}" >&2
  ) 9>/tmp/thermostat-codegen-install.lock
fi
command -v protoc
