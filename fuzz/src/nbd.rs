//! The NBD server under arbitrary client bytes.
//!
//! [`check_handshake`] feeds the input as everything a client sends from
//! the start of a connection to the server's option haggling, and checks
//! that every complete option the client sent was answered, in order, with
//! well-formed replies that end in an acknowledgement or an error (or,
//! for `NBD_OPT_EXPORT_NAME`, the export's size and flags or a closed
//! connection), and that the server read no option it did not answer.
//!
//! [`check_transmission`] opens a connection with a fixed good handshake
//! (structured replies or not, to a writable volume, a writable snapshot
//! or a read-only one, as the first input byte says), then feeds the rest
//! as the request stream, and checks that every request the server took
//! off the stream got exactly one final reply, with its handle, and that a
//! successful read carried exactly the bytes asked for.
//!
//! Both run over in-memory streams (the input is the read half; the
//! replies collect in memory), on in-memory devices, and must finish:
//! a server still running some seconds after its input ended is a hang.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use cowsnap_store::{Origin, SnapshotOptions, Target};
use cowsnap_worker::exports::{Export, Exports};
use cowsnap_worker::nbd::handshake::{MAX_OPTION_LEN, Negotiated, negotiate};
use cowsnap_worker::nbd::proto::{self, Command, RequestHeader};
use cowsnap_worker::nbd::{NbdLimits, Quotas, transmission};
use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;

use crate::memdev;

pub const VOLUME: &str = "volumes/v1";
pub const SNAPSHOT: &str = "volumes/v1/snapshots/s1";
pub const READ_ONLY: &str = "volumes/v1/snapshots/ro";
/// Size of the origin (and of each COW device).
const SIZE: usize = 256 << 10;
const CHUNK_SECTORS: u32 = 8;
/// Longer than any check may take once its input has ended.
const HANG: Duration = Duration::from_secs(20);

/// A volume with one snapshot, exported three ways: the volume, the
/// snapshot writable, and the same snapshot read-only.
pub async fn exports() -> Arc<Exports> {
    let origin = memdev::device("origin", &memdev::image(SIZE));
    let origin = Arc::new(Origin::new(origin).expect("origin"));
    let cow = memdev::device("cow", &memdev::image(SIZE));
    let opts = SnapshotOptions {
        chunk_sectors: Some(CHUNK_SECTORS),
        ..Default::default()
    };
    let snap = origin.add_snapshot(cow, opts).await.expect("snapshot");
    let exports = Exports::new();
    for (name, target, writable) in [
        (VOLUME, Target::Origin, true),
        (SNAPSHOT, Target::Snapshot(snap.id), true),
        (READ_ONLY, Target::Snapshot(snap.id), false),
    ] {
        exports.insert(Export {
            name: name.into(),
            origin: origin.clone(),
            target,
            writable,
            preferred_block_size: CHUNK_SECTORS * 512,
            closed: Default::default(),
        });
    }
    exports
}

/// A writer whose bytes the caller keeps (the transmission phase moves its
/// writer into a task of its own).
#[derive(Clone, Default)]
pub struct Sink(pub Arc<Mutex<Vec<u8>>>);

impl AsyncWrite for Sink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.0.lock().expect("sink").extend_from_slice(b);
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Big-endian reads off the front of a slice; `None` when it is too short.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4")))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8")))
    }
}

/// One option as the client sent it.
struct ClientOption {
    opt: u32,
}

/// The options a server must answer in `input`: the complete ones, up to
/// a malformed one (bad magic, oversized) or the end.
fn client_options(input: &[u8]) -> (bool, Vec<ClientOption>) {
    let mut c = Cursor(input);
    let Some(flags) = c.u32() else {
        return (false, Vec::new());
    };
    let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
    if flags & !known != 0 {
        return (false, Vec::new());
    }
    let mut opts = Vec::new();
    while let (Some(magic), Some(opt), Some(len)) = (c.u64(), c.u32(), c.u32()) {
        if magic != proto::IHAVEOPT || len > MAX_OPTION_LEN || c.take(len as usize).is_none() {
            break;
        }
        opts.push(ClientOption { opt });
    }
    (flags & proto::FLAG_C_NO_ZEROES != 0, opts)
}

/// Checks the server's side of a handshake whose client sent `input`.
pub fn check_handshake(input: &[u8]) {
    thread_local! {
        // The handshake only looks exports up: one table serves every input.
        static EXPORTS: std::cell::OnceCell<Arc<Exports>> = const { std::cell::OnceCell::new() };
    }
    let exports = EXPORTS.with(|e| e.get_or_init(|| crate::block_on(exports())).clone());
    crate::block_on(async {
        let mut out = Vec::new();
        let mut rd = input;
        let conn = tokio::io::join(&mut rd, &mut out);
        let r = tokio::time::timeout(HANG, negotiate(conn, &exports, None, "fuzz"))
            .await
            .expect("the handshake hangs after its input ended");
        let done = matches!(r, Ok(Some(_)));
        judge_handshake(input, &out, done, &exports);
    });
}

fn judge_handshake(input: &[u8], out: &[u8], done: bool, exports: &Exports) {
    let mut s = Cursor(out);
    assert_eq!(s.u64(), Some(proto::NBD_MAGIC), "greeting");
    assert_eq!(s.u64(), Some(proto::IHAVEOPT), "greeting");
    assert!(s.u16().is_some(), "greeting flags");
    let (no_zeroes, opts) = client_options(input);
    let mut finished = false;
    for o in &opts {
        if o.opt == proto::OPT_EXPORT_NAME {
            // Size and flags (and zeroes unless declined), or nothing at all.
            if s.0.is_empty() {
                assert!(!done, "EXPORT_NAME of an unknown export negotiated");
            } else {
                let want = if no_zeroes { 10 } else { 134 };
                assert_eq!(s.0.len(), want, "EXPORT_NAME answer");
                assert!(done, "EXPORT_NAME answered but not negotiated");
                s.take(want);
            }
            finished = true;
            break;
        }
        let (last, export_info) = option_replies(&mut s, o.opt, exports);
        if last == proto::REP_ACK && matches!(o.opt, proto::OPT_GO | proto::OPT_INFO) {
            assert!(export_info, "GO/INFO acknowledged without NBD_INFO_EXPORT");
        }
        // GO acknowledged ends the haggling, as does ABORT.
        if (o.opt == proto::OPT_GO && last == proto::REP_ACK) || o.opt == proto::OPT_ABORT {
            assert_eq!(
                o.opt == proto::OPT_GO,
                done,
                "GO acknowledged but not negotiated"
            );
            finished = true;
            break;
        }
    }
    if !finished {
        assert!(!done, "negotiated without a GO or EXPORT_NAME");
    }
    assert!(
        s.0.is_empty(),
        "{} bytes sent past the last answer",
        s.0.len()
    );
}

/// Parses the replies to one option, up to its final one; returns that
/// one's type and whether an `NBD_INFO_EXPORT` came before it.
fn option_replies(s: &mut Cursor<'_>, opt: u32, exports: &Exports) -> (u32, bool) {
    let mut export_info = false;
    loop {
        let magic = s.u64().unwrap_or_else(|| panic!("option {opt} unanswered"));
        assert_eq!(magic, proto::REPLY_MAGIC, "reply magic");
        assert_eq!(s.u32(), Some(opt), "reply to another option than asked");
        let kind = s.u32().expect("reply type");
        let len = s.u32().expect("reply length");
        let data = s.take(len as usize).expect("reply data cut short");
        match kind {
            proto::REP_SERVER => {
                assert_eq!(opt, proto::OPT_LIST, "REP_SERVER outside LIST");
                let mut d = Cursor(data);
                let n = d.u32().expect("LIST entry name length") as usize;
                let name = d.take(n).expect("LIST entry name");
                let name = std::str::from_utf8(name).expect("LIST name is UTF-8");
                assert!(
                    exports.get(name).is_some(),
                    "LIST names {name:?}, not an export"
                );
            }
            proto::REP_INFO => {
                assert!(
                    matches!(opt, proto::OPT_INFO | proto::OPT_GO),
                    "INFO reply to {opt}"
                );
                let mut d = Cursor(data);
                if d.u16().expect("INFO reply without a type") == proto::INFO_EXPORT {
                    assert_eq!(d.0.len(), 10, "NBD_INFO_EXPORT length");
                    export_info = true;
                }
            }
            proto::REP_ACK => {
                assert!(data.is_empty(), "ACK with data");
                return (kind, export_info);
            }
            k if k & (1 << 31) != 0 => {
                assert!(
                    len as usize <= proto::MAX_STRING,
                    "error message of {len} bytes"
                );
                assert!(std::str::from_utf8(data).is_ok(), "error message not UTF-8");
                return (kind, export_info);
            }
            k => panic!("reply type {k:#x} to option {opt}"),
        }
    }
}

/// The client's half of a good handshake to `name`.
fn hello(name: &str, structured: bool) -> Vec<u8> {
    let mut b = Vec::new();
    proto::put_u32(
        &mut b,
        proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES,
    );
    if structured {
        proto::put_u64(&mut b, proto::IHAVEOPT);
        proto::put_u32(&mut b, proto::OPT_STRUCTURED_REPLY);
        proto::put_u32(&mut b, 0);
    }
    proto::put_u64(&mut b, proto::IHAVEOPT);
    proto::put_u32(&mut b, proto::OPT_GO);
    proto::put_u32(&mut b, 4 + name.len() as u32 + 2);
    proto::put_u32(&mut b, name.len() as u32);
    b.extend_from_slice(name.as_bytes());
    proto::put_u16(&mut b, 0);
    b
}

/// Negotiates a connection as a good client would.
pub async fn connect(exports: &Exports, name: &str, structured: bool) -> Negotiated {
    let hello = hello(name, structured);
    let mut rd = &hello[..];
    let mut sink = Vec::new();
    negotiate(tokio::io::join(&mut rd, &mut sink), exports, None, "fuzz")
        .await
        .expect("good handshake")
        .expect("export exists")
        .0
}

/// Checks the transmission phase under the request stream `input[1..]`.
pub fn check_transmission(input: &[u8]) {
    let Some((&mode, stream)) = input.split_first() else {
        return;
    };
    let structured = mode & 1 != 0;
    let name = [VOLUME, SNAPSHOT, READ_ONLY][usize::from(mode >> 1) % 3];
    crate::block_on(async {
        let exports = exports().await;
        let neg = connect(&exports, name, structured).await;
        let sink = Sink::default();
        let run = transmission::run(
            stream,
            sink.clone(),
            neg,
            "fuzz".into(),
            Quotas::new(NbdLimits::default()),
            CancellationToken::new(),
        );
        let _ = tokio::time::timeout(HANG, run)
            .await
            .expect("the request loop hangs after its input ended");
        let out = sink.0.lock().expect("sink").clone();
        judge_transmission(stream, &out, structured);
    });
}

/// The requests in `input` the server must answer: every complete one up
/// to a disconnect, a bad magic, a write whose payload is cut short, or
/// the end.
fn client_requests(input: &[u8]) -> Vec<RequestHeader> {
    let mut c = Cursor(input);
    let mut reqs = Vec::new();
    while let Some(raw) = c.take(proto::REQUEST_LEN) {
        let Ok(h) = RequestHeader::parse(raw.try_into().expect("28")) else {
            break;
        };
        if h.command == Command::Disconnect {
            break;
        }
        if h.command == Command::Write && c.take(h.length as usize).is_none() {
            break;
        }
        reqs.push(h);
    }
    reqs
}

fn judge_transmission(input: &[u8], out: &[u8], structured: bool) {
    let reqs = client_requests(input);
    // Handle → requests still waiting for their final reply. A client may
    // give several requests one handle; which one a reply answers is then
    // not knowable, and only their count is checked.
    let mut pending: HashMap<u64, Vec<RequestHeader>> = HashMap::new();
    for r in &reqs {
        pending.entry(r.handle).or_default().push(*r);
    }
    let dups: std::collections::HashSet<u64> = pending
        .iter()
        .filter(|(_, w)| w.len() > 1)
        .map(|(h, _)| *h)
        .collect();
    let mut take = |handle: u64| -> Option<RequestHeader> {
        let waiting = pending.get_mut(&handle).unwrap_or_else(|| {
            panic!("reply to handle {handle:#x}, which no request is waiting on")
        });
        let req = waiting.remove(0);
        if waiting.is_empty() {
            pending.remove(&handle);
        }
        (!dups.contains(&handle)).then_some(req)
    };
    let mut s = Cursor(out);
    let mut answered = 0usize;
    while !s.0.is_empty() {
        let magic = s.u32().expect("reply magic");
        match magic {
            proto::SIMPLE_REPLY_MAGIC => {
                let error = s.u32().expect("simple reply error");
                let handle = s.u64().expect("simple reply handle");
                let req = take(handle);
                if structured {
                    // Only successes of other commands than reads.
                    assert_eq!(error, 0, "simple error reply with structured replies on");
                    assert!(
                        req.is_none_or(|r| r.command != Command::Read),
                        "simple reply to a read"
                    );
                } else if error == 0 {
                    let Some(req) = req else {
                        // Whether read data follows is not knowable.
                        return;
                    };
                    if req.command == Command::Read {
                        s.take(req.length as usize).expect("read data cut short");
                    }
                }
                answered += 1;
            }
            proto::STRUCTURED_REPLY_MAGIC => {
                assert!(structured, "structured reply not negotiated");
                let flags = s.u16().expect("chunk flags");
                let kind = s.u16().expect("chunk type");
                let handle = s.u64().expect("chunk handle");
                let len = s.u32().expect("chunk length");
                let data = s.take(len as usize).expect("chunk payload cut short");
                assert!(
                    flags & proto::REPLY_FLAG_DONE != 0,
                    "every reply here is one chunk"
                );
                let req = take(handle);
                match kind {
                    proto::REPLY_TYPE_OFFSET_DATA => {
                        let off = u64::from_be_bytes(data[..8].try_into().expect("offset"));
                        if let Some(req) = req {
                            assert_eq!(req.command, Command::Read, "data chunk for a non-read");
                            assert_eq!(off, req.offset, "data chunk offset");
                            assert_eq!(data.len() - 8, req.length as usize, "data chunk length");
                        }
                    }
                    proto::REPLY_TYPE_ERROR | proto::REPLY_TYPE_ERROR_OFFSET => {
                        let mut d = Cursor(data);
                        assert_ne!(d.u32().expect("error value"), 0, "error chunk with error 0");
                        let n = d.u16().expect("message length") as usize;
                        let msg = d.take(n).expect("message cut short");
                        assert!(std::str::from_utf8(msg).is_ok(), "message not UTF-8");
                        let extra = if kind == proto::REPLY_TYPE_ERROR_OFFSET {
                            8
                        } else {
                            0
                        };
                        assert_eq!(d.0.len(), extra, "error chunk length");
                    }
                    proto::REPLY_TYPE_NONE => {
                        assert!(data.is_empty());
                        assert!(
                            req.is_none_or(|r| r.command == Command::Read),
                            "NONE chunk for a non-read"
                        );
                    }
                    k => panic!("chunk type {k:#x}"),
                }
                answered += 1;
            }
            m => panic!("reply magic {m:#x}"),
        }
    }
    assert_eq!(
        answered,
        reqs.len(),
        "{} requests taken, {answered} answered",
        reqs.len()
    );
}
