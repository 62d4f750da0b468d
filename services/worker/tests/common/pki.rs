//! Real X.509 certificates for the TLS tests, made with rcgen: a CA, the
//! server's certificate (for `localhost` and `127.0.0.1`), and client
//! credential directories laid out as qemu's `tls-creds-x509` and libnbd's
//! `tls-certificates` read them (`ca-cert.pem`, `client-cert.pem`,
//! `client-key.pem`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cowsnap_proto::server::TlsFiles;
use cowsnap_worker::nbd::{NbdTls, NbdTlsConfig, TlsMode};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// A certificate and its key (PEM) signed by this CA: for the server
    /// (`localhost`, `127.0.0.1`) or for a client.
    pub fn issue(&self, name: &str, server: bool) -> (String, String) {
        let sans = if server {
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        } else {
            Vec::new()
        };
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes a private key readable by its owner only.
fn write_key(path: &Path, pem: &str) {
    std::fs::write(path, pem).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The certificates of one TLS test: the server's files, and client
/// credential directories.
pub struct Pki {
    pub ca: Ca,
    /// Server certificate, key, and the CA client certificates must chain
    /// to.
    pub server: TlsFiles,
    /// `ca-cert.pem` and a client certificate from the server's CA.
    pub client_dir: PathBuf,
    /// A client certificate from another CA, and a `ca-cert.pem` holding
    /// both CAs: the client trusts the server and its own certificate
    /// (qemu checks that before connecting), the server must not trust it.
    pub stranger_dir: PathBuf,
    /// `ca-cert.pem` only: no client certificate.
    pub anonymous_dir: PathBuf,
}

impl Pki {
    /// Everything under `dir`.
    pub fn new(dir: &Path) -> Pki {
        let ca = Ca::new("cowsnap NBD test CA");
        let other = Ca::new("another CA");
        let server_dir = dir.join("server");
        std::fs::create_dir_all(&server_dir).unwrap();
        let (cert, key) = ca.issue("cowsnap worker", true);
        let server = TlsFiles {
            cert: server_dir.join("server-cert.pem"),
            key: server_dir.join("server-key.pem"),
            ca: Some(server_dir.join("ca-cert.pem")),
        };
        std::fs::write(&server.cert, cert).unwrap();
        write_key(&server.key, &key);
        std::fs::write(server.ca.as_ref().unwrap(), &ca.pem).unwrap();

        let client_dir = |name: &str, signer: Option<&Ca>| {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            let mut trusted = ca.pem.clone();
            if let Some(signer) = signer.filter(|s| s.pem != ca.pem) {
                trusted.push_str(&signer.pem);
            }
            std::fs::write(d.join("ca-cert.pem"), trusted).unwrap();
            if let Some(signer) = signer {
                let (cert, key) = signer.issue(name, false);
                std::fs::write(d.join("client-cert.pem"), cert).unwrap();
                write_key(&d.join("client-key.pem"), &key);
            }
            d
        };
        Pki {
            client_dir: client_dir("client", Some(&ca)),
            stranger_dir: client_dir("stranger", Some(&other)),
            anonymous_dir: client_dir("anonymous", None),
            ca,
            server,
        }
    }

    /// The server's TLS side in `mode`; `client_certs`: clients must hold
    /// a certificate from the CA.
    pub fn nbd_tls(&self, mode: TlsMode, client_certs: bool) -> NbdTls {
        let mut files = self.server.clone();
        if !client_certs {
            files.ca = None;
        }
        NbdTlsConfig { files, mode }.load().unwrap().unwrap()
    }

    /// A rustls client trusting the CA, presenting the certificate in
    /// `creds` (a client credentials directory) when there is one.
    pub fn client_config(&self, creds: &Path) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(creds.join("ca-cert.pem")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let cert = creds.join("client-cert.pem");
        let config = if cert.exists() {
            let chain = CertificateDer::pem_file_iter(&cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(creds.join("client-key.pem")).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        } else {
            builder.with_no_client_auth()
        };
        Arc::new(config)
    }
}
