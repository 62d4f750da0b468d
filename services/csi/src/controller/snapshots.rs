//! CreateSnapshot, DeleteSnapshot, ListSnapshots and GetSnapshot through
//! the control service's snapshot calls. A snapshot is cut before
//! CreateSnapshot answers, so it is ready to use at once; its `size_bytes`
//! is its volume's size when it was taken (what a volume restored from it
//! gets; the volume may have grown since).

use cowsnap_control::error::ControlError;
use cowsnap_control::model::{Snapshot, State};
use cowsnap_control::snapshots::NewSnapshot;
use cowsnap_proto::bad_request::field_error;
use cowsnap_proto::csi::v1 as csi;
use cowsnap_proto::names;
use tonic::Status;

use super::Controller;
use super::params::{self, COW_SIZE_LABEL};
use super::volumes::{labels_for, status, visible as visible_volume};
use crate::ids;
use crate::required;

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// The CSI view of a snapshot.
pub fn snapshot(s: &Snapshot) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: ids::snapshot_id(&s.volume_id, &s.id),
        source_volume_id: s.volume_id.clone(),
        creation_time: Some(timestamp(s.create_time)),
        ready_to_use: s.state == State::Ready,
        group_snapshot_id: String::new(),
    }
}

/// Whether CSI shows a snapshot (one being deleted, or whose cut failed,
/// is gone for it).
fn visible(s: &Snapshot) -> bool {
    !matches!(s.state, State::Deleting | State::Failed)
}

fn bad_token(token: &str) -> Status {
    Status::aborted(format!(
        "starting_token {} is not one of this plugin's",
        names::quote(token)
    ))
}

impl Controller {
    pub(super) async fn create_snapshot(
        &self,
        r: csi::CreateSnapshotRequest,
    ) -> Result<csi::Snapshot, Status> {
        ids::check_name(&r.name).map_err(|e| field_error("name", format!("name {e}")))?;
        required("source_volume_id", &r.source_volume_id)?;
        let asked_cow = params::snapshot_params(&r.parameters)?;
        let snap_id = ids::id_from_name(&r.name);
        // Snapshot ids are unique per volume; CSI names are unique per
        // plugin: the same name on another volume is a conflict.
        let same_name = self
            .control
            .find_snapshots(&snap_id)
            .await
            .map_err(status)?;
        if let Some(other) = same_name.iter().find(|s| s.volume_id != r.source_volume_id) {
            return Err(Status::already_exists(format!(
                "snapshot name {} is taken by snapshot {} of volume {}",
                names::quote(&r.name),
                ids::snapshot_id(&other.volume_id, &other.id),
                other.volume_id
            )));
        }
        let v = self.visible_volume(&r.source_volume_id).await?;
        let cow = match asked_cow {
            Some(c) => c,
            None => v
                .labels
                .get(COW_SIZE_LABEL)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0),
        };
        let spec = NewSnapshot {
            cow_size_bytes: cow,
            labels: labels_for(&r.name, 0),
            writable: false,
        };
        let s = self
            .control
            .create_snapshot(&names::volume(&v.id), &snap_id, spec)
            .await
            .map_err(status)?;
        Ok(snapshot(&s))
    }

    /// DeleteSnapshot: what is not there (or cannot be an id of ours) is
    /// already deleted.
    pub(super) async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), Status> {
        required("snapshot_id", snapshot_id)?;
        let Some((v, s)) = ids::parse_snapshot_id(snapshot_id) else {
            return Ok(());
        };
        match self.control.delete_snapshot(&names::snapshot(v, s)).await {
            Ok(()) | Err(ControlError::NotFound(_)) => Ok(()),
            Err(e) => Err(status(e)),
        }
    }

    /// The snapshots CSI sees of one volume (none if it does not exist).
    /// A volume CSI deleted while it had snapshots is hidden, but its
    /// snapshots are not.
    async fn snapshots_of(&self, volume_id: &str) -> Result<Vec<csi::Snapshot>, Status> {
        let Some(id) = ids::parse_volume_id(volume_id) else {
            return Ok(Vec::new());
        };
        match self.control.get_volume(&names::volume(id)).await {
            Ok(v) if visible_volume(&v) || v.state == State::DeletedWithSnapshots => {}
            Ok(_) | Err(ControlError::NotFound(_)) => return Ok(Vec::new()),
            Err(e) => return Err(status(e)),
        }
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = self
                .control
                .list_snapshots(&names::volume(id), 1000, &token)
                .await
                .map_err(status)?;
            out.extend(page.iter().filter(|s| visible(s)).map(snapshot));
            if next.is_empty() {
                return Ok(out);
            }
            token = next;
        }
    }

    /// GetSnapshot: one snapshot CSI sees, or NOT_FOUND.
    pub(super) async fn get_snapshot(&self, snapshot_id: &str) -> Result<csi::Snapshot, Status> {
        required("snapshot_id", snapshot_id)?;
        let not_found =
            || Status::not_found(format!("snapshot {} not found", names::quote(snapshot_id)));
        let (v, _) = ids::parse_snapshot_id(snapshot_id).ok_or_else(not_found)?;
        self.snapshots_of(v)
            .await?
            .into_iter()
            .find(|s| s.snapshot_id == snapshot_id)
            .ok_or_else(not_found)
    }

    pub(super) async fn list_snapshots(
        &self,
        r: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, Status> {
        if r.max_entries < 0 {
            return Err(field_error(
                "max_entries",
                "max_entries must not be negative",
            ));
        }
        let entry = |s| csi::list_snapshots_response::Entry { snapshot: Some(s) };
        // One snapshot, or the snapshots of one volume: a single page.
        if !r.snapshot_id.is_empty() || !r.source_volume_id.is_empty() {
            if !r.starting_token.is_empty() {
                return Err(bad_token(&r.starting_token));
            }
            let snaps = if !r.snapshot_id.is_empty() {
                match self.get_snapshot(&r.snapshot_id).await {
                    Ok(s) => vec![s],
                    Err(s) if s.code() == tonic::Code::NotFound => Vec::new(),
                    Err(s) => return Err(s),
                }
            } else {
                self.snapshots_of(&r.source_volume_id).await?
            };
            let entries = snaps
                .into_iter()
                .filter(|s| {
                    r.source_volume_id.is_empty() || s.source_volume_id == r.source_volume_id
                })
                .map(entry)
                .collect();
            return Ok(csi::ListSnapshotsResponse {
                entries,
                next_token: String::new(),
            });
        }
        // Every snapshot, paged with the control service's tokens.
        let mut entries = Vec::new();
        let mut token = r.starting_token.clone();
        loop {
            let size = if r.max_entries == 0 {
                1000
            } else {
                r.max_entries - entries.len() as i32
            };
            let (page, next) = self
                .control
                .list_snapshots("volumes/-", size, &token)
                .await
                .map_err(|e| match e {
                    ControlError::InvalidArgument { .. } => bad_token(&r.starting_token),
                    e => status(e),
                })?;
            entries.extend(
                page.iter()
                    .filter(|s| visible(s))
                    .map(|s| entry(snapshot(s))),
            );
            token = next;
            if token.is_empty() || (r.max_entries > 0 && entries.len() as i32 >= r.max_entries) {
                break;
            }
        }
        Ok(csi::ListSnapshotsResponse {
            entries,
            next_token: token,
        })
    }
}
