//! The devices a worker may use: sparse files under `DATA_DIR/devices/` on
//! the embedded default, and raw block devices named by the `--device-allow`
//! globs. Nothing outside that list is ever opened. This module creates,
//! zeroes, sizes and releases them; the engine opens them with `O_DIRECT`.
//!
//! A raw device path is checked before any byte is written: absolute and
//! clean, matched by a glob whose wildcards stay within one path component,
//! and, through links, resolved to a canonical path the list allows too.
//! The canonical path is what is recorded and opened, without following a
//! link and checking that what opened is that path's block device.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::error::{Result, WorkerError};
use crate::state::sync_dir;

/// How much of each device's start is zeroed to release it (a COW header and
/// area 0 at the largest chunk size), so it is never taken for a snapshot
/// again.
const WIPE_BYTES: u64 = 1 << 20;

/// How the allow-list globs match a path: `*`, `?` and `[...]` never match a
/// `/` (a glob names entries of the directories it spells out, not of their
/// subdirectories), nor the leading `.` of a name (so neither `..` nor a
/// hidden entry matches unless the glob spells the dot).
const MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: true,
};

/// A raw block device from the allow list, as checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDevice {
    /// The canonical path: absolute, no links, itself in the allow list.
    pub path: PathBuf,
    pub size: u64,
    /// The device number: what two paths to the same device share.
    pub rdev: u64,
}

pub struct Devices {
    dir: PathBuf,
    allow: Vec<glob::Pattern>,
    allow_src: Vec<String>,
    /// Bytes allocated to file-backed devices as last read
    /// ([`Devices::unallocated`]).
    allocated: Mutex<Allocated>,
}

/// Allocated bytes of files (keyed by their path's bytes: hashing a
/// `Path` parses it, and a check looks up every device file), each with
/// when it was read, and where the next check's re-reads start.
#[derive(Default)]
struct Allocated {
    bytes: HashMap<Box<[u8]>, (u64, Instant)>,
    cursor: usize,
}

/// How long a file's allocated size, once read, surely stands for it in
/// room checks. Every check sums it over every file-backed device, under
/// the worker's lock: reading them all each time costs one `stat` per
/// device (14,000 on a worker of 1,000 volumes of 10 snapshots: tens of ms
/// per create). So a check reads only files it has no figure of, and
/// re-reads at most [`ALLOCATED_REREADS`] figures older than this, taking
/// turns over the list; older figures stand meanwhile. A figure read
/// earlier errs on the safe side: a device's allocation only grows
/// (nothing punches holes), so an old figure counts more still to claim,
/// less room; and a check that would refuse for want of room asks again
/// with every figure read afresh. A file made again under the same path,
/// or removed, is forgotten at once.
const ALLOCATED_MAX_AGE: Duration = Duration::from_secs(1);
/// Figures older than [`ALLOCATED_MAX_AGE`] a room check re-reads at most.
const ALLOCATED_REREADS: usize = 256;

impl Devices {
    /// `data_dir/devices` (created) and the allow-list globs, which must be
    /// absolute and clean (see [`check_clean`]).
    pub fn new(data_dir: &Path, allow: &[String]) -> Result<Devices> {
        let dir = data_dir.join("devices");
        cowsnap_proto::server::private_dir(&dir)?;
        let mut pats = Vec::new();
        for a in allow {
            check_clean(a).map_err(|e| WorkerError::invalid("device_allow", e))?;
            pats.push(glob::Pattern::new(a).map_err(|e| {
                WorkerError::invalid("device_allow", format!("bad glob {a:?}: {e}"))
            })?);
        }
        Ok(Devices {
            dir,
            allow: pats,
            allow_src: allow.to_vec(),
            allocated: Mutex::default(),
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

    /// The files of file-backed snapshots under the data dir (`*.cow`),
    /// whichever records name them.
    pub fn snapshot_files(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.dir)
            .with_context(|| format!("{}: cannot list", self.dir.display()))?;
        for e in entries {
            let path = e
                .with_context(|| format!("{}: cannot list", self.dir.display()))?
                .path();
            if path.extension().is_some_and(|x| x == "cow") {
                out.push(path);
            }
        }
        Ok(out)
    }

    fn allowed(&self, path: &Path) -> bool {
        self.allow.iter().any(|p| p.matches_path_with(path, MATCH))
    }

    /// Resolves a requested raw device path to its canonical path, opening
    /// nothing. The path must be absolute and clean, match the allow list
    /// as given, and, when it goes through links, resolve to a path that
    /// matches the allow list too: a link may only name another allowed
    /// device. `field` names the request field.
    pub fn resolve(&self, field: &'static str, path: &str) -> Result<PathBuf> {
        if self.allow.is_empty() {
            return Err(WorkerError::invalid(
                field,
                format!(
                    "{path}: this worker uses no raw devices (start it with --device-allow GLOB)"
                ),
            ));
        }
        check_clean(path).map_err(|e| WorkerError::invalid(field, e))?;
        if !self.allowed(Path::new(path)) {
            return Err(WorkerError::invalid(
                field,
                format!(
                    "{path} is not in the device allow list ({})",
                    self.allow_src.join(", ")
                ),
            ));
        }
        let canon = std::fs::canonicalize(path)
            .map_err(|e| WorkerError::invalid(field, format!("{path}: {e}")))?;
        if canon != Path::new(path) && !self.allowed(&canon) {
            return Err(WorkerError::invalid(
                field,
                format!(
                    "{path} is a link to {}, which is not in the device allow list ({}): a link may only name another allowed device",
                    canon.display(),
                    self.allow_src.join(", ")
                ),
            ));
        }
        Ok(canon)
    }

    /// Checks that `path` is a block device the allow list permits (see
    /// [`Devices::resolve`]) and opens it once, without following a link, to
    /// check that what opens is that device; returns its canonical path,
    /// size and device number.
    pub fn check_raw(&self, field: &'static str, path: &str) -> Result<RawDevice> {
        let canon = self.resolve(field, path)?;
        let is_block = std::fs::symlink_metadata(&canon)
            .map_err(|e| WorkerError::invalid(field, format!("{path}: {e}")))?
            .file_type()
            .is_block_device();
        if !is_block {
            return Err(WorkerError::invalid(
                field,
                format!("{path} is not a block device"),
            ));
        }
        let pin = Pinned::open(&canon)
            .map_err(|e| WorkerError::invalid(field, format!("{path}: {e}")))?;
        let size =
            fd_size(&pin.file).map_err(|e| WorkerError::invalid(field, format!("{path}: {e}")))?;
        Ok(RawDevice {
            path: canon,
            size,
            rdev: pin.rdev,
        })
    }

    /// Raw devices the allow list matches (each once, however many allowed
    /// paths name it), with their sizes.
    pub fn list_raw(&self) -> Vec<RawDevice> {
        let mut out: Vec<RawDevice> = Vec::new();
        for p in &self.allow_src {
            let Ok(paths) = glob::glob_with(p, MATCH) else {
                continue;
            };
            for path in paths.flatten() {
                let Some(path) = path.to_str() else { continue };
                let Ok(d) = self.check_raw("device", path) else {
                    continue;
                };
                if !out.iter().any(|q| q.rdev == d.rdev) {
                    out.push(d);
                }
            }
        }
        out
    }

    /// Opens the raw device at `path` (a canonical path: see [`Pinned`]) and
    /// keeps it open, to check after someone else opened `path` that the
    /// same device is still there.
    pub fn pin(&self, path: &Path) -> Result<Pinned> {
        Pinned::open(path).map_err(|e| {
            WorkerError::Internal(anyhow::Error::new(e).context(format!("{}", path.display())))
        })
    }

    /// Creates (or recreates) a zero-filled sparse file of `size` bytes,
    /// durably (its size and its name).
    pub fn create_file(&self, path: &Path, size: u64) -> Result<()> {
        let f = self.new_file(path, size)?;
        f.sync_all()?;
        sync_dir(&self.dir)?;
        Ok(())
    }

    /// Creates (or empties) the file `path` with `size` bytes (sparse),
    /// making nothing durable: neither its size (an `fdatasync` of it, or
    /// a `RWF_DSYNC` write to it, does: fdatasync(2) counts a size set by
    /// `ftruncate` as metadata a later read needs) nor its name (an fsync
    /// of [`Devices::dir`] does).
    pub fn new_file(&self, path: &Path, size: u64) -> Result<File> {
        self.forget_allocated(path);
        let f = cowsnap_proto::server::private_file_options()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)
            .with_context(|| format!("{}: cannot create", path.display()))?;
        f.set_len(size)
            .with_context(|| format!("{}: cannot size to {size} bytes", path.display()))?;
        Ok(f)
    }

    /// The directory of file-backed devices.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Grows an existing file to `size` bytes (the new part reads as
    /// zeros), durably.
    pub fn extend_file(&self, path: &Path, size: u64) -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        if f.metadata()?.len() < size {
            f.set_len(size)
                .with_context(|| format!("{}: cannot grow to {size} bytes", path.display()))?;
        }
        f.sync_all()?;
        Ok(())
    }

    /// Zeroes `[0, len)` of a raw device (BLKZEROOUT: offloaded where the
    /// device can). `path` is a canonical path from [`Devices::check_raw`];
    /// what is zeroed is the block device opened at `path` itself, never one
    /// a link put there (see [`open_checked`]).
    pub fn zero_raw(&self, path: &Path, len: u64) -> Result<()> {
        self.zero_raw_range(path, 0, len)
    }

    /// Zeroes `[start, start+len)` of a raw device, as [`Devices::zero_raw`].
    pub fn zero_raw_range(&self, path: &Path, start: u64, len: u64) -> Result<()> {
        let f =
            open_checked(path, true).with_context(|| format!("{}: cannot open", path.display()))?;
        const BLKZEROOUT: libc::c_ulong = 0x127f;
        let range: [u64; 2] = [start, len];
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
            self.forget_allocated(path);
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

    /// Bytes the file-backed devices `files` (path, size) may still claim
    /// beyond what they have allocated: from figures read earlier (see
    /// [`ALLOCATED_MAX_AGE`]), or with `fresh`, every file read now.
    pub fn unallocated<'a>(
        &self,
        files: impl IntoIterator<Item = (&'a Path, u64)>,
        fresh: bool,
    ) -> u64 {
        let mut a = self.allocated.lock().expect("allocated");
        let now = Instant::now();
        let turn = a.cursor..a.cursor + ALLOCATED_REREADS;
        let (mut n, mut count) = (0u64, 0usize);
        for (path, size) in files {
            let key = path.as_os_str().as_bytes();
            let due = turn.contains(&count);
            count += 1;
            let got = match a.bytes.get_mut(key) {
                Some((b, at)) => {
                    if fresh || (due && now.duration_since(*at) > ALLOCATED_MAX_AGE) {
                        (*b, *at) = (allocated(path), now);
                    }
                    *b
                }
                None => {
                    let b = allocated(path);
                    a.bytes.insert(key.into(), (b, now));
                    b
                }
            };
            n += size.saturating_sub(got);
        }
        a.cursor = if turn.end >= count { 0 } else { turn.end };
        n
    }

    fn forget_allocated(&self, path: &Path) {
        self.allocated
            .lock()
            .expect("allocated")
            .bytes
            .remove(path.as_os_str().as_bytes());
    }
}

/// Bytes allocated to the file at `path` (0 if it cannot be read).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Size of a block device or file in bytes.
pub fn raw_size(path: &Path) -> std::io::Result<u64> {
    fd_size(&File::open(path)?)
}

/// Size of an open block device or file in bytes.
fn fd_size(f: &File) -> std::io::Result<u64> {
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

/// The device number of the block device at `path` (links followed).
pub fn rdev_of(path: &Path) -> Option<u64> {
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type().is_block_device().then(|| meta.rdev())
}

/// Checks that a requested device path (or an allow-list glob) is absolute
/// and clean: no `.` or `..` component, no empty one (a doubled or trailing
/// `/`), no NUL. A path that goes up and down again names its device in
/// another way than the allow list sees it; it is refused, not normalised.
pub fn check_clean(path: &str) -> std::result::Result<(), String> {
    if path.contains('\0') {
        return Err(format!("{path:?} contains a NUL byte"));
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("{path:?} is not an absolute path"));
    };
    for c in rest.split('/') {
        match c {
            "" => {
                return Err(format!(
                    "{path:?} has an empty component (a doubled or trailing '/')"
                ));
            }
            "." | ".." => {
                return Err(format!(
                    "{path:?} has a '{c}' component: give the path without it"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Opens the block device at `path` without following a link there
/// (`O_NOFOLLOW`; `O_NONBLOCK` so that a FIFO put in its place cannot hang
/// the open), then checks that what opened is a block device and that the
/// kernel's name for it is `path` itself: no directory on the way was a
/// link (or became one since `path` was resolved).
fn open_checked(path: &Path, write: bool) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::new(e.kind(), "is a link, not the device it was checked as")
            } else {
                e
            }
        })?;
    if !f.metadata()?.file_type().is_block_device() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is not a block device",
        ));
    }
    let real = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    if real != path {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "opens as {}, not the device it was checked as",
                real.display()
            ),
        ));
    }
    Ok(f)
}

/// A raw device held open (read-only) at its canonical path while something
/// else opens that path, so the caller can check that the same device was
/// there all along.
pub struct Pinned {
    file: File,
    rdev: u64,
}

impl Pinned {
    fn open(path: &Path) -> std::io::Result<Pinned> {
        let file = open_checked(path, false)?;
        let rdev = file.metadata()?.rdev();
        Ok(Pinned { file, rdev })
    }

    /// Checks that `path` still names the pinned device, and not through a
    /// link.
    pub fn still_at(&self, path: &Path) -> Result<()> {
        let same = std::fs::symlink_metadata(path)
            .is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == self.rdev);
        if same {
            Ok(())
        } else {
            Err(WorkerError::Internal(anyhow::anyhow!(
                "{}: no longer the device it was checked as",
                path.display()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Room counts what each file may still claim: its size less what it
    /// has allocated, as read at most ALLOCATED_MAX_AGE ago; a file made
    /// again under the same path, or released, is read afresh.
    #[test]
    fn unallocated_reads_a_remade_file_afresh() {
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().unwrap();
        let d = Devices::new(tmp.path(), &[]).unwrap();
        let (a, b) = (d.dir().join("a"), d.dir().join("b"));
        const MIB: u64 = 1 << 20;
        for p in [&a, &b] {
            let f = d.new_file(p, 4 * MIB).unwrap();
            f.write_all_at(&vec![1u8; MIB as usize], 0).unwrap();
            f.sync_all().unwrap();
        }
        let files = || [(a.as_path(), 4 * MIB), (b.as_path(), 4 * MIB)];
        assert_eq!(d.unallocated(files(), false), 6 * MIB);
        // Made again empty: all of it is to claim again at once.
        d.new_file(&a, 4 * MIB).unwrap();
        assert_eq!(d.unallocated(files(), false), 7 * MIB);
        // Released, then made again with data: read afresh too.
        d.release(&b, true).unwrap();
        let f = d.new_file(&b, 4 * MIB).unwrap();
        f.write_all_at(&vec![1u8; 2 * MIB as usize], 0).unwrap();
        f.sync_all().unwrap();
        assert_eq!(d.unallocated(files(), false), 6 * MIB);
    }

    /// A figure read earlier may stand for a file that has grown since,
    /// but only on the safe side (more still to claim); asked afresh, the
    /// check reads every file now.
    #[test]
    fn unallocated_afresh_reads_every_file_now() {
        use std::os::unix::fs::FileExt;
        let tmp = tempfile::tempdir().unwrap();
        let d = Devices::new(tmp.path(), &[]).unwrap();
        const MIB: u64 = 1 << 20;
        let paths: Vec<PathBuf> = (0..3).map(|i| d.dir().join(format!("f{i}"))).collect();
        let files = || paths.iter().map(|p| (p.as_path(), 4 * MIB));
        for p in &paths {
            d.new_file(p, 4 * MIB).unwrap();
        }
        assert_eq!(d.unallocated(files(), false), 12 * MIB);
        for p in &paths {
            let f = OpenOptions::new().write(true).open(p).unwrap();
            f.write_all_at(&vec![1u8; MIB as usize], 0).unwrap();
            f.sync_all().unwrap();
        }
        assert!(d.unallocated(files(), false) >= 9 * MIB);
        assert_eq!(d.unallocated(files(), true), 9 * MIB);
        assert_eq!(d.unallocated(files(), false), 9 * MIB);
    }

    #[test]
    fn only_absolute_clean_paths_pass() {
        for ok in [
            "/dev/sdb",
            "/dev/disk/by-id/nvme-x_1",
            "/a/.hidden",
            "/a/b..c",
        ] {
            assert_eq!(check_clean(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("dev/sdb", "absolute"),
            ("", "absolute"),
            ("./dev/sdb", "absolute"),
            ("/", "empty component"),
            ("/dev//sdb", "empty component"),
            ("/dev/sdb/", "empty component"),
            ("/dev/./sdb", "'.' component"),
            ("/dev/../dev/sdb", "'..' component"),
            ("/dir/../../../dev/loop1", "'..' component"),
            ("/dev/sdb/..", "'..' component"),
            ("/dev/sd\0b", "NUL"),
        ] {
            let e = check_clean(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    fn devices(dir: &Path, allow: &[&str]) -> Result<Devices> {
        let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
        Devices::new(dir, &allow)
    }

    #[test]
    fn globs_match_within_one_directory() {
        let data = tempfile::tempdir().unwrap();
        let d = devices(data.path(), &["/dir/*", "/dev/sd?", "/dev/nvme[0-9]n1"]).unwrap();
        for ok in ["/dir/a", "/dir/loop1", "/dev/sdb", "/dev/nvme0n1"] {
            assert!(d.allowed(Path::new(ok)), "{ok}");
        }
        for bad in [
            "/dir/sub/a",
            "/dir/../dev/loop1",
            "/dir/../../../dev/loop1",
            "/dir/.hidden",
            "/dir/..",
            "/dir",
            "/DIR/a",
            "/dev/sdb/x",
            "/dev/sd/",
            "/dev/nvme0n1/../../sdb",
        ] {
            assert!(!d.allowed(Path::new(bad)), "{bad}");
        }
    }

    #[test]
    fn globs_must_be_absolute_and_clean() {
        let data = tempfile::tempdir().unwrap();
        for bad in [
            "dev/sd*",
            "/dev/../dev/sd*",
            "/dev//sd*",
            "/dev/",
            "/dev/[a",
        ] {
            let e = devices(data.path(), &[bad]).err().expect(bad);
            assert!(
                matches!(
                    e,
                    WorkerError::InvalidArgument {
                        field: "device_allow",
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_link_resolves_only_to_an_allowed_path() {
        let data = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(data.path()).unwrap();
        let allowed = base.join("allowed");
        let other = base.join("other");
        let outside = base.join("outside");
        for d in [&allowed, &other, &outside] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(allowed.join("f"), b"").unwrap();
        std::fs::write(other.join("f"), b"").unwrap();
        std::fs::write(outside.join("f"), b"").unwrap();
        std::os::unix::fs::symlink(outside.join("f"), allowed.join("out")).unwrap();
        std::os::unix::fs::symlink(other.join("f"), allowed.join("other")).unwrap();
        std::os::unix::fs::symlink(allowed.join("f"), allowed.join("in")).unwrap();
        std::os::unix::fs::symlink("f", allowed.join("rel")).unwrap();
        // A link to a directory outside: `allowed/up/f` is no name `*` matches
        // anyway, and `allowed/up` itself resolves outside.
        std::os::unix::fs::symlink(&outside, allowed.join("up")).unwrap();
        let esc = |p: &Path| glob::Pattern::escape(p.to_str().unwrap());
        let d = devices(
            &base.join("data"),
            &[&format!("{}/*", esc(&allowed)), &esc(&other.join("f"))],
        )
        .unwrap();
        let ok = |p: &Path| d.resolve("device", p.to_str().unwrap());
        assert_eq!(ok(&allowed.join("f")).unwrap(), allowed.join("f"));
        assert_eq!(ok(&allowed.join("in")).unwrap(), allowed.join("f"));
        assert_eq!(ok(&allowed.join("rel")).unwrap(), allowed.join("f"));
        assert_eq!(ok(&allowed.join("other")).unwrap(), other.join("f"));
        for p in [allowed.join("out"), allowed.join("up")] {
            let e = ok(&p).unwrap_err().to_string();
            assert!(
                e.contains("is a link to") && e.contains("not in the device allow list"),
                "{}: {e}",
                p.display()
            );
        }
        for p in [
            format!("{}/../outside/f", allowed.display()),
            format!("{}/up/f", allowed.display()),
            format!("{}/./f", allowed.display()),
            "allowed/f".to_string(),
        ] {
            let e = d.resolve("device", &p).unwrap_err();
            assert!(
                matches!(
                    e,
                    WorkerError::InvalidArgument {
                        field: "device",
                        ..
                    }
                ),
                "{p}: {e}"
            );
        }
    }
}
