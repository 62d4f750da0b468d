//! The CSI Identity service: the plugin's name and version, what it offers
//! (the controller service when this endpoint serves it, with OFFLINE
//! volume expansion, and the snapshot metadata service beside it when asked
//! to advertise it; topology constraints: a volume is reachable from its
//! worker's node), and whether it is ready (the catalog answers).

use std::sync::Arc;

use cowsnap_control::control::Control;
use cowsnap_proto::csi::v1 as csi;
use csi::identity_server::Identity as IdentityService;
use csi::plugin_capability::service::Type as ServiceType;
use csi::plugin_capability::volume_expansion::Type as ExpansionType;
use tonic::{Request, Response, Status};

use crate::PLUGIN_NAME;

/// The CSI Identity service of one endpoint.
#[derive(Clone)]
pub struct Identity {
    /// The control service's domain, when this endpoint serves the
    /// Controller service.
    control: Option<Arc<Control>>,
    /// Whether to advertise SNAPSHOT_METADATA_SERVICE (see
    /// [`Identity::advertise_snapshot_metadata`]).
    snapshot_metadata: bool,
}

impl Identity {
    pub fn new(control: Option<Arc<Control>>) -> Identity {
        Identity {
            control,
            snapshot_metadata: false,
        }
    }

    /// Advertises SNAPSHOT_METADATA_SERVICE when `on` and this endpoint
    /// serves the Controller (SnapshotMetadata is served beside it either
    /// way). Off by default: the external-snapshot-metadata sidecar needs
    /// it, but csi-sanity (built on spec v1.10) fails a driver that
    /// reports it ("Unknown service").
    pub fn advertise_snapshot_metadata(mut self, on: bool) -> Identity {
        self.snapshot_metadata = on;
        self
    }
}

fn service(t: ServiceType) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::Service(
            csi::plugin_capability::Service { r#type: t as i32 },
        )),
    }
}

fn volume_expansion(t: ExpansionType) -> csi::PluginCapability {
    csi::PluginCapability {
        r#type: Some(csi::plugin_capability::Type::VolumeExpansion(
            csi::plugin_capability::VolumeExpansion { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl IdentityService for Identity {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: PLUGIN_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        let mut capabilities = vec![service(ServiceType::VolumeAccessibilityConstraints)];
        if self.control.is_some() {
            capabilities.insert(0, service(ServiceType::ControllerService));
            // The export grows online, but a node's device learns its size
            // when it attaches (see node::expand): the CO grows volumes
            // that are not published.
            capabilities.push(volume_expansion(ExpansionType::Offline));
            if self.snapshot_metadata {
                capabilities.push(service(ServiceType::SnapshotMetadataService));
            }
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        if let Some(c) = &self.control {
            c.catalog_ready()
                .await
                .map_err(|e| Status::unavailable(format!("the catalog does not answer: {e}")))?;
        }
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}
