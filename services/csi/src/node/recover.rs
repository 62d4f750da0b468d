//! Start-up: bring every staged volume back after the plugin (and the
//! worker's NBD server it shares a process with) restarted.
//!
//! The NBD connection of every attachment died with the old process, so
//! each staged volume is attached again: its targets are unmounted, its
//! staging mount too, the old loop device and FUSE mount are released
//! (nbdfuse exits when unmounted, or is killed if it survived), a new
//! attachment is made (on the same loop device when it is free, so the
//! device node kubelet knows stays right), and the staging mount and the
//! targets are made again. Attachments under the plugin's directory that
//! no record owns (a stage a crash cut short) are released.
//!
//! A kernel NBD device outlives the connection: the kernel holds its I/O
//! for a while (`kernel_nbd::DEAD_CONN_TIMEOUT`), so it is given a new
//! connection and nothing is unmounted. Only when that fails (the device
//! gave up, or the node rebooted) is it attached anew as above.
//!
//! Must run while the worker's NBD server serves (nbdfuse connects to it).
//! A repeated NodeStage uses the same re-attach for a volume whose
//! attachment is gone (nbdfuse killed, loop device detached by hand).

use super::Node;
use super::attach;
use super::error::Result;
use super::kernel_nbd;
use super::mounts;
use super::publish::{bind_target, unbind_target};
use super::stage::release_leftovers;
use super::state::{Access, NodeState, Publish};

impl Node {
    /// Re-attaches every staged volume and releases leftovers; a volume
    /// that cannot be brought back stays recorded (unstage releases it)
    /// and is logged.
    pub fn recover(&self) -> Result<()> {
        let mut st = self.lock();
        let ids: Vec<String> = st.volumes.keys().cloned().collect();
        for id in &ids {
            if let Err(e) = self.reattach(&mut st, id) {
                tracing::error!(volume = %id, "recovery: {e}");
            }
        }
        let root = self.cfg.attach_root();
        if let Ok(rd) = std::fs::read_dir(&root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".pid") {
                    let _ = std::fs::remove_file(e.path());
                    continue;
                }
                if st.volumes.contains_key(&name) {
                    continue;
                }
                if let Err(err) = release_leftovers(&e.path()) {
                    tracing::error!(dir = %e.path().display(), "recovery: {err}");
                }
            }
        }
        Ok(())
    }

    /// Attaches staged volume `id` again: its targets and staging mount
    /// are unmounted, the old attachment released, a new one made (on the
    /// same loop device when it is free), saved, and the staging mount and
    /// targets made again.
    pub(super) fn reattach(&self, st: &mut NodeState, id: &str) -> Result<()> {
        let s = st.volumes[id].clone();
        if let Some(index) = s.attachment.nbd_index {
            let label = attach::nbd_label(&s.attachment.fuse_dir);
            let export = cowsnap_proto::names::volume(id);
            match kernel_nbd::reconnect(index, &self.cfg.nbd_addr(), &export, &label) {
                Ok(()) => {
                    tracing::info!(volume = %id, device = %s.attachment.device.display(), "reconnected a staged volume");
                    return self.mount_staging(&s);
                }
                Err(e) => {
                    tracing::warn!(volume = %id, "cannot reconnect {}: {e:#}; attaching anew", s.attachment.device.display());
                }
            }
        }
        for t in s.published.keys() {
            if let Err(e) = mounts::unmount(t) {
                tracing::error!(volume = %id, target = %t.display(), "re-attach: {e}");
            }
        }
        if matches!(s.access, Access::Mount { .. })
            && let Err(e) = mounts::unmount(&s.staging_path)
        {
            tracing::error!(volume = %id, "re-attach: {e}");
        }
        attach::detach(&s.attachment)?;
        let att = self.attach_export(id, Some(&s.attachment.device))?;
        let v = st.volumes.get_mut(id).expect("staged");
        v.attachment = att;
        let v = v.clone();
        self.file.save(st)?;
        self.mount_staging(&v)?;
        // The old attachment's read-only loop devices went with it.
        for (t, p) in &v.published {
            // Its old read-only loop device number may be the new main
            // one's now: the target alone is undone.
            let bound = Publish {
                read_only_loop: None,
                ..p.clone()
            };
            let _ = unbind_target(t, &v, &bound);
            let read_only_loop = match bind_target(&v, t, p) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(volume = %id, target = %t.display(), "re-attach: publish: {e}");
                    None
                }
            };
            if let Some(rec) = st.volumes.get_mut(id).and_then(|s| s.published.get_mut(t)) {
                rec.read_only_loop = read_only_loop;
            }
        }
        self.file.save(st)?;
        tracing::info!(volume = %id, device = %v.attachment.device.display(), "recovered a staged volume");
        Ok(())
    }
}
