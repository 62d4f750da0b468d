//! `cowsnap bench ...`: benchmarks that print each figure with its ratio to a
//! baseline measured in the same run, on the same files. Speed is measured and
//! reported (targets met or missed), never asserted.
//!
//! - [`store`]: `bench store`, the exception store and COW engine against the
//!   raw device;
//! - [`nbd`]: `bench nbd`, our NBD export against `qemu-nbd` on a qcow2
//!   overlay and fio on the raw file;
//! - [`workload`]: the I/O patterns and the driver that runs them over the raw
//!   device or the engine;
//! - [`load`]: loading a COW device with many exceptions;
//! - [`files`]: scratch directory and files;
//! - [`report`]: figures, targets, table and JSON;
//! - [`soak`]: `bench soak`, the whole product under load while its
//!   worker is killed with `kill -9` at intervals;
//! - [`api`]: `bench api`, the control path (gRPC API, catalog, worker
//!   calls) as the catalog grows to thousands of volumes and snapshots;
//! - [`alloc`]: the counting global allocator (installed in `main.rs`).

pub mod alloc;
mod api;
mod files;
mod load;
mod nbd;
mod report;
mod soak;
mod store;
mod workload;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The exception store and COW engine against the raw device, in one run
    /// on the same files: first write, overwrite, snapshot read, group commit,
    /// eight snapshots, load time and RAM per exception.
    Store(store::StoreArgs),
    /// Our NBD export of a volume with one snapshot against qemu-nbd serving
    /// a qcow2 overlay of the same file, with fio (nbd engine) as the client
    /// and fio on the raw file as the ceiling: 4 KiB random writes on first
    /// touch and overwrite, 4 KiB random reads, 1 MiB sequential writes and
    /// reads. Needs fio and qemu-utils.
    Nbd(nbd::NbdArgs),
    /// Control service and worker as processes of their own under 64
    /// clients (API calls and NBD I/O) for a set time, with the worker
    /// killed with `kill -9` at intervals: reports errors by kind, lost
    /// acknowledged writes, snapshot mismatches, and memory and open
    /// descriptors over time; exits 1 on a lost write, a mismatch or a
    /// growth beyond the thresholds.
    Soak(soak::SoakArgs),
    /// The control path at scale against `cowsnap up` on a fresh data dir:
    /// CreateSnapshot latency (p50, p99) against one SQLite commit plus one
    /// 4 KiB FUA write, and calls per second of create, get, list and delete
    /// of volumes and snapshots from 1, 8 and 64 clients at 1,000 volumes and
    /// once the catalog has grown (default 10,000 volumes, 100,000 snapshots).
    Api(api::ApiArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<u8> {
    match cmd {
        BenchCommand::Store(args) => store::run(args),
        BenchCommand::Nbd(args) => nbd::run(args),
        BenchCommand::Soak(args) => soak::run(args),
        BenchCommand::Api(args) => api::run(args),
    }
}
