//! The engine against a reference model: plain in-memory images of the
//! origin and of every snapshot. Property tests drive random origin and
//! snapshot writes (several at once), reads, snapshot create/delete, merge
//! (with I/O running beside it), restart and overflow, on real files with
//! O_DIRECT, and compare every read with the model.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cowsnap_store::{AlignedBuf, Backend, Layout, Origin, SnapId, SnapshotOptions, Target};
use futures::future::join_all;
use proptest::prelude::*;
use proptest::strategy::ValueTree;

const ORIGIN_UNITS: u64 = 128; // units of 4 KiB: a 512 KiB origin
const UNIT: u64 = 4096;

static STEPS: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Debug)]
enum Step {
    /// Concurrent writes; the target index picks the origin (0) or a snapshot.
    Writes(Vec<(usize, u64, u64, u64)>),
    Read(usize, u64, u64),
    Create {
        chunk_sectors: u32,
        cow_units: u64,
    },
    Delete(usize),
    /// Merge snapshot `idx` while these origin writes run beside it.
    Merge(usize, Vec<(u64, u64, u64)>),
    Restart,
    Flush,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..ORIGIN_UNITS * 8, 1u64..=48).prop_map(|(off, len)| {
        // In 512-byte sectors, scaled to the device's block size at run time.
        let len = len.min(ORIGIN_UNITS * 8 - off);
        (off, len)
    })
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => prop::collection::vec((0usize..4, range(), any::<u64>()), 1..6)
            .prop_map(|v| Step::Writes(v.into_iter().map(|(t, (o, l), s)| (t, o, l, s)).collect())),
        5 => (0usize..4, range()).prop_map(|(t, (o, l))| Step::Read(t, o, l)),
        2 => (prop::sample::select(vec![8u32, 16, 32]), prop_oneof![Just(0u64), 8u64..40])
            .prop_map(|(chunk_sectors, cow_units)| Step::Create { chunk_sectors, cow_units }),
        1 => (0usize..3).prop_map(Step::Delete),
        1 => (0usize..3, prop::collection::vec((range(), any::<u64>()), 0..4))
            .prop_map(|(i, w)| Step::Merge(i, w.into_iter().map(|((o, l), s)| (o, l, s)).collect())),
        1 => Just(Step::Restart),
        1 => Just(Step::Flush),
    ]
}

struct ModelSnap {
    id: SnapId,
    path: PathBuf,
    image: Vec<u8>,
    chunk_sectors: u32,
    cow_bytes: u64,
    /// Chunks that have (or must have) an exception.
    used: HashSet<u64>,
    valid: bool,
}

impl ModelSnap {
    fn chunk_bytes(&self) -> u64 {
        u64::from(self.chunk_sectors) * 512
    }
    fn capacity(&self) -> u64 {
        Layout::new(self.chunk_sectors)
            .unwrap()
            .capacity(self.cow_bytes)
    }
    /// Marks the chunks of a range used; returns false if that overflows.
    fn touch(&mut self, off: u64, len: u64) -> bool {
        let cb = self.chunk_bytes();
        for c in off / cb..(off + len).div_ceil(cb) {
            self.used.insert(c);
        }
        self.used.len() as u64 <= self.capacity()
    }
}

struct World {
    backend: Backend,
    dir: tempfile::TempDir,
    origin_path: PathBuf,
    origin: Arc<Origin>,
    model: Vec<u8>,
    snaps: Vec<ModelSnap>,
    bs: u64,
    files: u64,
}

impl World {
    async fn new(backend: Backend) -> World {
        let dir = common::scratch();
        let size = ORIGIN_UNITS * UNIT;
        let origin_path = common::pattern_file(&dir.path().join("origin"), size, 7);
        let model = std::fs::read(&origin_path).unwrap();
        let origin = Arc::new(Origin::new(backend.open(&origin_path, true).unwrap()).unwrap());
        let bs = origin.block_size();
        World {
            backend,
            dir,
            origin_path,
            origin,
            model,
            snaps: Vec::new(),
            bs,
            files: 0,
        }
    }

    /// Scales a (sector offset, sector length) pair to the block size.
    fn scale(&self, off: u64, len: u64) -> (u64, u64) {
        let spb = self.bs / 512;
        let off = off / spb * self.bs;
        let len = (len.div_ceil(spb) * self.bs).min(ORIGIN_UNITS * UNIT - off);
        (off, len)
    }

    fn target(&self, t: usize) -> Option<(Target, Option<usize>)> {
        if t == 0 || self.snaps.is_empty() {
            Some((Target::Origin, None))
        } else {
            let i = (t - 1) % self.snaps.len();
            Some((Target::Snapshot(self.snaps[i].id), Some(i)))
        }
    }

    /// Applies an origin write to the model: snapshots lacking the chunks
    /// take them (possibly overflowing).
    fn model_origin_write(&mut self, off: u64, data: &[u8]) {
        for s in self.snaps.iter_mut().filter(|s| s.valid) {
            if !s.touch(off, data.len() as u64) {
                s.valid = false;
            }
        }
        self.model[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    async fn check_read(&self, t: Target, i: Option<usize>, off: u64, len: u64) {
        let r = self.origin.read(t, off, len).await;
        match i {
            None => {
                let got = r.unwrap();
                assert!(
                    got[..] == self.model[off as usize..(off + len) as usize],
                    "origin read {off}+{len} differs from the model"
                );
            }
            Some(i) => {
                let s = &self.snaps[i];
                if s.valid {
                    let got = r.unwrap_or_else(|e| panic!("snapshot {i} read {off}+{len}: {e}"));
                    assert!(
                        got[..] == s.image[off as usize..(off + len) as usize],
                        "snapshot {i} read {off}+{len} differs from the model"
                    );
                } else {
                    assert!(r.is_err(), "read of invalid snapshot {i} succeeded");
                }
            }
        }
    }

    async fn verify_all(&self) {
        let size = ORIGIN_UNITS * UNIT;
        self.check_read(Target::Origin, None, 0, size).await;
        // Held writes (write-back) make their exceptions, or find a snapshot
        // full, in the background: FLUSH waits for them.
        self.origin.flush().await.unwrap();
        for (i, s) in self.snaps.iter().enumerate() {
            self.check_read(Target::Snapshot(s.id), Some(i), 0, size)
                .await;
            let st = self.origin.status(s.id).unwrap();
            assert_eq!(st.valid, s.valid, "snapshot {i} validity");
            if s.valid {
                assert_eq!(
                    st.exceptions,
                    s.used.len() as u64,
                    "snapshot {i} exception count"
                );
            }
        }
    }

    async fn run(&mut self, step: Step) {
        STEPS.fetch_add(1, Ordering::Relaxed);
        match step {
            Step::Writes(ws) => {
                // Concurrent writes to disjoint ranges of each target.
                let mut taken: Vec<(Target, u64, u64)> = Vec::new();
                let mut ops = Vec::new();
                for (t, off, len, seed) in ws {
                    let (off, len) = self.scale(off, len);
                    let (target, idx) = self.target(t).unwrap();
                    if taken
                        .iter()
                        .any(|&(tt, o, l)| tt == target && o < off + len && off < o + l)
                    {
                        continue;
                    }
                    taken.push((target, off, len));
                    ops.push((target, idx, off, common::pattern(len as usize, seed)));
                }
                // Model first: which snapshots overflow in this batch.
                let before: Vec<bool> = self.snaps.iter().map(|s| s.valid).collect();
                for (_, idx, off, data) in &ops {
                    match idx {
                        None => self.model_origin_write(*off, data),
                        Some(i) => {
                            let s = &mut self.snaps[*i];
                            if s.valid {
                                if s.touch(*off, data.len() as u64) {
                                    s.image[*off as usize..*off as usize + data.len()]
                                        .copy_from_slice(data);
                                } else {
                                    s.valid = false;
                                }
                            }
                        }
                    }
                }
                let origin = &self.origin;
                let results = join_all(ops.iter().map(|(t, _, off, data)| {
                    origin.write(*t, *off, AlignedBuf::from_slice(data), false)
                }))
                .await;
                for ((t, idx, off, _), r) in ops.iter().zip(results) {
                    match idx {
                        None => r.unwrap_or_else(|e| panic!("origin write {off}: {e}")),
                        Some(i) => {
                            let overflowed_now = before[*i] && !self.snaps[*i].valid;
                            if self.snaps[*i].valid {
                                r.unwrap_or_else(|e| panic!("snapshot write {t:?} {off}: {e}"));
                            } else if !overflowed_now {
                                assert!(r.is_err(), "write to invalid snapshot succeeded");
                            }
                        }
                    }
                }
                // A held origin write (write-back) finds its snapshot full
                // in the background; by the next FLUSH at the latest.
                if self.snaps.iter().zip(&before).any(|(s, &b)| b && !s.valid) {
                    self.origin.flush().await.unwrap();
                }
            }
            Step::Read(t, off, len) => {
                let (off, len) = self.scale(off, len);
                let (target, idx) = self.target(t).unwrap();
                self.check_read(target, idx, off, len).await;
            }
            Step::Create {
                chunk_sectors,
                cow_units,
            } => {
                if self.snaps.len() >= 3 {
                    return;
                }
                let cb = u64::from(chunk_sectors) * 512;
                // 0: big enough never to overflow.
                let cow_bytes = if cow_units == 0 {
                    ORIGIN_UNITS * UNIT * 2 + 16 * cb
                } else {
                    cow_units * cb
                };
                self.files += 1;
                let path = common::sparse_file(
                    &self.dir.path().join(format!("cow{}", self.files)),
                    cow_bytes,
                );
                let dev = self.backend.open(&path, true).unwrap();
                let added = self
                    .origin
                    .add_snapshot(
                        dev,
                        SnapshotOptions {
                            chunk_sectors: Some(chunk_sectors),
                            merging: false,
                            size: None,
                        },
                    )
                    .await
                    .unwrap();
                assert!(added.initialised);
                self.snaps.push(ModelSnap {
                    id: added.id,
                    path,
                    image: self.model.clone(),
                    chunk_sectors,
                    cow_bytes,
                    used: HashSet::new(),
                    valid: true,
                });
            }
            Step::Delete(i) => {
                if self.snaps.is_empty() {
                    return;
                }
                let i = i % self.snaps.len();
                let s = self.snaps.remove(i);
                self.origin.delete_snapshot(s.id).await.unwrap();
                std::fs::remove_file(&s.path).unwrap();
            }
            Step::Merge(i, writes) => {
                if self.snaps.is_empty() {
                    return;
                }
                let i = i % self.snaps.len();
                if !self.snaps[i].valid {
                    assert!(self.origin.merge(self.snaps[i].id, |_| {}).await.is_err());
                    return;
                }
                let s = self.snaps.remove(i);
                self.origin.start_merge(s.id).await.unwrap();
                // Every chunk the merge rewrites on the origin is copied into
                // the other snapshots first (which may overflow them).
                let mcb = s.chunk_bytes();
                let size = ORIGIN_UNITS * UNIT;
                for o in self.snaps.iter_mut().filter(|o| o.valid) {
                    for &c in &s.used {
                        let start = c * mcb;
                        if !o.touch(start, mcb.min(size - start)) {
                            o.valid = false;
                        }
                    }
                }
                // From here the origin's content is the snapshot's.
                self.model = s.image.clone();
                let mut ops = Vec::new();
                let mut taken: Vec<(u64, u64)> = Vec::new();
                for (off, len, seed) in writes {
                    let (off, len) = self.scale(off, len);
                    if taken.iter().any(|&(o, l)| o < off + len && off < o + l) {
                        continue;
                    }
                    taken.push((off, len));
                    let data = common::pattern(len as usize, seed);
                    self.model_origin_write(off, &data);
                    ops.push((off, data));
                }
                let origin = self.origin.clone();
                let id = s.id;
                let merge = tokio::spawn(async move { origin.merge(id, |_| {}).await });
                let results = join_all(ops.iter().map(|(off, data)| {
                    self.origin
                        .write(Target::Origin, *off, AlignedBuf::from_slice(data), false)
                }))
                .await;
                for r in results {
                    r.unwrap();
                }
                // Reads during the merge see the merged content.
                self.check_read(Target::Origin, None, 0, ORIGIN_UNITS * UNIT)
                    .await;
                merge.await.unwrap().unwrap();
                assert!(self.origin.status(id).is_err(), "merged snapshot is gone");
                std::fs::remove_file(&s.path).unwrap();
            }
            Step::Restart => self.restart().await,
            Step::Flush => self.origin.flush().await.unwrap(),
        }
    }

    async fn restart(&mut self) {
        // A clean stop: held writes (write-back) reach the devices first.
        self.origin.shutdown().await.unwrap();
        let dev = self.backend.open(&self.origin_path, true).unwrap();
        self.origin = Arc::new(Origin::new(dev).unwrap());
        for s in &mut self.snaps {
            let dev = self.backend.open(&s.path, true).unwrap();
            let added = self
                .origin
                .add_snapshot(dev, SnapshotOptions::default())
                .await
                .unwrap();
            assert!(!added.initialised);
            assert_eq!(added.chunk_sectors, s.chunk_sectors);
            s.id = added.id;
        }
    }
}

fn run_case(steps: Vec<Step>) {
    let rt = common::runtime();
    rt.block_on(async {
        let mut w = World::new(common::backend()).await;
        for step in steps {
            w.run(step).await;
        }
        w.verify_all().await;
        w.restart().await;
        w.verify_all().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(steps in prop::collection::vec(step(), 1..40)) {
        run_case(steps);
    }
}

#[test]
fn report_model_steps() {
    // Runs a fixed long workload so every run counts a known minimum, and
    // prints the number of model steps this test binary executed.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let steps = prop::collection::vec(step(), 150)
        .new_tree(&mut runner)
        .unwrap()
        .current();
    run_case(steps);
    eprintln!(
        "model steps executed by this binary so far: {}",
        STEPS.load(Ordering::Relaxed)
    );
}
