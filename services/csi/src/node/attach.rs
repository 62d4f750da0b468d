//! Attaching a volume's NBD export as a block device on this node.
//!
//! Without the kernel's `nbd` module (no `/dev/nbd*`, as on these
//! machines) the export goes through `nbdfuse`, which shows it as one file
//! in a FUSE mount, and a loop device (`--direct-io=on`, so no second page
//! cache sits between the file system and the export) on that file:
//!
//! ```text
//! /dev/loopN ──▶ DIR/export (FUSE file) ──▶ nbdfuse ──NBD──▶ worker
//! ```
//!
//! Where the kernel has its NBD client (the `nbd` module), the export is
//! handed to it instead ([`kernel_nbd`](super::kernel_nbd)), with no
//! process in between, and the device can be reconnected after the
//! worker restarts and grown while in use:
//!
//! ```text
//! /dev/nbdN ──NBD (kernel)──▶ worker
//! ```
//!
//! `DIR` is the volume's own directory under the node's data dir, so
//! whatever a crash leaves attached is found again by its path: loop
//! devices by their backing file, kernel NBD devices by their backend
//! label (`cowsnap:DIR`).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::error::{NodeError, Result};
use super::kernel_nbd::{self, InUse};
use super::mounts::{mounted_at, run};
use cowsnap_worker::nbd::LocalAddr;

/// The name of the export's file in its FUSE mount.
const FUSE_FILE: &str = "export";

/// How long nbdfuse may take to connect and mount.
const NBDFUSE_READY: Duration = Duration::from_secs(30);

/// A volume attached on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The attachment's own directory: the FUSE mount point nbdfuse serves
    /// the export in, or the label of its kernel NBD device.
    pub fuse_dir: PathBuf,
    /// The nbdfuse process when attached, for the record: a detach finds
    /// nbdfuse by its command line (a pid may be reused after a restart).
    pub nbdfuse_pid: u32,
    /// The block device: the loop device over the FUSE file, or
    /// `/dev/nbdN`.
    #[serde(alias = "loop_device")]
    pub device: PathBuf,
    /// The index of the kernel NBD device serving it, when the kernel's
    /// client does (no nbdfuse, no loop device then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_index: Option<u32>,
}

impl Attachment {
    pub fn fuse_file(&self) -> PathBuf {
        self.fuse_dir.join(FUSE_FILE)
    }

    /// What a read-only loop device of a read-only publish goes over: the
    /// FUSE file, or the kernel NBD device itself.
    pub fn backing(&self) -> PathBuf {
        match self.nbd_index {
            Some(_) => self.device.clone(),
            None => self.fuse_file(),
        }
    }
}

/// The backend label of the kernel NBD device attached for `dir`.
pub fn nbd_label(dir: &Path) -> String {
    format!("cowsnap:{}", dir.display())
}

/// The kernel NBD devices connected with `dir`'s label.
fn nbd_devices_for(dir: &Path) -> Vec<kernel_nbd::Device> {
    let label = nbd_label(dir);
    kernel_nbd::connected()
        .into_iter()
        .filter(|d| d.backend == label)
        .collect()
}

/// Attaches `export` of the NBD server at `addr` through the kernel's NBD
/// client, labelled with `dir` (created: it marks the attachment for
/// recovery, as nbdfuse's mount point does).
pub fn attach_kernel(addr: &LocalAddr, export: &str, dir: &Path) -> Result<Attachment> {
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::internal(format!("{}: cannot create: {e}", dir.display())))?;
    let d = kernel_nbd::attach(addr, export, &nbd_label(dir))
        .map_err(|e| NodeError::internal(format!("{e:#}")))?;
    Ok(Attachment {
        fuse_dir: dir.to_path_buf(),
        nbdfuse_pid: 0,
        device: d.path(),
        nbd_index: Some(d.index),
    })
}

/// The devices under `dir` a crash may have left: loop devices over files
/// in it and kernel NBD devices labelled with it.
pub fn devices_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = loops_under(dir);
    out.extend(nbd_devices_for(dir).iter().map(|d| d.path()));
    out
}

/// Attaches `uri` (an NBD URI naming the export) through nbdfuse and a
/// loop device under `fuse_dir`, which
/// must hold nothing attached. With `loop_hint`, that loop device is
/// taken if it is free (so a bind mount of its node keeps working after a
/// re-attach), otherwise any free one.
pub fn attach(uri: &str, fuse_dir: &Path, loop_hint: Option<&Path>) -> Result<Attachment> {
    std::fs::create_dir_all(fuse_dir)
        .map_err(|e| NodeError::internal(format!("{}: cannot create: {e}", fuse_dir.display())))?;
    let pid_file = fuse_dir.with_extension("pid");
    let _ = std::fs::remove_file(&pid_file);
    let mut child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pid_file)
        .arg(fuse_dir.join(FUSE_FILE))
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group: a signal meant for the worker (Ctrl-C)
        // does not take the volume away under a mounted file system.
        .process_group(0)
        .spawn()
        .map_err(|e| NodeError::internal(format!("nbdfuse: cannot run: {e}")))?;
    let pid = child.id();
    let started = Instant::now();
    // nbdfuse writes its pid file once the export is connected and mounted.
    loop {
        if std::fs::metadata(&pid_file).is_ok_and(|m| m.len() > 0)
            && mounted_at(fuse_dir)?.is_some()
        {
            break;
        }
        if let Some(status) = child
            .try_wait()
            .map_err(|e| NodeError::internal(format!("nbdfuse: {e}")))?
        {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                use std::io::Read;
                let _ = s.read_to_string(&mut err);
            }
            return Err(NodeError::internal(format!(
                "nbdfuse {uri} on {} exited ({status}): {}",
                fuse_dir.display(),
                err.trim()
            )));
        }
        if started.elapsed() > NBDFUSE_READY {
            let _ = child.kill();
            let _ = child.wait();
            let _ = fusermount_u(fuse_dir);
            return Err(NodeError::internal(format!(
                "nbdfuse {uri} on {} not ready after {NBDFUSE_READY:?}",
                fuse_dir.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&pid_file);
    // Nobody waits for nbdfuse: it outlives this process on purpose, and
    // its exit status is of no use (reaped by init if we die first, or
    // by the reaper thread below).
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    let file = fuse_dir.join(FUSE_FILE);
    let loop_device = match loop_hint.filter(|l| loop_is_free(l)) {
        Some(l) => run(Command::new("losetup")
            .arg("--direct-io=on")
            .arg(l)
            .arg(&file))
        .map(|_| l.to_path_buf()),
        None => run(Command::new("losetup")
            .args(["--show", "-f", "--direct-io=on"])
            .arg(&file))
        .map(|out| PathBuf::from(out.trim())),
    };
    let att = Attachment {
        fuse_dir: fuse_dir.to_path_buf(),
        nbdfuse_pid: pid,
        device: PathBuf::new(),
        nbd_index: None,
    };
    match loop_device {
        Ok(l) => Ok(Attachment { device: l, ..att }),
        Err(e) => {
            let _ = detach(&att);
            Err(e)
        }
    }
}

/// Whether an attachment is whole: its loop device is over its FUSE file
/// and an nbdfuse serves that file, or its kernel NBD device is connected
/// with its label.
pub fn is_attached(att: &Attachment) -> bool {
    if let Some(i) = att.nbd_index {
        return kernel_nbd::device(i)
            .is_some_and(|d| d.connected && d.backend == nbd_label(&att.fuse_dir));
    }
    loop_backing_file(&att.device).as_deref() == Some(att.fuse_file().as_path())
        && !nbdfuse_serving(&att.fuse_dir).is_empty()
}

/// Whether `dev` is a loop device with no backing file.
fn loop_is_free(dev: &Path) -> bool {
    let Some(name) = dev.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    dev.exists() && !Path::new(&format!("/sys/block/{name}/loop")).exists()
}

/// The backing file of loop device `dev`, if it has one.
pub fn loop_backing_file(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

/// Every loop device whose backing file lies under `dir`.
pub fn loops_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let dev = PathBuf::from("/dev").join(&name);
            loop_backing_file(&dev)
                .filter(|b| b.starts_with(dir))
                .map(|_| dev)
        })
        .collect()
}

fn fusermount_u(dir: &Path) -> Result<()> {
    if mounted_at(dir)?.is_some() {
        run(Command::new("fusermount3").arg("-u").arg(dir))?;
    }
    Ok(())
}

/// The nbdfuse processes serving `fuse_dir` (found by their command line:
/// a pid recorded before a restart may have been reused by something else;
/// an exited child waiting to be reaped has none and is not listed).
fn nbdfuse_serving(fuse_dir: &Path) -> Vec<i32> {
    let mine = fuse_dir.join(FUSE_FILE);
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let ours = args.first().is_some_and(|a| a.ends_with(b"nbdfuse"))
                && args
                    .iter()
                    .any(|a| *a == mine.as_os_str().as_encoded_bytes());
            ours.then_some(pid)
        })
        .collect()
}

/// Polls `done` every 20 ms for at most `DETACH_WAIT`.
fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > DETACH_WAIT {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// How long a detach waits for a loop device to be released by a
/// transient opener (a probe), and for nbdfuse to exit once unmounted.
const DETACH_WAIT: Duration = Duration::from_secs(10);

/// Detaches what `attach` or `attach_kernel` made, whatever is left of
/// it: kernel NBD devices with its label; the loop device (if it is still
/// over this attachment's file), the FUSE mount, the nbdfuse process.
/// Fails if a device stays in use (mounted).
pub fn detach(att: &Attachment) -> Result<()> {
    for d in nbd_devices_for(&att.fuse_dir) {
        kernel_nbd::detach(d.index).map_err(|e| match e.downcast_ref::<kernel_nbd::InUse>() {
            Some(InUse(dev)) => NodeError::FailedPrecondition(format!(
                "{} is still in use; unmount it first",
                dev.display()
            )),
            None => NodeError::internal(format!("{e:#}")),
        })?;
    }
    let file = att.fuse_file();
    let mut loops = loops_under(&att.fuse_dir);
    if !att.device.as_os_str().is_empty()
        && loop_backing_file(&att.device).as_deref() == Some(file.as_path())
        && !loops.contains(&att.device)
    {
        loops.push(att.device.clone());
    }
    for l in &loops {
        run(Command::new("losetup").arg("-d").arg(l))?;
        // A device still open is only marked to detach on its last close:
        // wait for a transient opener; one that stays (a mount) is an error,
        // the FUSE mount under it is still used.
        if !wait_until(|| loop_backing_file(l).as_deref() != Some(file.as_path())) {
            return Err(NodeError::FailedPrecondition(format!(
                "{} is still in use; unmount it first",
                l.display()
            )));
        }
    }
    if let Err(e) = fusermount_u(&att.fuse_dir) {
        // A dead nbdfuse leaves a mount only a lazy unmount removes.
        tracing::warn!("{e}; unmounting {} lazily", att.fuse_dir.display());
        run(Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(&att.fuse_dir))?;
    }
    // nbdfuse exits once unmounted; one that does not (or survived a
    // lazy unmount) is made to.
    if !wait_until(|| nbdfuse_serving(&att.fuse_dir).is_empty()) {
        for pid in nbdfuse_serving(&att.fuse_dir) {
            tracing::warn!(pid, dir = %att.fuse_dir.display(), "nbdfuse did not exit; killing it");
            // SAFETY: kill has no memory effects; the pid serves our dir.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = std::fs::remove_dir(&att.fuse_dir);
    Ok(())
}
