//! Restore and clone: a new volume filled from a snapshot (restore) or
//! from a volume as it is at the call (clone, through a hidden snapshot of
//! the source, [`SnapshotKind::CloneSource`]). The calls record the new volume and its
//! task; the task copies, then makes the volume ready and exports it.

use std::sync::Arc;

use cowsnap_proto::names;
use cowsnap_store::{Layout, Origin, SnapId, Target};

use super::live::Live;
use super::placement::full_cow_bytes;
use super::snapshot_kind::SnapshotKind;
use super::{Inner, Worker, chunk_layout};
use crate::error::{Result, WorkerError};
use crate::state::{Phase, SnapshotRec, TaskKind, TaskRec, VolumeRec, now};
use crate::tasks::{TaskHandle, copy_volume};

/// What a restored or cloned volume asks for (its size is the source's).
#[derive(Clone, Debug, Default)]
pub struct CopiedVolume {
    pub volume_id: String,
    /// 0: the source's.
    pub chunk_sectors: u32,
    /// A raw device from the allow list; empty: a new file.
    pub device: String,
}

/// What a copy reads from.
struct Source<'a> {
    kind: TaskKind,
    /// The snapshot (restore) or volume (clone), by name.
    name: &'a str,
    size: u64,
    chunk_sectors: u32,
}

fn source_volume(rec: &TaskRec) -> Result<String> {
    Ok(names::parse_volume(&rec.source)
        .map_err(|e| WorkerError::invalid("source", e))?
        .to_string())
}

impl Worker {
    pub async fn restore_volume(
        self: &Arc<Self>,
        new: &CopiedVolume,
        source_snapshot: &str,
    ) -> Result<TaskRec> {
        names::check_id(&new.volume_id).map_err(|e| WorkerError::invalid("volume_id", e))?;
        let mut inner = self.inner.lock().await;
        let (v, s) = inner.snapshot(source_snapshot)?;
        let source = Source {
            kind: TaskKind::Restore,
            name: source_snapshot,
            size: s.size_bytes,
            chunk_sectors: v.chunk_sectors,
        };
        if s.phase != Phase::Ready || v.merging.as_deref() == Some(s.id.as_str()) {
            return Err(WorkerError::FailedPrecondition(format!(
                "{source_snapshot} is not ready (merging, or being created or deleted)"
            )));
        }
        // As a merge does: an invalid snapshot has no image to copy.
        let (vol, snap) = (v.id.clone(), s.id.clone());
        let (origin, id) = inner.loaded(&vol, &snap, source_snapshot)?;
        if !origin.status(id)?.valid {
            return Err(WorkerError::FailedPrecondition(format!(
                "{source_snapshot} is invalid (it overflowed or failed): there is nothing to restore"
            )));
        }
        self.start_copy(&mut inner, new, source).await
    }

    pub async fn clone_volume(
        self: &Arc<Self>,
        new: &CopiedVolume,
        source_volume: &str,
    ) -> Result<TaskRec> {
        names::check_id(&new.volume_id).map_err(|e| WorkerError::invalid("volume_id", e))?;
        let mut inner = self.inner.lock().await;
        let v = inner.volume(source_volume)?;
        if v.phase != Phase::Ready || v.merging.is_some() || v.retired {
            return Err(WorkerError::FailedPrecondition(format!(
                "{source_volume} is not ready (merging, being created or deleted, or retired)"
            )));
        }
        let source = Source {
            kind: TaskKind::Clone,
            name: source_volume,
            size: v.size_bytes,
            chunk_sectors: v.chunk_sectors,
        };
        self.start_copy(&mut inner, new, source).await
    }

    /// Records a new volume and the task that fills it from `source`.
    async fn start_copy(
        self: &Arc<Self>,
        inner: &mut Inner,
        new: &CopiedVolume,
        source: Source<'_>,
    ) -> Result<TaskRec> {
        let Source {
            kind,
            name: source,
            size,
            chunk_sectors: src_chunk,
        } = source;
        let (volume_id, device) = (new.volume_id.as_str(), new.device.as_str());
        let layout = chunk_layout("chunk_sectors", new.chunk_sectors, src_chunk)?;
        let vname = names::volume(volume_id);
        if let Some(existing) = inner.st.volumes().get(volume_id) {
            // Idempotent: the same restore or clone returns its task.
            let task = self
                .tasks
                .list()
                .into_iter()
                .rev()
                .find(|t| t.target == vname && t.kind == kind && t.source == source);
            return match task {
                Some(t) if existing.chunk_sectors == layout.chunk_sectors() => Ok(t),
                _ => Err(WorkerError::AlreadyExists(format!(
                    "{vname} already exists and is not a {} of {source}",
                    kind.as_str()
                ))),
            };
        }
        let file = self.devices.volume_file(volume_id);
        let place = self.choose_device(&inner.st, device, file, size)?;
        if place.size < size {
            return Err(WorkerError::invalid(
                "device",
                format!("{device} is smaller than {size} bytes"),
            ));
        }
        if !size.is_multiple_of(layout.chunk_bytes()) {
            return Err(WorkerError::invalid(
                "chunk_sectors",
                format!(
                    "the source size {size} is not a multiple of {} bytes",
                    layout.chunk_bytes()
                ),
            ));
        }
        let task = self.new_task(inner, kind, vname.clone(), source.to_string());
        inner.st.insert_volume(VolumeRec {
            id: volume_id.to_string(),
            size_bytes: size,
            chunk_sectors: layout.chunk_sectors(),
            device: place.path,
            file_backed: place.file_backed,
            phase: Phase::Creating,
            snapshots: Vec::new(),
            merging: None,
            retired: false,
            create_time: now(),
        });
        self.save(inner)?;
        if kind == TaskKind::Clone {
            // The clone is of the source as it is now: a temporary snapshot
            // taken before the call returns, copied in the background.
            let sv = names::parse_volume(source)
                .map_err(|e| WorkerError::invalid("source_volume", e))?;
            let temp = SnapshotKind::CloneSource {
                task: &task.get().id,
            }
            .to_string();
            if let Err(e) = self.create_temp_snapshot(inner, sv, &temp).await {
                inner.st.remove_volume(volume_id);
                task.update(|t| {
                    t.done = true;
                    t.error = Some(e.client_message());
                });
                self.save(inner)?;
                return Err(e);
            }
        }
        tracing::info!(volume = %vname, kind = kind.as_str(), source, task = %task.get().id, "copy started");
        self.spawn_task(task.clone());
        Ok(task.get())
    }

    /// The task of a restore or clone: copies, then makes the new volume
    /// ready and exports it.
    pub(super) async fn run_copy(&self, task: &Arc<TaskHandle>) -> Result<()> {
        let rec = task.get();
        let vol = names::parse_volume(&rec.target)
            .map_err(|e| WorkerError::invalid("target", e))?
            .to_string();
        let (src_origin, target, dst_origin) = self.copy_ends(&rec, &vol).await?;
        let copied = copy_volume(src_origin, target, dst_origin.clone(), task.clone()).await;
        let mut inner = self.inner.lock().await;
        // A clone's temporary snapshot of its source goes away whatever the
        // outcome.
        let temp = match rec.kind {
            TaskKind::Clone => {
                let sv = source_volume(&rec)?;
                let temp = SnapshotKind::CloneSource { task: &rec.id };
                inner
                    .st
                    .volumes()
                    .get(&sv)
                    .and_then(|v| v.snapshots.iter().find(|s| s.kind() == temp))
                    .cloned()
                    .map(|s| (sv, s))
            }
            _ => None,
        };
        if let Some((sv, s)) = &temp {
            inner.set_snapshot_phase(sv, &s.id, Phase::Deleting);
        }
        if let Err(e) = copied {
            self.save(&mut inner)?;
            if let Some((sv, s)) = &temp {
                self.detach_snapshot(&mut inner, sv, s).await?;
            }
            return Err(e.into());
        }
        let v = inner.volume_mut(&vol);
        v.phase = Phase::Ready;
        let v = v.clone();
        inner.live.insert(vol.clone(), Live::up(dst_origin));
        // The new volume's readiness, the task's success and the release of
        // the clone's temporary snapshot are saved together: a crash after
        // this save never copies again (over a volume clients may already
        // use, or from a later point in time).
        // Watchers learn of it once the volume is exported.
        self.save_held_success(&mut inner, task)?;
        if let Some((sv, s)) = &temp
            && let Err(e) = self.detach_snapshot(&mut inner, sv, s).await
        {
            tracing::error!(volume = %rec.target, "copied, but the temporary snapshot is not released yet (the next start releases it): {e}");
        }
        self.export_volume(&v, &inner.live[&vol]);
        task.announce();
        tracing::info!(volume = %rec.target, kind = rec.kind.as_str(), source = %rec.source, "copy done");
        Ok(())
    }

    /// Sets up a copy into volume id `vol`: its new device and engine, and
    /// the source's engine and target.
    async fn copy_ends(
        &self,
        rec: &TaskRec,
        vol: &str,
    ) -> Result<(Arc<Origin>, Target, Arc<Origin>)> {
        let mut inner = self.inner.lock().await;
        let v = inner
            .st
            .volumes()
            .get(vol)
            .cloned()
            .ok_or_else(|| WorkerError::NotFound(format!("{} vanished", rec.target)))?;
        self.prepare_device(&v.device, v.file_backed, v.size_bytes)?;
        let dst = Arc::new(self.open_engine(&v.device, v.file_backed, v.size_bytes)?);
        let (src_vol, target) = match rec.kind {
            TaskKind::Restore => {
                let (sv, ss) = names::parse_snapshot(&rec.source)
                    .map_err(|e| WorkerError::invalid("source", e))?;
                let id = inner.live.get(sv).and_then(|l| l.snap(ss)).ok_or_else(|| {
                    WorkerError::FailedPrecondition(format!("{} is not loaded", rec.source))
                })?;
                (sv.to_string(), Target::Snapshot(id))
            }
            _ => {
                // A clone copies a temporary snapshot of the source: a
                // consistent point in time while the source stays in use.
                let sv = source_volume(rec)?;
                let temp = SnapshotKind::CloneSource { task: &rec.id }.to_string();
                let id = match inner.live.get(&sv).and_then(|l| l.snap(&temp)) {
                    Some(id) => id,
                    None => self.create_temp_snapshot(&mut inner, &sv, &temp).await?,
                };
                (sv, Target::Snapshot(id))
            }
        };
        Ok((inner.origin(&src_vol)?, target, dst))
    }

    /// Takes the clone's temporary snapshot `temp` of volume id `vol`: large
    /// enough never to overflow, on a file, neither exported nor listed.
    async fn create_temp_snapshot(
        &self,
        inner: &mut Inner,
        vol: &str,
        temp: &str,
    ) -> Result<SnapId> {
        let v = inner
            .st
            .volumes()
            .get(vol)
            .cloned()
            .ok_or_else(|| WorkerError::NotFound(format!("volume {vol} vanished")))?;
        let origin = inner.origin(vol)?;
        let layout = Layout::new(v.chunk_sectors).map_err(|e| WorkerError::Internal(e.into()))?;
        let path = self.devices.snapshot_file(vol, temp);
        let size = full_cow_bytes(v.size_bytes, layout);
        inner.volume_mut(vol).snapshots.push(SnapshotRec {
            id: temp.to_string(),
            size_bytes: v.size_bytes,
            cow_size_bytes: size,
            chunk_sectors: layout.chunk_sectors(),
            device: path.clone(),
            file_backed: true,
            writable: false,
            phase: Phase::Creating,
            create_time: now(),
            error: None,
        });
        self.save(inner)?;
        let id = self.attach_cow(&origin, &path, true, size, layout).await?;
        inner.live.get_mut(vol).expect("live").add_snap(temp, id);
        inner.set_snapshot_phase(vol, temp, Phase::Ready);
        self.save(inner)?;
        Ok(id)
    }
}
