//! Running the control service: opens the catalog, registers the workers it
//! was given, reconciles once, then serves the public API over gRPC until
//! told to stop, with health checks and reconciliation passes in the
//! background and metrics on their own HTTP listener.
//!
//! The tower layers every call goes through are stacked here, in one
//! place, outermost first: [`CallLayer`] (span, deadline, log line,
//! metrics), [`AuthLayer`] (bearer token; health and reflection open), and
//! a global concurrency limit. TLS (with optional client certificates) is
//! the transport's.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cowsnap_proto::cowsnap::v1::operation_service_server::OperationServiceServer;
use cowsnap_proto::cowsnap::v1::snapshot_service_server::SnapshotServiceServer;
use cowsnap_proto::cowsnap::v1::volume_service_server::VolumeServiceServer;
use cowsnap_proto::cowsnap::v1::worker_service_server::WorkerServiceServer;
pub use cowsnap_proto::server::TlsFiles;
use cowsnap_proto::server::{
    Bound, Listen, private_dir, private_file, reflection_and_health, restrict,
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::auth::{AuthLayer, read_token};
use crate::calls::CallLayer;
use crate::catalog::Catalog;
use crate::control::Control;
use crate::metrics::{self, Metrics};
use crate::operations::{CrashAt, Operations};
use crate::reconcile::{Reconciler, Report};
use crate::workers::{WorkerConnect, Workers};

/// How the control service is set up.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// The catalog lives at `DATA_DIR/catalog.db`.
    pub data_dir: PathBuf,
    /// Where the public gRPC API listens.
    pub listen: Listen,
    /// Worker addresses to register at start (`host:port` or `unix:PATH`);
    /// those that do not answer yet are registered when they do.
    pub workers: Vec<String>,
    /// A file holding the bearer token callers must send; none: no auth.
    pub auth_token_file: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
    /// The name every worker's certificate is checked against (one
    /// certificate for all nodes); none: the host of each worker's address.
    pub worker_tls_server_name: Option<String>,
    /// Prometheus metrics over HTTP (`host:port`).
    pub metrics_listen: Option<String>,
    /// Longest a call may take (callers may ask for less with
    /// `grpc-timeout`); WaitOperation waits a little less.
    pub request_timeout: Duration,
    /// Longest a call to a worker may take.
    pub worker_timeout: Duration,
    /// Calls served at once; more wait.
    pub max_concurrent_calls: usize,
    pub health_interval: Duration,
    pub reconcile_interval: Duration,
    /// Test hook: stop as if crashed at this point of operations of one
    /// kind.
    pub crash_at: Option<CrashAt>,
}

impl ControlConfig {
    /// The defaults, with the given data dir and listen address.
    pub fn new(data_dir: impl Into<PathBuf>, listen: Listen) -> ControlConfig {
        ControlConfig {
            data_dir: data_dir.into(),
            listen,
            workers: Vec::new(),
            auth_token_file: None,
            tls: None,
            worker_tls_server_name: None,
            metrics_listen: None,
            request_timeout: Duration::from_secs(60),
            worker_timeout: Duration::from_secs(60),
            max_concurrent_calls: 256,
            health_interval: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(30),
            crash_at: None,
        }
    }
}

/// A started control service.
pub struct RunningControl {
    /// Where its gRPC API listens (the real port for `:0`).
    pub grpc: Listen,
    /// Where its metrics are served.
    pub metrics: Option<SocketAddr>,
    /// The domain services, for other front ends (the CSI controller).
    pub control: Arc<Control>,
    reconciler: Arc<Reconciler>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningControl {
    /// Runs a reconciliation pass now (besides the periodic ones).
    pub async fn reconcile_now(&self) -> anyhow::Result<Report> {
        Ok(self.reconciler.run_once().await?)
    }

    /// Waits until it has stopped (after `shutdown` was cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// Starts the control service: everything is open, bound and reconciled
/// once when this returns. It serves until `shutdown` is cancelled; then
/// [`RunningControl::wait`].
pub async fn start(
    cfg: ControlConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningControl> {
    private_dir(&cfg.data_dir).context("cannot create the data dir")?;
    // Only its owner reads the catalog, whatever the umask: SQLite creates
    // the -wal and -shm files with the mode of the database file.
    let db = cfg.data_dir.join("catalog.db");
    private_file(&db)?;
    for side in ["catalog.db-wal", "catalog.db-shm"] {
        let p = cfg.data_dir.join(side);
        if p.exists() {
            restrict(&p)?;
        }
    }
    let catalog = Catalog::open(&db).await?;
    let token = cfg.auth_token_file.as_deref().map(read_token).transpose()?;
    let (server_tls, client_tls) = match &cfg.tls {
        // Callers may present a client certificate; workers' are checked.
        Some(t) => {
            let mut client = t.client()?;
            if let Some(name) = &cfg.worker_tls_server_name {
                client = client.domain_name(name.clone());
            }
            (Some(t.server(false)?), Some(client))
        }
        None => (None, None),
    };
    let metrics = Metrics::new();
    let workers = Arc::new(Workers::new(
        catalog.clone(),
        WorkerConnect {
            timeout: cfg.worker_timeout,
            connect_timeout: Duration::from_secs(3).min(cfg.worker_timeout),
            tls: client_tls,
        },
        metrics.clone(),
    ));
    let ops = Operations::new(
        catalog.clone(),
        workers.clone(),
        metrics.clone(),
        cfg.crash_at,
        shutdown.clone(),
    );
    let max_wait = cfg
        .request_timeout
        .saturating_sub(Duration::from_secs(1))
        .max(Duration::from_millis(100));
    let control = Arc::new(Control::new(
        catalog.clone(),
        workers.clone(),
        ops.clone(),
        max_wait,
    ));

    // Bind first: a taken address fails the start, and callers queue while
    // the first reconciliation runs.
    let grpc = Bound::bind(&cfg.listen).await?;
    let grpc_local = grpc.local();
    let metrics_listener = match &cfg.metrics_listen {
        Some(a) => Some(metrics::bind(a).await?),
        None => None,
    };

    let reconciler = Arc::new(Reconciler::new(
        catalog.clone(),
        workers.clone(),
        metrics.clone(),
        ops.clone(),
        cfg.workers.clone(),
    ));
    match reconciler.run_once().await {
        Ok(r) => tracing::info!(?r, "start-up reconciliation done"),
        Err(e) => tracing::error!("start-up reconciliation failed: {e}"),
    }

    let (v1, v1alpha, reporter, health) = reflection_and_health(&[
        "cowsnap.v1.VolumeService",
        "cowsnap.v1.SnapshotService",
        "cowsnap.v1.OperationService",
        "cowsnap.v1.WorkerService",
    ])?;
    let api = Api::new(control.clone());
    reporter.set_serving::<VolumeServiceServer<Api>>().await;
    reporter.set_serving::<SnapshotServiceServer<Api>>().await;
    reporter.set_serving::<OperationServiceServer<Api>>().await;
    reporter.set_serving::<WorkerServiceServer<Api>>().await;

    let layers = tower::ServiceBuilder::new()
        .layer(CallLayer::new(metrics.clone(), cfg.request_timeout))
        .layer(AuthLayer::new(token))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            cfg.max_concurrent_calls,
        ))
        .into_inner();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = server_tls {
        builder = builder.tls_config(tls).context("bad TLS configuration")?;
    }
    let router = builder
        .layer(layers)
        .add_service(VolumeServiceServer::new(api.clone()))
        .add_service(SnapshotServiceServer::new(api.clone()))
        .add_service(OperationServiceServer::new(api.clone()))
        .add_service(WorkerServiceServer::new(api))
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(health);
    tracing::info!(grpc = %grpc_local, "control service serving on {grpc_local}");

    let metrics_addr = metrics_listener.as_ref().map(|(_, a)| *a);
    let metrics_task = metrics_listener.map(|(l, a)| {
        tracing::info!("metrics on http://{a}/metrics");
        tokio::spawn(metrics::serve(
            l,
            metrics.clone(),
            catalog.clone(),
            shutdown.clone(),
        ))
    });
    let background = tokio::spawn(background(
        reconciler.clone(),
        cfg.health_interval,
        cfg.reconcile_interval,
        shutdown.clone(),
    ));
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        let served = match grpc {
            Bound::Tcp(l) => {
                router
                    .serve_with_incoming_shutdown(
                        cowsnap_proto::server::tcp_incoming(l),
                        stop.cancelled(),
                    )
                    .await
            }
            Bound::Unix(l, path) => {
                let r = router
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::UnixListenerStream::new(l),
                        stop.cancelled(),
                    )
                    .await;
                let _ = std::fs::remove_file(path);
                r
            }
        };
        reporter.set_not_serving::<VolumeServiceServer<Api>>().await;
        let _ = background.await;
        if let Some(m) = metrics_task {
            let _ = m.await;
        }
        ops.stopped().await;
        catalog.close().await;
        tracing::info!("control service stopped");
        served.context("gRPC server failed")
    });
    Ok(RunningControl {
        grpc: grpc_local,
        metrics: metrics_addr,
        control,
        reconciler,
        task,
    })
}

/// Health checks and reconciliation passes until `shutdown`, each on a
/// clock of its own: a long pass (a large catalog, many calls in flight)
/// does not hold back the health checks that notice a worker gone.
async fn background(
    reconciler: Arc<Reconciler>,
    health_every: Duration,
    reconcile_every: Duration,
    shutdown: CancellationToken,
) {
    let every = |period: Duration| {
        let mut t = tokio::time::interval(period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t.reset();
        t
    };
    let health = async {
        let mut t = every(health_every);
        loop {
            t.tick().await;
            if let Err(e) = reconciler.check_workers().await {
                tracing::warn!("health checks failed: {e}");
            }
        }
    };
    let reconcile = async {
        let mut t = every(reconcile_every);
        loop {
            t.tick().await;
            if let Err(e) = reconciler.run_once().await {
                tracing::warn!("reconciliation failed: {e}");
            }
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = health => {}
        _ = reconcile => {}
    }
}
