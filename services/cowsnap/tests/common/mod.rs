//! Helpers shared by the tests that run the `cowsnap` binary: scratch files
//! on a disk file system (O_DIRECT does not work on tmpfs), running the
//! tool, deterministic data, and raw edits of COW images in the kernel's
//! format.

#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory under the target dir (on disk), removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// Creates a sparse (all-zero) file of `size` bytes.
pub fn zero_file(path: &Path, size: u64) -> PathBuf {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    path.to_path_buf()
}

/// A file filled with bytes from `seed`.
pub fn pattern_file(path: &Path, size: u64, seed: u64) -> PathBuf {
    std::fs::write(path, pattern(size as usize, seed)).unwrap();
    path.to_path_buf()
}

/// Deterministic pseudo-random bytes (splitmix64).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The result of one run of the tool.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", self.stdout))
    }

    /// Asserts the exit code, showing the output when it is not the one.
    pub fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// The `cowsnap` binary under test.
pub fn cowsnap() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cowsnap"))
}

/// Runs `cowsnap ARGS...` to completion.
pub fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    cowsnap().args(args).output().expect("run cowsnap").into()
}

/// `p` as a string argument.
pub fn arg(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Byte offset of record `index` of metadata area `area` on a COW device
/// with `chunk_sectors`.
pub fn record_offset(chunk_sectors: u64, area: u64, index: u64) -> u64 {
    let cb = chunk_sectors * 512;
    let per_area = cb / 16;
    (1 + area * (per_area + 1)) * cb + index * 16
}

/// Reads record `(old, new)` at `index` of `area`.
pub fn read_record(cow: &Path, chunk_sectors: u64, area: u64, index: u64) -> (u64, u64) {
    let f = std::fs::File::open(cow).unwrap();
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, record_offset(chunk_sectors, area, index))
        .unwrap();
    (
        u64::from_le_bytes(b[..8].try_into().unwrap()),
        u64::from_le_bytes(b[8..].try_into().unwrap()),
    )
}

/// Overwrites record `index` of `area` with `(old, new)`.
pub fn write_record(cow: &Path, chunk_sectors: u64, area: u64, index: u64, old: u64, new: u64) {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&old.to_le_bytes());
    b[8..].copy_from_slice(&new.to_le_bytes());
    write_at(cow, record_offset(chunk_sectors, area, index), &b);
}

/// Overwrites bytes of a file in place.
pub fn write_at(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
    f.sync_all().unwrap();
}

/// Builds a COW image by hand in the kernel's format: `records` as
/// `(old, new)` pairs filled into areas in order, the data of each new chunk
/// taken from `data(old)`. Returns the image bytes (`device_chunks` chunks).
pub fn build_cow_image(
    chunk_sectors: u64,
    device_chunks: u64,
    records: &[(u64, u64)],
    data: impl Fn(u64) -> Vec<u8>,
) -> Vec<u8> {
    let cb = chunk_sectors * 512;
    let per_area = cb / 16;
    let mut img = vec![0u8; (device_chunks * cb) as usize];
    img[0..4].copy_from_slice(&0x7041_6e53u32.to_le_bytes());
    img[4..8].copy_from_slice(&1u32.to_le_bytes());
    img[8..12].copy_from_slice(&1u32.to_le_bytes());
    img[12..16].copy_from_slice(&(chunk_sectors as u32).to_le_bytes());
    for (i, &(old, new)) in records.iter().enumerate() {
        let i = i as u64;
        let at = record_offset(chunk_sectors, i / per_area, i % per_area) as usize;
        img[at..at + 8].copy_from_slice(&old.to_le_bytes());
        img[at + 8..at + 16].copy_from_slice(&new.to_le_bytes());
        let d = data(old);
        img[(new * cb) as usize..(new * cb) as usize + d.len()].copy_from_slice(&d);
    }
    img
}

/// The data chunks the kernel's allocator hands out, in order: from 2,
/// skipping metadata areas.
pub fn allocation_order(chunk_sectors: u64) -> impl Iterator<Item = u64> {
    let stride = chunk_sectors * 512 / 16 + 1;
    (2u64..).filter(move |c| c % stride != 1)
}
