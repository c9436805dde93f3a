# thermostat container image.
#
#   docker build -t thermostat:latest .
#   docker run --rm -p 50051:50051 -p 9090:9090 -e DATABASE_URL=... -e KAFKA_BROKERS=... thermostat:latest
#
# The builder stage's steps are repeated outside Docker by scripts/build-like-docker.sh
# (tests/deploy.rs checks that both run the same cargo command). Keep them in step.

# ---------------------------------------------------------------------------------------------
# Builder: the official Rust image on Debian 12, the same Debian as the runtime image, so the
# binary links against the same glibc and zlib.
FROM rust:1.95.0-bookworm AS builder

# rdkafka builds its bundled librdkafka with ./configure + make (C compiler, make, python3 for
# its build helpers) and links zlib (libz-sys finds the system zlib through pkg-config).
# No protoc: build.rs compiles proto/ with protox.
# DL3008 (pin apt package versions) is ignored: Debian replaces the exact versions on every
# point release and security update, so pinned versions stop resolving within weeks. The
# Rust dependencies, the part that matters for the binary, are pinned by Cargo.lock (--locked).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config python3 zlib1g-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# 1. Dependencies only: the manifests, build script and protos with a dummy lib and main, so
#    this layer (the slow part: every crate and librdkafka) is reused while only src/ changes.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
# Cargo.toml declares the benchmark targets: cargo refuses a manifest whose bench files are missing.
COPY benches ./benches
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src \
        target/release/thermostat target/release/deps/thermostat-* target/release/deps/libthermostat-* \
        target/release/.fingerprint/thermostat-*

# 2. The real sources. Migrations are embedded in the binary by sqlx::migrate! at compile time.
#    The fingerprints of the dummy crate were removed above, so cargo rebuilds it whatever the
#    files' modification times are.
COPY migrations ./migrations
COPY src ./src
RUN cargo build --release --locked \
    && cp target/release/thermostat /thermostat

# ---------------------------------------------------------------------------------------------
# Runtime: Debian 12 slim. The binary needs glibc, libgcc_s, libz.so.1 (zlib1g) and OpenSSL 3
# (libssl3: librdkafka's TLS and SCRAM); zlib1g and libssl3 are named to make that explicit.
# ca-certificates: the roots a TLS connection to PostgreSQL or Kafka is verified against when no
# CA file is given. Nothing is written at
# run time (works with a read-only root filesystem) and no shell is needed: the entrypoint is
# the binary itself, in exec form.
FROM debian:bookworm-slim AS runtime

# DL3008 ignored for the same reason as in the builder stage.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates zlib1g libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 thermostat \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin thermostat

COPY --from=builder /thermostat /usr/local/bin/thermostat

USER 10001:10001

# 50051: gRPC (API, health, reflection; TLS when configured). 50052: plaintext gRPC health
# only, for probes. 9090: admin HTTP (Prometheus metrics).
EXPOSE 50051 50052 9090

ENTRYPOINT ["/usr/local/bin/thermostat"]
CMD ["serve"]
