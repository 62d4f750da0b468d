//! Issue 12, point 6: GetSnapshot returns the usage fresh from the worker
//! and writes the catalog only when that report changes what the catalog
//! holds; ListSnapshots (which reads the catalog only) then shows it.

mod up_common;

use cowsnap_proto::cowsnap::v1 as pb;
use up_common::*;

async fn get(api: &mut Api, name: &str) -> pb::Snapshot {
    api.get_snapshot(name).await.unwrap()
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
    let (_tmp, mut up) = up_in_scratch().await;
    let mut api = up.clients().await;
    api.create_volume("v", 4 * MIB).await;
    api.create_snapshot("v", "s").await.unwrap();
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
    let (ok, text) = qemu_io(
        &format!("nbd://{}/volumes/v", up.nbd()),
        "write -P 0x77 0 1M",
    );
    assert!(ok, "{text}");
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
