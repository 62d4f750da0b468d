//! What every cowsnap gRPC server shares: where it listens (`host:port` or
//! `unix:PATH`), TLS certificates ([`TlsFiles`]: the server side and the
//! client side of mTLS between the control service and its workers),
//! server reflection (both `grpc.reflection.v1` and `v1alpha`: grpcurl 1.8
//! asks for the latter) and `grpc.health.v1`; and files only their owner
//! may read ([`private_dir`], [`private_file`]): volume data, the catalog,
//! sockets, and a warning for secrets others can read.

use std::fs::{OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Router;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// PEM files for TLS: this process's certificate and key (its server
/// identity, and its client identity towards peers), and the CA peers'
/// certificates are checked against.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
}

fn read_pem(p: &PathBuf, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("{}: cannot read the {what}", p.display()))
}

impl TlsFiles {
    fn identity(&self) -> anyhow::Result<Identity> {
        warn_if_open_to_others(&self.key, "TLS private key");
        Ok(Identity::from_pem(
            read_pem(&self.cert, "TLS certificate")?,
            read_pem(&self.key, "TLS key")?,
        ))
    }

    fn ca_cert(&self) -> anyhow::Result<Option<Certificate>> {
        self.ca
            .as_ref()
            .map(|ca| Ok(Certificate::from_pem(read_pem(ca, "TLS CA")?)))
            .transpose()
    }

    /// The server side: our certificate; with a CA, callers' client
    /// certificates are checked against it, and required when
    /// `require_client_cert` (a worker only talks to control services that
    /// hold a certificate from that CA: mTLS).
    pub fn server(&self, require_client_cert: bool) -> anyhow::Result<ServerTlsConfig> {
        let mut cfg = ServerTlsConfig::new().identity(self.identity()?);
        if let Some(ca) = self.ca_cert()? {
            cfg = cfg
                .client_ca_root(ca)
                .client_auth_optional(!require_client_cert);
        }
        Ok(cfg)
    }

    /// The client side: our certificate as the client identity, and the CA
    /// servers' certificates are checked against.
    pub fn client(&self) -> anyhow::Result<ClientTlsConfig> {
        let mut cfg = ClientTlsConfig::new().identity(self.identity()?);
        if let Some(ca) = self.ca_cert()? {
            cfg = cfg.ca_certificate(ca);
        }
        Ok(cfg)
    }
}

/// A listening address: TCP `host:port`, or a unix socket `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path (unix:/run/cowsnap.sock)".into());
            }
            return Ok(Listen::Unix(PathBuf::from(p)));
        }
        if !s.contains(':') {
            return Err(format!("{s:?} is not host:port or unix:PATH"));
        }
        Ok(Listen::Tcp(s.to_string()))
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// The reflection services (v1 and v1alpha) over every cowsnap descriptor,
/// the health service's and the `google.rpc` status details', plus a health reporter already serving.
/// Reflection lists `services` (the full names of what the server serves),
/// health and reflection itself, not every service the descriptors hold.
pub fn reflection_and_health(
    services: &[&str],
) -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
)> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc.BadRequest and the other status details, so that
            // reflection clients (grpcurl) can print an error's details.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            );
        for s in services.iter().copied().chain([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]) {
            b = b.with_service_name(s);
        }
        b
    };
    let v1 = builder().build_v1()?;
    let v1alpha = builder().build_v1alpha()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    Ok((v1, v1alpha, reporter, health))
}

/// The connections a TCP listener accepts, each with `TCP_NODELAY` set.
/// Without it a reply whose frames go out in more than one write (headers,
/// data, trailers) waits in Nagle's algorithm for the client's delayed ACK:
/// about 40 ms per call on Linux (`cowsnap bench api` measured 20 list
/// calls per second from one client). tonic sets it only on listeners it
/// binds itself.
pub fn tcp_incoming(
    l: tokio::net::TcpListener,
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

/// A bound gRPC listener (bind first, so callers learn the port and fail
/// early on a taken address).
pub enum Bound {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl Bound {
    pub async fn bind(listen: &Listen) -> anyhow::Result<Bound> {
        match listen {
            Listen::Tcp(a) => Ok(Bound::Tcp(
                tokio::net::TcpListener::bind(a)
                    .await
                    .with_context(|| format!("cannot listen on {a}"))?,
            )),
            Listen::Unix(p) => {
                // A stale socket from a previous run is replaced.
                if std::os::unix::net::UnixStream::connect(p).is_err() {
                    let _ = std::fs::remove_file(p);
                }
                let l = tokio::net::UnixListener::bind(p)
                    .with_context(|| format!("cannot listen on unix:{}", p.display()))?;
                // Owner only, whatever the umask (connecting needs write
                // access, which a usual umask already leaves to the owner).
                std::fs::set_permissions(p, Permissions::from_mode(0o600))
                    .with_context(|| format!("unix:{}: cannot restrict", p.display()))?;
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

    /// Serves `router` until `shutdown` is cancelled, then finishes the calls
    /// in flight.
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

/// The longest status message a cowsnap server sends, in bytes: whatever
/// an error quotes, a client gets a short `grpc-message` (gRPC C-core
/// clients reject large ones as RESOURCE_EXHAUSTED).
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// `message` cut to at most [`MAX_STATUS_MESSAGE`] bytes, at a character
/// boundary, ending with `…` when cut. Every status a server builds from an
/// error goes through here.
pub fn status_message(mut message: String) -> String {
    if message.len() > MAX_STATUS_MESSAGE {
        let mut cut = MAX_STATUS_MESSAGE - '…'.len_utf8();
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

// ---- files only their owner reads ---------------------------------------

/// Creates `dir` and its missing parents with mode 0700 whatever the umask,
/// and takes the group and other bits off it if it exists and this user
/// owns it: volume data, labels and sockets live in such directories.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("{}: cannot create", dir.display()))?;
    restrict(dir)
}

/// Options that create a file with mode 0600 whatever the umask (add the
/// access wanted). An existing file keeps its mode: see [`restrict`].
pub fn private_file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

/// Creates `path` empty with mode 0600 if it is missing; an existing one
/// this user owns loses its group and other bits (its content stays).
pub fn private_file(path: &Path) -> anyhow::Result<()> {
    private_file_options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot create", path.display()))?;
    restrict(path)
}

/// Takes the group and other permission bits off `path` if this user owns
/// it (someone else's file or directory is left as it is).
pub fn restrict(path: &Path) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot stat", path.display()))?;
    let mode = meta.mode() & 0o7777;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() == me && mode & 0o077 != 0 {
        std::fs::set_permissions(path, Permissions::from_mode(mode & !0o077))
            .with_context(|| format!("{}: cannot restrict to its owner", path.display()))?;
    }
    Ok(())
}

/// Logs a warning when users other than its owner may read or change the
/// file holding a secret (`what`: "auth token", "TLS private key"); the
/// file is still used. Returns whether it warned.
pub fn warn_if_open_to_others(path: &Path, what: &str) -> bool {
    match std::fs::metadata(path) {
        Ok(m) if m.mode() & 0o077 != 0 => {
            tracing::warn!(
                file = %path.display(),
                "{}: the {what} file is open to other users (mode {:04o}); \
                 `chmod 600` it so that only its owner reads it",
                path.display(),
                m.mode() & 0o7777
            );
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn private_dirs_and_files_whatever_the_umask() {
        let tmp = tempfile::tempdir().unwrap();
        // An existing directory and file open to everyone are narrowed.
        let open_dir = tmp.path().join("open");
        std::fs::create_dir(&open_dir).unwrap();
        std::fs::set_permissions(&open_dir, Permissions::from_mode(0o777)).unwrap();
        private_dir(&open_dir).unwrap();
        assert_eq!(mode(&open_dir), 0o700);
        let f = open_dir.join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o666)).unwrap();
        private_file(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        assert_eq!(std::fs::read(&f).unwrap(), b"x", "content kept");
        // New ones: 0700 and 0600 (the umask only removes bits).
        let nested = tmp.path().join("a/b/c");
        private_dir(&nested).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&tmp.path().join(d)), 0o700, "{d}");
        }
        let g = nested.join("g");
        private_file(&g).unwrap();
        assert_eq!(mode(&g), 0o600);
        let h = nested.join("h");
        private_file_options()
            .create(true)
            .write(true)
            .open(&h)
            .unwrap();
        assert_eq!(mode(&h), 0o600);
    }

    #[test]
    fn status_messages_are_capped() {
        assert_eq!(status_message("short".into()), "short");
        for unit in ["x", "é", "€", "😀"] {
            let m = status_message(unit.repeat(5000));
            assert!(m.len() <= MAX_STATUS_MESSAGE, "{unit}: {}", m.len());
            assert!(m.len() > MAX_STATUS_MESSAGE - 8, "{unit}: {}", m.len());
            assert!(m.ends_with('…'));
        }
    }

    #[test]
    fn secrets_open_to_others_are_flagged() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().join("token");
        std::fs::write(&t, b"secret").unwrap();
        std::fs::set_permissions(&t, Permissions::from_mode(0o644)).unwrap();
        assert!(warn_if_open_to_others(&t, "auth token"));
        std::fs::set_permissions(&t, Permissions::from_mode(0o600)).unwrap();
        assert!(!warn_if_open_to_others(&t, "auth token"));
        assert!(!warn_if_open_to_others(&tmp.path().join("missing"), "x"));
    }
}
