//! `cowsnap cow status`: the `dmsetup status` line the kernel would print for
//! a snapshot on this COW device. The store is loaded read-only exactly as
//! the engine loads it (so a corrupt device is refused with the reason), and
//! its usage is the kernel's: allocated = `next_free` × chunk size, total =
//! the device's sectors, metadata = (current area + 2) × chunk size.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::bail;
use cowsnap_store::Usage;
use cowsnap_store::format::{HeaderState, SECTOR_SIZE};
use cowsnap_store::pstore::PStore;
use cowsnap_store::scan::read_header;
use cowsnap_store::status::dm_status_line;
use serde::Serialize;

use super::devices::{Access, BackendArg, Devices};
use super::report::{EXIT_OK, JsonArg, print_json};

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The origin device: print the whole table line (`0 <origin sectors> snapshot ...`).
    #[arg(long, value_name = "ORIGIN")]
    pub origin: Option<PathBuf>,
    /// The COW device.
    pub cow: PathBuf,
    #[command(flatten)]
    pub backend: BackendArg,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Serialize)]
struct Status {
    device: String,
    origin: Option<String>,
    origin_sectors: Option<u64>,
    /// Exactly what `dmsetup status` prints.
    line: String,
    valid: bool,
    chunk_sectors: u32,
    exceptions: u64,
    /// `None` for an invalid snapshot.
    usage: Option<Usage>,
}

pub fn run(args: StatusArgs) -> anyhow::Result<u8> {
    let devices = Devices::start(args.backend)?;
    let cow = devices.open(&args.cow, Access::ReadOnly)?;
    let origin = args
        .origin
        .as_ref()
        .map(|p| devices.open(p, Access::ReadOnly))
        .transpose()?;
    let name = cow.name().to_string();
    let status = devices.block_on(async {
        if let HeaderState::New = read_header(&cow).await? {
            bail!("{name}: not initialised (all-zero header): it has no status until `cowsnap cow create` or a first activation");
        }
        let mut seen = HashSet::new();
        let opened = PStore::open(cow, None, origin.as_ref().map(|o| o.size()), |r| seen.insert(r.old)).await?;
        let usage = opened.store.usage();
        let origin_sectors = origin.as_ref().map(|o| o.size() / SECTOR_SIZE);
        Ok(Status {
            device: name.clone(),
            origin: origin.as_ref().map(|o| o.name().to_string()),
            origin_sectors,
            line: dm_status_line(origin_sectors, usage),
            valid: usage.is_some(),
            chunk_sectors: opened.store.layout().chunk_sectors(),
            exceptions: opened.exceptions,
            usage,
        })
    })?;
    if args.out.json {
        print_json(&status)?;
    } else {
        println!("{}", status.line);
    }
    Ok(EXIT_OK)
}
