//! COW devices written by the real kernel's dm-snapshot (Debian 6.1, the
//! persistent store "P"), loaded through our store: the snapshot must read
//! back what the kernel read, the status line must be the kernel's, the scan
//! must find nothing wrong, and our appends to a kernel COW must survive a
//! reload. The kernel's writes, replayed through our engine from the same
//! starting images, must give the kernel's results.
//!
//! The vectors live in `tests/golden/` (see its README.md): one gzipped COW
//! image per vector, the write specs the kernel applied, and `manifest.json`
//! with what the kernel printed. The origins are not checked in: they are a
//! deterministic sector pattern ([`sector_word`], the same function as
//! `golden.py`) with the spec's origin writes applied.
//!
//! Each test goes over every vector and reports all disagreements at once.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use cowsnap_store::format::Layout;
use cowsnap_store::scan::{Problem, ScanOptions, scan_areas};
use cowsnap_store::status::dm_status_line;
use cowsnap_store::{AlignedBuf, Backend, Origin, SnapId, SnapshotOptions, Target};
use futures::future::join_all;
use serde::Deserialize;
use sha2::{Digest, Sha256};

const SECTOR: u64 = 512;

// ---------------------------------------------------------------------------
// The manifest

#[derive(Deserialize)]
struct Manifest {
    kernel: String,
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    chunk_sectors: u32,
    origin_bytes: u64,
    origin_seed: u64,
    cow_bytes: u64,
    cow_garbage_seed: Option<u64>,
    cow_file: String,
    cow_sha256: String,
    expect_valid: bool,
    /// The kernel's sha256 of the snapshot after the last run (valid vectors).
    snap_sha256: Option<String>,
    /// The kernel's sha256 of the origin after the last run.
    origin_sha256: String,
    status_live: String,
    status_reload: String,
    /// What the oracle's independent reader (cowread.py) says about the COW.
    cowread: CowRead,
    runs: Vec<Run>,
}

#[derive(Deserialize)]
struct CowRead {
    exceptions: Option<u64>,
    last_area: Option<u64>,
    next_free: Option<u64>,
}

#[derive(Deserialize)]
struct Run {
    spec: String,
    kernel: KernelOutput,
}

#[derive(Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
struct KernelOutput {
    origin_sha256: String,
    origin_sectors: String,
    /// `dmsetup status` on activation, after the run's writes, and after a
    /// fresh activation.
    status_fresh: String,
    status_live: String,
    status_reload: String,
}

/// Vectors the kernel wrote with chunk sizes cowsnap refuses by design:
/// `Layout::new` (store/src/format.rs) takes 8..=1024 sectors as the product
/// requires, the kernel any power of two that is a multiple of both devices'
/// logical block size. The last test of this file checks the refusal.
const REFUSED: &[&str] = &["c4-small-chunk", "c2048-big-chunk"];

fn in_store_range(v: &Vector) -> bool {
    !REFUSED.contains(&v.name.as_str())
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn manifest() -> Manifest {
    let text = std::fs::read_to_string(golden_dir().join("manifest.json")).unwrap();
    let m: Manifest = serde_json::from_str(&text).unwrap();
    assert!(!m.vectors.is_empty(), "no vectors in the manifest");
    m
}

// ---------------------------------------------------------------------------
// Regenerating the images

/// The 8-byte word that fills sector `sector` of an image with `seed`
/// (`golden.py`'s `sector_word`: the splitmix64 finaliser).
fn sector_word(seed: u64, sector: u64) -> u64 {
    let mut z = ((seed << 32) ^ sector).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn pattern_image(size: u64, seed: u64) -> Vec<u8> {
    assert_eq!(size % SECTOR, 0);
    let mut out = Vec::with_capacity(size as usize);
    for s in 0..size / SECTOR {
        let w = sector_word(seed, s).to_le_bytes();
        for _ in 0..SECTOR / 8 {
            out.extend_from_slice(&w);
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SpecTarget {
    Origin,
    Snap,
}

struct SpecWrite {
    off: u64,
    len: u64,
    byte: u8,
    target: SpecTarget,
}

fn parse_num(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => s.parse().unwrap(),
    }
}

/// Parses a write spec: `offset length pattern [origin|snap]`, `#` comments.
fn parse_spec(path: &Path) -> Vec<SpecWrite> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap();
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.is_empty() {
            continue;
        }
        assert!(
            w.len() == 3 || w.len() == 4,
            "{}: bad line {line:?}",
            path.display()
        );
        let target = match w.get(3).copied().unwrap_or("origin") {
            "origin" => SpecTarget::Origin,
            "snap" | "snapshot" => SpecTarget::Snap,
            t => panic!("{}: bad target {t}", path.display()),
        };
        out.push(SpecWrite {
            off: parse_num(w[0]),
            len: parse_num(w[1]),
            byte: u8::try_from(parse_num(w[2])).unwrap(),
            target,
        });
    }
    out
}

fn apply_writes(img: &mut [u8], v: &Vector, target: SpecTarget) {
    for run in &v.runs {
        for w in parse_spec(&golden_dir().join(&run.spec)) {
            if w.target == target {
                img[w.off as usize..(w.off + w.len) as usize].fill(w.byte);
            }
        }
    }
}

/// The origin as the kernel left it: the pattern with every run's origin writes.
fn origin_after(v: &Vector) -> Vec<u8> {
    let mut img = pattern_image(v.origin_bytes, v.origin_seed);
    apply_writes(&mut img, v, SpecTarget::Origin);
    img
}

/// The snapshot as the writes made it: the pattern with the snapshot writes
/// (the kernel's sha256 of the snapshot is the judge; this is what it must be).
fn snapshot_simulated(v: &Vector) -> Vec<u8> {
    let mut img = pattern_image(v.origin_bytes, v.origin_seed);
    apply_writes(&mut img, v, SpecTarget::Snap);
    img
}

/// The COW image the kernel wrote, decompressed and checked.
fn cow_image(v: &Vector) -> Vec<u8> {
    let f = std::fs::File::open(golden_dir().join(&v.cow_file)).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out.len() as u64, v.cow_bytes, "{}: COW size", v.name);
    assert_eq!(
        sha256(&out),
        v.cow_sha256,
        "{}: COW image differs from the manifest",
        v.name
    );
    out
}

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Loading a vector through the store

/// A vector on scratch files: the regenerated origin and a copy of the COW.
struct Loaded {
    dir: tempfile::TempDir,
    backend: Backend,
    origin: Origin,
    id: SnapId,
    origin_img: Vec<u8>,
}

impl Loaded {
    fn origin_path(&self) -> PathBuf {
        self.dir.path().join("origin.img")
    }
    fn cow_path(&self) -> PathBuf {
        self.dir.path().join("cow.img")
    }

    fn origin_sectors(&self) -> u64 {
        self.origin.size() / SECTOR
    }

    fn status_line(&self) -> String {
        dm_status_line(
            Some(self.origin_sectors()),
            self.origin.status(self.id).unwrap().usage,
        )
    }

    async fn read(&self, t: Target) -> cowsnap_store::Result<AlignedBuf> {
        self.origin.read(t, 0, self.origin.size()).await
    }

    /// Drops the engine and opens the same files again.
    async fn reopen(self) -> Loaded {
        let Loaded {
            dir,
            backend,
            origin,
            origin_img,
            ..
        } = self;
        drop(origin);
        open_files(dir, backend, origin_img).await
    }
}

async fn open_files(dir: tempfile::TempDir, backend: Backend, origin_img: Vec<u8>) -> Loaded {
    let origin_dev = backend.open(&dir.path().join("origin.img"), true).unwrap();
    let cow_dev = backend.open(&dir.path().join("cow.img"), true).unwrap();
    let origin = Origin::new(origin_dev).unwrap();
    let added = origin
        .add_snapshot(cow_dev, SnapshotOptions::default())
        .await
        .unwrap();
    assert!(!added.initialised, "a kernel COW was initialised as new");
    Loaded {
        dir,
        backend,
        origin,
        id: added.id,
        origin_img,
    }
}

async fn load(v: &Vector) -> Loaded {
    let dir = common::scratch();
    let origin_img = origin_after(v);
    std::fs::write(dir.path().join("origin.img"), &origin_img).unwrap();
    std::fs::write(dir.path().join("cow.img"), cow_image(v)).unwrap();
    let l = open_files(dir, common::backend(), origin_img).await;
    let st = l.origin.status(l.id).unwrap();
    assert_eq!(st.chunk_sectors, v.chunk_sectors, "{}: chunk size", v.name);
    l
}

/// Scans a COW file with every check on; returns the scan and the records.
async fn scan_file(
    backend: &Backend,
    path: &Path,
    chunk_sectors: u32,
    origin_bytes: u64,
) -> (cowsnap_store::scan::Scan, Vec<(u64, u64)>) {
    let dev = backend.open(path, false).unwrap();
    let layout = Layout::new(chunk_sectors).unwrap();
    let opts = ScanOptions {
        origin_chunks: Some(origin_bytes.div_ceil(layout.chunk_bytes())),
        stop_at_first: false,
    };
    let mut seen = HashSet::new();
    let mut records = Vec::new();
    let scan = scan_areas(&dev, layout, opts, |_, _, r| {
        records.push((r.old, r.new));
        seen.insert(r.old)
    })
    .await
    .unwrap();
    (scan, records)
}

/// Runs `check` on every vector the filter selects and fails with every
/// vector's complaint at once.
fn for_each_vector(filter: impl Fn(&Vector) -> bool, check: impl AsyncCheck) {
    let m = manifest();
    let rt = common::runtime();
    let mut failures = Vec::new();
    let mut ran = 0;
    for v in m.vectors.iter().filter(|v| filter(v)) {
        ran += 1;
        let errs = rt.block_on(check.check(v));
        for e in errs {
            failures.push(format!("{}: {e}", v.name));
        }
    }
    assert!(ran > 0, "no vector selected");
    assert!(
        failures.is_empty(),
        "disagreements with the kernel ({}):\n  {}",
        m.kernel,
        failures.join("\n  ")
    );
}

/// An async check over one vector returning its complaints (a closure
/// returning a future that borrows its argument cannot be written directly).
trait AsyncCheck {
    async fn check(&self, v: &Vector) -> Vec<String>;
}

macro_rules! check_fn {
    ($name:ident, |$v:ident| $body:block) => {
        struct $name;
        impl AsyncCheck for $name {
            async fn check(&self, $v: &Vector) -> Vec<String> $body
        }
    };
}

// ---------------------------------------------------------------------------
// The vectors themselves

#[test]
fn regenerated_origin_matches_the_kernels_origin() {
    check_fn!(C, |v| {
        let mut errs = Vec::new();
        let img = origin_after(v);
        let got = sha256(&img);
        if got != v.origin_sha256 {
            errs.push(format!(
                "regenerated origin sha256 {got} != manifest {}",
                v.origin_sha256
            ));
        }
        let last = &v.runs.last().unwrap().kernel;
        if got != last.origin_sha256 {
            errs.push(format!(
                "regenerated origin sha256 {got} != kernel ORIGIN_SHA256 {}",
                last.origin_sha256
            ));
        }
        if last.origin_sectors != (v.origin_bytes / SECTOR).to_string() {
            errs.push(format!("kernel saw {} origin sectors", last.origin_sectors));
        }
        if v.expect_valid {
            let sim = sha256(&snapshot_simulated(v));
            if Some(&sim) != v.snap_sha256.as_ref() {
                errs.push(format!(
                    "simulated snapshot {sim} != kernel SNAP_SHA256 {:?}",
                    v.snap_sha256
                ));
            }
        }
        errs
    });
    for_each_vector(|_| true, C);
}

#[test]
fn golden_set_covers_what_it_claims() {
    let m = manifest();
    let mut chunks: Vec<u32> = m.vectors.iter().map(|v| v.chunk_sectors).collect();
    chunks.sort_unstable();
    chunks.dedup();
    assert_eq!(chunks, [4, 8, 16, 32, 64, 2048], "chunk sizes covered");
    let by = |n: &str| {
        m.vectors
            .iter()
            .find(|v| v.name == n)
            .unwrap_or_else(|| panic!("no vector {n}"))
    };
    // Exactly one full area, and a spill into area 1.
    let full = by("c8-area-full");
    assert_eq!(
        (full.cowread.exceptions, full.cowread.last_area),
        (Some(256), Some(1))
    );
    let spill = by("c8-area-spill");
    assert_eq!(
        (spill.cowread.exceptions, spill.cowread.last_area),
        (Some(300), Some(1))
    );
    // Garbage COWs, overflows, and appends over two activations.
    assert!(
        m.vectors
            .iter()
            .filter(|v| v.cow_garbage_seed.is_some())
            .count()
            >= 2
    );
    assert!(m.vectors.iter().filter(|v| !v.expect_valid).count() >= 2);
    assert!(m.vectors.iter().filter(|v| v.runs.len() == 2).count() >= 2);
    for v in &m.vectors {
        let _ = cow_image(v);
        if v.expect_valid {
            assert_eq!(
                v.status_live, v.status_reload,
                "{}: the kernel's live and reload status differ",
                v.name
            );
        }
    }
}

/// A garbage-filled COW keeps its garbage wherever the kernel had no reason
/// to write: the vector really asks a reader to stop at the end of the list.
#[test]
fn garbage_cows_keep_their_garbage_where_the_kernel_did_not_write() {
    check_fn!(C, |v| {
        let mut errs = Vec::new();
        let seed = v.cow_garbage_seed.unwrap();
        let cow = cow_image(v);
        let garbage = pattern_image(v.cow_bytes, seed);
        let layout = Layout::new(v.chunk_sectors).unwrap();
        let cb = layout.chunk_bytes() as usize;
        let chunk = |img: &[u8], c: u64| img[c as usize * cb..(c as usize + 1) * cb].to_vec();
        let epa = layout.exceptions_per_area();
        let n = v.cowread.exceptions.unwrap();
        let used_areas = n / epa + 1; // the last one partial, or zeroed after a full one
        let mut used: HashSet<u64> = (0..used_areas).map(|a| layout.area_location(a)).collect();
        used.insert(0);
        // The data chunks the kernel's records point at.
        let dir = common::scratch();
        let path = dir.path().join("cow.img");
        std::fs::write(&path, &cow).unwrap();
        let (_, records) =
            scan_file(&common::backend(), &path, v.chunk_sectors, v.origin_bytes).await;
        if records.len() as u64 != n {
            errs.push(format!("{} records, cowread.py finds {n}", records.len()));
        }
        used.extend(records.iter().map(|r| r.1));
        let chunks = v.cow_bytes / cb as u64;
        let untouched = (0..chunks)
            .filter(|c| !used.contains(c))
            .collect::<Vec<_>>();
        if untouched.is_empty() {
            errs.push("no untouched chunk left to check".into());
        }
        for &c in &untouched {
            if chunk(&cow, c) != chunk(&garbage, c) {
                errs.push(format!(
                    "chunk {c} was rewritten, but the kernel had no reason to"
                ));
            }
        }
        // The area after the last one the kernel used, when on the device,
        // is garbage if the last area is partial and zeroed if it is full.
        let next = layout.area_location(n / epa + 1);
        if next < chunks && chunk(&cow, next) != chunk(&garbage, next) {
            errs.push(format!(
                "area chunk {next} after the last area is not the garbage"
            ));
        }
        if n.is_multiple_of(epa)
            && n > 0
            && chunk(&cow, layout.area_location(n / epa))
                .iter()
                .any(|&b| b != 0)
        {
            errs.push("the area after a full area was not zeroed".into());
        }
        errs
    });
    for_each_vector(|v| v.cow_garbage_seed.is_some(), C);
}

// ---------------------------------------------------------------------------
// Our store against the kernel

check_fn!(LoadsWithKernelContent, |v| {
    let mut errs = Vec::new();
    let l = load(v).await;
    let st = l.origin.status(l.id).unwrap();
    if !st.valid {
        return vec!["loads as invalid".into()];
    }
    if Some(st.exceptions) != v.cowread.exceptions {
        errs.push(format!(
            "{} exceptions loaded, cowread.py finds {:?}",
            st.exceptions, v.cowread.exceptions
        ));
    }
    match l.read(Target::Snapshot(l.id)).await {
        Ok(snap) => {
            let got = sha256(&snap);
            if Some(&got) != v.snap_sha256.as_ref() {
                errs.push(format!(
                    "snapshot sha256 {got}, the kernel's {:?}",
                    v.snap_sha256
                ));
            }
        }
        Err(e) => errs.push(format!("snapshot read failed: {e}")),
    }
    let origin = l.read(Target::Origin).await.unwrap();
    if origin[..] != l.origin_img[..] {
        errs.push("origin read differs from the origin".into());
    }
    let cow_path = l.cow_path();
    drop(l.origin);
    // Loading and reading never write a valid COW.
    if sha256(&std::fs::read(cow_path).unwrap()) != v.cow_sha256 {
        errs.push("loading the COW changed it".into());
    }
    errs
});

#[test]
fn kernel_cows_load_with_the_kernels_snapshot_content() {
    for_each_vector(
        |v| v.expect_valid && in_store_range(v),
        LoadsWithKernelContent,
    );
}

check_fn!(StatusMatchesKernel, |v| {
    let l = load(v).await;
    let ours = l.status_line();
    if ours != v.status_reload {
        return vec![format!(
            "status {ours:?}, the kernel's STATUS_RELOAD {:?}",
            v.status_reload
        )];
    }
    Vec::new()
});

#[test]
fn status_line_matches_the_kernels_after_reload() {
    for_each_vector(in_store_range, StatusMatchesKernel);
}

check_fn!(ScanFindsNoProblem, |v| {
    let mut errs = Vec::new();
    let dir = common::scratch();
    let path = dir.path().join("cow.img");
    std::fs::write(&path, cow_image(v)).unwrap();
    let (scan, _) = scan_file(&common::backend(), &path, v.chunk_sectors, v.origin_bytes).await;
    let problems: Vec<&Problem> = scan.problems.iter().collect();
    if !problems.is_empty() {
        errs.push(format!(
            "problems: {}",
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if Some(scan.exceptions) != v.cowread.exceptions {
        errs.push(format!(
            "scan found {} exceptions, cowread.py {:?}",
            scan.exceptions, v.cowread.exceptions
        ));
    }
    if Some(scan.next_free) != v.cowread.next_free {
        errs.push(format!(
            "scan next_free {}, cowread.py {:?}",
            scan.next_free, v.cowread.next_free
        ));
    }
    if Some(scan.current_area) != v.cowread.last_area {
        errs.push(format!(
            "scan current_area {}, cowread.py last_area {:?}",
            scan.current_area, v.cowread.last_area
        ));
    }
    errs
});

#[test]
fn scan_finds_no_problem_in_kernel_cows() {
    // The kernel does not read the exceptions of an invalid snapshot.
    for_each_vector(|v| v.expect_valid && in_store_range(v), ScanFindsNoProblem);
}

#[test]
fn overflowed_kernel_cows_load_invalid_and_the_origin_still_works() {
    check_fn!(C, |v| {
        let mut errs = Vec::new();
        let l = load(v).await;
        let st = l.origin.status(l.id).unwrap();
        if st.valid || st.usage.is_some() {
            errs.push("loads as valid".into());
        }
        let line = l.status_line();
        let want = format!("0 {} snapshot Invalid", v.origin_bytes / SECTOR);
        if line != want || line != v.status_reload || v.status_live != want {
            errs.push(format!(
                "status {line:?}, the kernel's live {:?} reload {:?}",
                v.status_live, v.status_reload
            ));
        }
        match l.read(Target::Snapshot(l.id)).await {
            Ok(_) => errs.push("a read of the invalid snapshot succeeded".into()),
            Err(cowsnap_store::Error::SnapshotInvalid { .. }) => {}
            Err(e) => errs.push(format!(
                "snapshot read failed with an unexpected error: {e}"
            )),
        }
        let wr = l
            .origin
            .write(Target::Snapshot(l.id), 0, AlignedBuf::zeroed(4096), false)
            .await;
        if wr.is_ok() {
            errs.push("a write to the invalid snapshot succeeded".into());
        }
        match l.read(Target::Origin).await {
            Ok(o) if o[..] == l.origin_img[..] => {}
            Ok(_) => errs.push("origin read differs from the origin".into()),
            Err(e) => errs.push(format!("origin read failed: {e}")),
        }
        // Origin writes work and copy nothing into the invalid snapshot.
        let mut model = l.origin_img.clone();
        let data = AlignedBuf::from_slice(&vec![0x5a; 8192]);
        if let Err(e) = l.origin.write(Target::Origin, 8192, data, true).await {
            errs.push(format!("origin write failed: {e}"));
        }
        model[8192..16384].fill(0x5a);
        let l = l.reopen().await;
        if l.read(Target::Origin)
            .await
            .map(|o| o[..] == model[..])
            .ok()
            != Some(true)
        {
            errs.push("origin after a write and a reopen differs".into());
        }
        if l.origin.status(l.id).unwrap().usage.is_some() {
            errs.push("valid after a reopen".into());
        }
        let cow = std::fs::read(l.cow_path()).unwrap();
        if sha256(&cow) != v.cow_sha256 {
            errs.push("the invalid COW changed".into());
        }
        errs
    });
    for_each_vector(|v| !v.expect_valid && in_store_range(v), C);
}

// ---------------------------------------------------------------------------
// Our appends to a kernel COW

/// One deterministic fill byte per write.
fn fill_byte(i: u64) -> u8 {
    (0x80 + (i * 7) % 0x7f) as u8
}

check_fn!(AppendsSurviveReload, |v| {
    let mut errs = Vec::new();
    let l = load(v).await;
    let layout = Layout::new(v.chunk_sectors).unwrap();
    let cb = layout.chunk_bytes();
    let bs = l.origin.block_size();
    let mut snap = match l.read(Target::Snapshot(l.id)).await {
        Ok(s) if Some(sha256(&s)) == v.snap_sha256 => s.to_vec(),
        _ => {
            return vec!["the kernel's snapshot does not load right; see the other tests".into()];
        }
    };
    let mut origin = l.origin_img.clone();
    let (_, records) = scan_file(&l.backend, &l.cow_path(), v.chunk_sectors, v.origin_bytes).await;
    let mut owned: HashSet<u64> = records.iter().map(|r| r.0).collect();
    let before = owned.len() as u64;
    let origin_chunks = v.origin_bytes / cb;
    // Leave one chunk of room: the device must not overflow.
    let target = (layout.capacity(v.cow_bytes) - 1)
        .min(origin_chunks)
        .min(before + 300);

    // Two block-sized snapshot writes into chunks the snapshot lacks
    // (partial chunks where the chunk is larger than a block: the rest
    // comes from the origin), two into chunks it owns.
    let fresh: Vec<u64> = (0..origin_chunks)
        .rev()
        .filter(|c| !owned.contains(c))
        .take(2)
        .collect();
    let old = records.iter().map(|r| r.0).take(2);
    for (n, c) in fresh.into_iter().chain(old).enumerate() {
        if owned.len() as u64 >= target && !owned.contains(&c) {
            continue;
        }
        owned.insert(c);
        let off = c * cb + if cb > bs { bs } else { 0 };
        let data = vec![fill_byte(1000 + n as u64); bs as usize];
        snap[off as usize..(off + bs) as usize].copy_from_slice(&data);
        if let Err(e) = l
            .origin
            .write(
                Target::Snapshot(l.id),
                off,
                AlignedBuf::from_slice(&data),
                false,
            )
            .await
        {
            errs.push(format!("snapshot write at {off}: {e}"));
        }
    }

    // Origin writes over a permutation of the chunks, 16 at a time
    // (group commit), whole chunks and single blocks alternately, until
    // the snapshot owns `target` chunks.
    let mut batch = Vec::new();
    let mut i = 0u64;
    while (owned.len() as u64) < target && i < origin_chunks {
        let c = (i * 37 + 5) % origin_chunks;
        let (off, len) = if i.is_multiple_of(2) {
            (c * cb, cb)
        } else {
            (c * cb + cb - bs, bs)
        };
        owned.insert(c);
        batch.push((off, vec![fill_byte(i); len as usize]));
        i += 1;
        if batch.len() == 16 || (owned.len() as u64) >= target {
            let results = join_all(batch.iter().map(|(off, data)| {
                l.origin
                    .write(Target::Origin, *off, AlignedBuf::from_slice(data), false)
            }))
            .await;
            for ((off, data), r) in batch.drain(..).zip(results) {
                match r {
                    Ok(()) => {
                        origin[off as usize..off as usize + data.len()].copy_from_slice(&data)
                    }
                    Err(e) => errs.push(format!("origin write at {off}: {e}")),
                }
            }
        }
    }
    l.origin.flush().await.unwrap();
    if !errs.is_empty() {
        return errs;
    }
    let verify = async |l: &Loaded, when: &str| {
        let mut errs = Vec::new();
        let st = l.origin.status(l.id).unwrap();
        if !st.valid {
            errs.push(format!("{when}: the snapshot is invalid"));
            return errs;
        }
        if st.exceptions != owned.len() as u64 {
            errs.push(format!(
                "{when}: {} exceptions, want {}",
                st.exceptions,
                owned.len()
            ));
        }
        match l.read(Target::Snapshot(l.id)).await {
            Ok(s) if s[..] == snap[..] => {}
            Ok(_) => errs.push(format!("{when}: snapshot content differs")),
            Err(e) => errs.push(format!("{when}: snapshot read: {e}")),
        }
        match l.read(Target::Origin).await {
            Ok(o) if o[..] == origin[..] => {}
            Ok(_) => errs.push(format!("{when}: origin content differs")),
            Err(e) => errs.push(format!("{when}: origin read: {e}")),
        }
        errs
    };
    errs.extend(verify(&l, "before the reload").await);
    let l = l.reopen().await;
    errs.extend(verify(&l, "after the reload").await);
    let (scan, _) = scan_file(&l.backend, &l.cow_path(), v.chunk_sectors, v.origin_bytes).await;
    for p in &scan.problems {
        errs.push(format!("after our appends: {p}"));
    }
    if scan.exceptions != owned.len() as u64 {
        errs.push(format!(
            "scan finds {} exceptions, want {}",
            scan.exceptions,
            owned.len()
        ));
    }
    if owned.len() as u64 <= before {
        errs.push(format!("no exception was added ({before} before)"));
    }
    if let Ok(dir) = std::env::var("COWSNAP_GOLDEN_KEEP") {
        // For checking our appends with the kernel oracle (README.md).
        let out = Path::new(&dir).join(&v.name);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(l.origin_path(), out.join("origin.img")).unwrap();
        std::fs::copy(l.cow_path(), out.join("cow.img")).unwrap();
        std::fs::write(out.join("snap.sha256"), sha256(&snap)).unwrap();
        std::fs::write(out.join("status"), l.status_line()).unwrap();
    }
    errs
});

/// After loading a kernel COW, origin writes through our engine copy the
/// chunks the snapshot lacks (into the kernel's allocation sequence, past
/// its metadata areas, zeroing a garbage area when one fills) and snapshot
/// writes land in new and existing exceptions; the content and the
/// metadata stay right across a reload.
#[test]
fn our_appends_to_kernel_cows_survive_reload() {
    for_each_vector(
        |v| v.expect_valid && in_store_range(v),
        AppendsSurviveReload,
    );
}

// ---------------------------------------------------------------------------
// The kernel's writes replayed through our engine

/// The guest writes through the page cache of the dm device, so dm-snapshot
/// sees whole 4 KiB pages: a read-modify-write of every page a spec write
/// touches. Returns the writes that failed.
async fn replay(origin: &Origin, id: SnapId, spec: &[SpecWrite]) -> Vec<String> {
    const PAGE: u64 = 4096;
    let mut failed = Vec::new();
    for w in spec {
        let t = match w.target {
            SpecTarget::Origin => Target::Origin,
            SpecTarget::Snap => Target::Snapshot(id),
        };
        let start = w.off / PAGE * PAGE;
        let end = (w.off + w.len).div_ceil(PAGE) * PAGE;
        let r = async {
            let mut buf = origin.read(t, start, end - start).await?;
            let at = (w.off - start) as usize;
            buf[at..at + w.len as usize].fill(w.byte);
            origin.write(t, start, buf, false).await
        }
        .await;
        if let Err(e) = r {
            failed.push(format!(
                "{} {} {:#x} {:?}: {e}",
                w.off, w.len, w.byte, w.target
            ));
        }
    }
    if let Err(e) = origin.flush().await {
        failed.push(format!("flush: {e}"));
    }
    failed
}

/// Chunks of a COW image that still hold the garbage it started with.
fn garbage_chunks(cow: &[u8], v: &Vector) -> Vec<u64> {
    let Some(seed) = v.cow_garbage_seed else {
        return Vec::new();
    };
    let garbage = pattern_image(v.cow_bytes, seed);
    let cb = u64::from(v.chunk_sectors) * SECTOR;
    (0..v.cow_bytes / cb)
        .filter(|&c| {
            let r = (c * cb) as usize..((c + 1) * cb) as usize;
            cow[r.clone()] == garbage[r]
        })
        .collect()
}

check_fn!(ReplayMatchesKernel, |v| {
    let mut errs = Vec::new();
    let dir = common::scratch();
    let origin_img = pattern_image(v.origin_bytes, v.origin_seed);
    std::fs::write(dir.path().join("origin.img"), &origin_img).unwrap();
    let cow_start = match v.cow_garbage_seed {
        None => vec![0u8; v.cow_bytes as usize],
        Some(seed) => {
            let mut g = pattern_image(v.cow_bytes, seed);
            g[..SECTOR as usize].fill(0);
            g
        }
    };
    std::fs::write(dir.path().join("cow.img"), &cow_start).unwrap();
    let backend = common::backend();
    let origin = Origin::new(backend.open(&dir.path().join("origin.img"), true).unwrap()).unwrap();
    let cow = backend.open(&dir.path().join("cow.img"), true).unwrap();
    let opts = SnapshotOptions {
        chunk_sectors: Some(v.chunk_sectors),
        ..Default::default()
    };
    let added = origin.add_snapshot(cow, opts).await.unwrap();
    if !added.initialised {
        errs.push("the new COW was not initialised".into());
    }
    let first = Loaded {
        dir,
        backend: backend.clone(),
        origin,
        id: added.id,
        origin_img: Vec::new(),
    };
    let fresh = first.status_line();
    if fresh != v.runs[0].kernel.status_fresh {
        errs.push(format!(
            "status of the new snapshot {fresh:?}, the kernel's {:?}",
            v.runs[0].kernel.status_fresh
        ));
    }
    let mut l = Some(first);
    for (i, run) in v.runs.iter().enumerate() {
        // Each run after the first is a fresh activation, as in
        // kernel-writes.sh.
        let loaded = match (i, l.take()) {
            (0, Some(first)) => first,
            (_, prev) => prev.unwrap().reopen().await,
        };
        let spec = parse_spec(&golden_dir().join(&run.spec));
        let failed = replay(&loaded.origin, loaded.id, &spec).await;
        if !failed.is_empty() {
            errs.push(format!(
                "run {}: writes failed: {}",
                i + 1,
                failed.join("; ")
            ));
        }
        let live = loaded.status_line();
        if live != run.kernel.status_live {
            errs.push(format!(
                "run {}: live status {live:?}, the kernel's {:?}",
                i + 1,
                run.kernel.status_live
            ));
        }
        let reloaded = loaded.reopen().await;
        let reload = reloaded.status_line();
        if reload != run.kernel.status_reload {
            errs.push(format!(
                "run {}: status after reload {reload:?}, the kernel's {:?}",
                i + 1,
                run.kernel.status_reload
            ));
        }
        l = Some(reloaded);
    }
    let l = l.unwrap();
    match l.read(Target::Origin).await {
        Ok(o) if sha256(&o) == v.origin_sha256 => {}
        Ok(o) => errs.push(format!(
            "origin sha256 {}, the kernel's {}",
            sha256(&o),
            v.origin_sha256
        )),
        Err(e) => errs.push(format!("origin read: {e}")),
    }
    let snap = l.read(Target::Snapshot(l.id)).await;
    match (&v.snap_sha256, snap) {
        (Some(want), Ok(s)) if sha256(&s) == *want => {}
        (Some(want), Ok(s)) => errs.push(format!(
            "snapshot sha256 {}, the kernel's {want}",
            sha256(&s)
        )),
        (Some(_), Err(e)) => errs.push(format!("snapshot read: {e}")),
        (None, Ok(_)) => errs.push("the snapshot reads, the kernel's is invalid".into()),
        (None, Err(_)) => {}
    }
    let ours = std::fs::read(l.cow_path()).unwrap();
    let theirs = cow_image(v);
    let cb = u64::from(v.chunk_sectors) * SECTOR;
    if ours[..cb as usize] != theirs[..cb as usize] {
        errs.push(format!(
            "header chunk differs: ours starts {:02x?}, the kernel's {:02x?}",
            &ours[..16],
            &theirs[..16]
        ));
    }
    let (ours_g, theirs_g) = (garbage_chunks(&ours, v), garbage_chunks(&theirs, v));
    if ours_g != theirs_g {
        let only_ours: Vec<_> = ours_g.iter().filter(|c| !theirs_g.contains(c)).collect();
        let only_theirs: Vec<_> = theirs_g.iter().filter(|c| !ours_g.contains(c)).collect();
        errs.push(format!(
            "garbage left in different chunks: only we left {only_ours:?}, only the kernel left {only_theirs:?}"
        ));
    }
    if v.expect_valid {
        let p = l.cow_path();
        let (ours_scan, ours_rec) =
            scan_file(&l.backend, &p, v.chunk_sectors, v.origin_bytes).await;
        let kdir = common::scratch();
        let kp = kdir.path().join("cow.img");
        std::fs::write(&kp, &theirs).unwrap();
        let (_, theirs_rec) = scan_file(&l.backend, &kp, v.chunk_sectors, v.origin_bytes).await;
        for pr in &ours_scan.problems {
            errs.push(format!("our COW: {pr}"));
        }
        let mut a: Vec<u64> = ours_rec.iter().map(|r| r.0).collect();
        let mut b: Vec<u64> = theirs_rec.iter().map(|r| r.0).collect();
        a.sort_unstable();
        b.sort_unstable();
        if a != b {
            errs.push(format!("copied origin chunks {a:?}, the kernel's {b:?}"));
        }
    }
    errs
});

/// The kernel's write specs, replayed through our engine on the same
/// starting images (the pattern origin and an all-zero or garbage COW,
/// reactivated between runs), give the kernel's results: snapshot and origin
/// content, status lines (live and after a reload), the same set of copied
/// chunks, the same header chunk, the same chunks left untouched in a
/// garbage COW, and an invalid snapshot where the kernel's overflowed.
#[test]
fn replaying_the_kernels_writes_gives_the_kernels_results() {
    for_each_vector(in_store_range, ReplayMatchesKernel);
}

// ---------------------------------------------------------------------------
// Chunk sizes the kernel takes and our store refuses by design

/// The kernel writes and reloads COWs with 2 KiB and 1 MiB chunks; cowsnap
/// takes only 8..=1024 sectors (the product's rule, lvm2's range) and must
/// refuse the others with a clear error naming the chunk size, never load
/// them wrongly and never rewrite them.
#[test]
fn kernel_cows_with_chunk_sizes_outside_8_to_1024_are_refused_clearly() {
    let m = manifest();
    let rt = common::runtime();
    let mut seen = 0;
    for v in m.vectors.iter().filter(|v| !in_store_range(v)) {
        seen += 1;
        rt.block_on(async {
            let dir = common::scratch();
            let cow = cow_image(v);
            std::fs::write(dir.path().join("origin.img"), origin_after(v)).unwrap();
            std::fs::write(dir.path().join("cow.img"), &cow).unwrap();
            let backend = common::backend();
            let origin =
                Origin::new(backend.open(&dir.path().join("origin.img"), true).unwrap()).unwrap();
            let cow_dev = backend.open(&dir.path().join("cow.img"), true).unwrap();
            let err = origin
                .add_snapshot(cow_dev, SnapshotOptions::default())
                .await
                .err()
                .unwrap_or_else(|| {
                    panic!(
                        "{}: a chunk size of {} sectors was accepted",
                        v.name, v.chunk_sectors
                    )
                });
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("invalid chunk size {} sectors", v.chunk_sectors))
                    && msg.contains("cow.img"),
                "{}: unclear refusal: {msg}",
                v.name
            );
            assert!(
                std::fs::read(dir.path().join("cow.img")).unwrap() == cow,
                "{}: refused COW was modified",
                v.name
            );
        });
    }
    assert_eq!(seen, REFUSED.len(), "every out-of-range vector was tried");
}
