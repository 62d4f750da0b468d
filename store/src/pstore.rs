//! The persistent exception store of one COW device: its header, its
//! metadata areas, allocation of data chunks, group commit of new exceptions,
//! and the merge steps that remove them again. The engine (`origin`) decides
//! *which* exceptions to create and copies the data; this module makes them
//! durable in the kernel's format.
//!
//! # Commit: what is written, in what order, and why a crash is safe
//!
//! Rules D2–D4 and outcomes C2–C5 of `docs/design.md`.
//!
//! An exception `{old, new}` is created in three steps:
//! 1. [`PStore::prepare`] hands out data chunk `new` (memory only);
//! 2. the engine copies the origin chunk into COW chunk `new` with a plain
//!    write and waits for it to complete;
//! 3. [`PStore::commit`] queues the record. One commit at a time writes every
//!    queued record into the in-memory area and then
//!    - (a) if the area is now full, writes zeros over the *next* area;
//!    - (b) `fdatasync`s the COW device: every completed copy (and the
//!      zeroed next area) is durable;
//!    - (c) writes the area with `RWF_DSYNC` (FUA).
//!
//!    (b) and (c) are one request, [`Device::flush_write`] (the kernel's
//!    `REQ_PREFLUSH | REQ_FUA`; M5 of docs/design.md): one linked pair on
//!    io_uring, one job of two syscalls on the portable backend. (c) still
//!    starts only once (b) has completed, so a cut between them is the
//!    same as before: (b) done, the area not written.
//!
//!    Only then are the waiters told the exception is committed.
//!
//! A crash before (c) completes leaves either the old area or (the write is
//! sector-atomic, not area-atomic) the old area with some of the new records
//! present; each record that reaches the disk points at data made durable by
//! (b), so every record read back is right. Records not yet acknowledged are
//! simply absent, and the origin was never written over their chunks
//! (D1 of docs/design.md: the engine writes the origin only after the
//! commit). Because of (a), the next area is zero on disk before the full
//! area that precedes it can be read as full, so a reader finds the end.
//!
//! Exceptions prepared while a commit is in flight share the next one (the
//! kernel's `pending_count`): a commit starts when nothing else is being
//! copied (the kernel's rule), or when the waiting records fill the area, or
//! when at least [`MIN_BATCH`] records wait and no fewer than the copies
//! still running (so a steady stream of new copies cannot hold a batch back
//! for ever). A commit costs a flush and a FUA write, milliseconds on many
//! disks, against a fraction of that for a chunk copy: waiting for the copies
//! in flight fills each commit instead of halving it.
//!
//! # Invalidation (D5)
//!
//! A COW device that is full, or whose commit fails, makes the snapshot
//! invalid: `valid = 0` is written to the header with `RWF_DSYNC`, and only
//! once that is durable may the origin be written without the copy.
//!
//! # Merge (D7)
//!
//! [`PStore::prepare_merge`] finds the last run of consecutive exceptions;
//! the merge driver copies them onto the origin and flushes it;
//! [`PStore::commit_merge`] clears those records and writes the area with
//! `RWF_DSYNC`. A crash in between leaves the records in place, and copying
//! them again is harmless.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};

use crate::error::{Error, Result};
use crate::format::{
    DEFAULT_CHUNK_SECTORS, DISK_VERSION, Header, HeaderState, Layout, RECORD_SIZE, Record,
};
use crate::io::{AlignedBuf, Device};
use crate::scan::{ScanOptions, read_header, scan_areas};

/// What `dmsetup status` reports for a snapshot, in sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub allocated_sectors: u64,
    pub total_sectors: u64,
    pub metadata_sectors: u64,
}

/// Why a new exception cannot be prepared.
#[derive(Debug, PartialEq, Eq)]
pub enum PrepareError {
    /// No data chunk left: the snapshot overflows.
    Full,
    /// The snapshot is already invalid.
    Invalid,
}

/// Counters of the group commit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CommitStats {
    /// Area writes that committed new exceptions.
    pub commits: u64,
    /// Exceptions those writes committed.
    pub exceptions: u64,
}

impl CommitStats {
    /// Mean exceptions per commit.
    pub fn per_commit(&self) -> f64 {
        if self.commits == 0 {
            0.0
        } else {
            self.exceptions as f64 / self.commits as f64
        }
    }
}

/// Records a commit waits for, once copies keep arriving (see the module
/// comment).
const MIN_BATCH: u64 = 32;

struct Waiting {
    rec: Record,
    done: oneshot::Sender<Result<(), String>>,
}

struct State {
    valid: bool,
    /// `valid = 0` is durable on the device.
    invalid_durable: bool,
    next_free: u64,
    /// Data chunks below `next_free` that no record holds, highest run
    /// first: [`PStore::prepare`] hands these out before `next_free`.
    free: Vec<Range<u64>>,
    current_area: u64,
    /// Records in `area` (committed, or in the commit in flight).
    current_committed: u64,
    area: AlignedBuf,
    /// Exceptions prepared whose copy is still running.
    prepared: u64,
    queue: Vec<Waiting>,
    committing: bool,
    stats: CommitStats,
}

/// One COW device's exception store.
pub struct PStore {
    dev: Device,
    layout: Layout,
    st: Mutex<State>,
    header_lock: tokio::sync::Mutex<()>,
    /// Why the snapshot became invalid, once it has (first reason wins).
    invalid: watch::Sender<Option<String>>,
}

/// What [`PStore::open`] found.
pub struct Opened {
    pub store: Arc<PStore>,
    /// The device was all zero and has been initialised.
    pub initialised: bool,
    /// The chunk size asked for, when the header's differs (the header wins).
    pub chunk_override: Option<u32>,
    /// Exceptions loaded.
    pub exceptions: u64,
}

/// The layout of a device about to be formatted (`chunk_sectors`, or the
/// default), checked against it.
fn new_layout(dev: &Device, chunk_sectors: Option<u32>) -> Result<Layout> {
    let layout = Layout::new(chunk_sectors.unwrap_or(DEFAULT_CHUNK_SECTORS)).map_err(|cause| {
        Error::Format {
            device: dev.name().to_string(),
            cause,
        }
    })?;
    check_geometry(dev, layout)?;
    if !dev.writable() {
        return Err(Error::Invalid {
            device: dev.name().to_string(),
            detail: "the COW device is not initialised (all-zero header) and was opened read-only"
                .into(),
        });
    }
    Ok(layout)
}

fn new_header(layout: Layout) -> Header {
    Header {
        valid: true,
        version: DISK_VERSION,
        chunk_sectors: layout.chunk_sectors(),
    }
}

impl Opened {
    /// A store just formatted: valid, no exceptions.
    fn formatted(dev: Device, layout: Layout) -> Opened {
        let cb = layout.chunk_bytes() as usize;
        Opened {
            store: Arc::new(PStore::new(
                dev,
                layout,
                true,
                layout.first_data_chunk(),
                0,
                0,
                AlignedBuf::zeroed(cb),
            )),
            initialised: true,
            chunk_override: None,
            exceptions: 0,
        }
    }
}

impl PStore {
    /// Formats `dev` (with `chunk_sectors`, or the default) with one
    /// durable write (M3) of the header chunk and a zeroed area 0. Only
    /// for a device the caller has just made, all zero over those two
    /// chunks (a new sparse file, or a raw device zeroed durably), which
    /// nothing names until this returns: a crash before leaves a device
    /// its owner discards, and a torn write (M1) leaves area 0 zero
    /// whatever part of it landed, under a header that is either new or
    /// whole. [`PStore::open`] cannot know that of a device and zeroes
    /// area 0 durably before its header write instead (a second flush).
    pub async fn format_zeroed(dev: Device, chunk_sectors: Option<u32>) -> Result<Opened> {
        let layout = new_layout(&dev, chunk_sectors)?;
        let cb = layout.chunk_bytes() as usize;
        debug_assert_eq!(layout.area_offset(0), layout.chunk_bytes());
        let mut buf = AlignedBuf::zeroed(2 * cb);
        new_header(layout).encode(&mut buf);
        dev.write(0, buf, true).await?;
        Ok(Opened::formatted(dev, layout))
    }

    /// Opens the store on `dev`: initialises an all-zero device (with
    /// `chunk_sectors`, or the default), or loads an existing one, calling
    /// `insert` for every exception (it returns false for a duplicate origin
    /// chunk). `origin_bytes`, when given, bounds the origin chunks. A
    /// header chunk size different from `chunk_sectors` wins, as in the
    /// kernel. Any inconsistency in the metadata refuses the device.
    pub async fn open(
        dev: Device,
        chunk_sectors: Option<u32>,
        origin_bytes: Option<u64>,
        mut insert: impl FnMut(Record) -> bool,
    ) -> Result<Opened> {
        let name = dev.name().to_string();
        let fmt_err = |cause| Error::Format {
            device: name.clone(),
            cause,
        };
        match read_header(&dev).await? {
            HeaderState::New => {
                let layout = new_layout(&dev, chunk_sectors)?;
                // Zero the header chunk and area 0 (one write: area 0 is
                // chunk 1), make that durable, then write the header (one
                // flush + write request, M5): a crash in between leaves a
                // device whose magic is zero (new). Zeroing the header chunk
                // first keeps that true (the header write then replaces the
                // whole chunk) and has a sparse file allocate its blocks
                // before the flush, so the header's durable write is an
                // overwrite: no file system journal commit of its own.
                let cb = layout.chunk_bytes() as usize;
                debug_assert_eq!(layout.area_offset(0), layout.chunk_bytes());
                dev.write(0, AlignedBuf::zeroed(2 * cb), false).await?;
                let mut h = AlignedBuf::zeroed(cb);
                new_header(layout).encode(&mut h);
                dev.flush_write(0, h).await?;
                Ok(Opened::formatted(dev, layout))
            }
            HeaderState::Existing(h) => {
                let layout = h.check().map_err(fmt_err)?;
                let chunk_override = chunk_sectors.filter(|&c| c != layout.chunk_sectors());
                if let Some(asked) = chunk_override {
                    tracing::warn!(
                        device = %name,
                        "chunk size {} in device metadata overrides the requested chunk size of {asked}",
                        layout.chunk_sectors()
                    );
                }
                check_geometry(&dev, layout)?;
                let cb = layout.chunk_bytes() as usize;
                if !h.valid {
                    tracing::warn!(device = %name, "snapshot is marked invalid");
                    let st = PStore::new(
                        dev,
                        layout,
                        false,
                        layout.first_data_chunk(),
                        0,
                        0,
                        AlignedBuf::zeroed(cb),
                    );
                    st.st.lock().expect("pstore").invalid_durable = true;
                    return Ok(Opened {
                        store: Arc::new(st),
                        initialised: false,
                        chunk_override,
                        exceptions: 0,
                    });
                }
                let opts = ScanOptions {
                    origin_chunks: origin_bytes.map(|b| b.div_ceil(layout.chunk_bytes())),
                    stop_at_first: true,
                };
                let scan = scan_areas(&dev, layout, opts, |_, _, r| insert(r)).await?;
                for p in &scan.problems {
                    if !p.is_torn_tail() {
                        return Err(Error::Corrupt {
                            device: name,
                            detail: p.to_string(),
                        });
                    }
                    tracing::warn!(device = %name, "ignoring the end of a metadata write a crash interrupted: {p}");
                }
                let store = PStore::new(
                    dev,
                    layout,
                    true,
                    scan.next_free,
                    scan.current_area,
                    scan.current_committed,
                    scan.area,
                );
                store.st.lock().expect("pstore").free = scan.free.into_iter().rev().collect();
                let free_chunks = store.free_chunks();
                if free_chunks > 0 {
                    tracing::info!(
                        device = %name,
                        chunks = free_chunks,
                        "reusing COW chunks allocated but never committed (a crash interrupted their exceptions)"
                    );
                }
                Ok(Opened {
                    store: Arc::new(store),
                    initialised: false,
                    chunk_override,
                    exceptions: scan.exceptions,
                })
            }
        }
    }

    fn new(
        dev: Device,
        layout: Layout,
        valid: bool,
        next_free: u64,
        current_area: u64,
        current_committed: u64,
        area: AlignedBuf,
    ) -> PStore {
        PStore {
            dev,
            layout,
            st: Mutex::new(State {
                valid,
                invalid_durable: false,
                next_free,
                free: Vec::new(),
                current_area,
                current_committed,
                area,
                prepared: 0,
                queue: Vec::new(),
                committing: false,
                stats: CommitStats::default(),
            }),
            header_lock: tokio::sync::Mutex::new(()),
            invalid: watch::Sender::new(None),
        }
    }

    pub fn device(&self) -> &Device {
        &self.dev
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn is_valid(&self) -> bool {
        self.st.lock().expect("pstore").valid
    }

    /// `valid = 0` is on the device: the origin may be written without
    /// copying into this snapshot.
    pub fn is_durably_invalid(&self) -> bool {
        self.st.lock().expect("pstore").invalid_durable
    }

    /// The usage `dmsetup status` prints; `None` for an invalid snapshot.
    pub fn usage(&self) -> Option<Usage> {
        let st = self.st.lock().expect("pstore");
        st.valid.then(|| Usage {
            allocated_sectors: st.next_free * u64::from(self.layout.chunk_sectors()),
            total_sectors: self.dev.size() / crate::format::SECTOR_SIZE,
            metadata_sectors: self.layout.metadata_sectors(st.current_area),
        })
    }

    pub fn commit_stats(&self) -> CommitStats {
        self.st.lock().expect("pstore").stats
    }

    /// Why the snapshot became invalid: `None` until it does (and for a
    /// device found invalid at load, whose header keeps no reason).
    pub fn invalid_reason(&self) -> Option<String> {
        self.invalid.borrow().clone()
    }

    /// Watches [`PStore::invalid_reason`].
    pub fn watch_invalid(&self) -> watch::Receiver<Option<String>> {
        self.invalid.subscribe()
    }

    /// Data chunks below the allocation point that no record holds.
    pub fn free_chunks(&self) -> u64 {
        let st = self.st.lock().expect("pstore");
        st.free.iter().map(|r| r.end - r.start).sum()
    }

    /// Allocates the data chunk for a new exception: a chunk no record
    /// holds below the kernel's `next_free` first (the kernel only ever
    /// allocates at `next_free` and above, and reads records in any chunk
    /// order), then `next_free`. So chunks allocated before a crash and
    /// never committed are used again, and a COW device sized for every
    /// origin chunk never fills however many crashes it sees.
    pub fn prepare(&self) -> Result<u64, PrepareError> {
        let mut st = self.st.lock().expect("pstore");
        if !st.valid {
            return Err(PrepareError::Invalid);
        }
        if let Some(run) = st.free.last_mut() {
            let c = run.start;
            run.start += 1;
            if run.start == run.end {
                st.free.pop();
            }
            st.prepared += 1;
            return Ok(c);
        }
        if !self.layout.fits(st.next_free, self.dev.size()) {
            return Err(PrepareError::Full);
        }
        let c = st.next_free;
        st.next_free = self.layout.next_data_chunk(c);
        st.prepared += 1;
        Ok(c)
    }

    /// Commits an exception whose data is in COW chunk `rec.new` (the write
    /// has completed). Returns once the record is durable, or an error when
    /// the snapshot became invalid instead.
    pub async fn commit(self: &Arc<Self>, rec: Record) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut st = self.st.lock().expect("pstore");
            st.prepared -= 1;
            st.queue.push(Waiting { rec, done: tx });
            self.should_lead(&mut st)
        };
        if lead {
            tokio::spawn(self.clone().commit_loop());
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(detail)) => Err(Error::Invalid {
                device: self.dev.name().to_string(),
                detail,
            }),
            Err(_) => Err(Error::Invalid {
                device: self.dev.name().to_string(),
                detail: "the commit was abandoned".into(),
            }),
        }
    }

    /// Gives back a prepared exception that will not be committed (its copy
    /// failed): its data chunk goes back to the free chunks.
    pub fn abandon(self: &Arc<Self>, chunk: u64) {
        let lead = {
            let mut st = self.st.lock().expect("pstore");
            st.prepared -= 1;
            give_back(&mut st.free, chunk);
            self.should_lead(&mut st)
        };
        if lead {
            tokio::spawn(self.clone().commit_loop());
        }
    }

    /// Whether a commit should start now; if so, marks one as running.
    fn should_lead(&self, st: &mut State) -> bool {
        if st.committing || st.queue.is_empty() {
            return false;
        }
        let queued = st.queue.len() as u64;
        let room = self.layout.exceptions_per_area() - st.current_committed;
        if st.prepared == 0 || queued >= st.prepared.max(MIN_BATCH) || queued >= room || !st.valid {
            st.committing = true;
            return true;
        }
        false
    }

    async fn commit_loop(self: Arc<Self>) {
        loop {
            let (batch, area, area_idx, fills) = {
                let mut st = self.st.lock().expect("pstore");
                if !st.valid {
                    let queue = std::mem::take(&mut st.queue);
                    st.committing = false;
                    drop(st);
                    for w in queue {
                        let _ = w.done.send(Err("the snapshot is invalid".into()));
                    }
                    return;
                }
                let epa = self.layout.exceptions_per_area();
                let n = (st.queue.len() as u64).min(epa - st.current_committed) as usize;
                let mut batch: Vec<Waiting> = st.queue.drain(..n).collect();
                // Copies complete in any order; records in allocation order
                // keep runs of consecutive chunks together, which merge
                // steps (and the kernel's) copy in one I/O.
                batch.sort_unstable_by_key(|w| w.rec.new);
                for w in &batch {
                    let at = st.current_committed as usize * RECORD_SIZE;
                    w.rec.encode(&mut st.area[at..at + RECORD_SIZE]);
                    st.current_committed += 1;
                }
                let fills = st.current_committed == epa;
                (
                    batch,
                    AlignedBuf::from_slice(&st.area),
                    st.current_area,
                    fills,
                )
            };
            let result = self.write_area(area_idx, area, fills).await;
            let failure = match &result {
                Ok(()) => {
                    let mut st = self.st.lock().expect("pstore");
                    st.stats.commits += 1;
                    st.stats.exceptions += batch.len() as u64;
                    if fills {
                        st.current_area += 1;
                        st.current_committed = 0;
                        st.area.fill(0);
                    }
                    None
                }
                Err(e) => {
                    let detail = format!("commit failed, snapshot invalidated: {e}");
                    tracing::error!(device = %self.dev.name(), "Invalidating snapshot: {e}");
                    let _ = self
                        .invalidate(&format!("writing its metadata failed: {e}"))
                        .await;
                    Some(detail)
                }
            };
            for w in batch {
                let _ = w.done.send(match &failure {
                    None => Ok(()),
                    Some(d) => Err(d.clone()),
                });
            }
            let mut st = self.st.lock().expect("pstore");
            st.committing = false;
            if !self.should_lead(&mut st) {
                return;
            }
        }
    }

    /// Steps (a)–(c) of the commit (see the module comment).
    async fn write_area(&self, area: u64, buf: AlignedBuf, fills: bool) -> Result<()> {
        let cb = self.layout.chunk_bytes();
        if fills {
            let next = self.layout.area_location(area + 1);
            if !self.layout.fits(next, self.dev.size()) {
                return Err(Error::Invalid {
                    device: self.dev.name().to_string(),
                    detail: format!(
                        "no room for metadata area {} (chunk {next}): the COW device is full",
                        area + 1
                    ),
                });
            }
            self.dev
                .write(next * cb, AlignedBuf::zeroed(cb as usize), false)
                .await?;
        }
        // (b) and (c) as one request, the kernel's REQ_PREFLUSH | REQ_FUA
        // (M5): the area write starts only once the flush has completed.
        self.dev
            .flush_write(self.layout.area_offset(area), buf)
            .await?;
        Ok(())
    }

    /// Makes the snapshot invalid for reason `why`: in memory at once (no
    /// new exceptions), then `valid = 0` on the device with `RWF_DSYNC`.
    /// Returns once that is durable; an error means it is not, and the
    /// origin must not be written as if the snapshot were gone.
    pub async fn invalidate(&self, why: &str) -> Result<()> {
        self.invalid.send_if_modified(|r| {
            if r.is_none() {
                *r = Some(why.to_string());
                true
            } else {
                false
            }
        });
        {
            let mut st = self.st.lock().expect("pstore");
            st.valid = false;
            if st.invalid_durable {
                return Ok(());
            }
        }
        let _g = self.header_lock.lock().await;
        if self.st.lock().expect("pstore").invalid_durable {
            return Ok(());
        }
        let mut h = AlignedBuf::zeroed(self.layout.chunk_bytes() as usize);
        Header {
            valid: false,
            version: DISK_VERSION,
            chunk_sectors: self.layout.chunk_sectors(),
        }
        .encode(&mut h);
        self.dev.write(0, h, true).await?;
        self.st.lock().expect("pstore").invalid_durable = true;
        Ok(())
    }

    /// The last run of consecutive exceptions (same step in origin and COW
    /// chunks) at the end of the list: `(last record, run length)`, or `None`
    /// when no exception is left. Only the merge driver calls this, and no
    /// exception is being committed while it runs.
    pub async fn prepare_merge(&self) -> Result<Option<(Record, u64)>> {
        let epa = self.layout.exceptions_per_area();
        loop {
            let back_to = {
                let st = self.st.lock().expect("pstore");
                if st.current_committed > 0 {
                    let rec = |i: u64| {
                        let at = i as usize * RECORD_SIZE;
                        Record::decode(&st.area[at..at + RECORD_SIZE])
                    };
                    let last = rec(st.current_committed - 1);
                    let mut n = 1u64;
                    while n < st.current_committed {
                        let r = rec(st.current_committed - 1 - n);
                        if r.old.wrapping_add(n) != last.old || r.new.wrapping_add(n) != last.new {
                            break;
                        }
                        n += 1;
                    }
                    return Ok(Some((last, n)));
                }
                if st.current_area == 0 {
                    return Ok(None);
                }
                st.current_area - 1
            };
            let buf = self
                .dev
                .read(
                    self.layout.area_offset(back_to),
                    self.layout.chunk_bytes() as usize,
                )
                .await?;
            let mut st = self.st.lock().expect("pstore");
            st.current_area = back_to;
            st.area = buf;
            st.current_committed = epa;
        }
    }

    /// Removes the last `nr` exceptions (merged onto the origin, which has
    /// been flushed) and makes that durable.
    pub async fn commit_merge(&self, nr: u64) -> Result<()> {
        let (buf, area) = {
            let mut st = self.st.lock().expect("pstore");
            assert!(
                nr <= st.current_committed,
                "commit_merge of more records than the area holds"
            );
            let end = st.current_committed as usize * RECORD_SIZE;
            let start = end - nr as usize * RECORD_SIZE;
            st.area[start..end].fill(0);
            (AlignedBuf::from_slice(&st.area), st.current_area)
        };
        self.dev
            .write(self.layout.area_offset(area), buf, true)
            .await?;
        let mut st = self.st.lock().expect("pstore");
        st.current_committed -= nr;
        // As the kernel: the value next_free would have had if every
        // exception had been committed in order (only `status` uses it now).
        st.next_free = self.layout.area_location(st.current_area) + st.current_committed + 1;
        // Nothing allocates while a snapshot merges; keep the free chunks
        // below the allocation point all the same.
        let next_free = st.next_free;
        st.free.retain_mut(|r| {
            r.end = r.end.min(next_free);
            r.start < r.end
        });
        Ok(())
    }
}

/// Puts `chunk` back into `free` (runs highest first).
fn give_back(free: &mut Vec<Range<u64>>, chunk: u64) {
    let at = free.partition_point(|r| r.start > chunk);
    match at.checked_sub(1).map(|i| &mut free[i]) {
        Some(r) if r.start == chunk + 1 => r.start = chunk,
        _ => free.insert(at, chunk..chunk + 1),
    }
}

/// Refuses geometry the kernel refuses: a chunk not a multiple of the
/// device's logical block size, a device too small for header, one area and
/// one data chunk.
fn check_geometry(dev: &Device, layout: Layout) -> Result<()> {
    if !layout.chunk_bytes().is_multiple_of(dev.block_size()) {
        return Err(Error::Invalid {
            device: dev.name().to_string(),
            detail: format!(
                "chunk size {} bytes is not a multiple of the device's logical block size {}",
                layout.chunk_bytes(),
                dev.block_size()
            ),
        });
    }
    if dev.size() < layout.min_device_bytes() {
        return Err(Error::Invalid {
            device: dev.name().to_string(),
            detail: format!(
                "COW device of {} bytes is too small: it needs at least {} bytes (a header, one metadata area and one data chunk of {} bytes)",
                dev.size(),
                layout.min_device_bytes(),
                layout.chunk_bytes()
            ),
        });
    }
    Ok(())
}
