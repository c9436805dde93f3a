//! Code generated from `proto/` by `build.rs` (never edited by hand), and the encoded
//! descriptor set that server reflection serves.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("thermostat.v1");
}

/// Every file of `proto/` and its imports, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/thermostat_descriptor.bin"));
