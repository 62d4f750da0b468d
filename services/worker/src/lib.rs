//! The data worker: owns block devices (or sparse files on the embedded
//! default), runs the copy-on-write engine on them, exports volumes and
//! snapshots over NBD, and serves the `cowsnap.worker.v1` gRPC API that the
//! control service drives.
//!
//! - [`worker`]: the domain logic (volumes, snapshots, tasks) over
//!   [`devices`] and the persisted [`state`];
//! - [`tasks`]: long-running merges, restores and clones;
//! - [`exports`]: the table of NBD exports;
//! - [`nbd`]: the NBD server (newstyle fixed handshake, structured replies);
//! - [`grpc`]: the `cowsnap.worker.v1` service, [`server`]: running it all;
//! - [`error`]: errors by the gRPC status they map to.

pub mod devices;
pub mod error;
pub mod exports;
pub mod grpc;
pub mod nbd;
pub mod server;
pub mod state;
pub mod tasks;
pub mod worker;
