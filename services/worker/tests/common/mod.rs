//! Helpers for the NBD server's tests: a server running in-process on real
//! sockets over the engine on real files (under the target dir: `O_DIRECT`
//! does not work on tmpfs), a model of what each export holds, and a small
//! blocking NBD client written from the protocol spec (its constants are
//! spelled out here, not taken from the server, so the two check each
//! other), over plain TCP or over TLS after `NBD_OPT_STARTTLS`; [`pki`]
//! makes the certificates.

#![allow(dead_code)]

pub mod pki;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use cowsnap_store::{Backend, Origin, SnapId, SnapshotOptions, Target};
use cowsnap_worker::exports::{Export, Exports};
use cowsnap_worker::nbd::{Listen, LocalAddr, NbdLimits, NbdServer, NbdTls, Quotas};
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

pub const VOLUME: &str = "volumes/v1";
pub const SNAPSHOT: &str = "volumes/v1/snapshots/s1";
/// The test volume's size.
pub const SIZE: u64 = 4 << 20;
/// Chunk size of the snapshot (8 sectors), advertised as preferred block size.
pub const CHUNK: u32 = 4096;

/// A scratch directory under the target dir (on disk), removed when dropped.
pub fn scratch() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// Deterministic pseudo-random bytes (splitmix64).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5851_f42d_4c95_7f2d;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Logs into the test's captured output (shown when it fails): warnings by
/// default, `RUST_LOG` to see more.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The NBD server on a TCP port and a unix socket, serving a volume
/// (`volumes/v1`, writable, filled with `pattern(SIZE, 1)`) and a snapshot
/// of it taken at once (`volumes/v1/snapshots/s1`, read-only).
pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
    pub tcp: SocketAddr,
    pub unix: PathBuf,
    pub exports: Arc<Exports>,
    pub origin: Arc<Origin>,
    pub snap: SnapId,
    pub origin_path: PathBuf,
    /// What the snapshot holds: the volume as it was when taken.
    pub snapshot_model: Vec<u8>,
    /// The limits both servers share.
    pub quotas: Arc<Quotas>,
    shutdown: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Harness {
    pub fn start() -> Harness {
        Harness::start_full(NbdLimits::default(), None)
    }

    /// Starts both servers sharing `limits` (not checked: a test may set a
    /// budget below the largest request).
    pub fn start_with(limits: NbdLimits) -> Harness {
        Harness::start_full(limits, None)
    }

    /// Both servers offer (or require) TLS as `tls` says.
    pub fn start_with_tls(tls: Option<NbdTls>) -> Harness {
        Harness::start_full(NbdLimits::default(), tls)
    }

    fn start_full(limits: NbdLimits, tls: Option<NbdTls>) -> Harness {
        init_logs();
        let quotas = Quotas::new(limits);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = scratch();
        let origin_path = dir.path().join("origin.img");
        let cow_path = dir.path().join("s1.cow");
        let content = pattern(SIZE as usize, 1);
        std::fs::write(&origin_path, &content).unwrap();
        std::fs::File::create(&cow_path)
            .unwrap()
            .set_len(2 * SIZE)
            .unwrap();
        let unix = dir.path().join("nbd.sock");
        let shutdown = CancellationToken::new();
        let (origin, snap, exports, tcp, servers) = rt.block_on(async {
            let backend = Backend::from_env();
            let origin = Arc::new(Origin::new(backend.open(&origin_path, true).unwrap()).unwrap());
            let added = origin
                .add_snapshot(
                    backend.open(&cow_path, true).unwrap(),
                    SnapshotOptions {
                        chunk_sectors: Some(CHUNK / 512),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            let exports = Exports::new();
            exports.insert(Export {
                name: VOLUME.into(),
                origin: origin.clone(),
                target: Target::Origin,
                writable: true,
                preferred_block_size: CHUNK,
                closed: Default::default(),
            });
            exports.insert(Export {
                name: SNAPSHOT.into(),
                origin: origin.clone(),
                target: Target::Snapshot(added.id),
                writable: false,
                preferred_block_size: CHUNK,
                closed: Default::default(),
            });
            let tcp_server = NbdServer::bind(&"127.0.0.1:0".parse::<Listen>().unwrap())
                .await
                .unwrap()
                .with_quotas(quotas.clone())
                .with_tls(tls.clone());
            let LocalAddr::Tcp(tcp) = tcp_server.local_addr().clone() else {
                panic!("TCP listener has a TCP address");
            };
            let unix_server = NbdServer::bind(&Listen::Unix(unix.clone()))
                .await
                .unwrap()
                .with_quotas(quotas.clone())
                .with_tls(tls);
            let servers = vec![
                tokio::spawn(tcp_server.run(exports.clone(), shutdown.clone())),
                tokio::spawn(unix_server.run(exports.clone(), shutdown.clone())),
            ];
            (origin, added.id, exports, tcp, servers)
        });
        Harness {
            rt,
            dir,
            tcp,
            unix,
            exports,
            origin,
            snap,
            origin_path,
            snapshot_model: content,
            quotas,
            shutdown,
            servers,
        }
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix.display())
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// What the engine reads from `target` (not through NBD).
    pub fn engine_read(&self, target: Target, off: u64, len: u64) -> Vec<u8> {
        self.rt
            .block_on(self.origin.read(target, off, len))
            .unwrap()
            .to_vec()
    }

    pub fn min_block(&self) -> u64 {
        self.origin.block_size()
    }

    /// Cancels the shutdown token and waits for both servers; asserts that
    /// they stopped cleanly.
    pub fn stop(mut self) {
        self.shutdown.cancel();
        let servers = std::mem::take(&mut self.servers);
        self.rt.block_on(async {
            for s in servers {
                s.await.unwrap().unwrap();
            }
        });
    }

    pub fn cancel(&self) {
        self.shutdown.cancel();
    }

    /// Waits for both servers after [`cancel`](Self::cancel).
    pub fn join_servers(&mut self) -> Vec<anyhow::Result<()>> {
        let servers = std::mem::take(&mut self.servers);
        self.rt.block_on(async {
            let mut out = Vec::new();
            for s in servers {
                out.push(s.await.unwrap());
            }
            out
        })
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs a client tool; panics with a hint when it is not installed.
pub fn run_tool(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {program} ({e}): install qemu-utils and libnbd-bin \
                 (apt-get install qemu-utils libnbd-bin)"
            )
        })
}

/// Asserts a tool succeeded; returns its stdout.
pub fn ok(out: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed ({})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

// ---------------------------------------------------------------------------
// A small blocking NBD client, from the protocol spec.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const C_FIXED_NEWSTYLE: u32 = 1;
pub const C_NO_ZEROES: u32 = 2;

pub const HAS_FLAGS: u16 = 1 << 0;
pub const READ_ONLY: u16 = 1 << 1;
pub const SEND_FLUSH: u16 = 1 << 2;
pub const SEND_FUA: u16 = 1 << 3;
pub const SEND_TRIM: u16 = 1 << 5;
pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const CAN_MULTI_CONN: u16 = 1 << 8;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;
pub const FLAG_DF: u16 = 4;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const TYPE_NONE: u16 = 0;
pub const TYPE_OFFSET_DATA: u16 = 1;
pub const TYPE_ERROR: u16 = 0x8001;
pub const TYPE_ERROR_OFFSET: u16 = 0x8002;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// What `NBD_OPT_GO`/`INFO` told about an export.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub block: Option<(u32, u32, u32)>,
    pub name: Option<String>,
    pub description: Option<String>,
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub opt: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// A reply in the transmission phase, reassembled.
#[derive(Debug, Default)]
pub struct Reply {
    pub handle: u64,
    /// 0 on success.
    pub error: u32,
    /// Read data, by offset (structured) or at 0 (simple).
    pub data: Vec<(u64, Vec<u8>)>,
    /// Chunk types seen (structured replies).
    pub chunks: Vec<u16>,
    pub error_offset: Option<u64>,
    pub message: String,
    pub structured: bool,
}

/// A connection speaking NBD: over plain TCP, or over TLS after
/// [`starttls`](Client::starttls).
pub struct Client<S = TcpStream> {
    pub s: S,
    pub structured: bool,
}

/// A client's stream once it started TLS.
pub type TlsConn = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        // A safety net against a hung server, not a timing assertion.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            s,
            structured: false,
        }
    }

    /// Greeting plus fixed-newstyle, no-zeroes client flags.
    pub fn start(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr);
        let f = c.greeting();
        assert_eq!(f, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.client_flags(C_FIXED_NEWSTYLE | C_NO_ZEROES);
        c
    }

    pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Full handshake into transmission on `name`.
    pub fn open(addr: SocketAddr, name: &str, structured: bool) -> (Client, ExportInfo) {
        let mut c = Client::start(addr);
        if structured {
            c.option(OPT_STRUCTURED_REPLY, &[]);
            let r = c.opt_reply();
            assert_eq!(r.kind, REP_ACK);
            c.structured = true;
        }
        let info = c
            .info_or_go(OPT_GO, name)
            .unwrap_or_else(|e| panic!("GO {name} failed: {e:?}"));
        (c, info)
    }

    pub fn shutdown_write(&mut self) {
        let _ = self.s.shutdown(Shutdown::Write);
    }

    /// Sends `NBD_OPT_STARTTLS`, expects `NBD_REP_ACK`, and runs the TLS
    /// handshake as `config` says (server name `localhost`). `Err`: the
    /// handshake failed. Nothing negotiated before carries over.
    pub fn starttls(
        mut self,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> std::io::Result<Client<TlsConn>> {
        self.option(OPT_STARTTLS, &[]);
        let r = self.opt_reply();
        assert_eq!((r.opt, r.kind), (OPT_STARTTLS, REP_ACK), "STARTTLS refused");
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut s = rustls::StreamOwned::new(conn, self.s);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock)?;
        }
        Ok(Client {
            s,
            structured: false,
        })
    }
}

impl<S: Read + Write> Client<S> {
    pub fn write(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Writes, tolerating a server that already closed the connection.
    pub fn try_write(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read_exact(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read_exact(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read_exact(8).try_into().unwrap())
    }

    /// Reads the server's greeting; returns its handshake flags.
    pub fn greeting(&mut self) -> u16 {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        self.u16()
    }

    pub fn client_flags(&mut self, flags: u32) {
        self.write(&flags.to_be_bytes());
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.write(&b);
    }

    pub fn opt_reply(&mut self) -> OptReply {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        let opt = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        let data = self.read_exact(len);
        OptReply { opt, kind, data }
    }

    /// Sends `NBD_OPT_INFO` or `GO` and collects the replies; `Err` is the
    /// final error reply.
    pub fn info_or_go(&mut self, opt: u32, name: &str) -> Result<ExportInfo, OptReply> {
        self.option(
            opt,
            &Client::go_data(name, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
        );
        let mut info = ExportInfo::default();
        loop {
            let r = self.opt_reply();
            assert_eq!(r.opt, opt);
            match r.kind {
                REP_ACK => return Ok(info),
                REP_INFO => {
                    let kind = u16::from_be_bytes([r.data[0], r.data[1]]);
                    let d = &r.data[2..];
                    match kind {
                        INFO_EXPORT => {
                            assert_eq!(d.len(), 10);
                            info.size = u64::from_be_bytes(d[0..8].try_into().unwrap());
                            info.flags = u16::from_be_bytes(d[8..10].try_into().unwrap());
                        }
                        INFO_NAME => info.name = Some(String::from_utf8(d.to_vec()).unwrap()),
                        INFO_DESCRIPTION => {
                            info.description = Some(String::from_utf8(d.to_vec()).unwrap())
                        }
                        INFO_BLOCK_SIZE => {
                            assert_eq!(d.len(), 12);
                            let g = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                            info.block = Some((g(0), g(4), g(8)));
                        }
                        _ => {}
                    }
                }
                k if k & 0x8000_0000 != 0 => return Err(r),
                k => panic!("unexpected option reply type {k:#x}"),
            }
        }
    }

    pub fn request(
        &mut self,
        flags: u16,
        kind: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.write(&b);
    }

    /// Reads one whole reply. `read_lens` gives the length of every read
    /// request in flight by handle (a simple reply carries no length).
    pub fn reply(&mut self, read_lens: &HashMap<u64, u32>) -> Reply {
        let magic = self.u32();
        if magic == SIMPLE_REPLY_MAGIC {
            let error = self.u32();
            let handle = self.u64();
            let mut r = Reply {
                handle,
                error,
                ..Default::default()
            };
            if error == 0
                && let Some(&len) = read_lens.get(&handle)
            {
                r.data.push((0, self.read_exact(len as usize)));
            }
            return r;
        }
        assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
        let mut r = Reply {
            structured: true,
            ..Default::default()
        };
        let mut first = true;
        loop {
            if !first {
                assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC, "chunk magic");
            }
            first = false;
            let flags = self.u16();
            let kind = self.u16();
            let handle = self.u64();
            let len = self.u32() as usize;
            r.handle = handle;
            r.chunks.push(kind);
            let payload = self.read_exact(len);
            match kind {
                TYPE_NONE => assert_eq!(len, 0),
                TYPE_OFFSET_DATA => {
                    let off = u64::from_be_bytes(payload[0..8].try_into().unwrap());
                    r.data.push((off, payload[8..].to_vec()));
                }
                TYPE_ERROR | TYPE_ERROR_OFFSET => {
                    r.error = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                    let mlen = u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
                    r.message = String::from_utf8(payload[6..6 + mlen].to_vec()).unwrap();
                    if kind == TYPE_ERROR_OFFSET {
                        assert_eq!(payload.len(), 6 + mlen + 8);
                        r.error_offset =
                            Some(u64::from_be_bytes(payload[6 + mlen..].try_into().unwrap()));
                    } else {
                        assert_eq!(payload.len(), 6 + mlen);
                    }
                }
                other => panic!("unexpected chunk type {other:#x}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return r;
            }
        }
    }

    /// One request and its reply.
    pub fn call(&mut self, flags: u16, kind: u16, offset: u64, len: u32, payload: &[u8]) -> Reply {
        let handle = 0xfeed_0000 + u64::from(kind);
        self.request(flags, kind, handle, offset, len, payload);
        let mut lens = HashMap::new();
        if kind == CMD_READ {
            lens.insert(handle, len);
        }
        let r = self.reply(&lens);
        assert_eq!(r.handle, handle);
        r
    }

    /// Reads `len` bytes at `offset`; panics on error.
    pub fn read_ok(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let r = self.call(0, CMD_READ, offset, len, &[]);
        assert_eq!(r.error, 0, "read at {offset} length {len}: {}", r.message);
        assemble(&r, offset, len)
    }

    pub fn write_ok(&mut self, offset: u64, data: &[u8]) {
        let r = self.call(0, CMD_WRITE, offset, data.len() as u32, data);
        assert_eq!(r.error, 0, "write at {offset}: {}", r.message);
    }

    /// Whether the server closed the connection (end of file or reset)
    /// before sending anything more.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
            ),
        }
    }
}

/// The bytes of a read reply, checked to cover `[offset, offset+len)`
/// exactly once.
pub fn assemble(r: &Reply, offset: u64, len: u32) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    let mut covered = 0usize;
    for (off, d) in &r.data {
        let at = if r.structured { off - offset } else { 0 };
        out[at as usize..at as usize + d.len()].copy_from_slice(d);
        covered += d.len();
    }
    assert_eq!(covered, len as usize, "read reply covers the request");
    out
}

pub fn file_bytes(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let all = std::fs::read(path).unwrap();
    all[off as usize..off as usize + len].to_vec()
}
