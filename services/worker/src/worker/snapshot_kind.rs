//! The kinds of snapshot a volume holds, told apart by id: a client's
//! snapshot, or the hidden snapshot a clone task copies its source from.
//! The only place that builds a hidden snapshot's id or recognises one.

use std::fmt;

use crate::state::SnapshotRec;

/// The prefix of a clone's hidden snapshot id. It starts with a dot, which
/// no id a client chooses may (`names::check_id`), so a client's snapshot
/// is never taken for a hidden one.
const CLONE_SOURCE: &str = ".clone-";

/// A snapshot on a volume, by kind. Its `Display` is the snapshot's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SnapshotKind<'a> {
    /// Named by a client: exported, listed and counted among its volume's
    /// snapshots.
    Client(&'a str),
    /// The point in time clone task `task` copies from: never exported,
    /// listed, nor counted; released when the task ends.
    CloneSource { task: &'a str },
}

impl<'a> SnapshotKind<'a> {
    /// The kind of the snapshot with id `id`.
    pub(super) fn of(id: &'a str) -> Self {
        match id.strip_prefix(CLONE_SOURCE) {
            Some(task) => SnapshotKind::CloneSource { task },
            None => SnapshotKind::Client(id),
        }
    }

    /// Whether clients see it (exports, listings, a volume's count).
    pub(super) fn is_visible(self) -> bool {
        matches!(self, SnapshotKind::Client(_))
    }
}

impl fmt::Display for SnapshotKind<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotKind::Client(id) => f.write_str(id),
            SnapshotKind::CloneSource { task } => write!(f, "{CLONE_SOURCE}{task}"),
        }
    }
}

impl SnapshotRec {
    /// This snapshot's kind.
    pub(super) fn kind(&self) -> SnapshotKind<'_> {
        SnapshotKind::of(&self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Phase, StateFile, TaskKind};

    #[test]
    fn a_clone_source_id_is_built_and_recognised_as_one() {
        let id = SnapshotKind::CloneSource { task: "12" }.to_string();
        assert_eq!(id, ".clone-12");
        assert_eq!(
            SnapshotKind::of(&id),
            SnapshotKind::CloneSource { task: "12" }
        );
        assert!(!SnapshotKind::of(&id).is_visible());
    }

    #[test]
    fn every_id_a_client_may_choose_is_a_client_snapshot() {
        for id in ["s1", "clone-12", "my-clone-1", "x"] {
            cowsnap_proto::names::check_id(id).unwrap();
            assert_eq!(SnapshotKind::of(id), SnapshotKind::Client(id));
            assert!(SnapshotKind::of(id).is_visible());
            assert_eq!(SnapshotKind::of(id).to_string(), id);
        }
        // The hidden prefix is not a valid client id.
        assert!(cowsnap_proto::names::check_id(".clone-1").is_err());
    }

    /// A state file written while tasks still recorded their hidden
    /// snapshot (`temp_snapshot`, never read) loads: the field is ignored,
    /// and the hidden snapshot is known by its id alone.
    #[test]
    fn a_state_file_with_the_old_temp_snapshot_field_loads() {
        let dir = tempfile::tempdir().unwrap();
        let old = r#"{"volumes":{"src":{"id":"src","size_bytes":1048576,"chunk_sectors":16,"device":"/data/devices/src.vol","file_backed":true,"phase":"ready","snapshots":[{"id":".clone-3","cow_size_bytes":1114112,"chunk_sectors":16,"device":"/data/devices/src..clone-3.cow","file_backed":true,"writable":false,"phase":"ready","create_time":5}],"merging":null,"create_time":4}},"tasks":{"3":{"id":"3","kind":"clone","target":"volumes/dst","source":"volumes/src","done":false,"error":null,"done_units":0,"total_units":256,"create_time":5,"temp_snapshot":".clone-3"}},"next_task":3}"#;
        std::fs::write(dir.path().join("state.json"), old).unwrap();
        let f = StateFile::new(dir.path());
        let mut st = f.load().unwrap();
        let t = &st.tasks["3"];
        assert_eq!(
            (t.kind, t.total_units, t.done),
            (TaskKind::Clone, 256, false)
        );
        let s = &st.volumes()["src"].snapshots[0];
        assert_eq!(s.kind(), SnapshotKind::CloneSource { task: "3" });
        assert_eq!(s.phase, Phase::Ready);
        // Written back without it, and loads the same.
        f.checkpoint(&mut st).unwrap();
        let new = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
        assert!(!new.contains("temp_snapshot"), "{new}");
        assert_eq!(f.load().unwrap(), st);
    }
}
