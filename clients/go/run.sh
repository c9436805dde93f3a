#!/usr/bin/env bash
# clients/go/run.sh ADDRESS: generates the Go client from proto/ with protoc-gen-go and
# protoc-gen-go-grpc, as a building-management developer would, and runs scenario.go against the
# service at ADDRESS (host:port, plaintext). The Go module proxy is not reachable from the test
# machines, so the toolchain and libraries are Debian's (scripts/codegen-tools.sh installs them):
# Go 1.19, grpc-go 1.33 and genproto, built in GOPATH mode.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
gopath=$(mktemp -d)
trap 'rm -rf "$gopath"' EXIT
mkdir -p "$gopath/src" "$gopath/cache"
# Generated where its go_package says, under GOPATH; google/* come from Debian's genproto.
protoc -I "$root/proto" --go_out="$gopath/src" --go-grpc_out="$gopath/src" \
  thermostat/v1/setpoint.proto thermostat/v1/control.proto thermostat/v1/schedule.proto
mkdir -p "$gopath/src/scenario"
cp "$here/scenario.go" "$gopath/src/scenario/"
cd "$gopath/src/scenario"
GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOCACHE="$gopath/cache" GOFLAGS= \
  go run . "$1"
