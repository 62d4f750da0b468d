//! Corrupt input: valid COW images built with the engine (several chunk
//! sizes, exceptions over more than one metadata area, one exactly full
//! area) are damaged by many random mutations: random bytes, bit flips in
//! the header and in records, garbage in area tails, special values in
//! records (terminator, metadata chunks, past the end, duplicates), zeroed
//! areas, truncation. For each mutated image:
//!
//! - nothing panics: not the header decoder, not `scan_areas` collecting
//!   every problem, not the loader (`PStore::open`, `Origin::add_snapshot`);
//! - the loader accepts the image exactly when the full scan finds no
//!   problem but bytes after the end of the list in the last area (a torn
//!   metadata write, read as the kernel reads it), and the header and
//!   geometry are usable;
//! - an accepted image holds exactly the records an independent decoder
//!   reads from the bytes, and the snapshot reads what those records say
//!   (the COW chunk where a record maps the origin chunk, the origin
//!   elsewhere); an accepted image whose header says invalid fails its I/O.
//!
//! Seeds are fixed, so a failure names the image and mutation to replay.

mod common;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cowsnap_store::format::{HeaderState, Layout};
use cowsnap_store::pstore::PStore;
use cowsnap_store::scan::{ScanOptions, read_header, scan_areas};
use cowsnap_store::{
    AlignedBuf, Backend, BackendChoice, Device, Error, Origin, SnapshotOptions, Target,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Mutations per image.
const MUTATIONS: u64 = 100;

/// One valid image and its origin.
struct Image {
    name: String,
    chunk_sectors: u32,
    origin: Device,
    origin_bytes: Vec<u8>,
    /// The COW device as the engine left it.
    pristine: Vec<u8>,
    /// The working copy the mutations are applied to.
    work: PathBuf,
}

impl Image {
    fn cb(&self) -> u64 {
        u64::from(self.chunk_sectors) * 512
    }
    fn layout(&self) -> Layout {
        Layout::new(self.chunk_sectors).unwrap()
    }
}

/// Builds an image: an origin of `origin_chunks` chunks (plus `tail` bytes
/// of a partial last chunk), a snapshot on a COW device of `cow_chunks`
/// chunks, then `exceptions` origin chunks written in a shuffled order
/// (every seventh through the snapshot instead, with a partial write).
async fn build(
    backend: &Backend,
    dir: &Path,
    chunk_sectors: u32,
    origin_chunks: u64,
    tail: u64,
    exceptions: u64,
    cow_chunks: u64,
) -> Image {
    let cb = u64::from(chunk_sectors) * 512;
    let name = format!("chunk{chunk_sectors}-x{exceptions}");
    let origin_path = common::pattern_file(
        &dir.join(format!("{name}.origin")),
        origin_chunks * cb + tail,
        u64::from(chunk_sectors),
    );
    let cow_path = common::sparse_file(&dir.join(format!("{name}.cow")), cow_chunks * cb);
    {
        let origin = Origin::new(backend.open(&origin_path, true).unwrap()).unwrap();
        let opts = SnapshotOptions {
            chunk_sectors: Some(chunk_sectors),
            merging: false,
            size: None,
        };
        let id = origin
            .add_snapshot(backend.open(&cow_path, true).unwrap(), opts)
            .await
            .unwrap()
            .id;
        let mut rng = StdRng::seed_from_u64(u64::from(chunk_sectors));
        let mut chunks: Vec<u64> = (0..origin_chunks).collect();
        for i in (1..chunks.len()).rev() {
            chunks.swap(i, rng.random_range(0..=i));
        }
        for (i, &c) in chunks.iter().take(exceptions as usize).enumerate() {
            let data = AlignedBuf::from_slice(&common::pattern(cb as usize, 1000 + c));
            if i % 7 == 3 {
                // Through the snapshot, partly: the rest is copied from the origin.
                let half = AlignedBuf::from_slice(&data[..cb as usize / 2]);
                origin
                    .write(Target::Snapshot(id), c * cb, half, false)
                    .await
                    .unwrap();
            } else {
                origin
                    .write(Target::Origin, c * cb, data, false)
                    .await
                    .unwrap();
            }
        }
        origin.flush().await.unwrap();
        assert_eq!(origin.status(id).unwrap().exceptions, exceptions);
    }
    let work = dir.join(format!("{name}.work"));
    std::fs::copy(&cow_path, &work).unwrap();
    Image {
        name,
        chunk_sectors,
        origin: backend.open(&origin_path, false).unwrap(),
        origin_bytes: std::fs::read(&origin_path).unwrap(),
        pristine: std::fs::read(&cow_path).unwrap(),
        work,
    }
}

/// The records of an image as the format defines them, decoded from the
/// bytes without the store: areas from 0 until one is not full (or the
/// device ends), records until `new_chunk == 0`.
fn raw_records(img: &[u8], chunk_sectors: u32) -> Vec<(u64, u64)> {
    let cb = u64::from(chunk_sectors) * 512;
    let per_area = cb / 16;
    let mut out = Vec::new();
    for area in 0.. {
        let at = (1 + area * (per_area + 1)) * cb;
        if at + cb > img.len() as u64 {
            break;
        }
        let mut full = true;
        for i in 0..per_area {
            let r = (at + i * 16) as usize;
            let old = u64::from_le_bytes(img[r..r + 8].try_into().unwrap());
            let new = u64::from_le_bytes(img[r + 8..r + 16].try_into().unwrap());
            if new == 0 {
                full = false;
                break;
            }
            out.push((old, new));
        }
        if !full {
            break;
        }
    }
    out
}

/// A mutation: byte patches and an optional truncation, on the image bytes.
#[derive(Debug, Default)]
struct Mutation {
    what: Vec<String>,
    patches: Vec<(u64, Vec<u8>)>,
    truncate: Option<u64>,
}

impl Mutation {
    fn patch(&mut self, off: u64, bytes: Vec<u8>, what: String) {
        self.patches.push((off, bytes));
        self.what.push(what);
    }

    fn apply(&self, pristine: &[u8]) -> Vec<u8> {
        let mut img = pristine.to_vec();
        for (off, bytes) in &self.patches {
            let off = *off as usize;
            if off < img.len() {
                let n = bytes.len().min(img.len() - off);
                img[off..off + n].copy_from_slice(&bytes[..n]);
            }
        }
        if let Some(len) = self.truncate {
            img.truncate(len as usize);
        }
        img
    }
}

/// Picks one random mutation of `img` (a valid image with `records`).
fn one_mutation(rng: &mut StdRng, img: &Image, records: &[(u64, u64)], m: &mut Mutation) {
    let cb = img.cb();
    let layout = img.layout();
    let len = img.pristine.len() as u64;
    let per_area = layout.exceptions_per_area();
    let areas = records.len() as u64 / per_area + 1;
    let device_chunks = len / cb;
    let origin_chunks = (img.origin_bytes.len() as u64).div_ceil(cb);
    let record_at = |i: u64| layout.area_offset(i / per_area) + (i % per_area) * 16;
    let any_record = |rng: &mut StdRng| rng.random_range(0..records.len() as u64 + 2);
    match rng.random_range(0..10) {
        0 => {
            // Random bytes somewhere in the metadata: header or an area.
            let chunk = if rng.random_bool(0.2) {
                0
            } else {
                layout.area_location(rng.random_range(0..=areas))
            };
            let off = chunk * cb + rng.random_range(0..cb.min(64 + records.len() as u64 * 16));
            let n = rng.random_range(1..=16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            m.patch(off, bytes, format!("random bytes at {off}"));
        }
        1 => {
            // A bit flip in the header's 16 bytes.
            let byte = rng.random_range(0..16u64);
            let bit = rng.random_range(0..8);
            m.patch(
                byte,
                vec![img.pristine[byte as usize] ^ (1 << bit)],
                format!("header byte {byte} bit {bit}"),
            );
        }
        2 => {
            // A bit flip in a record.
            let i = any_record(rng);
            let byte = record_at(i) + rng.random_range(0..16);
            let bit = rng.random_range(0..8);
            let old = img.pristine.get(byte as usize).copied().unwrap_or(0);
            m.patch(
                byte,
                vec![old ^ (1 << bit)],
                format!("record {i} byte {byte} bit {bit}"),
            );
        }
        3 => {
            // Garbage after the end of the list in the last area.
            let end = record_at(records.len() as u64);
            let area_end = layout.area_offset(records.len() as u64 / per_area) + cb;
            let off = rng.random_range(end..area_end);
            m.patch(
                off,
                vec![rng.random_range(1..=255)],
                format!("area tail byte {off}"),
            );
        }
        4 => {
            // Truncation, usually to whole sectors.
            let mut to = rng.random_range(0..len);
            if rng.random_bool(0.8) {
                to = to / 512 * 512;
            }
            m.truncate = Some(to);
            m.what.push(format!("truncate to {to}"));
        }
        5 => {
            // A special COW chunk in a record.
            let i = any_record(rng);
            let other = records
                .get(rng.random_range(0..records.len()))
                .map_or(2, |r| r.1);
            let new = match rng.random_range(0..7) {
                0 => 0,
                1 => 1,
                2 => layout.area_location(rng.random_range(0..=areas)),
                3 => device_chunks,
                4 => device_chunks - 1,
                5 => other,
                _ => u64::MAX,
            };
            m.patch(
                record_at(i) + 8,
                new.to_le_bytes().to_vec(),
                format!("record {i} new = {new}"),
            );
        }
        6 => {
            // A special origin chunk in a record.
            let i = any_record(rng);
            let other = records
                .get(rng.random_range(0..records.len()))
                .map_or(0, |r| r.0);
            let old = match rng.random_range(0..4) {
                0 => other,
                1 => origin_chunks,
                2 => origin_chunks - 1,
                _ => u64::MAX,
            };
            m.patch(
                record_at(i),
                old.to_le_bytes().to_vec(),
                format!("record {i} old = {old}"),
            );
        }
        7 => {
            // A whole area zeroed, or filled with garbage.
            let a = rng.random_range(0..=areas);
            let fill: Vec<u8> = if rng.random_bool(0.5) {
                vec![0; cb as usize]
            } else {
                (0..cb).map(|_| rng.random()).collect()
            };
            m.patch(layout.area_offset(a), fill, format!("area {a} overwritten"));
        }
        8 => {
            // Random bytes in a data chunk (content, not metadata).
            let off = rng.random_range(0..len);
            m.patch(
                off,
                vec![rng.random(), rng.random()],
                format!("data bytes at {off}"),
            );
        }
        _ => {
            // The magic, version or chunk size set to a nearby value.
            let (off, v): (u64, u32) = match rng.random_range(0..5) {
                0 => (0, 0),
                1 if rng.random_bool(0.5) => (4, 0),
                1 => (8, 2),
                2 => (12, img.chunk_sectors * 2),
                _ => (12, img.chunk_sectors + 8),
            };
            m.patch(
                off,
                v.to_le_bytes().to_vec(),
                format!("header u32 at {off} = {v}"),
            );
        }
    }
}

/// What the full scan says the loader must do with an image.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Refused (unreadable, not a COW device, bad header or geometry, or
    /// a problem in the metadata).
    Refuse,
    /// Loads as invalid: no exceptions, I/O fails.
    Invalid,
    /// Loads with these exceptions (origin chunk → COW chunk).
    Load(HashMap<u64, u64>),
}

/// The verdict from the header and a scan that collects every problem.
async fn verdict(dev: &Device, origin_bytes: u64) -> Verdict {
    let h = match read_header(dev).await {
        Ok(HeaderState::Existing(h)) => h,
        // New (read-only: not initialised), bad magic, unreadable.
        Ok(HeaderState::New) | Err(_) => return Verdict::Refuse,
    };
    let Ok(layout) = h.check() else {
        return Verdict::Refuse;
    };
    if dev.size() < layout.min_device_bytes()
        || !layout.chunk_bytes().is_multiple_of(dev.block_size())
    {
        return Verdict::Refuse;
    }
    if !h.valid {
        return Verdict::Invalid;
    }
    let mut map = HashMap::new();
    let mut seen = HashSet::new();
    let opts = ScanOptions {
        origin_chunks: Some(origin_bytes.div_ceil(layout.chunk_bytes())),
        stop_at_first: false,
    };
    let scan = scan_areas(dev, layout, opts, |_, _, r| {
        let first = seen.insert(r.old);
        if first {
            map.insert(r.old, r.new);
        }
        first
    })
    .await;
    match scan {
        Err(_) => Verdict::Refuse,
        Ok(s) => {
            assert_eq!(
                s.exceptions,
                map.len() as u64,
                "the scan counts the records it accepts"
            );
            // Bytes after the end of the list in the last area are what a
            // torn metadata write leaves: read as the kernel reads them.
            if s.problems.iter().all(|p| p.is_torn_tail()) {
                Verdict::Load(map)
            } else {
                Verdict::Refuse
            }
        }
    }
}

/// Checks one mutated image (already on `img.work`, its bytes `bytes`).
async fn check_image(backend: &Backend, img: &Image, bytes: &[u8], what: &str) -> &'static str {
    let dev = backend.open(&img.work, false).unwrap();
    let origin_size = img.origin.size();
    let verdict = verdict(&dev, origin_size).await;

    let mut loaded = HashMap::new();
    let opened = PStore::open(dev.clone(), None, Some(origin_size), |r| {
        loaded.insert(r.old, r.new).is_none()
    })
    .await;
    match (&verdict, &opened) {
        (Verdict::Refuse, Err(_)) => return "refused",
        (Verdict::Refuse, Ok(o)) => panic!(
            "{what}: loaded ({} exceptions) although the scan refuses it",
            o.exceptions
        ),
        (_, Err(e)) => panic!("{what}: refused ({e}) although the scan accepts it ({verdict:?})"),
        (Verdict::Invalid, Ok(o)) => assert!(!o.store.is_valid() && o.exceptions == 0, "{what}"),
        (Verdict::Load(map), Ok(o)) => {
            assert!(o.store.is_valid(), "{what}");
            assert_eq!(o.exceptions, map.len() as u64, "{what}: exception count");
            assert_eq!(
                &loaded, map,
                "{what}: the loader's exceptions are the scan's"
            );
            let raw = raw_records(bytes, img.chunk_sectors);
            assert_eq!(
                raw.len(),
                map.len(),
                "{what}: every record of the image is loaded"
            );
            assert!(
                raw.iter().all(|(old, new)| map.get(old) == Some(new)),
                "{what}: the records are the image's"
            );
        }
    }
    drop(opened);

    // Through the engine: the same outcome, and the content the records say.
    let origin = Origin::new(img.origin.clone()).unwrap();
    let added = origin.add_snapshot(dev, SnapshotOptions::default()).await;
    let added = match (&verdict, added) {
        (_, Err(e)) => panic!("{what}: the engine refuses ({e}) what the store loads"),
        (_, Ok(a)) => a,
    };
    let snap = Target::Snapshot(added.id);
    let Verdict::Load(map) = verdict else {
        let r = origin.read(snap, 0, 4096).await;
        assert!(
            matches!(r, Err(Error::SnapshotInvalid { .. })),
            "{what}: an invalid snapshot's read: {r:?}"
        );
        return "invalid";
    };
    assert_eq!(added.exceptions, map.len() as u64, "{what}");
    let cb = img.cb() as usize;
    let mut want = img.origin_bytes.clone();
    for (&old, &new) in &map {
        let at = old as usize * cb;
        let n = cb.min(want.len() - at);
        want[at..at + n].copy_from_slice(&bytes[new as usize * cb..new as usize * cb + n]);
    }
    let got = origin.read(snap, 0, origin_size).await.unwrap();
    if got[..] != want[..] {
        let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
        panic!("{what}: the snapshot differs from what the records say at byte {first}");
    }
    "loaded"
}

/// Writes the mutated image over the working copy (only the bytes that
/// differ from the last one, and the length).
fn put(work: &Path, prev: &[u8], next: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(work).unwrap();
    f.set_len(next.len() as u64).unwrap();
    let mut i = 0;
    while i < next.len() {
        if prev.get(i) == Some(&next[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < next.len() && prev.get(i) != Some(&next[i]) {
            i += 1;
        }
        f.write_all_at(&next[start..i], start as u64).unwrap();
    }
    f.sync_all().unwrap();
}

#[test]
fn mutated_images_load_as_their_records_say_or_are_refused() {
    let backend = common::backend();
    // The images are set-up, built with one durable commit per exception
    // for a deterministic layout: the portable backend does that fastest.
    let builder = Backend::start(BackendChoice::Portable).unwrap();
    let dir = common::scratch();
    common::runtime().block_on(async {
        let images = [
            // 2 areas at chunk 8 (256 records each): 1 full, 1 partial.
            build(&builder, dir.path(), 8, 320, 0, 300, 340).await,
            // 1 exactly full area at chunk 8: area 1 is the zeroed end.
            build(&builder, dir.path(), 8, 300, 0, 256, 280).await,
            // 1 area at chunk 16.
            build(&builder, dir.path(), 16, 128, 0, 100, 120).await,
            // 1 area at chunk 32, an origin with a partial last chunk.
            build(&builder, dir.path(), 32, 64, 4096, 40, 50).await,
        ];
        let mut outcomes: HashMap<&str, u64> = HashMap::new();
        for (n, img) in images.iter().enumerate() {
            let records = raw_records(&img.pristine, img.chunk_sectors);
            let base = check_image(
                &backend,
                img,
                &img.pristine,
                &format!("{} unmutated", img.name),
            )
            .await;
            assert_eq!(base, "loaded", "{}: the unmutated image loads", img.name);
            let mut prev = img.pristine.clone();
            for seed in 0..MUTATIONS {
                let mut rng = StdRng::seed_from_u64(n as u64 * 1_000_000 + seed);
                let mut m = Mutation::default();
                for _ in 0..(if rng.random_bool(0.25) {
                    rng.random_range(2..=4)
                } else {
                    1
                }) {
                    one_mutation(&mut rng, img, &records, &mut m);
                }
                let bytes = m.apply(&img.pristine);
                put(&img.work, &prev, &bytes);
                let what = format!("{} seed {seed}: {}", img.name, m.what.join(", "));
                *outcomes
                    .entry(check_image(&backend, img, &bytes, &what).await)
                    .or_default() += 1;
                prev = bytes;
            }
        }
        // The mutations exercise every outcome.
        for o in ["loaded", "refused", "invalid"] {
            assert!(
                outcomes.get(o).copied().unwrap_or(0) > 0,
                "no mutated image was {o}: {outcomes:?}"
            );
        }
        eprintln!("outcomes: {outcomes:?}");
    });
}
