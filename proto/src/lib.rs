//! cowsnap's gRPC APIs, generated from `proto/`:
//! - [`worker::v1`]: `cowsnap.worker.v1`, the control service <-> worker API;
//!
//! and [`FILE_DESCRIPTOR_SET`], the encoded descriptors for server reflection.

/// The encoded `FileDescriptorSet` of every cowsnap `.proto` file.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("cowsnap.worker.v1");
    }
}
