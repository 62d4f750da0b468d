//! Running a worker: binds its gRPC and NBD listeners, opens the worker on
//! its data dir, serves until told to stop, and stops in order: stop
//! accepting, let calls and I/O in flight finish, flush every engine (later
//! I/O fails with ESHUTDOWN), persist.

use std::sync::Arc;

use anyhow::Context;
use cowsnap_proto::server::{Bound, Listen, TlsFiles, reflection_and_health};
use cowsnap_proto::worker::v1::worker_service_server::WorkerServiceServer;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::exports::Exports;
use crate::grpc::WorkerGrpc;
use crate::nbd::limits::{NbdLimits, Quotas};
use crate::nbd::listener::{LocalAddr, NbdServer};
use crate::nbd::tls::NbdTlsConfig;
use crate::worker::{Worker, WorkerConfig};

/// Where a worker listens, besides its [`WorkerConfig`].
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub grpc_listen: Listen,
    pub nbd_listen: crate::nbd::listener::Listen,
    /// The NBD endpoint to tell clients (`nbd://HOST:PORT` or
    /// `nbd+unix:///?socket=PATH`, `nbds` and `nbds+unix` when TLS is
    /// required); default: derived from where NBD listens.
    pub nbd_advertise: Option<String>,
    /// TLS on NBD (`NBD_OPT_STARTTLS`): certificate, key, the CA client
    /// certificates must chain to, and whether plain clients are refused.
    /// `None`: plain text only.
    pub nbd_tls: Option<NbdTlsConfig>,
    /// TLS on the gRPC API; with a CA, callers must present a certificate
    /// it signed (mTLS with the control service).
    pub tls: Option<TlsFiles>,
    /// What NBD clients may take of the process: connections, idle time,
    /// buffer memory. The connection limit is lowered at start when the file
    /// descriptor limit cannot hold it.
    pub nbd_limits: NbdLimits,
}

/// A started worker.
pub struct RunningWorker {
    pub worker: Arc<Worker>,
    /// Where its gRPC API listens (the real port for `:0`).
    pub grpc: Listen,
    /// Where its NBD server listens.
    pub nbd: LocalAddr,
    /// Where clients on this node (the CSI node plugin) reach NBD without
    /// TLS: where NBD listens, or, when that requires TLS, a unix socket in
    /// a private directory of the data dir (`DATA_DIR/private/nbd.sock`:
    /// only root reaches it; the kernel's NBD client speaks no TLS).
    pub nbd_node: LocalAddr,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningWorker {
    /// Waits until the worker has stopped (after `shutdown` was cancelled)
    /// and everything is flushed.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// The NBD base URI clients are told, from where NBD listens: `nbds` (TLS)
/// when the server requires TLS, as qemu and libnbd spell it.
fn advertised(local: &LocalAddr, tls_required: bool) -> String {
    let scheme = if tls_required { "nbds" } else { "nbd" };
    match local {
        LocalAddr::Tcp(a) if a.ip().is_unspecified() => {
            let host = hostname().unwrap_or_else(|| "localhost".into());
            format!("{scheme}://{host}:{}", a.port())
        }
        LocalAddr::Tcp(a) => format!("{scheme}://{a}"),
        LocalAddr::Unix(p) => format!("{scheme}+unix:///?socket={}", p.display()),
    }
}

/// This machine's host name.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most len bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Some(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// Starts a worker: everything is bound and open when this returns. It
/// serves until `shutdown` is cancelled; then [`RunningWorker::wait`].
pub async fn start(
    mut cfg: WorkerConfig,
    opts: ServeOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningWorker> {
    opts.nbd_limits.check().map_err(anyhow::Error::msg)?;
    let mut limits = opts.nbd_limits;
    limits.fit_to_fd_limit();
    let nbd_tls = match &opts.nbd_tls {
        Some(t) => t.load()?,
        None => None,
    };
    let tls_required = nbd_tls.as_ref().is_some_and(|t| t.required());
    let quotas = Quotas::new(limits);
    let nbd = NbdServer::bind(&opts.nbd_listen)
        .await?
        .with_quotas(quotas.clone())
        .with_tls(nbd_tls);
    let nbd_local = nbd.local_addr().clone();
    // The node's own clients, when the public listener requires TLS: a
    // plain-text unix socket only root can reach, sharing the limits.
    let nbd_private = if tls_required {
        let dir = cfg.data_dir.join("private");
        cowsnap_proto::server::private_dir(&dir)?;
        let listen = crate::nbd::listener::Listen::Unix(dir.join("nbd.sock"));
        Some(NbdServer::bind(&listen).await?.with_quotas(quotas))
    } else {
        None
    };
    let nbd_node = nbd_private
        .as_ref()
        .map_or_else(|| nbd_local.clone(), |p| p.local_addr().clone());
    cfg.nbd_uri = match &opts.nbd_advertise {
        Some(uri) => {
            if tls_required && !uri.starts_with("nbds") {
                tracing::warn!(
                    nbd_advertise = %uri,
                    "NBD requires TLS but clients are told {uri}, a plain-text URI: \
                     they will be refused (advertise nbds://...)"
                );
            }
            uri.clone()
        }
        None => advertised(&nbd_local, tls_required),
    };
    let grpc = Bound::bind(&opts.grpc_listen).await?;
    let grpc_local = grpc.local();
    let exports = Exports::new();
    let worker = Worker::open(cfg, exports.clone()).await?;
    tracing::info!(
        grpc = %grpc_local,
        nbd = %nbd_local,
        io = worker.backend_name(),
        "worker serving: gRPC on {grpc_local}, NBD on {nbd_local}"
    );
    let idle = match limits.idle_timeout {
        Some(t) => format!("{} s", t.as_secs()),
        None => "none".into(),
    };
    tracing::info!(
        max_connections = limits.max_connections,
        buffer_budget = limits.buffer_budget_bytes,
        "NBD limits: {} connections, idle timeout {idle}, {} MiB of buffers",
        limits.max_connections,
        limits.buffer_budget_bytes >> 20
    );

    let (v1, v1alpha, reporter, health) =
        reflection_and_health(&["cowsnap.worker.v1.WorkerService"])?;
    reporter
        .set_serving::<WorkerServiceServer<WorkerGrpc>>()
        .await;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &opts.tls {
        builder = builder
            .tls_config(tls.server(true)?)
            .context("bad TLS configuration")?;
    }
    let router = builder
        .add_service(WorkerServiceServer::new(WorkerGrpc::new(worker.clone())))
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(health);

    let w = worker.clone();
    let task = tokio::spawn(async move {
        let grpc_task = tokio::spawn(grpc.serve(router, shutdown.clone()));
        let private_task =
            nbd_private.map(|p| tokio::spawn(p.run(exports.clone(), shutdown.clone())));
        let nbd_task = tokio::spawn(nbd.run(exports, shutdown.clone()));
        shutdown.cancelled().await;
        reporter
            .set_not_serving::<WorkerServiceServer<WorkerGrpc>>()
            .await;
        let g = grpc_task.await?;
        let mut n = nbd_task.await?;
        if let Some(p) = private_task {
            n = n.and(p.await?);
        }
        w.shutdown().await;
        tracing::info!("worker stopped: engines flushed");
        g.and(n)
    });
    Ok(RunningWorker {
        worker,
        grpc: grpc_local,
        nbd: nbd_local,
        nbd_node,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_uri_says_nbds_when_tls_is_required() {
        let tcp = LocalAddr::Tcp("127.0.0.1:10809".parse().unwrap());
        assert_eq!(advertised(&tcp, false), "nbd://127.0.0.1:10809");
        assert_eq!(advertised(&tcp, true), "nbds://127.0.0.1:10809");
        let unix = LocalAddr::Unix("/run/nbd.sock".into());
        assert_eq!(
            advertised(&unix, false),
            "nbd+unix:///?socket=/run/nbd.sock"
        );
        assert_eq!(
            advertised(&unix, true),
            "nbds+unix:///?socket=/run/nbd.sock"
        );
    }
}
