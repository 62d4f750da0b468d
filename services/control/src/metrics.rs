//! Prometheus metrics, served as text on `--metrics-listen` (`/metrics`):
//! RPC counts and latencies (recorded by the RPC layer in [`crate::server`]),
//! operations by kind and state, the progress of running operations
//! (merges, restores, clones), and what workers report: their room and
//! health, their I/O (reads, writes, metadata commits and the exceptions
//! they committed, i.e. chunks copied on write; exceptions per commit), and
//! each snapshot's usage and exceptions (chunks copied into or written to
//! its COW device). Catalog-derived gauges are refreshed at each scrape;
//! worker I/O at each health check.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, Catalog};
use crate::model::{OpKind, OpState, WorkerIo};

pub struct Metrics {
    registry: Registry,
    rpc_requests: IntCounterVec,
    rpc_seconds: HistogramVec,
    operations_finished: IntCounterVec,
    operations: IntGaugeVec,
    operation_percent: GaugeVec,
    worker_up: IntGaugeVec,
    worker_free_bytes: IntGaugeVec,
    worker_capacity_bytes: IntGaugeVec,
    worker_volumes: IntGaugeVec,
    /// Worker I/O counters, by what they count (`reads`, `read_bytes`, ...).
    worker_io: HashMap<&'static str, IntCounterVec>,
    worker_exceptions_per_commit: GaugeVec,
    /// The last I/O figures each worker reported, to add what is new.
    worker_io_seen: Mutex<HashMap<String, WorkerIo>>,
    snapshot_allocated_bytes: IntGaugeVec,
    snapshot_total_bytes: IntGaugeVec,
    snapshot_metadata_bytes: IntGaugeVec,
    snapshot_exceptions: IntGaugeVec,
    pub reconcile_passes: IntCounter,
    reconcile_repairs: IntCounterVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("metric"),
            )
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("metric"),
            )
        };
        Arc::new(Metrics {
            rpc_requests: counter(
                "cowsnap_control_rpc_requests_total",
                "gRPC calls served, by method and status code",
                &["method", "code"],
            ),
            rpc_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "cowsnap_control_rpc_duration_seconds",
                        "gRPC call latency, by method",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0, 60.0,
                    ]),
                    &["method"],
                )
                .expect("metric"),
            ),
            operations_finished: counter(
                "cowsnap_control_operations_finished_total",
                "Operations this process ended, by kind and outcome",
                &["kind", "state"],
            ),
            operations: gauge(
                "cowsnap_control_operations",
                "Operations in the catalog, by kind and state",
                &["kind", "state"],
            ),
            operation_percent: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "cowsnap_control_operation_percent",
                        "Progress of running operations (merge, restore, clone), 0..100",
                    ),
                    &["operation", "kind", "target"],
                )
                .expect("metric"),
            ),
            worker_up: gauge(
                "cowsnap_worker_up",
                "1 when the worker answered its last health check",
                &["worker"],
            ),
            worker_free_bytes: gauge(
                "cowsnap_worker_free_bytes",
                "Room the worker last reported for new volumes and snapshots",
                &["worker"],
            ),
            worker_capacity_bytes: gauge(
                "cowsnap_worker_capacity_bytes",
                "The worker's capacity, as last reported",
                &["worker"],
            ),
            worker_volumes: gauge(
                "cowsnap_worker_volumes",
                "Volumes placed on the worker",
                &["worker"],
            ),
            worker_io: [
                (
                    "reads",
                    "cowsnap_worker_reads_total",
                    "Reads of volumes and snapshots served by the worker",
                ),
                (
                    "read_bytes",
                    "cowsnap_worker_read_bytes_total",
                    "Bytes read from volumes and snapshots",
                ),
                (
                    "writes",
                    "cowsnap_worker_writes_total",
                    "Writes to volumes and snapshots served by the worker",
                ),
                (
                    "write_bytes",
                    "cowsnap_worker_written_bytes_total",
                    "Bytes written to volumes and snapshots",
                ),
                (
                    "commits",
                    "cowsnap_worker_commits_total",
                    "Metadata area writes (FUA) that committed new exceptions",
                ),
                (
                    "exceptions",
                    "cowsnap_worker_cow_exceptions_total",
                    "Exceptions committed: chunks copied on write into snapshots, or allocated by snapshot writes",
                ),
            ]
            .into_iter()
            .map(|(k, name, help)| (k, counter(name, help, &["worker"])))
            .collect(),
            worker_exceptions_per_commit: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "cowsnap_worker_exceptions_per_commit",
                        "Mean exceptions per metadata commit since the worker started (group commit)",
                    ),
                    &["worker"],
                )
                .expect("metric"),
            ),
            worker_io_seen: Mutex::new(HashMap::new()),
            snapshot_allocated_bytes: gauge(
                "cowsnap_snapshot_allocated_bytes",
                "COW device bytes in use (dmsetup status allocated), as last reported",
                &["snapshot"],
            ),
            snapshot_total_bytes: gauge(
                "cowsnap_snapshot_total_bytes",
                "COW device size (dmsetup status total)",
                &["snapshot"],
            ),
            snapshot_metadata_bytes: gauge(
                "cowsnap_snapshot_metadata_bytes",
                "COW device bytes holding metadata",
                &["snapshot"],
            ),
            snapshot_exceptions: gauge(
                "cowsnap_snapshot_exceptions",
                "Exceptions of the snapshot: chunks copied on write or written to it",
                &["snapshot"],
            ),
            reconcile_passes: reg(
                &r,
                IntCounter::new(
                    "cowsnap_control_reconcile_passes_total",
                    "Reconciliation passes against the workers",
                )
                .expect("metric"),
            ),
            reconcile_repairs: counter(
                "cowsnap_control_reconcile_repairs_total",
                "What reconciliation repaired, by action",
                &["action"],
            ),
            registry: r,
        })
    }

    /// Counts a served call.
    pub fn rpc(&self, method: &str, code: &str, seconds: f64) {
        self.rpc_requests.with_label_values(&[method, code]).inc();
        self.rpc_seconds
            .with_label_values(&[method])
            .observe(seconds);
    }

    /// Adds what a worker's I/O counters grew by since it last reported
    /// (all of them when it restarted: its counters start again from 0).
    pub fn worker_io(&self, worker: &str, now: &WorkerIo) {
        let mut seen = self.worker_io_seen.lock().expect("worker io");
        let before = seen.get(worker).copied().unwrap_or_default();
        let restarted = now
            .fields()
            .iter()
            .zip(before.fields())
            .any(|(n, b)| n.1 < b.1);
        for ((k, n), (_, b)) in now.fields().into_iter().zip(before.fields()) {
            let delta = if restarted { n } else { n - b };
            if let Some(c) = self.worker_io.get(k) {
                c.with_label_values(&[worker]).inc_by(delta);
            }
        }
        if now.commits > 0 {
            self.worker_exceptions_per_commit
                .with_label_values(&[worker])
                .set(now.exceptions as f64 / now.commits as f64);
        }
        seen.insert(worker.to_string(), *now);
    }

    pub fn operation_done(&self, kind: OpKind, state: OpState) {
        self.operations_finished
            .with_label_values(&[kind.as_str(), state.as_str()])
            .inc();
    }

    pub fn repaired(&self, action: &str) {
        self.reconcile_repairs.with_label_values(&[action]).inc();
    }

    /// Refreshes the gauges from the catalog and renders every metric.
    pub async fn render(&self, catalog: &Catalog) -> anyhow::Result<String> {
        let mut c = catalog.conn().await?;
        self.operations.reset();
        for k in OpKind::ALL {
            for s in OpState::ALL {
                self.operations
                    .with_label_values(&[k.as_str(), s.as_str()])
                    .set(0);
            }
        }
        for (kind, state, n) in catalog::operations::counts(&mut c).await? {
            self.operations
                .with_label_values(&[kind.as_str(), state.as_str()])
                .set(n);
        }
        self.operation_percent.reset();
        for op in catalog::operations::active(&mut c).await? {
            if op.state == OpState::Running {
                self.operation_percent
                    .with_label_values(&[
                        op.name().as_str(),
                        op.kind.as_str(),
                        &op.target.to_string(),
                    ])
                    .set(op.percent);
            }
        }
        for g in [
            &self.worker_up,
            &self.worker_free_bytes,
            &self.worker_capacity_bytes,
            &self.worker_volumes,
        ] {
            g.reset();
        }
        for w in catalog::workers::list(&mut c).await? {
            let l = [w.name()];
            let l: [&str; 1] = [l[0].as_str()];
            self.worker_up
                .with_label_values(&l)
                .set(i64::from(w.healthy));
            self.worker_free_bytes
                .with_label_values(&l)
                .set(w.free_bytes as i64);
            self.worker_capacity_bytes
                .with_label_values(&l)
                .set(w.capacity_bytes as i64);
            self.worker_volumes
                .with_label_values(&l)
                .set(i64::from(w.volume_count));
        }
        for g in [
            &self.snapshot_allocated_bytes,
            &self.snapshot_total_bytes,
            &self.snapshot_metadata_bytes,
            &self.snapshot_exceptions,
        ] {
            g.reset();
        }
        for (s, _) in catalog::snapshots::list(&mut c, None, ("", 0), -1).await? {
            if let Some(u) = &s.usage {
                let name = s.name();
                let l = [name.as_str()];
                self.snapshot_allocated_bytes
                    .with_label_values(&l)
                    .set(u.allocated_bytes as i64);
                self.snapshot_total_bytes
                    .with_label_values(&l)
                    .set(u.total_bytes as i64);
                self.snapshot_metadata_bytes
                    .with_label_values(&l)
                    .set(u.metadata_bytes as i64);
                self.snapshot_exceptions
                    .with_label_values(&l)
                    .set(u.exceptions as i64);
            }
        }
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8(out)?)
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    catalog: Catalog,
    shutdown: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("metrics: accept failed: {e}");
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let (metrics, catalog) = (metrics.clone(), catalog.clone());
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (metrics, catalog) = (metrics.clone(), catalog.clone());
                    async move {
                        let resp = if req.uri().path() != "/metrics" {
                            hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::from("try /metrics\n")))
                        } else {
                            match metrics.render(&catalog).await {
                                Ok(text) => hyper::Response::builder()
                                    .header("content-type", "text/plain; version=0.0.4")
                                    .body(Full::new(Bytes::from(text))),
                                Err(e) => hyper::Response::builder()
                                    .status(500)
                                    .body(Full::new(Bytes::from(format!("{e:#}\n")))),
                            }
                        };
                        Ok::<_, std::convert::Infallible>(resp.expect("valid response"))
                    }
                });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: &str) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    let a = l.local_addr()?;
    Ok((l, a))
}
