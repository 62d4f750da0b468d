//! A volume's live state beside its record: its engine running with the
//! snapshots loaded into it, or why it could not be brought up. A volume
//! being created by a restore or clone has none until its copy is done.

use std::collections::BTreeMap;
use std::sync::Arc;

use cowsnap_store::{Origin, SnapId};

pub(super) enum Live {
    /// The engine runs, with these snapshots loaded (engine id by snapshot
    /// id).
    Up {
        origin: Arc<Origin>,
        snaps: BTreeMap<String, SnapId>,
    },
    /// The volume could not be brought up: why, for clients (no server
    /// paths).
    Failed(String),
}

impl Live {
    /// A new engine with no snapshot yet.
    pub(super) fn up(origin: Arc<Origin>) -> Live {
        Live::Up {
            origin,
            snaps: BTreeMap::new(),
        }
    }

    pub(super) fn origin(&self) -> Option<&Arc<Origin>> {
        match self {
            Live::Up { origin, .. } => Some(origin),
            Live::Failed(_) => None,
        }
    }

    /// The engine id of snapshot `snap`, if it is loaded.
    pub(super) fn snap(&self, snap: &str) -> Option<SnapId> {
        match self {
            Live::Up { snaps, .. } => snaps.get(snap).copied(),
            Live::Failed(_) => None,
        }
    }

    /// The engine and the engine id of snapshot `snap`, if it is loaded.
    pub(super) fn loaded(&self, snap: &str) -> Option<(&Arc<Origin>, SnapId)> {
        Some((self.origin()?, self.snap(snap)?))
    }

    pub(super) fn failure(&self) -> Option<&str> {
        match self {
            Live::Up { .. } => None,
            Live::Failed(why) => Some(why),
        }
    }

    /// Records that the engine loaded snapshot `snap` as `id` (a failed
    /// volume loads none).
    pub(super) fn add_snap(&mut self, snap: &str, id: SnapId) {
        if let Live::Up { snaps, .. } = self {
            snaps.insert(snap.to_string(), id);
        }
    }
}
