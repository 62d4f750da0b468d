//! `cowsnap cow delta`: the byte ranges where a snapshot may differ from its
//! origin, or two snapshots of one origin from each other: the base for
//! changed-block tracking.
//!
//! From the metadata alone (the default), by the rule of
//! [`cowsnap_store::delta`] (the worker's live `GetSnapshotDelta` uses the
//! same): with one COW device the ranges are its exceptions' origin chunks;
//! with two, the union of both sets. `--exact` then reads both
//! sides through the engine and drops the pieces (of the smaller chunk size)
//! whose data is identical.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::bail;
use cowsnap_store::delta::{Span, chunk_spans, coalesce};
use cowsnap_store::pstore::PStore;
use cowsnap_store::{Device, Origin, SnapshotOptions, Target};
use serde::Serialize;

use super::devices::{Access, BackendArg, Devices};
use super::report::{EXIT_OK, JsonArg, print_json};

/// Bytes compared per read with `--exact`.
const PIECE: u64 = 1 << 20;

#[derive(clap::Args)]
pub struct DeltaArgs {
    /// The origin device the snapshots belong to.
    #[arg(long, value_name = "ORIGIN")]
    pub origin: PathBuf,
    /// The snapshot's COW device.
    pub cow: PathBuf,
    /// A second snapshot of the same origin: list where the two snapshots differ.
    pub cow2: Option<PathBuf>,
    /// Read both sides and drop chunks whose data is identical.
    #[arg(long)]
    pub exact: bool,
    #[command(flatten)]
    pub backend: BackendArg,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Serialize)]
struct Delta {
    origin: String,
    origin_size: u64,
    snapshots: Vec<SnapshotInfo>,
    exact: bool,
    /// The chunk size the chunk numbers count in, when all the snapshots
    /// share one.
    chunk_bytes: Option<u64>,
    ranges: Vec<DeltaRange>,
    total_bytes: u64,
}

#[derive(Serialize)]
struct SnapshotInfo {
    device: String,
    chunk_sectors: u32,
    exceptions: u64,
}

#[derive(Serialize)]
struct DeltaRange {
    offset: u64,
    length: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_chunk: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunks: Option<u64>,
}

pub fn run(args: DeltaArgs) -> anyhow::Result<u8> {
    let devices = Devices::start(args.backend)?;
    let origin_dev = devices.open(&args.origin, Access::ReadOnly)?;
    let cows = std::iter::once(&args.cow)
        .chain(args.cow2.as_ref())
        .map(|p| devices.open(p, Access::ReadOnly))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let size = origin_dev.size();
    let delta = devices.block_on(async {
        let mut snapshots = Vec::new();
        let mut spans = Vec::new();
        for cow in &cows {
            let (info, snap_spans) = exception_spans(cow, size).await?;
            snapshots.push(info);
            spans.extend(snap_spans);
        }
        let mut spans = coalesce(spans);
        let chunk_sizes: HashSet<u64> = snapshots
            .iter()
            .map(|s| u64::from(s.chunk_sectors) * 512)
            .collect();
        let granule = chunk_sizes.iter().copied().min().unwrap_or(PIECE);
        if args.exact {
            spans = exact_spans(origin_dev.clone(), &cows, &spans, granule).await?;
        }
        let chunk_bytes = (chunk_sizes.len() == 1).then_some(granule);
        Ok::<_, anyhow::Error>(Delta {
            origin: origin_dev.name().to_string(),
            origin_size: size,
            snapshots,
            exact: args.exact,
            chunk_bytes,
            total_bytes: spans.iter().map(|(s, e)| e - s).sum(),
            ranges: spans
                .iter()
                .map(|&(s, e)| DeltaRange {
                    offset: s,
                    length: e - s,
                    first_chunk: chunk_bytes.map(|cb| s / cb),
                    chunks: chunk_bytes.map(|cb| e.div_ceil(cb) - s / cb),
                })
                .collect(),
        })
    })?;
    if args.out.json {
        print_json(&delta)?;
    } else {
        print_text(&delta);
    }
    Ok(EXIT_OK)
}

/// Loads a COW device's exceptions as the engine would (a corrupt or
/// invalid one is refused) and gives the byte spans of their origin
/// chunks, clamped to the origin's size.
async fn exception_spans(
    cow: &Device,
    origin_size: u64,
) -> anyhow::Result<(SnapshotInfo, Vec<Span>)> {
    let mut olds = Vec::new();
    let mut seen = HashSet::new();
    let opened = PStore::open(cow.clone(), None, Some(origin_size), |r| {
        let first = seen.insert(r.old);
        if first {
            olds.push(r.old);
        }
        first
    })
    .await?;
    if !opened.store.is_valid() {
        bail!(
            "{}: the snapshot is invalid (it overflowed or failed): its content is unknown",
            cow.name()
        );
    }
    let layout = opened.store.layout();
    let cb = layout.chunk_bytes();
    let spans = chunk_spans(olds, cb, origin_size);
    Ok((
        SnapshotInfo {
            device: cow.name().to_string(),
            chunk_sectors: layout.chunk_sectors(),
            exceptions: opened.exceptions,
        },
        spans,
    ))
}

/// Keeps the `granule`-sized pieces of `spans` where the two sides differ:
/// the snapshot and the origin, or the two snapshots.
async fn exact_spans(
    origin_dev: Device,
    cows: &[Device],
    spans: &[Span],
    granule: u64,
) -> anyhow::Result<Vec<Span>> {
    let origin = Origin::new(origin_dev)?;
    let mut targets = Vec::new();
    for cow in cows {
        let added = origin
            .add_snapshot(cow.clone(), SnapshotOptions::default())
            .await?;
        targets.push(Target::Snapshot(added.id));
    }
    let (a, b) = match targets[..] {
        [s] => (s, Target::Origin),
        [s, t] => (s, t),
        _ => unreachable!("one or two COW devices"),
    };
    let piece = PIECE.next_multiple_of(granule);
    let mut differ = Vec::new();
    for &(start, end) in spans {
        let mut at = start;
        while at < end {
            let len = piece.min(end - at);
            let (x, y) = futures::join!(origin.read(a, at, len), origin.read(b, at, len));
            let (x, y) = (x?, y?);
            for (i, (gx, gy)) in x
                .chunks(granule as usize)
                .zip(y.chunks(granule as usize))
                .enumerate()
            {
                if gx != gy {
                    let s = at + i as u64 * granule;
                    differ.push((s, s + gx.len() as u64));
                }
            }
            at += len;
        }
    }
    Ok(coalesce(differ))
}

fn print_text(d: &Delta) {
    let against = match &d.snapshots[..] {
        [_, second] => second.device.clone(),
        _ => d.origin.clone(),
    };
    println!(
        "# {} vs {}: {} range{}, {} bytes{}",
        d.snapshots[0].device,
        against,
        d.ranges.len(),
        if d.ranges.len() == 1 { "" } else { "s" },
        d.total_bytes,
        if d.exact {
            " (exact)"
        } else {
            " (from metadata)"
        }
    );
    match d.chunk_bytes {
        Some(cb) => println!("# offset length first_chunk chunks (chunks of {cb} bytes)"),
        None => println!("# offset length"),
    }
    for r in &d.ranges {
        match (r.first_chunk, r.chunks) {
            (Some(c), Some(n)) => println!("{} {} {c} {n}", r.offset, r.length),
            _ => println!("{} {}", r.offset, r.length),
        }
    }
}
