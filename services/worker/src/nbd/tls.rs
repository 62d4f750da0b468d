//! TLS on the NBD server (`NBD_OPT_STARTTLS`, X.509 through rustls): the
//! mode a server runs in, the settings as configured (PEM files and mode),
//! and the TLS acceptor built from them.
//!
//! Modes, named as the NBD spec names them:
//! - `off` (NOTLS): `NBD_OPT_STARTTLS` is refused, clients speak plain text;
//! - `optional` (SELECTIVETLS with no TLS-only export): a client may start
//!   TLS, plain clients work as without TLS;
//! - `require` (FORCEDTLS): every option before `NBD_OPT_STARTTLS` (except
//!   `NBD_OPT_ABORT`) gets `NBD_REP_ERR_TLS_REQD`, so an unauthenticated
//!   client learns no export name, and `NBD_OPT_EXPORT_NAME` before TLS
//!   closes the connection.
//!
//! With a CA, every client must present a certificate that chains to it
//! (mutual TLS, as qemu-nbd's `verify-peer=on`); without one, no client
//! certificate is asked for and TLS only encrypts and proves the server.

use std::fmt;
use std::io;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context;
use cowsnap_proto::server::{TlsFiles, warn_if_open_to_others};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// Whether the NBD server offers TLS, and whether it insists on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    Off,
    Optional,
    Require,
}

impl FromStr for TlsMode {
    type Err = String;

    fn from_str(s: &str) -> Result<TlsMode, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "optional" => Ok(TlsMode::Optional),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!(
                "{}: expected off, optional or require",
                cowsnap_proto::names::quote(s)
            )),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::Optional => "optional",
            TlsMode::Require => "require",
        })
    }
}

/// TLS on the NBD server as configured: the server's certificate and key,
/// the CA client certificates must chain to (none: no client certificate
/// is asked for), and the mode.
#[derive(Clone, Debug)]
pub struct NbdTlsConfig {
    pub files: TlsFiles,
    pub mode: TlsMode,
}

impl NbdTlsConfig {
    /// The settings from the `--nbd-tls-*` flags (already merged with their
    /// environment variables and config-file keys). The mode defaults to
    /// `require` when a certificate is given, `off` otherwise; `None` when
    /// TLS is off and no file is named.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
        mode: Option<TlsMode>,
    ) -> anyhow::Result<Option<NbdTlsConfig>> {
        let files = match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                ca: ca.map(Path::to_path_buf),
            }),
            (None, None) if ca.is_some() => {
                anyhow::bail!("--nbd-tls-ca needs --nbd-tls-cert and --nbd-tls-key")
            }
            (None, None) => None,
            (Some(_), None) => anyhow::bail!("--nbd-tls-cert needs --nbd-tls-key"),
            (None, Some(_)) => anyhow::bail!("--nbd-tls-key needs --nbd-tls-cert"),
        };
        match (files, mode) {
            (None, None | Some(TlsMode::Off)) => Ok(None),
            (None, Some(mode)) => anyhow::bail!(
                "--nbd-tls-mode {mode} needs a certificate: --nbd-tls-cert and --nbd-tls-key"
            ),
            (Some(files), mode) => Ok(Some(NbdTlsConfig {
                files,
                mode: mode.unwrap_or(TlsMode::Require),
            })),
        }
    }

    /// Whether clients must use TLS.
    pub fn required(&self) -> bool {
        self.mode == TlsMode::Require
    }

    /// Reads the PEM files and builds the server's TLS side; `None` in mode
    /// `off` (the files are then not read).
    pub fn load(&self) -> anyhow::Result<Option<NbdTls>> {
        if self.mode == TlsMode::Off {
            tracing::info!(
                cert = %self.files.cert.display(),
                "NBD TLS is off (--nbd-tls-mode off): {} is not used",
                self.files.cert.display()
            );
            return Ok(None);
        }
        let config = server_config(&self.files)?;
        Ok(Some(NbdTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            required: self.required(),
            client_certs: self.files.ca.is_some(),
        }))
    }
}

/// The NBD server's TLS side, ready to accept: what a connection upgrades
/// with after `NBD_OPT_STARTTLS`.
#[derive(Clone)]
pub struct NbdTls {
    acceptor: TlsAcceptor,
    required: bool,
    client_certs: bool,
}

impl fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdTls")
            .field("required", &self.required)
            .field("client_certs", &self.client_certs)
            .finish_non_exhaustive()
    }
}

impl NbdTls {
    /// Clients must start TLS before anything else (FORCEDTLS).
    pub fn required(&self) -> bool {
        self.required
    }

    /// Clients must present a certificate from the configured CA.
    pub fn client_certs(&self) -> bool {
        self.client_certs
    }

    /// Runs the server side of the TLS handshake on `stream`; fails when
    /// the client's certificate is missing or does not chain to the CA.
    pub async fn accept<S>(&self, stream: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        self.acceptor.accept(stream).await
    }
}

/// The rustls server configuration: TLS 1.2 and 1.3 (ring), our
/// certificate chain and key, and with a CA a verifier that requires a
/// client certificate chaining to it.
fn server_config(files: &TlsFiles) -> anyhow::Result<ServerConfig> {
    let chain = read_certs(&files.cert, "NBD TLS certificate")?;
    warn_if_open_to_others(&files.key, "NBD TLS private key");
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot read the NBD TLS private key (PEM): {e}",
            files.key.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("NBD TLS: no usable protocol version")?;
    let builder = match &files.ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca, "NBD TLS CA")? {
                roots
                    .add(cert)
                    .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("{}: cannot verify clients with this CA", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder.with_single_cert(chain, key).with_context(|| {
        format!(
            "NBD TLS: the key {} does not go with the certificate {}",
            files.key.display(),
            files.cert.display()
        )
    })
}

/// Every certificate in the PEM file `path` (at least one).
fn read_certs(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{}: cannot read the {what} (PEM): {e}", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate in the {what} file", path.display());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_print() {
        for m in [TlsMode::Off, TlsMode::Optional, TlsMode::Require] {
            assert_eq!(m.to_string().parse::<TlsMode>(), Ok(m));
        }
        assert!("on".parse::<TlsMode>().is_err());
        assert!("Require".parse::<TlsMode>().is_err());
    }

    #[test]
    fn flags_default_to_require_with_a_certificate_and_off_without() {
        let (c, k, ca) = (Path::new("c.pem"), Path::new("k.pem"), Path::new("ca.pem"));
        let t = NbdTlsConfig::from_flags(Some(c), Some(k), None, None)
            .unwrap()
            .unwrap();
        assert_eq!(t.mode, TlsMode::Require);
        assert!(t.files.ca.is_none());
        let t = NbdTlsConfig::from_flags(Some(c), Some(k), Some(ca), Some(TlsMode::Optional))
            .unwrap()
            .unwrap();
        assert_eq!(
            (t.mode, t.files.ca.as_deref()),
            (TlsMode::Optional, Some(ca))
        );
        assert!(
            NbdTlsConfig::from_flags(None, None, None, None)
                .unwrap()
                .is_none()
        );
        assert!(
            NbdTlsConfig::from_flags(None, None, None, Some(TlsMode::Off))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn incomplete_flags_are_errors() {
        let (c, k, ca) = (Path::new("c.pem"), Path::new("k.pem"), Path::new("ca.pem"));
        for (cert, key, ca, mode) in [
            (Some(c), None, None, None),
            (None, Some(k), None, None),
            (None, None, Some(ca), None),
            (None, None, None, Some(TlsMode::Require)),
            (None, None, None, Some(TlsMode::Optional)),
        ] {
            let e = NbdTlsConfig::from_flags(cert, key, ca, mode).unwrap_err();
            assert!(e.to_string().contains("--nbd-tls-"), "{e}");
        }
    }

    #[test]
    fn missing_or_empty_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let cfg = |cert: &Path| NbdTlsConfig {
            files: TlsFiles {
                cert: cert.to_path_buf(),
                key: dir.path().join("key.pem"),
                ca: None,
            },
            mode: TlsMode::Require,
        };
        let e = cfg(&dir.path().join("nope.pem")).load().unwrap_err();
        assert!(e.to_string().contains("nope.pem"), "{e}");
        let e = cfg(&empty).load().unwrap_err();
        assert!(e.to_string().contains("empty.pem"), "{e}");
        // Mode off reads nothing.
        let off = NbdTlsConfig {
            mode: TlsMode::Off,
            ..cfg(&dir.path().join("nope.pem"))
        };
        assert!(off.load().unwrap().is_none());
    }
}
