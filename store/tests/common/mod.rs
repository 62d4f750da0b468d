//! Helpers shared by the store's integration tests: scratch files on a disk
//! file system (O_DIRECT does not work on tmpfs), the backend under test,
//! deterministic data.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use cowsnap_store::Backend;

/// A scratch directory under the target dir (on disk, unlike /tmp on some
/// machines), removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> PathBuf {
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

/// The backend the suite runs on: `COWSNAP_IO` (auto when unset).
pub fn backend() -> Backend {
    Backend::from_env()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
