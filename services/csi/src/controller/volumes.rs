//! CreateVolume (empty, restored from a snapshot, cloned from a volume),
//! DeleteVolume, ListVolumes, ControllerGetVolume,
//! ValidateVolumeCapabilities and GetCapacity, each through the control
//! service's domain calls.

use std::time::Duration;

use cowsnap_control::error::ControlError;
use cowsnap_control::model::{self, Labels, OpState, Operation, State, Volume};
use cowsnap_control::volumes::{CopiedVolume, NewVolume};
use cowsnap_proto::bad_request::field_error;
use cowsnap_proto::csi::v1 as csi;
use cowsnap_proto::names;
use tonic::Status;

use super::params::{self, COW_SIZE_LABEL, NAME_LABEL};
use super::{Controller, capabilities, topology};
use crate::ids;
use crate::required;

/// The longest a CreateVolume waits for a restore or clone before it
/// answers ABORTED ("in progress") for the CO to repeat the call.
pub const COPY_WAIT: Duration = Duration::from_secs(20);

/// The labels cowsnap keeps on what it makes for a CSI name.
pub(super) fn labels_for(name: &str, cow_size_bytes: u64) -> Labels {
    let mut l = Labels::new();
    if name.len() <= 63 && !name.chars().any(char::is_control) {
        l.insert(NAME_LABEL.into(), name.into());
    }
    if cow_size_bytes > 0 {
        l.insert(COW_SIZE_LABEL.into(), cow_size_bytes.to_string());
    }
    l
}

/// The CSI view of a volume.
pub fn volume(v: &Volume) -> csi::Volume {
    let content_source = if v.source.is_empty() {
        None
    } else if let Ok((sv, ss)) = names::parse_snapshot(&v.source) {
        Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: ids::snapshot_id(sv, ss),
                },
            )),
        })
    } else {
        names::parse_volume(&v.source)
            .ok()
            .map(|sv| csi::VolumeContentSource {
                r#type: Some(csi::volume_content_source::Type::Volume(
                    csi::volume_content_source::VolumeSource {
                        volume_id: sv.to_string(),
                    },
                )),
            })
    };
    csi::Volume {
        capacity_bytes: v.size_bytes as i64,
        volume_id: v.id.clone(),
        volume_context: Default::default(),
        content_source,
        accessible_topology: vec![topology::segment(&v.worker_id)],
    }
}

/// Whether CSI shows a volume (one being deleted, deleted while its
/// snapshots live on, or whose making failed, is gone for it).
pub(super) fn visible(v: &Volume) -> bool {
    !matches!(
        v.state,
        State::Deleting | State::Failed | State::DeletedWithSnapshots
    )
}

/// The CSI status of a domain error.
pub(super) fn status(e: ControlError) -> Status {
    Status::from(e)
}

/// How long a restore or clone may be waited for within the CO's deadline
/// (`grpc-timeout`, e.g. `10S`): three quarters of it, at most
/// [`COPY_WAIT`].
pub(super) fn copy_wait(grpc_timeout: Option<&str>) -> Duration {
    let parsed = grpc_timeout.filter(|t| t.is_ascii()).and_then(|t| {
        let (n, unit) = t.split_at(t.len().checked_sub(1)?);
        let n: u64 = n.parse().ok()?;
        Some(match unit {
            "H" => Duration::from_secs(n.saturating_mul(3600)),
            "M" => Duration::from_secs(n.saturating_mul(60)),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return None,
        })
    });
    parsed.map_or(COPY_WAIT, |d| (d * 3 / 4).min(COPY_WAIT))
}

/// A restore or clone as CreateVolume asks for it: its source, the new
/// volume's chunk size and labels, the capacity asked and the workers the
/// topology allows (empty: any).
struct CopyAsk<'a> {
    src: csi::volume_content_source::Type,
    chunk_sectors: u32,
    labels: Labels,
    range: Option<&'a csi::CapacityRange>,
    candidates: &'a [String],
}

impl Controller {
    pub(super) async fn create_volume(
        &self,
        r: csi::CreateVolumeRequest,
        wait: Duration,
    ) -> Result<csi::Volume, Status> {
        ids::check_name(&r.name).map_err(|e| field_error("name", format!("name {e}")))?;
        capabilities::check(&r.volume_capabilities)
            .map_err(|e| field_error("volume_capabilities", e))?;
        let p = params::volume_params(&r.parameters)?;
        let candidates = topology::candidates(r.accessibility_requirements.as_ref())?;
        let id = ids::id_from_name(&r.name);
        let labels = labels_for(&r.name, p.cow_size_bytes);
        let source = r.volume_content_source.and_then(|s| s.r#type);
        let v = match source {
            None => {
                let chunk = if p.chunk_sectors == 0 {
                    model::DEFAULT_CHUNK_SECTORS
                } else {
                    p.chunk_sectors
                };
                let size =
                    params::volume_size(r.capacity_range.as_ref(), params::alignment(chunk))?;
                let spec = NewVolume {
                    size_bytes: size,
                    chunk_sectors: p.chunk_sectors,
                    labels,
                    workers: candidates,
                };
                self.control
                    .create_volume(&id, spec)
                    .await
                    .map_err(status)?
            }
            Some(src) => {
                let ask = CopyAsk {
                    src,
                    chunk_sectors: p.chunk_sectors,
                    labels,
                    range: r.capacity_range.as_ref(),
                    candidates: &candidates,
                };
                self.copy_volume(&id, ask, wait).await?
            }
        };
        Ok(volume(&v))
    }

    /// A restore (snapshot source) or clone (volume source): started, then
    /// waited for up to `wait`; ABORTED while it still runs.
    async fn copy_volume(
        &self,
        id: &str,
        ask: CopyAsk<'_>,
        wait: Duration,
    ) -> Result<Volume, Status> {
        use csi::volume_content_source::Type;
        let CopyAsk {
            src,
            chunk_sectors,
            labels,
            range,
            candidates,
        } = ask;
        let (source_volume, source_name) = match &src {
            Type::Snapshot(s) => {
                let (sv, ss) = ids::parse_snapshot_id(&s.snapshot_id).ok_or_else(|| {
                    Status::not_found(format!(
                        "snapshot {} not found",
                        names::quote(&s.snapshot_id)
                    ))
                })?;
                (sv.to_string(), names::snapshot(sv, ss))
            }
            Type::Volume(s) => {
                let sv = ids::parse_volume_id(&s.volume_id).ok_or_else(|| {
                    Status::not_found(format!("volume {} not found", names::quote(&s.volume_id)))
                })?;
                (sv.to_string(), names::volume(sv))
            }
        };
        let sv = self
            .control
            .get_volume(&names::volume(&source_volume))
            .await
            .map_err(|e| match e {
                ControlError::NotFound(_) => {
                    Status::not_found(format!("source {source_name} not found"))
                }
                e => status(e),
            })?;
        if matches!(src, Type::Volume(_)) && !visible(&sv) {
            return Err(Status::not_found(format!("source {source_name} not found")));
        }
        // A restore starts at the snapshot's size (its volume may have grown
        // since), a clone at the volume's; either is grown once made when
        // the range asks for more.
        let src_size = match &src {
            Type::Snapshot(_) => {
                self.control
                    .get_snapshot(&source_name)
                    .await
                    .map_err(|e| match e {
                        ControlError::NotFound(_) => {
                            Status::not_found(format!("source {source_name} not found"))
                        }
                        e => status(e),
                    })?
                    .size_bytes
            }
            Type::Volume(_) => sv.size_bytes,
        };
        let chunk = if chunk_sectors == 0 {
            sv.chunk_sectors
        } else {
            chunk_sectors
        };
        let size = params::size_at_least(range, src_size, params::alignment(chunk))?;
        if !candidates.is_empty() && !candidates.contains(&sv.worker_id) {
            return Err(Status::resource_exhausted(format!(
                "{source_name} is on workers/{}, which the topology requirement does not allow \
                 (a copy is made on its source's worker)",
                sv.worker_id
            )));
        }
        let spec = CopiedVolume {
            chunk_sectors,
            labels,
        };
        let op = match src {
            Type::Snapshot(_) => self.control.restore_volume(id, &source_name, spec).await,
            Type::Volume(_) => self.control.clone_volume(id, &source_name, spec).await,
        }
        .map_err(status)?;
        let op = if op.state.done() {
            op
        } else {
            self.control
                .wait_operation(&op.name(), wait)
                .await
                .map_err(status)?
        };
        let v = self.made(id, &source_name, op).await?;
        if v.size_bytes >= size {
            return Ok(v);
        }
        self.control
            .expand_volume(&names::volume(id), size)
            .await
            .map_err(status)
    }

    /// ControllerExpandVolume: grows the volume online on its worker (its
    /// snapshots keep their size) to `capacity_range`, rounded up to its
    /// alignment; one already that large is left as it is (volumes never
    /// shrink). A file system then needs growing on the node; a block
    /// volume does not.
    pub(super) async fn expand_volume(
        &self,
        r: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, Status> {
        required("volume_id", &r.volume_id)?;
        let range = r
            .capacity_range
            .as_ref()
            .ok_or_else(|| field_error("capacity_range", "capacity_range is required"))?;
        let block = match r.volume_capability.as_ref() {
            Some(cap) => {
                capabilities::check(std::slice::from_ref(cap))
                    .map_err(|e| field_error("volume_capability", e))?;
                matches!(
                    cap.access_type,
                    Some(csi::volume_capability::AccessType::Block(_))
                )
            }
            None => false,
        };
        let v = self.visible_volume(&r.volume_id).await?;
        let size = params::size_at_least(
            Some(range),
            v.size_bytes,
            params::alignment(v.chunk_sectors),
        )?;
        let v = if size > v.size_bytes {
            self.control
                .expand_volume(&v.name(), size)
                .await
                .map_err(status)?
        } else {
            v
        };
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: v.size_bytes as i64,
            node_expansion_required: !block,
        })
    }

    /// The volume a restore or clone made, its error, or ABORTED while it
    /// runs.
    async fn made(&self, id: &str, source: &str, op: Operation) -> Result<Volume, Status> {
        match op.state {
            OpState::Succeeded => self
                .control
                .get_volume(&names::volume(id))
                .await
                .map_err(status),
            OpState::Failed => Err(status(match op.error {
                Some(f) => f.error(),
                None => ControlError::Internal(anyhow::anyhow!("{} failed", op.name())),
            })),
            OpState::Pending | OpState::Running => Err(Status::aborted(format!(
                "volumes/{id} is being made from {source} by {} ({:.0}% done); repeat the call",
                op.name(),
                op.percent
            ))),
        }
    }

    /// DeleteVolume: what is not there (or cannot be an id of ours) is
    /// already deleted.
    pub(super) async fn delete_volume(&self, volume_id: &str) -> Result<(), Status> {
        required("volume_id", volume_id)?;
        let Some(id) = ids::parse_volume_id(volume_id) else {
            return Ok(());
        };
        match self.delete_in_domain(id).await {
            Ok(()) | Err(ControlError::NotFound(_)) => Ok(()),
            Err(e) => Err(status(e)),
        }
    }

    /// The one place where a CSI DeleteVolume reaches the domain: a volume
    /// whose snapshots still exist goes at once for Kubernetes (export
    /// closed, hidden from CSI) and keeps its data until its last snapshot
    /// is deleted (design decision L1).
    async fn delete_in_domain(&self, volume_id: &str) -> Result<(), ControlError> {
        self.control
            .delete_volume(&names::volume(volume_id), true)
            .await
    }

    /// A volume CSI can see, or NOT_FOUND.
    pub(super) async fn visible_volume(&self, volume_id: &str) -> Result<Volume, Status> {
        let not_found =
            || Status::not_found(format!("volume {} not found", names::quote(volume_id)));
        let id = ids::parse_volume_id(volume_id).ok_or_else(not_found)?;
        match self.control.get_volume(&names::volume(id)).await {
            Ok(v) if visible(&v) => Ok(v),
            Ok(_) | Err(ControlError::NotFound(_)) => Err(not_found()),
            Err(e) => Err(status(e)),
        }
    }

    pub(super) async fn list_volumes(
        &self,
        max_entries: i32,
        starting_token: &str,
    ) -> Result<csi::ListVolumesResponse, Status> {
        if max_entries < 0 {
            return Err(field_error(
                "max_entries",
                "max_entries must not be negative",
            ));
        }
        let mut entries = Vec::new();
        let mut token = starting_token.to_string();
        loop {
            // 0 asks for everything: whole pages until the end.
            let size = if max_entries == 0 {
                1000
            } else {
                max_entries - entries.len() as i32
            };
            let (vols, next) = self
                .control
                .list_volumes(size, &token, "")
                .await
                .map_err(|e| match e {
                    ControlError::InvalidArgument { .. } => Status::aborted(format!(
                        "starting_token {} is not one of this plugin's",
                        names::quote(starting_token)
                    )),
                    e => status(e),
                })?;
            entries.extend(vols.iter().filter(|v| visible(v)).map(|v| {
                csi::list_volumes_response::Entry {
                    volume: Some(volume(v)),
                    status: None,
                }
            }));
            token = next;
            if token.is_empty() || (max_entries > 0 && entries.len() as i32 >= max_entries) {
                break;
            }
        }
        Ok(csi::ListVolumesResponse {
            entries,
            next_token: token,
        })
    }

    pub(super) async fn validate(
        &self,
        r: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse, Status> {
        required("volume_id", &r.volume_id)?;
        if r.volume_capabilities.is_empty() {
            return Err(field_error(
                "volume_capabilities",
                "volume_capabilities: at least one is required",
            ));
        }
        self.visible_volume(&r.volume_id).await?;
        let verdict = capabilities::check(&r.volume_capabilities).and_then(|()| {
            params::volume_params(&r.parameters).map_err(|s| s.message().to_string())
        });
        Ok(match verdict {
            Ok(_) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: r.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(why) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
        })
    }

    /// GetCapacity: the free room of the worker a topology segment names,
    /// or of every healthy worker; 0 for capabilities cowsnap volumes do
    /// not have.
    pub(super) async fn capacity(
        &self,
        r: csi::GetCapacityRequest,
    ) -> Result<csi::GetCapacityResponse, Status> {
        let p = params::volume_params(&r.parameters)?;
        let only = r
            .accessible_topology
            .as_ref()
            .map(|t| topology::worker_of("accessible_topology", t))
            .transpose()?;
        let unsupported = !r.volume_capabilities.is_empty()
            && capabilities::check(&r.volume_capabilities).is_err();
        let workers = self.control.list_workers().await.map_err(status)?;
        let free: Vec<u64> = workers
            .iter()
            .filter(|w| w.healthy && only.is_none_or(|o| o == w.id))
            .map(|w| w.free_bytes)
            .collect();
        let (total, largest) = if unsupported {
            (0, 0)
        } else {
            (
                free.iter().sum::<u64>(),
                free.iter().copied().max().unwrap_or(0),
            )
        };
        let chunk = if p.chunk_sectors == 0 {
            model::DEFAULT_CHUNK_SECTORS
        } else {
            p.chunk_sectors
        };
        Ok(csi::GetCapacityResponse {
            available_capacity: i64::try_from(total).unwrap_or(i64::MAX),
            maximum_volume_size: Some(i64::try_from(largest).unwrap_or(i64::MAX)),
            minimum_volume_size: Some(params::alignment(chunk) as i64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_waits_follow_the_deadline() {
        assert_eq!(copy_wait(None), COPY_WAIT);
        assert_eq!(copy_wait(Some("8S")), Duration::from_secs(6));
        assert_eq!(copy_wait(Some("400m")), Duration::from_millis(300));
        assert_eq!(copy_wait(Some("2H")), COPY_WAIT);
        assert_eq!(copy_wait(Some("x")), COPY_WAIT);
        assert_eq!(copy_wait(Some("")), COPY_WAIT);
        assert_eq!(copy_wait(Some("1é")), COPY_WAIT);
    }
}
