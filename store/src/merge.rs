//! Merging a snapshot back into its origin (dm's `snapshot-merge`): the
//! origin is rolled back to the snapshot's content, from the last exception
//! backwards in runs of consecutive chunks.
//!
//! Each step:
//! 1. takes the last run of consecutive exceptions (`prepare_merge`);
//! 2. holds new origin I/O to those chunks and waits for the I/O in flight
//!    there (it goes to the snapshot's COW chunks while they are unmerged);
//! 3. gives the other snapshots their copies of the origin range (their
//!    content must not change);
//! 4. copies the COW chunks onto the origin and flushes the origin;
//! 5. clears the records and writes the area with `RWF_DSYNC`
//!    (`commit_merge`), and drops the exceptions from the table.
//!
//! A crash before 5 is durable leaves the records: the next run copies the
//! same chunks again, which is harmless because the origin chunks hold
//! either the old data or the snapshot's (writes to them went to the COW
//! chunks). A crash after 5 has the data on the origin already (4 flushed
//! it). So a merge resumed after a crash at any point ends with the right
//! content. While merging, the origin stays readable and writable: an
//! unmerged chunk is read from and written to the COW device.

use crate::error::{Error, Result};
use crate::io::AlignedBuf;
use crate::origin::Origin;
use crate::snapshot::{SnapId, Snapshot};

/// Chunks merged in one step at most (the run may be longer).
const MAX_STEP_BYTES: u64 = 4 << 20;

/// How far a merge has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MergeProgress {
    /// Exceptions left to merge.
    pub chunks_left: u64,
    /// Exceptions when this merge (or its resumption) started.
    pub chunks_total: u64,
}

impl Origin {
    /// Puts snapshot `id` into merging state (the origin's content becomes
    /// the snapshot's). Idempotent.
    pub async fn start_merge(&self, id: SnapId) -> Result<()> {
        let _suspended = self.suspend().await;
        let s = self.snapshot(id)?;
        if let Some(m) = self.merging_snapshot()
            && m.id != id
        {
            return Err(Error::Merging(
                m.id,
                "another snapshot of this origin is already merging",
            ));
        }
        if !s.store.is_valid() {
            return Err(s.invalid_error());
        }
        let mut st = s.lock();
        st.merging = true;
        s.changed(&mut st);
        self.set_merging(id);
        Ok(())
    }

    /// Merges snapshot `id` into the origin (starting the merge if needed),
    /// calling `progress` after each step. When it returns `Ok` the origin
    /// holds the snapshot's content and the snapshot is gone (its COW device
    /// holds no exceptions). After an error (or a crash) calling it again
    /// resumes the merge.
    pub async fn merge(&self, id: SnapId, mut progress: impl FnMut(MergeProgress)) -> Result<()> {
        self.start_merge(id).await?;
        let s = self.snapshot(id)?;
        let total = s.exception_count();
        progress(MergeProgress {
            chunks_left: total,
            chunks_total: total,
        });
        loop {
            let step = {
                let _io = self.gate().read().await;
                self.merge_step(&s).await
            };
            match step {
                Ok(true) => progress(MergeProgress {
                    chunks_left: s.exception_count(),
                    chunks_total: total,
                }),
                Ok(false) => break,
                Err(e) => {
                    let mut st = s.lock();
                    st.merge_step = None;
                    s.changed(&mut st);
                    return Err(e);
                }
            }
        }
        let _suspended = self.suspend().await;
        self.remove_snapshot(id);
        self.set_merging(0);
        let mut st = s.lock();
        st.merging = false;
        st.deleted = true;
        s.changed(&mut st);
        Ok(())
    }

    /// One step; false when nothing is left to merge.
    async fn merge_step(&self, s: &Snapshot) -> Result<bool> {
        let Some((last, run)) = s.store.prepare_merge().await? else {
            return Ok(false);
        };
        let cb = s.chunk_bytes();
        let n = run.min((MAX_STEP_BYTES / cb).max(1));
        let old = last.old + 1 - n..last.old + 1;
        let new_start = last.new + 1 - n;
        // 2. Hold new I/O to the range; wait for what is in flight there.
        {
            let mut st = s.lock();
            for (i, c) in old.clone().enumerate() {
                if st.exceptions.get(&c) != Some(&(new_start + i as u64)) {
                    return Err(Error::Corrupt {
                        device: s.device_name().to_string(),
                        detail: format!(
                            "merge: the record for origin chunk {c} does not match the loaded exceptions"
                        ),
                    });
                }
            }
            st.merge_step = Some(old.clone());
            s.changed(&mut st);
        }
        loop {
            let busy = {
                let st = s.lock();
                (!old.clone().all(|c| st.cow_io.get(c) == 0)).then(|| Snapshot::epoch(&st))
            };
            match busy {
                Some(epoch) => s.wait_change(epoch).await,
                None => break,
            }
        }
        // 3. The other snapshots keep their view of the origin.
        let off = old.start * cb;
        let len = (old.end * cb).min(self.size()) - off;
        self.ensure_copied(off, len).await?;
        // 4. Copy and flush.
        let data = s
            .store
            .device()
            .read(new_start * cb, (n * cb) as usize)
            .await?;
        let data = if len == data.len() as u64 {
            data
        } else {
            AlignedBuf::from_slice(&data[..len as usize])
        };
        self.device().write(off, data, false).await?;
        self.device().flush().await?;
        // 5. Commit.
        s.store.commit_merge(n).await?;
        let mut st = s.lock();
        for c in old {
            st.exceptions.remove(&c);
        }
        st.merge_step = None;
        s.changed(&mut st);
        Ok(true)
    }
}
