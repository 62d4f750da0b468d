//! The fio side of `bench nbd`: the workloads, the arguments fio gets for
//! each (and for writing the volume once at the start), running fio and
//! reading its JSON output.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, anyhow, bail};
use serde::Serialize;

use super::{FILL_CAP, MIB, Plan, SEED};

/// How a workload is bounded.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// Random, fio's random map on (no block twice), `first_touch_bytes` at
    /// most, stopped at the runtime.
    FirstTouch,
    /// Sequential over the whole region, to the end.
    Fill,
    /// Time based.
    Timed,
}

/// One fio job, run on every side in every round.
pub(super) struct Workload {
    pub(super) id: &'static str,
    pub(super) label: &'static str,
    pub(super) rw: &'static str,
    pub(super) bs: u64,
    pub(super) depth: u32,
    /// In the first half (else the second).
    pub(super) first_half: bool,
    pub(super) kind: Kind,
    /// IOPS (else MB/s).
    pub(super) iops: bool,
    /// Target: ours / qemu-nbd at least this; for the fill, ours / the
    /// format's bound (see `report::fill_bound`).
    pub(super) goal: f64,
}

impl Workload {
    pub(super) fn is_read(&self) -> bool {
        self.rw.contains("read")
    }

    pub(super) fn region(&self, plan: &Plan) -> (u64, u64) {
        if self.first_half {
            (0, plan.half)
        } else {
            (plan.half, plan.size - plan.half)
        }
    }
}

const SEQ_DEPTH: u32 = 8;
const RAND_DEPTH: u32 = 32;

pub(super) const WORKLOADS: [Workload; 6] = [
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
        goal: 0.9,
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

/// What one fio run measured.
#[derive(Clone, Debug, Serialize)]
pub(super) struct FioResult {
    pub(super) iops: f64,
    /// Bytes per second.
    pub(super) bw_bytes: f64,
    pub(super) io_bytes: u64,
    pub(super) total_ios: u64,
    pub(super) runtime_ms: u64,
    /// Completion latency percentiles, µs.
    pub(super) clat_p50_us: f64,
    pub(super) clat_p99_us: f64,
    /// fio's own CPU, percent of its runtime.
    pub(super) fio_usr_cpu: f64,
    pub(super) fio_sys_cpu: f64,
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
pub(super) async fn run_fio(
    fio: &Path,
    args: Vec<String>,
    read: bool,
) -> anyhow::Result<FioResult> {
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
pub(super) fn fio_job(w: &Workload, plan: &Plan) -> Vec<String> {
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
    // A write run ends with a flush (NBD FLUSH, fsync on the raw file),
    // counted in its time: acknowledged writes may still be held in a
    // server's write-back (ours: D13 of docs/design.md; qemu-nbd's qcow2
    // metadata cache), so only a flushed run measures durable work, and
    // the exceptions it made are all committed when they are counted.
    if w.rw.contains("write") {
        a.push("--end_fsync=1".into());
    }
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

/// fio's arguments to write the whole volume file at `base` once, with
/// `engine`, and flush it.
pub(super) fn prepare_job(base: &Path, size: u64, engine: &str) -> Vec<String> {
    vec![
        "--name=prepare".into(),
        "--rw=write".into(),
        "--bs=1M".into(),
        "--iodepth=8".into(),
        format!("--size={size}"),
        format!("--ioengine={engine}"),
        "--direct=1".into(),
        "--fallocate=none".into(),
        "--end_fsync=1".into(),
        format!("--filename={}", base.display()),
        "--output-format=json".into(),
    ]
}

/// fio's engine on the raw file: io_uring with our io_uring backend,
/// libaio otherwise.
pub(super) fn raw_engine(backend: &str) -> &'static str {
    if backend == "io_uring" {
        "io_uring"
    } else {
        "libaio"
    }
}

/// fio's target arguments for an NBD export at `uri`.
pub(super) fn nbd_target(uri: &str) -> Vec<String> {
    vec!["--ioengine=nbd".into(), format!("--uri={uri}")]
}

/// fio's target arguments for the raw file `file`, with `engine`.
pub(super) fn raw_target(engine: &str, file: &Path) -> Vec<String> {
    vec![
        format!("--ioengine={engine}"),
        "--direct=1".into(),
        "--fallocate=none".into(),
        format!("--filename={}", file.display()),
    ]
}
