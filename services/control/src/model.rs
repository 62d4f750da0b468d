//! The control service's domain types: volumes, snapshots, workers and
//! operations as the catalog holds them, and the rules on their ids, sizes
//! and labels. No gRPC here: `api` converts.

use std::collections::BTreeMap;

use cowsnap_proto::names;
use serde::{Deserialize, Serialize};

use crate::error::{ControlError, Failure, Result};

/// User labels, in a canonical order (compared for idempotent creates).
pub type Labels = BTreeMap<String, String>;

/// Default chunk size of a volume's snapshots (16 KiB).
pub const DEFAULT_CHUNK_SECTORS: u32 = 32;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Where a volume or snapshot is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Creating,
    Ready,
    Merging,
    Deleting,
    Invalid,
    Failed,
    /// A volume deleted while it has snapshots: hidden from block clients,
    /// kept for its snapshots, reclaimed when the last one goes.
    DeletedWithSnapshots,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Ready => "ready",
            State::Merging => "merging",
            State::Deleting => "deleting",
            State::Invalid => "invalid",
            State::Failed => "failed",
            State::DeletedWithSnapshots => "deleted_with_snapshots",
        }
    }

    pub fn parse(s: &str) -> Result<State> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "creating" => State::Creating,
            "ready" => State::Ready,
            "merging" => State::Merging,
            "deleting" => State::Deleting,
            "invalid" => State::Invalid,
            "failed" => State::Failed,
            "deleted_with_snapshots" => State::DeletedWithSnapshots,
            _ => {
                return Err(ControlError::Internal(anyhow::anyhow!(
                    "unknown state {s:?} in the catalog"
                )));
            }
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub worker_id: String,
    pub size_bytes: u64,
    pub chunk_sectors: u32,
    pub labels: Labels,
    pub state: State,
    /// The snapshot or volume it was restored or cloned from ("" if none).
    pub source: String,
    pub error: String,
    pub create_time: i64,
    /// The worker's NBD base URI.
    pub nbd_base: String,
    /// The unfinished operation on it, if any.
    pub operation: Option<i64>,
}

impl Volume {
    pub fn name(&self) -> String {
        names::volume(&self.id)
    }
}

/// What a worker reports of one of its snapshots, as the catalog records it.
#[derive(Clone, Copy, Debug)]
pub struct Reported<'a> {
    pub cow_size_bytes: u64,
    pub chunk_sectors: u32,
    /// `None` when it has none (e.g. invalid).
    pub usage: Option<&'a Usage>,
    /// Why it is invalid or failed.
    pub error: Option<&'a str>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub allocated_bytes: u64,
    pub total_bytes: u64,
    pub metadata_bytes: u64,
    pub exceptions: u64,
    pub update_time: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub volume_id: String,
    pub id: String,
    /// Its volume's size when it was taken (the volume may have grown).
    pub size_bytes: u64,
    pub cow_size_bytes: u64,
    pub chunk_sectors: u32,
    pub writable: bool,
    pub labels: Labels,
    pub state: State,
    pub usage: Option<Usage>,
    pub create_time: i64,
    pub nbd_base: String,
    pub operation: Option<i64>,
    /// Why it is INVALID or FAILED, as its worker reports it.
    pub error: Option<String>,
}

impl Snapshot {
    pub fn name(&self) -> String {
        names::snapshot(&self.volume_id, &self.id)
    }
}

/// One page of a snapshot's byte ranges (a delta or its allocated map),
/// as its worker computed it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangePage {
    /// The volume's size.
    pub size_bytes: u64,
    /// Every range starts on a multiple of it (the smallest chunk size).
    pub block_bytes: u64,
    /// (offset, length), sorted, apart from each other.
    pub ranges: Vec<(u64, u64)>,
    /// Where the next page starts; 0 when this one is the last.
    pub next_offset: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Worker {
    pub id: String,
    pub address: String,
    pub node: String,
    pub nbd_uri: String,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub version: String,
    pub io_backend: String,
    pub healthy: bool,
    pub last_error: String,
    pub last_seen_time: i64,
    pub create_time: i64,
    pub volume_count: u32,
}

impl Worker {
    pub fn name(&self) -> String {
        format!("workers/{}", self.id)
    }
}

/// A worker's I/O counters since it started (they only grow until it
/// restarts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerIo {
    pub reads: u64,
    pub read_bytes: u64,
    pub writes: u64,
    pub write_bytes: u64,
    /// Metadata commits, and the exceptions (chunks copied on write) they
    /// committed.
    pub commits: u64,
    pub exceptions: u64,
}

impl WorkerIo {
    /// Each counter with its name.
    pub fn fields(&self) -> [(&'static str, u64); 6] {
        [
            ("reads", self.reads),
            ("read_bytes", self.read_bytes),
            ("writes", self.writes),
            ("write_bytes", self.write_bytes),
            ("commits", self.commits),
            ("exceptions", self.exceptions),
        ]
    }
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpKind {
    CreateVolume,
    DeleteVolume,
    CreateSnapshot,
    DeleteSnapshot,
    MergeSnapshot,
    RestoreVolume,
    CloneVolume,
    ExpandVolume,
}

impl OpKind {
    pub const ALL: [OpKind; 8] = [
        OpKind::CreateVolume,
        OpKind::DeleteVolume,
        OpKind::CreateSnapshot,
        OpKind::DeleteSnapshot,
        OpKind::MergeSnapshot,
        OpKind::RestoreVolume,
        OpKind::CloneVolume,
        OpKind::ExpandVolume,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::CreateVolume => "create_volume",
            OpKind::DeleteVolume => "delete_volume",
            OpKind::CreateSnapshot => "create_snapshot",
            OpKind::DeleteSnapshot => "delete_snapshot",
            OpKind::MergeSnapshot => "merge_snapshot",
            OpKind::RestoreVolume => "restore_volume",
            OpKind::CloneVolume => "clone_volume",
            OpKind::ExpandVolume => "expand_volume",
        }
    }

    pub fn parse(s: &str) -> Option<OpKind> {
        OpKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }

    /// Whether the worker runs it as a long-running task.
    pub fn long_running(self) -> bool {
        matches!(
            self,
            OpKind::MergeSnapshot | OpKind::RestoreVolume | OpKind::CloneVolume
        )
    }
}

/// Where an operation is: `Pending` (recorded; the worker may or may not
/// have acted) → `Running` (the worker runs its task) → `Succeeded` |
/// `Failed`. Short operations go from `Pending` straight to an end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpState {
    Pending,
    Running,
    Succeeded,
    Failed,
}

impl OpState {
    pub const ALL: [OpState; 4] = [
        OpState::Pending,
        OpState::Running,
        OpState::Succeeded,
        OpState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Pending => "pending",
            OpState::Running => "running",
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<OpState> {
        OpState::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }

    pub fn done(self) -> bool {
        matches!(self, OpState::Succeeded | OpState::Failed)
    }
}

/// The arguments of an operation, kept to repeat its worker call after a
/// crash, and what to put back if the worker refuses it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OpArgs {
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub chunk_sectors: u32,
    #[serde(default)]
    pub cow_size_bytes: u64,
    #[serde(default)]
    pub writable: bool,
    /// The state a deleted or merging resource had before (restored when
    /// the worker refuses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior_state: Option<State>,
    /// The volume or snapshot as it was when its delete was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<OpResult>,
    /// A volume delete deferred while it has snapshots: the worker retires
    /// the volume, which stays DELETED_WITH_SNAPSHOTS until the last goes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deferred: bool,
}

/// An operation's result: the resource it made, changed or deleted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpResult {
    Volume(Volume),
    Snapshot(Snapshot),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    pub id: i64,
    pub kind: OpKind,
    pub target: Resource,
    /// What a restore or clone copies.
    pub source: Option<Resource>,
    pub worker_id: String,
    pub args: OpArgs,
    pub state: OpState,
    pub worker_task: String,
    pub percent: f64,
    pub error: Option<Failure>,
    pub result: Option<OpResult>,
    pub create_time: i64,
    pub update_time: i64,
    pub end_time: Option<i64>,
}

impl Operation {
    pub fn name(&self) -> String {
        format!("operations/{}", self.id)
    }

    /// The source's name; empty when it has none.
    pub fn source_name(&self) -> String {
        self.source
            .as_ref()
            .map(Resource::to_string)
            .unwrap_or_default()
    }
}

/// A volume or a snapshot, as an operation's target or source: its name
/// parsed once, where the operation is read from the catalog.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    Volume(String),
    Snapshot { volume: String, snapshot: String },
}

impl Resource {
    /// `volumes/V` or `volumes/V/snapshots/S`.
    pub fn parse(name: &str) -> std::result::Result<Resource, String> {
        if let Ok((volume, snapshot)) = names::parse_snapshot(name) {
            return Ok(Resource::Snapshot {
                volume: volume.into(),
                snapshot: snapshot.into(),
            });
        }
        names::parse_volume(name)
            .map(|v| Resource::Volume(v.into()))
            .map_err(|_| {
                format!(
                    "{} is neither a volume nor a snapshot name",
                    names::quote(name)
                )
            })
    }

    /// The id of the volume it is or belongs to.
    pub fn volume(&self) -> &str {
        match self {
            Resource::Volume(v) | Resource::Snapshot { volume: v, .. } => v,
        }
    }

    /// The volume and snapshot ids of a snapshot; an internal error for a
    /// volume (an operation on a snapshot recorded with a volume).
    pub fn snapshot(&self) -> Result<(&str, &str)> {
        match self {
            Resource::Snapshot { volume, snapshot } => Ok((volume, snapshot)),
            Resource::Volume(v) => Err(ControlError::Internal(anyhow::anyhow!(
                "volumes/{v} recorded where a snapshot was expected"
            ))),
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Volume(v) => f.write_str(&names::volume(v)),
            Resource::Snapshot { volume, snapshot } => {
                f.write_str(&names::snapshot(volume, snapshot))
            }
        }
    }
}

/// The id of `operations/{op}` (canonical decimal digits only).
pub fn parse_operation(name: &str) -> Result<i64> {
    names::parse_number_in("operations", name)
        .and_then(|id| {
            i64::try_from(id).map_err(|_| format!("{}: no such operation id", names::quote(name)))
        })
        .map_err(|e| ControlError::invalid("name", e))
}

/// The id of `workers/{worker}`.
pub fn parse_worker(name: &str) -> Result<&str> {
    let id = names::parse_in("workers", name).map_err(|e| ControlError::invalid("name", e))?;
    names::check_id(id).map_err(|e| ControlError::invalid("name", format!("worker id {e}")))?;
    Ok(id)
}

/// A resource id (`field` names it in the error).
pub fn check_id(field: &str, id: &str) -> Result<()> {
    names::check_id(id).map_err(|e| ControlError::invalid(field, e))
}

/// A chunk size: 0 means `default`; otherwise a power of two from 8 to 1024.
pub fn chunk_sectors(field: &str, asked: u32, default: u32) -> Result<u32> {
    let cs = if asked == 0 { default } else { asked };
    if !cs.is_power_of_two() || !(8..=1024).contains(&cs) {
        return Err(ControlError::invalid(
            field,
            format!("{cs} is not a power of two from 8 to 1024"),
        ));
    }
    Ok(cs)
}

/// A volume size: a positive multiple of 4096 and of the chunk size.
pub fn check_size(field: &str, size: u64, chunk_sectors: u32) -> Result<()> {
    let chunk = u64::from(chunk_sectors) * 512;
    if size == 0 || !size.is_multiple_of(4096) || !size.is_multiple_of(chunk) {
        return Err(ControlError::invalid(
            field,
            format!(
                "{size} is not a positive multiple of 4096 and of the chunk size ({chunk} bytes)"
            ),
        ));
    }
    Ok(())
}

/// Labels: at most 64; keys of 1-63 characters of `[a-z0-9_.-/]` starting
/// with a letter; values of at most 63 printable characters.
pub fn check_labels(field: &str, labels: &Labels) -> Result<()> {
    if labels.len() > 64 {
        return Err(ControlError::invalid(field, "more than 64 labels"));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.starts_with(|c: char| c.is_ascii_lowercase())
            && k.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-/".contains(c));
        if !key_ok {
            return Err(ControlError::invalid(
                field,
                format!(
                    "key {}: 1-63 characters of [a-z0-9_.-/], starting with a letter",
                    names::quote(k)
                ),
            ));
        }
        if v.len() > 63 || v.chars().any(|c| c.is_control()) {
            return Err(ControlError::invalid(
                field,
                format!(
                    "value of {}: at most 63 printable characters",
                    names::quote(k)
                ),
            ));
        }
    }
    Ok(())
}

/// The NBD URI of an export on a worker whose NBD base is `base`
/// (`nbd://HOST:PORT` → `nbd://HOST:PORT/EXPORT`;
/// `nbd+unix:///?socket=P` → `nbd+unix:///EXPORT?socket=P`).
pub fn nbd_uri(base: &str, export: &str) -> String {
    if base.is_empty() {
        return String::new();
    }
    let (path, query) = match base.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (base, None),
    };
    let mut uri = if path.ends_with(":///") {
        path.to_string()
    } else {
        format!("{}/", path.trim_end_matches('/'))
    };
    uri.push_str(export);
    if let Some(q) = query {
        uri.push('?');
        uri.push_str(q);
    }
    uri
}

/// A worker id made from a node name: lower case, other characters as
/// hyphens, starting with a letter, at most 63 characters.
pub fn worker_id_from_node(node: &str) -> String {
    let mut id: String = node
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    if !id.starts_with(|c: char| c.is_ascii_lowercase()) {
        id.insert_str(0, "w-");
    }
    id.truncate(63);
    let id = id.trim_end_matches('-').to_string();
    if id.is_empty() { "worker".into() } else { id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_uris() {
        assert_eq!(
            nbd_uri("nbd://node1:10809", "volumes/v1"),
            "nbd://node1:10809/volumes/v1"
        );
        assert_eq!(
            nbd_uri("nbd+unix:///?socket=/run/n.sock", "volumes/v1/snapshots/s"),
            "nbd+unix:///volumes/v1/snapshots/s?socket=/run/n.sock"
        );
        assert_eq!(nbd_uri("nbd://h:1/", "volumes/a"), "nbd://h:1/volumes/a");
    }

    #[test]
    fn worker_ids() {
        assert_eq!(worker_id_from_node("Node_1.example"), "node-1-example");
        assert_eq!(worker_id_from_node("10.0.0.1"), "w-10-0-0-1");
        assert!(names::check_id(&worker_id_from_node(&"x".repeat(100))).is_ok());
    }

    #[test]
    fn sizes_and_chunks() {
        assert_eq!(chunk_sectors("c", 0, 32).unwrap(), 32);
        assert!(chunk_sectors("c", 12, 32).is_err());
        assert!(chunk_sectors("c", 2048, 32).is_err());
        assert!(check_size("s", 1 << 20, 32).is_ok());
        assert!(check_size("s", 4096, 32).is_err());
        assert!(check_size("s", 0, 32).is_err());
    }

    #[test]
    fn operation_targets_are_parsed_once_into_resources() {
        let v = Resource::parse("volumes/v1").unwrap();
        assert_eq!(v, Resource::Volume("v1".into()));
        assert_eq!((v.volume(), v.to_string().as_str()), ("v1", "volumes/v1"));
        assert!(v.snapshot().is_err(), "a volume is no snapshot");
        let s = Resource::parse("volumes/v1/snapshots/s1").unwrap();
        assert_eq!(s.volume(), "v1");
        assert_eq!(s.snapshot().unwrap(), ("v1", "s1"));
        assert_eq!(s.to_string(), "volumes/v1/snapshots/s1");
        for bad in [
            "",
            "v1",
            "volumes/",
            "volumes/V1",
            "volumes/v1/snapshots/",
            "workers/w",
        ] {
            assert!(Resource::parse(bad).is_err(), "{bad:?}");
        }
    }
}
