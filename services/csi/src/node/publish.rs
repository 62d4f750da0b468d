//! NodePublishVolume and NodeUnpublishVolume: bind mounts of a staged
//! volume onto the targets kubelet names — the device node onto a file for
//! a block volume, the staging mount onto a directory for a file system.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::Node;
use super::attach;
use super::error::{NodeError, Result};
use super::mounts;
use super::state::{Access, Publish, Staged};

/// A publish request, checked.
#[derive(Clone, Debug)]
pub struct PublishReq {
    pub volume: String,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub access: Access,
    pub readonly: bool,
}

impl Node {
    /// Publishes a staged volume at `req.target_path`: idempotent when it
    /// is published there the same way, ALREADY_EXISTS when differently,
    /// FAILED_PRECONDITION when the volume is not staged (at that path).
    pub fn publish(&self, req: &PublishReq) -> Result<()> {
        let mut st = self.lock();
        let Some(s) = st.volumes.get(&req.volume) else {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {} is not staged on this node",
                req.volume
            )));
        };
        if s.staging_path != req.staging_path {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {} is staged at {}, not at {}",
                req.volume,
                s.staging_path.display(),
                req.staging_path.display()
            )));
        }
        if std::mem::discriminant(&s.access) != std::mem::discriminant(&req.access) {
            return Err(NodeError::invalid(
                "volume_capability",
                format!(
                    "volume {} is staged as {:?}; it cannot be published as {:?}",
                    req.volume, s.access, req.access
                ),
            ));
        }
        let flags = match &req.access {
            Access::Mount { flags, .. } => flags.clone(),
            Access::Block => Vec::new(),
        };
        let want = Publish {
            readonly: req.readonly,
            flags,
            read_only_loop: None,
        };
        if let Some(p) = s.published.get(&req.target_path) {
            if !p.same_as(&want) {
                return Err(NodeError::AlreadyExists(format!(
                    "volume {} is already published at {} as {p:?}; asked {want:?}",
                    req.volume,
                    req.target_path.display()
                )));
            }
            // Published as asked; a bind lost since is made again.
            if mounts::mounted_at(&req.target_path)?.is_some() {
                return Ok(());
            }
        } else if let Some(m) = mounts::mounted_at(&req.target_path)? {
            return Err(NodeError::AlreadyExists(format!(
                "{} is already a mount of {}",
                req.target_path.display(),
                m.source
            )));
        }
        // Record first (so a crash after the bind leaves it owned and
        // undone by unpublish), then bind.
        let s = st.volumes.get_mut(&req.volume).expect("checked above");
        s.published.insert(req.target_path.clone(), want.clone());
        let s = s.clone();
        self.file.save(&st)?;
        match bind_target(&s, &req.target_path, &want) {
            Ok(read_only_loop) => {
                if read_only_loop.is_some() {
                    let v = st.volumes.get_mut(&req.volume).expect("checked above");
                    v.published.insert(
                        req.target_path.clone(),
                        Publish {
                            read_only_loop,
                            ..want
                        },
                    );
                    self.file.save(&st)?;
                }
            }
            Err(e) => {
                if let Some(v) = st.volumes.get_mut(&req.volume) {
                    v.published.remove(&req.target_path);
                }
                self.file.save(&st)?;
                return Err(e);
            }
        }
        tracing::info!(volume = %req.volume, target = %req.target_path.display(), readonly = req.readonly, "published");
        Ok(())
    }

    /// Unpublishes volume `volume` from `target`: unmounts and removes the
    /// target. Idempotent: a target not published (any more) is fine.
    pub fn unpublish(&self, volume: &str, target: &Path) -> Result<()> {
        let mut st = self.lock();
        let owned = st
            .volumes
            .get(volume)
            .and_then(|s| Some((s, s.published.get(target)?)));
        if let Some((s, p)) = owned {
            unbind_target(target, s, p)?;
            if let Some(s) = st.volumes.get_mut(volume) {
                s.published.remove(target);
            }
            self.file.save(&st)?;
            tracing::info!(volume, target = %target.display(), "unpublished");
        }
        Ok(())
    }
}

/// Bind-mounts a staged volume onto `target`, creating the target (a file
/// for a block volume, a directory for a file system) if it is missing.
/// A read-only block publish gets a read-only loop device of its own over
/// the attachment's file (or kernel NBD device), returned.
pub(super) fn bind_target(s: &Staged, target: &Path, p: &Publish) -> Result<Option<PathBuf>> {
    let create = |r: std::io::Result<()>| {
        r.map_err(|e| NodeError::internal(format!("{}: cannot create: {e}", target.display())))
    };
    if let Some(parent) = target.parent() {
        create(std::fs::create_dir_all(parent))?;
    }
    match &s.access {
        Access::Block => {
            if !target.exists() {
                create(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(target)
                        .map(drop),
                )?;
            }
            if !p.readonly {
                mounts::bind(&s.attachment.device, target, false, &p.flags)?;
                return Ok(None);
            }
            let ro = mounts::run(
                Command::new("losetup")
                    .args(["--show", "-f", "-r", "--direct-io=on"])
                    .arg(s.attachment.backing()),
            )
            .map(|out| PathBuf::from(out.trim()))?;
            match mounts::bind(&ro, target, true, &p.flags) {
                Ok(()) => Ok(Some(ro)),
                Err(e) => {
                    let _ = mounts::run(Command::new("losetup").arg("-d").arg(&ro));
                    Err(e)
                }
            }
        }
        Access::Mount { .. } => {
            create(std::fs::create_dir_all(target))?;
            mounts::bind(&s.staging_path, target, p.readonly, &p.flags)?;
            Ok(None)
        }
    }
}

/// Unmounts `target` and removes it (the plugin made it), and detaches the
/// publish's own read-only loop device if it has one (and it is still over
/// the volume's file or device).
pub(super) fn unbind_target(target: &Path, s: &Staged, p: &Publish) -> Result<()> {
    mounts::unmount(target)?;
    let removed = match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    removed
        .map_err(|e| NodeError::internal(format!("{}: cannot remove: {e}", target.display())))?;
    if let Some(l) = &p.read_only_loop
        && *l != s.attachment.device
        && attach::loop_backing_file(l).as_deref() == Some(s.attachment.backing().as_path())
    {
        mounts::run(Command::new("losetup").arg("-d").arg(l))?;
    }
    Ok(())
}
