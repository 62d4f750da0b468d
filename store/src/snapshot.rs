//! One snapshot of an origin, as the engine sees it: its exception store,
//! the table of completed exceptions, and the in-flight bookkeeping that keeps
//! concurrent I/O correct (pending exceptions, origin reads on the snapshot's
//! behalf, COW I/O during a merge).
//!
//! Everything that can change is under one mutex, and every change bumps a
//! generation number and wakes the waiters, who re-check what they wait for.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use hashbrown::HashMap;
use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::format::Layout;
use crate::pstore::PStore;
use crate::table::ExceptionTable;

/// Identifies a snapshot within its origin.
pub type SnapId = u64;

/// In-flight counts keyed by chunk; absent means zero.
#[derive(Default)]
pub(crate) struct Counts(HashMap<u64, u32>);

impl Counts {
    pub(crate) fn get(&self, c: u64) -> u32 {
        self.0.get(&c).copied().unwrap_or(0)
    }
    pub(crate) fn inc(&mut self, c: u64) {
        *self.0.entry(c).or_insert(0) += 1;
    }
    pub(crate) fn dec(&mut self, c: u64) {
        if let Some(n) = self.0.get_mut(&c) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&c);
            }
        }
    }
}

pub(crate) struct SnapState {
    /// Completed exceptions: origin chunk → COW chunk.
    pub exceptions: ExceptionTable,
    /// Exceptions being created (copy or commit in flight).
    pub pending: HashMap<u64, u64>,
    /// Snapshot reads of origin chunks in flight: the origin must not be
    /// written over them until they finish.
    pub origin_readers: Counts,
    /// Origin I/O redirected to this (merging) snapshot's COW chunks.
    pub cow_io: Counts,
    /// Set while this snapshot merges into the origin.
    pub merging: bool,
    /// Origin chunks being merged right now: I/O to them waits.
    pub merge_step: Option<Range<u64>>,
    pub deleted: bool,
    epoch: u64,
}

pub struct Snapshot {
    pub id: SnapId,
    pub(crate) store: Arc<PStore>,
    pub(crate) layout: Layout,
    /// Bytes: the origin's size when the snapshot was taken. An origin
    /// grown since is larger; its chunks past this need no copy here.
    size: u64,
    st: Mutex<SnapState>,
    changed: Notify,
}

impl Snapshot {
    pub(crate) fn new(
        id: SnapId,
        store: Arc<PStore>,
        exceptions: ExceptionTable,
        merging: bool,
        size: u64,
    ) -> Snapshot {
        Snapshot {
            id,
            size,
            layout: store.layout(),
            store,
            st: Mutex::new(SnapState {
                exceptions,
                pending: HashMap::new(),
                origin_readers: Counts::default(),
                cow_io: Counts::default(),
                merging,
                merge_step: None,
                deleted: false,
                epoch: 0,
            }),
            changed: Notify::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SnapState> {
        self.st.lock().expect("snapshot state")
    }

    /// The generation of the state the guard shows.
    pub(crate) fn epoch(st: &SnapState) -> u64 {
        st.epoch
    }

    /// Records a change and wakes every waiter. Call with the guard dropped or
    /// held; waiters re-check under the lock.
    pub(crate) fn changed(&self, st: &mut SnapState) {
        st.epoch += 1;
        self.changed.notify_waiters();
    }

    /// Waits until the state has changed since generation `seen`.
    pub(crate) async fn wait_change(&self, seen: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().epoch != seen {
                return;
            }
            notified.await;
        }
    }

    /// The chunks of this snapshot's size that cover bytes `[off, off+len)`
    /// (none past its end: an origin grown since it was taken).
    pub(crate) fn chunks(&self, off: u64, len: u64) -> Range<u64> {
        let cb = self.layout.chunk_bytes();
        let end = (off + len).min(self.size).div_ceil(cb);
        (off >> self.layout.chunk_shift()).min(end)..end
    }

    /// Size in bytes (the origin's when it was taken).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.layout.chunk_bytes()
    }

    pub fn device_name(&self) -> &str {
        self.store.device().name()
    }

    pub(crate) fn invalid_error(&self) -> Error {
        Error::SnapshotInvalid {
            device: self.device_name().to_string(),
        }
    }

    /// Makes the snapshot invalid (durably) and drops its pending
    /// exceptions, waking whoever waits on them.
    pub(crate) async fn invalidate(&self, why: &str) -> Result<()> {
        if self.store.is_valid() {
            tracing::error!(device = %self.device_name(), "Invalidating snapshot: {why}");
        }
        let r = self.store.invalidate(why).await;
        let mut st = self.lock();
        st.pending.clear();
        self.changed(&mut st);
        r
    }

    /// Undoes the pending exception of origin chunk `c` whose copy into
    /// COW chunk `new` will not be committed (reading the origin failed):
    /// the chunk goes back to the store and whoever waits on `c` wakes.
    pub(crate) fn undo_pending(&self, c: u64, new: u64) {
        self.store.abandon(new);
        let mut st = self.lock();
        st.pending.remove(&c);
        self.changed(&mut st);
    }

    /// Completed exceptions.
    pub fn exception_count(&self) -> u64 {
        self.lock().exceptions.len() as u64
    }

    pub fn is_merging(&self) -> bool {
        self.lock().merging
    }
}
