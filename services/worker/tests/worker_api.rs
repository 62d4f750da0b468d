//! The worker's gRPC API and NBD exports, end to end: a worker in-process on
//! real sockets over files on disk, driven by the generated gRPC client and
//! by real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, and a protocol
//! client for fine-grained acknowledgement tracking).

mod common;
mod worker_common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use cowsnap_proto::bad_request::field_violation;
use tonic::Code;
use worker_common::*;

const BLOCK: u64 = 4096;

/// A connection to an export, with the protocol client of `common`.
fn nbd(addr: SocketAddr, export: &str) -> common::Client {
    common::Client::open(addr, export, true).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_and_snapshot_lifecycle() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;

    let v = create_volume(&mut c, "v1", 16 * MIB, 8).await;
    assert_eq!(v.name, "volumes/v1");
    assert_eq!(v.nbd_export, "volumes/v1");
    assert_eq!(v.state, pb::State::Ready as i32);
    assert_eq!((v.size_bytes, v.chunk_sectors), (16 * MIB, 8));
    assert!(
        v.device.starts_with(dir.path().to_str().unwrap()),
        "file-backed under the data dir: {}",
        v.device
    );
    assert_eq!(std::fs::metadata(&v.device).unwrap().len(), 16 * MIB);

    let s = create_snapshot(&mut c, "v1", "s1", 4 * MIB).await;
    assert_eq!(s.name, "volumes/v1/snapshots/s1");
    assert_eq!(s.state, pb::State::Ready as i32);
    assert!(!s.writable);
    // A fresh chunk-8 store: the kernel's numbers.
    let u = s.usage.unwrap();
    assert_eq!(
        (
            u.allocated_bytes,
            u.total_bytes,
            u.metadata_bytes,
            u.exceptions
        ),
        (16 * 512, 4 * MIB, 16 * 512, 0)
    );
    assert_eq!(s.status_line, "0 32768 snapshot 16/8192 16");

    let got = c
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.snapshots.len(), 1);
    assert_eq!(got.snapshots[0].name, s.name);
    let list = c
        .list_volumes(pb::ListVolumesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.volumes.len(), 1);

    let info = c
        .get_worker_info(pb::GetWorkerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node, "test-node");
    assert_eq!(info.nbd_uri, format!("nbd://{}", w.nbd));
    assert!(info.free_bytes > 0 && info.capacity_bytes >= info.free_bytes);
    assert!(["io_uring", "portable"].contains(&info.io_backend.as_str()));

    // Writing to the volume copies into the snapshot: usage shows it once
    // the held write (write-back) is flushed.
    let mut n = nbd(w.nbd, "volumes/v1");
    n.write_ok(0, &pattern(64 << 10, 1));
    assert_eq!(n.call(0, common::CMD_FLUSH, 0, 0, &[]).error, 0);
    let s = c
        .get_snapshot(pb::GetSnapshotRequest {
            name: s.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.usage.unwrap().exceptions, 16);

    c.delete_snapshot(pb::DeleteSnapshotRequest {
        name: s.name.clone(),
    })
    .await
    .unwrap();
    let e = c
        .get_snapshot(pb::GetSnapshotRequest {
            name: s.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        !std::path::Path::new(&s.device).exists(),
        "the COW file is removed"
    );

    c.delete_volume(pb::DeleteVolumeRequest {
        name: "volumes/v1".into(),
    })
    .await
    .unwrap();
    assert!(
        !std::path::Path::new(&v.device).exists(),
        "the origin file is removed"
    );
    assert!(
        c.list_volumes(pb::ListVolumesRequest {})
            .await
            .unwrap()
            .into_inner()
            .volumes
            .is_empty()
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_are_idempotent_and_conflicts_are_already_exists() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    let a = create_volume(&mut c, "v1", 8 * MIB, 16).await;
    let b = create_volume(&mut c, "v1", 8 * MIB, 16).await;
    assert_eq!(
        (a.name, a.device, a.size_bytes),
        (b.name, b.device, b.size_bytes)
    );
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "v1".into(),
            size_bytes: 16 * MIB,
            chunk_sectors: 16,
            device: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");

    let s1 = create_snapshot(&mut c, "v1", "s1", 2 * MIB).await;
    let s2 = create_snapshot(&mut c, "v1", "s1", 2 * MIB).await;
    assert_eq!(s1.device, s2.device);
    let e = c
        .create_snapshot(pb::CreateSnapshotRequest {
            parent: "volumes/v1".into(),
            snapshot_id: "s1".into(),
            cow_size_bytes: 4 * MIB,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e}");
    assert_eq!(
        c.get_volume(pb::GetVolumeRequest {
            name: "volumes/v1".into()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .len(),
        1,
        "the repeated create added nothing"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_codes() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    let vol = |id: &str, size: u64, chunk: u32| pb::CreateVolumeRequest {
        volume_id: id.into(),
        size_bytes: size,
        chunk_sectors: chunk,
        device: String::new(),
    };
    let cases: Vec<(pb::CreateVolumeRequest, Code, &str)> = vec![
        (vol("", MIB, 0), Code::InvalidArgument, "volume_id"),
        (vol("Bad_Id", MIB, 0), Code::InvalidArgument, "volume_id"),
        (vol("v", 0, 0), Code::InvalidArgument, "size_bytes"),
        (vol("v", MIB + 512, 0), Code::InvalidArgument, "size_bytes"),
        (vol("v", MIB, 12), Code::InvalidArgument, "chunk_sectors"),
        (vol("v", MIB, 2048), Code::InvalidArgument, "chunk_sectors"),
        (vol("v", 1 << 60, 0), Code::ResourceExhausted, "no room"),
    ];
    for (req, code, word) in cases {
        let e = c.create_volume(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), code, "{req:?}: {e}");
        assert!(
            e.message().contains(word),
            "{req:?}: {:?} should name {word}",
            e.message()
        );
        // The field as data too: a google.rpc.BadRequest field violation.
        if code == Code::InvalidArgument {
            let (field, _) = field_violation(&e).expect("a BadRequest field violation");
            assert_eq!(field, word, "{req:?}");
        }
    }
    let nf = c
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(nf.code(), Code::NotFound);
    let bad = c
        .get_volume(pb::GetVolumeRequest {
            name: "vol/x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("name"), "{}", bad.message());
    let nf = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            name: "volumes/nope/snapshots/s".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(nf.code(), Code::NotFound);

    create_volume(&mut c, "v1", 8 * MIB, 8).await;
    let small = c
        .create_snapshot(pb::CreateSnapshotRequest {
            parent: "volumes/v1".into(),
            snapshot_id: "tiny".into(),
            cow_size_bytes: 8192,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(small.code(), Code::InvalidArgument);
    assert!(
        small.message().contains("cow_size_bytes"),
        "{}",
        small.message()
    );
    let raw = c
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "r".into(),
            size_bytes: MIB,
            chunk_sectors: 0,
            device: "/dev/sda".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        raw.code(),
        Code::InvalidArgument,
        "no raw devices without an allow list: {raw}"
    );
    assert!(raw.message().contains("device"), "{}", raw.message());

    // A volume with a snapshot cannot go; a merging snapshot cannot be deleted.
    create_snapshot(&mut c, "v1", "s1", 16 * MIB).await;
    let e = c
        .delete_volume(pb::DeleteVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    // Give the merge something to do so it is still running below.
    let mut n = nbd(w.nbd, "volumes/v1");
    n.write_ok(0, &pattern(4 * MIB as usize, 3));
    let task = c
        .merge_snapshot(pb::MergeSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let del = c
        .delete_snapshot(pb::DeleteSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await;
    match del {
        Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{e}"),
        // The merge may already have ended, taking the snapshot with it.
        Ok(_) => panic!("deleting a merging snapshot succeeded"),
    }
    let again = c.create_snapshot(pb::CreateSnapshotRequest {
        parent: "volumes/v1".into(),
        snapshot_id: "s2".into(),
        cow_size_bytes: 4 * MIB,
        ..Default::default()
    });
    if let Err(e) = again.await {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    }
    wait_task(&mut c, &task.name).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let ch = tonic::transport::Channel::from_shared(w.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "cowsnap.worker.v1.WorkerService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // grpcurl 1.8 asks reflection v1alpha for the list of services.
    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut r = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = r
        .server_reflection_info(futures::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["cowsnap.worker.v1.WorkerService", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_through_the_workers_exports() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    create_volume(&mut c, "v1", 8 * MIB, 8).await;
    let vol = w.nbd_uri("volumes/v1");
    tool("qemu-io", &["-f", "raw", &vol, "-c", "write -P 0x11 0 8m"]);
    create_snapshot(&mut c, "v1", "s1", 16 * MIB).await;
    // After the snapshot: writes with the page cache off (-t none) and with FUA (-f).
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-t",
            "none",
            &vol,
            "-c",
            "write -P 0x22 1m 2m",
            "-c",
            "read -P 0x22 1m 2m",
        ],
    );
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            &vol,
            "-c",
            "write -f -P 0x33 4m 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x33 4m 64k",
        ],
    );
    let snap = w.nbd_uri("volumes/v1/snapshots/s1");
    tool(
        "qemu-io",
        &["-f", "raw", "-r", &snap, "-c", "read -P 0x11 0 8m"],
    );

    let out = dir.path().join("snap.raw");
    let img = export_image(&snap, &out);
    assert!(
        img.iter().all(|&b| b == 0x11),
        "qemu-img convert of the snapshot gives its content"
    );
    let out = dir.path().join("vol.raw");
    let img = export_image(&vol, &out);
    let mut model = vec![0x11u8; 8 * MIB as usize];
    model[MIB as usize..3 * MIB as usize].fill(0x22);
    model[4 * MIB as usize..4 * MIB as usize + 65536].fill(0x33);
    assert!(img == model, "the volume holds every write");

    let info: serde_json::Value =
        serde_json::from_str(&tool("nbdinfo", &["--json", &snap])).unwrap();
    let e = &info["exports"][0];
    assert_eq!(e["export-size"], 8 * MIB);
    assert_eq!(e["is_read_only"], true);
    let list = tool("nbdinfo", &["--list", &vol]);
    assert!(
        list.contains("volumes/v1/snapshots/s1") && list.contains("volumes/v1"),
        "{list}"
    );

    // nbdcopy out of the snapshot and into a second volume, many requests in flight.
    create_volume(&mut c, "v2", 8 * MIB, 8).await;
    let v2 = w.nbd_uri("volumes/v2");
    tool("nbdcopy", &["--requests=64", &snap, &v2]);
    let img = export_image(&v2, &dir.path().join("v2.raw"));
    assert!(
        img.iter().all(|&b| b == 0x11),
        "nbdcopy copied the snapshot"
    );
    w.stop().await;
}

/// Whether a snapshot was being taken when a write was issued or acked.
const BEFORE: u8 = 0;
const DURING: u8 = 1;
const AFTER: u8 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_during_a_write_storm_is_atomic() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    const WRITERS: u64 = 4;
    const PER: u64 = 1024; // blocks per writer
    create_volume(&mut c, "v1", WRITERS * PER * BLOCK, 8).await;
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let mut threads = Vec::new();
    for t in 0..WRITERS {
        let (addr, phase) = (w.nbd, phase.clone());
        threads.push(std::thread::spawn(move || {
            // Each writer fills its own blocks in order, one write at a time:
            // (block, phase when issued, phase when acknowledged).
            let mut n = nbd(addr, "volumes/v1");
            let mut log = Vec::new();
            for i in 0..PER {
                let b = t * PER + i;
                let issued = phase.load(Ordering::SeqCst);
                n.write_ok(b * BLOCK, &pattern(BLOCK as usize, b + 1));
                log.push((b, issued, phase.load(Ordering::SeqCst)));
                if issued == AFTER && i > PER / 2 {
                    break;
                }
            }
            log
        }));
    }
    // Take the snapshot once the writers are well under way.
    loop {
        let v = c
            .get_volume(pb::GetVolumeRequest {
                name: "volumes/v1".into(),
            })
            .await
            .unwrap();
        let _ = v;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        if threads.iter().all(|t| !t.is_finished()) {
            break;
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    phase.store(DURING, Ordering::SeqCst);
    create_snapshot(&mut c, "v1", "s1", 2 * WRITERS * PER * BLOCK).await;
    phase.store(AFTER, Ordering::SeqCst);
    let logs: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();

    let mut snap = nbd(w.nbd, "volumes/v1/snapshots/s1");
    let (mut must_in, mut must_out, mut either) = (0, 0, 0);
    for log in &logs {
        let mut seen_gap = false;
        for &(b, issued, acked) in log {
            let got = snap.read_ok(b * BLOCK, BLOCK as u32);
            let present = got == pattern(BLOCK as usize, b + 1);
            assert!(
                present || got.iter().all(|&x| x == 0),
                "block {b} holds neither its write nor zeros"
            );
            if acked == BEFORE {
                must_in += 1;
                assert!(
                    present,
                    "block {b}: acknowledged before the snapshot, missing from it"
                );
            } else if issued == AFTER {
                must_out += 1;
                assert!(
                    !present,
                    "block {b}: issued after the snapshot, found in it"
                );
            } else {
                either += 1;
            }
            // One writer's writes are sequential: the snapshot holds a prefix.
            if !present {
                seen_gap = true;
            } else {
                assert!(
                    !seen_gap,
                    "block {b}: in the snapshot after a later-missing earlier write"
                );
            }
        }
    }
    assert!(
        must_in > 0 && must_out > 0,
        "the storm ran across the snapshot: {must_in} before, {must_out} after, {either} during"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_via_the_api_with_a_client_connected() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    let size = 16 * MIB;
    create_volume(&mut c, "v1", size, 8).await;
    let mut n = nbd(w.nbd, "volumes/v1");
    let a = pattern(size as usize, 1);
    for off in (0..size).step_by(MIB as usize) {
        n.write_ok(off, &a[off as usize..(off + MIB) as usize]);
    }
    create_snapshot(&mut c, "v1", "s1", 2 * size).await;
    // Change the first half after the snapshot.
    for off in (0..size / 2).step_by(MIB as usize) {
        n.write_ok(off, &pattern(MIB as usize, 100 + off));
    }
    let task = c
        .merge_snapshot(pb::MergeSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(task.kind, "merge");
    // The snapshot's export is gone at once; the volume's stays.
    let v = c
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.state == pb::State::Merging as i32 || v.state == pb::State::Ready as i32);

    // The connected client keeps writing and reading during the merge: its
    // own region (in the changed half) and the rolled-back content elsewhere.
    let addr = w.nbd;
    let during = std::thread::spawn(move || {
        let mut n = nbd(addr, "volumes/v1");
        let c = pattern(MIB as usize, 999);
        n.write_ok(2 * MIB, &c);
        assert_eq!(
            n.read_ok(2 * MIB, MIB as u32),
            c,
            "a write during the merge reads back"
        );
        let rolled = n.read_ok(5 * MIB, MIB as u32);
        assert_eq!(
            rolled,
            pattern(size as usize, 1)[5 * MIB as usize..6 * MIB as usize],
            "the volume reads the snapshot's content during the merge"
        );
    });
    let t = wait_task(&mut c, &task.name).await;
    during.join().unwrap();
    assert_eq!(t.percent, 100.0);

    let mut model = a.clone();
    model[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&pattern(MIB as usize, 999));
    let img = export_image(&w.nbd_uri("volumes/v1"), &dir.path().join("v.raw"));
    assert!(
        img == model,
        "after the merge the volume is the snapshot plus the writes made during it"
    );
    let e = c
        .get_snapshot(pb::GetSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "the merged snapshot is gone");
    let v = c
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.state, pb::State::Ready as i32);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_and_clone_copy_the_content() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    let size = 8 * MIB;
    create_volume(&mut c, "v1", size, 16).await;
    let mut n = nbd(w.nbd, "volumes/v1");
    let a = pattern(size as usize, 7);
    n.write_ok(0, &a[..4 * MIB as usize]);
    create_snapshot(&mut c, "v1", "s1", 2 * size).await;
    n.write_ok(0, &pattern(MIB as usize, 8));

    let t = c
        .restore_volume(pb::RestoreVolumeRequest {
            volume_id: "r1".into(),
            source_snapshot: "volumes/v1/snapshots/s1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (t.kind.as_str(), t.target.as_str()),
        ("restore", "volumes/r1")
    );
    // Idempotent: the same restore returns its task.
    let again = c
        .restore_volume(pb::RestoreVolumeRequest {
            volume_id: "r1".into(),
            source_snapshot: "volumes/v1/snapshots/s1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.name, t.name);
    wait_task(&mut c, &t.name).await;
    let mut want = vec![0u8; size as usize];
    want[..4 * MIB as usize].copy_from_slice(&a[..4 * MIB as usize]);
    let img = export_image(&w.nbd_uri("volumes/r1"), &dir.path().join("r1.raw"));
    assert!(
        img == want,
        "the restored volume has the snapshot's content"
    );

    // A clone is of the volume at the call; writes after it stay out.
    let mut cur = want.clone();
    cur[..MIB as usize].copy_from_slice(&pattern(MIB as usize, 8));
    let t = c
        .clone_volume(pb::CloneVolumeRequest {
            volume_id: "c1".into(),
            source_volume: "volumes/v1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    n.write_ok(6 * MIB, &pattern(MIB as usize, 9));
    wait_task(&mut c, &t.name).await;
    let img = export_image(&w.nbd_uri("volumes/c1"), &dir.path().join("c1.raw"));
    assert!(img == cur, "the clone has the source's content at the call");
    // The clone's temporary snapshot is gone: the source can be deleted
    // once its own snapshot is.
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        name: "volumes/v1/snapshots/s1".into(),
    })
    .await
    .unwrap();
    drop(n);
    c.delete_volume(pb::DeleteVolumeRequest {
        name: "volumes/v1".into(),
    })
    .await
    .unwrap();
    w.stop().await;
}

/// Volume `v1` (8 MiB) with snapshot `s1` whose 64 KiB COW 1 MiB of
/// writes overflowed: INVALID. Returns a connection to the snapshot's
/// export opened while it was still valid.
async fn overflowed_snapshot(w: &Worker, c: &mut Client) -> common::Client {
    create_volume(c, "v1", 8 * MIB, 8).await;
    create_snapshot(c, "v1", "s1", 64 * 1024).await;
    let snap = nbd(w.nbd, "volumes/v1/snapshots/s1");
    nbd(w.nbd, "volumes/v1").write_ok(0, &pattern(MIB as usize, 1));
    let s = c
        .get_snapshot(pb::GetSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state, pb::State::Invalid as i32, "{s:?}");
    snap
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_snapshot_is_refused_as_a_restore_source() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    let _snap = overflowed_snapshot(&w, &mut c).await;
    // Refused up front, as a merge is: no task, no volume left FAILED.
    let e = c
        .restore_volume(pb::RestoreVolumeRequest {
            volume_id: "r1".into(),
            source_snapshot: "volumes/v1/snapshots/s1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("invalid"), "{}", e.message());
    let gone = c
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/r1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert!(
        c.list_tasks(pb::ListTasksRequest {})
            .await
            .unwrap()
            .into_inner()
            .tasks
            .is_empty()
    );
    let e = c
        .merge_snapshot(pb::MergeSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_no_server_path_to_clients() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let data_dir = dir.path().to_str().unwrap().to_string();
    let mut c = w.client().await;
    let mut snap = overflowed_snapshot(&w, &mut c).await;
    // The engine's error on the snapshot's export names no device file
    // (the log does).
    let r = snap.call(0, common::CMD_READ, 0, 4096, &[]);
    assert_ne!(r.error, 0, "reading an invalid snapshot fails");
    assert!(r.message.contains("invalid"), "{}", r.message);
    assert!(
        !r.message.contains(&data_dir) && !r.message.contains(".cow"),
        "NBD error names a server path: {}",
        r.message
    );
    // Nor does a status.
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "huge".into(),
            size_bytes: 1 << 60,
            chunk_sectors: 0,
            device: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("no room"), "{}", e.message());
    assert!(
        !e.message().contains(&data_dir),
        "status names a server path: {}",
        e.message()
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10kb_input_gets_a_short_status_message() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    let long = "a".repeat(10_000);
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            volume_id: long.clone(),
            size_bytes: MIB,
            chunk_sectors: 0,
            device: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message().len());
    assert!(e.message().contains("volume_id"), "{}", e.message());
    assert!(e.message().len() < 300, "{} bytes", e.message().len());
    let e = c
        .get_volume(pb::GetVolumeRequest {
            name: format!("volumes/{long}"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message().len());
    assert!(e.message().len() < 300, "{} bytes", e.message().len());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_and_content_survive_a_restart() {
    let dir = scratch();
    let size = 4 * MIB;
    let (vdev, sdev) = {
        let w = Worker::start(dir.path(), &[]).await;
        let mut c = w.client().await;
        let v = create_volume(&mut c, "v1", size, 8).await;
        let mut n = nbd(w.nbd, "volumes/v1");
        n.write_ok(0, &pattern(size as usize, 1));
        let s = create_snapshot(&mut c, "v1", "s1", 2 * size).await;
        create_snapshot(&mut c, "v1", "s2", MIB).await;
        n.write_ok(0, &pattern(MIB as usize, 2));
        drop(n);
        w.stop().await;
        (v.device, s.device)
    };
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    let v = c
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.device, vdev);
    let names: Vec<_> = v.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["volumes/v1/snapshots/s1", "volumes/v1/snapshots/s2"],
        "snapshots come back in order"
    );
    assert_eq!(v.snapshots[0].device, sdev);
    assert_eq!(v.snapshots[0].usage.as_ref().unwrap().exceptions, 256);
    let mut s = nbd(w.nbd, "volumes/v1/snapshots/s1");
    assert_eq!(
        s.read_ok(0, MIB as u32),
        pattern(size as usize, 1)[..MIB as usize],
        "the snapshot kept its content"
    );
    let mut n = nbd(w.nbd, "volumes/v1");
    assert_eq!(n.read_ok(0, MIB as u32), pattern(MIB as usize, 2));
    w.stop().await;
}

/// Loop devices over new 32 MiB files `dir/NAME`, each holding `init`
/// (the rest zero); detached when the guard drops.
fn loop_devices(dir: &std::path::Path, names: &[&str], init: &[u8]) -> (Vec<String>, Detach) {
    let mut guard = Detach(Vec::new());
    for name in names {
        let f = dir.join(name);
        std::fs::write(&f, init).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(32 * MIB)
            .unwrap();
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", f.to_str().unwrap()])
            .output()
            .expect("losetup (util-linux) is needed for the raw device tests");
        assert!(
            out.status.success(),
            "losetup failed (run as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        guard
            .0
            .push(String::from_utf8(out.stdout).unwrap().trim().to_string());
    }
    (guard.0.clone(), guard)
}

struct Detach(Vec<String>);

impl Drop for Detach {
    fn drop(&mut self) {
        for l in &self.0 {
            let _ = std::process::Command::new("losetup")
                .args(["-d", l])
                .status();
        }
    }
}

/// Loop devices standing in for disks: raw block devices from the allow
/// list hold a volume and a snapshot; anything else is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_devices_from_the_allow_list() {
    let dir = scratch();
    let (loops, _detach) = loop_devices(dir.path(), &["disk0", "disk1"], &[]);
    let data = dir.path().join("data");
    let w = Worker::start(&data, &["/dev/loop*"]).await;
    let mut c = w.client().await;
    let info = c
        .get_worker_info(pb::GetWorkerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        info.devices
            .iter()
            .any(|d| d.path == loops[0] && d.size_bytes == 32 * MIB && d.used_by.is_empty())
    );

    let v = c
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "raw".into(),
            size_bytes: 0,
            chunk_sectors: 8,
            device: loops[0].clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (v.device.as_str(), v.size_bytes),
        (loops[0].as_str(), 32 * MIB),
        "the whole device"
    );
    let mut n = nbd(w.nbd, "volumes/raw");
    n.write_ok(0, &pattern(MIB as usize, 1));
    let s = c
        .create_snapshot(pb::CreateSnapshotRequest {
            parent: "volumes/raw".into(),
            snapshot_id: "s1".into(),
            cow_size_bytes: 0,
            device: loops[1].clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.device, loops[1]);
    n.write_ok(0, &pattern(MIB as usize, 2));
    let mut sn = nbd(w.nbd, "volumes/raw/snapshots/s1");
    assert_eq!(
        sn.read_ok(0, MIB as u32),
        pattern(MIB as usize, 1),
        "the snapshot on a raw device kept the data"
    );
    let info = c
        .get_worker_info(pb::GetWorkerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let used: HashMap<_, _> = info
        .devices
        .iter()
        .map(|d| (d.path.clone(), d.used_by.clone()))
        .collect();
    assert_eq!(used[&loops[0]], "volumes/raw");
    assert_eq!(used[&loops[1]], "volumes/raw/snapshots/s1");

    // A device in use, a path outside the list, a file: refused.
    let in_use = c
        .create_snapshot(pb::CreateSnapshotRequest {
            parent: "volumes/raw".into(),
            snapshot_id: "s2".into(),
            device: loops[0].clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition, "{in_use}");
    for path in ["/dev/null", dir.path().join("disk0").to_str().unwrap()] {
        let e = c
            .create_volume(pb::CreateVolumeRequest {
                volume_id: "x".into(),
                size_bytes: MIB,
                chunk_sectors: 8,
                device: path.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{path}: {e}");
        assert!(
            e.message().contains("allow list"),
            "{path}: {}",
            e.message()
        );
    }
    drop((n, sn));
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        name: s.name.clone(),
    })
    .await
    .unwrap();
    // The released COW device no longer looks like a snapshot.
    let head = std::fs::read(dir.path().join("disk1")).unwrap();
    assert!(
        head[..4096].iter().all(|&b| b == 0),
        "the released COW device's header is wiped"
    );
    c.delete_volume(pb::DeleteVolumeRequest {
        name: "volumes/raw".into(),
    })
    .await
    .unwrap();
    w.stop().await;
}

/// A device node at `at` for the same device as the block device `like`.
fn device_node(at: &std::path::Path, like: &str) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(like).unwrap().rdev();
    let c = std::ffi::CString::new(at.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string; mknod reads nothing else.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, rdev as libc::dev_t) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        at.display(),
        std::io::Error::last_os_error()
    );
}

/// `--device-allow DIR/*` names the entries of DIR and nothing else: no
/// `..` walks out of it, `*` does not reach into a subdirectory, a link in
/// it may only name another allowed device, and one device is used once
/// however many paths name it. Every refusal comes before any byte is
/// written: the devices outside keep their content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_cannot_be_escaped() {
    let dir = scratch();
    let base = std::fs::canonicalize(dir.path()).unwrap();
    let marker = pattern(MIB as usize, 7);
    // `ok` is allowed by its own path; `out` is allowed by no glob.
    let (loops, _detach) = loop_devices(&base, &["ok", "out"], &marker);
    let (ok, out) = (loops[0].clone(), loops[1].clone());
    let allowed = base.join("allowed");
    std::fs::create_dir_all(allowed.join("sub")).unwrap();
    let a = |name: &str| format!("{}/{name}", allowed.display());
    std::os::unix::fs::symlink(&out, a("to-out")).unwrap();
    std::os::unix::fs::symlink(a("to-out"), a("to-to-out")).unwrap();
    std::os::unix::fs::symlink(&ok, a("to-ok")).unwrap();
    std::os::unix::fs::symlink("/dev", a("dev")).unwrap();
    device_node(&allowed.join("sub/out"), &out);

    let data = base.join("data");
    let glob = format!("{}/*", glob::Pattern::escape(allowed.to_str().unwrap()));
    let w = Worker::start(&data, &[&glob, &ok]).await;
    let mut c = w.client().await;
    let outside_intact = |what: &str| {
        let now = std::fs::read(base.join("out")).unwrap();
        assert!(
            now[..MIB as usize] == marker[..] && now[MIB as usize..].iter().all(|&b| b == 0),
            "{what}: the device outside the allow list was written"
        );
    };

    // What the worker lists: the allowed device, once; nothing outside.
    let info = c
        .get_worker_info(pb::GetWorkerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<&str> = info.devices.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(listed, [ok.as_str()], "the devices on offer");

    let up = "/..".repeat(allowed.components().count() - 1);
    let escapes = [
        (format!("{}{up}{out}", allowed.display()), "'..' component"),
        (a(".").to_string() + "/to-ok", "'.' component"),
        (a("to-ok/"), "empty component"),
        (format!("{}//to-ok", allowed.display()), "empty component"),
        (a("sub/out"), "not in the device allow list"),
        (
            a("dev") + &out["/dev".len()..],
            "not in the device allow list",
        ),
        (a("to-out"), "is a link to"),
        (a("to-to-out"), "is a link to"),
        (out[1..].to_string(), "not an absolute path"),
        (
            format!("{}/to-out", allowed.strip_prefix("/").unwrap().display()),
            "not an absolute path",
        ),
    ];
    for (path, why) in &escapes {
        let e = c
            .create_volume(pb::CreateVolumeRequest {
                volume_id: "escape".into(),
                size_bytes: MIB,
                chunk_sectors: 8,
                device: path.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{path}: {e}");
        assert!(
            e.message().contains(why) && e.message().contains("device"),
            "{path}: {}",
            e.message()
        );
        outside_intact(path);
    }

    // A link in the allowed directory to an allowed device is that device.
    let v = c
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "raw".into(),
            size_bytes: 4 * MIB,
            chunk_sectors: 8,
            device: a("to-ok"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.device, ok, "recorded under its canonical path");
    let mut n = nbd(w.nbd, "volumes/raw");
    n.write_ok(0, &pattern(MIB as usize, 1));

    // The escapes as COW devices: refused the same way, the volume and the
    // device outside untouched.
    for (path, why) in &escapes {
        let e = c
            .create_snapshot(pb::CreateSnapshotRequest {
                parent: "volumes/raw".into(),
                snapshot_id: "escape".into(),
                device: path.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{path}: {e}");
        assert!(e.message().contains(why), "{path}: {}", e.message());
        outside_intact(path);
    }
    // The volume's device under another name (its link, its own path,
    // another device node): in use, so no COW header lands on it.
    device_node(&allowed.join("ok-again"), &ok);
    for path in [a("to-ok"), ok.clone(), a("ok-again")] {
        let e = c
            .create_snapshot(pb::CreateSnapshotRequest {
                parent: "volumes/raw".into(),
                snapshot_id: "s1".into(),
                device: path.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{path}: {e}");
        assert!(
            e.message().contains("already used by volumes/raw"),
            "{path}: {}",
            e.message()
        );
        let e = c
            .create_volume(pb::CreateVolumeRequest {
                volume_id: "twice".into(),
                size_bytes: MIB,
                chunk_sectors: 8,
                device: path.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{path}: {e}");
    }
    assert_eq!(
        n.read_ok(0, MIB as u32),
        pattern(MIB as usize, 1),
        "the volume kept its data"
    );
    let info = c
        .get_worker_info(pb::GetWorkerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.devices.len(), 1);
    assert_eq!(info.devices[0].used_by, "volumes/raw");
    // A retried create names its device as strictly as the first one.
    let e = c
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "raw".into(),
            size_bytes: 4 * MIB,
            chunk_sectors: 8,
            device: format!("{}{up}{ok}", allowed.display()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    c.create_volume(pb::CreateVolumeRequest {
        volume_id: "raw".into(),
        size_bytes: 4 * MIB,
        chunk_sectors: 8,
        device: a("to-ok"),
    })
    .await
    .expect("the same create again");
    drop(n);
    c.delete_volume(pb::DeleteVolumeRequest {
        name: "volumes/raw".into(),
    })
    .await
    .unwrap();
    outside_intact("the end");
    w.stop().await;
}

/// qemu-io `cmd` on `uri`; whether it succeeded, and its output.
fn qemu_io(uri: &str, cmd: &str) -> (bool, String) {
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", uri, "-c", cmd])
        .output()
        .expect("qemu-io (apt install qemu-utils)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("failed"), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_volume_is_not_exported_and_its_snapshot_still_reads() {
    let dir = scratch();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    create_volume(&mut c, "v1", 4 * MIB, 8).await;
    let mut n = nbd(w.nbd, "volumes/v1");
    n.write_ok(0, &pattern(MIB as usize, 7));
    create_snapshot(&mut c, "v1", "s1", 0).await;
    n.write_ok(0, &pattern(MIB as usize, 8));

    let retire = pb::RetireVolumeRequest {
        name: "volumes/v1".into(),
    };
    let v = c.retire_volume(retire.clone()).await.unwrap().into_inner();
    assert!(v.retired);
    assert_eq!(v.nbd_export, "");
    // The connection that was open is ended by the server.
    assert!(n.closed(), "the open connection to the volume is closed");
    // New ones are refused the export; the snapshot reads what it kept.
    let (ok, text) = qemu_io(&w.nbd_uri("volumes/v1"), "read 0 4k");
    assert!(!ok, "{text}");
    let img = export_image(
        &w.nbd_uri("volumes/v1/snapshots/s1"),
        &dir.path().join("s1.raw"),
    );
    assert_eq!(&img[..MIB as usize], &pattern(MIB as usize, 7)[..]);
    // Idempotent; nothing new of it; not deleted while its snapshot lives.
    assert!(
        c.retire_volume(retire.clone())
            .await
            .unwrap()
            .into_inner()
            .retired
    );
    let e = c
        .create_snapshot(pb::CreateSnapshotRequest {
            parent: "volumes/v1".into(),
            snapshot_id: "s2".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = c
        .merge_snapshot(pb::MergeSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = c
        .delete_volume(pb::DeleteVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());

    // A restart keeps it retired: the snapshot is exported, the volume not.
    w.stop().await;
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    let (ok, text) = qemu_io(&w.nbd_uri("volumes/v1"), "read 0 4k");
    assert!(!ok, "not exported after a restart: {text}");
    let (ok, text) = qemu_io(&w.nbd_uri("volumes/v1/snapshots/s1"), "read 0 4k");
    assert!(ok, "{text}");
    c.delete_snapshot(pb::DeleteSnapshotRequest {
        name: "volumes/v1/snapshots/s1".into(),
    })
    .await
    .unwrap();
    c.delete_volume(pb::DeleteVolumeRequest {
        name: "volumes/v1".into(),
    })
    .await
    .unwrap();
    w.stop().await;
}

/// A snapshot create writes the worker's state once, after its COW file is
/// made and attached: a crash in between leaves a file no record names.
/// The next start removes it (and only it); the create was never
/// acknowledged, and the same create asked again makes it anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cow_file_left_by_an_unrecorded_create_is_removed_at_start() {
    let dir = scratch();
    let devices = dir.path().join("devices");
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    create_volume(&mut c, "v1", 4 * MIB, 8).await;
    let s1 = create_snapshot(&mut c, "v1", "s1", 2 * MIB).await;
    w.stop().await;
    // What a crash after the COW file was made, before its record, leaves.
    let stray = devices.join("v1.s9.cow");
    std::fs::copy(&s1.device, &stray).unwrap();
    let w = Worker::start(dir.path(), &[]).await;
    let mut c = w.client().await;
    assert!(!stray.exists(), "the unrecorded COW file is removed");
    assert!(
        std::path::Path::new(&s1.device).exists(),
        "a recorded one stays"
    );
    let e = c
        .get_snapshot(pb::GetSnapshotRequest {
            name: "volumes/v1/snapshots/s9".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    let s9 = create_snapshot(&mut c, "v1", "s9", 2 * MIB).await;
    assert_eq!(s9.device, stray.display().to_string());
    w.stop().await;
}
