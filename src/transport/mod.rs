//! Wiring: the store, the gRPC services, health, reflection, the tower stack in front of them
//! (`stack.rs`: telemetry, auth, limits), graceful shutdown.

use std::{future::Future, process::ExitCode, sync::Arc, time::Duration};

use approvals_store::Store;
use tokio::net::TcpListener;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{
        Context, change_requests::ChangeRequestsService, policies::PoliciesService,
        read_cache::RequestCache, relay_state::RelayStateService,
    },
    apply::ApplyEngine,
    auth::{AuthSetupError, Authenticator},
    clock::SharedClock,
    config::Config,
    pb::{self, policies_server::PoliciesServer, relay_state_server::RelayStateServer},
    watch::Hub,
};

mod check;
mod connection;
pub mod limits;
mod middleware;
mod stack;
mod watch_route;

pub use self::check::{check_config, warnings};
use self::watch_route::WatchRoute;

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
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
    #[error(
        "refusing to serve on {0}: it is not a loopback address and no authentication is configured ([[auth.api_keys]] or [auth.jwt])"
    )]
    Unprotected(std::net::SocketAddr),
    #[error("audit.signing_key_file: {0}")]
    AuditKey(String),
}

/// What `approvals serve` and `approvals migrate` run once the configuration is loaded:
/// telemetry, then the migrations alone (`migrate_only`) or the server on `listen` until
/// SIGINT or SIGTERM. The exit code: 0, 2 for an unusable `listen`, 1 for anything else.
pub async fn run_process(config: Config, migrate_only: bool) -> ExitCode {
    let _telemetry = crate::telemetry::init(&crate::telemetry::TelemetrySettings {
        json: config.telemetry.log_format == "json",
        otlp_endpoint: Some(config.telemetry.otlp_endpoint.clone()),
        service_name: config.telemetry.service_name.clone(),
    });
    let result = if migrate_only {
        open_store(&config)
            .await
            .map(|_| tracing::info!("migrations applied"))
    } else {
        let addr = match config.listen_addr() {
            Ok(addr) => addr,
            Err(message) => {
                eprintln!("approvals: listen: {message}");
                return ExitCode::from(2);
            }
        };
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => run(config, listener, shutdown_signal()).await,
            Err(err) => {
                eprintln!("approvals: cannot listen on {addr}: {err}");
                return ExitCode::FAILURE;
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("approvals: {err}");
            ExitCode::FAILURE
        }
    }
}

/// SIGINT (Ctrl-C) or, on Unix, SIGTERM (Kubernetes stopping the pod).
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("shutdown requested; draining in-flight calls");
}

/// Connects to the database and applies pending migrations.
pub async fn open_store(config: &Config) -> Result<Store, ServeError> {
    let store = Store::connect(&config.database_settings()).await?;
    store.migrate().await?;
    if !config.audit.bench_create_hashing {
        tracing::warn!(
            "audit.bench_create_hashing = false: creates write unhashed events (benchmarks only)"
        );
        return Ok(store.without_create_hashing());
    }
    Ok(store)
}

/// Serves on `listener` until `shutdown` completes, then drains in-flight calls.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    run_with_clock(config, listener, shutdown, crate::clock::system()).await
}

/// [`run`], reading the time and taking new ids from `clock`.
pub async fn run_with_clock(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    clock: SharedClock,
) -> Result<(), ServeError> {
    crate::tls::install_default_provider();
    let authenticator = Arc::new(Authenticator::new(&config.auth).await?);
    let tls = if config.tls.is_enabled() {
        Some(crate::tls::ServerTls::new(&config.tls)?)
    } else {
        None
    };
    if tls.is_none()
        && let Ok(addr) = listener.local_addr()
        && !addr.ip().is_loopback()
    {
        tracing::warn!(address = %addr, "{}", check::PLAIN_TEXT_WARNING);
    }
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
    let signing_key = match config.audit.signing_key_file.as_str() {
        "" => None,
        path => Some(Arc::new(
            crate::audit::read_signing_key(std::path::Path::new(path))
                .map_err(ServeError::AuditKey)?,
        )),
    };
    let store = open_store(&config).await?;
    crate::telemetry::metrics::observe_pool(store.clone(), config.database.max_connections);

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

    let credential_leeway = config
        .auth
        .jwt
        .as_ref()
        .map_or(Duration::ZERO, |jwt| jwt.leeway);
    let cache = Arc::new(RequestCache::new(config.watch.cache_entries, 0));
    let hub = Hub::start(
        store.clone(),
        config.watch.clone(),
        credential_leeway,
        cache.clone(),
    )
    .await?;
    let engine = ApplyEngine::new(store.clone(), config.apply.clone(), clock.clone());
    let worker = engine.spawn_worker();
    let checkpointer = signing_key.as_ref().map(|key| {
        crate::audit::spawn_checkpointer(
            store.clone(),
            key.clone(),
            config.audit.checkpoint_interval,
            clock.clone(),
        )
    });
    let context = Arc::new(Context {
        store,
        hub: hub.clone(),
        engine,
        cache,
        clock,
        min_approvals: config.min_approvals,
        allowed_endpoints: config.apply.allowed_endpoints.clone(),
        attestor: signing_key.as_ref().map(|key| {
            Arc::new(crate::audit::attestation::Attestor::new(
                key.clone(),
                config.audit.attestation_ttl,
            ))
        }),
    });
    let change_requests = ChangeRequestsService::new(context.clone());
    let watch = WatchRoute::new(change_requests.clone(), config.limits.max_message_bytes);
    let change_requests = pb::change_requests_server::ChangeRequestsServer::new(change_requests)
        .max_decoding_message_size(config.limits.max_message_bytes);
    let audit = pb::audit_server::AuditServer::new(crate::api::audit::AuditService::new(
        context.clone(),
        signing_key.as_ref().map(|key| key.verifying_key()),
    ));
    let relay_state = RelayStateServer::new(RelayStateService::new(context.clone()))
        .max_decoding_message_size(config.limits.max_message_bytes);
    let calendars = pb::calendars_server::CalendarsServer::new(
        crate::api::calendars::CalendarsService::new(context.clone()),
    )
    .max_decoding_message_size(config.limits.max_message_bytes);
    let policies = PoliciesServer::new(PoliciesService::new(context))
        .max_decoding_message_size(config.limits.max_message_bytes);

    // `address` last: scripts (and the tests' `Process`) read it off the end of this line.
    tracing::info!(tls = tls.is_some(), address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "serving");
    let mut background = Vec::new();
    let incoming: std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = std::io::Result<connection::Coalescing>> + Send>,
    > = match tls {
        Some(tls) => {
            background.push(tls.spawn_reloader());
            let (incoming, accepting) =
                connection::incoming_tls(listener, config.limits.coalesce_writes, tls);
            background.push(accepting);
            Box::pin(incoming)
        }
        None => Box::pin(connection::incoming(
            listener,
            config.limits.coalesce_writes,
        )),
    };
    // Drain in-flight calls after the shutdown signal, but never for longer than the grace
    // period: an idle client that keeps its connection open must not hold the process.
    let draining = Arc::new(tokio::sync::Notify::new());
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
        // Streams per connection, watch streams included: without a limit one connection could
        // open watch streams up to the server-wide limit by itself. 0: no limit.
        .max_concurrent_streams(Some(config.limits.max_concurrent_streams).filter(|max| *max > 0))
        .layer(stack::layers(authenticator, &config.limits, watch))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(change_requests)
        .add_service(policies)
        .add_service(calendars)
        .add_service(audit)
        .add_service(relay_state)
        .serve_with_incoming_shutdown(incoming, signal);
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
    if let Some(checkpointer) = checkpointer {
        checkpointer.abort();
    }
    for task in background {
        task.abort();
    }
    tracing::info!("stopped");
    Ok(result?)
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
