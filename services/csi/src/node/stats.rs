//! NodeGetVolumeStats: the usage of a staged or published volume path —
//! bytes and inodes of its file system, or the size of its block device.

use std::path::Path;

use super::Node;
use super::error::{NodeError, Result};
use super::state::Access;

/// What NodeGetVolumeStats reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeStats {
    /// A file system: bytes and inodes, total / used / available.
    Fs { bytes: Usage, inodes: Usage },
    /// A block device of this many bytes.
    Block { total_bytes: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub total: u64,
    pub used: u64,
    pub available: u64,
}

impl Node {
    /// The usage of `volume` at `path` (its staging path or a target it is
    /// published at): NOT_FOUND for a volume not staged here, or a path
    /// that is neither or does not exist.
    pub fn stats(&self, volume: &str, path: &Path) -> Result<VolumeStats> {
        let path = super::resolve(path);
        let path = path.as_path();
        let st = self.lock();
        let s = st.volumes.get(volume).ok_or_else(|| {
            NodeError::NotFound(format!("volume {volume} is not staged on this node"))
        })?;
        if s.staging_path != path && !s.published.contains_key(path) {
            return Err(NodeError::NotFound(format!(
                "{} is neither the staging path nor a target of volume {volume}",
                path.display()
            )));
        }
        if !path.exists() {
            return Err(NodeError::NotFound(format!(
                "{} does not exist",
                path.display()
            )));
        }
        match &s.access {
            Access::Mount { .. } => fs_stats(path),
            Access::Block => block_size(&s.attachment.device)
                .map(|total_bytes| VolumeStats::Block { total_bytes }),
        }
    }
}

fn fs_stats(path: &Path) -> Result<VolumeStats> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        NodeError::invalid(
            "volume_path",
            format!("{} holds a NUL byte", path.display()),
        )
    })?;
    // SAFETY: statvfs fills the zeroed struct; `c` is NUL-terminated.
    let mut v: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut v) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(NodeError::internal(format!(
            "statvfs {}: {e}",
            path.display()
        )));
    }
    let frsize = v.f_frsize as u64;
    Ok(VolumeStats::Fs {
        bytes: Usage {
            total: v.f_blocks as u64 * frsize,
            used: (v.f_blocks as u64 - v.f_bfree as u64) * frsize,
            available: v.f_bavail as u64 * frsize,
        },
        inodes: Usage {
            total: v.f_files as u64,
            used: v.f_files as u64 - v.f_ffree as u64,
            available: v.f_favail as u64,
        },
    })
}

/// The size of a block device, from sysfs (512-byte sectors).
pub(super) fn block_size(dev: &Path) -> Result<u64> {
    let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let p = format!("/sys/block/{name}/size");
    std::fs::read_to_string(&p)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|sectors| sectors * 512)
        .ok_or_else(|| NodeError::internal(format!("{}: no size in {p}", dev.display())))
}
