//! Where a snapshot may differ from its origin, or two snapshots of one
//! origin from each other, from the exception tables alone: the ranges the
//! offline `cowsnap cow delta`, the worker's `GetSnapshotDelta` and the CSI
//! SnapshotMetadata service all report.
//!
//! The rule (dm-snapshot keeps one COW store per snapshot, each holding the
//! chunks that changed in the origin, or were written in the snapshot,
//! since it was taken):
//!
//! - A snapshot reads its COW chunk where it has an exception and the
//!   origin's chunk where it has none. So a snapshot differs from the
//!   origin as it is now only in chunks where it has an exception.
//! - Two snapshots B and T of one origin: a chunk in neither table reads
//!   the origin's chunk in both, so it is identical. A chunk written in the
//!   origin after B was taken and before T is in B's table only (T then
//!   reads the new data, B the old); a chunk first written after both were
//!   taken is in both (each holds the same old data, copied by the same
//!   write); a chunk written in a writable snapshot is in that snapshot's.
//!   So the chunks where B and T may differ are the union of both tables:
//!   never too few; too many only by chunks first written after both were
//!   taken (or written identically), which only comparing the data could
//!   drop (`cowsnap cow delta --exact` does).
//!
//! Exceptions still being made (copy or commit in flight) count as present:
//! the origin write that needs them is about to land. On a volume in use
//! the answer can only grow with time (the tables only grow outside a
//! merge), so a delta read while writes go on is still complete for the
//! moment it was read.
//!
//! Decision L3 in docs/design.md. Ranges are in bytes (two snapshots of
//! one origin may use different chunk sizes), sorted, and merged where
//! they overlap or touch.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::origin::Origin;
use crate::snapshot::{SnapId, Snapshot};

/// `[start, end)` in bytes.
pub type Span = (u64, u64);

/// The byte spans of origin chunks `chunks` of `chunk_bytes` each, clamped
/// to `size` (a last chunk may run past the end of the origin).
pub fn chunk_spans(
    chunks: impl IntoIterator<Item = u64>,
    chunk_bytes: u64,
    size: u64,
) -> Vec<Span> {
    chunks
        .into_iter()
        .map(|c| (c * chunk_bytes, ((c + 1) * chunk_bytes).min(size)))
        .filter(|(s, e)| s < e)
        .collect()
}

/// Sorts spans and merges the ones that overlap or touch.
pub fn coalesce(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort_unstable();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for (s, e) in spans {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The part of sorted, merged `spans` from byte `start` on: spans that end
/// at or before it are left out, and one that straddles it starts at the
/// `granule`-aligned offset at or before it (the start of the chunk that
/// holds it, so every span still starts on a chunk boundary).
pub fn from_offset(spans: &[Span], start: u64, granule: u64) -> Vec<Span> {
    let first = spans.partition_point(|&(_, e)| e <= start);
    let floor = start - start % granule.max(1);
    spans[first..]
        .iter()
        .map(|&(s, e)| (s.max(floor), e))
        .collect()
}

/// Where snapshots may differ: see the module doc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delta {
    /// Sorted, merged, within the target snapshot's size.
    pub spans: Vec<Span>,
    /// The smallest chunk size of the snapshots compared: every span starts
    /// and ends on a multiple of it (or at the origin's end).
    pub granule: u64,
}

impl Origin {
    /// The origin chunks `id` has an exception for, completed or in the
    /// making, its chunk size and its size. Refused for an invalid snapshot (its
    /// content is gone) and a merging one (its table shrinks as the origin
    /// takes its chunks, so it says nothing stable).
    fn exception_spans(&self, id: SnapId) -> Result<(Vec<Span>, u64, u64)> {
        let s: Arc<Snapshot> = self.snapshot(id)?;
        if !s.store.is_valid() {
            return Err(s.invalid_error());
        }
        let st = s.lock();
        if st.merging {
            return Err(Error::Merging(
                id,
                "a merging snapshot's changes are not stable",
            ));
        }
        let cb = s.chunk_bytes();
        let chunks: Vec<u64> = st
            .exceptions
            .iter()
            .map(|(old, _)| old)
            .chain(st.pending.keys().copied())
            .collect();
        drop(st);
        Ok((chunk_spans(chunks, cb, s.size()), cb, s.size()))
    }

    /// Where snapshot `target` may differ from the origin as it is now
    /// (`base` `None`) or from snapshot `base` of this origin, read from
    /// the live exception tables (see the module doc for the rule).
    ///
    /// Snapshots taken before and after the origin grew differ in size:
    /// the spans stay within `target`'s size, and a base smaller than
    /// `target` differs in all of `target` past the base's end.
    pub fn delta(&self, target: SnapId, base: Option<SnapId>) -> Result<Delta> {
        let (mut spans, mut granule, size) = self.exception_spans(target)?;
        if let Some(b) = base {
            let (more, cb, base_size) = self.exception_spans(b)?;
            spans.extend(more);
            granule = granule.min(cb);
            if base_size < size {
                spans.push((base_size, size));
            }
        } else {
            // Held writes (D13) whose copies have not started yet are in
            // the origin's content but not in any table.
            let cb = granule;
            for (off, len) in self.held_regions() {
                let end = (off + len).next_multiple_of(cb).min(size);
                spans.push((off / cb * cb, end));
            }
        }
        let spans = coalesce(spans)
            .into_iter()
            .map(|(s, e)| (s, e.min(size)))
            .filter(|(s, e)| s < e)
            .collect();
        Ok(Delta { spans, granule })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_overlapping_and_touching_spans() {
        assert_eq!(
            coalesce(vec![(32, 48), (0, 16), (16, 32), (64, 80), (70, 75)]),
            vec![(0, 48), (64, 80)]
        );
        assert_eq!(coalesce(vec![]), vec![]);
    }

    #[test]
    fn chunk_spans_clamp_to_the_origin_size() {
        assert_eq!(
            chunk_spans([0, 2, 3], 16, 56),
            vec![(0, 16), (32, 48), (48, 56)]
        );
        assert_eq!(chunk_spans([4], 16, 56), vec![]);
    }

    #[test]
    fn from_offset_drops_spans_before_and_cuts_a_straddling_one_at_its_chunk() {
        let spans = [(0, 64), (128, 192), (256, 272)];
        assert_eq!(from_offset(&spans, 0, 16), spans.to_vec());
        assert_eq!(from_offset(&spans, 64, 16), vec![(128, 192), (256, 272)]);
        assert_eq!(from_offset(&spans, 150, 16), vec![(144, 192), (256, 272)]);
        assert_eq!(from_offset(&spans, 272, 16), vec![]);
        assert_eq!(from_offset(&spans, 1000, 16), vec![]);
    }
}
