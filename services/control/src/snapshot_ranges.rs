//! Snapshot deltas and allocated maps: the request checked against the
//! catalog (the snapshots exist, are usable and belong to one volume, the
//! offset is within it), then one page asked of the volume's worker, which
//! reads its live exception tables (`cowsnap_store::delta` has the rule).
//! Nothing is recorded: these calls only read.

use cowsnap_proto::names;

use crate::control::Control;
use crate::error::{ControlError, Result};
use crate::model::{self, RangePage, State};

/// A snapshot whose ranges can be read: ready (an invalid one has lost its
/// content, a merging one changes as it merges).
fn usable(s: &model::Snapshot) -> Result<()> {
    match s.state {
        State::Ready => Ok(()),
        State::Invalid => Err(ControlError::FailedPrecondition(format!(
            "{} is invalid: its content is gone",
            s.name()
        ))),
        other => Err(ControlError::FailedPrecondition(format!(
            "{} is {}",
            s.name(),
            other.as_str()
        ))),
    }
}

impl Control {
    /// The volume of snapshot `name` (checked usable), after checking that
    /// `start` is within it (OUT_OF_RANGE past its end).
    async fn ranged(&self, name: &str, field: &str, start: u64) -> Result<model::Volume> {
        let (vol, snap) =
            names::parse_snapshot(name).map_err(|e| ControlError::invalid(field, e))?;
        usable(&self.snapshot(vol, snap).await?)?;
        let v = self.volume_for(&names::volume(vol), vol).await?;
        if start > v.size_bytes {
            return Err(ControlError::OutOfRange(format!(
                "starting offset {start} is past the end of {name} ({} bytes)",
                v.size_bytes
            )));
        }
        Ok(v)
    }

    /// One page of where snapshot `name` may differ from its volume as it
    /// is now (`base` empty) or from snapshot `base` of the same volume,
    /// from byte `start` on, at most `max` ranges (0: the worker's
    /// default).
    pub async fn snapshot_delta(
        &self,
        name: &str,
        base: &str,
        start: u64,
        max: u32,
    ) -> Result<RangePage> {
        let v = self.ranged(name, "name", start).await?;
        if !base.is_empty() {
            let (base_vol, base_snap) = names::parse_snapshot(base)
                .map_err(|e| ControlError::invalid("base_snapshot", e))?;
            if base_vol != v.id {
                return Err(ControlError::invalid(
                    "base_snapshot",
                    format!(
                        "{base} is not a snapshot of {} (deltas are between snapshots of one volume)",
                        names::volume(&v.id)
                    ),
                ));
            }
            usable(&self.snapshot(base_vol, base_snap).await?)?;
        }
        let w = self.workers.client(&v.worker_id).await?;
        w.snapshot_delta(name, base, start, max).await
    }

    /// One page of the ranges of snapshot `name` that hold data, from byte
    /// `start` on (the whole volume: see the worker's `snapshot_allocated`).
    pub async fn snapshot_allocated(&self, name: &str, start: u64, max: u32) -> Result<RangePage> {
        let v = self.ranged(name, "name", start).await?;
        let w = self.workers.client(&v.worker_id).await?;
        w.snapshot_allocated(name, start, max).await
    }
}
