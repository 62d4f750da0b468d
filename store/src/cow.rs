//! Copy-on-write of origin chunks: the origin device and its snapshot list,
//! and the one path that gives every snapshot lacking a chunk its exception
//! (the chunk copied into its COW device and the record committed) before
//! the origin is written there. Shared by the engine ([`crate::origin`])
//! and its write-back task ([`crate::writeback`]).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use futures::future::join_all;

use crate::error::Result;
use crate::format::Record;
use crate::io::{AlignedBuf, Device};
use crate::snapshot::{SnapId, Snapshot};

/// A snapshot and the COW chunk allocated for a copy.
type CopyTarget = (Arc<Snapshot>, u64);

/// A snapshot and the (origin chunk, COW chunk) pairs written to it with
/// one I/O: both sides consecutive.
type CowWrite = (Arc<Snapshot>, Vec<(u64, u64)>);

/// Longest run of origin chunks copied with one read (and, where the COW
/// chunks follow on, one write per snapshot): bounds the buffer.
const MAX_COPY_BYTES: u64 = 1 << 20;

/// Consecutive origin chunks of one chunk size, and who needs each.
struct CopyRun {
    chunk_bytes: u64,
    first: u64,
    chunks: Vec<(u64, Vec<CopyTarget>)>,
}

/// Why a snapshot whose COW device filled up is invalid (the kernel logs
/// "Unable to allocate exception.").
pub(crate) const COW_FULL: &str =
    "its COW device is full: no chunk left for a new exception (Unable to allocate exception)";

/// The origin device and its snapshots, as the copy-on-write path needs
/// them.
pub(crate) struct CopyOnWrite {
    pub(crate) dev: Device,
    /// The snapshots, oldest first; replaced, never changed in place.
    pub(crate) snaps: RwLock<Arc<Vec<Arc<Snapshot>>>>,
}

impl CopyOnWrite {
    pub(crate) fn new(dev: Device) -> CopyOnWrite {
        CopyOnWrite {
            dev,
            snaps: RwLock::new(Arc::new(Vec::new())),
        }
    }

    /// The snapshots, oldest first: a shared copy of the list.
    pub(crate) fn snapshots(&self) -> Arc<Vec<Arc<Snapshot>>> {
        self.snaps.read().expect("snapshot list").clone()
    }

    fn size(&self) -> u64 {
        self.dev.size()
    }

    /// Whether writing `[off, off+len)` of the origin needs a copy first:
    /// some valid, non-merging snapshot lacks a committed exception for one
    /// of its chunks (or a snapshot failed and is not yet durably invalid).
    pub(crate) fn needs_copy(&self, off: u64, len: u64) -> bool {
        self.snapshots().iter().any(|s| {
            let st = s.lock();
            if st.deleted || st.merging {
                return false;
            }
            if !s.store.is_valid() {
                return !s.store.is_durably_invalid();
            }
            s.chunks(off, len).any(|c| !st.exceptions.contains_key(&c))
        })
    }

    /// Makes sure every valid, non-merging snapshot has a committed exception
    /// for every chunk of `[off, off+len)` and that no snapshot read of those
    /// origin chunks is in flight: after this, the origin range may be
    /// written (D1 of docs/design.md). Snapshots that cannot take the exception
    /// (full, or failing) are invalidated durably first; if that cannot be
    /// made durable, this fails and the origin must not be written.
    pub(crate) async fn ensure_copied(&self, off: u64, len: u64) -> Result<()> {
        self.ensure_copied_all(&[(off, len)]).await
    }

    /// [`Self::ensure_copied`] for several `(offset, length)` ranges at
    /// once: their copies run together and their exceptions share group
    /// commits.
    pub(crate) async fn ensure_copied_all(&self, ranges: &[(u64, u64)]) -> Result<()> {
        loop {
            let mut create: Vec<(Arc<Snapshot>, u64, u64)> = Vec::new();
            let mut wait: Option<(Arc<Snapshot>, u64)> = None;
            let mut invalidate: Vec<(Arc<Snapshot>, &'static str)> = Vec::new();
            for s in self.snapshots().iter() {
                let mut st = s.lock();
                if st.deleted || st.merging {
                    continue;
                }
                if !s.store.is_valid() {
                    if !s.store.is_durably_invalid() {
                        invalidate.push((s.clone(), "the snapshot failed"));
                    }
                    continue;
                }
                let epoch = Snapshot::epoch(&st);
                for c in ranges.iter().flat_map(|&(off, len)| s.chunks(off, len)) {
                    if st.exceptions.contains_key(&c) {
                        if st.origin_readers.get(c) > 0 && wait.is_none() {
                            wait = Some((s.clone(), epoch));
                        }
                        continue;
                    }
                    if st.pending.contains_key(&c) {
                        if wait.is_none() {
                            wait = Some((s.clone(), epoch));
                        }
                        continue;
                    }
                    match s.store.prepare() {
                        Ok(new) => {
                            st.pending.insert(c, new);
                            create.push((s.clone(), c, new));
                        }
                        Err(_) => {
                            invalidate.push((s.clone(), COW_FULL));
                            break;
                        }
                    }
                }
            }
            if create.is_empty() && wait.is_none() && invalidate.is_empty() {
                return Ok(());
            }
            for (s, why) in invalidate {
                s.invalidate(why).await?;
            }
            if !create.is_empty() {
                self.create_exceptions(create).await?;
            }
            if let Some((s, epoch)) = wait {
                s.wait_change(epoch).await;
            }
        }
    }

    /// Copies origin chunks into the snapshots that need them and commits
    /// the exceptions. Consecutive origin chunks are read with one I/O (each
    /// read once per chunk size, whatever the number of snapshots), and
    /// chunks that are consecutive in a COW device too are written there
    /// with one I/O: a large write costs a few I/Os, not two per chunk.
    async fn create_exceptions(&self, list: Vec<(Arc<Snapshot>, u64, u64)>) -> Result<()> {
        let mut by_chunk: BTreeMap<(u64, u64), Vec<CopyTarget>> = BTreeMap::new();
        for (s, c, new) in list {
            by_chunk
                .entry((s.chunk_bytes(), c))
                .or_default()
                .push((s, new));
        }
        let mut runs: Vec<CopyRun> = Vec::new();
        for ((cb, c), targets) in by_chunk {
            match runs.last_mut() {
                Some(r)
                    if r.chunk_bytes == cb
                        && r.first + r.chunks.len() as u64 == c
                        && (r.chunks.len() as u64 + 1) * cb <= MAX_COPY_BYTES.max(cb) =>
                {
                    r.chunks.push((c, targets))
                }
                _ => runs.push(CopyRun {
                    chunk_bytes: cb,
                    first: c,
                    chunks: vec![(c, targets)],
                }),
            }
        }
        let results = join_all(runs.into_iter().map(|r| self.copy_run(r))).await;
        results.into_iter().collect()
    }

    /// Reads a run of origin chunks once and writes each snapshot's share
    /// of it, in as few writes as its COW chunks allow.
    async fn copy_run(&self, run: CopyRun) -> Result<()> {
        let cb = run.chunk_bytes;
        let n = run.chunks.len() as u64;
        let start = run.first * cb;
        let len = (n * cb).min(self.size() - start);
        let data = match self.dev.read(start, len as usize).await {
            Ok(d) => d,
            Err(e) => {
                for (c, targets) in &run.chunks {
                    for (s, new) in targets {
                        s.undo_pending(*c, *new);
                    }
                }
                return Err(e);
            }
        };
        // Per snapshot, stretches where origin and COW chunks both follow on.
        let mut writes: Vec<CowWrite> = Vec::new();
        let mut open: BTreeMap<SnapId, usize> = BTreeMap::new();
        for (c, targets) in run.chunks {
            for (s, new) in targets {
                let continues = open.get(&s.id).is_some_and(|&i| {
                    let &(lc, ln) = writes[i].1.last().expect("never empty");
                    lc + 1 == c && ln + 1 == new
                });
                if continues {
                    writes[open[&s.id]].1.push((c, new));
                } else {
                    open.insert(s.id, writes.len());
                    writes.push((s, vec![(c, new)]));
                }
            }
        }
        let whole = writes.len() == 1 && writes[0].1.len() as u64 == n && len == n * cb;
        let mut data = Some(data);
        let mut jobs = Vec::with_capacity(writes.len());
        for (s, recs) in writes {
            let buf = if whole {
                data.take().expect("taken once")
            } else {
                let src = data.as_ref().expect("kept");
                let at = ((recs[0].0 - run.first) * cb) as usize;
                let want = recs.len() * cb as usize;
                let have = want.min(src.len() - at);
                // Past the origin's end (its last chunk cut short) a copy
                // is zero; otherwise every byte is copied over.
                let mut b = if have == want {
                    AlignedBuf::for_overwrite(want)
                } else {
                    AlignedBuf::zeroed(want)
                };
                b[..have].copy_from_slice(&src[at..at + have]);
                b
            };
            jobs.push(finish_exceptions(s, recs, buf));
        }
        let results = join_all(jobs).await;
        results.into_iter().collect()
    }
}

/// Writes the copy of chunk `c` into COW chunk `new` of `s` and commits the
/// exception; see [`finish_exceptions`].
pub(crate) async fn finish_exception(
    s: Arc<Snapshot>,
    c: u64,
    new: u64,
    buf: AlignedBuf,
) -> Result<()> {
    finish_exceptions(s, vec![(c, new)], buf).await
}

/// Writes `buf`, the copies of origin chunks `recs[i].0`, into COW chunks
/// `recs[i].1` of `s` (consecutive, so one write) and commits the
/// exceptions, all in the same group commit; on success each is visible to
/// lookups. A COW device that fails is invalidated: the call succeeds once
/// that is durable (the origin may go ahead without this snapshot), and
/// fails if even that cannot be done.
async fn finish_exceptions(s: Arc<Snapshot>, recs: Vec<(u64, u64)>, buf: AlignedBuf) -> Result<()> {
    let cb = s.chunk_bytes();
    let (first, last) = (recs[0].1, recs[recs.len() - 1].1);
    debug_assert_eq!(buf.len() as u64, (last - first + 1) * cb);
    let mut committed = vec![false; recs.len()];
    let failure = match s.store.device().write(first * cb, buf, false).await {
        Err(e) => {
            for &(_, new) in &recs {
                s.store.abandon(new);
            }
            Some(if first == last {
                format!("Error writing COW chunk {first}: {e}")
            } else {
                format!("Error writing COW chunks {first}-{last}: {e}")
            })
        }
        Ok(_) => {
            let results = join_all(
                recs.iter()
                    .map(|&(old, new)| s.store.commit(Record { old, new })),
            )
            .await;
            let mut failure = None;
            for (ok, r) in committed.iter_mut().zip(results) {
                match r {
                    Ok(()) => *ok = true,
                    Err(e) => failure = failure.or(Some(format!("{e}"))),
                }
            }
            failure
        }
    };
    {
        let mut st = s.lock();
        for (&(c, new), ok) in recs.iter().zip(committed) {
            st.pending.remove(&c);
            if ok {
                st.exceptions.insert(c, new);
            }
        }
        s.changed(&mut st);
    }
    match failure {
        None => Ok(()),
        Some(why) => s.invalidate(&why).await,
    }
}
