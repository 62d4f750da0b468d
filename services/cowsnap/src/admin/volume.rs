//! `cowsnap volume create|get|list|delete|restore|clone`.

use clap::Subcommand;
use cowsnap_proto::cowsnap::v1 as pb;

use super::{Api, Conn, Outcome, finish, labels, output, run, size, volume_name, wait};

#[derive(clap::Args, Debug)]
pub struct VolumeCommand {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create an empty (zero-filled) volume.
    Create {
        /// The new volume's id (`v1` names `volumes/v1`).
        id: String,
        /// Its size, e.g. 1g, 512m (a multiple of 4096 and of the chunk size).
        #[arg(long)]
        size: String,
        /// Chunk size of its snapshots in 512-byte sectors (8..1024, a power
        /// of two) [default: 32].
        #[arg(long)]
        chunk_sectors: Option<u32>,
        /// A label KEY=VALUE (repeat for more).
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Show a volume.
    Get { name: String },
    /// Grow a volume online to a new size (its snapshots keep theirs);
    /// clients connecting afterwards see the new size.
    Expand {
        name: String,
        /// The new size, e.g. 2g (a multiple of 4096 and of the chunk size;
        /// never smaller than now).
        #[arg(long)]
        size: String,
    },
    /// List volumes (every page).
    List {
        /// e.g. `state=READY`, `labels.team=db`, `worker=workers/node1`,
        /// terms joined with ` AND `.
        #[arg(long, default_value = "")]
        filter: String,
    },
    /// Delete a volume (refused while it has snapshots, unless
    /// --defer-while-snapshots).
    Delete {
        name: String,
        /// If it has snapshots: close its export now and keep it as
        /// DELETED_WITH_SNAPSHOTS until the last is deleted, then reclaim it.
        #[arg(long)]
        defer_while_snapshots: bool,
    },
    /// Create a new volume with a snapshot's content, and wait for it.
    Restore {
        /// The new volume's id.
        id: String,
        /// The snapshot: VOLUME/SNAPSHOT or volumes/VOLUME/snapshots/SNAPSHOT.
        #[arg(long)]
        from: String,
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Print the operation and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    /// Create a new volume with another volume's current content, and wait
    /// for it.
    Clone {
        /// The new volume's id.
        id: String,
        /// The source volume.
        #[arg(long)]
        from: String,
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Print the operation and return at once.
        #[arg(long)]
        no_wait: bool,
    },
}

pub fn run_command(c: VolumeCommand) -> anyhow::Result<u8> {
    run(&c.conn, async move |api: &mut Api| -> Outcome {
        match c.cmd {
            Cmd::Create {
                id,
                size: sz,
                chunk_sectors,
                labels: l,
            } => {
                let v = api
                    .volumes
                    .create_volume(pb::CreateVolumeRequest {
                        volume_id: id,
                        volume: Some(pb::Volume {
                            size_bytes: size("--size", &sz)?,
                            chunk_sectors: chunk_sectors.unwrap_or(0),
                            labels: labels(&l)?,
                            ..Default::default()
                        }),
                    })
                    .await?
                    .into_inner();
                output::volume(api.json, &v)?;
            }
            Cmd::Get { name } => {
                let v = api
                    .volumes
                    .get_volume(pb::GetVolumeRequest {
                        name: volume_name(&name),
                    })
                    .await?
                    .into_inner();
                output::volume(api.json, &v)?;
            }
            Cmd::Expand { name, size: sz } => {
                let v = api
                    .volumes
                    .expand_volume(pb::ExpandVolumeRequest {
                        name: volume_name(&name),
                        size_bytes: size("--size", &sz)?,
                    })
                    .await?
                    .into_inner();
                output::volume(api.json, &v)?;
            }
            Cmd::List { filter } => {
                let mut all = Vec::new();
                let mut token = String::new();
                loop {
                    let page = api
                        .volumes
                        .list_volumes(pb::ListVolumesRequest {
                            page_size: 1000,
                            page_token: token,
                            filter: filter.clone(),
                        })
                        .await?
                        .into_inner();
                    all.extend(page.volumes);
                    if page.next_page_token.is_empty() {
                        break;
                    }
                    token = page.next_page_token;
                }
                output::volumes(api.json, &all)?;
            }
            Cmd::Delete {
                name,
                defer_while_snapshots,
            } => {
                let name = volume_name(&name);
                api.volumes
                    .delete_volume(pb::DeleteVolumeRequest {
                        name: name.clone(),
                        defer_while_snapshots,
                    })
                    .await?;
                output::deleted(api.json, &name)?;
            }
            Cmd::Restore {
                id,
                from,
                labels: l,
                no_wait,
            } => {
                let op = api
                    .volumes
                    .restore_volume(pb::RestoreVolumeRequest {
                        volume_id: id.clone(),
                        source_snapshot: super::snapshot_name(&from)?,
                        volume: Some(pb::Volume {
                            labels: labels(&l)?,
                            ..Default::default()
                        }),
                    })
                    .await?
                    .into_inner();
                return long_running(api, op, no_wait, &format!("restoring volumes/{id}")).await;
            }
            Cmd::Clone {
                id,
                from,
                labels: l,
                no_wait,
            } => {
                let op = api
                    .volumes
                    .clone_volume(pb::CloneVolumeRequest {
                        volume_id: id.clone(),
                        source_volume: volume_name(&from),
                        volume: Some(pb::Volume {
                            labels: labels(&l)?,
                            ..Default::default()
                        }),
                    })
                    .await?
                    .into_inner();
                return long_running(api, op, no_wait, &format!("cloning into volumes/{id}")).await;
            }
        }
        Ok(0)
    })
}

/// Prints the operation (`--no-wait`), or waits for it and prints its
/// outcome.
pub(super) async fn long_running(
    api: &mut Api,
    op: pb::Operation,
    no_wait: bool,
    what: &str,
) -> Outcome {
    if no_wait || op.done {
        if op.done {
            return finish(api, &op);
        }
        output::operation(api.json, &op)?;
        return Ok(0);
    }
    let op = wait(api, &op.name, what).await?;
    finish(api, &op)
}
