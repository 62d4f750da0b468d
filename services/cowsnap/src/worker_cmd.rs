//! `cowsnap worker`: runs a data worker. Every setting is a flag, the same
//! as a `COWSNAP_*` environment variable, or a key of a TOML config file
//! (`--config`), in that order of precedence.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cowsnap_csi::node::grpc::NodeGrpc;
use cowsnap_csi::node::{AttachWith, NodeConfig};
use cowsnap_worker::nbd::{NbdLimits, NbdTlsConfig, TlsMode};
use cowsnap_worker::server::{ServeOptions, hostname, start};
use cowsnap_worker::worker::{DEFAULT_WRITEBACK_CAP, WorkerConfig};
use serde::Deserialize;

use crate::service::{config_file, parse_flag, run_until_signal, tls_files};

const DEFAULT_DATA_DIR: &str = "/var/lib/cowsnap";
const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:50052";
const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";
const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet";

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// TOML file with any of the settings below (keys: data_dir,
    /// grpc_listen, nbd_listen, nbd_advertise, device_allow, node, io,
    /// tls_cert, tls_key, tls_ca, nbd_tls_cert, nbd_tls_key, nbd_tls_ca,
    /// nbd_tls_mode, nbd_max_connections, nbd_idle_timeout,
    /// nbd_buffer_budget, writeback_cap, csi_endpoint, kubelet_dir,
    /// register_with, advertise, register_token_file, register_interval).
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
    /// signed (mTLS with the control service); with --register-with
    /// https://, the control service's certificate is checked against it.
    #[arg(long, env = "COWSNAP_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Serve the Kubernetes CSI driver's Identity and Node services on this
    /// unix socket, e.g. unix:///run/cowsnap/csi.sock [default: off].
    #[arg(long, env = "COWSNAP_CSI_ENDPOINT")]
    csi_endpoint: Option<String>,
    /// The CSI Node service stages and publishes only under this directory
    /// [default: /var/lib/kubelet].
    #[arg(long, env = "COWSNAP_KUBELET_DIR")]
    kubelet_dir: Option<PathBuf>,
    /// How the CSI Node service makes block devices of exports: kernel
    /// (the kernel's NBD client, needs the nbd module), nbdfuse (nbdfuse
    /// and a loop device), or auto (kernel when the module is loaded)
    /// [default: auto].
    #[arg(long, env = "COWSNAP_CSI_ATTACH")]
    csi_attach: Option<String>,
    /// Register with this control service at start and then every
    /// --register-interval (RegisterWorker, under the id made from --node,
    /// which is also the CSI node id): host:port, http://host:port,
    /// https://host:port (its certificate checked against --tls-ca) or
    /// unix:PATH [default: off; the control service's --worker list or an
    /// admin registers it].
    #[arg(long, env = "COWSNAP_REGISTER_WITH")]
    register_with: Option<String>,
    /// The gRPC address the control service reaches this worker at,
    /// host:port or unix:PATH, e.g. the node's IP and port [default:
    /// --grpc-listen, unless it listens on 0.0.0.0 or [::]].
    #[arg(long, env = "COWSNAP_ADVERTISE")]
    advertise: Option<String>,
    /// A file holding the control service's API token, sent when
    /// registering (read at each attempt).
    #[arg(long, env = "COWSNAP_REGISTER_TOKEN_FILE")]
    register_token_file: Option<PathBuf>,
    /// How often the worker registers again, e.g. 30s, 5m; after a failure
    /// it retries sooner (1s, 2s, 4s ... up to this) [default: 30s].
    #[arg(long, env = "COWSNAP_REGISTER_INTERVAL")]
    register_interval: Option<String>,
    #[command(flatten)]
    nbd_limits: NbdLimitArgs,
    #[command(flatten)]
    nbd_tls: NbdTlsArgs,
    #[command(flatten)]
    writeback: WriteBackArgs,
}

/// The engines' write-back, on `cowsnap worker` and `cowsnap up`.
#[derive(clap::Args, Debug)]
pub struct WriteBackArgs {
    /// Memory for writes acknowledged before they reach their device, all
    /// volumes of the worker together (plain writes that need
    /// copy-on-write; FLUSH and FUA wait for them), e.g. 128m or 1g; past
    /// it writes wait [default: 128m].
    #[arg(long, env = "COWSNAP_WRITEBACK_CAP")]
    writeback_cap: Option<String>,
}

impl WriteBackArgs {
    /// The cap from this flag, then the config file's key, then the
    /// default.
    fn resolve(self, file: Option<Size>) -> anyhow::Result<u64> {
        let cap = match self.writeback_cap.map(Size::Text).or(file) {
            None => DEFAULT_WRITEBACK_CAP,
            Some(Size::Bytes(n)) => n,
            Some(Size::Text(t)) => crate::admin::size("--writeback-cap", &t)?,
        };
        anyhow::ensure!(cap > 0, "--writeback-cap must be positive");
        Ok(cap)
    }

    /// The cap from this flag alone (`cowsnap up` has no config file).
    pub fn cap(self) -> anyhow::Result<u64> {
        self.resolve(None)
    }
}

/// Self-registration settings, before the worker id is known.
#[derive(Debug)]
pub struct RegisterArgs {
    pub control: String,
    /// None: from --grpc-listen.
    pub advertise: Option<String>,
    pub token_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub interval: Duration,
}

/// The advertised address: `advertise`, else `grpc_listen` when a control
/// service can dial it.
fn advertised(advertise: Option<&str>, grpc_listen: &str) -> anyhow::Result<String> {
    if let Some(a) = advertise {
        let _: cowsnap_proto::server::Listen = parse_flag("--advertise", a)?;
        anyhow::ensure!(
            !unspecified(a),
            "--advertise {a}: the control service cannot dial an unspecified address"
        );
        return Ok(a.to_string());
    }
    anyhow::ensure!(
        !unspecified(grpc_listen),
        "--register-with needs --advertise HOST:PORT: --grpc-listen {grpc_listen} is no \
         address the control service can dial"
    );
    Ok(grpc_listen.to_string())
}

/// `0.0.0.0:P`, `[::]:P` or `:P`: every local address, none to dial.
fn unspecified(addr: &str) -> bool {
    if addr.starts_with("unix:") {
        return false;
    }
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    matches!(host, "" | "0.0.0.0" | "[::]" | "::")
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
    /// untaken) before it is closed; 0: never [default: 0, because attached
    /// block devices (CSI node, kernel nbd-client, VMs) idle without
    /// reconnecting].
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

/// The CSI node plugin a worker serves, when asked.
#[derive(Debug)]
pub struct CsiNode {
    pub endpoint: String,
    pub kubelet_dir: PathBuf,
    pub attach: AttachWith,
}

/// TLS on NBD, shared by `cowsnap worker` and `cowsnap up`.
#[derive(clap::Args, Debug, Default)]
pub struct NbdTlsArgs {
    /// PEM certificate (chain) of the NBD server: clients may then start TLS
    /// (NBD_OPT_STARTTLS; qemu's tls-creds-x509, libnbd's nbds:// URIs).
    /// Needs --nbd-tls-key.
    #[arg(long, env = "COWSNAP_NBD_TLS_CERT")]
    pub nbd_tls_cert: Option<PathBuf>,
    /// PEM private key of --nbd-tls-cert.
    #[arg(long, env = "COWSNAP_NBD_TLS_KEY")]
    pub nbd_tls_key: Option<PathBuf>,
    /// PEM CA: every NBD client must present a certificate that chains to
    /// it; without it no client certificate is asked for.
    #[arg(long, env = "COWSNAP_NBD_TLS_CA")]
    pub nbd_tls_ca: Option<PathBuf>,
    /// off, optional (plain clients still served) or require (plain clients
    /// are refused and learn no export name; exports are advertised as
    /// nbds://) [default: require with --nbd-tls-cert, off without].
    #[arg(long, env = "COWSNAP_NBD_TLS_MODE")]
    pub nbd_tls_mode: Option<TlsMode>,
}

impl NbdTlsArgs {
    /// The NBD TLS settings, each flag falling back to `file`'s key.
    pub fn resolve(self, file: NbdTlsArgs) -> anyhow::Result<Option<NbdTlsConfig>> {
        NbdTlsConfig::from_flags(
            self.nbd_tls_cert.or(file.nbd_tls_cert).as_deref(),
            self.nbd_tls_key.or(file.nbd_tls_key).as_deref(),
            self.nbd_tls_ca.or(file.nbd_tls_ca).as_deref(),
            self.nbd_tls_mode.or(file.nbd_tls_mode),
        )
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
    writeback_cap: Option<Size>,
    nbd_tls_cert: Option<PathBuf>,
    nbd_tls_key: Option<PathBuf>,
    nbd_tls_ca: Option<PathBuf>,
    #[serde(default, deserialize_with = "tls_mode")]
    nbd_tls_mode: Option<TlsMode>,
    csi_endpoint: Option<String>,
    kubelet_dir: Option<PathBuf>,
    csi_attach: Option<String>,
    register_with: Option<String>,
    advertise: Option<String>,
    register_token_file: Option<PathBuf>,
    register_interval: Option<String>,
}

/// `nbd_tls_mode = "require"` in the config file.
fn tls_mode<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<TlsMode>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(serde::de::Error::custom)
}

/// What `cowsnap worker` runs: the worker, its serving options, and the
/// CSI node plugin and self-registration when asked for.
pub struct Resolved {
    pub cfg: WorkerConfig,
    pub opts: ServeOptions,
    pub csi: Option<CsiNode>,
    pub register: Option<RegisterArgs>,
}

/// The settings resolved from flags, environment, config file and
/// defaults.
pub fn resolve(args: WorkerArgs) -> anyhow::Result<Resolved> {
    let file: FileConfig = config_file(args.config.as_deref())?;
    let attach = parse_flag(
        "--csi-attach",
        &args
            .csi_attach
            .or(file.csi_attach)
            .unwrap_or_else(|| "auto".into()),
    )?;
    let csi = args
        .csi_endpoint
        .or(file.csi_endpoint)
        .map(|endpoint| CsiNode {
            endpoint,
            kubelet_dir: args
                .kubelet_dir
                .or(file.kubelet_dir)
                .unwrap_or_else(|| DEFAULT_KUBELET_DIR.into()),
            attach,
        });
    let io = parse_flag("--io", &args.io.or(file.io).unwrap_or_default())?;
    let grpc_listen = args
        .grpc_listen
        .or(file.grpc_listen)
        .unwrap_or_else(|| DEFAULT_GRPC_LISTEN.into());
    let nbd_listen = args
        .nbd_listen
        .or(file.nbd_listen)
        .unwrap_or_else(|| DEFAULT_NBD_LISTEN.into());
    let tls_ca = args.tls_ca.or(file.tls_ca);
    let register = match args.register_with.or(file.register_with) {
        None => None,
        Some(control) => {
            let interval = match args.register_interval.or(file.register_interval) {
                None => Duration::from_secs(30),
                Some(d) => crate::control_cmd::duration("--register-interval", &d)?,
            };
            anyhow::ensure!(!interval.is_zero(), "--register-interval must be positive");
            let advertise = args.advertise.or(file.advertise);
            advertised(advertise.as_deref(), &grpc_listen)?;
            Some(RegisterArgs {
                control,
                advertise,
                token_file: args.register_token_file.or(file.register_token_file),
                tls_ca: tls_ca.clone(),
                interval,
            })
        }
    };
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
        writeback_cap: args.writeback.resolve(file.writeback_cap)?,
    };
    let nbd_limits = args.nbd_limits.resolve(
        file.nbd_max_connections,
        file.nbd_idle_timeout,
        file.nbd_buffer_budget,
    )?;
    let nbd_tls = args.nbd_tls.resolve(NbdTlsArgs {
        nbd_tls_cert: file.nbd_tls_cert,
        nbd_tls_key: file.nbd_tls_key,
        nbd_tls_ca: file.nbd_tls_ca,
        nbd_tls_mode: file.nbd_tls_mode,
    })?;
    let opts = ServeOptions {
        grpc_listen: parse_flag("--grpc-listen", &grpc_listen)?,
        nbd_listen: parse_flag("--nbd-listen", &nbd_listen)?,
        nbd_advertise: args.nbd_advertise.or(file.nbd_advertise),
        tls: tls_files(
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
            tls_ca,
        )?,
        nbd_tls,
        nbd_limits,
    };
    Ok(Resolved {
        cfg,
        opts,
        csi,
        register,
    })
}

pub fn run(args: WorkerArgs) -> anyhow::Result<u8> {
    let Resolved {
        cfg,
        opts,
        csi,
        register,
    } = resolve(args)?;
    // The CSI node id: the id the control service registers this worker by
    // (unless it is registered under another one); self-registration
    // registers it by this id.
    let node_id = cowsnap_control::model::worker_id_from_node(&cfg.node);
    let data_dir = cfg.data_dir.clone();
    run_until_signal(async |shutdown| {
        // Bound before the worker starts: a live socket fails the start.
        let bound = match &csi {
            Some(c) => Some(cowsnap_csi::endpoint::bind(&c.endpoint)?),
            None => None,
        };
        let worker = start(cfg, opts, shutdown.clone()).await?;
        if let Some(r) = register {
            let advertise = advertised(r.advertise.as_deref(), &worker.grpc.to_string())?;
            let registration = crate::register::Registration {
                control: crate::admin::Conn::new(r.control.clone(), r.token_file, r.tls_ca),
                control_addr: r.control,
                advertise,
                worker_id: node_id.clone(),
                interval: r.interval,
            };
            tokio::spawn(crate::register::run(registration, shutdown.child_token()));
        }
        let served = match (bound, csi) {
            (Some(bound), Some(c)) => {
                let node_cfg = NodeConfig {
                    node: node_id,
                    data_dir,
                    kubelet_dir: c.kubelet_dir,
                    nbd: worker.nbd_node.clone(),
                    attach: c.attach,
                };
                let node = NodeGrpc::start(node_cfg, worker.worker.clone())
                    .await
                    .context("cannot start the CSI node plugin")?;
                let router =
                    cowsnap_csi::endpoint::router(cowsnap_csi::identity::Identity::new(None), None)
                        .add_service(node.server());
                Some(bound.serve(router, shutdown.child_token())?)
            }
            _ => None,
        };
        let csi_stopped = match served {
            Some(c) => c.wait().await,
            None => Ok(()),
        };
        csi_stopped.and(worker.wait().await)
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WorkerArgs,
    }

    fn resolve_args(argv: &[&str]) -> anyhow::Result<ServeOptions> {
        let cli = Cli::try_parse_from(std::iter::once("worker").chain(argv.iter().copied()))?;
        Ok(resolve(cli.args)?.opts)
    }

    #[test]
    fn nbd_tls_comes_from_the_config_file_and_flags_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("worker.toml");
        std::fs::write(
            &conf,
            "nbd_tls_cert = \"/etc/cowsnap/nbd.pem\"\n\
             nbd_tls_key = \"/etc/cowsnap/nbd.key\"\n\
             nbd_tls_ca = \"/etc/cowsnap/ca.pem\"\n",
        )
        .unwrap();
        let conf = conf.to_str().unwrap();
        let tls = resolve_args(&["--config", conf]).unwrap().nbd_tls.unwrap();
        assert_eq!(tls.files.cert, Path::new("/etc/cowsnap/nbd.pem"));
        assert_eq!(tls.files.key, Path::new("/etc/cowsnap/nbd.key"));
        assert_eq!(
            tls.files.ca.as_deref(),
            Some(Path::new("/etc/cowsnap/ca.pem"))
        );
        assert_eq!(tls.mode, TlsMode::Require, "a certificate means require");

        let tls = resolve_args(&[
            "--config",
            conf,
            "--nbd-tls-mode",
            "optional",
            "--nbd-tls-cert",
            "/other.pem",
        ])
        .unwrap()
        .nbd_tls
        .unwrap();
        assert_eq!(
            (tls.mode, tls.files.cert.as_path()),
            (TlsMode::Optional, Path::new("/other.pem"))
        );

        assert!(resolve_args(&[]).unwrap().nbd_tls.is_none());
    }

    #[test]
    fn a_bad_nbd_tls_mode_in_the_config_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("worker.toml");
        std::fs::write(&conf, "nbd_tls_mode = \"sometimes\"\n").unwrap();
        let e = resolve_args(&["--config", conf.to_str().unwrap()]).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("sometimes") && msg.contains("require"),
            "{msg}"
        );
        std::fs::write(&conf, "nbd_tls_mode = \"require\"\n").unwrap();
        let e = resolve_args(&["--config", conf.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("--nbd-tls-cert"), "{e}");
    }

    fn limits(args: &[&str], config: &str) -> anyhow::Result<NbdLimits> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, config).unwrap();
        let mut argv = vec!["worker", "--config", path.to_str().unwrap()];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).unwrap();
        resolve(cli.args).map(|r| r.opts.nbd_limits)
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
    fn the_advertised_address_is_one_the_control_service_can_dial() {
        assert_eq!(
            advertised(None, "10.0.0.5:50052").unwrap(),
            "10.0.0.5:50052"
        );
        assert_eq!(
            advertised(None, "unix:/run/w.sock").unwrap(),
            "unix:/run/w.sock"
        );
        assert_eq!(
            advertised(Some("10.0.0.5:50052"), "0.0.0.0:50052").unwrap(),
            "10.0.0.5:50052"
        );
        for listen in ["0.0.0.0:50052", "[::]:50052", ":50052"] {
            let e = advertised(None, listen).unwrap_err().to_string();
            assert!(e.contains("--advertise"), "{listen}: {e}");
        }
        let e = advertised(Some("0.0.0.0:1"), "x:1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unspecified"), "{e}");
        let e = advertised(Some("nowhere"), "x:1").unwrap_err().to_string();
        assert!(e.contains("--advertise"), "{e}");
    }

    #[test]
    fn register_with_a_wildcard_listen_and_no_advertise_is_refused_at_start() {
        let cli = Cli::try_parse_from([
            "worker",
            "--grpc-listen",
            "0.0.0.0:50052",
            "--register-with",
            "127.0.0.1:50051",
        ])
        .unwrap();
        let e = resolve(cli.args).err().expect("refused").to_string();
        assert!(e.contains("--advertise"), "{e}");
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
