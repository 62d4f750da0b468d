//! Running `cowsnap up` for the bench: the descriptor limit it inherits,
//! its process on free ports over a fresh data dir, channels to its API,
//! waiting until its worker is registered, and what its data dir uses on
//! disk at the end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tonic::transport::{Channel, Endpoint};

use super::super::soak::procs::{Proc, free_port};
use super::calls::{self, Volumes};

/// `cowsnap up` running on a data dir under the bench's scratch dir.
pub(super) struct Up {
    pub(super) proc: Proc,
    pub(super) api: u16,
    pub(super) nbd: u16,
    pub(super) data: PathBuf,
}

/// Starts `cowsnap up` on `dir/data` (its log in `dir/up.log`) and waits
/// until it listens.
pub(super) async fn start(dir: &Path) -> anyhow::Result<Up> {
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
    Ok(Up {
        proc,
        api,
        nbd,
        data,
    })
}

pub(super) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Every device file of 10,000 volumes and 100,000 snapshots is held open
/// by the worker: raise the descriptor limit `cowsnap up` inherits to what
/// that needs (as a service unit's `LimitNOFILE` would), if allowed.
pub(super) fn raise_fd_limit(devices: u64) -> String {
    let want = devices + 4096;
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on structs we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= want {
            return format!("descriptor limit {}", lim.rlim_cur);
        }
        let new = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &new) == 0 {
            format!("descriptor limit raised from {} to {want}", lim.rlim_cur)
        } else {
            format!(
                "descriptor limit {} (could not raise it to {want}: {})",
                lim.rlim_cur,
                std::io::Error::last_os_error()
            )
        }
    }
}

pub(super) fn channel(port: u16) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .connect_lazy())
}

pub(super) async fn wait_for_worker(vols: &mut Volumes, bytes: u64) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..300 {
        match vols
            .create_volume(calls::create_volume_request("probe", bytes))
            .await
        {
            Ok(_) => {
                vols.delete_volume(cowsnap_proto::cowsnap::v1::DeleteVolumeRequest {
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
    bail!("the control service found no worker: {last:?}")
}

/// Bytes allocated (`st_blocks`) and apparent (`st_size`) under `dir`.
pub(super) fn disk_use(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut used, mut apparent) = (0, 0);
    let mut stack = vec![dir.to_path_buf()];
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
