//! Operations: how every mutating call is carried out so that a crash of
//! the control service or of a worker at any point is repaired instead of
//! leaking a device or leaving a resource half made.
//!
//! Each call follows one pattern:
//! 1. **record**: in one catalog transaction, the resource's row in its
//!    transitional state (`CREATING`, `DELETING`, `MERGING`) and a
//!    `pending` operation with the arguments of the worker call;
//! 2. **drive** ([`Operations::drive`]): the worker call. Every worker call
//!    is idempotent (the same create returns what exists, a delete of what
//!    is gone says NOT_FOUND), so driving an operation again after a crash
//!    is always safe;
//! 3. **settle**: in one transaction, the resource's final state and the
//!    operation's end (`succeeded` with its result, or `failed` with the
//!    worker's error, undoing the recorded row). Long-running work (merge,
//!    restore, clone) goes `pending → running` with the worker's task, and a
//!    tracker follows the task until it ends.
//!
//! A crash after 1 leaves a `pending` operation; after the worker acted but
//! before 3, too. Either way [`crate::reconcile`] drives it again at the
//! next start (and periodically), and the worker's idempotency makes the
//! second call return what the first one did. A worker that does not
//! answer leaves the operation `pending` (the call fails with UNAVAILABLE),
//! to be driven again when it answers; a worker that refuses ends it
//! `failed`, with the recorded row undone. Which answers are which is
//! [`crate::workers::classify`]'s to say.
//!
//! A volume deleted while it has snapshots (`OpArgs::deferred`) is retired
//! on its worker and settles as `DELETED_WITH_SNAPSHOTS`. Its reclaim is a
//! plain volume delete, recorded by [`Operations::reclaim_if_released`] in
//! the very transaction that removes its last snapshot row (or settles the
//! deferral when none is left), so it is recorded exactly when the last
//! snapshot is gone, never before, and a crash after that commit leaves a
//! `pending` delete for reconciliation like any other.
//!
//! Calls on one volume (and its snapshots) are serialized by a lock per
//! volume id ([`Operations::lock`]), taken by handlers, trackers and the
//! reconciler alike, so they never act on one resource at once.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cowsnap_proto::names;
use tokio::sync::{OwnedMutexGuard, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::catalog::operations::NewOp;
use crate::catalog::{self, Catalog, Tx};
use crate::error::{ControlError, Failure, Result};
use crate::metrics::Metrics;
use crate::model::{OpArgs, OpKind, OpResult, OpState, Operation, State, now_ms};
use crate::workers::{TaskKind, WorkerClient, WorkerTask, Workers, classify};

/// How long one wait on a worker's task lasts before the tracker records
/// progress and waits again.
const TRACK_STEP: Duration = Duration::from_secs(1);
/// Longest pause between tries while a worker does not answer.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Where a test makes the control service stop as if it crashed, in the
/// life of operations of one kind: nothing after that point is written,
/// the call fails with UNAVAILABLE, and this process never touches the
/// operation again (a restarted one repairs it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the operation is recorded, before its worker is called.
    BeforeWorker,
    /// After the worker acted, before the catalog records the outcome.
    AfterWorker,
}

/// A [`CrashPoint`] for operations of one kind (a test hook).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrashAt {
    pub kind: OpKind,
    pub point: CrashPoint,
}

/// Locks of volume ids.
#[derive(Default)]
struct Locks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The locks a call holds on volumes (released when dropped).
pub struct Guard {
    _held: Vec<OwnedMutexGuard<()>>,
}

/// The engine that records, drives and tracks operations.
pub struct Operations {
    catalog: Catalog,
    workers: Arc<Workers>,
    metrics: Arc<Metrics>,
    locks: Locks,
    /// Ticks whenever an operation changes (for WaitOperation).
    changed: watch::Sender<u64>,
    /// Operations that a tracker of this process follows, or that a
    /// simulated crash abandoned: the reconciler leaves them alone.
    owned: Mutex<HashSet<i64>>,
    crash: Option<CrashAt>,
    shutdown: CancellationToken,
    trackers: TaskTracker,
}

/// Why the worker's outcome is not known: the operation stays pending.
fn unknown(op: &Operation, e: ControlError) -> ControlError {
    ControlError::Unavailable(format!(
        "{e}; {} is recorded and completes when the worker answers",
        op.name()
    ))
}

impl Operations {
    pub fn new(
        catalog: Catalog,
        workers: Arc<Workers>,
        metrics: Arc<Metrics>,
        crash: Option<CrashAt>,
        shutdown: CancellationToken,
    ) -> Arc<Operations> {
        Arc::new(Operations {
            catalog,
            workers,
            metrics,
            locks: Locks::default(),
            changed: watch::Sender::new(0),
            owned: Mutex::new(HashSet::new()),
            crash,
            shutdown,
            trackers: TaskTracker::new(),
        })
    }

    /// Locks the volumes `ids` (in a fixed order, so two calls never wait
    /// on each other).
    pub async fn lock(&self, ids: &[&str]) -> Guard {
        let mut ids: Vec<&str> = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mutexes: Vec<_> = {
            let mut map = self.locks.map.lock().expect("locks");
            map.retain(|_, m| Arc::strong_count(m) > 1);
            ids.iter()
                .map(|id| map.entry(id.to_string()).or_default().clone())
                .collect()
        };
        let mut held = Vec::with_capacity(mutexes.len());
        for m in mutexes {
            held.push(m.lock_owned().await);
        }
        Guard { _held: held }
    }

    /// The volume ids an operation's changes touch (what to lock).
    pub fn lock_keys(op: &Operation) -> Vec<String> {
        let mut keys = vec![op.target.volume().to_string()];
        keys.extend(op.source.as_ref().map(|s| s.volume().to_string()));
        keys
    }

    pub fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    pub fn is_owned(&self, id: i64) -> bool {
        self.owned.lock().expect("owned").contains(&id)
    }

    pub async fn get(&self, id: i64) -> Result<Operation> {
        let mut c = self.catalog.conn().await?;
        catalog::operations::get(&mut c, id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("operations/{id} not found")))
    }

    /// Waits until the operation is done or `timeout` passes.
    pub async fn wait(&self, id: i64, timeout: Duration) -> Result<Operation> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            let op = self.get(id).await?;
            if op.state.done() {
                return Ok(op);
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Ok(op) },
                _ = tokio::time::sleep_until(deadline) => return self.get(id).await,
                _ = self.shutdown.cancelled() => return Ok(op),
            }
        }
    }

    /// A simulated crash at `point`, if a test asked for one; a real one
    /// (SIGKILL) if `COWSNAP_TEST_KILL_AT` names it
    /// (`KIND:before_worker` or `KIND:after_worker`, e.g.
    /// `delete_volume:after_worker`).
    fn crash_at(&self, op: &Operation, point: CrashPoint) -> Result<()> {
        cowsnap_proto::kill_point::reached(&format!(
            "{}:{}",
            op.kind.as_str(),
            match point {
                CrashPoint::BeforeWorker => "before_worker",
                CrashPoint::AfterWorker => "after_worker",
            }
        ));
        if self.crash
            == Some(CrashAt {
                kind: op.kind,
                point,
            })
        {
            tracing::warn!(operation = %op.name(), ?point, "test hook: simulated crash");
            self.owned.lock().expect("owned").insert(op.id);
            return Err(ControlError::Unavailable(format!(
                "simulated crash {point:?} in {}",
                op.name()
            )));
        }
        Ok(())
    }

    /// Ends an operation inside `tx`: returns it as the commit will leave
    /// it (`None`: it had ended already, nothing changed).
    async fn finish(
        &self,
        tx: &mut Tx,
        op: &Operation,
        outcome: std::result::Result<Option<&OpResult>, &ControlError>,
    ) -> Result<Option<Operation>> {
        let failure;
        let o = match outcome {
            Ok(r) => Ok(r),
            Err(e) => {
                failure = e.failure();
                Err(&failure)
            }
        };
        catalog::operations::finish(tx, op.id, o, now_ms()).await
    }

    /// Commits the settle of `op`, begun with [`Catalog::settle`] (its
    /// record is durable already: the settle can be derived again, so it
    /// does not wait for the disk), and counts it. `done`: the operation as
    /// [`Operations::finish`] left it (`None`: read again).
    async fn commit(&self, tx: Tx, op: &Operation, done: Option<Operation>) -> Result<Operation> {
        tx.commit().await?;
        self.notify();
        let op = match done {
            Some(done) => done,
            None => self.get(op.id).await?,
        };
        if op.state.done() {
            self.metrics.operation_done(op.kind, op.state);
            match &op.error {
                None => {
                    tracing::info!(operation = %op.name(), kind = op.kind.as_str(), target = %op.target, "operation succeeded")
                }
                Some(m) => {
                    tracing::warn!(operation = %op.name(), kind = op.kind.as_str(), target = %op.target, "operation failed: {m}")
                }
            }
        }
        Ok(op)
    }

    /// Carries a recorded operation forward: calls its worker and settles
    /// the outcome. The caller holds the lock of its volumes. Returns the
    /// operation as it is after (done, or running with its tracker
    /// started); fails with UNAVAILABLE when the worker does not answer
    /// (the operation stays pending).
    pub async fn drive(self: &Arc<Self>, id: i64) -> Result<Operation> {
        let op = self.get(id).await?;
        self.drive_op(op, None).await
    }

    /// [`Operations::drive`] for an operation the caller holds as it is
    /// recorded, with the client of its worker when the caller has it.
    pub async fn drive_op(
        self: &Arc<Self>,
        op: Operation,
        w: Option<WorkerClient>,
    ) -> Result<Operation> {
        match op.state {
            OpState::Succeeded | OpState::Failed => return Ok(op),
            OpState::Running => {
                self.track(op.id);
                return Ok(op);
            }
            OpState::Pending => {}
        }
        self.crash_at(&op, CrashPoint::BeforeWorker)?;
        self.drive_pending(&op, w).await.map_err(|e| match e {
            // The worker may have acted: the catalog could not record it.
            ControlError::CatalogFull(m) => ControlError::CatalogFull(format!(
                "{m}; {} is recorded and completes once it has room",
                op.name()
            )),
            e => e,
        })
    }

    async fn drive_pending(
        self: &Arc<Self>,
        op: &Operation,
        w: Option<WorkerClient>,
    ) -> Result<Operation> {
        let w = match w {
            Some(w) => w,
            None => match self.workers.client(&op.worker_id).await {
                Ok(w) => w,
                Err(ControlError::NotFound(m)) => {
                    let e = ControlError::FailedPrecondition(format!("its worker is gone: {m}"));
                    return self.fail_undo(op, e).await;
                }
                Err(e) => return Err(e),
            },
        };
        match op.kind {
            OpKind::CreateVolume => self.drive_create_volume(op, &w).await,
            OpKind::DeleteVolume => self.drive_delete_volume(op, &w).await,
            OpKind::CreateSnapshot => self.drive_create_snapshot(op, &w).await,
            OpKind::DeleteSnapshot => self.drive_delete_snapshot(op, &w).await,
            OpKind::MergeSnapshot => self.drive_merge(op, &w).await,
            OpKind::RestoreVolume | OpKind::CloneVolume => self.drive_copy(op, &w).await,
            OpKind::ExpandVolume => self.drive_expand_volume(op, &w).await,
        }
    }

    /// Ends an operation the worker refused (or that cannot go on), undoing
    /// what was recorded for it.
    async fn fail_undo(&self, op: &Operation, e: ControlError) -> Result<Operation> {
        let mut tx = self.catalog.settle().await?;
        let now = now_ms();
        match op.kind {
            OpKind::CreateVolume | OpKind::RestoreVolume | OpKind::CloneVolume => {
                catalog::volumes::delete(&mut tx, op.target.volume()).await?;
            }
            OpKind::DeleteVolume => {
                let prior = op.args.prior_state.unwrap_or(State::Ready);
                catalog::volumes::set_state(&mut tx, op.target.volume(), prior, "", now).await?;
            }
            // Its size changes only once the worker has grown it.
            OpKind::ExpandVolume => {}
            OpKind::CreateSnapshot => {
                let (v, s) = op.target.snapshot()?;
                catalog::snapshots::delete(&mut tx, v, s).await?;
                Self::reclaim_if_released(&mut tx, v, now).await?;
            }
            OpKind::DeleteSnapshot | OpKind::MergeSnapshot => {
                let (v, s) = op.target.snapshot()?;
                let prior = op.args.prior_state.unwrap_or(State::Ready);
                catalog::snapshots::set_state(&mut tx, v, s, prior, now).await?;
                if op.kind == OpKind::MergeSnapshot {
                    catalog::volumes::set_state(&mut tx, v, State::Ready, "", now).await?;
                }
            }
        }
        let done = self.finish(&mut tx, op, Err(&e)).await?;
        self.commit(tx, op, done).await
    }

    async fn volume_result(&self, tx: &mut Tx, id: &str) -> Result<Option<OpResult>> {
        Ok(catalog::volumes::get(tx, id).await?.map(|mut v| {
            v.operation = None;
            OpResult::Volume(v)
        }))
    }

    async fn drive_create_volume(&self, op: &Operation, w: &WorkerClient) -> Result<Operation> {
        let id = op.target.volume().to_string();
        match w
            .create_volume(&id, op.args.size_bytes, op.args.chunk_sectors)
            .await
        {
            Ok(_) => {
                self.crash_at(op, CrashPoint::AfterWorker)?;
                let mut tx = self.catalog.settle().await?;
                catalog::volumes::set_state(&mut tx, &id, State::Ready, "", now_ms()).await?;
                let r = self.volume_result(&mut tx, &id).await?;
                let done = self.finish(&mut tx, op, Ok(r.as_ref())).await?;
                self.commit(tx, op, done).await
            }
            Err(e) if classify::unknown(&e) => Err(unknown(op, e)),
            Err(e) => self.fail_undo(op, e).await,
        }
    }

    /// Grows the volume on its worker (idempotent there: a repeat after a
    /// crash finds it grown), then records the new size.
    async fn drive_expand_volume(&self, op: &Operation, w: &WorkerClient) -> Result<Operation> {
        let id = op.target.volume().to_string();
        match w
            .expand_volume(&op.target.to_string(), op.args.size_bytes)
            .await
        {
            Ok(_) => {
                self.crash_at(op, CrashPoint::AfterWorker)?;
                let mut tx = self.catalog.settle().await?;
                catalog::volumes::set_size(&mut tx, &id, op.args.size_bytes, now_ms()).await?;
                let r = self.volume_result(&mut tx, &id).await?;
                let done = self.finish(&mut tx, op, Ok(r.as_ref())).await?;
                self.commit(tx, op, done).await
            }
            Err(e) if classify::unknown(&e) => Err(unknown(op, e)),
            Err(e) => self.fail_undo(op, e).await,
        }
    }

    /// In `tx`, which has just removed a snapshot row of volume `vol` or
    /// made it DELETED_WITH_SNAPSHOTS: if the volume is DELETED_WITH_SNAPSHOTS
    /// and has no snapshot left, records its reclaim (a volume delete,
    /// undone back to DELETED_WITH_SNAPSHOTS if the worker refuses it).
    /// Returns the operation, to drive once `tx` is committed (D12 of
    /// docs/design.md).
    pub async fn reclaim_if_released(tx: &mut Tx, vol: &str, now: i64) -> Result<Option<i64>> {
        let Some(v) = catalog::volumes::get(tx, vol).await? else {
            return Ok(None);
        };
        if v.state != State::DeletedWithSnapshots || catalog::snapshots::count(tx, vol).await? > 0 {
            return Ok(None);
        }
        catalog::volumes::set_state(tx, vol, State::Deleting, &v.error, now).await?;
        let name = v.name();
        let args = OpArgs {
            prior_state: Some(State::DeletedWithSnapshots),
            deleted: Some(OpResult::Volume(v.clone())),
            ..Default::default()
        };
        let op = catalog::operations::insert(
            tx,
            NewOp {
                kind: OpKind::DeleteVolume,
                target: &name,
                source: "",
                volume_id: vol,
                worker_id: &v.worker_id,
                args: &args,
            },
            now,
        )
        .await?
        .id;
        tracing::info!(volume = %name, operation = op, "last snapshot gone: reclaim recorded");
        Ok(Some(op))
    }

    async fn drive_delete_volume(&self, op: &Operation, w: &WorkerClient) -> Result<Operation> {
        if op.args.deferred {
            return self.drive_retire_volume(op, w).await;
        }
        match w.delete_volume(&op.target.to_string()).await {
            Ok(()) | Err(ControlError::NotFound(_)) => {
                self.crash_at(op, CrashPoint::AfterWorker)?;
                let mut tx = self.catalog.settle().await?;
                catalog::volumes::delete(&mut tx, op.target.volume()).await?;
                let done = self
                    .finish(&mut tx, op, Ok(op.args.deleted.as_ref()))
                    .await?;
                self.commit(tx, op, done).await
            }
            Err(e) if classify::unknown(&e) => Err(unknown(op, e)),
            Err(e) => self.fail_undo(op, e).await,
        }
    }

    /// A deferred delete: the worker retires the volume (closes its
    /// export); it settles DELETED_WITH_SNAPSHOTS, or has its reclaim
    /// recorded at once if its snapshots went meanwhile.
    async fn drive_retire_volume(&self, op: &Operation, w: &WorkerClient) -> Result<Operation> {
        match w.retire_volume(&op.target.to_string()).await {
            // NOT_FOUND: the worker lost it; nothing is exported either.
            Ok(_) | Err(ControlError::NotFound(_)) => {
                self.crash_at(op, CrashPoint::AfterWorker)?;
                let id = op.target.volume().to_string();
                let now = now_ms();
                let mut tx = self.catalog.settle().await?;
                let error = catalog::volumes::get(&mut tx, &id)
                    .await?
                    .map(|v| v.error)
                    .unwrap_or_default();
                catalog::volumes::set_state(&mut tx, &id, State::DeletedWithSnapshots, &error, now)
                    .await?;
                let r = self.volume_result(&mut tx, &id).await?;
                Self::reclaim_if_released(&mut tx, &id, now).await?;
                let done = self.finish(&mut tx, op, Ok(r.as_ref())).await?;
                self.commit(tx, op, done).await
            }
            Err(e) if classify::unknown(&e) => Err(unknown(op, e)),
            Err(e) => self.fail_undo(op, e).await,
        }
    }

    async fn drive_create_snapshot(&self, op: &Operation, w: &WorkerClient) -> Result<Operation> {
        let (vol, snap) = op.target.snapshot()?;
        match w
            .create_snapshot(
                &names::volume(vol),
                snap,
                op.args.cow_size_bytes,
                op.args.writable,
            )
            .await
        {
            Ok(ws) => {
                self.crash_at(op, CrashPoint::AfterWorker)?;
                let now = now_ms();
                let mut tx = self.catalog.settle().await?;
                let ready = Some(State::Ready);
                catalog::snapshots::set_reported(&mut tx, vol, snap, ws.reported(), ready, now)
                    .await?;
                let r = catalog::snapshots::get(&mut tx, vol, snap)
                    .await?
                    .map(|mut s| {
                        s.operation = None;
                        OpResult::Snapshot(s)
                    });
                let done = self.finish(&mut tx, op, Ok(r.as_ref())).await?;
                self.commit(tx, op, done).await
            }
            Err(e) if classify::unknown(&e) => Err(unknown(op, e)),
            Err(e) => self.fail_undo(op, e).await,
        }
    }

    async fn drive_delete_snapshot(&self, op: &Operation, w: &WorkerClient) -> Result<Operation> {
        match w.delete_snapshot(&op.target.to_string()).await {
            Ok(()) | Err(ControlError::NotFound(_)) => {
                self.crash_at(op, CrashPoint::AfterWorker)?;
                let (vol, snap) = op.target.snapshot()?;
                let mut tx = self.catalog.settle().await?;
                catalog::snapshots::delete(&mut tx, vol, snap).await?;
                Self::reclaim_if_released(&mut tx, vol, now_ms()).await?;
                let done = self
                    .finish(&mut tx, op, Ok(op.args.deleted.as_ref()))
                    .await?;
                self.commit(tx, op, done).await
            }
            Err(e) if classify::unknown(&e) => Err(unknown(op, e)),
            Err(e) => self.fail_undo(op, e).await,
        }
    }

    async fn drive_merge(self: &Arc<Self>, op: &Operation, w: &WorkerClient) -> Result<Operation> {
        match w.merge_snapshot(&op.target.to_string()).await {
            Ok(t) => {
                self.crash_at(op, CrashPoint::AfterWorker)?;
                self.started(op, &t).await
            }
            Err(ControlError::NotFound(m)) => {
                // The snapshot is gone from the worker: either this merge
                // ran to its end while nobody watched (a merged snapshot
                // goes away), or it vanished.
                let tasks = w.list_tasks().await.map_err(|e| unknown(op, e))?;
                let merged = tasks
                    .iter()
                    .filter(|t| {
                        t.kind == TaskKind::Merge
                            && t.target == op.target.to_string()
                            && t.create_time + 5 >= op.create_time / 1000
                    })
                    .max_by_key(|t| task_number(&t.name))
                    .is_some_and(|t| t.done && t.error.is_none());
                if merged {
                    self.settle_task(op, None).await
                } else {
                    let (vol, snap) = op.target.snapshot()?;
                    let mut tx = self.catalog.settle().await?;
                    let now = now_ms();
                    catalog::snapshots::delete(&mut tx, vol, snap).await?;
                    catalog::volumes::set_state(&mut tx, vol, State::Ready, "", now).await?;
                    let e = ControlError::NotFound(m);
                    let done = self.finish(&mut tx, op, Err(&e)).await?;
                    self.commit(tx, op, done).await
                }
            }
            Err(e) if classify::unknown(&e) => Err(unknown(op, e)),
            Err(e) => self.fail_undo(op, e).await,
        }
    }

    async fn drive_copy(self: &Arc<Self>, op: &Operation, w: &WorkerClient) -> Result<Operation> {
        let id = op.target.volume().to_string();
        let r = if op.kind == OpKind::RestoreVolume {
            w.restore_volume(&id, &op.source_name(), op.args.chunk_sectors)
                .await
        } else {
            w.clone_volume(&id, &op.source_name(), op.args.chunk_sectors)
                .await
        };
        match r {
            Ok(t) => {
                self.crash_at(op, CrashPoint::AfterWorker)?;
                self.started(op, &t).await
            }
            Err(ControlError::AlreadyExists(m)) => {
                // The worker has the volume but no longer the task that
                // made it: judge by the volume.
                match w.get_volume(&op.target.to_string()).await {
                    Ok(v) if v.state == State::Ready => self.settle_task(op, None).await,
                    Ok(v) if v.state == State::Failed => {
                        self.settle_task(op, Some("the copy failed on the worker".into()))
                            .await
                    }
                    Ok(_) => Err(unknown(
                        op,
                        ControlError::Unavailable(format!("{} is still being made", op.target)),
                    )),
                    Err(e) if classify::unknown(&e) => Err(unknown(op, e)),
                    Err(_) => self.fail_undo(op, ControlError::AlreadyExists(m)).await,
                }
            }
            Err(e) if classify::unknown(&e) => Err(unknown(op, e)),
            Err(e) => self.fail_undo(op, e).await,
        }
    }

    /// The worker runs the operation's task: record it and follow it.
    async fn started(self: &Arc<Self>, op: &Operation, t: &WorkerTask) -> Result<Operation> {
        if t.done {
            return self.settle_task(op, t.error.clone()).await;
        }
        let mut c = self.catalog.conn().await?;
        catalog::operations::set_running(&mut c, op.id, &t.name, now_ms()).await?;
        catalog::operations::set_percent(&mut c, op.id, t.percent, now_ms()).await?;
        drop(c);
        self.notify();
        self.track(op.id);
        self.get(op.id).await
    }

    /// A long-running operation's task ended (`error` when it failed):
    /// settle the resources and the operation.
    async fn settle_task(&self, op: &Operation, error: Option<String>) -> Result<Operation> {
        let now = now_ms();
        let mut tx = self.catalog.settle().await?;
        let done = match (op.kind, error) {
            (OpKind::MergeSnapshot, None) => {
                let (vol, snap) = op.target.snapshot()?;
                catalog::snapshots::delete(&mut tx, vol, snap).await?;
                catalog::volumes::set_state(&mut tx, vol, State::Ready, "", now).await?;
                let r = self.volume_result(&mut tx, vol).await?;
                self.finish(&mut tx, op, Ok(r.as_ref())).await?
            }
            (OpKind::MergeSnapshot, Some(m)) => {
                // The worker keeps the volume merging: MergeSnapshot again
                // resumes it.
                let e = ControlError::Aborted(format!("the merge failed on its worker: {m}"));
                self.finish(&mut tx, op, Err(&e)).await?
            }
            (_, None) => {
                let id = op.target.volume().to_string();
                catalog::volumes::set_state(&mut tx, &id, State::Ready, "", now).await?;
                let r = self.volume_result(&mut tx, &id).await?;
                self.finish(&mut tx, op, Ok(r.as_ref())).await?
            }
            (_, Some(m)) => {
                let id = op.target.volume().to_string();
                let why = format!("the {} failed on its worker: {m}", op.kind.as_str());
                catalog::volumes::set_state(&mut tx, &id, State::Failed, &why, now).await?;
                self.finish(&mut tx, op, Err(&ControlError::Aborted(why)))
                    .await?
            }
        };
        self.commit(tx, op, done).await
    }

    /// Starts following a running operation's task, unless this process
    /// already does.
    pub fn track(self: &Arc<Self>, id: i64) {
        if !self.owned.lock().expect("owned").insert(id) {
            return;
        }
        let me = self.clone();
        self.trackers.spawn(async move {
            if let Err(e) = me.follow(id).await {
                tracing::warn!(operation = id, "stopped following the operation: {e}");
            }
            me.owned.lock().expect("owned").remove(&id);
        });
    }

    /// Follows a running operation until it ends (or shutdown).
    async fn follow(self: &Arc<Self>, id: i64) -> Result<()> {
        let mut backoff = Duration::from_millis(250);
        loop {
            let op = self.get(id).await?;
            if op.state != OpState::Running {
                return Ok(());
            }
            let step = async {
                let w = self.workers.client(&op.worker_id).await?;
                w.wait_task(&op.worker_task, TRACK_STEP).await
            };
            let r = tokio::select! {
                r = step => r,
                _ = self.shutdown.cancelled() => return Ok(()),
            };
            match r {
                Ok(t) if !t.done => {
                    backoff = Duration::from_millis(250);
                    if t.percent != op.percent {
                        let mut c = self.catalog.conn().await?;
                        catalog::operations::set_percent(&mut c, id, t.percent, now_ms()).await?;
                        self.notify();
                    }
                }
                Ok(t) => {
                    let keys = Self::lock_keys(&op);
                    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                    let _g = self.lock(&keys).await;
                    let op = self.get(id).await?;
                    if op.state == OpState::Running {
                        self.settle_task(&op, t.error).await?;
                    }
                    return Ok(());
                }
                Err(ControlError::NotFound(_)) => {
                    // The worker forgot the task: judge by the resources.
                    let keys = Self::lock_keys(&op);
                    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                    let _g = self.lock(&keys).await;
                    if self.resolve_lost(&op).await? {
                        return Ok(());
                    }
                }
                Err(e) => {
                    tracing::debug!(operation = %op.name(), "waiting for its worker: {e}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.shutdown.cancelled() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// A running operation whose task the worker no longer knows. Returns
    /// whether it is settled.
    async fn resolve_lost(&self, op: &Operation) -> Result<bool> {
        let w = self.workers.client(&op.worker_id).await?;
        match op.kind {
            OpKind::MergeSnapshot => match w.get_snapshot(&op.target.to_string()).await {
                Err(ControlError::NotFound(_)) => {
                    self.settle_task(op, None).await?;
                    Ok(true)
                }
                Ok(_) => {
                    // Still there: ask for the merge again (it resumes).
                    let t = w.merge_snapshot(&op.target.to_string()).await?;
                    let mut c = self.catalog.conn().await?;
                    catalog::operations::set_running(&mut c, op.id, &t.name, now_ms()).await?;
                    Ok(false)
                }
                Err(e) => Err(e),
            },
            _ => match w.get_volume(&op.target.to_string()).await {
                Ok(v) if v.state == State::Ready => {
                    self.settle_task(op, None).await?;
                    Ok(true)
                }
                Ok(v) if v.state == State::Failed => {
                    self.settle_task(op, Some("the copy failed".into())).await?;
                    Ok(true)
                }
                Ok(_) => Ok(false),
                Err(ControlError::NotFound(m)) => {
                    let e = ControlError::NotFound(format!("its worker lost it: {m}"));
                    self.fail_undo(op, e).await?;
                    Ok(true)
                }
                Err(e) => Err(e),
            },
        }
    }

    /// Stops the trackers (after `shutdown` was cancelled).
    pub async fn stopped(&self) {
        self.trackers.close();
        self.trackers.wait().await;
    }
}

fn task_number(name: &str) -> u64 {
    names::parse_in("tasks", name)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The error a failed operation ended with.
pub fn failure(op: &Operation) -> Option<ControlError> {
    op.error.as_ref().map(Failure::error)
}
