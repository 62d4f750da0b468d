//! The portable backend: `pread`, `pwritev2` (with `RWF_DSYNC`) and
//! `fdatasync` on a pool of threads. Works wherever `O_DIRECT` does, including
//! hosts whose seccomp profile refuses io_uring.
//!
//! A flush + write ([`super::Op::FlushWrite`]) is one job on one thread but
//! two syscalls, `fdatasync` and then `pwritev2(RWF_DSYNC)`: no syscall
//! carries a preflush, and the write must not be issued before the flush
//! has returned (M2). It still saves the caller a second trip through the
//! pool's queue.

use std::fs::File;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, unbounded};

use super::{DeviceIo, Request, execute_sync};

/// Threads in the pool: enough to keep a queue depth of 32 per client and the
/// engine's copies in flight at once.
const THREADS: usize = 64;

type Job = (Arc<File>, Request);

/// The thread pool. The threads exit when every handle (and every device
/// opened through it) is dropped.
#[derive(Clone)]
pub struct Pool {
    tx: Sender<Job>,
}

impl Pool {
    pub fn start() -> Pool {
        Pool::with_threads(THREADS)
    }

    pub fn with_threads(threads: usize) -> Pool {
        let (tx, rx) = unbounded::<Job>();
        for i in 0..threads {
            let rx: Receiver<Job> = rx.clone();
            std::thread::Builder::new()
                .name(format!("cowsnap-io-{i}"))
                .spawn(move || {
                    while let Ok((file, mut req)) = rx.recv() {
                        let r = execute_sync(&file, req.op, req.offset, req.buf.as_mut());
                        req.complete(r);
                    }
                })
                .expect("spawn I/O thread");
        }
        Pool { tx }
    }

    pub fn file(&self, file: Arc<File>) -> PortableFile {
        PortableFile {
            file,
            tx: self.tx.clone(),
        }
    }
}

pub struct PortableFile {
    file: Arc<File>,
    tx: Sender<Job>,
}

impl DeviceIo for PortableFile {
    fn submit(&self, req: Request) {
        if let Err(e) = self.tx.send((self.file.clone(), req)) {
            let (_, req) = e.into_inner();
            req.complete(Err(std::io::Error::other("I/O threads stopped")));
        }
    }
}
