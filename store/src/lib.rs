//! cowsnap's storage engine: the Linux kernel's dm-snapshot persistent
//! exception store, byte-compatible on disk, and its copy-on-write engine, in
//! user space.
//!
//! - [`format`]: the on-disk layout (header, metadata areas, records);
//! - [`io`]: `O_DIRECT` devices, aligned buffers, the io_uring, portable and
//!   fault-injecting backends;
//! - [`scan`]: reading and checking a COW device's metadata;
//! - [`pstore`]: one COW device's exception store: allocation, group commit,
//!   invalidation, merge steps;
//! - [`snapshot`] and [`origin`]: the engine (origin with snapshots, their
//!   I/O paths), [`table`]: a snapshot's exceptions in memory, [`merge`]:
//!   rolling the origin back to a snapshot;
//! - `cow`: copying origin chunks into the snapshots before the origin
//!   is written; [`writeback`]: origin writes acknowledged before that is
//!   done, held until it is;
//! - [`delta`]: where snapshots may differ, from their exception tables;
//! - [`status`]: `dmsetup status` lines.

pub(crate) mod cow;
pub mod delta;
pub mod error;
pub mod format;
pub mod io;
pub mod merge;
pub mod origin;
pub mod pstore;
pub mod scan;
pub mod snapshot;
pub mod status;
pub mod table;
pub mod writeback;

pub use delta::{Delta, Span};
pub use error::{Error, Result};
pub use format::Layout;
pub use io::{AlignedBuf, AllocError, Backend, BackendChoice, Device};
pub use merge::MergeProgress;
pub use origin::{AddedSnapshot, IoStats, Origin, SnapshotOptions, SnapshotStatus, Target};
pub use pstore::{CommitStats, Usage};
pub use snapshot::SnapId;
pub use writeback::{HeldBudget, WriteBackStats};
