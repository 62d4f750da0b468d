//! Running `cowsnap up` for the bench, with extra `cowsnap worker`
//! processes that register themselves with it (a worker holds one open
//! descriptor per device file, and one process cannot hold 110,000 under
//! this host's limit: a real cluster has one worker per node): the
//! descriptor limit they inherit, each on free ports over a fresh data
//! dir, channels to the API, waiting until every worker is registered,
//! stopping them all, and what their data dirs use on disk at the end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use cowsnap_proto::cowsnap::v1 as pb;
use tonic::transport::{Channel, Endpoint};

use super::super::soak::procs::{Proc, free_port};
use super::calls::{self, Volumes};

/// `cowsnap up` and the workers registered with it, each on a data dir
/// under the bench's scratch dir.
pub(super) struct Up {
    pub(super) proc: Proc,
    /// The extra `cowsnap worker` processes (the up's own worker is the
    /// first of the cluster's).
    pub(super) workers: Vec<Proc>,
    pub(super) api: u16,
    /// The up's data dir (its catalog, its worker's state and devices),
    /// then each extra worker's.
    pub(super) data: Vec<PathBuf>,
}

/// Starts `cowsnap up` on `dir/data` (its log in `dir/up.log`) and
/// `workers - 1` more workers on `dir/worker-N` (logs `dir/worker-N.log`)
/// registering with it, and waits until all of them listen.
pub(super) async fn start(dir: &Path, workers: usize) -> anyhow::Result<Up> {
    let (api, nbd) = (free_port()?, free_port()?);
    let data = dir.join("data");
    let mut proc = Proc::new(
        "up",
        vec![
            "up".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{api}"),
            "--nbd-listen".into(),
            format!("127.0.0.1:{nbd}"),
        ],
        &dir.join("up.log"),
        vec![api, nbd],
    );
    proc.spawn()?;
    proc.ready(Duration::from_secs(60)).await?;
    let mut up = Up {
        proc,
        workers: Vec::new(),
        api,
        data: vec![data],
    };
    for i in 1..workers {
        let (grpc, nbd) = (free_port()?, free_port()?);
        let data = dir.join(format!("worker-{i}"));
        let mut w = Proc::new(
            "worker",
            vec![
                "worker".into(),
                "--data-dir".into(),
                data.display().to_string(),
                "--grpc-listen".into(),
                format!("127.0.0.1:{grpc}"),
                "--nbd-listen".into(),
                format!("127.0.0.1:{nbd}"),
                "--node".into(),
                format!("bench-worker-{i}"),
                "--register-with".into(),
                format!("127.0.0.1:{api}"),
            ],
            &dir.join(format!("worker-{i}.log")),
            vec![grpc, nbd],
        );
        w.spawn()?;
        up.workers.push(w);
        up.data.push(data);
    }
    for w in &mut up.workers {
        w.ready(Duration::from_secs(60)).await?;
    }
    Ok(up)
}

impl Up {
    /// SIGTERM to every process at once, each waited for (`kill -9` after
    /// `grace`).
    pub(super) async fn stop(&mut self, grace: Duration) {
        let all = std::iter::once(&mut self.proc).chain(self.workers.iter_mut());
        futures::future::join_all(all.map(|p| p.stop(grace))).await;
    }

    /// Bytes of every worker's `state.json` (absent ones count 0).
    pub(super) fn worker_state_bytes(&self) -> u64 {
        let up_worker = self.data[0].join("worker");
        std::iter::once(up_worker.as_path())
            .chain(self.data[1..].iter().map(PathBuf::as_path))
            .filter_map(|d| std::fs::metadata(d.join("state.json")).ok())
            .map(|m| m.len())
            .sum()
    }
}

pub(super) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A worker holds every device file of its volumes and snapshots open:
/// raises the descriptor limit the processes inherit to `per_worker` plus
/// room for sockets and the catalog (as a service unit's `LimitNOFILE`
/// would), or fails when the hard limit is too low for that, naming how
/// many workers would fit.
pub(super) fn raise_fd_limit(devices: u64, workers: usize) -> anyhow::Result<String> {
    const SLACK: u64 = 1024;
    let per_worker = devices.div_ceil(workers as u64);
    let want = per_worker + SLACK;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit on a struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!(
            "cannot read the descriptor limit: {}",
            std::io::Error::last_os_error()
        );
    }
    let held = format!("{per_worker} device files per worker");
    if lim.rlim_cur >= want {
        return Ok(format!("{held}, descriptor limit {}", lim.rlim_cur));
    }
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: setrlimit from a struct we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
        return Ok(format!(
            "{held}, descriptor limit raised from {} to {want}",
            lim.rlim_cur
        ));
    }
    let err = std::io::Error::last_os_error();
    let fit = devices.div_ceil(lim.rlim_max.saturating_sub(SLACK).max(1));
    bail!(
        "--workers {workers}: each worker would hold about {per_worker} device files open, and \
         the descriptor limit is {} (hard {}; raising it to {want} failed: {err}): pass \
         --workers {fit} or more, or fewer --volumes or --snapshots-per-volume",
        lim.rlim_cur,
        lim.rlim_max
    )
}

pub(super) fn channel(port: u16) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .connect_lazy())
}

/// Waits until `workers` workers are registered and healthy, then until a
/// volume can be created (and deletes it).
pub(super) async fn wait_for_workers(
    ch: &Channel,
    workers: usize,
    bytes: u64,
) -> anyhow::Result<()> {
    let mut admin = pb::worker_service_client::WorkerServiceClient::new(ch.clone());
    let mut seen = String::new();
    for _ in 0..600 {
        if let Ok(r) = admin.list_workers(pb::ListWorkersRequest {}).await {
            let ws = r.into_inner().workers;
            let healthy = ws
                .iter()
                .filter(|w| w.health() == pb::WorkerHealth::Healthy)
                .count();
            if healthy >= workers {
                return wait_for_placement(&mut Volumes::new(ch.clone()), bytes).await;
            }
            seen = format!("{healthy} of {workers} healthy ({} registered)", ws.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the workers did not all register with the control service in 60 s: {seen}")
}

/// Waits until a volume can be created, and deletes it.
async fn wait_for_placement(vols: &mut Volumes, bytes: u64) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..300 {
        match vols
            .create_volume(calls::create_volume_request("probe", bytes))
            .await
        {
            Ok(_) => {
                vols.delete_volume(pb::DeleteVolumeRequest {
                    name: "volumes/probe".into(),
                    ..Default::default()
                })
                .await
                .context("deleting the probe volume")?;
                return Ok(());
            }
            Err(s) => last = Some(s),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the control service could not place a volume: {last:?}")
}

/// Volumes on each worker, as the control service lists them.
pub(super) async fn volumes_per_worker(ch: &Channel) -> anyhow::Result<Vec<(String, u32)>> {
    let mut admin = pb::worker_service_client::WorkerServiceClient::new(ch.clone());
    let ws = admin
        .list_workers(pb::ListWorkersRequest {})
        .await
        .context("listing the workers")?
        .into_inner()
        .workers;
    Ok(ws.into_iter().map(|w| (w.name, w.volume_count)).collect())
}

/// Bytes allocated (`st_blocks`) and apparent (`st_size`) under `dirs`.
pub(super) fn disk_use(dirs: &[PathBuf]) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut used, mut apparent) = (0, 0);
    let mut stack = dirs.to_vec();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                used += m.blocks() * 512;
                apparent += m.size();
            }
        }
    }
    (used, apparent)
}
