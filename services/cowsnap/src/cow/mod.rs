//! `cowsnap cow ...`: offline tools for COW devices (dm-snapshot persistent
//! exception stores), one module per tool in the manner of
//! thin-provisioning-tools. The shared conventions (exit codes, `--json`
//! output, how devices are opened, progress display) live in [`report`],
//! [`devices`] and [`progress`]; each tool module owns only its own logic.
//!
//! Exit codes ([`report`]): 0 success, 1 the tool ran and found problems (or a
//! command failed), 2 the tool could not do its work (cannot open or read a
//! device, bad input).

pub mod check;
pub mod create;
pub mod delta;
pub mod devices;
pub mod dump;
pub mod export;
pub mod merge;
pub mod progress;
pub mod report;
pub mod status;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum CowCommand {
    /// Initialise a COW device (header and zeroed first metadata area), as the kernel does on first activation.
    Create(create::CreateArgs),
    /// Validate a COW device's metadata; exit 0 clean, 1 problems found, 2 cannot read.
    Check(check::CheckArgs),
    /// Print the header, the metadata areas and every exception.
    Dump(dump::DumpArgs),
    /// Print the `dmsetup status` line the kernel would print for this COW device.
    Status(status::StatusArgs),
    /// Write the snapshot's image (the origin overlaid with its exceptions) to a file or device.
    Export(export::ExportArgs),
    /// Merge the snapshot back into its origin, offline; resumable after an interruption.
    Merge(merge::MergeArgs),
    /// List the byte ranges where a snapshot may differ from its origin (or from another snapshot).
    Delta(delta::DeltaArgs),
}

pub fn run(cmd: CowCommand) -> anyhow::Result<u8> {
    report::restore_sigpipe();
    let result = match cmd {
        CowCommand::Create(a) => create::run(a),
        CowCommand::Check(a) => check::run(a),
        CowCommand::Dump(a) => dump::run(a),
        CowCommand::Status(a) => status::run(a),
        CowCommand::Export(a) => export::run(a),
        CowCommand::Merge(a) => merge::run(a),
        CowCommand::Delta(a) => delta::run(a),
    };
    result.map_err(report::one_message)
}
