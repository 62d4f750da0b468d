//! Authentication of callers: a bearer token (read from `--auth-token-file`
//! at start) in the `authorization` metadata of every call, except health
//! checks and server reflection, which stay open for probes and grpcurl.
//! A tower layer, stacked in [`crate::server`].

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use futures::future::BoxFuture;
use tonic::Status;
use tower::{Layer, Service};

/// Services anyone may call.
const OPEN: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Reads the token: the file's content without surrounding white space
/// (with a warning when other users may read the file).
pub fn read_token(path: &Path) -> anyhow::Result<String> {
    cowsnap_proto::server::warn_if_open_to_others(path, "auth token");
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the auth token", path.display()))?;
    let t = t.trim().to_string();
    anyhow::ensure!(!t.is_empty(), "{}: the auth token is empty", path.display());
    Ok(t)
}

/// Checks `authorization: Bearer TOKEN`; with no token configured every
/// call passes.
#[derive(Clone)]
pub struct AuthLayer {
    token: Option<Arc<str>>,
}

impl AuthLayer {
    pub fn new(token: Option<String>) -> AuthLayer {
        AuthLayer {
            token: token.map(Arc::from),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            token: self.token.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    token: Option<Arc<str>>,
}

/// The credentials of `Bearer TOKEN`: the scheme in any case (RFC 7235),
/// then one or more spaces; white space around the token is ignored.
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_matches(' ').trim())
}

/// Compares without an early exit, so timing does not reveal a prefix.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S> Auth<S> {
    fn check<B>(&self, req: &http::Request<B>) -> Result<(), Status> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let path = req.uri().path();
        if OPEN.iter().any(|p| path.starts_with(p)) {
            return Ok(());
        }
        let Some(value) = req.headers().get(http::header::AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "missing authorization: send `authorization: Bearer TOKEN`",
            ));
        };
        let presented = value.to_str().ok().and_then(bearer).unwrap_or("");
        if same(presented.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.check(&req) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bearer;

    #[test]
    fn the_scheme_is_case_insensitive() {
        for v in [
            "Bearer t0k",
            "bearer t0k",
            "BEARER t0k",
            "BeArEr t0k",
            "Bearer   t0k",
            "Bearer t0k ",
        ] {
            assert_eq!(bearer(v), Some("t0k"), "{v:?}");
        }
        for v in ["Basic t0k", "Bearert0k", "Bearer", "t0k", ""] {
            assert!(bearer(v).is_none_or(str::is_empty), "{v:?}");
        }
    }
}
