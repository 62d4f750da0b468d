//! `bench api`'s report: its figures (each against its baseline and
//! target) and the table printed for a person.

use serde::Serialize;

use super::super::report::{Figure, Figures, Goal};
use super::calls::{Kind, Rate};
use super::grow::{Growth, Size};
use super::{ApiArgs, CLIENTS, CREATE_SNAPSHOT_TARGET, DISK_LIMIT_MB, READ_KEEPS};

#[derive(Debug, Serialize)]
pub struct Report {
    pub(super) io_backend: &'static str,
    pub(super) volume_bytes: u64,
    /// One committed INSERT (ms, median).
    pub(super) sqlite_commit_ms: f64,
    /// One 4 KiB O_DIRECT RWF_DSYNC write (ms, median).
    pub(super) fua_write_ms: f64,
    pub(super) create_snapshot_p50_ms: f64,
    pub(super) create_snapshot_p99_ms: f64,
    pub(super) first_point: Size,
    pub(super) last_point: Size,
    pub(super) growth_to_first: Growth,
    pub(super) growth_to_last: Growth,
    /// The growth budget ran out before the catalog reached its size.
    pub(super) growth_cut_short: bool,
    /// Bytes allocated on disk under the data dir at the end, and their
    /// apparent size.
    pub(super) disk_bytes: u64,
    pub(super) apparent_bytes: u64,
    /// Size of the workers' `state.json` checkpoints at the end, added up
    /// (a save appends a record to the journal; a checkpoint is written
    /// whole at start-up and when the journal fills).
    pub(super) worker_state_bytes: u64,
    /// Volumes on each worker at the end (`workers/ID`, count), as the
    /// control service lists them.
    pub(super) volumes_per_worker: Vec<(String, u32)>,
    /// Device files per worker and the descriptor limit the processes ran
    /// with (a worker holds one per device file).
    pub(super) fd_limit: String,
    /// `uptime`'s load averages at the start and the end.
    pub(super) load_start: String,
    pub(super) load_end: String,
    /// The first failed call (each rate counts its errors).
    pub(super) first_error: Option<String>,
    pub(super) figures: Figures,
    pub(super) targets_met: usize,
    pub(super) targets_missed: usize,
    pub(super) elapsed_secs: f64,
}

/// The figures of report `r` (whose own `figures` are not read), with the
/// rates of every kind at every concurrency level (`[kind][clients]`) at
/// the first and the last point.
pub(super) fn figures(r: &Report, at_first: &[Vec<Rate>], at_last: &[Vec<Rate>]) -> Figures {
    let (first_point, last_point) = (r.first_point, r.last_point);
    let (g1, g2) = (r.growth_to_first, r.growth_to_last);
    let mut figures = Figures::default();
    let both_ms = r.sqlite_commit_ms + r.fua_write_ms;
    figures.push(
        "create_snapshot_p50",
        Figure::new(
            "CreateSnapshot p50",
            r.create_snapshot_p50_ms,
            "ms",
            both_ms,
            "SQLite commit + 4 KiB FUA write",
            Goal::ratio_at_most(CREATE_SNAPSHOT_TARGET),
        ),
    );
    figures.push(
        "create_snapshot_p99",
        Figure::new(
            "CreateSnapshot p99",
            r.create_snapshot_p99_ms,
            "ms",
            both_ms,
            "SQLite commit + 4 KiB FUA write",
            None,
        ),
    );
    for (i, kind) in Kind::ALL.iter().enumerate() {
        for (j, &clients) in CLIENTS.iter().enumerate() {
            let (a, b) = (at_first[i][j], at_last[i][j]);
            let label = format!(
                "{}, {clients} client{} at {} volumes",
                kind.label(),
                if clients == 1 { "" } else { "s" },
                last_point.volumes
            );
            let mut f = Figure::new(
                &label,
                b.per_sec(),
                "calls/s",
                a.per_sec(),
                &format!("at {} volumes", first_point.volumes),
                if kind.is_read() {
                    Goal::ratio_at_least(READ_KEEPS)
                } else {
                    None
                },
            );
            if a.errors + b.errors > 0 {
                f = f.note(format!(
                    "{} failed calls at the first point, {} at the last",
                    a.errors, b.errors
                ));
            }
            figures.push(leak(format!("{}_{clients}", kind.id())), f);
        }
    }
    figures.push(
        "growth_creates",
        Figure::new(
            "growth: creates per second (volumes and snapshots)",
            g2.creates_per_sec(),
            "calls/s",
            g1.creates_per_sec(),
            &format!("up to {} volumes", first_point.volumes),
            None,
        ),
    );
    figures.push(
        "disk_use",
        Figure::new(
            "disk used by the data dir",
            r.disk_bytes as f64 / 1e6,
            "MB",
            r.apparent_bytes as f64 / 1e6,
            "apparent size of its files",
            Goal::value_at_most(DISK_LIMIT_MB),
        ),
    );
    figures
}

/// Figure ids are `&'static str`; a run makes a few dozen.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

pub(super) fn table(args: &ApiArgs, r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "cowsnap bench api: cowsnap up and {} more workers (I/O backend {}), volumes of {} KiB, rates over {} s each",
        args.workers - 1,
        r.io_backend,
        r.volume_bytes / 1024,
        args.measure_secs
    );
    let _ = writeln!(
        o,
        "baselines (same file system, medians): SQLite commit {:.3} ms, 4 KiB FUA write {:.3} ms",
        r.sqlite_commit_ms, r.fua_write_ms
    );
    let _ = writeln!(
        o,
        "catalog: {} volumes / {} snapshots at the first point, {} / {} at the last{}",
        r.first_point.volumes,
        r.first_point.snapshots,
        r.last_point.volumes,
        r.last_point.snapshots,
        if r.growth_cut_short {
            " (growth budget ran out)"
        } else {
            ""
        }
    );
    for (what, g) in [
        ("to the first point", &r.growth_to_first),
        ("to the last", &r.growth_to_last),
    ] {
        let _ = writeln!(
            o,
            "growth {what}: {} volumes, {} snapshots in {:.1} s ({:.1} creates/s; CreateVolume {:.1} ms, CreateSnapshot {:.1} ms mean under {} clients; {} errors)",
            g.volumes_created,
            g.snapshots_created,
            g.secs,
            g.creates_per_sec(),
            g.create_volume_ms,
            g.create_snapshot_ms,
            args.grow_clients,
            g.errors
        );
    }
    let _ = writeln!(
        o,
        "workers' state.json at the end: {:.1} MB in all (checkpoints, written whole when a journal fills); {}",
        r.worker_state_bytes as f64 / 1e6,
        r.fd_limit
    );
    let counts: Vec<u32> = r.volumes_per_worker.iter().map(|(_, n)| *n).collect();
    let _ = writeln!(
        o,
        "volumes per worker at the end ({} workers): {} to {} ({})",
        counts.len(),
        counts.iter().min().unwrap_or(&0),
        counts.iter().max().unwrap_or(&0),
        r.volumes_per_worker
            .iter()
            .map(|(w, n)| format!("{} {n}", w.trim_start_matches("workers/")))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        o,
        "load average: {} at the start, {} at the end",
        r.load_start, r.load_end
    );
    let _ = writeln!(o);
    o.push_str(
        &r.figures
            .table(&["figure", "now", "baseline", "ratio", "target", "met?"]),
    );
    if let Some(e) = &r.first_error {
        let _ = writeln!(o, "first failed call: {e}");
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "targets: {} met, {} missed; {:.1} s",
        r.targets_met, r.targets_missed, r.elapsed_secs
    );
    o
}
