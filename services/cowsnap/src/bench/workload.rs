//! The I/O patterns of the store benchmark and the driver that runs them. The
//! same operations, sizes and queue depth go either straight to a device
//! (through the engine's own backend) or through the COW engine, so the
//! baseline and the engine figure differ by the engine alone.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use cowsnap_store::{AlignedBuf, Device, Origin, Target};

/// Where a workload's I/O goes.
#[derive(Clone)]
pub enum IoPath {
    /// Straight to a device, through the same backend the engine uses.
    Raw(Device),
    /// Through the COW engine, to the origin or to one of its snapshots.
    Engine(Arc<Origin>, Target),
}

impl IoPath {
    async fn read(&self, off: u64, len: u64) -> cowsnap_store::Result<AlignedBuf> {
        match self {
            IoPath::Raw(d) => d.read(off, len as usize).await,
            IoPath::Engine(o, t) => o.read(*t, off, len).await,
        }
    }

    async fn write(&self, off: u64, buf: AlignedBuf) -> cowsnap_store::Result<()> {
        match self {
            IoPath::Raw(d) => d.write(off, buf, false).await.map(drop),
            IoPath::Engine(o, t) => o.write(*t, off, buf, false).await,
        }
    }

    /// FLUSH: every write acknowledged so far is durable on return.
    pub async fn flush(&self) -> cowsnap_store::Result<()> {
        match self {
            IoPath::Raw(d) => d.flush().await,
            IoPath::Engine(o, _) => o.flush().await,
        }
    }
}

/// What one timed run did.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub ops: u64,
    pub bytes: u64,
    pub secs: f64,
}

impl Run {
    /// Bandwidth in MB/s (10^6 bytes per second).
    pub fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.secs / 1e6
    }

    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

/// Runs operations `0..ops` with `depth` of them in flight, each on a tokio
/// task of the (multi-threaded) runtime, and times the whole. An operation
/// returns the bytes it moved. The i-th operation starts after the
/// (i-1)-th, so operations that map `i` to consecutive offsets make a
/// sequential stream at queue depth `depth`.
pub async fn drive<F, Fut>(depth: usize, ops: u64, op: F) -> anyhow::Result<Run>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<u64>> + Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let op = Arc::new(op);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..depth.max(1) {
        let (next, op) = (next.clone(), op.clone());
        tasks.spawn(async move {
            let mut bytes = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= ops {
                    return anyhow::Ok(bytes);
                }
                bytes += op(i).await?;
            }
        });
    }
    let mut bytes = 0u64;
    while let Some(r) = tasks.join_next().await {
        bytes += r.context("a benchmark task panicked")??;
    }
    Ok(Run {
        ops,
        bytes,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// Reads `[start, start + len)` in `io`-byte pieces, in order, `depth` at a time.
pub async fn seq_read(
    path: &IoPath,
    start: u64,
    len: u64,
    io: u64,
    depth: usize,
) -> anyhow::Result<Run> {
    let path = path.clone();
    drive(depth, len.div_ceil(io), move |i| {
        let path = path.clone();
        async move {
            let off = start + i * io;
            let n = io.min(start + len - off);
            path.read(off, n).await?;
            Ok(n)
        }
    })
    .await
}

/// Writes `data` over `[start, start + len)` in `io`-byte pieces, in order,
/// `depth` at a time. Each write gets a fresh buffer (as a client's would).
pub async fn seq_write(
    path: &IoPath,
    start: u64,
    len: u64,
    io: u64,
    depth: usize,
    data: &Arc<AlignedBuf>,
) -> anyhow::Result<Run> {
    let (path, data) = (path.clone(), data.clone());
    assert!(io as usize <= data.len(), "pattern shorter than one I/O");
    drive(depth, len.div_ceil(io), move |i| {
        let (path, data) = (path.clone(), data.clone());
        async move {
            let off = start + i * io;
            let n = io.min(start + len - off);
            path.write(off, AlignedBuf::from_slice(&data[..n as usize]))
                .await?;
            Ok(n)
        }
    })
    .await
}

/// `ops` writes of `io` bytes at pseudo-random `io`-aligned offsets of
/// `[0, len)`, `depth` at a time. The offset of operation `i` depends on
/// `seed + i` alone, so paths given the same seed see the same offsets.
pub async fn random_write(
    path: &IoPath,
    len: u64,
    io: u64,
    (ops, seed): (u64, u64),
    depth: usize,
    data: &Arc<AlignedBuf>,
) -> anyhow::Result<Run> {
    let (path, data) = (path.clone(), data.clone());
    let slots = len / io;
    drive(depth, ops, move |i| {
        let (path, data) = (path.clone(), data.clone());
        async move {
            let off = splitmix64(seed + i) % slots * io;
            path.write(off, AlignedBuf::from_slice(&data[..io as usize]))
                .await?;
            Ok(io)
        }
    })
    .await
}

/// Reads `io` bytes at each of `offsets`, in order, `depth` at a time.
pub async fn read_at(
    dev: &Device,
    offsets: Arc<Vec<u64>>,
    io: u64,
    depth: usize,
) -> anyhow::Result<Run> {
    let dev = dev.clone();
    drive(depth, offsets.len() as u64, move |i| {
        let (dev, off) = (dev.clone(), offsets[i as usize]);
        async move {
            dev.read(off, io as usize).await?;
            Ok(io)
        }
    })
    .await
}

/// Writes `data` (zeros when `None`) over the whole of `dev` in 1 MiB
/// pieces, 8 at a time, then flushes: every block of the file is allocated
/// and written before anything is measured on it.
pub async fn prewrite(dev: &Device, data: Option<&Arc<AlignedBuf>>) -> anyhow::Result<Run> {
    const IO: u64 = 1 << 20;
    let zeros = Arc::new(AlignedBuf::zeroed(IO as usize));
    let data = data.cloned().unwrap_or(zeros);
    let size = dev.size();
    let d = dev.clone();
    let mut run = drive(8, size.div_ceil(IO), move |i| {
        let (dev, data) = (d.clone(), data.clone());
        async move {
            let off = i * IO;
            let n = IO.min(size - off);
            dev.write(off, AlignedBuf::from_slice(&data[..n as usize]), false)
                .await?;
            Ok(n)
        }
    })
    .await?;
    let t = Instant::now();
    dev.flush().await?;
    run.secs += t.elapsed().as_secs_f64();
    Ok(run)
}

/// Mean latency, one request at a time, of the two durable steps of a
/// commit taken apart (`fdatasync` after a plain `io`-byte write, and an
/// `io`-byte `RWF_DSYNC` write) and of both as the one request a commit
/// issues (after a plain write, as in a commit). Writes zeros at `off`.
pub async fn durability_latency(
    dev: &Device,
    off: u64,
    io: u64,
    samples: u32,
) -> anyhow::Result<Durability> {
    let (mut flush, mut dsync, mut commit) = (0.0, 0.0, 0.0);
    for _ in 0..samples {
        dev.write(off, AlignedBuf::zeroed(io as usize), false)
            .await?;
        let t = Instant::now();
        dev.flush().await?;
        flush += t.elapsed().as_secs_f64();
        let t = Instant::now();
        dev.write(off, AlignedBuf::zeroed(io as usize), true)
            .await?;
        dsync += t.elapsed().as_secs_f64();
        dev.write(off, AlignedBuf::zeroed(io as usize), false)
            .await?;
        let t = Instant::now();
        dev.flush_write(off, AlignedBuf::zeroed(io as usize))
            .await?;
        commit += t.elapsed().as_secs_f64();
    }
    let n = f64::from(samples);
    Ok(Durability {
        flush_s: flush / n,
        dsync_s: dsync / n,
        commit_s: commit / n,
    })
}

/// Mean latencies (seconds) of the durability operations, one at a time.
#[derive(Clone, Copy, Debug)]
pub struct Durability {
    /// `fdatasync` after one plain write.
    pub flush_s: f64,
    /// One `RWF_DSYNC` write.
    pub dsync_s: f64,
    /// What a commit issues now: after one plain write, a flush + DSYNC
    /// write as one request (`Device::flush_write`).
    pub commit_s: f64,
}

/// Deterministic bytes that are not all alike (splitmix64 of the position).
pub fn pattern(len: usize, seed: u64) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    for (i, w) in b.chunks_mut(8).enumerate() {
        let x = splitmix64(seed ^ i as u64).to_le_bytes();
        w.copy_from_slice(&x[..w.len()]);
    }
    b
}

pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
