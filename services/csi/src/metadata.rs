//! The CSI SnapshotMetadata service (the changed-block service backup
//! tools reach through the external-snapshot-metadata sidecar):
//! GetMetadataAllocated and GetMetadataDelta, streamed page by page from
//! the control service's [`Control::snapshot_allocated`] and
//! [`Control::snapshot_delta`], which read the owning worker's live
//! exception tables.
//!
//! - The ranges are VARIABLE_LENGTH: merged runs of chunks, each starting
//!   on a chunk boundary (the spec lets the driver choose; merged runs are
//!   far fewer tuples than one per chunk, and two snapshots of one volume
//!   may have different chunk sizes, which a fixed length would hide).
//! - A delta is the union of both snapshots' exception chunks (the rule and
//!   why it is complete are in `cowsnap_store::delta`). The spec's base is
//!   older than its target; the union is the same either way round, so the
//!   order is not checked.
//! - Allocated is the whole volume: volumes are fully provisioned and the
//!   engine keeps no record of which bytes were ever written.
//! - `starting_offset`: tuples that end at or before it are left out; one
//!   that straddles it starts at the chunk that holds it. Negative or past
//!   the volume's end is OUT_OF_RANGE. `max_results` bounds the tuples of
//!   each message (0: 4096).
//! - `secrets` are not read: the sidecar authenticates its clients (their
//!   security token) before it calls the driver, over the driver's own
//!   socket.

use std::pin::Pin;
use std::sync::Arc;

use cowsnap_control::control::Control;
use cowsnap_control::error::ControlError;
use cowsnap_control::model::RangePage;
use cowsnap_proto::bad_request::field_error;
use cowsnap_proto::csi::v1 as csi;
use cowsnap_proto::names;
use csi::snapshot_metadata_server::SnapshotMetadata as SnapshotMetadataService;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::ids;
use crate::required;

/// A stream of response messages.
type Pages<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The CSI SnapshotMetadata service over the control service's domain.
#[derive(Clone)]
pub struct SnapshotMetadata {
    control: Arc<Control>,
}

impl SnapshotMetadata {
    pub fn new(control: Arc<Control>) -> SnapshotMetadata {
        SnapshotMetadata { control }
    }
}

/// The cowsnap name of CSI snapshot id `id` (field `field`).
fn snapshot_name(field: &str, id: &str) -> Result<String, Status> {
    required(field, id)?;
    let (v, s) = ids::parse_snapshot_id(id).ok_or_else(|| {
        field_error(
            field,
            format!(
                "{field} {} is not a cowsnap snapshot id (VOLUME/SNAPSHOT)",
                names::quote(id)
            ),
        )
    })?;
    Ok(names::snapshot(v, s))
}

/// The request's offset and page size, checked.
fn window(starting_offset: i64, max_results: i32) -> Result<(u64, u32), Status> {
    let start = u64::try_from(starting_offset).map_err(|_| {
        Status::out_of_range(format!("starting_offset {starting_offset} is negative"))
    })?;
    let max = u32::try_from(max_results)
        .map_err(|_| field_error("max_results", "max_results must not be negative"))?;
    Ok((start, max))
}

/// What one page becomes on the wire.
struct Message {
    capacity: i64,
    tuples: Vec<csi::BlockMetadata>,
}

fn message(p: &RangePage) -> Message {
    Message {
        capacity: p.size_bytes as i64,
        tuples: p
            .ranges
            .iter()
            .map(|&(offset, length)| csi::BlockMetadata {
                byte_offset: offset as i64,
                size_bytes: length as i64,
            })
            .collect(),
    }
}

/// Streams pages: `first` (fetched before the call answers, so a bad
/// request fails the call itself), then each page `next` fetches from
/// the previous page's `next_offset`, until one says it is the last. An
/// error mid-way ends the stream with it.
fn stream_pages<T, F, Fut>(first: RangePage, next: F, wrap: fn(Message) -> T) -> Pages<T>
where
    T: Send + 'static,
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<RangePage, ControlError>> + Send + 'static,
{
    let state = Some(Ok(first));
    Box::pin(futures::stream::unfold(
        (state, next),
        move |(state, next)| async move {
            let page = match state? {
                Ok(p) => p,
                Err(status) => return Some((Err(status), (None, next))),
            };
            let following = match page.next_offset {
                0 => None,
                at => Some(next(at).await.map_err(Status::from)),
            };
            Some((Ok(wrap(message(&page))), (following, next)))
        },
    ))
}

#[tonic::async_trait]
impl SnapshotMetadataService for SnapshotMetadata {
    type GetMetadataAllocatedStream = Pages<csi::GetMetadataAllocatedResponse>;
    type GetMetadataDeltaStream = Pages<csi::GetMetadataDeltaResponse>;

    async fn get_metadata_allocated(
        &self,
        r: Request<csi::GetMetadataAllocatedRequest>,
    ) -> Result<Response<Self::GetMetadataAllocatedStream>, Status> {
        let r = r.into_inner();
        let name = snapshot_name("snapshot_id", &r.snapshot_id)?;
        let (start, max) = window(r.starting_offset, r.max_results)?;
        let first = self.control.snapshot_allocated(&name, start, max).await?;
        let control = self.control.clone();
        let next = move |at: u64| {
            let (control, name) = (control.clone(), name.clone());
            async move { control.snapshot_allocated(&name, at, max).await }
        };
        Ok(Response::new(stream_pages(first, next, |m| {
            csi::GetMetadataAllocatedResponse {
                block_metadata_type: csi::BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes: m.capacity,
                block_metadata: m.tuples,
            }
        })))
    }

    async fn get_metadata_delta(
        &self,
        r: Request<csi::GetMetadataDeltaRequest>,
    ) -> Result<Response<Self::GetMetadataDeltaStream>, Status> {
        let r = r.into_inner();
        let base = snapshot_name("base_snapshot_id", &r.base_snapshot_id)?;
        let target = snapshot_name("target_snapshot_id", &r.target_snapshot_id)?;
        let (start, max) = window(r.starting_offset, r.max_results)?;
        let first = self
            .control
            .snapshot_delta(&target, &base, start, max)
            .await?;
        let control = self.control.clone();
        let next = move |at: u64| {
            let (control, target, base) = (control.clone(), target.clone(), base.clone());
            async move { control.snapshot_delta(&target, &base, at, max).await }
        };
        Ok(Response::new(stream_pages(first, next, |m| {
            csi::GetMetadataDeltaResponse {
                block_metadata_type: csi::BlockMetadataType::VariableLength as i32,
                volume_capacity_bytes: m.capacity,
                block_metadata: m.tuples,
            }
        })))
    }
}
