//! The tower layer around a worker's channel: it finds the gRPC status
//! each call ends with, classifies it ([`classify::outcome`]) and reports
//! it to the worker's health ([`Health`]) before the caller sees the
//! answer, so a call that finds its worker gone has marked it unhealthy by
//! the time it fails.
//!
//! A call's status arrives in one of three places: as an error of the
//! channel (no connection, the deadline passed), in the response headers
//! (a trailers-only response, which is how a tonic server sends every
//! error of a unary call), or in the trailers after the message. The
//! worker API is unary with small messages, so in the last case the layer
//! reads the response whole, learns its status, and hands on the same
//! bytes and trailers.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service, ServiceExt};

use super::Health;
use super::classify;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps a channel in [`Observe`].
#[derive(Clone)]
pub struct ObserveLayer {
    health: Health,
}

impl ObserveLayer {
    pub(crate) fn new(health: Health) -> ObserveLayer {
        ObserveLayer { health }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            health: self.health.clone(),
        }
    }
}

/// A channel whose calls report their outcome to the worker's health.
/// Its errors are the statuses the caller gets.
#[derive(Clone)]
pub struct Observe<S> {
    inner: S,
    health: Health,
}

impl<S> Service<http::Request<Body>> for Observe<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Status>>;

    /// Always ready: each call waits for the channel itself, so that a
    /// channel that cannot take calls is an outcome reported like any
    /// other.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(answer(self.inner.clone(), req, self.health.clone()))
    }
}

/// Makes the call and reports the status it ended with; returns what the
/// caller gets.
async fn answer<S>(
    inner: S,
    req: http::Request<Body>,
    health: Health,
) -> Result<http::Response<Body>, Status>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Error: Into<BoxError>,
{
    let response = inner
        .oneshot(req)
        .await
        .map_err(|e| Status::from_error(e.into()));
    let response = match response {
        Ok(r) => r,
        Err(s) => {
            report(&health, &s).await;
            return Err(s);
        }
    };
    if let Some(s) = Status::from_header_map(response.headers()) {
        report(&health, &s).await;
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    // A body's error is the status tonic's client would make of it.
    let whole = body.collect().await;
    let whole = match whole {
        Ok(w) => w,
        Err(s) => {
            report(&health, &s).await;
            return Err(s);
        }
    };
    let trailers = whole.trailers().cloned();
    let status = trailers
        .as_ref()
        .and_then(Status::from_header_map)
        .unwrap_or_else(|| {
            Status::new(
                classify::http_code(parts.status),
                format!("no grpc-status in the answer (HTTP {})", parts.status),
            )
        });
    report(&health, &status).await;
    let body = Full::new(whole.to_bytes()).with_trailers(std::future::ready(trailers.map(Ok)));
    Ok(http::Response::from_parts(parts, Body::new(body)))
}

/// Tells the worker's health how a call ended.
async fn report(health: &Health, s: &Status) {
    health.report(classify::outcome(s.code()), s).await;
}
