//! The CSI Identity service: the plugin's name and version, what it offers
//! (the controller service when this endpoint serves it, with OFFLINE
//! volume expansion, or ONLINE when every node attaches with the kernel's
//! NBD client, and the snapshot metadata service beside it when asked to
//! advertise it; topology constraints: a volume is reachable from its
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
    /// Whether volume expansion is ONLINE (see
    /// [`Identity::online_expansion`]).
    online_expansion: bool,
}

impl Identity {
    pub fn new(control: Option<Arc<Control>>) -> Identity {
        Identity {
            control,
            snapshot_metadata: false,
            online_expansion: false,
        }
    }

    /// Advertises ONLINE volume expansion when `on` (else OFFLINE): right
    /// when every node attaches with the kernel's NBD client, whose
    /// devices grow in place; an nbdfuse device learns its size when it
    /// attaches (see node::expand), so with nbdfuse nodes the CO must grow
    /// volumes that are not published.
    pub fn online_expansion(mut self, on: bool) -> Identity {
        self.online_expansion = on;
        self
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

/// What an endpoint advertises: with the Controller service, volume
/// expansion (ONLINE or OFFLINE) and, if asked, SnapshotMetadata.
fn capabilities(controller: bool, online: bool, metadata: bool) -> Vec<csi::PluginCapability> {
    let mut capabilities = vec![service(ServiceType::VolumeAccessibilityConstraints)];
    if controller {
        capabilities.insert(0, service(ServiceType::ControllerService));
        capabilities.push(volume_expansion(if online {
            ExpansionType::Online
        } else {
            ExpansionType::Offline
        }));
        if metadata {
            capabilities.push(service(ServiceType::SnapshotMetadataService));
        }
    }
    capabilities
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
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: capabilities(
                self.control.is_some(),
                self.online_expansion,
                self.snapshot_metadata,
            ),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn expansion(caps: &[csi::PluginCapability]) -> Vec<i32> {
        caps.iter()
            .filter_map(|c| match &c.r#type {
                Some(csi::plugin_capability::Type::VolumeExpansion(e)) => Some(e.r#type),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn expansion_is_advertised_with_the_controller_online_or_offline() {
        assert_eq!(
            expansion(&capabilities(true, false, false)),
            [ExpansionType::Offline as i32]
        );
        assert_eq!(
            expansion(&capabilities(true, true, false)),
            [ExpansionType::Online as i32]
        );
        // A node-only endpoint (Identity + Node) advertises none.
        assert!(expansion(&capabilities(false, true, true)).is_empty());
        assert_eq!(capabilities(false, true, true).len(), 1);
        assert_eq!(capabilities(true, false, true).len(), 4);
    }
}
