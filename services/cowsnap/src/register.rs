//! A worker announcing itself to the control service (`cowsnap worker
//! --register-with`): RegisterWorker with the address the control service
//! reaches it at, on start and then every interval, so a worker on a node
//! added later, a worker whose pod moved to a new address, and a control
//! service that lost its catalog all end up with the worker registered.
//!
//! The control service's catalog stays the source of truth: registering the
//! same id at the same address changes nothing there, a new address moves
//! the worker (its volumes stay its own), and a refusal (a wrong token, an
//! address or id another worker holds) is logged and tried again with
//! backoff. Nothing here can stop the worker's data path.

use std::time::Duration;

use cowsnap_proto::cowsnap::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::admin::{Conn, code_name};

/// The first retry after a failure; each further one waits twice as long,
/// up to the registration interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest one registration may take (the control service probes the
/// worker before answering).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and as what the worker registers.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The control service (as `cowsnap volume --server`).
    pub control: Conn,
    /// Shown in logs.
    pub control_addr: String,
    /// The worker's gRPC address as the control service reaches it.
    pub advertise: String,
    /// The id it registers as: the CSI node id too.
    pub worker_id: String,
    /// Between two registrations that worked.
    pub interval: Duration,
}

/// One RegisterWorker call: the worker as the control service recorded it.
async fn register_once(r: &Registration) -> anyhow::Result<pb::Worker> {
    let bearer = r.control.bearer()?;
    let ch = r.control.channel().await?;
    let mut client = pb::worker_service_client::WorkerServiceClient::with_interceptor(ch, bearer);
    let mut req = tonic::Request::new(pb::RegisterWorkerRequest {
        address: r.advertise.clone(),
        worker_id: r.worker_id.clone(),
    });
    req.set_timeout(CALL_TIMEOUT);
    match client.register_worker(req).await {
        Ok(w) => Ok(w.into_inner()),
        Err(s) => Err(anyhow::anyhow!("{}: {}", code_name(s.code()), s.message())),
    }
}

/// Registers now and then every `interval` until `shutdown`; after a
/// failure, again after 1 s, 2 s, 4 s ... (at most `interval`).
pub async fn run(r: Registration, shutdown: CancellationToken) {
    let mut registered = false;
    let mut retry = FIRST_RETRY;
    let mut failures = 0u64;
    loop {
        let wait = match register_once(&r).await {
            Ok(w) => {
                if !registered {
                    tracing::info!(
                        control = %r.control_addr, worker = %w.name, address = %w.address,
                        "registered with the control service"
                    );
                }
                registered = true;
                failures = 0;
                retry = FIRST_RETRY;
                r.interval
            }
            Err(e) => {
                registered = false;
                failures += 1;
                tracing::warn!(
                    control = %r.control_addr, worker = %r.worker_id, address = %r.advertise,
                    failures, "cannot register with the control service (retrying in {retry:?}): {e:#}"
                );
                let wait = retry;
                retry = (retry * 2).min(r.interval.max(FIRST_RETRY));
                wait
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
