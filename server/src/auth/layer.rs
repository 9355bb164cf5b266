//! The tower layer that authenticates every call: it puts the caller's
//! [`Principal`] in the request's extensions, or answers `UNAUTHENTICATED`
//! itself. Health checks pass without credentials; every other route
//! (reflection included) needs a valid principal, and the handlers check
//! what it may do.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};

use super::{Auth, CertificateIdentity, Principal};

/// Routes served without credentials.
const OPEN_PREFIX: &str = "/grpc.health.v1.Health/";

/// Authenticates each request (see the module).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    auth: Arc<Auth>,
}

impl AuthLayer {
    /// A layer over `auth`.
    pub fn new(auth: Arc<Auth>) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Auth>,
}

/// Authenticates `req` in place: the principal goes into its extensions.
/// The status is the answer to give when it fails.
pub fn authenticate_request<B>(
    auth: &Auth,
    req: &mut http::Request<B>,
) -> Result<(), tonic::Status> {
    if req.uri().path().starts_with(OPEN_PREFIX) {
        return Ok(());
    }
    let principal =
        auth.authenticate(req.headers(), req.extensions().get::<CertificateIdentity>())?;
    req.extensions_mut().insert(principal);
    Ok(())
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        match authenticate_request(&self.auth, &mut req) {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(status) => Either::Right(ready(Ok(status.into_http()))),
        }
    }
}

/// The principal a handler's request carries: the layer's, or the
/// anonymous one on a hub without authentication (a request that did not
/// pass the layer, as in a handler called directly).
pub fn principal<T>(auth: &Auth, request: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    match request.extensions().get::<Principal>() {
        Some(p) => Ok(p.clone()),
        None if !auth.enabled() => Ok(Principal::anonymous()),
        None => Err(tonic::Status::unauthenticated("no credentials")),
    }
}
