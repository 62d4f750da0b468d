//! One measured run: a workload on one side in one round, with that
//! side's server alone on the machine: our worker is started for the run
//! and stopped after it, qemu-nbd likewise, and nothing serves the raw
//! file. The counters are read before and after fio runs (server CPU from
//! `/proc/PID/stat`, the snapshot's exceptions and the engine's commits,
//! the bytes the side's file allocated), checked, and what the run
//! measured is added to the tally.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cowsnap_store::CommitStats;

use super::fio::{self, FioResult, Kind, WORKLOADS, Workload, fio_job, run_fio};
use super::peer::{QemuNbd, proc_cpu_secs};
use super::report::RunRecord;
use super::rounds::{Bench, Round, Tally, Up};
use super::{EXPORT, FILL_CAP, SIDES, Side};

/// One side in one round.
pub(super) struct SideState {
    pub(super) side: Side,
    /// The file that grows as the side allocates (qcow2 overlay, raw file).
    pub(super) file: Option<PathBuf>,
}

/// The server of one run, running.
enum Server {
    Ours(Up),
    QemuNbd(QemuNbd),
    /// The raw file: fio does its I/O itself.
    None,
}

impl Server {
    /// CPU seconds (user + system) the server process has used so far:
    /// this process for ours (the worker and its engine threads; nothing
    /// else runs in it during a run but the task waiting for fio), the
    /// qemu-nbd process; none for the raw file.
    fn cpu_secs(&self) -> Option<f64> {
        match self {
            Server::Ours(_) => proc_cpu_secs(std::process::id()),
            Server::QemuNbd(q) => q.cpu_secs(),
            Server::None => None,
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Server::Ours(up) => up.down().await,
            Server::QemuNbd(mut q) => {
                q.stop();
                Ok(())
            }
            Server::None => Ok(()),
        }
    }
}

/// The counters before a run, to count what it did.
struct Before {
    /// The snapshot's exceptions (ours only).
    exceptions: u64,
    commits: CommitStats,
    /// Bytes the side's file had allocated.
    allocated: u64,
}

impl Bench<'_> {
    /// Runs workload `wi` on side `st`, its server started for it and
    /// stopped after, and adds what it measured to `tally`.
    pub(super) async fn run_one(
        &mut self,
        round: &Round,
        st: &SideState,
        wi: usize,
        tally: &mut Tally,
    ) -> anyhow::Result<()> {
        let (server, target) = match st.side {
            Side::Ours => {
                let up = self.ours.up().await?;
                let uri = up.uri();
                (Server::Ours(up), fio::nbd_target(&uri))
            }
            Side::QemuNbd => {
                let stderr = self.dir.join("qemu-nbd.stderr");
                let q = self.peer.start(&round.overlay, stderr, self.say)?;
                let uri = format!("nbd://127.0.0.1:{}/{EXPORT}", q.port);
                (Server::QemuNbd(q), fio::nbd_target(&uri))
            }
            Side::Raw => (Server::None, fio::raw_target(self.raw_eng, &round.raw_file)),
        };
        let measured = self
            .measure_one(round, st, wi, &server, target, tally)
            .await;
        let stopped = server.stop().await;
        measured?;
        stopped
    }

    async fn measure_one(
        &self,
        round: &Round,
        st: &SideState,
        wi: usize,
        server: &Server,
        target: Vec<String>,
        tally: &mut Tally,
    ) -> anyhow::Result<()> {
        let w = &WORKLOADS[wi];
        let si = SIDES.iter().position(|s| *s == st.side).expect("a side");
        let mut fio_args = fio_job(w, self.plan);
        fio_args.extend(target);
        let before = Before {
            exceptions: match server {
                Server::Ours(up) => up.worker.get_snapshot(&round.snap).await?.exceptions,
                _ => 0,
            },
            commits: match server {
                Server::Ours(up) => up.origin()?.commit_stats(),
                _ => CommitStats::default(),
            },
            allocated: st.file.as_deref().map_or(0, allocated),
        };
        let cpu_before = server.cpu_secs();

        let r = run_fio(self.fio, fio_args, w.is_read())
            .await
            .with_context(|| format!("{} on {}", w.label, st.side.name()))?;

        let server_cpu = cpu_before.map(|b| server.cpu_secs().unwrap_or(b) - b);
        let value = if w.iops { r.iops } else { r.bw_bytes / 1e6 };
        if value.is_nan() || value <= 0.0 {
            bail!("{} on {}: fio measured nothing", w.label, st.side.name());
        }
        let (_, len) = w.region(self.plan);
        if w.kind == Kind::Fill && r.io_bytes != len {
            bail!(
                "{} on {}: wrote {} of {len} bytes within {} s",
                w.label,
                st.side.name(),
                r.io_bytes,
                FILL_CAP.as_secs()
            );
        }
        if w.kind != Kind::Timed {
            self.count_first_touch(round, server, w, &r, &before, tally)
                .await?;
        }
        let per_io = server_cpu.map(|c| c * 1e6 / r.total_ios.max(1) as f64);
        tally.values[wi][si].push(value);
        if let Some(c) = per_io {
            tally.cpu[wi][si].push(c);
        }
        tally.runs.push(RunRecord {
            round: round.n,
            side: st.side,
            workload: w.id,
            value,
            server_cpu_us_per_io: per_io,
            server_cpu_secs: server_cpu,
            fio: r,
        });
        Ok(())
    }

    /// Counts what a first-touch run `r` of workload `w` made the side do:
    /// chunks copied and commits (ours; a fill must copy every chunk of
    /// its region), clusters allocated (qemu-nbd).
    async fn count_first_touch(
        &self,
        round: &Round,
        server: &Server,
        w: &Workload,
        r: &FioResult,
        before: &Before,
        tally: &mut Tally,
    ) -> anyhow::Result<()> {
        let cb = self.chunk_bytes;
        let counts = if w.kind == Kind::FirstTouch {
            &mut tally.ft_rand
        } else {
            &mut tally.ft_seq
        };
        match server {
            Server::Ours(up) => {
                let after = up.worker.get_snapshot(&round.snap).await?;
                let copied = after.exceptions - before.exceptions;
                let c = diff(before.commits, up.origin()?.commit_stats());
                let (_, len) = w.region(self.plan);
                if w.kind == Kind::Fill && copied != len / cb {
                    bail!(
                        "{}: the snapshot gained {copied} exceptions, expected {} (every chunk of the region)",
                        w.label,
                        len / cb
                    );
                }
                counts.writes += r.total_ios;
                counts.chunks_copied += copied;
                counts.commits += c.commits;
            }
            Server::QemuNbd(_) => {
                let grown = allocated(&round.overlay).saturating_sub(before.allocated);
                counts.qemu_clusters_allocated += grown / cb;
            }
            Server::None => {}
        }
        Ok(())
    }
}

fn diff(before: CommitStats, after: CommitStats) -> CommitStats {
    CommitStats {
        commits: after.commits - before.commits,
        exceptions: after.exceptions - before.exceptions,
    }
}

/// Bytes a file has allocated on disk.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}
