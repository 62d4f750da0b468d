//! The control service: the public `cowsnap.v1` API (volumes, snapshots,
//! operations, workers) over a SQLite catalog, driving the data workers
//! through `cowsnap.worker.v1`.
//!
//! - [`server`]: running it ([`server::start`] with a
//!   [`server::ControlConfig`]), and the tower layers every call goes
//!   through: [`calls`] (tracing, deadlines, logs, metrics), [`auth`];
//! - [`api`]: thin gRPC handlers, one module per service;
//! - [`control`], [`volumes`], [`snapshots`]: what each call does (domain
//!   code, no gRPC); [`snapshot_ranges`]: snapshot deltas and allocated
//!   maps, read from the owning worker;
//! - [`operations`]: how mutations are recorded, driven and settled so a
//!   crash at any point is repaired; [`reconcile`]: the repairs, at start
//!   and periodically;
//! - [`workers`]: the registry (health, placement) and the worker client,
//!   whose channel layer reports each call's outcome ([`workers::classify`]);
//! - [`catalog`]: the SQLite schema and queries; [`model`]: domain types;
//!   [`listing`]: pagination and filters; [`error`];
//! - [`metrics`]: Prometheus; [`telemetry`]: logs and OTLP traces.

pub mod api;
pub mod auth;
pub mod calls;
pub mod catalog;
pub mod control;
pub mod error;
pub mod listing;
pub mod metrics;
pub mod model;
pub mod operations;
pub mod reconcile;
pub mod server;
pub mod snapshot_ranges;
pub mod snapshots;
pub mod telemetry;
pub mod volumes;
pub mod workers;

#[cfg(test)]
mod request_props;

/// Parsers of request headers that are otherwise private to their layers,
/// for the fuzz targets under `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    /// [`crate::calls`]' parser of a `grpc-timeout` value.
    pub fn grpc_timeout(v: &str) -> Option<std::time::Duration> {
        crate::calls::grpc_timeout(v)
    }

    /// [`crate::auth`]'s parser of an `authorization` value.
    pub fn bearer(v: &str) -> Option<&str> {
        crate::auth::bearer(v)
    }
}
