//! Compiles `proto/` with protox (pure Rust), so building needs no system `protoc`.
//! The descriptor set is also embedded for gRPC server reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/thermostat/v1/setpoint.proto",
        "proto/thermostat/v1/control.proto",
        "proto/thermostat/v1/schedule.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    // `sqlx::migrate!` embeds migrations/ at compile time; without this a new migration file is
    // not picked up until some source file changes (sqlx's documented build-script line).
    println!("cargo:rerun-if-changed=migrations");
    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler
        .include_source_info(true)
        .include_imports(true)
        .open_files(protos)?;
    let fds = compiler.file_descriptor_set();
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Encoded by protox itself: prost's types would drop custom options such as
    // google.api.field_behavior, which reflection must serve.
    std::fs::write(
        out.join("thermostat_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    // google.rpc.Status (per-item errors of batches) is tonic-types' own type.
    tonic_prost_build::configure()
        .extern_path(".google.rpc.Status", "::tonic_types::pb::Status")
        .compile_fds(fds)?;
    Ok(())
}
