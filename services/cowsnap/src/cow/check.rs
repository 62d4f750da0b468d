//! `cowsnap cow check`: validate everything the on-disk format lets one
//! validate (header magic, version and chunk size; geometry; every record:
//! COW chunks past the device or on a header/metadata chunk, duplicate COW
//! or origin chunks, origin chunks past the origin's end; the area after the
//! last full one present and zeroed past its end). Exit 0 clean, 1 problems
//! found (each listed), 2 cannot read.

use std::collections::HashSet;
use std::path::PathBuf;

use cowsnap_store::format::{Header, HeaderState};
use cowsnap_store::scan::{Scan, ScanOptions, read_header, scan_areas};
use cowsnap_store::{Device, Error, Layout};
use serde::Serialize;
use serde_json::json;

use super::devices::{Access, BackendArg, Devices};
use super::report::{EXIT_OK, EXIT_PROBLEMS, Finding, JsonArg, print_json};

#[derive(clap::Args)]
pub struct CheckArgs {
    /// The origin device: records mapping origin chunks past its end are problems.
    #[arg(long, value_name = "ORIGIN")]
    pub origin: Option<PathBuf>,
    /// The COW device.
    pub cow: PathBuf,
    #[command(flatten)]
    pub backend: BackendArg,
    #[command(flatten)]
    pub out: JsonArg,
}

/// What the device is, as far as its header tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum State {
    /// All-zero magic: a new COW device, initialised on first activation.
    New,
    /// A valid snapshot.
    Valid,
    /// `valid = 0`: the kernel (or cowsnap) invalidated it; its exceptions
    /// are never read again.
    Invalid,
    /// The header itself is refused (bad magic, version, chunk size).
    Unusable,
}

#[derive(Serialize)]
struct Report {
    device: String,
    size: u64,
    origin: Option<String>,
    origin_size: Option<u64>,
    state: State,
    header: Option<Header>,
    /// Valid records found (0 for a new or invalid device).
    exceptions: u64,
    /// Metadata areas read.
    areas: u64,
    /// The allocator's high-water mark after loading.
    next_free: Option<u64>,
    problems: Vec<Finding>,
    clean: bool,
}

pub fn run(args: CheckArgs) -> anyhow::Result<u8> {
    let devices = Devices::start(args.backend)?;
    let cow = devices.open(&args.cow, Access::ReadOnly)?;
    let origin = args
        .origin
        .as_ref()
        .map(|p| devices.open(p, Access::ReadOnly))
        .transpose()?;
    let report = devices.block_on(check(&cow, origin.as_ref()))?;
    if args.out.json {
        print_json(&report)?;
    } else {
        print_text(&report);
    }
    Ok(if report.clean { EXIT_OK } else { EXIT_PROBLEMS })
}

async fn check(cow: &Device, origin: Option<&Device>) -> anyhow::Result<Report> {
    let mut r = Report {
        device: cow.name().to_string(),
        size: cow.size(),
        origin: origin.map(|o| o.name().to_string()),
        origin_size: origin.map(|o| o.size()),
        state: State::Unusable,
        header: None,
        exceptions: 0,
        areas: 0,
        next_free: None,
        problems: Vec::new(),
        clean: false,
    };
    let header = match read_header(cow).await {
        Ok(HeaderState::New) => {
            r.state = State::New;
            None
        }
        Ok(HeaderState::Existing(h)) => Some(h),
        Err(Error::Format { cause, .. }) => {
            r.problems.push(format_finding(&cause));
            None
        }
        // The only content error `read_header` has: a device too small
        // to hold a header at all.
        Err(Error::Invalid { detail, .. }) => {
            r.problems.push(Finding::other(
                "device_too_small",
                json!({ "bytes": cow.size() }),
                detail,
            ));
            None
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(h) = header {
        r.header = Some(h);
        match h.check() {
            Err(e) => r.problems.push(format_finding(&e)),
            Ok(layout) => {
                r.problems.extend(geometry_findings(layout, cow, origin));
                if !h.valid {
                    // As the kernel: an invalid snapshot's exceptions are
                    // never read, so they cannot be inconsistent.
                    r.state = State::Invalid;
                } else {
                    r.state = State::Valid;
                    let origin_chunks = origin.map(|o| o.size().div_ceil(layout.chunk_bytes()));
                    let scan = scan_all(cow, layout, origin_chunks, |_, _, _| {}).await?;
                    r.exceptions = scan.exceptions;
                    r.areas = scan.current_area + 1;
                    r.next_free = Some(scan.next_free);
                    r.problems
                        .extend(scan.problems.iter().map(Finding::from_problem));
                }
            }
        }
    }
    r.clean = r.problems.is_empty();
    Ok(r)
}

/// Scans every area of a COW device with `layout`, collecting all the
/// problems (duplicate origin chunks included); `visit` sees each valid
/// record.
pub async fn scan_all(
    cow: &Device,
    layout: Layout,
    origin_chunks: Option<u64>,
    mut visit: impl FnMut(u64, u64, cowsnap_store::format::Record),
) -> cowsnap_store::Result<Scan> {
    let mut seen = OriginChunks::new(origin_chunks);
    let opts = ScanOptions {
        origin_chunks,
        stop_at_first: false,
    };
    scan_areas(cow, layout, opts, |area, index, rec| {
        let first = seen.insert(rec.old);
        if first {
            visit(area, index, rec);
        }
        first
    })
    .await
}

fn format_finding(e: &cowsnap_store::error::FormatError) -> Finding {
    use cowsnap_store::error::FormatError as F;
    let (kind, fields) = match e {
        F::BadMagic(m) => ("bad_magic", json!({ "magic": m })),
        F::UnsupportedVersion(v) => ("unsupported_version", json!({ "version": v })),
        F::ChunkSize(c) => ("bad_chunk_size", json!({ "chunk_sectors": c })),
    };
    Finding::other(kind, fields, format!("header: {e}"))
}

/// The geometry the kernel refuses: a chunk that is not a multiple of the
/// logical block size of the COW device or of the origin.
fn geometry_findings(layout: Layout, cow: &Device, origin: Option<&Device>) -> Vec<Finding> {
    std::iter::once(cow)
        .chain(origin)
        .filter(|d| !layout.chunk_bytes().is_multiple_of(d.block_size()))
        .map(|d| {
            Finding::other(
                "chunk_not_block_multiple",
                json!({ "device": d.name(), "chunk_bytes": layout.chunk_bytes(), "block_size": d.block_size() }),
                format!(
                    "chunk size {} bytes is not a multiple of the logical block size {} of {}",
                    layout.chunk_bytes(),
                    d.block_size(),
                    d.name()
                ),
            )
        })
        .collect()
}

fn print_text(r: &Report) {
    let dev = &r.device;
    match (r.state, &r.header) {
        (State::New, _) => println!(
            "{dev}: new COW device (all-zero header): not initialised yet, nothing else to check"
        ),
        (_, Some(h)) => println!(
            "{dev}: header: {}, version {}, chunk size {} sectors",
            if h.valid { "valid" } else { "invalid" },
            h.version,
            h.chunk_sectors
        ),
        (_, None) => {}
    }
    match r.state {
        State::Valid => println!(
            "{dev}: {} exceptions in {} metadata area{}{}",
            r.exceptions,
            r.areas,
            if r.areas == 1 { "" } else { "s" },
            r.next_free
                .map(|n| format!(", next free chunk {n}"))
                .unwrap_or_default()
        ),
        State::Invalid => {
            println!("{dev}: snapshot is marked invalid (valid = 0): its exceptions are never used")
        }
        State::New | State::Unusable => {}
    }
    for p in &r.problems {
        println!("{dev}: {}", p.message);
    }
    if r.clean {
        println!("{dev}: clean");
    } else {
        let n = r.problems.len();
        println!("{dev}: {n} problem{} found", if n == 1 { "" } else { "s" });
    }
}

/// The origin chunks seen so far, to find a second record for one: a bitmap
/// up to the origin's size (or a bound when it is not known, so a corrupt
/// record cannot make it huge), a hash set past it.
struct OriginChunks {
    bits: Vec<u64>,
    limit: u64,
    far: HashSet<u64>,
}

impl OriginChunks {
    /// Chunks below this use the bitmap when the origin's size is unknown
    /// (at most 32 MiB of bitmap).
    const DEFAULT_LIMIT: u64 = 1 << 28;

    fn new(origin_chunks: Option<u64>) -> OriginChunks {
        OriginChunks {
            bits: Vec::new(),
            limit: origin_chunks
                .unwrap_or(Self::DEFAULT_LIMIT)
                .min(Self::DEFAULT_LIMIT),
            far: HashSet::new(),
        }
    }

    /// Adds `chunk`; false when it was already there.
    fn insert(&mut self, chunk: u64) -> bool {
        if chunk >= self.limit {
            return self.far.insert(chunk);
        }
        let (w, b) = ((chunk / 64) as usize, chunk % 64);
        if w >= self.bits.len() {
            self.bits.resize(w + 1, 0);
        }
        let fresh = self.bits[w] & (1 << b) == 0;
        self.bits[w] |= 1 << b;
        fresh
    }
}
