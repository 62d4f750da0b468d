//! The write-back path (D13 of docs/design.md): plain origin writes that
//! need copy-on-write are acknowledged while held in memory. Reads see held
//! data and snapshots never do, overlapping writes reach the device in
//! order, FLUSH and FUA make exactly what they must durable, the cap holds
//! under a storm, a failure surfaces at the next FLUSH, and a snapshot taken
//! after held writes contains them. Real files, on the backend under test
//! (`COWSNAP_IO`), or on the fault-injecting layer where a failure or a
//! power cut is the point.

mod common;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cowsnap_store::io::fault::{FailRule, FaultController, FaultOp};
use cowsnap_store::{AlignedBuf, Error, HeldBudget, Origin, SnapId, SnapshotOptions, Target};
use futures::future::join_all;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CB: u64 = 4096;
const OPTS: SnapshotOptions = SnapshotOptions {
    chunk_sectors: Some(8),
    merging: false,
    size: None,
};

/// An origin file of `chunks` 4 KiB chunks holding pattern 1, and a COW
/// file big enough for all of them.
fn files(dir: &Path, chunks: u64) -> (PathBuf, PathBuf) {
    (
        common::pattern_file(&dir.join("vol-a"), chunks * CB, 1),
        common::sparse_file(&dir.join("snap-a"), 2 * chunks * CB + 64 * CB),
    )
}

async fn snapshot(o: &Origin, dev: cowsnap_store::Device) -> SnapId {
    o.add_snapshot(dev, OPTS).await.unwrap().id
}

fn fill(len: u64, v: u8) -> AlignedBuf {
    AlignedBuf::from_slice(&vec![v; len as usize])
}

/// The origin on `origin_path` and a snapshot on `cow_path`, both behind
/// a new fault layer.
async fn on_faults(origin_path: &Path, cow_path: &Path) -> (FaultController, Origin, SnapId) {
    let ctl = FaultController::new();
    let o = Origin::new(ctl.open(origin_path).unwrap()).unwrap();
    let s = snapshot(&o, ctl.open(cow_path).unwrap()).await;
    (ctl, o, s)
}

/// The origin on `path` as a fresh engine on the backend under test sees
/// it (after a shutdown or a power cut).
fn reopened(path: &Path) -> Origin {
    Origin::new(common::backend().open(path, true).unwrap()).unwrap()
}

/// Asserts that every byte of chunk `c` of `img` is `byte(c)`, for each
/// `c` in `chunks`.
fn assert_chunks(img: &[u8], chunks: Range<u64>, byte: impl Fn(u64) -> u8, what: &str) {
    for c in chunks {
        let at = (c * CB) as usize;
        assert!(
            img[at..at + CB as usize].iter().all(|&x| x == byte(c)),
            "{what}: chunk {c}"
        );
    }
}

#[test]
fn reads_see_held_writes_snapshots_never_do_and_a_lost_one_fails_the_next_flush() {
    let dir = common::scratch();
    let (origin_path, cow_path) = files(dir.path(), 16);
    let old = common::pattern(16 * CB as usize, 1);
    common::runtime().block_on(async {
        let (ctl, o, s) = on_faults(&origin_path, &cow_path).await;
        // Every write to the origin file fails from now on: held data that
        // a read returns can only come from memory.
        ctl.add_rule(FailRule {
            device: "vol-a".into(),
            op: Some(FaultOp::Write),
            skip: 0,
            count: u64::MAX,
        });
        o.write(Target::Origin, 4 * CB, fill(2 * CB, 0xaa), false)
            .await
            .expect("a plain write needing copies is acknowledged once held");
        // No await since: the batch has not run (current-thread runtime).
        let st = o.writeback_stats();
        assert_eq!((st.held_writes, st.held_bytes), (1, 2 * CB), "{st:?}");
        // Its copies have not started, yet the snapshot's delta against the
        // origin covers it.
        let d = o.delta(s, None).unwrap();
        assert_eq!(d.spans, vec![(4 * CB, 6 * CB)]);
        let got = o.read(Target::Origin, 3 * CB, 4 * CB).await.unwrap();
        assert_eq!(&got[..CB as usize], &old[3 * CB as usize..4 * CB as usize]);
        assert!(
            got[CB as usize..3 * CB as usize].iter().all(|&b| b == 0xaa),
            "origin read of held bytes returns the held data"
        );
        assert_eq!(
            &got[3 * CB as usize..],
            &old[6 * CB as usize..7 * CB as usize]
        );
        let snap = o.read(Target::Snapshot(s), 0, 16 * CB).await.unwrap();
        assert!(snap[..] == old[..], "a snapshot read never sees held data");
        // The origin write failed in the background: the next FLUSH says so,
        // naming the region, once.
        let e = o.flush().await.expect_err("the lost write fails the flush");
        assert!(
            matches!(e, Error::WriteBack { offset, len, .. } if offset == 4 * CB && len == 2 * CB),
            "{e}"
        );
        assert_eq!(e.errno(), libc::EIO);
        o.flush().await.expect("reported once");
        assert_eq!(o.writeback_stats().failed, 1);
        let got = o.read(Target::Origin, 4 * CB, 2 * CB).await.unwrap();
        assert!(
            got[..] == old[4 * CB as usize..6 * CB as usize],
            "not held any more"
        );
        // The snapshot took its copies before the origin write was tried.
        let snap = o.read(Target::Snapshot(s), 0, 16 * CB).await.unwrap();
        assert!(snap[..] == old[..]);
    });
}

#[test]
fn a_fua_write_reports_an_earlier_lost_write() {
    let dir = common::scratch();
    let (origin_path, cow_path) = files(dir.path(), 16);
    common::runtime().block_on(async {
        let (ctl, o, _) = on_faults(&origin_path, &cow_path).await;
        ctl.add_rule(FailRule {
            device: "vol-a".into(),
            op: Some(FaultOp::Write),
            skip: 0,
            count: 1,
        });
        o.write(Target::Origin, 0, fill(CB, 0xaa), false)
            .await
            .unwrap();
        while o.writeback_stats().held_bytes > 0 {
            tokio::task::yield_now().await;
        }
        let e = o
            .write(Target::Origin, 8 * CB, fill(CB, 0xbb), true)
            .await
            .expect_err("the FUA write reports the lost one");
        assert!(matches!(e, Error::WriteBack { offset: 0, .. }), "{e}");
        // The FUA write itself is done.
        let got = o.read(Target::Origin, 8 * CB, CB).await.unwrap();
        assert!(got.iter().all(|&b| b == 0xbb));
        o.flush().await.expect("reported once");
    });
}

/// Random overlapping writes, all acknowledged before any reaches the
/// device: reads follow the newest, and after FLUSH the device itself (read
/// by a fresh engine) holds the newest byte everywhere; the snapshot keeps
/// the old content.
#[test]
fn overlapping_held_writes_reach_the_device_newest_last() {
    let chunks = 64u64;
    let dir = common::scratch();
    let (origin_path, cow_path) = files(dir.path(), chunks);
    let old = common::pattern((chunks * CB) as usize, 1);
    let b = common::backend();
    let mut model = old.clone();
    common::runtime().block_on(async {
        let o = Arc::new(Origin::new(b.open(&origin_path, true).unwrap()).unwrap());
        let s = snapshot(&o, b.open(&cow_path, true).unwrap()).await;
        let mut rng = StdRng::seed_from_u64(7);
        for i in 0..400u32 {
            let blocks = rng.random_range(1..=6u64);
            let off = rng.random_range(0..chunks * 8 - blocks) * 512;
            let len = blocks * 512;
            let data = common::pattern(len as usize, 1000 + u64::from(i));
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
            o.write(Target::Origin, off, AlignedBuf::from_slice(&data), false)
                .await
                .unwrap();
            if i % 50 == 49 {
                let got = o.read(Target::Origin, 0, chunks * CB).await.unwrap();
                assert!(got[..] == model[..], "read after write {i}");
            }
        }
        let st = o.writeback_stats();
        assert!(st.held_writes > 0, "{st:?}");
        o.flush().await.unwrap();
        assert_eq!(o.writeback_stats().held_bytes, 0);
        let got = o.read(Target::Origin, 0, chunks * CB).await.unwrap();
        assert!(got[..] == model[..]);
        let snap = o.read(Target::Snapshot(s), 0, chunks * CB).await.unwrap();
        assert!(snap[..] == old[..], "the snapshot kept its content");
        o.shutdown().await.unwrap();
        let dev = reopened(&origin_path)
            .read(Target::Origin, 0, chunks * CB)
            .await
            .unwrap();
        assert!(
            dev[..] == model[..],
            "the device has the newest byte everywhere"
        );
    });
}

/// A power cut right after FLUSH (or a FUA write) returns loses nothing of
/// what it covers, though every write was acknowledged while held.
#[test]
fn flush_and_fua_make_held_writes_durable() {
    for seed in 0..8u64 {
        let dir = common::scratch();
        let (origin_path, cow_path) = files(dir.path(), 32);
        let old = common::pattern(32 * CB as usize, 1);
        common::runtime().block_on(async {
            let (ctl, o, s) = on_faults(&origin_path, &cow_path).await;
            // Plain writes to chunks 0..8, then FLUSH.
            for c in 0..8 {
                o.write(Target::Origin, c * CB, fill(CB, 0x10 + c as u8), false)
                    .await
                    .unwrap();
            }
            assert!(o.writeback_stats().held_bytes > 0);
            o.flush().await.unwrap();
            // A FUA write to a new chunk, and one over a held plain write.
            o.write(Target::Origin, 20 * CB, fill(CB, 0x20), true)
                .await
                .unwrap();
            o.write(Target::Origin, 24 * CB, fill(2 * CB, 0x30), false)
                .await
                .unwrap();
            o.write(Target::Origin, 25 * CB, fill(CB, 0x31), true)
                .await
                .unwrap();
            let mut rng = StdRng::seed_from_u64(seed);
            ctl.crash(&mut rng).unwrap();
            let o = reopened(&origin_path);
            let s2 = o
                .add_snapshot(common::backend().open(&cow_path, true).unwrap(), OPTS)
                .await
                .unwrap();
            assert_eq!(s2.id, s);
            let got = o.read(Target::Origin, 0, 32 * CB).await.unwrap();
            assert_chunks(
                &got,
                0..8,
                |c| 0x10 + c as u8,
                &format!("seed {seed}: written before the FLUSH, lost"),
            );
            assert_chunks(
                &got,
                20..21,
                |_| 0x20,
                &format!("seed {seed}: FUA write lost"),
            );
            assert_chunks(
                &got,
                25..26,
                |_| 0x31,
                &format!("seed {seed}: FUA write over a held write lost"),
            );
            // Chunk 24 (plain, after the FLUSH) may hold the old or the new
            // data, in each sector (a cut tears writes).
            for sec in (24 * CB as usize..25 * CB as usize).step_by(512) {
                let got = &got[sec..sec + 512];
                assert!(
                    got == &old[sec..sec + 512] || got.iter().all(|&x| x == 0x30),
                    "seed {seed}: byte {sec} holds neither the old nor the new data"
                );
            }
            let snap = o.read(Target::Snapshot(s), 0, 32 * CB).await.unwrap();
            assert!(
                snap[..] == old[..],
                "seed {seed}: the cut changed the snapshot"
            );
        });
    }
}

/// A first-touch storm far bigger than the cap: every write succeeds, the
/// held bytes never pass the cap, and all of it lands.
#[test]
fn held_bytes_never_pass_the_cap() {
    let chunks = 1024u64; // 4 MiB
    let cap = 64 * 1024;
    let dir = common::scratch();
    let (origin_path, cow_path) = files(dir.path(), chunks);
    let b = common::backend();
    common::runtime().block_on(async {
        let o = Arc::new(Origin::new(b.open(&origin_path, true).unwrap()).unwrap());
        snapshot(&o, b.open(&cow_path, true).unwrap()).await;
        o.set_writeback_cap(cap);
        let writes = (0..chunks).map(|c| {
            let o = o.clone();
            async move {
                o.write(Target::Origin, c * CB, fill(CB, c as u8), false)
                    .await
            }
        });
        for r in join_all(writes).await {
            r.expect("past the cap a write waits, it does not fail");
        }
        let st = o.writeback_stats();
        assert_eq!(st.held_writes, chunks, "{st:?}");
        assert!(
            st.max_held_bytes <= cap,
            "held {} > cap {cap}",
            st.max_held_bytes
        );
        assert!(
            st.max_held_bytes >= cap / 2,
            "the storm filled the cap: {st:?}"
        );
        o.flush().await.unwrap();
        let got = o.read(Target::Origin, 0, chunks * CB).await.unwrap();
        assert_chunks(&got, 0..chunks, |c| c as u8, "after the storm");
    });
}

/// Two engines sharing one budget (a worker's volumes): storms on both at
/// once never hold more than the budget together, every write succeeds,
/// and all of it lands on each origin.
#[test]
fn engines_sharing_a_budget_never_hold_more_than_it_together() {
    let chunks = 512u64; // 2 MiB per volume
    let cap = 64 * 1024;
    let dir = common::scratch();
    let b = common::backend();
    let budget = HeldBudget::new(cap);
    common::runtime().block_on(async {
        let mut origins = Vec::new();
        for name in ["a", "b"] {
            let origin_path =
                common::pattern_file(&dir.path().join(format!("vol-{name}")), chunks * CB, 1);
            let cow_path = common::sparse_file(
                &dir.path().join(format!("snap-{name}")),
                2 * chunks * CB + 64 * CB,
            );
            let o = Arc::new(Origin::new(b.open(&origin_path, true).unwrap()).unwrap());
            snapshot(&o, b.open(&cow_path, true).unwrap()).await;
            o.share_writeback_budget(budget.clone());
            origins.push(o);
        }
        let writes = origins.iter().enumerate().flat_map(|(i, o)| {
            (0..chunks).map(move |c| {
                let o = o.clone();
                async move {
                    o.write(
                        Target::Origin,
                        c * CB,
                        fill(CB, (c as u8) ^ (i as u8 * 0x80)),
                        false,
                    )
                    .await
                }
            })
        });
        for r in join_all(writes).await {
            r.expect("past the shared cap a write waits, it does not fail");
        }
        assert!(
            budget.max_used() <= cap,
            "held {} > cap {cap}",
            budget.max_used()
        );
        assert!(
            budget.max_used() >= cap / 2,
            "the storms filled the cap: {}",
            budget.max_used()
        );
        for (i, o) in origins.iter().enumerate() {
            let st = o.writeback_stats();
            assert_eq!(st.held_writes, chunks, "{st:?}");
            assert_eq!(st.cap, cap, "{st:?}");
            o.flush().await.unwrap();
            let got = o.read(Target::Origin, 0, chunks * CB).await.unwrap();
            assert_chunks(
                &got,
                0..chunks,
                |c| (c as u8) ^ (i as u8 * 0x80),
                "after the storms",
            );
        }
        assert_eq!(budget.used(), 0, "everything reached its origin");
    });
}

/// Writes acknowledged (held) before a snapshot is taken are in it, and
/// durable once creation returns: creation drains and flushes first.
#[test]
fn a_snapshot_taken_after_held_writes_contains_them() {
    let dir = common::scratch();
    let (origin_path, cow_path) = files(dir.path(), 32);
    let cow2_path = common::sparse_file(&dir.path().join("snap-b"), 128 * CB);
    let old = common::pattern(32 * CB as usize, 1);
    common::runtime().block_on(async {
        let (ctl, o, s1) = on_faults(&origin_path, &cow_path).await;
        for c in 0..16 {
            o.write(Target::Origin, c * CB, fill(CB, 0x40 + c as u8), false)
                .await
                .unwrap();
        }
        assert!(o.writeback_stats().held_bytes > 0);
        let s2 = snapshot(&o, ctl.open(&cow2_path).unwrap()).await;
        assert_eq!(o.writeback_stats().held_bytes, 0, "creation drained them");
        let img = o.read(Target::Snapshot(s2), 0, 32 * CB).await.unwrap();
        assert_chunks(&img, 0..16, |c| 0x40 + c as u8, "the new snapshot");
        let img1 = o.read(Target::Snapshot(s1), 0, 32 * CB).await.unwrap();
        assert!(img1[..] == old[..]);
        // Power cut right after creation: the origin content it captured is
        // durable.
        ctl.crash(&mut StdRng::seed_from_u64(1)).unwrap();
        let got = reopened(&origin_path)
            .read(Target::Origin, 0, 16 * CB)
            .await
            .unwrap();
        assert_chunks(&got, 0..16, |c| 0x40 + c as u8, "the origin after the cut");
    });
}
