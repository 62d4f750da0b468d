//! Snapshot calls: create (idempotent: the same arguments return the
//! existing snapshot), get and delete; attaching a COW device to the
//! engine and detaching it; and saving why a snapshot became invalid.

use std::path::Path;
use std::sync::Arc;

use cowsnap_proto::names;
use cowsnap_store::{Layout, Origin, SnapId, SnapshotOptions};

use super::info::snapshot_info;
use super::live::Live;
use super::placement::full_cow_bytes;
use super::snapshot_kind::SnapshotKind;
use super::{Inner, SnapshotInfo, Worker, chunk_layout, same_or_exists};
use crate::error::{Result, WorkerError};
use crate::state::{Phase, SnapshotRec, now, sync_dir};

/// What a new snapshot asks for.
#[derive(Clone, Debug, Default)]
pub struct NewSnapshot {
    /// Its volume, `volumes/VOL`.
    pub parent: String,
    pub snapshot_id: String,
    /// 0: large enough never to overflow (a file), or the whole raw
    /// `device`.
    pub cow_size_bytes: u64,
    /// 0: the volume's.
    pub chunk_sectors: u32,
    /// A raw device from the allow list; empty: a new file.
    pub device: String,
    pub writable: bool,
}

/// The outcome of a blocking task (a panic in it goes on here).
fn joined<T>(
    r: std::result::Result<anyhow::Result<T>, tokio::task::JoinError>,
) -> anyhow::Result<T> {
    match r {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(anyhow::anyhow!("a blocking task did not run: {e}")),
    }
}

impl Worker {
    /// Creates a snapshot, or returns the existing one when it was made
    /// with the same arguments. The create runs to its end in a task of
    /// its own even if the caller goes away (a dropped gRPC call): its
    /// state write is in two halves, and no other save may come between.
    pub async fn create_snapshot(self: &Arc<Self>, new: &NewSnapshot) -> Result<SnapshotInfo> {
        let (me, new) = (self.clone(), new.clone());
        match tokio::spawn(async move { me.create_snapshot_to_end(&new).await }).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(WorkerError::Unavailable(format!(
                "the worker is shutting down: {e}"
            ))),
        }
    }

    async fn create_snapshot_to_end(self: &Arc<Self>, new: &NewSnapshot) -> Result<SnapshotInfo> {
        let NewSnapshot {
            parent,
            snapshot_id,
            cow_size_bytes,
            chunk_sectors,
            device,
            writable,
        } = new;
        let (snapshot_id, cow_size_bytes, writable) =
            (snapshot_id.as_str(), *cow_size_bytes, *writable);
        let vol = names::parse_volume(parent).map_err(|e| WorkerError::invalid("parent", e))?;
        names::check_id(snapshot_id).map_err(|e| WorkerError::invalid("snapshot_id", e))?;
        let mut inner = self.inner.lock().await;
        let v = inner.volume_by_id(vol)?.clone();
        let layout = chunk_layout("chunk_sectors", *chunk_sectors, v.chunk_sectors)?;
        let sname = names::snapshot(vol, snapshot_id);
        let file = self.devices.snapshot_file(vol, snapshot_id);
        if let Some(s) = v.snapshots.iter().find(|s| s.id == snapshot_id) {
            let asked_size = if cow_size_bytes == 0 {
                s.cow_size_bytes
            } else {
                cow_size_bytes
            };
            let asked_dev = self.asked_device(device, file)?;
            same_or_exists(
                &sname,
                (
                    s.cow_size_bytes,
                    s.chunk_sectors,
                    s.device.clone(),
                    s.writable,
                ),
                (asked_size, layout.chunk_sectors(), asked_dev, writable),
            )?;
            return Ok(snapshot_info(&v, s, inner.live.get(vol)));
        }
        if v.phase != Phase::Ready {
            return Err(WorkerError::FailedPrecondition(format!(
                "{parent} is not ready"
            )));
        }
        if v.retired {
            return Err(WorkerError::FailedPrecondition(format!(
                "{parent} is retired (deleted while it has snapshots); no snapshot can be taken of it"
            )));
        }
        if let Some(m) = &v.merging {
            return Err(WorkerError::FailedPrecondition(format!(
                "{parent} is merging {}; no snapshot can be taken until the merge ends",
                names::snapshot(vol, m)
            )));
        }
        let origin = inner.origin(vol)?;
        let asked = if cow_size_bytes == 0 && device.is_empty() {
            full_cow_bytes(v.size_bytes, layout)
        } else {
            cow_size_bytes
        };
        let place = self.choose_device(&inner.st, device, file, asked)?;
        let (path, file_backed, size) = (place.path, place.file_backed, place.size);
        if size < layout.min_device_bytes() || !size.is_multiple_of(4096) {
            return Err(WorkerError::invalid(
                "cow_size_bytes",
                format!(
                    "{size} bytes: a COW device needs a multiple of 4096 bytes and at least {} (a header, one metadata area and one data chunk of {} bytes)",
                    layout.min_device_bytes(),
                    layout.chunk_bytes()
                ),
            ));
        }
        let s = SnapshotRec {
            id: snapshot_id.to_string(),
            size_bytes: v.size_bytes,
            cow_size_bytes: size,
            chunk_sectors: layout.chunk_sectors(),
            device: path.clone(),
            file_backed,
            writable,
            phase: Phase::Creating,
            create_time: now(),
            error: None,
        };
        // One state write (D9 of docs/design.md), beside the device work:
        // the record says `Creating` until the next save, and start-up
        // keeps such a snapshot only if its COW header was written. A crash
        // before both are durable leaves a record start-up drops, or a COW
        // device no record names (a file, removed at start; a raw device,
        // zeroed before any use); the create was not acknowledged.
        inner.volume_mut(vol).snapshots.push(s.clone());
        let added = match self
            .attach_and_save(&mut inner, &origin, &sname, &s, layout)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                inner
                    .volume_mut(vol)
                    .snapshots
                    .retain(|s| s.id != snapshot_id);
                if let Err(e) = self.save(&mut inner) {
                    tracing::error!(snapshot = %sname, "cannot record that the create failed (start-up drops it): {e}");
                }
                return Err(e);
            }
        };
        // Durable with the next save; until then start-up makes it ready
        // from its header.
        inner.set_snapshot_phase(vol, snapshot_id, Phase::Ready);
        let s = SnapshotRec {
            phase: Phase::Ready,
            ..s
        };
        inner
            .live
            .get_mut(vol)
            .expect("live volume")
            .add_snap(snapshot_id, added);
        self.watch_invalid(&origin, added, vol, snapshot_id);
        let v = inner.st.volumes()[vol].clone();
        if SnapshotKind::of(snapshot_id).is_visible() {
            self.export_snapshot(vol, &s, &origin, added);
        }
        tracing::info!(snapshot = %sname, cow_size = size, device = %path.display(), "snapshot created");
        Ok(snapshot_info(&v, &s, inner.live.get(vol)))
    }

    /// Makes the COW device of the new snapshot `s` (a new file, or a
    /// zeroed raw device), attaches it to `origin`'s engine, and saves the
    /// state, which `inner` holds with `s` in it (`Creating`). The three
    /// durable parts run side by side, in one device round trip: the
    /// journal record, the engine's attach (origin flush beside the COW
    /// format, one `RWF_DSYNC` write of its header chunk and zeroed area 0)
    /// and, for a new file, the fsync of its directory entry. The file's
    /// size needs no fsync of its own: a `RWF_DSYNC` write completes as
    /// though followed by `fdatasync`, which makes durable a size set by
    /// `ftruncate` (open(2), fdatasync(2)). A raw device was zeroed (and
    /// synced) before any of it, so no old header can pass for the new
    /// one. On error the device is given back and the engine does not hold
    /// the snapshot.
    async fn attach_and_save(
        &self,
        inner: &mut Inner,
        origin: &Arc<Origin>,
        sname: &str,
        s: &SnapshotRec,
        layout: Layout,
    ) -> Result<SnapId> {
        let path = s.device.as_path();
        let release = || {
            if let Err(e) = self.devices.release(path, s.file_backed) {
                tracing::error!(snapshot = %sname, device = %path.display(), "cannot give back the device of a failed create: {e}");
            }
        };
        let made = if s.file_backed {
            self.devices.new_file(path, s.cow_size_bytes).map(drop)
        } else {
            // A new COW device starts with a zero header.
            self.devices.zero_raw(path, layout.chunk_bytes() * 2)
        };
        if let Err(e) = made {
            if s.file_backed {
                release();
            }
            return Err(e);
        }
        let save = match self.prepare_save(inner) {
            Ok(save) => save,
            Err(e) => {
                release();
                return Err(e);
            }
        };
        let file = self.file.clone();
        let recorded = tokio::task::spawn_blocking(move || {
            let r = file.commit(save);
            cowsnap_proto::kill_point::reached("worker:create_snapshot:recorded");
            r
        });
        let dir_entry = s.file_backed.then(|| {
            let dir = self.devices.dir().to_path_buf();
            tokio::task::spawn_blocking(move || sync_dir(&dir))
        });
        let attached = self
            .attach_device(origin, path, s.file_backed, s.cow_size_bytes, layout, true)
            .await;
        // Every blocking part is waited for, whatever failed: none may
        // outlive this call (and the lock) to race the next save.
        let recorded = joined(recorded.await);
        let dir_entry = match dir_entry {
            Some(h) => joined(h.await),
            None => Ok(()),
        };
        let added = match attached {
            Ok(a) => a,
            Err(e) => {
                release();
                return Err(e);
            }
        };
        cowsnap_proto::kill_point::reached("worker:create_snapshot:attached");
        if let Err(e) = recorded.and(dir_entry) {
            // Not recorded: take it out of the engine and give the device
            // back, as if the create had never started.
            match origin.delete_snapshot(added).await {
                Ok(_) => release(),
                Err(d) => {
                    tracing::error!(snapshot = %sname, device = %path.display(), "cannot take an unsaved snapshot out of the engine: {d}")
                }
            }
            return Err(WorkerError::Internal(e));
        }
        Ok(added)
    }

    /// Prepares a COW device (a new file, made durable, or a zeroed raw
    /// device) and attaches it to the engine as a new snapshot.
    pub(super) async fn attach_cow(
        &self,
        origin: &Arc<Origin>,
        path: &Path,
        file_backed: bool,
        size: u64,
        layout: Layout,
    ) -> Result<SnapId> {
        if file_backed {
            self.devices.create_file(path, size)?;
        } else {
            // A new COW device starts with a zero header.
            self.devices.zero_raw(path, layout.chunk_bytes() * 2)?;
        }
        self.attach_device(origin, path, file_backed, size, layout, false)
            .await
    }

    /// Attaches a prepared COW device to the engine as a new snapshot
    /// (atomic against in-flight writes). `unnamed`: no state written yet
    /// names the device (made all zero by this call), so it is formatted
    /// with one durable write (`Origin::add_new_snapshot`).
    async fn attach_device(
        &self,
        origin: &Arc<Origin>,
        path: &Path,
        file_backed: bool,
        size: u64,
        layout: Layout,
        unnamed: bool,
    ) -> Result<SnapId> {
        let dev = self.open_sized(path, file_backed, size)?;
        if dev.block_size() > origin.block_size() {
            // NBD clients were told the volume's alignment at connect time.
            return Err(WorkerError::invalid(
                "device",
                format!(
                    "the COW device's logical block size {} is larger than the volume's ({})",
                    dev.block_size(),
                    origin.block_size()
                ),
            ));
        }
        let chunk_sectors = Some(layout.chunk_sectors());
        let a = if unnamed {
            origin.add_new_snapshot(dev, chunk_sectors).await?
        } else {
            let opts = SnapshotOptions {
                chunk_sectors,
                merging: false,
                size: None,
            };
            origin.add_snapshot(dev, opts).await?
        };
        Ok(a.id)
    }

    pub async fn get_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        let inner = self.inner.lock().await;
        let (v, s) = inner.snapshot(name)?;
        Ok(snapshot_info(v, s, inner.live.get(&v.id)))
    }

    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let (v, s) = inner.snapshot(name)?;
        let (vol, s) = (v.id.clone(), s.clone());
        if v.merging.as_deref() == Some(s.id.as_str()) {
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} is merging into {}; it goes away when the merge ends",
                names::volume(&vol)
            )));
        }
        if let Some(t) = self.tasks.running_for(name) {
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} is the source of task tasks/{}",
                t.get().id
            )));
        }
        inner.set_snapshot_phase(&vol, &s.id, Phase::Deleting);
        self.save(&mut inner)?;
        cowsnap_proto::kill_point::reached("worker:delete_snapshot:recorded");
        self.exports.remove(name);
        self.detach_snapshot(&mut inner, &vol, &s).await?;
        cowsnap_proto::kill_point::reached("worker:delete_snapshot:released");
        tracing::info!(snapshot = %name, "snapshot deleted");
        Ok(())
    }

    /// Takes a snapshot out of the engine, releases its device and drops its
    /// record (the snapshot is in `Phase::Deleting`, persisted). The record
    /// goes from memory only: the next state write drops it from the file,
    /// and a start before that finds it in `Deleting` and releases its
    /// device again, which is harmless (a file already gone is fine; a raw
    /// device is zeroed again, and no record can name it meanwhile: a new
    /// record on it is written with the same save that drops this one).
    pub(super) async fn detach_snapshot(
        &self,
        inner: &mut Inner,
        vol: &str,
        s: &SnapshotRec,
    ) -> Result<()> {
        if let Some(Live::Up { origin, snaps }) = inner.live.get_mut(vol)
            && let Some(id) = snaps.remove(&s.id)
        {
            match origin.delete_snapshot(id).await {
                Ok(_) | Err(cowsnap_store::Error::NoSnapshot(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.devices.release(&s.device, s.file_backed)?;
        inner.volume_mut(vol).snapshots.retain(|x| x.id != s.id);
        Ok(())
    }

    /// Saves why snapshot `snap` of `vol` (engine id `id`) becomes invalid,
    /// when it does: its COW header keeps only `valid = 0`, and the API
    /// says why after any restart. Ends with the snapshot.
    pub(super) fn watch_invalid(
        self: &Arc<Self>,
        origin: &Origin,
        id: SnapId,
        vol: &str,
        snap: &str,
    ) {
        let Ok(mut rx) = origin.watch_invalid(id) else {
            return;
        };
        let me = Arc::downgrade(self);
        let (vol, snap) = (vol.to_string(), snap.to_string());
        tokio::spawn(async move {
            let reason = match rx.wait_for(Option::is_some).await {
                Ok(r) => (*r).clone().unwrap_or_default(),
                Err(_) => return,
            };
            let Some(me) = me.upgrade() else {
                return;
            };
            tracing::error!(snapshot = %names::snapshot(&vol, &snap), "snapshot is invalid: {reason}");
            let mut inner = me.inner.lock().await;
            let Some(rec) = inner
                .st
                .volume_mut(&vol)
                .and_then(|v| v.snapshots.iter_mut().find(|s| s.id == snap))
            else {
                return;
            };
            if rec.error.is_none() {
                rec.error = Some(reason);
                if let Err(e) = me.save(&mut inner) {
                    tracing::warn!(snapshot = %names::snapshot(&vol, &snap), "cannot save why the snapshot is invalid: {e}");
                }
            }
        });
    }
}
