//! What the node tests share: a real worker in this process on a temporary
//! data dir, a kubelet dir beside it, and a guard that releases every
//! mount, loop device and nbdfuse left under that dir whatever happens.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use cowsnap_csi::node::{AttachWith, Node, NodeConfig};
use cowsnap_worker::nbd::LocalAddr;
use cowsnap_worker::server::{RunningWorker, ServeOptions, start};
use cowsnap_worker::worker::{NewVolume, WorkerConfig};
use tokio_util::sync::CancellationToken;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub worker: Option<RunningWorker>,
    shutdown: CancellationToken,
}

impl Fixture {
    pub async fn start() -> Fixture {
        // On disk, not tmpfs: the engine uses O_DIRECT.
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&base).unwrap();
        let dir = tempfile::Builder::new()
            .prefix("node-")
            .tempdir_in(base)
            .unwrap();
        std::fs::create_dir_all(dir.path().join("kubelet")).unwrap();
        let io = std::env::var("COWSNAP_IO").unwrap_or_else(|_| "auto".into());
        let cfg = WorkerConfig {
            data_dir: dir.path().join("data"),
            node: "node-a".into(),
            nbd_uri: String::new(),
            device_allow: vec![],
            io: io.parse().unwrap(),
            writeback_cap: cowsnap_worker::worker::DEFAULT_WRITEBACK_CAP,
        };
        let opts = ServeOptions {
            grpc_listen: format!("unix:{}", dir.path().join("grpc.sock").display())
                .parse()
                .unwrap(),
            nbd_listen: format!("unix:{}", dir.path().join("nbd.sock").display())
                .parse()
                .unwrap(),
            nbd_advertise: None,
            nbd_tls: None,
            nbd_limits: Default::default(),
            tls: None,
        };
        let shutdown = CancellationToken::new();
        let worker = start(cfg, opts, shutdown.clone()).await.unwrap();
        Fixture {
            dir,
            worker: Some(worker),
            shutdown,
        }
    }

    pub fn nbd(&self) -> LocalAddr {
        self.worker.as_ref().unwrap().nbd.clone()
    }

    pub fn nbd_uri(&self, export: &str) -> String {
        self.nbd().uri(export)
    }

    pub async fn create_volume(&self, id: &str, size: u64) {
        let w = &self.worker.as_ref().unwrap().worker;
        w.create_volume(&NewVolume {
            volume_id: id.into(),
            size_bytes: size,
            ..Default::default()
        })
        .await
        .unwrap();
    }

    pub fn kubelet(&self, rel: &str) -> PathBuf {
        self.dir.path().join("kubelet").join(rel)
    }

    /// A node plugin on the worker's data dir.
    pub fn node(&self) -> Arc<Node> {
        Arc::new(
            Node::open(NodeConfig {
                node: "node-a".into(),
                data_dir: self.dir.path().join("data"),
                kubelet_dir: self.dir.path().join("kubelet"),
                nbd: self.nbd(),
                attach: AttachWith::Auto,
            })
            .unwrap(),
        )
    }

    /// Nothing of this test is mounted, attached, or running.
    pub fn assert_nothing_attached(&self) {
        let root = self.dir.path();
        let mounts = mounts_under(root);
        assert!(mounts.is_empty(), "left mounted: {mounts:?}");
        let loops = loops_under(root);
        assert!(loops.is_empty(), "left attached: {loops:?}");
        let procs = nbdfuse_under(root);
        assert!(procs.is_empty(), "nbdfuse left running: {procs:?}");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        release_everything_under(self.dir.path());
        self.shutdown.cancel();
    }
}

/// Mount points under `root` in this process's mount table (innermost
/// last), from `/proc/self/mountinfo`.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(root))
        .collect()
}

/// Loop devices whose backing file is under `root`, from `losetup -a`'s
/// view (`losetup -nO NAME,BACK-FILE`).
pub fn loops_under(root: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["-n", "-l", "-O", "NAME,BACK-FILE"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            let back = it.next()?;
            Path::new(back).starts_with(root).then(|| name.to_string())
        })
        .collect()
}

/// nbdfuse processes whose command line names a path under `root`.
pub fn nbdfuse_under(root: &Path) -> Vec<u32> {
    let needle = root.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let argv0 = cmd.split(|&b| b == 0).next()?;
            (argv0.ends_with(b"nbdfuse") && cmd.windows(needle.len()).any(|w| w == needle))
                .then_some(pid)
        })
        .collect()
}

/// Best-effort release of whatever a failed test left under `root`: lazy
/// unmounts (innermost first), loop detaches, nbdfuse killed.
pub fn release_everything_under(root: &Path) {
    // Listed first: a lazy unmount of a FUSE mount hides its loop device's
    // backing path.
    let loops = loops_under(root);
    for m in mounts_under(root).iter().rev() {
        let _ = Command::new("umount").arg("-l").arg(m).status();
    }
    for l in loops {
        let _ = Command::new("losetup").arg("-d").arg(&l).status();
    }
    for pid in nbdfuse_under(root) {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// Runs qemu-io on an NBD URI with `cmds`, returning its output; fails the
/// test if it fails.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(uri).output().expect("qemu-io runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io {uri} {cmds:?}: {text}");
    text
}

/// A buffer aligned for O_DIRECT.
pub struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    pub fn filled(len: usize, byte: u8) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size; freed in Drop.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: ptr points at len writable bytes.
        unsafe { std::ptr::write_bytes(ptr, byte, len) };
        Aligned { ptr, len }
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points at len initialised bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in `filled` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}
