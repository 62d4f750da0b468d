//! `cowsnap bench nbd`: our NBD export of a volume with one snapshot against
//! `qemu-nbd` serving a qcow2 overlay of the same base file, with fio on the
//! raw file as the ceiling, all in one run on the same files.
//!
//! The worker runs in this process; `qemu-nbd` and fio are child processes
//! (fio's `nbd` engine for both servers, `io_uring` or `libaio` with
//! `direct=1` on the raw file), and fio's JSON output is parsed. The volume
//! file is the qcow2 overlay's backing file, so both servers read the same
//! blocks. Each timed run has its server alone on the machine (our worker
//! is started for it and stopped after it, qemu-nbd likewise), so that on a
//! small machine neither side's idle threads or caches share the CPUs with
//! the other's run; each side's server CPU per I/O (user + system, from
//! `/proc/PID/stat`, over the run) is in the table.
//!
//! Every round starts afresh on each side (a new snapshot of the volume, a
//! new overlay, a new sparse raw file) and runs the workloads in order, the
//! sides alternating within each workload (their order rotates with the
//! round): 4 KiB random writes on first touch in the first half of the
//! volume (fio's random map, same seed everywhere: no block is written
//! twice), 1 MiB sequential writes on first touch over the second half (all
//! of it, so every chunk there is copied and every cluster allocated), then
//! 4 KiB random and 1 MiB sequential overwrites, 4 KiB random and 1 MiB
//! sequential reads of that second half. A figure is the best of its rounds;
//! the spread says how far the worst round fell below it.
//!
//! - [`rounds`]: our worker, the volume and the rounds, step by step;
//! - [`run`]: one measured run of a workload on one side, its server alone;
//! - [`fio`]: the workloads and running fio;
//! - [`peer`]: qemu-nbd and its overlays;
//! - [`report`]: the figures, the table and the JSON.

mod fio;
mod peer;
mod report;
mod rounds;
mod run;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use cowsnap_store::format::DEFAULT_CHUNK_SECTORS;
use cowsnap_store::{BackendChoice, Layout};
use serde::Serialize;

use super::files::in_scratch;

const MIB: u64 = 1 << 20;
/// The volume (and export) name, as in `nbd://HOST:PORT/volumes/v1`.
const VOLUME_ID: &str = "v1";
const EXPORT: &str = "volumes/v1";
/// Every fio job uses this seed, so every side gets the same offsets.
const SEED: u64 = 0x63_6f77_736e_6170;
/// How long the first-touch sequential fill may take before it counts as
/// stuck (it must cover its whole region).
const FILL_CAP: Duration = Duration::from_secs(300);
const APT_HINT: &str =
    "install the Debian packages fio and qemu-utils (apt-get install fio qemu-utils)";

#[derive(clap::Args, Debug)]
pub struct NbdArgs {
    /// Directory in which a fresh scratch subdirectory is made (and removed
    /// at the end). Must be on a disk file system: O_DIRECT does not work
    /// on tmpfs. Default: the current directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Volume size in MiB, even (default 1024, quick 64). The first half
    /// takes the first-touch random writes, the second half everything else.
    #[arg(long)]
    size_mib: Option<u64>,
    /// Seconds per timed workload (default 5, quick 0.3); the first-touch
    /// random write stops at this too.
    #[arg(long)]
    runtime: Option<f64>,
    /// Rounds; every figure is the best of its rounds (default 3, quick 2).
    #[arg(long)]
    rounds: Option<usize>,
    /// Small sizes and short runs (seconds, for a smoke test); noisier.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Our I/O backend: auto (io_uring when the kernel allows it), uring or
    /// portable. fio on the raw file uses io_uring with io_uring, libaio
    /// otherwise.
    #[arg(long, default_value = "auto")]
    io: BackendChoice,
    /// Chunk size of the snapshot, in 512-byte sectors; the qcow2 overlay
    /// gets clusters of the same size.
    #[arg(long, default_value_t = DEFAULT_CHUNK_SECTORS)]
    chunk_sectors: u32,
    /// qemu-nbd's --aio: auto (io_uring when our backend is io_uring, else
    /// native), native, io_uring or threads.
    #[arg(long, default_value = "auto")]
    qemu_aio: String,
}

/// Sizes and times of one run.
struct Plan {
    size: u64,
    /// `[0, half)`: first-touch random writes.
    half: u64,
    /// Bytes of first-touch random writes per run: an eighth of the first
    /// half, so most writes land in a chunk (cluster) nobody touched yet.
    first_touch_bytes: u64,
    runtime: Duration,
    rounds: usize,
}

impl Plan {
    fn new(args: &NbdArgs, layout: Layout) -> anyhow::Result<Plan> {
        let size = args.size_mib.unwrap_or(if args.quick { 64 } else { 1024 }) * MIB;
        let half = size / 2;
        if size < 8 * MIB
            || !size.is_multiple_of(2 * MIB)
            || !half.is_multiple_of(layout.chunk_bytes())
        {
            bail!("--size-mib: an even number of MiB, at least 8, whose half is whole chunks");
        }
        let secs = args.runtime.unwrap_or(if args.quick { 0.3 } else { 5.0 });
        if !(0.1..=3600.0).contains(&secs) {
            bail!("--runtime: between 0.1 and 3600 seconds");
        }
        let rounds = args.rounds.unwrap_or(if args.quick { 2 } else { 3 });
        if rounds == 0 {
            bail!("--rounds must be positive");
        }
        Ok(Plan {
            size,
            half,
            first_touch_bytes: (half / 8).next_multiple_of(4096),
            runtime: Duration::from_secs_f64(secs),
            rounds,
        })
    }
}

/// Who serves the I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Side {
    Ours,
    QemuNbd,
    Raw,
}

const SIDES: [Side; 3] = [Side::Ours, Side::QemuNbd, Side::Raw];

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Ours => "ours",
            Side::QemuNbd => "qemu_nbd",
            Side::Raw => "raw",
        }
    }
}

/// The external programs and their versions.
struct Tools {
    fio: PathBuf,
    fio_version: String,
    qemu_nbd: PathBuf,
    qemu_img: PathBuf,
    qemu_version: String,
}

fn in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

fn first_line(cmd: &Path, arg: &str) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .arg(arg)
        .output()
        .with_context(|| format!("running {} {arg}", cmd.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text.lines().next().unwrap_or("").trim().to_string())
}

fn find_tools() -> anyhow::Result<Tools> {
    let names = ["fio", "qemu-nbd", "qemu-img"];
    let found: Vec<Option<PathBuf>> = names.iter().map(|n| in_path(n)).collect();
    let missing: Vec<&str> = names
        .iter()
        .zip(&found)
        .filter(|(_, p)| p.is_none())
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        bail!(
            "bench nbd runs fio, qemu-nbd and qemu-img, and {} not in PATH: {APT_HINT}",
            match missing.as_slice() {
                [one] => format!("{one} is"),
                more => format!("{} are", more.join(", ")),
            }
        );
    }
    let [fio, qemu_nbd, qemu_img] = <[Option<PathBuf>; 3]>::try_from(found)
        .map_err(|_| anyhow!("three tools"))?
        .map(|p| p.expect("checked"));
    let eng = Command::new(&fio)
        .arg("--enghelp=nbd")
        .output()
        .with_context(|| format!("running {} --enghelp=nbd", fio.display()))?;
    if !eng.status.success() {
        bail!(
            "{} has no nbd engine (it needs libnbd): {APT_HINT}",
            fio.display()
        );
    }
    Ok(Tools {
        fio_version: first_line(&fio, "--version")?,
        qemu_version: first_line(&qemu_nbd, "--version")?,
        fio,
        qemu_nbd,
        qemu_img,
    })
}

pub fn run(args: NbdArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    let layout = Layout::new(args.chunk_sectors).map_err(|e| anyhow!("--chunk-sectors: {e}"))?;
    let plan = Plan::new(&args, layout)?;
    if !["auto", "native", "io_uring", "threads"].contains(&args.qemu_aio.as_str()) {
        bail!("--qemu-aio: auto, native, io_uring or threads");
    }
    let tools = find_tools()?;
    let mut report = in_scratch(args.dir.as_deref(), async |dir| {
        rounds::measure(&args, &plan, layout, &tools, dir).await
    })?;
    report.elapsed_secs = started.elapsed().as_secs_f64();
    (report.targets_met, report.targets_missed) = report.figures.tally();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::table(&report));
    }
    Ok(0)
}
