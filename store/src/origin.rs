//! The copy-on-write engine: an origin device and its snapshots, with the
//! semantics of dm's `snapshot-origin`, `snapshot` and `snapshot-merge`
//! targets in one object.
//!
//! - Origin read: the origin device (during a merge, an unmerged chunk comes
//!   from the merging snapshot's COW).
//! - Origin write: every valid snapshot lacking an affected chunk first gets
//!   an exception for it (the chunk copied into its COW device and the record
//!   committed, copies in parallel and the origin chunk read once per chunk
//!   size); the origin is written only after all of them are committed and no
//!   snapshot read of the old data is still in flight. A plain write that
//!   needs such copies is held in memory and acknowledged at once; the
//!   write-back path ([`crate::writeback`]) does the copies, the commit and
//!   the origin write in the same order later, and FLUSH waits for it. Origin
//!   reads return held data over what the device holds.
//! - Snapshot read: the COW chunk when the snapshot has an exception for it,
//!   else the origin chunk (tracked, so the origin is not overwritten under
//!   the read).
//! - Snapshot write: into the COW chunk; a chunk without an exception gets one
//!   first (the origin chunk copied in when the write is partial).
//!
//! A gate (read side per I/O, write side for adding, deleting or starting to
//! merge a snapshot) gives snapshot creation the atomicity of dm's
//! suspend/resume: writes acknowledged before it are in the snapshot, writes
//! started after it are not.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use futures::future::join_all;

use crate::cow::{COW_FULL, CopyOnWrite, finish_exception};
use crate::error::{Error, Result};
use crate::format::Record;
use crate::io::{AlignedBuf, Device};
use crate::pstore::{CommitStats, PStore, Usage};
use crate::snapshot::{SnapId, Snapshot};
use crate::table::{BUILD_INLINE_MAX, ExceptionTable};
use crate::writeback::{self, HeldBudget, WriteBack, WriteBackStats};

/// What an I/O addresses: the origin, or one of its snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Origin,
    Snapshot(SnapId),
}

/// How to attach a COW device.
#[derive(Clone, Copy, Debug, Default)]
pub struct SnapshotOptions {
    /// Chunk size for a new (all-zero) COW device; an existing header wins.
    pub chunk_sectors: Option<u32>,
    /// The snapshot was merging when the origin was last open: it resumes in
    /// merging state (call [`Origin::merge`] to finish it).
    pub merging: bool,
    /// The snapshot's size in bytes, recorded when it was taken (the
    /// origin has grown since); `None`: the origin's size now. The COW
    /// format does not hold it (nor does the kernel's: it is the
    /// snapshot target's length in the table).
    pub size: Option<u64>,
}

/// What [`Origin::add_snapshot`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddedSnapshot {
    pub id: SnapId,
    /// The COW device was all zero and has been initialised.
    pub initialised: bool,
    /// The chunk size asked for when the COW header's differs (and won).
    pub chunk_override: Option<u32>,
    pub chunk_sectors: u32,
    pub exceptions: u64,
}

/// A snapshot's state, with the numbers `dmsetup status` prints.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SnapshotStatus {
    pub id: SnapId,
    pub device: String,
    pub chunk_sectors: u32,
    pub valid: bool,
    pub merging: bool,
    pub exceptions: u64,
    /// `None` when the snapshot is invalid (`dmsetup status` prints `Invalid`).
    pub usage: Option<Usage>,
    pub commits: CommitStats,
    /// Why it became invalid, when that happened since it was opened.
    pub invalid_reason: Option<String>,
}

/// What went through one engine since it was opened: reads and writes of
/// the origin and its snapshots as callers asked for them, and the group
/// commit's counters of every snapshot it has had (deleted and merged ones
/// included), so every figure only grows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IoStats {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    /// Metadata area writes that committed new exceptions.
    pub commits: u64,
    /// Exceptions committed: chunks copied on write into a snapshot, or
    /// allocated by a write to a snapshot.
    pub exceptions: u64,
}

impl IoStats {
    /// Adds `o` to these.
    pub fn add(&mut self, o: &IoStats) {
        self.reads += o.reads;
        self.read_bytes += o.read_bytes;
        self.writes += o.writes;
        self.write_bytes += o.write_bytes;
        self.commits += o.commits;
        self.exceptions += o.exceptions;
    }
}

/// The engine's I/O counters.
#[derive(Default)]
struct IoCounters {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
}

/// A piece of an I/O: `len` bytes at `dev_off` on `dev`, at `buf_off` in
/// the caller's buffer.
struct Seg {
    dev: Device,
    dev_off: u64,
    buf_off: u64,
    len: u64,
}

impl Seg {
    /// Piece `p` of an I/O starting at `off`, read or written on the
    /// origin `dev` in place.
    fn origin(dev: &Device, p: &Range<u64>, off: u64) -> Seg {
        Seg {
            dev: dev.clone(),
            dev_off: p.start,
            buf_off: p.start - off,
            len: p.end - p.start,
        }
    }

    /// Piece `p` of origin chunk `c` (chunks of `cb` bytes), of an I/O
    /// starting at `off`, as COW chunk `new` on `cow` holds it.
    fn cow(cow: &Device, c: u64, new: u64, cb: u64, p: &Range<u64>, off: u64) -> Seg {
        Seg {
            dev: cow.clone(),
            dev_off: new * cb + (p.start - c * cb),
            buf_off: p.start - off,
            len: p.end - p.start,
        }
    }
}

fn push_seg(segs: &mut Vec<Seg>, seg: Seg) {
    if let Some(last) = segs.last_mut()
        && last.dev.same(&seg.dev)
        && last.dev_off + last.len == seg.dev_off
        && last.buf_off + last.len == seg.buf_off
    {
        last.len += seg.len;
        return;
    }
    segs.push(seg);
}

async fn read_segs(segs: Vec<Seg>, len: u64) -> Result<AlignedBuf> {
    if let [seg] = &segs[..] {
        return seg.dev.read(seg.dev_off, seg.len as usize).await;
    }
    let Some(first) = segs.first() else {
        // Nothing mapped: a zero length.
        return Ok(AlignedBuf::zeroed(0));
    };
    let mut out = first.dev.buffer(first.dev_off, len as usize)?;
    let bufs = join_all(segs.iter().map(|s| s.dev.read(s.dev_off, s.len as usize))).await;
    for (s, b) in segs.iter().zip(bufs) {
        let b = b?;
        out[s.buf_off as usize..(s.buf_off + s.len) as usize].copy_from_slice(&b);
    }
    Ok(out)
}

async fn write_segs(segs: Vec<Seg>, buf: AlignedBuf, fua: bool) -> Result<()> {
    if let [seg] = &segs[..]
        && seg.len == buf.len() as u64
    {
        seg.dev.write(seg.dev_off, buf, fua).await?;
        return Ok(());
    }
    let results = join_all(segs.iter().map(|s| {
        let piece = AlignedBuf::from_slice(&buf[s.buf_off as usize..(s.buf_off + s.len) as usize]);
        s.dev.write(s.dev_off, piece, fua)
    }))
    .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// The part of chunk `c` (of `cb` bytes) inside `[off, off+len)`.
fn piece(c: u64, cb: u64, off: u64, len: u64) -> Range<u64> {
    (c * cb).max(off)..((c + 1) * cb).min(off + len)
}

pub struct Origin {
    dev: Device,
    gate: tokio::sync::RwLock<()>,
    /// The device and the snapshot list, shared with the write-back task.
    cow: Arc<CopyOnWrite>,
    wb: Arc<WriteBack>,
    /// Id of the merging snapshot, 0 when none.
    merging: AtomicU64,
    /// The I/O alignment (largest logical block size of all devices).
    io_block: AtomicU64,
    next_id: AtomicU64,
    closed: AtomicBool,
    io: IoCounters,
    /// Commit counters of the snapshots that are gone.
    retired: std::sync::Mutex<CommitStats>,
}

impl Origin {
    /// The engine over origin device `dev`, with no snapshots yet.
    pub fn new(dev: Device) -> Result<Origin> {
        if dev.size() == 0 || !dev.size().is_multiple_of(dev.block_size()) {
            return Err(Error::Invalid {
                device: dev.name().to_string(),
                detail: format!(
                    "origin size {} bytes is not a positive multiple of its logical block size {}",
                    dev.size(),
                    dev.block_size()
                ),
            });
        }
        let block_size = dev.block_size();
        let cow = Arc::new(CopyOnWrite::new(dev.clone()));
        Ok(Origin {
            dev,
            gate: tokio::sync::RwLock::new(()),
            wb: Arc::new(WriteBack::new(cow.clone(), writeback::DEFAULT_CAP)),
            cow,
            merging: AtomicU64::new(0),
            io_block: AtomicU64::new(block_size),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            io: IoCounters::default(),
            retired: std::sync::Mutex::new(CommitStats::default()),
        })
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// Size of the origin in bytes (a snapshot taken before the origin
    /// grew is smaller: [`Origin::target_size`]).
    pub fn size(&self) -> u64 {
        self.dev.size()
    }

    /// Size in bytes of the origin or of one of its snapshots.
    pub fn target_size(&self, t: Target) -> Result<u64> {
        match t {
            Target::Origin => Ok(self.size()),
            Target::Snapshot(id) => Ok(self.snapshot(id)?.size()),
        }
    }

    /// Grows the origin to `size` bytes, online (D14 of docs/design.md):
    /// I/O pauses while held writes drain, then clients may address the
    /// new bytes. The device
    /// must already hold them (a file extended, a raw device large
    /// enough) and read as zeros there. Snapshots keep their size: origin
    /// writes past a snapshot's end need no copy into it (as the kernel's
    /// origin target, which copies only chunks within each snapshot's
    /// length). Growing to the current size does nothing; shrinking is
    /// refused.
    pub async fn grow(&self, size: u64) -> Result<()> {
        let _suspended = self.suspend().await;
        let now = self.size();
        if size < now || !size.is_multiple_of(self.block_size()) {
            return Err(Error::Invalid {
                device: self.dev.name().to_string(),
                detail: format!(
                    "cannot resize the origin from {now} to {size} bytes: it only grows, in multiples of {} bytes",
                    self.block_size()
                ),
            });
        }
        self.dev.grow(size);
        Ok(())
    }

    /// The alignment every I/O must respect: the largest logical block size
    /// of the origin and the COW devices.
    pub fn block_size(&self) -> u64 {
        self.io_block.load(Ordering::Relaxed)
    }

    /// The snapshots, oldest first: a shared copy of the list (it is
    /// replaced, never changed in place, when snapshots come and go).
    pub(crate) fn snapshots(&self) -> Arc<Vec<Arc<Snapshot>>> {
        self.cow.snapshots()
    }

    /// Sets the most bytes of acknowledged writes held in memory before
    /// they reach the origin (default [`writeback::DEFAULT_CAP`]); past it
    /// writes wait.
    pub fn set_writeback_cap(&self, bytes: u64) {
        self.wb.set_budget(HeldBudget::new(bytes));
    }

    /// Holds acknowledged writes under `budget`, a cap shared with the
    /// other engines given it (a worker's volumes): past it, writes to any
    /// of them wait.
    pub fn share_writeback_budget(&self, budget: Arc<HeldBudget>) {
        self.wb.set_budget(budget);
    }

    /// The byte ranges of the writes held now, as (offset, length).
    pub(crate) fn held_regions(&self) -> Vec<(u64, u64)> {
        self.wb.held_regions()
    }

    /// The write-back path's figures.
    pub fn writeback_stats(&self) -> WriteBackStats {
        self.wb.stats()
    }

    /// Takes the gate's write side once every held write is on the origin:
    /// no I/O runs until the guard is dropped, and writes acknowledged
    /// before are in the origin's content (D13).
    pub(crate) async fn suspend(&self) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        let g = self.gate.write().await;
        self.wb.drain().await;
        g
    }

    /// Replaces the snapshot list (under the gate's write side) and what
    /// follows from it.
    fn set_snapshots(&self, f: impl FnOnce(&mut Vec<Arc<Snapshot>>)) {
        let mut guard = self.cow.snaps.write().expect("snapshot list");
        let mut list = guard.as_ref().clone();
        f(&mut list);
        let mut retired = self.retired.lock().expect("retired stats");
        for gone in guard.iter().filter(|s| !list.iter().any(|x| x.id == s.id)) {
            let c = gone.store.commit_stats();
            retired.commits += c.commits;
            retired.exceptions += c.exceptions;
        }
        drop(retired);
        let bs = list
            .iter()
            .map(|s| s.store.device().block_size())
            .fold(self.dev.block_size(), u64::max);
        self.io_block.store(bs, Ordering::Relaxed);
        *guard = Arc::new(list);
    }

    /// Ids of the snapshots, oldest first.
    pub fn snapshot_ids(&self) -> Vec<SnapId> {
        self.snapshots().iter().map(|s| s.id).collect()
    }

    pub(crate) fn snapshot(&self, id: SnapId) -> Result<Arc<Snapshot>> {
        self.snapshots()
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .ok_or(Error::NoSnapshot(id))
    }

    /// The snapshot merging into the origin, if any (one atomic load when
    /// none is: the common case on every I/O).
    pub(crate) fn merging_snapshot(&self) -> Option<Arc<Snapshot>> {
        match self.merging.load(Ordering::Acquire) {
            0 => None,
            id => self.snapshot(id).ok(),
        }
    }

    /// Records which snapshot merges (0: none). Called under the gate's
    /// write side.
    pub(crate) fn set_merging(&self, id: SnapId) {
        self.merging.store(id, Ordering::Release);
    }

    /// Attaches a COW device as a new snapshot: initialises an all-zero one
    /// (a snapshot of the origin as it is now), or loads an existing one.
    /// Waits for in-flight writes, flushes the origin, and holds new I/O
    /// until the snapshot is in place.
    pub async fn add_snapshot(&self, cow: Device, opts: SnapshotOptions) -> Result<AddedSnapshot> {
        self.attach(cow, opts, false).await
    }

    /// Attaches a new snapshot on `cow`, a device the caller has just made
    /// all zero over its header and area 0 and that nothing names yet: as
    /// [`Origin::add_snapshot`] does with an all-zero device, but the
    /// format is one durable write ([`PStore::format_zeroed`]).
    pub async fn add_new_snapshot(
        &self,
        cow: Device,
        chunk_sectors: Option<u32>,
    ) -> Result<AddedSnapshot> {
        let opts = SnapshotOptions {
            chunk_sectors,
            merging: false,
            size: None,
        };
        self.attach(cow, opts, true).await
    }

    async fn attach(
        &self,
        cow: Device,
        opts: SnapshotOptions,
        zeroed: bool,
    ) -> Result<AddedSnapshot> {
        let _suspended = self.suspend().await;
        // Reloading the other snapshots of an origin that is merging is
        // fine; taking a new one is not (the origin's content is in flux).
        if let Some(m) = self.merging_snapshot()
            && (opts.merging
                || zeroed
                || crate::scan::read_header(&cow).await? == crate::format::HeaderState::New)
        {
            return Err(Error::Merging(
                m.id,
                "no new snapshot can be taken while one merges into the origin",
            ));
        }
        let size = opts.size.unwrap_or(self.size());
        if size == 0 || size > self.size() || !size.is_multiple_of(self.dev.block_size()) {
            return Err(Error::Invalid {
                device: cow.name().to_string(),
                detail: format!(
                    "snapshot size {size} bytes: not a positive multiple of the logical block size {} within the origin's {} bytes",
                    self.dev.block_size(),
                    self.size()
                ),
            });
        }
        // The origin flush (every write acknowledged before the snapshot is
        // in it for good) and the COW device's load or format touch
        // different devices: they run side by side, and the snapshot is
        // attached only once both are done. Collect the records, then build
        // the table once at its final size (growing it record by record
        // rehashes it ~20 times for 1 M).
        let mut records: Vec<(u64, u64)> = Vec::new();
        let load = async {
            if zeroed {
                PStore::format_zeroed(cow, opts.chunk_sectors).await
            } else {
                PStore::open(cow, opts.chunk_sectors, Some(size), |r: Record| {
                    records.push((r.old, r.new));
                    true
                })
                .await
            }
        };
        let (flushed, opened) = tokio::join!(self.dev.flush(), load);
        flushed?;
        let opened = opened?;
        // A small table (a new snapshot's is empty) is built here: handing
        // it to another thread would cost more than building it.
        let built = if records.len() <= BUILD_INLINE_MAX {
            ExceptionTable::build(records)
        } else {
            match tokio::task::spawn_blocking(move || ExceptionTable::build(records)).await {
                Ok(b) => b,
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        };
        let exceptions = match built {
            Ok(t) => t,
            Err(old) => {
                return Err(Error::Corrupt {
                    device: opened.store.device().name().to_string(),
                    detail: format!("origin chunk {old} appears in more than one record"),
                });
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let layout = opened.store.layout();
        if opts.merging && !opened.store.is_valid() {
            return Err(Error::SnapshotInvalid {
                device: opened.store.device().name().to_string(),
            });
        }
        let snap = Arc::new(Snapshot::new(
            id,
            opened.store,
            exceptions,
            opts.merging,
            size,
        ));
        self.set_snapshots(|l| l.push(snap));
        if opts.merging {
            self.set_merging(id);
        }
        Ok(AddedSnapshot {
            id,
            initialised: opened.initialised,
            chunk_override: opened.chunk_override,
            chunk_sectors: layout.chunk_sectors(),
            exceptions: opened.exceptions,
        })
    }

    /// Detaches a snapshot: the origin stops copying into it. Waits for the
    /// snapshot's in-flight I/O. Returns its COW device.
    pub async fn delete_snapshot(&self, id: SnapId) -> Result<Device> {
        let _suspended = self.suspend().await;
        let s = self.snapshot(id)?;
        if s.is_merging() {
            return Err(Error::Merging(id, "a merging snapshot cannot be deleted"));
        }
        self.set_snapshots(|l| l.retain(|x| x.id != id));
        let mut st = s.lock();
        st.deleted = true;
        s.changed(&mut st);
        Ok(s.store.device().clone())
    }

    pub fn status(&self, id: SnapId) -> Result<SnapshotStatus> {
        let s = self.snapshot(id)?;
        Ok(SnapshotStatus {
            id,
            device: s.device_name().to_string(),
            chunk_sectors: s.layout.chunk_sectors(),
            valid: s.store.is_valid(),
            merging: s.is_merging(),
            exceptions: s.exception_count(),
            usage: s.store.usage(),
            commits: s.store.commit_stats(),
            invalid_reason: s.store.invalid_reason(),
        })
    }

    /// Watches why snapshot `id` became invalid (`None` while it is valid);
    /// the sender goes away with the snapshot.
    pub fn watch_invalid(
        &self,
        id: SnapId,
    ) -> Result<tokio::sync::watch::Receiver<Option<String>>> {
        Ok(self.snapshot(id)?.store.watch_invalid())
    }

    /// Sum of the group-commit counters over every snapshot.
    pub fn commit_stats(&self) -> CommitStats {
        self.snapshots()
            .iter()
            .fold(CommitStats::default(), |a, s| {
                let c = s.store.commit_stats();
                CommitStats {
                    commits: a.commits + c.commits,
                    exceptions: a.exceptions + c.exceptions,
                }
            })
    }

    /// What went through this engine since it was opened.
    pub fn io_stats(&self) -> IoStats {
        let live = self.commit_stats();
        let retired = *self.retired.lock().expect("retired stats");
        IoStats {
            reads: self.io.reads.load(Ordering::Relaxed),
            read_bytes: self.io.read_bytes.load(Ordering::Relaxed),
            writes: self.io.writes.load(Ordering::Relaxed),
            write_bytes: self.io.write_bytes.load(Ordering::Relaxed),
            commits: live.commits + retired.commits,
            exceptions: live.exceptions + retired.exceptions,
        }
    }

    /// Checks an I/O of `[off, off+len)` to `t` (alignment, bounds: the
    /// origin's size or the snapshot's) and returns the snapshot it
    /// addresses (`None` for the origin), looked up once for the whole I/O.
    /// A snapshot deleted before the I/O enters the gate is refused there
    /// as one that is gone (`check_snapshot_usable`).
    fn check_io(&self, t: Target, off: u64, len: u64) -> Result<Option<Arc<Snapshot>>> {
        let bs = self.block_size();
        if !off.is_multiple_of(bs) || !len.is_multiple_of(bs) || len == 0 {
            return Err(Error::Misaligned {
                device: self.dev.name().to_string(),
                offset: off,
                len,
                align: bs,
            });
        }
        let snap = match t {
            Target::Origin => None,
            Target::Snapshot(id) => Some(self.snapshot(id)?),
        };
        let (size, device) = match &snap {
            None => (self.size(), self.dev.name()),
            Some(s) => (s.size(), s.device_name()),
        };
        if off.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange {
                device: device.to_string(),
                offset: off,
                len,
                size,
            });
        }
        Ok(snap)
    }

    /// Enters the gate for one I/O; fails once the origin is shut down.
    async fn enter(&self) -> Result<tokio::sync::RwLockReadGuard<'_, ()>> {
        let g = self.gate.read().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Shutdown {
                device: self.dev.name().to_string(),
            });
        }
        Ok(g)
    }

    /// Stops the engine: waits for the I/O in flight and the held writes
    /// (D13), flushes every device, and fails every later request with
    /// [`Error::Shutdown`] (ESHUTDOWN). Used before a volume's device is
    /// released and on process shutdown; an engine dropped without it (or a
    /// FLUSH) leaves its held writes to background tasks, and a process that
    /// exits then loses them, as a crash would.
    pub async fn shutdown(&self) -> Result<()> {
        let _suspended = self.suspend().await;
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.flush_devices().await
    }

    /// Flushes the origin and every valid COW device, concurrently.
    async fn flush_devices(&self) -> Result<()> {
        let snaps = self.snapshots();
        let mut devs = vec![self.dev.clone()];
        devs.extend(
            snaps
                .iter()
                .filter(|s| s.store.is_valid())
                .map(|s| s.store.device().clone()),
        );
        for r in join_all(devs.iter().map(|d| d.flush())).await {
            r?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `off` of the origin or a snapshot.
    pub async fn read(&self, t: Target, off: u64, len: u64) -> Result<AlignedBuf> {
        let snap = self.check_io(t, off, len)?;
        let _io = self.enter().await?;
        let buf = match snap {
            None => match self.merging_snapshot() {
                None => self.read_origin(off, len).await,
                Some(m) => self.read_origin_merging(&m, off, len).await,
            },
            Some(s) => self.read_snapshot(&s, off, len).await,
        }?;
        self.io.reads.fetch_add(1, Ordering::Relaxed);
        self.io.read_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(buf)
    }

    /// Writes `buf` at `off` of the origin or a snapshot; with `fua` it is
    /// durable on return.
    pub async fn write(&self, t: Target, off: u64, buf: AlignedBuf, fua: bool) -> Result<()> {
        let len = buf.len() as u64;
        let snap = self.check_io(t, off, len)?;
        let _io = self.enter().await?;
        match snap {
            None => match self.merging_snapshot() {
                None => self.wb.write(off, buf, fua).await?,
                Some(m) => self.write_origin_merging(&m, off, buf, fua).await?,
            },
            Some(s) => self.write_snapshot(&s, off, buf, fua).await?,
        }
        self.io.writes.fetch_add(1, Ordering::Relaxed);
        self.io.write_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Writes zeros over `[off, off+len)`, through the same copy-on-write
    /// path as any write.
    pub async fn write_zeroes(&self, t: Target, off: u64, len: u64, fua: bool) -> Result<()> {
        self.check_io(t, off, len)?;
        const STEP: u64 = 1 << 20;
        let mut at = off;
        while at < off + len {
            let n = STEP.min(off + len - at);
            self.write(t, at, AlignedBuf::zeroed(n as usize), fua)
                .await?;
            at += n;
        }
        Ok(())
    }

    /// Discards `[off, off+len)`: a hint that the data is no longer needed.
    /// The content of a discarded range is unspecified afterwards (NBD TRIM,
    /// `BLKDISCARD`); this engine leaves it unchanged, so a discard never
    /// triggers copy-on-write into the snapshots and never frees space.
    pub async fn discard(&self, t: Target, off: u64, len: u64) -> Result<()> {
        if let Some(s) = self.check_io(t, off, len)? {
            let st = s.lock();
            self.check_snapshot_usable(&s, &st)?;
        }
        Ok(())
    }

    /// Makes every acknowledged write durable: waits for the held writes
    /// acknowledged before it to reach the origin, then flushes the origin
    /// and every COW device (a write may have landed in either). A held
    /// write that failed since the last FLUSH fails this one.
    pub async fn flush(&self) -> Result<()> {
        let _io = self.enter().await?;
        self.wb.settle().await;
        self.flush_devices().await?;
        self.wb.take_failure()
    }

    /// Origin bytes outside a merge: the device, under the held writes.
    async fn read_origin(&self, off: u64, len: u64) -> Result<AlignedBuf> {
        // Held writes first: one that reaches the device and leaves while
        // the device is read is still overlaid (with the same bytes).
        let held = self.wb.held_over(off, len);
        let mut buf = self.dev.read(off, len as usize).await?;
        writeback::overlay(&mut buf, off, &held);
        Ok(buf)
    }

    /// See [`CopyOnWrite::ensure_copied`].
    pub(crate) async fn ensure_copied(&self, off: u64, len: u64) -> Result<()> {
        self.cow.ensure_copied(off, len).await
    }

    async fn read_snapshot(&self, s: &Arc<Snapshot>, off: u64, len: u64) -> Result<AlignedBuf> {
        let cb = s.chunk_bytes();
        let mut segs = Vec::new();
        let mut tracked = Vec::new();
        {
            let mut st = s.lock();
            self.check_snapshot_usable(s, &st)?;
            for c in s.chunks(off, len) {
                let p = piece(c, cb, off, len);
                match st.exceptions.get(&c) {
                    Some(&new) => {
                        push_seg(&mut segs, Seg::cow(s.store.device(), c, new, cb, &p, off))
                    }
                    None => {
                        st.origin_readers.inc(c);
                        tracked.push(c);
                        push_seg(&mut segs, Seg::origin(&self.dev, &p, off));
                    }
                }
            }
        }
        let r = read_segs(segs, len).await;
        if !tracked.is_empty() {
            let mut st = s.lock();
            for c in tracked {
                st.origin_readers.dec(c);
            }
            s.changed(&mut st);
        }
        r
    }

    fn check_snapshot_usable(&self, s: &Snapshot, st: &crate::snapshot::SnapState) -> Result<()> {
        if st.deleted {
            return Err(Error::NoSnapshot(s.id));
        }
        if st.merging {
            return Err(Error::Merging(
                s.id,
                "a merging snapshot cannot be read or written; its content is the origin's",
            ));
        }
        if !s.store.is_valid() {
            return Err(s.invalid_error());
        }
        Ok(())
    }

    async fn write_snapshot(
        &self,
        s: &Arc<Snapshot>,
        off: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> Result<()> {
        let cb = s.chunk_bytes();
        let len = buf.len() as u64;
        // Fast path: every chunk already has an exception.
        let direct = {
            let st = s.lock();
            self.check_snapshot_usable(s, &st)?;
            let mut segs = Vec::new();
            let mut all = true;
            for c in s.chunks(off, len) {
                let Some(&new) = st.exceptions.get(&c) else {
                    all = false;
                    break;
                };
                let p = piece(c, cb, off, len);
                push_seg(&mut segs, Seg::cow(s.store.device(), c, new, cb, &p, off));
            }
            all.then_some(segs)
        };
        if let Some(segs) = direct {
            return write_segs(segs, buf, fua).await;
        }
        let results = join_all(s.chunks(off, len).map(|c| {
            let p = piece(c, cb, off, len);
            let data =
                AlignedBuf::from_slice(&buf[(p.start - off) as usize..(p.end - off) as usize]);
            self.write_snapshot_chunk(s, c, p.start - c * cb, data, fua)
        }))
        .await;
        results.into_iter().collect()
    }

    /// Writes `data` at byte `within` of chunk `c` of snapshot `s`, creating
    /// the exception first when there is none.
    async fn write_snapshot_chunk(
        &self,
        s: &Arc<Snapshot>,
        c: u64,
        within: u64,
        data: AlignedBuf,
        fua: bool,
    ) -> Result<()> {
        let cb = s.chunk_bytes();
        enum Next {
            Existing(u64),
            Wait(u64),
            Create(u64),
            Full,
        }
        let new = loop {
            let next = {
                let mut st = s.lock();
                self.check_snapshot_usable(s, &st)?;
                if let Some(&new) = st.exceptions.get(&c) {
                    Next::Existing(new)
                } else if st.pending.contains_key(&c) {
                    Next::Wait(Snapshot::epoch(&st))
                } else {
                    match s.store.prepare() {
                        Ok(new) => {
                            st.pending.insert(c, new);
                            Next::Create(new)
                        }
                        Err(_) => Next::Full,
                    }
                }
            };
            match next {
                Next::Existing(new) => {
                    s.store.device().write(new * cb + within, data, fua).await?;
                    return Ok(());
                }
                Next::Wait(epoch) => s.wait_change(epoch).await,
                Next::Create(new) => break new,
                Next::Full => {
                    s.invalidate(COW_FULL).await?;
                    return Err(s.invalid_error());
                }
            }
        };
        let chunk = if data.len() as u64 == cb {
            data
        } else {
            // Partial write: the rest of the chunk comes from the origin,
            // which cannot change under us while our exception is pending.
            let start = c * cb;
            let olen = cb.min(self.size() - start);
            let mut chunk = AlignedBuf::zeroed(cb as usize);
            match self.dev.read(start, olen as usize).await {
                Ok(o) => chunk[..olen as usize].copy_from_slice(&o),
                Err(e) => {
                    s.undo_pending(c, new);
                    return Err(e);
                }
            }
            chunk[within as usize..within as usize + data.len()].copy_from_slice(&data);
            chunk
        };
        finish_exception(s.clone(), c, new, chunk).await?;
        if s.store.is_valid() {
            Ok(())
        } else {
            Err(s.invalid_error())
        }
    }

    async fn read_origin_merging(
        &self,
        m: &Arc<Snapshot>,
        off: u64,
        len: u64,
    ) -> Result<AlignedBuf> {
        let (segs, tracked) = self.map_merging(m, off, len).await;
        let r = read_segs(segs, len).await;
        self.untrack_merging(m, tracked);
        r
    }

    async fn write_origin_merging(
        &self,
        m: &Arc<Snapshot>,
        off: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> Result<()> {
        let len = buf.len() as u64;
        let (segs, tracked) = self.map_merging(m, off, len).await;
        // The physical origin changes only where the merging snapshot has no
        // exception: the other snapshots need their copies there first.
        let mut r = Ok(());
        for seg in segs.iter().filter(|s| s.dev.same(&self.dev)) {
            r = self.ensure_copied(seg.dev_off, seg.len).await;
            if r.is_err() {
                break;
            }
        }
        if r.is_ok() {
            r = write_segs(segs, buf, fua).await;
        }
        self.untrack_merging(m, tracked);
        r
    }

    /// Maps an origin range during a merge: chunks the merging snapshot
    /// still holds live in its COW device. Waits while the range overlaps the
    /// merge step in flight; registers the COW chunks used so the next step
    /// waits for this I/O.
    async fn map_merging(&self, m: &Arc<Snapshot>, off: u64, len: u64) -> (Vec<Seg>, Vec<u64>) {
        let cb = m.chunk_bytes();
        loop {
            let mapped = {
                let mut st = m.lock();
                let chunks = m.chunks(off, len);
                if st
                    .merge_step
                    .as_ref()
                    .is_some_and(|step| step.start < chunks.end && chunks.start < step.end)
                {
                    Err(Snapshot::epoch(&st))
                } else {
                    let mut segs = Vec::new();
                    let mut tracked = Vec::new();
                    for c in chunks {
                        let p = piece(c, cb, off, len);
                        let seg = match st.exceptions.get(&c) {
                            Some(&new) => {
                                tracked.push(c);
                                Seg::cow(m.store.device(), c, new, cb, &p, off)
                            }
                            None => Seg::origin(&self.dev, &p, off),
                        };
                        push_seg(&mut segs, seg);
                    }
                    for &c in &tracked {
                        st.cow_io.inc(c);
                    }
                    Ok((segs, tracked))
                }
            };
            match mapped {
                Ok(m) => return m,
                Err(epoch) => m.wait_change(epoch).await,
            }
        }
    }

    fn untrack_merging(&self, m: &Arc<Snapshot>, tracked: Vec<u64>) {
        if tracked.is_empty() {
            return;
        }
        let mut st = m.lock();
        for c in tracked {
            st.cow_io.dec(c);
        }
        m.changed(&mut st);
    }

    pub(crate) fn gate(&self) -> &tokio::sync::RwLock<()> {
        &self.gate
    }

    pub(crate) fn remove_snapshot(&self, id: SnapId) {
        self.set_snapshots(|l| l.retain(|x| x.id != id));
    }
}
