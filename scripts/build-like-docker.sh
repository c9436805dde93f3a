#!/usr/bin/env bash
# scripts/build-like-docker.sh [TARGET_DIR]
#
# Repeats the builder stage of the Dockerfile without Docker, so that a build command or a
# build context that would break the image build is caught here:
#   - a clean copy of exactly what the Dockerfile copies (Cargo.toml, Cargo.lock, build.rs,
#     proto/, then migrations/ and src/) in a temporary directory, nothing else of the work tree;
#   - the dependency pass with a dummy src/main.rs and src/lib.rs, then the real build;
#   - the same cargo command (tests/deploy.rs checks that it matches the Dockerfile's).
# Artifacts go to TARGET_DIR (default: target/docker-like in the repository), never to the
# normal target/, so the result is not mixed with development builds. It builds in release
# mode: expect it to take as long as the image build. The system needs what the builder image
# installs: a C toolchain, make, pkg-config, python3, zlib and OpenSSL headers (Debian:
# build-essential pkg-config python3 zlib1g-dev libssl-dev).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

target_dir=${1:-$root/target/docker-like}
mkdir -p "$target_dir"
target_dir=$(cd "$target_dir" && pwd)
export CARGO_TARGET_DIR=$target_dir

stage=$(mktemp -d "${TMPDIR:-/tmp}/thermostat-docker-like.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# 1. Dependencies only (Dockerfile: COPY Cargo.toml Cargo.lock build.rs ./ ; COPY proto ./proto ;
#    COPY benches ./benches).
cp "$root/Cargo.toml" "$root/Cargo.lock" "$root/build.rs" "$stage/"
cp -R "$root/proto" "$stage/proto"
cp -R "$root/benches" "$stage/benches"
cd "$stage"
mkdir src
echo 'fn main() {}' > src/main.rs
touch src/lib.rs
cargo build --release --locked
rm -rf src \
  "$target_dir"/release/thermostat "$target_dir"/release/deps/thermostat-* \
  "$target_dir"/release/deps/libthermostat-* "$target_dir"/release/.fingerprint/thermostat-*

# 2. The real sources (Dockerfile: COPY migrations ./migrations ; COPY src ./src).
cp -R "$root/migrations" "$stage/migrations"
cp -R "$root/src" "$stage/src"
cargo build --release --locked

"$target_dir/release/thermostat" --help >/dev/null
echo "build-like-docker: built $target_dir/release/thermostat"
