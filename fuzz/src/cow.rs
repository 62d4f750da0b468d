//! The COW loader and scanner under arbitrary device images.
//!
//! [`check_load`] builds a COW device image from the input (see [`Shape`]
//! for how the bytes map onto it), then:
//!
//! 1. reads the header and, when it has one, scans every area collecting
//!    all problems (what `cow check` does): neither may panic, and what the
//!    scan reports must be self-consistent (next free chunk, free runs);
//! 2. attaches the image as a snapshot of an in-memory origin (the loader,
//!    which stops at the first problem): it must refuse exactly the images
//!    whose header or scan is bad, and otherwise load every record;
//! 3. reads the whole snapshot: each chunk must come from the COW chunk its
//!    record names, or from the origin when it has none;
//! 4. overwrites the whole origin: the snapshot must still read the same
//!    (copy-on-write into the chunks the loader said were free), unless it
//!    ran out of space and became invalid, whose reads must then fail;
//! 5. reopens origin and COW device afresh: the load must succeed and the
//!    snapshot read the same again.

use std::collections::HashMap;
use std::sync::Arc;

use cowsnap_store::format::{DISK_VERSION, Header, HeaderState, Layout, Record};
use cowsnap_store::scan::{ScanOptions, read_header, scan_areas};
use cowsnap_store::{AlignedBuf, Origin, SnapshotOptions, Target};

use crate::memdev::{self, Image};

/// What the input asks for, from its first four bytes:
///
/// - byte 0, bit 0: chunk size 8 or 16 sectors (asked for; a header says
///   its own); bit 1: record mode (the rest of the input is records of a
///   `u16` origin chunk and a `u16` COW chunk, big-endian, filling areas in
///   order) rather than raw mode (the rest is the image's bytes); bit 2: a
///   good header is written first (raw bytes then start at area 0);
///   bit 3: that header says the snapshot is invalid;
/// - bytes 1-2: the device's size in chunks (3 to 522);
/// - byte 3: the origin's size in chunks (1 to 64).
pub struct Shape {
    pub chunk_sectors: u32,
    pub records: bool,
    pub header: bool,
    pub invalid: bool,
    pub device_chunks: u64,
    pub origin_chunks: u64,
}

impl Shape {
    pub fn parse(input: &[u8]) -> Option<(Shape, &[u8])> {
        let (head, rest) = input.split_at_checked(4)?;
        Some((
            Shape {
                chunk_sectors: 8 << (head[0] & 1),
                records: head[0] & 2 != 0,
                header: head[0] & 4 != 0,
                invalid: head[0] & 8 != 0,
                device_chunks: 3 + u64::from(u16::from_be_bytes([head[1], head[2]])) % 520,
                origin_chunks: 1 + u64::from(head[3]) % 64,
            },
            rest,
        ))
    }

    fn layout(&self) -> Layout {
        Layout::new(self.chunk_sectors).expect("8 or 16 sectors")
    }

    /// The image's bytes.
    pub fn build(&self, rest: &[u8]) -> Vec<u8> {
        let layout = self.layout();
        let cb = layout.chunk_bytes();
        let mut img = vec![0u8; (self.device_chunks * cb) as usize];
        if self.header {
            Header {
                valid: !self.invalid,
                version: DISK_VERSION,
                chunk_sectors: self.chunk_sectors,
            }
            .encode(&mut img[..cb as usize]);
        }
        if !self.records {
            let at = if self.header { cb as usize } else { 0 };
            let n = rest.len().min(img.len() - at);
            img[at..at + n].copy_from_slice(&rest[..n]);
            return img;
        }
        // Data chunks carry a tag, so a read shows which chunk it came from.
        for c in layout.first_data_chunk()..self.device_chunks {
            if !layout.is_metadata(c) {
                img[(c * cb) as usize..((c + 1) * cb) as usize].fill(tag(c));
            }
        }
        let epa = layout.exceptions_per_area();
        for (i, r) in rest.chunks_exact(4).enumerate() {
            let (area, slot) = (i as u64 / epa, i as u64 % epa);
            let at = layout.area_offset(area) + slot * 16;
            if at + 16 > img.len() as u64 {
                break;
            }
            Record {
                old: u64::from(u16::from_be_bytes([r[0], r[1]])),
                new: u64::from(u16::from_be_bytes([r[2], r[3]])),
            }
            .encode(&mut img[at as usize..at as usize + 16]);
        }
        img
    }
}

fn tag(chunk: u64) -> u8 {
    (chunk as u8) | 0x80
}

/// Origin chunk `c`'s content in generation `g`: every byte `c * 2 + g`
/// (never a data tag, whose top bit is set, for the chunks used here).
fn origin_byte(c: u64, g: u8) -> u8 {
    ((c as u8) << 1).wrapping_add(g) & 0x7f
}

fn origin_image(chunks: u64, cb: u64, g: u8) -> Vec<u8> {
    let mut v = vec![0u8; (chunks * cb) as usize];
    for c in 0..chunks {
        v[(c * cb) as usize..((c + 1) * cb) as usize].fill(origin_byte(c, g));
    }
    v
}

/// What the scan found that the snapshot must show: origin chunk → COW
/// chunk, and whether the loader must accept the image.
struct Expect {
    map: HashMap<u64, u64>,
    loads: bool,
    valid: bool,
    /// The COW chunk size (the header's, or the asked one for a new device).
    cb: u64,
}

async fn expectations(cow: &Image, img: &Shape, origin_bytes: u64) -> Expect {
    let dev = memdev::device("cow", cow);
    let asked = img.layout();
    let header = read_header(&dev).await;
    let size = dev.size();
    let fits = |l: Layout| size >= l.min_device_bytes();
    match header {
        Err(_) => Expect {
            map: HashMap::new(),
            loads: false,
            valid: false,
            cb: 0,
        },
        Ok(HeaderState::New) => Expect {
            map: HashMap::new(),
            loads: fits(asked),
            valid: true,
            cb: asked.chunk_bytes(),
        },
        Ok(HeaderState::Existing(h)) => {
            let Ok(layout) = h.check() else {
                return Expect {
                    map: HashMap::new(),
                    loads: false,
                    valid: false,
                    cb: 0,
                };
            };
            let cb = layout.chunk_bytes();
            let opts = ScanOptions {
                origin_chunks: Some(origin_bytes.div_ceil(cb)),
                stop_at_first: false,
            };
            let mut map = HashMap::new();
            let mut order = Vec::new();
            let scan = scan_areas(&dev, layout, opts, |_, _, r| {
                order.push(r);
                map.insert(r.old, r.new).is_none()
            })
            .await
            .expect("an in-memory device reads");
            check_scan(&scan, &order, layout);
            Expect {
                map,
                // A torn tail (bytes after the end of the list in the last
                // area) is what a crash leaves: the loader reads up to the
                // end of the list, as the kernel does.
                loads: fits(layout)
                    && (!h.valid || scan.problems.iter().all(|p| p.is_torn_tail())),
                valid: h.valid,
                cb,
            }
        }
    }
}

/// The scan's own promises: the next free chunk is a data chunk past every
/// record's, and the free runs are data chunks below it that no record
/// holds.
fn check_scan(scan: &cowsnap_store::scan::Scan, records: &[Record], layout: Layout) {
    if !scan.problems.is_empty() {
        return;
    }
    assert_eq!(scan.exceptions, records.len() as u64, "exception count");
    assert!(
        !layout.is_metadata(scan.next_free),
        "next free {} is metadata",
        scan.next_free
    );
    let used: std::collections::HashSet<u64> = records.iter().map(|r| r.new).collect();
    for r in records {
        assert!(
            r.new < scan.next_free,
            "record {r:?} at or past next free {}",
            scan.next_free
        );
    }
    let mut last = 0;
    for run in &scan.free {
        assert!(
            run.start >= last && run.start < run.end,
            "free runs {:?}",
            scan.free
        );
        last = run.end;
        for c in run.clone() {
            assert!(
                c >= layout.first_data_chunk() && c < scan.next_free,
                "free chunk {c}"
            );
            assert!(!layout.is_metadata(c), "free chunk {c} is metadata");
            assert!(!used.contains(&c), "free chunk {c} is in use");
        }
    }
}

/// What the snapshot must read: per origin chunk, the COW chunk's bytes
/// (from the image before loading) or the origin's.
fn expected_snapshot(e: &Expect, cow_before: &[u8], origin_before: &[u8]) -> Vec<u8> {
    let mut want = origin_before.to_vec();
    let cb = e.cb as usize;
    for (&old, &new) in &e.map {
        let (o, n) = (old as usize * cb, new as usize * cb);
        let end = (o + cb).min(want.len());
        want[o..end].copy_from_slice(&cow_before[n..n + (end - o)]);
    }
    want
}

/// Loads `cow` as a snapshot of `origin`; the snapshot id.
async fn attach(origin_img: &Image, cow: &Image, chunk_sectors: u32) -> (Arc<Origin>, Option<u64>) {
    let origin = Arc::new(Origin::new(memdev::device("origin", origin_img)).expect("origin"));
    let opts = SnapshotOptions {
        chunk_sectors: Some(chunk_sectors),
        ..Default::default()
    };
    let id = origin
        .add_snapshot(memdev::device("cow", cow), opts)
        .await
        .ok()
        .map(|a| a.id);
    (origin, id)
}

/// Checks the loader and scanner on the image `input` describes.
pub fn check_load(input: &[u8]) {
    let Some((img, rest)) = Shape::parse(input) else {
        return;
    };
    let cb = img.layout().chunk_bytes();
    let cow = img;
    let cow_img = memdev::image(0);
    *cow_img.lock().expect("image") = cow.build(rest);
    let origin_bytes = cow.origin_chunks * cb;
    let origin_img = memdev::image(0);
    *origin_img.lock().expect("image") = origin_image(cow.origin_chunks, cb, 0);
    crate::block_on(async {
        let e = expectations(&cow_img, &cow, origin_bytes).await;
        let cow_before = cow_img.lock().expect("image").clone();
        let origin_before = memdev::bytes(&origin_img, 0, origin_bytes);

        // 2. The loader agrees with the scan.
        let (origin, id) = attach(&origin_img, &cow_img, cow.chunk_sectors).await;
        assert_eq!(id.is_some(), e.loads, "the loader and the scan disagree");
        let Some(id) = id else {
            return;
        };
        let snap = Target::Snapshot(id);

        // 3. The snapshot reads what the records say.
        let want = expected_snapshot(&e, &cow_before, &origin_before);
        let read = origin.read(snap, 0, origin_bytes).await;
        if !e.valid {
            assert!(read.is_err(), "an invalid snapshot read");
            return;
        }
        assert!(
            read.expect("snapshot read")[..] == want[..],
            "snapshot content after load"
        );

        // 4. Copy-on-write into the chunks the load left free.
        let mut next = AlignedBuf::zeroed(origin_bytes as usize);
        next.copy_from_slice(&origin_image(cow.origin_chunks, cb, 1));
        origin
            .write(Target::Origin, 0, next, true)
            .await
            .expect("origin write");
        let valid = origin.status(id).expect("status").valid;
        let read = origin.read(snap, 0, origin_bytes).await;
        if valid {
            assert!(
                read.expect("snapshot read")[..] == want[..],
                "snapshot content after origin write"
            );
        } else {
            assert!(read.is_err(), "a snapshot that overflowed still reads");
        }
        let o = origin
            .read(Target::Origin, 0, origin_bytes)
            .await
            .expect("origin read");
        assert!(
            o[..] == origin_image(cow.origin_chunks, cb, 1)[..],
            "origin content"
        );
        origin.shutdown().await.expect("shutdown");
        drop(origin);

        // 5. What was written loads again.
        let (origin, id) = attach(&origin_img, &cow_img, cow.chunk_sectors).await;
        let id = id.expect("a snapshot that loaded and was used loads again");
        let read = origin.read(Target::Snapshot(id), 0, origin_bytes).await;
        if valid {
            assert!(
                read.expect("snapshot read")[..] == want[..],
                "snapshot content after reload"
            );
        } else {
            assert!(read.is_err(), "an overflowed snapshot reads after reload");
        }
    });
}
