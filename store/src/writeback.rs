//! Write-back of origin writes that need copy-on-write (D13 of
//! docs/design.md). Such a plain write is acknowledged once its data is held
//! here; a background batch then copies the chunks into the snapshots that
//! lack them, commits their exceptions (one group commit for all the batch
//! holds) and only then writes the origin, so the order of D1 is unchanged.
//!
//! This module owns every origin write in flight outside a merge, held or
//! not: the reads of held bytes, the per-byte order of overlapping writes
//! (a write never reaches the device before an older overlapping one), the
//! cap on held bytes (past it writers wait: a [`HeldBudget`], one per engine
//! or shared by every volume of a worker), what FLUSH and FUA wait for, and
//! the errors of background writes, kept for the next FLUSH (or FUA write)
//! as a kernel keeps write-back errors for the next `fsync`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::join_all;
use tokio::sync::Notify;

use crate::cow::CopyOnWrite;
use crate::error::{Error, Result};
use crate::io::AlignedBuf;

/// Held bytes per engine (or per worker, sharing a [`HeldBudget`]) unless
/// configured otherwise.
pub const DEFAULT_CAP: u64 = 128 << 20;

/// The cap on bytes held by the engines that share it (a worker's volumes):
/// a write that would take the held bytes past it waits until held writes
/// reach their origins, unless nothing is held at all (so a write larger
/// than the cap still goes, alone).
pub struct HeldBudget {
    cap: u64,
    /// Bytes held now, and the most ever held at once.
    used: Mutex<(u64, u64)>,
    /// Woken whenever held bytes are given back.
    freed: Notify,
}

impl HeldBudget {
    pub fn new(cap: u64) -> Arc<HeldBudget> {
        Arc::new(HeldBudget {
            cap,
            used: Mutex::new((0, 0)),
            freed: Notify::new(),
        })
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Bytes held now by every engine sharing the budget.
    pub fn used(&self) -> u64 {
        self.used.lock().expect("held budget").0
    }

    /// The most bytes they ever held at once.
    pub fn max_used(&self) -> u64 {
        self.used.lock().expect("held budget").1
    }

    fn fits(used: u64, len: u64, cap: u64) -> bool {
        used == 0 || used + len <= cap
    }

    /// Takes `len` bytes if they fit.
    fn try_take(&self, len: u64) -> bool {
        let mut used = self.used.lock().expect("held budget");
        let ok = HeldBudget::fits(used.0, len, self.cap);
        if ok {
            used.0 += len;
            used.1 = used.1.max(used.0);
        }
        ok
    }

    /// Takes `len` bytes whether they fit or not (bytes moving in from
    /// another budget: they are held already).
    fn take_anyway(&self, len: u64) {
        let mut used = self.used.lock().expect("held budget");
        used.0 += len;
        used.1 = used.1.max(used.0);
    }

    fn give_back(&self, len: u64) {
        self.used.lock().expect("held budget").0 -= len;
        self.freed.notify_waiters();
    }

    /// Waits until `len` bytes might fit (they may be gone again by the
    /// time the caller takes them).
    async fn wait_room(&self, len: u64) {
        let freed = self.freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if HeldBudget::fits(self.used(), len, self.cap) {
            return;
        }
        freed.await;
    }
}

/// Batches in flight at once: the next batch copies and commits while the
/// one before writes the origin, and a batch takes at most a share of the
/// cap, so the device never idles while a commit waits.
const MAX_BATCHES: u64 = 4;

/// What the write-back path has done since the engine was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WriteBackStats {
    /// The cap on held bytes.
    pub cap: u64,
    /// Bytes held now (acknowledged, not yet on the origin).
    pub held_bytes: u64,
    /// The most bytes ever held at once.
    pub max_held_bytes: u64,
    /// Writes that went through write-back.
    pub held_writes: u64,
    /// Background batches run (each one copy-and-commit round).
    pub batches: u64,
    /// The most writes one batch carried.
    pub max_batch: u64,
    /// Held writes that failed (each reported at the next FLUSH).
    pub failed: u64,
}

/// An origin write in flight: held (its data stays here until the origin
/// has it) or direct (the writer does its own I/O).
struct Entry {
    off: u64,
    len: u64,
    data: Option<Arc<AlignedBuf>>,
    fua: bool,
}

/// A held write handed to a batch.
struct Held {
    seq: u64,
    off: u64,
    len: u64,
    data: Arc<AlignedBuf>,
    fua: bool,
}

/// A failed held write, kept for the next FLUSH.
struct Failure {
    off: u64,
    len: u64,
    detail: String,
}

#[derive(Default)]
struct State {
    budget: Option<Arc<HeldBudget>>,
    next_seq: u64,
    /// Writes in flight by sequence number (the order they were accepted).
    entries: BTreeMap<u64, Entry>,
    /// The same, by (offset, sequence number).
    by_off: BTreeSet<(u64, u64)>,
    /// The longest write ever seen: bounds the search for overlaps.
    max_len: u64,
    /// Held writes no batch has taken yet, oldest first.
    queue: VecDeque<u64>,
    held_bytes: u64,
    batches: u64,
    failure: Option<Failure>,
    /// Results of held FUA writes, until their writers take them.
    fua_done: HashMap<u64, Result<(), String>>,
    stats: WriteBackStats,
    epoch: u64,
}

impl State {
    /// The entries overlapping `[off, off+len)` accepted before `before`.
    fn overlapping(&self, off: u64, len: u64, before: u64) -> impl Iterator<Item = (u64, &Entry)> {
        let lo = off.saturating_sub(self.max_len);
        self.by_off
            .range((lo, 0)..(off + len, 0))
            .filter_map(move |&(_, seq)| {
                let e = &self.entries[&seq];
                (seq < before && e.off + e.len > off).then_some((seq, e))
            })
    }
}

pub(crate) struct WriteBack {
    cow: Arc<CopyOnWrite>,
    st: Mutex<State>,
    changed: Notify,
    /// Held writes now: reads skip the lock when there are none.
    held: AtomicU64,
}

/// Removes a direct write's entry when its writer is done (or dropped).
struct Direct<'a> {
    wb: &'a WriteBack,
    seq: u64,
}

impl Drop for Direct<'_> {
    fn drop(&mut self) {
        self.wb.finish(self.seq, Ok(()));
    }
}

impl WriteBack {
    pub(crate) fn new(cow: Arc<CopyOnWrite>, cap: u64) -> WriteBack {
        WriteBack {
            cow,
            st: Mutex::new(State {
                budget: Some(HeldBudget::new(cap)),
                stats: WriteBackStats {
                    cap,
                    ..Default::default()
                },
                ..Default::default()
            }),
            changed: Notify::new(),
            held: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().expect("write-back state")
    }

    fn changed(&self, st: &mut State) {
        st.epoch += 1;
        self.changed.notify_waiters();
    }

    async fn wait_change(&self, seen: u64) {
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

    /// Waits until `done` holds of the state.
    async fn wait_until(&self, mut done: impl FnMut(&State) -> bool) {
        loop {
            let epoch = {
                let st = self.lock();
                if done(&st) {
                    return;
                }
                st.epoch
            };
            self.wait_change(epoch).await;
        }
    }

    /// Holds writes under `budget` from now on; the bytes held now move
    /// to it.
    pub(crate) fn set_budget(&self, budget: Arc<HeldBudget>) {
        let mut st = self.lock();
        budget.take_anyway(st.held_bytes);
        let old = st.budget.replace(budget.clone()).expect("a budget");
        old.give_back(st.held_bytes);
        st.stats.cap = budget.cap;
        self.changed(&mut st);
    }

    fn budget(st: &State) -> &Arc<HeldBudget> {
        st.budget.as_ref().expect("a budget")
    }

    pub(crate) fn stats(&self) -> WriteBackStats {
        let st = self.lock();
        WriteBackStats {
            held_bytes: st.held_bytes,
            ..st.stats
        }
    }

    /// Writes `buf` at `off` of the origin (outside a merge). A plain write
    /// that needs a copy, or that overlaps a write still in flight, is held
    /// and acknowledged at once (after waiting for room under the cap); a
    /// held FUA write returns once it is durable. Any other write goes to
    /// the device now, after its copies (D1), as before write-back existed.
    pub(crate) async fn write(
        self: &Arc<Self>,
        off: u64,
        buf: AlignedBuf,
        fua: bool,
    ) -> Result<()> {
        let len = buf.len() as u64;
        let copy = !fua && self.cow.needs_copy(off, len);
        let mut buf = Some(buf);
        let (seq, held) = loop {
            let wait = {
                let mut st = self.lock();
                let hold = copy || st.overlapping(off, len, u64::MAX).next().is_some();
                if hold && !WriteBack::budget(&st).try_take(len) {
                    Err(WriteBack::budget(&st).clone())
                } else {
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.max_len = st.max_len.max(len);
                    st.by_off.insert((off, seq));
                    let data = hold.then(|| Arc::new(buf.take().expect("taken once")));
                    st.entries.insert(
                        seq,
                        Entry {
                            off,
                            len,
                            data,
                            fua,
                        },
                    );
                    if hold {
                        st.held_bytes += len;
                        st.stats.held_writes += 1;
                        st.stats.max_held_bytes = st.stats.max_held_bytes.max(st.held_bytes);
                        st.queue.push_back(seq);
                        self.held.fetch_add(1, Ordering::AcqRel);
                        self.kick(&mut st);
                    }
                    Ok((seq, hold))
                }
            };
            match wait {
                Ok(accepted) => break accepted,
                // Backpressure: wait for held writes (of any engine that
                // shares the budget) to leave.
                Err(budget) => budget.wait_room(len).await,
            }
        };
        if !held {
            let _entry = Direct { wb: self, seq };
            self.cow.ensure_copied(off, len).await?;
            self.cow
                .dev
                .write(off, buf.take().expect("kept"), fua)
                .await?;
        } else if fua {
            self.wait_until(|st| st.fua_done.contains_key(&seq)).await;
            let r = self.lock().fua_done.remove(&seq).expect("waited for");
            if let Err(detail) = r {
                return Err(self.error(off, len, detail));
            }
        } else {
            return Ok(());
        }
        if fua { self.take_failure() } else { Ok(()) }
    }

    /// Starts batches of queued held writes while fewer than
    /// [`MAX_BATCHES`] run. A batch takes every queued write up to its
    /// share of the cap: its size follows the held work.
    fn kick(self: &Arc<Self>, st: &mut State) {
        while st.batches < MAX_BATCHES && !st.queue.is_empty() {
            let limit = (WriteBack::budget(st).cap / MAX_BATCHES).max(1);
            let (mut bytes, mut batch) = (0, Vec::new());
            while let Some(&seq) = st.queue.front() {
                let e = &st.entries[&seq];
                if !batch.is_empty() && bytes + e.len > limit {
                    break;
                }
                bytes += e.len;
                batch.push(Held {
                    seq,
                    off: e.off,
                    len: e.len,
                    data: e.data.clone().expect("queued writes are held"),
                    fua: e.fua,
                });
                st.queue.pop_front();
            }
            st.batches += 1;
            st.stats.batches += 1;
            st.stats.max_batch = st.stats.max_batch.max(batch.len() as u64);
            tokio::spawn(self.clone().run_batch(batch));
        }
    }

    /// One batch: the copies and commits of every write in it together,
    /// then each origin write once no older overlapping write is in flight.
    async fn run_batch(self: Arc<Self>, batch: Vec<Held>) {
        let ranges: Vec<(u64, u64)> = batch.iter().map(|h| (h.off, h.len)).collect();
        let copied = self
            .cow
            .ensure_copied_all(&ranges)
            .await
            .map_err(|e| format!("copying to the snapshots first failed: {e}"));
        let copied = &copied;
        let me = &self;
        join_all(batch.into_iter().map(|h| async move {
            let r = match copied {
                Err(e) => Err(e.clone()),
                Ok(()) => {
                    me.wait_until(|st| st.overlapping(h.off, h.len, h.seq).next().is_none())
                        .await;
                    // The held copy stays readable until the device has it.
                    me.cow
                        .dev
                        .write(h.off, AlignedBuf::from_slice(&h.data), h.fua)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            };
            me.finish(h.seq, r);
        }))
        .await;
        let mut st = self.lock();
        st.batches -= 1;
        self.kick(&mut st);
    }

    /// Retires write `seq`: held data is dropped, a failure is logged with
    /// its region and kept for the next FLUSH (or given to the FUA writer).
    fn finish(&self, seq: u64, r: Result<(), String>) {
        let mut st = self.lock();
        let Some(e) = st.entries.remove(&seq) else {
            return;
        };
        st.by_off.remove(&(e.off, seq));
        if e.data.is_some() {
            st.held_bytes -= e.len;
            WriteBack::budget(&st).give_back(e.len);
            self.held.fetch_sub(1, Ordering::AcqRel);
            if let Err(detail) = &r {
                tracing::error!(
                    device = %self.cow.dev.name(),
                    offset = e.off,
                    len = e.len,
                    "An acknowledged write did not reach the origin: {detail}"
                );
                st.stats.failed += 1;
            }
            if e.fua {
                st.fua_done.insert(seq, r);
            } else if let Err(detail) = r
                && st.failure.is_none()
            {
                st.failure = Some(Failure {
                    off: e.off,
                    len: e.len,
                    detail,
                });
            }
        }
        self.changed(&mut st);
    }

    fn error(&self, offset: u64, len: u64, detail: String) -> Error {
        Error::WriteBack {
            device: self.cow.dev.name().to_string(),
            offset,
            len,
            detail,
        }
    }

    /// The failure of a held write not yet reported, once.
    pub(crate) fn take_failure(&self) -> Result<()> {
        let f = self.lock().failure.take();
        match f {
            None => Ok(()),
            Some(f) => Err(self.error(f.off, f.len, f.detail)),
        }
    }

    /// Waits until every write accepted before this call has reached the
    /// origin device (or failed): what a FLUSH waits for before flushing.
    pub(crate) async fn settle(&self) {
        let limit = self.lock().next_seq;
        self.wait_until(|st| st.entries.range(..limit).next().is_none())
            .await;
    }

    /// Waits until no write is in flight; under the gate's write side no new
    /// one starts, so the origin then holds every acknowledged write.
    pub(crate) async fn drain(&self) {
        self.wait_until(|st| st.entries.is_empty()).await;
    }

    /// The byte ranges of every held write, as (offset, length).
    pub(crate) fn held_regions(&self) -> Vec<(u64, u64)> {
        if self.held.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let st = self.lock();
        st.entries
            .values()
            .filter(|e| e.data.is_some())
            .map(|e| (e.off, e.len))
            .collect()
    }

    /// The held writes overlapping `[off, off+len)`, oldest first: their
    /// offsets and data.
    pub(crate) fn held_over(&self, off: u64, len: u64) -> Vec<(u64, Arc<AlignedBuf>)> {
        if self.held.load(Ordering::Acquire) == 0 {
            return Vec::new();
        }
        let st = self.lock();
        let mut v: Vec<(u64, u64, Arc<AlignedBuf>)> = st
            .overlapping(off, len, u64::MAX)
            .filter_map(|(seq, e)| e.data.clone().map(|d| (seq, e.off, d)))
            .collect();
        v.sort_unstable_by_key(|h| h.0);
        v.into_iter().map(|(_, o, d)| (o, d)).collect()
    }
}

/// Copies held writes (oldest first, so the newest wins) over `buf`, the
/// bytes at `off` as read from the device.
pub(crate) fn overlay(buf: &mut [u8], off: u64, held: &[(u64, Arc<AlignedBuf>)]) {
    let end = off + buf.len() as u64;
    for (h_off, data) in held {
        let from = off.max(*h_off);
        let to = end.min(h_off + data.len() as u64);
        if from < to {
            buf[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&data[(from - h_off) as usize..(to - h_off) as usize]);
        }
    }
}
