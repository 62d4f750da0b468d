//! Start-up: every volume brought back with its snapshots, whatever a crash
//! interrupted finished or undone (a delete completed, a create redone or
//! dropped), the unfinished tasks resumed. A volume that cannot come back
//! is marked failed, with why, and the others come up regardless.

use std::collections::BTreeMap;
use std::sync::Arc;

use cowsnap_proto::names;
use cowsnap_store::format::HeaderState;
use cowsnap_store::{Origin, SnapId, SnapshotOptions};

use super::live::Live;
use super::{Inner, Worker};
use crate::error::WorkerError;
use crate::state::{Phase, SnapshotRec, TaskKind, TaskRec, VolumeRec};

/// Why a volume cannot come back: what failed, and the error.
type Failure = (String, WorkerError);

impl Worker {
    pub(super) async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut inner = self.inner.lock().await;
        for rec in inner.st.tasks.values() {
            self.tasks.insert(rec.clone());
        }
        let vols: Vec<VolumeRec> = inner.st.volumes().values().cloned().collect();
        for v in vols {
            self.recover_volume(&mut inner, v).await;
        }
        // A fresh checkpoint: the journal starts empty.
        inner.st.tasks = self.tasks.records();
        self.file.checkpoint(&mut inner.st)?;
        self.remove_unrecorded_cow_files(&inner);
        // Resume unfinished tasks.
        let pending: Vec<TaskRec> = self.tasks.list().into_iter().filter(|t| !t.done).collect();
        drop(inner);
        for t in pending {
            let h = self.tasks.get(&t.id).expect("just inserted");
            tracing::info!(task = %t.id, kind = t.kind.as_str(), target = %t.target, "resuming task");
            self.spawn_task(h);
        }
        Ok(())
    }

    /// Removes the snapshot files no record names: a snapshot create
    /// writes its record once, after its device is ready, so a crash in
    /// between leaves such a file (never acknowledged). Records are matched
    /// by file name, so a data dir reached by another path keeps its files.
    fn remove_unrecorded_cow_files(&self, inner: &Inner) {
        let recorded: std::collections::HashSet<&std::ffi::OsStr> = inner
            .st
            .volumes()
            .values()
            .flat_map(|v| v.snapshots.iter())
            .filter(|s| s.file_backed)
            .filter_map(|s| s.device.file_name())
            .collect();
        let files = match self.devices.snapshot_files() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("cannot look for snapshot files left by an unfinished create: {e}");
                return;
            }
        };
        for f in files {
            if f.file_name().is_some_and(|n| !recorded.contains(n)) {
                tracing::warn!(file = %f.display(), "removing a snapshot file whose create did not finish");
                if let Err(e) = self.devices.release(&f, true) {
                    tracing::error!(file = %f.display(), "cannot remove it: {e}");
                }
            }
        }
    }

    /// Brings one volume back after a restart.
    async fn recover_volume(self: &Arc<Self>, inner: &mut Inner, mut v: VolumeRec) {
        let vname = names::volume(&v.id);
        if v.phase == Phase::Deleting {
            if let Err(e) = self.devices.release(&v.device, v.file_backed) {
                tracing::error!(volume = %vname, "cannot release the device of a volume being deleted: {e}");
            }
            inner.st.remove_volume(&v.id);
            return;
        }
        let copying = self
            .tasks
            .list()
            .into_iter()
            .any(|t| !t.done && t.target == vname && t.kind != TaskKind::Merge);
        if v.phase == Phase::Creating && !copying {
            // The create was never acknowledged: do it again from scratch.
            if let Err(e) = self.prepare_device(&v.device, v.file_backed, v.size_bytes) {
                self.fail_volume(inner, &v.id, "cannot recreate its device", &e);
                return;
            }
            v.phase = Phase::Ready;
        }
        let origin = match self.open_engine(&v.device, v.file_backed, v.size_bytes) {
            Ok(o) => Arc::new(o),
            Err(e) => {
                self.fail_volume(inner, &v.id, "cannot open its device", &e);
                return;
            }
        };
        let mut snaps = BTreeMap::new();
        let mut keep = Vec::new();
        for s in v.snapshots.clone() {
            match self.recover_snapshot(&v, &origin, s).await {
                Ok(Some((s, id))) => {
                    snaps.insert(s.id.clone(), id);
                    keep.push(s);
                }
                Ok(None) => {}
                Err((what, e)) => {
                    self.fail_volume(inner, &v.id, &what, &e);
                    return;
                }
            }
        }
        v.snapshots = keep;
        let ready = v.phase == Phase::Ready;
        inner.st.insert_volume(v.clone());
        inner.live.insert(v.id.clone(), Live::Up { origin, snaps });
        if ready {
            self.export_volume(&v, &inner.live[&v.id]);
        }
    }

    /// Brings one snapshot of volume `v` back into its engine: with its
    /// engine id, or `None` when it is dropped (being deleted, or its
    /// creation did not finish).
    async fn recover_snapshot(
        self: &Arc<Self>,
        v: &VolumeRec,
        origin: &Arc<Origin>,
        mut s: SnapshotRec,
    ) -> Result<Option<(SnapshotRec, SnapId)>, Failure> {
        let sname = names::snapshot(&v.id, &s.id);
        if s.phase == Phase::Deleting {
            if let Err(e) = self.devices.release(&s.device, s.file_backed) {
                tracing::error!(snapshot = %sname, "cannot release the device of a snapshot being deleted: {e}");
            }
            return Ok(None);
        }
        let dev = match self.open_sized(&s.device, s.file_backed, s.cow_size_bytes) {
            Ok(d) => d,
            Err(e) if s.phase == Phase::Creating => {
                tracing::warn!(snapshot = %sname, "dropping a snapshot whose creation did not finish: {e}");
                return Ok(None);
            }
            Err(e) => return Err((format!("cannot open the COW device of {sname}"), e)),
        };
        if s.phase == Phase::Creating {
            // Created in the engine iff its header was written.
            let created = matches!(
                cowsnap_store::scan::read_header(&dev).await,
                Ok(HeaderState::Existing(_))
            );
            if !created {
                tracing::warn!(snapshot = %sname, "dropping a snapshot whose creation did not finish");
                let _ = self.devices.release(&s.device, s.file_backed);
                return Ok(None);
            }
            s.phase = Phase::Ready;
        }
        let opts = SnapshotOptions {
            chunk_sectors: None,
            merging: v.merging.as_deref() == Some(s.id.as_str()),
            size: Some(s.size_bytes),
        };
        match origin.add_snapshot(dev, opts).await {
            Ok(a) => {
                self.watch_invalid(origin, a.id, &v.id, &s.id);
                Ok(Some((s, a.id)))
            }
            Err(e) => Err((format!("cannot load {sname}"), e.into())),
        }
    }

    /// Marks a volume failed: the log says `what` and the whole error, the
    /// volume's error (which clients read) names no server path.
    fn fail_volume(&self, inner: &mut Inner, vol: &str, what: &str, e: &WorkerError) {
        tracing::error!(volume = %names::volume(vol), "volume failed: {what}: {e}");
        let why = format!("{what}: {}", e.client_message());
        inner.live.insert(vol.to_string(), Live::Failed(why));
    }
}
