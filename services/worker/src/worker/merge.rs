//! Merging a snapshot back into its volume: the call that starts it (or
//! returns the merge already running) and the task that runs it to the
//! end, then releases the snapshot.

use std::sync::Arc;

use cowsnap_proto::names;

use super::Worker;
use crate::error::{Result, WorkerError};
use crate::state::{Phase, TaskKind, TaskRec};
use crate::tasks::TaskHandle;

impl Worker {
    pub async fn merge_snapshot(self: &Arc<Self>, name: &str) -> Result<TaskRec> {
        let mut inner = self.inner.lock().await;
        let (v, s) = inner.snapshot(name)?;
        let (vol, snap) = (v.id.clone(), s.id.clone());
        if s.phase != Phase::Ready {
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} is not ready"
            )));
        }
        if v.retired {
            return Err(WorkerError::FailedPrecondition(format!(
                "{} is retired (deleted while it has snapshots); nothing merges into it",
                names::volume(&vol)
            )));
        }
        if let Some(t) = self.tasks.running_for(name)
            && t.get().kind == TaskKind::Merge
        {
            return Ok(t.get());
        }
        match v.merging.as_deref() {
            Some(m) if m == snap => {
                // Merging after a failed task: run it again (it resumes).
            }
            Some(m) => {
                return Err(WorkerError::FailedPrecondition(format!(
                    "{} is already merging {}",
                    names::volume(&vol),
                    names::snapshot(&vol, m)
                )));
            }
            None => {}
        }
        if s.size_bytes != v.size_bytes {
            // Merging would leave the volume's bytes past the snapshot's
            // end as they are now: not the snapshot's image.
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} has {} bytes but {} has grown to {} since it was taken: merging would not give the snapshot's image; restore it into a new volume instead",
                s.size_bytes,
                names::volume(&vol),
                v.size_bytes
            )));
        }
        if let Some(t) = self.tasks.running_for(&names::volume(&vol)) {
            return Err(WorkerError::FailedPrecondition(format!(
                "{} is busy with task tasks/{}",
                names::volume(&vol),
                t.get().id
            )));
        }
        let (origin, id) = inner.loaded(&vol, &snap, name)?;
        if !origin.status(id)?.valid {
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} is invalid (it overflowed or failed): there is nothing to merge"
            )));
        }
        let task = self.new_task(
            &mut inner,
            TaskKind::Merge,
            name.to_string(),
            names::volume(&vol),
        );
        inner.volume_mut(&vol).merging = Some(snap.clone());
        self.save(&mut inner)?;
        self.exports.remove(name);
        origin.start_merge(id).await?;
        drop(inner);
        tracing::info!(snapshot = %name, task = %task.get().id, "merge started");
        self.spawn_task(task.clone());
        Ok(task.get())
    }

    pub(super) async fn run_merge(&self, task: &Arc<TaskHandle>) -> Result<()> {
        let name = task.get().target;
        let (vol, snap) =
            names::parse_snapshot(&name).map_err(|e| WorkerError::invalid("name", e))?;
        let (origin, id) = self.inner.lock().await.loaded(vol, snap, &name)?;
        origin
            .merge(id, |p| {
                task.progress(p.chunks_total - p.chunks_left, p.chunks_total)
            })
            .await?;
        let mut inner = self.inner.lock().await;
        let v = inner.volume_mut(vol);
        v.merging = None;
        let s = v
            .snapshots
            .iter_mut()
            .find(|s| s.id == snap)
            .ok_or_else(|| WorkerError::NotFound(format!("{name} vanished")))?;
        s.phase = Phase::Deleting;
        let s = s.clone();
        // The merge's end and the task's success are saved together: a
        // crash after this save never resumes a merge whose snapshot is
        // gone (a restart releases the snapshot's device, in `Deleting`).
        // Watchers learn of it once the snapshot is released.
        self.save_held_success(&mut inner, task)?;
        if let Err(e) = self.detach_snapshot(&mut inner, vol, &s).await {
            tracing::error!(snapshot = %name, "merged, but its device is not released yet (the next start releases it): {e}");
        }
        task.announce();
        tracing::info!(snapshot = %name, "merge done");
        Ok(())
    }
}
