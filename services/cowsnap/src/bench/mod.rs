//! `cowsnap bench ...`: benchmarks that print each figure with its ratio to a
//! baseline measured in the same run, on the same files. Speed is measured and
//! reported (targets met or missed), never asserted.
//!
//! - [`store`]: `bench store`, the exception store and COW engine against the
//!   raw device;
//! - [`workload`]: the I/O patterns and the driver that runs them over the raw
//!   device or the engine;
//! - [`load`]: loading a COW device with many exceptions;
//! - [`files`]: scratch directory and files;
//! - [`report`]: figures, targets, table and JSON;
//! - [`alloc`]: the counting global allocator (installed in `main.rs`).

pub mod alloc;
mod files;
mod load;
mod report;
mod store;
mod workload;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The exception store and COW engine against the raw device, in one run
    /// on the same files: first write, overwrite, snapshot read, group commit,
    /// eight snapshots, load time and RAM per exception.
    Store(store::StoreArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<u8> {
    match cmd {
        BenchCommand::Store(args) => store::run(args),
    }
}
