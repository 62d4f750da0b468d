//! The starting corpus: one small input per interesting shape, for each
//! target. `cargo run --example make_seeds` writes them under `corpus/`; the
//! files are committed, so this only needs running when the shapes change.

use cowsnap_worker::nbd::proto::{self, Command, RequestHeader};

use crate::nbd::{READ_ONLY, SNAPSHOT, VOLUME};

fn option(b: &mut Vec<u8>, opt: u32, data: &[u8]) {
    proto::put_u64(b, proto::IHAVEOPT);
    proto::put_u32(b, opt);
    proto::put_u32(b, data.len() as u32);
    b.extend_from_slice(data);
}

fn info(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    proto::put_u32(&mut d, name.len() as u32);
    d.extend_from_slice(name.as_bytes());
    proto::put_u16(&mut d, infos.len() as u16);
    for &i in infos {
        proto::put_u16(&mut d, i);
    }
    d
}

fn handshakes() -> Vec<(&'static str, Vec<u8>)> {
    let flags = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    let start = |f: u32| f.to_be_bytes().to_vec();
    let mut seeds = Vec::new();
    let mut b = start(flags);
    option(&mut b, proto::OPT_STRUCTURED_REPLY, &[]);
    option(&mut b, proto::OPT_LIST, &[]);
    option(
        &mut b,
        proto::OPT_INFO,
        &info(SNAPSHOT, &[proto::INFO_NAME, proto::INFO_DESCRIPTION]),
    );
    option(
        &mut b,
        proto::OPT_GO,
        &info(VOLUME, &[proto::INFO_BLOCK_SIZE]),
    );
    seeds.push(("go", b));
    let mut b = start(proto::FLAG_C_FIXED_NEWSTYLE);
    option(&mut b, proto::OPT_EXPORT_NAME, READ_ONLY.as_bytes());
    seeds.push(("export-name", b));
    let mut b = start(flags);
    option(&mut b, proto::OPT_GO, &info("volumes/nope", &[]));
    option(&mut b, proto::OPT_SET_META_CONTEXT, b"base:allocation");
    option(&mut b, proto::OPT_ABORT, &[]);
    seeds.push(("unknown-then-abort", b));
    seeds
}

fn request(b: &mut Vec<u8>, command: Command, flags: u16, handle: u64, offset: u64, length: u32) {
    let h = RequestHeader {
        flags,
        command,
        handle,
        offset,
        length,
    };
    b.extend_from_slice(&h.encode());
    if command == Command::Write {
        b.extend((0..length).map(|i| i as u8));
    }
}

fn transmissions() -> Vec<(&'static str, Vec<u8>)> {
    let mut b = vec![1u8]; // structured, the volume
    request(&mut b, Command::Write, proto::CMD_FLAG_FUA, 1, 4096, 4096);
    request(&mut b, Command::Read, 0, 2, 0, 8192);
    request(
        &mut b,
        Command::WriteZeroes,
        proto::CMD_FLAG_NO_HOLE,
        3,
        8192,
        4096,
    );
    request(&mut b, Command::Trim, 0, 4, 0, 512);
    request(&mut b, Command::Flush, 0, 5, 0, 0);
    request(&mut b, Command::Read, 0, 6, 1 << 40, 512);
    request(&mut b, Command::Disconnect, 0, 7, 0, 0);
    let mut s = vec![2u8]; // simple replies, the writable snapshot
    request(&mut s, Command::Write, 0, 1, 512, 1024);
    request(&mut s, Command::Read, 0, 2, 0, 4096);
    request(&mut s, Command::Read, 0, 3, 3, 512);
    let mut r = vec![5u8]; // structured, read-only
    request(&mut r, Command::Write, 0, 1, 0, 512);
    request(&mut r, Command::Read, 0, 2, 0, 512);
    vec![("volume", b), ("snapshot-simple", s), ("read-only", r)]
}

fn cows() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = Vec::new();
    // Record mode, good header, a few records, one past the origin.
    let mut b = vec![0b0110, 0, 40, 16];
    for (old, new) in [(0u16, 2u16), (3, 3), (5, 7), (1, 4)] {
        b.extend_from_slice(&old.to_be_bytes());
        b.extend_from_slice(&new.to_be_bytes());
    }
    seeds.push(("records", b));
    // Record mode, a full first area (256 records of 4 KiB chunks) and two
    // more in the second.
    let mut b = vec![0b0110, 1, 10, 63];
    for i in 0..258u16 {
        let new = if i < 256 { 2 + i } else { 259 + (i - 256) };
        b.extend_from_slice(&(i % 64).to_be_bytes());
        b.extend_from_slice(&new.to_be_bytes());
    }
    seeds.push(("full-area", b));
    // New (all-zero) device; and an invalid one.
    seeds.push(("new", vec![0, 0, 8, 8]));
    seeds.push(("invalid", vec![0b1110, 0, 8, 8]));
    // Raw mode: a header written by hand with a 16-sector chunk.
    let mut b = vec![0, 0, 30, 4];
    b.extend_from_slice(&0x7041_6e53u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&16u32.to_le_bytes());
    seeds.push(("raw-header", b));
    seeds
}

fn texts(items: &[(&'static str, &str)]) -> Vec<(&'static str, Vec<u8>)> {
    items
        .iter()
        .map(|(n, s)| (*n, s.as_bytes().to_vec()))
        .collect()
}

/// Every target's seeds: (target, seed name, bytes).
pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut all = Vec::new();
    let mut add = |target: &'static str, seeds: Vec<(&'static str, Vec<u8>)>| {
        all.extend(seeds.into_iter().map(|(n, b)| (target, n, b)));
    };
    add("nbd_handshake", handshakes());
    add("nbd_transmission", transmissions());
    add("cow_load", cows());
    add(
        "names",
        texts(&[
            ("volume", "volumes/vol-1"),
            ("snapshot", "volumes/v/snapshots/s-2"),
            ("operation", "operations/17"),
            ("ids", "abcdvol9"),
        ]),
    );
    add(
        "list_requests",
        texts(&[
            ("token", "736e617073686f74733a762f33"),
            ("filter", "state=READY AND labels.app=\"db\""),
            ("op-filter", "done=false AND kind=merge"),
            ("bearer", "Bearer abc"),
            ("timeout", "100m"),
            ("worker", "workers/node-1"),
        ]),
    );
    all
}
