//! The data workers: registration, the `cowsnap.worker.v1` clients that
//! drive them (the worker's proto types stop here: callers get domain
//! values and [`ControlError`]s), health checks, and placement of new
//! volumes by free room.
//!
//! A call that finds its worker unreachable marks the worker unhealthy at
//! once and fails with `Unavailable`; the periodic health check marks it
//! healthy again when it answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cowsnap_proto::server::Listen;
use cowsnap_proto::worker::v1 as wpb;
use tonic::Code;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use wpb::worker_service_client::WorkerServiceClient;

use crate::catalog::{self, Catalog};
use crate::error::{ControlError, Result};
use crate::metrics::Metrics;
use crate::model::{self, State, Usage, Worker, now_ms};

/// The worker service's name in `grpc.health.v1`.
const WORKER_SERVICE: &str = "cowsnap.worker.v1.WorkerService";

/// What a worker says about itself.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub node: String,
    pub nbd_uri: String,
    pub free_bytes: u64,
    pub capacity_bytes: u64,
    pub version: String,
    pub io_backend: String,
    pub io: WorkerIo,
}

/// A worker's I/O counters since it started (they only grow until it
/// restarts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerIo {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    /// Metadata commits, and the exceptions (chunks copied on write) they
    /// committed.
    pub commits: u64,
    pub exceptions: u64,
}

impl WorkerIo {
    /// Each counter with its name.
    pub fn fields(&self) -> [(&'static str, u64); 6] {
        [
            ("reads", self.reads),
            ("read_bytes", self.read_bytes),
            ("writes", self.writes),
            ("write_bytes", self.write_bytes),
            ("commits", self.commits),
            ("exceptions", self.exceptions),
        ]
    }
}

/// A volume as its worker reports it.
#[derive(Clone, Debug)]
pub struct WorkerVolume {
    pub id: String,
    pub size_bytes: u64,
    pub chunk_sectors: u32,
    pub state: State,
    pub snapshots: Vec<WorkerSnapshot>,
}

/// A snapshot as its worker reports it.
#[derive(Clone, Debug)]
pub struct WorkerSnapshot {
    pub volume_id: String,
    pub id: String,
    pub cow_size_bytes: u64,
    pub chunk_sectors: u32,
    pub writable: bool,
    pub state: State,
    pub usage: Option<Usage>,
    /// Why it is invalid or failed.
    pub error: Option<String>,
}

/// A long-running task (merge, restore, clone) on a worker.
#[derive(Clone, Debug)]
pub struct WorkerTask {
    /// `tasks/N`.
    pub name: String,
    pub kind: String,
    pub target: String,
    pub done: bool,
    pub percent: f64,
    pub error: Option<String>,
    /// Seconds since the epoch.
    pub create_time: i64,
}

fn state(s: i32) -> State {
    match wpb::State::try_from(s).unwrap_or(wpb::State::Unspecified) {
        wpb::State::Creating => State::Creating,
        wpb::State::Ready => State::Ready,
        wpb::State::Merging => State::Merging,
        wpb::State::Deleting => State::Deleting,
        wpb::State::Invalid => State::Invalid,
        wpb::State::Failed | wpb::State::Unspecified => State::Failed,
    }
}

fn snapshot(s: wpb::Snapshot) -> Result<WorkerSnapshot> {
    let (vol, id) = cowsnap_proto::names::parse_snapshot(&s.name)
        .map_err(|e| ControlError::Internal(anyhow::anyhow!("worker sent {e}")))?;
    let now = now_ms();
    Ok(WorkerSnapshot {
        volume_id: vol.to_string(),
        id: id.to_string(),
        cow_size_bytes: s.cow_size_bytes,
        chunk_sectors: s.chunk_sectors,
        writable: s.writable,
        state: state(s.state),
        usage: s.usage.map(|u| Usage {
            allocated_bytes: u.allocated_bytes,
            total_bytes: u.total_bytes,
            metadata_bytes: u.metadata_bytes,
            exceptions: u.exceptions,
            update_time: now,
        }),
        error: (!s.error.is_empty()).then_some(s.error),
    })
}

fn volume(v: wpb::Volume) -> Result<WorkerVolume> {
    let id = cowsnap_proto::names::parse_volume(&v.name)
        .map_err(|e| ControlError::Internal(anyhow::anyhow!("worker sent {e}")))?
        .to_string();
    Ok(WorkerVolume {
        id,
        size_bytes: v.size_bytes,
        chunk_sectors: v.chunk_sectors,
        state: state(v.state),
        snapshots: v
            .snapshots
            .into_iter()
            .map(snapshot)
            .collect::<Result<_>>()?,
    })
}

fn task(t: wpb::Task) -> WorkerTask {
    WorkerTask {
        name: t.name,
        kind: t.kind,
        target: t.target,
        done: t.done,
        percent: t.percent,
        error: (!t.error.is_empty()).then_some(t.error),
        create_time: t.create_time.map_or(0, |c| c.seconds),
    }
}

/// How the control service reaches workers.
#[derive(Clone, Debug)]
pub struct WorkerConnect {
    /// Per-call deadline.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// mTLS to workers on TCP addresses (none on unix sockets).
    pub tls: Option<ClientTlsConfig>,
}

/// The registered workers and their clients.
pub struct Workers {
    catalog: Catalog,
    connect: WorkerConnect,
    channels: Mutex<HashMap<String, Channel>>,
    metrics: Arc<Metrics>,
}

/// A client of one worker.
pub struct WorkerClient {
    id: String,
    address: String,
    catalog: Catalog,
    api: WorkerServiceClient<Channel>,
    health: HealthClient<Channel>,
}

impl Workers {
    pub fn new(catalog: Catalog, connect: WorkerConnect, metrics: Arc<Metrics>) -> Workers {
        Workers {
            catalog,
            connect,
            channels: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn channel(&self, address: &str) -> Result<Channel> {
        if let Some(c) = self.channels.lock().expect("channels").get(address) {
            return Ok(c.clone());
        }
        let listen: Listen = address
            .parse()
            .map_err(|e: String| ControlError::invalid("address", e))?;
        let bad = |e: tonic::transport::Error| {
            ControlError::invalid("address", format!("{address}: {e}"))
        };
        let channel = match listen {
            Listen::Tcp(hostport) => {
                let scheme = if self.connect.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                let mut ep = Endpoint::from_shared(format!("{scheme}://{hostport}"))
                    .map_err(bad)?
                    .connect_timeout(self.connect.connect_timeout)
                    .timeout(self.connect.timeout)
                    .tcp_nodelay(true);
                if let Some(tls) = &self.connect.tls {
                    ep = ep.tls_config(tls.clone()).map_err(bad)?;
                }
                ep.connect_lazy()
            }
            Listen::Unix(path) => Endpoint::from_static("http://worker.local")
                .connect_timeout(self.connect.connect_timeout)
                .timeout(self.connect.timeout)
                .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                })),
        };
        self.channels
            .lock()
            .expect("channels")
            .insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    fn client_at(&self, id: &str, address: &str) -> Result<WorkerClient> {
        let ch = self.channel(address)?;
        Ok(WorkerClient {
            id: id.to_string(),
            address: address.to_string(),
            catalog: self.catalog.clone(),
            api: WorkerServiceClient::new(ch.clone()),
            health: HealthClient::new(ch),
        })
    }

    /// The client of a registered worker.
    pub async fn client(&self, worker_id: &str) -> Result<WorkerClient> {
        let w = self.get(worker_id).await?;
        self.client_at(&w.id, &w.address)
    }

    pub async fn get(&self, worker_id: &str) -> Result<Worker> {
        let mut c = self.catalog.conn().await?;
        catalog::workers::get(&mut c, worker_id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("workers/{worker_id} not found")))
    }

    pub async fn list(&self) -> Result<Vec<Worker>> {
        let mut c = self.catalog.conn().await?;
        catalog::workers::list(&mut c).await
    }

    /// Registers the worker at `address` (or updates a registered one that
    /// moved there). It must answer.
    pub async fn register(&self, address: &str, worker_id: Option<&str>) -> Result<Worker> {
        if address.is_empty() {
            return Err(ControlError::invalid("address", "must not be empty"));
        }
        if let Some(id) = worker_id {
            model::check_id("worker_id", id)?;
        }
        let probe = self.client_at("", address)?;
        let info = probe.info().await.map_err(|e| {
            ControlError::Unavailable(format!("the worker at {address} does not answer: {e}"))
        })?;
        let id = worker_id
            .map(str::to_string)
            .unwrap_or_else(|| model::worker_id_from_node(&info.node));
        let now = now_ms();
        let mut tx = self.catalog.write().await?;
        let existing = catalog::workers::list(&mut tx).await?;
        if let Some(other) = existing.iter().find(|w| w.address == address && w.id != id) {
            return Err(ControlError::AlreadyExists(format!(
                "{address} is already registered as {} (node {})",
                other.name(),
                other.node
            )));
        }
        let old = existing.iter().find(|w| w.id == id);
        if let Some(old) = old
            && old.node != info.node
        {
            return Err(ControlError::AlreadyExists(format!(
                "{} is the worker of node {}; the worker at {address} is on node {}",
                old.name(),
                old.node,
                info.node
            )));
        }
        let w = Worker {
            id: id.clone(),
            address: address.to_string(),
            node: info.node,
            nbd_uri: info.nbd_uri,
            capacity_bytes: info.capacity_bytes,
            free_bytes: info.free_bytes,
            version: info.version,
            io_backend: info.io_backend,
            healthy: true,
            last_error: String::new(),
            last_seen_time: now,
            create_time: old.map_or(now, |o| o.create_time),
            volume_count: old.map_or(0, |o| o.volume_count),
        };
        catalog::workers::upsert(&mut tx, &w).await?;
        tx.commit().await?;
        if old.is_some_and(|o| o.address != address) {
            tracing::info!(worker = %w.name(), address, "worker moved");
        } else if old.is_none() {
            tracing::info!(worker = %w.name(), address, node = %w.node, "worker registered");
        }
        Ok(w)
    }

    /// Checks a worker's health now (`grpc.health.v1`, then GetWorkerInfo)
    /// and records what it found.
    pub async fn check(&self, w: &Worker) -> Result<Worker> {
        let client = self.client_at(&w.id, &w.address)?;
        let result = client.check().await;
        let mut c = self.catalog.conn().await?;
        match result {
            Ok(info) => {
                self.metrics.worker_io(&w.name(), &info.io);
                let mut fresh = w.clone();
                fresh.nbd_uri = info.nbd_uri;
                fresh.capacity_bytes = info.capacity_bytes;
                fresh.free_bytes = info.free_bytes;
                fresh.version = info.version;
                fresh.io_backend = info.io_backend;
                fresh.healthy = true;
                fresh.last_error.clear();
                fresh.last_seen_time = now_ms();
                if !w.healthy {
                    tracing::info!(worker = %w.name(), "worker answers again");
                }
                catalog::workers::upsert(&mut c, &fresh).await?;
            }
            Err(e) => {
                if w.healthy {
                    tracing::warn!(worker = %w.name(), address = %w.address, "worker unhealthy: {e}");
                }
                catalog::workers::set_unhealthy(&mut c, &w.id, &e.to_string()).await?;
            }
        }
        catalog::workers::get(&mut c, &w.id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("{} not found", w.name())))
    }

    /// Forgets a worker that holds no volume.
    pub async fn deregister(&self, worker_id: &str) -> Result<()> {
        let mut tx = self.catalog.write().await?;
        let w = catalog::workers::get(&mut tx, worker_id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("workers/{worker_id} not found")))?;
        if w.volume_count > 0 {
            return Err(ControlError::FailedPrecondition(format!(
                "{} holds {} volume(s); delete them first",
                w.name(),
                w.volume_count
            )));
        }
        catalog::workers::delete(&mut tx, worker_id).await?;
        tx.commit().await?;
        self.channels.lock().expect("channels").remove(&w.address);
        tracing::info!(worker = %w.name(), "worker deregistered");
        Ok(())
    }

    /// The healthy worker with the most free room for a new volume of
    /// `size` bytes (room taken by volumes still being created counts as
    /// used).
    pub async fn place(&self, size: u64) -> Result<Worker> {
        let mut c = self.catalog.conn().await?;
        let all = catalog::workers::list(&mut c).await?;
        if all.is_empty() {
            return Err(ControlError::FailedPrecondition(
                "no worker is registered (WorkerService.RegisterWorker)".into(),
            ));
        }
        let mut best: Option<(u64, Worker)> = None;
        let mut healthy = 0;
        for w in all {
            if !w.healthy {
                continue;
            }
            healthy += 1;
            let room = w
                .free_bytes
                .saturating_sub(catalog::volumes::creating_bytes(&mut c, &w.id).await?);
            if best.as_ref().is_none_or(|(r, _)| room > *r) {
                best = Some((room, w));
            }
        }
        match best {
            None => Err(ControlError::Unavailable(format!(
                "no worker is healthy ({healthy} of them answer)"
            ))),
            Some((room, w)) if room < size => Err(ControlError::ResourceExhausted(format!(
                "no worker has room for {size} bytes: the most is {room} bytes on {}",
                w.name()
            ))),
            Some((_, w)) => Ok(w),
        }
    }
}

impl WorkerClient {
    pub fn worker_id(&self) -> &str {
        &self.id
    }

    /// A worker's error as the control service's; a worker that does not
    /// answer is marked unhealthy.
    async fn fail(&self, s: tonic::Status) -> ControlError {
        let msg = s.message().to_string();
        match s.code() {
            Code::NotFound => ControlError::NotFound(msg),
            Code::AlreadyExists => ControlError::AlreadyExists(msg),
            Code::InvalidArgument => {
                let (field, m) = msg
                    .strip_prefix("invalid ")
                    .and_then(|r| r.split_once(": "))
                    .map(|(f, m)| (f.to_string(), m.to_string()))
                    .unwrap_or_else(|| ("request".into(), msg.clone()));
                ControlError::invalid(field, m)
            }
            Code::FailedPrecondition => ControlError::FailedPrecondition(msg),
            Code::ResourceExhausted => ControlError::ResourceExhausted(msg),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                let e = format!(
                    "worker workers/{} ({}) does not answer: {msg}",
                    self.id, self.address
                );
                if !self.id.is_empty()
                    && let Ok(mut c) = self.catalog.conn().await
                {
                    let _ = catalog::workers::set_unhealthy(&mut c, &self.id, &e).await;
                }
                ControlError::Unavailable(e)
            }
            _ => ControlError::Internal(anyhow::anyhow!(
                "worker workers/{}: {}: {msg}",
                self.id,
                s.code()
            )),
        }
    }

    pub async fn info(&self) -> Result<WorkerInfo> {
        let i = match self
            .api
            .clone()
            .get_worker_info(wpb::GetWorkerInfoRequest {})
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.fail(s).await),
        };
        Ok(WorkerInfo {
            node: i.node,
            nbd_uri: i.nbd_uri,
            free_bytes: i.free_bytes,
            capacity_bytes: i.capacity_bytes,
            version: i.version,
            io_backend: i.io_backend,
            io: i
                .io
                .map(|io| WorkerIo {
                    reads: io.reads,
                    read_bytes: io.read_bytes,
                    writes: io.writes,
                    write_bytes: io.write_bytes,
                    commits: io.commits,
                    exceptions: io.exceptions,
                })
                .unwrap_or_default(),
        })
    }

    /// `grpc.health.v1` says the worker API serves, and it says who it is.
    pub async fn check(&self) -> Result<WorkerInfo> {
        let h = self
            .health
            .clone()
            .check(HealthCheckRequest {
                service: WORKER_SERVICE.into(),
            })
            .await;
        match h {
            Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => {}
            Ok(r) => {
                return Err(ControlError::Unavailable(format!(
                    "health: {:?}",
                    ServingStatus::try_from(r.get_ref().status).unwrap_or(ServingStatus::Unknown)
                )));
            }
            Err(s) => return Err(self.fail(s).await),
        }
        self.info().await
    }

    pub async fn create_volume(&self, id: &str, size: u64, chunk: u32) -> Result<WorkerVolume> {
        let r = self
            .api
            .clone()
            .create_volume(wpb::CreateVolumeRequest {
                volume_id: id.into(),
                size_bytes: size,
                chunk_sectors: chunk,
                device: String::new(),
            })
            .await;
        match r {
            Ok(r) => volume(r.into_inner()),
            Err(s) => Err(self.fail(s).await),
        }
    }

    pub async fn get_volume(&self, name: &str) -> Result<WorkerVolume> {
        let r = self
            .api
            .clone()
            .get_volume(wpb::GetVolumeRequest { name: name.into() })
            .await;
        match r {
            Ok(r) => volume(r.into_inner()),
            Err(s) => Err(self.fail(s).await),
        }
    }

    pub async fn list_volumes(&self) -> Result<Vec<WorkerVolume>> {
        let r = self
            .api
            .clone()
            .list_volumes(wpb::ListVolumesRequest {})
            .await;
        match r {
            Ok(r) => r.into_inner().volumes.into_iter().map(volume).collect(),
            Err(s) => Err(self.fail(s).await),
        }
    }

    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let r = self
            .api
            .clone()
            .delete_volume(wpb::DeleteVolumeRequest { name: name.into() })
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(s) => Err(self.fail(s).await),
        }
    }

    pub async fn create_snapshot(
        &self,
        parent: &str,
        id: &str,
        cow_size_bytes: u64,
        writable: bool,
    ) -> Result<WorkerSnapshot> {
        let r = self
            .api
            .clone()
            .create_snapshot(wpb::CreateSnapshotRequest {
                parent: parent.into(),
                snapshot_id: id.into(),
                cow_size_bytes,
                chunk_sectors: 0,
                device: String::new(),
                writable,
            })
            .await;
        match r {
            Ok(r) => snapshot(r.into_inner()),
            Err(s) => Err(self.fail(s).await),
        }
    }

    pub async fn get_snapshot(&self, name: &str) -> Result<WorkerSnapshot> {
        let r = self
            .api
            .clone()
            .get_snapshot(wpb::GetSnapshotRequest { name: name.into() })
            .await;
        match r {
            Ok(r) => snapshot(r.into_inner()),
            Err(s) => Err(self.fail(s).await),
        }
    }

    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let r = self
            .api
            .clone()
            .delete_snapshot(wpb::DeleteSnapshotRequest { name: name.into() })
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(s) => Err(self.fail(s).await),
        }
    }

    pub async fn merge_snapshot(&self, name: &str) -> Result<WorkerTask> {
        let r = self
            .api
            .clone()
            .merge_snapshot(wpb::MergeSnapshotRequest { name: name.into() })
            .await;
        match r {
            Ok(r) => Ok(task(r.into_inner())),
            Err(s) => Err(self.fail(s).await),
        }
    }

    pub async fn restore_volume(&self, id: &str, source: &str, chunk: u32) -> Result<WorkerTask> {
        let r = self
            .api
            .clone()
            .restore_volume(wpb::RestoreVolumeRequest {
                volume_id: id.into(),
                source_snapshot: source.into(),
                chunk_sectors: chunk,
                device: String::new(),
            })
            .await;
        match r {
            Ok(r) => Ok(task(r.into_inner())),
            Err(s) => Err(self.fail(s).await),
        }
    }

    pub async fn clone_volume(&self, id: &str, source: &str, chunk: u32) -> Result<WorkerTask> {
        let r = self
            .api
            .clone()
            .clone_volume(wpb::CloneVolumeRequest {
                volume_id: id.into(),
                source_volume: source.into(),
                chunk_sectors: chunk,
                device: String::new(),
            })
            .await;
        match r {
            Ok(r) => Ok(task(r.into_inner())),
            Err(s) => Err(self.fail(s).await),
        }
    }

    pub async fn list_tasks(&self) -> Result<Vec<WorkerTask>> {
        let r = self.api.clone().list_tasks(wpb::ListTasksRequest {}).await;
        match r {
            Ok(r) => Ok(r.into_inner().tasks.into_iter().map(task).collect()),
            Err(s) => Err(self.fail(s).await),
        }
    }

    /// Waits up to `wait` for the task to end; returns it as it is then.
    pub async fn wait_task(&self, name: &str, wait: Duration) -> Result<WorkerTask> {
        let r = self
            .api
            .clone()
            .wait_task(wpb::WaitTaskRequest {
                name: name.into(),
                timeout_ms: wait.as_millis() as u32,
            })
            .await;
        match r {
            Ok(r) => Ok(task(r.into_inner())),
            Err(s) => Err(self.fail(s).await),
        }
    }
}
