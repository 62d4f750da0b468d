//! The devices a worker may use: sparse files under `DATA_DIR/devices/` on
//! the embedded default, and raw block devices named by the `--device-allow`
//! globs. Nothing outside that list is ever opened. This module creates,
//! zeroes, sizes and releases them; the engine opens them with `O_DIRECT`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::error::{Result, WorkerError};
use crate::state::sync_dir;

/// How much of each device's start is zeroed to release it (a COW header and
/// area 0 at the largest chunk size), so it is never taken for a snapshot
/// again.
const WIPE_BYTES: u64 = 1 << 20;

pub struct Devices {
    dir: PathBuf,
    allow: Vec<glob::Pattern>,
    allow_src: Vec<String>,
}

impl Devices {
    /// `data_dir/devices` (created) and the allow-list globs.
    pub fn new(data_dir: &Path, allow: &[String]) -> Result<Devices> {
        let dir = data_dir.join("devices");
        cowsnap_proto::server::private_dir(&dir)?;
        let mut pats = Vec::new();
        for a in allow {
            pats.push(glob::Pattern::new(a).map_err(|e| {
                WorkerError::invalid("device_allow", format!("bad glob {a:?}: {e}"))
            })?);
        }
        Ok(Devices {
            dir,
            allow: pats,
            allow_src: allow.to_vec(),
        })
    }

    /// The file of a file-backed volume.
    pub fn volume_file(&self, vol: &str) -> PathBuf {
        self.dir.join(format!("{vol}.vol"))
    }

    /// The file of a file-backed snapshot (ids cannot contain '.', so names
    /// never collide).
    pub fn snapshot_file(&self, vol: &str, snap: &str) -> PathBuf {
        self.dir.join(format!("{vol}.{snap}.cow"))
    }

    /// Checks that `path` is a block device the allow list permits; returns
    /// its canonical path and size. `field` names the request field.
    pub fn check_raw(&self, field: &'static str, path: &str) -> Result<(PathBuf, u64)> {
        if self.allow.is_empty() {
            return Err(WorkerError::invalid(
                field,
                format!(
                    "{path}: this worker uses no raw devices (start it with --device-allow GLOB)"
                ),
            ));
        }
        let canon = std::fs::canonicalize(path)
            .map_err(|e| WorkerError::invalid(field, format!("{path}: {e}")))?;
        let allowed = self
            .allow
            .iter()
            .any(|p| p.matches_path(Path::new(path)) || p.matches_path(&canon));
        if !allowed {
            return Err(WorkerError::invalid(
                field,
                format!(
                    "{path} is not in the device allow list ({})",
                    self.allow_src.join(", ")
                ),
            ));
        }
        let meta = std::fs::metadata(&canon)
            .map_err(|e| WorkerError::invalid(field, format!("{path}: {e}")))?;
        if !meta.file_type().is_block_device() {
            return Err(WorkerError::invalid(
                field,
                format!("{path} is not a block device"),
            ));
        }
        let size =
            raw_size(&canon).map_err(|e| WorkerError::invalid(field, format!("{path}: {e}")))?;
        Ok((canon, size))
    }

    /// Raw devices the allow list matches, with their sizes.
    pub fn list_raw(&self) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        for p in &self.allow_src {
            let Ok(paths) = glob::glob(p) else { continue };
            for path in paths.flatten() {
                let Ok(canon) = std::fs::canonicalize(&path) else {
                    continue;
                };
                let is_block = std::fs::metadata(&canon)
                    .map(|m| m.file_type().is_block_device())
                    .unwrap_or(false);
                if is_block && !out.iter().any(|(q, _)| q == &canon) {
                    let size = raw_size(&canon).unwrap_or(0);
                    out.push((canon, size));
                }
            }
        }
        out
    }

    /// Creates (or recreates) a zero-filled sparse file of `size` bytes.
    pub fn create_file(&self, path: &Path, size: u64) -> Result<()> {
        let f = cowsnap_proto::server::private_file_options()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .with_context(|| format!("{}: cannot create", path.display()))?;
        f.set_len(size)
            .with_context(|| format!("{}: cannot size to {size} bytes", path.display()))?;
        f.sync_all()?;
        sync_dir(&self.dir)?;
        Ok(())
    }

    /// Zeroes `[0, len)` of a raw device (BLKZEROOUT: offloaded where the
    /// device can).
    pub fn zero_raw(&self, path: &Path, len: u64) -> Result<()> {
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        const BLKZEROOUT: libc::c_ulong = 0x127f;
        let range: [u64; 2] = [0, len];
        // SAFETY: BLKZEROOUT reads two u64s through the pointer.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
        if r < 0 {
            return Err(WorkerError::Internal(
                anyhow::Error::new(std::io::Error::last_os_error())
                    .context(format!("{}: cannot zero", path.display())),
            ));
        }
        f.sync_all()?;
        Ok(())
    }

    /// Gives a device back: a file is removed; a raw device has its start
    /// zeroed so it is not mistaken for a COW device later.
    pub fn release(&self, path: &Path, file_backed: bool) -> Result<()> {
        if file_backed {
            match std::fs::remove_file(path) {
                Ok(()) => sync_dir(&self.dir)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e)
                        .context(format!("{}: cannot remove", path.display()))
                        .into());
                }
            }
            Ok(())
        } else {
            let size = raw_size(path).unwrap_or(0);
            self.zero_raw(path, WIPE_BYTES.min(size))
        }
    }

    /// (capacity, free) bytes of the data dir's file system.
    pub fn fs_space(&self) -> Result<(u64, u64)> {
        let c = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes())
            .map_err(|e| WorkerError::Internal(e.into()))?;
        // SAFETY: statvfs fills the zeroed struct for a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let frsize = st.f_frsize;
        Ok((st.f_blocks * frsize, st.f_bavail * frsize))
    }

    /// Bytes already allocated on disk by a file.
    pub fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    }
}

/// Size of a block device or file in bytes.
pub fn raw_size(path: &Path) -> std::io::Result<u64> {
    let f = File::open(path)?;
    let meta = f.metadata()?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64, &mut size) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}
