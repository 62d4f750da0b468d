//! The `csi.v1.Node` service: checks each request's fields, asks the local
//! worker whether the volume exists, and runs the node operation on a
//! blocking thread. `csi.v1` types stop here.

use std::collections::HashMap;
use std::sync::Arc;

use cowsnap_proto::bad_request::field_error;
use cowsnap_proto::csi::v1 as csi;
use cowsnap_proto::csi::v1::node_server::Node as NodeApi;
use cowsnap_proto::csi::v1::node_service_capability::rpc::Type as RpcType;
use cowsnap_proto::csi::v1::volume_capability::AccessType;
use cowsnap_proto::csi::v1::volume_capability::access_mode::Mode;
use cowsnap_proto::names;
use cowsnap_worker::error::WorkerError;
use cowsnap_worker::worker::Worker;
use tonic::{Request, Response, Status};

use super::error::NodeError;
use super::publish::PublishReq;
use super::stage::Stage;
use super::state::Access;
use super::stats::VolumeStats;
use super::{Node, NodeConfig};
use crate::TOPOLOGY_NODE_KEY;
use crate::required;

/// The file system made when a mount capability names none.
pub const DEFAULT_FS: &str = "ext4";

/// The Node service of one worker.
#[derive(Clone)]
pub struct NodeGrpc {
    node: Arc<Node>,
    worker: Arc<Worker>,
}

impl NodeGrpc {
    pub fn new(node: Arc<Node>, worker: Arc<Worker>) -> Self {
        NodeGrpc { node, worker }
    }

    /// Opens the node plugin of a started worker and brings its staged
    /// volumes back ([`Node::recover`]) before returning, so no call sees
    /// them half attached. The worker's NBD server must be serving.
    pub async fn start(cfg: NodeConfig, worker: Arc<Worker>) -> anyhow::Result<NodeGrpc> {
        let node = Arc::new(Node::open(cfg)?);
        let n = node.clone();
        tokio::task::spawn_blocking(move || n.recover()).await??;
        Ok(NodeGrpc { node, worker })
    }

    /// How this node attaches volumes (resolved: kernel or nbdfuse).
    pub fn attach(&self) -> super::AttachWith {
        self.node.config().attach
    }

    /// The tonic service, for an endpoint's router.
    pub fn server(self) -> csi::node_server::NodeServer<NodeGrpc> {
        csi::node_server::NodeServer::new(self)
    }

    /// The cowsnap volume of CSI volume `id`, which must exist on this
    /// worker: INVALID_ARGUMENT when missing, NOT_FOUND when unknown.
    async fn volume(&self, id: &str) -> Result<String, Status> {
        required("volume_id", id)?;
        if names::check_id(id).is_err() {
            return Err(Status::not_found(format!(
                "volume {} does not exist",
                names::quote(id)
            )));
        }
        match self.worker.get_volume(&names::volume(id)).await {
            Ok(_) => Ok(id.to_string()),
            Err(WorkerError::NotFound(_)) => Err(Status::not_found(format!(
                "volume {id} does not exist on node {}",
                self.node.config().node
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs `f` on the node on a blocking thread.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Node) -> Result<T, NodeError> + Send + 'static,
    ) -> Result<T, Status> {
        let node = self.node.clone();
        tokio::task::spawn_blocking(move || f(&node))
            .await
            .map_err(|e| Status::internal(format!("node task: {e}")))?
            .map_err(Status::from)
    }
}

/// The access of a volume capability: INVALID_ARGUMENT when it is missing,
/// names no access type, or asks a multi-node access mode.
fn access(cap: Option<&csi::VolumeCapability>) -> Result<Access, Status> {
    let cap =
        cap.ok_or_else(|| field_error("volume_capability", "volume_capability is required"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        Mode::Unknown => {
            return Err(field_error(
                "volume_capability.access_mode",
                "volume_capability.access_mode is required",
            ));
        }
        other => {
            return Err(field_error(
                "volume_capability.access_mode",
                format!(
                    "access mode {} is not supported: a cowsnap volume is attached to one node",
                    other.as_str_name()
                ),
            ));
        }
    }
    match &cap.access_type {
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            let fs_type = if m.fs_type.is_empty() {
                DEFAULT_FS.to_string()
            } else {
                m.fs_type.clone()
            };
            if !matches!(fs_type.as_str(), "ext4" | "ext3" | "ext2" | "xfs") {
                return Err(field_error(
                    "volume_capability.mount.fs_type",
                    format!(
                        "fs_type {} is not supported (ext4, ext3, ext2, xfs)",
                        names::quote(&fs_type)
                    ),
                ));
            }
            if let Some(f) = m
                .mount_flags
                .iter()
                .find(|f| f.is_empty() || f.contains(','))
            {
                return Err(field_error(
                    "volume_capability.mount.mount_flags",
                    format!(
                        "mount flag {} must be one non-empty option",
                        names::quote(f)
                    ),
                ));
            }
            Ok(Access::Mount {
                fs_type,
                flags: m.mount_flags.clone(),
            })
        }
        None => Err(field_error(
            "volume_capability.access_type",
            "volume_capability needs an access type (block or mount)",
        )),
    }
}

fn rpc_cap(t: RpcType) -> csi::NodeServiceCapability {
    csi::NodeServiceCapability {
        r#type: Some(csi::node_service_capability::Type::Rpc(
            csi::node_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

fn usage(u: super::stats::Usage, unit: csi::volume_usage::Unit) -> csi::VolumeUsage {
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    csi::VolumeUsage {
        available: i(u.available),
        total: i(u.total),
        used: i(u.used),
        unit: unit as i32,
    }
}

#[tonic::async_trait]
impl NodeApi for NodeGrpc {
    async fn node_stage_volume(
        &self,
        req: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        let staging_path = self
            .node
            .config()
            .check_path("staging_target_path", &r.staging_target_path)?;
        let access = access(r.volume_capability.as_ref())?;
        let volume = self.volume(&r.volume_id).await?;
        let stage = Stage {
            volume,
            staging_path,
            access,
        };
        self.run(move |n| n.stage(&stage)).await?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        let staging_path = self
            .node
            .config()
            .check_path("staging_target_path", &r.staging_target_path)?;
        let id = r.volume_id;
        self.run(move |n| n.unstage(&id, &staging_path)).await?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        let cfg = self.node.config();
        let target_path = cfg.check_path("target_path", &r.target_path)?;
        let access = access(r.volume_capability.as_ref())?;
        if r.staging_target_path.is_empty() {
            // STAGE_UNSTAGE_VOLUME is advertised: the spec's precondition.
            return Err(Status::failed_precondition(
                "staging_target_path is required: this plugin stages volumes",
            ));
        }
        let staging_path = cfg.check_path("staging_target_path", &r.staging_target_path)?;
        let volume = self.volume(&r.volume_id).await?;
        let p = PublishReq {
            volume,
            staging_path,
            target_path,
            access,
            readonly: r.readonly,
        };
        self.run(move |n| n.publish(&p)).await?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        let target = self
            .node
            .config()
            .check_path("target_path", &r.target_path)?;
        let id = r.volume_id;
        // A volume neither staged here nor known to the worker: NOT_FOUND.
        if !self.node.is_staged(&id) {
            self.volume(&id).await?;
        }
        self.run(move |n| n.unpublish(&id, &target)).await?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        let id = r.volume_id;
        if !self.node.is_staged(&id) {
            self.volume(&id).await?;
        }
        let path = std::path::PathBuf::from(&r.volume_path);
        let stats = self.run(move |n| n.stats(&id, &path)).await?;
        use csi::volume_usage::Unit;
        let usage = match stats {
            VolumeStats::Fs { bytes, inodes } => {
                vec![usage(bytes, Unit::Bytes), usage(inodes, Unit::Inodes)]
            }
            VolumeStats::Block { total_bytes } => vec![csi::VolumeUsage {
                total: i64::try_from(total_bytes).unwrap_or(i64::MAX),
                unit: Unit::Bytes as i32,
                ..Default::default()
            }],
        };
        Ok(Response::new(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: None,
        }))
    }

    async fn node_expand_volume(
        &self,
        req: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = req.into_inner();
        required("volume_id", &r.volume_id)?;
        required("volume_path", &r.volume_path)?;
        if let Some(cap) = r.volume_capability.as_ref() {
            access(Some(cap))?;
        }
        let required_bytes = match r.capacity_range {
            Some(c) => u64::try_from(c.required_bytes).map_err(|_| {
                field_error(
                    "capacity_range.required_bytes",
                    format!(
                        "capacity_range.required_bytes is negative ({})",
                        c.required_bytes
                    ),
                )
            })?,
            None => 0,
        };
        let id = r.volume_id;
        if !self.node.is_staged(&id) {
            self.volume(&id).await?;
        }
        let path = std::path::PathBuf::from(&r.volume_path);
        let size = self
            .run(move |n| n.expand(&id, &path, required_bytes))
            .await?;
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![
                rpc_cap(RpcType::StageUnstageVolume),
                rpc_cap(RpcType::GetVolumeStats),
                rpc_cap(RpcType::ExpandVolume),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let node = self.node.config().node.clone();
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: node.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(csi::Topology {
                segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), node)]),
            }),
        }))
    }
}
