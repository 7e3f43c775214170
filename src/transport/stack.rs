//! The one tower stack in front of every service, built here and nowhere else. Outermost first:
//!
//! 1. telemetry: a span per call and the RPC metrics ([`crate::telemetry::Rpc`]); outermost, so
//!    it sees every answer, refusals included, and a stream's status in its trailers;
//! 2. authentication ([`Authenticator::admit`]): the caller into the request's extensions, or the
//!    status that refuses it;
//! 3. the unary limits ([`Limits`]): the per-principal rate limit (governor), then tower's
//!    `ConcurrencyLimit` behind `LoadShed`.
//!
//! Each is a [`Middleware`]: an async function of the request and the rest of the stack
//! ([`Next`]). It is the crate's one hand-written `Layer`/`Service` pair; what the three do lives
//! in their own modules, and tower's layers do the work wherever one fits.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tower::{
    BoxError, Layer, Service, ServiceBuilder, ServiceExt,
    layer::util::{Identity, Stack},
    util::BoxCloneService,
};
use tracing::Instrument;

use super::limits::Limits;
use crate::{
    auth::{Authenticator, methods},
    config::LimitsConfig,
    telemetry,
};

pub(crate) type Request = http::Request<tonic::body::Body>;
pub(crate) type Response = http::Response<tonic::body::Body>;
/// The rest of the stack, as a middleware sees it: `next.oneshot(request)` passes the call on.
pub(crate) type Next = BoxCloneService<Request, Response, BoxError>;

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;
type Handler = dyn Fn(Request, Next) -> BoxFuture + Send + Sync;

/// The stack's type: three [`Middleware`]s, each inside the one before it.
pub(crate) type Layers = Stack<Middleware, Stack<Middleware, Stack<Middleware, Identity>>>;

/// Telemetry, authentication and the limits, in that order (module docs).
pub(crate) fn layers(
    authenticator: Arc<Authenticator>,
    limits: &LimitsConfig,
) -> ServiceBuilder<Layers> {
    let limits = Limits::new(limits);
    ServiceBuilder::new()
        .layer(Middleware::new(|request, next| {
            let rpc = telemetry::Rpc::start(&request, methods::is_streaming(request.uri().path()));
            let span = rpc.span().clone();
            async move { rpc.finish(next.oneshot(request).await) }.instrument(span)
        }))
        .layer(Middleware::new(move |mut request, next| {
            let authenticator = authenticator.clone();
            async move {
                match authenticator.admit(&mut request).await {
                    Ok(()) => next.oneshot(request).await,
                    Err(status) => Ok(status.into_http()),
                }
            }
        }))
        .layer(Middleware::new(move |request, next| {
            limits.clone().call(request, next)
        }))
}

/// A layer made of an async function of the request and [`Next`]: the function answers the call
/// itself or passes it on.
#[derive(Clone)]
pub(crate) struct Middleware(Arc<Handler>);

impl Middleware {
    pub(crate) fn new<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request, Next) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response, BoxError>> + Send + 'static,
    {
        Self(Arc::new(move |request, next| {
            Box::pin(handler(request, next))
        }))
    }
}

impl<S> Layer<S> for Middleware {
    type Service = MiddlewareService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MiddlewareService {
            inner,
            handler: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct MiddlewareService<S> {
    inner: S,
    handler: Arc<Handler>,
}

impl<S> Service<Request> for MiddlewareService<S>
where
    S: Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The service that was polled ready serves this call; a clone takes its place.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        (self.handler)(request, BoxCloneService::new(ready.map_err(Into::into)))
    }
}
