//! Logs, traces and metrics. Logs go through `tracing` (text or JSON). When
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans and metrics are also exported over OTLP/gRPC,
//! configured by the standard `OTEL_*` variables (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_METRIC_EXPORT_INTERVAL`, ...); otherwise nothing is
//! exported and the instruments are no-ops.
//!
//! [`RpcLayer`] gives every call a span (method, status code, project and change request id
//! where known) continuing the W3C trace context of the incoming metadata, and records the RPC
//! metrics.

pub mod metrics;

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use opentelemetry::{global, propagation::Extractor, trace::TracerProvider as _};
use opentelemetry_sdk::{
    Resource, metrics::SdkMeterProvider, propagation::TraceContextPropagator,
    trace::SdkTracerProvider,
};
use tower::{Layer, Service};
use tracing::{Instrument, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const DEFAULT_FILTER: &str = "info,sqlx=warn,sea_orm=warn,sea_orm_migration=warn,h2=warn";

/// Keeps the exporters alive; flushes them when dropped (at exit).
#[derive(Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(tracer) = self.tracer.take()
            && let Err(err) = tracer.shutdown()
        {
            eprintln!("approvals: flushing spans: {err}");
        }
        if let Some(meter) = self.meter.take()
            && let Err(err) = meter.shutdown()
        {
            eprintln!("approvals: flushing metrics: {err}");
        }
    }
}

/// Installs the log subscriber and, when configured, the OTLP exporters. Call inside the
/// runtime (the exporters' gRPC channels are tokio tasks).
/// What the `[telemetry]` section (and `--log-format`) chose.
#[derive(Debug, Clone, Default)]
pub struct TelemetrySettings {
    pub json: bool,
    /// Used when `OTEL_EXPORTER_OTLP_ENDPOINT` is not set (the environment wins).
    pub otlp_endpoint: Option<String>,
    /// `service.name`, unless `OTEL_SERVICE_NAME` says otherwise.
    pub service_name: String,
}

pub fn init(settings: &TelemetrySettings) -> Telemetry {
    let json = settings.json;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let mut telemetry = Telemetry::default();
    let from_env = std::env::var(ENDPOINT_ENV).is_ok_and(|v| !v.trim().is_empty());
    let from_config = settings
        .otlp_endpoint
        .clone()
        .filter(|e| !e.trim().is_empty() && !from_env);
    let otlp = from_env || from_config.is_some();
    let mut otel_layer = None;
    let mut setup_error = None;
    if otlp {
        match exporters(from_config.as_deref(), &settings.service_name) {
            Ok((tracer, meter)) => {
                global::set_text_map_propagator(TraceContextPropagator::new());
                global::set_meter_provider(meter.clone());
                otel_layer =
                    Some(tracing_opentelemetry::layer().with_tracer(tracer.tracer("approvals")));
                telemetry.tracer = Some(tracer);
                telemetry.meter = Some(meter);
            }
            Err(err) => setup_error = Some(err),
        }
    }
    let registry = tracing_subscriber::registry().with(filter).with(otel_layer);
    if json {
        registry
            .with(tracing_subscriber::fmt::layer().json())
            .init();
    } else {
        registry.with(tracing_subscriber::fmt::layer()).init();
    }
    if let Some(err) = setup_error {
        tracing::error!(error = %err, "OpenTelemetry export is not running");
    } else if otlp {
        tracing::info!("exporting spans and metrics over OTLP");
    }
    telemetry
}

fn exporters(
    endpoint: Option<&str>,
    service_name: &str,
) -> Result<(SdkTracerProvider, SdkMeterProvider), String> {
    use opentelemetry_otlp::WithExportConfig;
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_owned());
    }
    let resource = resource.build();
    let mut spans = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        spans = spans.with_endpoint(endpoint);
    }
    let spans = spans.build().map_err(|e| format!("span exporter: {e}"))?;
    let tracer = SdkTracerProvider::builder()
        .with_batch_exporter(spans)
        .with_resource(resource.clone())
        .build();
    let mut metrics = opentelemetry_otlp::MetricExporter::builder().with_tonic();
    if let Some(endpoint) = endpoint {
        metrics = metrics.with_endpoint(endpoint);
    }
    let metrics = metrics
        .build()
        .map_err(|e| format!("metric exporter: {e}"))?;
    let reader = opentelemetry_sdk::metrics::PeriodicReader::builder(metrics).build();
    let meter = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource)
        .build();
    Ok((tracer, meter))
}

/// Reads W3C `traceparent`/`tracestate` from request headers (gRPC metadata).
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A span per call and the RPC metrics; outermost, so it sees every answer.
#[derive(Clone)]
pub struct RpcLayer {
    /// Which paths stream (their status is in the trailers): the method table's answer.
    is_streaming: fn(&str) -> bool,
}

impl RpcLayer {
    pub fn new(is_streaming: fn(&str) -> bool) -> Self {
        Self { is_streaming }
    }
}

impl<S> Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            is_streaming: self.is_streaming,
        }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    is_streaming: fn(&str) -> bool,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<http::Request<B>> for RpcService<S>
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
        let path = request.uri().path().to_owned();
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("", path.as_str()));
        let span = tracing::info_span!(
            "rpc",
            otel.name = %path.trim_start_matches('/'),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
            otel.status_code = Empty,
            project = Empty,
            change_request_id = Empty,
        );
        let parent = global::get_text_map_propagator(|propagator| {
            propagator.extract(&Headers(request.headers()))
        });
        let _ = span.set_parent(parent);
        let started = Instant::now();
        let call = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        // A stream's status comes in its trailers, after its last message.
        let streaming = (self.is_streaming)(&path);
        Box::pin(
            async move {
                let response = call.await;
                let finish = Finish {
                    span: tracing::Span::current(),
                    path,
                    started,
                };
                match response {
                    Ok(response) => {
                        // A trailers-only answer (every error) carries grpc-status in the
                        // headers; a successful unary answer carries it in the trailers, as 0.
                        let in_headers = status_in(response.headers());
                        match in_headers {
                            None if streaming => {
                                let (parts, body) = response.into_parts();
                                Ok(http::Response::from_parts(
                                    parts,
                                    tonic::body::Body::new(Recorded {
                                        body,
                                        finish: Some(finish),
                                    }),
                                ))
                            }
                            _ => {
                                finish.record(in_headers.unwrap_or(tonic::Code::Ok));
                                Ok(response)
                            }
                        }
                    }
                    Err(err) => {
                        finish.record(tonic::Code::Internal);
                        Err(err)
                    }
                }
            }
            .instrument(span),
        )
    }
}

/// The `grpc-status` of a header or trailer map, if it has one.
fn status_in(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

/// What is recorded once a call's status is known: the span's status and the RPC metrics.
struct Finish {
    span: tracing::Span,
    path: String,
    started: Instant,
}

impl Finish {
    fn record(self, code: tonic::Code) {
        self.span.record("rpc.grpc.status_code", code as i32);
        if code != tonic::Code::Ok {
            self.span.record("otel.status_code", "ERROR");
        }
        metrics::record_rpc(&self.path, code_name(code), self.started.elapsed());
    }
}

/// A streaming response's body, recording the status its trailers carry (or CANCELLED when the
/// client goes away first). Before, a watch that ended with an error was recorded as OK: its
/// headers carry no status.
struct Recorded {
    body: tonic::body::Body,
    finish: Option<Finish>,
}

impl http_body::Body for Recorded {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        let code = match &polled {
            Some(Ok(frame)) => frame
                .trailers_ref()
                .map(|t| status_in(t).unwrap_or(tonic::Code::Ok)),
            Some(Err(status)) => Some(status.code()),
            None => Some(tonic::Code::Ok),
        };
        if let Some(code) = code
            && let Some(finish) = self.finish.take()
        {
            finish.record(code);
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        if let Some(finish) = self.finish.take() {
            finish.record(tonic::Code::Cancelled);
        }
    }
}

/// The canonical upper-case name of a status code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
