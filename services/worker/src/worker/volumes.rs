//! Volume calls: create (idempotent: the same arguments return the existing
//! volume), get, list, retire (deleted while it has snapshots: export
//! closed, devices kept for them) and delete.

use std::sync::Arc;

use cowsnap_proto::names;
use cowsnap_store::format::DEFAULT_CHUNK_SECTORS;

use super::live::Live;
use super::{VolumeInfo, Worker, chunk_layout, same_or_exists};
use crate::error::{Result, WorkerError};
use crate::state::{Phase, VolumeRec, now};

/// What a new empty volume asks for.
#[derive(Clone, Debug, Default)]
pub struct NewVolume {
    pub volume_id: String,
    /// 0: the whole raw `device`.
    pub size_bytes: u64,
    /// 0: the default (32).
    pub chunk_sectors: u32,
    /// A raw device from the allow list; empty: a new file.
    pub device: String,
}

impl Worker {
    /// FAILED_PRECONDITION while a task (merge, restore, clone) uses
    /// volume `name`.
    fn no_task_on(&self, name: &str) -> Result<()> {
        match self.tasks.running_for(name) {
            None => Ok(()),
            Some(t) => {
                let t = t.get();
                Err(WorkerError::FailedPrecondition(format!(
                    "{name} is used by task tasks/{} ({} of {})",
                    t.id,
                    t.kind.as_str(),
                    t.target
                )))
            }
        }
    }

    pub async fn create_volume(&self, new: &NewVolume) -> Result<VolumeInfo> {
        let NewVolume {
            volume_id,
            size_bytes,
            chunk_sectors,
            device,
        } = new;
        let (volume_id, size_bytes) = (volume_id.as_str(), *size_bytes);
        names::check_id(volume_id).map_err(|e| WorkerError::invalid("volume_id", e))?;
        let layout = chunk_layout("chunk_sectors", *chunk_sectors, DEFAULT_CHUNK_SECTORS)?;
        let mut inner = self.inner.lock().await;
        let file = self.devices.volume_file(volume_id);
        if let Some(v) = inner.st.volumes().get(volume_id) {
            let asked_dev = self.asked_device(device, file)?;
            let asked_size = if size_bytes == 0 && !device.is_empty() {
                v.size_bytes
            } else {
                size_bytes
            };
            same_or_exists(
                &names::volume(volume_id),
                (v.size_bytes, v.chunk_sectors, v.device.clone()),
                (asked_size, layout.chunk_sectors(), asked_dev),
            )?;
            return Ok(self.volume_info(&inner, v));
        }
        if size_bytes == 0 && device.is_empty() {
            return Err(WorkerError::invalid("size_bytes", "must be positive"));
        }
        let mut place = self.choose_device(&inner.st, device, file, size_bytes)?;
        if size_bytes == 0 {
            // The whole raw device, in whole chunks.
            place.size -= place.size % layout.chunk_bytes();
        }
        let (path, file_backed, size) = (place.path, place.file_backed, place.size);
        if size == 0 || !size.is_multiple_of(4096) || !size.is_multiple_of(layout.chunk_bytes()) {
            return Err(WorkerError::invalid(
                "size_bytes",
                format!(
                    "{size} is not a positive multiple of 4096 and of the chunk size ({} bytes)",
                    layout.chunk_bytes()
                ),
            ));
        }
        let rec = VolumeRec {
            id: volume_id.to_string(),
            size_bytes: size,
            chunk_sectors: layout.chunk_sectors(),
            device: path.clone(),
            file_backed,
            phase: Phase::Creating,
            snapshots: Vec::new(),
            merging: None,
            retired: false,
            create_time: now(),
        };
        inner.st.insert_volume(rec);
        self.save(&mut inner)?;
        let origin = self
            .prepare_device(&path, file_backed, size)
            .and_then(|()| self.open_engine(&path, file_backed, size));
        let origin = match origin {
            Ok(o) => Arc::new(o),
            Err(e) => {
                // Undo the intent: nothing was acknowledged.
                inner.st.remove_volume(volume_id);
                if file_backed {
                    let _ = self.devices.release(&path, true);
                }
                self.save(&mut inner)?;
                return Err(e);
            }
        };
        let v = inner.volume_mut(volume_id);
        v.phase = Phase::Ready;
        let v = v.clone();
        inner
            .live
            .insert(volume_id.to_string(), Live::up(origin.clone()));
        self.save(&mut inner)?;
        self.export_volume(&v, &inner.live[volume_id]);
        tracing::info!(volume = %names::volume(volume_id), size, device = %path.display(), "volume created");
        Ok(self.volume_info(&inner, &v))
    }

    pub async fn get_volume(&self, name: &str) -> Result<VolumeInfo> {
        let inner = self.inner.lock().await;
        let v = inner.volume(name)?;
        Ok(self.volume_info(&inner, v))
    }

    pub async fn list_volumes(&self) -> Vec<VolumeInfo> {
        let inner = self.inner.lock().await;
        inner
            .st
            .volumes()
            .values()
            .map(|v| self.volume_info(&inner, v))
            .collect()
    }

    /// Grows a volume online to `size_bytes` (idempotent: asking for the
    /// size it has returns it; smaller is refused). Its snapshots keep
    /// their size. D14 of docs/design.md: the device grows first (a file
    /// extended and synced, the new part of a raw device zeroed), then the
    /// record (D8), then the engine: a crash between the first two leaves a
    /// device larger than its volume, which is harmless (a raw device may
    /// be larger than its volume anyway), and the grow was not
    /// acknowledged. Connections open before keep the size they were told
    /// at their handshake (NBD has no resize notice); new ones see the new
    /// size.
    pub async fn expand_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        let mut inner = self.inner.lock().await;
        let v = inner.volume(name)?.clone();
        if size_bytes == v.size_bytes {
            return Ok(self.volume_info(&inner, &v));
        }
        if size_bytes < v.size_bytes {
            return Err(WorkerError::invalid(
                "size_bytes",
                format!(
                    "{size_bytes} is smaller than the {} bytes {name} has: volumes only grow",
                    v.size_bytes
                ),
            ));
        }
        let layout = chunk_layout("chunk_sectors", v.chunk_sectors, DEFAULT_CHUNK_SECTORS)?;
        if !size_bytes.is_multiple_of(4096) || !size_bytes.is_multiple_of(layout.chunk_bytes()) {
            return Err(WorkerError::invalid(
                "size_bytes",
                format!(
                    "{size_bytes} is not a multiple of 4096 and of the chunk size ({} bytes)",
                    layout.chunk_bytes()
                ),
            ));
        }
        if v.phase != Phase::Ready || v.retired || v.merging.is_some() {
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} is not ready (merging, being created or deleted, or retired)"
            )));
        }
        self.no_task_on(name)?;
        let origin = inner.origin(&v.id)?;
        let more = size_bytes - v.size_bytes;
        if v.file_backed {
            self.ensure_file_room(&inner.st, more)?;
            self.devices.extend_file(&v.device, size_bytes)?;
        } else {
            let have = crate::devices::raw_size(&v.device).map_err(anyhow::Error::from)?;
            if have < size_bytes {
                return Err(WorkerError::ResourceExhausted(format!(
                    "{name} is on a raw device of {have} bytes: it cannot grow to {size_bytes}"
                )));
            }
            self.devices.zero_raw_range(&v.device, v.size_bytes, more)?;
        }
        cowsnap_proto::kill_point::reached("worker:expand_volume:device");
        inner.volume_mut(&v.id).size_bytes = size_bytes;
        if let Err(e) = self.save(&mut inner) {
            inner.volume_mut(&v.id).size_bytes = v.size_bytes;
            return Err(e);
        }
        cowsnap_proto::kill_point::reached("worker:expand_volume:recorded");
        origin.grow(size_bytes).await?;
        tracing::info!(volume = %name, from = v.size_bytes, to = size_bytes, "volume expanded");
        let v = inner.volume(name)?;
        Ok(self.volume_info(&inner, v))
    }

    /// Retires a volume (idempotent): records it (D8), then closes its
    /// export and ends the connections using it. Its engine stays up so its
    /// snapshots read through it; a restart exports only the snapshots.
    pub async fn retire_volume(&self, name: &str) -> Result<VolumeInfo> {
        let mut inner = self.inner.lock().await;
        let v = inner.volume(name)?.clone();
        if !v.retired {
            if v.phase != Phase::Ready || v.merging.is_some() {
                return Err(WorkerError::FailedPrecondition(format!(
                    "{name} is not ready (merging, or being created or deleted)"
                )));
            }
            self.no_task_on(name)?;
            inner.volume_mut(&v.id).retired = true;
            self.save(&mut inner)?;
            tracing::info!(volume = %name, "volume retired: export closed, kept for its snapshots");
        }
        // Also after a crash between the save and here (the export of a
        // retired volume is never registered again at start).
        self.exports.close(name);
        let v = inner.volume(name)?;
        Ok(self.volume_info(&inner, v))
    }

    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let v = inner.volume(name)?.clone();
        let visible = v.snapshots.iter().filter(|s| s.kind().is_visible()).count();
        if visible > 0 {
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} has {visible} snapshot(s); delete them first"
            )));
        }
        self.no_task_on(name)?;
        if !v.snapshots.is_empty() {
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} is the source of a clone in progress"
            )));
        }
        inner.volume_mut(&v.id).phase = Phase::Deleting;
        self.save(&mut inner)?;
        cowsnap_proto::kill_point::reached("worker:delete_volume:recorded");
        self.exports.remove(name);
        if let Some(Live::Up { origin, .. }) = inner.live.remove(&v.id) {
            self.retired_io
                .lock()
                .expect("retired io")
                .add(&origin.io_stats());
            origin.shutdown().await?;
        }
        self.devices.release(&v.device, v.file_backed)?;
        cowsnap_proto::kill_point::reached("worker:delete_volume:released");
        inner.st.remove_volume(&v.id);
        self.save(&mut inner)?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }
}
