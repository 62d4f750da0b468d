//! The worker's own state: which devices hold which volumes and snapshots
//! (in creation order), which merge is in progress, which long-running
//! tasks exist. Everything else (the exceptions, the data) lives on the
//! devices themselves. [`StateFile`] keeps it durable (D8 of
//! docs/design.md): a checkpoint `state.json` plus a journal of changes.
//!
//! Records carry their lifecycle state so that start-up can finish or undo
//! whatever was half done (a create that wrote an intent but not its
//! device, a delete that released the device but not the record).

mod journal;

pub use journal::{Save, StateFile};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where a record is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Intent recorded; the device may not be ready.
    Creating,
    Ready,
    /// Being deleted; the device may already be released.
    Deleting,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRec {
    pub id: String,
    /// The volume's size when the snapshot was taken (the volume may have
    /// grown since). Absent in files written before volumes could grow:
    /// [`StateFile::load`] fills in the volume's size, which it still is.
    #[serde(default)]
    pub size_bytes: u64,
    pub cow_size_bytes: u64,
    pub chunk_sectors: u32,
    pub device: PathBuf,
    /// A file under the data dir (removed on delete) rather than a raw device.
    pub file_backed: bool,
    pub writable: bool,
    pub phase: Phase,
    pub create_time: u64,
    /// Why the snapshot became invalid, saved when it happened (the COW
    /// header keeps only `valid = 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRec {
    pub id: String,
    pub size_bytes: u64,
    pub chunk_sectors: u32,
    pub device: PathBuf,
    pub file_backed: bool,
    pub phase: Phase,
    /// Snapshots, oldest first.
    pub snapshots: Vec<SnapshotRec>,
    /// The snapshot merging into this volume.
    pub merging: Option<String>,
    pub create_time: u64,
    /// Retired (deleted while it had snapshots): not exported, never
    /// written again; its devices stay until its last snapshot goes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Merge,
    Restore,
    Clone,
}

impl TaskKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            TaskKind::Merge => "merge",
            TaskKind::Restore => "restore",
            TaskKind::Clone => "clone",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRec {
    pub id: String,
    pub kind: TaskKind,
    /// The merging snapshot, or the volume being restored or cloned into.
    pub target: String,
    /// The source snapshot (restore) or volume (clone).
    pub source: String,
    pub done: bool,
    pub error: Option<String>,
    pub done_units: u64,
    pub total_units: u64,
    pub create_time: u64,
}

impl TaskRec {
    /// Ends it successfully, all its units done.
    pub fn succeed(&mut self) {
        self.done = true;
        self.error = None;
        self.done_units = self.total_units;
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerState {
    /// Read through [`WorkerState::volumes`]; changed only through the
    /// methods that note what changed, so a save writes only that.
    volumes: BTreeMap<String, VolumeRec>,
    pub tasks: BTreeMap<String, TaskRec>,
    pub next_task: u64,
    /// The checkpoint's generation: journal records of another one are
    /// not part of this state (see [`StateFile`]). Absent in files
    /// written before the journal: 0.
    #[serde(default)]
    generation: u64,
    /// Volumes changed since the last save.
    #[serde(skip)]
    dirty: BTreeSet<String>,
}

impl WorkerState {
    pub fn volumes(&self) -> &BTreeMap<String, VolumeRec> {
        &self.volumes
    }

    /// The record of volume `id`, to change.
    pub fn volume_mut(&mut self, id: &str) -> Option<&mut VolumeRec> {
        let v = self.volumes.get_mut(id)?;
        self.dirty.insert(id.to_string());
        Some(v)
    }

    pub fn insert_volume(&mut self, v: VolumeRec) {
        self.dirty.insert(v.id.clone());
        self.volumes.insert(v.id.clone(), v);
    }

    pub fn remove_volume(&mut self, id: &str) -> Option<VolumeRec> {
        self.dirty.insert(id.to_string());
        self.volumes.remove(id)
    }

    /// The volume or snapshot (name) using `device`, if any.
    pub fn device_user(&self, device: &Path) -> Option<String> {
        for v in self.volumes.values() {
            if v.device == device {
                return Some(cowsnap_proto::names::volume(&v.id));
            }
            for s in &v.snapshots {
                if s.device == device {
                    return Some(cowsnap_proto::names::snapshot(&v.id, &s.id));
                }
            }
        }
        None
    }

    /// The volume or snapshot on a raw device whose path `same` accepts, if
    /// any (to find a device named by another path than the recorded one).
    pub fn raw_device_user(&self, same: impl Fn(&Path) -> bool) -> Option<String> {
        for v in self.volumes.values() {
            if !v.file_backed && same(&v.device) {
                return Some(cowsnap_proto::names::volume(&v.id));
            }
            for s in &v.snapshots {
                if !s.file_backed && same(&s.device) {
                    return Some(cowsnap_proto::names::snapshot(&v.id, &s.id));
                }
            }
        }
        None
    }
}

pub use cowsnap_proto::server::sync_dir;

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path());
        assert_eq!(f.load().unwrap(), WorkerState::default());
        let mut st = WorkerState {
            next_task: 7,
            ..WorkerState::default()
        };
        st.insert_volume(VolumeRec {
            id: "v1".into(),
            size_bytes: 1 << 20,
            chunk_sectors: 32,
            device: "/x/v1.vol".into(),
            file_backed: true,
            phase: Phase::Ready,
            snapshots: vec![],
            merging: None,
            retired: false,
            create_time: 1,
        });
        f.save(&mut st).unwrap();
        assert_eq!(f.load().unwrap(), st);
        assert_eq!(
            st.device_user(Path::new("/x/v1.vol")).as_deref(),
            Some("volumes/v1")
        );
    }

    /// Data dirs written before the state went compact keep working: the
    /// pretty form older versions wrote loads, and is written back compact.
    #[test]
    fn a_state_file_in_the_old_pretty_form_loads() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"{
  "volumes": {
    "v1": {
      "id": "v1",
      "size_bytes": 1048576,
      "chunk_sectors": 16,
      "device": "/data/devices/v1.vol",
      "file_backed": true,
      "phase": "ready",
      "snapshots": [
        {
          "id": "s1",
          "cow_size_bytes": 1114112,
          "chunk_sectors": 16,
          "device": "/data/devices/v1.s1.cow",
          "file_backed": true,
          "writable": false,
          "phase": "creating",
          "create_time": 5
        }
      ],
      "merging": null,
      "create_time": 4
    }
  },
  "tasks": {},
  "next_task": 3
}"#;
        std::fs::write(dir.path().join("state.json"), old).unwrap();
        let f = StateFile::new(dir.path());
        let mut st = f.load().unwrap();
        assert_eq!(st.next_task, 3);
        let v = &st.volumes["v1"];
        assert_eq!(v.snapshots[0].phase, Phase::Creating);
        assert_eq!(v.snapshots[0].device, Path::new("/data/devices/v1.s1.cow"));
        assert!(!v.retired && v.snapshots[0].error.is_none());
        // Written before volumes could grow: the snapshot has the volume's size.
        assert_eq!(v.snapshots[0].size_bytes, 1048576);
        f.checkpoint(&mut st).unwrap();
        let compact = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
        assert!(!compact.contains('\n'), "{compact}");
        assert_eq!(f.load().unwrap(), st);
    }

    #[test]
    fn corrupt_state_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        assert!(StateFile::new(dir.path()).load().is_err());
    }
}
