//! The typed client of one worker's `cowsnap.worker.v1` API: one line
//! per call. The worker's proto types stop here: callers get domain values
//! and [`ControlError`]s ([`classify::error`]). Its channel is wrapped in
//! [`Observe`], which reports each call's outcome to the worker's health;
//! the client itself knows nothing of health or of the catalog.

use std::future::Future;
use std::time::Duration;

use cowsnap_proto::worker::v1 as wpb;
use tonic::Status;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use wpb::worker_service_client::WorkerServiceClient;

use super::classify;
use super::layer::Observe;
use crate::error::{ControlError, Result};
use crate::model::{RangePage, Reported, State, Usage, WorkerIo, now_ms};

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

/// A volume as its worker reports it.
#[derive(Clone, Debug)]
pub struct WorkerVolume {
    pub id: String,
    pub size_bytes: u64,
    pub chunk_sectors: u32,
    pub state: State,
    pub snapshots: Vec<WorkerSnapshot>,
    /// Retired (deleted while it has snapshots): not exported.
    pub retired: bool,
}

/// A snapshot as its worker reports it.
#[derive(Clone, Debug)]
pub struct WorkerSnapshot {
    pub volume_id: String,
    pub id: String,
    /// Its volume's size when it was taken.
    pub size_bytes: u64,
    pub cow_size_bytes: u64,
    pub chunk_sectors: u32,
    pub writable: bool,
    pub state: State,
    pub usage: Option<Usage>,
    /// Why it is invalid or failed.
    pub error: Option<String>,
}

impl WorkerSnapshot {
    /// What the catalog records of this report.
    pub fn reported(&self) -> Reported<'_> {
        Reported {
            cow_size_bytes: self.cow_size_bytes,
            chunk_sectors: self.chunk_sectors,
            usage: self.usage.as_ref(),
            error: self.error.as_deref(),
        }
    }
}

/// A long-running task (merge, restore, clone) on a worker.
#[derive(Clone, Debug)]
pub struct WorkerTask {
    /// `tasks/N`.
    pub name: String,
    pub kind: TaskKind,
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
        size_bytes: s.size_bytes,
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
        retired: v.retired,
        snapshots: v
            .snapshots
            .into_iter()
            .map(snapshot)
            .collect::<Result<_>>()?,
    })
}

/// What a worker's task does: its `kind`, read once from the answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskKind {
    Merge,
    Restore,
    Clone,
    /// A kind this control service does not know (a newer worker's).
    Other(String),
}

fn task_kind(kind: String) -> TaskKind {
    match kind.as_str() {
        "merge" => TaskKind::Merge,
        "restore" => TaskKind::Restore,
        "clone" => TaskKind::Clone,
        _ => TaskKind::Other(kind),
    }
}

fn task(t: wpb::Task) -> WorkerTask {
    WorkerTask {
        name: t.name,
        kind: task_kind(t.kind),
        target: t.target,
        done: t.done,
        percent: t.percent,
        error: (!t.error.is_empty()).then_some(t.error),
        create_time: t.create_time.map_or(0, |c| c.seconds),
    }
}

fn range_page(p: wpb::SnapshotRanges) -> RangePage {
    RangePage {
        size_bytes: p.size_bytes,
        block_bytes: p.block_bytes,
        ranges: p.ranges.into_iter().map(|r| (r.offset, r.length)).collect(),
        next_offset: p.next_offset,
    }
}

/// A client of one worker.
pub struct WorkerClient {
    id: String,
    address: String,
    api: WorkerServiceClient<Observe<Channel>>,
    health: HealthClient<Observe<Channel>>,
}

impl WorkerClient {
    /// The client of worker `id` at `address` over `channel`.
    pub(crate) fn new(id: &str, address: &str, channel: Observe<Channel>) -> WorkerClient {
        WorkerClient {
            id: id.to_string(),
            address: address.to_string(),
            api: WorkerServiceClient::new(channel.clone()),
            health: HealthClient::new(channel),
        }
    }

    pub fn worker_id(&self) -> &str {
        &self.id
    }

    fn api(&self) -> WorkerServiceClient<Observe<Channel>> {
        self.api.clone()
    }

    /// Awaits a call; its status as the control service's error.
    async fn call<T>(
        &self,
        call: impl Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    ) -> Result<T> {
        call.await
            .map(tonic::Response::into_inner)
            .map_err(|s| classify::error(&s, &self.id, &self.address))
    }

    pub async fn info(&self) -> Result<WorkerInfo> {
        let r = wpb::GetWorkerInfoRequest {};
        Ok(info(self.call(self.api().get_worker_info(r)).await?))
    }

    /// `grpc.health.v1` says the worker API serves, and it says who it is.
    pub async fn check(&self) -> Result<WorkerInfo> {
        let r = HealthCheckRequest {
            service: WORKER_SERVICE.into(),
        };
        let status = self.call(self.health.clone().check(r)).await?.status;
        if status != ServingStatus::Serving as i32 {
            return Err(ControlError::Unavailable(format!(
                "health: {:?}",
                ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown)
            )));
        }
        self.info().await
    }

    pub async fn create_volume(&self, id: &str, size: u64, chunk: u32) -> Result<WorkerVolume> {
        let r = wpb::CreateVolumeRequest {
            volume_id: id.into(),
            size_bytes: size,
            chunk_sectors: chunk,
            device: String::new(),
        };
        volume(self.call(self.api().create_volume(r)).await?)
    }

    pub async fn get_volume(&self, name: &str) -> Result<WorkerVolume> {
        let r = wpb::GetVolumeRequest { name: name.into() };
        volume(self.call(self.api().get_volume(r)).await?)
    }

    pub async fn list_volumes(&self) -> Result<Vec<WorkerVolume>> {
        let r = wpb::ListVolumesRequest {};
        let vols = self.call(self.api().list_volumes(r)).await?.volumes;
        vols.into_iter().map(volume).collect()
    }

    pub async fn delete_volume(&self, name: &str) -> Result<()> {
        let r = wpb::DeleteVolumeRequest { name: name.into() };
        self.call(self.api().delete_volume(r)).await.map(drop)
    }

    pub async fn retire_volume(&self, name: &str) -> Result<WorkerVolume> {
        let r = wpb::RetireVolumeRequest { name: name.into() };
        volume(self.call(self.api().retire_volume(r)).await?)
    }

    pub async fn expand_volume(&self, name: &str, size_bytes: u64) -> Result<WorkerVolume> {
        let r = wpb::ExpandVolumeRequest {
            name: name.into(),
            size_bytes,
        };
        volume(self.call(self.api().expand_volume(r)).await?)
    }

    pub async fn create_snapshot(
        &self,
        parent: &str,
        id: &str,
        cow_size_bytes: u64,
        writable: bool,
    ) -> Result<WorkerSnapshot> {
        let r = wpb::CreateSnapshotRequest {
            parent: parent.into(),
            snapshot_id: id.into(),
            cow_size_bytes,
            chunk_sectors: 0,
            device: String::new(),
            writable,
        };
        snapshot(self.call(self.api().create_snapshot(r)).await?)
    }

    pub async fn get_snapshot(&self, name: &str) -> Result<WorkerSnapshot> {
        let r = wpb::GetSnapshotRequest { name: name.into() };
        snapshot(self.call(self.api().get_snapshot(r)).await?)
    }

    /// A page of where snapshot `name` may differ from its volume (`base`
    /// empty) or from snapshot `base`.
    pub async fn snapshot_delta(
        &self,
        name: &str,
        base: &str,
        start: u64,
        max: u32,
    ) -> Result<RangePage> {
        let r = wpb::GetSnapshotDeltaRequest {
            name: name.into(),
            base_snapshot: base.into(),
            starting_offset: start,
            max_ranges: max,
        };
        Ok(range_page(
            self.call(self.api().get_snapshot_delta(r)).await?,
        ))
    }

    /// A page of the ranges of snapshot `name` that hold data.
    pub async fn snapshot_allocated(&self, name: &str, start: u64, max: u32) -> Result<RangePage> {
        let r = wpb::GetSnapshotAllocatedRequest {
            name: name.into(),
            starting_offset: start,
            max_ranges: max,
        };
        Ok(range_page(
            self.call(self.api().get_snapshot_allocated(r)).await?,
        ))
    }

    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let r = wpb::DeleteSnapshotRequest { name: name.into() };
        self.call(self.api().delete_snapshot(r)).await.map(drop)
    }

    pub async fn merge_snapshot(&self, name: &str) -> Result<WorkerTask> {
        let r = wpb::MergeSnapshotRequest { name: name.into() };
        Ok(task(self.call(self.api().merge_snapshot(r)).await?))
    }

    pub async fn restore_volume(&self, id: &str, source: &str, chunk: u32) -> Result<WorkerTask> {
        let r = wpb::RestoreVolumeRequest {
            volume_id: id.into(),
            source_snapshot: source.into(),
            chunk_sectors: chunk,
            device: String::new(),
        };
        Ok(task(self.call(self.api().restore_volume(r)).await?))
    }

    pub async fn clone_volume(&self, id: &str, source: &str, chunk: u32) -> Result<WorkerTask> {
        let r = wpb::CloneVolumeRequest {
            volume_id: id.into(),
            source_volume: source.into(),
            chunk_sectors: chunk,
            device: String::new(),
        };
        Ok(task(self.call(self.api().clone_volume(r)).await?))
    }

    pub async fn list_tasks(&self) -> Result<Vec<WorkerTask>> {
        let r = wpb::ListTasksRequest {};
        let tasks = self.call(self.api().list_tasks(r)).await?.tasks;
        Ok(tasks.into_iter().map(task).collect())
    }

    /// Waits up to `wait` for the task to end; returns it as it is then.
    pub async fn wait_task(&self, name: &str, wait: Duration) -> Result<WorkerTask> {
        let r = wpb::WaitTaskRequest {
            name: name.into(),
            timeout_ms: wait.as_millis() as u32,
        };
        Ok(task(self.call(self.api().wait_task(r)).await?))
    }
}

fn info(i: wpb::WorkerInfo) -> WorkerInfo {
    WorkerInfo {
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
    }
}
