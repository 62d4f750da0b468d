//! The NBD exports a worker serves: one per volume (`volumes/VOL`, the
//! origin) and one per snapshot (`volumes/VOL/snapshots/SNAP`). The worker
//! adds and removes them as volumes and snapshots come and go; the NBD
//! server looks them up by name at each handshake.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use cowsnap_store::{Origin, Target};
use tokio_util::sync::CancellationToken;

/// One export: an engine target and whether clients may write to it.
pub struct Export {
    /// The resource name, which is also the NBD export name.
    pub name: String,
    pub origin: Arc<Origin>,
    pub target: Target,
    pub writable: bool,
    /// Preferred I/O size to advertise (the chunk size).
    pub preferred_block_size: u32,
    /// Cancelled when the export is closed for good ([`Exports::close`]):
    /// the connections using it end.
    pub closed: CancellationToken,
}

impl Export {
    /// Size in bytes now: the origin's (it may grow), or the snapshot's
    /// (the origin's when it was taken). 0 once the snapshot is gone.
    pub fn size(&self) -> u64 {
        self.origin.target_size(self.target).unwrap_or(0)
    }

    /// The alignment every request must respect.
    pub fn min_block_size(&self) -> u32 {
        self.origin.block_size() as u32
    }
}

/// The export table, shared by the worker and the NBD server.
#[derive(Default)]
pub struct Exports {
    map: RwLock<BTreeMap<String, Arc<Export>>>,
}

impl Exports {
    pub fn new() -> Arc<Exports> {
        Arc::new(Exports::default())
    }

    /// Adds (or replaces) an export.
    pub fn insert(&self, export: Export) {
        self.map
            .write()
            .expect("exports")
            .insert(export.name.clone(), Arc::new(export));
    }

    /// Removes an export; connections already using it see errors on their
    /// next request (the engine refuses I/O to a deleted or merging
    /// snapshot).
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        self.map.write().expect("exports").remove(name)
    }

    /// Removes an export and ends the connections using it (their requests
    /// in flight are answered first): for a volume retired while its
    /// snapshots live on, whose engine stays up.
    pub fn close(&self, name: &str) {
        if let Some(e) = self.remove(name) {
            e.closed.cancel();
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.map.read().expect("exports").get(name).cloned()
    }

    /// Every export, by name.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.map
            .read()
            .expect("exports")
            .values()
            .cloned()
            .collect()
    }
}
