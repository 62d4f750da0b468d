//! `cowsnap cow create`: initialise a COW device the way the kernel does on
//! a snapshot's first activation (zeroed area 0, made durable, then the
//! header with `RWF_DSYNC`), refusing to overwrite an existing header unless
//! forced.

use std::path::PathBuf;

use anyhow::{Context, bail};
use cowsnap_store::format::{DEFAULT_CHUNK_SECTORS, HeaderState};
use cowsnap_store::io::AlignedBuf;
use cowsnap_store::pstore::PStore;
use cowsnap_store::scan::read_header;
use cowsnap_store::status::dm_status_line;
use cowsnap_store::{Error, Layout};
use serde::Serialize;

use super::devices::{Access, BackendArg, Devices};
use super::report::{EXIT_OK, JsonArg, print_json};

#[derive(clap::Args)]
pub struct CreateArgs {
    /// Chunk size in 512-byte sectors: a power of two from 8 to 1024.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CHUNK_SECTORS)]
    pub chunk_sectors: u32,
    /// Overwrite a device that already has a header (or other data in its first sector).
    #[arg(long)]
    pub force: bool,
    /// The COW device (a regular file or a block device).
    pub cow: PathBuf,
    #[command(flatten)]
    pub backend: BackendArg,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Serialize)]
struct Created {
    device: String,
    chunk_sectors: u32,
    size: u64,
    /// Exceptions the device can hold.
    capacity: u64,
    /// The `dmsetup status` numbers of the fresh store.
    status: String,
    overwritten: bool,
}

pub fn run(args: CreateArgs) -> anyhow::Result<u8> {
    let name = args.cow.display().to_string();
    // Refuse a bad chunk size before anything on the device is touched.
    let layout = Layout::new(args.chunk_sectors)
        .with_context(|| format!("{name}: cannot create a COW device"))?;
    let devices = Devices::start(args.backend)?;
    let dev = devices.open(&args.cow, Access::ReadWrite)?;
    let created = devices.block_on(async {
        let existing = match read_header(&dev).await {
            Ok(HeaderState::New) => None,
            Ok(HeaderState::Existing(h)) => Some(format!(
                "a COW header (version {}, chunk size {} sectors, {})",
                h.version,
                h.chunk_sectors,
                if h.valid { "valid" } else { "invalid" }
            )),
            Err(Error::Format { cause, .. }) => Some(format!("a non-zero first sector ({cause})")),
            Err(e) => return Err(e.into()),
        };
        if let Some(what) = &existing {
            if !args.force {
                bail!("{name}: refusing to overwrite {what}; use --force to initialise it anyway");
            }
            // Refuse what the store would refuse before destroying anything.
            if dev.size() < layout.min_device_bytes() || !layout.chunk_bytes().is_multiple_of(dev.block_size()) {
                bail!(
                    "{name}: cannot hold a COW device with {} byte chunks ({} bytes, logical block size {}; it needs at least {} bytes)",
                    layout.chunk_bytes(),
                    dev.size(),
                    dev.block_size(),
                    layout.min_device_bytes()
                );
            }
            // Zero the header (the whole first chunk of the new size, which
            // is all the header ever covers) so the store sees a new device.
            dev.write(0, AlignedBuf::zeroed(layout.chunk_bytes() as usize), true).await?;
        }
        let opened = PStore::open(dev.clone(), Some(args.chunk_sectors), None, |_| true).await?;
        if !opened.initialised {
            bail!("{name}: the device was not initialised (a header appeared while creating it?)");
        }
        let usage = opened.store.usage();
        Ok(Created {
            device: name.clone(),
            chunk_sectors: layout.chunk_sectors(),
            size: dev.size(),
            capacity: layout.capacity(dev.size()),
            status: dm_status_line(None, usage),
            overwritten: existing.is_some(),
        })
    })?;
    if args.out.json {
        print_json(&created)?;
    } else {
        println!(
            "{}: initialised COW device, chunk size {} sectors ({} bytes), room for {} exceptions; status {}",
            created.device,
            created.chunk_sectors,
            layout.chunk_bytes(),
            created.capacity,
            created.status
        );
    }
    Ok(EXIT_OK)
}
