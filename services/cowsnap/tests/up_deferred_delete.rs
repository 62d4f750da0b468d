//! Issue 10, deferred delete, end to end on a real `cowsnap up`: a volume
//! with two snapshots is deleted with `cowsnap volume delete
//! --defer-while-snapshots`. Its NBD export closes at once (qemu-io is
//! refused the export) while both snapshots keep reading their own data
//! over NBD and its device file stays; `cowsnap volume get/list` show it
//! DELETED_WITH_SNAPSHOTS. `cowsnap up` is killed with SIGKILL after each
//! step and started again: nothing changes until the last snapshot is
//! deleted, then the volume is reclaimed, and catalog, worker and device
//! files agree.

mod up_common;

use cowsnap_proto::cowsnap::v1 as pb;
use tonic::Code;
use up_common::*;

/// [`up_common::qemu_io`], failed too when qemu-io reports a failure but
/// exits 0.
fn qemu_io(uri: &str, cmd: &str) -> (bool, String) {
    let (ok, text) = up_common::qemu_io(uri, cmd);
    (ok && !text.contains("failed"), text)
}

fn write(uri: &str, cmd: &str) {
    let (ok, text) = qemu_io(uri, cmd);
    assert!(ok, "qemu-io {cmd}: {text}");
}

/// What must hold while the volume waits for its snapshots: listed as
/// DELETED_WITH_SNAPSHOTS, not exported, the snapshots still there read
/// their data, its device file is still there.
async fn check_kept(up: &Up, snaps: &[(&str, &str)]) {
    let v = up
        .clients()
        .await
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.state(), pb::State::DeletedWithSnapshots);
    assert_eq!(v.nbd_uri, "");
    let (code, out, err) = cowsnap_cli(up, &["volume", "list"]);
    assert_eq!(code, 0, "{err}");
    let line = out
        .lines()
        .find(|l| l.contains("volumes/v "))
        .unwrap_or_else(|| panic!("volume list shows volumes/v:\n{out}"));
    assert!(line.contains("DELETED_WITH_SNAPSHOTS"), "{line}");
    let (ok, text) = qemu_io(&format!("nbd://{}/volumes/v", up.nbd()), "read 0 64k");
    assert!(!ok, "the volume's export is closed: {text}");
    assert!(
        text.contains("volumes/v") || text.to_lowercase().contains("export"),
        "the refusal names the export: {text}"
    );
    for (snap, pattern) in snaps {
        let uri = format!("nbd://{}/volumes/v/snapshots/{snap}", up.nbd());
        let (ok, text) = qemu_io(&uri, &format!("read -P {pattern} 0 16M"));
        assert!(ok, "{snap} reads {pattern}: {text}");
    }
    assert!(
        up.device_files().contains(&"volumes/v".to_string()),
        "its device is kept for its snapshots"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_deleted_with_two_snapshots_is_reclaimed_after_the_last_only() {
    let (_tmp, mut up) = up_in_scratch().await;
    let mut api = up.clients().await;
    api.create_volume("v", 16 * MIB).await;
    let vol_uri = format!("nbd://{}/volumes/v", up.nbd());
    for (snap, pattern) in [("s1", "0x11"), ("s2", "0x22")] {
        write(&vol_uri, &format!("write -P {pattern} 0 16M"));
        api.create_snapshot("v", snap).await.unwrap();
    }
    write(&vol_uri, "write -P 0x33 0 16M");

    // The default is kept: refused while it has snapshots.
    let (code, _, err) = cowsnap_cli(&up, &["volume", "delete", "v"]);
    assert_ne!(code, 0);
    assert!(err.contains("snapshot"), "{err}");
    let (code, out, err) = cowsnap_cli(&up, &["volume", "delete", "v", "--defer-while-snapshots"]);
    assert_eq!(code, 0, "{out}{err}");
    check_kept(&up, &[("s1", "0x11"), ("s2", "0x22")]).await;
    let (code, out, _) = cowsnap_cli(&up, &["volume", "get", "v"]);
    assert_eq!(code, 0);
    assert!(out.contains("DELETED_WITH_SNAPSHOTS"), "{out}");
    let e = api
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "v".into(),
            volume: Some(pb::Volume {
                size_bytes: 16 * MIB,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());

    // A kill changes nothing: still kept, still not exported.
    up.kill9();
    up.restart().await;
    check_kept(&up, &[("s1", "0x11"), ("s2", "0x22")]).await;
    up.assert_consistent().await;

    // One snapshot deleted: still kept for the other.
    let mut api = up.clients().await;
    api.delete_snapshot("volumes/v/snapshots/s1").await.unwrap();
    check_kept(&up, &[("s2", "0x22")]).await;
    up.kill9();
    up.restart().await;
    check_kept(&up, &[("s2", "0x22")]).await;
    up.assert_consistent().await;

    // The last one: reclaimed.
    let mut api = up.clients().await;
    api.delete_snapshot("volumes/v/snapshots/s2").await.unwrap();
    let e = api
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert!(up.device_files().is_empty(), "{:?}", up.device_files());
    up.kill9();
    up.restart().await;
    assert!(up.assert_consistent().await.is_empty());
    assert_eq!(up.terminate().code(), Some(0), "{}", up.log_text());
}

/// Volume `vol` with snapshots s1 and s2 (written with different data).
async fn volume_with_two_snapshots(up: &Up, vol: &str) {
    let mut api = up.clients().await;
    api.create_volume(vol, 4 * MIB).await;
    let uri = format!("nbd://{}/volumes/{vol}", up.nbd());
    for (snap, pattern) in [("s1", "0x11"), ("s2", "0x22")] {
        write(&uri, &format!("write -P {pattern} 0 4M"));
        api.create_snapshot(vol, snap).await.unwrap();
    }
}

async fn volume_state(up: &Up, vol: &str) -> Result<pb::State, Code> {
    up.clients()
        .await
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: format!("volumes/{vol}"),
        })
        .await
        .map(|r| r.into_inner().state())
        .map_err(|s| s.code())
}

async fn delete_snapshot(up: &Up, name: String) -> Result<(), tonic::Status> {
    up.clients().await.delete_snapshot(&name).await
}

async fn defer_delete(up: &Up, vol: &str) -> Result<(), tonic::Status> {
    up.clients()
        .await
        .volumes
        .delete_volume(pb::DeleteVolumeRequest {
            name: format!("volumes/{vol}"),
            defer_while_snapshots: true,
        })
        .await
        .map(drop)
}

fn has_device(up: &Up, name: &str) -> bool {
    up.device_files().contains(&name.to_string())
}

/// A real `kill -9` (the process's own SIGKILL, from its
/// `COWSNAP_TEST_KILL_AT` hook) at each step of the deferral and of the
/// reclaim: before and after the catalog records each call, and inside the
/// worker's delete of the volume (after it records the delete, after it
/// releases the device). After each restart the volume is kept while a
/// snapshot lives and reclaimed once none does, and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_at_each_step_of_a_deferred_delete() {
    let (_tmp, mut up) = up_in_scratch().await;

    // The deferral.
    for (i, point) in ["delete_volume:before_worker", "delete_volume:after_worker"]
        .into_iter()
        .enumerate()
    {
        let vol = format!("d{i}");
        volume_with_two_snapshots(&up, &vol).await;
        up.kill9();
        up.restart_armed(Some(point)).await;
        let r = defer_delete(&up, &vol).await;
        assert!(r.is_err(), "{point}: killed during the call");
        assert!(!up.exited().success());
        up.restart_armed(None).await;
        up.settle().await;
        assert_eq!(
            volume_state(&up, &vol).await,
            Ok(pb::State::DeletedWithSnapshots),
            "{point}"
        );
        let (ok, text) = qemu_io(&format!("nbd://{}/volumes/{vol}", up.nbd()), "read 0 4k");
        assert!(!ok, "{point}: its export is closed: {text}");
        for (snap, pattern) in [("s1", "0x11"), ("s2", "0x22")] {
            let uri = format!("nbd://{}/volumes/{vol}/snapshots/{snap}", up.nbd());
            let (ok, text) = qemu_io(&uri, &format!("read -P {pattern} 0 4M"));
            assert!(ok, "{point}: {snap} reads {pattern}: {text}");
        }
        up.assert_consistent().await;
        for s in ["s1", "s2"] {
            delete_snapshot(&up, format!("volumes/{vol}/snapshots/{s}"))
                .await
                .unwrap();
        }
        assert_eq!(volume_state(&up, &vol).await, Err(Code::NotFound));
    }

    // The reclaim: the last snapshot's delete, the reclaim's record, the
    // worker's delete.
    let points = [
        "delete_snapshot:before_worker",
        "delete_snapshot:after_worker",
        "delete_volume:before_worker",
        "worker:delete_volume:recorded",
        "worker:delete_volume:released",
        "delete_volume:after_worker",
    ];
    for (i, point) in points.into_iter().enumerate() {
        let vol = format!("r{i}");
        volume_with_two_snapshots(&up, &vol).await;
        defer_delete(&up, &vol).await.unwrap();
        delete_snapshot(&up, format!("volumes/{vol}/snapshots/s1"))
            .await
            .unwrap();
        up.kill9();
        up.restart_armed(Some(point)).await;
        assert_eq!(
            volume_state(&up, &vol).await,
            Ok(pb::State::DeletedWithSnapshots),
            "{point}: one snapshot left"
        );
        let r = delete_snapshot(&up, format!("volumes/{vol}/snapshots/s2")).await;
        assert!(r.is_err(), "{point}: killed during the call");
        assert!(!up.exited().success());
        if matches!(point, "delete_snapshot:before_worker") {
            assert!(
                has_device(&up, &format!("volumes/{vol}/snapshots/s2")),
                "{point}"
            );
        }
        if !matches!(
            point,
            "worker:delete_volume:released" | "delete_volume:after_worker"
        ) {
            assert!(
                has_device(&up, &format!("volumes/{vol}")),
                "{point}: the volume's device went before the worker was asked"
            );
        }
        up.restart_armed(None).await;
        up.settle().await;
        assert_eq!(
            volume_state(&up, &vol).await,
            Err(Code::NotFound),
            "{point}: reclaimed after the restart\n{}",
            up.log_text()
        );
        assert!(!has_device(&up, &format!("volumes/{vol}")), "{point}");
        up.assert_consistent().await;
    }
    assert!(up.assert_consistent().await.is_empty());
    assert_eq!(up.terminate().code(), Some(0), "{}", up.log_text());
}
