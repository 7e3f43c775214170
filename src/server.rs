//! Wiring: the store, the gRPC services, health, reflection, limits, graceful shutdown.

use std::{future::Future, time::Duration};

use approvals_store::Store;
use tokio::net::TcpListener;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    apply::ApplyEngine,
    auth::{AuthLayer, AuthSetupError, Authenticator},
    config::Config,
    pb::{self, change_requests_server::ChangeRequestsServer, policies_server::PoliciesServer},
    service::{change_requests::ChangeRequestsService, policies::PoliciesService},
    watch::{Hub, WatchFrame, WatchStream},
};

/// The health service name Kubernetes liveness probes check: SERVING while the process runs,
/// whatever the database does, so a database outage makes pods unready, never restarts them.
pub const LIVENESS_SERVICE: &str = "liveness";
/// Health names that follow the database: the whole server (readiness) and the API service.
const DATABASE_BACKED: [&str; 2] = ["", "approvals.v1.ChangeRequests"];

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] approvals_store::StoreError),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    #[error(
        "refusing to serve on {0}: it is not a loopback address and no authentication is configured ([[auth.api_keys]] or [auth.jwt])"
    )]
    Unprotected(std::net::SocketAddr),
}

/// Connects to the database and applies pending migrations.
pub async fn open_store(config: &Config) -> Result<Store, ServeError> {
    let store = Store::connect(&config.database_settings()).await?;
    store.migrate().await?;
    Ok(store)
}

/// Serves on `listener` until `shutdown` completes, then drains in-flight calls.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let authenticator = std::sync::Arc::new(Authenticator::new(&config.auth).await?);
    if authenticator.is_development() {
        if let Ok(addr) = listener.local_addr()
            && !addr.ip().is_loopback()
        {
            return Err(ServeError::Unprotected(addr));
        }
        tracing::warn!(
            "no authentication configured: callers name themselves with x-approvals-actor and hold every scope (loopback address only)"
        );
    }
    let store = open_store(&config).await?;
    crate::metrics::observe_pool(store.clone(), config.database.max_connections);

    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
        .await;
    set_database_health(&reporter, ServingStatus::Serving).await;
    let probe = tokio::spawn(probe_database(
        store.clone(),
        reporter.clone(),
        config.database.health_interval,
        config.database.acquire_timeout,
    ));

    let reflection_v1 = reflection().build_v1()?;
    // grpcurl 1.8.x speaks the older v1alpha reflection protocol.
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let hub = Hub::start(store.clone(), config.watch.clone()).await?;
    let engine = ApplyEngine::new(store.clone(), config.apply.clone());
    let worker = engine.spawn_worker();
    let service = ChangeRequestsService::new(
        store.clone(),
        hub.clone(),
        engine.clone(),
        config.min_approvals,
    );
    let change_requests = WatchRoute {
        watch: service.clone(),
        max_message_bytes: config.limits.max_message_bytes,
        inner: ChangeRequestsServer::new(service)
            .max_decoding_message_size(config.limits.max_message_bytes),
    };
    let policies = PoliciesServer::new(PoliciesService::new(store))
        .max_decoding_message_size(config.limits.max_message_bytes);

    tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving");
    // Drain in-flight calls after the shutdown signal, but never for longer than the grace
    // period: an idle client that keeps its connection open must not hold the process.
    let draining = std::sync::Arc::new(tokio::sync::Notify::new());
    let signal = {
        let draining = draining.clone();
        let hub = hub.clone();
        async move {
            shutdown.await;
            // Watch streams never end by themselves: end them, telling each where to resume.
            hub.close();
            draining.notify_one();
        }
    };
    let serve = tonic::transport::Server::builder()
        .timeout(config.limits.request_timeout)
        .http2_keepalive_interval(
            Some(config.limits.keepalive_interval).filter(|interval| !interval.is_zero()),
        )
        .http2_keepalive_timeout(Some(config.limits.keepalive_timeout))
        .layer(crate::telemetry::RpcLayer)
        .layer(AuthLayer::new(authenticator))
        .layer(crate::limits::LimitLayer::new(&config.limits))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(change_requests)
        .add_service(policies)
        .serve_with_incoming_shutdown(incoming(listener), signal);
    let grace = config.limits.shutdown_grace;
    let result = tokio::select! {
        result = serve => result,
        () = async {
            draining.notified().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "calls still in flight after the shutdown grace period; stopping anyway");
            Ok(())
        }
    };
    probe.abort();
    worker.abort();
    tracing::info!("stopped");
    Ok(result?)
}

/// Accepted connections with Nagle's algorithm off. tonic sets TCP_NODELAY only on listeners it
/// binds itself; without it a response written in several pieces (headers, then data, then
/// trailers) waits for the client's delayed ACK, about 40 ms (measured with approvals-bench: get
/// at 64 in flight went from ~1,500/s with p50 44 ms to the figures in the README).
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Our API, health, and the `google.rpc` error details, so grpcurl can decode ErrorInfo and
/// BadRequest in error responses.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

async fn set_database_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in DATABASE_BACKED {
        reporter.set_service_status(name, status).await;
    }
}

/// Checks the database on its own schedule, so health follows it even with no traffic.
async fn probe_database(
    store: Store,
    reporter: HealthReporter,
    interval: Duration,
    timeout: Duration,
) {
    let mut serving = true;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let reachable = matches!(
            tokio::time::timeout(timeout, store.ping()).await,
            Ok(Ok(()))
        );
        if reachable != serving {
            serving = reachable;
            if reachable {
                tracing::info!("database reachable again: SERVING");
                set_database_health(&reporter, ServingStatus::Serving).await;
            } else {
                tracing::warn!("database unreachable: NOT_SERVING");
                set_database_health(&reporter, ServingStatus::NotServing).await;
            }
        }
    }
}

/// The ChangeRequests service, with WatchChangeRequests sent as [`WatchFrame`]s: events from the
/// live ring go out encoded once for all watchers, instead of cloned and encoded per stream
/// (the generated code's codec takes only the generated message). Same path, same messages on
/// the wire; every other method goes to the generated server.
#[derive(Clone)]
struct WatchRoute {
    inner: ChangeRequestsServer<ChangeRequestsService>,
    watch: ChangeRequestsService,
    max_message_bytes: usize,
}

const WATCH_PATH: &str = "/approvals.v1.ChangeRequests/WatchChangeRequests";

impl tonic::server::NamedService for WatchRoute {
    const NAME: &'static str =
        <ChangeRequestsServer<ChangeRequestsService> as tonic::server::NamedService>::NAME;
}

impl tower::Service<http::Request<tonic::body::Body>> for WatchRoute {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tower::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != WATCH_PATH {
            return Box::pin(self.inner.call(request));
        }
        let watch = OpenWatch(self.watch.clone());
        let mut grpc = tonic::server::Grpc::new(WatchCodec)
            .apply_max_message_size_config(Some(self.max_message_bytes), None);
        Box::pin(async move { Ok(grpc.server_streaming(watch, request).await) })
    }
}

/// The watch codec: prost, with a smaller first buffer than tonic's 8 KiB. Every open stream
/// holds its buffer while idle; it grows when a message needs more.
struct WatchCodec;

/// Bytes of a watch stream's first encode buffer.
const WATCH_BUFFER_BYTES: usize = 1024;

impl tonic::codec::Codec for WatchCodec {
    type Encode = WatchFrame;
    type Decode = pb::WatchChangeRequestsRequest;
    type Encoder = tonic_prost::ProstEncoder<WatchFrame>;
    type Decoder = tonic_prost::ProstDecoder<pb::WatchChangeRequestsRequest>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(tonic::codec::BufferSettings::new(
            WATCH_BUFFER_BYTES,
            32 * 1024,
        ))
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

struct OpenWatch(ChangeRequestsService);

impl tonic::server::ServerStreamingService<pb::WatchChangeRequestsRequest> for OpenWatch {
    type Response = WatchFrame;
    type ResponseStream = WatchStream;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<tonic::Response<WatchStream>, tonic::Status>> + Send>,
    >;

    fn call(&mut self, request: tonic::Request<pb::WatchChangeRequestsRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.open_watch(request).await })
    }
}
