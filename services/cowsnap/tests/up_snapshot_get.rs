//! Issue 12, point 6: GetSnapshot returns the usage fresh from the worker
//! and writes the catalog only when that report changes what the catalog
//! holds; ListSnapshots (which reads the catalog only) then shows it.

mod up_common;

use std::process::Command;

use cowsnap_proto::cowsnap::v1 as pb;
use up_common::*;

const MIB: u64 = 1024 * 1024;

async fn get(api: &mut Api, name: &str) -> pb::Snapshot {
    api.snapshots
        .get_snapshot(pb::GetSnapshotRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn listed(api: &mut Api, vol: &str) -> pb::Snapshot {
    let mut l = api
        .snapshots
        .list_snapshots(pb::ListSnapshotsRequest {
            parent: format!("volumes/{vol}"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert_eq!(l.len(), 1);
    l.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_snapshot_reports_fresh_usage_and_records_a_change() {
    let tmp = scratch();
    let mut up = Up::start(&tmp.path().join("data"));
    up.ready().await;
    let mut api = up.clients().await;
    api.volumes
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "v".into(),
            volume: Some(pb::Volume {
                size_bytes: 4 * MIB,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    api.snapshots
        .create_snapshot(pb::CreateSnapshotRequest {
            parent: "volumes/v".into(),
            snapshot_id: "s".into(),
            snapshot: Some(pb::Snapshot::default()),
        })
        .await
        .unwrap();
    let name = "volumes/v/snapshots/s";
    let before = get(&mut api, name).await;
    assert_eq!(before.usage.as_ref().unwrap().exceptions, 0);
    let again = get(&mut api, name).await;
    assert_eq!(again.usage.as_ref().unwrap().exceptions, 0);
    assert_eq!(
        listed(&mut api, "v").await.usage.unwrap().exceptions,
        0,
        "an unchanged report leaves the catalog as it was"
    );
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &format!("nbd://{}/volumes/v", up.nbd()),
            "-c",
            "write -P 0x77 0 1M",
        ])
        .output()
        .expect("qemu-io (apt install qemu-utils)");
    assert!(out.status.success(), "{out:?}");
    let after = get(&mut api, name).await;
    let exceptions = after.usage.as_ref().unwrap().exceptions;
    assert!(exceptions > 0, "{after:?}");
    assert_eq!(
        listed(&mut api, "v").await.usage.unwrap().exceptions,
        exceptions,
        "a changed report is recorded"
    );
    assert_eq!(up.terminate().code(), Some(0), "{}", up.log_text());
}
