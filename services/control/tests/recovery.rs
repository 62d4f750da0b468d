//! Crash safety: the control service stops (as if it crashed, through the
//! test hook `ControlConfig::crash_at`) between recording an operation and
//! calling its worker, or between the worker's success and the catalog's
//! update; the next start reconciles. Afterwards nothing is stuck in
//! CREATING or DELETING and the worker holds exactly what the catalog lists
//! (no leaked device). Also: restarts between steps, a worker that stops
//! and comes back, and a catalog whose file system fills up and gets room
//! again.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use cowsnap_control::model::OpKind;
use cowsnap_control::operations::{CrashAt, CrashPoint};
use cowsnap_proto::cowsnap::v1 as pb;
use tonic::Code;

const POINTS: [CrashPoint; 2] = [CrashPoint::BeforeWorker, CrashPoint::AfterWorker];

/// Nothing in a transitional state, and the worker's inventory is the
/// catalog's.
async fn assert_consistent(c: &mut Clients, w: &Worker) {
    for (name, state) in c.states().await {
        assert!(
            !matches!(state, pb::State::Creating | pb::State::Deleting),
            "{name} is stuck in {state:?}"
        );
    }
    assert_eq!(
        w.inventory().await,
        c.inventory().await,
        "worker vs catalog"
    );
    let pending = c
        .operations
        .list_operations(pb::ListOperationsRequest {
            filter: "done=false".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operations;
    assert!(pending.is_empty(), "unfinished: {pending:?}");
}

async fn crash_then_restart(
    control: &mut Control,
    kind: OpKind,
    point: CrashPoint,
    call: impl AsyncFnOnce(&mut Clients) -> Result<(), tonic::Status>,
) {
    control.restart(Some(CrashAt { kind, point })).await;
    let mut c = control.clients().await;
    let e = call(&mut c).await.expect_err("the call crashed");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    // The operation is recorded, unfinished.
    let pending = c
        .operations
        .list_operations(pb::ListOperationsRequest {
            filter: "done=false".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operations;
    assert_eq!(pending.len(), 1, "{kind:?} {point:?}: {pending:?}");
    control.restart(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_around_the_worker_call_are_reconciled_at_start() {
    init_logs();
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let mut control = Control::start(Control::config(dir.path(), &[&w])).await;

    for point in POINTS {
        let tag = match point {
            CrashPoint::BeforeWorker => "b",
            CrashPoint::AfterWorker => "a",
        };
        let vol = format!("v{tag}");
        let snap = format!("volumes/{vol}/snapshots/s");

        // Create volume: rolled forward at the next start.
        let v = vol.clone();
        crash_then_restart(&mut control, OpKind::CreateVolume, point, async move |c| {
            c.volumes
                .create_volume(pb::CreateVolumeRequest {
                    volume_id: v,
                    volume: Some(pb::Volume {
                        size_bytes: 4 * MIB,
                        ..Default::default()
                    }),
                })
                .await
                .map(|_| ())
        })
        .await;
        let mut c = control.clients().await;
        let got = c
            .volumes
            .get_volume(pb::GetVolumeRequest {
                name: format!("volumes/{vol}"),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.state(), pb::State::Ready, "{point:?}");
        assert_consistent(&mut c, &w).await;

        // Create snapshot.
        let v = vol.clone();
        crash_then_restart(
            &mut control,
            OpKind::CreateSnapshot,
            point,
            async move |c| {
                c.snapshots
                    .create_snapshot(pb::CreateSnapshotRequest {
                        parent: format!("volumes/{v}"),
                        snapshot_id: "s".into(),
                        snapshot: None,
                    })
                    .await
                    .map(|_| ())
            },
        )
        .await;
        let mut c = control.clients().await;
        assert!(c.inventory().await.contains(&snap));
        assert_consistent(&mut c, &w).await;

        // Delete snapshot.
        let s = snap.clone();
        crash_then_restart(
            &mut control,
            OpKind::DeleteSnapshot,
            point,
            async move |c| {
                c.snapshots
                    .delete_snapshot(pb::DeleteSnapshotRequest { name: s })
                    .await
                    .map(|_| ())
            },
        )
        .await;
        let mut c = control.clients().await;
        assert!(!c.inventory().await.contains(&snap));
        assert_consistent(&mut c, &w).await;

        // Delete volume.
        let v = vol.clone();
        crash_then_restart(&mut control, OpKind::DeleteVolume, point, async move |c| {
            c.volumes
                .delete_volume(pb::DeleteVolumeRequest {
                    name: format!("volumes/{v}"),
                    ..Default::default()
                })
                .await
                .map(|_| ())
        })
        .await;
        let mut c = control.clients().await;
        assert!(c.inventory().await.is_empty(), "{point:?}");
        assert_consistent(&mut c, &w).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_running_operations_survive_crashes() {
    init_logs();
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let mut control = Control::start(Control::config(dir.path(), &[&w])).await;
    let mut c = control.clients().await;
    c.create_volume("src", 8 * MIB).await;
    c.create_snapshot("src", "s1").await;
    c.create_snapshot("src", "s2").await;

    // Restore, crashing after the worker started it.
    crash_then_restart(
        &mut control,
        OpKind::RestoreVolume,
        CrashPoint::AfterWorker,
        async |c| {
            c.volumes
                .restore_volume(pb::RestoreVolumeRequest {
                    volume_id: "r".into(),
                    source_snapshot: "volumes/src/snapshots/s1".into(),
                    volume: None,
                })
                .await
                .map(|_| ())
        },
    )
    .await;
    let mut c = control.clients().await;
    let op = c
        .operations
        .list_operations(pb::ListOperationsRequest {
            filter: "kind=RESTORE_VOLUME".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operations
        .remove(0);
    let done = c.wait(&op.name).await;
    assert_eq!(done.percent, 100.0, "{done:?}");
    assert!(done.result.is_some());

    // Clone, crashing before the worker is called.
    crash_then_restart(
        &mut control,
        OpKind::CloneVolume,
        CrashPoint::BeforeWorker,
        async |c| {
            c.volumes
                .clone_volume(pb::CloneVolumeRequest {
                    volume_id: "k".into(),
                    source_volume: "volumes/src".into(),
                    volume: None,
                })
                .await
                .map(|_| ())
        },
    )
    .await;
    let mut c = control.clients().await;
    let op = c
        .operations
        .list_operations(pb::ListOperationsRequest {
            filter: "target=volumes/k".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operations
        .remove(0);
    assert_eq!(c.wait(&op.name).await.percent, 100.0);

    // Merge, crashing before the worker is called: the snapshot is already
    // MERGING, so it cannot be deleted; the next start carries the merge
    // through.
    control
        .restart(Some(CrashAt {
            kind: OpKind::MergeSnapshot,
            point: CrashPoint::BeforeWorker,
        }))
        .await;
    let mut c = control.clients().await;
    let e = c
        .snapshots
        .merge_snapshot(pb::MergeSnapshotRequest {
            name: "volumes/src/snapshots/s2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    let s = c
        .snapshots
        .get_snapshot(pb::GetSnapshotRequest {
            name: "volumes/src/snapshots/s2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state(), pb::State::Merging);
    let e = c
        .snapshots
        .delete_snapshot(pb::DeleteSnapshotRequest {
            name: "volumes/src/snapshots/s2".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("merging"), "{}", e.message());
    control.restart(None).await;
    let mut c = control.clients().await;
    let op = c
        .operations
        .list_operations(pb::ListOperationsRequest {
            filter: "kind=MERGE_SNAPSHOT".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operations
        .remove(0);
    let done = c.wait(&op.name).await;
    assert_eq!(done.percent, 100.0, "{done:?}");

    // Merge again, crashing after the worker started it (it may even end
    // before the restart).
    crash_then_restart(
        &mut control,
        OpKind::MergeSnapshot,
        CrashPoint::AfterWorker,
        async |c| {
            c.snapshots
                .merge_snapshot(pb::MergeSnapshotRequest {
                    name: "volumes/src/snapshots/s1".into(),
                })
                .await
                .map(|_| ())
        },
    )
    .await;
    let mut c = control.clients().await;
    let op = c
        .operations
        .list_operations(pb::ListOperationsRequest {
            filter: "target=volumes/src/snapshots/s1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .operations
        .remove(0);
    let done = c.wait(&op.name).await;
    assert!(done.done);
    assert!(
        matches!(done.result, Some(pb::operation::Result::Volume(_))),
        "{done:?}"
    );
    assert_eq!(
        c.inventory().await,
        ["volumes/k", "volumes/r", "volumes/src"]
    );
    assert_consistent(&mut c, &w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_the_catalog_and_a_returning_worker_is_caught_up() {
    init_logs();
    let dir = scratch();
    let mut w = Worker::start(dir.path(), "node-a").await;
    let mut control = Control::start(Control::config(dir.path(), &[&w])).await;
    let mut c = control.clients().await;
    let v = c.create_volume("v1", 4 * MIB).await;
    control.restart(None).await;
    let mut c = control.clients().await;
    let got = c
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.create_time, v.create_time);
    assert_eq!(got.state(), pb::State::Ready);
    // Same create after the restart: the same volume.
    assert_eq!(
        c.create_volume("v1", 4 * MIB).await.create_time,
        v.create_time
    );
    c.create_snapshot("v1", "s1").await;
    control.restart(None).await;
    let mut c = control.clients().await;
    assert_eq!(
        c.inventory().await,
        ["volumes/v1", "volumes/v1/snapshots/s1"]
    );

    // The worker stops while the control service believes it healthy:
    // the call fails with UNAVAILABLE and stays recorded.
    w.stop().await;
    let e = c
        .snapshots
        .create_snapshot(pb::CreateSnapshotRequest {
            parent: "volumes/v1".into(),
            snapshot_id: "s2".into(),
            snapshot: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    // A control restart while the worker is down changes nothing.
    control.restart(None).await;
    let mut c = control.clients().await;
    let ws = c
        .workers
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(ws[0].health(), pb::WorkerHealth::Unhealthy);
    // The worker comes back; the next pass finishes the recorded create.
    w.restart().await;
    let report = control.running().reconcile_now().await.unwrap();
    assert_eq!(report.operations_pending, 0, "{report:?}");
    let s = c
        .snapshots
        .get_snapshot(pb::GetSnapshotRequest {
            name: "volumes/v1/snapshots/s2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state(), pb::State::Ready);
    assert_consistent(&mut c, &w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_marks_lost_resources_and_adopts_unknown_ones() {
    init_logs();
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let control = Control::start(Control::config(dir.path(), &[&w])).await;
    let mut c = control.clients().await;
    c.create_volume("kept", 4 * MIB).await;
    // Behind the control service's back: a volume made on the worker, and
    // one of the catalog's deleted there.
    let mut wc = worker_client(&w.address).await;
    wc.create_volume(cowsnap_proto::worker::v1::CreateVolumeRequest {
        volume_id: "stray".into(),
        size_bytes: 4 * MIB,
        chunk_sectors: 0,
        device: String::new(),
    })
    .await
    .unwrap();
    c.create_volume("lost", 4 * MIB).await;
    wc.delete_volume(cowsnap_proto::worker::v1::DeleteVolumeRequest {
        name: "volumes/lost".into(),
    })
    .await
    .unwrap();

    let report = control.running().reconcile_now().await.unwrap();
    assert_eq!(report.adopted, 1, "{report:?}");
    assert_eq!(report.marked_failed, 1, "{report:?}");
    let stray = c
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/stray".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stray.state(), pb::State::Ready);
    assert_eq!(
        stray.labels.get("cowsnap.io/adopted").map(String::as_str),
        Some("true")
    );
    let lost = c
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/lost".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lost.state(), pb::State::Failed);
    // A FAILED volume is deleted from the catalog (the worker says it is
    // gone already).
    c.volumes
        .delete_volume(pb::DeleteVolumeRequest {
            name: "volumes/lost".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(w.inventory().await, c.inventory().await);
}

/// The catalog's snapshots of `vol`: (id, state, usage's exceptions and
/// the time the catalog has for them).
async fn listed_snapshots(c: &mut Clients, vol: &str) -> Vec<(String, pb::State, u64, i64)> {
    let list = c
        .snapshots
        .list_snapshots(pb::ListSnapshotsRequest {
            parent: format!("volumes/{vol}"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    list.snapshots
        .into_iter()
        .map(|s| {
            let u = s.usage.unwrap_or_default();
            let t = u
                .update_time
                .map(|t| t.seconds * 1_000_000_000 + i64::from(t.nanos));
            let id = s.name.rsplit('/').next().unwrap().to_string();
            (id, s.state(), u.exceptions, t.unwrap_or(0))
        })
        .collect()
}

/// A sweep writes what a worker changed of a volume's snapshots (one lost
/// is FAILED, one made behind the control service's back adopted, new
/// usage recorded) and nothing at all when the worker changed nothing: the
/// usage's time in the catalog stays that of the last change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_records_snapshot_changes_and_rewrites_nothing_unchanged() {
    init_logs();
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let control = Control::start(Control::config(dir.path(), &[&w])).await;
    let mut c = control.clients().await;
    let v = c.create_volume("v", 4 * MIB).await;
    for s in ["s1", "s2"] {
        c.create_snapshot("v", s).await;
    }
    let mut wc = worker_client(&w.address).await;
    wc.delete_snapshot(cowsnap_proto::worker::v1::DeleteSnapshotRequest {
        name: "volumes/v/snapshots/s2".into(),
    })
    .await
    .unwrap();
    wc.create_snapshot(cowsnap_proto::worker::v1::CreateSnapshotRequest {
        parent: "volumes/v".into(),
        snapshot_id: "s3".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // New usage: the first write to the volume copies a chunk into each
    // snapshot.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 0 64k", &v.nbd_uri])
        .output()
        .expect("qemu-io (qemu-utils) runs");
    assert!(out.status.success(), "{out:?}");

    let report = control.running().reconcile_now().await.unwrap();
    assert_eq!((report.marked_failed, report.adopted), (1, 1), "{report:?}");
    let after = listed_snapshots(&mut c, "v").await;
    let states: Vec<(&str, pb::State)> = after
        .iter()
        .map(|(id, st, ..)| (id.as_str(), *st))
        .collect();
    assert_eq!(
        states,
        [
            ("s1", pb::State::Ready),
            ("s2", pb::State::Failed),
            ("s3", pb::State::Ready)
        ]
    );
    let s1 = &after[0];
    assert!(
        s1.2 > 0,
        "the copied chunk is in the catalog's usage: {after:?}"
    );

    // Nothing changed on the worker: a pass rewrites nothing.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let report = control.running().reconcile_now().await.unwrap();
    assert_eq!((report.marked_failed, report.adopted), (0, 0), "{report:?}");
    assert_eq!(listed_snapshots(&mut c, "v").await, after);
}

/// Runs a command as part of the test's set-up; any failure is the test's.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (the test needs root and e2fsprogs)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{} (the test needs root and loop devices)",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A small ext4 file system in an image file on a loop device, mounted on
/// a directory: unmounted and detached when dropped.
struct SmallFs {
    mount: PathBuf,
    device: String,
}

impl SmallFs {
    fn new(dir: &Path, size: u64) -> SmallFs {
        let image = dir.join("small.ext4");
        let mount = dir.join("small");
        std::fs::create_dir_all(&mount).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size)
            .unwrap();
        // No blocks reserved for root: the test runs as root and must see
        // the file system full.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-m", "0"])
            .arg(&image));
        let device = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&image));
        let fs = SmallFs {
            mount: mount.clone(),
            device,
        };
        run(Command::new("mount").arg(&fs.device).arg(&mount));
        fs
    }

    /// Fills the file system with a file, until writes fail with ENOSPC;
    /// returns its path.
    fn fill(&self) -> PathBuf {
        let path = self.mount.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let buf = vec![0x5au8; 1 << 20];
        for size in [1 << 20, 1 << 12, 1] {
            loop {
                match f.write(&buf[..size]) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(28) => break,
                    Err(e) => panic!("filling {}: {e}", path.display()),
                }
            }
        }
        f.sync_all().unwrap();
        path
    }

    /// Removes a file and makes its blocks free at once (ext4 frees them
    /// when its journal commits).
    fn free(&self, path: &Path) {
        std::fs::remove_file(path).unwrap();
        run(Command::new("sync").arg("-f").arg(&self.mount));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazily if the service still has its catalog open: the file system
        // goes when the last file closes, and so does the loop device.
        let unmounted = Command::new("umount")
            .arg(&self.mount)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            || Command::new("umount")
                .arg("-l")
                .arg(&self.mount)
                .status()
                .is_ok_and(|s| s.success());
        if !unmounted {
            eprintln!("cannot unmount {}", self.mount.display());
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

fn new_volume(id: &str) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        volume_id: id.into(),
        volume: Some(pb::Volume {
            size_bytes: 4 * MIB,
            ..Default::default()
        }),
    }
}

/// `n` rounds of calls that write the catalog (through every pooled
/// connection, as many times over): each must succeed.
async fn calls_succeed(c: &mut Clients, prefix: &str, n: usize) {
    for i in 0..n {
        let v = format!("{prefix}{i}");
        let what = format!("call {i} after the file system had room again");
        let vol = c
            .volumes
            .create_volume(new_volume(&v))
            .await
            .unwrap_or_else(|e| panic!("{what}: CreateVolume: {e:?}"))
            .into_inner();
        assert_eq!(vol.state(), pb::State::Ready, "{what}");
        c.snapshots
            .create_snapshot(pb::CreateSnapshotRequest {
                parent: format!("volumes/{v}"),
                snapshot_id: "s".into(),
                snapshot: None,
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: CreateSnapshot: {e:?}"));
        c.volumes
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap_or_else(|e| panic!("{what}: ListVolumes: {e:?}"));
        c.snapshots
            .delete_snapshot(pb::DeleteSnapshotRequest {
                name: format!("volumes/{v}/snapshots/s"),
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: DeleteSnapshot: {e:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_catalog_file_system_is_resource_exhausted_and_heals_without_a_restart() {
    init_logs();
    let dir = scratch();
    let fs = SmallFs::new(dir.path(), 16 * MIB);
    let mut w = Worker::start(dir.path(), "node-a").await;
    // The catalog on the small file system; the worker's data elsewhere.
    let mut cfg = Control::config(&fs.mount, &[&w]);
    // Periodic passes, to settle what a full disk left unfinished.
    cfg.reconcile_interval = Duration::from_secs(1);
    let mut control = Control::start(cfg).await;
    let mut c = control.clients().await;
    c.create_volume("v1", 4 * MIB).await;

    // Full: a new volume cannot be recorded.
    let filler = fs.fill();
    for i in 0..6 {
        let e = code(c.volumes.create_volume(new_volume("v2")).await);
        assert_eq!(
            e.code(),
            Code::ResourceExhausted,
            "call {i}: {}",
            e.message()
        );
        assert!(e.message().contains("full"), "{}", e.message());
    }
    // Room again: every call succeeds, on whichever pooled connection.
    fs.free(&filler);
    calls_succeed(&mut c, "a", 8).await;

    // A snapshot recorded while its worker does not answer: pending.
    w.stop().await;
    let create_s1 = pb::CreateSnapshotRequest {
        parent: "volumes/v1".into(),
        snapshot_id: "s1".into(),
        snapshot: None,
    };
    let e = code(c.snapshots.create_snapshot(create_s1.clone()).await);
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    // Full, and the worker answers again: the same create makes the
    // snapshot on the worker, and the catalog cannot record that.
    let filler = fs.fill();
    w.restart().await;
    let e = code(c.snapshots.create_snapshot(create_s1.clone()).await);
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("full"), "{}", e.message());
    assert!(e.message().contains("is recorded"), "{}", e.message());
    assert!(
        w.inventory()
            .await
            .contains(&"volumes/v1/snapshots/s1".to_string())
    );
    let s = c
        .snapshots
        .get_snapshot(pb::GetSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state(), pb::State::Creating);

    // Room again: the periodic reconciliation settles it, without a
    // restart.
    fs.free(&filler);
    let mut settled = false;
    for _ in 0..100 {
        let s = c
            .snapshots
            .get_snapshot(pb::GetSnapshotRequest {
                name: "volumes/v1/snapshots/s1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        if s.state() == pb::State::Ready {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "volumes/v1/snapshots/s1 is still not READY");
    calls_succeed(&mut c, "b", 8).await;
    assert_consistent(&mut c, &w).await;
    control.stop().await;
}

/// A pass ends while clients keep calling: the unfinished operations it
/// finds are in the hands of calls in flight, and the calls record new
/// ones all the time. (A pass that chased them ran for minutes under the
/// bench's stream of creates, each round waiting for the calls to end.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_ends_while_calls_keep_recording_operations() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    init_logs();
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let control = Control::start(Control::config(dir.path(), &[&w])).await;
    let mut c = control.clients().await;
    const CLIENTS: usize = 16;
    // Each client takes at most this many snapshots: far more than a pass
    // needs, and an end to the stream if a pass did chase it.
    const MOST: usize = 300;
    let (stop, made) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut streams = Vec::new();
    for i in 0..CLIENTS {
        let vol = format!("v{i}");
        c.create_volume(&vol, 4 * MIB).await;
        let mut c = control.clients().await;
        let (stop, made) = (stop.clone(), made.clone());
        streams.push(tokio::spawn(async move {
            for n in 0..MOST {
                if stop.load(Ordering::SeqCst) {
                    return n;
                }
                c.create_snapshot(&vol, &format!("s{n}")).await;
                made.fetch_add(1, Ordering::SeqCst);
            }
            MOST
        }));
    }
    while made.load(Ordering::SeqCst) < 4 * CLIENTS {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = control.running().reconcile_now().await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let mut taken = Vec::new();
    for s in streams {
        taken.push(s.await.unwrap());
    }
    assert!(
        taken.iter().all(|&n| n < MOST),
        "the pass ended only once the calls stopped: {taken:?} snapshots per client"
    );
    assert_eq!(report.operations_pending, 0, "{report:?}");
    assert_eq!(report.marked_failed + report.adopted, 0, "{report:?}");
}
