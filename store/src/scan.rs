//! Reading a COW device's metadata as the kernel does (header, then areas
//! until the first one that is not full) while checking everything the format
//! lets one check. The loader refuses a device with any problem; `cow check`
//! and `cow dump` report them all.

use std::fmt;
use std::ops::Range;

use futures::StreamExt;
use futures::stream::FuturesOrdered;

use crate::error::{Error, Result};
use crate::format::{Header, HeaderState, Layout, RECORD_SIZE, Record, decode_area};
use crate::io::{AlignedBuf, Device};

/// Areas read ahead at once while scanning.
const READ_AHEAD: u64 = 16;

/// Something wrong with a COW device's metadata. Area and record indexes are
/// 0-based; chunks are in units of the device's chunk size.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Problem {
    DeviceTooSmall {
        bytes: u64,
        min_bytes: u64,
    },
    NewChunkPastEnd {
        area: u64,
        index: u64,
        old: u64,
        new: u64,
        device_chunks: u64,
    },
    NewChunkIsMetadata {
        area: u64,
        index: u64,
        old: u64,
        new: u64,
    },
    DuplicateNewChunk {
        area: u64,
        index: u64,
        old: u64,
        new: u64,
    },
    DuplicateOldChunk {
        area: u64,
        index: u64,
        old: u64,
        new: u64,
    },
    OldChunkPastOrigin {
        area: u64,
        index: u64,
        old: u64,
        new: u64,
        origin_chunks: u64,
    },
    AreaPastEnd {
        area: u64,
        chunk: u64,
        device_chunks: u64,
    },
    AreaNotZeroed {
        area: u64,
        index: u64,
    },
}

impl Problem {
    /// Bytes after the end of the list in the last area: what a metadata
    /// write torn by a crash leaves (M1 of docs/design.md: only a logical
    /// block is atomic, so later blocks of the area may land and an earlier
    /// one not). The records there were never acknowledged (C4); the
    /// kernel stops at the end of the list as well, and so does the loader.
    pub fn is_torn_tail(&self) -> bool {
        matches!(self, Problem::AreaNotZeroed { .. })
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::DeviceTooSmall { bytes, min_bytes } => write!(
                f,
                "device of {bytes} bytes is smaller than a header, one metadata area and one data chunk ({min_bytes} bytes)"
            ),
            Problem::NewChunkPastEnd {
                area,
                index,
                old,
                new,
                device_chunks,
            } => write!(
                f,
                "area {area} record {index}: origin chunk {old} -> COW chunk {new}, past the end of the device ({device_chunks} chunks)"
            ),
            Problem::NewChunkIsMetadata {
                area,
                index,
                old,
                new,
            } => write!(
                f,
                "area {area} record {index}: origin chunk {old} -> COW chunk {new}, which is a header or metadata chunk"
            ),
            Problem::DuplicateNewChunk {
                area,
                index,
                old,
                new,
            } => write!(
                f,
                "area {area} record {index}: origin chunk {old} -> COW chunk {new}, which an earlier record already uses"
            ),
            Problem::DuplicateOldChunk {
                area,
                index,
                old,
                new,
            } => write!(
                f,
                "area {area} record {index}: origin chunk {old} -> COW chunk {new}, but an earlier record already maps origin chunk {old}"
            ),
            Problem::OldChunkPastOrigin {
                area,
                index,
                old,
                new,
                origin_chunks,
            } => write!(
                f,
                "area {area} record {index}: origin chunk {old} -> COW chunk {new}, past the end of the origin ({origin_chunks} chunks)"
            ),
            Problem::AreaPastEnd {
                area,
                chunk,
                device_chunks,
            } => write!(
                f,
                "area {area} (chunk {chunk}) follows a full area but lies past the end of the device ({device_chunks} chunks)"
            ),
            Problem::AreaNotZeroed { area, index } => write!(
                f,
                "area {area} was not zeroed: non-zero bytes after its end-of-list record {index}"
            ),
        }
    }
}

/// Reads and decodes the header (the first sector; we read a whole 4 KiB
/// block to respect any logical block size).
pub async fn read_header(dev: &Device) -> Result<HeaderState> {
    let bs = dev.block_size();
    let len = (dev.size().min(4096.max(bs)) / bs * bs) as usize;
    if len < 16 {
        return Err(Error::Invalid {
            device: dev.name().to_string(),
            detail: format!("device of {} bytes cannot hold a COW header", dev.size()),
        });
    }
    let buf = dev.read(0, len).await?;
    Header::decode(&buf).map_err(|cause| Error::Format {
        device: dev.name().to_string(),
        cause,
    })
}

/// What a scan found.
pub struct Scan {
    pub layout: Layout,
    pub device_chunks: u64,
    /// Records found, over all areas.
    pub exceptions: u64,
    /// The last area read (the first one that is not full).
    pub current_area: u64,
    /// Records in `current_area`.
    pub current_committed: u64,
    /// The bytes of `current_area`.
    pub area: AlignedBuf,
    /// `max(new_chunk) + 1`, past a metadata chunk (at least 2).
    pub next_free: u64,
    /// Data chunks below `next_free` that no record holds (allocated
    /// before a crash and never committed, or given back): runs of
    /// consecutive data chunks, lowest first.
    pub free: Vec<Range<u64>>,
    pub problems: Vec<Problem>,
}

/// Options of a scan.
#[derive(Clone, Copy, Debug, Default)]
pub struct ScanOptions {
    /// Chunks of the origin, when known: records past it are problems.
    pub origin_chunks: Option<u64>,
    /// Stop at the first problem (the loader) rather than collect them all.
    pub stop_at_first: bool,
}

/// Grows as needed: one bit per COW chunk seen as a `new_chunk`.
#[derive(Default)]
struct ChunkBitmap(Vec<u64>);

impl ChunkBitmap {
    /// Sets the bit; returns whether it was already set.
    fn test_and_set(&mut self, chunk: u64) -> bool {
        let (w, b) = ((chunk / 64) as usize, chunk % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        was
    }

    /// The data chunks in `[from, to)` whose bit is clear, as runs that
    /// never include a metadata chunk.
    fn clear_runs(&self, layout: Layout, from: u64, to: u64) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        let mut push = |c: u64| {
            if layout.is_metadata(c) {
                return;
            }
            match runs.last_mut() {
                Some(r) if r.end == c => r.end += 1,
                _ => runs.push(c..c + 1),
            }
        };
        let mut c = from;
        while c < to {
            let (w, b) = ((c / 64) as usize, c % 64);
            let word = self.0.get(w).copied().unwrap_or(0);
            // Clear bits of this word from bit `b` on, below `to`.
            let mut clear = !word & (u64::MAX << b);
            let word_end = (c - b + 64).min(to);
            if word_end - (c - b) < 64 {
                clear &= (1u64 << (word_end - (c - b))) - 1;
            }
            while clear != 0 {
                push(c - b + u64::from(clear.trailing_zeros()));
                clear &= clear - 1;
            }
            c = word_end;
        }
        runs
    }
}

/// Walks the areas of a COW device with `layout`, calling `visit(area,
/// index, record)` for each valid record; `visit` returns false when the
/// record's origin chunk was seen before (a duplicate). Errors only when the
/// device cannot be read; problems with its content are collected.
pub async fn scan_areas(
    dev: &Device,
    layout: Layout,
    opts: ScanOptions,
    mut visit: impl FnMut(u64, u64, Record) -> bool,
) -> Result<Scan> {
    let cb = layout.chunk_bytes();
    let device_chunks = dev.size() / cb;
    let epa = layout.exceptions_per_area();
    let mut s = Scan {
        layout,
        device_chunks,
        exceptions: 0,
        current_area: 0,
        current_committed: 0,
        area: AlignedBuf::zeroed(cb as usize),
        next_free: layout.first_data_chunk(),
        free: Vec::new(),
        problems: Vec::new(),
    };
    if dev.size() < layout.min_device_bytes() {
        s.problems.push(Problem::DeviceTooSmall {
            bytes: dev.size(),
            min_bytes: layout.min_device_bytes(),
        });
        return Ok(s);
    }
    let mut used_new = ChunkBitmap::default();
    let mut max_new = 1u64;
    // A window of area reads stays in flight while earlier ones decode.
    let mut reads = FuturesOrdered::new();
    let mut next_read = 0u64;
    let mut a = 0u64;
    'areas: loop {
        while (reads.len() as u64) < READ_AHEAD && layout.area_location(next_read) < device_chunks {
            reads.push_back(dev.read(layout.area_offset(next_read), cb as usize));
            next_read += 1;
        }
        let Some(buf) = reads.next().await else {
            s.problems.push(Problem::AreaPastEnd {
                area: a,
                chunk: layout.area_location(a),
                device_chunks,
            });
            s.current_area = a.saturating_sub(1);
            s.current_committed = epa;
            break;
        };
        {
            let buf = buf?;
            let (records, full) = decode_area(&buf);
            for (i, r) in records.iter().enumerate() {
                let (i, old, new) = (i as u64, r.old, r.new);
                let problem = if new >= device_chunks {
                    Some(Problem::NewChunkPastEnd {
                        area: a,
                        index: i,
                        old,
                        new,
                        device_chunks,
                    })
                } else if layout.is_metadata(new) {
                    Some(Problem::NewChunkIsMetadata {
                        area: a,
                        index: i,
                        old,
                        new,
                    })
                } else if opts.origin_chunks.is_some_and(|n| old >= n) {
                    Some(Problem::OldChunkPastOrigin {
                        area: a,
                        index: i,
                        old,
                        new,
                        origin_chunks: opts.origin_chunks.unwrap_or(0),
                    })
                } else if used_new.test_and_set(new) {
                    Some(Problem::DuplicateNewChunk {
                        area: a,
                        index: i,
                        old,
                        new,
                    })
                } else if !visit(a, i, *r) {
                    Some(Problem::DuplicateOldChunk {
                        area: a,
                        index: i,
                        old,
                        new,
                    })
                } else {
                    s.exceptions += 1;
                    max_new = max_new.max(new);
                    None
                };
                if let Some(p) = problem {
                    s.problems.push(p);
                    if opts.stop_at_first {
                        break 'areas;
                    }
                }
            }
            if !full {
                let end = records.len();
                let mut buf = buf;
                if buf[end * RECORD_SIZE..].iter().any(|&b| b != 0) {
                    s.problems.push(Problem::AreaNotZeroed {
                        area: a,
                        index: end as u64,
                    });
                    // What the kernel reads ends here too; the next commit
                    // of this area writes zeros over the rest.
                    buf[end * RECORD_SIZE..].fill(0);
                }
                s.current_area = a;
                s.current_committed = end as u64;
                s.area = buf;
                break 'areas;
            }
        }
        a += 1;
    }
    s.next_free = layout
        .skip_metadata(max_new + 1)
        .max(layout.first_data_chunk());
    s.free = used_new.clear_runs(layout, layout.first_data_chunk(), s.next_free);
    Ok(s)
}
