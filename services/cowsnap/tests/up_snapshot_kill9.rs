//! Issue 12, point 6: the worker writes its state once per snapshot create
//! (its temporary file beside the device work, put in place once the COW
//! device is ready and attached) and once per snapshot
//! delete (its intent, before the device goes; the record itself leaves
//! the file with the next write). A real `kill -9` of `cowsnap up` (its
//! `COWSNAP_TEST_KILL_AT` hook) at each step between those writes and the
//! device work, then a restart: the create or delete is finished by the
//! control service's reconciliation, the snapshot reads what the volume
//! held when it was asked for, and catalog, worker and device files agree
//! (no COW file left behind by a create that died before its record).

mod up_common;

use cowsnap_proto::cowsnap::v1 as pb;
use tonic::Code;
use up_common::*;

async fn create_volume(up: &Up, vol: &str) {
    up.clients().await.create_volume(vol, 4 * MIB).await;
}

async fn create_snapshot(up: &Up, vol: &str, snap: &str) -> Result<pb::Snapshot, tonic::Status> {
    up.clients().await.create_snapshot(vol, snap).await
}

async fn get_snapshot(up: &Up, name: &str) -> Result<pb::Snapshot, Code> {
    up.clients()
        .await
        .get_snapshot(name)
        .await
        .map_err(|s| s.code())
}

fn write(up: &Up, vol: &str, pattern: &str) {
    let uri = format!("nbd://{}/volumes/{vol}", up.nbd());
    let (ok, text) = qemu_io(&uri, &format!("write -P {pattern} 0 4M"));
    assert!(ok, "{text}");
}

fn reads(up: &Up, name: &str, pattern: &str) -> (bool, String) {
    qemu_io(
        &format!("nbd://{}/{name}", up.nbd()),
        &format!("read -P {pattern} 0 4M"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_at_each_step_of_a_snapshot_create() {
    let (_tmp, mut up) = up_in_scratch().await;
    let points = [
        "create_snapshot:before_worker",
        "worker:create_snapshot:recorded",
        "worker:create_snapshot:attached",
        "create_snapshot:after_worker",
    ];
    for (i, point) in points.into_iter().enumerate() {
        let vol = format!("c{i}");
        create_volume(&up, &vol).await;
        write(&up, &vol, "0x33");
        up.kill9();
        up.restart_armed(Some(point)).await;
        let r = create_snapshot(&up, &vol, "s").await;
        assert!(r.is_err(), "{point}: killed during the call");
        assert!(!up.exited().success());
        let name = format!("volumes/{vol}/snapshots/s");
        if point.starts_with("worker:create_snapshot:") {
            assert!(
                up.device_files().contains(&name),
                "{point}: the COW file exists"
            );
            // The record was written beside the device work, into the
            // journal after the checkpoint, as `creating`: start-up keeps
            // the snapshot if its COW header was written (it was, at
            // `attached`), else drops it and the control service creates it
            // again.
            let dir = up.dir.join("worker");
            let checkpoint: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
            assert!(
                checkpoint["volumes"][&vol]["snapshots"]
                    .as_array()
                    .unwrap()
                    .is_empty(),
                "{point}: not in the checkpoint"
            );
            let st = cowsnap_worker::state::StateFile::new(&dir).load().unwrap();
            let s = st.volumes()[&vol].snapshots.iter().find(|s| s.id == "s");
            assert_eq!(
                s.map(|s| s.phase),
                Some(cowsnap_worker::state::Phase::Creating),
                "{point}: in the journal"
            );
        }
        up.restart_armed(None).await;
        up.settle().await;
        // The create was recorded by the control service before the worker
        // was asked: reconciliation finishes it, of the volume as it is.
        let s = get_snapshot(&up, &name).await;
        assert_eq!(
            s.as_ref().map(|s| s.state()),
            Ok(pb::State::Ready),
            "{point}: {s:?}\n{}",
            up.log_text()
        );
        write(&up, &vol, "0x44");
        let (ok, text) = reads(&up, &name, "0x33");
        assert!(
            ok,
            "{point}: the snapshot reads what it was taken of: {text}"
        );
        up.assert_consistent().await;
    }
    assert_eq!(up.terminate().code(), Some(0), "{}", up.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_at_each_step_of_a_snapshot_delete() {
    let (_tmp, mut up) = up_in_scratch().await;
    let points = [
        "delete_snapshot:before_worker",
        "worker:delete_snapshot:recorded",
        "worker:delete_snapshot:released",
        "delete_snapshot:after_worker",
    ];
    for (i, point) in points.into_iter().enumerate() {
        let vol = format!("d{i}");
        create_volume(&up, &vol).await;
        write(&up, &vol, "0x55");
        create_snapshot(&up, &vol, "gone").await.unwrap();
        create_snapshot(&up, &vol, "kept").await.unwrap();
        write(&up, &vol, "0x66");
        up.kill9();
        up.restart_armed(Some(point)).await;
        let gone = format!("volumes/{vol}/snapshots/gone");
        let r = up.clients().await.delete_snapshot(&gone).await;
        assert!(r.is_err(), "{point}: killed during the call");
        assert!(!up.exited().success());
        up.restart_armed(None).await;
        up.settle().await;
        assert_eq!(
            get_snapshot(&up, &gone).await.map(|s| s.state()),
            Err(Code::NotFound),
            "{point}: finished after the restart\n{}",
            up.log_text()
        );
        assert!(!up.device_files().contains(&gone), "{point}");
        let (ok, text) = reads(&up, &format!("volumes/{vol}/snapshots/kept"), "0x55");
        assert!(ok, "{point}: the other snapshot is untouched: {text}");
        up.assert_consistent().await;
        // A create after a delete whose record only left memory (the state
        // file still holds it in Deleting) writes both changes at once.
        create_snapshot(&up, &vol, "again").await.unwrap();
        up.kill9();
        up.restart_armed(None).await;
        let (ok, text) = reads(&up, &format!("volumes/{vol}/snapshots/again"), "0x66");
        assert!(ok, "{point}: {text}");
        up.assert_consistent().await;
    }
    assert_eq!(up.terminate().code(), Some(0), "{}", up.log_text());
}
