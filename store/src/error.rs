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
    #[error("{device}: the device has been shut down")]
    Shutdown { device: String },
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

pub type Result<T, E = Error> = std::result::Result<T, E>;
