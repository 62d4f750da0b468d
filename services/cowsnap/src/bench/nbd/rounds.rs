//! The measurement of `bench nbd`: our worker (in this process, started
//! only for the steps that need it), the volume written once, then the
//! rounds. Each round starts afresh on every side (a new snapshot, a new
//! qcow2 overlay, a new sparse raw file), runs every workload on every side
//! in turn, each run with its server alone (see [`run`](super::run)), adds
//! what each run measured to the tally, and cleans up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use cowsnap_store::{Layout, Origin};
use cowsnap_worker::nbd::listener::Listen as NbdListen;
use cowsnap_worker::server::{RunningWorker, ServeOptions, start};
use cowsnap_worker::worker::{NewSnapshot, NewVolume, ResState, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

use super::fio::{self, FioResult, WORKLOADS, run_fio};
use super::peer::Peer;
use super::report::{EngineCounts, NbdReport, RunRecord};
use super::run::SideState;
use super::{EXPORT, NbdArgs, Plan, SIDES, Side, Tools, VOLUME_ID};
use crate::bench::files::sparse_file;

/// What the rounds gathered.
pub(super) struct Tally {
    /// IOPS or MB/s, by workload then side, one a round.
    pub(super) values: Vec<Vec<Vec<f64>>>,
    /// Server CPU µs per I/O, by workload then side (none for the raw
    /// file).
    pub(super) cpu: Vec<Vec<Vec<f64>>>,
    pub(super) runs: Vec<RunRecord>,
    pub(super) ft_rand: EngineCounts,
    pub(super) ft_seq: EngineCounts,
}

impl Tally {
    fn new() -> Tally {
        let per_side = vec![vec![Vec::new(); SIDES.len()]; WORKLOADS.len()];
        Tally {
            values: per_side.clone(),
            cpu: per_side,
            runs: Vec::new(),
            ft_rand: EngineCounts::default(),
            ft_seq: EngineCounts::default(),
        }
    }
}

/// What [`rounds`] measured, and how.
pub(super) struct Measured {
    pub(super) tally: Tally,
    pub(super) backend: &'static str,
    pub(super) prep: String,
    pub(super) qemu_aio: String,
    pub(super) qemu_cmd: String,
}

/// Our worker: not running between steps. It is started for each step
/// that needs it (writing the volume, a round's snapshot, one of our timed
/// runs) and stopped after, so that no server of ours is alive while
/// qemu-nbd or the raw file is measured, and no qemu-nbd while ours is.
pub(super) struct Ours {
    cfg: WorkerConfig,
    opts: ServeOptions,
}

/// Our worker, running.
pub(super) struct Up {
    running: RunningWorker,
    shutdown: CancellationToken,
    pub(super) worker: Arc<Worker>,
}

impl Ours {
    fn new(args: &NbdArgs, dir: &Path) -> anyhow::Result<Ours> {
        Ok(Ours {
            cfg: WorkerConfig {
                data_dir: dir.join("worker"),
                node: "bench".into(),
                nbd_uri: String::new(),
                device_allow: Vec::new(),
                io: args.io,
                writeback_cap: cowsnap_worker::worker::DEFAULT_WRITEBACK_CAP,
            },
            opts: ServeOptions {
                grpc_listen: "127.0.0.1:0".parse().map_err(|e: String| anyhow!(e))?,
                nbd_listen: NbdListen::Tcp("127.0.0.1:0".into()),
                nbd_advertise: None,
                nbd_tls: None,
                nbd_limits: Default::default(),
                tls: None,
            },
        })
    }

    /// Starts the worker (it loads the volume and its snapshot from their
    /// files, as after any restart).
    pub(super) async fn up(&self) -> anyhow::Result<Up> {
        let shutdown = CancellationToken::new();
        let running = start(self.cfg.clone(), self.opts.clone(), shutdown.clone())
            .await
            .context("starting the worker")?;
        Ok(Up {
            worker: running.worker.clone(),
            running,
            shutdown,
        })
    }
}

impl Up {
    /// The volume's engine, for its commit counters.
    pub(super) fn origin(&self) -> anyhow::Result<Arc<Origin>> {
        Ok(self
            .worker
            .exports()
            .get(EXPORT)
            .ok_or_else(|| anyhow!("{EXPORT} is not exported"))?
            .origin
            .clone())
    }

    /// The volume's export.
    pub(super) fn uri(&self) -> String {
        self.running.nbd.uri(EXPORT)
    }

    /// Stops the worker and waits until it has flushed and let go of
    /// everything.
    pub(super) async fn down(self) -> anyhow::Result<()> {
        let Up {
            running,
            shutdown,
            worker,
        } = self;
        drop(worker);
        shutdown.cancel();
        running.wait().await.context("stopping the worker")
    }
}

/// Writes the volume once, then runs the rounds.
pub(super) async fn measure(
    args: &NbdArgs,
    plan: &Plan,
    layout: Layout,
    tools: &Tools,
    dir: &Path,
) -> anyhow::Result<NbdReport> {
    let say = |m: &str| {
        if !args.json {
            eprintln!("  .. {m}");
        }
    };
    let ours = Ours::new(args, dir)?;
    let result = rounds(args, plan, layout, tools, dir, ours, &say).await;
    Ok(NbdReport::new(args, plan, layout, tools, dir, result?))
}

async fn rounds(
    args: &NbdArgs,
    plan: &Plan,
    layout: Layout,
    tools: &Tools,
    dir: &Path,
    ours: Ours,
    say: &dyn Fn(&str),
) -> anyhow::Result<Measured> {
    let up = ours.up().await?;
    let backend = up.worker.backend_name();
    let raw_eng = fio::raw_engine(backend);
    let prepared = prepare_volume(&up.worker, plan, layout, &tools.fio, raw_eng, say).await;
    up.down().await?;
    let (base, fill) = prepared?;
    let prep = format!(
        "the volume file ({} MiB) written once with fio ({raw_eng}, direct=1, 1 MiB, {:.0} MB/s) and flushed; it is also every \
         overlay's backing file. Each round: a new snapshot of the volume (the previous one deleted), a new qcow2 overlay, a new \
         sparse raw file. Each timed run has its server to itself: our worker is started before it and stopped after it (it \
         loads the volume and snapshot from their files), qemu-nbd likewise",
        plan.size >> 20,
        fill.bw_bytes / 1e6
    );
    let mut bench = Bench {
        plan,
        chunk_bytes: layout.chunk_bytes(),
        dir,
        fio: &tools.fio,
        ours,
        raw_eng,
        base,
        peer: Peer::new(tools, &args.qemu_aio, backend),
        say,
    };
    let mut tally = Tally::new();
    let mut prev_snap: Option<String> = None;
    for n in 1..=plan.rounds {
        let round = bench.start_round(n, prev_snap.take()).await?;
        prev_snap = Some(round.snap.clone());
        for (wi, w) in WORKLOADS.iter().enumerate() {
            say(&format!("round {n}: {}", w.label));
            for st in &round.sides {
                bench.run_one(&round, st, wi, &mut tally).await?;
            }
        }
        bench.end_round(round).await?;
    }
    if let Some(p) = prev_snap.take() {
        let up = bench.ours.up().await?;
        let deleted = up.worker.delete_snapshot(&p).await;
        up.down().await?;
        deleted?;
    }
    for c in [&mut tally.ft_rand, &mut tally.ft_seq] {
        c.exceptions_per_commit = c.chunks_copied as f64 / c.commits.max(1) as f64;
    }
    Ok(Measured {
        tally,
        backend,
        prep,
        qemu_aio: bench.peer.aio.clone(),
        qemu_cmd: bench.peer.command(),
    })
}

/// Creates the volume and writes all of it once through its file (no
/// snapshot yet, and the engine caches nothing), flushed: it is also the
/// backing file of every qcow2 overlay. Returns that file and what fio
/// measured.
async fn prepare_volume(
    worker: &Worker,
    plan: &Plan,
    layout: Layout,
    fio: &Path,
    raw_eng: &str,
    say: &dyn Fn(&str),
) -> anyhow::Result<(PathBuf, FioResult)> {
    let vol = worker
        .create_volume(&NewVolume {
            volume_id: VOLUME_ID.into(),
            size_bytes: plan.size,
            chunk_sectors: layout.chunk_sectors(),
            device: String::new(),
        })
        .await
        .context("creating the volume")?;
    let base = PathBuf::from(&vol.device)
        .canonicalize()
        .context("the volume file")?;
    say(&format!(
        "writing the volume ({} MiB) through its file",
        plan.size >> 20
    ));
    let fill = run_fio(fio, fio::prepare_job(&base, plan.size, raw_eng), false).await?;
    if fill.io_bytes != plan.size {
        bail!(
            "preparing the volume wrote {} of {} bytes",
            fill.io_bytes,
            plan.size
        );
    }
    Ok((base, fill))
}

/// What stays the same from round to round.
pub(super) struct Bench<'a> {
    pub(super) plan: &'a Plan,
    pub(super) chunk_bytes: u64,
    pub(super) dir: &'a Path,
    pub(super) fio: &'a Path,
    /// Our worker, started for each step that needs it.
    pub(super) ours: Ours,
    /// fio's engine on the raw file.
    pub(super) raw_eng: &'static str,
    /// The volume's file, the overlays' backing file.
    pub(super) base: PathBuf,
    pub(super) peer: Peer,
    pub(super) say: &'a dyn Fn(&str),
}

/// One round: its snapshot, files and sides (in the order they take turns).
pub(super) struct Round {
    pub(super) n: usize,
    /// The snapshot's name.
    pub(super) snap: String,
    pub(super) overlay: PathBuf,
    pub(super) raw_file: PathBuf,
    pub(super) sides: Vec<SideState>,
}

impl Bench<'_> {
    /// Deletes the previous round's snapshot `prev`, then sets up round `n`.
    async fn start_round(&mut self, n: usize, prev: Option<String>) -> anyhow::Result<Round> {
        (self.say)(&format!(
            "round {n} of {}: fresh snapshot, overlay and raw file",
            self.plan.rounds
        ));
        // Ours: a fresh snapshot, the only one.
        let up = self.ours.up().await?;
        let snap = fresh_snapshot(&up.worker, n, prev).await;
        up.down().await?;
        let snap = snap?;
        // qemu-nbd: a fresh overlay, served only during its runs.
        let overlay = self.dir.join(format!("overlay{n}.qcow2"));
        self.peer
            .create_overlay(&self.base, &overlay, self.chunk_bytes, self.plan.size)?;
        // Raw: a fresh sparse file.
        let raw_file = sparse_file(&self.dir.join(format!("raw{n}.img")), self.plan.size)?;
        let mut sides = vec![
            SideState {
                side: Side::Ours,
                file: None,
            },
            SideState {
                side: Side::QemuNbd,
                file: Some(overlay.clone()),
            },
            SideState {
                side: Side::Raw,
                file: Some(raw_file.clone()),
            },
        ];
        // The sides take turns, starting with a different one each round.
        sides.rotate_left((n - 1) % SIDES.len());
        Ok(Round {
            n,
            snap,
            overlay,
            raw_file,
            sides,
        })
    }

    /// Removes the round's files and checks that the snapshot came through
    /// whole.
    async fn end_round(&self, round: Round) -> anyhow::Result<()> {
        let Round {
            n,
            snap,
            overlay,
            raw_file,
            ..
        } = round;
        std::fs::remove_file(&overlay)
            .with_context(|| format!("removing {}", overlay.display()))?;
        std::fs::remove_file(&raw_file)
            .with_context(|| format!("removing {}", raw_file.display()))?;
        let up = self.ours.up().await?;
        let st = up.worker.get_snapshot(&snap).await;
        up.down().await?;
        let st = st?;
        if st.state != ResState::Ready {
            bail!("{snap} is {:?} after round {n}", st.state);
        }
        Ok(())
    }
}

/// Deletes `prev` and creates round `n`'s snapshot; returns its name.
async fn fresh_snapshot(
    worker: &Arc<Worker>,
    n: usize,
    prev: Option<String>,
) -> anyhow::Result<String> {
    if let Some(p) = prev {
        worker
            .delete_snapshot(&p)
            .await
            .with_context(|| format!("deleting {p}"))?;
    }
    let snap = worker
        .create_snapshot(&NewSnapshot {
            parent: format!("volumes/{VOLUME_ID}"),
            snapshot_id: format!("r{n}"),
            ..NewSnapshot::default()
        })
        .await
        .context("creating the snapshot")?;
    Ok(snap.name)
}
