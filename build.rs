//! Compiles `proto/` with protox (pure Rust), so building needs no system `protoc`.
//! The descriptor set is also embedded for gRPC server reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/thermostat/v1/setpoint.proto",
        "proto/thermostat/v1/control.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds migrations/ at compile time; without this a new migration file is
    // not picked up until some source file changes (sqlx's documented build-script line).
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("thermostat_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // google.rpc.Status (per-item errors of batches) is tonic-types' own type.
    tonic_prost_build::configure()
        .extern_path(".google.rpc.Status", "::tonic_types::pb::Status")
        .compile_fds(fds)?;
    Ok(())
}
