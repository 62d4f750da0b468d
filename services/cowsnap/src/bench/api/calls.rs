//! The API calls `bench api` times, and the driver that runs one kind of
//! call from `clients` concurrent clients for a set time and counts the
//! calls per second. Every call is a real gRPC call over TCP to the
//! `cowsnap up` under test; a failed call is counted as an error, not as
//! a call. [`rates`] measures every kind at every concurrency level.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cowsnap_proto::cowsnap::v1 as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::{ApiArgs, CLIENTS};

pub type Volumes = pb::volume_service_client::VolumeServiceClient<Channel>;
pub type Snapshots = pb::snapshot_service_client::SnapshotServiceClient<Channel>;

/// Chunk size of every volume the bench makes (4 KiB, the smallest).
pub const CHUNK_SECTORS: u32 = 8;

/// One kind of call, with what it works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    CreateVolume,
    GetVolume,
    ListVolumes,
    DeleteVolume,
    CreateSnapshot,
    GetSnapshot,
    ListSnapshots,
    ListAllSnapshots,
    DeleteSnapshot,
}

impl Kind {
    /// In the order they run: each delete follows the create whose
    /// resources it removes.
    pub const ALL: [Kind; 9] = [
        Kind::GetVolume,
        Kind::ListVolumes,
        Kind::GetSnapshot,
        Kind::ListSnapshots,
        Kind::ListAllSnapshots,
        Kind::CreateVolume,
        Kind::DeleteVolume,
        Kind::CreateSnapshot,
        Kind::DeleteSnapshot,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Kind::CreateVolume => "create_volume",
            Kind::GetVolume => "get_volume",
            Kind::ListVolumes => "list_volumes",
            Kind::DeleteVolume => "delete_volume",
            Kind::CreateSnapshot => "create_snapshot",
            Kind::GetSnapshot => "get_snapshot",
            Kind::ListSnapshots => "list_snapshots",
            Kind::ListAllSnapshots => "list_all_snapshots",
            Kind::DeleteSnapshot => "delete_snapshot",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::CreateVolume => "CreateVolume",
            Kind::GetVolume => "GetVolume",
            Kind::ListVolumes => "ListVolumes (first page of 50)",
            Kind::DeleteVolume => "DeleteVolume",
            Kind::CreateSnapshot => "CreateSnapshot",
            Kind::GetSnapshot => "GetSnapshot",
            Kind::ListSnapshots => "ListSnapshots (one volume)",
            Kind::ListAllSnapshots => "ListSnapshots (volumes/-, first page of 50)",
            Kind::DeleteSnapshot => "DeleteSnapshot",
        }
    }

    /// Reads must not slow down as the catalog grows.
    pub fn is_read(self) -> bool {
        matches!(
            self,
            Kind::GetVolume
                | Kind::ListVolumes
                | Kind::GetSnapshot
                | Kind::ListSnapshots
                | Kind::ListAllSnapshots
        )
    }
}

/// What the timed calls work on, shared by the clients.
pub struct Pool {
    /// Volumes of the grown catalog (each with its snapshots).
    pub volumes: Vec<String>,
    /// Snapshots of the grown catalog.
    pub snapshots: Vec<String>,
    /// One scratch volume per client, to take and drop snapshots of
    /// (calls on one volume are serialized by design).
    pub scratch: Vec<String>,
    pub volume_bytes: u64,
    /// Volumes and snapshots the create calls made, for the delete calls
    /// to remove.
    pub made_volumes: Mutex<Vec<String>>,
    pub made_snapshots: Mutex<Vec<String>>,
    /// Tells the names of one round's creates apart from another's.
    pub round: AtomicU64,
}

/// Calls per second and errors of one timed run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rate {
    pub calls: u64,
    pub errors: u64,
    pub secs: f64,
}

impl Rate {
    pub fn per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.calls as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// Runs `kind` from `clients` clients (each on a channel of its own, as
/// separate callers are) for `secs` seconds, or until a delete finds
/// nothing left to delete.
pub async fn rate(
    channels: &[Channel],
    pool: &Arc<Pool>,
    kind: Kind,
    clients: usize,
    secs: f64,
    first_error: &Arc<Mutex<Option<String>>>,
) -> Rate {
    let round = pool.round.fetch_add(1, Ordering::Relaxed);
    let start = Instant::now();
    let stop = start + Duration::from_secs_f64(secs);
    let calls = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let ch = channels[c % channels.len()].clone();
        let (pool, calls, errors, first_error) = (
            pool.clone(),
            calls.clone(),
            errors.clone(),
            first_error.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut caller = Caller {
                pool,
                client: c,
                round,
                rng: StdRng::seed_from_u64(round * 1_000_003 + c as u64),
                vols: Volumes::new(ch.clone()),
                snaps: Snapshots::new(ch),
            };
            let mut n = 0u64;
            let mut last = Instant::now();
            while Instant::now() < stop {
                n += 1;
                let r = match caller.one(kind, n).await {
                    Some(r) => r,
                    None => break,
                };
                last = Instant::now();
                match r {
                    Ok(()) => calls.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error
                            .lock()
                            .expect("first error")
                            .get_or_insert_with(|| format!("{}: {e}", kind.label()));
                        errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            last
        }));
    }
    let mut end = start;
    for t in tasks {
        if let Ok(last) = t.await {
            end = end.max(last);
        }
    }
    Rate {
        calls: calls.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        secs: (end - start).as_secs_f64(),
    }
}

/// One client of a round: its clients of the API and its random picks.
struct Caller {
    pool: Arc<Pool>,
    client: usize,
    round: u64,
    rng: StdRng,
    vols: Volumes,
    snaps: Snapshots,
}

impl Caller {
    /// Its `n`th call, of `kind`; `None` when a delete has nothing left to
    /// delete.
    async fn one(&mut self, kind: Kind, n: u64) -> Option<Result<(), tonic::Status>> {
        let (pool, client, round) = (&self.pool, self.client, self.round);
        let (rng, vols, snaps) = (&mut self.rng, &mut self.vols, &mut self.snaps);
        let pick =
            |rng: &mut StdRng, from: &[String]| from[rng.random_range(0..from.len())].clone();
        let take = |from: &Mutex<Vec<String>>| from.lock().expect("made").pop();
        let made = |to: &Mutex<Vec<String>>, name: String| to.lock().expect("made").push(name);
        Some(match kind {
            Kind::GetVolume => vols
                .get_volume(pb::GetVolumeRequest {
                    name: pick(rng, &pool.volumes),
                })
                .await
                .map(drop),
            Kind::ListVolumes => vols
                .list_volumes(pb::ListVolumesRequest {
                    page_size: 50,
                    ..Default::default()
                })
                .await
                .map(drop),
            Kind::GetSnapshot => snaps
                .get_snapshot(pb::GetSnapshotRequest {
                    name: pick(rng, &pool.snapshots),
                })
                .await
                .map(drop),
            Kind::ListSnapshots => snaps
                .list_snapshots(pb::ListSnapshotsRequest {
                    parent: pick(rng, &pool.volumes),
                    ..Default::default()
                })
                .await
                .map(drop),
            Kind::ListAllSnapshots => snaps
                .list_snapshots(pb::ListSnapshotsRequest {
                    parent: "volumes/-".into(),
                    page_size: 50,
                    ..Default::default()
                })
                .await
                .map(drop),
            Kind::CreateVolume => vols
                .create_volume(create_volume_request(
                    &format!("t{round}-{client}-{n}"),
                    pool.volume_bytes,
                ))
                .await
                .map(|v| made(&pool.made_volumes, v.into_inner().name)),
            Kind::DeleteVolume => vols
                .delete_volume(pb::DeleteVolumeRequest {
                    name: take(&pool.made_volumes)?,
                    ..Default::default()
                })
                .await
                .map(drop),
            Kind::CreateSnapshot => snaps
                .create_snapshot(create_snapshot_request(
                    &pool.scratch[client % pool.scratch.len()],
                    &format!("t{round}-{n}"),
                ))
                .await
                .map(|s| made(&pool.made_snapshots, s.into_inner().name)),
            Kind::DeleteSnapshot => snaps
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    name: take(&pool.made_snapshots)?,
                })
                .await
                .map(drop),
        })
    }
}

pub fn create_volume_request(id: &str, bytes: u64) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        volume_id: id.into(),
        volume: Some(pb::Volume {
            size_bytes: bytes,
            chunk_sectors: CHUNK_SECTORS,
            ..Default::default()
        }),
    }
}

pub fn create_snapshot_request(parent: &str, id: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        parent: parent.into(),
        snapshot_id: id.into(),
        snapshot: Some(pb::Snapshot::default()),
    }
}

/// Every kind's rate at every concurrency level: `[kind][clients]`.
pub(super) async fn rates(
    args: &ApiArgs,
    channels: &[Channel],
    pool: &Arc<Pool>,
    first_error: &Arc<Mutex<Option<String>>>,
    say: &impl Fn(&str),
) -> Vec<Vec<Rate>> {
    let mut out = vec![vec![Rate::default(); CLIENTS.len()]; Kind::ALL.len()];
    for (j, &clients) in CLIENTS.iter().enumerate() {
        for (i, &kind) in Kind::ALL.iter().enumerate() {
            let r = rate(
                channels,
                pool,
                kind,
                clients,
                args.measure_secs,
                first_error,
            )
            .await;
            say(&format!(
                "{} x{clients}: {:.0} calls/s ({} errors)",
                kind.label(),
                r.per_sec(),
                r.errors
            ));
            out[i][j] = r;
        }
    }
    out
}
