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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic::Code;
    use tonic_health::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Answer;
    use tonic_health::pb::health_client::HealthClient;
    use tower::ServiceBuilder;

    use super::*;
    use crate::catalog::{self, Catalog};
    use crate::metrics::Metrics;
    use crate::model::Worker;
    use crate::workers::{WorkerConnect, Workers};

    fn worker(id: &str, address: &str) -> Worker {
        Worker {
            id: id.into(),
            address: address.into(),
            node: "n1".into(),
            nbd_uri: String::new(),
            capacity_bytes: 0,
            free_bytes: 0,
            version: String::new(),
            io_backend: String::new(),
            healthy: true,
            last_error: String::new(),
            last_seen_time: 0,
            create_time: 0,
            volume_count: 0,
        }
    }

    async fn recorded(catalog: &Catalog, id: &str) -> Worker {
        let mut c = catalog.conn().await.unwrap();
        catalog::workers::get(&mut c, id).await.unwrap().unwrap()
    }

    /// A real gRPC server (`grpc.health.v1` only) on a unix socket, a real
    /// catalog, and a registered worker there: what each kind of answer
    /// does to the worker's recorded health, seen as soon as the call
    /// returns.
    #[tokio::test]
    async fn outcomes_reach_the_worker_health_before_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&dir.path().join("catalog.db")).await.unwrap();
        let sock = dir.path().join("w.sock");
        let address = format!("unix:{}", sock.display());
        {
            let mut c = catalog.conn().await.unwrap();
            catalog::workers::upsert(&mut c, &worker("w1", &address))
                .await
                .unwrap();
        }
        let (reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("serving", ServingStatus::Serving)
            .await;
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn({
            let stop = stop.clone();
            tonic::transport::Server::builder()
                .add_service(health_service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    stop.cancelled_owned(),
                )
        });
        let workers = Workers::new(
            catalog.clone(),
            WorkerConnect {
                timeout: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(5),
                tls: None,
            },
            Metrics::new(),
        );
        let channel = workers.channel(&address).unwrap();
        let health = Health {
            catalog: catalog.clone(),
            worker_id: Some("w1".into()),
            address: address.clone(),
        };
        let mut client = HealthClient::new(
            ServiceBuilder::new()
                .layer(ObserveLayer::new(health))
                .service(channel.clone()),
        );
        let check = |service: &str| HealthCheckRequest {
            service: service.into(),
        };

        // Done: the status comes in the trailers after the message, which
        // the layer reads and hands on intact.
        let r = client.check(check("serving")).await.unwrap();
        assert_eq!(r.get_ref().status, Answer::Serving as i32);
        assert!(recorded(&catalog, "w1").await.healthy);

        // Refused: the worker answered with an error (in the headers).
        let s = client.check(check("no-such-service")).await.unwrap_err();
        assert_eq!(s.code(), Code::NotFound);
        assert!(recorded(&catalog, "w1").await.healthy);

        // The worker goes away: no answer, so the outcome is unknown, and
        // the worker is recorded unhealthy by the time the call fails.
        stop.cancel();
        server.await.unwrap().unwrap();
        let _ = std::fs::remove_file(&sock);
        let s = client.check(check("serving")).await.unwrap_err();
        assert_eq!(classify::outcome(s.code()), classify::Outcome::Unknown);
        let w = recorded(&catalog, "w1").await;
        assert!(!w.healthy);
        assert!(
            w.last_error
                .starts_with(&format!("worker workers/w1 ({address}) does not answer: ")),
            "{}",
            w.last_error
        );

        // A probe of an address nobody registered records nothing.
        {
            let mut c = catalog.conn().await.unwrap();
            catalog::workers::upsert(&mut c, &worker("w1", &address))
                .await
                .unwrap();
        }
        let probe = workers.client_at("", &address).unwrap();
        let e = probe.info().await.unwrap_err();
        assert!(classify::unknown(&e), "{e}");
        assert!(recorded(&catalog, "w1").await.healthy);
        // While the registered worker's client records it.
        let e = workers
            .client("w1")
            .await
            .unwrap()
            .info()
            .await
            .unwrap_err();
        assert!(classify::unknown(&e), "{e}");
        assert!(!recorded(&catalog, "w1").await.healthy);
    }
}
