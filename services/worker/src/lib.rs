//! The data worker: owns block devices (or sparse files on the embedded
//! default), runs the copy-on-write engine on them, exports volumes and
//! snapshots over NBD, and serves the `cowsnap.worker.v1` gRPC API that the
//! control service drives.
//!
//! - [`exports`]: the table of NBD exports;
//! - [`nbd`]: the NBD server (newstyle fixed handshake, structured replies).

pub mod exports;
pub mod nbd;
