//! The CSI Identity and Controller services over a real unix socket, on a
//! real control service and real workers: name mapping, idempotent repeats
//! and conflicts, restore and clone with their data read back over NBD,
//! topology, paging, and the status code of each kind of bad input (what
//! csi-sanity does not cover).

mod common;

use std::collections::HashMap;

use common::*;
use cowsnap_control::error::ControlError;
use cowsnap_control::model::{OpKind, State};
use cowsnap_control::operations::{CrashAt, CrashPoint};
use cowsnap_csi::TOPOLOGY_NODE_KEY;
use cowsnap_proto::bad_request::field_violation;
use cowsnap_proto::csi::v1 as csi;
use tonic::Code;

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("the call should fail");
    (s.code(), s.message().to_string())
}

/// The field the failed call's `google.rpc.BadRequest` details name, read
/// from the status as it came over the socket.
fn field_of<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> String {
    let s = r.expect_err("the call should fail");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let (field, description) =
        field_violation(&s).unwrap_or_else(|| panic!("no field violation in the details: {s:?}"));
    assert_eq!(
        description,
        s.message(),
        "the details say what the message says"
    );
    field
}

fn topology(worker: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), worker.to_string())]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_reports_the_plugin_and_its_readiness() {
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let stack = Stack::start(dir.path(), &[&w], None).await;
    let mut id = stack.identity().await;
    let info = id
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.cowsnap.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let caps = id
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use csi::plugin_capability::service::Type;
    let services: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(
        services,
        [
            Type::ControllerService as i32,
            Type::VolumeAccessibilityConstraints as i32
        ]
    );
    use csi::plugin_capability::volume_expansion::Type as Expansion;
    let expansion: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::plugin_capability::Type::VolumeExpansion(e)) => Some(e.r#type),
            _ => None,
        })
        .collect();
    assert_eq!(
        expansion,
        [Expansion::Offline as i32],
        "a node's device learns its size at attach: offline"
    );
    let probe = id.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    let mut c = stack.controller().await;
    let caps = c
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    use csi::controller_service_capability::rpc::Type as Cap;
    let rpcs: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::controller_service_capability::Type::Rpc(r)) => Some(r.r#type),
            _ => None,
        })
        .collect();
    assert!(rpcs.contains(&(Cap::CreateDeleteSnapshot as i32)));
    assert!(rpcs.contains(&(Cap::CloneVolume as i32)));
    assert!(rpcs.contains(&(Cap::ExpandVolume as i32)));
    assert!(
        rpcs.iter().all(|&r| r <= Cap::ModifyVolume as i32),
        "only capabilities csi-sanity (spec v1.10) knows: {rpcs:?}"
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_map_to_visible_ids_and_repeats_are_idempotent() {
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let stack = Stack::start(dir.path(), &[&w], None).await;
    let mut c = stack.controller().await;

    // A Kubernetes name is a valid cowsnap id: used as it is.
    let pvc = "pvc-0b3c9b6e-8a7c-4b7e-9a55-0f2ff3a1c0de";
    let v = c
        .create_volume(create_request(pvc, 4 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, pvc);
    assert_eq!(v.capacity_bytes, (4 * MIB) as i64);
    assert_eq!(v.accessible_topology, [topology("node-a")]);
    // ... and `cowsnap volume list` (the domain) shows it under that id.
    let listed = stack
        .control()
        .get_volume(&format!("volumes/{pvc}"))
        .await
        .unwrap();
    assert_eq!(listed.size_bytes, 4 * MIB);

    // Any other name: a readable prefix and a hash, the same every time.
    let name = "Data Volume/2 of ünïcode";
    let v2 = c
        .create_volume(create_request(name, 4 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(
        v2.volume_id.starts_with("data-volume-2-of-n-code-"),
        "{}",
        v2.volume_id
    );
    let again = c
        .create_volume(create_request(name, 4 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, v2, "the same name and arguments: the same volume");
    stack
        .control()
        .get_volume(&format!("volumes/{}", v2.volume_id))
        .await
        .unwrap();

    // A size that rounds to the same one is the same volume; a different
    // one is a conflict.
    let mut near = create_request(pvc, 4 * MIB);
    near.capacity_range = Some(csi::CapacityRange {
        required_bytes: (4 * MIB - 100) as i64,
        limit_bytes: 0,
    });
    assert_eq!(
        c.create_volume(near)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id,
        pvc
    );
    let (code_, msg) = code(c.create_volume(create_request(pvc, 8 * MIB)).await);
    assert_eq!(code_, Code::AlreadyExists, "{msg}");

    // The longest name the spec allows works; a longer one is refused.
    let long = "x".repeat(128);
    let v3 = c
        .create_volume(create_request(&long, 4 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(v3.volume_id.len() <= 63);
    let (code_, _) = code(
        c.create_volume(create_request(&"x".repeat(129), 4 * MIB))
            .await,
    );
    assert_eq!(code_, Code::InvalidArgument);

    // Snapshots: `VOLUME/SNAPSHOT` ids, idempotent by name, a name is taken
    // plugin-wide.
    let snap_req = |name: &str, vol: &str| csi::CreateSnapshotRequest {
        name: name.into(),
        source_volume_id: vol.into(),
        ..Default::default()
    };
    let s = c
        .create_snapshot(snap_req("snap-1", pvc))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(s.snapshot_id, format!("{pvc}/snap-1"));
    assert!(s.ready_to_use);
    assert_eq!(s.size_bytes, (4 * MIB) as i64);
    assert!(s.creation_time.is_some());
    let s_again = c
        .create_snapshot(snap_req("snap-1", pvc))
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(s_again, s);
    let (code_, msg) = code(c.create_snapshot(snap_req("snap-1", &v2.volume_id)).await);
    assert_eq!(code_, Code::AlreadyExists, "{msg}");

    // A volume with snapshots goes at once for CSI (repeats succeed too)
    // and keeps its data until its last snapshot goes.
    for _ in 0..2 {
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: pvc.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let listed = c
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        !listed
            .entries
            .iter()
            .any(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == pvc)),
        "{listed:?}"
    );
    let kept = stack
        .control()
        .get_volume(&format!("volumes/{pvc}"))
        .await
        .unwrap();
    assert_eq!(kept.state, State::DeletedWithSnapshots);
    let snaps = c
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snaps.entries.len(), 1, "{snaps:?}");
    for _ in 0..2 {
        c.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    for id in [pvc, "no-such-volume", "Not An Id!"] {
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Its last snapshot gone, the volume is reclaimed.
    let mut reclaimed = false;
    for _ in 0..200 {
        match stack.control().get_volume(&format!("volumes/{pvc}")).await {
            Err(ControlError::NotFound(_)) => {
                reclaimed = true;
                break;
            }
            Ok(v) => assert_eq!(v.state, State::Deleting, "{v:?}"),
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(reclaimed, "volumes/{pvc} outlived its last snapshot");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_codes() {
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let stack = Stack::start(dir.path(), &[&w], None).await;
    let mut c = stack.controller().await;

    let mut r = create_request("p1", 4 * MIB);
    r.parameters.insert("chunkSize".into(), "64".into());
    let (k, m) = code(c.create_volume(r).await);
    assert_eq!(k, Code::InvalidArgument);
    assert!(m.contains("\"chunkSize\""), "the unknown key is named: {m}");

    let mut r = create_request("p1", 4 * MIB);
    r.parameters.insert("chunkSectors".into(), "48".into());
    assert_eq!(code(c.create_volume(r).await).0, Code::InvalidArgument);

    let mut r = create_request("p1", 4 * MIB);
    r.volume_capabilities[0].access_mode = Some(csi::volume_capability::AccessMode {
        mode: csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32,
    });
    let (k, m) = code(c.create_volume(r).await);
    assert_eq!(k, Code::InvalidArgument);
    assert!(m.contains("MULTI_NODE_MULTI_WRITER"), "{m}");

    let mut r = create_request("p1", 4 * MIB);
    r.volume_capabilities = vec![capability(Some("btrfs"))];
    assert_eq!(code(c.create_volume(r).await).0, Code::InvalidArgument);
    let mut r = create_request("p1", 4 * MIB);
    r.volume_capabilities.clear();
    assert_eq!(code(c.create_volume(r).await).0, Code::InvalidArgument);
    assert_eq!(
        code(c.create_volume(create_request("", 4 * MIB)).await).0,
        Code::InvalidArgument
    );

    // Each INVALID_ARGUMENT names its request field in its details.
    let mut r = create_request("p1", 4 * MIB);
    r.parameters.insert("chunkSize".into(), "64".into());
    assert_eq!(field_of(c.create_volume(r).await), "parameters.chunkSize");
    let mut r = create_request("p1", 4 * MIB);
    r.parameters.insert("chunkSectors".into(), "48".into());
    assert_eq!(
        field_of(c.create_volume(r).await),
        "parameters.chunkSectors"
    );
    let mut r = create_request("p1", 4 * MIB);
    r.volume_capabilities.clear();
    assert_eq!(field_of(c.create_volume(r).await), "volume_capabilities");
    let r = create_request("", 4 * MIB);
    assert_eq!(field_of(c.create_volume(r).await), "name");
    let r = csi::ListVolumesRequest {
        max_entries: -1,
        ..Default::default()
    };
    assert_eq!(field_of(c.list_volumes(r).await), "max_entries");
    let r = csi::DeleteVolumeRequest::default();
    assert_eq!(field_of(c.delete_volume(r).await), "volume_id");

    // A limit below the engine's alignment cannot be met.
    let mut r = create_request("p1", 4 * MIB);
    r.capacity_range = Some(csi::CapacityRange {
        required_bytes: 5000,
        limit_bytes: 6000,
    });
    assert_eq!(code(c.create_volume(r).await).0, Code::OutOfRange);

    // Topology: a segment without our key, a worker that does not exist.
    let mut r = create_request("p1", 4 * MIB);
    r.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: HashMap::from([("zone".into(), "z1".into())]),
        }],
        preferred: vec![],
    });
    assert_eq!(code(c.create_volume(r).await).0, Code::InvalidArgument);
    let mut r = create_request("p1", 4 * MIB);
    r.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![topology("node-z")],
        preferred: vec![],
    });
    assert_eq!(code(c.create_volume(r).await).0, Code::ResourceExhausted);

    // Sources that do not exist.
    for src in [
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: "nope/nope".into(),
        }),
        csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
            snapshot_id: "not-even-an-id".into(),
        }),
        csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
            volume_id: "nope".into(),
        }),
    ] {
        let mut r = create_request("p2", 4 * MIB);
        r.volume_content_source = Some(csi::VolumeContentSource { r#type: Some(src) });
        assert_eq!(code(c.create_volume(r).await).0, Code::NotFound);
    }
    let (k, _) = code(
        c.create_snapshot(csi::CreateSnapshotRequest {
            name: "s".into(),
            source_volume_id: "nope".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(k, Code::NotFound);
    let mut sr = csi::CreateSnapshotRequest {
        name: "s".into(),
        source_volume_id: "v".into(),
        ..Default::default()
    };
    sr.parameters.insert("cowSize".into(), "1".into());
    let (k, m) = code(c.create_snapshot(sr).await);
    assert_eq!(k, Code::InvalidArgument);
    assert!(m.contains("\"cowSize\""), "{m}");

    // Tokens that are not ours: ABORTED.
    let (k, _) = code(
        c.list_volumes(csi::ListVolumesRequest {
            max_entries: 1,
            starting_token: "not-a-token".into(),
        })
        .await,
    );
    assert_eq!(k, Code::Aborted);
    let (k, _) = code(
        c.list_snapshots(csi::ListSnapshotsRequest {
            starting_token: "zz".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(k, Code::Aborted);

    // Unknown volumes.
    let (k, _) = code(
        c.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "nope".into(),
            volume_capabilities: vec![capability(None)],
            ..Default::default()
        })
        .await,
    );
    assert_eq!(k, Code::NotFound);
    let (k, _) = code(
        c.controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "nope".into(),
        })
        .await,
    );
    assert_eq!(k, Code::NotFound);
    let (k, _) = code(
        c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "nope".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 8 * MIB as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(k, Code::NotFound);
    let (k, m) = code(
        c.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "nope".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(k, Code::InvalidArgument, "{m}");

    // Nothing above made a volume.
    let vols = c
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(vols.entries.is_empty(), "{vols:?}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_and_clone_carry_the_data() {
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let stack = Stack::start(dir.path(), &[&w], None).await;
    let mut c = stack.controller().await;
    let src = c
        .create_volume(create_request("src", 4 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    qemu_io(&w.nbd_uri("volumes/src"), "write -P 0xab 0 1M");
    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest {
            name: "before".into(),
            source_volume_id: src.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    qemu_io(&w.nbd_uri("volumes/src"), "write -P 0xcd 0 1M");

    let from = |t| Some(csi::VolumeContentSource { r#type: Some(t) });
    let mut r = create_request("restored", 4 * MIB);
    r.volume_content_source = from(csi::volume_content_source::Type::Snapshot(
        csi::volume_content_source::SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        },
    ));
    let restored = c
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.volume_id, "restored");
    assert_eq!(restored.content_source, r.volume_content_source);
    // A repeat answers the same volume.
    assert_eq!(
        c.create_volume(r)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap(),
        restored
    );
    qemu_io(&w.nbd_uri("volumes/restored"), "read -P 0xab 0 1M");
    qemu_io(&w.nbd_uri("volumes/restored"), "read -P 0 1M 3M");

    let mut r = create_request("cloned", 4 * MIB);
    r.volume_content_source = from(csi::volume_content_source::Type::Volume(
        csi::volume_content_source::VolumeSource {
            volume_id: src.volume_id.clone(),
        },
    ));
    let cloned = c
        .create_volume(r)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    qemu_io(&w.nbd_uri("volumes/cloned"), "read -P 0xcd 0 1M");
    assert_eq!(cloned.capacity_bytes, src.capacity_bytes);

    // A copy asking for more than its source is made, then grown; one
    // whose limit is below its source's size cannot be made.
    let mut r = create_request("bigger", 8 * MIB);
    r.volume_content_source = from(csi::volume_content_source::Type::Volume(
        csi::volume_content_source::VolumeSource {
            volume_id: src.volume_id.clone(),
        },
    ));
    let bigger = c
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(bigger.capacity_bytes, (8 * MIB) as i64);
    qemu_io(&w.nbd_uri("volumes/bigger"), "read -P 0xcd 0 1M");
    qemu_io(
        &w.nbd_uri("volumes/bigger"),
        &format!(
            "read -P 0 {} {}",
            src.capacity_bytes,
            8 * MIB - src.capacity_bytes as u64
        ),
    );
    r.name = "smaller".into();
    r.capacity_range = Some(csi::CapacityRange {
        required_bytes: 0,
        limit_bytes: 4096,
    });
    assert_eq!(code(c.create_volume(r).await).0, Code::OutOfRange);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_places_volumes_and_lists_page() {
    let dir = scratch();
    let a = Worker::start(dir.path(), "node-a").await;
    let b = Worker::start(dir.path(), "node-b").await;
    let stack = Stack::start(dir.path(), &[&a, &b], None).await;
    let mut c = stack.controller().await;

    let placed = async |c: &mut csi::controller_client::ControllerClient<_>,
                        name: &str,
                        req: Vec<&str>,
                        pref: Vec<&str>| {
        let mut r = create_request(name, 4 * MIB);
        r.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: req.into_iter().map(topology).collect(),
            preferred: pref.into_iter().map(topology).collect(),
        });
        c.create_volume(r)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .accessible_topology
    };
    assert_eq!(
        placed(&mut c, "v1", vec!["node-b"], vec![]).await,
        [topology("node-b")]
    );
    assert_eq!(
        placed(&mut c, "v2", vec!["node-a", "node-b"], vec!["node-a"]).await,
        [topology("node-a")]
    );
    assert_eq!(
        placed(
            &mut c,
            "v3",
            vec!["node-a", "node-b"],
            vec!["node-b", "node-a"]
        )
        .await,
        [topology("node-b")]
    );
    // The same name with a topology that excludes where it is: a conflict.
    let mut r = create_request("v1", 4 * MIB);
    r.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![topology("node-a")],
        preferred: vec![],
    });
    assert_eq!(code(c.create_volume(r).await).0, Code::AlreadyExists);

    // Capacity per segment: each worker's own free room, and the sum.
    let cap = async |c: &mut csi::controller_client::ControllerClient<_>,
                     t: Option<csi::Topology>| {
        c.get_capacity(csi::GetCapacityRequest {
            accessible_topology: t,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .available_capacity
    };
    let (ca, cb, all) = (
        cap(&mut c, Some(topology("node-a"))).await,
        cap(&mut c, Some(topology("node-b"))).await,
        cap(&mut c, None).await,
    );
    assert!(ca > 0 && cb > 0, "{ca} {cb}");
    assert_eq!(all, ca + cb);
    assert_eq!(cap(&mut c, Some(topology("node-z"))).await, 0);

    // Paging: two, then the rest, then nothing more.
    let page = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries.len(), 2);
    assert!(!page.next_token.is_empty());
    let rest = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: page.next_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.entries.len(), 1);
    assert!(rest.next_token.is_empty());
    let mut ids: Vec<String> = page
        .entries
        .iter()
        .chain(&rest.entries)
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    ids.sort();
    assert_eq!(ids, ["v1", "v2", "v3"]);

    // Snapshots filtered by id and by source volume.
    for (name, vol) in [("s1", "v1"), ("s2", "v1"), ("s3", "v2")] {
        c.create_snapshot(csi::CreateSnapshotRequest {
            name: name.into(),
            source_volume_id: vol.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let list = async |c: &mut csi::controller_client::ControllerClient<_>,
                      r: csi::ListSnapshotsRequest| {
        let mut ids: Vec<String> = c
            .list_snapshots(r)
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|e| e.snapshot.unwrap().snapshot_id)
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(
        list(&mut c, csi::ListSnapshotsRequest::default()).await,
        ["v1/s1", "v1/s2", "v2/s3"]
    );
    let by_vol = csi::ListSnapshotsRequest {
        source_volume_id: "v1".into(),
        ..Default::default()
    };
    assert_eq!(list(&mut c, by_vol).await, ["v1/s1", "v1/s2"]);
    let by_id = csi::ListSnapshotsRequest {
        snapshot_id: "v2/s3".into(),
        ..Default::default()
    };
    assert_eq!(list(&mut c, by_id).await, ["v2/s3"]);
    let missing = csi::ListSnapshotsRequest {
        snapshot_id: "v2/nope".into(),
        ..Default::default()
    };
    assert!(list(&mut c, missing).await.is_empty());
    let got = c
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: "v2/s3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(
        (got.source_volume_id.as_str(), got.ready_to_use),
        ("v2", true)
    );
    for id in ["v2/nope", "no-slash"] {
        let (k, _) = code(
            c.get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(k, Code::NotFound, "{id}");
    }
    let paged = c
        .list_snapshots(csi::ListSnapshotsRequest {
            max_entries: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(paged.entries.len(), 2);
    let rest = c
        .list_snapshots(csi::ListSnapshotsRequest {
            max_entries: 2,
            starting_token: paged.next_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.entries.len(), 1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_interrupted_by_a_crash_is_finished_by_the_repeat() {
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let crash = CrashAt {
        kind: OpKind::CreateVolume,
        point: CrashPoint::AfterWorker,
    };
    let mut stack = Stack::start(dir.path(), &[&w], Some(crash)).await;
    let mut c = stack.controller().await;
    // The worker made the volume; the control service "died" before
    // recording it.
    let (k, m) = code(c.create_volume(create_request("pvc-crash", 4 * MIB)).await);
    assert_eq!(k, Code::Unavailable, "{m}");
    stack.restart(None).await;
    let mut c = stack.controller().await;
    let v = c
        .create_volume(create_request("pvc-crash", 4 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.volume_id, "pvc-crash");
    let listed = c
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1, "one volume, not two: {listed:?}");
    stack.stop().await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_endpoint_is_not_taken_over_and_a_stale_one_is_replaced() {
    let dir = scratch();
    let w = Worker::start(dir.path(), "node-a").await;
    let mut stack = Stack::start(dir.path(), &[&w], None).await;
    let endpoint = format!("unix://{}", stack.socket.display());
    let e = cowsnap_csi::endpoint::bind(&endpoint)
        .err()
        .expect("live socket refused");
    assert!(format!("{e:#}").contains("serving on it already"), "{e:#}");
    // Still served.
    let mut id = stack.identity().await;
    id.probe(csi::ProbeRequest {}).await.unwrap();
    stack.stop().await;

    // A socket nobody serves (a crashed run) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let bound = cowsnap_csi::endpoint::bind(&format!("unix://{}", stale.display())).unwrap();
    assert_eq!(bound.path(), stale);
    // A file that is not a socket is not removed.
    let file = dir.path().join("file.sock");
    std::fs::write(&file, "data").unwrap();
    assert!(cowsnap_csi::endpoint::bind(&format!("unix://{}", file.display())).is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"data");
    w.stop().await;
}
