//! The flush + write request (`Device::flush_write`, M5 of docs/design.md)
//! that carries a commit's area write: on both real backends it writes the
//! data and refuses bad requests with an error; through the fault layer a
//! power cut can fall between its flush and its write, and what it leaves
//! is what a cut between the two halves of a linked pair leaves on a disk.

mod common;

use std::path::{Path, PathBuf};

use cowsnap_store::io::fault::FaultController;
use cowsnap_store::{AlignedBuf, Backend, BackendChoice, Device, Error};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::runtime::Runtime;

const BLOCK: usize = 4096;

/// The portable backend, and io_uring with each form of a flush + write
/// (the linked pair, and one job on its sync threads) whatever this disk
/// would pick, as (backend, form, name).
fn backends() -> Vec<(Backend, Option<bool>, &'static str)> {
    let mut v = vec![(
        Backend::start(BackendChoice::Portable).unwrap(),
        None,
        "portable",
    )];
    // Where io_uring is refused (seccomp), the portable backend alone runs.
    if let Ok(r) = Backend::start(BackendChoice::Uring) {
        v.push((r.clone(), Some(true), "io_uring, linked pair"));
        v.push((r, Some(false), "io_uring, sync threads"));
    }
    v
}

fn read_file(path: &Path, off: usize, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[off..off + len].to_vec()
}

/// What both power-cut tests start from: a 16-block file behind the fault
/// layer, with block 4 written (`copy`, from `seed`) and not flushed.
struct Unflushed {
    _dir: tempfile::TempDir,
    path: PathBuf,
    ctl: FaultController,
    dev: Device,
    copy: Vec<u8>,
}

fn unflushed(rt: &Runtime, seed: u64) -> Unflushed {
    let dir = common::scratch();
    let path = common::sparse_file(&dir.path().join("cow"), 16 * BLOCK as u64);
    let ctl = FaultController::new();
    let dev = ctl.open(&path).unwrap();
    let copy = common::pattern(BLOCK, 10 + seed);
    rt.block_on(dev.write(4 * BLOCK as u64, AlignedBuf::from_slice(&copy), false))
        .unwrap();
    Unflushed {
        _dir: dir,
        path,
        ctl,
        dev,
        copy,
    }
}

/// The flush + write of an area block (block 1) that a power cut stops.
async fn cut_flush_write(dev: &Device) -> Error {
    dev.flush_write(
        BLOCK as u64,
        AlignedBuf::from_slice(&common::pattern(BLOCK, 99)),
    )
    .await
    .unwrap_err()
}

#[test]
fn flush_write_writes_its_data_on_every_backend() {
    let rt = common::runtime();
    for (backend, linked, name) in backends() {
        let dir = common::scratch();
        let path = common::sparse_file(&dir.path().join("dev"), 512 * BLOCK as u64);
        let dev = backend.open_as(&path, true, linked).unwrap();
        rt.block_on(async {
            let plain = common::pattern(BLOCK, 1);
            dev.write(0, AlignedBuf::from_slice(&plain), false)
                .await
                .unwrap();
            // One block, then 1 MiB (more than one block in one request).
            let one = common::pattern(BLOCK, 2);
            let back = dev
                .flush_write(8 * BLOCK as u64, AlignedBuf::from_slice(&one))
                .await
                .unwrap();
            assert_eq!(&back[..], &one[..], "{}: the buffer comes back", name);
            let big = common::pattern(256 * BLOCK / 16, 3).repeat(16);
            dev.flush_write(16 * BLOCK as u64, AlignedBuf::from_slice(&big))
                .await
                .unwrap();
            assert_eq!(read_file(&path, 0, BLOCK), plain, "{}", name);
            assert_eq!(read_file(&path, 8 * BLOCK, BLOCK), one, "{}", name);
            assert_eq!(read_file(&path, 16 * BLOCK, big.len()), big, "{}", name);
        });
    }
}

#[test]
fn a_bad_flush_write_is_an_error_not_a_panic() {
    let rt = common::runtime();
    for (backend, linked, name) in backends() {
        let dir = common::scratch();
        let path = common::sparse_file(&dir.path().join("dev"), 8 * BLOCK as u64);
        let dev = backend.open_as(&path, true, linked).unwrap();
        let ro = backend.open_as(&path, false, linked).unwrap();
        rt.block_on(async {
            let e = dev
                .flush_write(100, AlignedBuf::zeroed(BLOCK))
                .await
                .unwrap_err();
            assert!(matches!(e, Error::Misaligned { .. }), "{}: {e}", name);
            let e = dev
                .flush_write(8 * BLOCK as u64, AlignedBuf::zeroed(BLOCK))
                .await
                .unwrap_err();
            assert!(matches!(e, Error::OutOfRange { .. }), "{}: {e}", name);
            let e = ro
                .flush_write(0, AlignedBuf::zeroed(BLOCK))
                .await
                .unwrap_err();
            assert!(
                e.to_string().contains("flush + write") && e.to_string().contains("Read-only"),
                "{}: {e}",
                name
            );
        });
    }
}

/// A plain write, then a flush + write whose write half the power cut
/// stops: the flush half made the plain write durable, so no crash drops
/// it, and the area write never reached the disk.
#[test]
fn a_cut_between_the_flush_and_the_write_keeps_the_flush_only() {
    let rt = common::runtime();
    for seed in 0..32 {
        let u = unflushed(&rt, seed);
        let (path, ctl, copy) = (&u.path, &u.ctl, &u.copy);
        ctl.cut_after(1);
        let e = rt.block_on(cut_flush_write(&u.dev));
        assert!(e.to_string().contains("Input/output error"), "{e}");
        assert!(ctl.is_cut());
        assert_eq!(ctl.ops(), 2, "the plain write and the flush half ran");
        let (kept, dropped) = ctl.crash(&mut StdRng::seed_from_u64(seed)).unwrap();
        assert_eq!(
            (kept, dropped),
            (0, 0),
            "nothing was volatile after the flush"
        );
        assert_eq!(read_file(path, 4 * BLOCK, BLOCK), *copy, "seed {seed}");
        assert_eq!(read_file(path, BLOCK, BLOCK), vec![0; BLOCK], "seed {seed}");
    }
}

/// A cut at the flush half: the write half never runs, and the plain write
/// before it may or may not survive (it was never flushed), sector by
/// sector.
#[test]
fn a_cut_at_the_flush_loses_the_write_and_may_lose_what_was_unflushed() {
    let rt = common::runtime();
    let (mut survived, mut lost) = (0, 0);
    for seed in 0..32 {
        let u = unflushed(&rt, seed);
        let (path, ctl, copy) = (&u.path, &u.ctl, &u.copy);
        ctl.cut_after(0);
        rt.block_on(cut_flush_write(&u.dev));
        assert_eq!(ctl.ops(), 1, "only the plain write ran");
        let (kept, dropped) = ctl.crash(&mut StdRng::seed_from_u64(seed)).unwrap();
        assert_eq!(kept + dropped, (BLOCK / 512) as u64);
        let got = read_file(path, 4 * BLOCK, BLOCK);
        for (s, (g, c)) in got.chunks(512).zip(copy.chunks(512)).enumerate() {
            if g == c {
                survived += 1;
            } else {
                assert_eq!(
                    g,
                    &[0u8; 512][..],
                    "seed {seed} sector {s}: old or new, nothing else"
                );
                lost += 1;
            }
        }
        assert_eq!(read_file(path, BLOCK, BLOCK), vec![0; BLOCK], "seed {seed}");
    }
    assert!(
        survived > 0 && lost > 0,
        "{survived} sectors survived, {lost} lost"
    );
}
