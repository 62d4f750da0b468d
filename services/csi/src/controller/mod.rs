//! The CSI Controller service: volumes and snapshots through the control
//! service's domain code ([`cowsnap_control::control::Control`]), so that
//! every CSI call is recorded as an operation, idempotent, and repaired
//! after a crash exactly like a `cowsnap.v1` call.
//!
//! - [`volumes`]: CreateVolume (empty, restore, clone), DeleteVolume,
//!   ListVolumes, ControllerGetVolume, ValidateVolumeCapabilities,
//!   GetCapacity, ControllerExpandVolume;
//! - [`snapshots`]: CreateSnapshot, DeleteSnapshot, ListSnapshots,
//!   GetSnapshot;
//! - [`params`]: StorageClass / VolumeSnapshotClass parameters and
//!   capacity ranges; [`capabilities`]: volume capabilities;
//!   [`topology`]: placement on a node's worker.
//!
//! Not offered: ControllerPublish/Unpublish (a node reaches a volume's NBD
//! export itself), ControllerModifyVolume.

pub mod capabilities;
pub mod params;
pub mod snapshots;
pub mod topology;
pub mod volumes;

use std::sync::Arc;

use cowsnap_control::control::Control;
use cowsnap_proto::csi::v1 as csi;
use csi::controller_server::Controller as ControllerService;
use csi::controller_service_capability::rpc::Type as Cap;
use tonic::{Request, Response, Status};

use crate::required;

type Rpc<T> = Result<Response<T>, Status>;

/// The capabilities ControllerGetCapabilities reports. GetSnapshot (alpha
/// in v1.12) is served but not advertised: csi-sanity, built on spec v1.10,
/// fails a driver that reports a capability it does not know.
pub const CAPABILITIES: [Cap; 8] = [
    Cap::CreateDeleteVolume,
    Cap::ListVolumes,
    Cap::GetCapacity,
    Cap::CreateDeleteSnapshot,
    Cap::ListSnapshots,
    Cap::CloneVolume,
    Cap::GetVolume,
    Cap::ExpandVolume,
];

/// The CSI Controller service over the control service's domain.
#[derive(Clone)]
pub struct Controller {
    control: Arc<Control>,
}

impl Controller {
    pub fn new(control: Arc<Control>) -> Controller {
        Controller { control }
    }

    /// The control service's domain it works on.
    pub fn control(&self) -> Arc<Control> {
        self.control.clone()
    }
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not offered by cowsnap"))
}

#[tonic::async_trait]
impl ControllerService for Controller {
    async fn create_volume(
        &self,
        r: Request<csi::CreateVolumeRequest>,
    ) -> Rpc<csi::CreateVolumeResponse> {
        let wait = volumes::copy_wait(
            r.metadata()
                .get("grpc-timeout")
                .and_then(|v| v.to_str().ok()),
        );
        let v = self.create_volume(r.into_inner(), wait).await?;
        Ok(Response::new(csi::CreateVolumeResponse { volume: Some(v) }))
    }

    async fn delete_volume(
        &self,
        r: Request<csi::DeleteVolumeRequest>,
    ) -> Rpc<csi::DeleteVolumeResponse> {
        self.delete_volume(&r.into_inner().volume_id).await?;
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Rpc<csi::ControllerPublishVolumeResponse> {
        Err(unimplemented("ControllerPublishVolume"))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Rpc<csi::ControllerUnpublishVolumeResponse> {
        Err(unimplemented("ControllerUnpublishVolume"))
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Rpc<csi::ValidateVolumeCapabilitiesResponse> {
        Ok(Response::new(self.validate(r.into_inner()).await?))
    }

    async fn list_volumes(
        &self,
        r: Request<csi::ListVolumesRequest>,
    ) -> Rpc<csi::ListVolumesResponse> {
        let r = r.into_inner();
        Ok(Response::new(
            self.list_volumes(r.max_entries, &r.starting_token).await?,
        ))
    }

    async fn get_capacity(
        &self,
        r: Request<csi::GetCapacityRequest>,
    ) -> Rpc<csi::GetCapacityResponse> {
        Ok(Response::new(self.capacity(r.into_inner()).await?))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Rpc<csi::ControllerGetCapabilitiesResponse> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|&c| csi::ControllerServiceCapability {
                r#type: Some(csi::controller_service_capability::Type::Rpc(
                    csi::controller_service_capability::Rpc { r#type: c as i32 },
                )),
            })
            .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        r: Request<csi::CreateSnapshotRequest>,
    ) -> Rpc<csi::CreateSnapshotResponse> {
        let s = self.create_snapshot(r.into_inner()).await?;
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(s),
        }))
    }

    async fn delete_snapshot(
        &self,
        r: Request<csi::DeleteSnapshotRequest>,
    ) -> Rpc<csi::DeleteSnapshotResponse> {
        self.delete_snapshot(&r.into_inner().snapshot_id).await?;
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        r: Request<csi::ListSnapshotsRequest>,
    ) -> Rpc<csi::ListSnapshotsResponse> {
        Ok(Response::new(self.list_snapshots(r.into_inner()).await?))
    }

    async fn get_snapshot(
        &self,
        r: Request<csi::GetSnapshotRequest>,
    ) -> Rpc<csi::GetSnapshotResponse> {
        let s = self.get_snapshot(&r.into_inner().snapshot_id).await?;
        Ok(Response::new(csi::GetSnapshotResponse {
            snapshot: Some(s),
        }))
    }

    async fn controller_expand_volume(
        &self,
        r: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Rpc<csi::ControllerExpandVolumeResponse> {
        Ok(Response::new(self.expand_volume(r.into_inner()).await?))
    }

    async fn controller_get_volume(
        &self,
        r: Request<csi::ControllerGetVolumeRequest>,
    ) -> Rpc<csi::ControllerGetVolumeResponse> {
        let r = r.into_inner();
        required("volume_id", &r.volume_id)?;
        let v = self.visible_volume(&r.volume_id).await?;
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(volumes::volume(&v)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: Vec::new(),
                volume_condition: None,
            }),
        }))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Rpc<csi::ControllerModifyVolumeResponse> {
        Err(unimplemented("ControllerModifyVolume"))
    }
}
