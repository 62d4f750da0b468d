//! Test harness: real workers and a real control service in this process
//! (data dirs under the target dir: `O_DIRECT` does not work on tmpfs), the
//! CSI endpoint on a real unix socket, and tonic clients of `csi.v1` that
//! connect to it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cowsnap_control::operations::CrashAt;
use cowsnap_control::server::{ControlConfig, RunningControl};
use cowsnap_csi::controller::Controller;
use cowsnap_csi::endpoint::{self, RunningCsi};
use cowsnap_csi::identity::Identity;
use cowsnap_proto::csi::v1 as csi;
use cowsnap_proto::server::Listen;
use cowsnap_worker::server::{RunningWorker, ServeOptions};
use cowsnap_worker::worker::WorkerConfig;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const MIB: u64 = 1 << 20;

/// A scratch directory under the target dir (on disk), removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// A data worker of node `node` in this process, NBD on a unix socket.
pub struct Worker {
    pub address: String,
    pub nbd_socket: PathBuf,
    running: RunningWorker,
    token: CancellationToken,
}

impl Worker {
    pub async fn start(dir: &Path, node: &str) -> Worker {
        let dir = dir.join(node);
        std::fs::create_dir_all(&dir).unwrap();
        let address = format!("unix:{}", dir.join("grpc.sock").display());
        let nbd_socket = dir.join("nbd.sock");
        let cfg = WorkerConfig {
            data_dir: dir.join("data"),
            node: node.to_string(),
            nbd_uri: String::new(),
            device_allow: Vec::new(),
            io: std::env::var("COWSNAP_IO")
                .unwrap_or_default()
                .parse()
                .unwrap(),
            writeback_cap: cowsnap_worker::worker::DEFAULT_WRITEBACK_CAP,
        };
        let opts = ServeOptions {
            grpc_listen: address.parse().unwrap(),
            nbd_listen: format!("unix:{}", nbd_socket.display()).parse().unwrap(),
            nbd_advertise: None,
            nbd_tls: None,
            nbd_limits: Default::default(),
            tls: None,
        };
        let token = CancellationToken::new();
        let running = cowsnap_worker::server::start(cfg, opts, token.clone())
            .await
            .unwrap();
        Worker {
            address,
            nbd_socket,
            running,
            token,
        }
    }

    pub async fn stop(self) {
        self.token.cancel();
        self.running.wait().await.unwrap();
    }

    /// The NBD URI of an export (`volumes/V` or `volumes/V/snapshots/S`).
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_socket.display())
    }
}

/// The control service and its CSI endpoint, in this process.
pub struct Stack {
    pub dir: PathBuf,
    pub cfg: ControlConfig,
    pub control: Option<(RunningControl, CancellationToken)>,
    pub csi: Option<RunningCsi>,
    pub socket: PathBuf,
}

impl Stack {
    pub async fn start(dir: &Path, workers: &[&Worker], crash_at: Option<CrashAt>) -> Stack {
        let mut cfg = ControlConfig::new(dir.join("control"), Listen::Tcp("127.0.0.1:0".into()));
        cfg.workers = workers.iter().map(|w| w.address.clone()).collect();
        cfg.worker_timeout = Duration::from_secs(20);
        cfg.reconcile_interval = Duration::from_secs(3600);
        cfg.health_interval = Duration::from_secs(3600);
        cfg.crash_at = crash_at;
        let mut s = Stack {
            dir: dir.to_path_buf(),
            cfg,
            control: None,
            csi: None,
            socket: dir.join("csi").join("csi.sock"),
        };
        s.boot().await;
        s
    }

    async fn boot(&mut self) {
        let token = CancellationToken::new();
        let r = cowsnap_control::server::start(self.cfg.clone(), token.clone())
            .await
            .unwrap();
        let bound = endpoint::bind(&format!("unix://{}", self.socket.display())).unwrap();
        let router = endpoint::router(
            Identity::new(Some(r.control.clone())),
            Some(Controller::new(r.control.clone())),
        );
        self.csi = Some(bound.serve(router, token.child_token()).unwrap());
        self.control = Some((r, token));
    }

    pub async fn stop(&mut self) {
        let (r, token) = self.control.take().expect("running");
        token.cancel();
        self.csi.take().unwrap().wait().await.unwrap();
        r.wait().await.unwrap();
    }

    /// Stops it and starts it again on the same catalog, with `crash_at`.
    pub async fn restart(&mut self, crash_at: Option<CrashAt>) {
        self.stop().await;
        self.cfg.crash_at = crash_at;
        self.boot().await;
    }

    pub fn control(&self) -> &cowsnap_control::control::Control {
        &self.control.as_ref().unwrap().0.control
    }

    pub async fn channel(&self) -> Channel {
        connect(&self.socket).await
    }

    pub async fn controller(&self) -> csi::controller_client::ControllerClient<Channel> {
        csi::controller_client::ControllerClient::new(self.channel().await)
    }

    pub async fn identity(&self) -> csi::identity_client::IdentityClient<Channel> {
        csi::identity_client::IdentityClient::new(self.channel().await)
    }
}

/// A channel to a unix socket.
pub async fn connect(path: &Path) -> Channel {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://csi.test")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// A single-node-writer capability, mount (with `fs`) or block.
pub fn capability(mount_fs: Option<&str>) -> csi::VolumeCapability {
    use csi::volume_capability::{
        AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
    };
    csi::VolumeCapability {
        access_type: Some(match mount_fs {
            Some(fs) => AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            }),
            None => AccessType::Block(BlockVolume {}),
        }),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

/// A CreateVolume request for `name` of exactly `size` bytes.
pub fn create_request(name: &str, size: u64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size as i64,
            limit_bytes: size as i64,
        }),
        volume_capabilities: vec![capability(Some("ext4"))],
        ..Default::default()
    }
}

/// Runs `qemu-io` on an NBD URI with one command; its output.
pub fn qemu_io(uri: &str, cmd: &str) -> String {
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, uri])
        .output()
        .expect("qemu-io runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io {cmd} on {uri}: {text}");
    assert!(
        !text.contains("Pattern verification failed"),
        "{cmd} on {uri}: {text}"
    );
    assert!(!text.contains("failed"), "{cmd} on {uri}: {text}");
    text
}
