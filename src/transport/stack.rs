//! The one tower stack in front of every service, built here and nowhere else. Outermost first:
//!
//! 1. telemetry: a span per call and the RPC metrics ([`crate::telemetry::Rpc`]); outermost, so
//!    it sees every answer, refusals included, and a stream's status in its trailers;
//! 2. authentication ([`Authenticator::admit`]): the caller into the request's extensions, or the
//!    status that refuses it;
//! 3. the unary limits ([`Limits`]): the per-principal rate limit (governor), then tower's
//!    `ConcurrencyLimit` behind `LoadShed`.
//!
//! Each is a [`Middleware`]: an async function of the request and the rest of the stack. What
//! the three do lives in their own modules, and tower's layers do the work wherever one fits.

use std::sync::Arc;

use tower::{
    ServiceBuilder, ServiceExt,
    layer::util::{Identity, Stack},
};
use tracing::Instrument;

use super::{limits::Limits, middleware::Middleware, watch_route::WatchRoute};
use crate::{
    auth::{Authenticator, methods},
    config::LimitsConfig,
    telemetry,
};

/// The stack's type: four [`Middleware`]s, each inside the one before it.
pub(crate) type Layers =
    Stack<Middleware, Stack<Middleware, Stack<Middleware, Stack<Middleware, Identity>>>>;

/// Telemetry, authentication, the limits and the watch route, in that order (module docs).
pub(crate) fn layers(
    authenticator: Arc<Authenticator>,
    limits: &LimitsConfig,
    watch: WatchRoute,
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
        .layer(Middleware::new(move |request, next| {
            let watch = watch.clone();
            async move {
                if WatchRoute::serves(&request) {
                    Ok(watch.serve(request).await)
                } else {
                    next.oneshot(request).await
                }
            }
        }))
}
