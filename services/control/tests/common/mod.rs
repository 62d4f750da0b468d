//! Test harness: real workers (in-process, on data dirs under the target
//! dir: `O_DIRECT` does not work on tmpfs) and a real control service,
//! talked to over real sockets with the generated tonic clients.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use cowsnap_control::operations::CrashAt;
use cowsnap_control::server::{ControlConfig, RunningControl, start};
use cowsnap_proto::cowsnap::v1 as pb;
use cowsnap_proto::server::Listen;
use cowsnap_proto::worker::v1 as wpb;
use cowsnap_worker::server::{RunningWorker, ServeOptions};
use cowsnap_worker::worker::WorkerConfig;
use pb::operation_service_client::OperationServiceClient;
use pb::snapshot_service_client::SnapshotServiceClient;
use pb::volume_service_client::VolumeServiceClient;
use pb::worker_service_client::WorkerServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const MIB: u64 = 1 << 20;

/// A scratch directory under the target dir (on disk), removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// Logs into the test's captured output: warnings, or `RUST_LOG`.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A data worker running in this process, on a unix socket that stays the
/// same across restarts.
pub struct Worker {
    pub dir: PathBuf,
    pub node: String,
    pub address: String,
    running: Option<(RunningWorker, CancellationToken)>,
}

impl Worker {
    pub async fn start(dir: &Path, node: &str) -> Worker {
        let dir = dir.join(node);
        std::fs::create_dir_all(&dir).unwrap();
        let address = format!("unix:{}", dir.join("grpc.sock").display());
        let mut w = Worker {
            dir,
            node: node.to_string(),
            address,
            running: None,
        };
        w.restart().await;
        w
    }

    /// Starts it again after [`Worker::stop`].
    pub async fn restart(&mut self) {
        assert!(self.running.is_none(), "worker already running");
        let cfg = worker_config(self.dir.join("data"), &self.node);
        let opts = ServeOptions {
            grpc_listen: self.address.parse().unwrap(),
            nbd_listen: "127.0.0.1:0".parse().unwrap(),
            nbd_advertise: None,
            nbd_tls: None,
            tls: None,
            nbd_limits: Default::default(),
        };
        let token = CancellationToken::new();
        let w = cowsnap_worker::server::start(cfg, opts, token.clone())
            .await
            .unwrap();
        self.running = Some((w, token));
    }

    /// Stops it (its socket goes away: calls to it fail).
    pub async fn stop(&mut self) {
        let (w, token) = self.running.take().expect("worker running");
        token.cancel();
        w.wait().await.unwrap();
    }

    /// The volumes the worker itself has, with their snapshots (sorted
    /// names), straight from its API.
    pub async fn inventory(&self) -> Vec<String> {
        let mut c = worker_client(&self.address).await;
        let vols = c
            .list_volumes(wpb::ListVolumesRequest {})
            .await
            .unwrap()
            .into_inner()
            .volumes;
        let mut names = Vec::new();
        for v in vols {
            names.push(v.name.clone());
            names.extend(v.snapshots.into_iter().map(|s| s.name));
        }
        names.sort();
        names
    }
}

/// A client of a worker's own API, for checking what it holds.
/// A worker's configuration for tests: its data dir and node, the I/O
/// backend from `COWSNAP_IO`.
pub fn worker_config(data_dir: PathBuf, node: &str) -> WorkerConfig {
    WorkerConfig {
        data_dir,
        node: node.to_string(),
        nbd_uri: String::new(),
        device_allow: Vec::new(),
        io: std::env::var("COWSNAP_IO")
            .unwrap_or_default()
            .parse()
            .unwrap(),
        writeback_cap: cowsnap_worker::worker::DEFAULT_WRITEBACK_CAP,
    }
}

pub async fn worker_client(
    address: &str,
) -> wpb::worker_service_client::WorkerServiceClient<Channel> {
    let path = address.strip_prefix("unix:").unwrap().to_string();
    let ch = tonic::transport::Endpoint::from_static("http://worker.test")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .unwrap();
    wpb::worker_service_client::WorkerServiceClient::new(ch)
}

/// Adds `authorization: Bearer TOKEN` when a token is set.
#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        Ok(r)
    }
}

pub type Ch = InterceptedService<Channel, Bearer>;

/// Clients of the public API.
pub struct Clients {
    pub volumes: VolumeServiceClient<Ch>,
    pub snapshots: SnapshotServiceClient<Ch>,
    pub operations: OperationServiceClient<Ch>,
    pub workers: WorkerServiceClient<Ch>,
    pub channel: Channel,
}

/// The control service running in this process over a data dir, on a TCP
/// port.
pub struct Control {
    pub cfg: ControlConfig,
    pub running: Option<(RunningControl, CancellationToken)>,
    pub token: Option<String>,
}

impl Control {
    /// Config for a control service on `dir` with these workers.
    pub fn config(dir: &Path, workers: &[&Worker]) -> ControlConfig {
        let mut cfg = ControlConfig::new(dir.join("control"), Listen::Tcp("127.0.0.1:0".into()));
        cfg.workers = workers.iter().map(|w| w.address.clone()).collect();
        cfg.metrics_listen = Some("127.0.0.1:0".into());
        cfg.worker_timeout = Duration::from_secs(20);
        // Passes run when the tests ask (reconcile_now) or at start.
        cfg.reconcile_interval = Duration::from_secs(3600);
        cfg.health_interval = Duration::from_secs(3600);
        cfg
    }

    pub async fn start(cfg: ControlConfig) -> Control {
        let mut c = Control {
            cfg,
            running: None,
            token: None,
        };
        c.boot().await;
        c
    }

    async fn boot(&mut self) {
        let token = CancellationToken::new();
        let r = start(self.cfg.clone(), token.clone()).await.unwrap();
        self.running = Some((r, token));
    }

    pub fn running(&self) -> &RunningControl {
        &self.running.as_ref().expect("control running").0
    }

    pub async fn stop(&mut self) {
        let (r, token) = self.running.take().expect("control running");
        token.cancel();
        r.wait().await.unwrap();
    }

    /// Stops and starts it again on the same catalog, with `crash_at`.
    pub async fn restart(&mut self, crash_at: Option<CrashAt>) {
        self.stop().await;
        self.cfg.crash_at = crash_at;
        self.cfg.listen = Listen::Tcp("127.0.0.1:0".into());
        self.boot().await;
    }

    pub async fn channel(&self) -> Channel {
        let Listen::Tcp(addr) = &self.running().grpc else {
            panic!("control listens on TCP in tests")
        };
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Clients sending `token` (the configured one by default).
    pub async fn clients_with(&self, token: Option<String>) -> Clients {
        let ch = self.channel().await;
        let b = Bearer(token);
        Clients {
            volumes: VolumeServiceClient::with_interceptor(ch.clone(), b.clone()),
            snapshots: SnapshotServiceClient::with_interceptor(ch.clone(), b.clone()),
            operations: OperationServiceClient::with_interceptor(ch.clone(), b.clone()),
            workers: WorkerServiceClient::with_interceptor(ch.clone(), b),
            channel: ch,
        }
    }

    pub async fn clients(&self) -> Clients {
        self.clients_with(self.token.clone()).await
    }
}

impl Clients {
    pub async fn create_volume(&mut self, id: &str, size: u64) -> pb::Volume {
        self.volumes
            .create_volume(pb::CreateVolumeRequest {
                volume_id: id.into(),
                volume: Some(pb::Volume {
                    size_bytes: size,
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn create_snapshot(&mut self, vol: &str, id: &str) -> pb::Snapshot {
        self.snapshots
            .create_snapshot(pb::CreateSnapshotRequest {
                parent: format!("volumes/{vol}"),
                snapshot_id: id.into(),
                snapshot: Some(pb::Snapshot::default()),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Waits for an operation to end (in bounded steps).
    pub async fn wait(&mut self, name: &str) -> pb::Operation {
        for _ in 0..120 {
            let op = self
                .operations
                .wait_operation(pb::WaitOperationRequest {
                    name: name.into(),
                    timeout: Some(prost_types::Duration {
                        seconds: 5,
                        nanos: 0,
                    }),
                })
                .await
                .unwrap()
                .into_inner();
            if op.done {
                return op;
            }
        }
        panic!("{name} did not end");
    }

    /// Every volume and snapshot name the control service lists, sorted.
    pub async fn inventory(&mut self) -> Vec<String> {
        let vols = self
            .volumes
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes;
        let snaps = self
            .snapshots
            .list_snapshots(pb::ListSnapshotsRequest {
                parent: "volumes/-".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshots;
        let mut names: Vec<String> = vols.into_iter().map(|v| v.name).collect();
        names.extend(snaps.into_iter().map(|s| s.name));
        names.sort();
        names
    }

    /// States of every volume and snapshot listed.
    pub async fn states(&mut self) -> Vec<(String, pb::State)> {
        let vols = self
            .volumes
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes;
        let snaps = self
            .snapshots
            .list_snapshots(pb::ListSnapshotsRequest {
                parent: "volumes/-".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .snapshots;
        vols.into_iter()
            .map(|v| {
                let st = v.state();
                (v.name, st)
            })
            .chain(snaps.into_iter().map(|s| {
                let st = s.state();
                (s.name, st)
            }))
            .collect()
    }
}

/// The gRPC code of a failed call (panics if it succeeded).
pub fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s,
    }
}
