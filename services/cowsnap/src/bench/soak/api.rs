//! The soak's API clients: each creates and deletes volumes and snapshots
//! of its own, lists and gets them, and records how every call ended.
//! A call cut off by a kill has an unknown outcome, so what it might have
//! created is deleted later (gone or not found both settle it).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cowsnap_proto::cowsnap::v1 as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tonic::Code;
use tonic::transport::Channel;

use super::{Env, Tally};

type Volumes = pb::volume_service_client::VolumeServiceClient<Channel>;
type Snapshots = pb::snapshot_service_client::SnapshotServiceClient<Channel>;

/// Volumes and snapshots an API client keeps at most.
const KEEP: usize = 2;

/// How a call ended, as far as the caller's next step goes.
pub enum Outcome<T> {
    Ok(T),
    /// The worker or the call went away (a kill): the outcome is unknown;
    /// try again.
    Retry,
    /// It exists already (a retry of a call that had worked).
    Exists,
    /// It does not exist (a retry of a delete that had worked).
    Gone,
    /// Refused for a reason a kill does not explain.
    Failed,
}

/// Codes a call may end with while the worker is killed under it, or when
/// it repeats a call whose first try worked.
fn explained(c: Code) -> bool {
    matches!(
        c,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::AlreadyExists
    )
}

/// Records how a call ended.
pub fn call<T>(
    tally: &Tally,
    what: &str,
    r: Result<tonic::Response<T>, tonic::Status>,
) -> Outcome<T> {
    match r {
        Ok(v) => {
            tally.ok.fetch_add(1, Ordering::Relaxed);
            Outcome::Ok(v.into_inner())
        }
        Err(s) => {
            let code = s.code();
            tally.error(what, &format!("{code:?}"), explained(code), s.message());
            match code {
                Code::AlreadyExists => Outcome::Exists,
                Code::NotFound => Outcome::Gone,
                c if explained(c) => Outcome::Retry,
                _ => Outcome::Failed,
            }
        }
    }
}

/// Creates a volume before the kills start (retrying while the control
/// service finds its worker).
pub async fn create_volume_retrying(api: &mut Volumes, id: &str, size: u64) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..600 {
        let r = api
            .create_volume(pb::CreateVolumeRequest {
                volume_id: id.into(),
                volume: Some(pb::Volume {
                    size_bytes: size,
                    chunk_sectors: 8,
                    ..Default::default()
                }),
            })
            .await;
        match r {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
            Err(s) => last = Some(s),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow::anyhow!("create {id}: {:?}", last))
}

/// Runs API client `me` until the end of the soak.
pub async fn client(env: Arc<Env>, me: usize, seed: u64) {
    let ch = match env.channel().await {
        Ok(c) => c,
        Err(e) => {
            env.tally
                .error("api client setup", "no channel", false, &e.to_string());
            return;
        }
    };
    let mut volumes = Volumes::new(ch.clone());
    let mut snapshots = Snapshots::new(ch);
    let mut rng = StdRng::seed_from_u64(seed ^ ((me as u64 + 1) * 0x51_7cc1_b727));
    let t = &env.tally;
    let mut vols: Vec<String> = Vec::new();
    let mut snaps: Vec<String> = Vec::new();
    // Names whose creation or deletion had an unknown outcome.
    let mut unsure: Vec<String> = Vec::new();
    let mut n = 0u64;
    while !env.done() {
        n += 1;
        match rng.random_range(0..12) {
            0..=1 if vols.len() < KEEP => {
                let id = format!("soak-api-{me}-{n}");
                let r = volumes
                    .create_volume(pb::CreateVolumeRequest {
                        volume_id: id.clone(),
                        volume: Some(pb::Volume {
                            size_bytes: rng.random_range(1..=4u64) << 20,
                            chunk_sectors: 8 << rng.random_range(0..3),
                            ..Default::default()
                        }),
                    })
                    .await;
                match call(t, "create volume", r) {
                    Outcome::Ok(v) => vols.push(v.name),
                    _ => unsure.push(format!("volumes/{id}")),
                }
            }
            2..=3 if !vols.is_empty() && snaps.len() < KEEP => {
                let v = vols[rng.random_range(0..vols.len())].clone();
                let r = snapshots
                    .create_snapshot(pb::CreateSnapshotRequest {
                        parent: v.clone(),
                        snapshot_id: format!("s{n}"),
                        snapshot: Some(pb::Snapshot::default()),
                    })
                    .await;
                match call(t, "create snapshot", r) {
                    Outcome::Ok(s) => snaps.push(s.name),
                    _ => unsure.push(format!("{v}/snapshots/s{n}")),
                }
            }
            4 => {
                let mut token = String::new();
                for _ in 0..3 {
                    let r = volumes
                        .list_volumes(pb::ListVolumesRequest {
                            page_size: 20,
                            page_token: token,
                            ..Default::default()
                        })
                        .await;
                    match call(t, "list volumes", r) {
                        Outcome::Ok(page) if !page.next_page_token.is_empty() => {
                            token = page.next_page_token
                        }
                        _ => break,
                    }
                }
            }
            5 if !vols.is_empty() => {
                let name = vols[rng.random_range(0..vols.len())].clone();
                let r = volumes.get_volume(pb::GetVolumeRequest { name }).await;
                call(t, "get volume", r);
            }
            6 if !snaps.is_empty() => {
                let name = snaps[rng.random_range(0..snaps.len())].clone();
                let r = snapshots
                    .get_snapshot(pb::GetSnapshotRequest { name })
                    .await;
                call(t, "get snapshot", r);
            }
            7 if !vols.is_empty() => {
                let parent = vols[rng.random_range(0..vols.len())].clone();
                let r = snapshots
                    .list_snapshots(pb::ListSnapshotsRequest {
                        parent,
                        ..Default::default()
                    })
                    .await;
                call(t, "list snapshots", r);
            }
            8 if !snaps.is_empty() => {
                let name = snaps.swap_remove(rng.random_range(0..snaps.len()));
                let r = snapshots
                    .delete_snapshot(pb::DeleteSnapshotRequest { name: name.clone() })
                    .await;
                if !matches!(
                    call(t, "delete snapshot", r),
                    Outcome::Ok(_) | Outcome::Gone
                ) {
                    unsure.push(name);
                }
            }
            9 if !vols.is_empty() => {
                // A volume with snapshots would only be hidden until its
                // last snapshot goes: delete those first.
                let i = rng.random_range(0..vols.len());
                let under = format!("{}/", vols[i]);
                if snaps.iter().chain(&unsure).any(|s| s.starts_with(&under)) {
                    if let Some(k) = snaps.iter().position(|s| s.starts_with(&under)) {
                        unsure.push(snaps.swap_remove(k));
                    }
                    continue;
                }
                let name = vols.swap_remove(i);
                let r = volumes
                    .delete_volume(pb::DeleteVolumeRequest {
                        name: name.clone(),
                        ..Default::default()
                    })
                    .await;
                if !matches!(call(t, "delete volume", r), Outcome::Ok(_) | Outcome::Gone) {
                    unsure.push(name);
                }
            }
            10..=11 if !unsure.is_empty() => {
                let name = unsure.swap_remove(0);
                let r = if name.contains("/snapshots/") {
                    snapshots
                        .delete_snapshot(pb::DeleteSnapshotRequest { name: name.clone() })
                        .await
                } else {
                    volumes
                        .delete_volume(pb::DeleteVolumeRequest {
                            name: name.clone(),
                            ..Default::default()
                        })
                        .await
                };
                if !matches!(
                    call(t, "delete (unsure)", r),
                    Outcome::Ok(_) | Outcome::Gone
                ) {
                    unsure.push(name);
                }
            }
            _ => {}
        }
        // Many clients on a small machine: leave the services some air.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
