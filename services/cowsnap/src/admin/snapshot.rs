//! `cowsnap snapshot create|get|list|delete|merge|delta`.

use clap::Subcommand;
use cowsnap_proto::cowsnap::v1 as pb;

use super::volume::long_running;
use super::{Api, Conn, Outcome, labels, output, run, size, snapshot_name, volume_name};

#[derive(clap::Args, Debug)]
pub struct SnapshotCommand {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Take a snapshot of a volume (writes acknowledged before are in it,
    /// later ones are not).
    Create {
        /// VOLUME/SNAPSHOT, e.g. `v1/before-upgrade`.
        name: String,
        /// Size of its COW device, e.g. 256m; it becomes INVALID if it fills
        /// up [default: never overflows].
        #[arg(long)]
        cow_size: Option<String>,
        /// Export it read-write over NBD (default: read-only).
        #[arg(long)]
        writable: bool,
        /// A label KEY=VALUE (repeat for more).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Show a snapshot, with its usage fresh from its worker.
    Get { name: String },
    /// List the snapshots of a volume, or of every volume (every page).
    List {
        /// The volume [default: every volume].
        volume: Option<String>,
    },
    /// Delete a snapshot.
    Delete { name: String },
    /// The byte ranges where a snapshot may differ from its volume as it is
    /// now, or from another snapshot of the volume (`--base`): the chunks
    /// either snapshot holds an exception for (every page).
    Delta {
        /// VOLUME/SNAPSHOT.
        name: String,
        /// VOLUME/SNAPSHOT of the same volume to compare with.
        #[arg(long)]
        base: Option<String>,
    },
    /// Roll its volume back to the snapshot, showing progress, and wait for
    /// the end. The snapshot goes away when the merge ends.
    Merge {
        name: String,
        /// Print the operation and return at once.
        #[arg(long)]
        no_wait: bool,
    },
}

pub fn run_command(c: SnapshotCommand) -> anyhow::Result<u8> {
    run(&c.conn, async move |api: &mut Api| -> Outcome {
        match c.cmd {
            Cmd::Create {
                name,
                cow_size,
                writable,
                labels: l,
            } => {
                let full = snapshot_name(&name)?;
                let (parent, id) = full
                    .rsplit_once("/snapshots/")
                    .map(|(p, i)| (p.to_string(), i.to_string()))
                    .ok_or_else(|| anyhow::anyhow!("{name:?} is not a snapshot name"))?;
                let cow_size_bytes = match cow_size {
                    Some(s) => size("--cow-size", &s)?,
                    None => 0,
                };
                let s = api
                    .snapshots
                    .create_snapshot(pb::CreateSnapshotRequest {
                        parent,
                        snapshot_id: id,
                        snapshot: Some(pb::Snapshot {
                            cow_size_bytes,
                            writable,
                            labels: labels(&l)?,
                            ..Default::default()
                        }),
                    })
                    .await?
                    .into_inner();
                output::snapshot(api.json, &s)?;
            }
            Cmd::Get { name } => {
                let s = api
                    .snapshots
                    .get_snapshot(pb::GetSnapshotRequest {
                        name: snapshot_name(&name)?,
                    })
                    .await?
                    .into_inner();
                output::snapshot(api.json, &s)?;
            }
            Cmd::List { volume } => {
                let parent = volume.map_or_else(|| "volumes/-".to_string(), |v| volume_name(&v));
                let mut all = Vec::new();
                let mut token = String::new();
                loop {
                    let page = api
                        .snapshots
                        .list_snapshots(pb::ListSnapshotsRequest {
                            parent: parent.clone(),
                            page_size: 1000,
                            page_token: token,
                        })
                        .await?
                        .into_inner();
                    all.extend(page.snapshots);
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    token = page.next_page_token;
                }
                output::snapshots(api.json, &all)?;
            }
            Cmd::Delete { name } => {
                let name = snapshot_name(&name)?;
                api.snapshots
                    .delete_snapshot(pb::DeleteSnapshotRequest { name: name.clone() })
                    .await?;
                output::deleted(api.json, &name)?;
            }
            Cmd::Delta { name, base } => {
                let name = snapshot_name(&name)?;
                let base = base.as_deref().map(snapshot_name).transpose()?;
                let mut all = pb::SnapshotDelta::default();
                loop {
                    let page = api
                        .snapshots
                        .get_snapshot_delta(pb::GetSnapshotDeltaRequest {
                            name: name.clone(),
                            base_snapshot: base.clone().unwrap_or_default(),
                            starting_offset: all.next_offset,
                            page_size: 0,
                        })
                        .await?
                        .into_inner();
                    all.volume_size_bytes = page.volume_size_bytes;
                    all.block_bytes = page.block_bytes;
                    all.next_offset = page.next_offset;
                    all.ranges.extend(page.ranges);
                    if all.next_offset == 0 {
                        break;
                    }
                }
                output::delta(api.json, &name, base.as_deref(), &all)?;
            }
            Cmd::Merge { name, no_wait } => {
                let name = snapshot_name(&name)?;
                let op = api
                    .snapshots
                    .merge_snapshot(pb::MergeSnapshotRequest { name: name.clone() })
                    .await?
                    .into_inner();
                return long_running(api, op, no_wait, &format!("merging {name}")).await;
            }
        }
        Ok(0)
    })
}
