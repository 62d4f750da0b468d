//! The data workers: the registry of which workers exist (registration,
//! deregistration), their health, and placement of new volumes (on the
//! worker with the fewest volumes among those with room). The registry
//! alone writes a worker's health into the catalog.
//!
//! - `client`: the typed client of one worker, one line per call;
//! - `layer`: the tower layer its channel is built with, which reports
//!   each call's outcome to the worker's `Health`;
//! - [`classify`]: which gRPC codes mean done, refused, or unknown.
//!
//! A call that finds its worker unreachable marks the worker unhealthy at
//! once (through its channel's layer) and fails with `Unavailable`; the
//! periodic health check ([`Workers::check`]) marks it healthy again when
//! it answers.

pub mod classify;
mod client;
mod layer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cowsnap_proto::server::Listen;
use tonic::Status;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tower::ServiceBuilder;

pub use client::{TaskKind, WorkerClient, WorkerInfo, WorkerSnapshot, WorkerTask, WorkerVolume};

use crate::catalog::{self, Catalog};
use crate::error::{ControlError, Result};
use crate::metrics::Metrics;
use crate::model::{self, Worker, now_ms};
use classify::Outcome;
use layer::ObserveLayer;

/// Where the channel of a worker's client reports the outcome of each
/// call: the registry's record of that worker's health. A call left
/// without an answer marks the worker unhealthy at once. Only a health
/// check marks it healthy again, since that also refreshes what the
/// worker reports about itself (room, I/O).
#[derive(Clone)]
pub(crate) struct Health {
    catalog: Catalog,
    /// `None` for an address not registered yet (a probe).
    worker_id: Option<String>,
    address: String,
}

impl Health {
    pub(crate) async fn report(&self, outcome: Outcome, status: &Status) {
        let (Outcome::Unknown, Some(id)) = (outcome, &self.worker_id) else {
            return;
        };
        let why = classify::error(status, id, &self.address).to_string();
        if let Ok(mut c) = self.catalog.conn().await
            && let Err(e) = catalog::workers::set_unhealthy(&mut c, id, &why).await
        {
            tracing::warn!(worker = %id, "cannot record that it does not answer: {e}");
        }
    }
}

/// How the control service reaches workers.
#[derive(Clone, Debug)]
pub struct WorkerConnect {
    /// Per-call deadline.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// mTLS to workers on TCP addresses (none on unix sockets).
    pub tls: Option<ClientTlsConfig>,
}

/// The registered workers and their clients.
pub struct Workers {
    catalog: Catalog,
    connect: WorkerConnect,
    channels: Mutex<HashMap<String, Channel>>,
    metrics: Arc<Metrics>,
}

impl Workers {
    pub fn new(catalog: Catalog, connect: WorkerConnect, metrics: Arc<Metrics>) -> Workers {
        Workers {
            catalog,
            connect,
            channels: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn channel(&self, address: &str) -> Result<Channel> {
        if let Some(c) = self.channels.lock().expect("channels").get(address) {
            return Ok(c.clone());
        }
        let listen: Listen = address
            .parse()
            .map_err(|e: String| ControlError::invalid("address", e))?;
        let bad = |e: tonic::transport::Error| {
            ControlError::invalid("address", format!("{address}: {e}"))
        };
        let channel = match listen {
            Listen::Tcp(hostport) => {
                let scheme = if self.connect.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                let mut ep = Endpoint::from_shared(format!("{scheme}://{hostport}"))
                    .map_err(bad)?
                    .connect_timeout(self.connect.connect_timeout)
                    .timeout(self.connect.timeout)
                    .tcp_nodelay(true);
                if let Some(tls) = &self.connect.tls {
                    ep = ep.tls_config(tls.clone()).map_err(bad)?;
                }
                ep.connect_lazy()
            }
            Listen::Unix(path) => Endpoint::from_static("http://worker.local")
                .connect_timeout(self.connect.connect_timeout)
                .timeout(self.connect.timeout)
                .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                })),
        };
        self.channels
            .lock()
            .expect("channels")
            .insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    /// A client of the worker at `address` (`id` empty for a probe of an
    /// address not registered yet).
    fn client_at(&self, id: &str, address: &str) -> Result<WorkerClient> {
        let health = Health {
            catalog: self.catalog.clone(),
            worker_id: (!id.is_empty()).then(|| id.to_string()),
            address: address.to_string(),
        };
        let channel = ServiceBuilder::new()
            .layer(ObserveLayer::new(health))
            .service(self.channel(address)?);
        Ok(WorkerClient::new(id, address, channel))
    }

    /// The client of a registered worker.
    pub async fn client(&self, worker_id: &str) -> Result<WorkerClient> {
        self.client_of(&self.get_uncounted(worker_id).await?)
    }

    /// The client of worker `w`, read from the catalog by the caller.
    pub fn client_of(&self, w: &Worker) -> Result<WorkerClient> {
        self.client_at(&w.id, &w.address)
    }

    /// A registered worker without its volume count (0 here; see
    /// [`catalog::workers::get_uncounted`]): what calls on it need.
    pub async fn get_uncounted(&self, worker_id: &str) -> Result<Worker> {
        let mut c = self.catalog.conn().await?;
        catalog::workers::get_uncounted(&mut c, worker_id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("workers/{worker_id} not found")))
    }

    pub async fn get(&self, worker_id: &str) -> Result<Worker> {
        let mut c = self.catalog.conn().await?;
        catalog::workers::get(&mut c, worker_id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("workers/{worker_id} not found")))
    }

    pub async fn list(&self) -> Result<Vec<Worker>> {
        let mut c = self.catalog.conn().await?;
        catalog::workers::list(&mut c).await
    }

    /// Registers the worker at `address` (or updates a registered one that
    /// moved there). It must answer.
    pub async fn register(&self, address: &str, worker_id: Option<&str>) -> Result<Worker> {
        if address.is_empty() {
            return Err(ControlError::invalid("address", "must not be empty"));
        }
        if let Some(id) = worker_id {
            model::check_id("worker_id", id)?;
        }
        let probe = self.client_at("", address)?;
        let info = probe.info().await.map_err(|e| {
            ControlError::Unavailable(format!("the worker at {address} does not answer: {e}"))
        })?;
        let id = worker_id
            .map(str::to_string)
            .unwrap_or_else(|| model::worker_id_from_node(&info.node));
        let now = now_ms();
        let mut tx = self.catalog.write().await?;
        let existing = catalog::workers::list(&mut tx).await?;
        // The address of another worker: refused, even when the worker
        // answering there now is on another node (the other one moved away
        // and its pod's address was reused). The catalog keeps the other
        // worker and its volumes as they are; once it registers at its new
        // address (workers re-register periodically) or is deregistered,
        // this one's next attempt succeeds.
        if let Some(other) = existing.iter().find(|w| w.address == address && w.id != id) {
            return Err(ControlError::AlreadyExists(format!(
                "{address} is already registered as {} (node {}); the worker answering there \
                 is on node {}: {} must register at its new address, or be deregistered, first",
                other.name(),
                other.node,
                info.node,
                other.name()
            )));
        }
        let old = existing.iter().find(|w| w.id == id);
        if let Some(old) = old
            && old.node != info.node
        {
            return Err(ControlError::AlreadyExists(format!(
                "{} is the worker of node {}; the worker at {address} is on node {}",
                old.name(),
                old.node,
                info.node
            )));
        }
        let w = Worker {
            id: id.clone(),
            address: address.to_string(),
            node: info.node,
            nbd_uri: info.nbd_uri,
            capacity_bytes: info.capacity_bytes,
            free_bytes: info.free_bytes,
            version: info.version,
            io_backend: info.io_backend,
            healthy: true,
            last_error: String::new(),
            last_seen_time: now,
            create_time: old.map_or(now, |o| o.create_time),
            volume_count: old.map_or(0, |o| o.volume_count),
        };
        catalog::workers::upsert(&mut tx, &w).await?;
        tx.commit().await?;
        if let Some(o) = old.filter(|o| o.address != address) {
            self.channels.lock().expect("channels").remove(&o.address);
            tracing::info!(worker = %w.name(), address, from = %o.address, "worker moved");
        } else if old.is_none() {
            tracing::info!(worker = %w.name(), address, node = %w.node, "worker registered");
        }
        Ok(w)
    }

    /// Checks a worker's health now (`grpc.health.v1`, then GetWorkerInfo)
    /// and records what it found.
    pub async fn check(&self, w: &Worker) -> Result<Worker> {
        let client = self.client_at(&w.id, &w.address)?;
        // Whoever answers at a network address must be this worker: after
        // its pod moved, another node's worker may hold the address now,
        // and its room or NBD endpoint must not be taken for this one's. A
        // unix socket is on this machine (`cowsnap up` keeps it in its data
        // dir), so a renamed host there is still the same worker.
        let local = w.address.starts_with("unix:");
        let result = client.check().await.and_then(|info| {
            if local || info.node == w.node {
                Ok(info)
            } else {
                Err(ControlError::Unavailable(format!(
                    "the worker at {} is now the one of node {}, not {}'s (node {}); \
                     {} answers again once it registers at its new address",
                    w.address,
                    info.node,
                    w.name(),
                    w.node,
                    w.name()
                )))
            }
        });
        let mut c = self.catalog.conn().await?;
        match result {
            Ok(info) => {
                self.metrics.worker_io(&w.name(), &info.io);
                let mut fresh = w.clone();
                fresh.nbd_uri = info.nbd_uri;
                fresh.capacity_bytes = info.capacity_bytes;
                fresh.free_bytes = info.free_bytes;
                fresh.version = info.version;
                fresh.io_backend = info.io_backend;
                fresh.healthy = true;
                fresh.last_error.clear();
                fresh.last_seen_time = now_ms();
                if !w.healthy {
                    tracing::info!(worker = %w.name(), "worker answers again");
                }
                catalog::workers::upsert(&mut c, &fresh).await?;
            }
            Err(e) => {
                if w.healthy {
                    tracing::warn!(worker = %w.name(), address = %w.address, "worker unhealthy: {e}");
                }
                catalog::workers::set_unhealthy(&mut c, &w.id, &e.to_string()).await?;
            }
        }
        catalog::workers::get(&mut c, &w.id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("{} not found", w.name())))
    }

    /// Forgets a worker that holds no volume.
    pub async fn deregister(&self, worker_id: &str) -> Result<()> {
        let mut tx = self.catalog.write().await?;
        let w = catalog::workers::get(&mut tx, worker_id)
            .await?
            .ok_or_else(|| ControlError::NotFound(format!("workers/{worker_id} not found")))?;
        if w.volume_count > 0 {
            return Err(ControlError::FailedPrecondition(format!(
                "{} holds {} volume(s); delete them first",
                w.name(),
                w.volume_count
            )));
        }
        catalog::workers::delete(&mut tx, worker_id).await?;
        tx.commit().await?;
        self.channels.lock().expect("channels").remove(&w.address);
        tracing::info!(worker = %w.name(), "worker deregistered");
        Ok(())
    }

    /// Where a new volume of `size` bytes goes: among the healthy workers
    /// with room for it (room taken by volumes still being created counts
    /// as used), the one holding the fewest volumes, then the one with the
    /// most room. Workers on one file system report the same free room,
    /// and a sparse volume barely changes it: by room alone, every volume
    /// would go to whichever worker reported a few bytes more at its last
    /// health check.
    pub async fn place(&self, size: u64) -> Result<Worker> {
        self.place_among(size, &[]).await
    }

    /// Where a new volume of `size` bytes goes: with no `candidates`, as
    /// [`Workers::place`]; else the first of the candidate worker ids, in
    /// their order of preference, that is healthy and has room.
    pub async fn place_among(&self, size: u64, candidates: &[String]) -> Result<Worker> {
        let mut c = self.catalog.conn().await?;
        let all = catalog::workers::list(&mut c).await?;
        if !candidates.is_empty() {
            let mut why = Vec::new();
            for id in candidates {
                let Some(w) = all.iter().find(|w| &w.id == id) else {
                    why.push(format!("workers/{id} is not registered"));
                    continue;
                };
                if !w.healthy {
                    why.push(format!("{} does not answer", w.name()));
                    continue;
                }
                let room = w
                    .free_bytes
                    .saturating_sub(catalog::volumes::creating_bytes(&mut c, &w.id).await?);
                if room < size {
                    why.push(format!("{} has room for {room} bytes", w.name()));
                    continue;
                }
                return Ok(w.clone());
            }
            return Err(ControlError::ResourceExhausted(format!(
                "no allowed worker can hold {size} bytes: {}",
                why.join("; ")
            )));
        }
        if all.is_empty() {
            return Err(ControlError::FailedPrecondition(
                "no worker is registered (WorkerService.RegisterWorker)".into(),
            ));
        }
        // The fewest volumes among workers with room; if none has room,
        // the most room there is, for the error.
        let mut fits: Option<(u64, Worker)> = None;
        let mut roomiest: Option<(u64, Worker)> = None;
        let mut healthy = 0;
        for w in all {
            if !w.healthy {
                continue;
            }
            healthy += 1;
            let room = w
                .free_bytes
                .saturating_sub(catalog::volumes::creating_bytes(&mut c, &w.id).await?);
            if room >= size
                && fits.as_ref().is_none_or(|(r, f)| {
                    (w.volume_count, std::cmp::Reverse(room))
                        < (f.volume_count, std::cmp::Reverse(*r))
                })
            {
                fits = Some((room, w.clone()));
            }
            if roomiest.as_ref().is_none_or(|(r, _)| room > *r) {
                roomiest = Some((room, w));
            }
        }
        match (fits, roomiest) {
            (Some((_, w)), _) => Ok(w),
            (None, None) => Err(ControlError::Unavailable(format!(
                "no worker is healthy ({healthy} of them answer)"
            ))),
            (None, Some((room, w))) => Err(ControlError::ResourceExhausted(format!(
                "no worker has room for {size} bytes: the most is {room} bytes on {}",
                w.name()
            ))),
        }
    }
}
