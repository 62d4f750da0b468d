//! Reconciliation: at start-up and periodically, the catalog is brought in
//! line with what the workers report, so a crash of either side at any
//! point neither leaks a device nor leaves a resource stuck.
//!
//! A pass:
//! 1. checks every worker's health (and the workers given at start that
//!    never answered yet are registered once they do);
//! 2. drives every unfinished operation this process does not already
//!    follow: `pending` ones are driven again ([`Operations::drive`]: every
//!    worker call is idempotent, so this finishes what a crash interrupted,
//!    or undoes it when the worker refuses); `running` ones get a tracker;
//! 3. sweeps each healthy worker (its ListVolumes) against the catalog,
//!    for resources no operation is working on: usage and `INVALID` states
//!    are recorded; a volume or snapshot the worker no longer has becomes
//!    `FAILED` (one it has again becomes `READY`); one the worker has and
//!    the catalog does not (made outside this control service, or a catalog
//!    restored from an old backup) is adopted into the catalog with the
//!    label `cowsnap.io/adopted=true`, visible and deletable, never
//!    silently destroyed. A DELETED_WITH_SNAPSHOTS volume stays so even
//!    when its worker lost it (its snapshots still need deleting), is
//!    retired again if its worker exports it, and has its reclaim recorded
//!    if it has no snapshot left and none was.
//!
//! Driving an operation may record another (the reclaim of a volume whose
//! last snapshot a delete removed): the pass drives those too.
//!
//! Every repair takes the volume's lock and looks again before acting, so
//! it never races a call in flight.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use cowsnap_proto::names;

use crate::catalog::{self, Catalog};
use crate::error::{ControlError, Result};
use crate::metrics::Metrics;
use crate::model::{Operation, Snapshot, State, Volume, now_ms};
use crate::operations::Operations;
use crate::snapshots::same_report;
use crate::workers::{WorkerSnapshot, WorkerVolume, Workers};

/// The operations of the catalog at one moment, for a sweep: the newest
/// recorded and the unfinished ones.
struct Activity {
    newest: i64,
    active: Vec<Operation>,
}

/// The label of resources adopted from a worker.
pub const ADOPTED_LABEL: &str = "cowsnap.io/adopted";

/// What a pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Unfinished operations driven again (or given a tracker).
    pub operations_driven: usize,
    /// Operations still pending after the pass (their worker did not
    /// answer).
    pub operations_pending: usize,
    pub marked_failed: usize,
    pub marked_ready: usize,
    pub adopted: usize,
    pub workers_unhealthy: usize,
}

/// Runs reconciliation passes.
pub struct Reconciler {
    catalog: Catalog,
    workers: Arc<Workers>,
    metrics: Arc<Metrics>,
    ops: Arc<Operations>,
    /// Workers to register as soon as they answer.
    pending_workers: Mutex<Vec<String>>,
}

impl Reconciler {
    pub fn new(
        catalog: Catalog,
        workers: Arc<Workers>,
        metrics: Arc<Metrics>,
        ops: Arc<Operations>,
        pending_workers: Vec<String>,
    ) -> Reconciler {
        Reconciler {
            catalog,
            workers,
            metrics,
            ops,
            pending_workers: Mutex::new(pending_workers),
        }
    }

    /// One pass (see the module doc).
    pub async fn run_once(&self) -> Result<Report> {
        let mut report = Report {
            workers_unhealthy: self.check_workers().await?,
            ..Report::default()
        };
        self.metrics.reconcile_passes.inc();
        self.operations(&mut report).await?;
        for w in self.workers.list().await? {
            if !w.healthy {
                continue;
            }
            let client = self.workers.client(&w.id).await?;
            let before = self.activity().await?;
            match client.list_volumes().await {
                Ok(vols) => self.sweep(&w.id, vols, before, &mut report).await?,
                Err(e) => tracing::warn!(worker = %w.name(), "cannot list its volumes: {e}"),
            }
        }
        if report != Report::default() {
            tracing::info!(?report, "reconciliation pass");
        }
        Ok(report)
    }

    /// Registers the workers given at start that answer now, and checks
    /// every worker's health. Returns how many are unhealthy.
    pub async fn check_workers(&self) -> Result<usize> {
        self.register_pending().await;
        let mut unhealthy = 0;
        for w in self.workers.list().await? {
            if !self.workers.check(&w).await?.healthy {
                unhealthy += 1;
            }
        }
        Ok(unhealthy)
    }

    async fn register_pending(&self) {
        let addrs = self.pending_workers.lock().expect("pending").clone();
        for a in addrs {
            match self.workers.register(&a, None).await {
                Ok(_) => self
                    .pending_workers
                    .lock()
                    .expect("pending")
                    .retain(|x| x != &a),
                Err(e) => tracing::warn!(address = %a, "worker not registered yet: {e}"),
            }
        }
    }

    async fn operations(&self, report: &mut Report) -> Result<()> {
        // Operations recorded by the ones driven (reclaims) are driven in a
        // further round; those still pending after a round are not retried
        // in this pass. A round that drove none ends the pass's driving:
        // what it found unfinished was in the hands of calls in flight,
        // which keep recording new ones as long as clients call (a pass
        // that chased them ran for minutes under a steady stream of
        // creates, each one waiting for its call to end).
        let mut tried = std::collections::HashSet::new();
        loop {
            let active: Vec<_> = {
                let mut c = self.catalog.conn().await?;
                catalog::operations::active(&mut c).await?
            }
            .into_iter()
            .filter(|o| tried.insert(o.id))
            .collect();
            if active.is_empty() {
                return Ok(());
            }
            let driven = report.operations_driven;
            self.drive_all(active, report).await?;
            if report.operations_driven == driven {
                return Ok(());
            }
        }
    }

    async fn drive_all(&self, active: Vec<Operation>, report: &mut Report) -> Result<()> {
        for op in active {
            if self.ops.is_owned(op.id) {
                continue;
            }
            let keys = Operations::lock_keys(&op);
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let _g = self.ops.lock(&keys).await;
            let op = self.ops.get(op.id).await?;
            if op.state.done() || self.ops.is_owned(op.id) {
                continue;
            }
            report.operations_driven += 1;
            match self.ops.drive(op.id).await {
                Ok(after) => {
                    self.metrics.repaired("operation_driven");
                    tracing::info!(operation = %op.name(), kind = op.kind.as_str(), target = %op.target,
                        state = after.state.as_str(), "unfinished operation driven");
                }
                Err(e) => {
                    report.operations_pending += 1;
                    tracing::warn!(operation = %op.name(), kind = op.kind.as_str(), target = %op.target,
                        "unfinished operation still pending: {e}");
                }
            }
        }
        Ok(())
    }

    /// What operations were doing before a worker is asked for its
    /// volumes: see [`Activity`].
    async fn activity(&self) -> Result<Activity> {
        let mut c = self.catalog.conn().await?;
        Ok(Activity {
            newest: catalog::operations::newest_id(&mut c).await?,
            active: catalog::operations::active(&mut c).await?,
        })
    }

    /// Compares one worker's volumes, `reported` (asked for after
    /// `before` was read), with the catalog's. The catalog's side is read
    /// at once (the worker's volumes, their snapshots, the operations) and
    /// only a volume whose report would change something is swept, under
    /// its lock and after looking again: a pass over a quiet catalog of
    /// thousands of volumes costs a few reads per worker, not three per
    /// volume. A volume an operation worked on at any time since `before`
    /// is left to the next pass: the report may predate what the operation
    /// did, so the difference says nothing, and looking again would cost a
    /// worker call per volume, each waiting for the calls that hold its
    /// lock.
    async fn sweep(
        &self,
        worker_id: &str,
        reported: Vec<WorkerVolume>,
        before: Activity,
        report: &mut Report,
    ) -> Result<()> {
        let reported: HashMap<String, WorkerVolume> =
            reported.into_iter().map(|v| (v.id.clone(), v)).collect();
        let (listed, snaps, mut worked) = {
            let mut c = self.catalog.conn().await?;
            (
                catalog::volumes::list_on_worker(&mut c, worker_id).await?,
                catalog::snapshots::list_on_worker(&mut c, worker_id).await?,
                // Every operation unfinished now either was then or was
                // recorded since: these and `before.active` are all that
                // worked since the report was asked for.
                catalog::operations::after(&mut c, before.newest).await?,
            )
        };
        worked.extend(before.active);
        let mut snaps_of: HashMap<&str, &[Snapshot]> = HashMap::new();
        for group in snaps.chunk_by(|a, b| a.volume_id == b.volume_id) {
            snaps_of.insert(group[0].volume_id.as_str(), group);
        }
        for v in &listed {
            let wv = reported.get(&v.id);
            let snaps = snaps_of.get(v.id.as_str()).copied().unwrap_or_default();
            if works_on(&worked, &v.id) || !needs_sweep(worker_id, v, snaps, wv) {
                continue;
            }
            let _g = self.ops.lock(&[&v.id]).await;
            self.sweep_volume(worker_id, &v.id, wv, report).await?;
        }
        let known: HashSet<&str> = listed.iter().map(|v| v.id.as_str()).collect();
        for (id, wv) in &reported {
            if known.contains(id.as_str())
                || matches!(wv.state, State::Creating | State::Deleting)
                || works_on(&worked, id)
            {
                continue;
            }
            let _g = self.ops.lock(&[id]).await;
            self.adopt(worker_id, wv, report).await?;
        }
        Ok(())
    }

    /// Whether an unfinished operation works on the volume or one of its
    /// snapshots (then reconciliation leaves it to the operation).
    async fn busy(&self, vol: &str) -> Result<bool> {
        let mut c = self.catalog.conn().await?;
        Ok(works_on(&catalog::operations::active(&mut c).await?, vol))
    }

    async fn sweep_volume(
        &self,
        worker_id: &str,
        id: &str,
        wv: Option<&WorkerVolume>,
        report: &mut Report,
    ) -> Result<()> {
        if self.busy(id).await? {
            return Ok(());
        }
        let mut c = self.catalog.conn().await?;
        let Some(v) = catalog::volumes::get(&mut c, id).await? else {
            return Ok(());
        };
        if v.worker_id != worker_id || matches!(v.state, State::Creating | State::Deleting) {
            return Ok(());
        }
        let snaps: Vec<Snapshot> = catalog::snapshots::list(&mut c, Some(id), ("", 0), -1)
            .await?
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        drop(c);
        // The worker's report was taken before this volume's lock: calls
        // may have changed the volume since. Whatever the report would
        // change, the worker confirms now.
        let fresh;
        let wv = if differs(&v, &snaps, wv) {
            let client = self.workers.client(worker_id).await?;
            match client.get_volume(&v.name()).await {
                Ok(f) => {
                    fresh = f;
                    Some(&fresh)
                }
                Err(ControlError::NotFound(_)) => None,
                Err(e) => {
                    tracing::warn!(volume = %v.name(), "cannot look at it on its worker: {e}");
                    return Ok(());
                }
            }
        } else {
            wv
        };
        if v.state == State::DeletedWithSnapshots
            && self
                .deleted_with_snapshots(&v, snaps.is_empty(), wv)
                .await?
        {
            return Ok(());
        }
        // Nothing is written when the report changes nothing the catalog
        // keeps (its usage's time aside): a pass over a quiet catalog of
        // thousands of volumes reads, and takes no write lock. What is
        // written mirrors the workers and the next pass derives it again:
        // no fsync of its own ([`Catalog::settle`]).
        let now = now_ms();
        let Some(wv) = wv else {
            if matches!(v.state, State::Failed | State::DeletedWithSnapshots) {
                return Ok(());
            }
            let mut tx = self.catalog.settle().await?;
            tracing::error!(volume = %v.name(), "its worker no longer has it: marked FAILED");
            catalog::volumes::set_state(&mut tx, id, State::Failed, "missing on its worker", now)
                .await?;
            for s in &snaps {
                catalog::snapshots::set_state(&mut tx, id, &s.id, State::Failed, now).await?;
            }
            tx.commit().await?;
            report.marked_failed += 1;
            self.metrics.repaired("volume_missing");
            return Ok(());
        };
        let back = back(&v, wv);
        let changes = snapshot_changes(&snaps, wv);
        // Snapshots the worker has and the catalog does not.
        let adopt: Vec<&WorkerSnapshot> = wv
            .snapshots
            .iter()
            .filter(|ws| {
                !snaps.iter().any(|s| s.id == ws.id)
                    && !matches!(ws.state, State::Creating | State::Deleting)
            })
            .collect();
        if !back && changes.is_empty() && adopt.is_empty() {
            return Ok(());
        }
        let mut tx = self.catalog.settle().await?;
        if back {
            catalog::volumes::set_state(&mut tx, id, State::Ready, "", now).await?;
        }
        let mut failed = 0;
        for (s, change) in changes {
            match change {
                SnapshotChange::Failed => {
                    tracing::error!(snapshot = %s.name(), "its worker no longer has it: marked FAILED");
                    catalog::snapshots::set_state(&mut tx, id, &s.id, State::Failed, now).await?;
                    failed += 1;
                }
                SnapshotChange::Reported(ws, to) => {
                    catalog::snapshots::set_reported(&mut tx, id, &s.id, ws.reported(), to, now)
                        .await?;
                }
            }
        }
        for ws in &adopt {
            catalog::snapshots::insert(&mut tx, &adopted_snapshot(ws, v.chunk_sectors), now)
                .await?;
            catalog::snapshots::set_reported(&mut tx, id, &ws.id, ws.reported(), None, now).await?;
            tracing::warn!(snapshot = %names::snapshot(id, &ws.id), "adopted from its worker");
        }
        tx.commit().await?;
        report.marked_ready += usize::from(back);
        report.marked_failed += failed;
        for _ in 0..failed {
            self.metrics.repaired("snapshot_missing");
        }
        report.adopted += adopt.len();
        Ok(())
    }

    /// A DELETED_WITH_SNAPSHOTS volume: retired again if its worker exports
    /// it (a worker state restored from before the retire), reclaimed if it
    /// has no snapshot left and no reclaim was recorded. Returns whether a
    /// reclaim was recorded.
    async fn deleted_with_snapshots(
        &self,
        v: &Volume,
        no_snapshots: bool,
        wv: Option<&WorkerVolume>,
    ) -> Result<bool> {
        if let Some(wv) = wv
            && !wv.retired
        {
            tracing::warn!(volume = %v.name(), "deleted but exported by its worker: retiring it again");
            let client = self.workers.client(&v.worker_id).await?;
            if let Err(e) = client.retire_volume(&v.name()).await {
                tracing::warn!(volume = %v.name(), "cannot retire it: {e}");
            }
        }
        if no_snapshots {
            let mut tx = self.catalog.write().await?;
            let op = Operations::reclaim_if_released(&mut tx, &v.id, now_ms()).await?;
            tx.commit().await?;
            if let Some(op) = op {
                self.ops.notify();
                self.metrics.repaired("reclaim_recorded");
                if let Err(e) = self.ops.drive(op).await {
                    tracing::warn!(volume = %v.name(), "reclaim still pending: {e}");
                }
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Takes a volume the worker has and the catalog lacks into the
    /// catalog, after looking again under its lock.
    async fn adopt(&self, worker_id: &str, wv: &WorkerVolume, report: &mut Report) -> Result<()> {
        let mut c = self.catalog.conn().await?;
        if let Some(v) = catalog::volumes::get(&mut c, &wv.id).await? {
            if v.worker_id != worker_id {
                tracing::error!(volume = %v.name(), worker = worker_id,
                    "two workers hold a volume of this name; the catalog places it on workers/{}",
                    v.worker_id);
            }
            return Ok(());
        }
        drop(c);
        let client = self.workers.client(worker_id).await?;
        let wv = match client.get_volume(&names::volume(&wv.id)).await {
            Ok(v) => v,
            Err(_) => return Ok(()),
        };
        let now = now_ms();
        let mut labels = BTreeMap::new();
        labels.insert(ADOPTED_LABEL.to_string(), "true".to_string());
        let v = Volume {
            id: wv.id.clone(),
            worker_id: worker_id.to_string(),
            size_bytes: wv.size_bytes,
            chunk_sectors: wv.chunk_sectors,
            labels,
            state: match wv.state {
                _ if wv.retired => State::DeletedWithSnapshots,
                State::Ready | State::Merging => State::Ready,
                s => s,
            },
            source: String::new(),
            error: String::new(),
            create_time: now,
            nbd_base: String::new(),
            operation: None,
        };
        let mut tx = self.catalog.write().await?;
        catalog::volumes::insert(&mut tx, &v, now).await?;
        for ws in &wv.snapshots {
            catalog::snapshots::insert(&mut tx, &adopted_snapshot(ws, wv.chunk_sectors), now)
                .await?;
            catalog::snapshots::set_reported(&mut tx, &wv.id, &ws.id, ws.reported(), None, now)
                .await?;
        }
        tx.commit().await?;
        tracing::warn!(volume = %v.name(), worker = worker_id, "adopted from its worker");
        self.metrics.repaired("adopted");
        report.adopted += 1;
        Ok(())
    }
}

/// Whether one of operations `ops` works on volume `vol` or one of its
/// snapshots, or reads from them.
fn works_on(ops: &[Operation], vol: &str) -> bool {
    ops.iter()
        .any(|o| o.target.volume() == vol || o.source.as_ref().is_some_and(|s| s.volume() == vol))
}

/// Whether a volume marked FAILED because its worker lost it is back.
fn back(v: &Volume, wv: &WorkerVolume) -> bool {
    v.state == State::Failed && wv.state == State::Ready && v.error == "missing on its worker"
}

/// Whether sweeping volume `v` (with its catalog snapshots `snaps`, and
/// `wv`, its worker's report) would do anything: the same decisions as
/// [`Reconciler::sweep_volume`], taken on a read made without the
/// volume's lock. A volume that passes is swept under its lock, which
/// reads again; one that does not is left to the next pass if it changes
/// meanwhile.
fn needs_sweep(worker_id: &str, v: &Volume, snaps: &[Snapshot], wv: Option<&WorkerVolume>) -> bool {
    if v.worker_id != worker_id || matches!(v.state, State::Creating | State::Deleting) {
        return false;
    }
    if differs(v, snaps, wv) || (v.state == State::DeletedWithSnapshots && snaps.is_empty()) {
        return true;
    }
    let Some(wv) = wv else {
        return false;
    };
    back(v, wv) || !snapshot_changes(snaps, wv).is_empty()
}

/// What a sweep writes of each of the catalog's snapshots `snaps`, given
/// `wv`, their volume as its worker reports it.
fn snapshot_changes<'a>(
    snaps: &'a [Snapshot],
    wv: &'a WorkerVolume,
) -> Vec<(&'a Snapshot, SnapshotChange<'a>)> {
    let by_id: BTreeMap<&str, &WorkerSnapshot> =
        wv.snapshots.iter().map(|s| (s.id.as_str(), s)).collect();
    snaps
        .iter()
        .filter_map(|s| snapshot_change(s, by_id.get(s.id.as_str()).copied()).map(|c| (s, c)))
        .collect()
}

/// Whether a worker's report of a volume would change the catalog's
/// record of it or of its snapshots (something missing, or a snapshot to
/// adopt).
fn differs(v: &Volume, snaps: &[Snapshot], wv: Option<&WorkerVolume>) -> bool {
    let Some(wv) = wv else {
        return v.state != State::Failed;
    };
    if v.state == State::DeletedWithSnapshots && !wv.retired {
        return true;
    }
    let settled =
        |s: &&Snapshot| !matches!(s.state, State::Creating | State::Deleting | State::Merging);
    snaps
        .iter()
        .filter(settled)
        .any(|s| s.state != State::Failed && !wv.snapshots.iter().any(|w| w.id == s.id))
        || wv.snapshots.iter().any(|w| {
            !matches!(w.state, State::Creating | State::Deleting)
                && !snaps.iter().any(|s| s.id == w.id)
        })
}

/// What a sweep writes of a settled snapshot of the catalog.
enum SnapshotChange<'a> {
    /// Its worker no longer has it.
    Failed,
    /// What its worker reports differs from the catalog's row; with the
    /// state that report moves it to, if any.
    Reported(&'a WorkerSnapshot, Option<State>),
}

/// What a sweep writes of snapshot `s`, given what its worker reports of
/// it (`ws`; `None`: the worker does not have it). Nothing for a snapshot
/// an operation works on, nor when the report matches the row.
fn snapshot_change<'a>(s: &Snapshot, ws: Option<&'a WorkerSnapshot>) -> Option<SnapshotChange<'a>> {
    if matches!(s.state, State::Creating | State::Deleting | State::Merging) {
        return None;
    }
    let Some(ws) = ws else {
        return (s.state != State::Failed).then_some(SnapshotChange::Failed);
    };
    let to = match (s.state, ws.state) {
        (State::Ready, State::Invalid) => Some(State::Invalid),
        (State::Failed, State::Ready) => Some(State::Ready),
        _ => None,
    };
    (to.is_some() || !same_report(s, &ws.reported())).then_some(SnapshotChange::Reported(ws, to))
}

fn adopted_snapshot(ws: &WorkerSnapshot, chunk: u32) -> Snapshot {
    let mut labels = BTreeMap::new();
    labels.insert(ADOPTED_LABEL.to_string(), "true".to_string());
    Snapshot {
        volume_id: ws.volume_id.clone(),
        id: ws.id.clone(),
        size_bytes: ws.size_bytes,
        cow_size_bytes: ws.cow_size_bytes,
        chunk_sectors: if ws.chunk_sectors == 0 {
            chunk
        } else {
            ws.chunk_sectors
        },
        writable: ws.writable,
        labels,
        state: match ws.state {
            State::Merging => State::Ready,
            s => s,
        },
        usage: None,
        create_time: now_ms(),
        nbd_base: String::new(),
        operation: None,
        error: ws.error.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Usage;

    fn volume(state: State) -> Volume {
        Volume {
            id: "v1".into(),
            worker_id: "w1".into(),
            size_bytes: 1 << 20,
            chunk_sectors: 8,
            labels: BTreeMap::new(),
            state,
            source: String::new(),
            error: String::new(),
            create_time: 1,
            nbd_base: String::new(),
            operation: None,
        }
    }

    fn usage(allocated_bytes: u64) -> Usage {
        Usage {
            allocated_bytes,
            total_bytes: 1 << 20,
            metadata_bytes: 4096,
            exceptions: 1,
            update_time: 1,
        }
    }

    fn reported(id: &str, used: u64) -> WorkerSnapshot {
        WorkerSnapshot {
            volume_id: "v1".into(),
            id: id.into(),
            size_bytes: 1 << 20,
            cow_size_bytes: 1 << 20,
            chunk_sectors: 8,
            writable: false,
            state: State::Ready,
            usage: Some(usage(used)),
            error: None,
        }
    }

    fn catalog_row(ws: &WorkerSnapshot) -> Snapshot {
        Snapshot {
            usage: ws.usage.clone(),
            state: State::Ready,
            ..adopted_snapshot(ws, 8)
        }
    }

    fn worker_volume(snapshots: Vec<WorkerSnapshot>) -> WorkerVolume {
        WorkerVolume {
            id: "v1".into(),
            size_bytes: 1 << 20,
            chunk_sectors: 8,
            state: State::Ready,
            snapshots,
            retired: false,
        }
    }

    #[test]
    fn a_volume_whose_report_matches_the_catalog_is_not_swept() {
        let ws = vec![reported("s1", 4096), reported("s2", 8192)];
        let snaps: Vec<Snapshot> = ws.iter().map(catalog_row).collect();
        let wv = worker_volume(ws);
        assert!(!needs_sweep("w1", &volume(State::Ready), &snaps, Some(&wv)));
        assert!(!needs_sweep(
            "w1",
            &volume(State::Ready),
            &[],
            Some(&worker_volume(vec![]))
        ));
    }

    #[test]
    fn every_change_a_sweep_writes_makes_the_volume_swept() {
        let ws = vec![reported("s1", 4096), reported("s2", 8192)];
        let snaps: Vec<Snapshot> = ws.iter().map(catalog_row).collect();
        let ready = volume(State::Ready);
        // New usage of one snapshot.
        let wv = worker_volume(vec![reported("s1", 4096), reported("s2", 12288)]);
        assert!(needs_sweep("w1", &ready, &snaps, Some(&wv)));
        // A snapshot the worker lost, one it has and the catalog lacks.
        let wv = worker_volume(vec![reported("s1", 4096)]);
        assert!(needs_sweep("w1", &ready, &snaps, Some(&wv)));
        let wv = worker_volume(vec![ws[0].clone(), ws[1].clone(), reported("s3", 0)]);
        assert!(needs_sweep("w1", &ready, &snaps, Some(&wv)));
        // A snapshot gone invalid.
        let mut invalid = ws[1].clone();
        invalid.state = State::Invalid;
        let wv = worker_volume(vec![ws[0].clone(), invalid]);
        assert!(needs_sweep("w1", &ready, &snaps, Some(&wv)));
        // The volume missing on its worker, and back again.
        assert!(needs_sweep("w1", &ready, &snaps, None));
        let mut failed = volume(State::Failed);
        failed.error = "missing on its worker".into();
        assert!(!needs_sweep("w1", &failed, &[], None));
        assert!(needs_sweep(
            "w1",
            &failed,
            &[],
            Some(&worker_volume(vec![]))
        ));
        // Deleted with snapshots: exported again, or its last snapshot gone.
        let dws = volume(State::DeletedWithSnapshots);
        assert!(needs_sweep(
            "w1",
            &dws,
            &snaps,
            Some(&worker_volume(ws.clone()))
        ));
        let mut retired = worker_volume(vec![]);
        retired.retired = true;
        assert!(needs_sweep("w1", &dws, &[], Some(&retired)));
    }

    #[test]
    fn volumes_in_flight_or_elsewhere_are_left_alone() {
        let wv = worker_volume(vec![reported("s1", 4096)]);
        for state in [State::Creating, State::Deleting] {
            assert!(!needs_sweep("w1", &volume(state), &[], Some(&wv)));
        }
        assert!(!needs_sweep("w2", &volume(State::Ready), &[], Some(&wv)));
        // A snapshot being created or deleted is the operation's business.
        let mut creating = catalog_row(&wv.snapshots[0]);
        creating.state = State::Creating;
        assert!(!needs_sweep(
            "w1",
            &volume(State::Ready),
            &[creating],
            Some(&worker_volume(vec![]))
        ));
    }
}
