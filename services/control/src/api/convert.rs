//! Domain values to `cowsnap.v1` messages, and errors to gRPC statuses.

use cowsnap_proto::bad_request::invalid_argument;
use cowsnap_proto::cowsnap::v1 as pb;
use cowsnap_proto::server::status_message;
use tonic::{Code, Status};

use crate::error::{ControlError, ErrorKind};
use crate::model::{
    self, OpKind, OpResult, OpState, Operation, Snapshot, State, Usage, Volume, Worker,
};

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Status {
        let code = code(e.kind());
        if code == Code::Internal {
            tracing::error!("internal error: {e}");
        }
        if let ControlError::InvalidArgument { field, message } = &e {
            return invalid_argument(field, message);
        }
        Status::new(code, status_message(e.to_string()))
    }
}

pub fn code(k: ErrorKind) -> Code {
    match k {
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Aborted => Code::Aborted,
        ErrorKind::OutOfRange => Code::OutOfRange,
        ErrorKind::Internal => Code::Internal,
    }
}

pub fn timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

pub fn state(s: State) -> i32 {
    (match s {
        State::Creating => pb::State::Creating,
        State::Ready => pb::State::Ready,
        State::Merging => pb::State::Merging,
        State::Deleting => pb::State::Deleting,
        State::Invalid => pb::State::Invalid,
        State::Failed => pb::State::Failed,
        State::DeletedWithSnapshots => pb::State::DeletedWithSnapshots,
    }) as i32
}

fn op_name(id: Option<i64>) -> String {
    id.map(|id| format!("operations/{id}")).unwrap_or_default()
}

pub fn volume(v: Volume) -> pb::Volume {
    let name = v.name();
    pb::Volume {
        nbd_uri: if matches!(v.state, State::Ready | State::Merging) {
            model::nbd_uri(&v.nbd_base, &name)
        } else {
            String::new()
        },
        name,
        size_bytes: v.size_bytes,
        chunk_sectors: v.chunk_sectors,
        labels: v.labels.into_iter().collect(),
        state: state(v.state),
        create_time: timestamp(v.create_time),
        worker: format!("workers/{}", v.worker_id),
        source: v.source,
        error: v.error,
        operation: op_name(v.operation),
    }
}

fn usage(u: Usage) -> pb::Usage {
    pb::Usage {
        allocated_bytes: u.allocated_bytes,
        total_bytes: u.total_bytes,
        metadata_bytes: u.metadata_bytes,
        exceptions: u.exceptions,
        update_time: timestamp(u.update_time),
    }
}

pub fn snapshot(s: Snapshot) -> pb::Snapshot {
    let name = s.name();
    let live = s.state == State::Ready;
    pb::Snapshot {
        nbd_uri: if live {
            model::nbd_uri(&s.nbd_base, &name)
        } else {
            String::new()
        },
        name,
        size_bytes: s.size_bytes,
        cow_size_bytes: s.cow_size_bytes,
        chunk_sectors: s.chunk_sectors,
        labels: s.labels.into_iter().collect(),
        state: state(s.state),
        create_time: timestamp(s.create_time),
        usage: if s.state == State::Invalid {
            None
        } else {
            s.usage.map(usage)
        },
        writable: s.writable,
        operation: op_name(s.operation),
        error: match s.state {
            State::Invalid | State::Failed => s.error.unwrap_or_default(),
            _ => String::new(),
        },
    }
}

pub fn worker(w: Worker) -> pb::Worker {
    pb::Worker {
        name: w.name(),
        address: w.address,
        node: w.node,
        nbd_uri: w.nbd_uri,
        capacity_bytes: w.capacity_bytes,
        free_bytes: w.free_bytes,
        health: if w.healthy {
            pb::WorkerHealth::Healthy
        } else {
            pb::WorkerHealth::Unhealthy
        } as i32,
        last_error: w.last_error,
        last_seen_time: timestamp(w.last_seen_time),
        create_time: timestamp(w.create_time),
        volume_count: w.volume_count,
        version: w.version,
        io_backend: w.io_backend,
    }
}

pub fn op_kind(k: OpKind) -> i32 {
    (match k {
        OpKind::CreateVolume => pb::OperationKind::CreateVolume,
        OpKind::DeleteVolume => pb::OperationKind::DeleteVolume,
        OpKind::CreateSnapshot => pb::OperationKind::CreateSnapshot,
        OpKind::DeleteSnapshot => pb::OperationKind::DeleteSnapshot,
        OpKind::MergeSnapshot => pb::OperationKind::MergeSnapshot,
        OpKind::RestoreVolume => pb::OperationKind::RestoreVolume,
        OpKind::ExpandVolume => pb::OperationKind::ExpandVolume,
        OpKind::CloneVolume => pb::OperationKind::CloneVolume,
    }) as i32
}

fn op_state(s: OpState) -> i32 {
    (match s {
        OpState::Pending => pb::OperationState::Pending,
        OpState::Running => pb::OperationState::Running,
        OpState::Succeeded => pb::OperationState::Succeeded,
        OpState::Failed => pb::OperationState::Failed,
    }) as i32
}

pub fn operation(op: Operation) -> pb::Operation {
    let (name, target, source) = (op.name(), op.target.to_string(), op.source_name());
    let result = match (op.state, op.error, op.result) {
        (OpState::Failed, Some(f), _) => Some(pb::operation::Result::Error(pb::OperationError {
            code: code(f.kind) as i32,
            message: f.to_string(),
            field: f.field,
        })),
        (OpState::Succeeded, _, Some(OpResult::Volume(v))) => {
            Some(pb::operation::Result::Volume(volume(v)))
        }
        (OpState::Succeeded, _, Some(OpResult::Snapshot(s))) => {
            Some(pb::operation::Result::Snapshot(snapshot(s)))
        }
        _ => None,
    };
    pb::Operation {
        name,
        done: op.state.done(),
        percent: op.percent,
        metadata: Some(pb::OperationMetadata {
            kind: op_kind(op.kind),
            target,
            source,
            state: op_state(op.state),
            worker: format!("workers/{}", op.worker_id),
            create_time: timestamp(op.create_time),
            update_time: timestamp(op.update_time),
            end_time: op.end_time.and_then(timestamp),
        }),
        result,
    }
}
