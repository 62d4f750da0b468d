//! cowsnap's Kubernetes CSI driver (`csi.v1`, spec v1.12).
//!
//! - [`identity`]: Identity (plugin name, capabilities, readiness);
//! - [`controller`]: Controller, on top of the control service's domain code
//!   (volumes, snapshots, recorded operations), never beside it;
//! - [`node`]: Node, on top of the worker (staging and publishing on a node).
//!
//! The plugin's name is [`PLUGIN_NAME`]; volumes are placed by the topology
//! key [`TOPOLOGY_NODE_KEY`].

pub mod controller;
pub mod identity;
pub mod node;

/// The CSI plugin name (`GetPluginInfo`), the `provisioner` of a StorageClass.
pub const PLUGIN_NAME: &str = "csi.cowsnap.io";

/// The topology segment key that names the worker (node) holding a volume.
pub const TOPOLOGY_NODE_KEY: &str = "topology.cowsnap.io/node";
