//! `cowsnap.v1.SnapshotService`.

use cowsnap_proto::cowsnap::v1 as pb;
use pb::snapshot_service_server::SnapshotService;
use tonic::{Request, Response};

use super::convert::{operation, snapshot};
use super::{Api, Rpc};
use crate::error::ControlError;
use crate::snapshots::NewSnapshot;

#[tonic::async_trait]
impl SnapshotService for Api {
    async fn create_snapshot(&self, r: Request<pb::CreateSnapshotRequest>) -> Rpc<pb::Snapshot> {
        let r = r.into_inner();
        let s = r.snapshot.unwrap_or_default();
        let spec = NewSnapshot {
            cow_size_bytes: s.cow_size_bytes,
            labels: s.labels.into_iter().collect(),
            writable: s.writable,
        };
        let s = self
            .control
            .create_snapshot(&r.parent, &r.snapshot_id, spec)
            .await?;
        Ok(Response::new(snapshot(s)))
    }

    async fn get_snapshot(&self, r: Request<pb::GetSnapshotRequest>) -> Rpc<pb::Snapshot> {
        let s = self.control.get_snapshot(&r.into_inner().name).await?;
        Ok(Response::new(snapshot(s)))
    }

    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Rpc<pb::ListSnapshotsResponse> {
        let r = r.into_inner();
        let (snaps, next) = self
            .control
            .list_snapshots(&r.parent, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots: snaps.into_iter().map(snapshot).collect(),
            next_page_token: next,
        }))
    }

    async fn delete_snapshot(&self, r: Request<pb::DeleteSnapshotRequest>) -> Rpc<()> {
        self.control.delete_snapshot(&r.into_inner().name).await?;
        Ok(Response::new(()))
    }

    async fn get_snapshot_delta(
        &self,
        r: Request<pb::GetSnapshotDeltaRequest>,
    ) -> Rpc<pb::SnapshotDelta> {
        let r = r.into_inner();
        let max = u32::try_from(r.page_size)
            .map_err(|_| ControlError::invalid("page_size", "must not be negative"))?;
        let p = self
            .control
            .snapshot_delta(&r.name, &r.base_snapshot, r.starting_offset, max)
            .await?;
        Ok(Response::new(pb::SnapshotDelta {
            volume_size_bytes: p.size_bytes,
            ranges: p
                .ranges
                .into_iter()
                .map(|(offset, length)| pb::ByteRange { offset, length })
                .collect(),
            block_bytes: p.block_bytes,
            next_offset: p.next_offset,
        }))
    }

    async fn merge_snapshot(&self, r: Request<pb::MergeSnapshotRequest>) -> Rpc<pb::Operation> {
        let op = self.control.merge_snapshot(&r.into_inner().name).await?;
        Ok(Response::new(operation(op)))
    }
}
