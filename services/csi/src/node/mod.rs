//! The CSI node plugin: attaches a volume's NBD export on this node,
//! stages it (file system made on first use, then mounted), publishes it
//! (bind mounts) and keeps what it did in a state file so a restarted
//! plugin finds it again.
//!
//! - [`attach`]: NBD export → block device (the kernel's NBD client,
//!   [`kernel_nbd`], where it exists; nbdfuse + loop device elsewhere);
//! - [`mounts`]: mountinfo, mount/umount/mkfs/blkid, file system growth;
//! - [`state`]: the saved state; [`stage`], [`publish`], [`stats`],
//!   [`expand`] and [`recover`]: the node's operations on it;
//! - [`grpc`]: the `csi.v1.Node` service over them.
//!
//! Every operation runs under one lock (the state's), blocking: callers
//! run them on a blocking thread.

pub mod attach;
pub mod error;
pub mod expand;
pub mod grpc;
pub mod kernel_nbd;
pub mod mounts;
pub mod publish;
pub mod recover;
pub mod stage;
pub mod state;
pub mod stats;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use cowsnap_worker::nbd::LocalAddr;
use error::{NodeError, Result};
use state::{NodeState, StateFile};

/// How the node plugin is set up.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The CSI node id: the id of this node's worker in the catalog (by
    /// default made from the worker's node name), also its topology value.
    pub node: String,
    /// Where the plugin keeps its state and attachments (the worker's
    /// data dir).
    pub data_dir: PathBuf,
    /// Staging and target paths must lie under this directory.
    pub kubelet_dir: PathBuf,
    /// Where the worker's NBD server listens (this node's own worker).
    pub nbd: LocalAddr,
    /// How exports become block devices here.
    pub attach: AttachWith,
}

/// How the node plugin makes a block device of a volume's export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachWith {
    /// The kernel's NBD client when its `nbd` module is loaded, else
    /// nbdfuse.
    #[default]
    Auto,
    /// The kernel's NBD client (netlink); the plugin does not start
    /// without it.
    Kernel,
    /// nbdfuse and a loop device.
    Nbdfuse,
}

impl std::str::FromStr for AttachWith {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(AttachWith::Auto),
            "kernel" => Ok(AttachWith::Kernel),
            "nbdfuse" => Ok(AttachWith::Nbdfuse),
            _ => Err(format!("{s:?}: expected auto, kernel or nbdfuse")),
        }
    }
}

impl NodeConfig {
    /// The worker's NBD server as this node reaches it: a server on every
    /// address is reached on the loopback one.
    fn nbd_addr(&self) -> LocalAddr {
        match &self.nbd {
            LocalAddr::Tcp(a) if a.ip().is_unspecified() => {
                let lo = if a.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    IpAddr::V6(Ipv6Addr::LOCALHOST)
                };
                LocalAddr::Tcp(SocketAddr::new(lo, a.port()))
            }
            a => a.clone(),
        }
    }

    /// The NBD URI nbdfuse connects to for `export`.
    fn nbd_uri(&self, export: &str) -> String {
        self.nbd_addr().uri(export)
    }

    /// Where the attachment of volume `id` lives.
    fn fuse_dir(&self, id: &str) -> PathBuf {
        self.attach_root().join(id)
    }

    fn attach_root(&self) -> PathBuf {
        self.data_dir.join("csi-node")
    }

    /// `path` as given, if it is absolute, plain (no `.` or `..`) and under
    /// the kubelet dir; `field` names it in the error.
    pub fn check_path(&self, field: &str, path: &str) -> Result<PathBuf> {
        if path.is_empty() {
            return Err(NodeError::invalid(field, format!("{field} is required")));
        }
        let p = Path::new(path);
        let plain = p
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !p.is_absolute() || !plain {
            return Err(NodeError::invalid(
                field,
                format!("{field} {path:?} must be an absolute path without . or .."),
            ));
        }
        // Symlinks resolved: the kernel's mount table names real paths, and
        // a link must not lead out of the kubelet dir.
        let p = resolve(p);
        if !p.starts_with(&self.kubelet_dir) || p == self.kubelet_dir {
            return Err(NodeError::invalid(
                field,
                format!(
                    "{field} {path:?} is not under the kubelet dir {}",
                    self.kubelet_dir.display()
                ),
            ));
        }
        Ok(p)
    }
}

/// `path` with the symlinks of its longest existing prefix resolved, the
/// rest (not created yet) as given.
pub(crate) fn resolve(path: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut cur = path;
    loop {
        if let Ok(mut real) = std::fs::canonicalize(cur) {
            real.extend(missing.iter().rev());
            return real;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name);
                cur = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// The node plugin.
pub struct Node {
    cfg: NodeConfig,
    file: StateFile,
    state: Mutex<NodeState>,
}

impl Node {
    /// Opens the plugin's state (creating the data dir if needed). Call
    /// [`Node::recover`] once the worker's NBD server serves.
    pub fn open(mut cfg: NodeConfig) -> Result<Node> {
        cowsnap_proto::server::private_dir(&cfg.attach_root())
            .map_err(|e| NodeError::internal(format!("{e:#}")))?;
        let kernel = kernel_nbd::available();
        cfg.attach = match cfg.attach {
            AttachWith::Auto if kernel => AttachWith::Kernel,
            AttachWith::Auto => AttachWith::Nbdfuse,
            AttachWith::Kernel if !kernel => {
                return Err(NodeError::FailedPrecondition(
                    "the kernel's NBD client is not available (no nbd netlink family: modprobe nbd)"
                        .into(),
                ));
            }
            a => a,
        };
        tracing::info!(attach = ?cfg.attach, "CSI node: volumes attach with {}", match cfg.attach {
            AttachWith::Kernel => "the kernel's NBD client",
            _ => "nbdfuse and a loop device",
        });
        cfg.data_dir = resolve(&cfg.data_dir);
        cfg.kubelet_dir = resolve(&cfg.kubelet_dir);
        let file = StateFile::new(&cfg.data_dir);
        let st = file.load()?;
        Ok(Node {
            cfg,
            file,
            state: Mutex::new(st),
        })
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    fn lock(&self) -> MutexGuard<'_, NodeState> {
        // A panic under the lock leaves the state as saved last; go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The volumes staged here, by id (for tests and the admin).
    pub fn staged(&self) -> Vec<String> {
        self.lock().volumes.keys().cloned().collect()
    }

    /// Attaches volume `id`'s export the way this node does (`hint`: the
    /// loop device it had, taken again if free).
    fn attach_export(&self, id: &str, hint: Option<&Path>) -> Result<attach::Attachment> {
        let export = cowsnap_proto::names::volume(id);
        let dir = self.cfg.fuse_dir(id);
        match self.cfg.attach {
            AttachWith::Kernel => attach::attach_kernel(&self.cfg.nbd_addr(), &export, &dir),
            _ => attach::attach(&self.cfg.nbd_uri(&export), &dir, hint),
        }
    }

    /// Whether volume `id` is staged here.
    pub fn is_staged(&self, id: &str) -> bool {
        self.lock().volumes.contains_key(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> NodeConfig {
        NodeConfig {
            node: "n1".into(),
            data_dir: "/d".into(),
            kubelet_dir: "/var/lib/kubelet".into(),
            nbd: LocalAddr::Tcp("0.0.0.0:1".parse().unwrap()),
            attach: AttachWith::Auto,
        }
    }

    #[test]
    fn paths_outside_the_kubelet_dir_are_refused() {
        let c = cfg();
        assert!(
            c.check_path("target_path", "/var/lib/kubelet/pods/x")
                .is_ok()
        );
        for bad in [
            "",
            "relative/x",
            "/var/lib/kubelet",
            "/var/lib/kubeletx/y",
            "/var/lib/kubelet/../../../etc",
            "/etc/passwd",
        ] {
            let e = c.check_path("target_path", bad).unwrap_err();
            assert!(matches!(e, NodeError::InvalidArgument { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn symlinks_are_resolved_before_the_kubelet_dir_check() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real-kubelet");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(real.join("pods")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let link = tmp.path().join("kubelet");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        std::os::unix::fs::symlink(&outside, real.join("pods/escape")).unwrap();
        // Given through a link, the dir and the paths under it are real ones.
        let c = NodeConfig {
            kubelet_dir: resolve(&link),
            ..cfg()
        };
        let p = c
            .check_path("target_path", &format!("{}/pods/new/mount", link.display()))
            .unwrap();
        assert_eq!(
            p,
            std::fs::canonicalize(&real).unwrap().join("pods/new/mount")
        );
        // A link under it that leads out is refused.
        let e = c
            .check_path("target_path", &format!("{}/pods/escape/x", link.display()))
            .unwrap_err();
        assert!(matches!(e, NodeError::InvalidArgument { .. }), "{e}");
    }

    #[test]
    fn the_attach_mode_follows_the_kernel() {
        let tmp = tempfile::tempdir().unwrap();
        let open = |attach| {
            Node::open(NodeConfig {
                data_dir: tmp.path().join("data"),
                kubelet_dir: tmp.path().join("kubelet"),
                attach,
                ..cfg()
            })
        };
        let auto = open(AttachWith::Auto).unwrap();
        let kernel = open(AttachWith::Kernel);
        if kernel_nbd::available() {
            assert_eq!(auto.config().attach, AttachWith::Kernel);
            assert_eq!(kernel.unwrap().config().attach, AttachWith::Kernel);
        } else {
            // As on these machines: no nbd module.
            assert_eq!(auto.config().attach, AttachWith::Nbdfuse);
            let e = kernel.err().expect("refused without the nbd module");
            assert!(
                matches!(&e, NodeError::FailedPrecondition(m) if m.contains("modprobe nbd")),
                "{e}"
            );
        }
        assert_eq!(
            open(AttachWith::Nbdfuse).unwrap().config().attach,
            AttachWith::Nbdfuse
        );
    }

    #[test]
    fn the_nbd_uri_names_the_export() {
        assert_eq!(cfg().nbd_uri("volumes/v1"), "nbd://127.0.0.1:1/volumes/v1");
        assert_eq!(
            cfg().nbd_addr(),
            LocalAddr::Tcp("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!("kernel".parse(), Ok(AttachWith::Kernel));
        assert_eq!("nbdfuse".parse(), Ok(AttachWith::Nbdfuse));
        assert!("nbd".parse::<AttachWith>().is_err());
    }
}
