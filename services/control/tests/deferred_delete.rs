//! Deferred volume delete, crash-safe: a volume deleted while it has two
//! snapshots (`defer_while_snapshots`) is kept as DELETED_WITH_SNAPSHOTS
//! until its last snapshot goes, then reclaimed. The control service stops
//! as if it crashed (test hook `ControlConfig::crash_at`) before and after
//! the worker call of every step: the deferral itself, the delete of each
//! snapshot, and the reclaim; each restart reconciles. After every step the
//! volume's device is still there until the last snapshot is gone, and at
//! the end catalog, worker and device files agree.

mod common;

use std::path::Path;

use common::*;
use cowsnap_control::model::OpKind;
use cowsnap_control::operations::{CrashAt, CrashPoint};
use cowsnap_proto::cowsnap::v1 as pb;
use tonic::Code;

const POINTS: [CrashPoint; 2] = [CrashPoint::BeforeWorker, CrashPoint::AfterWorker];

/// The device files of a worker, as resource names (`v.vol` →
/// `volumes/v`, `v.s.cow` → `volumes/v/snapshots/s`), sorted.
fn device_files(w: &Worker) -> Vec<String> {
    let dir = w.dir.join("data").join("devices");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .map(|f| {
            if let Some(v) = f.strip_suffix(".vol") {
                format!("volumes/{v}")
            } else if let Some((v, s)) = f.strip_suffix(".cow").and_then(|x| x.split_once('.')) {
                format!("volumes/{v}/snapshots/{s}")
            } else {
                panic!("unexpected file {f} in {}", dir.display())
            }
        })
        .collect();
    names.sort();
    names
}

async fn state_of(c: &mut Clients, vol: &str) -> Result<pb::State, Code> {
    c.volumes
        .get_volume(pb::GetVolumeRequest {
            name: format!("volumes/{vol}"),
        })
        .await
        .map(|r| r.into_inner().state())
        .map_err(|s| s.code())
}

async fn unfinished(c: &mut Clients) -> Vec<pb::Operation> {
    c.operations
        .list_operations(pb::ListOperationsRequest {
            filter: "done=false".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operations
}

/// Nothing unfinished or stuck, and catalog == worker == device files.
async fn assert_consistent(c: &mut Clients, w: &Worker) {
    assert!(unfinished(c).await.is_empty(), "{:?}", unfinished(c).await);
    for (name, state) in c.states().await {
        assert!(
            !matches!(state, pb::State::Creating | pb::State::Deleting),
            "{name} is stuck in {state:?}"
        );
    }
    let worker = w.inventory().await;
    assert_eq!(worker, c.inventory().await, "worker vs catalog");
    assert_eq!(device_files(w), worker, "device files vs worker");
}

async fn delete_volume(c: &mut Clients, vol: &str, defer: bool) -> Result<(), tonic::Status> {
    c.volumes
        .delete_volume(pb::DeleteVolumeRequest {
            name: format!("volumes/{vol}"),
            defer_while_snapshots: defer,
        })
        .await
        .map(drop)
}

async fn delete_snapshot(c: &mut Clients, name: &str) -> Result<(), tonic::Status> {
    c.snapshots
        .delete_snapshot(pb::DeleteSnapshotRequest { name: name.into() })
        .await
        .map(drop)
}

/// Restarts the control service with a crash hook for `kind` at `point`.
async fn arm(control: &mut Control, kind: OpKind, point: CrashPoint) -> Clients {
    control.restart(Some(CrashAt { kind, point })).await;
    control.clients().await
}

/// Restarts it without a hook (its start-up reconciliation runs).
async fn recover(control: &mut Control) -> Clients {
    control.restart(None).await;
    control.clients().await
}

fn has_volume_device(w: &Worker, vol: &str) -> bool {
    device_files(w).contains(&format!("volumes/{vol}"))
}

/// One round: volume `vol` with snapshots s1 and s2, a crash at `point` of
/// each step in turn, and checks that the volume is never reclaimed early
/// and always reclaimed in the end.
async fn round(control: &mut Control, w: &Worker, vol: &str, point: CrashPoint) {
    let s1 = format!("volumes/{vol}/snapshots/s1");
    let s2 = format!("volumes/{vol}/snapshots/s2");
    let mut c = control.clients().await;
    c.create_volume(vol, 4 * MIB).await;
    c.create_snapshot(vol, "s1").await;
    c.create_snapshot(vol, "s2").await;

    // The deferral, crashed.
    let mut c = arm(control, OpKind::DeleteVolume, point).await;
    let e = delete_volume(&mut c, vol, true).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{point:?}: {}", e.message());
    assert_eq!(state_of(&mut c, vol).await, Ok(pb::State::Deleting));
    let mut c = recover(control).await;
    assert_eq!(
        state_of(&mut c, vol).await,
        Ok(pb::State::DeletedWithSnapshots),
        "{point:?}: the deferral is finished at start"
    );
    assert!(has_volume_device(w, vol), "kept for its snapshots");
    assert_consistent(&mut c, w).await;
    let wv = worker_client(&w.address)
        .await
        .get_volume(cowsnap_proto::worker::v1::GetVolumeRequest {
            name: format!("volumes/{vol}"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(wv.retired, "{point:?}: the worker retired it");
    assert_eq!(wv.nbd_export, "", "{point:?}: no export");

    // The first snapshot's delete, crashed: the volume stays.
    let mut c = arm(control, OpKind::DeleteSnapshot, point).await;
    let e = delete_snapshot(&mut c, &s1).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{point:?}: {}", e.message());
    let mut c = recover(control).await;
    assert_eq!(
        state_of(&mut c, vol).await,
        Ok(pb::State::DeletedWithSnapshots),
        "{point:?}: one snapshot is left"
    );
    assert!(has_volume_device(w, vol), "{point:?}: reclaimed too early");
    assert_consistent(&mut c, w).await;

    // The last snapshot's delete, crashed: reclaimed at the next start.
    let mut c = arm(control, OpKind::DeleteSnapshot, point).await;
    let e = delete_snapshot(&mut c, &s2).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{point:?}: {}", e.message());
    if point == CrashPoint::BeforeWorker {
        assert!(has_volume_device(w, vol), "{point:?}: reclaimed too early");
    }
    let mut c = recover(control).await;
    assert_eq!(
        state_of(&mut c, vol).await,
        Err(Code::NotFound),
        "{point:?}: reclaimed once its last snapshot is gone"
    );
    assert!(
        !has_volume_device(w, vol),
        "{point:?}: its device is released"
    );
    assert_consistent(&mut c, w).await;
}

/// The reclaim itself crashed: the last snapshot's delete succeeds, the
/// reclaim is recorded and finished at the next start.
async fn reclaim_round(control: &mut Control, w: &Worker, vol: &str, point: CrashPoint) {
    let mut c = control.clients().await;
    c.create_volume(vol, 4 * MIB).await;
    c.create_snapshot(vol, "s1").await;
    delete_volume(&mut c, vol, true).await.unwrap();
    let mut c = arm(control, OpKind::DeleteVolume, point).await;
    delete_snapshot(&mut c, &format!("volumes/{vol}/snapshots/s1"))
        .await
        .expect("the snapshot's delete succeeds; the reclaim is recorded");
    assert_eq!(
        state_of(&mut c, vol).await,
        Ok(pb::State::Deleting),
        "{point:?}: the reclaim is recorded"
    );
    let pending = unfinished(&mut c).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    let meta = pending[0].metadata.as_ref().unwrap();
    assert_eq!(meta.target, format!("volumes/{vol}"));
    // Its id stays taken until the reclaim ends.
    let e = c
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            volume_id: vol.into(),
            volume: Some(pb::Volume {
                size_bytes: 4 * MIB,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    let mut c = recover(control).await;
    assert_eq!(state_of(&mut c, vol).await, Err(Code::NotFound));
    assert!(!has_volume_device(w, vol));
    assert_consistent(&mut c, w).await;
}

async fn setup(dir: &Path) -> (Worker, Control) {
    let w = Worker::start(dir, "node-a").await;
    let control = Control::start(Control::config(dir, &[&w])).await;
    (w, control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_at_each_step_of_a_deferred_delete_never_reclaim_early() {
    init_logs();
    let dir = scratch();
    let (w, mut control) = setup(dir.path()).await;
    for (i, point) in POINTS.into_iter().enumerate() {
        round(&mut control, &w, &format!("d{i}"), point).await;
        reclaim_round(&mut control, &w, &format!("r{i}"), point).await;
    }
    let mut c = control.clients().await;
    assert_consistent(&mut c, &w).await;
    assert!(w.inventory().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_delete_is_refused_without_the_flag_and_is_idempotent_with_it() {
    init_logs();
    let dir = scratch();
    let (w, control) = setup(dir.path()).await;
    let mut c = control.clients().await;
    c.create_volume("v", 4 * MIB).await;
    c.create_snapshot("v", "s").await;
    let e = delete_volume(&mut c, "v", false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert_eq!(state_of(&mut c, "v").await, Ok(pb::State::Ready));
    delete_volume(&mut c, "v", true).await.unwrap();
    delete_volume(&mut c, "v", true).await.unwrap();
    let e = delete_volume(&mut c, "v", false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let listed = c
        .volumes
        .list_volumes(pb::ListVolumesRequest {
            filter: "state=DELETED_WITH_SNAPSHOTS".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].nbd_uri, "", "no export to give");

    // Nothing new of it: snapshot, merge, clone, or a volume of its id.
    let e = c
        .snapshots
        .create_snapshot(pb::CreateSnapshotRequest {
            parent: "volumes/v".into(),
            snapshot_id: "s2".into(),
            snapshot: Some(pb::Snapshot::default()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = c
        .snapshots
        .merge_snapshot(pb::MergeSnapshotRequest {
            name: "volumes/v/snapshots/s".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = c
        .volumes
        .clone_volume(pb::CloneVolumeRequest {
            volume_id: "c".into(),
            source_volume: "volumes/v".into(),
            volume: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    for e in [
        c.volumes
            .create_volume(pb::CreateVolumeRequest {
                volume_id: "v".into(),
                volume: Some(pb::Volume {
                    size_bytes: 4 * MIB,
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err(),
        c.volumes
            .restore_volume(pb::RestoreVolumeRequest {
                volume_id: "v".into(),
                source_snapshot: "volumes/v/snapshots/s".into(),
                volume: None,
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
        assert!(
            e.message().contains("kept for its snapshots"),
            "the message says why: {}",
            e.message()
        );
    }
    // A restore from its snapshot still works.
    let op = c
        .volumes
        .restore_volume(pb::RestoreVolumeRequest {
            volume_id: "r".into(),
            source_snapshot: "volumes/v/snapshots/s".into(),
            volume: None,
        })
        .await
        .unwrap()
        .into_inner();
    let op = c.wait(&op.name).await;
    assert!(
        matches!(op.result, Some(pb::operation::Result::Volume(_))),
        "{op:?}"
    );
    delete_snapshot(&mut c, "volumes/v/snapshots/s")
        .await
        .unwrap();
    assert_eq!(state_of(&mut c, "v").await, Err(Code::NotFound));
    c.create_volume("v", 4 * MIB).await;
    assert_consistent(&mut c, &w).await;
}
