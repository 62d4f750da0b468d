//! `cowsnap bench store`: the exception store and COW engine against the raw
//! device, measured in one run on the same files through the same backend.
//!
//! Order of a run: pre-write every file that is measured (so no figure pays
//! for block allocation); the latency of a flush and of a DSYNC write (what
//! a commit costs); raw R, W and 4 KiB random-write IOPS on the origin file,
//! alternating with the engine with one snapshot (snapshot read of chunks not yet copied,
//! first write of every chunk, overwrite, 4 KiB random overwrite, snapshot read
//! of copied chunks); first write with eight snapshots; then the load of a COW
//! device with N exceptions and the RAM it keeps.
//!
//! A first write goes through the engine's write-back path (plain writes
//! acknowledged while held, D13 of docs/design.md); its timed run ends with
//! a FLUSH, so the figure counts only durable work.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail};
use cowsnap_store::format::DEFAULT_CHUNK_SECTORS;
use cowsnap_store::{
    AlignedBuf, Backend, BackendChoice, CommitStats, Device, Layout, Origin, SnapshotOptions,
    Target,
};

use super::files::{in_scratch, sparse_file};
use super::load;
use super::report::{Baseline, Figure, Figures, Goal, Report};
use super::workload::{
    IoPath, Run, durability_latency, pattern, prewrite, random_write, seq_read, seq_write,
};

#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// Directory in which a fresh scratch subdirectory is made (and removed
    /// at the end). Must be on a disk file system: O_DIRECT does not work
    /// on tmpfs. Default: the current directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// I/O backend: auto (io_uring when the kernel allows it), uring or portable.
    #[arg(long, default_value = "auto")]
    io: BackendChoice,
    /// Chunk size of the COW devices, in 512-byte sectors.
    #[arg(long, default_value_t = DEFAULT_CHUNK_SECTORS)]
    chunk_sectors: u32,
    /// Small sizes (seconds, for a smoke test); the figures are noisier.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Writers (or readers) in flight.
    #[arg(long, default_value_t = 32)]
    depth: usize,
    /// Origin region of the bandwidth figures, in MiB (default 512, quick 32).
    #[arg(long)]
    size_mib: Option<u64>,
    /// Exceptions in the COW device of the load figures (default 1048576,
    /// quick 65536).
    #[arg(long)]
    exceptions: Option<u64>,
}

/// A first-write run through the write-back path, timed to the end of
/// the FLUSH that makes it durable.
async fn first_write(
    path: &IoPath,
    start: u64,
    len: u64,
    io: u64,
    depth: usize,
    data: &Arc<AlignedBuf>,
) -> anyhow::Result<Run> {
    let mut r = seq_write(path, start, len, io, depth, data).await?;
    let t = Instant::now();
    path.flush().await?;
    r.secs += t.elapsed().as_secs_f64();
    Ok(r)
}

/// Sizes of one run.
struct Plan {
    /// Origin bytes written and read by the bandwidth figures.
    region: u64,
    /// Origin bytes first-written with eight snapshots (nine writes each).
    region8: u64,
    /// 4 KiB random writes per IOPS figure.
    random_ops: u64,
    /// Exceptions of the load figure.
    exceptions: u64,
    /// Loads timed (the fastest counts, as for the raw read).
    load_reps: usize,
    /// Rounds of raw and engine runs (each on a slice of the region).
    rounds: u64,
}

impl Plan {
    fn new(args: &StoreArgs, layout: Layout) -> anyhow::Result<Plan> {
        const MIB: u64 = 1 << 20;
        let region = args.size_mib.unwrap_or(if args.quick { 32 } else { 512 }) * MIB;
        if region < layout.chunk_bytes() * 64 || !region.is_multiple_of(layout.chunk_bytes()) {
            bail!("--size-mib: the region must hold at least 64 chunks");
        }
        let exceptions = args
            .exceptions
            .unwrap_or(if args.quick { 1 << 16 } else { 1 << 20 });
        if exceptions == 0 {
            bail!("--exceptions must be positive");
        }
        Ok(Plan {
            region,
            region8: (region / 4).next_multiple_of(layout.chunk_bytes()),
            random_ops: if args.quick { 4096 } else { 98304 },
            exceptions,
            load_reps: if args.quick { 2 } else { 3 },
            rounds: if args.quick { 2 } else { 5 },
        })
    }
}

pub fn run(args: StoreArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    let layout = Layout::new(args.chunk_sectors).map_err(|e| anyhow!("--chunk-sectors: {e}"))?;
    let plan = Plan::new(&args, layout)?;
    let backend = Backend::start(args.io).map_err(|e| anyhow!("--io: {e}"))?;
    let mut report = in_scratch(args.dir.as_deref(), async |dir| {
        measure(&args, &plan, &backend, layout, dir).await
    })?;
    report.elapsed_secs = started.elapsed().as_secs_f64();
    report.tally();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(0)
}

/// Bytes of a COW device with room for `exceptions` exceptions (rounded up
/// to whole MiB).
fn cow_bytes(layout: Layout, exceptions: u64) -> u64 {
    let areas = exceptions / layout.exceptions_per_area() + 2;
    let bytes = ((2 + areas + exceptions) * layout.chunk_bytes()).next_multiple_of(1 << 20);
    debug_assert!(layout.capacity(bytes) >= exceptions);
    bytes
}

fn diff_stats(before: CommitStats, after: CommitStats) -> CommitStats {
    CommitStats {
        commits: after.commits - before.commits,
        exceptions: after.exceptions - before.exceptions,
    }
}

fn sum_stats(a: CommitStats, b: CommitStats) -> CommitStats {
    CommitStats {
        commits: a.commits + b.commits,
        exceptions: a.exceptions + b.exceptions,
    }
}

/// The fastest of a figure's rounds.
#[derive(Default)]
struct Best(Option<Run>);

impl Best {
    fn add(&mut self, r: Run) {
        if self
            .0
            .is_none_or(|b| r.bytes as f64 / r.secs > b.bytes as f64 / b.secs)
        {
            self.0 = Some(r);
        }
    }

    fn mb_per_s(&self) -> f64 {
        self.0.map_or(0.0, |r| r.mb_per_s())
    }

    fn iops(&self) -> f64 {
        self.0.map_or(0.0, |r| r.iops())
    }
}

async fn measure(
    args: &StoreArgs,
    plan: &Plan,
    backend: &Backend,
    layout: Layout,
    dir: &std::path::Path,
) -> anyhow::Result<Report> {
    let say = |m: &str| {
        if !args.json {
            eprintln!("  .. {m}");
        }
    };
    let cb = layout.chunk_bytes();
    let depth = args.depth;
    let region = plan.region;
    let data = Arc::new(pattern((cb as usize).max(1 << 20), 1));

    // Files, all pre-written: the baseline and the engine then overwrite the
    // same allocated blocks, and neither pays for allocation.
    let origin_dev = backend.open(&sparse_file(&dir.join("origin.img"), region)?, true)?;
    let mut cows: Vec<Device> = Vec::new();
    for i in 0..8 {
        let need = if i == 0 { region } else { plan.region8 } / cb;
        let path = sparse_file(&dir.join(format!("cow{i}.img")), cow_bytes(layout, need))?;
        cows.push(backend.open(&path, true)?);
    }
    say(&format!(
        "pre-writing the origin ({} MiB) and 8 COW files ({} MiB in all)",
        region >> 20,
        cows.iter().map(|c| c.size()).sum::<u64>() >> 20
    ));
    let mut pre = vec![prewrite(&origin_dev, Some(&data)).await?];
    for c in &cows {
        pre.push(prewrite(c, None).await?);
    }
    let prewrite_mb_s = pre.iter().map(|r| r.bytes).sum::<u64>() as f64
        / pre.iter().map(|r| r.secs).sum::<f64>()
        / 1e6;

    // The raw device and the engine run alternately on slices of the
    // region, each pair close in time; a figure is the best of its rounds
    // on either side, which keeps other load on the machine out of the ratio.
    let rounds = plan.rounds;
    let slice = |k: u64, len: u64| {
        let per = (len / rounds / cb) * cb;
        let start = k * per;
        (start, if k + 1 == rounds { len - start } else { per })
    };
    let raw = IoPath::Raw(origin_dev.clone());
    // What one commit costs on this device: a flush, then a DSYNC area
    // write (measured on a data chunk of a COW file not yet in use).
    let dur = durability_latency(
        &cows[1],
        cows[1].size() - cb,
        cb,
        if args.quick { 8 } else { 32 },
    )
    .await?;
    let (flush_s, dsync_s, commit_s) = (dur.flush_s, dur.dsync_s, dur.commit_s);
    let commit_bound = depth as f64 * cb as f64 / commit_s / 1e6;
    let opts = SnapshotOptions {
        chunk_sectors: Some(layout.chunk_sectors()),
        merging: false,
        size: None,
    };
    let origin = Arc::new(Origin::new(origin_dev.clone())?);
    let added = origin.add_snapshot(cows[0].clone(), opts).await?;
    if !added.initialised {
        bail!("{}: expected a new COW device", cows[0].name());
    }
    let snap = IoPath::Engine(origin.clone(), Target::Snapshot(added.id));
    let org = IoPath::Engine(origin.clone(), Target::Origin);

    say("raw R and W, engine with 1 snapshot: snapshot read of uncopied chunks, first write");
    let (mut raw_r, mut raw_w, mut snap_read_origin, mut first) = (
        Best::default(),
        Best::default(),
        Best::default(),
        Best::default(),
    );
    let mut c1 = CommitStats::default();
    for k in 0..rounds {
        let (s, l) = slice(k, region);
        raw_r.add(seq_read(&raw, s, l, cb, depth).await?);
        snap_read_origin.add(seq_read(&snap, s, l, cb, depth).await?);
        raw_w.add(seq_write(&raw, s, l, cb, depth, &data).await?);
        let c0 = origin.commit_stats();
        first.add(first_write(&org, s, l, cb, depth, &data).await?);
        c1 = sum_stats(c1, diff_stats(c0, origin.commit_stats()));
    }
    check_snapshots(&origin, region / cb)?;
    let wb1 = origin.writeback_stats();
    let (rr, ww) = (raw_r.mb_per_s(), raw_w.mb_per_s());
    let bound1 = 1.0 / (1.0 / rr + 2.0 / ww);
    let bound8 = 1.0 / (1.0 / rr + 9.0 / ww);

    say("overwrite of copied chunks, 4 KiB random overwrite, snapshot read of copied chunks");
    let (mut raw_w2, mut over) = (Best::default(), Best::default());
    for k in 0..rounds {
        let (s, l) = slice(k, region);
        raw_w2.add(seq_write(&raw, s, l, cb, depth, &data).await?);
        over.add(seq_write(&org, s, l, cb, depth, &data).await?);
    }
    let (mut raw_iops, mut over4k) = (Best::default(), Best::default());
    let ops = plan.random_ops / rounds;
    for k in 0..rounds {
        raw_iops.add(random_write(&raw, region, 4096, (ops, k * ops), depth, &data).await?);
        over4k.add(random_write(&org, region, 4096, (ops, k * ops), depth, &data).await?);
    }
    let (mut raw_r2, mut snap_read_cow) = (Best::default(), Best::default());
    for k in 0..rounds {
        let (s, l) = slice(k, region);
        raw_r2.add(seq_read(&raw, s, l, cb, depth).await?);
        snap_read_cow.add(seq_read(&snap, s, l, cb, depth).await?);
    }
    check_snapshots(&origin, region / cb)?;
    origin.delete_snapshot(added.id).await?;
    drop((snap, org, origin));
    let (commits1, exc1, per1) = (c1.commits, c1.exceptions, c1.per_commit());

    // Engine, eight snapshots. cow0 is made new again (zero header).
    say("engine, 8 snapshots: first write");
    cows[0]
        .write(0, AlignedBuf::zeroed(cb as usize), false)
        .await?;
    cows[0].flush().await?;
    let origin = Arc::new(Origin::new(origin_dev.clone())?);
    for c in &cows {
        origin.add_snapshot(c.clone(), opts).await?;
    }
    let org = IoPath::Engine(origin.clone(), Target::Origin);
    let mut first8 = Best::default();
    let mut c8 = CommitStats::default();
    for k in 0..rounds {
        let (s, l) = slice(k, plan.region8);
        let c0 = origin.commit_stats();
        first8.add(first_write(&org, s, l, cb, depth, &data).await?);
        c8 = sum_stats(c8, diff_stats(c0, origin.commit_stats()));
    }
    check_snapshots(&origin, plan.region8 / cb)?;
    let wb8 = origin.writeback_stats();
    for id in origin.snapshot_ids() {
        origin.delete_snapshot(id).await?;
    }
    drop((org, origin));
    let (commits8, exc8, per8) = (c8.commits, c8.exceptions, c8.per_commit());

    // Load.
    say(&format!(
        "load: building a COW device with {} exceptions",
        plan.exceptions
    ));
    let lc = load::build(backend, dir, layout, plan.exceptions).await?;
    say("load: raw metadata read and add_snapshot");
    let mut loads = Vec::new();
    for _ in 0..plan.load_reps {
        loads.push(load::measure(&lc).await?);
    }
    let raw_load = loads
        .iter()
        .map(|l| l.raw_secs)
        .fold(f64::INFINITY, f64::min);
    let load_secs = loads
        .iter()
        .map(|l| l.load_secs)
        .fold(f64::INFINITY, f64::min);
    let retained = loads.iter().map(|l| l.retained_bytes).min().unwrap_or(0);
    let peak = loads.iter().map(|l| l.peak_bytes).max().unwrap_or(0);
    let nexc = plan.exceptions as f64;

    let mut figures = Figures::default();
    figures.push(
        "first_write",
        Figure::new(
            "origin first write, 1 snapshot",
            first.mb_per_s(),
            "MB/s",
            bound1,
            "1/(1/R+2/W)",
            Goal::ratio_at_least(0.9),
        )
        .note(format!(
            "write-back: {} writes held, at most {} MiB at once (cap {} MiB), in {} batches of up to {} writes; \
             each round ends with a FLUSH, counted in the time (raw W has none)",
            wb1.held_writes,
            wb1.max_held_bytes >> 20,
            wb1.cap >> 20,
            wb1.batches,
            wb1.max_batch
        )),
    );
    figures.push(
        "first_write_commit_bound",
        Figure::new(
            "origin first write, 1 snapshot, vs commit latency",
            first.mb_per_s(),
            "MB/s",
            commit_bound,
            "depth×chunk/commit",
            None,
        )
        .note(format!(
            "a commit is a flush and a DSYNC area write as one request, {:.2} ms \
             (taken apart, one at a time: flush {:.2} ms, then DSYNC write {:.2} ms); had each first write waited for its \
             commit, {depth} writers of one chunk each would keep at most {depth} exceptions in flight, bounding it at {commit_bound:.0} MB/s; \
             write-back acknowledges before the commit, so commits carry what is held",
            commit_s * 1e3,
            flush_s * 1e3,
            dsync_s * 1e3
        )),
    );
    figures.push(
        "overwrite",
        Figure::new(
            "origin overwrite, chunks copied",
            over.mb_per_s(),
            "MB/s",
            raw_w2.mb_per_s(),
            "raw W",
            Goal::ratio_at_least(0.95),
        ),
    );
    figures.push(
        "overwrite_random_4k",
        Figure::new(
            "origin 4 KiB random overwrite, chunks copied",
            over4k.iops(),
            "IOPS",
            raw_iops.iops(),
            "raw 4 KiB random write",
            Goal::ratio_at_least(0.95),
        ),
    );
    figures.push(
        "snapshot_read_cow",
        Figure::new(
            "snapshot read, copied chunks (COW)",
            snap_read_cow.mb_per_s(),
            "MB/s",
            raw_r2.mb_per_s(),
            "raw R",
            Goal::ratio_at_least(0.95),
        ),
    );
    figures.push(
        "snapshot_read_origin",
        Figure::new(
            "snapshot read, uncopied chunks (origin)",
            snap_read_origin.mb_per_s(),
            "MB/s",
            rr,
            "raw R",
            Goal::ratio_at_least(0.95),
        ),
    );
    figures.push(
        "exceptions_per_commit",
        Figure::new(
            &format!("exceptions per commit, {depth} writers"),
            per1,
            "exc/commit",
            depth as f64,
            "writers in flight",
            Goal::value_at_least(16.0),
        )
        .note(format!(
            "{exc1} exceptions in {commits1} commits during the first write"
        )),
    );
    figures.push(
        "first_write_8_bound",
        Figure::new(
            "origin first write, 8 snapshots",
            first8.mb_per_s(),
            "MB/s",
            bound8,
            "1/(1/R+9/W)",
            Goal::ratio_at_least(0.9),
        )
        .note(format!(
            "each first write reads one chunk and writes 9 (8 copies and the origin); {exc8} exceptions in {commits8} commits \
             ({per8:.1} per commit, 8 COW devices); write-back: {} batches of up to {} writes",
            wb8.batches, wb8.max_batch
        )),
    );
    figures.push(
        "load_time",
        Figure::new(
            &format!("load {} exceptions (add_snapshot)", plan.exceptions),
            load_secs * 1e3,
            "ms",
            raw_load * 1e3,
            &format!("raw read of {} areas", lc.area_offsets.len()),
            Goal::ratio_at_most(2.0),
        )
        .note(format!(
            "raw: the same {} metadata chunks read with O_DIRECT, {} in flight as the scanner reads ahead; best of {} for both",
            lc.area_offsets.len(),
            load::SCAN_DEPTH,
            plan.load_reps
        )),
    );
    figures.push(
        "ram_per_exception",
        Figure::new(
            "RAM per loaded exception",
            retained as f64 / nexc,
            "B",
            16.0,
            "on-disk record",
            Goal::value_at_most(48.0),
        )
        .note(format!(
            "heap bytes live after the load minus before (counting allocator, requested sizes); peak during the load {:.1} B per exception",
            peak as f64 / nexc
        )),
    );

    let prep = format!(
        "origin ({} MiB) and COW files pre-written with O_DIRECT and flushed before any measurement, so the baseline and the engine \
         overwrite the same allocated blocks; raw and engine runs alternate in {rounds} rounds on slices of the region and each side \
         of a ratio is its best round; the load-test COW and its origin are sparse files with only the header and the {} areas written",
        region >> 20,
        lc.area_offsets.len()
    );
    Ok(Report {
        backend: backend.name(),
        chunk_sectors: layout.chunk_sectors(),
        chunk_bytes: cb,
        depth,
        quick: args.quick,
        dir: dir.display().to_string(),
        preparation: prep,
        region_bytes: region,
        region_8_bytes: plan.region8,
        random_write_ops: plan.random_ops,
        load_exceptions: plan.exceptions,
        baseline: Baseline {
            read_mb_s: rr,
            write_mb_s: ww,
            random_write_4k_iops: raw_iops.iops(),
            prewrite_mb_s,
            first_write_bound_mb_s: bound1,
            first_write_bound_8_mb_s: bound8,
            flush_ms: flush_s * 1e3,
            dsync_write_ms: dsync_s * 1e3,
            commit_ms: commit_s * 1e3,
        },
        figures,
        commits: serde_json::json!({
            "one_snapshot": {"commits": commits1, "exceptions": exc1, "per_commit": per1},
            "eight_snapshots": {"commits": commits8, "exceptions": exc8, "per_commit": per8},
        }),
        targets_met: 0,
        targets_missed: 0,
        elapsed_secs: 0.0,
    })
}

/// Every snapshot of `origin` is valid and holds `chunks` exceptions: the
/// workload did what the figure claims.
fn check_snapshots(origin: &Origin, chunks: u64) -> anyhow::Result<()> {
    for id in origin.snapshot_ids() {
        let st = origin.status(id)?;
        if !st.valid || st.exceptions != chunks {
            bail!(
                "{}: after the first write the snapshot is {} with {} exceptions, expected valid with {chunks}",
                st.device,
                if st.valid { "valid" } else { "invalid" },
                st.exceptions
            );
        }
    }
    Ok(())
}
