//! Protection for unary calls: a per-principal rate limit (governor's keyed GCRA limiter: the
//! budget of a token bucket, `burst` calls at once refilled at the rate) and a server-wide
//! concurrency limit (tower's `ConcurrencyLimit` behind `LoadShed`). Both answer
//! RESOURCE_EXHAUSTED at once rather than queueing, with `ErrorInfo` and a `RetryInfo` hint;
//! only the caller over its limit is refused. Watch streams, health and reflection are never
//! counted: streams are bounded by the `[watch]` settings, and probes must keep answering under
//! load.
//!
//! `Limits::call` runs inside the auth middleware (see `stack.rs`), so it finds the
//! authenticated [`Caller`] in the request's extensions.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex, TryLockError},
    time::Duration,
};

use approvals_domain::Principal;
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock, Reference},
    middleware::NoOpMiddleware,
    state::keyed::DefaultKeyedStateStore,
};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{
    BoxError, ServiceBuilder, ServiceExt, limit::GlobalConcurrencyLimitLayer,
    load_shed::error::Overloaded,
};

use super::middleware::{BoxFuture, Next, Request, Response};
use crate::{
    auth::{Caller, methods},
    config::LimitsConfig,
    error::ERROR_DOMAIN,
};

/// Past this many tracked principals, those whose budget is whole again are forgotten (they are
/// indistinguishable from a principal never seen), at most once per [`SWEEP_INTERVAL`].
const MAX_TRACKED_PRINCIPALS: usize = 10_000;
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Whether the limits apply to a call of `path`: our API's unary methods (streaming ones are
/// bounded by their own settings).
pub fn is_limited(path: &str) -> bool {
    methods::is_unary(path)
}

/// The `[limits]` that apply per call, shared by every connection.
#[derive(Clone)]
pub(crate) struct Limits {
    /// `None`: no rate limit.
    rate: Option<Arc<RateLimit>>,
    /// `None`: no concurrency limit. One semaphore for the whole server.
    concurrency: Option<GlobalConcurrencyLimitLayer>,
    max_concurrent: usize,
}

impl Limits {
    pub(crate) fn new(config: &LimitsConfig) -> Self {
        let rate = NonZeroU32::new(config.rate_limit_per_second).map(|per_second| {
            let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(per_second);
            Arc::new(RateLimit::new(per_second, burst, DefaultClock::default()))
        });
        let max_concurrent = config.max_concurrent_requests;
        Self {
            rate,
            concurrency: (max_concurrent > 0)
                .then(|| GlobalConcurrencyLimitLayer::new(max_concurrent)),
            max_concurrent,
        }
    }

    /// Passes a call on to `next`, or refuses it (module docs).
    pub(crate) async fn call(self, request: Request, next: Next) -> Result<Response, BoxError> {
        if !is_limited(request.uri().path()) {
            return next.oneshot(request).await;
        }
        if let Some(rate) = &self.rate
            && let Some(caller) = request.extensions().get::<Arc<Caller>>()
            && let Err(status) = rate.charge(caller)
        {
            crate::telemetry::metrics::record_limited("rate");
            return Ok(status.into_http());
        }
        let Some(concurrency) = &self.concurrency else {
            return next.oneshot(request).await;
        };
        // A permit is taken when the limit is polled ready and given back when the answer is
        // ready; with none left, `LoadShed` fails the call at once instead of waiting.
        let limited = ServiceBuilder::new()
            .load_shed()
            .layer(concurrency.clone())
            .service(next)
            .oneshot(request);
        // Boxed where its type is known: rustc cannot prove the bare future `Send` inside this
        // async fn (its error type's lifetime turns higher-ranked there).
        let limited: BoxFuture = Box::pin(limited);
        match limited.await {
            Err(err) if err.is::<Overloaded>() => {
                crate::telemetry::metrics::record_limited("concurrency");
                Ok(self.too_many_concurrent().into_http())
            }
            answer => answer,
        }
    }

    fn too_many_concurrent(&self) -> Status {
        refused(
            format!(
                "the server is handling its limit of {} concurrent calls; retry shortly",
                self.max_concurrent
            ),
            "TOO_MANY_CONCURRENT_REQUESTS",
            &[("max_concurrent_requests", self.max_concurrent.to_string())],
            Duration::from_millis(100),
        )
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

/// A budget per principal: `burst` calls at once, refilled at `per_second`. Its state is a
/// sharded map (no lock shared by every call); principals whose budget is whole again are
/// swept out once many are tracked.
struct RateLimit<C: Clock = DefaultClock> {
    per_second: NonZeroU32,
    limiter:
        RateLimiter<Principal, DefaultKeyedStateStore<Principal>, C, NoOpMiddleware<C::Instant>>,
    max_tracked: usize,
    /// When the last sweep ran. Only ever `try_lock`ed: a call never waits for a sweep.
    swept: Mutex<Option<C::Instant>>,
}

impl<C: Clock> RateLimit<C> {
    fn new(per_second: NonZeroU32, burst: NonZeroU32, clock: C) -> Self {
        let quota = Quota::per_second(per_second).allow_burst(burst);
        Self {
            per_second,
            limiter: RateLimiter::dashmap_with_clock(quota, clock),
            max_tracked: MAX_TRACKED_PRINCIPALS,
            swept: Mutex::new(None),
        }
    }

    /// Charges a call to the credential that authenticated it, whoever it acts for, and to the
    /// user acted for as well: RATE_LIMITED (naming the principal) for the first one over its
    /// budget.
    fn charge(&self, caller: &Caller) -> Result<(), Status> {
        self.sweep_if_due();
        std::iter::once(caller.credential_principal())
            .chain(caller.acting_principal.as_ref().map(|_| &caller.principal))
            .try_for_each(|principal| {
                self.limiter.check_key(principal).map_err(|not_until| {
                    let wait = not_until.wait_time_from(self.limiter.clock().now());
                    refused(
                        format!(
                            "{} is over its rate limit of {}/s; retry after {} ms",
                            principal.as_str(),
                            self.per_second,
                            wait.as_millis()
                        ),
                        "RATE_LIMITED",
                        &[("principal", principal.as_str().to_owned())],
                        wait,
                    )
                })
            })
    }

    /// Forgets the principals whose budget is whole, once the map holds `max_tracked` and the
    /// last sweep is [`SWEEP_INTERVAL`] old: one pass at most that often, not one per new
    /// principal.
    fn sweep_if_due(&self) {
        if self.limiter.len() < self.max_tracked {
            return;
        }
        let mut swept = match self.swept.try_lock() {
            Ok(swept) => swept,
            // A panic mid-sweep leaves nothing half-done that matters here.
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        let now = self.limiter.clock().now();
        if swept.is_some_and(|at| Duration::from(now.duration_since(at)) < SWEEP_INTERVAL) {
            return;
        }
        *swept = Some(now);
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use approvals_domain::IdentityProof;
    use governor::clock::FakeRelativeClock;
    use tower::{Layer, Service};

    use super::*;
    use crate::transport::middleware::Middleware;

    fn caller(principal: &str, acting: Option<&str>) -> Caller {
        Caller {
            principal: Principal::parse(principal).expect("principal"),
            groups: Vec::new(),
            scopes: Vec::new(),
            projects: None,
            acting_principal: acting.map(|p| Principal::parse(p).expect("principal")),
            proof: IdentityProof::Credential,
            method: crate::auth::AuthMethod::ApiKey,
            expire_time: None,
        }
    }

    fn rate(
        per_second: u32,
        burst: u32,
        clock: &FakeRelativeClock,
    ) -> RateLimit<FakeRelativeClock> {
        RateLimit::new(
            NonZeroU32::new(per_second).expect("rate"),
            NonZeroU32::new(burst).expect("burst"),
            clock.clone(),
        )
    }

    /// The refusal's reason, `principal` metadata and retry hint.
    fn refusal(status: &Status) -> (String, Option<String>, Option<Duration>) {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let info = status.get_details_error_info().expect("error info");
        let retry = status.get_details_retry_info().and_then(|r| r.retry_delay);
        (info.reason, info.metadata.get("principal").cloned(), retry)
    }

    #[test]
    fn a_principal_over_its_budget_is_refused_with_a_retry_hint_and_others_are_not() {
        let clock = FakeRelativeClock::default();
        let limit = rate(10, 2, &clock);
        let alice = caller("user:alice", None);
        assert!(limit.charge(&alice).is_ok());
        assert!(limit.charge(&alice).is_ok());
        let status = limit.charge(&alice).expect_err("over the burst");
        let (reason, principal, retry) = refusal(&status);
        assert_eq!(reason, "RATE_LIMITED");
        assert_eq!(principal.as_deref(), Some("user:alice"));
        let retry = retry.expect("a retry hint");
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_millis(100),
            "{retry:?}"
        );
        assert!(
            status
                .message()
                .starts_with("user:alice is over its rate limit of 10/s; retry after "),
            "{}",
            status.message()
        );
        assert!(
            limit.charge(&caller("user:bob", None)).is_ok(),
            "others are unaffected"
        );
        clock.advance(Duration::from_millis(100));
        assert!(limit.charge(&alice).is_ok(), "refilled at the rate");
        assert!(limit.charge(&alice).is_err(), "by one call");
    }

    #[test]
    fn an_on_behalf_of_call_charges_the_credential_and_the_user() {
        let clock = FakeRelativeClock::default();
        let limit = rate(1, 1, &clock);
        assert!(
            limit
                .charge(&caller("user:alice", Some("service:backend")))
                .is_ok()
        );
        let for_bob = limit
            .charge(&caller("user:bob", Some("service:backend")))
            .expect_err("the same credential");
        assert_eq!(refusal(&for_bob).1.as_deref(), Some("service:backend"));
        let alice = limit
            .charge(&caller("user:alice", None))
            .expect_err("alice was charged for the call made for her");
        assert_eq!(refusal(&alice).1.as_deref(), Some("user:alice"));
    }

    #[test]
    fn principals_whose_budget_is_whole_are_forgotten_and_the_others_kept() {
        let clock = FakeRelativeClock::default();
        let mut limit = rate(1, 1, &clock);
        limit.max_tracked = 3;
        for name in ["user:a", "user:b"] {
            assert!(limit.charge(&caller(name, None)).is_ok());
        }
        // Two seconds on, a and b have had their budget back for a whole period.
        clock.advance(Duration::from_secs(2));
        let busy = caller("user:busy", None);
        assert!(limit.charge(&busy).is_ok());
        assert_eq!(limit.limiter.len(), 3);
        // This call sweeps: a and b are forgotten, busy (over its budget) is kept and refused.
        assert!(
            limit.charge(&busy).is_err(),
            "a sweep never resets a budget in use"
        );
        assert_eq!(limit.limiter.len(), 1);
        for name in ["user:d", "user:e", "user:f"] {
            assert!(limit.charge(&caller(name, None)).is_ok());
        }
        assert_eq!(limit.limiter.len(), 4, "one sweep per interval at most");
    }

    /// A call to `path` through `service`, as far as its gRPC status.
    async fn call<S>(service: &mut S, path: &str) -> Option<String>
    where
        S: Service<Request, Response = Response>,
        S::Error: std::fmt::Debug,
    {
        let request = http::Request::builder()
            .uri(path)
            .body(tonic::body::Body::empty())
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
            tower::service_fn(move |request: Request| {
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
        let limits = Limits::new(&LimitsConfig {
            max_concurrent_requests: 1,
            ..LimitsConfig::default()
        });
        let mut service =
            Middleware::new(move |request, next| limits.clone().call(request, next)).layer(inner);
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
