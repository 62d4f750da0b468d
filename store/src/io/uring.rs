//! The io_uring backend: one ring driven by the engine's own thread.
//!
//! Callers on any thread push requests into a queue and, when the ring
//! thread is asleep in `io_uring_enter`, wake it through an eventfd whose read
//! is always armed in the ring. The ring thread moves requests into the
//! submission queue, reaps completions, resubmits the rest of a short
//! transfer, and completes each request through its channel. Buffers stay
//! owned by the in-flight request until the kernel is done with them.
//!
//! The durability operations (`fdatasync` and `RWF_DSYNC` writes) do not go
//! through the ring: io_uring punts them to its worker threads and, on a
//! disk without FUA, completes a DSYNC write through one more workqueue hop
//! (measured here: 3.7 ms per 16 KiB DSYNC write through the ring, 1.5-1.8
//! ms as a `pwritev2` on a thread). They run on a small thread pool of the
//! portable backend instead; reads and plain writes stay on the ring.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use io_uring::{IoUring, opcode, squeue, types};

use super::portable::{Pool, PortableFile};
use super::{DeviceIo, Op, Request};

/// Threads for the durability operations (a commit issues one flush and one
/// DSYNC write at a time per COW device).
const SYNC_THREADS: usize = 8;

const RING_ENTRIES: u32 = 256;
const WAKE: u64 = u64::MAX;

struct Shared {
    queue: Mutex<VecDeque<(Arc<File>, Request)>>,
    wake_fd: OwnedFd,
    sleeping: AtomicBool,
    closed: AtomicBool,
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe {
            libc::write(self.wake_fd.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }
}

/// Closes the ring when the last user handle goes away.
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.wake();
    }
}

/// A running ring thread. Cheap to clone.
#[derive(Clone)]
pub struct Ring {
    handle: Arc<Handle>,
    sync_pool: Pool,
}

impl Ring {
    /// Sets up a ring and its thread; fails where io_uring is unavailable
    /// (old kernel, seccomp, `io_uring_disabled`).
    pub fn start() -> io::Result<Ring> {
        // SAFETY: eventfd returns a new fd or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            // SAFETY: efd is a fresh fd we own.
            wake_fd: unsafe { OwnedFd::from_raw_fd(efd) },
            sleeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let s = shared.clone();
        // The ring is made on its thread: with `SINGLE_ISSUER` only the
        // thread that made it may submit.
        let (made_tx, made_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("cowsnap-uring".into())
            .spawn(move || match new_ring() {
                Ok(ring) => {
                    let _ = made_tx.send(Ok(()));
                    run(ring, s)
                }
                Err(e) => {
                    let _ = made_tx.send(Err(e));
                }
            })?;
        made_rx
            .recv()
            .map_err(|_| io::Error::other("the io_uring thread ended at start"))??;
        Ok(Ring {
            handle: Arc::new(Handle { shared }),
            sync_pool: Pool::with_threads(SYNC_THREADS),
        })
    }

    pub(super) fn file(&self, file: Arc<File>) -> UringFile {
        UringFile {
            sync: self.sync_pool.file(file.clone()),
            file,
            ring: self.handle.clone(),
        }
    }
}

/// A ring for the calling thread, which alone submits to it and reaps it:
/// `SINGLE_ISSUER` and `DEFER_TASKRUN` (Linux 6.1) let the kernel run the
/// completion work only when that thread waits for completions, instead of
/// interrupting it for each one; `COOP_TASKRUN` (5.19) is the fallback, a
/// plain ring the last resort. Fails where io_uring is unavailable, or lacks
/// an opcode we use.
fn new_ring() -> io::Result<IoUring> {
    // `TASKRUN_FLAG`: the kernel says when completion work waits, so that a
    // submission that does not wait (`submit_and_wait(0)`) runs it too.
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .build(RING_ENTRIES)
        .or_else(|_| {
            IoUring::builder()
                .setup_coop_taskrun()
                .setup_taskrun_flag()
                .build(RING_ENTRIES)
        })
        .or_else(|_| IoUring::new(RING_ENTRIES))?;
    // Probe that the opcodes we need exist (Read/Write need Linux 5.6).
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::Read::CODE, "read"),
        (opcode::Write::CODE, "write"),
        (opcode::Fsync::CODE, "fsync"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks the {name} opcode"),
            ));
        }
    }
    Ok(ring)
}

pub struct UringFile {
    file: Arc<File>,
    ring: Arc<Handle>,
    sync: PortableFile,
}

impl DeviceIo for UringFile {
    fn submit(&self, req: Request) {
        if matches!(req.op, Op::Flush | Op::Write { dsync: true }) {
            return self.sync.submit(req);
        }
        let shared = &self.ring.shared;
        shared
            .queue
            .lock()
            .expect("uring queue")
            .push_back((self.file.clone(), req));
        if shared.sleeping.swap(false, Ordering::SeqCst) {
            shared.wake();
        }
    }
}

/// A request in the ring, and how much of it is done.
struct InFlight {
    file: Arc<File>,
    req: Request,
    done: usize,
}

fn sqe_for(f: &InFlight) -> squeue::Entry {
    let fd = types::Fd(f.file.as_raw_fd());
    let off = f.req.offset + f.done as u64;
    match f.req.op {
        Op::Flush => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        Op::Read => {
            let buf = f.req.buf.as_ref().expect("read has a buffer");
            // SAFETY (for the kernel's later use): the buffer lives in the
            // in-flight slot until the completion is reaped.
            let ptr = unsafe { buf.as_ptr().add(f.done) } as *mut u8;
            opcode::Read::new(fd, ptr, (buf.len() - f.done) as u32)
                .offset(off)
                .build()
        }
        Op::Write { dsync } => {
            let buf = f.req.buf.as_ref().expect("write has a buffer");
            let ptr = unsafe { buf.as_ptr().add(f.done) };
            opcode::Write::new(fd, ptr, (buf.len() - f.done) as u32)
                .offset(off)
                .rw_flags(if dsync { libc::RWF_DSYNC } else { 0 })
                .build()
        }
    }
}

fn run(mut ring: IoUring, shared: Arc<Shared>) {
    let mut slots: Vec<Option<InFlight>> = Vec::new();
    // Reused on every turn of the loop.
    let mut new: Vec<(Arc<File>, Request)> = Vec::new();
    let mut cqes: Vec<(u64, i32)> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut backlog: VecDeque<usize> = VecDeque::new();
    let mut in_ring = 0usize;
    let mut wake_buf = [0u8; 8];
    let wake_fd: RawFd = shared.wake_fd.as_raw_fd();
    let arm_wake = |ring: &mut IoUring, buf: &mut [u8; 8]| {
        let e = opcode::Read::new(types::Fd(wake_fd), buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE);
        // SAFETY: buf lives for the whole loop (it is a local of `run`).
        unsafe {
            ring.submission()
                .push(&e)
                .expect("ring has room for the wake read")
        };
    };
    arm_wake(&mut ring, &mut wake_buf);

    loop {
        // Take new requests.
        new.extend(shared.queue.lock().expect("uring queue").drain(..));
        for (file, req) in new.drain(..) {
            let f = InFlight { file, req, done: 0 };
            let idx = match free.pop() {
                Some(i) => {
                    slots[i] = Some(f);
                    i
                }
                None => {
                    slots.push(Some(f));
                    slots.len() - 1
                }
            };
            backlog.push_back(idx);
        }
        // Move as many as fit into the submission queue (one slot stays for
        // re-arming the wake read).
        while in_ring + 2 < RING_ENTRIES as usize {
            let Some(idx) = backlog.pop_front() else {
                break;
            };
            let e = sqe_for(slots[idx].as_ref().expect("slot in use")).user_data(idx as u64);
            // SAFETY: the buffer is owned by slots[idx] until completion.
            unsafe { ring.submission().push(&e).expect("checked room") };
            in_ring += 1;
        }

        if shared.closed.load(Ordering::SeqCst) && in_ring == 0 && backlog.is_empty() {
            let q = shared.queue.lock().expect("uring queue");
            if q.is_empty() {
                return;
            }
            continue;
        }

        // Sleep only when nothing new has arrived since we looked.
        shared.sleeping.store(true, Ordering::SeqCst);
        let nothing_new = shared.queue.lock().expect("uring queue").is_empty();
        let want = if nothing_new && !shared.closed.load(Ordering::SeqCst) {
            1
        } else {
            0
        };
        match ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::EINTR)
                    || e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => panic!("io_uring_enter failed: {e}"),
        }
        shared.sleeping.store(false, Ordering::SeqCst);

        cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for (ud, res) in cqes.drain(..) {
            if ud == WAKE {
                arm_wake(&mut ring, &mut wake_buf);
                continue;
            }
            in_ring -= 1;
            let idx = ud as usize;
            let f = slots[idx].as_mut().expect("completion for a live slot");
            let result = if res < 0 {
                let e = io::Error::from_raw_os_error(-res);
                if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EAGAIN) {
                    backlog.push_back(idx);
                    continue;
                }
                Err(e)
            } else {
                let len = f.req.buf.as_ref().map_or(0, |b| b.len());
                f.done += res as usize;
                if f.req.op != Op::Flush && f.done < len {
                    if res == 0 {
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "short transfer at the end of the device",
                        ))
                    } else {
                        backlog.push_back(idx);
                        continue;
                    }
                } else {
                    Ok(())
                }
            };
            let f = slots[idx].take().expect("live slot");
            free.push(idx);
            f.req.complete(result);
        }
    }
}
