//! The NBD server against a hand-written client speaking the raw protocol
//! over TCP: the handshake's options and replies, every command and its
//! errors, malformed input (each case must end in an error reply or a closed
//! connection while another connection keeps working), and many requests in
//! flight on one connection.

mod common;

use std::collections::HashMap;
use std::io::Read;

use common::*;
use cowsnap_store::Target;

/// A connection in transmission on the volume, checked to work: used as the
/// bystander while another connection misbehaves.
fn bystander(h: &Harness) -> Client {
    let (mut c, _) = Client::open(h.tcp, VOLUME, true);
    let got = c.read_ok(0, 4096);
    assert_eq!(got, h.engine_read(Target::Origin, 0, 4096));
    c
}

/// The bystander still reads and writes correctly, and a new connection
/// still gets through the handshake.
fn assert_still_serving(h: &Harness, c: &mut Client, seed: u64) {
    let data = pattern(8192, seed);
    c.write_ok(1 << 20, &data);
    assert_eq!(c.read_ok(1 << 20, 8192), data);
    let (mut fresh, _) = Client::open(h.tcp, VOLUME, false);
    assert_eq!(fresh.read_ok(1 << 20, 8192), data);
}

#[test]
fn go_reports_size_flags_block_sizes_name_and_description() {
    let h = Harness::start();
    let (_, vol) = Client::open(h.tcp, VOLUME, true);
    assert_eq!(vol.size, SIZE);
    assert_eq!(
        vol.flags,
        HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | CAN_MULTI_CONN
    );
    let min = h.min_block() as u32;
    assert_eq!(vol.block, Some((min, CHUNK.max(min), 32 << 20)));
    assert_eq!(vol.name.as_deref(), Some(VOLUME));
    assert_eq!(vol.description.as_deref(), Some("cowsnap volume v1"));

    let (_, snap) = Client::open(h.tcp, SNAPSHOT, false);
    assert_eq!(snap.size, SIZE);
    assert_eq!(snap.flags & READ_ONLY, READ_ONLY);
    assert_eq!(
        snap.flags & (HAS_FLAGS | SEND_FLUSH | SEND_FUA),
        HAS_FLAGS | SEND_FLUSH | SEND_FUA
    );
    assert_eq!(
        snap.description.as_deref(),
        Some("cowsnap snapshot s1 of volume v1 (read-only)")
    );
    h.stop();
}

#[test]
fn list_info_and_unsupported_options_keep_the_handshake_going() {
    let h = Harness::start();
    let mut c = Client::start(h.tcp);

    c.option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let r = c.opt_reply();
        assert_eq!(r.opt, OPT_LIST);
        if r.kind == REP_ACK {
            break;
        }
        assert_eq!(r.kind, REP_SERVER);
        let n = u32::from_be_bytes(r.data[0..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(r.data[4..4 + n].to_vec()).unwrap());
    }
    names.sort();
    assert_eq!(names, vec![VOLUME.to_string(), SNAPSHOT.to_string()]);

    // LIST with data is malformed.
    c.option(OPT_LIST, b"x");
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);

    // INFO does not leave the handshake.
    let info = c.info_or_go(OPT_INFO, SNAPSHOT).unwrap();
    assert_eq!(info.size, SIZE);

    // Unknown exports, including the empty name (there is no default).
    for name in ["volumes/nope", "", "volumes/v1/snapshots/nope"] {
        let e = c.info_or_go(OPT_GO, name).unwrap_err();
        assert_eq!(e.kind, REP_ERR_UNKNOWN, "GO {name:?}");
    }

    // Options the server does not implement.
    for opt in [OPT_STARTTLS, OPT_SET_META_CONTEXT, 4242] {
        c.option(opt, &[]);
        let r = c.opt_reply();
        assert_eq!((r.opt, r.kind), (opt, REP_ERR_UNSUP));
    }

    // GO data whose name length runs past the end.
    let mut bad = Client::go_data(VOLUME, &[]);
    bad[3] = 0xff;
    c.option(OPT_GO, &bad);
    assert_eq!(c.opt_reply().kind, REP_ERR_INVALID);

    // After all that, GO still works and the export serves.
    let info = c.info_or_go(OPT_GO, VOLUME).unwrap();
    assert_eq!(info.size, SIZE);
    assert_eq!(c.read_ok(0, 4096), h.snapshot_model[..4096]);
    h.stop();
}

#[test]
fn export_name_enters_transmission_with_and_without_zeroes() {
    let h = Harness::start();
    for no_zeroes in [true, false] {
        let mut c = Client::connect(h.tcp);
        c.greeting();
        c.client_flags(C_FIXED_NEWSTYLE | if no_zeroes { C_NO_ZEROES } else { 0 });
        c.option(OPT_EXPORT_NAME, VOLUME.as_bytes());
        let reply = c.read_exact(8 + 2 + if no_zeroes { 0 } else { 124 });
        assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), SIZE);
        let flags = u16::from_be_bytes(reply[8..10].try_into().unwrap());
        assert_eq!(flags & HAS_FLAGS, HAS_FLAGS);
        assert!(reply[10..].iter().all(|&b| b == 0));
        assert_eq!(c.read_ok(4096, 4096), h.snapshot_model[4096..8192]);
    }
    // An unknown name cannot get an error reply: the connection is closed.
    let mut c = Client::start(h.tcp);
    c.option(OPT_EXPORT_NAME, b"volumes/nope");
    assert!(c.closed());
    h.stop();
}

#[test]
fn abort_is_acknowledged_then_closed() {
    let h = Harness::start();
    let mut c = Client::start(h.tcp);
    c.option(OPT_ABORT, &[]);
    let r = c.opt_reply();
    assert_eq!((r.opt, r.kind), (OPT_ABORT, REP_ACK));
    assert!(c.closed());
    h.stop();
}

#[test]
fn malformed_handshakes_close_only_their_own_connection() {
    let h = Harness::start();
    let mut other = bystander(&h);

    // Client flags the server never offered.
    let mut c = Client::connect(h.tcp);
    c.greeting();
    c.client_flags(C_FIXED_NEWSTYLE | 0x80);
    assert!(c.closed(), "unknown client flags");

    // An option with a bad magic.
    let mut c = Client::start(h.tcp);
    let mut b = 0x1234_5678_9abc_def0u64.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    c.write(&b);
    assert!(c.closed(), "bad option magic");

    // A huge option length.
    let mut c = Client::start(h.tcp);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.write(&b);
    assert!(c.closed(), "huge option length");

    // A truncated option: the header promises 100 bytes, 10 come, then EOF.
    let mut c = Client::start(h.tcp);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&100u32.to_be_bytes());
    b.extend_from_slice(&[0u8; 10]);
    c.write(&b);
    c.shutdown_write();
    assert!(c.closed(), "truncated option");

    // A truncated greeting reply (2 of the 4 flag bytes).
    let mut c = Client::connect(h.tcp);
    c.greeting();
    c.write(&[0, 0]);
    c.shutdown_write();
    assert!(c.closed(), "truncated client flags");

    assert_still_serving(&h, &mut other, 11);
    h.stop();
}

#[test]
fn bad_request_magic_closes_only_that_connection() {
    let h = Harness::start();
    let mut other = bystander(&h);
    for structured in [false, true] {
        let (mut c, _) = Client::open(h.tcp, VOLUME, structured);
        let mut b = 0xdead_beefu32.to_be_bytes().to_vec();
        b.extend_from_slice(&[0u8; 24]);
        c.write(&b);
        assert!(c.closed(), "bad request magic (structured={structured})");
    }
    // A request header cut short.
    let (mut c, _) = Client::open(h.tcp, VOLUME, true);
    c.write(&REQUEST_MAGIC.to_be_bytes());
    c.shutdown_write();
    assert!(c.closed(), "truncated request header");
    assert_still_serving(&h, &mut other, 12);
    h.stop();
}

#[test]
fn unknown_commands_and_flags_get_einval() {
    let h = Harness::start();
    let mut other = bystander(&h);
    for structured in [false, true] {
        let (mut c, _) = Client::open(h.tcp, VOLUME, structured);
        // BLOCK_STATUS was never negotiated, 99 does not exist.
        for kind in [CMD_BLOCK_STATUS, 5, 99] {
            let r = c.call(0, kind, 0, 4096, &[]);
            assert_eq!(r.error, EINVAL, "command {kind}");
        }
        // DF was not offered; NO_HOLE belongs to write-zeroes only.
        let r = c.call(FLAG_DF, CMD_READ, 0, 4096, &[]);
        assert_eq!(r.error, EINVAL);
        let r = c.call(FLAG_NO_HOLE, CMD_WRITE, 0, 4096, &[7u8; 4096]);
        assert_eq!(r.error, EINVAL);
        let r = c.call(0x100, CMD_FLUSH, 0, 0, &[]);
        assert_eq!(r.error, EINVAL);
        // The connection goes on, and the refused write wrote nothing.
        assert_eq!(c.read_ok(0, 4096), h.snapshot_model[..4096]);
    }
    assert_still_serving(&h, &mut other, 13);
    h.stop();
}

/// A request that must be refused, and the error it must get.
struct Refused {
    what: &'static str,
    kind: u16,
    offset: u64,
    len: u32,
    errno: u32,
}

#[test]
fn misaligned_out_of_range_and_zero_length_requests_are_refused() {
    let h = Harness::start();
    let mut other = bystander(&h);
    let min = h.min_block() as u32;
    let end = SIZE;
    let case = |what, kind, offset, len, errno| Refused {
        what,
        kind,
        offset,
        len,
        errno,
    };
    let cases = [
        case("read at a misaligned offset", CMD_READ, 1, min, EINVAL),
        case("read of a misaligned length", CMD_READ, 0, min + 1, EINVAL),
        case("write at a misaligned offset", CMD_WRITE, 1, min, EINVAL),
        case("trim of a misaligned length", CMD_TRIM, 0, min / 2, EINVAL),
        case(
            "read past the end",
            CMD_READ,
            end - u64::from(min),
            2 * min,
            EINVAL,
        ),
        case("read at the end", CMD_READ, end, min, EINVAL),
        case(
            "read with an overflowing offset",
            CMD_READ,
            u64::MAX - u64::from(min) + 1,
            min,
            EINVAL,
        ),
        case("write past the end", CMD_WRITE, end, min, ENOSPC),
        case(
            "write-zeroes past the end",
            CMD_WRITE_ZEROES,
            end - u64::from(min),
            2 * min,
            ENOSPC,
        ),
        case("trim past the end", CMD_TRIM, end, min, EINVAL),
        case("read of length 0", CMD_READ, 0, 0, EINVAL),
        case("write of length 0", CMD_WRITE, 0, 0, EINVAL),
        case("write-zeroes of length 0", CMD_WRITE_ZEROES, 0, 0, EINVAL),
    ];
    for structured in [false, true] {
        let (mut c, _) = Client::open(h.tcp, VOLUME, structured);
        for r in &cases {
            let payload = if r.kind == CMD_WRITE {
                vec![0x5au8; r.len as usize]
            } else {
                vec![]
            };
            let reply = c.call(0, r.kind, r.offset, r.len, &payload);
            let what = r.what;
            assert_eq!(
                reply.error, r.errno,
                "{what} (structured={structured}): {}",
                reply.message
            );
            if structured {
                assert!(reply.data.is_empty(), "{what}: no data with an error");
                assert!(
                    reply.message.contains(VOLUME),
                    "{what}: the message names the export: {}",
                    reply.message
                );
            }
        }
        // Nothing was written by any of them.
        assert_eq!(c.read_ok(0, min), h.snapshot_model[..min as usize]);
        let tail = c.read_ok(end - u64::from(min), min);
        assert_eq!(tail, h.snapshot_model[(end - u64::from(min)) as usize..]);
    }
    assert_still_serving(&h, &mut other, 14);
    h.stop();
}

#[test]
fn write_longer_than_the_maximum_is_refused_and_the_connection_goes_on() {
    let h = Harness::start();
    let mut other = bystander(&h);
    let (mut c, info) = Client::open(h.tcp, VOLUME, true);
    let max = info.block.unwrap().2;
    let min = info.block.unwrap().0;
    let big = vec![0xeeu8; (max + min) as usize];
    let r = c.call(0, CMD_WRITE, 0, big.len() as u32, &big);
    assert_eq!(r.error, EINVAL, "{}", r.message);
    // A read longer than the maximum, too.
    let r = c.call(0, CMD_READ, 0, max + min, &[]);
    assert_eq!(r.error, EINVAL);
    // The payload was consumed, not taken for requests.
    assert_eq!(c.read_ok(0, 8192), h.snapshot_model[..8192]);
    assert_still_serving(&h, &mut other, 15);
    h.stop();
}

#[test]
fn read_only_snapshot_refuses_writes_with_eperm() {
    let h = Harness::start();
    for structured in [false, true] {
        let (mut c, info) = Client::open(h.tcp, SNAPSHOT, structured);
        assert_eq!(info.flags & READ_ONLY, READ_ONLY);
        let r = c.call(0, CMD_WRITE, 0, 4096, &[1u8; 4096]);
        assert_eq!(r.error, EPERM, "write");
        let r = c.call(FLAG_FUA, CMD_WRITE, 4096, 4096, &[1u8; 4096]);
        assert_eq!(r.error, EPERM, "FUA write");
        let r = c.call(0, CMD_TRIM, 0, 4096, &[]);
        assert_eq!(r.error, EPERM, "trim");
        let r = c.call(0, CMD_WRITE_ZEROES, 0, 4096, &[]);
        assert_eq!(r.error, EPERM, "write-zeroes");
        // Flush is harmless and allowed; reads see the snapshot unchanged.
        assert_eq!(c.call(0, CMD_FLUSH, 0, 0, &[]).error, 0);
        assert_eq!(c.read_ok(0, 8192), h.snapshot_model[..8192]);
    }
    h.stop();
}

#[test]
fn writes_fua_writes_zeroes_trim_and_flush_reach_the_engine() {
    let h = Harness::start();
    for structured in [false, true] {
        let (mut c, _) = Client::open(h.tcp, VOLUME, structured);
        let seed = if structured { 21 } else { 22 };
        let a = pattern(65536, seed);
        let b = pattern(16384, seed + 100);
        c.write_ok(0, &a);
        let r = c.call(FLAG_FUA, CMD_WRITE, 131072, b.len() as u32, &b);
        assert_eq!(r.error, 0, "FUA write");
        let r = c.call(
            FLAG_FUA | FLAG_NO_HOLE,
            CMD_WRITE_ZEROES,
            262144,
            65536,
            &[],
        );
        assert_eq!(r.error, 0, "write-zeroes");
        let r = c.call(FLAG_FUA, CMD_TRIM, 524288, 65536, &[]);
        assert_eq!(r.error, 0, "trim");
        let r = c.call(0, CMD_FLUSH, 0, 0, &[]);
        assert_eq!(r.error, 0, "flush");

        assert_eq!(c.read_ok(0, 65536), a);
        assert_eq!(c.read_ok(131072, 16384), b);
        assert!(c.read_ok(262144, 65536).iter().all(|&x| x == 0));
        // The bytes are on the origin file itself after the flush.
        assert_eq!(file_bytes(&h.origin_path, 0, 65536), a);
        assert_eq!(file_bytes(&h.origin_path, 131072, 16384), b);
        // The snapshot kept the old data (copy-on-write), seen through NBD.
        let (mut s, _) = Client::open(h.tcp, SNAPSHOT, structured);
        assert_eq!(s.read_ok(0, 65536), h.snapshot_model[..65536]);
        assert_eq!(s.read_ok(262144, 65536), h.snapshot_model[262144..327680]);
    }
    h.stop();
}

/// Sends `n` writes then `n` reads without waiting, each batch on one
/// connection, and checks every reply by handle.
fn many_in_flight(structured: bool, n: u64) {
    let h = Harness::start();
    let (mut c, _) = Client::open(h.tcp, VOLUME, structured);
    let len = 16384u32;
    let data: Vec<Vec<u8>> = (0..n).map(|i| pattern(len as usize, 1000 + i)).collect();
    let mut batch = Vec::new();
    for i in 0..n {
        let off = i * u64::from(len) * 2;
        let mut b = Vec::new();
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&CMD_WRITE.to_be_bytes());
        b.extend_from_slice(&(100 + i).to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&data[i as usize]);
        batch.extend_from_slice(&b);
    }
    c.write(&batch);
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = c.reply(&HashMap::new());
        assert_eq!(r.error, 0, "write {}: {}", r.handle, r.message);
        assert!(seen.insert(r.handle, ()).is_none(), "one reply per handle");
    }
    assert_eq!(seen.len() as u64, n);
    assert!((0..n).all(|i| seen.contains_key(&(100 + i))));

    let mut lens = HashMap::new();
    for i in 0..n {
        let off = i * u64::from(len) * 2;
        c.request(0, CMD_READ, 500 + i, off, len, &[]);
        lens.insert(500 + i, len);
    }
    let mut order = Vec::new();
    for _ in 0..n {
        let r = c.reply(&lens);
        assert_eq!(r.error, 0, "read {}", r.handle);
        let i = r.handle - 500;
        assert!(i < n, "known handle");
        let off = i * u64::from(len) * 2;
        assert_eq!(assemble(&r, off, len), data[i as usize], "read {i}");
        lens.remove(&r.handle);
        order.push(i);
    }
    assert!(lens.is_empty(), "every read answered once");
    eprintln!("reply order (structured={structured}): {order:?}");
    h.stop();
}

#[test]
fn sixty_four_requests_in_flight_all_answered_correctly_structured() {
    many_in_flight(true, 64);
}

#[test]
fn forty_requests_in_flight_all_answered_correctly_simple() {
    many_in_flight(false, 40);
}

#[test]
fn disconnect_answers_requests_in_flight_first() {
    let h = Harness::start();
    let (mut c, _) = Client::open(h.tcp, VOLUME, true);
    let n = 16u64;
    for i in 0..n {
        c.request(0, CMD_WRITE, i, i * 8192, 8192, &pattern(8192, 300 + i));
    }
    c.request(0, CMD_DISC, 999, 0, 0, &[]);
    let mut handles: Vec<u64> = (0..n)
        .map(|_| {
            let r = c.reply(&HashMap::new());
            assert_eq!(r.error, 0);
            r.handle
        })
        .collect();
    handles.sort();
    assert_eq!(handles, (0..n).collect::<Vec<_>>());
    assert!(c.closed(), "closed after the disconnect");
    let (mut d, _) = Client::open(h.tcp, VOLUME, false);
    for i in 0..n {
        assert_eq!(d.read_ok(i * 8192, 8192), pattern(8192, 300 + i));
    }
    h.stop();
}

#[test]
fn engine_errors_map_to_nbd_errors_with_an_offset() {
    let h = Harness::start();
    let (mut simple, _) = Client::open(h.tcp, SNAPSHOT, false);
    let (mut structured, _) = Client::open(h.tcp, SNAPSHOT, true);
    // The snapshot goes away under the open connections: the engine says
    // ENODEV, which is not an NBD error value, so clients see EIO.
    h.rt.block_on(h.origin.delete_snapshot(h.snap)).unwrap();
    let r = simple.call(0, CMD_READ, 8192, 4096, &[]);
    assert_eq!(r.error, EIO);
    assert!(r.data.is_empty());
    let r = structured.call(0, CMD_READ, 8192, 4096, &[]);
    assert_eq!(r.error, EIO);
    assert_eq!(r.chunks, vec![TYPE_ERROR_OFFSET]);
    assert_eq!(r.error_offset, Some(8192));
    assert!(r.message.contains(SNAPSHOT), "{}", r.message);
    // The volume is unaffected.
    let (mut v, _) = Client::open(h.tcp, VOLUME, true);
    assert_eq!(v.read_ok(0, 4096), h.snapshot_model[..4096]);
    h.stop();
}

#[test]
fn shutdown_closes_connections_and_removes_the_unix_socket() {
    let mut h = Harness::start();
    let (mut c, _) = Client::open(h.tcp, VOLUME, true);
    let data = pattern(65536, 77);
    c.write_ok(0, &data);
    // One connection is still in the handshake.
    let mut idle = Client::start(h.tcp);
    h.cancel();
    for r in h.join_servers() {
        r.unwrap();
    }
    assert!(c.closed(), "transmission connection closed");
    assert!(idle.closed(), "handshake connection closed");
    assert!(!h.unix.exists(), "unix socket removed");
    // The acknowledged write is on the origin file.
    assert_eq!(file_bytes(&h.origin_path, 0, 65536), data);
}

/// Requests with the right magic but random commands, flags, offsets and
/// lengths, 16 in flight at a time: each gets exactly one reply, with its
/// handle and an error value the protocol defines (or success).
fn random_requests(structured: bool, seed: u64) {
    use rand::{Rng, SeedableRng};
    let h = Harness::start();
    let (mut c, _) = Client::open(h.tcp, VOLUME, structured);
    let min = h.min_block();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut handle = 0u64;
    for _ in 0..20 {
        let mut lens = HashMap::new();
        let mut batch = Vec::new();
        for _ in 0..16 {
            handle += 1;
            let kind = [
                CMD_READ,
                CMD_WRITE,
                CMD_FLUSH,
                CMD_TRIM,
                CMD_WRITE_ZEROES,
                5,
                7,
                9,
            ][rng.random_range(0..8)];
            let flags: u16 = if rng.random_bool(0.7) {
                0
            } else {
                rng.random()
            };
            let offset = match rng.random_range(0..3) {
                0 => rng.random_range(0..SIZE / min) * min,
                1 => rng.random_range(0..SIZE + 8 * min),
                _ => rng.random(),
            };
            let len: u32 = match rng.random_range(0..3) {
                0 => (rng.random_range(0..64) * min) as u32,
                1 => rng.random_range(0..256 << 10),
                _ if kind == CMD_WRITE => rng.random_range(0..1 << 20),
                _ => rng.random(),
            };
            let mut b = Vec::new();
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            b.extend_from_slice(&flags.to_be_bytes());
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&handle.to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            if kind == CMD_WRITE {
                b.extend(std::iter::repeat_n(0x3c, len as usize));
            }
            if kind == CMD_READ {
                lens.insert(handle, len);
            }
            batch.extend_from_slice(&b);
        }
        c.write(&batch);
        let mut answered = Vec::new();
        for _ in 0..16 {
            let r = c.reply(&lens);
            assert!(
                [0, EPERM, EIO, EINVAL, ENOSPC].contains(&r.error),
                "handle {}: error {} ({})",
                r.handle,
                r.error,
                r.message
            );
            if r.error == 0
                && let Some(&len) = lens.get(&r.handle)
            {
                assert_eq!(
                    r.data.iter().map(|(_, d)| d.len()).sum::<usize>(),
                    len as usize
                );
            }
            answered.push(r.handle);
        }
        answered.sort();
        assert_eq!(answered, ((handle - 15)..=handle).collect::<Vec<_>>());
    }
    // Still a working connection.
    let data = pattern(4096, seed);
    c.write_ok(0, &data);
    assert_eq!(c.read_ok(0, 4096), data);
    h.stop();
}

#[test]
fn random_requests_each_get_one_reply_simple() {
    random_requests(false, 0x5eed_0001);
}

#[test]
fn random_requests_each_get_one_reply_structured() {
    random_requests(true, 0x5eed_0002);
}

// ---------------------------------------------------------------------------
// Limits: connections, idle time, buffer memory (issue 13, point 2).

/// Waits (a safety net of 60 s, not a timing assertion) until `f` holds.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..600 {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{what}: not within 60 s");
}

/// A client that got `NBD_REP_ERR_POLICY` with `told` in the message, then
/// an acknowledged abort and a closed connection.
fn assert_refused(h: &Harness, told: &str) {
    let mut c = Client::start(h.tcp);
    let e = c.info_or_go(OPT_GO, VOLUME).unwrap_err();
    assert_eq!(e.kind, REP_ERR_POLICY, "{e:?}");
    let msg = String::from_utf8(e.data).unwrap();
    assert!(msg.contains(told), "refusal message {msg:?}");
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply().kind, REP_ACK);
    assert!(c.closed());
}

#[test]
fn connections_over_the_limit_are_refused_clearly() {
    let h = Harness::start_with(cowsnap_worker::nbd::NbdLimits {
        max_connections: 4,
        ..Default::default()
    });
    let told = "too many connections (limit 4)";
    let mut held: Vec<Client> = (0..4).map(|_| bystander(&h)).collect();
    assert_eq!(h.quotas.connections(), 4);

    // The fifth is told why, during the handshake.
    assert_refused(&h, told);
    // So are real clients: qemu prints the server's message, libnbd in its
    // debug output. On the unix socket too: the limit is the process's, not
    // a listener's.
    let out = std::process::Command::new("nbdinfo")
        .arg(h.unix_uri(VOLUME))
        .env("LIBNBD_DEBUG", "1")
        .output()
        .expect("nbdinfo (libnbd-bin)");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(told), "nbdinfo: {err}");
    let out = run_tool("qemu-io", &["-f", "raw", &h.uri(VOLUME), "-c", "read 0 4k"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(told), "qemu-io: {err}");
    // A client that goes away at once leaves nothing behind.
    drop(std::net::TcpStream::connect(h.tcp).unwrap());

    // The admitted connections kept working all along.
    for (i, c) in held.iter_mut().enumerate() {
        assert_eq!(
            c.read_ok(0, 4096),
            h.engine_read(Target::Origin, 0, 4096),
            "{i}"
        );
    }

    // One closes: a new one gets in, and is the fourth again.
    drop(held.pop());
    eventually("the closed connection freed its slot", || {
        h.quotas.connections() == 3
    });
    let mut again = bystander(&h);
    assert_eq!(h.quotas.connections(), 4);
    assert_refused(&h, told);

    // With room again, nbdinfo and qemu-io work.
    drop(held);
    eventually("the closed connections freed their slots", || {
        h.quotas.connections() == 1
    });
    let out = ok(run_tool("nbdinfo", &[&h.uri(VOLUME)]), "nbdinfo");
    assert!(out.contains(&SIZE.to_string()), "{out}");
    ok(
        run_tool(
            "qemu-io",
            &[
                "-f",
                "raw",
                &h.uri(VOLUME),
                "-c",
                "write -P 0x11 0 64k",
                "-c",
                "read -P 0x11 0 64k",
            ],
        ),
        "qemu-io",
    );
    assert_eq!(again.read_ok(0, 4096), vec![0x11; 4096]);
    drop(again);
    h.stop();
}

#[test]
fn idle_connections_are_closed() {
    let h = Harness::start_with(cowsnap_worker::nbd::NbdLimits {
        idle_timeout: Some(std::time::Duration::from_secs(1)),
        ..Default::default()
    });
    let (mut idle, _) = Client::open(h.tcp, VOLUME, true);
    let (mut busy, _) = Client::open(h.tcp, VOLUME, false);
    // The busy one sends a request every 200 ms for three times the idle
    // timeout, while the idle one waits for the server to close it.
    let worker = std::thread::spawn(move || {
        for i in 0..15u64 {
            let data = pattern(4096, i);
            busy.write_ok(8192, &data);
            assert_eq!(busy.read_ok(8192, 4096), data, "request {i}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        busy
    });
    assert!(
        idle.closed(),
        "the idle connection was closed by the server"
    );
    let mut busy = worker.join().unwrap();
    assert_eq!(busy.read_ok(8192, 4096), pattern(4096, 14));
    eventually("the idle connection freed its slot", || {
        h.quotas.connections() == 1
    });
    drop(busy);
    h.stop();
}

#[test]
fn clients_that_take_no_replies_are_dropped_after_the_idle_timeout() {
    let h = Harness::start_with(cowsnap_worker::nbd::NbdLimits {
        idle_timeout: Some(std::time::Duration::from_secs(1)),
        ..Default::default()
    });
    let (mut c, _) = Client::open(h.tcp, VOLUME, false);
    // 64 MiB of replies, more than the sockets hold; none is read.
    for i in 0..16 {
        c.request(0, CMD_READ, i, 0, 4 << 20, &[]);
    }
    // The server gives up on the client, and its budget comes back.
    eventually("the stalled client's budget released", || {
        h.quotas.buffer_bytes_in_use() == 0 && h.quotas.connections() == 0
    });
    let mut got = Vec::new();
    let _ = c.s.read_to_end(&mut got);
    assert!(
        got.len() < 16 * ((4 << 20) + 16),
        "the connection was cut before every reply was sent"
    );
    let mut other = bystander(&h);
    assert_still_serving(&h, &mut other, 3);
    h.stop();
}

#[test]
fn a_budget_of_one_request_answers_every_pipelined_read() {
    // One 4 MiB buffer at a time in the whole process.
    let h = Harness::start_with(cowsnap_worker::nbd::NbdLimits {
        buffer_budget_bytes: 4 << 20,
        ..Default::default()
    });
    let len = 4u32 << 20;
    let mut threads = Vec::new();
    for k in 0..3u64 {
        let (mut c, _) = Client::open(h.tcp, if k == 2 { SNAPSHOT } else { VOLUME }, k == 1);
        threads.push(std::thread::spawn(move || {
            // Pipelined: all sent before any reply is read.
            let mut lens = HashMap::new();
            for i in 0..8u64 {
                c.request(0, CMD_READ, i, 0, len, &[]);
                lens.insert(i, len);
            }
            let mut replies = Vec::new();
            for _ in 0..8 {
                let r = c.reply(&lens);
                assert_eq!(r.error, 0, "{}", r.message);
                replies.push(assemble(&r, 0, len));
            }
            replies
        }));
    }
    for t in threads {
        for r in t.join().unwrap() {
            assert_eq!(r, h.snapshot_model[..len as usize]);
        }
    }
    assert_eq!(h.quotas.buffer_bytes_in_use(), 0);
    h.stop();
}

#[test]
fn requests_larger_than_the_whole_budget_get_enomem() {
    // Below the largest request (only a test can set that).
    let h = Harness::start_with(cowsnap_worker::nbd::NbdLimits {
        buffer_budget_bytes: 1 << 20,
        ..Default::default()
    });
    for structured in [false, true] {
        let (mut c, _) = Client::open(h.tcp, VOLUME, structured);
        let r = c.call(0, CMD_READ, 0, 2 << 20, &[]);
        assert_eq!(r.error, ENOMEM);
        let r = c.call(0, CMD_WRITE, 0, 2 << 20, &pattern(2 << 20, 9));
        assert_eq!(r.error, ENOMEM);
        if structured {
            assert!(r.message.contains("buffer budget"), "{}", r.message);
        }
        // The payload was skipped: the connection goes on, within budget.
        assert_still_serving(&h, &mut c, 4);
        assert_eq!(
            c.read_ok(0, 1 << 20),
            h.engine_read(Target::Origin, 0, 1 << 20)
        );
    }
    assert_eq!(h.quotas.buffer_bytes_in_use(), 0);
    h.stop();
}
