//! How the worker's state is kept durable (D8 of docs/design.md): a
//! checkpoint `state.json` (the whole state, written to a temporary file,
//! fsynced, renamed into place, directory fsynced) plus a journal
//! `state.log` of the changes made since, one record per save.
//!
//! A save appends one record: the volumes it changed (each whole, or its
//! removal) and the tasks if they changed, written in place into the
//! journal's preallocated blocks and made durable with one `fdatasync`
//! (the blocks are already written, so no file-system metadata changes:
//! one device round trip, however large the state grows). A record is
//! framed as
//!
//! ```text
//! u32 LE  payload length
//! u32 LE  CRC-32 of the next 8 bytes and the payload
//! u64 LE  generation (the checkpoint's)
//! payload (JSON of the change)
//! ```
//!
//! Start-up reads the checkpoint, then applies records from the start of
//! the journal while each is whole (CRC) and of the checkpoint's
//! generation: a torn last record (a save cut by a crash, never
//! acknowledged) and whatever older bytes lie past it end the replay. A
//! checkpoint takes the next generation, so once it is in place every
//! record before it is ignored, and the journal is written again from its
//! start. A checkpoint is written at start-up, when the journal is full,
//! and after a failed append (a failed write may have left anything in the
//! journal: no later record may be appended behind it).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{TaskRec, VolumeRec, WorkerState, sync_dir};

const HEADER: usize = 16;
/// The smallest journal; it is sized to twice the checkpoint above that.
const MIN_JOURNAL: u64 = 1 << 20;
/// Journal growth is written in pieces of this size.
const ZEROS: usize = 1 << 20;

/// One save's worth of changes.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Change {
    /// Volumes written whole, or `None` for a removed one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    volumes: BTreeMap<String, Option<VolumeRec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tasks: Option<BTreeMap<String, TaskRec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_task: Option<u64>,
}

impl Change {
    fn apply(self, st: &mut WorkerState) {
        for (id, v) in self.volumes {
            match v {
                Some(v) => {
                    st.volumes.insert(id, v);
                }
                None => {
                    st.volumes.remove(&id);
                }
            }
        }
        if let Some(t) = self.tasks {
            st.tasks = t;
        }
        if let Some(n) = self.next_task {
            st.next_task = n;
        }
    }
}

/// What the journal holds and where the next record goes.
#[derive(Default)]
struct Journal {
    file: Option<File>,
    generation: u64,
    /// Where the next record is written.
    end: u64,
    /// Bytes of the journal file that are written (zeros or records).
    capacity: u64,
    /// Set by a failed append or checkpoint: the next save checkpoints.
    broken: bool,
    /// The tasks and task counter as last saved.
    tasks: BTreeMap<String, TaskRec>,
    next_task: u64,
}

/// A save prepared under the worker's lock ([`StateFile::prepare`]), to
/// be made durable by [`StateFile::commit`], which may run beside device
/// work on a blocking thread.
#[derive(Debug)]
pub enum Save {
    /// Nothing changed.
    Nothing,
    /// One journal record, framed, to be written at `at`.
    Append { at: u64, frame: Vec<u8> },
    /// The whole state of generation `generation`.
    Checkpoint { generation: u64, bytes: Vec<u8> },
}

/// `state.json` and `state.log` in the data dir.
#[derive(Clone)]
pub struct StateFile {
    path: PathBuf,
    log: PathBuf,
    journal: Arc<Mutex<Journal>>,
}

impl StateFile {
    pub fn new(data_dir: &Path) -> StateFile {
        StateFile {
            path: data_dir.join("state.json"),
            log: data_dir.join("state.log"),
            journal: Arc::default(),
        }
    }

    /// The saved state (the checkpoint and the journal's records after
    /// it), or an empty one on first start.
    pub fn load(&self) -> anyhow::Result<WorkerState> {
        let mut st = match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: corrupt worker state", self.path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => WorkerState::default(),
            Err(e) => {
                return Err(e).with_context(|| format!("{}: cannot read", self.path.display()));
            }
        };
        let mut j = self.journal.lock().expect("journal");
        *j = Journal {
            generation: st.generation,
            ..Journal::default()
        };
        match std::fs::read(&self.log) {
            Ok(bytes) => {
                j.capacity = bytes.len() as u64;
                let mut at = 0;
                while let Some((change, len)) = record_at(&bytes[at..], st.generation) {
                    let change: Change = serde_json::from_slice(change).with_context(|| {
                        format!(
                            "{}: a record at byte {at} passes its check but cannot be read",
                            self.log.display()
                        )
                    })?;
                    change.apply(&mut st);
                    at += len;
                }
                j.end = at as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| format!("{}: cannot read", self.log.display()));
            }
        }
        for v in st.volumes.values_mut() {
            // Written before volumes could grow: the snapshot has the
            // volume's size, which it still is.
            for s in v.snapshots.iter_mut().filter(|s| s.size_bytes == 0) {
                s.size_bytes = v.size_bytes;
            }
        }
        st.dirty.clear();
        j.tasks = st.tasks.clone();
        j.next_task = st.next_task;
        Ok(st)
    }

    /// Saves `st` durably: what changed since the last save (see the
    /// module doc).
    pub fn save(&self, st: &mut WorkerState) -> anyhow::Result<()> {
        let save = self.prepare(st)?;
        self.commit(save)
    }

    /// Writes the whole state as a new checkpoint (start-up does, so the
    /// journal starts empty).
    pub fn checkpoint(&self, st: &mut WorkerState) -> anyhow::Result<()> {
        let save = self.prepare_as(st, true)?;
        self.commit(save)
    }

    /// The first half of a save, cheap, under the caller's lock: what
    /// changed in `st` since the last save, encoded. `st` counts as saved
    /// from here on: the caller commits the result before it prepares
    /// another save, and if the commit fails the next save is a checkpoint.
    pub fn prepare(&self, st: &mut WorkerState) -> anyhow::Result<Save> {
        self.prepare_as(st, false)
    }

    /// [`StateFile::prepare`], a checkpoint whatever changed if `checkpoint`.
    fn prepare_as(&self, st: &mut WorkerState, checkpoint: bool) -> anyhow::Result<Save> {
        let mut j = self.journal.lock().expect("journal");
        let tasks_same = j.tasks == st.tasks && j.next_task == st.next_task;
        let checkpoint = checkpoint || j.broken;
        if !checkpoint && st.dirty.is_empty() && tasks_same {
            return Ok(Save::Nothing);
        }
        let save = Self::encode(&j, st, tasks_same, checkpoint);
        // Whatever the outcome, what changed is no longer noted in `st`:
        // a save that could not even be encoded is followed by a checkpoint.
        j.broken |= save.is_err();
        let save = save?;
        if let Save::Append { at, frame } = &save {
            j.end = at + frame.len() as u64;
        }
        j.tasks = st.tasks.clone();
        j.next_task = st.next_task;
        Ok(save)
    }

    /// A record of what changed in `st`, or a checkpoint of it when asked
    /// or when the record does not fit.
    fn encode(
        j: &Journal,
        st: &mut WorkerState,
        tasks_same: bool,
        checkpoint: bool,
    ) -> anyhow::Result<Save> {
        let dirty = std::mem::take(&mut st.dirty);
        if !checkpoint {
            let change = Change {
                volumes: dirty
                    .into_iter()
                    .map(|id| {
                        let v = st.volumes.get(&id).cloned();
                        (id, v)
                    })
                    .collect(),
                tasks: (!tasks_same).then(|| st.tasks.clone()),
                next_task: (!tasks_same).then_some(st.next_task),
            };
            let frame = frame(st.generation, &serde_json::to_vec(&change)?);
            if j.end + frame.len() as u64 <= j.capacity {
                return Ok(Save::Append { at: j.end, frame });
            }
        }
        st.generation += 1;
        Ok(Save::Checkpoint {
            generation: st.generation,
            bytes: serde_json::to_vec(&*st)?,
        })
    }

    /// The second half of a save: makes it durable (blocking).
    pub fn commit(&self, save: Save) -> anyhow::Result<()> {
        let done = match save {
            Save::Nothing => return Ok(()),
            Save::Append { at, frame } => self.append(at, &frame),
            Save::Checkpoint { generation, bytes } => self.write_checkpoint(generation, &bytes),
        };
        if done.is_err() {
            self.journal.lock().expect("journal").broken = true;
        }
        done
    }

    fn append(&self, at: u64, frame: &[u8]) -> anyhow::Result<()> {
        let mut j = self.journal.lock().expect("journal");
        if j.file.is_none() {
            j.file = Some(self.open_log()?);
        }
        let f = j.file.as_ref().expect("opened");
        f.write_all_at(frame, at)
            .and_then(|()| f.sync_data())
            .with_context(|| format!("{}: cannot append", self.log.display()))
    }

    fn open_log(&self) -> anyhow::Result<File> {
        cowsnap_proto::server::private_file_options()
            .read(true)
            .write(true)
            .open(&self.log)
            .with_context(|| format!("{}: cannot open", self.log.display()))
    }

    /// Puts the checkpoint in place, then makes the journal ready for the
    /// records after it: written (zeros) to twice the checkpoint's size.
    fn write_checkpoint(&self, generation: u64, bytes: &[u8]) -> anyhow::Result<()> {
        // Only the owner reads it (it names the devices), whatever the umask.
        cowsnap_proto::server::replace_file(&self.path, bytes)?;

        let mut j = self.journal.lock().expect("journal");
        j.file = None;
        let want = MIN_JOURNAL.max(2 * bytes.len() as u64);
        let f = cowsnap_proto::server::private_file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.log)
            .with_context(|| format!("{}: cannot open", self.log.display()))?;
        let had = f.metadata()?.len();
        if had < want {
            let zeros = vec![0u8; ZEROS];
            let mut at = had;
            while at < want {
                let n = (want - at).min(ZEROS as u64) as usize;
                f.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            f.sync_all()
                .with_context(|| format!("{}: cannot sync", self.log.display()))?;
            if had == 0 {
                sync_dir(self.log.parent().expect("the journal has a directory"))?;
            }
        }
        j.capacity = had.max(want);
        j.file = Some(f);
        j.generation = generation;
        j.end = 0;
        j.broken = false;
        Ok(())
    }
}

fn frame(generation: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&generation.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The payload of the whole record of generation `generation` at the
/// start of `bytes`, and the record's length; `None` where the journal's
/// records end.
fn record_at(bytes: &[u8], generation: u64) -> Option<(&[u8], usize)> {
    let header = bytes.get(..HEADER)?;
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let g = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if len == 0 || g != generation {
        return None;
    }
    let body = bytes.get(8..HEADER.checked_add(len)?)?;
    (crc32fast::hash(body) == crc).then(|| (&body[8..], HEADER + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Phase, SnapshotRec};

    fn volume(id: &str, snapshots: usize) -> VolumeRec {
        VolumeRec {
            id: id.into(),
            size_bytes: 1 << 20,
            chunk_sectors: 16,
            device: format!("/data/{id}.vol").into(),
            file_backed: true,
            phase: Phase::Ready,
            snapshots: (0..snapshots)
                .map(|i| snapshot(id, &format!("s{i}")))
                .collect(),
            merging: None,
            create_time: 1,
            retired: false,
        }
    }

    fn snapshot(vol: &str, id: &str) -> SnapshotRec {
        SnapshotRec {
            id: id.into(),
            size_bytes: 1 << 20,
            cow_size_bytes: 1 << 21,
            chunk_sectors: 16,
            device: format!("/data/{vol}.{id}.cow").into(),
            file_backed: true,
            writable: false,
            phase: Phase::Ready,
            create_time: 2,
            error: None,
        }
    }

    /// A state file in `dir` whose first save (a checkpoint) holds `v`.
    fn started(dir: &Path, v: VolumeRec) -> (StateFile, WorkerState) {
        let f = StateFile::new(dir);
        let mut st = f.load().unwrap();
        st.insert_volume(v);
        f.save(&mut st).unwrap();
        (f, st)
    }

    fn read(dir: &Path, name: &str) -> Vec<u8> {
        std::fs::read(dir.join(name)).unwrap()
    }

    /// The first save is a checkpoint; the saves after it append records
    /// (`state.json` untouched), and a fresh load applies them.
    #[test]
    fn saves_after_a_checkpoint_are_records_that_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let (f, mut st) = started(dir.path(), volume("v1", 1));
        let checkpoint = read(dir.path(), "state.json");
        assert_eq!(read(dir.path(), "state.log").len() as u64, MIN_JOURNAL);

        st.insert_volume(volume("v2", 0));
        f.save(&mut st).unwrap();
        st.volume_mut("v1")
            .unwrap()
            .snapshots
            .push(snapshot("v1", "new"));
        st.next_task = 4;
        f.save(&mut st).unwrap();
        st.remove_volume("v2");
        f.save(&mut st).unwrap();

        assert_eq!(read(dir.path(), "state.json"), checkpoint);
        let loaded = StateFile::new(dir.path()).load().unwrap();
        assert_eq!(loaded, st);
        assert_eq!(loaded.volumes()["v1"].snapshots.len(), 2);
        assert!(!loaded.volumes().contains_key("v2"));
        assert_eq!(loaded.next_task, 4);
    }

    /// A save cut by a crash (never acknowledged) leaves a torn record:
    /// it ends the replay, and every save before it loads.
    #[test]
    fn a_torn_last_record_is_dropped_and_the_ones_before_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (f, mut st) = started(dir.path(), volume("v1", 0));
        st.insert_volume(volume("v2", 0));
        f.save(&mut st).unwrap();
        let before = st.clone();
        let end = f.journal.lock().unwrap().end as usize;
        st.insert_volume(volume("v3", 0));
        f.save(&mut st).unwrap();
        let torn_end = f.journal.lock().unwrap().end as usize;
        let whole = read(dir.path(), "state.log");
        assert_eq!(StateFile::new(dir.path()).load().unwrap(), st);

        // Only part of the last record reached the disk (the rest is the
        // zeros it was written over), or one byte of it came out wrong.
        for cut in [end + 1, end + HEADER, torn_end - 1] {
            let mut log = whole.clone();
            log[cut..torn_end].fill(0);
            std::fs::write(dir.path().join("state.log"), &log).unwrap();
            assert_eq!(
                StateFile::new(dir.path()).load().unwrap(),
                before,
                "cut at {cut}"
            );
        }
        let mut log = whole.clone();
        log[torn_end - 3] ^= 0x40;
        std::fs::write(dir.path().join("state.log"), &log).unwrap();
        let g = StateFile::new(dir.path());
        let mut loaded = g.load().unwrap();
        assert_eq!(loaded, before);

        // Saving again writes over the torn record.
        loaded.insert_volume(volume("v4", 0));
        g.save(&mut loaded).unwrap();
        let again = StateFile::new(dir.path()).load().unwrap();
        assert_eq!(again, loaded);
        assert!(!again.volumes().contains_key("v3"));
    }

    /// Records written before a checkpoint stay in the journal's blocks
    /// but are of an older generation: a load does not apply them.
    #[test]
    fn a_checkpoint_retires_the_records_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (f, mut st) = started(dir.path(), volume("v1", 0));
        st.insert_volume(volume("v2", 0));
        f.save(&mut st).unwrap();
        assert_eq!(f.journal.lock().unwrap().end, {
            let log = read(dir.path(), "state.log");
            record_at(&log, st.generation).unwrap().1 as u64
        });
        // v2 goes in memory only, then a checkpoint: the record that added
        // it is still at the start of the journal.
        st.volumes.remove("v2");
        f.checkpoint(&mut st).unwrap();
        let log = read(dir.path(), "state.log");
        assert!(record_at(&log, st.generation - 1).is_some());
        let loaded = StateFile::new(dir.path()).load().unwrap();
        assert_eq!(loaded, st);
        assert!(!loaded.volumes().contains_key("v2"));
    }

    /// A save that does not fit in the journal writes a checkpoint
    /// instead (of the next generation, the journal sized to twice it);
    /// nothing is lost on the way.
    #[test]
    fn a_full_journal_is_folded_into_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (f, mut st) = started(dir.path(), volume("big", 400));
        let first = st.generation;
        let mut saves = 0;
        while st.generation == first {
            st.volume_mut("big").unwrap().create_time += 1;
            f.save(&mut st).unwrap();
            saves += 1;
            assert_eq!(StateFile::new(dir.path()).load().unwrap(), st);
        }
        let record = read(dir.path(), "state.json").len() as u64;
        assert!(saves > 1 && saves as u64 * record > MIN_JOURNAL, "{saves}");
        assert_eq!(st.generation, first + 1);
        let capacity = f.journal.lock().unwrap().capacity;
        assert!(capacity >= MIN_JOURNAL.max(2 * record), "{capacity}");
        st.volume_mut("big").unwrap().create_time += 1;
        f.save(&mut st).unwrap();
        assert_eq!(StateFile::new(dir.path()).load().unwrap(), st);
    }

    /// Nothing changed since the last save: nothing is written.
    #[test]
    fn a_save_without_changes_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (f, mut st) = started(dir.path(), volume("v1", 0));
        assert!(matches!(f.prepare(&mut st).unwrap(), Save::Nothing));
        let _ = st.volumes();
        assert!(matches!(f.prepare(&mut st).unwrap(), Save::Nothing));
        st.tasks.insert(
            "1".into(),
            TaskRec {
                id: "1".into(),
                kind: crate::state::TaskKind::Merge,
                target: "volumes/v1/snapshots/s".into(),
                source: String::new(),
                done: false,
                error: None,
                done_units: 0,
                total_units: 1,
                create_time: 3,
            },
        );
        assert!(matches!(
            f.prepare(&mut st).unwrap(),
            Save::Append { at: 0, .. }
        ));
    }
}
