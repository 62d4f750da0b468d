//! `cowsnap.v1.OperationService`.

use std::time::Duration;

use cowsnap_proto::cowsnap::v1 as pb;
use pb::operation_service_server::OperationService;
use tonic::{Request, Response, Status};

use super::convert::operation;
use super::{Api, Rpc};

#[tonic::async_trait]
impl OperationService for Api {
    async fn get_operation(&self, r: Request<pb::GetOperationRequest>) -> Rpc<pb::Operation> {
        let op = self.control.get_operation(&r.into_inner().name).await?;
        Ok(Response::new(operation(op)))
    }

    async fn list_operations(
        &self,
        r: Request<pb::ListOperationsRequest>,
    ) -> Rpc<pb::ListOperationsResponse> {
        let r = r.into_inner();
        let (ops, next) = self
            .control
            .list_operations(r.page_size, &r.page_token, &r.filter)
            .await?;
        Ok(Response::new(pb::ListOperationsResponse {
            operations: ops.into_iter().map(operation).collect(),
            next_page_token: next,
        }))
    }

    async fn wait_operation(&self, r: Request<pb::WaitOperationRequest>) -> Rpc<pb::Operation> {
        let r = r.into_inner();
        let timeout = match r.timeout {
            None => Duration::ZERO,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(Status::invalid_argument(
                    "invalid timeout: must not be negative",
                ));
            }
            Some(d) => Duration::new(d.seconds as u64, d.nanos as u32),
        };
        let op = self.control.wait_operation(&r.name, timeout).await?;
        Ok(Response::new(operation(op)))
    }
}
