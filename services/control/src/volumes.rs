//! Volume calls: create (placed on the worker with the fewest volumes
//! among those with room), get, list, delete (at once, or deferred while
//! the volume has snapshots: DELETED_WITH_SNAPSHOTS until the last goes,
//! then reclaimed), and restore and clone (long-running, on the source's
//! worker, which copies locally).

use cowsnap_proto::names;

use crate::catalog::{self, operations::NewOp};
use crate::control::Control;
use crate::error::{ControlError, Result};
use crate::listing;
use crate::model::{
    self, DEFAULT_CHUNK_SECTORS, Labels, OpArgs, OpKind, OpResult, Operation, State, Volume, now_ms,
};
use crate::operations::failure;

/// What a new empty volume asks for.
#[derive(Clone, Debug, Default)]
pub struct NewVolume {
    pub size_bytes: u64,
    /// 0: the default (32).
    pub chunk_sectors: u32,
    pub labels: Labels,
    /// The worker ids it may be placed on, preferred first (empty: any;
    /// see [`crate::workers::Workers::place_among`]).
    pub workers: Vec<String>,
}

/// What a restored or cloned volume asks for (its size is the source's).
#[derive(Clone, Debug, Default)]
pub struct CopiedVolume {
    /// 0: the source's.
    pub chunk_sectors: u32,
    pub labels: Labels,
}

/// A ListVolumes filter: `state=S`, `worker=W` (or `workers/W`),
/// `labels.KEY=VALUE`, joined with ` AND `.
#[derive(Debug, Default)]
pub struct VolumeFilter {
    state: Option<State>,
    worker: Option<String>,
    labels: Vec<(String, String)>,
}

impl VolumeFilter {
    pub fn parse(filter: &str) -> Result<VolumeFilter> {
        let mut f = VolumeFilter::default();
        for (k, v) in listing::filter_terms(filter)? {
            if k == "state" {
                f.state = Some(State::parse(&v).map_err(|_| {
                    ControlError::invalid(
                        "filter",
                        format!("state={}: not a state", names::quote(&v)),
                    )
                })?);
            } else if k == "worker" {
                f.worker = Some(v.strip_prefix("workers/").unwrap_or(&v).to_string());
            } else if let Some(l) = k.strip_prefix("labels.") {
                f.labels.push((l.to_string(), v));
            } else {
                return Err(ControlError::invalid(
                    "filter",
                    format!(
                        "unknown term {} (state, worker, labels.KEY)",
                        names::quote(&k)
                    ),
                ));
            }
        }
        Ok(f)
    }

    fn matches(&self, v: &Volume) -> bool {
        self.state.is_none_or(|s| v.state == s)
            && self.worker.as_ref().is_none_or(|w| &v.worker_id == w)
            && self
                .labels
                .iter()
                .all(|(k, val)| v.labels.get(k) == Some(val))
    }
}

/// ALREADY_EXISTS for a new volume whose id a deleted volume still holds
/// (DELETED_WITH_SNAPSHOTS, or being deleted or reclaimed).
fn id_held(v: &Volume) -> Option<ControlError> {
    let why = match (v.state, v.operation) {
        (State::DeletedWithSnapshots, _) => {
            "was deleted but is kept for its snapshots; its id is free once they are deleted"
        }
        (State::Deleting, Some(_)) => "is being deleted; its id is free once that ends",
        _ => return None,
    };
    Some(ControlError::AlreadyExists(format!("{} {why}", v.name())))
}

impl Control {
    async fn volume(&self, id: &str) -> Result<Volume> {
        let mut c = self.catalog.conn().await?;
        catalog::volumes::get(&mut c, id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("{} not found", names::volume(id))))
    }

    /// The volume a finished create-like operation made (its error if it
    /// failed).
    async fn made_volume(&self, op: &Operation) -> Result<Volume> {
        if let Some(e) = failure(op) {
            return Err(e);
        }
        self.volume(op.target.volume()).await
    }

    pub async fn create_volume(&self, volume_id: &str, spec: NewVolume) -> Result<Volume> {
        model::check_id("volume_id", volume_id)?;
        let chunk = model::chunk_sectors(
            "volume.chunk_sectors",
            spec.chunk_sectors,
            DEFAULT_CHUNK_SECTORS,
        )?;
        model::check_size("volume.size_bytes", spec.size_bytes, chunk)?;
        model::check_labels("volume.labels", &spec.labels)?;
        let name = names::volume(volume_id);
        let _g = self.ops.lock(&[volume_id]).await;
        let mut c = self.catalog.conn().await?;
        if let Some(v) = catalog::volumes::get(&mut c, volume_id).await? {
            drop(c);
            if let Some(e) = id_held(&v) {
                return Err(e);
            }
            if !v.source.is_empty()
                || v.size_bytes != spec.size_bytes
                || v.chunk_sectors != chunk
                || v.labels != spec.labels
            {
                return Err(ControlError::AlreadyExists(format!(
                    "{name} already exists with different arguments ({} bytes, chunk {} sectors{})",
                    v.size_bytes,
                    v.chunk_sectors,
                    if v.source.is_empty() {
                        String::new()
                    } else {
                        format!(", from {}", v.source)
                    }
                )));
            }
            if !spec.workers.is_empty() && !spec.workers.contains(&v.worker_id) {
                return Err(ControlError::AlreadyExists(format!(
                    "{name} already exists on workers/{}, which is not one of those allowed",
                    v.worker_id
                )));
            }
            if let (State::Creating, Some(op)) = (v.state, v.operation) {
                // The same create, interrupted: carry it on.
                let op = self.ops.drive(op).await?;
                return self.made_volume(&op).await;
            }
            return Ok(v);
        }
        drop(c);
        let worker = self
            .workers
            .place_among(spec.size_bytes, &spec.workers)
            .await?;
        let now = now_ms();
        let mut tx = self.catalog.write().await?;
        let v = Volume {
            id: volume_id.to_string(),
            worker_id: worker.id.clone(),
            size_bytes: spec.size_bytes,
            chunk_sectors: chunk,
            labels: spec.labels,
            state: State::Creating,
            source: String::new(),
            error: String::new(),
            create_time: now,
            nbd_base: String::new(),
            operation: None,
        };
        catalog::volumes::insert(&mut tx, &v, now).await?;
        let args = OpArgs {
            size_bytes: spec.size_bytes,
            chunk_sectors: chunk,
            ..Default::default()
        };
        let op = self
            .record_and_drive(
                tx,
                NewOp {
                    kind: OpKind::CreateVolume,
                    target: &name,
                    source: "",
                    volume_id,
                    worker_id: &worker.id,
                    args: &args,
                },
                now,
                Some(self.workers.client_of(&worker)?),
            )
            .await?;
        self.made_volume(&op).await
    }

    /// Grows a volume online to `size_bytes`, as a recorded operation
    /// (ExpandVolume: the worker grows it, then the catalog takes the new
    /// size; after a crash the operation is carried on, and the worker
    /// finds it already grown). Idempotent: the size it has returns it.
    /// This is what CSI ControllerExpandVolume calls.
    pub async fn expand_volume(&self, name: &str, size_bytes: u64) -> Result<Volume> {
        let id = names::parse_volume(name).map_err(|e| ControlError::invalid("name", e))?;
        let _g = self.ops.lock(&[id]).await;
        let mut v = self.volume(id).await?;
        if let Some(op) = v.operation {
            let o = self.ops.get(op).await?;
            if o.kind != OpKind::ExpandVolume {
                return Err(ControlError::FailedPrecondition(format!(
                    "{name} is in use by {} ({}); wait for it to end",
                    o.name(),
                    o.kind.as_str()
                )));
            }
            // An expand interrupted (by a crash, or its worker): finish it
            // first, then see whether this one is still needed.
            let o = self.ops.drive(op).await?;
            if let Some(e) = failure(&o)
                && o.args.size_bytes == size_bytes
            {
                return Err(e);
            }
            v = self.volume(id).await?;
        }
        if size_bytes == v.size_bytes {
            return Ok(v);
        }
        model::check_size("size_bytes", size_bytes, v.chunk_sectors)?;
        if size_bytes < v.size_bytes {
            return Err(ControlError::invalid(
                "size_bytes",
                format!(
                    "{size_bytes} is smaller than the {} bytes {name} has: volumes only grow",
                    v.size_bytes
                ),
            ));
        }
        if v.state != State::Ready {
            return Err(ControlError::FailedPrecondition(format!(
                "{name} is {}; only a READY volume grows",
                v.state.as_str().to_uppercase()
            )));
        }
        let w = self.ensure_reachable(&v.worker_id).await?;
        let now = now_ms();
        let tx = self.catalog.write().await?;
        let args = OpArgs {
            size_bytes,
            chunk_sectors: v.chunk_sectors,
            ..Default::default()
        };
        let op = self
            .record_and_drive(
                tx,
                NewOp {
                    kind: OpKind::ExpandVolume,
                    target: name,
                    source: "",
                    volume_id: id,
                    worker_id: &v.worker_id,
                    args: &args,
                },
                now,
                Some(w),
            )
            .await?;
        self.made_volume(&op).await
    }

    pub async fn get_volume(&self, name: &str) -> Result<Volume> {
        let id = names::parse_volume(name).map_err(|e| ControlError::invalid("name", e))?;
        self.volume(id).await
    }

    /// A page of volumes (in id order) and the next page token.
    pub async fn list_volumes(
        &self,
        page_size: i32,
        page_token: &str,
        filter: &str,
    ) -> Result<(Vec<Volume>, String)> {
        let size = listing::page_size(page_size)?;
        let after = listing::after("volumes", page_token)?;
        let filter = VolumeFilter::parse(filter)?;
        let mut c = self.catalog.conn().await?;
        // Rows are read a page (and one) at a time until the filter has let
        // a page and one through, or none are left: without a filter, one
        // read of `size + 1` rows, however many volumes there are.
        let mut page: Vec<Volume> = Vec::new();
        let mut cursor = after;
        let batch = size + 1;
        loop {
            let rows = catalog::volumes::list_after(&mut c, &cursor, batch as i64).await?;
            let full = rows.len() == batch;
            if let Some(last) = rows.last() {
                cursor = last.id.clone();
            }
            page.extend(rows.into_iter().filter(|v| filter.matches(v)));
            if page.len() > size || !full {
                break;
            }
        }
        page.truncate(size + 1);
        let next = if page.len() > size {
            page.truncate(size);
            listing::token("volumes", &page[size - 1].id)
        } else {
            String::new()
        };
        Ok((page, next))
    }

    /// Deletes a volume. One with snapshots is refused (FAILED_PRECONDITION)
    /// unless `defer_while_snapshots`: then it is retired on its worker at
    /// once (export closed, no more writes) and kept as
    /// DELETED_WITH_SNAPSHOTS until its last snapshot is deleted, when it is
    /// reclaimed. Idempotent; this is what CSI DeleteVolume calls.
    pub async fn delete_volume(&self, name: &str, defer_while_snapshots: bool) -> Result<()> {
        let id = names::parse_volume(name).map_err(|e| ControlError::invalid("name", e))?;
        let _g = self.ops.lock(&[id]).await;
        let v = self.volume(id).await?;
        let mut c = self.catalog.conn().await?;
        if let (State::Deleting, Some(op)) = (v.state, v.operation) {
            drop(c);
            let op = self.ops.drive(op).await?;
            failure(&op).map_or(Ok(()), Err)?;
            self.drive_reclaim(id).await;
            if op.args.deferred && !defer_while_snapshots {
                return Err(ControlError::FailedPrecondition(format!(
                    "{name} is deleted and kept for its snapshots; it is reclaimed when they are deleted"
                )));
            }
            return Ok(());
        }
        let snaps = catalog::snapshots::count(&mut c, id).await?;
        if v.state == State::DeletedWithSnapshots {
            if defer_while_snapshots {
                return Ok(());
            }
            return Err(ControlError::FailedPrecondition(format!(
                "{name} is already deleted and kept for its {snaps} snapshot(s); it is reclaimed when they are deleted"
            )));
        }
        if snaps > 0 && !defer_while_snapshots {
            return Err(ControlError::FailedPrecondition(format!(
                "{name} has {snaps} snapshot(s); delete them first (or defer the delete until they are gone)"
            )));
        }
        if let Some(op) = v.operation {
            return Err(ControlError::FailedPrecondition(format!(
                "{name} is {} by operations/{op}; wait for it to end",
                match v.state {
                    State::Creating => "being created",
                    State::Merging => "being merged into",
                    _ => "in use",
                }
            )));
        }
        let active = catalog::operations::active(&mut c).await?;
        if let Some(op) = active.iter().find(|o| o.source_name() == name) {
            return Err(ControlError::FailedPrecondition(format!(
                "{name} is the source of {} ({}); wait for it to end",
                op.name(),
                op.kind.as_str()
            )));
        }
        let deferred = snaps > 0;
        if deferred {
            if let Some(op) = active
                .iter()
                .find(|o| o.kind == OpKind::CreateSnapshot && o.target.volume() == id)
            {
                return Err(ControlError::FailedPrecondition(format!(
                    "{} is being created by {}; wait for it to end",
                    op.target,
                    op.name()
                )));
            }
            if !matches!(v.state, State::Ready | State::Failed) {
                return Err(ControlError::FailedPrecondition(format!(
                    "{name} is {}",
                    v.state.as_str().to_uppercase()
                )));
            }
        }
        drop(c);
        let w = self.ensure_reachable(&v.worker_id).await?;
        let now = now_ms();
        let mut tx = self.catalog.write().await?;
        catalog::volumes::set_state(&mut tx, id, State::Deleting, &v.error, now).await?;
        let args = OpArgs {
            prior_state: Some(v.state),
            deleted: Some(OpResult::Volume(v.clone())),
            deferred,
            ..Default::default()
        };
        let op = self
            .record_and_drive(
                tx,
                NewOp {
                    kind: OpKind::DeleteVolume,
                    target: name,
                    source: "",
                    volume_id: id,
                    worker_id: &v.worker_id,
                    args: &args,
                },
                now,
                Some(w),
            )
            .await?;
        failure(&op).map_or(Ok(()), Err)?;
        self.drive_reclaim(id).await;
        Ok(())
    }

    /// Drives the reclaim of volume `id` if one is recorded (its last
    /// snapshot just went). The caller holds the volume's lock. A reclaim
    /// that cannot finish now stays recorded for reconciliation: the call
    /// that released the volume has succeeded either way.
    pub(crate) async fn drive_reclaim(&self, id: &str) {
        let op = match self.volume(id).await {
            Ok(v) if v.state == State::Deleting => v.operation,
            _ => None,
        };
        if let Some(op) = op {
            match self.ops.drive(op).await {
                Ok(op) => {
                    if let Some(e) = failure(&op) {
                        tracing::warn!(volume = %names::volume(id), "reclaim refused: {e}");
                    }
                }
                Err(e) => {
                    tracing::warn!(volume = %names::volume(id), "reclaim left to reconciliation: {e}")
                }
            }
        }
    }

    /// Starts a restore of `source_snapshot` into a new volume.
    pub async fn restore_volume(
        &self,
        volume_id: &str,
        source_snapshot: &str,
        spec: CopiedVolume,
    ) -> Result<Operation> {
        model::check_id("volume_id", volume_id)?;
        let (sv, ss) = names::parse_snapshot(source_snapshot)
            .map_err(|e| ControlError::invalid("source_snapshot", e))?;
        model::check_labels("volume.labels", &spec.labels)?;
        let _g = self.ops.lock(&[volume_id, sv]).await;
        let mut c = self.catalog.conn().await?;
        let snap = catalog::snapshots::get(&mut c, sv, ss)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("{source_snapshot} not found")))?;
        let src = self.volume(sv).await?;
        drop(c);
        if snap.state != State::Ready {
            return Err(ControlError::FailedPrecondition(format!(
                "{source_snapshot} is {}, not READY",
                snap.state.as_str().to_uppercase()
            )));
        }
        // The snapshot's size: its volume may have grown since.
        let source = (source_snapshot, snap.size_bytes);
        self.start_copy(OpKind::RestoreVolume, volume_id, source, &src, spec)
            .await
    }

    /// Starts a clone of `source_volume` into a new volume.
    pub async fn clone_volume(
        &self,
        volume_id: &str,
        source_volume: &str,
        spec: CopiedVolume,
    ) -> Result<Operation> {
        model::check_id("volume_id", volume_id)?;
        let sv = names::parse_volume(source_volume)
            .map_err(|e| ControlError::invalid("source_volume", e))?;
        model::check_labels("volume.labels", &spec.labels)?;
        let _g = self.ops.lock(&[volume_id, sv]).await;
        let src = self.volume(sv).await?;
        if volume_id == sv {
            return Err(ControlError::invalid(
                "volume_id",
                "a volume cannot be cloned into itself",
            ));
        }
        let source = (source_volume, src.size_bytes);
        self.start_copy(OpKind::CloneVolume, volume_id, source, &src, spec)
            .await
    }

    /// Records and starts a restore or clone (the caller holds the locks)
    /// from `source` (its name and size) on volume `src`.
    async fn start_copy(
        &self,
        kind: OpKind,
        volume_id: &str,
        (source, size): (&str, u64),
        src: &Volume,
        spec: CopiedVolume,
    ) -> Result<Operation> {
        let chunk = model::chunk_sectors(
            "volume.chunk_sectors",
            spec.chunk_sectors,
            src.chunk_sectors,
        )?;
        model::check_size("volume.chunk_sectors", size, chunk)?;
        let name = names::volume(volume_id);
        let mut c = self.catalog.conn().await?;
        if let Some(v) = catalog::volumes::get(&mut c, volume_id).await? {
            if let Some(e) = id_held(&v) {
                return Err(e);
            }
            let same = v.source == source && v.chunk_sectors == chunk && v.labels == spec.labels;
            let op = match same {
                true => catalog::operations::latest(&mut c, kind, &name).await?,
                false => None,
            };
            drop(c);
            return match op {
                // The same restore or clone: its operation (carried on if
                // it was interrupted before its worker answered).
                Some(op) => self.ops.drive(op.id).await,
                None => Err(ControlError::AlreadyExists(format!(
                    "{name} already exists{}",
                    if v.source.is_empty() {
                        String::new()
                    } else {
                        format!(" (made from {})", v.source)
                    }
                ))),
            };
        }
        drop(c);
        if kind == OpKind::CloneVolume && src.state != State::Ready {
            return Err(ControlError::FailedPrecondition(format!(
                "{} is {}, not READY",
                src.name(),
                src.state.as_str().to_uppercase()
            )));
        }
        let w = self.ensure_reachable(&src.worker_id).await?;
        let now = now_ms();
        let mut tx = self.catalog.write().await?;
        let v = Volume {
            id: volume_id.to_string(),
            worker_id: src.worker_id.clone(),
            size_bytes: size,
            chunk_sectors: chunk,
            labels: spec.labels,
            state: State::Creating,
            source: source.to_string(),
            error: String::new(),
            create_time: now,
            nbd_base: String::new(),
            operation: None,
        };
        catalog::volumes::insert(&mut tx, &v, now).await?;
        let args = OpArgs {
            size_bytes: size,
            chunk_sectors: chunk,
            ..Default::default()
        };
        let op = self
            .record_and_drive(
                tx,
                NewOp {
                    kind,
                    target: &name,
                    source,
                    volume_id,
                    worker_id: &src.worker_id,
                    args: &args,
                },
                now,
                Some(w),
            )
            .await?;
        match failure(&op) {
            Some(e) => Err(e),
            None => Ok(op),
        }
    }
}
