//! The public gRPC API (`cowsnap.v1`): one thin module per service that
//! turns requests into calls on [`Control`] and results into messages.
//! Proto types stop here; [`convert`] maps domain values and errors.

pub mod convert;
pub mod operations;
pub mod snapshots;
pub mod volumes;
pub mod workers;

use std::sync::Arc;

use crate::control::Control;

/// The handlers' shared state.
#[derive(Clone)]
pub struct Api {
    pub(crate) control: Arc<Control>,
}

impl Api {
    pub fn new(control: Arc<Control>) -> Api {
        Api { control }
    }
}

type Rpc<T> = Result<tonic::Response<T>, tonic::Status>;
