//! How the offline tools reach devices: the I/O backend (`--io`, else
//! `COWSNAP_IO`, else auto), the runtime the engine's futures run on, and
//! `O_DIRECT` opens (read-only unless a tool changes the device). Errors from
//! here name the device.

use std::future::Future;
use std::path::Path;

use anyhow::Context;
use cowsnap_store::{Backend, BackendChoice, Device};

/// The `--io` flag every tool that touches a device takes.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct BackendArg {
    /// I/O backend: auto (io_uring when the kernel allows it), uring or portable.
    #[arg(
        long = "io",
        value_name = "BACKEND",
        env = "COWSNAP_IO",
        default_value = "auto"
    )]
    pub io: BackendChoice,
}

/// Whether a tool may change a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A running backend and the runtime that drives the engine on it.
pub struct Devices {
    backend: Backend,
    rt: tokio::runtime::Runtime,
}

impl Devices {
    pub fn start(arg: BackendArg) -> anyhow::Result<Devices> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime")?;
        let backend = Backend::start(arg.io)?;
        Ok(Devices { backend, rt })
    }

    /// Runs the engine's futures to completion.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Opens `path` (a regular file or a block device) with `O_DIRECT`.
    pub fn open(&self, path: &Path, access: Access) -> anyhow::Result<Device> {
        // O_DIRECT on a directory fails with EINVAL, which would read as
        // "O_DIRECT not supported": say what it is instead.
        if path.is_dir() {
            anyhow::bail!(
                "{}: cannot open: is a directory, not a block device or a regular file",
                path.display()
            );
        }
        Ok(self.backend.open(path, access == Access::ReadWrite)?)
    }
}
