//! `cowsnap cow dump`: the metadata of a COW device as it is on disk: the
//! header, each metadata area read (where it sits, how many records, whether
//! it is full) and every record, each marked with the problem `check` finds
//! in it, if any. Text or `--json`.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use cowsnap_store::Device;
use cowsnap_store::format::{Header, HeaderState, Layout, Record, SNAP_MAGIC, decode_area};
use cowsnap_store::scan::{Problem, read_header};
use serde::Serialize;

use super::check::scan_all;
use super::devices::{Access, BackendArg, Devices};
use super::report::{EXIT_OK, Finding, JsonArg, print_json};

#[derive(clap::Args)]
pub struct DumpArgs {
    /// The COW device.
    pub cow: PathBuf,
    #[command(flatten)]
    pub backend: BackendArg,
    #[command(flatten)]
    pub out: JsonArg,
}

#[derive(Serialize)]
struct Dump {
    device: String,
    size: u64,
    /// `new` for an all-zero header, else `existing`.
    state: &'static str,
    header: Option<HeaderDump>,
    exceptions_per_area: Option<u64>,
    areas: Vec<AreaDump>,
    exceptions: Vec<ExceptionDump>,
    /// Every problem `check` finds (records' ones are also on the records).
    problems: Vec<Finding>,
}

#[derive(Serialize)]
struct HeaderDump {
    magic: u32,
    #[serde(flatten)]
    header: Header,
}

#[derive(Serialize)]
struct AreaDump {
    index: u64,
    /// The COW chunk holding the area.
    chunk: u64,
    records: u64,
    full: bool,
}

#[derive(Serialize)]
struct ExceptionDump {
    area: u64,
    index: u64,
    old_chunk: u64,
    new_chunk: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
}

pub fn run(args: DumpArgs) -> anyhow::Result<u8> {
    let devices = Devices::start(args.backend)?;
    let cow = devices.open(&args.cow, Access::ReadOnly)?;
    let dump = devices.block_on(dump(&cow))?;
    if args.out.json {
        print_json(&dump)?;
    } else {
        print_text(&dump);
    }
    Ok(EXIT_OK)
}

async fn dump(cow: &Device) -> anyhow::Result<Dump> {
    let mut d = Dump {
        device: cow.name().to_string(),
        size: cow.size(),
        state: "new",
        header: None,
        exceptions_per_area: None,
        areas: Vec::new(),
        exceptions: Vec::new(),
        problems: Vec::new(),
    };
    let HeaderState::Existing(h) = read_header(cow).await? else {
        return Ok(d);
    };
    d.state = "existing";
    d.header = Some(HeaderDump {
        magic: SNAP_MAGIC,
        header: h,
    });
    let layout = h
        .check()
        .with_context(|| format!("{}: cannot dump", cow.name()))?;
    d.exceptions_per_area = Some(layout.exceptions_per_area());
    let scan = scan_all(cow, layout, None, |_, _, _| {}).await?;
    let mut record_problems: HashMap<(u64, u64), String> = HashMap::new();
    for p in &scan.problems {
        if let Some(at) = record_of(p) {
            record_problems.insert(at, p.to_string());
        }
    }
    d.problems = scan.problems.iter().map(Finding::from_problem).collect();
    for (area, chunk, records, full) in read_areas(cow, layout).await? {
        d.areas.push(AreaDump {
            index: area,
            chunk,
            records: records.len() as u64,
            full,
        });
        for (i, r) in records.into_iter().enumerate() {
            let index = i as u64;
            d.exceptions.push(ExceptionDump {
                area,
                index,
                old_chunk: r.old,
                new_chunk: r.new,
                problem: record_problems.remove(&(area, index)),
            });
        }
    }
    Ok(d)
}

/// Reads the areas as the kernel does: from area 0 until the first that is
/// not full (or the end of the device). Gives `(area, chunk, records, full)`.
async fn read_areas(
    cow: &Device,
    layout: Layout,
) -> cowsnap_store::Result<Vec<(u64, u64, Vec<Record>, bool)>> {
    let cb = layout.chunk_bytes();
    let device_chunks = cow.size() / cb;
    let mut out = Vec::new();
    for area in 0.. {
        let chunk = layout.area_location(area);
        if chunk >= device_chunks {
            break;
        }
        let buf = cow.read(chunk * cb, cb as usize).await?;
        let (records, full) = decode_area(&buf);
        out.push((area, chunk, records, full));
        if !full {
            break;
        }
    }
    Ok(out)
}

/// The record a problem is about, if it is about one.
fn record_of(p: &Problem) -> Option<(u64, u64)> {
    match *p {
        Problem::NewChunkPastEnd { area, index, .. }
        | Problem::NewChunkIsMetadata { area, index, .. }
        | Problem::DuplicateNewChunk { area, index, .. }
        | Problem::DuplicateOldChunk { area, index, .. }
        | Problem::OldChunkPastOrigin { area, index, .. } => Some((area, index)),
        Problem::DeviceTooSmall { .. }
        | Problem::AreaPastEnd { .. }
        | Problem::AreaNotZeroed { .. } => None,
    }
}

fn print_text(d: &Dump) {
    println!("device {}: {} bytes", d.device, d.size);
    let Some(h) = &d.header else {
        println!("header: all zero (a new COW device, not initialised)");
        return;
    };
    println!(
        "header: magic {:#010x} valid {} version {} chunk_size {} sectors",
        h.magic,
        u8::from(h.header.valid),
        h.header.version,
        h.header.chunk_sectors
    );
    if let Some(epa) = d.exceptions_per_area {
        println!("exceptions per area: {epa}");
    }
    let mut records = d.exceptions.iter().peekable();
    for a in &d.areas {
        println!(
            "area {} at chunk {}: {} records, {}",
            a.index,
            a.chunk,
            a.records,
            if a.full { "full" } else { "not full" }
        );
        while let Some(e) = records.next_if(|e| e.area == a.index) {
            print!(
                "  area {} record {}: origin chunk {} -> COW chunk {}",
                e.area, e.index, e.old_chunk, e.new_chunk
            );
            match &e.problem {
                Some(p) => println!("  [problem: {p}]"),
                None => println!(),
            }
        }
    }
    println!("exceptions: {}", d.exceptions.len());
    for p in &d.problems {
        println!("problem: {}", p.message);
    }
}
