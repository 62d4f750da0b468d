//! The transmission phase: the request loop of one connection.
//!
//! One reader (this task) takes requests off the socket, receiving write
//! payloads straight into the [`AlignedBuf`] the engine writes from. The
//! requests then run concurrently, at most [`MAX_IN_FLIGHT`] at a time and
//! [`Quotas::per_connection_bytes`] of buffers, so replies come back in
//! whatever order the engine finishes them. They run inside this task (a
//! set of futures it polls while it waits on the socket), not as a task
//! each: a request's work between its I/Os is short, and a spawn and a
//! cross-thread wake-up per request cost more CPU than it. Every reply goes
//! through one writer task, so replies never interleave and a client that
//! does not read its replies never blocks the reading of its requests.
//!
//! Memory: a read or write takes its length from the process's buffer
//! budget ([`Quotas::reserve`]) before its buffer is allocated, and gives it
//! back only once its reply is written out; the reader waits for it, so a
//! client that stops reading stops being read. A buffer the allocator
//! refuses is an `ENOMEM` reply, never an abort.
//!
//! The connection ends on `NBD_CMD_DISC`, end of file, a protocol error (bad
//! request magic), a failed reply write, the idle timeout (no request in
//! flight and none received for that long, or a reply left untaken for that
//! long), the export being closed (its volume retired), or the shutdown
//! token; in every case the requests already in flight finish and are
//! answered, writes not yet flushed are flushed, then the socket closes.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cowsnap_store::{AlignedBuf, AllocError, Target};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::handshake::Negotiated;
use super::limits::{Budget, Quotas};
use super::proto::{self, Command, RequestHeader};
use super::{ConnError, MAX_IN_FLIGHT, MAX_PAYLOAD};
use crate::exports::Export;

/// Socket read buffer: request headers come through it; write payloads
/// mostly bypass it.
const READ_BUF: usize = 16 << 10;
/// Socket write buffer: small replies are batched in it; read data larger
/// than it goes to the socket directly.
const WRITE_BUF: usize = 64 << 10;
/// Unit of a connection's share of the buffer budget.
const SHARE_UNIT: usize = 64 << 10;
/// How long replies may take to drain to a client once the server is
/// shutting down, before the connection is dropped.
const SHUTDOWN_WRITE_GRACE: Duration = Duration::from_secs(10);

/// What one request produced.
enum Body {
    /// Success without data.
    Done,
    /// Read data for `[offset, offset + buf.len())`.
    Data { offset: u64, buf: AlignedBuf },
    Error {
        errno: u32,
        message: String,
        /// Where it happened, for `NBD_REPLY_TYPE_ERROR_OFFSET`.
        offset: Option<u64>,
    },
}

/// A reply on its way to the writer, with the slot and buffer budget it
/// holds until it is written.
struct Reply {
    handle: u64,
    command: Command,
    body: Body,
    _held: Held,
}

/// What a request holds from admission until its reply is written: its
/// slot among the connection's requests, its bytes of the connection's
/// share and of the process's budget.
struct Held {
    _slot: OwnedSemaphorePermit,
    _share: Option<OwnedSemaphorePermit>,
    _budget: Option<Budget>,
}

/// What every request task of the connection shares.
struct Conn {
    export: Arc<Export>,
    peer: Arc<str>,
    size: u64,
    min_block: u64,
    /// A write completed since the last flush started: flush at close.
    dirty: AtomicBool,
}

/// How the request loop ended without error.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Disconnect,
    Eof,
    Shutdown,
    WriterGone,
    Idle,
    /// The export was closed for good (its volume retired).
    Closed,
}

impl End {
    fn describe(&self) -> &'static str {
        match self {
            End::Disconnect => "the client disconnected (NBD_CMD_DISC)",
            End::Eof => "the client closed the connection",
            End::Shutdown => "the server is shutting down",
            End::WriterGone => "replies could not be written",
            End::Idle => "the connection was idle too long",
            End::Closed => "the export was closed",
        }
    }
}

/// Serves requests on a connection's halves for the negotiated export until the client
/// disconnects or `shutdown` is cancelled.
pub async fn run<R, W>(
    rd: R,
    wr: W,
    negotiated: Negotiated,
    peer: Arc<str>,
    quotas: Arc<Quotas>,
    shutdown: CancellationToken,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut rd = BufReader::with_capacity(READ_BUF, rd);
    let conn = Arc::new(Conn {
        size: negotiated.size,
        min_block: u64::from(negotiated.block.minimum),
        export: negotiated.export,
        peer,
        dirty: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let writer_gone = CancellationToken::new();
    let writer = tokio::spawn(write_replies(
        BufWriter::with_capacity(WRITE_BUF, wr),
        rx,
        negotiated.structured,
        quotas.limits().idle_timeout,
        writer_gone.clone(),
    ));
    let mut running = FuturesUnordered::new();
    let ended = read_requests(
        &mut rd,
        &conn,
        &tx,
        &mut running,
        &quotas,
        &shutdown,
        &writer_gone,
    )
    .await;
    drop(rd);

    // Whatever ended the loop, the requests already taken are answered.
    while running.next().await.is_some() {}
    if conn.dirty.swap(false, Ordering::AcqRel)
        && let Err(e) = conn.export.origin.flush().await
    {
        let (peer, export) = (&conn.peer, &conn.export.name);
        tracing::warn!(
            %peer,
            %export,
            "NBD: flush of {export} at close of the connection from {peer} failed: {e}"
        );
    }
    drop(tx);
    let peer = &conn.peer;
    // A client that stops reading holds only its own connection open, but
    // not past a shutdown.
    let mut writer = writer;
    let grace = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_WRITE_GRACE).await;
    };
    let written = tokio::select! {
        w = &mut writer => w,
        _ = grace => {
            writer.abort();
            tracing::warn!(
                %peer,
                "NBD: client {peer} did not take its last replies during shutdown; dropped"
            );
            return Ok(());
        }
    };
    let written =
        written.unwrap_or_else(|e| Err(std::io::Error::other(format!("reply writer: {e}"))));
    let end = ended?;
    if end == End::Idle {
        let secs = quotas.limits().idle_timeout.unwrap_or_default().as_secs();
        tracing::info!(%peer, "NBD: closed the connection from {peer}: no request for {secs} s");
    } else {
        tracing::debug!(%peer, "NBD transmission with {peer} ended: {}", end.describe());
    }
    written.map_err(ConnError::from)
}

/// A request being served: it ends once its reply is queued for the writer.
type Running = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs the requests in `running` until one ends (never, while none runs).
async fn next_done(running: &mut FuturesUnordered<Running>) {
    if running.next().await.is_none() {
        std::future::pending::<()>().await;
    }
}

/// Awaits `fut` while running the requests in `running`, unless the
/// connection must end first: the server shuts down, the reply writer is
/// gone, or the export is closed (checked in that order, before `fut`).
async fn drive<T>(
    fut: impl Future<Output = T>,
    running: &mut FuturesUnordered<Running>,
    shutdown: &CancellationToken,
    writer_gone: &CancellationToken,
    conn: &Conn,
) -> Result<T, End> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Err(End::Shutdown),
            _ = writer_gone.cancelled() => return Err(End::WriterGone),
            _ = conn.export.closed.cancelled() => return Err(End::Closed),
            _ = next_done(running) => {}
            v = &mut fut => return Ok(v),
        }
    }
}

/// Reads requests and starts each in `running`, which it polls meanwhile,
/// until the connection ends; the requests still running are left there.
async fn read_requests<R>(
    rd: &mut BufReader<R>,
    conn: &Arc<Conn>,
    tx: &mpsc::UnboundedSender<Reply>,
    running: &mut FuturesUnordered<Running>,
    quotas: &Arc<Quotas>,
    shutdown: &CancellationToken,
    writer_gone: &CancellationToken,
) -> Result<End, ConnError>
where
    R: AsyncRead + Unpin,
{
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let share = quotas.per_connection_bytes();
    let shares = Arc::new(Semaphore::new(share / SHARE_UNIT));
    let idle = quotas.limits().idle_timeout;
    loop {
        let mut raw = [0u8; proto::REQUEST_LEN];
        // The next header, or `None` once the connection is idle: nothing
        // received for that long, and nothing in flight (a request not yet
        // answered, or a reply not yet written, keeps it busy).
        let header = async {
            let header = read_header(rd, &mut raw);
            tokio::pin!(header);
            let idle_sleep = sleep_or_never(idle);
            tokio::pin!(idle_sleep);
            loop {
                tokio::select! {
                    biased;
                    r = &mut header => return Some(r),
                    _ = &mut idle_sleep => {
                        idle_sleep.set(sleep_or_never(idle));
                        if slots.available_permits() == MAX_IN_FLIGHT {
                            return None;
                        }
                    }
                }
            }
        };
        let got = match drive(header, running, shutdown, writer_gone, conn).await {
            Ok(Some(r)) => r?,
            Ok(None) => return Ok(End::Idle),
            Err(end) => return Ok(end),
        };
        if !got {
            return Ok(End::Eof);
        }
        let req = RequestHeader::parse(&raw).map_err(|magic| {
            ConnError::Protocol(format!(
                "bad request magic {magic:#010x} (expected {:#010x})",
                proto::REQUEST_MAGIC
            ))
        })?;
        if req.command == Command::Disconnect {
            return Ok(End::Disconnect);
        }

        // Reads and writes hold their buffer's size in the budget.
        let bytes = if req.command.moves_data() && req.length <= MAX_PAYLOAD {
            req.length as usize
        } else {
            0
        };
        let admitted = admit(&slots, &shares, quotas, bytes);
        let (held, fits) = match drive(admitted, running, shutdown, writer_gone, conn).await {
            Ok(h) => h,
            Err(end) => return Ok(end),
        };
        let mut early = None;
        if !fits {
            early = Some(conn.error(
                &req,
                proto::ENOMEM,
                format_args!(
                    "larger than the server's whole buffer budget ({} bytes)",
                    quotas.limits().buffer_budget_bytes
                ),
            ));
        }

        let payload = if req.command == Command::Write {
            let keep = early.is_none() && req.length <= MAX_PAYLOAD;
            let got = {
                let payload = read_payload(rd, req.length, keep);
                tokio::pin!(payload);
                loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(End::Shutdown),
                        _ = next_done(running) => {}
                        p = &mut payload => break p?,
                    }
                }
            };
            match got {
                Payload::Data(buf) => Some(buf),
                Payload::Skipped => None,
                Payload::NoMemory(e) => {
                    early = Some(conn.error(&req, proto::ENOMEM, e));
                    None
                }
            }
        } else {
            None
        };

        let conn = conn.clone();
        let tx = tx.clone();
        running.push(Box::pin(async move {
            let body = match early {
                Some(refused) => refused,
                None => AssertUnwindSafe(execute(&conn, &req, payload))
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|_| {
                        let (peer, export) = (&conn.peer, &conn.export.name);
                        let cmd = req.command.name();
                        tracing::error!(%peer, %export, "NBD: {cmd} request from {peer} panicked");
                        Body::Error {
                            errno: proto::EIO,
                            message: format!("{}: internal error", conn.export.name),
                            offset: None,
                        }
                    }),
            };
            // The writer is gone only when the connection is.
            let _ = tx.send(Reply {
                handle: req.handle,
                command: req.command,
                body,
                _held: held,
            });
        }));
    }
}

/// Sleeps for `d`, or forever without one.
async fn sleep_or_never(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

/// Admits a request of `bytes` of buffers: a slot among the connection's
/// requests, then its bytes of the connection's share, then of the process's
/// budget, waiting for each in turn. `false`: the bytes are more than the
/// whole budget and were not taken (the request is refused).
async fn admit(
    slots: &Arc<Semaphore>,
    shares: &Arc<Semaphore>,
    quotas: &Quotas,
    bytes: usize,
) -> (Held, bool) {
    let slot = slots.clone().acquire_owned().await.expect("never closed");
    let mut held = Held {
        _slot: slot,
        _share: None,
        _budget: None,
    };
    if bytes == 0 {
        return (held, true);
    }
    // At most MAX_PAYLOAD, which every share holds.
    let units = bytes.div_ceil(SHARE_UNIT) as u32;
    held._share = Some(
        shares
            .clone()
            .acquire_many_owned(units)
            .await
            .expect("never closed"),
    );
    match quotas.reserve(bytes).await {
        Some(b) => {
            held._budget = Some(b);
            (held, true)
        }
        None => (held, false),
    }
}

/// Reads one request header; `false` on a clean end of file before it.
async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut R,
    raw: &mut [u8; proto::REQUEST_LEN],
) -> std::io::Result<bool> {
    let mut got = 0;
    while got < raw.len() {
        let n = rd.read(&mut raw[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("connection closed after {got} bytes of a request header"),
            ));
        }
        got += n;
    }
    Ok(true)
}

/// A write payload as received.
enum Payload {
    Data(AlignedBuf),
    /// Read and thrown away: longer than any write may be, or the request
    /// is refused anyway.
    Skipped,
    /// Read and thrown away: the allocator had no buffer for it.
    NoMemory(AllocError),
}

/// Receives a write payload: into an `AlignedBuf` when `keep` (the bytes
/// already buffered are copied, the rest is read straight into it);
/// otherwise, or when no buffer can be allocated, it is read and thrown
/// away so that the next request header is found.
async fn read_payload<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    len: u32,
    keep: bool,
) -> std::io::Result<Payload> {
    if !keep {
        skip(rd, len).await?;
        return Ok(Payload::Skipped);
    }
    // Filled whole below, or dropped with the connection's error.
    let mut buf = match AlignedBuf::try_for_overwrite(len as usize) {
        Ok(b) => b,
        Err(e) => {
            skip(rd, len).await?;
            return Ok(Payload::NoMemory(e));
        }
    };
    let buffered = rd.buffer();
    let n = buffered.len().min(buf.len());
    buf[..n].copy_from_slice(&buffered[..n]);
    rd.consume(n);
    if n < buf.len() {
        rd.get_mut().read_exact(&mut buf[n..]).await?;
    }
    Ok(Payload::Data(buf))
}

/// Reads `len` bytes and throws them away.
async fn skip<R: AsyncRead + Unpin>(rd: &mut BufReader<R>, len: u32) -> std::io::Result<()> {
    let skipped =
        tokio::io::copy(&mut (&mut *rd).take(u64::from(len)), &mut tokio::io::sink()).await?;
    if skipped < u64::from(len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed in the middle of a write payload",
        ));
    }
    Ok(())
}

impl Conn {
    fn error(&self, req: &RequestHeader, errno: u32, why: impl std::fmt::Display) -> Body {
        let message = format!(
            "{}: {} at {} length {}: {why}",
            self.export.name,
            req.command.name(),
            req.offset,
            req.length
        );
        let peer = &self.peer;
        let export = &self.export.name;
        tracing::warn!(%peer, %export, errno, "NBD request from {peer} refused: {message}");
        Body::Error {
            errno,
            message,
            offset: None,
        }
    }

    /// Checks a request against the protocol and the export before it
    /// reaches the engine.
    fn validate(&self, req: &RequestHeader) -> Result<(), Body> {
        let Some(allowed) = req.command.allowed_flags() else {
            return Err(self.error(
                req,
                proto::EINVAL,
                format_args!("unknown command {}", req.command.code()),
            ));
        };
        if req.flags & !allowed != 0 {
            return Err(self.error(
                req,
                proto::EINVAL,
                format_args!(
                    "command flags {:#x} are not supported here",
                    req.flags & !allowed
                ),
            ));
        }
        let writes = req.command.modifies();
        if writes && !self.export.writable {
            return Err(self.error(req, proto::EPERM, "the export is read-only"));
        }
        if writes && self.export.closed.is_cancelled() {
            return Err(self.error(req, proto::ESHUTDOWN, "the export is closed"));
        }
        if req.command == Command::Flush {
            return Ok(());
        }
        let (off, len) = (req.offset, u64::from(req.length));
        if len == 0 {
            return Err(self.error(req, proto::EINVAL, "zero length"));
        }
        if req.command.moves_data() && req.length > MAX_PAYLOAD {
            return Err(self.error(
                req,
                proto::EINVAL,
                format_args!("longer than the maximum of {MAX_PAYLOAD} bytes"),
            ));
        }
        if !off.is_multiple_of(self.min_block) || !len.is_multiple_of(self.min_block) {
            return Err(self.error(
                req,
                proto::EINVAL,
                format_args!("not aligned to the minimum block size {}", self.min_block),
            ));
        }
        // Within the size negotiated, or the export's size now: a volume
        // grown online serves its new bytes to connections opened before
        // (a kernel NBD device is resized in place). Exports never shrink.
        if off
            .checked_add(len)
            .is_none_or(|end| end > self.size && end > self.export.size())
        {
            let errno = if matches!(req.command, Command::Write | Command::WriteZeroes) {
                proto::ENOSPC
            } else {
                proto::EINVAL
            };
            return Err(self.error(
                req,
                errno,
                format_args!(
                    "beyond the end of the export ({} bytes)",
                    self.size.max(self.export.size())
                ),
            ));
        }
        Ok(())
    }

    /// The reply to a request the engine failed.
    fn engine_error(&self, req: &RequestHeader, e: cowsnap_store::Error) -> Body {
        let errno = proto::nbd_errno(e.errno());
        let request = format!(
            "{}: {} at {} length {}",
            self.export.name,
            req.command.name(),
            req.offset,
            req.length
        );
        let peer = &self.peer;
        let export = &self.export.name;
        tracing::warn!(%peer, %export, errno, "NBD request from {peer} failed: {request}: {e}");
        // The client's message names no server path (the log line does).
        let message = format!("{request}: {}", e.client_message());
        // Where the I/O failed, when the engine says so in export terms (an
        // origin device offset); otherwise the request's start, which makes
        // no claim that any part of it succeeded.
        let offset = match req.command {
            Command::Read | Command::Write | Command::Trim => {
                let end = req.offset + u64::from(req.length);
                let at = match (&e, self.export.target) {
                    (cowsnap_store::Error::Io { device, offset, .. }, Target::Origin)
                        if device == self.export.origin.device().name()
                            && (req.offset..end).contains(offset) =>
                    {
                        *offset
                    }
                    _ => req.offset,
                };
                Some(at)
            }
            _ => None,
        };
        Body::Error {
            errno,
            message,
            offset,
        }
    }
}

/// Runs one request on the engine.
async fn execute(conn: &Conn, req: &RequestHeader, payload: Option<AlignedBuf>) -> Body {
    if let Err(refused) = conn.validate(req) {
        return refused;
    }
    let export = &conn.export;
    let (t, off, len) = (export.target, req.offset, u64::from(req.length));
    let fua = req.flags & proto::CMD_FLAG_FUA != 0;
    let done = match req.command {
        Command::Read => {
            return match export.origin.read(t, off, len).await {
                Ok(buf) => Body::Data { offset: off, buf },
                Err(e) => conn.engine_error(req, e),
            };
        }
        Command::Write => match payload {
            Some(buf) => export.origin.write(t, off, buf, fua).await,
            None => return conn.error(req, proto::EINVAL, "no payload"),
        },
        Command::WriteZeroes => export.origin.write_zeroes(t, off, len, fua).await,
        // The engine's discard writes nothing, so FUA has nothing to do.
        Command::Trim => export.origin.discard(t, off, len).await,
        Command::Flush => {
            // Writes that complete from here on mark the connection dirty
            // again; the ones before are covered by this flush.
            let was = conn.dirty.swap(false, Ordering::AcqRel);
            let r = export.origin.flush().await;
            if r.is_err() && was {
                conn.dirty.store(true, Ordering::Release);
            }
            r
        }
        // Never reached: `validate` refuses every command without allowed
        // flags, and the reader ends the connection on a disconnect.
        Command::Disconnect | Command::Unknown(_) => {
            return conn.error(req, proto::EINVAL, "not a command to run");
        }
    };
    match done {
        Ok(()) => {
            // A write that is not yet durable: flush it at close at the
            // latest.
            if matches!(req.command, Command::Write | Command::WriteZeroes) && !fua {
                conn.dirty.store(true, Ordering::Release);
            }
            Body::Done
        }
        Err(e) => conn.engine_error(req, e),
    }
}

/// The one writer of a connection's replies: batches small replies, flushes
/// when no more are queued. On a write error, or when the client leaves a
/// reply untaken for `stall` (the idle timeout), it signals `gone` and
/// stops; the replies still queued are dropped with the budget they hold.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    structured: bool,
    stall: Option<Duration>,
    gone: CancellationToken,
) -> std::io::Result<()> {
    let r = async {
        // Reply headers are built here, one at a time.
        let mut head = Vec::with_capacity(64);
        while let Some(reply) = rx.recv().await {
            unstalled(stall, write_reply(&mut w, &mut head, reply, structured)).await?;
            while let Ok(reply) = rx.try_recv() {
                unstalled(stall, write_reply(&mut w, &mut head, reply, structured)).await?;
            }
            unstalled(stall, w.flush()).await?;
        }
        unstalled(stall, w.shutdown()).await
    }
    .await;
    if r.is_err() {
        gone.cancel();
    }
    r
}

/// A reply write, failed with `TimedOut` when it takes longer than
/// `stall`: the client is not reading.
async fn unstalled(
    stall: Option<Duration>,
    write: impl Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    let Some(limit) = stall else {
        return write.await;
    };
    tokio::time::timeout(limit, write)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client took no reply for {} s", limit.as_secs()),
            ))
        })
}

async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut BufWriter<W>,
    head: &mut Vec<u8>,
    reply: Reply,
    structured: bool,
) -> std::io::Result<()> {
    let h = reply.handle;
    if !structured {
        return match reply.body {
            Body::Done => w.write_all(&proto::simple_reply(0, h)).await,
            Body::Error { errno, .. } => w.write_all(&proto::simple_reply(errno, h)).await,
            Body::Data { buf, .. } => {
                w.write_all(&proto::simple_reply(0, h)).await?;
                w.write_all(&buf).await
            }
        };
    }
    head.clear();
    match reply.body {
        // Only reads must be answered with a structured reply; a simple one
        // is shorter for the rest.
        Body::Done if reply.command != Command::Read => {
            w.write_all(&proto::simple_reply(0, h)).await
        }
        Body::Done => {
            proto::structured_header(head, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, h, 0);
            w.write_all(head).await
        }
        Body::Error {
            errno,
            message,
            offset,
        } => {
            proto::structured_error(head, h, errno, &message, offset);
            w.write_all(head).await
        }
        Body::Data { offset, buf } => {
            // The data is all in hand: the one chunk is also the last.
            proto::structured_header(
                head,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                h,
                8 + buf.len() as u32,
            );
            proto::put_u64(head, offset);
            w.write_all(head).await?;
            w.write_all(&buf).await
        }
    }
}
