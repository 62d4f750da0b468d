//! The store's errors. Every error names the device (and where it helps the
//! chunk or byte offset) it is about, so a message read in a log at 3 a.m.
//! says what to look at.

use std::io;

/// Problems with the bytes of a COW device's header.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    #[error("bad magic {0:#010x}: not a dm-snapshot COW device (expected 0x70416e53 \"SnAp\")")]
    BadMagic(u32),
    #[error("unsupported on-disk version {0} (only version 1 exists)")]
    UnsupportedVersion(u32),
    #[error("invalid chunk size {0} sectors: must be a power of two from 8 to 1024")]
    ChunkSize(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The messages carry their cause, which is therefore not a `source()`
    // (a chain printed with `{:#}` would repeat it).
    #[error("{device}: {op} at byte {offset}: {cause}")]
    Io {
        device: String,
        op: &'static str,
        offset: u64,
        cause: io::Error,
    },
    #[error("{device}: cannot open: {cause}")]
    Open { device: String, cause: io::Error },
    #[error("{device}: {cause}")]
    Format { device: String, cause: FormatError },
    #[error("{device}: corrupt COW metadata: {detail} (run `cowsnap cow check` on it)")]
    Corrupt { device: String, detail: String },
    #[error(
        "{device}: the snapshot is invalid (overflowed or failed); its data cannot be read or written"
    )]
    SnapshotInvalid { device: String },
    #[error("{device}: I/O at byte {offset} length {len} is outside the device ({size} bytes)")]
    OutOfRange {
        device: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{device}: I/O at byte {offset} length {len} is not aligned to {align} bytes")]
    Misaligned {
        device: String,
        offset: u64,
        len: u64,
        align: u64,
    },
    #[error("{device}: {detail}")]
    Invalid { device: String, detail: String },
    #[error("no snapshot {0}")]
    NoSnapshot(u64),
    #[error("snapshot {0} is merging: {1}")]
    Merging(u64, &'static str),
    /// A write acknowledged before it was durable (write-back) did not
    /// reach the origin; reported by the next FLUSH or FUA write.
    #[error(
        "{device}: a write acknowledged earlier (byte {offset}, length {len}) did not reach the device: {detail}"
    )]
    WriteBack {
        device: String,
        offset: u64,
        len: u64,
        detail: String,
    },
    #[error("{device}: the device has been shut down")]
    Shutdown { device: String },
    /// The io_uring backend was asked for, and the kernel refused a ring
    /// (too old, or io_uring disabled by `kernel.io_uring_disabled` or a
    /// seccomp filter).
    #[error("io_uring backend requested but unavailable: {0}")]
    UringUnavailable(io::Error),
}

impl Error {
    /// The errno that best describes this error to a block client (NBD).
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { cause, .. } | Error::Open { cause, .. } => {
                cause.raw_os_error().unwrap_or(libc::EIO)
            }
            Error::OutOfRange { .. } | Error::Misaligned { .. } | Error::Invalid { .. } => {
                libc::EINVAL
            }
            Error::NoSnapshot(_) => libc::ENODEV,
            Error::Merging(..) => libc::EBUSY,
            Error::Shutdown { .. } => libc::ESHUTDOWN,
            _ => libc::EIO,
        }
    }
}

impl Error {
    /// The device (a server path for file-backed devices) the error is
    /// about.
    pub fn device(&self) -> Option<&str> {
        match self {
            Error::Io { device, .. }
            | Error::Open { device, .. }
            | Error::Format { device, .. }
            | Error::Corrupt { device, .. }
            | Error::SnapshotInvalid { device }
            | Error::OutOfRange { device, .. }
            | Error::Misaligned { device, .. }
            | Error::Invalid { device, .. }
            | Error::WriteBack { device, .. }
            | Error::Shutdown { device } => Some(device),
            Error::NoSnapshot(_) | Error::Merging(..) | Error::UringUnavailable(_) => None,
        }
    }

    /// The message for a client of the API or of an export: this error
    /// without its device, a server path that only the logs show (they get
    /// the `Display` form).
    pub fn client_message(&self) -> String {
        let full = self.to_string();
        match self.device().filter(|d| !d.is_empty()) {
            Some(d) => {
                let rest = full.strip_prefix(&format!("{d}: ")).unwrap_or(&full);
                rest.replace(d, "the device")
            }
            None => full,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_name_no_device() {
        let dev = "/var/lib/cowsnap/worker/devices/v1.s1.cow";
        let errors = [
            Error::Io {
                device: dev.into(),
                op: "read",
                offset: 512,
                cause: io::Error::from_raw_os_error(libc::EIO),
            },
            Error::SnapshotInvalid { device: dev.into() },
            Error::Invalid {
                device: dev.into(),
                detail: format!("commit failed, snapshot invalidated: {dev}: write at byte 0"),
            },
            Error::Shutdown { device: dev.into() },
        ];
        for e in errors {
            let m = e.client_message();
            assert!(e.to_string().contains(dev), "the log form keeps it");
            assert!(!m.contains("/var/lib"), "{m}");
            assert!(!m.is_empty());
        }
        assert_eq!(
            Error::SnapshotInvalid { device: dev.into() }.client_message(),
            "the snapshot is invalid (overflowed or failed); its data cannot be read or written"
        );
        assert_eq!(Error::NoSnapshot(3).client_message(), "no snapshot 3");
    }

    #[test]
    fn an_unavailable_io_uring_says_why_and_names_no_device() {
        let e = Error::UringUnavailable(io::Error::from_raw_os_error(libc::EPERM));
        assert!(e.device().is_none());
        assert_eq!(
            e.to_string(),
            format!(
                "io_uring backend requested but unavailable: {}",
                io::Error::from_raw_os_error(libc::EPERM)
            )
        );
        assert_eq!(e.client_message(), e.to_string());
    }
}
