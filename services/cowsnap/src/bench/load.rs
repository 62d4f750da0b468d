//! The load figures: a COW device holding N exceptions, written straight
//! through the format module (header, then areas of records whose new chunks
//! are allocated in the kernel's order), loaded by `Origin::add_snapshot`
//! and compared with raw `O_DIRECT` reads of the same metadata chunks; and
//! the RAM the engine keeps per loaded exception, from the counting
//! allocator.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use cowsnap_store::format::{DISK_VERSION, Header, Record};
use cowsnap_store::{AlignedBuf, Backend, Device, Layout, Origin, SnapshotOptions};

use super::alloc::{PeakWindow, live_bytes};
use super::files::sparse_file;
use super::workload::{drive, read_at, splitmix64};

/// Areas the engine's scanner reads ahead (`scan::READ_AHEAD`): the raw
/// baseline reads with the same queue depth.
pub const SCAN_DEPTH: usize = 16;

/// A COW device built for the load figures, and its origin.
pub struct LoadCow {
    pub cow: Device,
    pub origin: Device,
    pub exceptions: u64,
    /// Offsets of the metadata chunks a load reads: areas `0..=N/E`.
    pub area_offsets: Arc<Vec<u64>>,
    pub layout: Layout,
}

/// Builds a COW device of `exceptions` exceptions in `dir`: origin chunks a
/// pseudo-random permutation of the origin (a sparse file of exactly that many
/// chunks), COW chunks handed out as the kernel does (`next_data_chunk` from
/// the first data chunk, skipping metadata chunks). Data chunks are not
/// written: the COW file is sparse except for its header and areas.
pub async fn build(
    backend: &Backend,
    dir: &Path,
    layout: Layout,
    exceptions: u64,
) -> anyhow::Result<LoadCow> {
    let cb = layout.chunk_bytes();
    let epa = layout.exceptions_per_area();
    // The scan reads every full area and the first one that is not full
    // (which is all zero when N fills its last area exactly).
    let areas = exceptions / epa + 1;
    let mut olds: Vec<u64> = (0..exceptions).collect();
    shuffle(&mut olds, 0x5eed);
    // Kernel order: the allocator walks the data chunks in order.
    let mut bufs = Vec::with_capacity(areas as usize);
    let mut next = layout.first_data_chunk();
    let mut last_new = 0;
    for a in 0..areas {
        let mut buf = AlignedBuf::zeroed(cb as usize);
        let first = a * epa;
        let end = (first + epa).min(exceptions);
        for (k, j) in (first..end).enumerate() {
            let rec = Record {
                old: olds[j as usize],
                new: next,
            };
            debug_assert_eq!(layout.area_of_data_chunk(next), a);
            rec.encode(&mut buf[k * 16..(k + 1) * 16]);
            last_new = next;
            next = layout.next_data_chunk(next);
        }
        bufs.push((layout.area_offset(a), buf));
    }
    drop(olds);
    let chunks = (last_new + 1).max(layout.area_location(areas - 1) + 1) + 1;
    let cow_path = sparse_file(&dir.join("load-cow.img"), chunks * cb)?;
    let origin_path = sparse_file(&dir.join("load-origin.img"), exceptions * cb)?;
    let cow = backend.open(&cow_path, true)?;
    let origin = backend.open(&origin_path, true)?;
    let mut header = AlignedBuf::zeroed(cb as usize);
    Header {
        valid: true,
        version: DISK_VERSION,
        chunk_sectors: layout.chunk_sectors(),
    }
    .encode(&mut header);
    bufs.push((0, header));
    let area_offsets: Vec<u64> = bufs[..areas as usize].iter().map(|(o, _)| *o).collect();
    let n = bufs.len() as u64;
    let bufs: Vec<_> = bufs.into_iter().map(Some).collect();
    let bufs = Arc::new(std::sync::Mutex::new(bufs));
    let d = cow.clone();
    drive(SCAN_DEPTH, n, move |i| {
        let (dev, bufs) = (d.clone(), bufs.clone());
        async move {
            let (off, buf) = bufs.lock().expect("buffers")[i as usize]
                .take()
                .expect("one op per buffer");
            let len = buf.len() as u64;
            dev.write(off, buf, false).await?;
            Ok(len)
        }
    })
    .await
    .context("writing the load-test COW device")?;
    cow.flush().await?;
    Ok(LoadCow {
        cow,
        origin,
        exceptions,
        area_offsets: Arc::new(area_offsets),
        layout,
    })
}

/// One load of the COW device, and the raw read of its metadata.
#[derive(Clone, Copy, Debug)]
pub struct LoadRun {
    pub raw_secs: f64,
    pub load_secs: f64,
    /// Heap bytes still live after the load, minus before.
    pub retained_bytes: i64,
    /// Highest live heap bytes during the load, minus before.
    pub peak_bytes: i64,
}

/// Reads the metadata chunks raw, then loads the device as a snapshot
/// (timing both and counting heap bytes around the load), then detaches it.
pub async fn measure(lc: &LoadCow) -> anyhow::Result<LoadRun> {
    let cb = lc.layout.chunk_bytes();
    let raw = read_at(&lc.cow, lc.area_offsets.clone(), cb, SCAN_DEPTH).await?;
    let origin = Origin::new(lc.origin.clone())?;
    let Some(before) = live_bytes() else {
        bail!("the counting allocator is not installed: RAM per exception cannot be measured");
    };
    let peak = PeakWindow::start();
    let t = Instant::now();
    let added = origin
        .add_snapshot(lc.cow.clone(), SnapshotOptions::default())
        .await?;
    let load_secs = t.elapsed().as_secs_f64();
    let after = live_bytes().unwrap_or(0);
    let peak = peak.finish();
    if added.exceptions != lc.exceptions || added.initialised {
        bail!(
            "the load-test COW device loaded {} exceptions (initialised: {}), expected {}",
            added.exceptions,
            added.initialised,
            lc.exceptions
        );
    }
    origin.delete_snapshot(added.id).await?;
    Ok(LoadRun {
        raw_secs: raw.secs,
        load_secs,
        retained_bytes: after as i64 - before as i64,
        peak_bytes: peak as i64 - before as i64,
    })
}

/// Fisher-Yates with a fixed seed: the same permutation every run.
fn shuffle(v: &mut [u64], seed: u64) {
    let mut s = seed;
    for i in (1..v.len()).rev() {
        s = splitmix64(s);
        let j = (s % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}
