//! Where a cowsnap server listens and the bound socket: one [`Listen`]
//! (`host:port` or `unix:PATH`, parsed by one rule) and one [`Bound`] for
//! the gRPC servers, the NBD server and the CSI endpoint, with one policy
//! for a unix socket file already there ([`replace_stale_socket`]): a
//! stale one is replaced, a live one or anything not a socket is left
//! alone and the bind fails, naming it.

use std::fmt;
use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;

/// Where to listen: `host:port` (TCP; port 0 picks a free one) or
/// `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// `host:port`, resolved when binding (`127.0.0.1:10809`, `[::]:50051`,
    /// `localhost:0`).
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(format!(
                    "{s:?}: unix: needs a socket path (unix:/run/cowsnap.sock)"
                ));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!(
                "{s:?}: expected host:port or unix:PATH (e.g. 0.0.0.0:10809)"
            ));
        };
        if host.is_empty() {
            return Err(format!("{s:?}: the host is missing (e.g. 0.0.0.0:{port})"));
        }
        port.parse::<u16>()
            .map_err(|_| format!("{s:?}: {port:?} is not a port number"))?;
        Ok(Listen::Tcp(s.to_string()))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => f.write_str(a),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Makes room for a unix socket at `path` (`what` names the server in
/// errors): nothing there is fine; a socket nobody accepts on (left by a
/// server that is gone) is removed; a live one, or a file that is not a
/// socket, is refused.
pub fn replace_stale_socket(path: &Path, what: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    anyhow::ensure!(
        meta.file_type().is_socket(),
        "{what} {}: exists and is not a socket; not replacing it",
        path.display()
    );
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!(
            "{what} {}: something is serving on it already; not taking it over",
            path.display()
        );
    }
    std::fs::remove_file(path)
        .with_context(|| format!("{what} {}: cannot remove the stale socket", path.display()))?;
    tracing::info!("{what} {}: replaced a stale socket", path.display());
    Ok(())
}

/// The connections a TCP listener accepts, each with `TCP_NODELAY` set.
/// Without it a reply whose frames go out in more than one write (headers,
/// data, trailers) waits in Nagle's algorithm for the client's delayed ACK:
/// about 40 ms per call on Linux (`cowsnap bench api` measured 20 list
/// calls per second from one client). tonic sets it only on listeners it
/// binds itself.
pub fn tcp_incoming(
    l: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(l).map(|s| {
        let s = s?;
        // It fails only on a socket already dead, whose first read fails
        // too: that connection ends there, not the listener.
        if let Err(e) = s.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on an accepted connection: {e}");
        }
        Ok(s)
    })
}

/// A bound listener (bind first, so callers learn the port and fail early
/// on a taken address).
pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    /// Binds a gRPC server's `listen`: a unix socket is the owner's only,
    /// whatever the umask (connecting needs write access, which a usual
    /// umask already leaves to the owner).
    pub async fn bind(listen: &Listen) -> anyhow::Result<Bound> {
        let b = Bound::bind_as(listen, "gRPC").await?;
        if let Bound::Unix(_, p) = &b {
            std::fs::set_permissions(p, Permissions::from_mode(0o600))
                .with_context(|| format!("unix:{}: cannot restrict", p.display()))?;
        }
        Ok(b)
    }

    /// Binds `listen` for server `what` (named in errors), replacing a
    /// stale unix socket ([`replace_stale_socket`]); the socket's mode is
    /// left to the umask.
    pub async fn bind_as(listen: &Listen, what: &str) -> anyhow::Result<Bound> {
        match listen {
            Listen::Tcp(a) => Ok(Bound::Tcp(
                TcpListener::bind(a.as_str())
                    .await
                    .with_context(|| format!("{what}: cannot listen on {a}"))?,
            )),
            Listen::Unix(p) => {
                replace_stale_socket(p, what)?;
                let l = UnixListener::bind(p)
                    .with_context(|| format!("{what}: cannot listen on unix:{}", p.display()))?;
                Ok(Bound::Unix(l, p.clone()))
            }
        }
    }

    /// Where it listens (the real port for `:0`).
    pub fn local(&self) -> Listen {
        match self {
            Bound::Tcp(l) => Listen::Tcp(l.local_addr().map(|a| a.to_string()).unwrap_or_default()),
            Bound::Unix(_, p) => Listen::Unix(p.clone()),
        }
    }

    /// Serves gRPC `router` until `shutdown` is cancelled, then finishes the
    /// calls in flight and removes a unix socket file.
    pub async fn serve(self, router: Router, shutdown: CancellationToken) -> anyhow::Result<()> {
        let stop = async move { shutdown.cancelled().await };
        match self {
            Bound::Tcp(l) => router
                .serve_with_incoming_shutdown(tcp_incoming(l), stop)
                .await
                .context("gRPC server failed"),
            Bound::Unix(l, p) => {
                let r = router
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(l),
                        stop,
                    )
                    .await
                    .context("gRPC server failed");
                let _ = std::fs::remove_file(p);
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_parses_by_one_rule() {
        assert_eq!(
            "127.0.0.1:10809".parse::<Listen>(),
            Ok(Listen::Tcp("127.0.0.1:10809".into()))
        );
        assert_eq!(
            "[::1]:0".parse::<Listen>(),
            Ok(Listen::Tcp("[::1]:0".into()))
        );
        assert_eq!(
            "unix:/run/cowsnap/nbd.sock".parse::<Listen>(),
            Ok(Listen::Unix("/run/cowsnap/nbd.sock".into()))
        );
        for bad in ["unix:", "10809", ":10809", "host:port", "host:70000"] {
            assert!(bad.parse::<Listen>().is_err(), "{bad} parsed");
        }
        for s in ["localhost:0", "unix:/tmp/x.sock"] {
            assert_eq!(s.parse::<Listen>().unwrap().to_string(), s);
        }
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listen = Listen::Unix(path.clone());
        // Stale: bound once, its listener gone.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let live = Bound::bind_as(&listen, "test").await.unwrap();
        // Live: something accepts on it.
        let e = Bound::bind_as(&listen, "test").await.err().unwrap();
        assert!(format!("{e:#}").contains("serving on it already"), "{e:#}");
        drop(live);
        // Not a socket: left alone.
        let file = dir.path().join("data");
        std::fs::write(&file, b"keep").unwrap();
        let e = Bound::bind_as(&Listen::Unix(file.clone()), "test")
            .await
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("not a socket"), "{e:#}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }

    #[tokio::test]
    async fn grpc_sockets_are_the_owners_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let b = Bound::bind(&Listen::Unix(path.clone())).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(b.local(), Listen::Unix(path));
    }
}
