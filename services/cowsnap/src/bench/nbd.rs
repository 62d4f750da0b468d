//! `cowsnap bench nbd`: our NBD export of a volume with one snapshot against
//! `qemu-nbd` serving a qcow2 overlay of the same base file, with fio on the
//! raw file as the ceiling, all in one run on the same files.
//!
//! The worker runs in this process; `qemu-nbd` and fio are child processes
//! (fio's `nbd` engine for both servers, `io_uring` or `libaio` with
//! `direct=1` on the raw file), and fio's JSON output is parsed. The volume
//! file is the qcow2 overlay's backing file, so both servers read the same
//! blocks.
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

use std::fs::File;
use std::io::Read as _;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use cowsnap_store::format::DEFAULT_CHUNK_SECTORS;
use cowsnap_store::{BackendChoice, CommitStats, Layout};
use cowsnap_worker::nbd::listener::Listen as NbdListen;
use cowsnap_worker::server::{RunningWorker, ServeOptions, start};
use cowsnap_worker::worker::WorkerConfig;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::files::{scratch_dir, sparse_file};
use super::report::{Figure, Figures, Goal, Rounds, num, render_table};

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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Random, fio's random map on (no block twice), `first_touch_bytes` at
    /// most, stopped at the runtime.
    FirstTouch,
    /// Sequential over the whole region, to the end.
    Fill,
    /// Time based.
    Timed,
}

struct Workload {
    id: &'static str,
    label: &'static str,
    rw: &'static str,
    bs: u64,
    depth: u32,
    /// In the first half (else the second).
    first_half: bool,
    kind: Kind,
    /// IOPS (else MB/s).
    iops: bool,
    /// Target: ours / qemu-nbd at least this.
    goal: f64,
}

impl Workload {
    fn is_read(&self) -> bool {
        self.rw.contains("read")
    }

    fn region(&self, plan: &Plan) -> (u64, u64) {
        if self.first_half {
            (0, plan.half)
        } else {
            (plan.half, plan.size - plan.half)
        }
    }
}

const SEQ_DEPTH: u32 = 8;
const RAND_DEPTH: u32 = 32;

const WORKLOADS: [Workload; 6] = [
    Workload {
        id: "randwrite_4k_first_touch",
        label: "4 KiB random write QD32, first touch",
        rw: "randwrite",
        bs: 4096,
        depth: RAND_DEPTH,
        first_half: true,
        kind: Kind::FirstTouch,
        iops: true,
        goal: 1.5,
    },
    Workload {
        id: "seqwrite_1m_first_touch",
        label: "1 MiB sequential write QD8, first touch",
        rw: "write",
        bs: MIB,
        depth: SEQ_DEPTH,
        first_half: false,
        kind: Kind::Fill,
        iops: false,
        goal: 1.5,
    },
    Workload {
        id: "randwrite_4k_overwrite",
        label: "4 KiB random write QD32, overwrite",
        rw: "randwrite",
        bs: 4096,
        depth: RAND_DEPTH,
        first_half: false,
        kind: Kind::Timed,
        iops: true,
        goal: 1.5,
    },
    Workload {
        id: "seqwrite_1m_overwrite",
        label: "1 MiB sequential write QD8, overwrite",
        rw: "write",
        bs: MIB,
        depth: SEQ_DEPTH,
        first_half: false,
        kind: Kind::Timed,
        iops: false,
        goal: 1.5,
    },
    Workload {
        id: "randread_4k",
        label: "4 KiB random read QD32",
        rw: "randread",
        bs: 4096,
        depth: RAND_DEPTH,
        first_half: false,
        kind: Kind::Timed,
        iops: true,
        goal: 1.0,
    },
    Workload {
        id: "seqread_1m",
        label: "1 MiB sequential read QD8",
        rw: "read",
        bs: MIB,
        depth: SEQ_DEPTH,
        first_half: false,
        kind: Kind::Timed,
        iops: false,
        goal: 1.0,
    },
];

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

/// What one fio run measured.
#[derive(Clone, Debug, Serialize)]
struct FioResult {
    iops: f64,
    /// Bytes per second.
    bw_bytes: f64,
    io_bytes: u64,
    total_ios: u64,
    runtime_ms: u64,
    /// Completion latency percentiles, µs.
    clat_p50_us: f64,
    clat_p99_us: f64,
    /// fio's own CPU, percent of its runtime.
    fio_usr_cpu: f64,
    fio_sys_cpu: f64,
}

fn parse_fio(stdout: &str, read: bool) -> anyhow::Result<FioResult> {
    // The nbd engine prints a line before the JSON.
    let start = stdout
        .find('{')
        .ok_or_else(|| anyhow!("no JSON in fio's output: {stdout}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&stdout[start..]).context("fio's JSON output")?;
    let job = &v["jobs"][0];
    if job["error"].as_i64().unwrap_or(0) != 0 {
        bail!("fio job error {}", job["error"]);
    }
    let d = &job[if read { "read" } else { "write" }];
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    let u = |x: &serde_json::Value| x.as_u64().unwrap_or(0);
    let pct = |p: &str| f(&d["clat_ns"]["percentile"][p]) / 1e3;
    Ok(FioResult {
        iops: f(&d["iops"]),
        bw_bytes: f(&d["bw_bytes"]),
        io_bytes: u(&d["io_bytes"]),
        total_ios: u(&d["total_ios"]),
        runtime_ms: u(&d["runtime"]),
        clat_p50_us: pct("50.000000"),
        clat_p99_us: pct("99.000000"),
        fio_usr_cpu: f(&job["usr_cpu"]),
        fio_sys_cpu: f(&job["sys_cpu"]),
    })
}

/// Runs fio (on a blocking thread: the worker keeps serving on the runtime).
async fn run_fio(fio: &Path, args: Vec<String>, read: bool) -> anyhow::Result<FioResult> {
    let fio = fio.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(&fio)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", fio.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "fio {} failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                stdout
            );
        }
        parse_fio(&stdout, read).with_context(|| format!("fio {}", args.join(" ")))
    })
    .await?
}

/// fio's arguments for one workload (the target's come after).
fn fio_job(w: &Workload, plan: &Plan) -> Vec<String> {
    let (off, len) = w.region(plan);
    let mut a = vec![
        format!("--name={}", w.id),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.depth),
        format!("--offset={off}"),
        format!("--size={len}"),
        "--numjobs=1".into(),
        "--randrepeat=1".into(),
        format!("--randseed={SEED}"),
        "--output-format=json".into(),
    ];
    let ms = plan.runtime.as_millis().max(1);
    match w.kind {
        Kind::FirstTouch => {
            a.push("--norandommap=0".into());
            a.push(format!("--io_size={}", plan.first_touch_bytes));
            a.push(format!("--runtime={ms}ms"));
        }
        Kind::Fill => a.push(format!("--runtime={}ms", FILL_CAP.as_millis())),
        Kind::Timed => {
            a.push("--time_based".into());
            a.push(format!("--runtime={ms}ms"));
            if w.rw.starts_with("rand") {
                a.push("--norandommap=1".into());
            }
        }
    }
    a
}

/// qemu-nbd serving one overlay, stopped (SIGTERM, then SIGKILL) on drop.
struct QemuNbd {
    child: Child,
    port: u16,
    stderr: PathBuf,
}

impl QemuNbd {
    fn start(qemu_nbd: &Path, args: &[String], stderr: PathBuf) -> anyhow::Result<QemuNbd> {
        let port = free_port()?;
        let err =
            File::create(&stderr).with_context(|| format!("creating {}", stderr.display()))?;
        let child = Command::new(qemu_nbd)
            .args(args)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", qemu_nbd.display()))?;
        let mut q = QemuNbd {
            child,
            port,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = q.child.try_wait()? {
                let mut msg = String::new();
                let _ = File::open(&q.stderr).and_then(|mut f| f.read_to_string(&mut msg));
                bail!("qemu-nbd {} exited ({st}): {}", args.join(" "), msg.trim());
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(q);
            }
            if Instant::now() > deadline {
                bail!("qemu-nbd did not listen on port {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU seconds (user + system) it used so far.
    fn cpu_secs(&self) -> f64 {
        proc_cpu_secs(self.child.id()).unwrap_or(0.0)
    }

    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free TCP port")?;
    Ok(l.local_addr()?.port())
}

/// User + system CPU seconds of a process, from `/proc/PID/stat`.
fn proc_cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// User + system CPU seconds of this process (the worker and the engine).
fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Bytes a file has allocated on disk.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// One fio run, as the JSON report lists it.
#[derive(Debug, Serialize)]
struct RunRecord {
    round: usize,
    side: Side,
    workload: &'static str,
    /// The figure: IOPS or MB/s.
    value: f64,
    #[serde(flatten)]
    fio: FioResult,
    /// CPU seconds the server used during the run (our whole process; the
    /// qemu-nbd process); none for the raw file.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_cpu_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_cpu_us_per_io: Option<f64>,
}

/// What the engine did during a first-touch workload (summed over rounds).
#[derive(Debug, Default, Serialize)]
struct EngineCounts {
    writes: u64,
    /// Chunks copied to the snapshot (new exceptions).
    chunks_copied: u64,
    commits: u64,
    exceptions_per_commit: f64,
    /// qcow2 clusters the overlay grew by, from its allocated bytes.
    qemu_clusters_allocated: u64,
}

#[derive(Debug, Serialize)]
struct OursInfo {
    server: &'static str,
    io_backend: &'static str,
    chunk_sectors: u32,
    chunk_bytes: u64,
    export: String,
    volume_file: String,
}

#[derive(Debug, Serialize)]
struct QemuInfo {
    version: String,
    command: String,
    overlay: String,
    cluster_bytes: u64,
    aio: String,
}

#[derive(Debug, Serialize)]
struct RawInfo {
    engine: &'static str,
    first_touch: String,
    other: String,
}

#[derive(Debug, Serialize)]
struct ClientInfo {
    fio_version: String,
    engine: &'static str,
    jobs: u32,
    seed: u64,
}

/// Everything one `bench nbd` run measured.
#[derive(Debug, Serialize)]
struct NbdReport {
    quick: bool,
    dir: String,
    rounds: usize,
    size_bytes: u64,
    first_touch_region: [u64; 2],
    other_region: [u64; 2],
    first_touch_write_bytes: u64,
    runtime_secs: f64,
    ours: OursInfo,
    qemu_nbd: QemuInfo,
    raw: RawInfo,
    client: ClientInfo,
    preparation: String,
    figures: Figures,
    first_touch_random: EngineCounts,
    first_touch_sequential: EngineCounts,
    runs: Vec<RunRecord>,
    targets_met: usize,
    targets_missed: usize,
    elapsed_secs: f64,
}

pub fn run(args: NbdArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    let layout = Layout::new(args.chunk_sectors).map_err(|e| anyhow!("--chunk-sectors: {e}"))?;
    let plan = Plan::new(&args, layout)?;
    if !["auto", "native", "io_uring", "threads"].contains(&args.qemu_aio.as_str()) {
        bail!("--qemu-aio: auto, native, io_uring or threads");
    }
    let tools = find_tools()?;
    let parent = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::current_dir().context("the current directory")?,
    };
    let scratch = scratch_dir(&parent)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = rt.block_on(measure(&args, &plan, layout, &tools, scratch.path()));
    drop(rt);
    let dir = scratch.path().display().to_string();
    scratch
        .close()
        .with_context(|| format!("removing the scratch directory {dir}"))?;
    let mut report = result?;
    report.elapsed_secs = started.elapsed().as_secs_f64();
    (report.targets_met, report.targets_missed) = report.figures.tally();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(0)
}

/// The state of one side in one round.
struct SideState {
    side: Side,
    /// fio's target arguments.
    target: Vec<String>,
    qemu: Option<QemuNbd>,
    file: Option<PathBuf>,
}

async fn measure(
    args: &NbdArgs,
    plan: &Plan,
    layout: Layout,
    tools: &Tools,
    dir: &Path,
) -> anyhow::Result<NbdReport> {
    let say = |m: &str| {
        if !args.json {
            eprintln!("  .. {m}");
        }
    };
    let cb = layout.chunk_bytes();
    let shutdown = CancellationToken::new();
    let running: RunningWorker = start(
        WorkerConfig {
            data_dir: dir.join("worker"),
            node: "bench".into(),
            nbd_uri: String::new(),
            device_allow: Vec::new(),
            io: args.io,
        },
        ServeOptions {
            grpc_listen: "127.0.0.1:0".parse().map_err(|e: String| anyhow!(e))?,
            nbd_listen: NbdListen::Tcp("127.0.0.1:0".into()),
            nbd_advertise: None,
            nbd_tls: None,
            tls: None,
        },
        shutdown.clone(),
    )
    .await
    .context("starting the worker")?;
    let result = rounds(args, plan, layout, tools, dir, &running, &say).await;
    shutdown.cancel();
    running.wait().await.context("stopping the worker")?;
    let m = result?;
    Ok(NbdReport {
        quick: args.quick,
        dir: dir.display().to_string(),
        rounds: plan.rounds,
        size_bytes: plan.size,
        first_touch_region: [0, plan.half],
        other_region: [plan.half, plan.size - plan.half],
        first_touch_write_bytes: plan.first_touch_bytes,
        runtime_secs: plan.runtime.as_secs_f64(),
        ours: OursInfo {
            server: "cowsnap worker, in this process; NBD over TCP on 127.0.0.1",
            io_backend: m.backend,
            chunk_sectors: layout.chunk_sectors(),
            chunk_bytes: cb,
            export: format!("nbd://127.0.0.1:PORT/{EXPORT}"),
            volume_file: "worker/devices/v1.vol (O_DIRECT), snapshot COW file beside it".into(),
        },
        qemu_nbd: QemuInfo {
            version: tools.qemu_version.clone(),
            command: m.qemu_cmd,
            overlay: format!(
                "qemu-img create -f qcow2 -b worker/devices/v1.vol -F raw -o cluster_size={cb} OVERLAY {}",
                plan.size
            ),
            cluster_bytes: cb,
            aio: m.qemu_aio,
        },
        raw: RawInfo {
            engine: raw_engine(m.backend),
            first_touch: "a fresh sparse file per round (allocating writes, like the COW file and the overlay)".into(),
            other: "the same file, after the first-touch sequential write allocated the second half".into(),
        },
        client: ClientInfo {
            fio_version: tools.fio_version.clone(),
            engine: "nbd (libnbd), one connection",
            jobs: 1,
            seed: SEED,
        },
        preparation: m.prep,
        figures: m.figures,
        first_touch_random: m.ft_rand,
        first_touch_sequential: m.ft_seq,
        runs: m.runs,
        targets_met: 0,
        targets_missed: 0,
        elapsed_secs: 0.0,
    })
}

fn raw_engine(backend: &str) -> &'static str {
    if backend == "io_uring" {
        "io_uring"
    } else {
        "libaio"
    }
}

/// What [`rounds`] measured.
struct Measured {
    figures: Figures,
    runs: Vec<RunRecord>,
    ft_rand: EngineCounts,
    ft_seq: EngineCounts,
    backend: &'static str,
    prep: String,
    qemu_aio: String,
    qemu_cmd: String,
}

async fn rounds(
    args: &NbdArgs,
    plan: &Plan,
    layout: Layout,
    tools: &Tools,
    dir: &Path,
    running: &RunningWorker,
    say: &dyn Fn(&str),
) -> anyhow::Result<Measured> {
    let cb = layout.chunk_bytes();
    let worker = running.worker.clone();
    let backend = worker.backend_name();
    let raw_eng = raw_engine(backend);
    let ours_uri = running.nbd.uri(EXPORT);
    let vol = worker
        .create_volume(VOLUME_ID, plan.size, layout.chunk_sectors(), "")
        .await
        .context("creating the volume")?;
    let base = PathBuf::from(&vol.device)
        .canonicalize()
        .context("the volume file")?;

    // The volume's content: written once, through the file (no snapshot
    // yet, and the engine caches nothing), flushed. It is also the backing
    // file of every qcow2 overlay.
    say(&format!(
        "writing the volume ({} MiB) through its file",
        plan.size >> 20
    ));
    let fill = run_fio(
        &tools.fio,
        vec![
            "--name=prepare".into(),
            "--rw=write".into(),
            "--bs=1M".into(),
            "--iodepth=8".into(),
            format!("--size={}", plan.size),
            format!("--ioengine={raw_eng}"),
            "--direct=1".into(),
            "--fallocate=none".into(),
            "--end_fsync=1".into(),
            format!("--filename={}", base.display()),
            "--output-format=json".into(),
        ],
        false,
    )
    .await?;
    if fill.io_bytes != plan.size {
        bail!(
            "preparing the volume wrote {} of {} bytes",
            fill.io_bytes,
            plan.size
        );
    }
    let prep = format!(
        "the volume file ({} MiB) written once with fio ({raw_eng}, direct=1, 1 MiB, {:.0} MB/s) and flushed; it is also every \
         overlay's backing file. Each round: a new snapshot of the volume (the previous one deleted), a new qcow2 overlay with \
         qemu-nbd started on it, a new sparse raw file",
        plan.size >> 20,
        fill.bw_bytes / 1e6
    );

    let mut qemu_aio = match args.qemu_aio.as_str() {
        "auto" if backend == "io_uring" => "io_uring".to_string(),
        "auto" => "native".to_string(),
        other => other.to_string(),
    };
    let qemu_args = |overlay: &Path, aio: &str| -> Vec<String> {
        vec![
            "--format=qcow2".into(),
            "--cache=none".into(),
            format!("--aio={aio}"),
            "--persistent".into(),
            "--bind=127.0.0.1".into(),
            format!("--export-name={EXPORT}"),
            overlay.display().to_string(),
        ]
    };

    let mut results: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); SIDES.len()]; WORKLOADS.len()];
    let mut cpu: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); SIDES.len()]; WORKLOADS.len()];
    let mut runs = Vec::new();
    let mut ft_rand = EngineCounts::default();
    let mut ft_seq = EngineCounts::default();
    let mut prev_snap: Option<String> = None;
    let export = worker
        .exports()
        .get(EXPORT)
        .ok_or_else(|| anyhow!("{EXPORT} is not exported"))?;
    let origin = export.origin.clone();

    for round in 1..=plan.rounds {
        say(&format!(
            "round {round} of {}: fresh snapshot, overlay and raw file",
            plan.rounds
        ));
        // Ours: a fresh snapshot, the only one.
        if let Some(p) = prev_snap.take() {
            worker
                .delete_snapshot(&p)
                .await
                .with_context(|| format!("deleting {p}"))?;
        }
        let snap_id = format!("r{round}");
        let snap = worker
            .create_snapshot(&format!("volumes/{VOLUME_ID}"), &snap_id, 0, 0, "", false)
            .await
            .context("creating the snapshot")?;
        prev_snap = Some(snap.name.clone());
        // qemu-nbd: a fresh overlay.
        let overlay = dir.join(format!("overlay{round}.qcow2"));
        let out = Command::new(&tools.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(&base)
            .args(["-F", "raw", "-o"])
            .arg(format!("cluster_size={cb}"))
            .arg(&overlay)
            .arg(plan.size.to_string())
            .output()
            .context("running qemu-img create")?;
        if !out.status.success() {
            bail!(
                "qemu-img create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stderr = dir.join("qemu-nbd.stderr");
        let qemu = match QemuNbd::start(
            &tools.qemu_nbd,
            &qemu_args(&overlay, &qemu_aio),
            stderr.clone(),
        ) {
            Ok(q) => q,
            Err(e) if args.qemu_aio == "auto" && qemu_aio == "io_uring" => {
                say(&format!(
                    "qemu-nbd --aio=io_uring failed ({e:#}); using native"
                ));
                qemu_aio = "native".into();
                QemuNbd::start(&tools.qemu_nbd, &qemu_args(&overlay, &qemu_aio), stderr)?
            }
            Err(e) => return Err(e),
        };
        let qemu_uri = format!("nbd://127.0.0.1:{}/{EXPORT}", qemu.port);
        // Raw: a fresh sparse file.
        let raw_file = sparse_file(&dir.join(format!("raw{round}.img")), plan.size)?;

        let mut states = vec![
            SideState {
                side: Side::Ours,
                target: vec!["--ioengine=nbd".into(), format!("--uri={ours_uri}")],
                qemu: None,
                file: None,
            },
            SideState {
                side: Side::QemuNbd,
                target: vec!["--ioengine=nbd".into(), format!("--uri={qemu_uri}")],
                qemu: Some(qemu),
                file: Some(overlay.clone()),
            },
            SideState {
                side: Side::Raw,
                target: vec![
                    format!("--ioengine={raw_eng}"),
                    "--direct=1".into(),
                    "--fallocate=none".into(),
                    format!("--filename={}", raw_file.display()),
                ],
                qemu: None,
                file: Some(raw_file.clone()),
            },
        ];
        // The sides take turns, starting with a different one each round.
        states.rotate_left((round - 1) % SIDES.len());

        for (wi, w) in WORKLOADS.iter().enumerate() {
            say(&format!("round {round}: {}", w.label));
            for st in &states {
                let si = SIDES.iter().position(|s| *s == st.side).expect("a side");
                let mut fio_args = fio_job(w, plan);
                fio_args.extend(st.target.iter().cloned());
                let before_cpu = match st.side {
                    Side::Ours => Some(self_cpu_secs()),
                    Side::QemuNbd => st.qemu.as_ref().map(|q| q.cpu_secs()),
                    Side::Raw => None,
                };
                let snap_before = if st.side == Side::Ours {
                    worker.get_snapshot(&snap.name).await?.exceptions
                } else {
                    0
                };
                let commits_before = origin.commit_stats();
                let alloc_before = st.file.as_deref().map_or(0, allocated);

                let r = run_fio(&tools.fio, fio_args, w.is_read())
                    .await
                    .with_context(|| format!("{} on {}", w.label, st.side.name()))?;

                let server_cpu = before_cpu.map(|b| {
                    let now = match st.side {
                        Side::Ours => self_cpu_secs(),
                        _ => st.qemu.as_ref().map_or(b, |q| q.cpu_secs()),
                    };
                    now - b
                });
                let value = if w.iops { r.iops } else { r.bw_bytes / 1e6 };
                if value.is_nan() || value <= 0.0 {
                    bail!("{} on {}: fio measured nothing", w.label, st.side.name());
                }
                let (_, len) = w.region(plan);
                if w.kind == Kind::Fill && r.io_bytes != len {
                    bail!(
                        "{} on {}: wrote {} of {len} bytes within {} s",
                        w.label,
                        st.side.name(),
                        r.io_bytes,
                        FILL_CAP.as_secs()
                    );
                }
                if w.kind != Kind::Timed {
                    let counts = if w.kind == Kind::FirstTouch {
                        &mut ft_rand
                    } else {
                        &mut ft_seq
                    };
                    match st.side {
                        Side::Ours => {
                            let after = worker.get_snapshot(&snap.name).await?;
                            let copied = after.exceptions - snap_before;
                            let c = diff(commits_before, origin.commit_stats());
                            if w.kind == Kind::Fill && copied != len / cb {
                                bail!(
                                    "{}: the snapshot gained {copied} exceptions, expected {} (every chunk of the region)",
                                    w.label,
                                    len / cb
                                );
                            }
                            counts.writes += r.total_ios;
                            counts.chunks_copied += copied;
                            counts.commits += c.commits;
                        }
                        Side::QemuNbd => {
                            let grown = allocated(&overlay).saturating_sub(alloc_before);
                            counts.qemu_clusters_allocated += grown / cb;
                        }
                        Side::Raw => {}
                    }
                }
                results[wi][si].push(value);
                if let Some(c) = server_cpu {
                    cpu[wi][si].push(c * 1e6 / r.total_ios.max(1) as f64);
                }
                runs.push(RunRecord {
                    round,
                    side: st.side,
                    workload: w.id,
                    value,
                    server_cpu_us_per_io: server_cpu.map(|c| c * 1e6 / r.total_ios.max(1) as f64),
                    server_cpu_secs: server_cpu,
                    fio: r,
                });
            }
        }
        for st in &mut states {
            if let Some(q) = st.qemu.as_mut() {
                q.stop();
            }
        }
        drop(states);
        std::fs::remove_file(&overlay)
            .with_context(|| format!("removing {}", overlay.display()))?;
        std::fs::remove_file(&raw_file)
            .with_context(|| format!("removing {}", raw_file.display()))?;
        let st = worker.get_snapshot(&snap.name).await?;
        if st.state != cowsnap_worker::worker::ResState::Ready {
            bail!("{} is {:?} after round {round}", snap.name, st.state);
        }
    }
    if let Some(p) = prev_snap.take() {
        worker.delete_snapshot(&p).await?;
    }
    for c in [&mut ft_rand, &mut ft_seq] {
        c.exceptions_per_commit = c.chunks_copied as f64 / c.commits.max(1) as f64;
    }

    let mut figures = Figures::default();
    for (wi, w) in WORKLOADS.iter().enumerate() {
        let rounds: Vec<Rounds> = SIDES
            .iter()
            .enumerate()
            .map(|(si, s)| Rounds::new(s.name(), results[wi][si].clone()))
            .collect();
        let unit = if w.iops { "IOPS" } else { "MB/s" };
        let ceiling = if w.kind == Kind::Timed {
            "raw file"
        } else {
            "raw file, fresh"
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let mut note = format!(
            "server CPU per I/O (mean of {} rounds): ours {:.1} µs, qemu-nbd {:.1} µs",
            plan.rounds,
            mean(&cpu[wi][0]),
            mean(&cpu[wi][1])
        );
        if w.kind == Kind::FirstTouch {
            note.push_str(&format!(
                "; {} writes copied {} chunks ({:.0}% first touches of a chunk) in {} commits, qcow2 allocated ≈{} clusters",
                ft_rand.writes,
                ft_rand.chunks_copied,
                100.0 * ft_rand.chunks_copied as f64 / ft_rand.writes.max(1) as f64,
                ft_rand.commits,
                ft_rand.qemu_clusters_allocated
            ));
        } else if w.kind == Kind::Fill {
            note.push_str(&format!(
                "; {} chunks copied in {} commits ({:.1} exceptions per commit)",
                ft_seq.chunks_copied, ft_seq.commits, ft_seq.exceptions_per_commit
            ));
        }
        figures.push(
            w.id,
            Figure::new(
                w.label,
                rounds[0].best,
                unit,
                rounds[1].best,
                "qemu-nbd",
                Goal::ratio_at_least(w.goal),
            )
            .ceiling(rounds[2].best, ceiling)
            .rounds(rounds)
            .note(note),
        );
    }
    let qemu_cmd = format!(
        "qemu-nbd {} --port=PORT",
        qemu_args(Path::new("OVERLAY"), &qemu_aio).join(" ")
    );
    Ok(Measured {
        figures,
        runs,
        ft_rand,
        ft_seq,
        backend,
        prep,
        qemu_aio,
        qemu_cmd,
    })
}

fn diff(before: CommitStats, after: CommitStats) -> CommitStats {
    CommitStats {
        commits: after.commits - before.commits,
        exceptions: after.exceptions - before.exceptions,
    }
}

/// The report as a table.
fn table(r: &NbdReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "cowsnap bench nbd: {} MiB volume, {} round(s), {:.1} s per timed workload{}",
        r.size_bytes >> 20,
        r.rounds,
        r.runtime_secs,
        if r.quick { ", quick mode" } else { "" }
    );
    let _ = writeln!(
        o,
        "client:   {}, ioengine=nbd (libnbd), 1 job, one TCP connection to 127.0.0.1, randseed {}",
        r.client.fio_version, r.client.seed
    );
    let _ = writeln!(
        o,
        "ours:     {}; I/O backend {}, chunk {} sectors ({} KiB); export {} of a volume with one snapshot",
        r.ours.server,
        r.ours.io_backend,
        r.ours.chunk_sectors,
        r.ours.chunk_bytes / 1024,
        EXPORT
    );
    let _ = writeln!(
        o,
        "qemu-nbd: {}; {}",
        r.qemu_nbd.version, r.qemu_nbd.command
    );
    let _ = writeln!(
        o,
        "          overlay: {} (cluster = our chunk size, so both copy or allocate the same unit on first touch)",
        r.qemu_nbd.overlay
    );
    let _ = writeln!(
        o,
        "raw:      fio ioengine={} direct=1; first touch on {}; the rest on {}",
        r.raw.engine, r.raw.first_touch, r.raw.other
    );
    let _ = writeln!(
        o,
        "regions:  first-touch 4 KiB writes in [0, {} MiB), at most {} MiB of them, no block twice; everything else in [{} MiB, {} MiB)",
        r.first_touch_region[1] >> 20,
        r.first_touch_write_bytes >> 20,
        r.other_region[0] >> 20,
        r.size_bytes >> 20
    );
    let _ = writeln!(o, "preparation: {}", r.preparation);
    let _ = writeln!(o, "scratch directory: {}", r.dir);
    let _ = writeln!(o);
    let cell = |f: &Figure, i: usize| {
        let rr = &f.rounds[i];
        format!("{} {} ({:.0}%)", num(rr.best), f.unit, rr.spread * 100.0)
    };
    let rows: Vec<Vec<String>> = r
        .figures
        .0
        .iter()
        .map(|(_, f)| {
            vec![
                f.label.clone(),
                cell(f, 0),
                cell(f, 1),
                cell(f, 2),
                format!("{:.2}", f.ratio),
                format!("{:.2}", f.ceiling_ratio.unwrap_or(0.0)),
                f.target_text.clone().unwrap_or_else(|| "-".into()),
                f.result.to_string(),
            ]
        })
        .collect();
    o.push_str(&render_table(
        &[
            "workload",
            "ours",
            "qemu-nbd",
            "raw",
            "ours/qemu",
            "ours/raw",
            "target",
            "result",
        ],
        &rows,
        &[1, 2, 3, 4, 5],
    ));
    let _ = writeln!(
        o,
        "(each figure is the best of {} round(s); in brackets its spread, (best − worst) / best)",
        r.rounds
    );
    let _ = writeln!(o);
    o.push_str(&r.figures.notes());
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "targets (ours/qemu-nbd): {} met, {} missed; {:.1} s",
        r.targets_met, r.targets_missed, r.elapsed_secs
    );
    o
}
