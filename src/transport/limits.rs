//! Protection for unary calls: a server-wide concurrency limit and a per-principal rate limit
//! (a token bucket per authenticated principal). Both answer RESOURCE_EXHAUSTED at once rather
//! than queueing, with `ErrorInfo` and a `RetryInfo` hint; only the caller over its limit is
//! refused. Watch streams, health and reflection are never counted: streams are bounded by the
//! `[watch]` settings, and probes must keep answering under load.
//!
//! The layer sits inside the auth layer, so it finds the authenticated [`Caller`] in the
//! request's extensions.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::sync::Semaphore;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

use crate::{
    auth::{Caller, methods},
    config::LimitsConfig,
    error::ERROR_DOMAIN,
};

/// Above this many tracked principals, full (idle) buckets are forgotten.
const MAX_TRACKED_PRINCIPALS: usize = 10_000;

/// Whether the limits apply to a call of `path`: our API's unary methods (streaming ones are
/// bounded by their own settings).
pub fn is_limited(path: &str) -> bool {
    methods::is_unary(path)
}

#[derive(Clone)]
pub struct LimitLayer {
    limits: Arc<Limits>,
}

struct Limits {
    /// `None`: no concurrency limit.
    in_flight: Option<Arc<Semaphore>>,
    max_concurrent: usize,
    /// `None`: no rate limit.
    rate: Option<RateLimiter>,
}

impl LimitLayer {
    pub fn new(config: &LimitsConfig) -> Self {
        let max_concurrent = config.max_concurrent_requests;
        let rate = (config.rate_limit_per_second > 0).then(|| {
            let burst = if config.rate_limit_burst > 0 {
                config.rate_limit_burst
            } else {
                config.rate_limit_per_second
            };
            RateLimiter::new(f64::from(config.rate_limit_per_second), f64::from(burst))
        });
        Self {
            limits: Arc::new(Limits {
                in_flight: (max_concurrent > 0).then(|| Arc::new(Semaphore::new(max_concurrent))),
                max_concurrent,
                rate,
            }),
        }
    }
}

impl<S> Layer<S> for LimitLayer {
    type Service = LimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitService {
            inner,
            limits: self.limits.clone(),
        }
    }
}

#[derive(Clone)]
pub struct LimitService<S> {
    inner: S,
    limits: Arc<Limits>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<http::Request<B>> for LimitService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !is_limited(request.uri().path()) {
            return Box::pin(self.inner.call(request));
        }
        // The credential that authenticated pays for every call it makes, whoever it acts for;
        // a user acted for pays as well.
        if let Some(rate) = &self.limits.rate
            && let Some(caller) = request.extensions().get::<Arc<Caller>>()
            && let Some((limited, wait)) = std::iter::once(caller.credential_principal())
                .chain(caller.acting_principal.as_ref().map(|_| &caller.principal))
                .find_map(|principal| rate.take(principal.as_str()).err().map(|w| (principal, w)))
        {
            let status = refused(
                format!(
                    "{} is over its rate limit of {}/s; retry after {} ms",
                    limited.as_str(),
                    rate.per_second,
                    wait.as_millis()
                ),
                "RATE_LIMITED",
                &[("principal", limited.as_str().to_owned())],
                wait,
            );
            crate::telemetry::metrics::record_limited("rate");
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        let permit = match &self.limits.in_flight {
            Some(semaphore) => match semaphore.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let status = refused(
                        format!(
                            "the server is handling its limit of {} concurrent calls; retry shortly",
                            self.limits.max_concurrent
                        ),
                        "TOO_MANY_CONCURRENT_REQUESTS",
                        &[(
                            "max_concurrent_requests",
                            self.limits.max_concurrent.to_string(),
                        )],
                        Duration::from_millis(100),
                    );
                    crate::telemetry::metrics::record_limited("concurrency");
                    return Box::pin(std::future::ready(Ok(status.into_http())));
                }
            },
            None => None,
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            drop(permit);
            response
        })
    }
}

fn refused(message: String, reason: &str, metadata: &[(&str, String)], wait: Duration) -> Status {
    let metadata: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
    details.set_retry_info(Some(wait));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// A token bucket per principal: `burst` calls at once, refilled at `per_second`.
struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    fn new(per_second: f64, burst: f64) -> Self {
        Self {
            per_second,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `principal`, or says how long until one is available.
    fn take(&self, principal: &str) -> Result<(), Duration> {
        let now = Instant::now();
        // A poisoned lock only means another call panicked mid-update; the buckets stay usable.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if buckets.len() >= MAX_TRACKED_PRINCIPALS && !buckets.contains_key(principal) {
            let (per_second, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.duration_since(b.updated).as_secs_f64() * per_second < burst
            });
        }
        let bucket = buckets.entry(principal.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let refill = now.duration_since(bucket.updated).as_secs_f64() * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_per_principal_and_refill() {
        let limiter = RateLimiter::new(10.0, 2.0);
        assert!(limiter.take("user:a").is_ok());
        assert!(limiter.take("user:a").is_ok());
        let wait = limiter.take("user:a").expect_err("over the burst");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(limiter.take("user:b").is_ok(), "others are unaffected");
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.take("user:a").is_ok(), "refilled");
    }

    /// A call to `path` through `service`, as far as its gRPC status.
    async fn call<S>(service: &mut S, path: &str) -> Option<String>
    where
        S: Service<http::Request<()>, Response = http::Response<tonic::body::Body>>,
        S::Error: std::fmt::Debug,
    {
        let request = http::Request::builder()
            .uri(path)
            .body(())
            .expect("request");
        let response = service.call(request).await.expect("answered");
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    #[tokio::test]
    async fn over_the_concurrency_limit_is_refused_at_once_and_streams_pass() {
        let release = Arc::new(tokio::sync::Notify::new());
        let inner = {
            let release = release.clone();
            tower::service_fn(move |request: http::Request<()>| {
                let release = release.clone();
                async move {
                    if request.uri().path().ends_with("/ApplyChangeRequest") {
                        release.notified().await;
                    }
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        tonic::body::Body::empty(),
                    ))
                }
            })
        };
        let layer = LimitLayer::new(&LimitsConfig {
            max_concurrent_requests: 1,
            ..LimitsConfig::default()
        });
        let mut service = layer.layer(inner);
        let mut first = service.clone();
        let slow = tokio::spawn(async move {
            call(
                &mut first,
                "/approvals.v1.ChangeRequests/ApplyChangeRequest",
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let refused = call(
            &mut service,
            "/approvals.v1.ChangeRequests/GetChangeRequest",
        )
        .await;
        assert_eq!(
            refused.as_deref(),
            Some((Code::ResourceExhausted as i32).to_string().as_str())
        );
        // A stream and a health check are not counted.
        assert_eq!(
            call(
                &mut service,
                "/approvals.v1.ChangeRequests/WatchChangeRequests"
            )
            .await,
            None
        );
        assert_eq!(
            call(&mut service, "/grpc.health.v1.Health/Check").await,
            None
        );
        release.notify_one();
        assert_eq!(slow.await.expect("joined"), None);
        // The permit is back.
        assert_eq!(
            call(
                &mut service,
                "/approvals.v1.ChangeRequests/GetChangeRequest"
            )
            .await,
            None
        );
    }

    #[test]
    fn streams_health_and_reflection_are_not_limited() {
        assert!(is_limited(
            "/approvals.v1.ChangeRequests/CreateChangeRequest"
        ));
        assert!(is_limited("/approvals.v1.Policies/GetPolicy"));
        assert!(!is_limited(
            "/approvals.v1.ChangeRequests/WatchChangeRequests"
        ));
        assert!(!is_limited("/grpc.health.v1.Health/Check"));
        assert!(!is_limited(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
    }
}
