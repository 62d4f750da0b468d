//! `cowsnap worker`: runs a data worker. Every setting is a flag, the same
//! as a `COWSNAP_*` environment variable, or a key of a TOML config file
//! (`--config`), in that order of precedence.

use std::path::PathBuf;

use cowsnap_worker::server::{ServeOptions, hostname, start};
use cowsnap_worker::worker::WorkerConfig;
use serde::Deserialize;

use crate::service::{config_file, parse_flag, run_until_signal, tls_files};

const DEFAULT_DATA_DIR: &str = "/var/lib/cowsnap";
const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:50052";
const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// TOML file with any of the settings below (keys: data_dir,
    /// grpc_listen, nbd_listen, nbd_advertise, device_allow, node, io,
    /// tls_cert, tls_key, tls_ca).
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
}

/// The settings resolved from flags, environment, config file and defaults.
pub fn resolve(args: WorkerArgs) -> anyhow::Result<(WorkerConfig, ServeOptions)> {
    let file: FileConfig = config_file(args.config.as_deref())?;
    let io = parse_flag("--io", &args.io.or(file.io).unwrap_or_default())?;
    let grpc_listen = args
        .grpc_listen
        .or(file.grpc_listen)
        .unwrap_or_else(|| DEFAULT_GRPC_LISTEN.into());
    let nbd_listen = args
        .nbd_listen
        .or(file.nbd_listen)
        .unwrap_or_else(|| DEFAULT_NBD_LISTEN.into());
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
    let opts = ServeOptions {
        grpc_listen: parse_flag("--grpc-listen", &grpc_listen)?,
        nbd_listen: parse_flag("--nbd-listen", &nbd_listen)?,
        nbd_advertise: args.nbd_advertise.or(file.nbd_advertise),
        tls: tls_files(
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
            args.tls_ca.or(file.tls_ca),
        )?,
    };
    Ok((cfg, opts))
}

pub fn run(args: WorkerArgs) -> anyhow::Result<u8> {
    let (cfg, opts) = resolve(args)?;
    run_until_signal(async |shutdown| start(cfg, opts, shutdown).await?.wait().await)
}
