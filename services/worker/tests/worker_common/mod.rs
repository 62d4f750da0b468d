//! Helpers for the worker's API tests: a worker running in-process on real
//! sockets over a data dir on disk (`O_DIRECT` does not work on tmpfs), a
//! gRPC client to it, and deterministic data.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cowsnap_store::BackendChoice;
use cowsnap_worker::nbd::LocalAddr;
use cowsnap_worker::server::{RunningWorker, ServeOptions, start};
use cowsnap_worker::worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

pub use cowsnap_proto::worker::v1 as pb;

pub type Client = pb::worker_service_client::WorkerServiceClient<tonic::transport::Channel>;

pub const MIB: u64 = 1 << 20;

/// A scratch directory under the target dir, removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// Deterministic bytes (splitmix64).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed ^ 0x5851_f42d_4c95_7f2d;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The backend the suite runs on (`COWSNAP_IO`, auto when unset).
pub fn io() -> BackendChoice {
    std::env::var("COWSNAP_IO")
        .unwrap_or_default()
        .parse()
        .unwrap()
}

/// A worker running in this process.
pub struct Worker {
    pub data_dir: PathBuf,
    pub grpc: String,
    pub nbd: SocketAddr,
    shutdown: CancellationToken,
    running: Option<RunningWorker>,
}

impl Worker {
    /// Starts a worker on `data_dir` (gRPC and NBD on free loopback ports).
    pub async fn start(data_dir: &Path, device_allow: &[&str]) -> Worker {
        let shutdown = CancellationToken::new();
        let cfg = WorkerConfig {
            data_dir: data_dir.to_path_buf(),
            node: "test-node".into(),
            nbd_uri: String::new(),
            device_allow: device_allow.iter().map(|s| s.to_string()).collect(),
            io: io(),
            writeback_cap: cowsnap_worker::worker::DEFAULT_WRITEBACK_CAP,
        };
        let opts = ServeOptions {
            grpc_listen: "127.0.0.1:0".parse().unwrap(),
            nbd_listen: "127.0.0.1:0".parse().unwrap(),
            nbd_advertise: None,
            nbd_tls: None,
            tls: None,
            nbd_limits: Default::default(),
        };
        let running = start(cfg, opts, shutdown.clone()).await.unwrap();
        let nbd = match &running.nbd {
            LocalAddr::Tcp(a) => *a,
            LocalAddr::Unix(_) => unreachable!("tests listen on TCP"),
        };
        Worker {
            data_dir: data_dir.to_path_buf(),
            grpc: format!("http://{}", running.grpc),
            nbd,
            shutdown,
            running: Some(running),
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.grpc.clone()).await.unwrap()
    }

    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd)
    }

    pub fn engine(&self) -> &std::sync::Arc<cowsnap_worker::worker::Worker> {
        &self.running.as_ref().unwrap().worker
    }

    /// Stops it as SIGTERM would: waits until everything is flushed.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(r) = self.running.take() {
            r.wait().await.unwrap();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn create_volume(c: &mut Client, id: &str, size: u64, chunk: u32) -> pb::Volume {
    c.create_volume(pb::CreateVolumeRequest {
        volume_id: id.into(),
        size_bytes: size,
        chunk_sectors: chunk,
        device: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("create volume {id}: {e}"))
    .into_inner()
}

pub async fn create_snapshot(c: &mut Client, vol: &str, id: &str, cow: u64) -> pb::Snapshot {
    c.create_snapshot(pb::CreateSnapshotRequest {
        parent: format!("volumes/{vol}"),
        snapshot_id: id.into(),
        cow_size_bytes: cow,
        chunk_sectors: 0,
        device: String::new(),
        writable: false,
    })
    .await
    .unwrap_or_else(|e| panic!("create snapshot {vol}/{id}: {e}"))
    .into_inner()
}

/// Waits for a task to finish; panics if it failed.
pub async fn wait_task(c: &mut Client, name: &str) -> pb::Task {
    loop {
        let t = c
            .wait_task(pb::WaitTaskRequest {
                name: name.into(),
                timeout_ms: 60_000,
            })
            .await
            .unwrap()
            .into_inner();
        if t.done {
            assert!(t.error.is_empty(), "task {name} failed: {}", t.error);
            return t;
        }
    }
}

/// Runs a real client tool; returns its stdout, panicking with its output
/// when it fails.
pub fn tool(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} not runnable ({e}): install qemu-utils and libnbd-bin")
        });
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Reads a whole export with `qemu-img convert` into `out` and returns it.
pub fn export_image(uri: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    tool(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            uri,
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}
