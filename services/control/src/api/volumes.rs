//! `cowsnap.v1.VolumeService`.

use cowsnap_proto::bad_request::invalid_argument;
use cowsnap_proto::cowsnap::v1 as pb;
use pb::volume_service_server::VolumeService;
use tonic::{Request, Response};

use super::convert::{operation, volume};
use super::{Api, Rpc};
use crate::volumes::{CopiedVolume, NewVolume};

#[tonic::async_trait]
impl VolumeService for Api {
    async fn create_volume(&self, r: Request<pb::CreateVolumeRequest>) -> Rpc<pb::Volume> {
        let r = r.into_inner();
        let v = r
            .volume
            .ok_or_else(|| invalid_argument("volume", "required"))?;
        let spec = NewVolume {
            size_bytes: v.size_bytes,
            chunk_sectors: v.chunk_sectors,
            labels: v.labels.into_iter().collect(),
            workers: Vec::new(),
        };
        let v = self.control.create_volume(&r.volume_id, spec).await?;
        Ok(Response::new(volume(v)))
    }

    async fn expand_volume(&self, r: Request<pb::ExpandVolumeRequest>) -> Rpc<pb::Volume> {
        let r = r.into_inner();
        let v = self.control.expand_volume(&r.name, r.size_bytes).await?;
        Ok(Response::new(volume(v)))
    }

    async fn get_volume(&self, r: Request<pb::GetVolumeRequest>) -> Rpc<pb::Volume> {
        let v = self.control.get_volume(&r.into_inner().name).await?;
        Ok(Response::new(volume(v)))
    }

    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Rpc<pb::ListVolumesResponse> {
        let r = r.into_inner();
        let (vols, next) = self
            .control
            .list_volumes(r.page_size, &r.page_token, &r.filter)
            .await?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: vols.into_iter().map(volume).collect(),
            next_page_token: next,
        }))
    }

    async fn delete_volume(&self, r: Request<pb::DeleteVolumeRequest>) -> Rpc<()> {
        let r = r.into_inner();
        self.control
            .delete_volume(&r.name, r.defer_while_snapshots)
            .await?;
        Ok(Response::new(()))
    }

    async fn restore_volume(&self, r: Request<pb::RestoreVolumeRequest>) -> Rpc<pb::Operation> {
        let r = r.into_inner();
        let v = r.volume.unwrap_or_default();
        let spec = CopiedVolume {
            chunk_sectors: v.chunk_sectors,
            labels: v.labels.into_iter().collect(),
        };
        let op = self
            .control
            .restore_volume(&r.volume_id, &r.source_snapshot, spec)
            .await?;
        Ok(Response::new(operation(op)))
    }

    async fn clone_volume(&self, r: Request<pb::CloneVolumeRequest>) -> Rpc<pb::Operation> {
        let r = r.into_inner();
        let v = r.volume.unwrap_or_default();
        let spec = CopiedVolume {
            chunk_sectors: v.chunk_sectors,
            labels: v.labels.into_iter().collect(),
        };
        let op = self
            .control
            .clone_volume(&r.volume_id, &r.source_volume, spec)
            .await?;
        Ok(Response::new(operation(op)))
    }
}
