//! What the node plugin has staged and published, saved in
//! `DATA_DIR/csi-node.json` so a restarted plugin (kill -9 included)
//! finds its volumes again.
//!
//! Written like the worker's `state.json` (D8 of docs/design.md): a
//! temporary file, fsynced, renamed over the old one, the directory
//! fsynced; after a crash the file is the old or the new state. A record
//! is saved before the work it describes is undone and after the work it
//! describes is done; what a crash leaves between the two is found by its
//! path (every attachment lives under `DATA_DIR/csi-node/`), see
//! `node::recover`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::attach::Attachment;
use super::error::{NodeError, Result};

/// How a volume is used on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// A raw block device.
    Block,
    /// A file system of `fs_type`, mounted with `flags`.
    Mount { fs_type: String, flags: Vec<String> },
}

/// One publish of a staged volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub readonly: bool,
    /// Mount flags of the publish's capability.
    pub flags: Vec<String>,
    /// A read-only publish of a block volume binds a read-only loop device
    /// of its own (a read-only bind of a writable device node does not stop
    /// writes to the device).
    #[serde(default)]
    pub read_only_loop: Option<PathBuf>,
}

impl Publish {
    /// Whether `other` asks for the same publish (its devices aside).
    pub fn same_as(&self, other: &Publish) -> bool {
        self.readonly == other.readonly && self.flags == other.flags
    }
}

/// A volume staged on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub staging_path: PathBuf,
    pub access: Access,
    pub attachment: Attachment,
    /// Target path → how it was published.
    pub published: BTreeMap<PathBuf, Publish>,
}

/// Everything the node plugin keeps, by CSI volume id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub volumes: BTreeMap<String, Staged>,
}

/// The state file.
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(data_dir: &Path) -> Self {
        StateFile {
            path: data_dir.join("csi-node.json"),
        }
    }

    /// The saved state, or an empty one on first start.
    pub fn load(&self) -> Result<NodeState> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                NodeError::internal(format!("{}: corrupt node state: {e}", self.path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(NodeState::default()),
            Err(e) => Err(NodeError::internal(format!(
                "{}: cannot read: {e}",
                self.path.display()
            ))),
        }
    }

    /// Replaces the saved state atomically and durably (D8).
    pub fn save(&self, state: &NodeState) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| NodeError::internal(format!("node state: {e}")))?;
        cowsnap_proto::server::replace_file(&self.path, &bytes)
            .map_err(|e| NodeError::internal(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::new(dir.path());
        assert_eq!(f.load().unwrap(), NodeState::default());
        let mut st = NodeState::default();
        st.volumes.insert(
            "pvc-1".into(),
            Staged {
                staging_path: "/var/lib/kubelet/s".into(),
                access: Access::Mount {
                    fs_type: "ext4".into(),
                    flags: vec!["noatime".into()],
                },
                attachment: Attachment {
                    fuse_dir: "/d/pvc-1".into(),
                    nbdfuse_pid: 42,
                    device: "/dev/loop3".into(),
                    nbd_index: None,
                },
                published: BTreeMap::from([(
                    PathBuf::from("/var/lib/kubelet/t"),
                    Publish {
                        readonly: true,
                        flags: vec![],
                        read_only_loop: None,
                    },
                )]),
            },
        );
        f.save(&st).unwrap();
        assert_eq!(f.load().unwrap(), st);
        // A kernel NBD attachment keeps its device index.
        let v = st.volumes.get_mut("pvc-1").unwrap();
        v.attachment.device = "/dev/nbd2".into();
        v.attachment.nbd_index = Some(2);
        f.save(&st).unwrap();
        assert_eq!(f.load().unwrap(), st);
    }

    #[test]
    fn an_attachment_saved_before_kernel_nbd_loads_as_nbdfuse() {
        let old = r#"{"fuse_dir":"/d/pvc-1","nbdfuse_pid":42,"loop_device":"/dev/loop3"}"#;
        let a: Attachment = serde_json::from_str(old).unwrap();
        assert_eq!(a.device, PathBuf::from("/dev/loop3"));
        assert_eq!(a.nbd_index, None);
        assert_eq!(a.backing(), PathBuf::from("/d/pvc-1/export"));
    }
}
