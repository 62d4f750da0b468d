//! `PStore::format_zeroed` (and `Origin::add_new_snapshot` over it), the
//! one-write format a snapshot create uses on a device it has just made
//! all zero: it writes exactly what the two-step format of `PStore::open`
//! writes (so the kernel reads it the same, and data dirs stay as they
//! were), the device it leaves loads as a valid empty store, a torn write
//! of it leaves a device that is new or formatted (never refused), and a
//! snapshot attached that way copies on write and keeps its content across
//! a reload.

mod common;

use cowsnap_store::format::HeaderState;
use cowsnap_store::pstore::PStore;
use cowsnap_store::scan::read_header;
use cowsnap_store::{AlignedBuf, Origin, SnapshotOptions, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHUNK_SECTORS: u32 = 16;
const CHUNK: usize = CHUNK_SECTORS as usize * 512;
const DEV_BYTES: u64 = 64 * CHUNK as u64;

fn first_chunks(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()[..2 * CHUNK].to_vec()
}

#[test]
fn format_zeroed_writes_what_the_two_step_format_writes() {
    let rt = common::runtime();
    let backend = common::backend();
    let dir = common::scratch();
    let one = common::sparse_file(&dir.path().join("one.cow"), DEV_BYTES);
    let two = common::sparse_file(&dir.path().join("two.cow"), DEV_BYTES);
    rt.block_on(async {
        let o = PStore::format_zeroed(backend.open(&one, true).unwrap(), Some(CHUNK_SECTORS))
            .await
            .unwrap();
        assert!(o.initialised && o.exceptions == 0 && o.store.is_valid());
        let t = PStore::open(
            backend.open(&two, true).unwrap(),
            Some(CHUNK_SECTORS),
            None,
            |_| true,
        )
        .await
        .unwrap();
        assert!(t.initialised);
    });
    let (a, b) = (first_chunks(&one), first_chunks(&two));
    assert_eq!(a, b, "header chunk and area 0 are the same bytes");
    assert_eq!(&a[0..4], &0x7041_6e53u32.to_le_bytes(), "the SnAp magic");
    assert!(a[CHUNK..].iter().all(|&b| b == 0), "area 0 is zero");
    // It loads back as an existing, valid, empty store.
    rt.block_on(async {
        let l = PStore::open(backend.open(&one, true).unwrap(), None, None, |_| true)
            .await
            .unwrap();
        assert!(!l.initialised, "loaded, not formatted again");
        assert_eq!(l.exceptions, 0);
        assert_eq!(l.store.layout().chunk_sectors(), CHUNK_SECTORS);
        assert!(l.store.is_valid());
    });
}

/// A write is atomic per 512-byte sector at best (M1): any subset of the
/// format's sectors landing on the all-zero device leaves a device whose
/// header is new (the create is redone or its file discarded) or whole,
/// over an area 0 that reads zero. Either way it opens, with no exception.
#[test]
fn a_torn_format_leaves_a_new_or_a_formatted_device() {
    let rt = common::runtime();
    let backend = common::backend();
    let dir = common::scratch();
    let whole = common::sparse_file(&dir.path().join("whole.cow"), DEV_BYTES);
    rt.block_on(async {
        PStore::format_zeroed(backend.open(&whole, true).unwrap(), Some(CHUNK_SECTORS))
            .await
            .unwrap();
    });
    let image = first_chunks(&whole);
    let (mut new, mut formatted) = (0, 0);
    for seed in 0..64u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let path = common::sparse_file(&dir.path().join(format!("torn{seed}.cow")), DEV_BYTES);
        let mut torn = vec![0u8; 2 * CHUNK];
        for s in 0..2 * CHUNK / 512 {
            if rng.random_bool(0.5) {
                torn[s * 512..(s + 1) * 512].copy_from_slice(&image[s * 512..(s + 1) * 512]);
            }
        }
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..2 * CHUNK].copy_from_slice(&torn);
        std::fs::write(&path, &bytes).unwrap();
        rt.block_on(async {
            let dev = backend.open(&path, true).unwrap();
            match read_header(&dev).await.unwrap() {
                HeaderState::New => new += 1,
                HeaderState::Existing(h) => {
                    assert!(h.valid, "seed {seed}");
                    formatted += 1;
                }
            }
            let o = PStore::open(dev, Some(CHUNK_SECTORS), None, |_| true)
                .await
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert_eq!(o.exceptions, 0, "seed {seed}");
            assert!(o.store.is_valid(), "seed {seed}");
        });
    }
    assert!(
        new > 0 && formatted > 0,
        "both outcomes seen: {new} new, {formatted} formatted"
    );
}

/// A snapshot attached with `add_new_snapshot` works as one attached with
/// `add_snapshot`: the origin's writes copy the old data into it, and a
/// reload of its COW device (as a restart does) reads the same.
#[test]
fn a_snapshot_added_new_copies_on_write_and_reloads() {
    let rt = common::runtime();
    let backend = common::backend();
    let dir = common::scratch();
    let origin_path = common::pattern_file(&dir.path().join("origin"), 32 * CHUNK as u64, 7);
    let cow = common::sparse_file(&dir.path().join("s.cow"), DEV_BYTES);
    let before = std::fs::read(&origin_path).unwrap();
    rt.block_on(async {
        let origin = Origin::new(backend.open(&origin_path, true).unwrap()).unwrap();
        let a = origin
            .add_new_snapshot(backend.open(&cow, true).unwrap(), Some(CHUNK_SECTORS))
            .await
            .unwrap();
        assert!(a.initialised);
        let new = common::pattern(3 * CHUNK, 9);
        origin
            .write(
                Target::Origin,
                CHUNK as u64,
                AlignedBuf::from_slice(&new),
                true,
            )
            .await
            .unwrap();
        let snap = origin
            .read(Target::Snapshot(a.id), 0, 8 * CHUNK as u64)
            .await
            .unwrap();
        assert_eq!(&snap[..], &before[..8 * CHUNK]);
        origin.delete_snapshot(a.id).await.unwrap();
        // Reloaded from its device.
        let b = origin
            .add_snapshot(
                backend.open(&cow, true).unwrap(),
                SnapshotOptions {
                    chunk_sectors: None,
                    merging: false,
                    size: None,
                },
            )
            .await
            .unwrap();
        assert!(!b.initialised);
        assert_eq!(b.exceptions, 3);
        let snap = origin
            .read(Target::Snapshot(b.id), 0, 8 * CHUNK as u64)
            .await
            .unwrap();
        assert_eq!(&snap[..], &before[..8 * CHUNK]);
    });
}
