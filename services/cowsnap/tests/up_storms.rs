//! `cowsnap up` under load and under `kill -9`:
//!
//! - storms of creates, deletes, snapshots, merges, restores and clones
//!   from several clients, with the process killed at a random moment of
//!   each storm and started again: afterwards nothing is stuck in CREATING
//!   or DELETING, interrupted long-running operations finish, and the
//!   catalog, the worker and the device files on disk name exactly the same
//!   volumes and snapshots (no leaked device);
//! - 64 concurrent clients creating and deleting volumes and snapshots for
//!   a bounded time: no call fails and nothing is left behind.

mod up_common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cowsnap_proto::cowsnap::v1 as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;
use up_common::*;

/// Kill rounds of the storm test, and clients per storm.
const ROUNDS: u64 = 8;
const STORM_CLIENTS: u64 = 6;

/// Codes a call may end with while the process is killed under it, or
/// because another client of the storm got there first. Anything else
/// (INVALID_ARGUMENT, INTERNAL, ...) fails the test.
fn expected_in_storm(c: Code) -> bool {
    matches!(
        c,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
    )
}

#[derive(Default)]
struct Tally {
    calls: AtomicU64,
    refused: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn record<T>(&self, what: &str, r: Result<tonic::Response<T>, tonic::Status>) -> Option<T> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(v) => Some(v.into_inner()),
            Err(s) => {
                assert!(
                    expected_in_storm(s.code()),
                    "{what}: unexpected {:?}: {}",
                    s.code(),
                    s.message()
                );
                *self
                    .refused
                    .lock()
                    .unwrap()
                    .entry(format!("{:?}", s.code()))
                    .or_default() += 1;
                None
            }
        }
    }
}

/// One storm client: random mutations on its own volumes until `stop`.
async fn storm_client(api_addr: String, seed: u64, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("http://{api_addr}"))
        .unwrap()
        .connect()
        .await
    else {
        return;
    };
    let mut api = Api::new(ch);
    let mut vols: Vec<String> = Vec::new();
    let mut snaps: Vec<String> = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("c{seed}-{n}");
        match rng.random_range(0..10) {
            0..=2 => {
                let size = rng.random_range(1..=4u64) * 4 * MIB;
                let r = api
                    .volumes
                    .create_volume(pb::CreateVolumeRequest {
                        volume_id: id.clone(),
                        volume: Some(pb::Volume {
                            size_bytes: size,
                            chunk_sectors: 8 << rng.random_range(0..3),
                            ..Default::default()
                        }),
                    })
                    .await;
                if tally.record("create volume", r).is_some() {
                    vols.push(format!("volumes/{id}"));
                }
            }
            3..=4 if !vols.is_empty() => {
                let v = vols[rng.random_range(0..vols.len())].clone();
                let r = api
                    .snapshots
                    .create_snapshot(pb::CreateSnapshotRequest {
                        parent: v.clone(),
                        snapshot_id: format!("s{n}"),
                        snapshot: Some(pb::Snapshot::default()),
                    })
                    .await;
                if tally.record("create snapshot", r).is_some() {
                    snaps.push(format!("{v}/snapshots/s{n}"));
                }
            }
            5 if !snaps.is_empty() => {
                let s = snaps.swap_remove(rng.random_range(0..snaps.len()));
                let r = api
                    .snapshots
                    .merge_snapshot(pb::MergeSnapshotRequest { name: s })
                    .await;
                tally.record("merge", r);
            }
            6 if !snaps.is_empty() => {
                let s = snaps.swap_remove(rng.random_range(0..snaps.len()));
                let r = api
                    .snapshots
                    .delete_snapshot(pb::DeleteSnapshotRequest { name: s })
                    .await;
                tally.record("delete snapshot", r);
            }
            7 if !snaps.is_empty() => {
                let s = snaps[rng.random_range(0..snaps.len())].clone();
                let r = api
                    .volumes
                    .restore_volume(pb::RestoreVolumeRequest {
                        volume_id: id.clone(),
                        source_snapshot: s,
                        volume: None,
                    })
                    .await;
                if tally.record("restore", r).is_some() {
                    vols.push(format!("volumes/{id}"));
                }
            }
            8 if !vols.is_empty() => {
                let v = vols[rng.random_range(0..vols.len())].clone();
                let r = api
                    .volumes
                    .clone_volume(pb::CloneVolumeRequest {
                        volume_id: id.clone(),
                        source_volume: v,
                        volume: None,
                    })
                    .await;
                if tally.record("clone", r).is_some() {
                    vols.push(format!("volumes/{id}"));
                }
            }
            _ if !vols.is_empty() => {
                let i = rng.random_range(0..vols.len());
                let r = api
                    .volumes
                    .delete_volume(pb::DeleteVolumeRequest {
                        name: vols[i].clone(),
                        ..Default::default()
                    })
                    .await;
                if tally.record("delete volume", r).is_some() {
                    vols.swap_remove(i);
                }
            }
            _ => {}
        }
    }
}

/// Deletes everything through the API: snapshots first, then volumes.
async fn delete_all(up: &Up) {
    let mut api = up.clients().await;
    let states = api.states().await;
    for (name, _) in states.iter().filter(|(n, _)| n.contains("/snapshots/")) {
        api.snapshots
            .delete_snapshot(pb::DeleteSnapshotRequest { name: name.clone() })
            .await
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }
    for (name, _) in states.iter().filter(|(n, _)| !n.contains("/snapshots/")) {
        // A volume still being restored or cloned from waits for that.
        api.volumes
            .delete_volume(pb::DeleteVolumeRequest {
                name: name.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("delete {name}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_create_delete_merge_storms_leaks_nothing() {
    let tmp = scratch();
    let mut up = Up::start(&tmp.path().join("data"));
    up.ready().await;
    let tally = Arc::new(Tally::default());
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut most = 0;
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..STORM_CLIENTS)
            .map(|c| {
                tokio::spawn(storm_client(
                    up.api(),
                    round * 100 + c,
                    stop.clone(),
                    tally.clone(),
                ))
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..2500))).await;
        up.kill9();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.await.unwrap();
        }
        up.restart().await;
        let names = up.assert_consistent().await;
        most = most.max(names.len());
    }
    eprintln!(
        "storms: {ROUNDS} kill -9 of cowsnap up, {STORM_CLIENTS} clients each, {} calls, refused: {:?}, at most {most} volumes and snapshots at once",
        tally.calls.load(Ordering::Relaxed),
        tally.refused.lock().unwrap()
    );
    assert!(most > 0, "the storms created nothing");
    delete_all(&up).await;
    assert!(up.assert_consistent().await.is_empty());
    assert!(up.device_files().is_empty());
    assert_eq!(up.terminate().code(), Some(0), "{}", up.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_clients_create_and_delete_without_error() {
    const CLIENTS: usize = 64;
    const FOR: Duration = Duration::from_secs(8);
    let tmp = scratch();
    let mut up = Up::start(&tmp.path().join("data"));
    up.ready().await;
    let calls = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + FOR;
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let addr = up.api();
            let calls = calls.clone();
            tokio::spawn(async move {
                let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                let mut api = Api::new(ch);
                let mut rounds = 0u32;
                // Every client finishes at least one full round.
                while rounds == 0 || Instant::now() < until {
                    rounds += 1;
                    let id = format!("k{c}-{rounds}");
                    let name = format!("volumes/{id}");
                    let v = api
                        .volumes
                        .create_volume(pb::CreateVolumeRequest {
                            volume_id: id.clone(),
                            volume: Some(pb::Volume {
                                size_bytes: 4 * MIB,
                                ..Default::default()
                            }),
                        })
                        .await
                        .unwrap_or_else(|e| panic!("client {c}: create {name}: {e}"))
                        .into_inner();
                    assert_eq!(v.state(), pb::State::Ready);
                    let s = api
                        .snapshots
                        .create_snapshot(pb::CreateSnapshotRequest {
                            parent: name.clone(),
                            snapshot_id: "s".into(),
                            snapshot: Some(pb::Snapshot::default()),
                        })
                        .await
                        .unwrap_or_else(|e| panic!("client {c}: snapshot {name}: {e}"))
                        .into_inner();
                    let got = api
                        .snapshots
                        .get_snapshot(pb::GetSnapshotRequest {
                            name: s.name.clone(),
                        })
                        .await
                        .unwrap_or_else(|e| panic!("client {c}: get {}: {e}", s.name))
                        .into_inner();
                    assert_eq!(got.state(), pb::State::Ready);
                    api.snapshots
                        .delete_snapshot(pb::DeleteSnapshotRequest {
                            name: s.name.clone(),
                        })
                        .await
                        .unwrap_or_else(|e| panic!("client {c}: delete {}: {e}", s.name));
                    api.volumes
                        .delete_volume(pb::DeleteVolumeRequest {
                            name: name.clone(),
                            ..Default::default()
                        })
                        .await
                        .unwrap_or_else(|e| panic!("client {c}: delete {name}: {e}"));
                    calls.fetch_add(5, Ordering::Relaxed);
                }
                rounds
            })
        })
        .collect();
    let mut rounds = 0;
    for t in tasks {
        rounds += t.await.unwrap();
    }
    eprintln!(
        "{CLIENTS} clients: {rounds} create/snapshot/get/delete/delete rounds, {} calls, no error",
        calls.load(Ordering::Relaxed)
    );
    assert!(up.assert_consistent().await.is_empty());
    assert!(up.device_files().is_empty());
    assert_eq!(up.terminate().code(), Some(0), "{}", up.log_text());
}
