//! Block I/O for the engine: `O_DIRECT` devices (raw block devices or regular
//! files), aligned buffers, and the backends that carry the I/O.
//!
//! The backends sit side by side behind one small trait, [`DeviceIo`]:
//! - [`uring`]: io_uring, driven from the engine's own thread;
//! - [`portable`]: `pread`/`pwritev2`/`fdatasync` on a thread pool, for hosts
//!   whose seccomp profile blocks io_uring;
//! - [`fault`]: for tests, a layer that keeps unflushed writes volatile so a
//!   power cut can drop any subset of them, and that fails chosen I/O with EIO.
//!
//! Durability vocabulary (M2, M3 of docs/design.md): `flush` is `fdatasync` (the kernel's
//! PREFLUSH); a write with `dsync` is `RWF_DSYNC` (FUA on a block device);
//! `flush_write` is both in one request, the flush first (the kernel's
//! `REQ_PREFLUSH | REQ_FUA`, how dm-snapshot writes a metadata area; M5).

pub mod aligned;
pub mod fault;
pub mod portable;
pub mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::oneshot;

pub use aligned::{AlignedBuf, AllocError};

use crate::error::{Error, Result};

/// What a request asks of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    /// `dsync`: durable when it completes (`RWF_DSYNC`, FUA).
    Write {
        dsync: bool,
    },
    /// Every completed write is durable when this completes (`fdatasync`).
    Flush,
    /// A flush, then a `dsync` write that starts only once the flush has
    /// completed, as one request: every write completed before it is
    /// submitted is durable before this write reaches the device, and this
    /// write is durable when it completes (M5 of docs/design.md). How each
    /// backend carries it (one linked pair, or two steps) is beside its
    /// `submit`.
    FlushWrite,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write { dsync: false } => "write",
            Op::Write { dsync: true } => "write (dsync)",
            Op::Flush => "flush",
            Op::FlushWrite => "flush + write (dsync)",
        }
    }
}

/// One I/O handed to a backend. The buffer travels with the request and
/// comes back in the [`Completion`].
pub struct Request {
    pub op: Op,
    pub offset: u64,
    pub buf: Option<AlignedBuf>,
    pub done: oneshot::Sender<Completion>,
}

pub struct Completion {
    pub buf: Option<AlignedBuf>,
    pub result: io::Result<()>,
}

impl Request {
    /// Completes the request (a dropped receiver is fine: nobody waits).
    pub fn complete(self, result: io::Result<()>) {
        let _ = self.done.send(Completion {
            buf: self.buf,
            result,
        });
    }
}

/// The one interface every backend implements: take a request, complete it
/// later (from any thread) through its `done` channel.
pub trait DeviceIo: Send + Sync {
    fn submit(&self, req: Request);
}

/// An open device: a raw block device or a regular file, opened `O_DIRECT`.
/// Cheap to clone.
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
}

struct DeviceInner {
    name: String,
    io: Arc<dyn DeviceIo>,
    /// Only grows ([`Device::grow`]).
    size: AtomicU64,
    block_size: u64,
    writable: bool,
}

impl Device {
    /// Wraps a backend's device. `block_size` is the logical block size every
    /// I/O must be aligned to.
    pub fn new(
        name: String,
        io: Box<dyn DeviceIo>,
        size: u64,
        block_size: u64,
        writable: bool,
    ) -> Device {
        Device {
            inner: Arc::new(DeviceInner {
                name,
                io: Arc::from(io),
                size: AtomicU64::new(size),
                block_size,
                writable,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// A view of the first `size` bytes of this device (a raw device larger
    /// than the volume or COW it holds). The view is a device of its own.
    pub fn truncated(&self, size: u64) -> Device {
        Device {
            inner: Arc::new(DeviceInner {
                name: self.inner.name.clone(),
                io: self.inner.io.clone(),
                size: AtomicU64::new(size.min(self.size())),
                block_size: self.inner.block_size,
                writable: self.inner.writable,
            }),
        }
    }

    /// Whether both handles are the same open device.
    pub fn same(&self, other: &Device) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    /// Lets I/O reach `size` bytes (every handle of this device sees it).
    /// The caller has made the device itself at least that large (a file
    /// extended, a raw device checked); never shrinks.
    pub fn grow(&self, size: u64) {
        self.inner.size.fetch_max(size, Ordering::AcqRel);
    }

    /// Logical block size: offsets and lengths of every I/O are multiples.
    pub fn block_size(&self) -> u64 {
        self.inner.block_size
    }

    pub fn writable(&self) -> bool {
        self.inner.writable
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        let bs = self.inner.block_size;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(Error::Misaligned {
                device: self.inner.name.clone(),
                offset,
                len,
                align: bs,
            });
        }
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange {
                device: self.inner.name.clone(),
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    async fn run(
        &self,
        op: Op,
        offset: u64,
        buf: Option<AlignedBuf>,
    ) -> Result<Option<AlignedBuf>> {
        let (tx, rx) = oneshot::channel();
        self.inner.io.submit(Request {
            op,
            offset,
            buf,
            done: tx,
        });
        let c = rx.await.map_err(|_| Error::Io {
            device: self.inner.name.clone(),
            op: op.name(),
            offset,
            cause: io::Error::other("I/O backend stopped"),
        })?;
        c.result.map_err(|cause| Error::Io {
            device: self.inner.name.clone(),
            op: op.name(),
            offset,
            cause,
        })?;
        Ok(c.buf)
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    pub async fn read_into(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf> {
        self.check(offset, buf.len() as u64)?;
        Ok(self
            .run(Op::Read, offset, Some(buf))
            .await?
            .expect("read returns its buffer"))
    }

    /// Reads `len` bytes at `offset`. A buffer the allocator cannot give is
    /// an `ENOMEM` I/O error, not an abort: the length may come from a
    /// client.
    pub async fn read(&self, offset: u64, len: usize) -> Result<AlignedBuf> {
        self.check(offset, len as u64)?;
        let buf = self.buffer(offset, len)?;
        self.read_into(offset, buf).await
    }

    /// A buffer of `len` bytes for reads at `offset` that fill it whole
    /// (a read either fills its buffer or fails:
    /// [`AlignedBuf::for_overwrite`]), or an `ENOMEM` error naming this
    /// device.
    pub fn buffer(&self, offset: u64, len: usize) -> Result<AlignedBuf> {
        AlignedBuf::try_for_overwrite(len).map_err(|e| Error::Io {
            device: self.inner.name.clone(),
            op: "read",
            offset,
            cause: e.into(),
        })
    }

    /// Writes `buf` at `offset`; with `dsync` the data is durable on return.
    /// Gives the buffer back.
    pub async fn write(&self, offset: u64, buf: AlignedBuf, dsync: bool) -> Result<AlignedBuf> {
        self.check(offset, buf.len() as u64)?;
        if !self.inner.writable {
            return Err(Error::Io {
                device: self.inner.name.clone(),
                op: "write",
                offset,
                cause: io::Error::from_raw_os_error(libc::EROFS),
            });
        }
        Ok(self
            .run(Op::Write { dsync }, offset, Some(buf))
            .await?
            .expect("write returns its buffer"))
    }

    /// Makes every completed write durable, then writes `buf` at `offset`
    /// durably, as one request ([`Op::FlushWrite`]): a commit's area write.
    /// Gives the buffer back.
    pub async fn flush_write(&self, offset: u64, buf: AlignedBuf) -> Result<AlignedBuf> {
        self.check(offset, buf.len() as u64)?;
        if !self.inner.writable {
            return Err(Error::Io {
                device: self.inner.name.clone(),
                op: Op::FlushWrite.name(),
                offset,
                cause: io::Error::from_raw_os_error(libc::EROFS),
            });
        }
        Ok(self
            .run(Op::FlushWrite, offset, Some(buf))
            .await?
            .expect("write returns its buffer"))
    }

    /// Makes every completed write durable.
    pub async fn flush(&self) -> Result<()> {
        self.run(Op::Flush, 0, None).await.map(|_| ())
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({}, {} bytes)", self.inner.name, self.size())
    }
}

/// Which backend to use, as asked for on the command line or in
/// `COWSNAP_IO`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring when the kernel lets us, the portable backend otherwise.
    #[default]
    Auto,
    Uring,
    Portable,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" | "" => Ok(BackendChoice::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(BackendChoice::Uring),
            "portable" | "sync" => Ok(BackendChoice::Portable),
            other => Err(format!(
                "unknown I/O backend {other:?}: expected auto, uring or portable"
            )),
        }
    }
}

/// A running backend: the thread(s) that carry I/O for every device opened
/// through it. Cheap to clone; the threads stop when the last clone and the
/// last device opened through it are gone.
#[derive(Clone)]
pub enum Backend {
    Uring(uring::Ring),
    Portable(portable::Pool),
}

impl Backend {
    /// Starts the backend `choice` names, logging which one runs and why.
    pub fn start(choice: BackendChoice) -> Result<Backend> {
        match choice {
            BackendChoice::Portable => {
                tracing::info!(
                    backend = "portable",
                    "I/O backend: portable (pread/pwritev2 thread pool), as configured"
                );
                Ok(Backend::Portable(portable::Pool::start()))
            }
            BackendChoice::Uring => match uring::Ring::start() {
                Ok(r) => {
                    tracing::info!(backend = "io_uring", "I/O backend: io_uring, as configured");
                    Ok(Backend::Uring(r))
                }
                Err(e) => Err(Error::UringUnavailable(e)),
            },
            BackendChoice::Auto => match uring::Ring::start() {
                Ok(r) => {
                    tracing::info!(
                        backend = "io_uring",
                        "I/O backend: io_uring (the kernel allows it)"
                    );
                    Ok(Backend::Uring(r))
                }
                Err(e) => {
                    tracing::warn!(backend = "portable", error = %e, "I/O backend: portable, because io_uring is unavailable ({e})");
                    Ok(Backend::Portable(portable::Pool::start()))
                }
            },
        }
    }

    /// The backend named by `COWSNAP_IO` (auto when unset). Panics on a bad
    /// value: for tests and tools that have no other configuration.
    pub fn from_env() -> Backend {
        let choice = std::env::var("COWSNAP_IO")
            .unwrap_or_default()
            .parse()
            .unwrap_or_else(|e| panic!("COWSNAP_IO: {e}"));
        Backend::start(choice).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Uring(_) => "io_uring",
            Backend::Portable(_) => "portable",
        }
    }

    /// Opens `path` with `O_DIRECT`, read-only or read-write.
    pub fn open(&self, path: &Path, writable: bool) -> Result<Device> {
        self.open_as(path, writable, None)
    }

    /// As [`Backend::open`], with io_uring's form of a flush + write
    /// chosen (`Some(true)`: the linked pair) instead of asked of the disk
    /// ([`uring::linked_pair_fits`]), for tests and benches of both forms.
    /// The portable backend has one form only.
    pub fn open_as(&self, path: &Path, writable: bool, linked: Option<bool>) -> Result<Device> {
        let name = path.display().to_string();
        let (file, size, block_size) = open_direct(path, writable)?;
        let io: Box<dyn DeviceIo> = match self {
            Backend::Uring(r) => {
                let linked = linked.unwrap_or_else(|| uring::linked_pair_fits(&file));
                Box::new(r.file(file, linked))
            }
            Backend::Portable(p) => Box::new(p.file(file)),
        };
        Ok(Device::new(name, io, size, block_size, writable))
    }
}

/// Opens `path` with `O_DIRECT` and reads its size and logical block size.
pub fn open_direct(path: &Path, writable: bool) -> Result<(Arc<File>, u64, u64)> {
    let name = path.display().to_string();
    let open_err = |cause: io::Error| Error::Open {
        device: name.clone(),
        cause,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            let direct_refused = e.raw_os_error() == Some(libc::EINVAL)
                && std::fs::metadata(path).is_ok_and(|m| m.file_type().is_file());
            if direct_refused {
                open_err(io::Error::new(
                    e.kind(),
                    "O_DIRECT is not supported here (tmpfs?); use a block device or a file on a disk file system",
                ))
            } else {
                open_err(e)
            }
        })?;
    let meta = file.metadata().map_err(open_err)?;
    let ft = meta.file_type();
    let (size, block_size) = if ft.is_block_device() {
        (
            block_device_size(&file).map_err(open_err)?,
            block_device_logical_block_size(&file).map_err(open_err)?,
        )
    } else if ft.is_file() {
        (meta.len(), file_dio_alignment(&file).unwrap_or(512))
    } else {
        return Err(open_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a block device or a regular file",
        )));
    };
    Ok((Arc::new(file), size, block_size))
}

fn block_device_size(file: &File) -> io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn block_device_logical_block_size(file: &File) -> io::Result<u64> {
    const BLKSSZGET: libc::c_ulong = 0x1268;
    let mut bs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut bs) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(bs.max(512) as u64)
}

/// The file system's `O_DIRECT` offset alignment for a regular file (statx
/// `STATX_DIOALIGN`, Linux 6.1+), at least 512.
fn file_dio_alignment(file: &File) -> Option<u64> {
    // SAFETY: statx fills the zeroed struct; an empty path with AT_EMPTY_PATH
    // names the fd itself.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r != 0 || st.stx_mask & libc::STATX_DIOALIGN == 0 || st.stx_dio_offset_align == 0 {
        return None;
    }
    Some(u64::from(st.stx_dio_offset_align).max(512))
}

/// Runs one request synchronously on `fd` with plain syscalls: the portable
/// backend's worker threads and the fault layer's durable half both use it.
pub(crate) fn execute_sync(
    file: &File,
    op: Op,
    offset: u64,
    buf: Option<&mut AlignedBuf>,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    match op {
        // Two syscalls: pwritev2 has no preflush flag. The write is issued
        // only once fdatasync has returned (M2), so the order holds.
        Op::FlushWrite => {
            execute_sync(file, Op::Flush, offset, None)?;
            execute_sync(file, Op::Write { dsync: true }, offset, buf)
        }
        Op::Flush => {
            // SAFETY: plain syscall on a valid fd.
            if unsafe { libc::fdatasync(fd) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        Op::Read => {
            let buf = buf.expect("read has a buffer");
            let mut done = 0usize;
            while done < buf.len() {
                // SAFETY: the range lies inside buf.
                let n = unsafe {
                    libc::pread(
                        fd,
                        buf.as_mut_ptr().add(done).cast(),
                        buf.len() - done,
                        (offset + done as u64) as libc::off_t,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "read past the end of the device",
                    ));
                }
                done += n as usize;
            }
            Ok(())
        }
        Op::Write { dsync } => {
            let buf = buf.expect("write has a buffer");
            let flags = if dsync { libc::RWF_DSYNC } else { 0 };
            let mut done = 0usize;
            while done < buf.len() {
                let iov = libc::iovec {
                    // SAFETY: the range lies inside buf.
                    iov_base: unsafe { buf.as_ptr().add(done) } as *mut libc::c_void,
                    iov_len: buf.len() - done,
                };
                // SAFETY: one valid iovec.
                let n = unsafe {
                    libc::pwritev2(fd, &iov, 1, (offset + done as u64) as libc::off_t, flags)
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "device accepted no bytes",
                    ));
                }
                done += n as usize;
            }
            Ok(())
        }
    }
}
