//! Snapshot deltas and allocated maps, one page at a time, from the live
//! engine: where a snapshot may differ from its volume or from another
//! snapshot of it (the rule is [`cowsnap_store::delta`]'s, read from the
//! exception tables in memory, never by opening the devices again), and
//! which of its bytes hold data.

use cowsnap_proto::names;
use cowsnap_store::delta::{Delta, Span, from_offset};

use super::{Inner, Worker};
use crate::error::{Result, WorkerError};
use crate::state::Phase;

/// Ranges per page when the caller does not say.
pub const DEFAULT_RANGES: u32 = 4096;
/// Most ranges per page.
pub const MAX_RANGES: u32 = 65536;

/// One page of a snapshot's ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangePage {
    /// The snapshot's size (its volume's when it was taken).
    pub size_bytes: u64,
    /// Every range starts on a multiple of it.
    pub block_bytes: u64,
    /// Sorted, apart from each other, within the snapshot.
    pub ranges: Vec<Span>,
    /// Where the next page starts; 0 when this one is the last.
    pub next_offset: u64,
}

/// The page of `d` from `start` on, at most `max` ranges (0: the default).
fn page(d: &Delta, size_bytes: u64, start: u64, max: u32) -> Result<RangePage> {
    if start > size_bytes {
        return Err(WorkerError::invalid(
            "starting_offset",
            format!("{start} is past the end of the snapshot ({size_bytes} bytes)"),
        ));
    }
    let max = match max {
        0 => DEFAULT_RANGES,
        n => n.min(MAX_RANGES),
    } as usize;
    let mut ranges = from_offset(&d.spans, start, d.granule);
    let more = ranges.len() > max;
    ranges.truncate(max);
    Ok(RangePage {
        size_bytes,
        block_bytes: d.granule,
        next_offset: if more {
            ranges.last().map_or(0, |r| r.1)
        } else {
            0
        },
        ranges,
    })
}

/// The engine id of snapshot `name`, its volume's id and its size, for a
/// snapshot that is ready and loaded.
fn loaded(inner: &Inner, name: &str) -> Result<(String, u64, cowsnap_store::SnapId)> {
    let (v, s) = inner.snapshot(name)?;
    if s.phase != Phase::Ready {
        return Err(WorkerError::FailedPrecondition(format!(
            "{name} is not ready"
        )));
    }
    let id = inner
        .live
        .get(&v.id)
        .and_then(|l| l.snap(&s.id))
        .ok_or_else(|| {
            WorkerError::FailedPrecondition(format!("{name} is not loaded in its volume's engine"))
        })?;
    Ok((v.id.clone(), s.size_bytes, id))
}

/// A store error about a snapshot that went away under the call is a
/// NOT_FOUND of it; the others map as usual.
fn gone(name: &str) -> impl Fn(cowsnap_store::Error) -> WorkerError + '_ {
    move |e| match e {
        cowsnap_store::Error::NoSnapshot(_) => WorkerError::NotFound(format!("{name} not found")),
        e => e.into(),
    }
}

impl Worker {
    /// A page of where snapshot `name` may differ from its volume as it is
    /// now (`base` empty) or from snapshot `base` of the same volume.
    pub async fn snapshot_delta(
        &self,
        name: &str,
        base: &str,
        start: u64,
        max: u32,
    ) -> Result<RangePage> {
        let inner = self.inner.lock().await;
        let (vol, size, target) = loaded(&inner, name)?;
        let base_id = if base.is_empty() {
            None
        } else {
            let (base_vol, _) = names::parse_snapshot(base)
                .map_err(|e| WorkerError::invalid("base_snapshot", e))?;
            if base_vol != vol {
                return Err(WorkerError::invalid(
                    "base_snapshot",
                    format!(
                        "{base} is not a snapshot of {} (deltas are between snapshots of one volume)",
                        names::volume(&vol)
                    ),
                ));
            }
            Some(loaded(&inner, base)?.2)
        };
        let origin = inner.origin(&vol)?;
        drop(inner);
        let d = origin.delta(target, base_id).map_err(gone(name))?;
        page(&d, size, start, max)
    }

    /// A page of the ranges of snapshot `name` that hold data. Every byte
    /// of a volume is provisioned (a file or a raw device of the volume's
    /// size, its unwritten parts reading as zeros), and the engine keeps
    /// no record of which origin bytes were ever written, so this is the
    /// whole volume: honest, if not as small as a thin store could say.
    pub async fn snapshot_allocated(&self, name: &str, start: u64, max: u32) -> Result<RangePage> {
        let inner = self.inner.lock().await;
        let (vol, size, id) = loaded(&inner, name)?;
        let origin = inner.origin(&vol)?;
        let chunk_bytes = u64::from(inner.volume_by_id(&vol)?.chunk_sectors) * 512;
        drop(inner);
        let st = origin.status(id).map_err(gone(name))?;
        if !st.valid {
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} is invalid: its content is gone"
            )));
        }
        let whole = Delta {
            spans: vec![(0, size)],
            granule: chunk_bytes,
        };
        page(&whole, size, start, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_each_other_without_overlap() {
        let d = Delta {
            spans: vec![(0, 16), (32, 48), (64, 80), (96, 112)],
            granule: 16,
        };
        let p = page(&d, 128, 0, 3).unwrap();
        assert_eq!(p.ranges, vec![(0, 16), (32, 48), (64, 80)]);
        assert_eq!(p.next_offset, 80);
        let p = page(&d, 128, p.next_offset, 3).unwrap();
        assert_eq!(p.ranges, vec![(96, 112)]);
        assert_eq!(p.next_offset, 0);
        assert_eq!(page(&d, 128, 128, 0).unwrap().ranges, vec![]);
        assert!(matches!(
            page(&d, 128, 129, 0),
            Err(WorkerError::InvalidArgument {
                field: "starting_offset",
                ..
            })
        ));
    }
}
