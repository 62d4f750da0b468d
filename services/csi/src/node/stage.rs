//! NodeStageVolume and NodeUnstageVolume: attach the volume (and for a
//! file system: make it on first use, mount it at the staging path), and
//! undo that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::Node;
use super::attach::{self, Attachment};
use super::error::{NodeError, Result};
use super::mounts;
use super::state::{Access, Staged};

/// A stage request, checked.
#[derive(Clone, Debug)]
pub struct Stage {
    /// The cowsnap volume id.
    pub volume: String,
    pub staging_path: PathBuf,
    pub access: Access,
}

impl Node {
    /// Stages `req`: idempotent when the volume is staged the same way,
    /// ALREADY_EXISTS when it is staged differently.
    pub fn stage(&self, req: &Stage) -> Result<()> {
        let mut st = self.lock();
        if let Some(s) = st.volumes.get(&req.volume) {
            if s.staging_path != req.staging_path || s.access != req.access {
                return Err(NodeError::AlreadyExists(format!(
                    "volume {} is already staged at {} as {:?}; asked {} as {:?}",
                    req.volume,
                    s.staging_path.display(),
                    s.access,
                    req.staging_path.display(),
                    req.access
                )));
            }
            // Staged as asked. An attachment lost since (nbdfuse killed,
            // loop device detached by hand) is made again; a staging mount
            // lost since is put back.
            if !attach::is_attached(&s.attachment) {
                tracing::warn!(volume = %req.volume, "the attachment is gone; attaching again");
                return self.reattach(&mut st, &req.volume);
            }
            return self.mount_staging(s);
        }
        let fuse_dir = self.cfg.fuse_dir(&req.volume);
        // Whatever an interrupted stage of this volume left is detached
        // first (nothing in the state owns it).
        release_leftovers(&fuse_dir)?;
        let att = self.attach_export(&req.volume, None)?;
        let staged = Staged {
            staging_path: req.staging_path.clone(),
            access: req.access.clone(),
            attachment: att,
            published: BTreeMap::new(),
        };
        let done = self
            .first_use(&staged)
            .and_then(|made| {
                if !made {
                    grow_to_device(&staged, false)?;
                }
                self.mount_staging(&staged)?;
                if !made {
                    grow_to_device(&staged, true)?;
                }
                Ok(())
            })
            .and_then(|()| {
                st.volumes.insert(req.volume.clone(), staged.clone());
                self.file.save(&st).inspect_err(|_| {
                    st.volumes.remove(&req.volume);
                })
            });
        if let Err(e) = done {
            let _ = mounts::unmount(&staged.staging_path);
            if let Err(d) = attach::detach(&staged.attachment) {
                tracing::error!(volume = %req.volume, "detach after a failed stage: {d}");
            }
            return Err(e);
        }
        tracing::info!(
            volume = %req.volume,
            device = %staged.attachment.device.display(),
            staging = %staged.staging_path.display(),
            "staged"
        );
        Ok(())
    }

    /// Makes the file system of a mount volume if the device holds none
    /// (blkid finds nothing): never over existing data. Whether it made
    /// one.
    fn first_use(&self, s: &Staged) -> Result<bool> {
        let Access::Mount { fs_type, .. } = &s.access else {
            return Ok(false);
        };
        let dev = &s.attachment.device;
        match mounts::probe_fs(dev)? {
            None => {
                tracing::info!(device = %dev.display(), "making a {fs_type} file system (first use)");
                mounts::mkfs(dev, fs_type).map(|()| true)
            }
            Some(t) if &t == fs_type => Ok(false),
            Some(t) => Err(NodeError::FailedPrecondition(format!(
                "the volume holds a {t} file system, {fs_type} was asked; not formatting over it"
            ))),
        }
    }

    /// Mounts a staged file system at its staging path unless it is
    /// mounted there already.
    pub(super) fn mount_staging(&self, s: &Staged) -> Result<()> {
        let Access::Mount { fs_type, flags } = &s.access else {
            return Ok(());
        };
        if let Some(m) = mounts::mounted_at(&s.staging_path)? {
            if Path::new(&m.source) == s.attachment.device {
                return Ok(());
            }
            return Err(NodeError::AlreadyExists(format!(
                "{} is already a mount of {}",
                s.staging_path.display(),
                m.source
            )));
        }
        std::fs::create_dir_all(&s.staging_path).map_err(|e| {
            NodeError::internal(format!("{}: cannot create: {e}", s.staging_path.display()))
        })?;
        mounts::mount_fs(&s.attachment.device, &s.staging_path, fs_type, flags)
    }

    /// Unstages volume `volume` from `staging_path`: idempotent (a volume
    /// not staged is fine), FAILED_PRECONDITION while it is published.
    pub fn unstage(&self, volume: &str, staging_path: &Path) -> Result<()> {
        let mut st = self.lock();
        let Some(s) = st.volumes.get(volume) else {
            return Ok(());
        };
        if s.staging_path != staging_path {
            return Err(NodeError::NotFound(format!(
                "volume {volume} is staged at {}, not at {}",
                s.staging_path.display(),
                staging_path.display()
            )));
        }
        if !s.published.is_empty() {
            let targets: Vec<_> = s
                .published
                .keys()
                .map(|t| t.display().to_string())
                .collect();
            return Err(NodeError::FailedPrecondition(format!(
                "volume {volume} is still published at {}",
                targets.join(", ")
            )));
        }
        if matches!(s.access, Access::Mount { .. }) {
            mounts::unmount(&s.staging_path)?;
        }
        attach::detach(&s.attachment)?;
        st.volumes.remove(volume);
        self.file.save(&st)?;
        tracing::info!(volume, "unstaged");
        Ok(())
    }
}

/// Grows an existing file system of a staged mount volume to its device
/// (a volume grown while unstaged, or restored into a larger one), before
/// its staging mount and after it (see [`mounts::grow_fs`]), unless it is
/// mounted read-only.
fn grow_to_device(s: &Staged, mounted: bool) -> Result<()> {
    let Access::Mount { fs_type, flags } = &s.access else {
        return Ok(());
    };
    if flags.iter().any(|f| f == "ro") {
        return Ok(());
    }
    let dev = &s.attachment.device;
    let size = super::stats::block_size(dev)?;
    mounts::grow_fs(
        dev,
        size,
        fs_type,
        mounted.then_some(s.staging_path.as_path()),
    )
}

/// Detaches whatever lies under `fuse_dir` though no record owns it: loop
/// devices over files in it, kernel NBD devices labelled with it, its FUSE
/// mount.
pub(super) fn release_leftovers(fuse_dir: &Path) -> Result<()> {
    let loops = attach::devices_under(fuse_dir);
    if loops.is_empty() && mounts::mounted_at(fuse_dir)?.is_none() {
        let _ = std::fs::remove_dir(fuse_dir);
        return Ok(());
    }
    tracing::warn!(dir = %fuse_dir.display(), "releasing an attachment no record owns");
    // A file system a crash left mounted from one of those devices first.
    for m in mounts::mount_table()?.iter().rev() {
        if loops.iter().any(|l| Path::new(&m.source) == l) {
            mounts::unmount(&m.mount_point)?;
        }
    }
    attach::detach(&Attachment {
        fuse_dir: fuse_dir.to_path_buf(),
        nbdfuse_pid: 0,
        device: PathBuf::new(),
        nbd_index: None,
    })
}
