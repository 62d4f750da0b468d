//! The worker's domain logic: volumes and snapshots on devices, the engine
//! running on them, their NBD exports, and the long-running tasks (merge,
//! restore, clone). It knows nothing of gRPC: `grpc` translates.
//!
//! Mutations are serialized by one lock and follow one pattern so a crash
//! at any point is repaired at the next start ([`Worker::open`]):
//! 1. record the intent (`Phase::Creating` / `Phase::Deleting`) durably;
//! 2. act on the device and the engine;
//! 3. record the result durably.
//!
//! Snapshot create and delete, the frequent calls, write the state once
//! (D9 of docs/design.md): a create records the snapshot only after step 2
//! (a COW file no record names is removed at start), a delete records its
//! intent and lets the next write drop the record.
//!
//! This module owns the [`Worker`] itself, its locked state ([`Inner`]:
//! the records and the live engines), saving, exports and shutdown. The
//! calls live one file per resource:
//! - [`recovery`]: bringing everything back at start;
//! - [`live`]: a volume's running engine, or why it failed;
//! - [`placement`]: which device a new volume or snapshot goes on, and
//!   opening devices;
//! - [`volumes`], [`snapshots`]: create, get, list, delete;
//! - [`delta`]: snapshot deltas and allocated maps, paged;
//! - [`merge`], [`copy`]: merge, and restore and clone;
//! - [`snapshot_kind`]: a client's snapshot or a clone's hidden one;
//! - [`tasks`]: starting, running and waiting for tasks;
//! - [`info`]: what the API reports of the worker, a volume, a snapshot.

mod copy;
mod delta;
mod info;
mod live;
mod merge;
mod placement;
mod recovery;
mod snapshot_kind;
mod snapshots;
mod tasks;
mod volumes;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use cowsnap_proto::names;
use cowsnap_store::{Backend, BackendChoice, HeldBudget, IoStats, Layout, Origin, SnapId, Target};
use tokio::sync::Mutex;

use crate::devices::Devices;
use crate::error::{Result, WorkerError};
use crate::exports::{Export, Exports};
use crate::state::{Phase, Save, SnapshotRec, StateFile, VolumeRec, WorkerState};
use crate::tasks::{TaskHandle, Tasks};

pub use copy::CopiedVolume;
pub use delta::{DEFAULT_RANGES, MAX_RANGES, RangePage};
pub use info::{RawDeviceInfo, ResState, SnapshotInfo, VolumeInfo, WorkerInfo};
use live::Live;
pub use snapshots::NewSnapshot;
pub use volumes::NewVolume;

/// How the worker is set up.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Its state, and its devices on the embedded default.
    pub data_dir: PathBuf,
    /// The node name it reports.
    pub node: String,
    /// The NBD endpoint clients are told to use.
    pub nbd_uri: String,
    /// Globs of the raw block devices it may use.
    pub device_allow: Vec<String>,
    pub io: BackendChoice,
    /// Bytes of acknowledged writes the worker's engines may hold, all
    /// volumes together, before they reach their devices (D13 of
    /// docs/design.md).
    pub writeback_cap: u64,
}

/// The default of [`WorkerConfig::writeback_cap`].
pub const DEFAULT_WRITEBACK_CAP: u64 = cowsnap_store::writeback::DEFAULT_CAP;

/// What the worker's lock guards: the records (as saved) and the engines
/// running on them, by volume id.
struct Inner {
    st: WorkerState,
    live: BTreeMap<String, Live>,
}

impl Inner {
    /// The record of volume `name` (`volumes/VOL`).
    fn volume(&self, name: &str) -> Result<&VolumeRec> {
        let id = names::parse_volume(name).map_err(|e| WorkerError::invalid("name", e))?;
        self.volume_by_id(id)
    }

    /// The record of the volume with id `id`, for callers that parsed its
    /// name already.
    fn volume_by_id(&self, id: &str) -> Result<&VolumeRec> {
        self.st
            .volumes()
            .get(id)
            .ok_or_else(|| WorkerError::NotFound(format!("{} not found", names::volume(id))))
    }

    /// The records of snapshot `name` (`volumes/VOL/snapshots/SNAP`) and of
    /// its volume.
    fn snapshot(&self, name: &str) -> Result<(&VolumeRec, &SnapshotRec)> {
        let (vol, snap) =
            names::parse_snapshot(name).map_err(|e| WorkerError::invalid("name", e))?;
        let v =
            self.st.volumes().get(vol).ok_or_else(|| {
                WorkerError::NotFound(format!("{name} not found (no volume {vol})"))
            })?;
        let s = v
            .snapshots
            .iter()
            .find(|s| s.id == snap)
            .ok_or_else(|| WorkerError::NotFound(format!("{name} not found")))?;
        Ok((v, s))
    }

    /// The record of volume id `vol`, which the caller knows exists.
    fn volume_mut(&mut self, vol: &str) -> &mut VolumeRec {
        self.st.volume_mut(vol).expect("volume exists")
    }

    fn set_snapshot_phase(&mut self, vol: &str, snap: &str, phase: Phase) {
        if let Some(s) = self
            .volume_mut(vol)
            .snapshots
            .iter_mut()
            .find(|s| s.id == snap)
        {
            s.phase = phase;
        }
    }

    /// The engine of volume id `vol`, if it is up.
    fn origin(&self, vol: &str) -> Result<Arc<Origin>> {
        match self.live.get(vol) {
            Some(Live::Up { origin, .. }) => Ok(origin.clone()),
            Some(Live::Failed(why)) => Err(WorkerError::FailedPrecondition(format!(
                "{} failed: {why}",
                names::volume(vol)
            ))),
            None => Err(WorkerError::FailedPrecondition(format!(
                "{} is not ready",
                names::volume(vol)
            ))),
        }
    }

    /// The engine of volume id `vol` and the engine id of its snapshot
    /// `snap` (named `name`), if both are up.
    fn loaded(&self, vol: &str, snap: &str, name: &str) -> Result<(Arc<Origin>, SnapId)> {
        let origin = self.origin(vol)?;
        let id = self.live[vol]
            .snap(snap)
            .ok_or_else(|| WorkerError::FailedPrecondition(format!("{name} is not loaded")))?;
        Ok((origin, id))
    }
}

pub struct Worker {
    cfg: WorkerConfig,
    backend: Backend,
    exports: Arc<Exports>,
    devices: Devices,
    file: StateFile,
    inner: Mutex<Inner>,
    tasks: Tasks,
    /// I/O counters of the engines of deleted volumes, so the worker's
    /// totals only grow.
    retired_io: std::sync::Mutex<IoStats>,
    /// The cap on held writes that every engine of the worker shares.
    writeback: Arc<HeldBudget>,
}

/// What a new snapshot or volume asks for, to compare with an existing one
/// (idempotent creates).
fn same_or_exists<T: PartialEq + std::fmt::Debug>(name: &str, existing: T, asked: T) -> Result<()> {
    if existing == asked {
        Ok(())
    } else {
        Err(WorkerError::AlreadyExists(format!(
            "{name} already exists with different arguments ({existing:?}; asked {asked:?})"
        )))
    }
}

/// The layout of `chunk_sectors`, or of `default` when it is 0.
fn chunk_layout(field: &'static str, chunk_sectors: u32, default: u32) -> Result<Layout> {
    let cs = if chunk_sectors == 0 {
        default
    } else {
        chunk_sectors
    };
    Layout::new(cs).map_err(|e| WorkerError::invalid(field, e.to_string()))
}

impl Worker {
    /// Starts the worker on its data dir: loads the state, finishes or undoes
    /// what a crash interrupted, brings every volume up with its snapshots
    /// (a merging one in merging state), registers the exports and resumes
    /// the merges and copies in progress.
    pub async fn open(cfg: WorkerConfig, exports: Arc<Exports>) -> anyhow::Result<Arc<Worker>> {
        cowsnap_proto::server::private_dir(&cfg.data_dir).context("cannot create the data dir")?;
        let backend = Backend::start(cfg.io)?;
        let devices =
            Devices::new(&cfg.data_dir, &cfg.device_allow).map_err(|e| anyhow::anyhow!("{e}"))?;
        let file = StateFile::new(&cfg.data_dir);
        let st = file.load()?;
        let writeback = HeldBudget::new(cfg.writeback_cap);
        let w = Arc::new(Worker {
            cfg,
            backend,
            exports,
            devices,
            file,
            inner: Mutex::new(Inner {
                st,
                live: BTreeMap::new(),
            }),
            tasks: Tasks::default(),
            retired_io: std::sync::Mutex::new(IoStats::default()),
            writeback,
        });
        w.recover().await?;
        Ok(w)
    }

    pub fn exports(&self) -> &Arc<Exports> {
        &self.exports
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    fn save(&self, inner: &mut Inner) -> Result<()> {
        let save = self.prepare_save(inner)?;
        self.file.commit(save).map_err(WorkerError::Internal)
    }

    /// The first half of a save ([`StateFile::prepare`]), the tasks as
    /// they are now included.
    fn prepare_save(&self, inner: &mut Inner) -> Result<Save> {
        inner.st.tasks = self.tasks.records();
        self.file
            .prepare(&mut inner.st)
            .map_err(WorkerError::Internal)
    }

    /// Saves `task` as succeeded, with whatever `inner` holds, but leaves
    /// the success held from its watchers: the caller announces it once
    /// the result is usable. If the save fails the task is still running
    /// (the task runner records the error).
    fn save_held_success(&self, inner: &mut Inner, task: &TaskHandle) -> Result<()> {
        task.succeed_held();
        let saved = self.save(inner);
        if saved.is_err() {
            task.update(|t| t.done = false);
            task.announce();
        }
        saved
    }

    /// Registers the exports of a ready volume that is up (unless it is
    /// retired), and of its ready snapshots.
    fn export_volume(&self, v: &VolumeRec, live: &Live) {
        let Live::Up { origin, snaps } = live else {
            return;
        };
        if !v.retired {
            self.exports.insert(Export {
                name: names::volume(&v.id),
                origin: origin.clone(),
                target: Target::Origin,
                writable: true,
                preferred_block_size: v.chunk_sectors * 512,
                closed: Default::default(),
            });
        }
        for s in &v.snapshots {
            if s.phase != Phase::Ready
                || v.merging.as_deref() == Some(s.id.as_str())
                || !s.kind().is_visible()
            {
                continue;
            }
            if let Some(&id) = snaps.get(&s.id) {
                self.export_snapshot(&v.id, s, origin, id);
            }
        }
    }

    fn export_snapshot(&self, vol: &str, s: &SnapshotRec, origin: &Arc<Origin>, id: SnapId) {
        self.exports.insert(Export {
            name: names::snapshot(vol, &s.id),
            origin: origin.clone(),
            target: Target::Snapshot(id),
            writable: s.writable,
            preferred_block_size: s.chunk_sectors * 512,
            closed: Default::default(),
        });
    }

    /// Stops: flushes every engine and fails later I/O (SIGTERM).
    pub async fn shutdown(&self) {
        let inner = self.inner.lock().await;
        for (vol, live) in &inner.live {
            if let Some(o) = live.origin()
                && let Err(e) = o.shutdown().await
            {
                tracing::error!(volume = %names::volume(vol), "flush at shutdown failed: {e}");
            }
        }
    }
}
