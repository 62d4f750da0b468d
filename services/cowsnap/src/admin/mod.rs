//! The admin CLI: `cowsnap volume ...`, `cowsnap snapshot ...` and
//! `cowsnap operation ...`, over the public `cowsnap.v1` API, for people
//! without grpcurl. Tables on a terminal, `--json` for scripts.
//!
//! - this module: the connection (`--server`, bearer token, TLS) and how
//!   errors end the command (the server's status code name and message on
//!   stderr, exit 1);
//! - [`volume`], [`snapshot`], [`operation`]: one module per resource;
//! - [`output`]: tables and JSON.
//!
//! Names may be given whole (`volumes/v1`, `volumes/v1/snapshots/s1`) or
//! short (`v1`, `v1/s1`).

pub mod operation;
mod output;
pub mod snapshot;
pub mod volume;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cowsnap_proto::cowsnap::v1 as pb;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub use operation::OperationCommand;
pub use snapshot::SnapshotCommand;
pub use volume::VolumeCommand;

/// Where the control service is and how to talk to it.
#[derive(clap::Args, Debug, Clone)]
pub struct Conn {
    /// The control service: host:port, http://host:port,
    /// https://host:port or unix:PATH.
    #[arg(
        long,
        global = true,
        env = "COWSNAP_SERVER",
        default_value = "127.0.0.1:50051"
    )]
    server: String,
    /// A file holding the bearer token to send.
    #[arg(long, global = true, env = "COWSNAP_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA to check the server's certificate with (https://).
    #[arg(long, global = true, env = "COWSNAP_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Print JSON (the API's messages, proto field names) instead of tables.
    #[arg(long, global = true)]
    json: bool,
}

/// Adds `authorization: Bearer TOKEN` when a token is set.
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            r.metadata_mut().insert("authorization", t.clone());
        }
        Ok(r)
    }
}

pub(crate) type Ch = InterceptedService<Channel, Bearer>;

/// Clients of the public API, and how to print.
pub(crate) struct Api {
    pub volumes: pb::volume_service_client::VolumeServiceClient<Ch>,
    pub snapshots: pb::snapshot_service_client::SnapshotServiceClient<Ch>,
    pub operations: pb::operation_service_client::OperationServiceClient<Ch>,
    pub json: bool,
}

impl Conn {
    /// A connection to the control service at `server` (as `--server`).
    pub(crate) fn new(
        server: String,
        token_file: Option<PathBuf>,
        tls_ca: Option<PathBuf>,
    ) -> Conn {
        Conn {
            server,
            token_file,
            tls_ca,
            json: false,
        }
    }

    pub(crate) async fn channel(&self) -> anyhow::Result<Channel> {
        let s = self.server.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            // The URI is not used to connect; the connector dials the socket.
            return Endpoint::from_static("http://cowsnap.local")
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let p = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(p).await?,
                        ))
                    }
                }))
                .await
                .with_context(|| format!("cannot connect to {s}"));
        }
        let uri = if s.starts_with("http://") || s.starts_with("https://") {
            s.to_string()
        } else {
            format!("http://{s}")
        };
        let mut ep = Endpoint::from_shared(uri.clone())
            .with_context(|| format!("--server {s:?} is not host:port, a URL or unix:PATH"))?
            .connect_timeout(Duration::from_secs(5));
        if uri.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &self.tls_ca {
                let pem = std::fs::read(ca)
                    .with_context(|| format!("{}: cannot read the TLS CA", ca.display()))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            ep = ep.tls_config(tls).context("bad TLS configuration")?;
        }
        ep.connect()
            .await
            .with_context(|| format!("cannot connect to the control service at {s}"))
    }

    pub(crate) fn bearer(&self) -> anyhow::Result<Bearer> {
        let Some(p) = &self.token_file else {
            return Ok(Bearer(None));
        };
        let t = std::fs::read_to_string(p)
            .with_context(|| format!("{}: cannot read the token", p.display()))?;
        let v = format!("Bearer {}", t.trim())
            .parse()
            .map_err(|_| anyhow::anyhow!("{}: the token is not printable ASCII", p.display()))?;
        Ok(Bearer(Some(v)))
    }

    pub(crate) async fn api(&self) -> anyhow::Result<Api> {
        let b = self.bearer()?;
        let ch = self.channel().await?;
        Ok(Api {
            volumes: pb::volume_service_client::VolumeServiceClient::with_interceptor(
                ch.clone(),
                b.clone(),
            ),
            snapshots: pb::snapshot_service_client::SnapshotServiceClient::with_interceptor(
                ch.clone(),
                b.clone(),
            ),
            operations: pb::operation_service_client::OperationServiceClient::with_interceptor(
                ch, b,
            ),
            json: self.json,
        })
    }
}

/// What a command ends with: done, or the server said no.
pub(crate) enum Failure {
    Status(tonic::Status),
    Local(anyhow::Error),
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Failure {
        Failure::Status(s)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Local(e)
    }
}

pub(crate) type Outcome = Result<u8, Failure>;

/// Runs one admin command: exit 0 when it worked; 1 with the server's
/// status (`cowsnap: NOT_FOUND: ...`) when the server refused or failed it,
/// or when an operation waited on ended in failure; 2 when it could not be
/// run at all (bad arguments, no connection).
pub(crate) fn run<F>(conn: &Conn, f: F) -> anyhow::Result<u8>
where
    F: AsyncFnOnce(&mut Api) -> Outcome,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut api = conn.api().await?;
        match f(&mut api).await {
            Ok(code) => Ok(code),
            Err(Failure::Status(s)) => {
                eprintln!("cowsnap: {}: {}", code_name(s.code()), s.message());
                Ok(1)
            }
            Err(Failure::Local(e)) => Err(e),
        }
    })
}

/// The canonical name of a gRPC code, as grpcurl prints it.
pub(crate) fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `v1` or `volumes/v1` → `volumes/v1`.
pub(crate) fn volume_name(s: &str) -> String {
    if s.starts_with("volumes/") {
        s.to_string()
    } else {
        format!("volumes/{s}")
    }
}

/// `v1/s1` or `volumes/v1/snapshots/s1` → `volumes/v1/snapshots/s1`.
pub(crate) fn snapshot_name(s: &str) -> anyhow::Result<String> {
    if s.starts_with("volumes/") {
        return Ok(s.to_string());
    }
    match s.split_once('/') {
        Some((v, snap)) if !v.is_empty() && !snap.is_empty() && !snap.contains('/') => {
            Ok(format!("volumes/{v}/snapshots/{snap}"))
        }
        _ => anyhow::bail!(
            "{s:?} is not a snapshot: VOLUME/SNAPSHOT or volumes/VOLUME/snapshots/SNAPSHOT"
        ),
    }
}

/// `7` or `operations/7` → `operations/7`.
pub(crate) fn operation_name(s: &str) -> String {
    if s.starts_with("operations/") {
        s.to_string()
    } else {
        format!("operations/{s}")
    }
}

/// `KEY=VALUE` label arguments.
pub(crate) fn labels(args: &[String]) -> anyhow::Result<std::collections::HashMap<String, String>> {
    args.iter()
        .map(|a| {
            a.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--label {a:?}: KEY=VALUE"))
        })
        .collect()
}

/// A size with an optional k/m/g/t suffix (powers of 1024).
pub(crate) fn size(flag: &str, s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (n, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => anyhow::bail!("{flag} {s:?}: the suffix is k, m, g or t"),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = n
        .parse()
        .with_context(|| format!("{flag} {s:?} is not a size (e.g. 1g, 512m, 4096)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| anyhow::anyhow!("{flag} {s:?} is too large"))
}

/// Waits for an operation to end, showing its progress on a terminal;
/// returns it once done.
pub(crate) async fn wait(api: &mut Api, name: &str, what: &str) -> Result<pb::Operation, Failure> {
    let bar = indicatif::ProgressBar::new(100);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}% ({elapsed})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    loop {
        let op = api
            .operations
            .wait_operation(pb::WaitOperationRequest {
                name: name.to_string(),
                timeout: Some(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
            })
            .await?
            .into_inner();
        bar.set_position(op.percent.clamp(0.0, 100.0) as u64);
        if op.done {
            bar.finish_and_clear();
            return Ok(op);
        }
    }
}

/// Prints a finished operation's outcome the way its command should: with
/// `--json` the operation (its result inside); otherwise the resulting
/// resource, or the error on stderr. Exit 1 when it failed.
pub(crate) fn finish(api: &Api, op: &pb::Operation) -> Outcome {
    let failed = matches!(op.result, Some(pb::operation::Result::Error(_)));
    if api.json {
        output::operation(true, op)?;
        return Ok(u8::from(failed));
    }
    match &op.result {
        Some(pb::operation::Result::Error(e)) => {
            eprintln!(
                "cowsnap: {} failed: {}: {}",
                op.name,
                code_name(tonic::Code::from_i32(e.code)),
                e.message
            );
            Ok(1)
        }
        Some(pb::operation::Result::Volume(v)) => {
            output::volume(false, v)?;
            Ok(0)
        }
        Some(pb::operation::Result::Snapshot(s)) => {
            output::snapshot(false, s)?;
            Ok(0)
        }
        None => {
            output::operation(false, op)?;
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_long_and_short() {
        assert_eq!(volume_name("v1"), "volumes/v1");
        assert_eq!(volume_name("volumes/v1"), "volumes/v1");
        assert_eq!(snapshot_name("v1/s1").unwrap(), "volumes/v1/snapshots/s1");
        assert_eq!(
            snapshot_name("volumes/v1/snapshots/s1").unwrap(),
            "volumes/v1/snapshots/s1"
        );
        assert!(snapshot_name("v1").is_err());
        assert!(snapshot_name("v1/s1/x").is_err());
        assert_eq!(operation_name("7"), "operations/7");
    }

    #[test]
    fn sizes() {
        assert_eq!(size("--size", "4096").unwrap(), 4096);
        assert_eq!(size("--size", "64k").unwrap(), 64 << 10);
        assert_eq!(size("--size", "1G").unwrap(), 1 << 30);
        assert!(size("--size", "1x").is_err());
        assert!(size("--size", "g").is_err());
        assert!(size("--size", "99999999999t").is_err());
    }
}
