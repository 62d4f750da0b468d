//! `cowsnap.v1.WorkerService`, for operators.

use cowsnap_proto::cowsnap::v1 as pb;
use pb::worker_service_server::WorkerService;
use tonic::{Request, Response};

use super::convert::worker;
use super::{Api, Rpc};

#[tonic::async_trait]
impl WorkerService for Api {
    async fn register_worker(&self, r: Request<pb::RegisterWorkerRequest>) -> Rpc<pb::Worker> {
        let r = r.into_inner();
        let w = self
            .control
            .register_worker(&r.address, &r.worker_id)
            .await?;
        Ok(Response::new(worker(w)))
    }

    async fn get_worker(&self, r: Request<pb::GetWorkerRequest>) -> Rpc<pb::Worker> {
        let w = self.control.get_worker(&r.into_inner().name).await?;
        Ok(Response::new(worker(w)))
    }

    async fn list_workers(
        &self,
        _: Request<pb::ListWorkersRequest>,
    ) -> Rpc<pb::ListWorkersResponse> {
        let ws = self.control.list_workers().await?;
        Ok(Response::new(pb::ListWorkersResponse {
            workers: ws.into_iter().map(worker).collect(),
        }))
    }

    async fn deregister_worker(&self, r: Request<pb::DeregisterWorkerRequest>) -> Rpc<()> {
        self.control.deregister_worker(&r.into_inner().name).await?;
        Ok(Response::new(()))
    }
}
