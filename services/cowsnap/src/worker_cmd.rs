//! `cowsnap worker`: runs a data worker. Every setting is a flag, the same
//! as a `COWSNAP_*` environment variable, or a key of a TOML config file
//! (`--config`), in that order of precedence.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cowsnap_proto::server::TlsFiles;
use cowsnap_store::BackendChoice;
use cowsnap_worker::nbd::NbdLimits;
use cowsnap_worker::server::{ServeOptions, hostname, start};
use cowsnap_worker::worker::WorkerConfig;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

const DEFAULT_DATA_DIR: &str = "/var/lib/cowsnap";
const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:50052";
const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// TOML file with any of the settings below (keys: data_dir,
    /// grpc_listen, nbd_listen, nbd_advertise, device_allow, node, io,
    /// tls_cert, tls_key, tls_ca, nbd_max_connections, nbd_idle_timeout,
    /// nbd_buffer_budget).
    #[arg(long, env = "COWSNAP_CONFIG")]
    config: Option<PathBuf>,
    /// The worker's state and, on the embedded default, its devices
    /// [default: /var/lib/cowsnap].
    #[arg(long, env = "COWSNAP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// gRPC API address: host:port or unix:PATH [default: 127.0.0.1:50052].
    #[arg(long, env = "COWSNAP_GRPC_LISTEN")]
    grpc_listen: Option<String>,
    /// NBD address: host:port or unix:PATH [default: 127.0.0.1:10809].
    #[arg(long, env = "COWSNAP_NBD_LISTEN")]
    nbd_listen: Option<String>,
    /// NBD endpoint told to clients, e.g. nbd://node1.example:10809
    /// [default: from --nbd-listen].
    #[arg(long, env = "COWSNAP_NBD_ADVERTISE")]
    nbd_advertise: Option<String>,
    /// Globs of the raw block devices the worker may use (e.g. '/dev/loop*');
    /// nothing else is ever opened. '*' stays within one path component; a
    /// link must lead to a device the globs allow too. Repeat or separate
    /// with commas.
    #[arg(long, env = "COWSNAP_DEVICE_ALLOW", value_delimiter = ',', num_args = 1..)]
    device_allow: Vec<String>,
    /// Node name reported to the control service [default: the host name].
    #[arg(long, env = "COWSNAP_NODE")]
    node: Option<String>,
    /// I/O backend: auto, uring or portable [default: auto].
    #[arg(long, env = "COWSNAP_IO")]
    io: Option<String>,
    /// PEM certificate of the gRPC API (TLS). Needs --tls-key.
    #[arg(long, env = "COWSNAP_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "COWSNAP_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA: callers of the gRPC API must present a client certificate it
    /// signed (mTLS with the control service).
    #[arg(long, env = "COWSNAP_TLS_CA")]
    tls_ca: Option<PathBuf>,
    #[command(flatten)]
    nbd_limits: NbdLimitArgs,
}

/// The NBD server's limits, on `cowsnap worker` and `cowsnap up`.
#[derive(clap::Args, Debug)]
pub struct NbdLimitArgs {
    /// NBD connections served at once; a client over the limit is told
    /// "too many connections" and closed [default: 256]. Lowered at start
    /// when the file descriptor limit (ulimit -n) cannot hold it.
    #[arg(long, env = "COWSNAP_NBD_MAX_CONNECTIONS")]
    nbd_max_connections: Option<usize>,
    /// Seconds an NBD connection may go without a request (or leave a reply
    /// untaken) before it is closed; 0: never [default: 600]. Clients that
    /// stay attached while idle (kernel nbd-client, VMs) need 0 or to
    /// reconnect.
    #[arg(long, env = "COWSNAP_NBD_IDLE_TIMEOUT")]
    nbd_idle_timeout: Option<u64>,
    /// Memory for NBD request and reply buffers, all connections together,
    /// e.g. 512m or 2g, at least 32m [default: 512m].
    #[arg(long, env = "COWSNAP_NBD_BUFFER_BUDGET")]
    nbd_buffer_budget: Option<String>,
}

/// A size in a config file: bytes, or a string with a k/m/g/t suffix.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl NbdLimitArgs {
    /// The limits from these flags, then the config file's keys, then the
    /// defaults; checked.
    fn resolve(
        self,
        max_connections: Option<usize>,
        idle_timeout: Option<u64>,
        buffer_budget: Option<Size>,
    ) -> anyhow::Result<NbdLimits> {
        let d = NbdLimits::default();
        let budget = match self.nbd_buffer_budget.map(Size::Text).or(buffer_budget) {
            None => d.buffer_budget_bytes,
            Some(Size::Bytes(n)) => n,
            Some(Size::Text(t)) => crate::admin::size("--nbd-buffer-budget", &t)?,
        };
        let limits = NbdLimits {
            max_connections: self
                .nbd_max_connections
                .or(max_connections)
                .unwrap_or(d.max_connections),
            idle_timeout: match self.nbd_idle_timeout.or(idle_timeout) {
                None => d.idle_timeout,
                Some(0) => None,
                Some(s) => Some(Duration::from_secs(s)),
            },
            buffer_budget_bytes: budget,
        };
        limits
            .check()
            .map_err(|e| anyhow::anyhow!("NBD limits (--nbd-*): {e}"))?;
        Ok(limits)
    }

    /// The limits from these flags alone (`cowsnap up` has no config file).
    pub fn limits(self) -> anyhow::Result<NbdLimits> {
        self.resolve(None, None, None)
    }
}

#[derive(Deserialize, Default, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    grpc_listen: Option<String>,
    nbd_listen: Option<String>,
    nbd_advertise: Option<String>,
    device_allow: Option<Vec<String>>,
    node: Option<String>,
    io: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    nbd_max_connections: Option<usize>,
    nbd_idle_timeout: Option<u64>,
    nbd_buffer_budget: Option<Size>,
}

/// The settings resolved from flags, environment, config file and defaults.
pub fn resolve(args: WorkerArgs) -> anyhow::Result<(WorkerConfig, ServeOptions)> {
    let file = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read", p.display()))?;
            toml::from_str::<FileConfig>(&text)
                .with_context(|| format!("{}: bad config file", p.display()))?
        }
        None => FileConfig::default(),
    };
    let io: BackendChoice = args
        .io
        .or(file.io)
        .unwrap_or_default()
        .parse()
        .map_err(anyhow::Error::msg)?;
    let grpc_listen = args
        .grpc_listen
        .or(file.grpc_listen)
        .unwrap_or_else(|| DEFAULT_GRPC_LISTEN.into())
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--grpc-listen: {e}"))?;
    let nbd_listen = args
        .nbd_listen
        .or(file.nbd_listen)
        .unwrap_or_else(|| DEFAULT_NBD_LISTEN.into())
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--nbd-listen: {e}"))?;
    let device_allow = if args.device_allow.is_empty() {
        file.device_allow.unwrap_or_default()
    } else {
        args.device_allow
    };
    let cfg = WorkerConfig {
        data_dir: args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
        node: args
            .node
            .or(file.node)
            .or_else(hostname)
            .unwrap_or_else(|| "localhost".into()),
        nbd_uri: String::new(),
        device_allow,
        io,
    };
    let tls = match (
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
        args.tls_ca.or(file.tls_ca),
    ) {
        (Some(cert), Some(key), ca) => Some(TlsFiles { cert, key, ca }),
        (None, None, None) => None,
        _ => anyhow::bail!("TLS needs both --tls-cert and --tls-key (and optionally --tls-ca)"),
    };
    let nbd_limits = args.nbd_limits.resolve(
        file.nbd_max_connections,
        file.nbd_idle_timeout,
        file.nbd_buffer_budget,
    )?;
    let opts = ServeOptions {
        grpc_listen,
        nbd_listen,
        nbd_advertise: args.nbd_advertise.or(file.nbd_advertise),
        tls,
        nbd_limits,
    };
    Ok((cfg, opts))
}

/// Cancels `token` on SIGTERM or SIGINT.
pub fn cancel_on_signals(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
        token.cancel();
    });
    Ok(())
}

pub fn run(args: WorkerArgs) -> anyhow::Result<u8> {
    let (cfg, opts) = resolve(args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        cancel_on_signals(shutdown.clone())?;
        let w = start(cfg, opts, shutdown).await?;
        w.wait().await?;
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    fn limits(args: &[&str], config: &str) -> anyhow::Result<NbdLimits> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, config).unwrap();
        let mut argv = vec!["worker", "--config", path.to_str().unwrap()];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).unwrap();
        resolve(cli.worker).map(|(_, opts)| opts.nbd_limits)
    }

    #[test]
    fn nbd_limits_from_flags_then_config_then_defaults() {
        assert_eq!(limits(&[], "").unwrap(), NbdLimits::default());
        let l = limits(
            &[],
            "nbd_max_connections = 10\nnbd_idle_timeout = 0\nnbd_buffer_budget = \"64m\"\n",
        )
        .unwrap();
        assert_eq!(
            l,
            NbdLimits {
                max_connections: 10,
                idle_timeout: None,
                buffer_budget_bytes: 64 << 20,
            }
        );
        let l = limits(
            &[
                "--nbd-max-connections",
                "20",
                "--nbd-idle-timeout",
                "30",
                "--nbd-buffer-budget",
                "1g",
            ],
            "nbd_max_connections = 10\nnbd_buffer_budget = 67108864\n",
        )
        .unwrap();
        assert_eq!(
            l,
            NbdLimits {
                max_connections: 20,
                idle_timeout: Some(Duration::from_secs(30)),
                buffer_budget_bytes: 1 << 30,
            }
        );
        assert_eq!(
            limits(&[], "nbd_buffer_budget = 67108864\n")
                .unwrap()
                .buffer_budget_bytes,
            64 << 20
        );
    }

    #[test]
    fn bad_nbd_limits_are_clear_errors() {
        let e = limits(&["--nbd-buffer-budget", "1m"], "").unwrap_err();
        assert!(format!("{e:#}").contains("largest request"), "{e:#}");
        let e = limits(&["--nbd-buffer-budget", "lots"], "").unwrap_err();
        assert!(format!("{e:#}").contains("--nbd-buffer-budget"), "{e:#}");
        let e = limits(&["--nbd-max-connections", "0"], "").unwrap_err();
        assert!(format!("{e:#}").contains("at least 1"), "{e:#}");
    }
}
