//! `cowsnap cow merge`: roll an origin back to a snapshot, offline (dm's
//! `snapshot-merge` run to completion). The engine merges from the last
//! exception backwards, committing each step, so a merge killed at any point
//! resumes where it stopped when this is run again, and ends with the
//! snapshot's content on the origin.

use std::path::PathBuf;

use anyhow::bail;
use cowsnap_store::format::HeaderState;
use cowsnap_store::scan::read_header;
use cowsnap_store::{Origin, SnapshotOptions};
use serde::Serialize;

use super::devices::{Access, BackendArg, Devices};
use super::progress::{Progress, Unit};
use super::report::{EXIT_OK, JsonArg, print_json};

#[derive(clap::Args)]
pub struct MergeArgs {
    /// The origin device, rolled back to the snapshot.
    #[arg(long, value_name = "ORIGIN")]
    pub origin: PathBuf,
    /// The snapshot's COW device; it holds no exceptions afterwards.
    pub cow: PathBuf,
    /// No progress lines on stderr when it is not a terminal.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub backend: BackendArg,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Serialize)]
struct Merged {
    origin: String,
    cow: String,
    chunk_sectors: u32,
    /// Exceptions merged by this run (fewer than the snapshot had when an
    /// earlier run was interrupted).
    merged_chunks: u64,
}

pub fn run(args: MergeArgs) -> anyhow::Result<u8> {
    let devices = Devices::start(args.backend)?;
    let origin_dev = devices.open(&args.origin, Access::ReadWrite)?;
    let cow_dev = devices.open(&args.cow, Access::ReadWrite)?;
    let cow_name = cow_dev.name().to_string();
    let merged = devices.block_on(async {
        // The store would initialise an all-zero device: never do that
        // to a device someone asked to merge.
        if let HeaderState::New = read_header(&cow_dev).await? {
            bail!("{cow_name}: not initialised (all-zero header): there is nothing to merge");
        }
        let origin = Origin::new(origin_dev)?;
        let added = origin
            .add_snapshot(
                cow_dev,
                SnapshotOptions {
                    merging: true,
                    ..Default::default()
                },
            )
            .await?;
        let label = format!("merge {cow_name}");
        let mut progress = Progress::new(&label, added.exceptions, Unit::Chunks, !args.quiet);
        origin
            .merge(added.id, |p| progress.set(p.chunks_total - p.chunks_left))
            .await?;
        progress.finish();
        origin.flush().await?;
        Ok(Merged {
            origin: origin.device().name().to_string(),
            cow: cow_name.clone(),
            chunk_sectors: added.chunk_sectors,
            merged_chunks: added.exceptions,
        })
    })?;
    if args.out.json {
        print_json(&merged)?;
    } else {
        println!(
            "merged {} exceptions of {} into {}: the origin holds the snapshot's content and the COW device no exceptions",
            merged.merged_chunks, merged.cow, merged.origin
        );
    }
    Ok(EXIT_OK)
}
