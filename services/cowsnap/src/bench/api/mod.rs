//! `cowsnap bench api`: the control path at scale. It starts `cowsnap up`
//! on a fresh data dir (file-backed devices, small sparse volumes) and
//! measures, over the real gRPC API:
//!
//! - CreateSnapshot end to end (p50, p99) on volumes holding data, against
//!   one SQLite commit plus one 4 KiB FUA write measured in the same run on
//!   the same file system ([`baseline`]); target p50 ≤ 3× that sum;
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
//! says how far it got. Speed is reported, never asserted.

mod baseline;
mod calls;

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::files::in_scratch;
use super::report::{Figure, Figures, Goal};
use super::soak::nbd_client::NbdClient;
use super::soak::procs::{Proc, free_port};
use calls::{Kind, Pool, Rate, Snapshots, Volumes};

#[derive(clap::Args, Debug)]
pub struct ApiArgs {
    /// Volumes the catalog grows to.
    #[arg(long, default_value_t = 10_000)]
    volumes: usize,
    /// Snapshots taken of each of those volumes.
    #[arg(long, default_value_t = 10)]
    snapshots_per_volume: usize,
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
const CLIENTS: [usize; 3] = [1, 8, 64];
/// A read keeps at least this share of its rate as the catalog grows.
const READ_KEEPS: f64 = 0.9;
/// CreateSnapshot p50 at most this many (SQLite commit + FUA write).
const CREATE_SNAPSHOT_TARGET: f64 = 3.0;
/// Disk the data dir may use at the end, in MB.
const DISK_LIMIT_MB: f64 = 5_000.0;

/// How big the catalog was at a measuring point.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Size {
    volumes: u64,
    snapshots: u64,
}

/// One stretch of growth.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Growth {
    volumes_created: u64,
    snapshots_created: u64,
    errors: u64,
    secs: f64,
    /// Mean latency of one CreateVolume / CreateSnapshot, in ms.
    create_volume_ms: f64,
    create_snapshot_ms: f64,
}

impl Growth {
    fn creates_per_sec(&self) -> f64 {
        (self.volumes_created + self.snapshots_created) as f64 / self.secs.max(1e-9)
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    io_backend: &'static str,
    volume_bytes: u64,
    /// One committed INSERT (ms, median).
    sqlite_commit_ms: f64,
    /// One 4 KiB O_DIRECT RWF_DSYNC write (ms, median).
    fua_write_ms: f64,
    create_snapshot_p50_ms: f64,
    create_snapshot_p99_ms: f64,
    first_point: Size,
    last_point: Size,
    growth_to_first: Growth,
    growth_to_last: Growth,
    /// The growth budget ran out before the catalog reached its size.
    growth_cut_short: bool,
    /// Bytes allocated on disk under the data dir at the end, and their
    /// apparent size.
    disk_bytes: u64,
    apparent_bytes: u64,
    /// Size of the worker's `state.json` at the end: it is written whole
    /// (and fsynced) twice per create or delete.
    worker_state_bytes: u64,
    /// The descriptor limit `cowsnap up` ran with (its worker holds one per
    /// device file).
    fd_limit: String,
    /// `uptime`'s load averages at the start and the end.
    load_start: String,
    load_end: String,
    /// The first failed call (each rate counts its errors).
    first_error: Option<String>,
    figures: Figures,
    targets_met: usize,
    targets_missed: usize,
    elapsed_secs: f64,
}

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
    if args.measure_secs <= 0.0 || args.latency_samples == 0 || args.baseline_samples == 0 {
        bail!("--measure-secs, --latency-samples and --baseline-samples must be positive");
    }
    let report = in_scratch(args.dir.as_deref(), async |dir| measure(&args, dir).await)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&args, &report));
    }
    Ok(0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Every device file of 10,000 volumes and 100,000 snapshots is held open
/// by the worker: raise the descriptor limit `cowsnap up` inherits to what
/// that needs (as a service unit's `LimitNOFILE` would), if allowed.
fn raise_fd_limit(devices: u64) -> String {
    let want = devices + 4096;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on structs we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= want {
            return format!("descriptor limit {}", lim.rlim_cur);
        }
        let new = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
            format!("descriptor limit raised from {} to {want}", lim.rlim_cur)
        } else {
            format!(
                "descriptor limit {} (could not raise it to {want}: {})",
                lim.rlim_cur,
                std::io::Error::last_os_error()
            )
        }
    }
}

fn channel(port: u16) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .connect_lazy())
}

async fn measure(args: &ApiArgs, dir: &Path) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let say = |m: &str| {
        if !args.json {
            eprintln!("  .. {m}");
        }
    };
    let load_start = load_average();
    let volume_bytes = args.volume_kib * 1024;

    // Baselines first, on a quiet file system.
    let base_dir = dir.join("baseline");
    std::fs::create_dir_all(&base_dir)?;
    let commit_s = baseline::sqlite_commit(&base_dir, args.baseline_samples).await?;
    let (fua_s, io_backend) = baseline::fua_write(&base_dir, args.baseline_samples).await?;
    say(&format!(
        "baselines: SQLite commit {:.3} ms, 4 KiB FUA write {:.3} ms ({io_backend})",
        commit_s * 1e3,
        fua_s * 1e3
    ));

    let devices = (args.volumes * (args.snapshots_per_volume + 1)) as u64 + 1024;
    let fd_limit = raise_fd_limit(devices);
    say(&fd_limit);
    let (api, nbd) = (free_port()?, free_port()?);
    let data = dir.join("data");
    let mut up = Proc::new(
        "up",
        vec![
            "up".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{api}"),
            "--nbd-listen".into(),
            format!("127.0.0.1:{nbd}"),
        ],
        &dir.join("up.log"),
        vec![api, nbd],
    );
    up.spawn()?;
    up.ready(Duration::from_secs(60)).await?;
    let ch = channel(api)?;
    let mut vols = Volumes::new(ch.clone());
    // The control service registers its worker shortly after it listens.
    wait_for_worker(&mut vols, volume_bytes).await?;

    // CreateSnapshot latency: volumes holding data, written through NBD
    // (untimed) before each snapshot, ten snapshots per volume.
    say(&format!(
        "CreateSnapshot latency, {} samples",
        args.latency_samples
    ));
    let (p50, p99) = create_snapshot_latency(args, &ch, nbd, volume_bytes).await?;

    let channels: Vec<Channel> = (0..8)
        .map(|_| channel(api))
        .collect::<anyhow::Result<_>>()?;
    let first_error = Arc::new(Mutex::new(None));
    let budget = Instant::now() + Duration::from_secs(args.grow_budget_secs);
    let names = Arc::new(Mutex::new((Vec::new(), Vec::new())));
    let next = Arc::new(AtomicUsize::new(0));

    say(&format!(
        "growing the catalog to {} volumes of {} snapshots",
        args.first_point, args.snapshots_per_volume
    ));
    let g1 = grow(
        args,
        &channels,
        &next,
        args.first_point,
        budget,
        &names,
        volume_bytes,
    )
    .await;
    let first_point = size(&names);
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
    let at_first = rates(args, &channels, &pool(&names), &first_error, &say).await;

    say(&format!(
        "growing the catalog to {} volumes of {} snapshots",
        args.volumes, args.snapshots_per_volume
    ));
    let g2 = grow(
        args,
        &channels,
        &next,
        args.volumes,
        budget,
        &names,
        volume_bytes,
    )
    .await;
    let last_point = size(&names);
    let cut_short = last_point.volumes < args.volumes as u64;
    let p = pool(&names);
    p.round.store(1_000, Ordering::Relaxed);
    say(&format!(
        "rates at {} volumes, {} snapshots",
        last_point.volumes, last_point.snapshots
    ));
    let at_last = rates(args, &channels, &p, &first_error, &say).await;

    let (disk_bytes, apparent_bytes) = disk_use(&data);
    let worker_state_bytes = std::fs::metadata(data.join("worker").join("state.json"))
        .map(|m| m.len())
        .unwrap_or(0);
    up.stop(Duration::from_secs(30)).await;

    let mut figures = Figures::default();
    let both = commit_s + fua_s;
    figures.push(
        "create_snapshot_p50",
        Figure::new(
            "CreateSnapshot p50",
            p50 * 1e3,
            "ms",
            both * 1e3,
            "SQLite commit + 4 KiB FUA write",
            Goal::ratio_at_most(CREATE_SNAPSHOT_TARGET),
        ),
    );
    figures.push(
        "create_snapshot_p99",
        Figure::new(
            "CreateSnapshot p99",
            p99 * 1e3,
            "ms",
            both * 1e3,
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
            disk_bytes as f64 / 1e6,
            "MB",
            apparent_bytes as f64 / 1e6,
            "apparent size of its files",
            Goal::value_at_most(DISK_LIMIT_MB),
        ),
    );
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
        fd_limit,
        load_start,
        load_end: load_average(),
        first_error: first_error.lock().expect("first error").clone(),
        figures,
        targets_met: 0,
        targets_missed: 0,
        elapsed_secs: t0.elapsed().as_secs_f64(),
    };
    (report.targets_met, report.targets_missed) = report.figures.tally();
    Ok(report)
}

/// Figure ids are `&'static str`; a run makes a few dozen.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

async fn wait_for_worker(vols: &mut Volumes, bytes: u64) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..300 {
        match vols
            .create_volume(calls::create_volume_request("probe", bytes))
            .await
        {
            Ok(_) => {
                vols.delete_volume(cowsnap_proto::cowsnap::v1::DeleteVolumeRequest {
                    name: "volumes/probe".into(),
                    ..Default::default()
                })
                .await
                .context("deleting the probe volume")?;
                return Ok(());
            }
            Err(s) => last = Some(s),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the control service found no worker: {last:?}")
}

/// p50 and p99 (seconds) of CreateSnapshot, each on a volume that was
/// just written to with FUA through its NBD export.
async fn create_snapshot_latency(
    args: &ApiArgs,
    ch: &Channel,
    nbd: u16,
    bytes: u64,
) -> anyhow::Result<(f64, f64)> {
    let mut vols = Volumes::new(ch.clone());
    let mut snaps = Snapshots::new(ch.clone());
    let addr = format!("127.0.0.1:{nbd}");
    let block = 16 * 1024.min(bytes as usize);
    let block = block.min(bytes as usize);
    let data: Vec<u8> = (0..block).map(|i| (i * 7 + 1) as u8).collect();
    let mut lat = Vec::with_capacity(args.latency_samples);
    let mut client: Option<NbdClient> = None;
    for i in 0..args.latency_samples {
        let vol = format!("lat-{}", i / 10);
        if i % 10 == 0 {
            if let Some(c) = client.take() {
                c.close().await;
            }
            vols.create_volume(calls::create_volume_request(&vol, bytes))
                .await
                .with_context(|| format!("creating volumes/{vol}"))?;
            let mut c = NbdClient::connect(&addr, &format!("volumes/{vol}"))
                .await
                .map_err(|e| anyhow::anyhow!("NBD connect to volumes/{vol}: {e:?}"))?;
            // Some data everywhere first.
            for off in (0..bytes).step_by(block) {
                c.write(off, &data[..block.min((bytes - off) as usize)], true)
                    .await
                    .map_err(|e| anyhow::anyhow!("NBD write: {e:?}"))?;
            }
            client = Some(c);
        }
        let c = client.as_mut().expect("connected");
        let off = (i as u64 * block as u64) % (bytes - bytes % block as u64).max(block as u64);
        c.write(off, &data, true)
            .await
            .map_err(|e| anyhow::anyhow!("NBD write: {e:?}"))?;
        let t = Instant::now();
        snaps
            .create_snapshot(calls::create_snapshot_request(
                &format!("volumes/{vol}"),
                &format!("s{i}"),
            ))
            .await
            .with_context(|| format!("snapshot {i} of volumes/{vol}"))?;
        lat.push(t.elapsed().as_secs_f64());
    }
    if let Some(c) = client.take() {
        c.close().await;
    }
    Ok((
        baseline::percentile(&mut lat, 0.5),
        baseline::percentile(&mut lat, 0.99),
    ))
}

fn size(names: &Mutex<(Vec<String>, Vec<String>)>) -> Size {
    let n = names.lock().expect("names");
    Size {
        volumes: n.0.len() as u64,
        snapshots: n.1.len() as u64,
    }
}

/// Grows the catalog to `to` volumes (each with its snapshots), from
/// `--grow-clients` clients, until `budget`.
async fn grow(
    args: &ApiArgs,
    channels: &[Channel],
    next: &Arc<AtomicUsize>,
    to: usize,
    budget: Instant,
    names: &Arc<Mutex<(Vec<String>, Vec<String>)>>,
    bytes: u64,
) -> Growth {
    let start = Instant::now();
    let vol_ns = Arc::new(AtomicU64::new(0));
    let snap_ns = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..args.grow_clients {
        let ch = channels[c % channels.len()].clone();
        let (next, names, vol_ns, snap_ns, errors) = (
            next.clone(),
            names.clone(),
            vol_ns.clone(),
            snap_ns.clone(),
            errors.clone(),
        );
        let per = args.snapshots_per_volume;
        tasks.push(tokio::spawn(async move {
            let mut vols = Volumes::new(ch.clone());
            let mut snaps = Snapshots::new(ch);
            let (mut nv, mut ns) = (0u64, 0u64);
            while Instant::now() < budget {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= to {
                    next.fetch_sub(1, Ordering::Relaxed);
                    break;
                }
                let t = Instant::now();
                let v = match vols
                    .create_volume(calls::create_volume_request(&format!("g{i:06}"), bytes))
                    .await
                {
                    Ok(v) => v.into_inner().name,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                vol_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                nv += 1;
                let mut made = Vec::with_capacity(per);
                for k in 0..per {
                    let t = Instant::now();
                    match snaps
                        .create_snapshot(calls::create_snapshot_request(&v, &format!("s{k}")))
                        .await
                    {
                        Ok(s) => {
                            snap_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                            ns += 1;
                            made.push(s.into_inner().name);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                let mut n = names.lock().expect("names");
                n.0.push(v);
                n.1.extend(made);
            }
            (nv, ns)
        }));
    }
    let (mut nv, mut ns) = (0, 0);
    for t in tasks {
        if let Ok((v, s)) = t.await {
            nv += v;
            ns += s;
        }
    }
    let ms = |total: &AtomicU64, n: u64| {
        if n == 0 {
            0.0
        } else {
            total.load(Ordering::Relaxed) as f64 / n as f64 / 1e6
        }
    };
    Growth {
        volumes_created: nv,
        snapshots_created: ns,
        errors: errors.load(Ordering::Relaxed),
        secs: start.elapsed().as_secs_f64(),
        create_volume_ms: ms(&vol_ns, nv),
        create_snapshot_ms: ms(&snap_ns, ns),
    }
}

/// Every kind's rate at every concurrency level: `[kind][clients]`.
async fn rates(
    args: &ApiArgs,
    channels: &[Channel],
    pool: &Arc<Pool>,
    first_error: &Arc<Mutex<Option<String>>>,
    say: &impl Fn(&str),
) -> Vec<Vec<Rate>> {
    let mut out = vec![vec![Rate::default(); CLIENTS.len()]; Kind::ALL.len()];
    for (j, &clients) in CLIENTS.iter().enumerate() {
        for (i, &kind) in Kind::ALL.iter().enumerate() {
            let r = calls::rate(
                channels,
                pool,
                kind,
                clients,
                args.measure_secs,
                first_error,
            )
            .await;
            say(&format!(
                "{} x{clients}: {:.0} calls/s ({} errors)",
                kind.label(),
                r.per_sec(),
                r.errors
            ));
            out[i][j] = r;
        }
    }
    out
}

/// Bytes allocated (`st_blocks`) and apparent (`st_size`) under `dir`.
fn disk_use(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut used, mut apparent) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                used += m.blocks() * 512;
                apparent += m.size();
            }
        }
    }
    (used, apparent)
}

fn table(args: &ApiArgs, r: &Report) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "cowsnap bench api: cowsnap up (I/O backend {}), volumes of {} KiB, rates over {} s each",
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
        "worker state.json at the end: {:.1} MB (rewritten whole, once per snapshot create or delete); {}",
        r.worker_state_bytes as f64 / 1e6,
        r.fd_limit
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
