//! The worker's domain logic: volumes and snapshots on devices, the engine
//! running on them, their NBD exports, and the long-running tasks (merge,
//! restore, clone). It knows nothing of gRPC: `grpc` translates.
//!
//! Mutations are serialized by one lock and follow one pattern so a crash
//! at any point is repaired at the next start ([`Worker::open`]):
//! 1. record the intent (`Phase::Creating` / `Phase::Deleting`) durably;
//! 2. act on the device and the engine;
//! 3. record the result durably.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cowsnap_proto::names;
use cowsnap_store::format::{DEFAULT_CHUNK_SECTORS, HeaderState};
use cowsnap_store::status::dm_status_line;
use cowsnap_store::{
    Backend, BackendChoice, IoStats, Layout, Origin, SnapId, SnapshotOptions, Target, Usage,
};
use tokio::sync::Mutex;

use crate::devices::{self, Devices, RawDevice};
use crate::error::{Result, WorkerError};
use crate::exports::{Export, Exports};
use crate::state::{Phase, SnapshotRec, StateFile, TaskKind, TaskRec, VolumeRec, WorkerState, now};
use crate::tasks::{TaskHandle, Tasks, copy_volume};

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
}

/// A resource's state, as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResState {
    Creating,
    Ready,
    Merging,
    Deleting,
    Invalid,
    Failed,
}

#[derive(Clone, Debug)]
pub struct SnapshotInfo {
    pub name: String,
    pub cow_size_bytes: u64,
    pub chunk_sectors: u32,
    pub device: String,
    pub state: ResState,
    pub usage: Option<Usage>,
    pub exceptions: u64,
    pub status_line: String,
    pub writable: bool,
    pub create_time: u64,
    /// Why it is invalid or failed.
    pub error: Option<String>,
}

#[derive(Clone, Debug)]
pub struct VolumeInfo {
    pub name: String,
    pub size_bytes: u64,
    pub chunk_sectors: u32,
    pub device: String,
    pub state: ResState,
    /// Why the volume failed, when it did.
    pub error: Option<String>,
    pub snapshots: Vec<SnapshotInfo>,
    pub create_time: u64,
}

#[derive(Clone, Debug)]
pub struct RawDeviceInfo {
    pub path: String,
    pub size_bytes: u64,
    pub used_by: String,
}

#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub node: String,
    pub nbd_uri: String,
    pub free_bytes: u64,
    pub capacity_bytes: u64,
    pub devices: Vec<RawDeviceInfo>,
    pub io_backend: String,
    /// I/O through every engine since the worker started.
    pub io: IoStats,
}

/// A volume's running engine.
struct Live {
    origin: Option<Arc<Origin>>,
    snaps: BTreeMap<String, SnapId>,
    /// Set when the volume could not be brought up.
    failed: Option<String>,
}

struct Inner {
    st: WorkerState,
    live: BTreeMap<String, Live>,
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

/// The COW size that can never overflow: every data chunk of the volume,
/// its metadata areas, the header and the zeroed area after a full one.
pub fn full_cow_bytes(size: u64, layout: Layout) -> u64 {
    let data = size.div_ceil(layout.chunk_bytes());
    let areas = data.div_ceil(layout.exceptions_per_area()) + 1;
    (1 + areas + data) * layout.chunk_bytes()
}

/// The volume or snapshot on raw device `d`, recorded under its path or
/// under another path to the same device (a link, another device node).
fn raw_device_user(st: &WorkerState, d: &RawDevice) -> Option<String> {
    st.device_user(&d.path)
        .or_else(|| st.raw_device_user(|p| devices::rdev_of(p) == Some(d.rdev)))
}

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
        let backend = Backend::start(cfg.io).map_err(anyhow::Error::msg)?;
        let devices =
            Devices::new(&cfg.data_dir, &cfg.device_allow).map_err(|e| anyhow::anyhow!("{e}"))?;
        let file = StateFile::new(&cfg.data_dir);
        let st = file.load()?;
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
        inner.st.tasks = self.tasks.records();
        self.file.save(&inner.st).map_err(WorkerError::Internal)
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

    /// Saves why snapshot `snap` of `vol` (engine id `id`) becomes invalid,
    /// when it does: its COW header keeps only `valid = 0`, and the API
    /// says why after any restart. Ends with the snapshot.
    fn watch_invalid(self: &Arc<Self>, origin: &Origin, id: SnapId, vol: &str, snap: &str) {
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
                .volumes
                .get_mut(&vol)
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

    async fn recover(self: &Arc<Self>) -> anyhow::Result<()> {
        let mut inner = self.inner.lock().await;
        for rec in inner.st.tasks.values() {
            self.tasks.insert(rec.clone());
        }
        let vols: Vec<VolumeRec> = inner.st.volumes.values().cloned().collect();
        for v in vols {
            self.recover_volume(&mut inner, v).await;
        }
        self.save(&mut inner).map_err(|e| anyhow::anyhow!("{e}"))?;
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

    /// Brings one volume back after a restart.
    async fn recover_volume(self: &Arc<Self>, inner: &mut Inner, mut v: VolumeRec) {
        let vname = names::volume(&v.id);
        if v.phase == Phase::Deleting {
            if let Err(e) = self.devices.release(&v.device, v.file_backed) {
                tracing::error!(volume = %vname, "cannot release the device of a volume being deleted: {e}");
            }
            inner.st.volumes.remove(&v.id);
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
        let origin = match self
            .open_sized(&v.device, v.file_backed, v.size_bytes)
            .and_then(|d| Origin::new(d).map_err(WorkerError::from))
        {
            Ok(o) => Arc::new(o),
            Err(e) => {
                self.fail_volume(inner, &v.id, "cannot open its device", &e);
                return;
            }
        };
        let mut snaps = BTreeMap::new();
        let mut keep = Vec::new();
        for mut s in v.snapshots.clone() {
            let sname = names::snapshot(&v.id, &s.id);
            if s.phase == Phase::Deleting {
                if let Err(e) = self.devices.release(&s.device, s.file_backed) {
                    tracing::error!(snapshot = %sname, "cannot release the device of a snapshot being deleted: {e}");
                }
                continue;
            }
            let dev = match self.open_sized(&s.device, s.file_backed, s.cow_size_bytes) {
                Ok(d) => d,
                Err(e) if s.phase == Phase::Creating => {
                    tracing::warn!(snapshot = %sname, "dropping a snapshot whose creation did not finish: {e}");
                    continue;
                }
                Err(e) => {
                    let what = format!("cannot open the COW device of {sname}");
                    self.fail_volume(inner, &v.id, &what, &e);
                    return;
                }
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
                    continue;
                }
                s.phase = Phase::Ready;
            }
            let merging = v.merging.as_deref() == Some(s.id.as_str());
            let opts = SnapshotOptions {
                chunk_sectors: None,
                merging,
            };
            match origin.add_snapshot(dev, opts).await {
                Ok(a) => {
                    self.watch_invalid(&origin, a.id, &v.id, &s.id);
                    snaps.insert(s.id.clone(), a.id);
                    keep.push(s);
                }
                Err(e) => {
                    let what = format!("cannot load {sname}");
                    self.fail_volume(inner, &v.id, &what, &e.into());
                    return;
                }
            }
        }
        v.snapshots = keep;
        let ready = v.phase == Phase::Ready;
        inner.st.volumes.insert(v.id.clone(), v.clone());
        inner.live.insert(
            v.id.clone(),
            Live {
                origin: Some(origin.clone()),
                snaps,
                failed: None,
            },
        );
        if ready {
            self.export_volume(&v, &origin, &inner.live[&v.id]);
        }
    }

    /// Marks a volume failed: the log says `what` and the whole error, the
    /// volume's error (which clients read) names no server path.
    fn fail_volume(&self, inner: &mut Inner, vol: &str, what: &str, e: &WorkerError) {
        tracing::error!(volume = %names::volume(vol), "volume failed: {what}: {e}");
        let why = format!("{what}: {}", e.client_message());
        inner.live.insert(
            vol.to_string(),
            Live {
                origin: None,
                snaps: BTreeMap::new(),
                failed: Some(why),
            },
        );
    }

    /// Registers the exports of a ready volume and its ready snapshots.
    fn export_volume(&self, v: &VolumeRec, origin: &Arc<Origin>, live: &Live) {
        self.exports.insert(Export {
            name: names::volume(&v.id),
            origin: origin.clone(),
            target: Target::Origin,
            writable: true,
            preferred_block_size: v.chunk_sectors * 512,
        });
        for s in &v.snapshots {
            if s.phase != Phase::Ready
                || v.merging.as_deref() == Some(s.id.as_str())
                || s.id.starts_with('.')
            {
                continue;
            }
            if let Some(&id) = live.snaps.get(&s.id) {
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
        });
    }

    /// Opens a device with `O_DIRECT`, seen as its first `size` bytes. A raw
    /// device is held open meanwhile, to check that the path still named it,
    /// not through a link, once the engine opened it.
    fn open_sized(
        &self,
        path: &Path,
        file_backed: bool,
        size: u64,
    ) -> Result<cowsnap_store::Device> {
        let pin = if file_backed {
            None
        } else {
            Some(self.devices.pin(path)?)
        };
        let dev = self.backend.open(path, true)?;
        if let Some(pin) = pin {
            pin.still_at(path)?;
        }
        if dev.size() < size {
            tracing::error!(device = %path.display(), "{} bytes, fewer than the {size} recorded", dev.size());
            return Err(WorkerError::FailedPrecondition(format!(
                "the device has {} bytes, fewer than the {size} recorded",
                dev.size()
            )));
        }
        Ok(if dev.size() > size {
            dev.truncated(size)
        } else {
            dev
        })
    }

    /// Creates (file) or zeroes (raw device) a device of `size` bytes.
    fn prepare_device(&self, path: &Path, file_backed: bool, size: u64) -> Result<()> {
        if file_backed {
            self.devices.create_file(path, size)
        } else {
            self.devices.zero_raw(path, size)
        }
    }

    /// Bytes that file-backed devices may still claim beyond what they use.
    fn committed_unallocated(&self, st: &WorkerState) -> u64 {
        let mut n = 0u64;
        for v in st.volumes.values() {
            if v.file_backed {
                n += v.size_bytes.saturating_sub(Devices::allocated(&v.device));
            }
            for s in v.snapshots.iter().filter(|s| s.file_backed) {
                n += s
                    .cow_size_bytes
                    .saturating_sub(Devices::allocated(&s.device));
            }
        }
        n
    }

    /// Chooses the device of a new volume or snapshot: a raw device from the
    /// allow list, or a new file. Checks room and sizes.
    fn choose_device(
        &self,
        st: &WorkerState,
        field: &'static str,
        asked: &str,
        file: PathBuf,
        size: u64,
    ) -> Result<(PathBuf, bool, u64)> {
        if asked.is_empty() {
            let (_, free) = self.devices.fs_space()?;
            let room = free.saturating_sub(self.committed_unallocated(st));
            if size > room {
                tracing::warn!(
                    data_dir = %self.cfg.data_dir.display(),
                    "no room for {size} bytes: {room} bytes left"
                );
                return Err(WorkerError::ResourceExhausted(format!(
                    "no room for {size} bytes on this worker: {room} bytes left"
                )));
            }
            return Ok((file, true, size));
        }
        let raw = self.devices.check_raw(field, asked)?;
        if let Some(user) = raw_device_user(st, &raw) {
            return Err(WorkerError::FailedPrecondition(format!(
                "{asked} is already used by {user}"
            )));
        }
        let (path, dev_size) = (raw.path, raw.size);
        let size = if size == 0 { dev_size } else { size };
        if size > dev_size {
            return Err(WorkerError::invalid(
                field,
                format!("{asked} has {dev_size} bytes, fewer than the {size} asked for"),
            ));
        }
        Ok((path, false, size))
    }

    // ---- worker ----------------------------------------------------------

    pub async fn info(&self) -> Result<WorkerInfo> {
        let inner = self.inner.lock().await;
        let (capacity, free) = self.devices.fs_space()?;
        let devices = self
            .devices
            .list_raw()
            .into_iter()
            .map(|d| RawDeviceInfo {
                used_by: raw_device_user(&inner.st, &d).unwrap_or_default(),
                path: d.path.display().to_string(),
                size_bytes: d.size,
            })
            .collect();
        let mut io = *self.retired_io.lock().expect("retired io");
        for o in inner.live.values().filter_map(|l| l.origin.as_ref()) {
            io.add(&o.io_stats());
        }
        Ok(WorkerInfo {
            io,
            node: self.cfg.node.clone(),
            nbd_uri: self.cfg.nbd_uri.clone(),
            free_bytes: free.saturating_sub(self.committed_unallocated(&inner.st)),
            capacity_bytes: capacity,
            devices,
            io_backend: self.backend.name().into(),
        })
    }

    // ---- volumes ---------------------------------------------------------

    fn volume_info(&self, inner: &Inner, v: &VolumeRec) -> VolumeInfo {
        let live = inner.live.get(&v.id);
        let failed = live.and_then(|l| l.failed.clone());
        let vname = names::volume(&v.id);
        let state = if failed.is_some() {
            ResState::Failed
        } else if v.phase == Phase::Deleting {
            ResState::Deleting
        } else if v.phase == Phase::Creating {
            match self
                .tasks
                .list()
                .into_iter()
                .rev()
                .find(|t| t.target == vname)
            {
                Some(t) if t.done && t.error.is_some() => ResState::Failed,
                _ => ResState::Creating,
            }
        } else if v.merging.is_some() {
            ResState::Merging
        } else {
            ResState::Ready
        };
        let error = failed.or_else(|| {
            (state == ResState::Failed)
                .then(|| {
                    self.tasks
                        .list()
                        .into_iter()
                        .rev()
                        .find(|t| t.target == vname)
                })
                .flatten()
                .and_then(|t| t.error)
        });
        let snapshots = v
            .snapshots
            .iter()
            .filter(|s| !s.id.starts_with('.'))
            .map(|s| self.snapshot_info(v, s, live))
            .collect();
        VolumeInfo {
            name: vname,
            size_bytes: v.size_bytes,
            chunk_sectors: v.chunk_sectors,
            device: v.device.display().to_string(),
            state,
            error,
            snapshots,
            create_time: v.create_time,
        }
    }

    fn snapshot_info(&self, v: &VolumeRec, s: &SnapshotRec, live: Option<&Live>) -> SnapshotInfo {
        let status = live
            .and_then(|l| Some((l.origin.as_ref()?, *l.snaps.get(&s.id)?)))
            .and_then(|(o, id)| o.status(id).ok());
        let valid = status.as_ref().is_none_or(|st| st.valid);
        let state = match s.phase {
            Phase::Creating => ResState::Creating,
            Phase::Deleting => ResState::Deleting,
            Phase::Ready if v.merging.as_deref() == Some(s.id.as_str()) => ResState::Merging,
            Phase::Ready if !valid => ResState::Invalid,
            Phase::Ready if status.is_none() => ResState::Failed,
            Phase::Ready => ResState::Ready,
        };
        let usage = status.as_ref().and_then(|st| st.usage);
        let error = match state {
            ResState::Invalid => Some(
                status
                    .as_ref()
                    .and_then(|st| st.invalid_reason.clone())
                    .or_else(|| s.error.clone())
                    .unwrap_or_else(|| {
                        "its COW device was found marked invalid (the reason was not recorded)"
                            .into()
                    }),
            ),
            ResState::Failed => Some(
                live.and_then(|l| l.failed.clone())
                    .unwrap_or_else(|| "its volume could not be loaded".into()),
            ),
            _ => None,
        };
        SnapshotInfo {
            error,
            name: names::snapshot(&v.id, &s.id),
            cow_size_bytes: s.cow_size_bytes,
            chunk_sectors: s.chunk_sectors,
            device: s.device.display().to_string(),
            state,
            usage,
            exceptions: status.as_ref().map_or(0, |st| st.exceptions),
            status_line: dm_status_line(Some(v.size_bytes / 512), if valid { usage } else { None }),
            writable: s.writable,
            create_time: s.create_time,
        }
    }

    fn volume_rec<'a>(inner: &'a Inner, name: &str) -> Result<&'a VolumeRec> {
        let id = names::parse_volume(name).map_err(|e| WorkerError::invalid("name", e))?;
        inner
            .st
            .volumes
            .get(id)
            .ok_or_else(|| WorkerError::NotFound(format!("{name} not found")))
    }

    fn live_origin(inner: &Inner, vol: &str) -> Result<Arc<Origin>> {
        let live = inner.live.get(vol).ok_or_else(|| {
            WorkerError::FailedPrecondition(format!("{} is not ready", names::volume(vol)))
        })?;
        if let Some(why) = &live.failed {
            return Err(WorkerError::FailedPrecondition(format!(
                "{} failed: {why}",
                names::volume(vol)
            )));
        }
        live.origin.clone().ok_or_else(|| {
            WorkerError::FailedPrecondition(format!("{} is not ready", names::volume(vol)))
        })
    }

    pub async fn create_volume(
        &self,
        volume_id: &str,
        size_bytes: u64,
        chunk_sectors: u32,
        device: &str,
    ) -> Result<VolumeInfo> {
        names::check_id(volume_id).map_err(|e| WorkerError::invalid("volume_id", e))?;
        let layout = chunk_layout("chunk_sectors", chunk_sectors, DEFAULT_CHUNK_SECTORS)?;
        let mut inner = self.inner.lock().await;
        let file = self.devices.volume_file(volume_id);
        if let Some(v) = inner.st.volumes.get(volume_id) {
            let asked_dev = if device.is_empty() {
                file.clone()
            } else {
                self.devices.resolve("device", device)?
            };
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
        let (path, file_backed, mut size) =
            self.choose_device(&inner.st, "device", device, file, size_bytes)?;
        if size_bytes == 0 {
            // The whole raw device, in whole chunks.
            size -= size % layout.chunk_bytes();
        }
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
            create_time: now(),
        };
        inner.st.volumes.insert(volume_id.to_string(), rec.clone());
        self.save(&mut inner)?;
        let origin = self
            .prepare_device(&path, file_backed, size)
            .and_then(|()| {
                Ok(Arc::new(Origin::new(self.open_sized(
                    &path,
                    file_backed,
                    size,
                )?)?))
            });
        let origin = match origin {
            Ok(o) => o,
            Err(e) => {
                // Undo the intent: nothing was acknowledged.
                inner.st.volumes.remove(volume_id);
                if file_backed {
                    let _ = self.devices.release(&path, true);
                }
                self.save(&mut inner)?;
                return Err(e);
            }
        };
        let v = inner.st.volumes.get_mut(volume_id).expect("just inserted");
        v.phase = Phase::Ready;
        let v = v.clone();
        inner.live.insert(
            volume_id.to_string(),
            Live {
                origin: Some(origin.clone()),
                snaps: BTreeMap::new(),
                failed: None,
            },
        );
        self.save(&mut inner)?;
        self.export_volume(&v, &origin, &inner.live[volume_id]);
        tracing::info!(volume = %names::volume(volume_id), size, device = %path.display(), "volume created");
        Ok(self.volume_info(&inner, &v))
    }

    pub async fn get_volume(&self, name: &str) -> Result<VolumeInfo> {
        let inner = self.inner.lock().await;
        let v = Self::volume_rec(&inner, name)?;
        Ok(self.volume_info(&inner, v))
    }

    pub async fn list_volumes(&self) -> Vec<VolumeInfo> {
        let inner = self.inner.lock().await;
        inner
            .st
            .volumes
            .values()
            .map(|v| self.volume_info(&inner, v))
            .collect()
    }

    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let v = Self::volume_rec(&inner, name)?.clone();
        let visible = v
            .snapshots
            .iter()
            .filter(|s| !s.id.starts_with('.'))
            .count();
        if visible > 0 {
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} has {visible} snapshot(s); delete them first"
            )));
        }
        if let Some(t) = self.tasks.running_for(name) {
            let t = t.get();
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} is used by task tasks/{} ({} of {})",
                t.id,
                t.kind.as_str(),
                t.target
            )));
        }
        if !v.snapshots.is_empty() {
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} is the source of a clone in progress"
            )));
        }
        inner.st.volumes.get_mut(&v.id).expect("exists").phase = Phase::Deleting;
        self.save(&mut inner)?;
        self.exports.remove(name);
        if let Some(live) = inner.live.remove(&v.id)
            && let Some(o) = live.origin
        {
            self.retired_io
                .lock()
                .expect("retired io")
                .add(&o.io_stats());
            o.shutdown().await?;
        }
        self.devices.release(&v.device, v.file_backed)?;
        inner.st.volumes.remove(&v.id);
        self.save(&mut inner)?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    // ---- snapshots -------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub async fn create_snapshot(
        self: &Arc<Self>,
        parent: &str,
        snapshot_id: &str,
        cow_size_bytes: u64,
        chunk_sectors: u32,
        device: &str,
        writable: bool,
    ) -> Result<SnapshotInfo> {
        let vol = names::parse_volume(parent).map_err(|e| WorkerError::invalid("parent", e))?;
        names::check_id(snapshot_id).map_err(|e| WorkerError::invalid("snapshot_id", e))?;
        let mut inner = self.inner.lock().await;
        let v = Self::volume_rec(&inner, parent)?.clone();
        let layout = chunk_layout("chunk_sectors", chunk_sectors, v.chunk_sectors)?;
        let sname = names::snapshot(vol, snapshot_id);
        let file = self.devices.snapshot_file(vol, snapshot_id);
        if let Some(s) = v.snapshots.iter().find(|s| s.id == snapshot_id) {
            let asked_size = if cow_size_bytes == 0 {
                s.cow_size_bytes
            } else {
                cow_size_bytes
            };
            let asked_dev = if device.is_empty() {
                file.clone()
            } else {
                self.devices.resolve("device", device)?
            };
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
            return Ok(self.snapshot_info(&v, s, inner.live.get(vol)));
        }
        if v.phase != Phase::Ready {
            return Err(WorkerError::FailedPrecondition(format!(
                "{parent} is not ready"
            )));
        }
        if let Some(m) = &v.merging {
            return Err(WorkerError::FailedPrecondition(format!(
                "{parent} is merging {}; no snapshot can be taken until the merge ends",
                names::snapshot(vol, m)
            )));
        }
        let origin = Self::live_origin(&inner, vol)?;
        let asked = if cow_size_bytes == 0 && device.is_empty() {
            full_cow_bytes(v.size_bytes, layout)
        } else {
            cow_size_bytes
        };
        let (path, file_backed, size) =
            self.choose_device(&inner.st, "device", device, file, asked)?;
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
        let rec = SnapshotRec {
            id: snapshot_id.to_string(),
            cow_size_bytes: size,
            chunk_sectors: layout.chunk_sectors(),
            device: path.clone(),
            file_backed,
            writable,
            phase: Phase::Creating,
            create_time: now(),
            error: None,
        };
        self.volume_mut(&mut inner, vol).snapshots.push(rec.clone());
        self.save(&mut inner)?;
        let added = match self
            .attach_cow(&origin, &path, file_backed, size, layout)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                self.volume_mut(&mut inner, vol)
                    .snapshots
                    .retain(|s| s.id != snapshot_id);
                if file_backed {
                    let _ = self.devices.release(&path, true);
                }
                self.save(&mut inner)?;
                return Err(e);
            }
        };
        inner
            .live
            .get_mut(vol)
            .expect("live volume")
            .snaps
            .insert(snapshot_id.to_string(), added);
        self.watch_invalid(&origin, added, vol, snapshot_id);
        self.set_snapshot_phase(&mut inner, vol, snapshot_id, Phase::Ready);
        let v = inner.st.volumes[vol].clone();
        let s = v
            .snapshots
            .iter()
            .find(|s| s.id == snapshot_id)
            .expect("just added")
            .clone();
        self.save(&mut inner)?;
        if !snapshot_id.starts_with('.') {
            self.export_snapshot(vol, &s, &origin, added);
        }
        tracing::info!(snapshot = %sname, cow_size = size, device = %path.display(), "snapshot created");
        Ok(self.snapshot_info(&v, &s, inner.live.get(vol)))
    }

    /// Prepares a COW device and attaches it to the engine as a new
    /// snapshot (atomic against in-flight writes).
    async fn attach_cow(
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
        let a = origin
            .add_snapshot(
                dev,
                SnapshotOptions {
                    chunk_sectors: Some(layout.chunk_sectors()),
                    merging: false,
                },
            )
            .await?;
        Ok(a.id)
    }

    fn volume_mut<'a>(&self, inner: &'a mut Inner, vol: &str) -> &'a mut VolumeRec {
        inner.st.volumes.get_mut(vol).expect("volume exists")
    }

    fn snapshot_rec<'a>(inner: &'a Inner, name: &str) -> Result<(&'a VolumeRec, &'a SnapshotRec)> {
        let (vol, snap) =
            names::parse_snapshot(name).map_err(|e| WorkerError::invalid("name", e))?;
        let v =
            inner.st.volumes.get(vol).ok_or_else(|| {
                WorkerError::NotFound(format!("{name} not found (no volume {vol})"))
            })?;
        let s = v
            .snapshots
            .iter()
            .find(|s| s.id == snap)
            .ok_or_else(|| WorkerError::NotFound(format!("{name} not found")))?;
        Ok((v, s))
    }

    pub async fn get_snapshot(&self, name: &str) -> Result<SnapshotInfo> {
        let inner = self.inner.lock().await;
        let (v, s) = Self::snapshot_rec(&inner, name)?;
        Ok(self.snapshot_info(v, s, inner.live.get(&v.id)))
    }

    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let mut inner = self.inner.lock().await;
        let (v, s) = Self::snapshot_rec(&inner, name)?;
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
        self.set_snapshot_phase(&mut inner, &vol, &s.id, Phase::Deleting);
        self.save(&mut inner)?;
        self.exports.remove(name);
        self.detach_snapshot(&mut inner, &vol, &s).await?;
        tracing::info!(snapshot = %name, "snapshot deleted");
        Ok(())
    }

    fn set_snapshot_phase(&self, inner: &mut Inner, vol: &str, snap: &str, phase: Phase) {
        if let Some(s) = self
            .volume_mut(inner, vol)
            .snapshots
            .iter_mut()
            .find(|s| s.id == snap)
        {
            s.phase = phase;
        }
    }

    /// Takes a snapshot out of the engine, releases its device and drops its
    /// record (the snapshot is in `Phase::Deleting`, persisted).
    async fn detach_snapshot(&self, inner: &mut Inner, vol: &str, s: &SnapshotRec) -> Result<()> {
        if let Some(live) = inner.live.get_mut(vol)
            && let Some(id) = live.snaps.remove(&s.id)
            && let Some(o) = &live.origin
        {
            match o.delete_snapshot(id).await {
                Ok(_) | Err(cowsnap_store::Error::NoSnapshot(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.devices.release(&s.device, s.file_backed)?;
        self.volume_mut(inner, vol)
            .snapshots
            .retain(|x| x.id != s.id);
        self.save(inner)
    }

    // ---- tasks -----------------------------------------------------------

    fn new_task(
        &self,
        inner: &mut Inner,
        kind: TaskKind,
        target: String,
        source: String,
    ) -> Arc<TaskHandle> {
        inner.st.next_task += 1;
        self.tasks.insert(TaskRec {
            id: inner.st.next_task.to_string(),
            kind,
            target,
            source,
            done: false,
            error: None,
            done_units: 0,
            total_units: 0,
            create_time: now(),
            temp_snapshot: None,
        })
    }

    pub fn get_task(&self, name: &str) -> Result<TaskRec> {
        let id = names::parse_in("tasks", name).map_err(|e| WorkerError::invalid("name", e))?;
        self.tasks
            .get(id)
            .map(|t| t.get())
            .ok_or_else(|| WorkerError::NotFound(format!("{name} not found")))
    }

    pub fn list_tasks(&self) -> Vec<TaskRec> {
        self.tasks.list()
    }

    pub async fn wait_task(&self, name: &str, timeout: Duration) -> Result<TaskRec> {
        let id = names::parse_in("tasks", name).map_err(|e| WorkerError::invalid("name", e))?;
        let t = self
            .tasks
            .get(id)
            .ok_or_else(|| WorkerError::NotFound(format!("{name} not found")))?;
        Ok(t.wait(timeout).await)
    }

    pub async fn merge_snapshot(self: &Arc<Self>, name: &str) -> Result<TaskRec> {
        let mut inner = self.inner.lock().await;
        let (v, s) = Self::snapshot_rec(&inner, name)?;
        let (vol, snap) = (v.id.clone(), s.id.clone());
        if s.phase != Phase::Ready {
            return Err(WorkerError::FailedPrecondition(format!(
                "{name} is not ready"
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
        if let Some(t) = self.tasks.running_for(&names::volume(&vol)) {
            return Err(WorkerError::FailedPrecondition(format!(
                "{} is busy with task tasks/{}",
                names::volume(&vol),
                t.get().id
            )));
        }
        let origin = Self::live_origin(&inner, &vol)?;
        let id = *inner.live[&vol]
            .snaps
            .get(&snap)
            .ok_or_else(|| WorkerError::FailedPrecondition(format!("{name} is not loaded")))?;
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
        self.volume_mut(&mut inner, &vol).merging = Some(snap.clone());
        self.save(&mut inner)?;
        self.exports.remove(name);
        origin.start_merge(id).await?;
        drop(inner);
        tracing::info!(snapshot = %name, task = %task.get().id, "merge started");
        self.spawn_task(task.clone());
        Ok(task.get())
    }

    pub async fn restore_volume(
        self: &Arc<Self>,
        volume_id: &str,
        source_snapshot: &str,
        chunk_sectors: u32,
        device: &str,
    ) -> Result<TaskRec> {
        names::check_id(volume_id).map_err(|e| WorkerError::invalid("volume_id", e))?;
        let mut inner = self.inner.lock().await;
        let (v, s) = Self::snapshot_rec(&inner, source_snapshot)?;
        let (size, src_chunk) = (v.size_bytes, v.chunk_sectors);
        if s.phase != Phase::Ready || v.merging.as_deref() == Some(s.id.as_str()) {
            return Err(WorkerError::FailedPrecondition(format!(
                "{source_snapshot} is not ready (merging, or being created or deleted)"
            )));
        }
        // As a merge does: an invalid snapshot has no image to copy.
        let (vol, snap) = (v.id.clone(), s.id.clone());
        let origin = Self::live_origin(&inner, &vol)?;
        let id = *inner.live[&vol].snaps.get(&snap).ok_or_else(|| {
            WorkerError::FailedPrecondition(format!("{source_snapshot} is not loaded"))
        })?;
        if !origin.status(id)?.valid {
            return Err(WorkerError::FailedPrecondition(format!(
                "{source_snapshot} is invalid (it overflowed or failed): there is nothing to restore"
            )));
        }
        self.start_copy(
            &mut inner,
            TaskKind::Restore,
            volume_id,
            source_snapshot,
            size,
            chunk_sectors,
            src_chunk,
            device,
        )
        .await
    }

    pub async fn clone_volume(
        self: &Arc<Self>,
        volume_id: &str,
        source_volume: &str,
        chunk_sectors: u32,
        device: &str,
    ) -> Result<TaskRec> {
        names::check_id(volume_id).map_err(|e| WorkerError::invalid("volume_id", e))?;
        let mut inner = self.inner.lock().await;
        let v = Self::volume_rec(&inner, source_volume)?;
        let (size, src_chunk) = (v.size_bytes, v.chunk_sectors);
        if v.phase != Phase::Ready || v.merging.is_some() {
            return Err(WorkerError::FailedPrecondition(format!(
                "{source_volume} is not ready (merging, or being created or deleted)"
            )));
        }
        self.start_copy(
            &mut inner,
            TaskKind::Clone,
            volume_id,
            source_volume,
            size,
            chunk_sectors,
            src_chunk,
            device,
        )
        .await
    }

    /// Records a new volume and the task that fills it from `source`.
    #[allow(clippy::too_many_arguments)]
    async fn start_copy(
        self: &Arc<Self>,
        inner: &mut Inner,
        kind: TaskKind,
        volume_id: &str,
        source: &str,
        size: u64,
        chunk_sectors: u32,
        src_chunk: u32,
        device: &str,
    ) -> Result<TaskRec> {
        let layout = chunk_layout("chunk_sectors", chunk_sectors, src_chunk)?;
        let vname = names::volume(volume_id);
        if let Some(existing) = inner.st.volumes.get(volume_id) {
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
        let (path, file_backed, dev_size) =
            self.choose_device(&inner.st, "device", device, file, size)?;
        if dev_size < size {
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
        inner.st.volumes.insert(
            volume_id.to_string(),
            VolumeRec {
                id: volume_id.to_string(),
                size_bytes: size,
                chunk_sectors: layout.chunk_sectors(),
                device: path,
                file_backed,
                phase: Phase::Creating,
                snapshots: Vec::new(),
                merging: None,
                create_time: now(),
            },
        );
        self.save(inner)?;
        if kind == TaskKind::Clone {
            // The clone is of the source as it is now: a temporary snapshot
            // taken before the call returns, copied in the background.
            let sv = names::parse_volume(source)
                .map_err(|e| WorkerError::invalid("source_volume", e))?;
            let temp = format!(".clone-{}", task.get().id);
            if let Err(e) = self.create_temp_snapshot(inner, sv, &temp).await {
                inner.st.volumes.remove(volume_id);
                task.update(|t| {
                    t.done = true;
                    t.error = Some(e.client_message());
                });
                self.save(inner)?;
                return Err(e);
            }
            task.update(|t| t.temp_snapshot = Some(temp));
            self.save(inner)?;
        }
        tracing::info!(volume = %vname, kind = kind.as_str(), source, task = %task.get().id, "copy started");
        self.spawn_task(task.clone());
        Ok(task.get())
    }

    fn spawn_task(self: &Arc<Self>, task: Arc<TaskHandle>) {
        let w = self.clone();
        tokio::spawn(async move {
            let rec = task.get();
            let r = match rec.kind {
                TaskKind::Merge => w.run_merge(&task).await,
                TaskKind::Restore | TaskKind::Clone => w.run_copy(&task).await,
            };
            if let Err(e) = &r {
                tracing::error!(task = %rec.id, kind = rec.kind.as_str(), target = %rec.target, "task failed: {e}");
            }
            task.update(|t| {
                if !t.done {
                    t.done = true;
                    t.error = r.err().map(|e| e.client_message());
                }
            });
            let mut inner = w.inner.lock().await;
            if let Err(e) = w.save(&mut inner) {
                tracing::error!("cannot save the worker state: {e}");
            }
        });
    }

    async fn run_merge(&self, task: &Arc<TaskHandle>) -> Result<()> {
        let name = task.get().target;
        let (vol, snap) =
            names::parse_snapshot(&name).map_err(|e| WorkerError::invalid("name", e))?;
        let (origin, id) = {
            let inner = self.inner.lock().await;
            let origin = Self::live_origin(&inner, vol)?;
            let id = *inner.live[vol]
                .snaps
                .get(snap)
                .ok_or_else(|| WorkerError::FailedPrecondition(format!("{name} is not loaded")))?;
            (origin, id)
        };
        origin
            .merge(id, |p| {
                task.progress(p.chunks_total - p.chunks_left, p.chunks_total)
            })
            .await?;
        let mut inner = self.inner.lock().await;
        let v = self.volume_mut(&mut inner, vol);
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

    async fn run_copy(&self, task: &Arc<TaskHandle>) -> Result<()> {
        let rec = task.get();
        let vol = names::parse_volume(&rec.target)
            .map_err(|e| WorkerError::invalid("target", e))?
            .to_string();
        // Set up: the new device, and the source's engine and target.
        let (src_origin, target, dst_origin) = {
            let mut inner = self.inner.lock().await;
            let v = inner
                .st
                .volumes
                .get(&vol)
                .cloned()
                .ok_or_else(|| WorkerError::NotFound(format!("{} vanished", rec.target)))?;
            self.prepare_device(&v.device, v.file_backed, v.size_bytes)?;
            let dst = Arc::new(Origin::new(self.open_sized(
                &v.device,
                v.file_backed,
                v.size_bytes,
            )?)?);
            let (src_vol, target) = match rec.kind {
                TaskKind::Restore => {
                    let (sv, ss) = names::parse_snapshot(&rec.source)
                        .map_err(|e| WorkerError::invalid("source", e))?;
                    let id = *inner
                        .live
                        .get(sv)
                        .and_then(|l| l.snaps.get(ss))
                        .ok_or_else(|| {
                            WorkerError::FailedPrecondition(format!("{} is not loaded", rec.source))
                        })?;
                    (sv.to_string(), Target::Snapshot(id))
                }
                _ => {
                    // A clone copies a temporary snapshot of the source: a
                    // consistent point in time while the source stays in use.
                    let sv = names::parse_volume(&rec.source)
                        .map_err(|e| WorkerError::invalid("source", e))?
                        .to_string();
                    let temp = format!(".clone-{}", rec.id);
                    let id = match inner
                        .live
                        .get(&sv)
                        .and_then(|l| l.snaps.get(&temp))
                        .copied()
                    {
                        Some(id) => id,
                        None => self.create_temp_snapshot(&mut inner, &sv, &temp).await?,
                    };
                    task.update(|t| t.temp_snapshot = Some(temp.clone()));
                    (sv, Target::Snapshot(id))
                }
            };
            (Self::live_origin(&inner, &src_vol)?, target, dst)
        };
        let copied = copy_volume(src_origin, target, dst_origin.clone(), task.clone()).await;
        let mut inner = self.inner.lock().await;
        // A clone's temporary snapshot of its source goes away whatever the
        // outcome.
        let temp = match rec.kind {
            TaskKind::Clone => {
                let sv = names::parse_volume(&rec.source)
                    .map_err(|e| WorkerError::invalid("source", e))?
                    .to_string();
                let temp = format!(".clone-{}", rec.id);
                inner
                    .st
                    .volumes
                    .get(&sv)
                    .and_then(|v| v.snapshots.iter().find(|s| s.id == temp))
                    .cloned()
                    .map(|s| (sv, s))
            }
            _ => None,
        };
        if let Some((sv, s)) = &temp {
            self.set_snapshot_phase(&mut inner, sv, &s.id, Phase::Deleting);
        }
        if let Err(e) = copied {
            self.save(&mut inner)?;
            if let Some((sv, s)) = &temp {
                self.detach_snapshot(&mut inner, sv, s).await?;
            }
            return Err(e.into());
        }
        let v = self.volume_mut(&mut inner, &vol);
        v.phase = Phase::Ready;
        let v = v.clone();
        inner.live.insert(
            vol.clone(),
            Live {
                origin: Some(dst_origin.clone()),
                snaps: BTreeMap::new(),
                failed: None,
            },
        );
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
        self.export_volume(&v, &dst_origin, &inner.live[&vol]);
        task.announce();
        tracing::info!(volume = %rec.target, kind = rec.kind.as_str(), source = %rec.source, "copy done");
        Ok(())
    }

    async fn create_temp_snapshot(
        &self,
        inner: &mut Inner,
        vol: &str,
        temp: &str,
    ) -> Result<SnapId> {
        let v = inner
            .st
            .volumes
            .get(vol)
            .cloned()
            .ok_or_else(|| WorkerError::NotFound(format!("volume {vol} vanished")))?;
        let origin = Self::live_origin(inner, vol)?;
        let layout = Layout::new(v.chunk_sectors).map_err(|e| WorkerError::Internal(e.into()))?;
        let path = self.devices.snapshot_file(vol, temp);
        let size = full_cow_bytes(v.size_bytes, layout);
        self.volume_mut(inner, vol).snapshots.push(SnapshotRec {
            id: temp.to_string(),
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
        inner
            .live
            .get_mut(vol)
            .expect("live")
            .snaps
            .insert(temp.to_string(), id);
        self.set_snapshot_phase(inner, vol, temp, Phase::Ready);
        self.save(inner)?;
        Ok(id)
    }

    /// Stops: flushes every engine and fails later I/O (SIGTERM).
    pub async fn shutdown(&self) {
        let inner = self.inner.lock().await;
        for (vol, live) in &inner.live {
            if let Some(o) = &live.origin
                && let Err(e) = o.shutdown().await
            {
                tracing::error!(volume = %names::volume(vol), "flush at shutdown failed: {e}");
            }
        }
    }
}
