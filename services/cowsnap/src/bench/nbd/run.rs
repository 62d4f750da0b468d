//! One measured run: a workload on one side in one round. The counters
//! are read before and after fio runs (server CPU, the snapshot's
//! exceptions and the engine's commits, the bytes the side's file
//! allocated), checked, and what the run measured is added to the tally.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cowsnap_store::CommitStats;

use super::fio::{FioResult, Kind, WORKLOADS, Workload, fio_job, run_fio};
use super::peer::QemuNbd;
use super::report::RunRecord;
use super::rounds::{Bench, Round, Tally};
use super::{FILL_CAP, SIDES, Side};

/// The state of one side in one round.
pub(super) struct SideState {
    pub(super) side: Side,
    /// fio's target arguments.
    pub(super) target: Vec<String>,
    pub(super) qemu: Option<QemuNbd>,
    /// The file that grows as the side allocates (qcow2 overlay, raw file).
    pub(super) file: Option<PathBuf>,
}

impl SideState {
    /// CPU seconds the side's server has used so far: our whole process,
    /// or the qemu-nbd process; none for the raw file.
    fn server_cpu(&self) -> Option<f64> {
        match self.side {
            Side::Ours => Some(self_cpu_secs()),
            Side::QemuNbd => self.qemu.as_ref().map(QemuNbd::cpu_secs),
            Side::Raw => None,
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
    /// Runs workload `wi` on side `st` and adds what it measured to `tally`.
    pub(super) async fn run_one(
        &self,
        round: &Round,
        st: &SideState,
        wi: usize,
        tally: &mut Tally,
    ) -> anyhow::Result<()> {
        let w = &WORKLOADS[wi];
        let si = SIDES.iter().position(|s| *s == st.side).expect("a side");
        let mut fio_args = fio_job(w, self.plan);
        fio_args.extend(st.target.iter().cloned());
        let cpu_before = st.server_cpu();
        let before = Before {
            exceptions: if st.side == Side::Ours {
                self.worker.get_snapshot(&round.snap).await?.exceptions
            } else {
                0
            },
            commits: self.origin.commit_stats(),
            allocated: st.file.as_deref().map_or(0, allocated),
        };

        let r = run_fio(self.fio, fio_args, w.is_read())
            .await
            .with_context(|| format!("{} on {}", w.label, st.side.name()))?;

        let server_cpu = cpu_before.map(|b| st.server_cpu().unwrap_or(b) - b);
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
            self.count_first_touch(round, st, w, &r, &before, tally)
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
        st: &SideState,
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
        match st.side {
            Side::Ours => {
                let after = self.worker.get_snapshot(&round.snap).await?;
                let copied = after.exceptions - before.exceptions;
                let c = diff(before.commits, self.origin.commit_stats());
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
            Side::QemuNbd => {
                let grown = allocated(&round.overlay).saturating_sub(before.allocated);
                counts.qemu_clusters_allocated += grown / cb;
            }
            Side::Raw => {}
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

/// User + system CPU seconds of this process (the worker and the engine).
fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the zeroed struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Bytes a file has allocated on disk.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}
