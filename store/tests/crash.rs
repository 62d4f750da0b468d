//! Crash tests: random workloads on the fault-injecting backend, a power cut
//! at a random I/O (in two runs of three, within a few I/Os of a moment when
//! acknowledged writes are held by the write-back path), a random subset of
//! the unflushed sectors kept (torn writes included), reload from the files
//! alone, and a check of the contract of D13 (docs/design.md):
//! - every acknowledged durable write (FUA, or followed by an acknowledged
//!   flush) is there, and every sector holds a value some write put there
//!   no earlier than its last durable one (a plain write acknowledged since
//!   the last flush may be lost, held or not);
//! - every snapshot that reloads valid has exactly its content (no cut may
//!   turn a valid snapshot into wrong data), and one that reloads invalid
//!   could have overflowed;
//! - a merge interrupted by the cut resumes and ends with the right content.
//!
//! Every sector written carries the id of its write and its sector number,
//! so a sector read back names the write it came from.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use cowsnap_store::io::fault::FaultController;
use cowsnap_store::{AlignedBuf, Layout, Origin, SnapId, SnapshotOptions, Target};
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SECTOR: u64 = 512;
const ORIGIN_SECTORS: u64 = 512; // 256 KiB

/// The 512 bytes write `w` puts in sector `s`.
fn sector_data(w: u32, s: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(SECTOR as usize);
    v.extend_from_slice(&u64::from(w).to_le_bytes());
    v.extend_from_slice(&s.to_le_bytes());
    v.extend_from_slice(&common::pattern(
        SECTOR as usize - 16,
        u64::from(w) << 32 | s,
    ));
    v
}

/// Which write a sector read back came from (None: garbage).
fn decode(data: &[u8], s: u64) -> Option<u32> {
    let w = u64::from_le_bytes(data[0..8].try_into().unwrap());
    if w > u64::from(u32::MAX) || u64::from_le_bytes(data[8..16].try_into().unwrap()) != s {
        return None;
    }
    (sector_data(w as u32, s) == data).then_some(w as u32)
}

/// A sector's writes, oldest first, and the index of the last durable one.
#[derive(Clone)]
struct Hist {
    h: Vec<u32>,
    durable: usize,
}

impl Hist {
    fn latest(&self) -> u32 {
        *self.h.last().unwrap()
    }
    fn push(&mut self, w: u32, durable: bool) {
        self.h.push(w);
        if durable {
            self.durable = self.h.len() - 1;
        }
    }
    fn allows(&self, w: u32) -> bool {
        self.h[self.durable..].contains(&w)
    }
    /// An acknowledged FUA write or flush: the newest value is durable.
    /// (Writes to one sector are never concurrent here, so the newest entry
    /// is the acknowledged write.)
    fn make_durable(&mut self) {
        self.durable = self.h.len() - 1;
    }
}

struct MSnap {
    path: PathBuf,
    id: SnapId,
    sectors: Vec<Hist>,
    chunk_sectors: u32,
    cow_bytes: u64,
    /// Chunks that hold (or may hold, if their write was cut) an exception.
    used: HashSet<u64>,
    merging: bool,
}

impl MSnap {
    fn touch(&mut self, first: u64, n: u64) {
        let cs = u64::from(self.chunk_sectors);
        for c in first / cs..(first + n).div_ceil(cs) {
            self.used.insert(c);
        }
    }
    fn may_overflow(&self) -> bool {
        self.used.len() as u64
            > Layout::new(self.chunk_sectors)
                .unwrap()
                .capacity(self.cow_bytes)
    }
}

struct Run {
    ctl: FaultController,
    dir: tempfile::TempDir,
    origin_path: PathBuf,
    origin: Arc<Origin>,
    sectors: Vec<Hist>,
    snaps: Vec<MSnap>,
    next_write: u32,
    files: u32,
}

#[derive(Default, Debug)]
struct Totals {
    runs: u64,
    cuts: u64,
    /// Cuts that found held writes not yet on the origin (or failed them).
    cuts_with_writeback_busy: u64,
    /// Writes that went through write-back, over all runs.
    held_writes: u64,
    steps: u64,
    kept: u64,
    dropped: u64,
    merges_resumed: u64,
    snapshots_checked: u64,
    invalid_after_overflow: u64,
}

impl Run {
    async fn new() -> Run {
        let dir = common::scratch();
        let origin_path = dir.path().join("origin");
        let mut img = Vec::new();
        for s in 0..ORIGIN_SECTORS {
            img.extend_from_slice(&sector_data(0, s));
        }
        std::fs::write(&origin_path, img).unwrap();
        let ctl = FaultController::new();
        let origin = Arc::new(Origin::new(ctl.open(&origin_path).unwrap()).unwrap());
        Run {
            ctl,
            dir,
            origin_path,
            origin,
            sectors: vec![
                Hist {
                    h: vec![0],
                    durable: 0
                };
                ORIGIN_SECTORS as usize
            ],
            snaps: Vec::new(),
            next_write: 1,
            files: 0,
        }
    }

    fn data(&mut self, first: u64, n: u64) -> (u32, AlignedBuf) {
        let w = self.next_write;
        self.next_write += 1;
        let mut v = Vec::new();
        for s in first..first + n {
            v.extend_from_slice(&sector_data(w, s));
        }
        (w, AlignedBuf::from_slice(&v))
    }

    /// Takes a snapshot (at most 3 at once); false once the power is off.
    async fn take_snapshot(&mut self, rng: &mut StdRng) -> bool {
        if self.snaps.len() >= 3 {
            return true;
        }
        let chunk_sectors = [8u32, 16][rng.random_range(0..2)];
        let cb = u64::from(chunk_sectors) * SECTOR;
        let cow_bytes = if rng.random_bool(0.5) {
            ORIGIN_SECTORS * SECTOR * 2 + 8 * cb
        } else {
            rng.random_range(6..40) * cb
        };
        self.files += 1;
        let path = common::sparse_file(
            &self.dir.path().join(format!("cow{}", self.files)),
            cow_bytes,
        );
        let dev = self.ctl.open(&path).unwrap();
        let opts = SnapshotOptions {
            chunk_sectors: Some(chunk_sectors),
            merging: false,
            size: None,
        };
        match self.origin.add_snapshot(dev, opts).await {
            Ok(a) => {
                // Creation flushed the origin: its content is durable.
                for h in &mut self.sectors {
                    h.make_durable();
                }
                let frozen = self
                    .sectors
                    .iter()
                    .map(|h| Hist {
                        h: vec![h.latest()],
                        durable: 0,
                    })
                    .collect();
                self.snaps.push(MSnap {
                    path,
                    id: a.id,
                    sectors: frozen,
                    chunk_sectors,
                    cow_bytes,
                    used: HashSet::new(),
                    merging: false,
                });
                true
            }
            Err(e) => {
                assert!(self.ctl.is_cut(), "snapshot creation failed: {e}");
                false
            }
        }
    }

    /// One random step; false once the power is off.
    async fn step(&mut self, rng: &mut StdRng) -> bool {
        let bs_sectors = self.origin.block_size() / SECTOR;
        let pick_range = |rng: &mut StdRng| {
            let n = rng.random_range(1..=40u64).div_ceil(bs_sectors) * bs_sectors;
            let first = rng.random_range(0..ORIGIN_SECTORS - n) / bs_sectors * bs_sectors;
            (first, n)
        };
        match rng.random_range(0..20) {
            0..=11 => {
                // Concurrent writes to disjoint ranges of each target.
                let mut ops: Vec<(Option<usize>, u64, u64, bool)> = Vec::new();
                for _ in 0..rng.random_range(1..6) {
                    let t = if self.snaps.is_empty() || rng.random_bool(0.6) {
                        None
                    } else {
                        let i = rng.random_range(0..self.snaps.len());
                        (!self.snaps[i].merging).then_some(i)
                    };
                    let (first, n) = pick_range(rng);
                    if ops
                        .iter()
                        .any(|&(tt, f, m, _)| tt == t && f < first + n && first < f + m)
                    {
                        continue;
                    }
                    ops.push((t, first, n, rng.random_bool(0.3)));
                }
                let mut reqs = Vec::new();
                for &(t, first, n, fua) in &ops {
                    let (w, buf) = self.data(first, n);
                    // Record the write as issued: after a cut it may or may
                    // not be there.
                    match t {
                        None => {
                            for s in self.snaps.iter_mut().filter(|s| !s.merging) {
                                s.touch(first, n);
                            }
                            for s in first..first + n {
                                self.sectors[s as usize].push(w, false);
                            }
                        }
                        Some(i) => {
                            self.snaps[i].touch(first, n);
                            for s in first..first + n {
                                self.snaps[i].sectors[s as usize].push(w, false);
                            }
                        }
                    }
                    let target = t.map_or(Target::Origin, |i| Target::Snapshot(self.snaps[i].id));
                    reqs.push((target, first * SECTOR, buf, fua));
                }
                let origin = &self.origin;
                let results = join_all(
                    reqs.into_iter()
                        .map(|(t, off, buf, fua)| origin.write(t, off, buf, fua)),
                )
                .await;
                let cut = self.ctl.is_cut();
                for ((t, first, n, fua), r) in ops.into_iter().zip(results) {
                    match (&r, t) {
                        (Ok(()), None) if fua => {
                            for s in first..first + n {
                                self.sectors[s as usize].make_durable();
                            }
                        }
                        (Ok(()), Some(i)) if fua => {
                            for s in first..first + n {
                                self.snaps[i].sectors[s as usize].make_durable();
                            }
                        }
                        (Ok(()), _) => {}
                        (Err(e), None) => {
                            assert!(cut, "origin write failed without a power cut: {e}")
                        }
                        (Err(e), Some(i)) => {
                            assert!(
                                cut || self.snaps[i].may_overflow(),
                                "snapshot write failed: {e}"
                            )
                        }
                    }
                }
                !cut
            }
            12 | 13 => {
                let r = self.origin.flush().await;
                if r.is_ok() {
                    for h in &mut self.sectors {
                        h.make_durable();
                    }
                    for s in &mut self.snaps {
                        for h in &mut s.sectors {
                            h.make_durable();
                        }
                    }
                }
                r.is_ok()
            }
            14 | 15 => self.take_snapshot(rng).await,
            16 => {
                if let Some(i) =
                    (!self.snaps.is_empty()).then(|| rng.random_range(0..self.snaps.len()))
                {
                    let id = self.snaps[i].id;
                    self.origin.delete_snapshot(id).await.unwrap();
                    self.snaps.remove(i);
                }
                true
            }
            17 => {
                // Merge a snapshot that cannot have overflowed, with origin
                // writes running beside it.
                let Some(i) = self.snaps.iter().position(|s| !s.may_overflow()) else {
                    return true;
                };
                let id = self.snaps[i].id;
                if let Err(e) = self.origin.start_merge(id).await {
                    // Held writes run in the background: the cut may have
                    // come between steps and failed the snapshot.
                    assert!(self.ctl.is_cut(), "start_merge failed: {e}");
                    return false;
                }
                self.snaps[i].merging = true;
                // The origin's content is now the snapshot's, for good: the
                // merge (resumed after a cut if need be) puts it there.
                // A snapshot sector written without FUA (and not flushed)
                // may be lost in a cut: then its older values are possible.
                for (s, h) in self.sectors.iter_mut().enumerate() {
                    let sh = &self.snaps[i].sectors[s];
                    h.h = sh.h[sh.durable..].to_vec();
                    h.durable = 0;
                }
                let mcs = u64::from(self.snaps[i].chunk_sectors);
                let mused: Vec<u64> = self.snaps[i].used.iter().copied().collect();
                for (j, o) in self.snaps.iter_mut().enumerate() {
                    if j != i {
                        for &c in &mused {
                            o.touch(c * mcs, mcs.min(ORIGIN_SECTORS - c * mcs));
                        }
                    }
                }
                let origin = self.origin.clone();
                let merge = origin.merge(id, |_| {});
                let mut writes = Vec::new();
                let mut taken: Vec<(u64, u64)> = Vec::new();
                for _ in 0..rng.random_range(0..4) {
                    let (first, n) = pick_range(rng);
                    if taken.iter().any(|&(f, m)| f < first + n && first < f + m) {
                        continue;
                    }
                    taken.push((first, n));
                    let (w, buf) = self.data(first, n);
                    let fua = rng.random_bool(0.3);
                    for s in first..first + n {
                        self.sectors[s as usize].push(w, false);
                    }
                    for (j, o) in self.snaps.iter_mut().enumerate() {
                        if j != i {
                            o.touch(first, n);
                        }
                    }
                    writes.push((first, n, fua, buf));
                }
                let origin2 = self.origin.clone();
                let wfut = join_all(writes.iter().map(|(first, _, fua, buf)| {
                    origin2.write(
                        Target::Origin,
                        first * SECTOR,
                        AlignedBuf::from_slice(buf),
                        *fua,
                    )
                }));
                let (mr, wr) = futures::join!(merge, wfut);
                let cut = self.ctl.is_cut();
                for ((first, n, fua, _), r) in writes.iter().zip(wr) {
                    match r {
                        Ok(()) if *fua => {
                            for s in *first..first + n {
                                self.sectors[s as usize].make_durable();
                            }
                        }
                        Ok(()) => {}
                        Err(e) => assert!(cut, "origin write during merge failed: {e}"),
                    }
                }
                match mr {
                    Ok(()) => {
                        self.snaps.remove(i);
                    }
                    Err(e) => assert!(cut, "merge failed without a power cut: {e}"),
                }
                !cut
            }
            _ => {
                // Read back and compare with the latest model values.
                let (first, n) = pick_range(rng);
                let t = if self.snaps.is_empty() || rng.random_bool(0.5) {
                    None
                } else {
                    Some(rng.random_range(0..self.snaps.len()))
                };
                let target = t.map_or(Target::Origin, |i| Target::Snapshot(self.snaps[i].id));
                match self.origin.read(target, first * SECTOR, n * SECTOR).await {
                    Ok(buf) => {
                        for s in first..first + n {
                            let at = ((s - first) * SECTOR) as usize;
                            let got = decode(&buf[at..at + SECTOR as usize], s);
                            let want = match t {
                                None => self.sectors[s as usize].latest(),
                                Some(i) => self.snaps[i].sectors[s as usize].latest(),
                            };
                            assert_eq!(got, Some(want), "live read of {target:?} sector {s}");
                        }
                        true
                    }
                    Err(e) => {
                        let ok = self.ctl.is_cut()
                            || t.is_some_and(|i| {
                                self.snaps[i].may_overflow() || self.snaps[i].merging
                            });
                        assert!(ok, "read failed: {e}");
                        !self.ctl.is_cut()
                    }
                }
            }
        }
    }

    /// After the crash: reopen everything from the files with a normal
    /// backend, finish an interrupted merge, and check every sector.
    async fn verify(&mut self, totals: &mut Totals) {
        let backend = common::backend();
        let origin = Origin::new(backend.open(&self.origin_path, true).unwrap()).unwrap();
        let mut merging = None;
        let mut loaded = Vec::new();
        for (i, s) in self.snaps.iter().enumerate() {
            let dev = backend.open(&s.path, true).unwrap();
            let a = origin
                .add_snapshot(
                    dev,
                    SnapshotOptions {
                        chunk_sectors: None,
                        merging: s.merging,
                        size: None,
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("snapshot {i} does not reload after the crash: {e}"));
            assert!(!a.initialised, "snapshot {i} lost its header");
            if s.merging {
                merging = Some(a.id);
            }
            loaded.push(a.id);
        }
        if let Some(id) = merging {
            origin
                .merge(id, |_| {})
                .await
                .expect("interrupted merge resumes");
            totals.merges_resumed += 1;
        }
        let all = origin
            .read(Target::Origin, 0, ORIGIN_SECTORS * SECTOR)
            .await
            .unwrap();
        for s in 0..ORIGIN_SECTORS {
            let at = (s * SECTOR) as usize;
            let got = decode(&all[at..at + SECTOR as usize], s);
            let h = &self.sectors[s as usize];
            assert!(
                got.is_some_and(|w| h.allows(w)),
                "origin sector {s} after the crash holds {got:?}; allowed {:?}",
                &h.h[h.durable..]
            );
        }
        for (i, s) in self.snaps.iter().enumerate() {
            if s.merging {
                continue;
            }
            let st = origin.status(loaded[i]).unwrap();
            if !st.valid {
                assert!(
                    s.may_overflow(),
                    "snapshot {i} reloads invalid but cannot have overflowed"
                );
                totals.invalid_after_overflow += 1;
                continue;
            }
            totals.snapshots_checked += 1;
            let img = origin
                .read(Target::Snapshot(loaded[i]), 0, ORIGIN_SECTORS * SECTOR)
                .await
                .unwrap();
            for sec in 0..ORIGIN_SECTORS {
                let at = (sec * SECTOR) as usize;
                let got = decode(&img[at..at + SECTOR as usize], sec);
                let h = &s.sectors[sec as usize];
                assert!(
                    got.is_some_and(|w| h.allows(w)),
                    "snapshot {i} sector {sec} after the crash holds {got:?}; allowed {:?}",
                    &h.h[h.durable..]
                );
            }
        }
    }
}

/// One workload and its power cut: after `cut_after` I/Os, or (`None`)
/// within a few I/Os of a moment when writes are held.
async fn one_run(seed: u64, cut_after: Option<u64>, totals: &mut Totals) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut run = Run::new().await;
    match cut_after {
        Some(n) => run.ctl.cut_after(n),
        // Writes are held only when a snapshot needs copies.
        None => assert!(run.take_snapshot(&mut rng).await),
    }
    let steps = rng.random_range(10..60);
    // From a random step on, the first time acknowledged writes are held
    // (not yet on the origin), the power goes within a few I/Os: most cuts
    // land while the write-back path copies, commits or writes.
    let arm_from = rng.random_range(0..steps / 4);
    let mut armed = cut_after.is_some();
    for i in 0..steps {
        totals.steps += 1;
        if !run.step(&mut rng).await {
            break;
        }
        if !armed && i >= arm_from && run.origin.writeback_stats().held_bytes > 0 {
            run.ctl.cut_after(rng.random_range(0..12));
            armed = true;
        }
    }
    let ops = run.ctl.ops();
    let wb = run.origin.writeback_stats();
    totals.held_writes += wb.held_writes;
    if run.ctl.is_cut() {
        totals.cuts += 1;
        if wb.held_bytes > 0 || wb.failed > 0 {
            totals.cuts_with_writeback_busy += 1;
        }
    }
    let (kept, dropped) = run.ctl.crash(&mut rng).unwrap();
    totals.kept += kept;
    totals.dropped += dropped;
    // The engine of the crashed machine is gone.
    let _ = std::mem::replace(
        &mut run.origin,
        Arc::new(Origin::new(common::backend().open(&run.origin_path, false).unwrap()).unwrap()),
    );
    run.verify(totals).await;
    totals.runs += 1;
    ops
}

#[test]
fn power_cuts_never_lose_acknowledged_writes_or_corrupt_snapshots() {
    let runs: u64 = std::env::var("COWSNAP_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let rt = common::runtime();
    let mut totals = Totals::default();
    let mut max_ops = 400u64;
    for seed in 0..runs {
        let mut pick = StdRng::seed_from_u64(seed ^ 0xc0ff_ee00);
        // One run in three cuts at a random I/O (creation, merges, any
        // moment), the others while the write-back path is busy.
        let cut = (seed % 3 == 0).then(|| pick.random_range(0..max_ops));
        let cuts_before = totals.cuts;
        let ops = rt.block_on(one_run(seed, cut, &mut totals));
        if cut.is_some() && totals.cuts == cuts_before {
            // Not cut: aim the next cuts at workloads of about this length.
            max_ops = (max_ops * 3 + ops + 1) / 4;
        }
    }
    eprintln!("crash test: {totals:?}");
    assert!(
        totals.cuts * 2 >= totals.runs,
        "most runs should be cut mid-workload: {totals:?}"
    );
    assert!(
        totals.cuts_with_writeback_busy * 2 >= totals.cuts,
        "most cuts should find held writes in flight: {totals:?}"
    );
    assert!(
        totals.dropped > 0 && totals.kept > 0,
        "the volatile layer was exercised: {totals:?}"
    );
}

/// A chunk merged by one step and then overwritten (FUA) must keep the new
/// data when a cut interrupts the rest of the merge: the step's commit has
/// to be durable before the merged chunk is handed back to the origin, or
/// the resumed merge would copy the old snapshot data over the write.
#[test]
fn merged_chunk_rewritten_during_merge_survives_a_cut() {
    let rt = common::runtime();
    for seed in 0..16u64 {
        rt.block_on(async {
            let dir = common::scratch();
            let cb = 4096u64;
            let origin_path = common::pattern_file(&dir.path().join("origin"), 64 * cb, 1);
            let cow_path = common::sparse_file(&dir.path().join("cow"), 64 * cb);
            let ctl = FaultController::new();
            let origin = Arc::new(Origin::new(ctl.open(&origin_path).unwrap()).unwrap());
            let a = origin
                .add_snapshot(
                    ctl.open(&cow_path).unwrap(),
                    SnapshotOptions {
                        chunk_sectors: Some(8),
                        merging: false,
                        size: None,
                    },
                )
                .await
                .unwrap();
            // Two separate runs: chunk 10 (merged first), then chunk 0.
            for c in [0u64, 10] {
                origin
                    .write(
                        Target::Origin,
                        c * cb,
                        AlignedBuf::from_slice(&vec![0xee; cb as usize]),
                        false,
                    )
                    .await
                    .unwrap();
            }
            origin.flush().await.unwrap();
            origin.start_merge(a.id).await.unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let o2 = origin.clone();
            let merge = tokio::spawn(async move {
                o2.merge(a.id, move |p| {
                    let _ = tx.send(p.chunks_left);
                })
                .await
            });
            // Wait until the first step (chunk 10) is merged.
            while rx.recv().await.unwrap() != 1 {}
            let new = vec![0x42u8; cb as usize];
            origin
                .write(Target::Origin, 10 * cb, AlignedBuf::from_slice(&new), true)
                .await
                .unwrap();
            let mut rng = StdRng::seed_from_u64(seed);
            ctl.crash(&mut rng).unwrap();
            let _ = merge.await;
            // Reload and resume the merge.
            let backend = common::backend();
            let origin = Origin::new(backend.open(&origin_path, true).unwrap()).unwrap();
            let b = origin
                .add_snapshot(
                    backend.open(&cow_path, true).unwrap(),
                    SnapshotOptions {
                        chunk_sectors: None,
                        merging: true,
                        size: None,
                    },
                )
                .await
                .unwrap();
            origin.merge(b.id, |_| {}).await.unwrap();
            let got = origin.read(Target::Origin, 10 * cb, cb).await.unwrap();
            assert!(
                got[..] == new[..],
                "seed {seed}: the FUA write to a merged chunk was undone by the resumed merge"
            );
            let first = origin.read(Target::Origin, 0, cb).await.unwrap();
            let want = common::pattern(cb as usize, 1);
            assert!(
                first[..] == want[..],
                "seed {seed}: chunk 0 was not rolled back"
            );
        });
    }
}
