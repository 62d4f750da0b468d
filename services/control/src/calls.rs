//! The per-call tower layer: a tracing span for each gRPC call (child of
//! the caller's trace when it sends a `traceparent`), its deadline (the
//! server's request timeout, or the caller's `grpc-timeout` when shorter:
//! DEADLINE_EXCEEDED past it), a log line, and the RPC metrics. Stacked in
//! [`crate::server`].

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tonic::{Code, Status};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct CallLayer {
    metrics: Arc<Metrics>,
    timeout: Duration,
}

impl CallLayer {
    pub fn new(metrics: Arc<Metrics>, timeout: Duration) -> CallLayer {
        CallLayer { metrics, timeout }
    }
}

impl<S> Layer<S> for CallLayer {
    type Service = Call<S>;
    fn layer(&self, inner: S) -> Call<S> {
        Call {
            inner,
            metrics: self.metrics.clone(),
            timeout: self.timeout,
        }
    }
}

#[derive(Clone)]
pub struct Call<S> {
    inner: S,
    metrics: Arc<Metrics>,
    timeout: Duration,
}

/// A `grpc-timeout` value (`100m`, `5S`, ...).
pub(crate) fn grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 {
        return None;
    }
    // `get`, not a slice: the last byte may end a multi-byte character.
    let (n, unit) = (v.get(..v.len() - 1)?, v.get(v.len() - 1..)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Health checks and reflection are logged at debug level only.
fn quiet(method: &str) -> bool {
    method.starts_with("/grpc.")
}

impl<S, B> Service<http::Request<B>> for Call<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let span = tracing::info_span!(
            "grpc",
            otel.name = %method,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        crate::telemetry::set_remote_parent(&span, req.headers());
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout)
            .map_or(self.timeout, |t| t.min(self.timeout));
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        let start = Instant::now();
        Box::pin(
            async move {
                let r = match tokio::time::timeout(deadline, fut).await {
                    Ok(r) => r,
                    Err(_) => Ok(Status::deadline_exceeded(format!(
                        "{method}: no answer within {deadline:?}"
                    ))
                    .into_http()),
                };
                let elapsed = start.elapsed();
                let (code, message) = match &r {
                    Ok(resp) => {
                        let h = resp.headers();
                        let code = h
                            .get("grpc-status")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|s| s.parse::<i32>().ok())
                            .map_or(Code::Ok, Code::from_i32);
                        let msg = h
                            .get("grpc-message")
                            .and_then(|v| v.to_str().ok())
                            .map(percent_decode)
                            .unwrap_or_default();
                        (code, msg)
                    }
                    Err(e) => (Code::Internal, e.to_string()),
                };
                tracing::Span::current().record("rpc.grpc.status_code", code as i32);
                metrics.rpc(&method, &format!("{code:?}"), elapsed.as_secs_f64());
                let ms = elapsed.as_secs_f64() * 1000.0;
                if quiet(&method) {
                    tracing::debug!(method, ?code, ms, "call");
                } else if code == Code::Ok {
                    tracing::info!(method, ?code, ms, "call");
                } else {
                    tracing::info!(method, ?code, ms, message, "call failed");
                }
                r
            }
            .instrument(span),
        )
    }
}

/// `grpc-message` is percent-encoded.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(grpc_timeout("5x"), None);
        assert_eq!(grpc_timeout("S"), None);
        assert_eq!(percent_decode("a%20b"), "a b");
    }
}
