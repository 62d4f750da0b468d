//! A minimal NBD client for the soak: fixed newstyle handshake with
//! `NBD_OPT_GO`, simple replies, one request at a time (READ, WRITE with
//! or without FUA, FLUSH). Every step has a deadline, so a server that
//! stops answering is an error, never a hang.

use std::time::Duration;

use anyhow::bail;
use cowsnap_worker::nbd::proto::{self, Command, RequestHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Longest one step (handshake, request and reply) may take.
const STEP: Duration = Duration::from_secs(30);

pub struct NbdClient {
    rd: BufReader<OwnedReadHalf>,
    wr: BufWriter<OwnedWriteHalf>,
    next_handle: u64,
    pub size: u64,
}

/// Why an NBD step failed: the connection (the worker went away, which a
/// kill does), or the server's answer (which is a finding).
#[derive(Debug)]
pub enum NbdError {
    Connection(String),
    Refused(String),
}

impl std::error::Error for NbdError {}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Connection(s) => write!(f, "connection: {s}"),
            NbdError::Refused(s) => write!(f, "refused: {s}"),
        }
    }
}

fn conn(e: impl std::fmt::Display) -> NbdError {
    NbdError::Connection(e.to_string())
}

async fn step<T>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, NbdError>>,
) -> Result<T, NbdError> {
    tokio::time::timeout(STEP, f).await.unwrap_or_else(|_| {
        Err(NbdError::Connection(format!(
            "{what}: no answer in {STEP:?}"
        )))
    })
}

impl NbdClient {
    /// Connects to `addr` and negotiates export `name`.
    pub async fn connect(addr: &str, name: &str) -> Result<NbdClient, NbdError> {
        step("handshake", async {
            let s = TcpStream::connect(addr).await.map_err(conn)?;
            s.set_nodelay(true).map_err(conn)?;
            let (rd, wr) = s.into_split();
            let mut c = NbdClient {
                rd: BufReader::new(rd),
                wr: BufWriter::new(wr),
                next_handle: 1,
                size: 0,
            };
            c.handshake(name)
                .await
                .map_err(|e| match e.downcast::<NbdError>() {
                    Ok(e) => e,
                    Err(e) => conn(format!("{e:#}")),
                })?;
            Ok(c)
        })
        .await
    }

    async fn handshake(&mut self, name: &str) -> anyhow::Result<()> {
        let magic = self.rd.read_u64().await?;
        let opt = self.rd.read_u64().await?;
        if magic != proto::NBD_MAGIC || opt != proto::IHAVEOPT {
            bail!("not an NBD newstyle server");
        }
        let _flags = self.rd.read_u16().await?;
        let mut b = Vec::new();
        proto::put_u32(
            &mut b,
            proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES,
        );
        proto::put_u64(&mut b, proto::IHAVEOPT);
        proto::put_u32(&mut b, proto::OPT_GO);
        proto::put_u32(&mut b, 4 + name.len() as u32 + 2);
        proto::put_u32(&mut b, name.len() as u32);
        b.extend_from_slice(name.as_bytes());
        proto::put_u16(&mut b, 0);
        self.wr.write_all(&b).await?;
        self.wr.flush().await?;
        loop {
            let magic = self.rd.read_u64().await?;
            let _opt = self.rd.read_u32().await?;
            let kind = self.rd.read_u32().await?;
            let len = self.rd.read_u32().await?;
            if magic != proto::REPLY_MAGIC || len > 64 << 10 {
                bail!("bad option reply");
            }
            let mut data = vec![0u8; len as usize];
            self.rd.read_exact(&mut data).await?;
            match kind {
                proto::REP_ACK => return Ok(()),
                proto::REP_INFO if data.len() >= 10 && data[..2] == [0, 0] => {
                    self.size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                }
                proto::REP_INFO => {}
                k if k & (1 << 31) != 0 => {
                    return Err(NbdError::Refused(format!(
                        "export {name}: {}",
                        String::from_utf8_lossy(&data)
                    ))
                    .into());
                }
                k => bail!("unexpected option reply type {k:#x}"),
            }
        }
    }

    async fn request(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, NbdError> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let cmd = command.name();
        step(cmd, async {
            let h = RequestHeader {
                flags,
                command,
                handle,
                offset,
                length,
            };
            self.wr.write_all(&h.encode()).await.map_err(conn)?;
            self.wr.write_all(payload).await.map_err(conn)?;
            self.wr.flush().await.map_err(conn)?;
            let magic = self.rd.read_u32().await.map_err(conn)?;
            let error = self.rd.read_u32().await.map_err(conn)?;
            let got = self.rd.read_u64().await.map_err(conn)?;
            if magic != proto::SIMPLE_REPLY_MAGIC || got != handle {
                return Err(NbdError::Refused(format!(
                    "{cmd}: bad reply (magic {magic:#x}, handle {got} for {handle})"
                )));
            }
            if error != 0 {
                return Err(NbdError::Refused(format!(
                    "{cmd} at {offset} length {length}: error {error}"
                )));
            }
            let mut data = Vec::new();
            if command == Command::Read {
                data.resize(length as usize, 0);
                self.rd.read_exact(&mut data).await.map_err(conn)?;
            }
            Ok(data)
        })
        .await
    }

    pub async fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        self.request(Command::Read, 0, offset, length, &[]).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let flags = if fua { proto::CMD_FLAG_FUA } else { 0 };
        self.request(Command::Write, flags, offset, data.len() as u32, data)
            .await
            .map(drop)
    }

    pub async fn flush(&mut self) -> Result<(), NbdError> {
        self.request(Command::Flush, 0, 0, 0, &[]).await.map(drop)
    }

    /// Says goodbye (best effort).
    pub async fn close(mut self) {
        let h = RequestHeader {
            flags: 0,
            command: Command::Disconnect,
            handle: 0,
            offset: 0,
            length: 0,
        };
        let _ = self.wr.write_all(&h.encode()).await;
        let _ = self.wr.flush().await;
    }
}

/// Connects, retrying while the server is away (connection errors) until
/// `deadline`; a refusal (no such export) is returned at once.
pub async fn connect_retrying(
    addr: &str,
    name: &str,
    deadline: tokio::time::Instant,
) -> Result<NbdClient, NbdError> {
    loop {
        match NbdClient::connect(addr, name).await {
            Ok(c) => return Ok(c),
            Err(NbdError::Connection(e)) if tokio::time::Instant::now() >= deadline => {
                return Err(NbdError::Connection(format!("{name} at {addr}: {e}")));
            }
            Err(NbdError::Connection(_)) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(refused) => return Err(refused),
        }
    }
}
