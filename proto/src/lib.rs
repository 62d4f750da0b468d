//! cowsnap's gRPC APIs, generated from `proto/`:
//! - [`cowsnap::v1`]: `cowsnap.v1`, the public API of the control service
//!   (volumes, snapshots, operations, workers);
//! - [`worker::v1`]: `cowsnap.worker.v1`, the control service <-> worker API;
//! - [`csi::v1`]: `csi.v1`, the Container Storage Interface (spec v1.12) that
//!   the CSI driver (`services/csi`) serves to Kubernetes;
//!
//! and [`FILE_DESCRIPTOR_SET`], the encoded descriptors for server reflection,
//! [`names`], the resource names every side parses the same way,
//! [`listen`], where every cowsnap server listens and its bound socket,
//! [`server`], what every cowsnap gRPC server shares (TLS, reflection,
//! health), [`bad_request`], INVALID_ARGUMENT with its field
//! as data, and [`kill_point`], the tests' `kill -9` hook.

pub mod bad_request;
pub mod kill_point;
pub mod listen;
pub mod names;
pub mod server;

/// The encoded `FileDescriptorSet` of every cowsnap `.proto` file.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

pub mod cowsnap {
    pub mod v1 {
        tonic::include_proto!("cowsnap.v1");
    }
}

pub mod worker {
    pub mod v1 {
        tonic::include_proto!("cowsnap.worker.v1");
    }
}

pub mod csi {
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}
