//! The control service's domain: what each public call does, over the
//! catalog, the workers and the operation engine. It knows nothing of
//! gRPC (`api` translates). Volume calls live in [`crate::volumes`],
//! snapshot calls in [`crate::snapshots`]; operations and workers here.

use std::sync::Arc;
use std::time::Duration;

use cowsnap_proto::names::quote;

use crate::catalog::{self, Catalog};
use crate::error::{ControlError, Result};
use crate::listing;
use crate::model::{self, OpKind, OpState, Operation, Worker};
use crate::operations::Operations;
use crate::workers::{WorkerClient, Workers};

/// The operation id a ListOperations page token resumes before
/// (`i64::MAX` for none).
pub fn operation_cursor(page_token: &str) -> Result<i64> {
    let after = listing::after("operations", page_token)?;
    if after.is_empty() {
        return Ok(i64::MAX);
    }
    after
        .parse()
        .map_err(|_| ControlError::invalid("page_token", "not a token from this list"))
}

/// A ListOperations filter: `done=true|false`, `target=NAME`, `kind=K`,
/// `state=S`, joined with ` AND `.
#[derive(Debug, Default)]
pub struct OperationFilter {
    done: Option<bool>,
    target: Option<String>,
    kind: Option<OpKind>,
    state: Option<OpState>,
}

impl OperationFilter {
    pub fn parse(filter: &str) -> Result<OperationFilter> {
        let mut f = OperationFilter::default();
        for (k, v) in listing::filter_terms(filter)? {
            match k.as_str() {
                "done" => {
                    f.done = Some(v.parse::<bool>().map_err(|_| {
                        ControlError::invalid(
                            "filter",
                            format!("done={}: true or false", quote(&v)),
                        )
                    })?)
                }
                "target" => f.target = Some(v),
                "kind" => {
                    f.kind = Some(OpKind::parse(&v).ok_or_else(|| {
                        ControlError::invalid(
                            "filter",
                            format!("kind={}: not an operation kind", quote(&v)),
                        )
                    })?)
                }
                "state" => {
                    f.state = Some(OpState::parse(&v).ok_or_else(|| {
                        ControlError::invalid(
                            "filter",
                            format!("state={}: not an operation state", quote(&v)),
                        )
                    })?)
                }
                _ => {
                    return Err(ControlError::invalid(
                        "filter",
                        format!("unknown term {} (done, target, kind, state)", quote(&k)),
                    ));
                }
            }
        }
        Ok(f)
    }

    fn matches(&self, o: &Operation) -> bool {
        self.done.is_none_or(|d| o.state.done() == d)
            && self
                .target
                .as_ref()
                .is_none_or(|t| o.target.to_string() == *t)
            && self.kind.is_none_or(|k| o.kind == k)
            && self.state.is_none_or(|s| o.state == s)
    }
}

/// The domain services behind the public API.
pub struct Control {
    pub(crate) catalog: Catalog,
    pub(crate) workers: Arc<Workers>,
    /// Records, drives and tracks the mutations.
    pub(crate) ops: Arc<Operations>,
    /// Longest WaitOperation wait (below the request timeout).
    max_wait: Duration,
}

impl Control {
    pub fn new(
        catalog: Catalog,
        workers: Arc<Workers>,
        ops: Arc<Operations>,
        max_wait: Duration,
    ) -> Control {
        Control {
            catalog,
            workers,
            ops,
            max_wait,
        }
    }

    /// The client of a worker about to be given an operation. Fails with
    /// UNAVAILABLE, before anything is recorded, when the worker failed its
    /// last health check and still does not answer.
    pub(crate) async fn ensure_reachable(&self, worker_id: &str) -> Result<WorkerClient> {
        let w = self.workers.get_uncounted(worker_id).await?;
        if w.healthy {
            return self.workers.client_of(&w);
        }
        let w = self.workers.check(&w).await?;
        if w.healthy {
            self.workers.client_of(&w)
        } else {
            Err(ControlError::Unavailable(format!(
                "{} ({}) does not answer: {}",
                w.name(),
                w.address,
                w.last_error
            )))
        }
    }

    /// Records operation `new` in `tx` beside what the caller wrote there,
    /// commits both at once (D11 of docs/design.md: the intent is durable
    /// before any worker acts), and drives it ([`Operations::drive_op`];
    /// `w`: its worker's client, when the caller has it).
    pub(crate) async fn record_and_drive(
        &self,
        mut tx: catalog::Tx,
        new: catalog::operations::NewOp<'_>,
        now: i64,
        w: Option<WorkerClient>,
    ) -> Result<Operation> {
        let op = catalog::operations::insert(&mut tx, new, now).await?;
        tx.commit().await?;
        self.ops.notify();
        self.ops.drive_op(op, w).await
    }

    /// Whether the catalog answers a query now.
    pub async fn catalog_ready(&self) -> Result<()> {
        let mut c = self.catalog.conn().await?;
        sqlx::query("SELECT 1").execute(&mut *c).await?;
        Ok(())
    }

    // ---- operations -----------------------------------------------------

    pub async fn get_operation(&self, name: &str) -> Result<Operation> {
        self.ops.get(model::parse_operation(name)?).await
    }

    /// Operations, newest first: a page of them and the next page token.
    pub async fn list_operations(
        &self,
        page_size: i32,
        page_token: &str,
        filter: &str,
    ) -> Result<(Vec<Operation>, String)> {
        let size = listing::page_size(page_size)?;
        let before = operation_cursor(page_token)?;
        let filter = OperationFilter::parse(filter)?;
        let mut c = self.catalog.conn().await?;
        let all = catalog::operations::list_before(&mut c, before).await?;
        let mut page: Vec<Operation> = all
            .into_iter()
            .filter(|o| filter.matches(o))
            .take(size + 1)
            .collect();
        let next = if page.len() > size {
            page.truncate(size);
            listing::token("operations", &page[size - 1].id.to_string())
        } else {
            String::new()
        };
        Ok((page, next))
    }

    /// Waits until the operation is done or `timeout` (at most the
    /// server's limit) passes.
    pub async fn wait_operation(&self, name: &str, timeout: Duration) -> Result<Operation> {
        let id = model::parse_operation(name)?;
        self.ops.wait(id, timeout.min(self.max_wait)).await
    }

    // ---- workers --------------------------------------------------------

    pub async fn register_worker(&self, address: &str, worker_id: &str) -> Result<Worker> {
        let id = (!worker_id.is_empty()).then_some(worker_id);
        self.workers.register(address, id).await
    }

    /// A worker, checked now.
    pub async fn get_worker(&self, name: &str) -> Result<Worker> {
        let id = model::parse_worker(name)?;
        let w = self.workers.get(id).await?;
        self.workers.check(&w).await
    }

    pub async fn list_workers(&self) -> Result<Vec<Worker>> {
        self.workers.list().await
    }

    pub async fn deregister_worker(&self, name: &str) -> Result<()> {
        let id = model::parse_worker(name)?;
        self.workers.deregister(id).await
    }
}
