//! `cowsnap bench api`: the control path at scale. It starts `cowsnap up`
//! on a fresh data dir (file-backed devices, small sparse volumes) and
//! `--workers` − 1 more `cowsnap worker` processes, each on a data dir of
//! its own, that register themselves with it (`--register-with`), as the
//! workers of a cluster's nodes do: a worker holds every device file of its
//! volumes and snapshots open, and the default catalog (110,000 devices)
//! does not fit under one process's descriptor limit here (20,000), while
//! eight workers hold about 14,000 each. The control service places each
//! new volume on the worker holding the fewest. The bench measures, over
//! the real gRPC API:
//!
//! - CreateSnapshot end to end (p50, p99) on volumes holding data, against
//!   one SQLite commit plus one 4 KiB FUA write measured in the same run on
//!   the same file system ([`baseline`]), before and after the latency
//!   run, the lower of each kept; target p50 ≤ 3× that sum;
//! - calls per second of create, get, list and delete of volumes and
//!   snapshots from 1, 8 and 64 concurrent clients ([`calls`]), first when
//!   the catalog holds about 1,000 volumes, then once it has grown to
//!   `--volumes` volumes of `--snapshots-per-volume` snapshots each (and an
//!   operation per create). Each figure's baseline is its own rate at the
//!   first point: reads (get, list) must keep ≥ 0.9 of it;
//! - how fast the catalog grew (creates per second in each stretch) and
//!   the disk the data dir uses at the end.
//!
//! Growth stops early when `--grow-budget-secs` runs out; the report then
//! says how far it got. Speed is reported, never asserted. Every process
//! is stopped and the scratch dir removed at the end, also after an error
//! or Ctrl-C.

mod baseline;
mod calls;
mod grow;
mod latency;
mod report;
mod up;

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::files::in_scratch;
use super::report::Figures;
use calls::{Pool, Volumes};
use report::Report;

#[derive(clap::Args, Debug)]
pub struct ApiArgs {
    /// Volumes the catalog grows to.
    #[arg(long, default_value_t = 10_000)]
    volumes: usize,
    /// Snapshots taken of each of those volumes.
    #[arg(long, default_value_t = 10)]
    snapshots_per_volume: usize,
    /// Workers the volumes are spread over: `cowsnap up`'s own and N − 1
    /// `cowsnap worker` processes. Each holds one open descriptor per
    /// device file of its volumes and snapshots, so N must make that fit
    /// under the descriptor limit (checked before anything starts).
    #[arg(long, default_value_t = 8)]
    workers: usize,
    /// Volumes at the first measuring point (the baseline of every rate).
    #[arg(long, default_value_t = 1_000)]
    first_point: usize,
    /// Size of each volume, in KiB (a multiple of 4; the files are sparse).
    #[arg(long, default_value_t = 64)]
    volume_kib: u64,
    /// Seconds each (call, clients) rate is measured for.
    #[arg(long, default_value_t = 2.0)]
    measure_secs: f64,
    /// CreateSnapshot latency samples.
    #[arg(long, default_value_t = 100)]
    latency_samples: usize,
    /// Samples of each baseline (SQLite commit, FUA write).
    #[arg(long, default_value_t = 200)]
    baseline_samples: usize,
    /// Concurrent clients while the catalog grows.
    #[arg(long, default_value_t = 64)]
    grow_clients: usize,
    /// Longest the catalog may spend growing, in seconds (both stretches);
    /// past it the second point is measured where growth got to.
    #[arg(long, default_value_t = 900)]
    grow_budget_secs: u64,
    /// Directory in which a fresh scratch subdirectory is made (and removed
    /// afterwards). It must be on a disk file system. Default: the current
    /// directory.
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The concurrency levels every rate is measured at.
pub(super) const CLIENTS: [usize; 3] = [1, 8, 64];
/// A read keeps at least this share of its rate as the catalog grows.
pub(super) const READ_KEEPS: f64 = 0.9;
/// CreateSnapshot p50 at most this many (SQLite commit + FUA write).
pub(super) const CREATE_SNAPSHOT_TARGET: f64 = 3.0;
/// Disk the data dir may use at the end, in MB.
pub(super) const DISK_LIMIT_MB: f64 = 5_000.0;

pub fn run(args: ApiArgs) -> anyhow::Result<u8> {
    if args.volume_kib == 0 || !args.volume_kib.is_multiple_of(4) {
        bail!(
            "--volume-kib {}: must be a positive multiple of 4",
            args.volume_kib
        );
    }
    if args.volumes == 0 || args.first_point == 0 || args.first_point > args.volumes {
        bail!(
            "--first-point {} must be between 1 and --volumes {}",
            args.first_point,
            args.volumes
        );
    }
    if args.workers == 0 {
        bail!("--workers 0: at least one worker (cowsnap up's own) is needed");
    }
    if args.measure_secs <= 0.0 || args.latency_samples == 0 || args.baseline_samples == 0 {
        bail!("--measure-secs, --latency-samples and --baseline-samples must be positive");
    }
    // Checked before anything starts: too few workers for the catalog's
    // device files fails here, not halfway through growing it.
    let devices = (args.volumes * (args.snapshots_per_volume + 1)) as u64 + 1024;
    let fd_limit = up::raise_fd_limit(devices, args.workers)?;
    let report = in_scratch(args.dir.as_deref(), async |dir| {
        measure(&args, dir, fd_limit).await
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report::table(&args, &report));
    }
    Ok(0)
}

async fn measure(args: &ApiArgs, dir: &Path, fd_limit: String) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let say = |m: &str| {
        if !args.json {
            eprintln!("  .. {m}");
        }
    };
    let load_start = up::load_average();
    let volume_bytes = args.volume_kib * 1024;

    // Baselines first, on a quiet file system, and again after the
    // latency run: one burst of load on the host makes a baseline slow
    // and a ratio look better than it is, so the lower of each is kept.
    let (commit_1, fua_1, io_backend) =
        baseline::measure(&dir.join("baseline-1"), args.baseline_samples).await?;
    say(&format!(
        "baselines: SQLite commit {:.3} ms, 4 KiB FUA write {:.3} ms ({io_backend})",
        commit_1 * 1e3,
        fua_1 * 1e3
    ));

    say(&fd_limit);
    let mut up = up::start(dir, args.workers).await?;
    let api = up.api;
    let ch = up::channel(api)?;
    let mut vols = Volumes::new(ch.clone());
    // The control service registers its own worker shortly after it
    // listens, the others register themselves.
    say(&format!("waiting for {} workers", args.workers));
    up::wait_for_workers(&ch, args.workers, volume_bytes).await?;

    // CreateSnapshot latency: volumes holding data, written through NBD
    // (untimed) before each snapshot, ten snapshots per volume.
    say(&format!(
        "CreateSnapshot latency, {} samples",
        args.latency_samples
    ));
    let (p50, p99) = latency::create_snapshot_latency(args, &ch, volume_bytes).await?;
    let (commit_2, fua_2, _) =
        baseline::measure(&dir.join("baseline-2"), args.baseline_samples).await?;
    let (commit_s, fua_s) = (commit_1.min(commit_2), fua_1.min(fua_2));
    say(&format!(
        "baselines again: SQLite commit {:.3} ms, 4 KiB FUA write {:.3} ms; kept {:.3} and {:.3} ms",
        commit_2 * 1e3,
        fua_2 * 1e3,
        commit_s * 1e3,
        fua_s * 1e3
    ));

    let channels: Vec<Channel> = (0..8)
        .map(|_| up::channel(api))
        .collect::<anyhow::Result<_>>()?;
    let first_error = Arc::new(Mutex::new(None));
    let budget = Instant::now() + Duration::from_secs(args.grow_budget_secs);
    let names = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let next = Arc::new(AtomicUsize::new(0));

    say(&format!(
        "growing the catalog to {} volumes of {} snapshots",
        args.first_point, args.snapshots_per_volume
    ));
    let g1 = grow::grow(
        args,
        &channels,
        &next,
        args.first_point,
        budget,
        &names,
        volume_bytes,
    )
    .await;
    let first_point = grow::size(&names);
    // One scratch volume per client, for the timed snapshot creates.
    let mut scratch = Vec::new();
    for i in 0..CLIENTS[CLIENTS.len() - 1] {
        let v = vols
            .create_volume(calls::create_volume_request(
                &format!("scratch-{i}"),
                volume_bytes,
            ))
            .await
            .context("creating a scratch volume")?;
        scratch.push(v.into_inner().name);
    }
    let pool = |names: &Arc<Mutex<(Vec<String>, Vec<String>)>>| {
        let n = names.lock().expect("names");
        Arc::new(Pool {
            volumes: n.0.clone(),
            snapshots: n.1.clone(),
            scratch: scratch.clone(),
            volume_bytes,
            made_volumes: Mutex::new(Vec::new()),
            made_snapshots: Mutex::new(Vec::new()),
            round: AtomicU64::new(0),
        })
    };
    say(&format!(
        "rates at {} volumes, {} snapshots",
        first_point.volumes, first_point.snapshots
    ));
    let at_first = calls::rates(args, &channels, &pool(&names), &first_error, &say).await;

    say(&format!(
        "growing the catalog to {} volumes of {} snapshots",
        args.volumes, args.snapshots_per_volume
    ));
    let g2 = grow::grow(
        args,
        &channels,
        &next,
        args.volumes,
        budget,
        &names,
        volume_bytes,
    )
    .await;
    let last_point = grow::size(&names);
    let cut_short = last_point.volumes < args.volumes as u64;
    let p = pool(&names);
    p.round.store(1_000, Ordering::Relaxed);
    say(&format!(
        "rates at {} volumes, {} snapshots",
        last_point.volumes, last_point.snapshots
    ));
    let at_last = calls::rates(args, &channels, &p, &first_error, &say).await;

    let volumes_per_worker = up::volumes_per_worker(&ch).await?;
    let (disk_bytes, apparent_bytes) = up::disk_use(&up.data);
    let worker_state_bytes = up.worker_state_bytes();
    up.stop(Duration::from_secs(60)).await;

    let mut report = Report {
        io_backend,
        volume_bytes,
        sqlite_commit_ms: commit_s * 1e3,
        fua_write_ms: fua_s * 1e3,
        create_snapshot_p50_ms: p50 * 1e3,
        create_snapshot_p99_ms: p99 * 1e3,
        first_point,
        last_point,
        growth_to_first: g1,
        growth_to_last: g2,
        growth_cut_short: cut_short,
        disk_bytes,
        apparent_bytes,
        worker_state_bytes,
        volumes_per_worker,
        fd_limit,
        load_start,
        load_end: up::load_average(),
        first_error: first_error.lock().expect("first error").clone(),
        figures: Figures::default(),
        targets_met: 0,
        targets_missed: 0,
        elapsed_secs: t0.elapsed().as_secs_f64(),
    };
    report.figures = report::figures(&report, &at_first, &at_last);
    (report.targets_met, report.targets_missed) = report.figures.tally();
    Ok(report)
}
