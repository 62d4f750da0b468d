//! The report of `bench nbd`: the figures (each side's best round, the
//! ratios, the notes on CPU and on what first touches copied), every fio
//! run, the setup of each side, and the table or JSON that prints them.

use std::path::Path;

use cowsnap_store::Layout;
use serde::Serialize;

use super::fio::{FioResult, Kind, WORKLOADS};
use super::rounds::{Measured, Tally};
use super::{EXPORT, NbdArgs, Plan, SEED, SIDES, Side, Tools};
use crate::bench::report::{Figure, Figures, Goal, Rounds, num, render_table};

/// One fio run, as the JSON report lists it.
#[derive(Debug, Serialize)]
pub(super) struct RunRecord {
    pub(super) round: usize,
    pub(super) side: Side,
    pub(super) workload: &'static str,
    /// The figure: IOPS or MB/s.
    pub(super) value: f64,
    #[serde(flatten)]
    pub(super) fio: FioResult,
    /// CPU seconds the server used during the run (our whole process; the
    /// qemu-nbd process); none for the raw file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) server_cpu_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) server_cpu_us_per_io: Option<f64>,
}

/// What the engine did during a first-touch workload (summed over rounds).
#[derive(Debug, Default, Serialize)]
pub(super) struct EngineCounts {
    pub(super) writes: u64,
    /// Chunks copied to the snapshot (new exceptions).
    pub(super) chunks_copied: u64,
    pub(super) commits: u64,
    pub(super) exceptions_per_commit: f64,
    /// qcow2 clusters the overlay grew by, from its allocated bytes.
    pub(super) qemu_clusters_allocated: u64,
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

/// Server CPU per I/O of one workload, the mean of its rounds.
#[derive(Debug, Serialize)]
pub(super) struct CpuPerIo {
    workload: &'static str,
    /// µs of user + system CPU of our process per I/O.
    ours_us: f64,
    /// µs of user + system CPU of the qemu-nbd process per I/O.
    qemu_nbd_us: f64,
    /// ours / qemu-nbd: below 1 is less CPU per I/O than qemu-nbd.
    ratio: f64,
}

/// Everything one `bench nbd` run measured.
#[derive(Debug, Serialize)]
pub(super) struct NbdReport {
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
    pub(super) figures: Figures,
    /// Server CPU per I/O, by workload.
    server_cpu_per_io: Vec<CpuPerIo>,
    first_touch_random: EngineCounts,
    first_touch_sequential: EngineCounts,
    runs: Vec<RunRecord>,
    pub(super) targets_met: usize,
    pub(super) targets_missed: usize,
    pub(super) elapsed_secs: f64,
}

impl NbdReport {
    /// The report of a run in `dir` that measured `m`.
    pub(super) fn new(
        args: &NbdArgs,
        plan: &Plan,
        layout: Layout,
        tools: &Tools,
        dir: &Path,
        m: Measured,
    ) -> NbdReport {
        let cb = layout.chunk_bytes();
        NbdReport {
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
                engine: super::fio::raw_engine(m.backend),
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
            figures: figures(&m.tally),
            server_cpu_per_io: cpu_per_io(&m.tally),
            first_touch_random: m.tally.ft_rand,
            first_touch_sequential: m.tally.ft_seq,
            runs: m.tally.runs,
            targets_met: 0,
            targets_missed: 0,
            elapsed_secs: 0.0,
        }
    }
}

/// The bound the COW format sets on a sequential first-touch write: each
/// chunk is read once and written twice (the copy, then the new data), so
/// `1/(1/R + 2/W)` from this run's raw 1 MiB sequential read `R` and raw
/// 1 MiB sequential overwrite `W` (each its best round).
fn fill_bound(t: &Tally) -> (f64, f64, f64) {
    let best = |id: &str| {
        let wi = WORKLOADS.iter().position(|w| w.id == id).expect("workload");
        Rounds::new("raw", t.values[wi][2].clone()).best
    };
    let (r, w) = (best("seqread_1m"), best("seqwrite_1m_overwrite"));
    (1.0 / (1.0 / r + 2.0 / w), r, w)
}

/// Every workload's figure: ours against qemu-nbd (the fill against the
/// format's bound), the raw file as the ceiling, with notes on what first
/// touches copied.
fn figures(t: &Tally) -> Figures {
    let mut figures = Figures::default();
    for (wi, w) in WORKLOADS.iter().enumerate() {
        let rounds: Vec<Rounds> = SIDES
            .iter()
            .enumerate()
            .map(|(si, s)| Rounds::new(s.name(), t.values[wi][si].clone()))
            .collect();
        let unit = if w.iops { "IOPS" } else { "MB/s" };
        let ceiling = if w.kind == Kind::Timed {
            "raw file"
        } else {
            "raw file, fresh"
        };
        let mut note = String::new();
        if w.kind == Kind::FirstTouch {
            let c = &t.ft_rand;
            note.push_str(&format!(
                "{} writes copied {} chunks ({:.0}% first touches of a chunk) in {} commits, qcow2 allocated ≈{} clusters",
                c.writes,
                c.chunks_copied,
                100.0 * c.chunks_copied as f64 / c.writes.max(1) as f64,
                c.commits,
                c.qemu_clusters_allocated
            ));
        } else if w.kind == Kind::Fill {
            let c = &t.ft_seq;
            let (bound, r, w) = fill_bound(t);
            note.push_str(&format!(
                "{} chunks copied in {} commits ({:.1} exceptions per commit); judged against the format's bound \
                 1/(1/R+2/W) = {} MB/s from raw R {} MB/s (1 MiB read) and W {} MB/s (1 MiB overwrite): \
                 ours {:.2} of it, qemu-nbd (which writes once) {:.2}",
                c.chunks_copied,
                c.commits,
                c.exceptions_per_commit,
                num(bound),
                num(r),
                num(w),
                rounds[0].best / bound,
                rounds[1].best / bound
            ));
        }
        let (baseline, against) = if w.kind == Kind::Fill {
            (fill_bound(t).0, "1/(1/R+2/W)")
        } else {
            (rounds[1].best, "qemu-nbd")
        };
        let mut figure = Figure::new(
            w.label,
            rounds[0].best,
            unit,
            baseline,
            against,
            Goal::ratio_at_least(w.goal),
        )
        .ceiling(rounds[2].best, ceiling)
        .rounds(rounds);
        if !note.is_empty() {
            figure = figure.note(note);
        }
        figures.push(w.id, figure);
    }
    figures
}

/// Mean of some rounds' values (0 for none).
fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Every workload's server CPU per I/O, ours and qemu-nbd's.
fn cpu_per_io(t: &Tally) -> Vec<CpuPerIo> {
    WORKLOADS
        .iter()
        .enumerate()
        .map(|(wi, w)| {
            let (ours, qemu) = (mean(&t.cpu[wi][0]), mean(&t.cpu[wi][1]));
            CpuPerIo {
                workload: w.id,
                ours_us: ours,
                qemu_nbd_us: qemu,
                ratio: if qemu > 0.0 { ours / qemu } else { 0.0 },
            }
        })
        .collect()
}

/// The report as a table.
pub(super) fn table(r: &NbdReport) -> String {
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
        .zip(&r.server_cpu_per_io)
        .map(|((_, f), cpu)| {
            vec![
                f.label.clone(),
                cell(f, 0),
                cell(f, 1),
                cell(f, 2),
                format!("{:.2}", f.rounds[0].best / f.rounds[1].best),
                format!("{:.2}", f.ceiling_ratio.unwrap_or(0.0)),
                format!("{:.1}", cpu.ours_us),
                format!("{:.1}", cpu.qemu_nbd_us),
                format!("{:.2}", cpu.ratio),
                match &f.target_text {
                    Some(t) if f.baseline_label != "qemu-nbd" => {
                        format!("{t} of {}", f.baseline_label)
                    }
                    Some(t) => t.clone(),
                    None => "-".into(),
                },
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
            "ours CPU µs/IO",
            "qemu CPU µs/IO",
            "CPU ours/qemu",
            "target",
            "result",
        ],
        &rows,
        &[1, 2, 3, 4, 5, 6, 7, 8],
    ));
    let _ = writeln!(
        o,
        "(each figure is the best of {} round(s); in brackets its spread, (best − worst) / best; CPU µs/IO is the \
         server process's user + system CPU (/proc/PID/stat) over the timed run divided by fio's I/Os, the mean of \
         the rounds; no other server of the bench ran during a run)",
        r.rounds
    );
    let _ = writeln!(o);
    o.push_str(&r.figures.notes());
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "targets: {} met, {} missed; {:.1} s",
        r.targets_met, r.targets_missed, r.elapsed_secs
    );
    o
}
