//! Devices for volumes and snapshots: which one a new volume or snapshot
//! goes on (a raw device from the allow list, or a new sparse file when
//! there is room), how large, and opening, creating or zeroing them.

use std::path::{Path, PathBuf};

use cowsnap_store::Layout;

use super::Worker;
use crate::devices::{self, RawDevice};
use crate::error::{Result, WorkerError};
use crate::state::WorkerState;

/// The COW size that can never overflow: every data chunk of the volume,
/// its metadata areas, the header and the zeroed area after a full one.
pub(super) fn full_cow_bytes(size: u64, layout: Layout) -> u64 {
    let data = size.div_ceil(layout.chunk_bytes());
    let areas = data.div_ceil(layout.exceptions_per_area()) + 1;
    (1 + areas + data) * layout.chunk_bytes()
}

/// The volume or snapshot on raw device `d`, recorded under its path or
/// under another path to the same device (a link, another device node).
pub(super) fn raw_device_user(st: &WorkerState, d: &RawDevice) -> Option<String> {
    st.device_user(&d.path)
        .or_else(|| st.raw_device_user(|p| devices::rdev_of(p) == Some(d.rdev)))
}

/// Where a new volume or snapshot goes.
pub(super) struct Placement {
    pub path: PathBuf,
    /// A new file under the data dir, rather than a raw device.
    pub file_backed: bool,
    /// Its size: the size asked for, or a whole raw device's when 0 was.
    pub size: u64,
}

impl Worker {
    /// Opens a device with `O_DIRECT`, seen as its first `size` bytes. A raw
    /// device is held open meanwhile, to check that the path still named it,
    /// not through a link, once the engine opened it.
    pub(super) fn open_sized(
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

    /// The engine over a volume's device, `size` bytes of it, holding
    /// writes under the worker's shared write-back cap.
    pub(super) fn open_engine(
        &self,
        path: &Path,
        file_backed: bool,
        size: u64,
    ) -> Result<cowsnap_store::Origin> {
        let origin = cowsnap_store::Origin::new(self.open_sized(path, file_backed, size)?)?;
        origin.share_writeback_budget(self.writeback.clone());
        Ok(origin)
    }

    /// Creates (file) or zeroes (raw device) a device of `size` bytes.
    pub(super) fn prepare_device(&self, path: &Path, file_backed: bool, size: u64) -> Result<()> {
        if file_backed {
            self.devices.create_file(path, size)
        } else {
            self.devices.zero_raw(path, size)
        }
    }

    /// Bytes that file-backed devices may still claim beyond what they use
    /// (from figures read earlier, or with `fresh` read now: see
    /// [`crate::devices::Devices::unallocated`]).
    pub(super) fn committed_unallocated(&self, st: &WorkerState, fresh: bool) -> u64 {
        let files = st.volumes().values().flat_map(|v| {
            let snaps = v.snapshots.iter().filter(|s| s.file_backed);
            (v.file_backed.then_some((v.device.as_path(), v.size_bytes)))
                .into_iter()
                .chain(snaps.map(|s| (s.device.as_path(), s.cow_size_bytes)))
        });
        self.devices.unallocated(files, fresh)
    }

    /// RESOURCE_EXHAUSTED unless the data dir's file system has room for
    /// `bytes` more of file-backed devices, beyond what those there may
    /// still claim.
    pub(super) fn ensure_file_room(&self, st: &WorkerState, bytes: u64) -> Result<()> {
        let (_, free) = self.devices.fs_space()?;
        let mut room = free.saturating_sub(self.committed_unallocated(st, false));
        if bytes > room {
            // Older figures count less room than there may be: the
            // refusal stands only on figures read now.
            room = free.saturating_sub(self.committed_unallocated(st, true));
        }
        if bytes > room {
            tracing::warn!(
                data_dir = %self.cfg.data_dir.display(),
                "no room for {bytes} bytes: {room} bytes left"
            );
            return Err(WorkerError::ResourceExhausted(format!(
                "no room for {bytes} bytes on this worker: {room} bytes left"
            )));
        }
        Ok(())
    }

    /// The device path a create asks for: raw device `asked`, or the new
    /// `file` when none is (to compare with an existing record).
    pub(super) fn asked_device(&self, asked: &str, file: PathBuf) -> Result<PathBuf> {
        if asked.is_empty() {
            Ok(file)
        } else {
            self.devices.resolve("device", asked)
        }
    }

    /// Chooses the device of a new volume or snapshot: raw device `asked`
    /// from the allow list, or the new `file` when none is asked for.
    /// Checks room and sizes.
    pub(super) fn choose_device(
        &self,
        st: &WorkerState,
        asked: &str,
        file: PathBuf,
        size: u64,
    ) -> Result<Placement> {
        const FIELD: &str = "device";
        if asked.is_empty() {
            self.ensure_file_room(st, size)?;
            return Ok(Placement {
                path: file,
                file_backed: true,
                size,
            });
        }
        let raw = self.devices.check_raw(FIELD, asked)?;
        if let Some(user) = raw_device_user(st, &raw) {
            return Err(WorkerError::FailedPrecondition(format!(
                "{asked} is already used by {user}"
            )));
        }
        let size = if size == 0 { raw.size } else { size };
        if size > raw.size {
            return Err(WorkerError::invalid(
                FIELD,
                format!(
                    "{asked} has {} bytes, fewer than the {size} asked for",
                    raw.size
                ),
            ));
        }
        Ok(Placement {
            path: raw.path,
            file_backed: false,
            size,
        })
    }
}
