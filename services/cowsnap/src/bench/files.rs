//! The benchmark's scratch files: a fresh directory on a disk file system
//! (removed when the run ends), sparse files of a given size.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// A fresh `cowsnap-bench-*` directory inside `parent`, removed on drop.
pub fn scratch_dir(parent: &Path) -> anyhow::Result<tempfile::TempDir> {
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    if is_tmpfs(parent)? {
        bail!(
            "{} is on tmpfs, where O_DIRECT does not work: pass --dir on a disk file system",
            parent.display()
        );
    }
    tempfile::Builder::new()
        .prefix("cowsnap-bench-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a scratch directory in {}", parent.display()))
}

fn is_tmpfs(path: &Path) -> anyhow::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs fills the zeroed struct from a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64 == TMPFS_MAGIC)
}

/// Creates (or truncates) a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> anyhow::Result<PathBuf> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("sizing {} to {size} bytes", path.display()))?;
    Ok(path.to_path_buf())
}

/// Runs `measure` on a new multi-threaded runtime, in a fresh scratch
/// directory inside `parent` (default: the current directory) that is
/// removed afterwards, whatever the outcome. Ctrl-C (SIGINT) or SIGTERM
/// drops the measurement (whose child processes are killed as their
/// handles drop), removes the directory and fails the run.
pub fn in_scratch<T>(
    parent: Option<&Path>,
    measure: impl AsyncFnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let parent = match parent {
        Some(d) => d.to_path_buf(),
        None => std::env::current_dir().context("the current directory")?,
    };
    let scratch = scratch_dir(&parent)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let result = rt.block_on(async {
        tokio::select! {
            r = measure(scratch.path()) => r,
            sig = interrupted() => Err(sig),
        }
    });
    drop(rt);
    let dir = scratch.path().display().to_string();
    scratch
        .close()
        .with_context(|| format!("removing the scratch directory {dir}"))?;
    result
}

/// Waits for SIGINT or SIGTERM: the error a run stopped by one ends with.
async fn interrupted() -> anyhow::Error {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // No handler: the signal's default action ends the process.
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    };
    anyhow::anyhow!("interrupted by {name}")
}
