//! What every cowsnap gRPC server shares: where it listens (re-exported
//! from [`listen`](crate::listen)), TLS certificates ([`TlsFiles`]: the server side and the
//! client side of mTLS between the control service and its workers),
//! server reflection (both `grpc.reflection.v1` and `v1alpha`: grpcurl 1.8
//! asks for the latter) and `grpc.health.v1`; and files only their owner
//! may read ([`private_dir`], [`private_file`]): volume data, the catalog,
//! sockets, and a warning for secrets others can read.

use std::fs::{OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

pub use crate::listen::{Bound, Listen, tcp_incoming};

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

/// Replaces the file at `path` with `bytes`, atomically and durably: a
/// private temporary file beside it (mode 0600) is written and fsynced,
/// renamed over `path`, and the directory fsynced. After a crash `path`
/// holds the old content or the new, never a mix.
pub fn replace_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let name = path.file_name().context("a file path has a name")?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut f = private_file_options()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .with_context(|| format!("{}: cannot create", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))?;
    sync_dir(path.parent().context("a file path has a directory")?)
}

/// Makes the entries of directory `dir` durable (a file made, renamed or
/// removed in it).
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot sync directory", dir.display()))
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
    fn replace_file_leaves_the_new_content_private_and_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state.json");
        // A temporary left by a crash mid-replace is no obstacle.
        std::fs::write(tmp.path().join("state.json.tmp"), b"torn").unwrap();
        replace_file(&path, b"old").unwrap();
        replace_file(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(mode(&path), 0o600);
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
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
