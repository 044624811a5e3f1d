//! Wire types of tern's gRPC services (generated from `proto/tern.proto`).
#![allow(missing_debug_implementations, clippy::unwrap_used, clippy::cast_possible_truncation)]

pub mod v1 {
    tonic::include_proto!("tern.v1");
}

pub use v1::*;

/// Largest gRPC message either side accepts. Batches are kept under 4 MiB of payload;
/// the margin covers headers and incompressible data.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
