//! NodeExpandVolume: grows the file system of a staged volume to its
//! device. A kernel NBD device is grown first to the export's size (the
//! kernel takes a new size on a live device), so such a volume grows while
//! in use. An nbdfuse device cannot: nbdfuse learns the export's size
//! once, when it connects (NBD tells no client of a resize), so it has the
//! volume's new size only once attached after the volume grew. That is
//! why cowsnap advertises OFFLINE expansion to Kubernetes: the CO grows
//! the volume while it is not published, and the node grows the file
//! system after the next stage (stage itself grows a file system smaller
//! than its device, e.g. a restore into a larger volume).

use std::path::Path;

use super::Node;
use super::attach;
use super::error::{NodeError, Result};
use super::kernel_nbd;
use super::mounts;
use super::state::Access;
use super::stats::block_size;

impl Node {
    /// Grows the file system of `volume` (staged here, available at `path`:
    /// its staging path or a target it is published at) to its device, and
    /// returns the device's size. `required` bytes more than the device
    /// has is FAILED_PRECONDITION: the device was attached before the
    /// volume grew and must be staged again.
    pub fn expand(&self, volume: &str, path: &Path, required: u64) -> Result<u64> {
        let path = super::resolve(path);
        let st = self.lock();
        let s = st.volumes.get(volume).ok_or_else(|| {
            NodeError::NotFound(format!("volume {volume} is not staged on this node"))
        })?;
        if s.staging_path != path && !s.published.contains_key(&path) {
            return Err(NodeError::NotFound(format!(
                "{} is neither the staging path nor a target of volume {volume}",
                path.display()
            )));
        }
        let dev = &s.attachment.device;
        let mut size = block_size(dev)?;
        if let Some(index) = s.attachment.nbd_index
            && required > size
        {
            size = self.grow_kernel_device(volume, index, &s.attachment.fuse_dir)?;
        }
        if required > size {
            return Err(NodeError::FailedPrecondition(format!(
                "volume {volume} is attached with {size} bytes, fewer than the {required} asked: \
                 it grew after it was staged; unpublish and unstage it, then stage it again \
                 (cowsnap volumes grow offline on a node)"
            )));
        }
        if let Access::Mount { fs_type, .. } = &s.access {
            mounts::grow_fs(dev, size, fs_type, Some(&s.staging_path))?;
        }
        Ok(size)
    }

    /// Gives kernel NBD device `index` of `volume` its export's current
    /// size; returns that size.
    fn grow_kernel_device(&self, volume: &str, index: u32, dir: &Path) -> Result<u64> {
        let export = cowsnap_proto::names::volume(volume);
        let size = kernel_nbd::refresh_size(
            index,
            &self.cfg.nbd_addr(),
            &export,
            &attach::nbd_label(dir),
        )
        .map_err(|e| NodeError::internal(format!("{e:#}")))?;
        tracing::info!(volume, device = %kernel_nbd::path(index).display(), size, "grew a kernel NBD device");
        Ok(size)
    }
}
