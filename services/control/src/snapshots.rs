//! Snapshot calls: create, get (with fresh usage from the worker), list,
//! delete, and merge (long-running: rolls the volume back).

use cowsnap_proto::names;

use crate::catalog::{self, operations::NewOp};
use crate::control::Control;
use crate::error::{ControlError, Result};
use crate::listing;
use crate::model::{self, Labels, OpArgs, OpKind, OpResult, Operation, Snapshot, State, now_ms};
use crate::operations::failure;

/// What a new snapshot asks for.
#[derive(Clone, Debug, Default)]
pub struct NewSnapshot {
    /// 0: large enough never to overflow.
    pub cow_size_bytes: u64,
    pub labels: Labels,
    pub writable: bool,
}

/// The (volume id, sequence) a ListSnapshots page token resumes after
/// (`("", 0)` for none).
pub fn snapshot_cursor(page_token: &str) -> Result<(String, i64)> {
    let after = listing::after("snapshots", page_token)?;
    match after.split_once('/') {
        Some((v, s)) => Ok((
            v.to_string(),
            s.parse::<i64>()
                .map_err(|_| ControlError::invalid("page_token", "not a token from this list"))?,
        )),
        None => Ok((String::new(), 0)),
    }
}

/// Whether `fresh` (a worker's report) says what the catalog row `s`
/// already holds, the time of the usage aside.
pub(crate) fn same_report(s: &Snapshot, fresh: &model::Reported<'_>) -> bool {
    let usage = |u: &model::Usage| {
        (
            u.allocated_bytes,
            u.total_bytes,
            u.metadata_bytes,
            u.exceptions,
        )
    };
    s.cow_size_bytes == fresh.cow_size_bytes
        && s.chunk_sectors == fresh.chunk_sectors
        && s.error.as_deref() == fresh.error
        && s.usage.as_ref().map(usage) == fresh.usage.map(usage)
}

fn parse(name: &str) -> Result<(&str, &str)> {
    names::parse_snapshot(name).map_err(|e| ControlError::invalid("name", e))
}

impl Control {
    pub(crate) async fn snapshot(&self, vol: &str, snap: &str) -> Result<Snapshot> {
        let mut c = self.catalog.conn().await?;
        catalog::snapshots::get(&mut c, vol, snap)
            .await?
            .ok_or_else(|| {
                ControlError::NotFound(format!("{} not found", names::snapshot(vol, snap)))
            })
    }

    pub async fn create_snapshot(
        &self,
        parent: &str,
        snapshot_id: &str,
        spec: NewSnapshot,
    ) -> Result<Snapshot> {
        let vol = names::parse_volume(parent).map_err(|e| ControlError::invalid("parent", e))?;
        model::check_id("snapshot_id", snapshot_id)?;
        model::check_labels("snapshot.labels", &spec.labels)?;
        if !spec.cow_size_bytes.is_multiple_of(4096) {
            return Err(ControlError::invalid(
                "snapshot.cow_size_bytes",
                format!("{} is not a multiple of 4096", spec.cow_size_bytes),
            ));
        }
        let name = names::snapshot(vol, snapshot_id);
        let _g = self.ops.lock(&[vol]).await;
        // Both reads at once, each on a connection of its own.
        let (v, existing) = tokio::try_join!(self.volume_for(parent, vol), async {
            let mut c = self.catalog.conn().await?;
            catalog::snapshots::get(&mut c, vol, snapshot_id).await
        })?;
        if let Some(s) = existing {
            // An unset COW size matches whatever size the first create got.
            let same_size = spec.cow_size_bytes == 0 || spec.cow_size_bytes == s.cow_size_bytes;
            if !same_size || s.writable != spec.writable || s.labels != spec.labels {
                return Err(ControlError::AlreadyExists(format!(
                    "{name} already exists with different arguments ({} COW bytes, {})",
                    s.cow_size_bytes,
                    if s.writable { "writable" } else { "read-only" }
                )));
            }
            if let (State::Creating, Some(op)) = (s.state, s.operation) {
                let op = self.ops.drive(op).await?;
                if let Some(e) = failure(&op) {
                    return Err(e);
                }
                return self.snapshot(vol, snapshot_id).await;
            }
            return Ok(s);
        }
        if v.state == State::DeletedWithSnapshots {
            return Err(ControlError::FailedPrecondition(format!(
                "{parent} is deleted (kept only for its snapshots); no snapshot can be taken of it"
            )));
        }
        if v.state != State::Ready {
            return Err(ControlError::FailedPrecondition(format!(
                "{parent} is {}; snapshots are taken of READY volumes",
                v.state.as_str().to_uppercase()
            )));
        }
        let w = self.ensure_reachable(&v.worker_id).await?;
        let now = now_ms();
        let mut tx = self.catalog.write().await?;
        let s = Snapshot {
            volume_id: vol.to_string(),
            id: snapshot_id.to_string(),
            // The volume's lock is held: no grow runs until this is taken.
            size_bytes: v.size_bytes,
            cow_size_bytes: spec.cow_size_bytes,
            chunk_sectors: v.chunk_sectors,
            writable: spec.writable,
            labels: spec.labels,
            state: State::Creating,
            usage: None,
            create_time: now,
            nbd_base: String::new(),
            operation: None,
            error: None,
        };
        catalog::snapshots::insert(&mut tx, &s, now).await?;
        let args = OpArgs {
            cow_size_bytes: spec.cow_size_bytes,
            writable: spec.writable,
            ..Default::default()
        };
        let op = self
            .record_and_drive(
                tx,
                NewOp {
                    kind: OpKind::CreateSnapshot,
                    target: &name,
                    source: "",
                    volume_id: vol,
                    worker_id: &v.worker_id,
                    args: &args,
                },
                now,
                Some(w),
            )
            .await?;
        if let Some(e) = failure(&op) {
            return Err(e);
        }
        match op.result {
            // The row as the settle left it (read inside it).
            Some(OpResult::Snapshot(s)) => Ok(s),
            _ => self.snapshot(vol, snapshot_id).await,
        }
    }

    pub(crate) async fn volume_for(&self, parent: &str, vol: &str) -> Result<model::Volume> {
        let mut c = self.catalog.conn().await?;
        catalog::volumes::get(&mut c, vol)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("{parent} not found")))
    }

    /// A snapshot with its usage fresh from its worker (UNAVAILABLE when
    /// the worker does not answer). The catalog is written only when the
    /// report changes what it holds.
    pub async fn get_snapshot(&self, name: &str) -> Result<Snapshot> {
        let (vol, snap) = parse(name)?;
        let s = self.snapshot(vol, snap).await?;
        if !matches!(s.state, State::Ready | State::Invalid | State::Merging)
            || s.operation.is_some()
        {
            return Ok(s);
        }
        let v = self.volume_for(&names::volume(vol), vol).await?;
        let w = self.workers.client(&v.worker_id).await?;
        let ws = match w.get_snapshot(name).await {
            Ok(ws) => ws,
            // Gone from the worker: reconciliation deals with it.
            Err(ControlError::NotFound(_)) => return Ok(s),
            Err(e) => return Err(e),
        };
        let fresh = ws.reported();
        let becomes_invalid = ws.state == State::Invalid && s.state == State::Ready;
        if !becomes_invalid && same_report(&s, &fresh) {
            // Nothing the catalog keeps has changed: no write (a get stays a
            // read), the fresh usage (its time included) is returned as is.
            let mut s = s;
            s.usage = fresh.usage.cloned();
            return Ok(s);
        }
        let _g = self.ops.lock(&[vol]).await;
        let now = now_ms();
        let mut tx = self.catalog.write().await?;
        let to = becomes_invalid.then_some(State::Invalid);
        catalog::snapshots::set_reported(&mut tx, vol, snap, ws.reported(), to, now).await?;
        tx.commit().await?;
        self.snapshot(vol, snap).await
    }

    /// Every snapshot whose id is `snapshot_id`, whatever its volume
    /// (snapshot ids are unique per volume only).
    pub async fn find_snapshots(&self, snapshot_id: &str) -> Result<Vec<Snapshot>> {
        let mut c = self.catalog.conn().await?;
        Ok(catalog::snapshots::list(&mut c, None, ("", 0), -1)
            .await?
            .into_iter()
            .map(|(s, _)| s)
            .filter(|s| s.id == snapshot_id)
            .collect())
    }

    /// A page of snapshots (oldest first) of `parent`, or of every volume
    /// for `volumes/-`.
    pub async fn list_snapshots(
        &self,
        parent: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Snapshot>, String)> {
        let size = listing::page_size(page_size)?;
        let vol = if parent == "volumes/-" {
            None
        } else {
            let v = names::parse_volume(parent).map_err(|e| ControlError::invalid("parent", e))?;
            self.volume_for(parent, v).await?;
            Some(v)
        };
        let (after_vol, after_seq) = snapshot_cursor(page_token)?;
        let mut c = self.catalog.conn().await?;
        let mut page = catalog::snapshots::list(
            &mut c,
            vol,
            (after_vol.as_str(), after_seq),
            size as i64 + 1,
        )
        .await?;
        let next = if page.len() > size {
            page.truncate(size);
            let (s, seq) = &page[size - 1];
            listing::token("snapshots", &format!("{}/{seq}", s.volume_id))
        } else {
            String::new()
        };
        Ok((page.into_iter().map(|(s, _)| s).collect(), next))
    }

    pub async fn delete_snapshot(&self, name: &str) -> Result<()> {
        let (vol, snap) = parse(name)?;
        let _g = self.ops.lock(&[vol]).await;
        let s = self.snapshot(vol, snap).await?;
        if let (State::Deleting, Some(op)) = (s.state, s.operation) {
            let op = self.ops.drive(op).await?;
            failure(&op).map_or(Ok(()), Err)?;
            self.drive_reclaim(vol).await;
            return Ok(());
        }
        match s.state {
            State::Merging => {
                return Err(ControlError::FailedPrecondition(format!(
                    "{name} is merging into volumes/{vol}; it goes away when the merge ends"
                )));
            }
            State::Creating => {
                return Err(ControlError::FailedPrecondition(format!(
                    "{name} is being created; wait for it to end"
                )));
            }
            _ => {}
        }
        let mut c = self.catalog.conn().await?;
        if let Some(op) = catalog::operations::active_on(&mut c, name)
            .await?
            .into_iter()
            .find(|o| o.source_name() == name)
        {
            return Err(ControlError::FailedPrecondition(format!(
                "{name} is the source of {} ({}); wait for it to end",
                op.name(),
                op.kind.as_str()
            )));
        }
        drop(c);
        let v = self.volume_for(&names::volume(vol), vol).await?;
        let w = self.ensure_reachable(&v.worker_id).await?;
        let now = now_ms();
        let mut tx = self.catalog.write().await?;
        catalog::snapshots::set_state(&mut tx, vol, snap, State::Deleting, now).await?;
        let args = OpArgs {
            prior_state: Some(s.state),
            deleted: Some(OpResult::Snapshot(s.clone())),
            ..Default::default()
        };
        let op = self
            .record_and_drive(
                tx,
                NewOp {
                    kind: OpKind::DeleteSnapshot,
                    target: name,
                    source: "",
                    volume_id: vol,
                    worker_id: &v.worker_id,
                    args: &args,
                },
                now,
                Some(w),
            )
            .await?;
        failure(&op).map_or(Ok(()), Err)?;
        // The last snapshot of a DELETED_WITH_SNAPSHOTS volume: reclaim it.
        self.drive_reclaim(vol).await;
        Ok(())
    }

    /// Starts rolling the volume back to the snapshot.
    pub async fn merge_snapshot(&self, name: &str) -> Result<Operation> {
        let (vol, snap) = parse(name)?;
        let _g = self.ops.lock(&[vol]).await;
        let s = self.snapshot(vol, snap).await?;
        let mut c = self.catalog.conn().await?;
        let active = catalog::operations::active_on(&mut c, name).await?;
        drop(c);
        if let Some(op) = active.iter().find(|o| o.kind == OpKind::MergeSnapshot) {
            // The same merge: its operation.
            return self.ops.drive(op.id).await;
        }
        if let Some(op) = active.first() {
            return Err(ControlError::FailedPrecondition(format!(
                "{name} is busy with {} ({}); wait for it to end",
                op.name(),
                op.kind.as_str()
            )));
        }
        if !matches!(s.state, State::Ready | State::Merging) {
            return Err(ControlError::FailedPrecondition(format!(
                "{name} is {}: there is nothing to merge",
                s.state.as_str().to_uppercase()
            )));
        }
        let v = self.volume_for(&names::volume(vol), vol).await?;
        if v.state == State::Merging && s.state != State::Merging {
            return Err(ControlError::FailedPrecondition(format!(
                "volumes/{vol} is already merging another snapshot"
            )));
        }
        if v.state != State::Ready && v.state != State::Merging {
            return Err(ControlError::FailedPrecondition(format!(
                "volumes/{vol} is {}",
                v.state.as_str().to_uppercase()
            )));
        }
        let w = self.ensure_reachable(&v.worker_id).await?;
        let now = now_ms();
        let mut tx = self.catalog.write().await?;
        catalog::snapshots::set_state(&mut tx, vol, snap, State::Merging, now).await?;
        catalog::volumes::set_state(&mut tx, vol, State::Merging, "", now).await?;
        let args = OpArgs {
            prior_state: Some(State::Ready),
            ..Default::default()
        };
        let op = self
            .record_and_drive(
                tx,
                NewOp {
                    kind: OpKind::MergeSnapshot,
                    target: name,
                    source: "",
                    volume_id: vol,
                    worker_id: &v.worker_id,
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
