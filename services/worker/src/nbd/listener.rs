//! Where the NBD server listens, and its accept loop: TCP (`host:port`) or a
//! unix socket (`unix:PATH`), one task per connection within the connection
//! limit (a refusal task for one over it, see [`limits`](super::limits)):
//! handshake, TLS when the client starts it, transmission; and a clean stop
//! on the shutdown token (stop accepting, let every connection finish its
//! in-flight requests, flush and close).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cowsnap_proto::listen::Bound;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::handshake::Transport;
use super::limits::{NbdLimits, Quotas, REFUSAL_TIMEOUT, Slot};
use super::tls::NbdTls;
use super::{ConnError, handshake, refusal, transmission};
use crate::exports::Exports;

pub use cowsnap_proto::listen::Listen;

/// The address a bound server listens on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LocalAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl LocalAddr {
    /// The NBD URI of `export` on this server, as qemu and libnbd take it.
    pub fn uri(&self, export: &str) -> String {
        match self {
            LocalAddr::Tcp(a) => format!("nbd://{a}/{export}"),
            LocalAddr::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
        }
    }
}

impl fmt::Display for LocalAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalAddr::Tcp(a) => write!(f, "{a}"),
            LocalAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How long a client may take from connecting to choosing an export.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A bound NBD server, not yet accepting: bind first to learn the address
/// (port 0), then [`run`](NbdServer::run).
pub struct NbdServer {
    bound: Bound,
    local: LocalAddr,
    quotas: Arc<Quotas>,
    tls: Option<Arc<NbdTls>>,
}

/// Binds `listen` and serves `exports` until `shutdown` is cancelled.
pub async fn serve(
    listen: &Listen,
    exports: Arc<Exports>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    NbdServer::bind(listen).await?.run(exports, shutdown).await
}

impl NbdServer {
    /// Binds the listening socket. A unix socket path left behind by a
    /// server that is gone is replaced; one a live server answers on is not
    /// (`cowsnap_proto::listen::replace_stale_socket`).
    pub async fn bind(listen: &Listen) -> anyhow::Result<NbdServer> {
        let bound = Bound::bind_as(listen, "NBD").await?;
        let local = match &bound {
            Bound::Tcp(l) => LocalAddr::Tcp(l.local_addr().context("NBD: local address")?),
            Bound::Unix(_, path) => LocalAddr::Unix(path.clone()),
        };
        Ok(NbdServer {
            bound,
            local,
            quotas: Quotas::new(NbdLimits::default()),
            tls: None,
        })
    }

    pub fn local_addr(&self) -> &LocalAddr {
        &self.local
    }

    /// Serves within `quotas` (shared with the process's other listeners)
    /// instead of default limits of its own.
    pub fn with_quotas(mut self, quotas: Arc<Quotas>) -> NbdServer {
        self.quotas = quotas;
        self
    }

    /// Offers TLS to clients (`NBD_OPT_STARTTLS`), or requires it, as `tls`
    /// says; `None`: plain text only.
    pub fn with_tls(mut self, tls: Option<NbdTls>) -> NbdServer {
        self.tls = tls.map(Arc::new);
        self
    }

    /// Accepts connections until `shutdown` is cancelled, then waits for
    /// every connection to finish its in-flight requests and close.
    pub async fn run(
        self,
        exports: Arc<Exports>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let tls = match &self.tls {
            None => "plain text only",
            Some(t) if t.required() && t.client_certs() => "TLS required, client certificates",
            Some(t) if t.required() => "TLS required",
            Some(t) if t.client_certs() => "TLS optional, client certificates",
            Some(_) => "TLS optional",
        };
        tracing::info!(listen = %self.local, tls, "NBD server listening on {} ({tls})", self.local);
        let conns = TaskTracker::new();
        let mut next_id: u64 = 0;
        loop {
            let accepted = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                a = accept(&self.bound) => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the
                    // connections there are, try again shortly.
                    let local = &self.local;
                    tracing::warn!(listen = %local, "NBD: accept on {local} failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            next_id += 1;
            let peer = match peer {
                Some(p) => p,
                None => format!("{}#{next_id}", self.local),
            };
            let span = tracing::debug_span!("nbd_conn", peer = %peer);
            let Some(slot) = self.quotas.admit() else {
                // Over the limit: told why when a refusal slot is free,
                // closed at once otherwise.
                if let Some(slot) = self.quotas.refuse(&peer) {
                    let reason = self.quotas.refusal_message();
                    let shutdown = shutdown.clone();
                    match stream {
                        Stream::Tcp(s) => {
                            let (rd, wr) = s.into_split();
                            conns.spawn(turn_away(rd, wr, reason, slot, shutdown).instrument(span));
                        }
                        Stream::Unix(s) => {
                            let (rd, wr) = s.into_split();
                            conns.spawn(turn_away(rd, wr, reason, slot, shutdown).instrument(span));
                        }
                    }
                }
                continue;
            };
            let conn = Conn {
                peer,
                exports: exports.clone(),
                tls: self.tls.clone(),
                quotas: self.quotas.clone(),
                _slot: slot,
                shutdown: shutdown.clone(),
            };
            match stream {
                Stream::Tcp(s) => {
                    let split = tokio::net::TcpStream::into_split;
                    conns.spawn(connection(s, split, conn).instrument(span));
                }
                Stream::Unix(s) => {
                    let split = tokio::net::UnixStream::into_split;
                    conns.spawn(connection(s, split, conn).instrument(span));
                }
            }
        }
        let open = conns.len();
        tracing::info!(
            listen = %self.local,
            connections = open,
            "NBD server stopping: no new connections, finishing {open}"
        );
        drop(self.bound);
        if let LocalAddr::Unix(path) = &self.local {
            let _ = std::fs::remove_file(path);
        }
        conns.close();
        conns.wait().await;
        tracing::info!(listen = %self.local, "NBD server stopped");
        Ok(())
    }
}

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Accepts one connection; the peer's name when it has one.
async fn accept(bound: &Bound) -> std::io::Result<(Stream, Option<String>)> {
    match bound {
        Bound::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            // Replies are small and latency matters: no Nagle.
            s.set_nodelay(true)?;
            Ok((Stream::Tcp(s), Some(addr.to_string())))
        }
        Bound::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            Ok((Stream::Unix(s), None))
        }
    }
}

/// A client over the connection limit: told why, within
/// [`REFUSAL_TIMEOUT`], then closed. `_slot` is its refusal slot.
async fn turn_away<R, W>(
    mut rd: R,
    mut wr: W,
    reason: String,
    _slot: Slot,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {}
        r = tokio::time::timeout(REFUSAL_TIMEOUT, refusal::refuse(&mut rd, &mut wr, &reason)) => {
            if let Ok(Err(e)) = r {
                tracing::debug!(error = %e, "NBD: refused client went away: {e}");
            }
        }
    }
    let _ = wr.shutdown().await;
}

/// What one admitted connection is served with.
struct Conn {
    /// The client's address, or the listener's with a sequence number.
    peer: String,
    exports: Arc<Exports>,
    tls: Option<Arc<NbdTls>>,
    quotas: Arc<Quotas>,
    /// Its place within the connection limit, held until it closes.
    _slot: Slot,
    shutdown: CancellationToken,
}

/// One client, from handshake to close, holding its slot of the connection
/// limit. Never returns an error: how it ended is logged here, and nothing
/// of it reaches other connections. `split` halves a plain stream for
/// transmission (the socket's own halves, no lock between reader and
/// writer); a TLS stream is halved by [`tokio::io::split`].
async fn connection<S, R, W>(stream: S, split: fn(S) -> (R, W), conn: Conn)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Conn {
        peer,
        exports,
        tls,
        quotas,
        _slot,
        shutdown,
    } = conn;
    tracing::debug!(%peer, "NBD connection from {peer}");
    let result = async {
        let negotiated = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
            n = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                handshake::negotiate(stream, &exports, tls.as_deref(), &peer),
            ) => match n {
                Ok(n) => n?,
                Err(_) => {
                    return Err(ConnError::Protocol(format!(
                        "no export chosen within {} s of connecting",
                        HANDSHAKE_TIMEOUT.as_secs()
                    )));
                }
            },
        };
        let Some((negotiated, transport)) = negotiated else {
            return Ok(());
        };
        tracing::debug!(
            %peer,
            export = %negotiated.export.name,
            structured = negotiated.structured,
            tls = matches!(transport, Transport::Tls(_)),
            "NBD client {peer} uses export {}",
            negotiated.export.name
        );
        let peer: Arc<str> = peer.as_str().into();
        match transport {
            Transport::Plain(s) => {
                let (rd, wr) = split(s);
                transmission::run(rd, wr, negotiated, peer, quotas, shutdown).await
            }
            Transport::Tls(s) => {
                let (rd, wr) = tokio::io::split(*s);
                transmission::run(rd, wr, negotiated, peer, quotas, shutdown).await
            }
        }
    }
    .await;
    match result {
        Ok(()) => tracing::debug!(%peer, "NBD connection from {peer} closed"),
        Err(e) if e.is_disconnect() => {
            tracing::debug!(%peer, error = %e, "NBD client {peer} went away: {e}")
        }
        Err(ConnError::Tls(e)) => {
            tracing::warn!(%peer, error = %e, "NBD client {peer}: TLS handshake failed ({e}); connection closed")
        }
        Err(ConnError::Protocol(why)) => {
            tracing::warn!(%peer, "NBD client {peer} broke the protocol ({why}); connection closed")
        }
        Err(e) => tracing::warn!(%peer, error = %e, "NBD connection from {peer} failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let t = LocalAddr::Tcp("127.0.0.1:1234".parse().unwrap());
        assert_eq!(t.uri("volumes/v1"), "nbd://127.0.0.1:1234/volumes/v1");
        let u = LocalAddr::Unix("/tmp/s".into());
        assert_eq!(u.uri("volumes/v1"), "nbd+unix:///volumes/v1?socket=/tmp/s");
    }
}
