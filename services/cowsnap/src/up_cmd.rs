//! `cowsnap up`: the embedded default. The control service and one data
//! worker in one process, everything under one data dir:
//!
//! ```text
//! DIR/catalog.db      the control service's SQLite catalog
//! DIR/worker/         the worker's state and its file-backed devices
//! DIR/worker.sock     the worker's gRPC API (only the control service uses it)
//! ```
//!
//! The public API listens on `--listen`, NBD on `--nbd-listen` (over TLS
//! with `--nbd-tls-cert`, as on `cowsnap worker`), and the CSI driver on
//! `--csi-endpoint` when given. SIGTERM or
//! SIGINT stops the control service first (no new calls reach the worker),
//! then the worker (in-flight I/O finishes, engines are flushed).

use std::path::PathBuf;

use anyhow::Context;
use cowsnap_control::server::ControlConfig;
use cowsnap_csi::node::grpc::NodeGrpc;
use cowsnap_csi::node::{AttachWith, NodeConfig};
use cowsnap_worker::server::{ServeOptions, hostname};
use cowsnap_worker::worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

use crate::service::{parse_flag, run_until_signal};
use crate::worker_cmd::{NbdLimitArgs, NbdTlsArgs, WriteBackArgs};

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Where everything lives: the catalog, the worker's state and its
    /// devices (sparse files).
    #[arg(long, env = "COWSNAP_DATA_DIR", default_value = "cowsnap-data")]
    data_dir: PathBuf,
    /// Public gRPC API address: host:port or unix:PATH.
    #[arg(long, env = "COWSNAP_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// NBD address: host:port or unix:PATH.
    #[arg(long, env = "COWSNAP_NBD_LISTEN", default_value = "127.0.0.1:10809")]
    nbd_listen: String,
    /// NBD endpoint told to clients, e.g. nbd://node1.example:10809
    /// [default: from --nbd-listen].
    #[arg(long, env = "COWSNAP_NBD_ADVERTISE")]
    nbd_advertise: Option<String>,
    /// Prometheus metrics over HTTP at host:port/metrics [default: off].
    #[arg(long, env = "COWSNAP_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// A file holding the bearer token every caller must send.
    #[arg(long, env = "COWSNAP_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// I/O backend: auto, uring or portable.
    #[arg(long, env = "COWSNAP_IO", default_value = "auto")]
    io: String,
    /// Serve the Kubernetes CSI driver (Identity, Controller and Node) on
    /// this unix socket, e.g. unix:///run/cowsnap/csi.sock [default: off].
    #[arg(long, env = "COWSNAP_CSI_ENDPOINT")]
    csi_endpoint: Option<String>,
    /// Advertise the CSI SnapshotMetadata service in GetPluginCapabilities
    /// (it is served on the CSI endpoint either way): the
    /// external-snapshot-metadata sidecar requires it; csi-sanity fails a
    /// driver that reports it [default: off].
    #[arg(long, env = "COWSNAP_CSI_ADVERTISE_SNAPSHOT_METADATA")]
    csi_advertise_snapshot_metadata: bool,
    /// The CSI Node service stages and publishes only under this directory.
    #[arg(long, env = "COWSNAP_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// How the CSI Node service makes block devices of exports: kernel
    /// (the kernel's NBD client, needs the nbd module), nbdfuse (nbdfuse
    /// and a loop device), or auto (kernel when the module is loaded).
    #[arg(long, env = "COWSNAP_CSI_ATTACH", default_value = "auto")]
    csi_attach: AttachWith,
    #[command(flatten)]
    nbd_limits: NbdLimitArgs,
    #[command(flatten)]
    nbd_tls: NbdTlsArgs,
    #[command(flatten)]
    writeback: WriteBackArgs,
}

pub fn run(args: UpArgs) -> anyhow::Result<u8> {
    let io = parse_flag("--io", &args.io)?;
    let nbd_limits = args.nbd_limits.limits()?;
    let listen = parse_flag("--listen", &args.listen)?;
    let nbd_listen = parse_flag("--nbd-listen", &args.nbd_listen)?;
    cowsnap_proto::server::private_dir(&args.data_dir).context("cannot create the data dir")?;
    // Absolute, so the socket path registered in the catalog stays valid
    // whatever directory the next start runs from.
    let dir = std::fs::canonicalize(&args.data_dir)
        .with_context(|| format!("{}: cannot resolve", args.data_dir.display()))?;
    let worker_sock = dir.join("worker.sock");
    let worker_addr = format!("unix:{}", worker_sock.display());

    let node = hostname().unwrap_or_else(|| "localhost".into());
    // The CSI node id: the id the control service registers the worker by.
    let node_id = cowsnap_control::model::worker_id_from_node(&node);
    let kubelet_dir = args.kubelet_dir;
    let csi_attach = args.csi_attach;
    let advertise_metadata = args.csi_advertise_snapshot_metadata;
    let worker_cfg = WorkerConfig {
        data_dir: dir.join("worker"),
        node,
        nbd_uri: String::new(),
        device_allow: Vec::new(),
        io,
        writeback_cap: args.writeback.cap()?,
    };
    let serve = ServeOptions {
        grpc_listen: parse_flag(&worker_sock.display().to_string(), &worker_addr)?,
        nbd_listen,
        nbd_advertise: args.nbd_advertise,
        tls: None,
        nbd_limits,
        nbd_tls: args.nbd_tls.resolve(NbdTlsArgs::default())?,
    };
    let mut control_cfg = ControlConfig::new(&dir, listen);
    control_cfg.workers = vec![worker_addr];
    control_cfg.metrics_listen = args.metrics_listen;
    control_cfg.auth_token_file = args.auth_token_file;

    run_until_signal(async |stop| {
        let _telemetry = cowsnap_control::telemetry::init("info", "cowsnap")?;
        // Bound before anything starts: a live socket fails the start.
        let csi = args
            .csi_endpoint
            .as_deref()
            .map(cowsnap_csi::endpoint::bind)
            .transpose()?;
        let worker_stop = CancellationToken::new();
        let worker = cowsnap_worker::server::start(worker_cfg, serve, worker_stop.clone())
            .await
            .context("cannot start the worker")?;
        let control = match cowsnap_control::server::start(control_cfg, stop.child_token()).await {
            Ok(c) => c,
            Err(e) => {
                worker_stop.cancel();
                worker.wait().await?;
                return Err(e.context("cannot start the control service"));
            }
        };
        let csi = match csi {
            None => None,
            Some(bound) => {
                let node_cfg = NodeConfig {
                    node: node_id,
                    data_dir: dir.join("worker"),
                    kubelet_dir,
                    nbd: worker.nbd_node.clone(),
                    attach: csi_attach,
                };
                let node = NodeGrpc::start(node_cfg, worker.worker.clone())
                    .await
                    .context("cannot start the CSI node plugin")?;
                // Its one node's devices grow in place with the kernel's
                // client: expansion is ONLINE then.
                let online = node.attach() == AttachWith::Kernel;
                let router = cowsnap_csi::endpoint::router(
                    cowsnap_csi::identity::Identity::new(Some(control.control.clone()))
                        .advertise_snapshot_metadata(advertise_metadata)
                        .online_expansion(online),
                    Some(cowsnap_csi::controller::Controller::new(
                        control.control.clone(),
                    )),
                )
                .add_service(node.server());
                Some(bound.serve(router, stop.child_token())?)
            }
        };
        tracing::info!(
            "cowsnap up: API on {}, NBD on {}, data in {}",
            control.grpc,
            worker.nbd,
            dir.display()
        );
        let csi_served = match csi {
            Some(c) => c.wait().await,
            None => Ok(()),
        };
        let served = control.wait().await;
        worker_stop.cancel();
        let flushed = worker.wait().await;
        csi_served.and(served).and(flushed)
    })
}
