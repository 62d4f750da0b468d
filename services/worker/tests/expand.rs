//! Growing a volume online (ExpandVolume) on a worker in-process over real
//! sockets and files: new connections see the new size, snapshots keep
//! theirs (and take no copies for the new part), deltas between snapshots
//! of different sizes cover the difference, and all of it survives a
//! restart. Bad requests get their codes.

mod common;
mod worker_common;

use cowsnap_proto::bad_request::field_violation;
use tonic::Code;
use worker_common::*;

async fn expand(c: &mut Client, vol: &str, size: u64) -> Result<pb::Volume, tonic::Status> {
    c.expand_volume(pb::ExpandVolumeRequest {
        name: format!("volumes/{vol}"),
        size_bytes: size,
    })
    .await
    .map(|r| r.into_inner())
}

async fn snapshot(c: &mut Client, name: &str) -> pb::Snapshot {
    c.get_snapshot(pb::GetSnapshotRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

fn exceptions(s: &pb::Snapshot) -> u64 {
    s.usage
        .as_ref()
        .expect("usage of a ready snapshot")
        .exceptions
}

/// The export's size as a real client (qemu-img) sees it on a new connection.
/// The delta of snapshot `name` against `base` ("": the volume now): its
/// size and its (offset, length) ranges.
async fn delta(c: &mut Client, name: &str, base: &str) -> (u64, Vec<(u64, u64)>) {
    let d = c
        .get_snapshot_delta(pb::GetSnapshotDeltaRequest {
            name: name.into(),
            base_snapshot: base.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (
        d.size_bytes,
        d.ranges.iter().map(|r| (r.offset, r.length)).collect(),
    )
}

fn client_size(w: &Worker, export: &str) -> u64 {
    let out = tool("qemu-img", &["info", "--output=json", &w.nbd_uri(export)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_grows_online_and_its_snapshots_keep_their_size() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    create_volume(&mut c, "v1", 4 * MIB, 8).await;
    let old = pattern(4 * MIB as usize, 1);
    let (mut n, info) = common::Client::open(w.nbd, "volumes/v1", true);
    assert_eq!(info.size, 4 * MIB);
    n.write_ok(0, &old);
    let s1 = create_snapshot(&mut c, "v1", "s1", 0).await;
    assert_eq!(s1.size_bytes, 4 * MIB);

    let v = expand(&mut c, "v1", 8 * MIB).await.unwrap();
    assert_eq!(v.size_bytes, 8 * MIB);
    // Online: the connection open across the grow still works, and may
    // address the new bytes (a kernel NBD device is resized in place).
    assert_eq!(n.read_ok(0, 4096), old[..4096]);
    assert_eq!(n.read_ok(4 * MIB, 4096), vec![0u8; 4096]);
    assert_ne!(
        n.call(0, common::CMD_READ, 8 * MIB, 4096, &[]).error,
        0,
        "past the new end is still refused"
    );
    assert_eq!(client_size(&w, "volumes/v1"), 8 * MIB);
    assert_eq!(client_size(&w, "volumes/v1/snapshots/s1"), 4 * MIB);

    let (mut n2, info) = common::Client::open(w.nbd, "volumes/v1", true);
    assert_eq!(info.size, 8 * MIB);
    assert_eq!(
        n2.read_ok(4 * MIB, MIB as u32),
        vec![0u8; MIB as usize],
        "the new part reads as zeros"
    );
    let tail = pattern(4 * MIB as usize, 2);
    n2.write_ok(4 * MIB, &tail);
    // Held writes (write-back) are copied by the flush at the latest.
    assert_eq!(n2.call(0, common::CMD_FLUSH, 0, 0, &[]).error, 0);
    assert_eq!(
        exceptions(&snapshot(&mut c, "volumes/v1/snapshots/s1").await),
        0,
        "writes past a snapshot's end copy nothing into it"
    );
    n2.write_ok(0, &pattern(MIB as usize, 3));
    assert_eq!(n2.call(0, common::CMD_FLUSH, 0, 0, &[]).error, 0);
    assert_eq!(
        exceptions(&snapshot(&mut c, "volumes/v1/snapshots/s1").await),
        MIB / 4096,
        "writes within it still do"
    );
    let (mut sn, _) = common::Client::open(w.nbd, "volumes/v1/snapshots/s1", true);
    assert_eq!(sn.read_ok(0, 4 * MIB as u32), old, "s1 kept its image");

    let s2 = create_snapshot(&mut c, "v1", "s2", 0).await;
    assert_eq!(s2.size_bytes, 8 * MIB);
    // s2 against s1: the chunks s1 copied, and all of s2 past s1's end.
    assert_eq!(
        delta(&mut c, "volumes/v1/snapshots/s2", "volumes/v1/snapshots/s1").await,
        (8 * MIB, vec![(0, MIB), (4 * MIB, 4 * MIB)])
    );
    // s1 against the volume now: only what s1 holds, within s1.
    assert_eq!(
        delta(&mut c, "volumes/v1/snapshots/s1", "").await,
        (4 * MIB, vec![(0, MIB)])
    );

    // Merging s1 would leave the grown part as it is: refused.
    let e = c
        .merge_snapshot(pb::MergeSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("has grown"), "{}", e.message());

    // A restore of s1 has s1's size and image.
    let t = c
        .restore_volume(pb::RestoreVolumeRequest {
            volume_id: "r1".into(),
            source_snapshot: "volumes/v1/snapshots/s1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    wait_task(&mut c, &t.name).await;
    let (mut r, info) = common::Client::open(w.nbd, "volumes/r1", true);
    assert_eq!(info.size, 4 * MIB);
    assert_eq!(r.read_ok(0, 4 * MIB as u32), old);
    drop((n, n2, sn, r));
    w.stop().await;

    // Everything holds after a restart.
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    let v = c
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.size_bytes, 8 * MIB);
    let sizes: Vec<_> = v.snapshots.iter().map(|s| s.size_bytes).collect();
    assert_eq!(sizes, [4 * MIB, 8 * MIB]);
    assert_eq!(client_size(&w, "volumes/v1/snapshots/s1"), 4 * MIB);
    let (mut n, info) = common::Client::open(w.nbd, "volumes/v1", true);
    assert_eq!(info.size, 8 * MIB);
    assert_eq!(n.read_ok(4 * MIB, 4 * MIB as u32), tail);
    let (mut sn, _) = common::Client::open(w.nbd, "volumes/v1/snapshots/s1", true);
    assert_eq!(sn.read_ok(0, 4 * MIB as u32), old);
    // Growing again, with both snapshots: neither changes size.
    expand(&mut c, "v1", 12 * MIB).await.unwrap();
    let v = c
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let sizes: Vec<_> = v.snapshots.iter().map(|s| s.size_bytes).collect();
    assert_eq!((v.size_bytes, sizes), (12 * MIB, vec![4 * MIB, 8 * MIB]));
    drop((n, sn));
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_expand_requests_get_their_codes() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    create_volume(&mut c, "v1", 4 * MIB, 16).await;
    // The size it has: idempotent.
    assert_eq!(
        expand(&mut c, "v1", 4 * MIB).await.unwrap().size_bytes,
        4 * MIB
    );
    for (size, why) in [
        (2 * MIB, "smaller"),
        (4 * MIB + 4096, "multiple"),
        (4 * MIB + 512, "multiple"),
    ] {
        let e = expand(&mut c, "v1", size).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{size}: {e:?}");
        assert!(e.message().contains(why), "{size}: {}", e.message());
        assert_eq!(
            field_violation(&e).map(|(f, _)| f).as_deref(),
            Some("size_bytes")
        );
    }
    let e = expand(&mut c, "nope", 8 * MIB).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    // More than the data dir's file system holds.
    let e = expand(&mut c, "v1", 1 << 60).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let v = expand(&mut c, "v1", 4 * MIB).await.unwrap();
    assert_eq!(v.size_bytes, 4 * MIB, "a refused grow changed nothing");
    w.stop().await;
}
