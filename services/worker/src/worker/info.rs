//! What the API reports: of the worker (room, raw devices, I/O), of a
//! volume and of a snapshot (state, usage, why it failed or is invalid),
//! built from the records and the live engines.

use cowsnap_proto::names;
use cowsnap_store::status::dm_status_line;
use cowsnap_store::{IoStats, Usage};

use super::live::Live;
use super::placement::raw_device_user;
use super::{Inner, Worker};
use crate::error::Result;
use crate::state::{Phase, SnapshotRec, TaskRec, VolumeRec};

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
    /// The volume's size when it was taken.
    pub size_bytes: u64,
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
    /// Retired: not exported, read only through its snapshots.
    pub retired: bool,
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

impl Worker {
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
        for o in inner.live.values().filter_map(Live::origin) {
            io.add(&o.io_stats());
        }
        Ok(WorkerInfo {
            io,
            node: self.cfg.node.clone(),
            nbd_uri: self.cfg.nbd_uri.clone(),
            // Read afresh: the control service places volumes by this
            // figure (every health check, 10 s apart), and older figures
            // count less room than there is.
            free_bytes: free.saturating_sub(self.committed_unallocated(&inner.st, true)),
            capacity_bytes: capacity,
            devices,
            io_backend: self.backend.name().into(),
        })
    }

    /// The latest task that creates volume `vname` (a restore or clone).
    fn creating_task(&self, vname: &str) -> Option<TaskRec> {
        self.tasks
            .list()
            .into_iter()
            .rev()
            .find(|t| t.target == vname)
    }

    pub(super) fn volume_info(&self, inner: &Inner, v: &VolumeRec) -> VolumeInfo {
        let live = inner.live.get(&v.id);
        let failed = live.and_then(Live::failure).map(str::to_string);
        let vname = names::volume(&v.id);
        let state = if failed.is_some() {
            ResState::Failed
        } else if v.phase == Phase::Deleting {
            ResState::Deleting
        } else if v.phase == Phase::Creating {
            match self.creating_task(&vname) {
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
                .then(|| self.creating_task(&vname))
                .flatten()
                .and_then(|t| t.error)
        });
        let snapshots = v
            .snapshots
            .iter()
            .filter(|s| s.kind().is_visible())
            .map(|s| snapshot_info(v, s, live))
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
            retired: v.retired,
        }
    }
}

/// What the API reports of snapshot `s` of volume `v`, whose live state is
/// `live`.
pub(super) fn snapshot_info(v: &VolumeRec, s: &SnapshotRec, live: Option<&Live>) -> SnapshotInfo {
    let status = live
        .and_then(|l| l.loaded(&s.id))
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
                    "its COW device was found marked invalid (the reason was not recorded)".into()
                }),
        ),
        ResState::Failed => Some(
            live.and_then(Live::failure)
                .map_or_else(|| "its volume could not be loaded".into(), str::to_string),
        ),
        _ => None,
    };
    SnapshotInfo {
        error,
        name: names::snapshot(&v.id, &s.id),
        size_bytes: s.size_bytes,
        cow_size_bytes: s.cow_size_bytes,
        chunk_sectors: s.chunk_sectors,
        device: s.device.display().to_string(),
        state,
        usage,
        exceptions: status.as_ref().map_or(0, |st| st.exceptions),
        status_line: dm_status_line(Some(s.size_bytes / 512), if valid { usage } else { None }),
        writable: s.writable,
        create_time: s.create_time,
    }
}
