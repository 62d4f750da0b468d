//! cowsnap's Kubernetes CSI driver (`csi.v1`, spec v1.12).
//!
//! - [`identity`]: Identity (plugin name, capabilities, readiness);
//! - [`controller`]: Controller, on top of the control service's domain code
//!   (volumes, snapshots, recorded operations), never beside it;
//! - [`metadata`]: SnapshotMetadata (allocated and changed block ranges of
//!   snapshots), served beside the Controller;
//! - [`node`]: Node, on top of the worker (staging and publishing on a node);
//! - [`ids`]: how CSI names and ids map to cowsnap ids;
//! - [`endpoint`]: the unix socket the services are served on, and the one
//!   place ([`endpoint::router`]) that decides which services it carries.
//!
//! The plugin's name is [`PLUGIN_NAME`]; volumes are placed by the topology
//! key [`TOPOLOGY_NODE_KEY`], whose value is a worker id.

pub mod controller;
pub mod endpoint;
pub mod identity;
pub mod ids;
pub mod metadata;
pub mod node;

/// The CSI plugin name (`GetPluginInfo`), the `provisioner` of a StorageClass.
pub const PLUGIN_NAME: &str = "csi.cowsnap.io";

/// The topology segment key whose value is the id of the worker (and so the
/// node) that holds a volume.
pub const TOPOLOGY_NODE_KEY: &str = "topology.cowsnap.io/node";

/// INVALID_ARGUMENT "`field` is required" when a request leaves `value`
/// empty: the spec's answer to every missing required field.
pub(crate) fn required(field: &str, value: &str) -> Result<(), tonic::Status> {
    if value.is_empty() {
        return Err(cowsnap_proto::bad_request::field_error(
            field,
            format!("{field} is required"),
        ));
    }
    Ok(())
}
