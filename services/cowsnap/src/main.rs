//! `cowsnap`: one executable for every role of the product.
//!
//! - `cow ...`: offline tools for COW devices (create, check, dump, status,
//!   export, merge, delta), in the style of thin-provisioning-tools;
//! - `io`: a `qemu-io` for the engine;
//! - `bench ...`: benchmarks that print ratios against a baseline measured in
//!   the same run;
//! - `worker`: the data worker (devices, engine, NBD, worker gRPC API);
//! - `control`: the control service (public API, catalog, reconciliation);
//! - `up`: the embedded default, control service and one worker in one
//!   process;
//! - `volume ...`, `snapshot ...`, `operation ...`: the admin CLI over the
//!   public API;
//! - `health`: a service's gRPC health, for probes.

mod admin;
mod bench;
mod control_cmd;
mod cow;
mod health_cmd;
mod io_cmd;
mod nbd_cmd;
mod register;
mod service;
mod up_cmd;
mod worker_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Counts live heap bytes so `bench store` can measure RAM per exception.
#[global_allocator]
static ALLOC: bench::alloc::CountingAlloc = bench::alloc::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "cowsnap",
    version,
    about = "Volume snapshots with the Linux dm-snapshot on-disk format, in user space"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Offline tools for COW devices (dm-snapshot persistent exception stores).
    #[command(subcommand)]
    Cow(cow::CowCommand),
    /// Run qemu-io style commands against an origin and its snapshots through the engine.
    Io(io_cmd::IoArgs),
    /// Benchmarks (ratios against a baseline measured in the same run).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run a data worker: devices, the COW engine, NBD exports, the worker gRPC API.
    Worker(Box<worker_cmd::WorkerArgs>),
    /// Run the control service: the public cowsnap.v1 API, its catalog, and reconciliation with the workers.
    Control(control_cmd::ControlArgs),
    /// Run the embedded default: the control service and one worker in one
    /// process, with the catalog and file-backed devices under --data-dir.
    Up(up_cmd::UpArgs),
    /// Volumes: create, get, list, delete, restore, clone.
    Volume(admin::VolumeCommand),
    /// Snapshots: create, get, list, delete, merge.
    Snapshot(admin::SnapshotCommand),
    /// Long-running operations: get, list, wait.
    Operation(admin::OperationCommand),
    /// Ask a cowsnap service's gRPC health whether it serves (exit 0), over
    /// TCP with TLS and a client certificate if given, or a unix socket.
    Health(health_cmd::HealthArgs),
    /// The kernel's NBD client (netlink): attach an export as /dev/nbdN,
    /// reconnect, resize, detach, list.
    #[command(subcommand)]
    Nbd(nbd_cmd::NbdCommand),
}

/// Logs go to stderr; `COWSNAP_LOG` (e.g. `debug`, `cowsnap_worker=debug`)
/// overrides the default level.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COWSNAP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Keeps the I/O path's buffers on the heap. Every NBD write payload and
/// every run of chunks the engine copies is an aligned buffer of up to a
/// few MiB, freed microseconds later. Under glibc's defaults such a buffer
/// is a fresh mapping, or heap that was just trimmed back to the system,
/// so each one pays page faults, the kernel clearing its pages, and TLB
/// shootdowns when it is unmapped: over half of the worker's CPU in the
/// 1 MiB first-touch write of `cowsnap bench nbd` (perf). With fixed
/// thresholds (which also stop glibc's adaptive ones) they are reused
/// instead; a process keeps up to the trim threshold of free heap per arena
/// after a burst.
#[cfg(target_env = "gnu")]
fn keep_io_buffers_on_the_heap() {
    // SAFETY: mallopt only sets the allocator's parameters; it is called
    // first thing in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

#[cfg(not(target_env = "gnu"))]
fn keep_io_buffers_on_the_heap() {}

fn main() -> ExitCode {
    keep_io_buffers_on_the_heap();
    let cli = Cli::parse();
    // Services log what they do; tools only what goes wrong. The control
    // service sets up its own logs and traces (OpenTelemetry).
    match cli.cmd {
        Command::Control(_) | Command::Up(_) => {}
        Command::Worker(_) => init_logging("info"),
        _ => init_logging("warn"),
    }
    let result = match cli.cmd {
        Command::Cow(c) => cow::run(c),
        Command::Io(a) => io_cmd::run(a),
        Command::Bench(b) => bench::run(b),
        Command::Worker(a) => worker_cmd::run(*a),
        Command::Control(a) => control_cmd::run(a),
        Command::Up(a) => up_cmd::run(a),
        Command::Volume(c) => admin::volume::run_command(c),
        Command::Snapshot(c) => admin::snapshot::run_command(c),
        Command::Operation(c) => admin::operation::run_command(c),
        Command::Health(a) => health_cmd::run(a),
        Command::Nbd(c) => nbd_cmd::run(c),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("cowsnap: {e:#}");
            ExitCode::from(2)
        }
    }
}
