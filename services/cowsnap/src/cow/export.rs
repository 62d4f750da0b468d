//! `cowsnap cow export`: write a snapshot's image (the origin overlaid with
//! the snapshot's exceptions) to a file or a block device. Both devices are
//! opened read-only through the engine and read in large pieces, several at
//! once. A regular output file is sparse: it is truncated to the image's
//! size and all-zero blocks are skipped; a block device gets every byte.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use cowsnap_store::{Origin, SnapshotOptions, Target};
use futures::StreamExt;
use serde::Serialize;

use super::devices::{Access, BackendArg, Devices};
use super::progress::{Progress, Unit};
use super::report::{EXIT_OK, JsonArg, print_json};

/// Bytes per read through the engine.
const PIECE: u64 = 1 << 20;
/// Reads in flight at once.
const IN_FLIGHT: usize = 4;
/// The unit of sparseness: all-zero blocks of this size are not written.
const SPARSE_BLOCK: usize = 4096;

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The snapshot's origin device.
    #[arg(long, value_name = "ORIGIN")]
    pub origin: PathBuf,
    /// The snapshot's COW device.
    pub cow: PathBuf,
    /// Where to write the image: a regular file (created or truncated, sparse) or a block device.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,
    #[command(flatten)]
    pub backend: BackendArg,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Serialize)]
struct Exported {
    origin: String,
    cow: String,
    output: String,
    /// Size of the image.
    bytes: u64,
    /// Bytes actually written (the rest are holes of a sparse file).
    written_bytes: u64,
    exceptions: u64,
}

/// The output: a sparse regular file or a block device.
struct Output {
    file: File,
    sparse: bool,
}

pub fn run(args: ExportArgs) -> anyhow::Result<u8> {
    let devices = Devices::start(args.backend)?;
    let origin_dev = devices.open(&args.origin, Access::ReadOnly)?;
    let cow_dev = devices.open(&args.cow, Access::ReadOnly)?;
    let cow_name = cow_dev.name().to_string();
    let out_name = args.output.display().to_string();
    for input in [&args.origin, &args.cow] {
        if same_file(input, &args.output) {
            bail!(
                "{out_name}: the output is the same file as the input {}",
                input.display()
            );
        }
    }
    let exported = devices.block_on(async {
        let origin = Origin::new(origin_dev)?;
        let added = origin.add_snapshot(cow_dev, SnapshotOptions::default()).await?;
        let id = added.id;
        if !origin.status(id)?.valid {
            bail!("{cow_name}: the snapshot is invalid (it overflowed or failed): it has no image to export");
        }
        let size = origin.size();
        let mut out = Output::open(&args.output, size)?;
        let bs = origin.block_size();
        let piece = PIECE.next_multiple_of(bs);
        let mut progress = Progress::new("export", size, Unit::Bytes, false);
        let mut written = 0u64;
        let mut pieces = futures::stream::iter((0..size).step_by(piece as usize))
            .map(|off| {
                let len = piece.min(size - off);
                let origin = &origin;
                async move { (off, origin.read(Target::Snapshot(id), off, len).await) }
            })
            .buffered(IN_FLIGHT);
        while let Some((off, data)) = pieces.next().await {
            let data = data?;
            written += out
                .write_at(off, &data)
                .with_context(|| format!("{out_name}: write at byte {off}"))?;
            progress.set(off + data.len() as u64);
        }
        out.file.sync_all().with_context(|| format!("{out_name}: sync"))?;
        progress.finish();
        Ok(Exported {
            origin: origin.device().name().to_string(),
            cow: cow_name.clone(),
            output: out_name.clone(),
            bytes: size,
            written_bytes: written,
            exceptions: added.exceptions,
        })
    })?;
    if args.out.json {
        print_json(&exported)?;
    } else {
        println!(
            "exported {} bytes of the snapshot on {} ({} exceptions) of {} to {} ({} bytes written, {} left as holes)",
            exported.bytes,
            exported.cow,
            exported.exceptions,
            exported.origin,
            exported.output,
            exported.written_bytes,
            exported.bytes - exported.written_bytes
        );
    }
    Ok(EXIT_OK)
}

impl Output {
    /// Opens `path` for an image of `size` bytes: a block device as it is
    /// (it must be large enough), anything else as a regular file created
    /// or truncated to `size`.
    fn open(path: &Path, size: u64) -> anyhow::Result<Output> {
        let name = path.display();
        let is_block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        if is_block {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("{name}: cannot open"))?;
            let dev_size = std::fs::File::open(path)
                .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                .with_context(|| format!("{name}: cannot read its size"))?;
            if dev_size < size {
                bail!(
                    "{name}: block device of {dev_size} bytes is smaller than the image ({size} bytes)"
                );
            }
            return Ok(Output {
                file,
                sparse: false,
            });
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .with_context(|| format!("{name}: cannot create"))?;
        file.set_len(size)
            .with_context(|| format!("{name}: cannot set its size to {size} bytes"))?;
        Ok(Output { file, sparse: true })
    }

    /// Writes `data` at `off`, skipping all-zero blocks of a sparse file.
    /// Returns the bytes written.
    fn write_at(&mut self, off: u64, data: &[u8]) -> std::io::Result<u64> {
        if !self.sparse {
            self.file.write_all_at(data, off)?;
            return Ok(data.len() as u64);
        }
        let mut written = 0u64;
        let mut run: Option<usize> = None; // start of a run of non-zero blocks
        let mut at = 0usize;
        for block in data.chunks(SPARSE_BLOCK) {
            let zero = block.iter().all(|&b| b == 0);
            match (zero, run) {
                (false, None) => run = Some(at),
                (true, Some(start)) => {
                    self.file
                        .write_all_at(&data[start..at], off + start as u64)?;
                    written += (at - start) as u64;
                    run = None;
                }
                _ => {}
            }
            at += block.len();
        }
        if let Some(start) = run {
            self.file.write_all_at(&data[start..], off + start as u64)?;
            written += (data.len() - start) as u64;
        }
        Ok(written)
    }
}

/// Whether two paths name the same file or device.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => {
            (x.dev() == y.dev() && x.ino() == y.ino())
                || (x.file_type().is_block_device()
                    && y.file_type().is_block_device()
                    && x.rdev() == y.rdev())
        }
        _ => false,
    }
}
