//! Turning away a client the server has no room for (over the connection
//! limit), so that it says why instead of hanging or seeing a bare reset.
//!
//! The server greets as usual; every option the client sends is answered
//! `NBD_REP_ERR_POLICY` with the reason as the message (qemu and libnbd
//! print it), `NBD_OPT_ABORT` is acknowledged, and the connection closes
//! after the abort, after `NBD_OPT_EXPORT_NAME` (whose reply cannot carry an
//! error), after [`MAX_OPTIONS`], or at the caller's deadline. A client that
//! is not fixed-newstyle cannot read error replies: it is closed at once.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ConnError;
use super::handshake::MAX_OPTION_LEN;
use super::proto::{self, put_u16, put_u64};

/// Options answered before the connection is closed regardless.
pub const MAX_OPTIONS: usize = 8;

/// Runs the refusal on a connection's halves; `reason` is the message every
/// option gets.
pub async fn refuse<R, W>(rd: &mut R, wr: &mut W, reason: &str) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(18);
    put_u64(&mut out, proto::NBD_MAGIC);
    put_u64(&mut out, proto::IHAVEOPT);
    put_u16(&mut out, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    wr.write_all(&out).await?;
    wr.flush().await?;

    let client_flags = rd.read_u32().await?;
    if client_flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
        return Ok(());
    }
    let reason = proto::truncate(reason, proto::MAX_STRING);
    for _ in 0..MAX_OPTIONS {
        if rd.read_u64().await? != proto::IHAVEOPT {
            return Ok(());
        }
        let opt = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Ok(());
        }
        let skipped =
            tokio::io::copy(&mut (&mut *rd).take(u64::from(len)), &mut tokio::io::sink()).await?;
        if skipped < u64::from(len) {
            return Ok(());
        }
        let mut out = Vec::new();
        match opt {
            proto::OPT_EXPORT_NAME => return Ok(()),
            proto::OPT_ABORT => {
                proto::option_reply(&mut out, opt, proto::REP_ACK, &[]);
                let _ = wr.write_all(&out).await;
                let _ = wr.flush().await;
                return Ok(());
            }
            _ => proto::option_reply(&mut out, opt, proto::REP_ERR_POLICY, reason.as_bytes()),
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
    }
    Ok(())
}
