//! `cowsnap bench soak`: the whole product under steady load while its
//! worker is killed with `kill -9` at intervals, for a set time.
//!
//! It starts `cowsnap control` and `cowsnap worker` as processes of their
//! own on a scratch directory, then runs clients against them:
//!
//! - half are API clients ([`api`]): they create and delete volumes and
//!   snapshots, list and get them, and keep a tally of the errors;
//! - half are NBD clients ([`io`]), each on a volume of its own: writes with
//!   FUA, or plain writes made durable by a flush, reads, and snapshots
//!   taken through the API. Each remembers what the worker acknowledged;
//!   after every restart (its connection breaks) it reads its volume and
//!   its snapshots back: an acknowledged durable write must be there, and
//!   a snapshot must hold what the volume held when it was taken.
//!
//! Meanwhile the worker is killed every `--kill-every` seconds and
//! started again; the resident memory and open descriptors of both
//! processes are sampled each time ([`procs`]). At the end it prints the
//! errors by kind, lost writes, snapshot mismatches, kills and the
//! memory/descriptor series, and exits 1 on a lost write, a mismatch, or
//! memory or descriptors that kept growing beyond the thresholds.

mod api;
mod io;
pub(super) mod nbd_client;
pub(super) mod procs;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use cowsnap_proto::cowsnap::v1 as pb;
use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use super::files::scratch_dir;
use procs::{Proc, free_port};

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// How long the clients run, in seconds.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Seconds between two kills of the worker (counted from the moment
    /// the previous one serves again).
    #[arg(long, default_value_t = 3.0)]
    kill_every: f64,
    /// Clients: half on the API, half doing NBD I/O.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Size of each NBD client's volume, in KiB (a multiple of 4).
    #[arg(long, default_value_t = 1024)]
    volume_kib: u64,
    /// Seed of the clients' random choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Largest growth of a process's resident memory from the start of the
    /// run to its end that is not a leak, in MiB.
    #[arg(long, default_value_t = 64)]
    max_rss_growth_mib: u64,
    /// Largest growth of a process's open descriptors that is not a leak.
    #[arg(long, default_value_t = 32)]
    max_fd_growth: u64,
    /// Directory in which a fresh scratch subdirectory is made (and removed
    /// afterwards). It must be on a disk file system: O_DIRECT fails on
    /// tmpfs. Default: the current directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the scratch directory (logs, catalog, devices) for a look.
    #[arg(long)]
    keep: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// What the clients saw, shared by all of them.
#[derive(Default)]
pub struct Tally {
    /// Calls and NBD requests that succeeded.
    pub ok: AtomicU64,
    /// "what: kind" → count, for every failure.
    errors: Mutex<BTreeMap<String, u64>>,
    /// Failures a kill does not explain (a wrong answer, INTERNAL, ...).
    unexpected: AtomicU64,
    pub acked_writes: AtomicU64,
    pub lost_writes: AtomicU64,
    /// Reads during a connection that missed a write acknowledged on it.
    pub read_mismatches: AtomicU64,
    pub snapshots_taken: AtomicU64,
    pub snapshots_checked: AtomicU64,
    pub snapshot_mismatches: AtomicU64,
    pub volume_checks: AtomicU64,
    /// The first findings, in words.
    findings: Mutex<Vec<String>>,
}

impl Tally {
    /// Counts a failure; one a kill does not explain is also a finding,
    /// with `detail`.
    pub fn error(&self, what: &str, kind: &str, expected: bool, detail: &str) {
        *self
            .errors
            .lock()
            .expect("tally")
            .entry(format!("{what}: {kind}"))
            .or_default() += 1;
        if !expected {
            self.unexpected.fetch_add(1, Ordering::Relaxed);
            self.finding(format!("unexpected error: {what}: {kind}: {detail:.300}"));
        }
    }

    pub fn finding(&self, s: String) {
        let mut f = self.findings.lock().expect("tally");
        if f.len() < 40 {
            eprintln!("soak: {s}");
            f.push(s);
        }
    }
}

/// Resident memory and descriptors of one process at one moment.
#[derive(Clone, Copy, Debug, Serialize)]
struct Usage {
    rss_kib: u64,
    fds: u64,
}

/// Device files under the worker's data dir: each holds a descriptor
/// open, so descriptors beyond them are what a leak would show.
fn device_files(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("worker").join("devices")).map_or(0, |d| d.count() as u64)
}

#[derive(Debug, Serialize)]
struct Sample {
    secs: f64,
    kills: u64,
    control: Option<Usage>,
    /// The worker just before it is killed (what one life grew to).
    worker_before_kill: Option<Usage>,
    /// The worker once it serves again.
    worker_after_restart: Option<Usage>,
    /// Device files of the worker then.
    devices: u64,
}

/// First, last and largest value of a series, and whether it grew: the
/// smallest value of its last quarter above the largest of its first.
#[derive(Debug, Serialize)]
struct Trend {
    first: u64,
    last: u64,
    max: u64,
    growth: i64,
    limit: u64,
    grew: bool,
}

fn trend(series: &[u64], limit: u64) -> Option<Trend> {
    if series.len() < 8 {
        return None;
    }
    let q = series.len() / 4;
    let early = *series[..q].iter().max()?;
    let late = *series[series.len() - q..].iter().min()?;
    let growth = late as i64 - early as i64;
    Some(Trend {
        first: series[0],
        last: *series.last()?,
        max: *series.iter().max()?,
        growth,
        limit,
        grew: growth > limit as i64,
    })
}

#[derive(Serialize)]
struct Report {
    duration_secs: f64,
    clients: usize,
    kills: u64,
    restart_secs_max: f64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    unexpected_errors: u64,
    acked_writes: u64,
    lost_writes: u64,
    read_mismatches: u64,
    volume_checks: u64,
    snapshots_taken: u64,
    snapshots_checked: u64,
    snapshot_mismatches: u64,
    trends: BTreeMap<String, Trend>,
    /// Volumes and snapshots still CREATING or DELETING once the worker
    /// has been left alone for a while.
    unsettled: usize,
    findings: Vec<String>,
    samples: Vec<Sample>,
    passed: bool,
}

pub fn run(args: SoakArgs) -> anyhow::Result<u8> {
    if args.clients < 2 {
        bail!("--clients: at least 2 (one API client, one NBD client)");
    }
    if args.volume_kib == 0 || !args.volume_kib.is_multiple_of(4) {
        bail!("--volume-kib: a positive multiple of 4");
    }
    if !args.kill_every.is_finite() || args.kill_every <= 0.0 {
        bail!("--kill-every: a positive number of seconds");
    }
    let parent = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::current_dir().context("the current directory")?,
    };
    let scratch = scratch_dir(&parent)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let report = rt.block_on(soak(&args, scratch.path().to_path_buf()));
    drop(rt);
    if args.keep {
        let kept = scratch.keep();
        eprintln!("soak: scratch directory kept at {}", kept.display());
    }
    let report = report?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(if report.passed { 0 } else { 1 })
}

/// The clients' view of the running system.
pub struct Env {
    pub api: String,
    pub nbd: String,
    pub tally: Tally,
    pub stop: Instant,
    pub volume_bytes: u64,
}

impl Env {
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(format!("http://{}", self.api))?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .connect_lazy())
    }

    pub fn done(&self) -> bool {
        Instant::now() >= self.stop
    }
}

async fn soak(args: &SoakArgs, dir: PathBuf) -> anyhow::Result<Report> {
    let (api_port, wgrpc, wnbd) = (free_port()?, free_port()?, free_port()?);
    let mut worker = Proc::new(
        "worker",
        vec![
            "worker".into(),
            "--data-dir".into(),
            dir.join("worker").display().to_string(),
            "--grpc-listen".into(),
            format!("127.0.0.1:{wgrpc}"),
            "--nbd-listen".into(),
            format!("127.0.0.1:{wnbd}"),
            "--node".into(),
            "soak".into(),
        ],
        &dir.join("worker.log"),
        vec![wgrpc, wnbd],
    );
    let mut control = Proc::new(
        "control",
        vec![
            "control".into(),
            "--data-dir".into(),
            dir.join("control").display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{api_port}"),
            "--worker".into(),
            format!("127.0.0.1:{wgrpc}"),
            "--health-interval".into(),
            "1s".into(),
            "--reconcile-interval".into(),
            "5s".into(),
        ],
        &dir.join("control.log"),
        vec![api_port],
    );
    worker.spawn()?;
    worker.ready(Duration::from_secs(60)).await?;
    control.spawn()?;
    control.ready(Duration::from_secs(60)).await?;

    let started = Instant::now();
    let env = Arc::new(Env {
        api: format!("127.0.0.1:{api_port}"),
        nbd: format!("127.0.0.1:{wnbd}"),
        tally: Tally::default(),
        stop: started + Duration::from_secs(args.duration),
        volume_bytes: args.volume_kib * 1024,
    });

    // The NBD clients' volumes exist before the first kill.
    let io_clients = args.clients / 2;
    let mut api = pb::volume_service_client::VolumeServiceClient::new(env.channel().await?);
    for i in 0..io_clients {
        api::create_volume_retrying(&mut api, &io::volume_id(i), env.volume_bytes)
            .await
            .with_context(|| format!("creating the volume of NBD client {i}"))?;
    }

    let mut tasks = Vec::new();
    for i in 0..io_clients {
        tasks.push(tokio::spawn(io::client(env.clone(), i, args.seed)));
    }
    for i in 0..args.clients - io_clients {
        tasks.push(tokio::spawn(api::client(env.clone(), i, args.seed)));
    }

    // The killer.
    let sample = |kills, worker_before, worker: &Proc, control: &Proc| Sample {
        secs: started.elapsed().as_secs_f64(),
        kills,
        control: control.usage().map(|(rss_kib, fds)| Usage { rss_kib, fds }),
        worker_before_kill: worker_before,
        worker_after_restart: worker.usage().map(|(rss_kib, fds)| Usage { rss_kib, fds }),
        devices: device_files(&dir),
    };
    let mut samples = vec![sample(0, None, &worker, &control)];
    let mut kills = 0u64;
    let mut restart_max = 0f64;
    let every = Duration::from_secs_f64(args.kill_every);
    while Instant::now() + every < env.stop {
        tokio::time::sleep(every).await;
        let before = worker.usage().map(|(rss_kib, fds)| Usage { rss_kib, fds });
        let devices_before = device_files(&dir);
        worker.kill9()?;
        kills += 1;
        let t = Instant::now();
        worker.spawn()?;
        worker.ready(Duration::from_secs(120)).await?;
        restart_max = restart_max.max(t.elapsed().as_secs_f64());
        let mut s = sample(kills, before, &worker, &control);
        // Judged against the devices the worker had when it was killed.
        s.worker_before_kill = s.worker_before_kill.map(|u| Usage {
            fds: u.fds.saturating_sub(devices_before),
            ..u
        });
        samples.push(s);
    }
    for t in tasks {
        t.await.context("a client task panicked")?;
    }
    let duration = started.elapsed().as_secs_f64();
    samples.push(sample(kills, None, &worker, &control));
    let unsettled = settle(&env, Duration::from_secs(30)).await;
    if !unsettled.is_empty() {
        env.tally.finding(format!(
            "{} volumes or snapshots still creating or deleting 30 s after the last kill, e.g. {}",
            unsettled.len(),
            unsettled[..unsettled.len().min(3)].join(", ")
        ));
    }
    control.stop(Duration::from_secs(10)).await;
    worker.stop(Duration::from_secs(10)).await;

    let mut trends = BTreeMap::new();
    let rss_limit = args.max_rss_growth_mib * 1024;
    let series =
        |f: &dyn Fn(&Sample) -> Option<u64>| samples.iter().filter_map(f).collect::<Vec<u64>>();
    let mut add = |name: &str, s: Vec<u64>, limit: u64| {
        if let Some(t) = trend(&s, limit) {
            trends.insert(name.to_string(), t);
        }
    };
    add(
        "control rss KiB",
        series(&|s| s.control.map(|u| u.rss_kib)),
        rss_limit,
    );
    add(
        "control fds",
        series(&|s| s.control.map(|u| u.fds)),
        args.max_fd_growth,
    );
    add(
        "worker rss KiB before kill",
        series(&|s| s.worker_before_kill.map(|u| u.rss_kib)),
        rss_limit,
    );
    add(
        "worker fds-devices before kill",
        series(&|s| s.worker_before_kill.map(|u| u.fds)),
        args.max_fd_growth,
    );
    add(
        "worker rss KiB after restart",
        series(&|s| s.worker_after_restart.map(|u| u.rss_kib)),
        rss_limit,
    );
    add(
        "worker fds-devices restarted",
        series(&|s| {
            s.worker_after_restart
                .map(|u| u.fds.saturating_sub(s.devices))
        }),
        args.max_fd_growth,
    );
    add(
        "worker device files",
        series(&|s| Some(s.devices)),
        u64::MAX / 2,
    );

    let t = &env.tally;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let lost = get(&t.lost_writes);
    let mismatches = get(&t.snapshot_mismatches) + get(&t.read_mismatches);
    let grew = trends.values().any(|t| t.grew);
    Ok(Report {
        duration_secs: duration,
        clients: args.clients,
        kills,
        restart_secs_max: restart_max,
        ok: get(&t.ok),
        errors: t.errors.lock().expect("tally").clone(),
        unexpected_errors: get(&t.unexpected),
        acked_writes: get(&t.acked_writes),
        lost_writes: lost,
        read_mismatches: get(&t.read_mismatches),
        volume_checks: get(&t.volume_checks),
        snapshots_taken: get(&t.snapshots_taken),
        snapshots_checked: get(&t.snapshots_checked),
        snapshot_mismatches: get(&t.snapshot_mismatches),
        trends,
        unsettled: unsettled.len(),
        findings: t.findings.lock().expect("tally").clone(),
        samples,
        passed: lost == 0 && mismatches == 0 && !grew,
    })
}

/// Waits (up to `limit`) until no volume or snapshot is CREATING or
/// DELETING; the names still so at the end.
async fn settle(env: &Env, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let Ok(ch) = env.channel().await else {
        return vec!["(no channel)".into()];
    };
    let mut volumes = pb::volume_service_client::VolumeServiceClient::new(ch.clone());
    let mut snapshots = pb::snapshot_service_client::SnapshotServiceClient::new(ch);
    let busy = |s: i32| {
        matches!(
            pb::State::try_from(s),
            Ok(pb::State::Creating | pb::State::Deleting)
        )
    };
    loop {
        let mut names = Vec::new();
        let mut token = String::new();
        loop {
            let Ok(r) = volumes
                .list_volumes(pb::ListVolumesRequest {
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                })
                .await
            else {
                break;
            };
            let r = r.into_inner();
            names.extend(
                r.volumes
                    .iter()
                    .filter(|v| busy(v.state))
                    .map(|v| v.name.clone()),
            );
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        let mut token = String::new();
        loop {
            let Ok(r) = snapshots
                .list_snapshots(pb::ListSnapshotsRequest {
                    parent: "volumes/-".into(),
                    page_size: 1000,
                    page_token: token,
                })
                .await
            else {
                break;
            };
            let r = r.into_inner();
            names.extend(
                r.snapshots
                    .iter()
                    .filter(|s| busy(s.state))
                    .map(|s| s.name.clone()),
            );
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        if names.is_empty() || Instant::now() >= deadline {
            return names;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "soak: {:.0} s, {} clients, {} kills of the worker (slowest restart {:.2} s)",
        r.duration_secs, r.clients, r.kills, r.restart_secs_max
    );
    let _ = writeln!(
        s,
        "  {} calls and requests succeeded; {} acknowledged durable writes",
        r.ok, r.acked_writes
    );
    let _ = writeln!(
        s,
        "  lost writes: {}   read mismatches: {}   snapshot mismatches: {}",
        r.lost_writes, r.read_mismatches, r.snapshot_mismatches
    );
    let _ = writeln!(
        s,
        "  volume checks after restarts: {}   snapshots taken: {}, checked: {}",
        r.volume_checks, r.snapshots_taken, r.snapshots_checked
    );
    let _ = writeln!(
        s,
        "  left creating or deleting after 30 s without kills: {}",
        r.unsettled
    );
    let total: u64 = r.errors.values().sum();
    let _ = writeln!(
        s,
        "  errors: {total} ({} not explained by a kill)",
        r.unexpected_errors
    );
    for (k, n) in &r.errors {
        let _ = writeln!(s, "    {n:>7}  {k}");
    }
    let _ = writeln!(
        s,
        "  {:<30} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "series", "first", "last", "max", "growth", "limit"
    );
    for (k, t) in &r.trends {
        let _ = writeln!(
            s,
            "  {:<30} {:>9} {:>9} {:>9} {:>9} {:>9}{}",
            k,
            t.first,
            t.last,
            t.max,
            t.growth,
            t.limit,
            if t.grew { "  GREW" } else { "" }
        );
    }
    if r.trends.is_empty() {
        let _ = writeln!(s, "  (too few samples to judge memory and descriptors)");
    }
    for f in &r.findings {
        let _ = writeln!(s, "  finding: {f}");
    }
    let _ = writeln!(s, "soak: {}", if r.passed { "passed" } else { "FAILED" });
    s
}
