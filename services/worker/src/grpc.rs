//! `cowsnap.worker.v1.WorkerService` over gRPC: thin handlers that turn
//! requests into calls on [`Worker`] and its results and errors into
//! messages and status codes. Proto types stop here.

use std::sync::Arc;
use std::time::Duration;

use cowsnap_proto::bad_request::invalid_argument;
use cowsnap_proto::server::status_message;
use cowsnap_proto::worker::v1 as pb;
use pb::worker_service_server::WorkerService;
use tonic::{Request, Response, Status};

use crate::error::WorkerError;
use crate::state::TaskRec;
use crate::worker::{
    CopiedVolume, NewSnapshot, NewVolume, RangePage, ResState, SnapshotInfo, VolumeInfo, Worker,
    WorkerInfo,
};

/// Longest `WaitTask` wait.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// The one place a worker error becomes a status: its client message (no
/// server paths; the whole error goes to the log when internal), capped;
/// an invalid argument's field also as data (`bad_request`).
impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Status {
        use tonic::Code;
        let code = match &e {
            WorkerError::NotFound(_) => Code::NotFound,
            WorkerError::AlreadyExists(_) => Code::AlreadyExists,
            WorkerError::InvalidArgument { .. } => Code::InvalidArgument,
            WorkerError::FailedPrecondition(_) => Code::FailedPrecondition,
            WorkerError::ResourceExhausted(_) => Code::ResourceExhausted,
            WorkerError::Unavailable(_) => Code::Unavailable,
            WorkerError::Internal(_) => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!("internal error: {e}");
        }
        if let WorkerError::InvalidArgument { field, message } = &e {
            return invalid_argument(field, message);
        }
        Status::new(code, status_message(e.client_message()))
    }
}

fn timestamp(secs: u64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: secs as i64,
        nanos: 0,
    })
}

fn state(s: ResState) -> i32 {
    (match s {
        ResState::Creating => pb::State::Creating,
        ResState::Ready => pb::State::Ready,
        ResState::Merging => pb::State::Merging,
        ResState::Deleting => pb::State::Deleting,
        ResState::Invalid => pb::State::Invalid,
        ResState::Failed => pb::State::Failed,
    }) as i32
}

pub fn snapshot_pb(s: SnapshotInfo) -> pb::Snapshot {
    pb::Snapshot {
        nbd_export: s.name.clone(),
        name: s.name,
        size_bytes: s.size_bytes,
        cow_size_bytes: s.cow_size_bytes,
        chunk_sectors: s.chunk_sectors,
        device: s.device,
        state: state(s.state),
        usage: s.usage.map(|u| pb::Usage {
            allocated_bytes: u.allocated_sectors * 512,
            total_bytes: u.total_sectors * 512,
            metadata_bytes: u.metadata_sectors * 512,
            exceptions: s.exceptions,
        }),
        status_line: s.status_line,
        writable: s.writable,
        create_time: timestamp(s.create_time),
        error: s.error.unwrap_or_default(),
    }
}

pub fn volume_pb(v: VolumeInfo) -> pb::Volume {
    pb::Volume {
        nbd_export: if v.retired {
            String::new()
        } else {
            v.name.clone()
        },
        retired: v.retired,
        name: v.name,
        size_bytes: v.size_bytes,
        chunk_sectors: v.chunk_sectors,
        device: v.device,
        state: state(v.state),
        snapshots: v.snapshots.into_iter().map(snapshot_pb).collect(),
        create_time: timestamp(v.create_time),
    }
}

pub fn task_pb(t: TaskRec) -> pb::Task {
    let percent = if t.done && t.error.is_none() {
        100.0
    } else if t.total_units == 0 {
        0.0
    } else {
        t.done_units as f64 * 100.0 / t.total_units as f64
    };
    pb::Task {
        name: format!("tasks/{}", t.id),
        kind: t.kind.as_str().into(),
        target: t.target,
        source: t.source,
        done: t.done,
        percent,
        done_units: t.done_units,
        total_units: t.total_units,
        error: t.error.unwrap_or_default(),
        create_time: timestamp(t.create_time),
    }
}

fn info_pb(i: WorkerInfo) -> pb::WorkerInfo {
    pb::WorkerInfo {
        node: i.node,
        nbd_uri: i.nbd_uri,
        free_bytes: i.free_bytes,
        capacity_bytes: i.capacity_bytes,
        devices: i
            .devices
            .into_iter()
            .map(|d| pb::RawDevice {
                path: d.path,
                size_bytes: d.size_bytes,
                used_by: d.used_by,
            })
            .collect(),
        io_backend: i.io_backend,
        version: env!("CARGO_PKG_VERSION").into(),
        io: Some(pb::IoStats {
            reads: i.io.reads,
            read_bytes: i.io.read_bytes,
            writes: i.io.writes,
            write_bytes: i.io.write_bytes,
            commits: i.io.commits,
            exceptions: i.io.exceptions,
        }),
    }
}

fn ranges_pb(p: RangePage) -> pb::SnapshotRanges {
    pb::SnapshotRanges {
        size_bytes: p.size_bytes,
        ranges: p
            .ranges
            .into_iter()
            .map(|(s, e)| pb::ByteRange {
                offset: s,
                length: e - s,
            })
            .collect(),
        block_bytes: p.block_bytes,
        next_offset: p.next_offset,
    }
}

/// The gRPC face of a [`Worker`].
pub struct WorkerGrpc {
    worker: Arc<Worker>,
}

impl WorkerGrpc {
    pub fn new(worker: Arc<Worker>) -> WorkerGrpc {
        WorkerGrpc { worker }
    }
}

type Rpc<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl WorkerService for WorkerGrpc {
    async fn get_worker_info(&self, _: Request<pb::GetWorkerInfoRequest>) -> Rpc<pb::WorkerInfo> {
        Ok(Response::new(info_pb(self.worker.info().await?)))
    }

    async fn create_volume(&self, r: Request<pb::CreateVolumeRequest>) -> Rpc<pb::Volume> {
        let r = r.into_inner();
        let new = NewVolume {
            volume_id: r.volume_id,
            size_bytes: r.size_bytes,
            chunk_sectors: r.chunk_sectors,
            device: r.device,
        };
        Ok(Response::new(volume_pb(
            self.worker.create_volume(&new).await?,
        )))
    }

    async fn get_volume(&self, r: Request<pb::GetVolumeRequest>) -> Rpc<pb::Volume> {
        Ok(Response::new(volume_pb(
            self.worker.get_volume(&r.into_inner().name).await?,
        )))
    }

    async fn list_volumes(
        &self,
        _: Request<pb::ListVolumesRequest>,
    ) -> Rpc<pb::ListVolumesResponse> {
        let volumes = self
            .worker
            .list_volumes()
            .await
            .into_iter()
            .map(volume_pb)
            .collect();
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Rpc<pb::DeleteVolumeResponse> {
        self.worker.delete_volume(&r.into_inner().name).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn retire_volume(&self, r: Request<pb::RetireVolumeRequest>) -> Rpc<pb::Volume> {
        let v = self.worker.retire_volume(&r.into_inner().name).await?;
        Ok(Response::new(volume_pb(v)))
    }

    async fn expand_volume(&self, r: Request<pb::ExpandVolumeRequest>) -> Rpc<pb::Volume> {
        let r = r.into_inner();
        let v = self.worker.expand_volume(&r.name, r.size_bytes).await?;
        Ok(Response::new(volume_pb(v)))
    }

    async fn create_snapshot(&self, r: Request<pb::CreateSnapshotRequest>) -> Rpc<pb::Snapshot> {
        let r = r.into_inner();
        let new = NewSnapshot {
            parent: r.parent,
            snapshot_id: r.snapshot_id,
            cow_size_bytes: r.cow_size_bytes,
            chunk_sectors: r.chunk_sectors,
            device: r.device,
            writable: r.writable,
        };
        Ok(Response::new(snapshot_pb(
            self.worker.create_snapshot(&new).await?,
        )))
    }

    async fn get_snapshot(&self, r: Request<pb::GetSnapshotRequest>) -> Rpc<pb::Snapshot> {
        Ok(Response::new(snapshot_pb(
            self.worker.get_snapshot(&r.into_inner().name).await?,
        )))
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Rpc<pb::DeleteSnapshotResponse> {
        self.worker.delete_snapshot(&r.into_inner().name).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    async fn get_snapshot_delta(
        &self,
        r: Request<pb::GetSnapshotDeltaRequest>,
    ) -> Rpc<pb::SnapshotRanges> {
        let r = r.into_inner();
        let p = self
            .worker
            .snapshot_delta(&r.name, &r.base_snapshot, r.starting_offset, r.max_ranges)
            .await?;
        Ok(Response::new(ranges_pb(p)))
    }

    async fn get_snapshot_allocated(
        &self,
        r: Request<pb::GetSnapshotAllocatedRequest>,
    ) -> Rpc<pb::SnapshotRanges> {
        let r = r.into_inner();
        let p = self
            .worker
            .snapshot_allocated(&r.name, r.starting_offset, r.max_ranges)
            .await?;
        Ok(Response::new(ranges_pb(p)))
    }

    async fn merge_snapshot(&self, r: Request<pb::MergeSnapshotRequest>) -> Rpc<pb::Task> {
        Ok(Response::new(task_pb(
            self.worker.merge_snapshot(&r.into_inner().name).await?,
        )))
    }

    async fn restore_volume(&self, r: Request<pb::RestoreVolumeRequest>) -> Rpc<pb::Task> {
        let r = r.into_inner();
        let new = CopiedVolume {
            volume_id: r.volume_id,
            chunk_sectors: r.chunk_sectors,
            device: r.device,
        };
        let t = self.worker.restore_volume(&new, &r.source_snapshot).await?;
        Ok(Response::new(task_pb(t)))
    }

    async fn clone_volume(&self, r: Request<pb::CloneVolumeRequest>) -> Rpc<pb::Task> {
        let r = r.into_inner();
        let new = CopiedVolume {
            volume_id: r.volume_id,
            chunk_sectors: r.chunk_sectors,
            device: r.device,
        };
        let t = self.worker.clone_volume(&new, &r.source_volume).await?;
        Ok(Response::new(task_pb(t)))
    }

    async fn get_task(&self, r: Request<pb::GetTaskRequest>) -> Rpc<pb::Task> {
        Ok(Response::new(task_pb(
            self.worker.get_task(&r.into_inner().name)?,
        )))
    }

    async fn list_tasks(&self, _: Request<pb::ListTasksRequest>) -> Rpc<pb::ListTasksResponse> {
        let tasks = self.worker.list_tasks().into_iter().map(task_pb).collect();
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    async fn wait_task(&self, r: Request<pb::WaitTaskRequest>) -> Rpc<pb::Task> {
        let r = r.into_inner();
        let timeout = Duration::from_millis(u64::from(r.timeout_ms)).min(MAX_WAIT);
        Ok(Response::new(task_pb(
            self.worker.wait_task(&r.name, timeout).await?,
        )))
    }
}
