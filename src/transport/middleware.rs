//! [`Middleware`]: a tower layer made of an async function of the request and the rest of the
//! stack ([`Next`]). It is the crate's one hand-written `Layer`/`Service` pair, used for each step
//! of the stack (`stack.rs`).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tower::{BoxError, Layer, Service, ServiceExt, util::BoxCloneService};

pub(crate) type Request = http::Request<tonic::body::Body>;
pub(crate) type Response = http::Response<tonic::body::Body>;
/// The rest of the stack, as a middleware sees it: `next.oneshot(request)` passes the call on.
pub(crate) type Next = BoxCloneService<Request, Response, BoxError>;

pub(crate) type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;
type Handler = dyn Fn(Request, Next) -> BoxFuture + Send + Sync;

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
