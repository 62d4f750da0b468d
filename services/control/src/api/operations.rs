//! `cowsnap.v1.OperationService`.

use std::time::Duration;

use cowsnap_proto::cowsnap::v1 as pb;
use pb::operation_service_server::OperationService;
use tonic::{Request, Response};

use super::convert::operation;
use super::{Api, Rpc};
use crate::error::{ControlError, Result};

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
        let timeout = timeout(r.timeout)?;
        let op = self.control.wait_operation(&r.name, timeout).await?;
        Ok(Response::new(operation(op)))
    }
}

/// WaitOperation's `timeout`: none is zero; a valid protobuf Duration
/// (`nanos` from 0 to 999,999,999; not negative, which means nothing here).
pub(crate) fn timeout(d: Option<prost_types::Duration>) -> Result<Duration> {
    let Some(d) = d else {
        return Ok(Duration::ZERO);
    };
    if !(0..=999_999_999).contains(&d.nanos) {
        return Err(ControlError::invalid(
            "timeout",
            format!("nanos {} is not from 0 to 999999999", d.nanos),
        ));
    }
    if d.seconds < 0 {
        return Err(ControlError::invalid("timeout", "must not be negative"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}
